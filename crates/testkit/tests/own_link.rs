//! The own link first, on loopback: new flows leave directly while the own
//! link answers its probes, move to the pool the moment it goes silent (a
//! real silent endpoint: its accept queue full, SYNs dropped), and come
//! back after the hold. The netns suite (`bandshare/tests/own_link.rs`)
//! does the same with a real uplink and an nftables drop.

use bandshare_agent::requester::own_link::{Thresholds, Via};
use bandshare_testkit::gateway::Gateway;
use bandshare_testkit::http::socks_get;
use bandshare_testkit::{Cluster, SharerSpec, wait_until};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_link_first_pool_when_silent_and_back_after_the_hold() {
    let c = Cluster::start(vec![
        SharerSpec::new("alice", 5.0, 0.0),
        SharerSpec::new("bob", 10.0, 0.0),
    ])
    .await
    .expect("cluster");
    let gw = Gateway::start().await.expect("gateway");
    let mut opts = c.requester_options();
    opts.via = Via::Auto;
    opts.standby = 1;
    opts.pool_size = 2;
    opts.probes = vec![gw.addr.to_string()];
    opts.own_link = Thresholds {
        hold: Duration::from_secs(1),
        ..Thresholds::default()
    };
    let r = c.requester(opts).await.expect("requester");
    let (pool, direct) = (r.requester.pool.clone(), r.requester.direct.clone());
    let port = c.target.addr.port();
    let through_pool = || pool.status().pool.iter().map(|m| m.flows).sum::<u64>();
    let flows = |d: &bandshare_agent::requester::direct::Direct| d.status().flows;

    // Healthy: one warm standby member, flows go direct.
    let healthy = wait_until(Duration::from_secs(5), || {
        direct.status().state == "healthy" && pool.len() == 1
    })
    .await;
    assert!(healthy, "{:?} {:?}", direct.status(), pool.status());
    let (status, _) = socks_get(r.socks(), "localhost", port, "/direct")
        .await
        .expect("fetch");
    assert!(status.contains("200"), "{status}");
    assert_eq!((flows(&direct), through_pool()), (1, 0));

    // Silent: the probes time out, new flows move to the pool, which fills.
    gw.cut().await.expect("cut");
    let cut = Instant::now();
    let moved = wait_until(Duration::from_secs(5), || {
        direct.path() == bandshare_agent::requester::own_link::Path::Pool
    })
    .await;
    assert!(moved, "{:?}", direct.status());
    eprintln!(
        "own link silent: flows moved to the pool after {:?}",
        cut.elapsed()
    );
    // (The pool also carries the requester's own share requests now.)
    let before = through_pool();
    let (status, _) = socks_get(r.socks(), "localhost", port, "/pool")
        .await
        .expect("fetch through the pool");
    assert!(status.contains("200"), "{status}");
    assert_eq!(flows(&direct), 1);
    assert!(through_pool() > before, "{:?}", pool.status());
    let filled = wait_until(Duration::from_secs(10), || pool.len() == 2).await;
    assert!(
        filled,
        "the pool did not fill to --pool: {:?}",
        pool.status()
    );

    // Answering again: back to direct only after the hold, and the pool
    // shrinks to its standby.
    gw.restore();
    let restored = Instant::now();
    let back = wait_until(Duration::from_secs(10), || {
        direct.path() == bandshare_agent::requester::own_link::Path::Direct
    })
    .await;
    assert!(back, "{:?}", direct.status());
    assert!(
        restored.elapsed() >= Duration::from_secs(1),
        "before the hold"
    );
    eprintln!("own link back: direct again after {:?}", restored.elapsed());
    let (status, _) = socks_get(r.socks(), "localhost", port, "/back")
        .await
        .expect("fetch");
    assert!(status.contains("200"), "{status}");
    assert_eq!(flows(&direct), 2);
    let shrunk = wait_until(Duration::from_secs(15), || pool.len() == 1).await;
    assert!(
        shrunk,
        "the pool did not shrink to its standby: {:?}",
        pool.status()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn via_direct_never_asks_the_coordinator_and_via_pool_never_goes_direct() {
    let c = Cluster::start(vec![SharerSpec::new("alice", 5.0, 0.0)])
        .await
        .expect("cluster");
    let port = c.target.addr.port();
    let mut opts = c.requester_options();
    opts.via = Via::Direct;
    let before = c.coordinator.state.counters().share_requests;
    let d = c.requester(opts).await.expect("requester");
    let (status, _) = socks_get(d.socks(), "localhost", port, "/d")
        .await
        .expect("fetch");
    assert!(status.contains("200"), "{status}");
    assert_eq!(d.requester.direct.status().flows, 1);
    assert!(d.requester.pool.is_empty());
    assert_eq!(c.coordinator.state.counters().share_requests, before);

    let mut opts = c.requester_options();
    opts.via = Via::Pool;
    let p = c.requester(opts).await.expect("requester");
    let (status, _) = socks_get(p.socks(), "localhost", port, "/p")
        .await
        .expect("fetch");
    assert!(status.contains("200"), "{status}");
    assert_eq!(p.requester.direct.status().flows, 0);
    assert_eq!(
        p.requester
            .pool
            .status()
            .pool
            .iter()
            .map(|m| m.flows)
            .sum::<u64>(),
        1
    );
}
