//! gRPC over TLS as a user runs it: `bandshare server --tls` makes a
//! certificate on first start (key file 0600), agents pin it with
//! `--server-pin`, and a wrong pin or a plaintext client is refused.

use bandshare_testkit::process::Process;
use bandshare_testkit::{SharerNode, SharerSpec, wait_until};
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output};
use std::time::Duration;

fn bandshare(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bandshare"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run bandshare")
}

#[test]
fn agents_pin_the_coordinator_certificate() {
    let data = tempfile::tempdir().expect("tempdir");
    let d = data.path().to_str().expect("utf-8");
    let server = Process::bandshare(
        env!("CARGO_BIN_EXE_bandshare"),
        &[
            "server",
            "--tls",
            "--listen",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--data",
            d,
        ],
    )
    .expect("spawn server");
    let listen = server
        .addr("grpc", Duration::from_secs(15))
        .expect("server listening")
        .to_string();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let key = data.path().join("tls/key.der");
    let mode = std::fs::metadata(&key)
        .expect("key file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the TLS key is private");

    let pin = String::from_utf8_lossy(&bandshare(&["admin", "--data", d, "pin"]).stdout)
        .trim()
        .to_string();
    assert_eq!(pin.len(), 64, "{pin}");
    let https = format!("https://{listen}");

    // A sharer attaches over TLS with the pin.
    let sharer = rt
        .block_on(SharerNode::start(
            &format!("{https}#{pin}").parse().expect("url"),
            &SharerSpec::new("alice", 5.0, 0.0),
        ))
        .expect("sharer");
    let online = rt.block_on(wait_until(Duration::from_secs(10), || {
        sharer.sharer.relay.knows_coordinator()
    }));
    assert!(online, "sharer never got the coordinator's keys over TLS");

    let at = format!(
        "{},{}",
        bandshare_testkit::CENTER.0,
        bandshare_testkit::CENTER.1
    );
    let out = bandshare(&[
        "offers",
        "--server",
        &https,
        "--server-pin",
        &pin,
        "--at",
        &at,
        "--json",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("\"alice\""), "{text}");

    // A wrong pin, no pin, and plaintext are each refused with one line.
    let wrong = format!(
        "{}{}",
        &pin[..63],
        if pin.ends_with('0') { "1" } else { "0" }
    );
    for (args, needle) in [
        (
            vec!["--server", https.as_str(), "--server-pin", wrong.as_str()],
            "does not match --server-pin",
        ),
        (vec!["--server", https.as_str()], "needs --server-pin"),
        (
            vec!["--server", listen.as_str()],
            "cannot reach coordinator",
        ),
        (
            vec!["--server", https.as_str(), "--server-pin", "abc"],
            "not 64 hex digits",
        ),
    ] {
        let mut full = vec!["offers"];
        full.extend(args.iter().copied());
        full.extend(["--at", at.as_str()]);
        let out = bandshare(&full);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{full:?} succeeded");
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{full:?}: {err}");
        assert!(lines[0].contains(needle), "{full:?}: {err}");
    }
    sharer.kill();
}
