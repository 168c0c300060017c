//! Failover when the active sharer's link silently stops carrying packets:
//! the pool notices by its probes, new flows go through the next member,
//! and a flow in flight on the dead sharer ends instead of hanging.

use bandshare_coordinator::Config;
use bandshare_testkit::http::socks_get;
use bandshare_testkit::{Cluster, SharerSpec, exact_config, wait_until};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn echo_server() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// A SOCKS5 CONNECT to `to` through `socks`, ready for bytes.
async fn socks_connect(socks: SocketAddr, to: SocketAddr) -> tokio::net::TcpStream {
    let mut s = tokio::net::TcpStream::connect(socks).await.expect("socks");
    s.write_all(&[5, 1, 0]).await.expect("greet");
    let mut b = [0u8; 2];
    s.read_exact(&mut b).await.expect("method");
    let mut req = vec![5, 1, 0, 1];
    if let std::net::IpAddr::V4(ip) = to.ip() {
        req.extend_from_slice(&ip.octets());
    }
    req.extend_from_slice(&to.port().to_be_bytes());
    s.write_all(&req).await.expect("request");
    let mut rep = [0u8; 10];
    s.read_exact(&mut rep).await.expect("reply");
    assert_eq!(rep[1], 0, "SOCKS reply");
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silently_cut_link_moves_new_flows_and_ends_old_ones() {
    let echo = echo_server().await;
    let rule = format!("{}/32:{}", echo.ip(), echo.port())
        .parse()
        .expect("rule");
    let spec = |n: &str, e: f64| SharerSpec::new(n, e, 0.0).behind_udp_relay().allow(rule);
    let config = Config { ..exact_config() };
    let c = Cluster::start_with(
        config,
        vec![spec("alice", 5.0), spec("bob", 20.0), spec("carol", 40.0)],
    )
    .await
    .expect("cluster");
    // Open flows wait 2 s for a silent sharer here (10 s by default: see
    // the next test), then end.
    let mut opts = c.requester_options();
    opts.stall_grace = Duration::from_secs(2);
    let r = c.requester(opts).await.expect("requester");
    let port = c.target.addr.port();
    socks_get(r.socks(), "localhost", port, "/before")
        .await
        .expect("fetch before");
    let first = r.active().expect("active");

    // A flow in flight through the active sharer.
    let mut held = socks_connect(r.socks(), echo).await;
    held.write_all(b"ping").await.expect("write");
    let mut four = [0u8; 4];
    held.read_exact(&mut four)
        .await
        .expect("echo before the cut");

    // Cut the active sharer's link: no packet in either direction, no close.
    let node = c.sharer(&first).expect("active node");
    node.link.as_ref().expect("behind a UDP relay").cut(true);
    let cut_at = Instant::now();

    // New flows work again through another member.
    let mut served = None;
    while cut_at.elapsed() < Duration::from_secs(10) {
        if let Ok(Ok((status, body))) = tokio::time::timeout(
            Duration::from_secs(2),
            socks_get(r.socks(), "localhost", port, "/after"),
        )
        .await
            && status.contains("200")
            && body.contains("/after")
        {
            served = Some(cut_at.elapsed());
            break;
        }
    }
    let took = served.expect("no new flow succeeded within 10 s of the cut");
    eprintln!(
        "first new flow after the cut succeeded in {} ms",
        took.as_millis()
    );
    let others: u64 = r
        .requester
        .pool
        .status()
        .pool
        .iter()
        .filter(|m| m.sharer != first)
        .map(|m| m.flows)
        .sum();
    assert!(
        others >= 1,
        "the new flow did not go through another member: {:?}",
        r.requester.pool.status()
    );

    // The probes take the dead member out of the pool and the active moves.
    let gone = wait_until(Duration::from_secs(5), || {
        !r.requester
            .pool
            .status()
            .pool
            .iter()
            .any(|m| m.sharer == first)
    })
    .await;
    assert!(gone, "{:?}", r.requester.pool.status());
    eprintln!(
        "dead member left the pool {} ms after the cut",
        cut_at.elapsed().as_millis()
    );
    assert_ne!(r.active().expect("active after the cut"), first);

    // The flow in flight ends: its application sees EOF or an error, not a hang.
    let mut buf = [0u8; 16];
    let ended = tokio::time::timeout(Duration::from_secs(5), held.read(&mut buf)).await;
    assert!(
        matches!(ended, Ok(Ok(0)) | Ok(Err(_))),
        "held flow: {ended:?}"
    );
}

/// A sharer silent for 3 s (a radio pause, SIGSTOP): new flows move at
/// once, but a flow already open through it waits and carries on when it
/// answers again, with no byte lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_stall_moves_new_flows_and_keeps_open_ones() {
    let echo = echo_server().await;
    let rule = format!("{}/32:{}", echo.ip(), echo.port())
        .parse()
        .expect("rule");
    let spec = |n: &str, e: f64| SharerSpec::new(n, e, 0.0).behind_udp_relay().allow(rule);
    let c = Cluster::start_with(exact_config(), vec![spec("alice", 5.0), spec("bob", 20.0)])
        .await
        .expect("cluster");
    let r = c.requester(c.requester_options()).await.expect("requester");
    let port = c.target.addr.port();
    socks_get(r.socks(), "localhost", port, "/before")
        .await
        .expect("fetch before");
    let first = r.active().expect("active");
    let mut held = socks_connect(r.socks(), echo).await;
    held.write_all(b"one.").await.expect("write");
    let mut four = [0u8; 4];
    held.read_exact(&mut four).await.expect("echo before");

    let node = c.sharer(&first).expect("active node");
    let link = node.link.as_ref().expect("behind a UDP relay");
    link.cut(true);
    let cut_at = Instant::now();
    // Bytes written during the stall wait in the QUIC stream.
    held.write_all(b"two.")
        .await
        .expect("write during the stall");
    let stalled = wait_until(Duration::from_secs(3), || {
        r.requester
            .pool
            .status()
            .pool
            .iter()
            .any(|m| m.sharer == first && m.state == "stalled")
    })
    .await;
    assert!(stalled, "{:?}", r.requester.pool.status());
    let (status, _) = tokio::time::timeout(
        Duration::from_secs(5),
        socks_get(r.socks(), "localhost", port, "/during"),
    )
    .await
    .expect("a new flow during the stall")
    .expect("fetch during the stall");
    assert!(status.contains("200"), "{status}");
    assert_ne!(
        r.active().as_deref(),
        Some(first.as_str()),
        "new flows moved"
    );
    while cut_at.elapsed() < Duration::from_secs(3) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    link.cut(false);

    let mut got = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(8), held.read_exact(&mut got))
        .await
        .expect("the held flow answers after the stall")
        .expect("the held flow is still open");
    assert_eq!(&got, b"two.");
    held.write_all(b"tri.").await.expect("write after");
    tokio::time::timeout(Duration::from_secs(5), held.read_exact(&mut got))
        .await
        .expect("echo after")
        .expect("echo after");
    assert_eq!(&got, b"tri.");
    let back = wait_until(Duration::from_secs(3), || {
        r.requester
            .pool
            .status()
            .pool
            .iter()
            .any(|m| m.sharer == first && m.state == "ready")
    })
    .await;
    assert!(back, "{:?}", r.requester.pool.status());
    eprintln!("held flow survived a {} ms stall", 3000);
}

/// Moving rotates the pool make-before-break, and a flow open through the
/// member let go carries on (it leaves the pool at once but keeps its
/// tunnel until its open flows end).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moving_rotates_the_pool_make_before_break() {
    let echo = echo_server().await;
    let rule: bandshare_core::EgressRule = format!("{}/32:{}", echo.ip(), echo.port())
        .parse()
        .expect("rule");
    let c = Cluster::start(vec![
        SharerSpec::new("west", -150.0, 0.0).allow(rule),
        SharerSpec::new("east", 150.0, 0.0).allow(rule),
    ])
    .await
    .expect("cluster");
    let mut opts = c.requester_options();
    opts.location = bandshare_agent::location::LocationSpec {
        at: Some(bandshare_testkit::center().offset_m(-150.0, 0.0)),
        ..Default::default()
    };
    let r = c.requester(opts).await.expect("requester");
    let names = || {
        let mut v: Vec<String> = r
            .requester
            .pool
            .status()
            .pool
            .into_iter()
            .map(|m| m.sharer)
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(), vec!["west"]);
    let mut held = socks_connect(r.socks(), echo).await;
    held.write_all(b"one.").await.expect("write");
    let mut four = [0u8; 4];
    held.read_exact(&mut four)
        .await
        .expect("echo before the move");
    let west = r
        .requester
        .pool
        .members()
        .into_iter()
        .find(|m| m.name == "west")
        .expect("west is a member");

    // Watch the pool size while the requester moves 300 m east.
    let pool = r.requester.pool.clone();
    let (done_tx, mut done_rx) = tokio::sync::oneshot::channel::<()>();
    let watcher = tokio::spawn(async move {
        let mut smallest = usize::MAX;
        while done_rx.try_recv().is_err() {
            smallest = smallest.min(pool.len());
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        smallest
    });
    r.requester
        .relocate(bandshare_agent::location::LocationSpec {
            at: Some(bandshare_testkit::center().offset_m(150.0, 0.0)),
            ..Default::default()
        });
    let rotated = wait_until(Duration::from_secs(10), || names() == vec!["east"]).await;
    let _ = done_tx.send(());
    let smallest = watcher.await.expect("watcher");
    assert!(rotated, "pool after moving: {:?}", names());
    assert!(smallest >= 1, "the pool was empty during the move");
    let (status, _) = socks_get(r.socks(), "localhost", c.target.addr.port(), "/moved")
        .await
        .expect("fetch");
    assert!(status.contains("200"));
    assert_eq!(r.active().as_deref(), Some("east"));

    // The flow through west still carries bytes both ways; once it ends,
    // west's tunnel closes.
    assert!(
        west.tunnel.close_reason().is_none(),
        "west closed with a flow open"
    );
    held.write_all(b"two.").await.expect("write after the move");
    tokio::time::timeout(Duration::from_secs(5), held.read_exact(&mut four))
        .await
        .expect("echo after the move")
        .expect("the held flow is still open");
    assert_eq!(&four, b"two.");
    drop(held);
    let closed = wait_until(Duration::from_secs(5), || {
        west.tunnel.close_reason().is_some()
    })
    .await;
    assert!(
        closed,
        "west's tunnel stayed open after its last flow ended"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_keeps_serving_while_the_coordinator_is_down_and_refills_after() {
    use bandshare_agent::requester::Requester;
    use bandshare_testkit::{CoordinatorNode, SharerNode, http::HttpTarget};
    let target = HttpTarget::start().await.expect("target");
    let port = target.addr.port();
    let rule: bandshare_core::EgressRule = format!("127.0.0.1/32:{port}").parse().expect("rule");
    let config = Config {
        report_interval: Duration::from_millis(200),
        ping_interval: Duration::from_millis(100),
        expire_after: Duration::from_millis(1500),
        ..exact_config()
    };
    let coord = CoordinatorNode::start(config).await.expect("coordinator");
    let mut sharers = vec![];
    for (i, n) in ["alice", "bob", "carol"].iter().enumerate() {
        let spec = SharerSpec::new(n, 5.0 + 10.0 * i as f64, 0.0).allow(rule);
        sharers.push(SharerNode::start(&coord.url, &spec).await.expect("sharer"));
    }
    assert!(wait_until(Duration::from_secs(10), || coord.online() == 3).await);
    let (_stop, shutdown) = bandshare_agent::Shutdown::new();
    let opts = bandshare_agent::requester::RequesterOptions {
        server: coord.url.clone(),
        location: bandshare_agent::location::LocationSpec {
            at: Some(bandshare_testkit::center()),
            ..Default::default()
        },
        sources: Default::default(),
        conditions: Default::default(),
        pool_size: 3,
        strategy: Default::default(),
        socks: Some("127.0.0.1:0".parse().expect("addr")),
        forwards: vec![],
        control: None,
        stall_grace: bandshare_agent::requester::pool::STALL_GRACE,
        // The pool path: these runs measure and test sharers.
        via: bandshare_agent::requester::own_link::Via::Pool,
        standby: 1,
        lanes: bandshare_agent::requester::pool::LANES,
        probes: vec![],
        own_link: Default::default(),
        predict: None,
    };
    let r = Requester::start(
        opts,
        bandshare_agent::identity::generate().expect("key"),
        shutdown,
    )
    .await
    .expect("requester");
    let socks = r.socks_addr.expect("socks");
    assert!(wait_until(Duration::from_secs(10), || r.pool.len() == 3).await);

    // The coordinator goes away: flows keep working through the pool ...
    let (config, addr, dir) = coord.stop_keeping().await;
    socks_get(socks, "localhost", port, "/coordinator-down")
        .await
        .expect("fetch while the coordinator is down");
    // ... even when a sharer dies meanwhile.
    let active = r.pool.status().active.expect("active");
    sharers
        .iter()
        .find(|s| s.name == active)
        .expect("node")
        .kill();
    assert!(
        wait_until(Duration::from_secs(5), || r.pool.len() == 2).await,
        "{:?}",
        r.pool.status()
    );
    let (status, _) = socks_get(socks, "localhost", port, "/one-down")
        .await
        .expect("fetch with one sharer gone");
    assert!(status.contains("200"));
    tokio::time::sleep(Duration::from_millis(500)).await; // refills fail meanwhile, with backoff

    // It comes back where it was; a new sharer appears; the pool refills.
    let coord = CoordinatorNode::start_at(config, addr, dir)
        .await
        .expect("restart");
    let dave = SharerSpec::new("dave", 8.0, 0.0).allow(rule);
    sharers.push(SharerNode::start(&coord.url, &dave).await.expect("sharer"));
    let refilled = wait_until(Duration::from_secs(20), || r.pool.len() == 3).await;
    assert!(
        refilled,
        "pool after the coordinator returned: {:?}",
        r.pool.status()
    );
    assert!(r.pool.status().pool.iter().any(|m| m.sharer == "dave"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trusted_sharers_are_reached_directly_while_the_coordinator_is_down() {
    let config = Config {
        expire_after: Duration::from_secs(30),
        ..exact_config()
    };
    let c = Cluster::start_with(
        config,
        vec![SharerSpec::new("alice", 5.0, 0.0).behind_udp_relay()],
    )
    .await
    .expect("cluster");
    let mut opts = c.requester_options();
    opts.pool_size = 1;
    // The blip below outlasts the (shortened) wait for a stalled member.
    opts.stall_grace = Duration::from_secs(1);
    let r = c.requester(opts).await.expect("requester");
    let port = c.target.addr.port();
    socks_get(r.socks(), "localhost", port, "/used")
        .await
        .expect("fetch");
    // Using alice made her a known sharer; a spare ticket arrives from the coordinator.
    let pool = r.requester.pool.clone();
    assert!(
        wait_until(Duration::from_secs(5), || pool.known_with_ticket() == 1).await,
        "no spare ticket"
    );

    let Cluster {
        coordinator,
        sharers,
        target: _target,
    } = c;
    coordinator.stop().await;
    // A blip on alice's link: the pool drops her; the coordinator cannot help.
    let link = sharers[0].link.as_ref().expect("udp relay");
    link.cut(true);
    assert!(wait_until(Duration::from_secs(5), || pool.is_empty()).await);
    link.cut(false);
    // The requester dials her directly with the spare ticket.
    let back = wait_until(Duration::from_secs(10), || pool.len() == 1).await;
    assert!(back, "no direct reconnect: {:?}", pool.status());
    assert_eq!(pool.known_with_ticket(), 0, "the spare ticket was used");
    let (status, _) = socks_get(r.socks(), "localhost", port, "/direct")
        .await
        .expect("fetch without a coordinator");
    assert!(status.contains("200"));
}
