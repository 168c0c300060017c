//! End to end through real components on loopback: coordinator, sharers
//! with QUIC relays, a requester with its SOCKS5 / HTTP CONNECT port, real
//! curl, and a local HTTP target reachable only through `--allow-egress`.

use bandshare_agent::client;
use bandshare_coordinator::Config;
use bandshare_core::{DeviceKey, NetworkType, Security, Ticket, TicketSigner};
use bandshare_proto::v1;
use bandshare_relay::{Tunnel, TunnelError};
use bandshare_testkit::http::{PAGE_TITLE, socks_get};
use bandshare_testkit::{Cluster, SharerSpec, center, wait_until};
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn fast() -> Config {
    Config {
        report_interval: Duration::from_millis(200),
        ping_interval: Duration::from_millis(100),
        expire_after: Duration::from_millis(1500),
        ..bandshare_testkit::exact_config()
    }
}

async fn curl(args: &[&str]) -> (bool, String, String) {
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .args(args)
        .output()
        .await
        .expect("curl must be installed (.ci/run installs it)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The SOCKS5 reply code for CONNECT to `addr` (an IPv4 address).
async fn socks_reply(socks: SocketAddr, host: &str, port: u16) -> u8 {
    let mut s = tokio::net::TcpStream::connect(socks)
        .await
        .expect("socks port");
    s.write_all(&[5, 1, 0]).await.expect("greeting");
    let mut two = [0u8; 2];
    s.read_exact(&mut two).await.expect("method");
    let mut req = vec![5, 1, 0, 3, host.len() as u8];
    req.extend_from_slice(host.as_bytes());
    req.extend_from_slice(&port.to_be_bytes());
    s.write_all(&req).await.expect("request");
    let mut rep = [0u8; 10];
    s.read_exact(&mut rep).await.expect("reply");
    rep[1]
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

async fn offers(cluster: &Cluster, want: &str, network: Option<NetworkType>) -> v1::ShareResponse {
    let cond = bandshare_agent::location::ConditionSpec {
        want: want.parse().expect("services"),
        network,
        ..Default::default()
    };
    offers_for(cluster, cond).await
}

async fn offers_for(
    cluster: &Cluster,
    cond: bandshare_agent::location::ConditionSpec,
) -> v1::ShareResponse {
    let ch = client::connect(&cluster.coordinator.url)
        .await
        .expect("connect");
    let key = bandshare_agent::identity::generate().expect("key");
    let loc = bandshare_agent::location::LocationSpec {
        at: Some(center()),
        ..Default::default()
    };
    client::share_request(
        ch,
        bandshare_agent::client::share_request_from(&key, &loc, &cond, true),
    )
    .await
    .expect("share request")
}

fn names(r: &v1::ShareResponse) -> Vec<String> {
    let mut v: Vec<String> = r.offers.iter().map(|o| o.sharer.clone()).collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_fetches_through_a_sharer_and_usage_is_recorded() {
    let c = Cluster::start_with(
        fast(),
        vec![
            SharerSpec::new("alice", 5.0, 0.0),
            SharerSpec::new("bob", 30.0, 0.0),
        ],
    )
    .await
    .expect("cluster");
    let r = c.requester(c.requester_options()).await.expect("requester");
    let socks = r.socks().to_string();
    let url = format!("http://localhost:{}/through-socks", c.target.addr.port());
    let (ok, body, err) = curl(&["--socks5-hostname", &socks, &url]).await;
    assert!(ok, "curl failed: {err}");
    assert!(
        body.contains(PAGE_TITLE) && body.contains("/through-socks"),
        "{body}"
    );

    // HTTP CONNECT on the same port.
    let url = format!("http://127.0.0.1:{}/through-connect", c.target.addr.port());
    let (ok, body, err) = curl(&["-p", "-x", &format!("http://{socks}"), &url]).await;
    assert!(ok, "curl via HTTP CONNECT failed: {err}");
    assert!(body.contains("/through-connect"), "{body}");

    // The active sharer carried both flows and the pool shows it.
    let status = r.requester.pool.status();
    let active = status.active.clone().expect("an active sharer");
    let m = status
        .pool
        .iter()
        .find(|m| m.sharer == active)
        .expect("active in pool");
    assert_eq!(m.flows, 2);
    assert!(m.bytes_down > 200, "{m:?}");

    // The control endpoint serves the same as JSON.
    let ctl = r.requester.control_addr.expect("control").to_string();
    let (ok, json, _) = curl(&[&format!("http://{ctl}/status")]).await;
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&json).expect("json");
    assert_eq!(v["active"], serde_json::Value::String(active));
    assert!(v["pool"].as_array().is_some_and(|p| p.len() == 2), "{v}");

    // The sharer reports usage; the coordinator's ledger records it.
    let store = c.coordinator.state.store().clone();
    let ok = wait_until(Duration::from_secs(5), || {
        store.usage_rows().unwrap_or(0) > 0
    })
    .await;
    assert!(ok, "usage never reached the ledger");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_policy_refuses_every_spelling_of_loopback_without_dialing() {
    let c = Cluster::start_with(fast(), vec![SharerSpec::new("alice", 5.0, 0.0)])
        .await
        .expect("cluster");
    let r = c.requester(c.requester_options()).await.expect("requester");
    // A listener nobody opened with --allow-egress; it counts every dial.
    let forbidden = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = forbidden.local_addr().expect("addr").port();
    let dials = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = dials.clone();
    let watcher = tokio::spawn(async move {
        while forbidden.accept().await.is_ok() {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    // Every way a SOCKS client can name this machine, sent as a name.
    let spellings = [
        "127.0.0.1",
        "localhost",
        "localhost.",
        "LOCALHOST",
        "127.1",
        "127.0.1",
        "127.1.",
        "127.0.0.1.",
        "2130706433",
        "2130706433.",
        "0x7f000001",
        "0X7F000001",
        "0x7f.1",
        "0x7f.0.0.1",
        "0177.0.0.1",
        "0177.1",
        "017700000001",
        "127.000.000.001",
        "0x7f.0x0.0x0.0x1",
        "127.255.255.254",
        "0",
        "0.0.0.0",
        "0x0",
        "::1",
        "[::1]",
        "::1.",
        "0:0:0:0:0:0:0:1",
        "::ffff:127.0.0.1",
        "[::ffff:127.0.0.1]",
        "::ffff:7f00:1",
        "64:ff9b::127.0.0.1",
        "64:ff9b::7f00:1",
        "::127.0.0.1",
        "2002:7f00:1::1",
    ];
    for host in spellings {
        assert_eq!(socks_reply(r.socks(), host, port).await, 0x02, "{host}");
    }
    // The coordinator's own port: loopback too.
    assert_eq!(
        socks_reply(r.socks(), "127.0.0.1", c.coordinator.grpc_addr.port()).await,
        0x02
    );
    // curl sees the refusal too.
    for host in ["127.0.0.1", "127.1", "2130706433", "0x7f000001", "[::1]"] {
        let (ok, _, err) = curl(&[
            "--socks5-hostname",
            &r.socks().to_string(),
            &format!("http://{host}:{port}/"),
        ])
        .await;
        assert!(!ok && err.contains("(2)"), "{host}: {err}");
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        dials.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the sharer dialed a denied target"
    );
    watcher.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_expired_replayed_and_other_sharer_tickets_are_refused() {
    let c = Cluster::start_with(
        fast(),
        vec![
            SharerSpec::new("alice", 5.0, 0.0),
            SharerSpec::new("bob", 8.0, 0.0),
        ],
    )
    .await
    .expect("cluster");
    let (alice, bob) = (
        c.sharer("alice").expect("alice"),
        c.sharer("bob").expect("bob"),
    );
    let me = bandshare_agent::identity::generate().expect("key");
    let my_key = DeviceKey(me.verifying_key().to_bytes());
    let signer = c.coordinator.state.signer();
    let ticket = |sharer: DeviceKey, expires: u64| Ticket {
        key_id: 0,
        sharer,
        requester: my_key,
        expires_unix: expires,
        nonce: rand_nonce(),
        quota_bytes: 1 << 20,
    };
    let dial = |t: Vec<u8>| {
        let (addr, pin) = (alice.sharer.relay_addr, alice.sharer.relay.cert_pin());
        let me = me.clone();
        async move { Tunnel::connect(addr, pin, &t, &me).await.map(|_| ()) }
    };
    let refused = |r: Result<(), TunnelError>, what: &str| match r {
        Err(TunnelError::Refused(reason)) => reason,
        other => panic!("{what}: expected refusal, got {other:?}"),
    };

    let good = signer.sign(ticket(alice.key, now() + 60));
    assert!(
        dial(good.clone()).await.is_ok(),
        "a valid ticket is accepted"
    );
    let why = refused(dial(good).await, "replay");
    assert!(why.contains("replay"), "{why}");

    let forger = TicketSigner::from_seed(&[42; 32], 0);
    let why = refused(
        dial(forger.sign(ticket(alice.key, now() + 60))).await,
        "forged",
    );
    assert!(why.contains("signature"), "{why}");

    let why = refused(
        dial(signer.sign(ticket(alice.key, now() - 120))).await,
        "expired",
    );
    assert!(why.contains("expired"), "{why}");

    let why = refused(
        dial(signer.sign(ticket(bob.key, now() + 60))).await,
        "other sharer",
    );
    assert!(why.contains("another sharer"), "{why}");

    // A ticket for someone else's key, presented with ours.
    let mut t = ticket(alice.key, now() + 60);
    t.requester = DeviceKey([9; 32]);
    let why = refused(dial(signer.sign(t)).await, "other requester");
    assert!(why.contains("another requester"), "{why}");

    // The same for v2 tickets (MAC'd for the sharer), what offers carry.
    let good = signer.mac(ticket(alice.key, now() + 60));
    assert!(dial(good.clone()).await.is_ok(), "a valid v2 ticket");
    let why = refused(dial(good).await, "v2 replay");
    assert!(why.contains("replay"), "{why}");
    let why = refused(
        dial(
            TicketSigner::from_seed(&[42; 32], signer.key_id()).mac(ticket(alice.key, now() + 60)),
        )
        .await,
        "v2 under another coordinator's seed",
    );
    assert!(why.contains("MAC does not verify"), "{why}");
    let why = refused(
        dial(signer.mac(ticket(alice.key, now() - 120))).await,
        "v2 expired",
    );
    assert!(why.contains("expired"), "{why}");
    // Bob's ticket, and one bob could make with his own MAC key, are
    // worthless at alice.
    let why = refused(
        dial(signer.mac(ticket(bob.key, now() + 60))).await,
        "v2 for bob",
    );
    assert!(why.contains("MAC does not verify"), "{why}");
    let mut flipped = signer.mac(ticket(alice.key, now() + 60));
    flipped[70] ^= 1; // a later expiry
    let why = refused(dial(flipped).await, "v2 altered");
    assert!(why.contains("MAC does not verify"), "{why}");
    let mut t = ticket(alice.key, now() + 60);
    t.key_id = signer.key_id();
    let body = signer.mac(t.clone());
    let bob_mac = {
        use ring::hmac;
        let k = hmac::Key::new(hmac::HMAC_SHA256, &signer.mac_key(&bob.key));
        let mut m = b"bandshare ticket v2\0".to_vec();
        m.extend_from_slice(&body[..98]);
        hmac::sign(&k, &m)
    };
    let mut by_bob = body[..98].to_vec();
    by_bob.extend_from_slice(bob_mac.as_ref());
    let why = refused(dial(by_bob).await, "v2 made with bob's key");
    assert!(why.contains("MAC does not verify"), "{why}");
}

/// One GET of `path` on the HTTP target through a flow of `t`; the bytes
/// of the answer, or why the flow was refused.
async fn get_via(t: &Tunnel, target: SocketAddr, path: &str) -> Result<Vec<u8>, String> {
    let header = bandshare_relay::FlowHeader {
        host: bandshare_relay::wire::Host::Ip(target.ip()),
        port: target.port(),
    };
    let (mut send, mut recv) = t
        .open_flow(&header, true)
        .await
        .map_err(|e| e.to_string())?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    send.write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let body = recv.read_to_end(1 << 20).await.map_err(|e| e.to_string())?;
    Ok(body)
}

/// Lanes: further connections that join an admitted one with the token it
/// gives. Flows take turns over them; they draw on the same ticket quota;
/// a sharer admits at most three per connection and no forged token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lanes_carry_flows_under_the_same_admission() {
    let c = Cluster::start_with(fast(), vec![SharerSpec::new("alice", 5.0, 0.0)])
        .await
        .expect("cluster");
    let alice = c.sharer("alice").expect("alice");
    let me = bandshare_agent::identity::generate().expect("key");
    let ticket = c.coordinator.state.signer().sign(Ticket {
        key_id: 0,
        sharer: alice.key,
        requester: DeviceKey(me.verifying_key().to_bytes()),
        expires_unix: now() + 60,
        nonce: rand_nonce(),
        quota_bytes: 300_000,
    });
    let (addr, pin) = (alice.sharer.relay_addr, alice.sharer.relay.cert_pin());
    let t = Tunnel::connect(addr, pin, &ticket, &me)
        .await
        .expect("tunnel");
    assert_eq!(t.add_lanes(2).await.expect("two lanes"), 2);

    // Three flows in a row: the first connection, then each lane.
    let target = c.target.addr;
    for _ in 0..3 {
        let got = get_via(&t, target, "/bytes/60000").await.expect("flow");
        assert!(got.len() > 60_000, "{}", got.len());
    }
    for lane in t.lane_stats() {
        assert!(
            lane.udp_rx.bytes > 60_000,
            "a lane carried no flow: {lane:?}"
        );
    }
    // The quota is the connection's, whichever lane spends it: more of
    // the same runs into the ticket's 300 kB within three more flows (one
    // connection alone would take five).
    // (The flow that crosses the quota may be cut short; the next one is
    // refused, with the reason.)
    let mut outcomes = vec![];
    let mut refused = false;
    for _ in 0..3 {
        let got = get_via(&t, target, "/bytes/60000").await;
        refused = got
            .as_ref()
            .is_err_and(|e| e.contains(bandshare_relay::wire::QUOTA_USED_UP));
        outcomes.push(got.map(|b| b.len()));
        if refused {
            break;
        }
    }
    assert!(refused, "the shared quota did not run out: {outcomes:?}");

    // A third lane joins; a fourth is refused.
    assert_eq!(t.add_lanes(1).await.expect("third lane"), 3);
    match t.add_lanes(1).await {
        Err(TunnelError::Refused(why)) => assert!(why.contains("at most 3 lanes"), "{why}"),
        other => panic!("a fourth lane: {other:?}"),
    }

    // A token nobody was given opens nothing.
    let mut ep = bandshare_relay::tls::endpoint(
        bandshare_relay::tls::quic_socket(SocketAddr::from(([127, 0, 0, 1], 0))).expect("socket"),
        None,
    )
    .expect("endpoint");
    ep.set_default_client_config(bandshare_relay::tls::client_config(pin).expect("tls"));
    let conn = ep
        .connect(addr, "bandshare-relay")
        .expect("connect")
        .await
        .expect("handshake");
    let (mut send, mut recv) = conn.open_bi().await.expect("stream");
    send.write_all(&bandshare_relay::wire::Opening::Lane([7; 32]).encode())
        .await
        .expect("send");
    match bandshare_relay::wire::read_hello_reply(&mut recv).await {
        Ok(bandshare_relay::wire::HelloReply::Refused(why)) => {
            assert!(why.contains("unknown lane token"), "{why}")
        }
        other => panic!("a forged lane token: {other:?}"),
    }

    // Closing the tunnel closes its lanes.
    t.close();
    assert!(wait_until(Duration::from_secs(5), || t.lanes() == 0).await);
}

fn rand_nonce() -> [u8; 16] {
    let k = bandshare_agent::identity::generate().expect("rng");
    let mut n = [0u8; 16];
    n.copy_from_slice(&k.to_bytes()[..16]);
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sharer_that_disconnects_stops_being_offered_and_traffic_moves() {
    let c = Cluster::start_with(
        fast(),
        vec![
            SharerSpec::new("alice", 2.0, 0.0),
            SharerSpec::new("bob", 20.0, 0.0),
            SharerSpec::new("carol", 40.0, 0.0),
        ],
    )
    .await
    .expect("cluster");
    assert_eq!(
        names(&offers(&c, "", None).await),
        vec!["alice", "bob", "carol"]
    );
    let r = c.requester(c.requester_options()).await.expect("requester");
    let (status, _) = socks_get(r.socks(), "localhost", c.target.addr.port(), "/one")
        .await
        .expect("first fetch");
    assert!(status.contains("200"), "{status}");
    let first = r.active().expect("active");

    c.sharer(&first).expect("active sharer").kill();
    assert!(
        wait_until(Duration::from_secs(3), || c.coordinator.online() == 2).await,
        "the coordinator still lists the killed sharer"
    );
    let left = names(&offers(&c, "", None).await);
    assert!(!left.contains(&first) && left.len() == 2, "{left:?}");

    // The next flow goes through another member of the pool.
    let (status, body) = socks_get(r.socks(), "localhost", c.target.addr.port(), "/two")
        .await
        .expect("fetch after kill");
    assert!(status.contains("200") && body.contains("/two"), "{status}");
    let now_active = r.active().expect("active after kill");
    assert_ne!(now_active, first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_network_type_and_security_filter_offers() {
    let c = Cluster::start_with(
        fast(),
        vec![
            SharerSpec::new("five", 5.0, 0.0)
                .services("hotspot,5ghz")
                .network(NetworkType::FiveG)
                .security(Security::Wpa3),
            SharerSpec::new("four", 10.0, 0.0)
                .services("hotspot,wifi6")
                .network(NetworkType::FourG)
                .security(Security::Open),
            SharerSpec::new("wifi", 15.0, 0.0)
                .services("hotspot,wifi6,5ghz")
                .network(NetworkType::Wifi),
            SharerSpec::new("prose", 20.0, 0.0)
                .services("prose")
                .network(NetworkType::FiveG),
        ],
    )
    .await
    .expect("cluster");
    assert_eq!(
        names(&offers(&c, "", None).await),
        vec!["five", "four", "prose", "wifi"]
    );
    assert_eq!(
        names(&offers(&c, "wifi6", None).await),
        vec!["four", "wifi"]
    );
    assert_eq!(
        names(&offers(&c, "hotspot,5ghz", None).await),
        vec!["five", "wifi"]
    );
    assert_eq!(
        names(&offers(&c, "", Some(NetworkType::FourG)).await),
        vec!["four"]
    );
    assert_eq!(
        names(&offers(&c, "prose", Some(NetworkType::FiveG)).await),
        vec!["prose"]
    );
    let r = offers(&c, "wifi6", Some(NetworkType::Wifi)).await;
    assert_eq!(names(&r), vec!["wifi"]);
    let why = |n: &str| {
        r.explain
            .iter()
            .find(|v| v.sharer == n)
            .map(|v| v.reason.clone())
            .unwrap_or_default()
    };
    assert_eq!(why("five"), "service missing: wifi6");
    assert_eq!(why("four"), "network is 4g, wanted wifi");
    // Security is a minimum: wpa2 takes wpa2 and wpa3, never open.
    let secured = |least| {
        offers_for(
            &c,
            bandshare_agent::location::ConditionSpec {
                security: Some(least),
                ..Default::default()
            },
        )
    };
    assert_eq!(
        names(&secured(Security::Wpa2).await),
        vec!["five", "prose", "wifi"]
    );
    let strict = secured(Security::Wpa3).await;
    assert_eq!(names(&strict), vec!["five"]);
    assert!(
        strict
            .explain
            .iter()
            .any(|v| v.sharer == "four" && v.reason == "security is open, wanted at least wpa3"),
        "{:?}",
        strict.explain
    );
    // Offers carry a distance band and never coordinates.
    for o in &r.offers {
        assert_eq!(o.distance_band, "10-50m");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_sharer_expires() {
    let c = Cluster::start_with(fast(), vec![SharerSpec::new("alice", 5.0, 0.0)])
        .await
        .expect("cluster");
    // A stream that says hello and then nothing, held open.
    let mute = bandshare_testkit::MuteSharer::attach(&c.coordinator.url, "mute")
        .await
        .expect("attach");
    assert!(wait_until(Duration::from_secs(3), || c.coordinator.online() == 2).await);
    assert!(
        wait_until(Duration::from_secs(5), || c.coordinator.online() == 1).await,
        "a silent sharer stayed online"
    );
    drop(mute);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_forward_and_ipv6_targets() {
    // A second target on IPv6 loopback, opened on the sharer explicitly.
    let v6 = tokio::net::TcpListener::bind("[::1]:0")
        .await
        .expect("IPv6 loopback");
    let v6_port = v6.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = v6.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let body = "served over IPv6\n";
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    let rule = format!("[::1]/128:{v6_port}").parse().expect("rule");
    let c = Cluster::start_with(fast(), vec![SharerSpec::new("alice", 5.0, 0.0).allow(rule)])
        .await
        .expect("cluster");
    let mut opts = c.requester_options();
    opts.forwards = vec![
        format!("127.0.0.1:0=localhost:{}", c.target.addr.port())
            .parse()
            .expect("forward"),
    ];
    let r = c.requester(opts).await.expect("requester");

    // The forward needs no proxy support in the client at all.
    let fwd = r.requester.forward_addrs[0];
    let (ok, body, err) = curl(&[&format!("http://{fwd}/forwarded")]).await;
    assert!(ok, "{err}");
    assert!(body.contains("/forwarded"), "{body}");

    // SOCKS5 CONNECT with an IPv6 address (ATYP 4): curl resolves locally.
    let (ok, body, err) = curl(&[
        "--socks5",
        &r.socks().to_string(),
        &format!("http://[::1]:{v6_port}/"),
    ])
    .await;
    assert!(ok, "{err}");
    assert_eq!(body, "served over IPv6\n");
}

/// A port forward sends its first bytes right behind the flow header only
/// through a member that answers probes; through one that missed them the
/// pool waits for the sharer's reply itself, and the forward must not read
/// it a second time (it once took the page's first bytes for a reply and
/// closed the connection: curl saw "Empty reply from server").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_forward_through_a_member_that_missed_its_probes() {
    let c = Cluster::start_with(
        fast(),
        vec![SharerSpec::new("alice", 5.0, 0.0).behind_udp_relay()],
    )
    .await
    .expect("cluster");
    let mut opts = c.requester_options();
    opts.forwards = vec![
        format!("127.0.0.1:0={}", c.target.addr)
            .parse()
            .expect("forward"),
    ];
    let r = c.requester(opts).await.expect("requester");
    let fwd = r.requester.forward_addrs[0];
    let (ok, _, err) = curl(&[&format!("http://{fwd}/warm")]).await;
    assert!(ok, "{err}");

    // Silent for longer than two probe intervals (not fresh), shorter than
    // it takes to be called stalled: the flow opens waiting for the reply.
    let link = c
        .sharer("alice")
        .and_then(|s| s.link.as_ref())
        .expect("udp relay");
    link.cut(true);
    tokio::time::sleep(Duration::from_millis(250)).await;
    let fetch = tokio::spawn(async move { curl(&[&format!("http://{fwd}/after-silence")]).await });
    tokio::time::sleep(Duration::from_millis(30)).await;
    link.cut(false);
    let (ok, body, err) = fetch.await.expect("curl task");
    assert!(ok, "{err}");
    assert!(body.contains("/after-silence"), "{body}");
}

/// Sends `bytes` to the proxy port and reads what comes back within 3 s
/// (a client that gets no answer used to wait the 10 s head timeout).
async fn exchange(proxy: SocketAddr, bytes: &[u8], want: usize) -> Vec<u8> {
    let mut s = tokio::net::TcpStream::connect(proxy)
        .await
        .expect("proxy port");
    s.write_all(bytes).await.expect("send");
    let mut got = vec![];
    let read = async {
        let mut buf = [0u8; 512];
        while got.len() < want {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(3), read).await;
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_proxy_dialect_gets_its_own_answer_at_once() {
    let c = Cluster::start_with(fast(), vec![SharerSpec::new("alice", 5.0, 0.0)])
        .await
        .expect("cluster");
    let r = c.requester(c.requester_options()).await.expect("requester");
    let proxy = r.socks();
    let port = c.target.addr.port();
    // SOCKS4 CONNECT 127.0.0.1:port: SOCKS4's "request rejected" (91).
    let mut v4 = vec![4, 1];
    v4.extend_from_slice(&port.to_be_bytes());
    v4.extend_from_slice(&[127, 0, 0, 1, 0]);
    assert_eq!(exchange(proxy, &v4, 8).await, [0, 91, 0, 0, 0, 0, 0, 0]);
    // HTTP CONNECT with bare LF line ends is understood.
    let head = format!("CONNECT 127.0.0.1:{port} HTTP/1.1\nHost: x\n\n");
    let got = exchange(proxy, head.as_bytes(), 12).await;
    assert!(
        got.starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
    // SOCKS5 with an unknown address type: 0x08, not 0x07.
    let got = exchange(proxy, &[5, 1, 0, 5, 1, 0, 9, 1, 2, 3, 4, 0, 80], 12).await;
    assert_eq!(got.get(..2), Some(&[5u8, 0][..]), "method reply");
    assert_eq!(got.get(2..4), Some(&[5u8, 0x08][..]), "{got:?}");
    // An unknown command still gets 0x07.
    let got = exchange(proxy, &[5, 1, 0, 5, 2, 0, 1, 1, 2, 3, 4, 0, 80], 12).await;
    assert_eq!(got.get(2..4), Some(&[5u8, 0x07][..]), "{got:?}");
    // Something that is neither (a TLS hello's first bytes): 400 at once.
    let got = exchange(proxy, &[0x16, 3, 1, 0, 5], 12).await;
    assert!(
        got.starts_with(b"HTTP/1.1 400"),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trial_download_is_what_was_asked_up_to_64_kib() {
    let c = Cluster::start(vec![]).await.expect("cluster");
    let ch = client::connect(&c.coordinator.url).await.expect("channel");
    let mut h = v1::health_client::HealthClient::new(ch);
    let got = h
        .sample(v1::SampleRequest { bytes: 16 * 1024 })
        .await
        .expect("a sample");
    assert_eq!(got.into_inner().filler.len(), 16 * 1024);
    let too_big = h
        .sample(v1::SampleRequest {
            bytes: 64 * 1024 + 1,
        })
        .await
        .expect_err("over the limit");
    assert_eq!(too_big.code(), tonic::Code::InvalidArgument);
    assert!(too_big.message().contains("at most 65536"), "{too_big:?}");
}
