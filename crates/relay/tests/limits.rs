//! The relay's own limits, attacked with real QUIC on loopback: one source
//! cannot hold more than its share of connections, and a peer that
//! completes the handshake but never says hello loses its slot.

use bandshare_core::{DeviceKey, EgressPolicy};
use bandshare_relay::{Relay, RelayOptions, tls};
use std::net::SocketAddr;
use std::time::Duration;

async fn dial(endpoint: &quinn::Endpoint, addr: SocketAddr) -> Result<quinn::Connection, String> {
    let connecting = endpoint
        .connect(addr, "bandshare-relay")
        .map_err(|e| e.to_string())?;
    tokio::time::timeout(Duration::from_secs(3), connecting)
        .await
        .map_err(|_| "handshake timed out".to_string())?
        .map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_source_cap_and_silent_peers_time_out() {
    let mut opts = RelayOptions::new(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        DeviceKey([9; 32]),
        EgressPolicy::default(),
        0,
    );
    opts.max_conns_per_source = 3;
    opts.hello_timeout = Duration::from_millis(700);
    let relay = Relay::bind(opts).expect("bind");
    let addr = relay.local_addr().expect("addr");
    let handle = relay.handle();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(relay.run(async {
        let _ = stop_rx.await;
    }));

    let mut client =
        quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0))).expect("client");
    client.set_default_client_config(tls::client_config(handle.cert_pin()).expect("tls"));
    // Three connections that never send a hello hold the three slots...
    let mut held = vec![];
    for _ in 0..3 {
        held.push(dial(&client, addr).await.expect("within the cap"));
    }
    // ...so the fourth and fifth from the same address are refused.
    for _ in 0..2 {
        let err = dial(&client, addr).await.expect_err("over the cap");
        assert!(err.to_lowercase().contains("refused"), "{err}");
    }
    assert_eq!(handle.refused_sources(), 2);
    // The silent ones are closed when the hello deadline passes.
    for c in &held {
        tokio::time::timeout(Duration::from_secs(3), c.closed())
            .await
            .expect("a silent connection is closed by the relay");
    }
    // Their slots are free again.
    tokio::time::sleep(Duration::from_millis(100)).await;
    dial(&client, addr).await.expect("a slot is free again");
    let _ = stop_tx.send(());
    let _ = task.await;
}
