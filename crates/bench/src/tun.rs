//! `bench tun`: whole-device mode against the proxy and against no
//! bandshare at all, across network namespaces (needs root).
//!
//! ```text
//!            internet 10.80.1.1 (HTTP /bytes/N, UDP echo :9999)
//!          /own0 10.80.9.0/24          \up0 10.80.10.0/24
//!   requester ---- lan 10.80.2.0/24 ---- coordinator + sharer
//! ```
//!
//! TCP: one download of N MB with curl from the requester's host — with no
//! bandshare (its own link), through the SOCKS5 proxy and the sharer, and
//! through the TUN device and the sharer (curl with no proxy setting). UDP:
//! echo round trips from a plain UDP client, with no bandshare and through
//! the TUN device and the sharer: the RTT the sharer path adds, and how many
//! round trips a second one client gets.

use bandshare_local::HttpTarget;
use bandshare_local::netns::{Lab, unavailable, wait};
use serde_json::json;
use std::time::Duration;

pub struct TunOptions {
    /// Megabytes per download.
    pub mbytes: u64,
    /// UDP echo round trips per path.
    pub udp_rounds: usize,
}

const INET: &str = "10.80.1.1";
const HTTP_PORT: u16 = 8080;
const UDP_PORT: u16 = 9999;
const LAN_SHARER: &str = "10.80.2.1";
const AT: &str = "59.9139,10.7522";

/// Times `rounds` UDP echo round trips from `ns` to the echo server and
/// prints `p50_us mean_us lost`.
const UDP_CLIENT: &str = r#"
import socket, sys, time
n = int(sys.argv[1])
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.settimeout(1)
rtts, lost = [], 0
for i in range(n):
    t = time.perf_counter()
    u.sendto(b"x" * 64, (sys.argv[2], int(sys.argv[3])))
    try:
        u.recvfrom(2048)
        rtts.append((time.perf_counter() - t) * 1e6)
    except socket.timeout:
        lost += 1
rtts.sort()
p50 = rtts[len(rtts) // 2] if rtts else -1
mean = sum(rtts) / len(rtts) if rtts else -1
print(f"{p50:.1f} {mean:.1f} {lost}")
"#;

struct Net {
    lab: Lab,
    inet: String,
    share: String,
    req: String,
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn build() -> anyhow::Result<Net> {
    let mut lab = Lab::new().map_err(anyhow::Error::msg)?;
    let inet = lab.host("inet")?;
    let share = lab.host("share")?;
    let req = lab.host("req")?;
    lab.ip_in(&inet, &["addr", "add", &format!("{INET}/32"), "dev", "lo"])?;
    let fwd = lab
        .command(&inet, "sysctl")
        .args(["-qw", "net.ipv4.ip_forward=1"])
        .status()?;
    anyhow::ensure!(fwd.success(), "cannot enable forwarding");
    lab.wire(
        (&inet, "r0", "10.80.9.1/24"),
        (&req, "own0", "10.80.9.2/24"),
    )?;
    lab.ip_in(&req, &["route", "add", "default", "via", "10.80.9.1"])?;
    lab.wire(
        (&inet, "u0", "10.80.10.1/24"),
        (&share, "up0", "10.80.10.2/24"),
    )?;
    lab.ip_in(&share, &["route", "add", "default", "via", "10.80.10.1"])?;
    lab.wire(
        (&share, "lan0", &format!("{LAN_SHARER}/24")),
        (&req, "lan0", "10.80.2.100/24"),
    )?;
    Ok(Net {
        lab,
        inet,
        share,
        req,
    })
}

impl Net {
    /// Download speed from the requester's host, bytes/s.
    fn download(&self, mbytes: u64, socks: bool) -> anyhow::Result<f64> {
        let url = format!("http://{INET}:{HTTP_PORT}/bytes/{}", mbytes << 20);
        let mut c = self.lab.command(&self.req, "curl");
        c.args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{speed_download}",
            "--max-time",
            "120",
        ]);
        if socks {
            c.args(["--socks5-hostname", "127.0.0.1:1080"]);
        }
        let out = c.arg(&url).output()?;
        anyhow::ensure!(
            out.status.success(),
            "curl failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
    }

    /// (p50 µs, mean µs, lost) of UDP echo round trips.
    fn udp(&self, rounds: usize) -> anyhow::Result<(f64, f64, u64)> {
        let out = self
            .lab
            .command(&self.req, "python3")
            .args([
                "-c",
                UDP_CLIENT,
                &rounds.to_string(),
                INET,
                &UDP_PORT.to_string(),
            ])
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let v: Vec<f64> = text
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        match v[..] {
            [p50, mean, lost] => Ok((p50, mean, lost as u64)),
            _ => anyhow::bail!(
                "the UDP client said {text:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            ),
        }
    }

    fn status(&self) -> Option<serde_json::Value> {
        self.lab.json(&self.req, "http://127.0.0.1:7700/status")
    }

    /// Starts a requester with `extra` flags; waits until a sharer is in
    /// its pool. Returns its index.
    fn requester(&mut self, name: &str, extra: &[&str]) -> anyhow::Result<usize> {
        let exe = std::env::current_exe()?.display().to_string();
        let data = self.lab.dir.path().join(name).display().to_string();
        let mut args = strings(&[
            "connect",
            "--server",
            &format!("http://{LAN_SHARER}:7400"),
            "--at",
            AT,
            "--via",
            "pool",
            "--pool",
            "1",
            "--socks",
            "127.0.0.1:1080",
            "--control",
            "127.0.0.1:7700",
            "--data",
            &data,
        ]);
        args.extend(strings(extra));
        let req = self.req.clone();
        let i = self.lab.spawn(&req, name, &exe, &args)?;
        let ready = wait(Duration::from_secs(30), || {
            self.status().is_some_and(|s| s["active"].is_string())
        });
        anyhow::ensure!(
            ready,
            "the requester never filled its pool\n{}",
            self.lab.log_tails(20)
        );
        Ok(i)
    }

    /// SIGTERM, so a TUN requester removes its routes, then waits.
    fn stop(&mut self, i: usize) {
        self.lab.proc(i).terminate(Duration::from_secs(10));
    }
}

/// The coordinator and one sharer in the sharers' host; waits until the
/// sharer is online.
fn start_sharer(net: &mut Net) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?.display().to_string();
    let dir = |n: &str| net.lab.dir.path().join(n).display().to_string();
    let (dc, ds) = (dir("coord"), dir("sharer"));
    let share = net.share.clone();
    let token = net.lab.http_token_file()?;
    net.lab.spawn(
        &share,
        "coordinator",
        &exe,
        &strings(&[
            "server",
            "--listen",
            &format!("{LAN_SHARER}:7400"),
            "--http",
            &format!("{LAN_SHARER}:7480"),
            "--http-token-file",
            &token,
            "--data",
            &dc,
        ]),
    )?;
    net.lab.spawn(
        &share,
        "sharer",
        &exe,
        &strings(&[
            "share",
            "--server",
            &format!("http://{LAN_SHARER}:7400"),
            "--name",
            "s0",
            "--at",
            AT,
            "--relay",
            &format!("{LAN_SHARER}:7500"),
            "--allow-egress",
            "10.80.1.0/24",
            "--data",
            &ds,
        ]),
    )?;
    let online = wait(Duration::from_secs(30), || {
        net.lab
            .json(&net.share, &format!("http://{LAN_SHARER}:7480/status"))
            .is_some_and(|v| v["online_sharers"] == 1)
    });
    anyhow::ensure!(
        online,
        "the sharer never came online\n{}",
        net.lab.log_tails(20)
    );

    Ok(())
}

pub async fn run(o: &TunOptions) -> anyhow::Result<serde_json::Value> {
    if let Some(why) = unavailable() {
        eprintln!("bench tun: skipped: {why}");
        return Ok(json!({ "bench": "tun", "skipped": why, "machine": crate::stats::machine() }));
    }
    for tool in ["curl", "python3"] {
        if !crate::stats::have(tool) {
            eprintln!("bench tun: skipped: {tool} is not installed");
            return Ok(json!({
                "bench": "tun",
                "skipped": format!("{tool} missing"),
                "machine": crate::stats::machine(),
            }));
        }
    }
    eprintln!(
        "bench tun: {} MB downloads and {} UDP round trips per path, across namespaces",
        o.mbytes, o.udp_rounds
    );
    let mut net = build()?;
    let http = HttpTarget::serve_std(
        net.lab
            .bind_tcp(&net.inet, format!("{INET}:{HTTP_PORT}").parse()?)?,
    )?;
    let echo = tokio::net::UdpSocket::from_std(
        net.lab
            .bind_udp(&net.inet, format!("{INET}:{UDP_PORT}").parse()?)?,
    )?;
    let echo_task = tokio::spawn(async move {
        let mut buf = vec![0u8; 2048];
        while let Ok((n, from)) = echo.recv_from(&mut buf).await {
            let _ = echo.send_to(&buf[..n], from).await;
        }
    });
    start_sharer(&mut net)?;

    // Without bandshare: the own link.
    let direct = net.download(o.mbytes, false)?;
    let udp_direct = net.udp(o.udp_rounds)?;
    // The proxy: SOCKS5 through the sharer.
    let r = net.requester("socks", &[])?;
    let socks = net.download(o.mbytes, true)?;
    net.stop(r);
    // Whole-device mode: no proxy setting, through the TUN device and the sharer.
    let r = net.requester("tun", &["--tun", "bsb0"])?;
    let tun = net.download(o.mbytes, false)?;
    let udp_tun = net.udp(o.udp_rounds)?;
    net.stop(r);
    echo_task.abort();
    drop(http);

    let mbps = |b: f64| b * 8.0 / 1e6;
    eprintln!(
        "  TCP  direct {:.0} Mbit/s   SOCKS via sharer {:.0} Mbit/s   TUN via sharer {:.0} Mbit/s   TUN/SOCKS {:.2} (target >= 0.8)",
        mbps(direct),
        mbps(socks),
        mbps(tun),
        tun / socks
    );
    eprintln!(
        "  UDP  direct p50 {:.0} us   TUN via sharer p50 {:.0} us   added {:.0} us (target <= 200 on loopback; here veths)   lost {}+{}",
        udp_direct.0,
        udp_tun.0,
        udp_tun.0 - udp_direct.0,
        udp_direct.2,
        udp_tun.2
    );
    Ok(json!({
        "bench": "tun",
        "machine": crate::stats::machine(),
        "mbytes": o.mbytes,
        "tcp_direct_mbit_s": mbps(direct),
        "tcp_socks_mbit_s": mbps(socks),
        "tcp_tun_mbit_s": mbps(tun),
        "tun_over_socks": tun / socks,
        "udp_rounds": o.udp_rounds,
        "udp_direct_p50_us": udp_direct.0,
        "udp_direct_mean_us": udp_direct.1,
        "udp_tun_p50_us": udp_tun.0,
        "udp_tun_mean_us": udp_tun.1,
        "udp_added_p50_us": udp_tun.0 - udp_direct.0,
        "udp_round_trips_per_s_tun": if udp_tun.1 > 0.0 { 1e6 / udp_tun.1 } else { 0.0 },
        "udp_lost": udp_direct.2 + udp_tun.2,
    }))
}
