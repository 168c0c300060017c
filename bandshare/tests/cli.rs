//! The binary as a user runs it: bad input gives one clear line and a
//! non-zero exit; `offers --json` prints DESIGN.md's object; the demo runs.

use bandshare_testkit::process::Process;
use std::process::Output;
use std::time::Duration;

const EXE: &str = env!("CARGO_BIN_EXE_bandshare");

fn bandshare(args: &[&str]) -> Output {
    bandshare_testkit::process::run_once(EXE, args, &[], None)
}

/// Asserts a failure with exactly one line on stderr containing `needle`.
fn fails_with(args: &[&str], needle: &str) {
    bandshare_testkit::process::fails_with_one_line(EXE, args, needle);
}

#[test]
fn bad_input_is_one_clear_line() {
    let s = "127.0.0.1:1";
    fails_with(
        &["offers", "--server", s, "--at", "abc"],
        "expected LAT,LON",
    );
    fails_with(
        &["offers", "--server", s, "--at", "91,0"],
        "latitude must be within",
    );
    fails_with(
        &[
            "offers",
            "--server",
            s,
            "--at",
            "1,2",
            "--scene",
            "spaceship",
        ],
        "unknown scene",
    );
    fails_with(
        &[
            "offers",
            "--server",
            s,
            "--at",
            "1,2",
            "--want",
            "hotspot,teleport",
        ],
        "unknown service",
    );
    fails_with(
        &["offers", "--server", s, "--at", "1,2", "--network", "3g"],
        "unknown network type",
    );
    fails_with(
        &["offers", "--server", s, "--at", "1,2", "--bogus"],
        "--bogus",
    );
    fails_with(
        &[
            "share",
            "--server",
            s,
            "--name",
            "x",
            "--at",
            "1,2",
            "--allow-egress",
            "10.0.0.0/99",
        ],
        "CIDR",
    );
    fails_with(
        &[
            "connect",
            "--server",
            s,
            "--at",
            "1,2",
            "--forward",
            "nonsense",
        ],
        "LOCAL=HOST:PORT",
    );
    fails_with(
        &["offers", "--server", "not a url", "--at", "1,2"],
        "bad coordinator address",
    );
}

#[test]
fn unreachable_server_is_one_clear_line() {
    // Port 1 on loopback: nothing listens there.
    fails_with(
        &["offers", "--server", "127.0.0.1:1", "--at", "39.9,116.4"],
        "cannot reach coordinator",
    );
    let data = tempfile::tempdir().expect("tempdir");
    let d = data.path().to_string_lossy().to_string();
    fails_with(
        &[
            "connect",
            "--server",
            "127.0.0.1:1",
            "--at",
            "39.9,116.4",
            "--socks",
            "127.0.0.1:0",
            "--data",
            &d,
        ],
        "cannot reach coordinator",
    );
    // Several coordinators: each is tried; the error is still one line.
    fails_with(
        &[
            "offers",
            "--server",
            "127.0.0.1:1,127.0.0.1:2",
            "--at",
            "39.9,116.4",
        ],
        "cannot reach coordinator",
    );
    fails_with(
        &[
            "offers",
            "--server",
            "127.0.0.1:1,nonsense",
            "--at",
            "39.9,116.4",
        ],
        "bad coordinator address",
    );
    // Scale-out: a bad or unreachable Redis is one line, before serving.
    let data = tempfile::tempdir().expect("tempdir");
    let d = data.path().to_string_lossy().to_string();
    fails_with(
        &[
            "server",
            "--listen",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--data",
            &d,
            "--redis",
            "nonsense",
        ],
        "bad Redis address",
    );
    fails_with(
        &[
            "server",
            "--listen",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--data",
            &d,
            "--redis",
            "redis://127.0.0.1:1",
        ],
        "cannot reach Redis at",
    );
    fails_with(
        &["admin", "--redis", "redis://127.0.0.1:1", "list"],
        "cannot reach Redis at",
    );
}

#[test]
fn offers_json_has_the_design_shape_and_no_coordinates() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let cluster = rt
        .block_on(bandshare_testkit::Cluster::start(vec![
            bandshare_testkit::SharerSpec::new("alice", 5.0, 0.0).services("hotspot,5ghz"),
            bandshare_testkit::SharerSpec::new("bob", 70.0, 0.0).services("hotspot"),
        ]))
        .expect("cluster");
    let at = format!(
        "{},{}",
        bandshare_testkit::CENTER.0,
        bandshare_testkit::CENTER.1
    );
    let out = bandshare(&[
        "offers",
        "--server",
        cluster.coordinator.url.as_str(),
        "--at",
        &at,
        "--json",
        "--want",
        "hotspot",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(text.trim()).expect("one JSON object");
    assert_eq!(v["scene"], "outdoor");
    let offers = v["offers"].as_array().expect("offers array");
    assert_eq!(offers.len(), 2);
    assert_eq!(offers[0]["sharer"], "alice", "best first: {text}");
    assert_eq!(offers[0]["distance"], "<10m");
    assert_eq!(offers[1]["distance"], "50-200m");
    assert_eq!(
        offers[0]["services"],
        serde_json::json!(["hotspot", "5ghz"])
    );
    assert!(offers[0]["link"]["up"].as_bool().unwrap_or(false));
    assert!(
        offers[0]["score"].as_f64().unwrap_or(0.0) >= offers[1]["score"].as_f64().unwrap_or(1.0)
    );
    for forbidden in ["lat", "lon", "39.90", "116.40"] {
        assert!(!text.contains(forbidden), "offers leak {forbidden}: {text}");
    }
    // The table names both.
    let out = bandshare(&[
        "offers",
        "--server",
        cluster.coordinator.url.as_str(),
        "--at",
        &at,
        "--explain",
    ]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("alice") && table.contains("bob") && table.contains("why:"),
        "{table}"
    );
}

#[test]
fn demo_runs_and_exits_zero() {
    let out = bandshare(&["demo"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("service missing: hotspot"), "{text}");
    assert!(text.contains("outside the 200 m circle"), "{text}");
    assert!(text.contains("new flows moved from"), "{text}");
    // The own link first, the pool when it goes silent, and back.
    assert!(
        text.contains("/hello</p>") && text.contains("via the own link"),
        "{text}"
    );
    assert!(text.contains("new flows go through sharers"), "{text}");
    assert!(text.contains("back to the own link after"), "{text}");
    // The map warns of the weak stretch ahead, and of the dip that recurs.
    assert!(
        text.contains("weak zone ahead in") && text.contains("weak most of the time here"),
        "{text}"
    );
    assert!(text.contains("every pass dipped"), "{text}");
    // Scale-out, when redis-server is installed (.ci/run installs it).
    if bandshare_testkit::redis_cluster::available() {
        assert!(
            text.contains("through Redis") && text.contains("re-registers on"),
            "{text}"
        );
    } else {
        assert!(text.contains("Scale out: skipped"), "{text}");
    }
}

#[test]
fn server_stops_cleanly_on_sigterm() {
    let data = tempfile::tempdir().expect("tempdir");
    let d = data.path().to_str().expect("utf-8");
    let exe = env!("CARGO_BIN_EXE_bandshare");
    let mut server = Process::bandshare(
        exe,
        &[
            "server",
            "--listen",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--data",
            d,
        ],
    )
    .expect("spawn server");
    let grpc = server.addr("grpc", Duration::from_secs(15)).expect("grpc");
    server.addr("http", Duration::from_secs(1)).expect("http");
    // A sharer holds a stream open: shutdown must not wait for it forever.
    let sharer_data = tempfile::tempdir().expect("tempdir");
    let url = grpc.to_string();
    let sharer = Process::bandshare(
        exe,
        &[
            "share",
            "--server",
            &url,
            "--name",
            "s",
            "--at",
            "39.9,116.4",
            "--relay",
            "127.0.0.1:0",
            "--data",
            sharer_data.path().to_str().expect("utf-8"),
        ],
    )
    .expect("spawn sharer");
    sharer
        .addr("relay", Duration::from_secs(15))
        .expect("relay");
    assert!(
        server.wait_stderr("sharer online", Duration::from_secs(10)),
        "the sharer never connected: {}",
        server.stderr()
    );
    server.signal("TERM");
    let Some(status) = server.wait_exit(Duration::from_secs(5)) else {
        panic!("server did not stop within 5 s of SIGTERM");
    };
    let err = server.stderr();
    assert!(status.success(), "exit {status:?}: {err}");
    assert!(err.contains("coordinator stopped"), "{err}");
    assert!(data.path().join("bandshare.db").exists());
}

#[test]
fn admin_lists_approves_revokes_and_rotates() {
    let data = tempfile::tempdir().expect("tempdir");
    let d = data.path().to_str().expect("utf-8 path");
    fails_with(&["admin", "--data", d, "list"], "no coordinator store");
    let store = bandshare_store::Store::open(data.path()).expect("store");
    let key = bandshare_core::DeviceKey([0x5a; 32]);
    store
        .signing_seed(1, || [1; 32])
        .expect("a server's first key");
    store
        .upsert_device(&key, "phone", bandshare_store::Role::Requester, 1)
        .expect("device");
    let text = |out: Output| {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let list = text(bandshare(&["admin", "--data", d, "list"]));
    assert!(
        list.contains(&key.to_string()) && list.contains("pending"),
        "{list}"
    );
    let prefix = &key.to_string()[..10];
    assert!(text(bandshare(&["admin", "--data", d, "approve", prefix])).contains("approved"));
    let list = text(bandshare(&["admin", "--data", d, "list"]));
    assert!(
        list.contains("approved") && list.contains("phone"),
        "{list}"
    );
    assert!(text(bandshare(&["admin", "--data", d, "revoke", prefix])).contains("revoked"));
    assert_eq!(
        store.decisions().expect("decisions"),
        (vec![], vec![key]),
        "the CLI wrote the server's store"
    );
    fails_with(&["admin", "--data", d, "approve", "zz"], "not a device key");
    fails_with(
        &["admin", "--data", d, "revoke", "0123456789"],
        "no device key starts with",
    );
    assert!(
        text(bandshare(&["admin", "--data", d, "rotate-key"])).contains("new ticket-signing key 2")
    );
    fails_with(&["server", "--enroll", "maybe"], "unknown enrollment mode");
}

/// The HTTP side (dashboard, /status, /metrics) on anything but loopback
/// needs a token: without one the server refuses to start, in one line.
#[test]
fn http_off_loopback_needs_a_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let out = bandshare(&[
        "server",
        "--listen",
        "127.0.0.1:0",
        "--http",
        "0.0.0.0:0",
        "--data",
        data.to_str().expect("utf-8"),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not a loopback address") && err.contains("--http-token-file"),
        "{err}"
    );
    let short = dir.path().join("short");
    std::fs::write(&short, "abc\n").expect("write");
    let out = bandshare(&[
        "server",
        "--listen",
        "127.0.0.1:0",
        "--http",
        "0.0.0.0:0",
        "--http-token-file",
        short.to_str().expect("utf-8"),
        "--data",
        data.to_str().expect("utf-8"),
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("at least 16 characters"),
        "{out:?}"
    );
}
