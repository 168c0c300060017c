//! `bandshare bench relay`: bulk throughput from a client to a target,
//! directly over loopback TCP, through bandshare (requester `--forward` →
//! QUIC → sharer → target) and, when installed, through shadowsocks-rust
//! (`sslocal` tunnel → `ssserver`, 2022-blake3-aes-256-gcm) on the same
//! path; 1 and 4 parallel streams; with `iperf3` when installed, else a
//! built-in sender. Also the added latency of a new flow's first byte
//! through a warm pool.

use crate::stats::{Latencies, Proc};
use bandshare_coordinator::Config;
use bandshare_core::EgressRule;
use bandshare_local::{Cluster, SharerSpec};
use serde_json::json;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Clone, Debug)]
pub struct RelayBenchOptions {
    pub seconds: f64,
    pub first_byte_rounds: usize,
    /// The requester's lanes to the sharer (`connect --lanes`).
    pub lanes: usize,
}

fn installed(cmd: &str) -> bool {
    Command::new(cmd)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Discards what it receives and counts it.
async fn sink() -> anyhow::Result<(SocketAddr, Arc<AtomicU64>)> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let count = Arc::new(AtomicU64::new(0));
    let c = count.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let c = c.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 * 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    c.fetch_add(n as u64, Ordering::Relaxed);
                }
            });
        }
    });
    Ok((addr, count))
}

/// Echoes every byte back.
async fn echo() -> anyhow::Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = s.set_nodelay(true);
                let (mut r, mut w) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    Ok(addr)
}

/// Built-in sender: `streams` connections to `to` write for `secs`; the
/// sink counts what arrived. Returns Gbit/s received.
async fn send_builtin(
    to: SocketAddr,
    streams: usize,
    secs: f64,
    received: &AtomicU64,
) -> anyhow::Result<f64> {
    let start_bytes = received.load(Ordering::Relaxed);
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs_f64(secs);
    let mut tasks = vec![];
    for _ in 0..streams {
        tasks.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(to).await?;
            let buf = vec![0x5au8; 128 * 1024];
            while Instant::now() < deadline {
                s.write_all(&buf).await?;
            }
            s.shutdown().await?;
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    // Let in-flight bytes land, bounded.
    let mut last = received.load(Ordering::Relaxed);
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = received.load(Ordering::Relaxed);
        if now == last {
            break;
        }
        last = now;
    }
    let bytes = received.load(Ordering::Relaxed) - start_bytes;
    Ok(bytes as f64 * 8.0 / secs / 1e9)
}

/// iperf3 client against `to` (which forwards to an `iperf3 -s`); Gbit/s
/// received.
async fn send_iperf(to: SocketAddr, streams: usize, secs: f64) -> anyhow::Result<f64> {
    let out = tokio::process::Command::new("iperf3")
        .args(["-c", &to.ip().to_string(), "-p", &to.port().to_string()])
        .args([
            "-t",
            &format!("{}", secs.ceil() as u64),
            "-P",
            &streams.to_string(),
            "-J",
        ])
        .output()
        .await?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .ok_or_else(|| anyhow::anyhow!("iperf3 gave no result: {}", v["error"]))?;
    Ok(bps / 1e9)
}

/// Median microseconds from connect to the first echoed byte, over `rounds`
/// new connections to `to`.
async fn first_byte(to: SocketAddr, rounds: usize) -> anyhow::Result<u64> {
    let mut lat = Latencies::default();
    for _ in 0..rounds {
        let t = Instant::now();
        let mut s = TcpStream::connect(to).await?;
        s.set_nodelay(true)?;
        s.write_all(b"x").await?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await?;
        lat.push(t.elapsed());
    }
    Ok(lat.percentile(50.0))
}

/// A plain TCP forwarder to `to` in this process (accept, connect,
/// `copy_bidirectional`, nothing else): what one local hop costs a new
/// flow's first byte, before any relay logic.
async fn plain_hop(to: SocketAddr) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let task = tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = c.set_nodelay(true);
                if let Ok(mut u) = TcpStream::connect(to).await {
                    let _ = u.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut c, &mut u).await;
                }
            });
        }
    });
    Ok((addr, task))
}

/// Median microseconds for a new stream on a bare QUIC connection over
/// loopback to carry one byte there and back (both endpoints in this
/// process, built as the relay builds its own): the floor the QUIC part of
/// a new flow's first byte cannot go below with this stack.
async fn quic_stream_floor(rounds: usize) -> anyhow::Result<u64> {
    use bandshare_relay::tls;
    let (server_cfg, pin) = tls::server_config()?;
    let server = tls::endpoint(
        tls::quic_socket(SocketAddr::from(([127, 0, 0, 1], 0)))?,
        Some(server_cfg),
    )?;
    let addr = server.local_addr()?;
    let echo = tokio::spawn(async move {
        let Some(incoming) = server.accept().await else {
            return;
        };
        let Ok(conn) = incoming.await else { return };
        while let Ok((mut send, mut recv)) = conn.accept_bi().await {
            tokio::spawn(async move {
                let mut b = [0u8; 1];
                if recv.read_exact(&mut b).await.is_ok() {
                    let _ = send.write_all(&b).await;
                }
            });
        }
    });
    let mut client = tls::endpoint(
        tls::quic_socket(SocketAddr::from(([127, 0, 0, 1], 0)))?,
        None,
    )?;
    client.set_default_client_config(tls::client_config(pin)?);
    let conn = client.connect(addr, "bandshare-relay")?.await?;
    let mut lat = Latencies::default();
    for _ in 0..rounds {
        let t = Instant::now();
        let (mut send, mut recv) = conn.open_bi().await?;
        send.write_all(b"x").await?;
        let mut b = [0u8; 1];
        recv.read_exact(&mut b).await?;
        lat.push(t.elapsed());
    }
    conn.close(0u32.into(), b"done");
    echo.abort();
    Ok(lat.percentile(50.0))
}

struct Path {
    name: &'static str,
    bulk: SocketAddr,
    echo: Option<SocketAddr>,
    /// The processes doing the relaying, whose CPU time is counted.
    relays: Relays,
}

enum Relays {
    /// Nothing relays: the kernel alone.
    None,
    /// This process (requester and sharer both run in it).
    This,
    Pids(Vec<u32>),
}

impl Relays {
    /// CPU seconds the relaying processes have used so far.
    fn cpu_seconds(&self) -> Option<f64> {
        match self {
            Relays::None => None,
            Relays::This => Some(crate::stats::cpu_seconds(None)),
            Relays::Pids(p) => Some(p.iter().map(|p| crate::stats::cpu_seconds(Some(*p))).sum()),
        }
    }
}

fn ss_key() -> String {
    // 32 bytes, base64: the 2022 ciphers take the key itself as password.
    "Zm9vYmFyYmF6cXV4Zm9vYmFyYmF6cXV4Zm9vYmFyYmE=".into()
}

/// Starts ssserver + sslocal tunnels to `targets`; returns the local ports.
async fn shadowsocks(targets: &[SocketAddr]) -> anyhow::Result<(Vec<Proc>, Vec<SocketAddr>)> {
    let method = "2022-blake3-aes-256-gcm";
    let server_port = free_port()?;
    let (server, key) = (format!("127.0.0.1:{server_port}"), ss_key());
    let mut procs = vec![Proc::quiet(
        "ssserver",
        &["-s", &server, "-m", method, "-k", &key],
    )?];
    let mut locals = vec![];
    for t in targets {
        let local = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let (l, f) = (local.to_string(), t.to_string());
        procs.push(Proc::quiet(
            "sslocal",
            &[
                "-b",
                &l,
                "--protocol",
                "tunnel",
                "-f",
                &f,
                "-s",
                &server,
                "-m",
                method,
                "-k",
                &key,
            ],
        )?);
        locals.push(local);
    }
    // Wait until every local port accepts.
    for l in &locals {
        let mut up = false;
        for _ in 0..100 {
            if TcpStream::connect(l).await.is_ok() {
                up = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::ensure!(up, "sslocal on {l} did not start");
    }
    Ok((procs, locals))
}

pub async fn run(o: &RelayBenchOptions) -> anyhow::Result<serde_json::Value> {
    let use_iperf = installed("iperf3");
    let use_ss = installed("ssserver") && installed("sslocal");
    let tool = if use_iperf {
        "iperf3"
    } else {
        "built-in sender"
    };
    eprintln!("bench relay: {tool}, {} s per run", o.seconds);
    let (sink_addr, received) = sink().await?;
    let echo_addr = echo().await?;
    let _iperf_server = if use_iperf {
        let p = free_port()?;
        let server = Proc::quiet("iperf3", &["-s", "-B", "127.0.0.1", "-p", &p.to_string()])?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        Some((server, SocketAddr::from(([127, 0, 0, 1], p))))
    } else {
        None
    };
    let bulk_target = _iperf_server.as_ref().map_or(sink_addr, |(_, a)| *a);

    // bandshare: one sharer allowed to reach the targets, a requester with forwards.
    let rule = |a: SocketAddr| -> anyhow::Result<EgressRule> {
        Ok(format!("{}/32:{}", a.ip(), a.port()).parse()?)
    };
    let spec = SharerSpec::new("bench", 5.0, 0.0)
        .allow(rule(bulk_target)?)
        .allow(rule(echo_addr)?);
    // A bulk run moves many GiB; the default 1 GiB ticket quota would end it.
    let config = Config {
        quota_bytes: 1 << 50,
        ..Config::default()
    };
    let cluster = Cluster::start_with(config, vec![spec]).await?;
    let mut ro = cluster.requester_options();
    ro.pool_size = 1;
    ro.lanes = o.lanes;
    ro.forwards = vec![
        format!("127.0.0.1:0={bulk_target}").parse()?,
        format!("127.0.0.1:0={echo_addr}").parse()?,
    ];
    let requester = cluster.requester(ro).await?;
    let fwd = &requester.requester.forward_addrs;
    anyhow::ensure!(
        fwd.len() == 2 && requester.active().is_some(),
        "requester did not connect to the sharer"
    );
    let pool = requester.requester.pool.clone();
    let lanes_up = bandshare_local::wait_until(Duration::from_secs(5), || {
        pool.active().is_some_and(|m| m.tunnel.lanes() == o.lanes)
    })
    .await;
    anyhow::ensure!(lanes_up, "the tunnel did not open its {} lanes", o.lanes);
    eprintln!(
        "  bandshare: one tunnel to the sharer, {} connection(s) (--lanes {})",
        o.lanes + 1,
        o.lanes
    );

    let mut paths = vec![
        Path {
            name: "direct",
            bulk: bulk_target,
            echo: Some(echo_addr),
            relays: Relays::None,
        },
        Path {
            name: "bandshare",
            bulk: fwd[0],
            echo: Some(fwd[1]),
            // With the built-in sender this process also sends and sinks.
            relays: if use_iperf {
                Relays::This
            } else {
                Relays::None
            },
        },
    ];
    let _ss = if use_ss {
        let (procs, locals) = shadowsocks(&[bulk_target, echo_addr]).await?;
        paths.push(Path {
            name: "shadowsocks",
            bulk: locals[0],
            echo: Some(locals[1]),
            relays: Relays::Pids(procs.iter().map(|p| p.0.id()).collect()),
        });
        Some(procs)
    } else {
        eprintln!(
            "  ssserver/sslocal not installed: no shadowsocks reference (cargo install shadowsocks-rust)"
        );
        None
    };

    let mut results = serde_json::Map::new();
    for p in &paths {
        let mut r = json!({});
        for streams in [1usize, 4] {
            let cpu0 = p.relays.cpu_seconds();
            let (gbit, secs) = if use_iperf {
                // iperf3 runs whole seconds.
                let gbit = send_iperf(p.bulk, streams, o.seconds).await?;
                (gbit, o.seconds.ceil())
            } else {
                let gbit = send_builtin(p.bulk, streams, o.seconds, &received).await?;
                (gbit, o.seconds)
            };
            let gb = gbit * secs / 8.0;
            let cpu = match (cpu0, p.relays.cpu_seconds()) {
                (Some(a), Some(b)) if gb > 0.0 => Some((b - a) / gb),
                _ => None,
            };
            let cpu_text = cpu.map_or(String::new(), |c| format!(", {c:.2} CPU s per GB relayed"));
            eprintln!(
                "  {:<12} {streams} stream(s): {gbit:.2} Gbit/s{cpu_text}",
                p.name
            );
            r[format!("gbit_s_{streams}")] = json!((gbit * 1000.0).round() / 1000.0);
            if let Some(c) = cpu {
                r[format!("cpu_s_per_gb_{streams}")] = json!((c * 1000.0).round() / 1000.0);
            }
        }
        if let Some(e) = p.echo {
            let us = first_byte(e, o.first_byte_rounds).await?;
            eprintln!(
                "  {:<12} first byte of a new flow: {us} µs (median of {})",
                p.name, o.first_byte_rounds
            );
            r["first_byte_us"] = json!(us);
        }
        results.insert(p.name.to_string(), r);
    }
    let get = |p: &str, k: &str| results.get(p).and_then(|v| v[k].as_f64()).unwrap_or(0.0);
    let ratio = |p: &str, k: &str| {
        let d = get("direct", k);
        if d > 0.0 {
            ((get(p, k) / d) * 1000.0).round() / 1000.0
        } else {
            0.0
        }
    };
    let mut v = json!({
        "tool": tool,
        "seconds": o.seconds,
        "lanes": o.lanes,
        "direct_gbit_s": get("direct", "gbit_s_1"),
        "relay_gbit_s": get("bandshare", "gbit_s_1"),
        "ratio": ratio("bandshare", "gbit_s_1"),
        "direct_gbit_s_4": get("direct", "gbit_s_4"),
        "relay_gbit_s_4": get("bandshare", "gbit_s_4"),
        "ratio_4": ratio("bandshare", "gbit_s_4"),
        "first_byte_direct_us": get("direct", "first_byte_us"),
        "first_byte_relay_us": get("bandshare", "first_byte_us"),
        "first_byte_added_us": get("bandshare", "first_byte_us") - get("direct", "first_byte_us"),
        "cpu_s_per_gb": results.get("bandshare").map(|v| v["cpu_s_per_gb_1"].clone()),
        "cpu_s_per_gb_4": results.get("bandshare").map(|v| v["cpu_s_per_gb_4"].clone()),
    });
    if use_ss {
        v["shadowsocks"] = json!({
            "method": "2022-blake3-aes-256-gcm",
            "gbit_s": get("shadowsocks", "gbit_s_1"),
            "ratio": ratio("shadowsocks", "gbit_s_1"),
            "gbit_s_4": get("shadowsocks", "gbit_s_4"),
            "ratio_4": ratio("shadowsocks", "gbit_s_4"),
            "first_byte_added_us": get("shadowsocks", "first_byte_us") - get("direct", "first_byte_us"),
            "cpu_s_per_gb": results.get("shadowsocks").map(|v| v["cpu_s_per_gb_1"].clone()),
            "cpu_s_per_gb_4": results.get("shadowsocks").map(|v| v["cpu_s_per_gb_4"].clone()),
        });
    }
    // Floors under a new flow's added latency on this machine: one plain
    // local TCP hop (a relay has one on each side), and a bare QUIC
    // stream's round trip (what the tunnel adds between them).
    let (hop, hop_task) = plain_hop(echo_addr).await?;
    let hop_us = first_byte(hop, o.first_byte_rounds).await?;
    hop_task.abort();
    let hop_added = hop_us as f64 - get("direct", "first_byte_us");
    let floor = quic_stream_floor(o.first_byte_rounds).await?;
    eprintln!(
        "  floors       one plain TCP hop adds {hop_added} µs; a new stream's round trip on a bare QUIC connection: {floor} µs (medians of {})",
        o.first_byte_rounds
    );
    v["plain_hop_added_us"] = json!(hop_added);
    v["quic_stream_rtt_us"] = json!(floor);
    // What path MTU discovery reached on the tunnel (loopback allows up to
    // the relay's bound): the size of the datagrams the runs above used.
    // Each connection of the tunnel (the first, then its lanes) on its own.
    if let Some(m) = requester.requester.pool.active() {
        let all: Vec<_> = std::iter::once(m.tunnel.stats())
            .chain(m.tunnel.lane_stats())
            .collect();
        for (i, st) in all.iter().enumerate() {
            let per = st.udp_tx.bytes / st.udp_tx.datagrams.max(1);
            let which = if i == 0 {
                "first connection".to_string()
            } else {
                format!("lane {i}")
            };
            eprintln!(
                "  bandshare tunnel, {which}: path MTU {} bytes now; {} MB sent in datagrams of {per} bytes on average; {} packets lost; {} black holes detected",
                st.path.current_mtu,
                st.udp_tx.bytes / 1_000_000,
                st.path.lost_packets,
                st.path.black_holes_detected
            );
        }
        let sum = |f: fn(&quinn::ConnectionStats) -> u64| all.iter().map(f).sum::<u64>();
        let per = sum(|s| s.udp_tx.bytes) / sum(|s| s.udp_tx.datagrams).max(1);
        v["path_mtu"] = json!(all.iter().map(|s| s.path.current_mtu).min());
        v["bytes_per_datagram"] = json!(per);
        v["lost_packets"] = json!(sum(|s| s.path.lost_packets));
        v["black_holes"] = json!(sum(|s| s.path.black_holes_detected));
    }
    requester.stop();
    Ok(v)
}
