//! Enrollment, revocation and key rotation through the real components:
//! the coordinator reads operators' decisions from its SQLite store (what
//! `bandshare admin` writes) and sharers act on them.

use bandshare_agent::client::CoordinatorError;
use bandshare_agent::identity;
use bandshare_agent::location::{ConditionSpec, LocationSpec};
use bandshare_coordinator::config::Enroll;
use bandshare_coordinator::{Config, trust};
use bandshare_core::DeviceKey;
use bandshare_relay::{Tunnel, TunnelError};
use bandshare_store::Decision;
use bandshare_testkit::{Cluster, CoordinatorNode, SharerNode, SharerSpec, center, wait_until};
use std::time::{Duration, Instant};

fn fast() -> Config {
    Config {
        report_interval: Duration::from_millis(200),
        ping_interval: Duration::from_millis(100),
        ..bandshare_testkit::exact_config()
    }
}

fn here() -> LocationSpec {
    LocationSpec {
        at: Some(center()),
        ..Default::default()
    }
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn ask(
    url: &bandshare_agent::client::ServerUrl,
    key: &ed25519_dalek::SigningKey,
) -> Result<usize, CoordinatorError> {
    let ch = bandshare_agent::client::connect(url).await?;
    let r = bandshare_agent::client::share_request(
        ch,
        bandshare_proto::v1::ShareRequest {
            requester_key: key.verifying_key().to_bytes().to_vec(),
            location: Some(here().to_wire()),
            conditions: Some(ConditionSpec::default().to_wire()),
            explain: false,
            ..bandshare_agent::client::signed_by(key)
        },
    )
    .await?;
    Ok(r.offers.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approval_mode_refuses_devices_until_an_operator_approves_them() {
    let node = CoordinatorNode::start(Config {
        enroll: Enroll::Approve,
        ..fast()
    })
    .await
    .expect("coordinator");
    let store = node.state.store().clone();

    // A requester nobody approved is refused, told what to do, and listed.
    let me = identity::generate().expect("key");
    let my_key = DeviceKey(me.verifying_key().to_bytes());
    let err = ask(&node.url, &me).await.expect_err("not approved");
    assert_eq!(err.status_code(), Some(tonic::Code::PermissionDenied));
    assert!(err.to_string().contains("bandshare admin approve"), "{err}");
    let pending = store.devices().expect("devices");
    assert!(
        pending
            .iter()
            .any(|d| d.key == my_key && d.decision.is_none())
    );

    // A sharer likewise stays offline.
    let alice = SharerNode::start(&node.url, &SharerSpec::new("alice", 5.0, 0.0))
        .await
        .expect("sharer");
    // Its hello was refused and recorded for the operator (no fixed wait:
    // the record is the event).
    let recorded = wait_until(Duration::from_secs(10), || {
        store
            .devices()
            .is_ok_and(|d| d.iter().any(|d| d.key == alice.key && d.decision.is_none()))
    })
    .await;
    assert!(
        recorded,
        "the refused sharer is not listed for the operator"
    );
    assert_eq!(node.online(), 0, "an unapproved sharer is not online");

    // Approved (as `bandshare admin approve` does), both get in.
    store
        .decide(&my_key, Decision::Approved, now_unix())
        .expect("approve");
    store
        .decide(&alice.key, Decision::Approved, now_unix())
        .expect("approve");
    let started = Instant::now();
    let mut served = None;
    while started.elapsed() < Duration::from_secs(15) {
        if let Ok(n) = ask(&node.url, &me).await
            && node.online() == 1
        {
            served = Some(n);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(served, Some(1), "approved devices are served");
    eprintln!("approval took effect after {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_requester_is_cut_off_by_sharers_within_ten_seconds() {
    let c = Cluster::start_with(fast(), vec![SharerSpec::new("alice", 5.0, 0.0)])
        .await
        .expect("cluster");
    let me = identity::generate().expect("key");
    let my_key = DeviceKey(me.verifying_key().to_bytes());
    let r = c
        .requester_as(c.requester_options(), me.clone())
        .await
        .expect("requester");
    let alice = c.sharer("alice").expect("alice");
    let relay = alice.sharer.relay.clone();
    assert!(wait_until(Duration::from_secs(5), || relay.active_requesters() == 1).await);
    let target = c.target.addr.port();
    let (status, _) = bandshare_testkit::http::socks_get(r.socks(), "127.0.0.1", target, "/before")
        .await
        .expect("fetch before revocation");
    assert!(status.contains("200"), "{status}");

    let store = c.coordinator.state.store().clone();
    store
        .decide(&my_key, Decision::Revoked, now_unix())
        .expect("revoke");
    let revoked_at = Instant::now();
    let cut = wait_until(Duration::from_secs(10), || relay.active_requesters() == 0).await;
    let took = revoked_at.elapsed();
    eprintln!(
        "revocation: sharer closed the requester's connection {took:?} after the store changed"
    );
    assert!(
        cut,
        "the sharer still serves a revoked requester after 10 s"
    );

    // Flows fail, new tickets are not issued, and a ticket issued before
    // the revocation is refused by the sharer itself.
    let fetched =
        bandshare_testkit::http::socks_get(r.socks(), "127.0.0.1", target, "/after").await;
    assert!(
        fetched.map(|(s, _)| !s.contains("200")).unwrap_or(true),
        "a flow after revocation"
    );
    let err = ask(&c.coordinator.url, &me).await.expect_err("revoked");
    assert_eq!(err.status_code(), Some(tonic::Code::PermissionDenied));
    assert!(err.to_string().contains("revoked"), "{err}");
    let ticket = c.coordinator.state.signer().sign(bandshare_core::Ticket {
        key_id: 0,
        sharer: alice.key,
        requester: my_key,
        expires_unix: now_unix() + 60,
        nonce: [7; 16],
        quota_bytes: 1 << 20,
    });
    match Tunnel::connect(alice.sharer.relay_addr, relay.cert_pin(), &ticket, &me).await {
        Err(TunnelError::Refused(why)) => assert!(why.contains("revoked"), "{why}"),
        other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
    }
    // Everyone else is still served.
    let other = identity::generate().expect("key");
    assert_eq!(ask(&c.coordinator.url, &other).await.expect("ask"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_rotation_fails_no_handshake() {
    let c = Cluster::start_with(fast(), vec![SharerSpec::new("alice", 5.0, 0.0)])
        .await
        .expect("cluster");
    let state = c.coordinator.state.clone();
    let old_signer = state.signer();
    let old_id = old_signer.key_id();
    // Handshakes back to back: ask for an offer, dial it with its ticket.
    let url = c.coordinator.url.clone();
    let hammer = tokio::spawn(async move {
        let (mut ok, mut failed, mut signed_by) = (0, vec![], std::collections::BTreeSet::new());
        let until = Instant::now() + Duration::from_secs(6);
        while Instant::now() < until {
            let me = identity::generate().expect("key");
            let result = async {
                let ch = bandshare_agent::client::connect(&url)
                    .await
                    .map_err(|e| e.to_string())?;
                let r = bandshare_agent::client::share_request(
                    ch,
                    bandshare_proto::v1::ShareRequest {
                        requester_key: me.verifying_key().to_bytes().to_vec(),
                        location: Some(here().to_wire()),
                        conditions: Some(ConditionSpec::default().to_wire()),
                        explain: false,
                        ..bandshare_agent::client::signed_by(&me)
                    },
                )
                .await
                .map_err(|e| e.to_string())?;
                let o = r.offers.first().ok_or("no offer")?;
                let (t, _) =
                    bandshare_core::Ticket::decode(&o.ticket).map_err(|e| e.to_string())?;
                let addr = o
                    .relay_endpoints
                    .first()
                    .ok_or("no endpoint")?
                    .parse()
                    .map_err(|_| "endpoint")?;
                let pin: [u8; 32] = o
                    .relay_cert_sha256
                    .as_slice()
                    .try_into()
                    .map_err(|_| "pin")?;
                let tunnel = Tunnel::connect(addr, pin, &o.ticket, &me)
                    .await
                    .map_err(|e| e.to_string())?;
                tunnel.close();
                Ok::<u8, String>(t.key_id)
            }
            .await;
            match result {
                Ok(id) => {
                    ok += 1;
                    signed_by.insert(id);
                }
                Err(e) => failed.push(e),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (ok, failed, signed_by)
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut seed = [0u8; 32];
    bandshare_coordinator::random_seed(&mut seed).expect("rng");
    let new_id = state
        .store()
        .add_signing_seed(seed, now_unix())
        .expect("rotate");
    let rotated = wait_until(Duration::from_secs(5), || state.signer().key_id() == new_id).await;
    assert!(rotated, "the new key never started signing");
    let (ok, failed, signed_by) = hammer.await.expect("hammer");
    eprintln!(
        "rotation: {ok} handshakes, {} failed, keys used {signed_by:?}",
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "handshakes failed during rotation: {failed:?}"
    );
    assert_eq!(
        signed_by,
        [old_id, new_id].into_iter().collect(),
        "both keys signed"
    );

    // In the overlap the old key still verifies; after it, it is retired and
    // sharers are told.
    let alice = c.sharer("alice").expect("alice");
    let me = identity::generate().expect("key");
    let mk = |nonce: u8| bandshare_core::Ticket {
        key_id: 0,
        sharer: alice.key,
        requester: DeviceKey(me.verifying_key().to_bytes()),
        expires_unix: now_unix() + 60,
        nonce: [nonce; 16],
        quota_bytes: 1 << 20,
    };
    let (addr, pin) = (alice.sharer.relay_addr, alice.sharer.relay.cert_pin());
    let dial = |t: Vec<u8>| {
        let me = me.clone();
        async move { Tunnel::connect(addr, pin, &t, &me).await }
    };
    assert!(
        dial(old_signer.sign(mk(1))).await.is_ok(),
        "old key in its overlap"
    );
    let (trust_now, seeds) = trust::read_store(&state).expect("store readable");
    state.apply_decisions(
        trust_now,
        &seeds,
        Instant::now() + Duration::from_secs(3600),
    );
    assert_eq!(state.ticket_keys().len(), 1, "the old key is retired");
    // The sharer hears of it at once: an old-key ticket is refused.
    let started = Instant::now();
    let mut nonce = 10u8;
    loop {
        match dial(old_signer.sign(mk(nonce))).await {
            Err(TunnelError::Refused(why)) => {
                assert!(why.contains("signature"), "{why}");
                break;
            }
            Ok(_) if started.elapsed() < Duration::from_secs(3) => {
                nonce += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => panic!("a retired key still verifies: {:?}", other.map(|_| ())),
        }
    }
    assert!(
        dial(state.signer().sign(mk(3))).await.is_ok(),
        "the new key verifies"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_sharer_goes_offline_and_stays_out() {
    let c = Cluster::start_with(
        fast(),
        vec![
            SharerSpec::new("alice", 5.0, 0.0),
            SharerSpec::new("bob", 8.0, 0.0),
        ],
    )
    .await
    .expect("cluster");
    let alice = c.sharer("alice").expect("alice").key;
    let store = c.coordinator.state.store().clone();
    store
        .decide(&alice, Decision::Revoked, now_unix())
        .expect("revoke");
    let started = Instant::now();
    let gone = wait_until(Duration::from_secs(10), || c.coordinator.online() == 1).await;
    eprintln!("revoked sharer offline after {:?}", started.elapsed());
    assert!(gone, "a revoked sharer is still online");
    // Its reconnects are refused: it stays out of offers.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let r = c.ask(here(), ConditionSpec::default()).await.expect("ask");
    let names: Vec<&str> = r.offers.iter().map(|o| o.sharer.as_str()).collect();
    assert_eq!(names, vec!["bob"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_must_be_signed_by_the_key_it_names() {
    let c = Cluster::start_with(fast(), vec![SharerSpec::new("alice", 5.0, 0.0)])
        .await
        .expect("cluster");
    let victim = identity::generate().expect("key");
    let attacker = identity::generate().expect("key");
    let send = |req: bandshare_proto::v1::ShareRequest| {
        let url = c.coordinator.url.clone();
        async move {
            let ch = bandshare_agent::client::connect(&url)
                .await
                .expect("connect");
            bandshare_agent::client::share_request(ch, req).await
        }
    };
    let body = |key: &ed25519_dalek::SigningKey| bandshare_proto::v1::ShareRequest {
        requester_key: key.verifying_key().to_bytes().to_vec(),
        location: Some(here().to_wire()),
        conditions: Some(ConditionSpec::default().to_wire()),
        explain: false,
        proof: vec![],
        signed_at_unix: 0,
    };
    // No proof; the attacker's proof under the victim's key; a stale proof.
    let signed = bandshare_agent::client::signed_by(&attacker);
    let stale = bandshare_core::ticket::sign_request(&victim, now_unix() - 3600);
    for (req, what) in [
        (body(&victim), "no proof"),
        (
            bandshare_proto::v1::ShareRequest {
                proof: signed.proof,
                signed_at_unix: signed.signed_at_unix,
                ..body(&victim)
            },
            "not signed by the key",
        ),
        (
            bandshare_proto::v1::ShareRequest {
                proof: stale.0,
                signed_at_unix: stale.1,
                ..body(&victim)
            },
            "clock",
        ),
    ] {
        let err = send(req).await.expect_err(what);
        assert_eq!(
            err.status_code(),
            Some(tonic::Code::Unauthenticated),
            "{what}: {err}"
        );
        assert!(err.to_string().contains(what), "{what}: {err}");
    }
    assert_eq!(ask(&c.coordinator.url, &victim).await.expect("signed"), 1);
}
