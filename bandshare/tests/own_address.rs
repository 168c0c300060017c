//! A sharer refuses its own addresses, including one it gains after it
//! started (a DHCP change, an IPv6 temporary address, a VPN coming up):
//! otherwise a service listening on 0.0.0.0 on the sharer's machine becomes
//! reachable through the relay. Real processes in a network namespace of
//! the test's own; skips, saying why, where namespaces cannot be made.
//!
//! ```text
//!   host (coordinator, sharer, requester; v0 gains 93.184.215.14 later)
//!     | veth 10.78.9.1/24 -- 10.78.9.2/24 | net (HTTP :8080, allowed)
//! ```

use bandshare_testkit::HttpTarget;
use bandshare_testkit::netns::{Lab, wait};
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::process::Output;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_bandshare");
/// Not in any special range: refused only because it is the sharer's own.
const LATE: &str = "93.184.215.14";

fn curl(lab: &Lab, ns: &str, url: &str) -> Output {
    lab.command(ns, "curl")
        .args(["-sS", "--max-time", "5", "--socks5", "127.0.0.1:1080", url])
        .output()
        .expect("run curl")
}

#[test]
fn an_address_added_after_start_is_refused() {
    let mut lab = match Lab::new() {
        Ok(l) => l,
        Err(why) => {
            eprintln!("SKIP: {why}");
            return;
        }
    };
    let host = lab.host("own").expect("host");
    let net = lab.host("ownnet").expect("net");
    lab.wire((&host, "v0", "10.78.9.1/24"), (&net, "v1", "10.78.9.2/24"))
        .expect("veth");

    // The allowed target across the veth, and a service on 0.0.0.0 of the
    // sharer's own host (what the bypass would reach).
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let target = lab
        .bind_tcp(&net, "10.78.9.2:8080".parse().expect("addr"))
        .expect("bind target");
    let _http = {
        let _in = rt.enter();
        HttpTarget::serve_std(target).expect("HTTP target")
    };
    let local_service = lab
        .bind_tcp(&host, SocketAddr::from(([0, 0, 0, 0], 8081)))
        .expect("bind service on 0.0.0.0");

    let dir = lab.dir.path().to_path_buf();
    let d = |s: &str| dir.join(s).display().to_string();
    let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    lab.spawn(
        &host,
        "coordinator",
        BIN,
        &args(&[
            "server",
            "--listen",
            "127.0.0.1:7400",
            "--http",
            "127.0.0.1:7480",
            "--data",
            &d("c"),
        ]),
    )
    .expect("coordinator");
    lab.spawn(
        &host,
        "sharer",
        BIN,
        &args(&[
            "share",
            "--server",
            "127.0.0.1:7400",
            "--name",
            "s",
            "--at",
            "39.9042,116.4074",
            "--relay",
            "127.0.0.1:7500",
            "--allow-egress",
            "10.78.9.0/24",
            "--data",
            &d("s"),
        ]),
    )
    .expect("sharer");
    let up = wait(Duration::from_secs(20), || {
        lab.command(&host, "curl")
            .args(["-s", "--max-time", "1", "http://127.0.0.1:7480/status"])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("\"online_sharers\":1"))
    });
    assert!(up, "sharer never came online\n{}", lab.log_tails(20));
    lab.spawn(
        &host,
        "requester",
        BIN,
        &args(&[
            "connect",
            "--server",
            "127.0.0.1:7400",
            "--at",
            "39.9042,116.4074",
            "--via",
            "pool",
            "--pool",
            "1",
            "--socks",
            "127.0.0.1:1080",
            "--data",
            &d("r"),
        ]),
    )
    .expect("requester");

    // The path works: the allowed target answers through the sharer.
    let ok = wait(Duration::from_secs(20), || {
        curl(&lab, &host, "http://10.78.9.2:8080/").status.success()
    });
    assert!(ok, "no flow through the sharer\n{}", lab.log_tails(20));

    // Now the host gains an address, after the sharer started.
    lab.ip_in(&host, &["addr", "add", &format!("{LATE}/32"), "dev", "v0"])
        .expect("add address");
    let out = curl(&lab, &host, &format!("http://{LATE}:8081/"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a flow to the new own address went through"
    );
    assert!(err.contains("(2)") || err.contains("not allowed"), "{err}");
    match local_service.accept() {
        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
        other => panic!("the service on 0.0.0.0 saw a connection: {other:?}"),
    }
    let logs = lab.log_tails(40);
    assert!(logs.contains("address of the sharer itself"), "{logs}");
}
