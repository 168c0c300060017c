//! Attacks on the trust and abuse defences, through the real components:
//! overload, limits and refusals. (Tickets and egress are attacked in
//! `e2e.rs`.)

use bandshare_agent::location::ConditionSpec;
use bandshare_coordinator::Config;
use bandshare_testkit::{Cluster, MuteSharer, center, wait_until};
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
