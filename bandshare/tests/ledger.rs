//! The usage ledger is durable: what the coordinator acknowledged survives
//! `kill -9` of the `bandshare server` process, and usage that was not yet
//! recorded when it died reaches it after it returns, counted once (batches
//! carry ids; a re-sent batch is recorded once: see the store test).

use bandshare_agent::requester::{Requester, RequesterOptions};
use bandshare_agent::{Shutdown, identity};
use bandshare_core::{DeviceKey, EgressRule};
use bandshare_store::Store;
use bandshare_testkit::http::{HttpTarget, socks_get};
use bandshare_testkit::process::Process;
use bandshare_testkit::{SharerNode, SharerSpec, center, wait_until};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

/// `bandshare server` with gRPC on `listen` (port 0 the first time; the
/// port it printed when it comes back) and the real process's address.
fn start_server(listen: &str, data: &Path) -> (Process, SocketAddr) {
    Process::server(env!("CARGO_BIN_EXE_bandshare"), listen, data, &[])
}

/// SIGKILL: no shutdown code runs.
fn kill_9(p: &mut Process) {
    let _ = p.child.kill();
    let _ = p.child.wait();
}

fn ledger_bytes(data: &Path, requester: &DeviceKey) -> u64 {
    let store = Store::open(data).expect("open the ledger");
    let (up, down, _) = store.usage_of_requester(requester).expect("usage");
    up + down
}

#[test]
fn acknowledged_usage_survives_kill_9_and_usage_made_while_down_arrives_once() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let data = tempfile::tempdir().expect("tempdir");
        let (mut server, addr) = start_server("127.0.0.1:0", data.path());
        let url: bandshare_agent::client::ServerUrl =
            format!("http://{addr}").parse().expect("url");

        let target = HttpTarget::start().await.expect("target");
        let rule: EgressRule = format!("127.0.0.1/32:{}", target.addr.port())
            .parse()
            .expect("rule");
        let alice = SharerNode::start(&url, &SharerSpec::new("alice", 5.0, 0.0).allow(rule))
            .await
            .expect("sharer");
        let relay = alice.sharer.relay.clone();
        let unacked = alice.sharer.unacked.clone();
        assert!(
            wait_until(Duration::from_secs(10), || relay.knows_coordinator()).await,
            "sharer never came online"
        );
        let key = identity::generate().expect("key");
        let me = DeviceKey(key.verifying_key().to_bytes());
        let (_trigger, shutdown) = Shutdown::new();
        let requester = Requester::start(
            RequesterOptions {
                server: url.clone(),
                location: bandshare_agent::location::LocationSpec {
                    at: Some(center()),
                    ..Default::default()
                },
                sources: Default::default(),
                conditions: Default::default(),
                pool_size: 1,
                strategy: Default::default(),
                socks: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
                forwards: vec![],
                control: None,
                stall_grace: bandshare_agent::requester::pool::STALL_GRACE,
                via: bandshare_agent::requester::own_link::Via::Pool,
                standby: 1,
                lanes: bandshare_agent::requester::pool::LANES,
                probes: vec![],
                own_link: Default::default(),
                predict: None,
            },
            key,
            shutdown,
        )
        .await
        .expect("requester");
        let socks = requester.socks_addr.expect("socks");
        assert!(
            wait_until(Duration::from_secs(10), || requester
                .pool
                .status()
                .active
                .is_some())
            .await,
            "no active sharer"
        );

        // 1. Traffic, acknowledged, then kill -9.
        let (status, body) = socks_get(socks, "127.0.0.1", target.addr.port(), "/bytes/200000")
            .await
            .expect("download");
        assert!(status.contains("200") && body.len() == 200_000, "{status}");
        let acked = wait_until(Duration::from_secs(15), || {
            unacked.acked_bytes() == relay.total_bytes()
        })
        .await;
        assert!(acked, "usage was never acknowledged");
        let before = relay.total_bytes();
        kill_9(&mut server);
        assert_eq!(
            ledger_bytes(data.path(), &me),
            before,
            "every acknowledged byte is in the ledger after kill -9"
        );

        // 2. Traffic while the coordinator is down (the pool keeps serving),
        // then it returns: the sharer re-sends what was never acknowledged.
        let (status, _) = socks_get(socks, "127.0.0.1", target.addr.port(), "/bytes/300000")
            .await
            .expect("download while the coordinator is down");
        assert!(status.contains("200"), "{status}");
        // Back on the port it had: the sharer and requester know that URL.
        let (mut server, _) = start_server(&addr.to_string(), data.path());
        let caught_up = wait_until(Duration::from_secs(30), || {
            unacked.acked_bytes() == relay.total_bytes() && unacked.is_empty()
        })
        .await;
        assert!(
            caught_up,
            "usage made while the coordinator was down never reached it"
        );
        let total = relay.total_bytes();
        assert!(total > before + 300_000);
        kill_9(&mut server);
        assert_eq!(
            ledger_bytes(data.path(), &me),
            total,
            "nothing lost and nothing counted twice"
        );
        alice.kill();
        requester.pool.close_all();
    });
}
