//! Attacks on the trust and abuse defences, through the real components:
//! overload, limits and refusals. (Tickets and egress are attacked in
//! `e2e.rs`.)

use bandshare_agent::location::ConditionSpec;
use bandshare_coordinator::Config;
use bandshare_testkit::{Cluster, MuteSharer, SharerNode, SharerSpec, center, wait_until};
use std::time::Duration;

/// More share requests than `server.max_inflight_requests` at once: the
/// excess is refused with RESOURCE_EXHAUSTED at once, not queued, and the
/// coordinator serves again when the load is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_shed_with_resource_exhausted() {
    let config = Config {
        max_inflight_requests: 2,
        // A sharer that never answers holds each request this long.
        access_deadline: Duration::from_millis(1500),
        ..bandshare_testkit::exact_config()
    };
    let c = Cluster::start_with(config, vec![]).await.expect("cluster");
    let _mute = MuteSharer::attach(&c.coordinator.url, "mute")
        .await
        .expect("mute sharer");
    assert!(wait_until(Duration::from_secs(3), || c.coordinator.online() == 1).await);
    let loc = bandshare_agent::location::LocationSpec {
        at: Some(center()),
        ..Default::default()
    };
    let asks = (0..12).map(|_| {
        let loc = loc.clone();
        let c = &c;
        async move { c.ask(loc, ConditionSpec::default()).await }
    });
    let results = futures::future::join_all(asks).await;
    let mut ok = 0;
    let mut exhausted = 0;
    for r in &results {
        match r {
            Ok(_) => ok += 1,
            Err(e) => {
                let status = e
                    .downcast_ref::<bandshare_agent::client::CoordinatorError>()
                    .and_then(|ce| ce.status_code());
                assert_eq!(
                    status,
                    Some(tonic::Code::ResourceExhausted),
                    "refused with the wrong code: {e:#}"
                );
                assert!(e.to_string().contains("overloaded"), "{e:#}");
                exhausted += 1;
            }
        }
    }
    assert_eq!((ok, exhausted), (2, 10), "{results:?}");
    assert_eq!(c.coordinator.state.counters().requests_shed, 10);
    // The load is gone: served again.
    c.ask(loc, ConditionSpec::default())
        .await
        .expect("served after the burst");
}

/// Sharers joining in a storm: `server.max_joining` are admitted at a
/// time, the next wait their turn in order, and beyond `server.join_queue`
/// waiting one more is refused with UNAVAILABLE; a real agent so refused
/// retries with backoff and comes online once the storm has passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_join_queue_sheds_sharers_who_then_come_online() {
    let config = Config {
        max_joining: 1,
        join_queue: 1,
        ..bandshare_testkit::exact_config()
    };
    let c = Cluster::start_with(config, vec![]).await.expect("cluster");
    let state = c.coordinator.state.clone();
    // The storm: the only turn is taken.
    let turn = state.join_turn().await.expect("the only turn");
    let url = c.coordinator.url.clone();
    let first = tokio::spawn(async move { MuteSharer::attach(&url, "first").await });
    assert!(
        wait_until(Duration::from_secs(5), || state.counters().joins_waiting
            == 1)
        .await,
        "the first sharer waits its turn"
    );
    // The queue is full: the next is refused and says why.
    let refused = MuteSharer::attach(&c.coordinator.url, "refused")
        .await
        .err()
        .expect("refused while the queue is full");
    let status = refused
        .downcast_ref::<tonic::Status>()
        .expect("a gRPC status");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("busy"), "{status:?}");
    // A real sharer agent is refused the same way, and keeps trying.
    let agent = SharerNode::start(&c.coordinator.url, &SharerSpec::new("agent", 10.0, 0.0))
        .await
        .expect("agent");
    assert!(
        wait_until(Duration::from_secs(5), || state.counters().joins_shed >= 2).await,
        "the agent's first hello is shed"
    );
    assert_eq!(c.coordinator.online(), 0, "nobody joined during the storm");
    // The storm passes: the waiting sharer joins, then the agent on retry.
    drop(turn);
    let _first = first
        .await
        .expect("task")
        .expect("the waiting sharer joins");
    assert!(
        wait_until(Duration::from_secs(10), || c.coordinator.online() == 2).await,
        "the shed agent came online on retry (online: {})",
        c.coordinator.online()
    );
    // Online at the coordinator comes a moment before its welcome (the
    // keys) reaches the agent.
    assert!(
        wait_until(Duration::from_secs(5), || agent
            .sharer
            .relay
            .knows_coordinator())
        .await,
        "the agent never got the coordinator's keys"
    );
    assert_eq!(state.counters().joins_waiting, 0);
}

/// A requester whose pool stays short (no sharer anywhere) while its
/// position source reports a fix every 50 ms: it asks again every 2 s at
/// most, and backs off once the coordinator limits it, rather than asking
/// at every fix (each fix wakes its pool keeper).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moving_requester_with_a_short_pool_does_not_ask_at_every_fix() {
    let mut config = bandshare_testkit::exact_config();
    config.privacy.requests_per_minute = 6.0;
    config.privacy.burst = 2.0;
    let c = Cluster::start_with(config, vec![]).await.expect("cluster");
    let r = c.requester(c.requester_options()).await.expect("requester");
    let began = std::time::Instant::now();
    let mut fixes = 0u32;
    while began.elapsed() < Duration::from_secs(6) {
        // Back and forth by 2 m: never far enough to ask from elsewhere.
        let east = if fixes.is_multiple_of(2) { 2.0 } else { 0.0 };
        r.requester
            .relocate(bandshare_agent::location::LocationSpec {
                at: Some(center().offset_m(east, 0.0)),
                ..Default::default()
            });
        fixes += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let live = c
        .coordinator
        .state
        .metrics()
        .live(std::time::Instant::now());
    let asked = (live.per_s * bandshare_coordinator::metrics::LIVE_WINDOW.as_secs_f64()).round();
    r.stop();
    eprintln!("{fixes} fixes, {asked} share requests");
    assert!(fixes >= 60, "{fixes}");
    assert!(
        (2.0..=10.0).contains(&asked),
        "{asked} share requests for {fixes} fixes in 6 s"
    );
}
