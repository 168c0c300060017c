//! The own link first, across real network namespaces: a requester whose
//! own uplink reaches the internet host, with one sharer beside it on a LAN.
//!
//! ```text
//!          coordinator 10.79.3.2 (gRPC :7400, HTTP :7480)
//!                          |
//!                 internet 10.79.1.1 (HTTP :8080; routes between its links)
//!               /own0 10.79.9.0/24            \up0 10.79.10.0/24
//!   requester 10.79.9.2                  sharer s0 10.79.10.2
//!               \lan0                         /lan0
//!   ----------------- LAN bridge 10.79.2.0/24 --------------------------
//! ```
//!
//! The coordinator is on the internet side: with its own link cut, the
//! requester reaches it only through the sharer.
//!
//! With `connect --via auto` new flows leave by the own link (the web
//! server sees 10.79.9.2) while it is healthy; when its packets silently
//! vanish (an nftables drop, the interface stays up) they move to the
//! sharer (the server sees 10.79.10.2) within a second or so, and they come
//! back after the hold time once the drop is lifted. Skips, saying why,
//! where namespaces cannot be made or nft is missing.

use bandshare_testkit::HttpTarget;
use bandshare_testkit::netns::{Lab, wait};
use serde_json::Value;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_bandshare");
const INTERNET: &str = "10.79.1.1";
const HTTP_PORT: u16 = 8080;
const COORD: &str = "10.79.3.2";
const OWN: &str = "10.79.9.2";
const INTERNET6: &str = "fd79:1::1";
const OWN6: &str = "fd79:9::2";
const SHARER_UPLINK: &str = "10.79.10.2";

/// The uplink address of sharer `k`.
fn uplink(k: usize) -> String {
    format!("10.79.{}.2", 10 + k)
}
const AT: &str = "39.9042,116.4074";

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

struct World {
    lab: Lab,
    /// The requester's process, for [`Lab::proc`].
    requester: usize,
    /// Each sharer's process.
    sharer_procs: Vec<usize>,
    req: String,
    coord: String,
    inet: String,
    _http: HttpTarget,
    /// The same page on IPv6, when the kernel has it.
    _http6: Option<HttpTarget>,
    _rt: tokio::runtime::Runtime,
}

impl World {
    fn build(sharers: usize, extra: &[&str]) -> anyhow::Result<World> {
        let mut lab = Lab::new().map_err(anyhow::Error::msg)?;
        let inet = lab.host("inet")?;
        let lan = lab.host("lan")?;
        let coord = lab.host("coord")?;
        let req = lab.host("req")?;
        let hosts: Vec<String> = (0..sharers)
            .map(|k| lab.host(&format!("s{k}")))
            .collect::<anyhow::Result<_>>()?;
        lab.ip_in(
            &inet,
            &["addr", "add", &format!("{INTERNET}/32"), "dev", "lo"],
        )?;
        // The internet routes between its links (the coordinator sits
        // behind it, like any server).
        let fwd = lab
            .command(&inet, "sysctl")
            .args(["-qw", "net.ipv4.ip_forward=1"])
            .status()?;
        anyhow::ensure!(
            fwd.success(),
            "cannot enable forwarding in the internet host"
        );
        lab.wire(
            (&inet, "c0", "10.79.3.1/24"),
            (&coord, "up0", &format!("{COORD}/24")),
        )?;
        lab.ip_in(&coord, &["route", "add", "default", "via", "10.79.3.1"])?;
        // The requester's own uplink, its default route.
        lab.wire(
            (&inet, "r0", "10.79.9.1/24"),
            (&req, "own0", &format!("{OWN}/24")),
        )?;
        lab.ip_in(&req, &["route", "add", "default", "via", "10.79.9.1"])?;
        // Each sharer's uplink: 10.79.1{k}.0/24.
        for (k, s) in hosts.iter().enumerate() {
            lab.wire(
                (&inet, &format!("u{k}"), &format!("10.79.{}.1/24", 10 + k)),
                (s, "up0", &format!("{}/24", uplink(k))),
            )?;
            lab.ip_in(
                s,
                &[
                    "route",
                    "add",
                    "default",
                    "via",
                    &format!("10.79.{}.1", 10 + k),
                ],
            )?;
        }
        lab.ip_in(&lan, &["link", "add", "br0", "type", "bridge"])?;
        lab.ip_in(&lan, &["link", "set", "br0", "up"])?;
        let on_lan = hosts
            .iter()
            .enumerate()
            .map(|(k, s)| (s, format!("10.79.2.{}/24", 11 + k)))
            .chain([(&req, "10.79.2.100/24".to_string())]);
        for (i, (host, addr)) in on_lan.enumerate() {
            let port = format!("p{i}");
            lab.wire((host, "lan0", &addr), (&lan, &port, ""))?;
            lab.ip_in(&lan, &["link", "set", &port, "master", "br0"])?;
        }
        // IPv6 on the own link too, where the kernel has it.
        let v6 = [
            lab.ip_in(
                &inet,
                &["-6", "addr", "add", "fd79:9::1/64", "dev", "r0", "nodad"],
            ),
            lab.ip_in(
                &inet,
                &[
                    "-6",
                    "addr",
                    "add",
                    &format!("{INTERNET6}/128"),
                    "dev",
                    "lo",
                ],
            ),
            lab.ip_in(
                &req,
                &[
                    "-6",
                    "addr",
                    "add",
                    &format!("{OWN6}/64"),
                    "dev",
                    "own0",
                    "nodad",
                ],
            ),
            lab.ip_in(&req, &["-6", "route", "add", "default", "via", "fd79:9::1"]),
        ]
        .iter()
        .all(Result::is_ok);
        let listener6 = v6
            .then(|| {
                lab.bind_tcp(
                    &inet,
                    SocketAddr::new(INTERNET6.parse().expect("ip"), HTTP_PORT),
                )
                .ok()
            })
            .flatten();
        let listener = lab.bind_tcp(
            &inet,
            SocketAddr::new(INTERNET.parse().expect("ip"), HTTP_PORT),
        )?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let (http, http6) = {
            let _in = rt.enter();
            (
                HttpTarget::serve_std(listener)?,
                listener6.map(HttpTarget::serve_std).transpose()?,
            )
        };
        let root = lab.dir.path().to_path_buf();
        let data = |n: &str| root.join(n).display().to_string();
        let (dc, dr) = (data("coord"), data("req"));
        lab.spawn(
            &coord,
            "coordinator",
            BIN,
            &strings(&[
                "server",
                "--listen",
                &format!("{COORD}:7400"),
                "--http",
                &format!("{COORD}:7480"),
                "--http-token-file",
                &lab.http_token_file()?,
                "--data",
                &dc,
            ]),
        )?;
        let mut sharer_procs = vec![];
        for (k, host) in hosts.iter().enumerate() {
            let name = format!("s{k}");
            let ds = data(&name);
            sharer_procs.push(lab.spawn(
                host,
                &name,
                BIN,
                &strings(&[
                    "share",
                    "--server",
                    &format!("http://{COORD}:7400"),
                    "--name",
                    &name,
                    "--at",
                    AT,
                    "--relay",
                    &format!("10.79.2.{}:7500", 11 + k),
                    "--allow-egress",
                    "10.79.1.0/24",
                    // The coordinator, on the "internet" (a private range
                    // here; a public coordinator needs no rule).
                    "--allow-egress",
                    "10.79.3.2/32:7400",
                    "--data",
                    &ds,
                ]),
            )?);
        }
        let w = World {
            requester: 0,
            sharer_procs,
            req: req.clone(),
            coord: coord.clone(),
            inet: inet.clone(),
            _http: http,
            _http6: http6,
            _rt: rt,
            lab,
        };
        // The requester starts once the sharer is online (its first share
        // request fills the standby).
        let online = wait(Duration::from_secs(30), || {
            w.json(&coord, &format!("http://{COORD}:7480/status"))
                .is_some_and(|v| v["online_sharers"] == sharers)
        });
        anyhow::ensure!(
            online,
            "the sharer never came online\n{}",
            w.lab.log_tails(20)
        );
        let mut w = w;
        let req_ns = w.req.clone();
        let mut args = strings(&[
            "connect",
            "--server",
            &format!("http://{COORD}:7400"),
            "--at",
            AT,
            "--via",
            "auto",
            "--pool",
            "2",
            "--standby",
            "1",
            "--probe",
            &format!("{INTERNET}:{HTTP_PORT}"),
            "--probe",
            "gateway",
            "--direct-hold",
            "2",
            "--socks",
            "127.0.0.1:1080",
            "--control",
            "127.0.0.1:7700",
            "--data",
            &dr,
        ]);
        args.extend(strings(extra));
        w.requester = w.lab.spawn(&req_ns, "requester", BIN, &args)?;
        Ok(w)
    }

    fn curl(&self, ns: &str, args: &[&str]) -> std::process::Output {
        self.lab.curl(ns, args)
    }

    fn json(&self, ns: &str, url: &str) -> Option<Value> {
        self.lab.json(ns, url)
    }

    fn share_requests(&self) -> u64 {
        self.json(&self.coord, &format!("http://{COORD}:7480/status"))
            .and_then(|v| v["share_requests"].as_u64())
            .unwrap_or(0)
    }

    fn status(&self) -> Option<Value> {
        self.json(&self.req, "http://127.0.0.1:7700/status")
    }

    /// Which address the web server saw for one fetch through the proxy.
    fn seen_from(&self, path: &str) -> Result<String, String> {
        let url = format!("http://{INTERNET}:{HTTP_PORT}{path}");
        let out = self.curl(&self.req, &["--socks5-hostname", "127.0.0.1:1080", &url]);
        let body = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        body.split("<p>from ")
            .nth(1)
            .and_then(|r| r.split('<').next())
            .map(String::from)
            .ok_or(body)
    }

    fn nft(&self, rules: &str) -> Result<(), String> {
        self.nft_in(&self.req, rules)
    }

    fn nft_in(&self, ns: &str, rules: &str) -> Result<(), String> {
        let o = self
            .lab
            .command(ns, "nft")
            .arg(rules)
            .output()
            .map_err(|e| e.to_string())?;
        if o.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&o.stderr).into_owned())
        }
    }
}

fn which(p: &str) -> bool {
    std::process::Command::new("sh")
        .args(["-c", &format!("command -v {p}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn own_link_first_then_sharers_when_it_is_cut_and_back_after_the_hold() {
    if let Some(why) = bandshare_testkit::netns::unavailable() {
        eprintln!("SKIP: {why}");
        return;
    }
    if !which("nft") {
        eprintln!("SKIP: nft is not installed (a silent cut needs an nftables drop)");
        return;
    }
    let w = World::build(1, &[]).expect("topology");
    // Healthy own link: the standby is warm, new flows go direct.
    let ready = wait(Duration::from_secs(30), || {
        w.status().is_some_and(|s| {
            s["path"] == "direct"
                && s["own_link"]["state"] == "healthy"
                && s["pool"].as_array().is_some_and(|p| p.len() == 1)
        })
    });
    assert!(ready, "{:?}\n{}", w.status(), w.lab.log_tails(20));
    assert_eq!(
        w.seen_from("/direct").as_deref(),
        Ok(OWN),
        "direct while healthy"
    );
    let s = w.status().expect("status");
    assert!(s["own_link"]["rtt_ms"].as_f64().is_some(), "{s}");
    // `--probe gateway` found the own link's gateway (it refuses TCP 53:
    // an answer), and the coordinator is probed, being reached that way.
    assert_eq!(
        s["own_link"]["probes"],
        serde_json::json!([
            format!("{INTERNET}:{HTTP_PORT}"),
            "10.79.9.1:53",
            format!("{COORD}:7400")
        ]),
        "{s}"
    );
    assert_eq!(s["pool"][0]["flows"], 0, "the standby carried nothing: {s}");

    // Packets on the own link vanish; the interface stays up.
    w.nft("table inet bscut { chain out { type filter hook output priority 0; oifname \"own0\" drop; }; }")
        .expect("nft drop");
    let cut = Instant::now();
    let moved = wait(Duration::from_secs(5), || {
        w.status().is_some_and(|s| s["path"] == "pool")
    });
    let took = cut.elapsed();
    assert!(moved, "new flows never moved to the pool: {:?}", w.status());
    eprintln!("own link cut: path moved to the pool after {took:?}");
    assert!(took < Duration::from_millis(1500), "took {took:?}");
    assert_eq!(
        w.seen_from("/cut").as_deref(),
        Ok(SHARER_UPLINK),
        "through the sharer"
    );
    // Degraded: the pool fills to --pool (only one sharer exists, so it
    // stays at one member, and the maintainer keeps asking).
    let s = w.status().expect("status");
    assert_eq!(s["own_link"]["state"], "degraded", "{s}");
    assert!(s["pool"][0]["flows"].as_u64().unwrap_or(0) >= 1, "{s}");
    // The own link is down, yet the requester still asks for sharers (it
    // wants two and has one): its share requests go through the sharer.
    let before = w.share_requests();
    let asked = wait(Duration::from_secs(10), || w.share_requests() > before);
    assert!(
        asked,
        "no share request reached the coordinator while cut\n{}",
        w.lab.log_tails(15)
    );

    // Restored: back to direct only after the 2 s hold.
    w.nft("delete table inet bscut").expect("nft restore");
    let restored = Instant::now();
    let back = wait(Duration::from_secs(10), || {
        w.status().is_some_and(|s| s["path"] == "direct")
    });
    let took = restored.elapsed();
    assert!(back, "never returned to direct: {:?}", w.status());
    eprintln!("own link restored: back to direct after {took:?}");
    assert!(
        took >= Duration::from_secs(2),
        "returned before the hold: {took:?}"
    );
    assert_eq!(w.seen_from("/back").as_deref(), Ok(OWN));
}

/// Shapes the own link to `rate` (a tc rate, e.g. `16kbit`) both ways, or
/// lifts the shaping (`None`).
fn shape(w: &World, rate: Option<&str>) {
    for (ns, dev) in [(&w.req, "own0"), (&w.inet, "r0")] {
        let mut c = w.lab.command(ns, "tc");
        match rate {
            Some(r) => c.args([
                "qdisc", "replace", "dev", dev, "root", "tbf", "rate", r, "burst", "3200",
                "latency", "1s",
            ]),
            None => c.args(["qdisc", "del", "dev", dev, "root"]),
        };
        let st = c.status().expect("tc");
        assert!(st.success(), "tc on {dev}: {st}");
    }
}

#[test]
fn a_rate_limited_own_link_that_answers_probes_gets_no_flows_until_a_trial_passes() {
    if let Some(why) = bandshare_testkit::netns::unavailable() {
        eprintln!("SKIP: {why}");
        return;
    }
    if !which("nft") || !which("tc") {
        eprintln!("SKIP: nft or tc is not installed (a silent cut, then a rate limit)");
        return;
    }
    let w = World::build(1, &[]).expect("topology");
    let ready = wait(Duration::from_secs(30), || {
        w.status().is_some_and(|s| {
            s["path"] == "direct"
                && s["own_link"]["state"] == "healthy"
                && s["pool"].as_array().is_some_and(|p| p.len() == 1)
        })
    });
    assert!(ready, "{:?}\n{}", w.status(), w.lab.log_tails(20));
    let s = w.status().expect("status");
    assert_eq!(
        s["own_link"]["trials"], true,
        "the coordinator is reached over the own link: {s}"
    );
    // Cut: new flows move to the sharer.
    w.nft("table inet bscut { chain out { type filter hook output priority 0; oifname \"own0\" drop; }; }")
        .expect("nft drop");
    let moved = wait(Duration::from_secs(5), || {
        w.status().is_some_and(|s| s["path"] == "pool")
    });
    assert!(moved, "never moved to the pool: {:?}", w.status());
    // Back, but at 16 kbit/s: every probe (a TCP connect) is answered, as
    // on a cell at the edge of coverage, yet 16 KiB takes 8 s.
    shape(&w, Some("16kbit"));
    w.nft("delete table inet bscut").expect("nft restore");
    let lifted = Instant::now();
    let tried = wait(Duration::from_secs(10), || {
        w.status().is_some_and(|s| {
            s["own_link"]["last_trial"]
                .as_str()
                .is_some_and(|t| t.starts_with("failed"))
        })
    });
    let s = w.status().expect("status");
    assert!(
        tried,
        "no failed trial within 10 s of the hold: {s}\n{}",
        w.lab.log_tails(15)
    );
    eprintln!(
        "rate-limited own link: {} after {:?}",
        s["own_link"]["last_trial"],
        lifted.elapsed()
    );
    assert!(
        s["own_link"]["rtt_ms"].as_f64().is_some(),
        "the probes are answered: {s}"
    );
    // Well past the 2 s hold, new flows are still on the pool.
    std::thread::sleep(Duration::from_secs(4));
    let s = w.status().expect("status");
    assert_eq!(s["path"], "pool", "back on a 16 kbit/s link: {s}");
    assert_eq!(s["own_link"]["state"], "degraded", "{s}");
    assert_eq!(
        w.seen_from("/slow").as_deref(),
        Ok(SHARER_UPLINK),
        "through the sharer"
    );
    // The limit lifted: the next trial passes and new flows go direct.
    shape(&w, None);
    let fast = Instant::now();
    let back = wait(Duration::from_secs(15), || {
        w.status().is_some_and(|s| s["path"] == "direct")
    });
    let s = w.status().expect("status");
    assert!(
        back,
        "never returned to direct: {s}\n{}",
        w.lab.log_tails(15)
    );
    eprintln!(
        "limit lifted: back to direct after {:?}, {}",
        fast.elapsed(),
        s["own_link"]["last_trial"]
    );
    assert!(
        s["own_link"]["last_trial"]
            .as_str()
            .is_some_and(|t| t.starts_with("passed")),
        "{s}"
    );
    assert_eq!(w.seen_from("/fast").as_deref(), Ok(OWN));
    let run = &s["own_link"]["trials_run"];
    assert!(
        run[0].as_u64() >= Some(1) && run[1].as_u64() >= Some(1),
        "passed, failed: {run}"
    );
}

/// Sends 16 KiB every 50 ms for at most 8 s through the SOCKS5 proxy
/// (argv: proxy port, target address, target port).
const SLOW_SENDER: &str = r#"
import socket, struct, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5)
s.sendall(b"\x05\x01\x00"); s.recv(2)
ip = socket.inet_aton(sys.argv[2])
s.sendall(b"\x05\x01\x00\x01" + ip + struct.pack(">H", int(sys.argv[3])))
r = s.recv(10)
assert r[1] == 0, r
s.setblocking(False)
end = time.time() + 8
while time.time() < end:
    try:
        s.send(b"x" * 16384)
    except BlockingIOError:
        pass
    time.sleep(0.05)
"#;

#[test]
fn a_stalled_direct_flow_moves_new_flows_to_the_pool() {
    if let Some(why) = bandshare_testkit::netns::unavailable() {
        eprintln!("SKIP: {why}");
        return;
    }
    for tool in ["nft", "python3"] {
        if !which(tool) {
            eprintln!("SKIP: {tool} is not installed");
            return;
        }
    }
    let w = World::build(1, &[]).expect("topology");
    let ready = wait(Duration::from_secs(30), || {
        w.status()
            .is_some_and(|s| s["path"] == "direct" && s["own_link"]["state"] == "healthy")
    });
    assert!(ready, "{:?}\n{}", w.status(), w.lab.log_tails(20));
    // A sink on the internet that counts what arrives.
    let sink_at: SocketAddr = format!("{INTERNET}:9000").parse().expect("addr");
    let sink = w.lab.bind_tcp(&w.inet, sink_at).expect("sink");
    sink.set_nonblocking(false).expect("blocking sink");
    let got = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counted = got.clone();
    std::thread::spawn(move || {
        use std::io::Read;
        if let Ok((mut c, _)) = sink.accept() {
            let mut buf = [0u8; 65536];
            while let Ok(n) = c.read(&mut buf) {
                if n == 0 {
                    break;
                }
                counted.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
            }
        }
    });
    let mut sender = w
        .lab
        .command(&w.req, "python3")
        .args(["-c", SLOW_SENDER, "1080", INTERNET, "9000"])
        .spawn()
        .expect("sender");
    let flowing = wait(Duration::from_secs(5), || {
        got.load(std::sync::atomic::Ordering::Relaxed) >= 32 * 1024
    });
    assert!(flowing, "the upload never started: {:?}", w.status());
    let before = w.status().expect("status");
    assert_eq!(before["own_link"]["state"], "healthy", "{before}");
    // Only this flow's packets vanish, on the far side (the requester's
    // kernel retransmits); every probe target still answers.
    w.nft_in(&w.inet, "table inet bsstall { chain input { type filter hook input priority 0; tcp dport 9000 drop; }; }")
        .expect("nft drop");
    let stalled = Instant::now();
    let moved = wait(Duration::from_secs(3), || {
        w.status().is_some_and(|s| s["path"] == "pool")
    });
    let took = stalled.elapsed();
    let _ = sender.kill();
    let _ = sender.wait();
    assert!(
        moved,
        "a stalled flow did not move new flows: {:?}\n{}",
        w.status(),
        w.lab.log_tails(10)
    );
    eprintln!("direct flow stalled: new flows moved to the pool after {took:?}");
    assert_eq!(w.seen_from("/stall").as_deref(), Ok(SHARER_UPLINK));
    let s = w.status().expect("status");
    assert!(s["own_link"]["failed"].as_u64().unwrap_or(0) >= 1, "{s}");
    w.nft_in(&w.inet, "delete table inet bsstall")
        .expect("nft restore");
    // The probes stayed good: back to direct after the 2 s hold.
    let back = wait(Duration::from_secs(10), || {
        w.status().is_some_and(|s| s["path"] == "direct")
    });
    assert!(back, "never returned to direct: {:?}", w.status());
}

/// `ip rule` and every route table, IPv4 and IPv6, inside `ns`.
fn routing(lab: &Lab, ns: &str) -> String {
    let mut out = String::new();
    for args in [
        ["-4", "rule", "show"],
        ["-6", "rule", "show"],
        ["-4", "route", "show"],
        ["-6", "route", "show"],
    ] {
        let o = lab.command(ns, "ip").args(args).output().expect("ip");
        out.push_str(&String::from_utf8_lossy(&o.stdout));
    }
    let t = lab
        .command(ns, "ip")
        .args(["route", "show", "table", "181"])
        .output()
        .expect("ip");
    out.push_str(&String::from_utf8_lossy(&t.stdout));
    out
}

/// A UDP exchange from `ns` with no proxy setting: sends TEXT to HOST:PORT,
/// prints the reply or "timeout".
fn udp_once(lab: &Lab, ns: &str, to: &str, text: &str) -> String {
    let (host, port) = to.rsplit_once(':').expect("HOST:PORT");
    let script = format!(
        "import socket\nu=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\nu.settimeout(3)\nu.sendto(b'{text}',('{host}',{port}))\ntry:\n print(u.recvfrom(65535)[0].decode())\nexcept socket.timeout:\n print('timeout')\n"
    );
    let o = lab
        .command(ns, "python3")
        .args(["-c", &script])
        .output()
        .expect("python3");
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// A DNS server answering every A question with the internet host.
const DNS: &str = "import socket,struct\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind(('10.79.1.1',53))\nwhile True:\n q,a=s.recvfrom(512)\n i=12\n while q[i]:\n  i+=q[i]+1\n qt=struct.unpack('!H',q[i+1:i+3])[0]\n ans=b'\\xc0\\x0c'+struct.pack('!HHIH',1,1,60,4)+socket.inet_aton('10.79.1.1') if qt==1 else b''\n s.sendto(q[:2]+b'\\x81\\x80'+q[4:6]+struct.pack('!HHH',1 if ans else 0,0,0)+q[12:i+5]+ans,a)\n";

/// One UDP socket kept open in `ns` (a python process): each `ask` sends a
/// datagram from the same 5-tuple and returns the reply or "timeout".
struct UdpFlow {
    child: std::process::Child,
    out: std::io::BufReader<std::process::ChildStdout>,
}

impl UdpFlow {
    fn open(lab: &Lab, ns: &str, to: &str) -> UdpFlow {
        let (host, port) = to.rsplit_once(':').expect("HOST:PORT");
        let script = format!(
            "import socket,sys\nu=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\nu.settimeout(3)\nfor line in sys.stdin:\n u.sendto(line.strip().encode(),('{host}',{port}))\n try:\n  print(u.recvfrom(65535)[0].decode(),flush=True)\n except socket.timeout:\n  print('timeout',flush=True)\n"
        );
        let mut child = lab
            .command(ns, "python3")
            .args(["-c", &script])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3");
        let out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        UdpFlow { child, out }
    }

    fn ask(&mut self, text: &str) -> String {
        use std::io::{BufRead, Write};
        let stdin = self.child.stdin.as_mut().expect("stdin");
        writeln!(stdin, "{text}").expect("write");
        let mut line = String::new();
        self.out.read_line(&mut line).expect("read");
        line.trim().to_string()
    }
}

impl Drop for UdpFlow {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const UDP_ECHO: &str = "import socket\nu=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\nu.bind(('10.79.1.1',9999))\nwhile True:\n d,a=u.recvfrom(65535)\n u.sendto(b'echo:'+d+b' from '+a[0].encode(),a)\n";

#[test]
fn whole_device_mode_carries_every_app_and_leaves_no_trace() {
    if let Some(why) = bandshare_testkit::netns::unavailable() {
        eprintln!("SKIP: {why}");
        return;
    }
    for tool in ["nft", "python3"] {
        if !which(tool) {
            eprintln!("SKIP: {tool} is not installed");
            return;
        }
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        eprintln!("SKIP: no /dev/net/tun on this machine");
        return;
    }
    let mut w = World::build(2, &["--tun", "bst0"]).expect("topology");
    let inet = w.inet.clone();
    w.lab
        .spawn(&inet, "udp-echo", "python3", &strings(&["-c", UDP_ECHO]))
        .expect("UDP echo");
    w.lab
        .spawn(&inet, "dns", "python3", &strings(&["-c", DNS]))
        .expect("DNS server");
    w.lab
        .resolv_conf(
            &w.req,
            "nameserver 10.79.1.1\noptions timeout:2 attempts:2\n",
        )
        .expect("resolv.conf");
    let ready = wait(Duration::from_secs(30), || {
        w.status()
            .is_some_and(|s| s["path"] == "direct" && s["own_link"]["state"] == "healthy")
            && routing(&w.lab, &w.req).contains("bst0")
    });
    assert!(ready, "{:?}\n{}", w.status(), w.lab.log_tails(20));
    let before_cut = routing(&w.lab, &w.req);
    assert!(before_cut.contains("lookup 181"), "{before_cut}");

    // No proxy setting: curl and a UDP client just work, over the own link.
    let page = w.curl(&w.req, &[&format!("http://{INTERNET}:{HTTP_PORT}/tun")]);
    let body = String::from_utf8_lossy(&page.stdout).into_owned();
    assert!(
        body.contains(&format!("from {OWN}")),
        "{body}\n{}",
        w.lab.log_tails(20)
    );
    assert_eq!(
        udp_once(&w.lab, &w.req, "10.79.1.1:9999", "hello"),
        format!("echo:hello from {OWN}")
    );
    // IPv6 takes the device too.
    if w._http6.is_some() {
        let rules = w
            .lab
            .command(&w.req, "ip")
            .args(["-6", "rule", "show"])
            .output()
            .expect("ip");
        assert!(
            String::from_utf8_lossy(&rules.stdout).contains("lookup 181"),
            "no IPv6 rule into the device"
        );
        let flows = |w: &World| {
            w.status()
                .and_then(|s| s["own_link"]["flows"].as_u64())
                .unwrap_or(0)
        };
        let before = flows(&w);
        let page = w.curl(
            &w.req,
            &["-g", &format!("http://[{INTERNET6}]:{HTTP_PORT}/v6")],
        );
        let body = String::from_utf8_lossy(&page.stdout).into_owned();
        assert!(
            body.contains(&format!("from {OWN6}")),
            "{body}{}",
            String::from_utf8_lossy(&page.stderr)
        );
        assert!(
            flows(&w) > before,
            "the IPv6 fetch did not go through the device"
        );
    } else {
        eprintln!("SKIP the IPv6 part: no IPv6 in this kernel");
    }
    // DNS is ordinary UDP: a name resolves and curl fetches by it.
    let by_name = w.curl(&w.req, &[&format!("http://web.test:{HTTP_PORT}/by-name")]);
    let body = String::from_utf8_lossy(&by_name.stdout).into_owned();
    assert!(
        body.contains("path /by-name") && body.contains(&format!("from {OWN}")),
        "{body}{}",
        String::from_utf8_lossy(&by_name.stderr)
    );

    // The own link silently cut: the same apps go through the sharer.
    w.nft("table inet bscut { chain out { type filter hook output priority 0; oifname \"own0\" drop; }; }")
        .expect("nft drop");
    let moved = wait(Duration::from_secs(5), || {
        w.status().is_some_and(|s| s["path"] == "pool")
    });
    assert!(moved, "{:?}", w.status());
    // Degraded: the pool fills to both sharers; apps go through the active.
    let both = wait(Duration::from_secs(10), || {
        w.status()
            .is_some_and(|s| s["pool"].as_array().is_some_and(|p| p.len() == 2))
    });
    assert!(both, "{:?}", w.status());
    let active = |w: &World| -> usize {
        w.status()
            .and_then(|s| {
                s["active"]
                    .as_str()
                    .and_then(|a| a.strip_prefix('s')?.parse().ok())
            })
            .expect("an active sharer")
    };
    let first = active(&w);
    let page = w.curl(&w.req, &[&format!("http://{INTERNET}:{HTTP_PORT}/tun-cut")]);
    let body = String::from_utf8_lossy(&page.stdout).into_owned();
    assert!(
        body.contains(&format!("from {}", uplink(first))),
        "{body}\n{}",
        w.lab.log_tails(20)
    );
    // An open UDP flow (the same 5-tuple) and new TCP flows survive a kill
    // of the active sharer.
    let mut flow = UdpFlow::open(&w.lab, &w.req, "10.79.1.1:9999");
    assert_eq!(
        flow.ask("again"),
        format!("echo:again from {}", uplink(first))
    );
    w.lab.proc(w.sharer_procs[first]).kill();
    let next = wait(Duration::from_secs(5), || {
        w.status()
            .and_then(|s| s["active"].as_str().map(String::from))
            .is_some_and(|a| a != format!("s{first}"))
    });
    assert!(next, "the pool did not move off s{first}: {:?}", w.status());
    let second = active(&w);
    let page = w.curl(
        &w.req,
        &[&format!("http://{INTERNET}:{HTTP_PORT}/tun-killed")],
    );
    let body = String::from_utf8_lossy(&page.stdout).into_owned();
    assert!(body.contains(&format!("from {}", uplink(second))), "{body}");
    assert_eq!(
        flow.ask("still"),
        format!("echo:still from {}", uplink(second))
    );
    drop(flow);
    let by_name = w.curl(
        &w.req,
        &[&format!("http://web.test:{HTTP_PORT}/by-name-cut")],
    );
    let body = String::from_utf8_lossy(&by_name.stdout).into_owned();
    assert!(
        body.contains(&format!("from {}", uplink(second))),
        "{body}{}",
        String::from_utf8_lossy(&by_name.stderr)
    );
    w.nft("delete table inet bscut").expect("nft restore");

    // SIGTERM: rules, routes and the device are gone, as before the run.
    let exited = w.lab.proc(w.requester).terminate(Duration::from_secs(10));
    assert!(exited, "the requester did not stop on SIGTERM");
    let after = routing(&w.lab, &w.req);
    assert!(
        !after.contains("bst0") && !after.contains("lookup 181"),
        "{after}"
    );

    // After a crash (kill -9), --cleanup removes what was left.
    let req_ns = w.req.clone();
    let dr = w.lab.dir.path().join("req").display().to_string();
    let again = w
        .lab
        .spawn(
            &req_ns,
            "requester2",
            BIN,
            &strings(&[
                "connect",
                "--server",
                &format!("http://{COORD}:7400"),
                "--at",
                AT,
                "--tun",
                "bst0",
                "--socks",
                "127.0.0.1:1081",
                "--data",
                &dr,
            ]),
        )
        .expect("requester");
    assert!(wait(Duration::from_secs(20), || routing(&w.lab, &w.req)
        .contains("bst0")));
    w.lab.proc(again).kill();
    assert!(
        routing(&w.lab, &w.req).contains("lookup 181"),
        "a crash leaves the rules"
    );
    let out = w
        .lab
        .command(&req_ns, BIN)
        .args(["connect", "--tun", "bst0", "--cleanup"])
        .output()
        .expect("cleanup");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    // (A TUN device goes with the process that held it; the rules stay.)
    assert!(text.contains("removed ip -4 rule"), "{text}");
    assert_eq!(
        routing(&w.lab, &w.req),
        after,
        "--cleanup restores the routing"
    );
}

#[test]
fn whole_device_mode_without_cap_net_admin_is_one_clear_line() {
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if !root || !which("setpriv") {
        eprintln!("SKIP: needs root and setpriv to drop to an unprivileged user");
        return;
    }
    let data = tempfile::tempdir().expect("tempdir");
    let out = std::process::Command::new("setpriv")
        .args([
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
            BIN,
            "connect",
            "--server",
            "127.0.0.1:1",
            "--at",
            AT,
            "--tun",
            "bsnocap0",
            "--data",
        ])
        .arg(data.path())
        .output()
        .expect("setpriv");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("needs CAP_NET_ADMIN"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
}
