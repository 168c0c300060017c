//! UDP through bandshare: a real SOCKS5 client (Python's socket module, as
//! an app would write it) does UDP ASSOCIATE on the requester's proxy port
//! and exchanges datagrams with a UDP echo server — through a sharer in
//! QUIC DATAGRAM frames, or out of the own link — and the sharer's egress
//! policy decides every datagram. Skips, saying why, without python3.

use bandshare_agent::requester::own_link::Via;
use bandshare_testkit::{Cluster, SharerSpec, wait_until};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A UDP echo on loopback: answers `echo:` + the datagram; counts them.
async fn echo() -> (SocketAddr, Arc<AtomicU64>) {
    let s = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind echo");
    let addr = s.local_addr().expect("addr");
    let seen = Arc::new(AtomicU64::new(0));
    let n = seen.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        while let Ok((len, from)) = s.recv_from(&mut buf).await {
            n.fetch_add(1, Ordering::Relaxed);
            let mut reply = b"echo:".to_vec();
            reply.extend_from_slice(&buf[..len]);
            let _ = s.send_to(&reply, from).await;
        }
    });
    (addr, seen)
}

/// A SOCKS5 UDP client in Python: one association, then for each
/// `HOST:PORT=TEXT` argument a datagram and the reply (or `timeout`),
/// printed one per line as `FROM_PORT TEXT`. With `--pause-after K` it
/// waits for a line on stdin after K exchanges (so the test can fail over
/// the pool in between, on the same association).
const CLIENT: &str = r#"
import socket, struct, sys
proxy_host, proxy_port = sys.argv[1].rsplit(":", 1)
pause_after = int(sys.argv[2])
tcp = socket.create_connection((proxy_host, int(proxy_port)), timeout=5)
tcp.sendall(b"\x05\x01\x00")
assert tcp.recv(2) == b"\x05\x00"
tcp.sendall(b"\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00")
rep = tcp.recv(10)
assert rep[:2] == b"\x05\x00", rep
bound = (socket.inet_ntoa(rep[4:8]), struct.unpack("!H", rep[8:10])[0])
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.settimeout(2)
for i, arg in enumerate(sys.argv[3:]):
    if i == pause_after:
        print("paused", flush=True)
        sys.stdin.readline()
    dest, text = arg.split("=", 1)
    host, port = dest.rsplit(":", 1)
    head = b"\x00\x00\x00\x01" + socket.inet_aton(host) + struct.pack("!H", int(port))
    u.sendto(head + text.encode(), bound)
    try:
        data, _ = u.recvfrom(65535)
        assert data[:3] == b"\x00\x00\x00" and data[3] == 1, data
        print(struct.unpack("!H", data[8:10])[0], data[10:].decode(), flush=True)
    except socket.timeout:
        print("timeout", flush=True)
tcp.close()
"#;

fn python() -> bool {
    std::process::Command::new("python3")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Runs the client; returns its output lines.
async fn exchange(socks: SocketAddr, datagrams: &[String]) -> Vec<String> {
    let out = tokio::process::Command::new("python3")
        .args(["-c", CLIENT, &socks.to_string(), "999"])
        .args(datagrams)
        .output()
        .await
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(String::from)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socks5_udp_associate_through_a_sharer_and_direct() {
    if !python() {
        eprintln!("SKIP: python3 is not installed (the SOCKS5 UDP client is a Python script)");
        return;
    }
    let (echo_addr, seen) = echo().await;
    let rule = format!("127.0.0.1/32:{}", echo_addr.port())
        .parse()
        .expect("rule");
    let c = Cluster::start(vec![SharerSpec::new("alice", 5.0, 0.0).allow(rule)])
        .await
        .expect("cluster");
    let e = echo_addr.to_string();

    // Through the sharer.
    let r = c.requester(c.requester_options()).await.expect("requester");
    // The third is larger than any QUIC DATAGRAM frame (the path MTU is
    // at most 16 KiB): it and its echo go whole, each on a stream.
    let big = "x".repeat(20_000);
    let lines = exchange(
        r.socks(),
        &[format!("{e}=one"), format!("{e}=two"), format!("{e}={big}")],
    )
    .await;
    let port = echo_addr.port().to_string();
    assert_eq!(
        lines,
        vec![
            format!("{port} echo:one"),
            format!("{port} echo:two"),
            format!("{port} echo:{big}")
        ]
    );
    let alice = c.sharer("alice").expect("alice");
    let counts = alice.sharer.relay.udp_counts();
    assert_eq!((counts.sent, counts.received), (3, 3), "{counts:?}");
    assert_eq!(
        counts.streamed, 1,
        "the large echo went on a stream: {counts:?}"
    );
    let mine = r.requester.pool.udp.status();
    assert_eq!(
        (mine.sent, mine.received, mine.associations),
        (3, 3, 0),
        "{mine:?}"
    );

    // The sharer's egress policy decides each datagram: loopback ports it
    // was not told to allow are dropped there, counted, never sent.
    let (closed_addr, closed_seen) = echo().await;
    let lines = exchange(r.socks(), &[format!("{closed_addr}=secret")]).await;
    assert_eq!(lines, vec!["timeout".to_string()]);
    assert_eq!(
        closed_seen.load(Ordering::Relaxed),
        0,
        "a denied datagram was sent"
    );
    let counts = alice.sharer.relay.udp_counts();
    assert_eq!(counts.denied, 1, "{counts:?}");

    // Out of the own link: the sharer sees nothing more.
    let mut opts = c.requester_options();
    opts.via = Via::Direct;
    let d = c.requester(opts).await.expect("requester");
    let before = seen.load(Ordering::Relaxed);
    let lines = exchange(d.socks(), &[format!("{e}=direct")]).await;
    assert_eq!(lines, vec![format!("{port} echo:direct")]);
    assert_eq!(seen.load(Ordering::Relaxed), before + 1);
    assert_eq!(alice.sharer.relay.udp_counts().sent, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_follows_the_pool_when_the_active_sharer_dies() {
    if !python() {
        eprintln!("SKIP: python3 is not installed");
        return;
    }
    let (echo_addr, _seen) = echo().await;
    let rule = || {
        format!("127.0.0.1/32:{}", echo_addr.port())
            .parse()
            .expect("rule")
    };
    let c = Cluster::start(vec![
        SharerSpec::new("alice", 5.0, 0.0).allow(rule()),
        SharerSpec::new("bob", 8.0, 0.0).allow(rule()),
    ])
    .await
    .expect("cluster");
    let mut opts = c.requester_options();
    opts.pool_size = 2;
    let r = c.requester(opts).await.expect("requester");
    assert!(wait_until(Duration::from_secs(5), || r.requester.pool.len() == 2).await);
    let e = echo_addr.to_string();
    // One association: a datagram, then the active sharer is killed, then
    // more datagrams on the same association.
    let mut child = tokio::process::Command::new("python3")
        .args(["-c", CLIENT, &r.socks().to_string(), "1"])
        .args([
            format!("{e}=before"),
            format!("{e}=after"),
            format!("{e}=again"),
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let mut out = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    let port = echo_addr.port();
    assert_eq!(
        out.next_line().await.expect("line"),
        Some(format!("{port} echo:before"))
    );
    assert_eq!(out.next_line().await.expect("line"), Some("paused".into()));
    let first = r.active().expect("active");
    c.sharer(&first).expect("sharer").kill();
    let moved = wait_until(Duration::from_secs(3), || {
        r.active().is_some_and(|a| a != first)
    })
    .await;
    assert!(moved, "the pool did not move off {first}");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"go\n")
        .await
        .expect("resume");
    assert_eq!(
        out.next_line().await.expect("line"),
        Some(format!("{port} echo:after"))
    );
    assert_eq!(
        out.next_line().await.expect("line"),
        Some(format!("{port} echo:again"))
    );
    let _ = child.wait().await;
}
