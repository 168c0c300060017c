//! End to end across real Linux network namespaces: the `bandshare` binary
//! as coordinator, sharers and requester, each on its own host.
//!
//! ```text
//!            internet 10.77.1.1 (HTTP :8080, iperf3 :5201)
//!            /u0              |u1              \u2       uplinks 10.77.1{k}.0/24
//!   sharer s0           sharer s1          sharer s2
//!            \lan0            |lan0            /lan0
//!   ------------------ LAN bridge 10.77.2.0/24 --------------------
//!            |lan0                             |lan0
//!   coordinator 10.77.2.1              requester 10.77.2.100 (no route out)
//! ```
//!
//! Sharers relay to the internet host over their own uplink and check that
//! uplink with timed connects to it (`--uplink-check`). The requester keeps
//! a warm pool over the LAN and sends its flows through the active sharer;
//! curl and iperf3 are the applications. Skips, saying why, only where
//! namespaces cannot be created (not root, no iproute2).

use bandshare_testkit::HttpTarget;
use bandshare_testkit::netns::{Lab, run};
use serde_json::Value;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_bandshare");
const INTERNET: &str = "10.77.1.1";
const HTTP_PORT: u16 = 8080;
const IPERF_PORT: u16 = 5201;
const COORD: &str = "10.77.2.1";
const AT: &str = "39.9042,116.4074";

struct Net {
    lab: Lab,
    coord_ns: String,
    req_ns: String,
    inet_ns: String,
    sharer_ns: Vec<String>,
    coord: usize,
    sharers: Vec<usize>,
    _http: HttpTarget,
    /// Runs the HTTP target while the test thread waits on curl.
    _rt: tokio::runtime::Runtime,
}

fn sharer_name(k: usize) -> String {
    format!("s{k}")
}

impl Net {
    /// Builds the hosts and links, starts the HTTP target, the coordinator
    /// and `n` sharers; `None` (after saying why) where namespaces are
    /// unavailable.
    fn up(n: usize) -> Option<Net> {
        let mut lab = match Lab::new() {
            Ok(l) => l,
            Err(why) => {
                eprintln!("SKIP: {why}");
                return None;
            }
        };
        let net = Net::build(&mut lab, n).expect("topology");
        let (inet_ns, coord_ns, req_ns, sharer_ns) = net;
        let listener = lab
            .bind_tcp(
                &inet_ns,
                SocketAddr::new(INTERNET.parse().expect("ip"), HTTP_PORT),
            )
            .expect("bind HTTP target in the internet host");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let http = {
            let _in = rt.enter();
            HttpTarget::serve_std(listener).expect("HTTP target")
        };
        let coord = start_coordinator(&mut lab, &coord_ns);
        let mut sharers = vec![];
        for (k, ns) in sharer_ns.iter().enumerate() {
            let name = sharer_name(k);
            let args: Vec<String> = [
                "share",
                "--server",
                &format!("http://{COORD}:7400"),
                "--name",
                &name,
                "--at",
                AT,
                "--network",
                "4g",
                "--relay",
                &format!("10.77.2.{}:7500", 11 + k),
                "--allow-egress",
                "10.77.1.0/24",
                "--uplink-check",
                &format!("{INTERNET}:{HTTP_PORT}"),
                "--data",
                &lab.dir.path().join(&name).display().to_string(),
            ]
            .map(String::from)
            .to_vec();
            sharers.push(lab.spawn(ns, &name, BIN, &args).expect("start sharer"));
        }
        let net = Net {
            lab,
            coord_ns,
            req_ns,
            inet_ns,
            sharer_ns,
            coord,
            sharers,
            _http: http,
            _rt: rt,
        };
        let online = net.wait(Duration::from_secs(30), || {
            net.coordinator_online().is_some_and(|o| o == n)
        });
        assert!(online, "{n} sharers never came online at the coordinator");
        Some(net)
    }

    /// Namespaces and links; returns (internet, coordinator, requester, sharers).
    fn build(lab: &mut Lab, n: usize) -> anyhow::Result<(String, String, String, Vec<String>)> {
        let inet = lab.host("inet")?;
        let lan = lab.host("lan")?;
        let coord = lab.host("coord")?;
        let req = lab.host("req")?;
        lab.ip_in(
            &inet,
            &["addr", "add", &format!("{INTERNET}/32"), "dev", "lo"],
        )?;
        lab.ip_in(&lan, &["link", "add", "br0", "type", "bridge"])?;
        lab.ip_in(&lan, &["link", "set", "br0", "up"])?;
        let mut on_lan = vec![(coord.clone(), format!("{COORD}/24"))];
        let mut sharers = vec![];
        for k in 0..n {
            let s = lab.host(&sharer_name(k))?;
            let uplink = 10 + k;
            lab.wire(
                (&inet, &format!("u{k}"), &format!("10.77.{uplink}.1/24")),
                (&s, "up0", &format!("10.77.{uplink}.2/24")),
            )?;
            lab.ip_in(
                &s,
                &[
                    "route",
                    "add",
                    "default",
                    "via",
                    &format!("10.77.{uplink}.1"),
                ],
            )?;
            on_lan.push((s.clone(), format!("10.77.2.{}/24", 11 + k)));
            sharers.push(s);
        }
        // The requester is on the LAN only: no default route, no way out.
        on_lan.push((req.clone(), "10.77.2.100/24".into()));
        for (i, (host, addr)) in on_lan.iter().enumerate() {
            let port = format!("p{i}");
            lab.wire((host, "lan0", addr), (&lan, &port, ""))?;
            lab.ip_in(&lan, &["link", "set", &port, "master", "br0"])?;
        }
        Ok((inet, coord, req, sharers))
    }

    fn wait(&self, timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if f() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        f()
    }

    fn curl(&self, ns: &str, args: &[&str]) -> std::process::Output {
        self.lab.curl(ns, args)
    }

    fn json(&self, ns: &str, url: &str) -> Option<Value> {
        self.lab.json(ns, url)
    }

    fn coordinator_online(&self) -> Option<usize> {
        let v = self.json(&self.coord_ns, &format!("http://{COORD}:7480/status"))?;
        v["online_sharers"].as_u64().map(|n| n as usize)
    }

    /// Starts `bandshare connect` in the requester host.
    fn connect(&mut self, pool: usize, forward: bool) -> usize {
        let mut args: Vec<String> = [
            "connect",
            "--server",
            &format!("http://{COORD}:7400"),
            "--at",
            AT,
            "--via",
            "pool",
            "--pool",
            &pool.to_string(),
            "--socks",
            "127.0.0.1:1080",
            "--control",
            "127.0.0.1:7700",
            "--data",
            &self.lab.dir.path().join("req").display().to_string(),
        ]
        .map(String::from)
        .to_vec();
        if forward {
            args.push("--forward".into());
            args.push(format!("127.0.0.1:{IPERF_PORT}={INTERNET}:{IPERF_PORT}"));
        }
        let req_ns = self.req_ns.clone();
        let i = self
            .lab
            .spawn(&req_ns, "requester", BIN, &args)
            .expect("start requester");
        let ready = self.wait(Duration::from_secs(30), || {
            self.pool_status()
                .is_some_and(|s| ready_members(&s) == pool && s["active"].is_string())
        });
        assert!(ready, "the pool never filled to {pool}");
        i
    }

    fn pool_status(&self) -> Option<Value> {
        self.json(&self.req_ns, "http://127.0.0.1:7700/status")
    }

    fn active(&self) -> String {
        self.pool_status()
            .and_then(|s| s["active"].as_str().map(String::from))
            .expect("an active sharer")
    }

    /// One GET through the requester's SOCKS5 proxy, as an application does.
    fn fetch(&self, path: &str) -> Result<String, String> {
        let url = format!("http://{INTERNET}:{HTTP_PORT}{path}");
        let out = self.curl(&self.req_ns, &["--socks5-hostname", "127.0.0.1:1080", &url]);
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    fn sharer_index(&self, name: &str) -> usize {
        (0..self.sharers.len())
            .find(|&k| sharer_name(k) == name)
            .expect("a sharer of ours")
    }
}

fn start_coordinator(lab: &mut Lab, ns: &str) -> usize {
    let token = lab.http_token_file().expect("token file");
    let args: Vec<String> = [
        "server",
        "--listen",
        &format!("{COORD}:7400"),
        "--http",
        &format!("{COORD}:7480"),
        "--http-token-file",
        &token,
        "--data",
        &lab.dir.path().join("coord").display().to_string(),
    ]
    .map(String::from)
    .to_vec();
    lab.spawn(ns, "coordinator", BIN, &args)
        .expect("start coordinator")
}

fn ready_members(status: &Value) -> usize {
    status["pool"]
        .as_array()
        .map(|p| p.iter().filter(|m| m["state"] == "ready").count())
        .unwrap_or(0)
}

fn member<'a>(status: &'a Value, name: &str) -> Option<&'a Value> {
    status["pool"]
        .as_array()?
        .iter()
        .find(|m| m["sharer"] == name)
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e4).round() / 10.0
}

#[test]
fn a_flows_reach_the_internet_only_through_sharers() {
    let Some(mut net) = Net::up(3) else {
        return;
    };
    // Without bandshare the requester has no way out.
    let direct = net.curl(&net.req_ns, &[&format!("http://{INTERNET}:{HTTP_PORT}/")]);
    assert!(!direct.status.success(), "a direct fetch must fail");
    eprintln!(
        "direct attempt: {}",
        String::from_utf8_lossy(&direct.stderr).trim()
    );
    let iperf = which("iperf3");
    if iperf {
        let inet_ns = net.inet_ns.clone();
        let args = ["-s", "-B", INTERNET, "-p", &IPERF_PORT.to_string()].map(String::from);
        net.lab
            .spawn(&inet_ns, "iperf3-server", "iperf3", &args)
            .expect("start iperf3 -s");
    }
    net.connect(3, true);
    let page = net
        .fetch("/through-sharers")
        .expect("fetch through sharers");
    assert!(page.contains("path /through-sharers"), "{page}");
    let status = net.pool_status().expect("status");
    let active = net.active();
    let flows = member(&status, &active).expect("active member")["flows"]
        .as_u64()
        .unwrap_or(0);
    assert!(flows >= 1, "the active sharer carried the flow: {status}");
    if !iperf {
        eprintln!("SKIP iperf3 part: iperf3 is not installed");
        return;
    }
    // iperf3 through a fixed port forward: its control and data
    // connections both become flows through the active sharer.
    let mut last = String::new();
    for _ in 0..20 {
        let out = net
            .lab
            .command(&net.req_ns, "iperf3")
            .args([
                "-c",
                "127.0.0.1",
                "-p",
                &IPERF_PORT.to_string(),
                "-t",
                "2",
                "-J",
            ])
            .output()
            .expect("run iperf3 -c");
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        let bps = v["end"]["sum_received"]["bits_per_second"].as_f64();
        if let Some(bps) = bps.filter(|b| *b > 0.0) {
            eprintln!(
                "iperf3 through sharer {}: {:.1} Mbit/s received",
                net.active(),
                bps / 1e6
            );
            return;
        }
        // The server may still be starting.
        last = String::from_utf8_lossy(&out.stdout).into_owned();
        std::thread::sleep(Duration::from_millis(250));
    }
    panic!("iperf3 through the forward never worked: {last}");
}

#[test]
fn b_killing_the_active_sharer_next_flow_succeeds() {
    let Some(mut net) = Net::up(3) else {
        return;
    };
    net.connect(3, false);
    net.fetch("/warm").expect("first fetch");
    let active = net.active();
    let k = net.sharer_index(&active);
    let i = net.sharers[k];
    let t = Instant::now();
    net.lab.proc(i).kill();
    let page = net.fetch("/after-kill");
    let took = t.elapsed();
    let page = page.expect("the next flow after kill -9 succeeds");
    assert!(page.contains("path /after-kill"));
    eprintln!(
        "kill -9 {active}: next flow done {} ms after the kill",
        ms(took)
    );
    // At once it takes no new flows (stalled: open flows wait for it up to
    // the 10 s grace); after the grace it leaves the pool.
    let moved = net.wait(Duration::from_secs(5), || {
        net.pool_status().is_some_and(|s| {
            s["active"].as_str().is_some_and(|a| a != active)
                && member(&s, &active).is_none_or(|m| m["state"] == "stalled")
        })
    });
    assert!(moved, "the dead sharer is stalled: {:?}", net.pool_status());
    let gone = net.wait(Duration::from_secs(15), || {
        net.pool_status()
            .is_some_and(|s| member(&s, &active).is_none())
    });
    assert!(
        gone,
        "the dead sharer left the pool: {:?}",
        net.pool_status()
    );
}

#[test]
fn c_uplink_down_on_the_active_sharer_next_flow_succeeds() {
    let Some(mut net) = Net::up(3) else {
        return;
    };
    net.connect(3, false);
    net.fetch("/warm").expect("first fetch");
    let active = net.active();
    let k = net.sharer_index(&active);
    let t = Instant::now();
    net.lab
        .ip_in(&net.sharer_ns[k], &["link", "set", "up0", "down"])
        .expect("ip link set down");
    let page = net.fetch("/after-link-down");
    let took = t.elapsed();
    let page = page.expect("the next flow after the uplink went down succeeds");
    assert!(page.contains("path /after-link-down"));
    eprintln!(
        "ip link set down on {active}'s uplink: next flow done {} ms later",
        ms(took)
    );
    // The sharer's own check notices and its probe answers say so.
    let seen = net.wait(Duration::from_secs(5), || {
        net.pool_status().is_some_and(|s| {
            s["active"].as_str().is_some_and(|a| a != active)
                && member(&s, &active).is_some_and(|m| m["state"] == "uplink-down")
        })
    });
    assert!(
        seen,
        "the pool shows {active} uplink-down and another active: {:?}",
        net.pool_status()
    );
    // Back up: the sharer is a candidate again.
    net.lab
        .ip_in(&net.sharer_ns[k], &["link", "set", "up0", "up"])
        .expect("ip link set up");
    net.lab
        .ip_in(
            &net.sharer_ns[k],
            &[
                "route",
                "replace",
                "default",
                "via",
                &format!("10.77.{}.1", 10 + k),
            ],
        )
        .expect("default route back");
    let back = net.wait(Duration::from_secs(10), || {
        net.pool_status()
            .is_some_and(|s| member(&s, &active).is_some_and(|m| m["state"] == "ready"))
    });
    assert!(back, "{active} ready again: {:?}", net.pool_status());
}

/// 30 % loss both ways on sharer `k`'s uplink: `tc netem` where the kernel
/// has it, else nftables' netdev ingress hook on both ends of the link
/// dropping a random 30 % (the same loss, made by another kernel part).
fn add_loss(net: &Net, k: usize) -> Result<&'static str, String> {
    let ends = [
        (net.sharer_ns[k].clone(), "up0".to_string()),
        (net.inet_ns.clone(), format!("u{k}")),
    ];
    let netem = ends.iter().try_for_each(|(ns, dev)| {
        run(
            "tc",
            &[
                "-n", ns, "qdisc", "add", "dev", dev, "root", "netem", "loss", "30%",
            ],
        )
    });
    let Err(netem_err) = netem else {
        return Ok("tc netem loss 30%");
    };
    if !which("nft") {
        return Err(format!(
            "tc netem failed ({netem_err:#}) and nft is not installed"
        ));
    }
    for (ns, dev) in &ends {
        let rules = format!(
            "table netdev bsloss {{ chain in {{ type filter hook ingress device \"{dev}\" priority 0; numgen random mod 100 < 30 drop; }}; }}"
        );
        net.lab
            .command(ns, "nft")
            .args([&rules])
            .output()
            .map_err(|e| e.to_string())
            .and_then(|o| {
                if o.status.success() {
                    Ok(())
                } else {
                    Err(String::from_utf8_lossy(&o.stderr).into_owned())
                }
            })?;
    }
    eprintln!("tc netem is not in this kernel ({netem_err:#}); using nftables random drop");
    Ok("nftables netdev ingress: numgen random mod 100 < 30 drop, both ends")
}

#[test]
fn d_loss_on_the_active_uplink_moves_the_choice() {
    let Some(mut net) = Net::up(3) else {
        return;
    };
    net.connect(3, false);
    net.fetch("/warm").expect("first fetch");
    let active = net.active();
    let k = net.sharer_index(&active);
    if !which("tc") && !which("nft") {
        eprintln!("SKIP loss case: neither tc nor nft is installed");
        return;
    }
    let how = add_loss(&net, k).expect("30 % loss on the active sharer's uplink");
    let t = Instant::now();
    let moved = net.wait(Duration::from_secs(20), || {
        net.pool_status().is_some_and(|s| {
            s["active"].as_str().is_some_and(|a| a != active)
                && member(&s, &active)
                    .and_then(|m| m["uplink_loss"].as_f64())
                    .is_some_and(|l| l >= 0.1)
        })
    });
    let status = net.pool_status();
    assert!(
        moved,
        "with 30 % loss on {active}'s uplink the active choice moves: {status:?}"
    );
    eprintln!(
        "{how} on {active}: active moved after {} ms; pool {}",
        ms(t.elapsed()),
        status.map(|s| s["pool"].to_string()).unwrap_or_default()
    );
    let page = net.fetch("/after-loss").expect("fetch after the move");
    assert!(page.contains("path /after-loss"));
}

#[test]
fn e_coordinator_down_pool_serves_and_refills_after_it_returns() {
    let Some(mut net) = Net::up(3) else {
        return;
    };
    net.connect(2, false);
    net.fetch("/warm").expect("first fetch");
    let coord = net.coord;
    net.lab.proc(coord).kill();
    // The pool keeps serving without the coordinator.
    for i in 0..5 {
        net.fetch(&format!("/no-coordinator-{i}"))
            .expect("fetch while the coordinator is down");
    }
    // Lose a pool member: it cannot be replaced while the coordinator is down.
    let active = net.active();
    let k = net.sharer_index(&active);
    let i = net.sharers[k];
    net.lab.proc(i).kill();
    net.fetch("/one-left")
        .expect("fetch through the last member");
    let shrunk = net.wait(Duration::from_secs(5), || {
        net.pool_status().is_some_and(|s| ready_members(&s) == 1)
    });
    assert!(shrunk, "pool of one: {:?}", net.pool_status());
    // The coordinator returns (same data, same signing key); sharers
    // reconnect and the requester refills with the one not in its pool.
    let t = Instant::now();
    let coord_ns = net.coord_ns.clone();
    net.coord = start_coordinator(&mut net.lab, &coord_ns);
    let refilled = net.wait(Duration::from_secs(45), || {
        net.pool_status().is_some_and(|s| ready_members(&s) == 2)
    });
    assert!(refilled, "pool refilled to 2: {:?}", net.pool_status());
    eprintln!(
        "coordinator back: pool refilled {} ms after its restart",
        ms(t.elapsed())
    );
    net.fetch("/refilled").expect("fetch after the refill");
}

fn which(program: &str) -> bool {
    std::process::Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success())
}
