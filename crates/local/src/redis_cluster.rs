//! A real Redis Cluster for tests, benchmarks and the demo: three masters and three replicas of the
//! system's `redis-server`, on free loopback ports below 55535 (each node
//! also listens on its port + 10000 for the cluster bus), no persistence,
//! in a temporary directory; every node is killed (by its own PID) on drop.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisCluster {
    pub ports: Vec<u16>,
    nodes: Vec<Option<Child>>,
    _dir: tempfile::TempDir,
}

/// Whether `redis-server` and `redis-cli` are installed (`.ci/run` installs
/// them).
pub fn available() -> bool {
    ["redis-server", "redis-cli"].iter().all(|b| {
        Command::new(b)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// A base port whose six ports and their bus ports (+10000) are free now.
fn free_ports(n: u16) -> Vec<u16> {
    for _ in 0..200 {
        let base = fastrand::u16(20_000..(45_535 - n));
        let ok = (0..n).all(|i| {
            let p = base + i;
            TcpListener::bind(("127.0.0.1", p)).is_ok()
                && TcpListener::bind(("127.0.0.1", p + 10_000)).is_ok()
        });
        if ok {
            return (0..n).map(|i| base + i).collect();
        }
    }
    panic!("no six free ports (and bus ports) found below 55535");
}

fn cli(port: u16, args: &[&str]) -> String {
    Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// One node on `port`, its cluster state in `dir/nodes-PORT.conf` (a node
/// started again on the same port rejoins the cluster it knew).
fn node(dir: &std::path::Path, p: u16) -> Child {
    let mut cmd = Command::new("redis-server");
    cmd.current_dir(dir).args([
        "--port",
        &p.to_string(),
        "--bind",
        "127.0.0.1",
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        &format!("nodes-{p}.conf"),
        "--cluster-node-timeout",
        "1500",
        "--save",
        "",
        "--appendonly",
        "no",
        "--protected-mode",
        "no",
        // Replicas sync at once (the default waits 5 s for more
        // replicas to share a diskless transfer)...
        "--repl-diskless-sync-delay",
        "0",
        // ...and one whose master died may always take over.
        "--cluster-replica-validity-factor",
        "0",
    ]);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn redis-server")
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for n in self.nodes.iter_mut().flatten() {
            let _ = n.kill();
            let _ = n.wait();
        }
    }
}

impl RedisCluster {
    /// Starts the six nodes, joins them (`redis-cli --cluster create …
    /// --cluster-replicas 1`) and waits until every node says the cluster
    /// is ok and has its replicas.
    pub fn start() -> RedisCluster {
        assert!(
            available(),
            "redis-server and redis-cli are needed (apt-get install redis-server redis-tools; .ci/run does it)"
        );
        let dir = tempfile::tempdir().expect("temp dir");
        let ports = free_ports(6);
        let mut nodes = vec![];
        for &p in &ports {
            nodes.push(Some(node(dir.path(), p)));
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ports.iter().all(|p| cli(*p, &["PING"]).trim() == "PONG") {
            assert!(
                Instant::now() < deadline,
                "redis-server nodes did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("redis-cli --cluster create");
        assert!(
            out.status.success(),
            "cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let c = RedisCluster {
            ports,
            nodes,
            _dir: dir,
        };
        c.wait_ok(Duration::from_secs(20));
        c
    }

    /// `redis://127.0.0.1:PORT,…` for `--redis`.
    pub fn urls(&self) -> String {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Waits until every live node reports `cluster_state:ok` and three
    /// masters each have a replica.
    pub fn wait_ok(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let live: Vec<u16> = self.live_ports();
            let ok = live
                .iter()
                .all(|p| cli(*p, &["CLUSTER", "INFO"]).contains("cluster_state:ok"));
            let synced = live.iter().all(|p| {
                let r = cli(*p, &["INFO", "replication"]);
                r.contains("role:master") || r.contains("master_link_status:up")
            });
            if ok && synced && self.masters().len() == 3 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "Redis Cluster not ok within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the live nodes have marked the killed master `port` as
    /// failed and promoted a replica in its place (three masters serve
    /// every slot again).
    pub fn wait_promoted(&self, port: u16, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let masters = self.masters();
            if masters.len() == 3 && !masters.contains(&port) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no replica promoted within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        self.wait_ok(deadline.saturating_duration_since(Instant::now()));
    }

    fn live_ports(&self) -> Vec<u16> {
        self.ports
            .iter()
            .zip(&self.nodes)
            .filter(|(_, n)| n.is_some())
            .map(|(p, _)| *p)
            .collect()
    }

    /// Ports of the nodes that are masters now (as a live node sees it).
    pub fn masters(&self) -> Vec<u16> {
        let Some(&p) = self.live_ports().first() else {
            return vec![];
        };
        cli(p, &["CLUSTER", "NODES"])
            .lines()
            .filter(|l| l.contains("master") && !l.contains("fail"))
            .filter_map(|l| {
                let addr = l.split_whitespace().nth(1)?;
                addr.split('@').next()?.rsplit(':').next()?.parse().ok()
            })
            .collect()
    }

    /// The port of the master serving `key`.
    pub fn master_of(&self, key: &str) -> Option<u16> {
        let p = *self.live_ports().first()?;
        let slot: u16 = cli(p, &["CLUSTER", "KEYSLOT", key]).trim().parse().ok()?;
        for line in cli(p, &["CLUSTER", "NODES"]).lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 9 || !f[2].contains("master") || f[2].contains("fail") {
                continue;
            }
            let serves = f[8..].iter().any(|r| match r.split_once('-') {
                Some((a, b)) => {
                    a.parse::<u16>().is_ok_and(|a| a <= slot)
                        && b.parse::<u16>().is_ok_and(|b| slot <= b)
                }
                None => r.parse::<u16>().is_ok_and(|s| s == slot),
            });
            if serves {
                return f[1].split('@').next()?.rsplit(':').next()?.parse().ok();
            }
        }
        None
    }

    /// Kills the node on `port` with SIGKILL (it stays dead).
    pub fn kill(&mut self, port: u16) {
        if let Some(i) = self.ports.iter().position(|p| *p == port)
            && let Some(mut n) = self.nodes[i].take()
        {
            let _ = n.kill();
            let _ = n.wait();
        }
    }

    /// Starts the node on `port` again (killed before): it rejoins as a
    /// replica of whoever took over its slots.
    pub fn restart(&mut self, port: u16) {
        if let Some(i) = self.ports.iter().position(|p| *p == port)
            && self.nodes[i].is_none()
        {
            self.nodes[i] = Some(node(self._dir.path(), port));
        }
    }

    /// Sends `sig` (STOP, CONT) to every live node: with STOP the whole
    /// cluster is unreachable (connections open, nothing answers).
    pub fn signal_all(&self, sig: &str) {
        for n in self.nodes.iter().flatten() {
            let _ = Command::new("kill")
                .args([&format!("-{sig}"), &n.id().to_string()])
                .status();
        }
    }

    /// Runs `redis-cli` against a live node with `args` (`-c`: follows
    /// redirections).
    pub fn cli(&self, args: &[&str]) -> String {
        let p = self.live_ports().first().copied().unwrap_or(self.ports[0]);
        let mut a = vec!["-c"];
        a.extend_from_slice(args);
        cli(p, &a)
    }
}
