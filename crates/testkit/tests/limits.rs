//! The sharer's limits attacked through the real components: a requester
//! pulling more than its daily quota, faster than its rate, and sharers whose
//! consent policy refuses (schedule, battery, services, daily cap), each
//! refusal with the reason the requester is shown.

use bandshare_agent::location::{ConditionSpec, LocationSpec};
use bandshare_agent::sharer::consent::{Consent, Window, local_minute_of_day};
use bandshare_coordinator::Config;
use bandshare_core::DeviceKey;
use bandshare_relay::Limits;
use bandshare_testkit::{Cluster, SharerSpec, center};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn fast() -> Config {
    Config {
        report_interval: Duration::from_millis(200),
        ping_interval: Duration::from_millis(100),
        ..bandshare_testkit::exact_config()
    }
}

/// curl through the SOCKS5 port: (exit ok, bytes downloaded, seconds).
async fn curl_bytes(socks: &str, url: &str) -> (bool, u64, f64) {
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "300", "-o", "/dev/null"])
        .args(["-w", "%{size_download} %{time_total}"])
        .args(["--socks5-hostname", socks, url])
        .output()
        .await
        .expect("curl must be installed (.ci/run installs it)");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut parts = text.split_whitespace();
    let bytes = parts.next().and_then(|b| b.parse().ok()).unwrap_or(0);
    let secs = parts.next().and_then(|b| b.parse().ok()).unwrap_or(0.0);
    (out.status.success(), bytes, secs)
}

/// An HTTP CONNECT through the requester's port: (status line, body).
async fn connect_via(proxy: std::net::SocketAddr, target: &str) -> (String, String) {
    let mut s = tokio::net::TcpStream::connect(proxy).await.expect("proxy");
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut buf = vec![];
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.lines().next().unwrap_or_default().to_string();
    let body = text
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_string();
    (status, body)
}

fn with_limits(name: &str, limits: Limits) -> SharerSpec {
    let mut s = SharerSpec::new(name, 5.0, 0.0);
    s.consent = Consent {
        limits,
        ..Consent::default()
    };
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daily_quota_is_exact_and_then_refused_with_a_reason() {
    const QUOTA: u64 = 1_000_000;
    let c = Cluster::start_with(
        fast(),
        vec![with_limits(
            "alice",
            Limits {
                requester_daily_bytes: QUOTA,
                ..Limits::default()
            },
        )],
    )
    .await
    .expect("cluster");
    let key = bandshare_agent::identity::generate().expect("key");
    let me = DeviceKey(key.verifying_key().to_bytes());
    let r = c
        .requester_as(c.requester_options(), key.clone())
        .await
        .expect("requester");
    let socks = r.socks().to_string();
    let url = format!("http://127.0.0.1:{}/bytes/3000000", c.target.addr.port());
    let (ok, got, _) = curl_bytes(&socks, &url).await;
    assert!(!ok, "a 3 MB download cannot finish on a 1 MB quota");
    let relay = &c.sharer("alice").expect("alice").sharer.relay;
    let relayed = relay.total_bytes();
    eprintln!("quota {QUOTA}, relayed {relayed}, curl got {got}");
    assert_eq!(relayed, QUOTA, "exactly the quota crosses the relay");
    assert!(got as f64 >= QUOTA as f64 * 0.99 - 300.0, "{got}");
    assert_eq!(relay.requester_left(&me), 0);

    // The next flow is refused, and the reason reaches the application.
    let target = format!("127.0.0.1:{}", c.target.addr.port());
    let (status, body) = connect_via(r.socks(), &target).await;
    assert!(status.contains("403"), "{status}");
    assert!(body.contains("daily quota"), "{body}");
    assert_eq!(relay.total_bytes(), QUOTA, "nothing more crossed");

    // Asked again, the sharer declines this requester with the reason.
    let resp = c
        .ask_as(
            &key,
            LocationSpec {
                at: Some(center()),
                ..Default::default()
            },
            ConditionSpec::default(),
        )
        .await
        .expect("ask");
    assert!(resp.offers.is_empty());
    let why: Vec<&str> = resp.explain.iter().map(|v| v.reason.as_str()).collect();
    assert_eq!(
        why,
        vec!["declined: your daily quota of 1.0 MB at this sharer is used up"]
    );
    // Another requester still gets alice.
    let other = c
        .ask(
            LocationSpec {
                at: Some(center()),
                ..Default::default()
            },
            ConditionSpec::default(),
        )
        .await
        .expect("ask");
    assert_eq!(other.offers.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_holds_within_one_percent() {
    const RATE: u64 = 1_000_000;
    const BURST: u64 = 16 * 1024;
    const SIZE: u64 = 3_000_000;
    let c = Cluster::start_with(
        fast(),
        vec![with_limits(
            "alice",
            Limits {
                rate_bytes_per_s: RATE,
                burst_bytes: BURST,
                ..Limits::default()
            },
        )],
    )
    .await
    .expect("cluster");
    let r = c.requester(c.requester_options()).await.expect("requester");
    let url = format!("http://127.0.0.1:{}/bytes/{SIZE}", c.target.addr.port());
    let (ok, got, secs) = curl_bytes(&r.socks().to_string(), &url).await;
    assert!(ok && got == SIZE, "download failed: {got} bytes");
    let relayed = c.sharer("alice").expect("alice").sharer.relay.total_bytes();
    let per_s = relayed as f64 / secs;
    eprintln!(
        "rate limit {RATE} B/s: {relayed} bytes in {secs:.3} s = {:.4} of the limit",
        per_s / RATE as f64
    );
    // The bucket lets at most BURST + RATE × t through in any t: over this
    // transfer that is within 1 % of the configured rate.
    assert!(
        per_s <= (BURST as f64 + RATE as f64 * secs) / secs,
        "{per_s} B/s is above what the bucket allows"
    );
    assert!(per_s <= RATE as f64 * 1.01, "{per_s} B/s");
    // Not far below it either (the limiter must not starve the flow);
    // loose, since a loaded machine can only make it slower.
    assert!(per_s >= RATE as f64 * 0.5, "{per_s} B/s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consent_refusals_carry_reasons() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A battery at 12 % (sysfs layout).
    let bat = dir.path().join("power/BAT0");
    std::fs::create_dir_all(&bat).expect("mkdir");
    std::fs::write(bat.join("type"), "Battery\n").expect("type");
    std::fs::write(bat.join("capacity"), "12\n").expect("capacity");
    // A sharer that already relayed its whole cap today.
    let capped_dir = dir.path().join("capped");
    std::fs::create_dir_all(&capped_dir).expect("mkdir");
    std::fs::write(
        capped_dir.join("relayed-today"),
        format!("{} 1000\n", bandshare_relay::limits::today()),
    )
    .expect("usage");
    // A schedule window that starts two hours from now.
    let now = local_minute_of_day();
    let later = Window {
        start_min: (now + 120) % 1440,
        end_min: (now + 180) % 1440,
    };

    let spec = |name: &str, consent: Consent| {
        let mut s = SharerSpec::new(name, 5.0, 0.0).services("hotspot,wifi6");
        s.consent = consent;
        s
    };
    let mut flat = spec(
        "flat",
        Consent {
            min_battery_pct: Some(20),
            ..Consent::default()
        },
    );
    flat.power_supply = Some(dir.path().join("power"));
    let mut capped = spec(
        "capped",
        Consent {
            limits: Limits {
                daily_cap_bytes: 1000,
                ..Limits::default()
            },
            ..Consent::default()
        },
    );
    capped.data_dir = Some(capped_dir);
    let c = Cluster::start_with(
        fast(),
        vec![
            spec(
                "night",
                Consent {
                    schedule: vec![later],
                    ..Consent::default()
                },
            ),
            flat,
            spec(
                "picky",
                Consent {
                    allowed_services: Some("hotspot".parse().expect("set")),
                    ..Consent::default()
                },
            ),
            capped,
            spec("open", Consent::default()),
        ],
    )
    .await
    .expect("cluster");
    let ask = |want: &str| {
        c.ask(
            LocationSpec {
                at: Some(center()),
                ..Default::default()
            },
            ConditionSpec {
                want: want.parse().expect("services"),
                ..Default::default()
            },
        )
    };
    let r = ask("hotspot,wifi6").await.expect("ask");
    let offered: Vec<&str> = r.offers.iter().map(|o| o.sharer.as_str()).collect();
    assert_eq!(offered, vec!["open"]);
    let why = |n: &str| {
        r.explain
            .iter()
            .find(|v| v.sharer == n)
            .map(|v| v.reason.clone())
            .unwrap_or_default()
    };
    assert_eq!(
        why("night"),
        format!("declined: outside the sharer's schedule (serves {later} local time)")
    );
    assert_eq!(
        why("flat"),
        "declined: sharer's battery 12% is below its minimum of 20%"
    );
    assert_eq!(
        why("picky"),
        "declined: service not allowed by the sharer: wifi6 (allowed: hotspot)"
    );
    assert_eq!(
        why("capped"),
        "declined: sharer's daily data cap of 1.0 KB is reached"
    );
    // Asking only for what picky allows, picky serves.
    let r = ask("hotspot").await.expect("ask");
    let mut offered: Vec<&str> = r.offers.iter().map(|o| o.sharer.as_str()).collect();
    offered.sort();
    assert_eq!(offered, vec!["open", "picky"]);
}

/// A transfer longer than one ticket's byte quota (1 GiB by default): the
/// requester renews the ticket on the open connection before it runs out,
/// so 3 GiB move through one sharer in several flows and in one flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_gib_outlast_a_one_gib_ticket_in_several_flows_and_in_one() {
    let config = fast();
    assert_eq!(config.quota_bytes, 1 << 30, "the default quota");
    let c = Cluster::start_with(config, vec![SharerSpec::new("alice", 5.0, 0.0)])
        .await
        .expect("cluster");
    let mut opts = c.requester_options();
    opts.pool_size = 1;
    let r = c.requester(opts).await.expect("requester");
    let socks = r.socks().to_string();
    let port = c.target.addr.port();
    let started = std::time::Instant::now();
    // Several flows: 12 of 256 MiB.
    for i in 0..12 {
        let url = format!("http://localhost:{port}/bytes/{}", 256u64 << 20);
        let (ok, bytes, secs) = curl_bytes(&socks, &url).await;
        assert!(
            ok && bytes == 256 << 20,
            "flow {i}: ok {ok}, {bytes} bytes in {secs} s"
        );
    }
    // One flow of 3 GiB.
    let url = format!("http://localhost:{port}/bytes/{}", 3u64 << 30);
    let (ok, bytes, secs) = curl_bytes(&socks, &url).await;
    assert!(
        ok && bytes == 3 << 30,
        "one flow: ok {ok}, {bytes} bytes in {secs} s"
    );
    let status = r.requester.pool.status();
    assert_eq!(status.pool.len(), 1, "{status:?}");
    assert_eq!(status.pool[0].sharer, "alice");
    let moved = status.pool[0].bytes_down;
    assert!(moved >= 6 << 30, "{moved}");
    eprintln!(
        "6 GiB through one sharer and one connection with 1 GiB tickets in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
