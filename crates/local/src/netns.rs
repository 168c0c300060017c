//! Real Linux network namespaces for end-to-end tests: hosts made with
//! `ip netns add`, wired with veth pairs (and a bridge for a shared LAN),
//! processes started inside them with `ip netns exec`, and listeners bound
//! inside them from a thread that entered the namespace.
//!
//! Every namespace of a [`Lab`] is named `bs-<pid>-<n>-<role>`, so tests
//! running at once never meet; all of them are deleted, and every process
//! started in them killed, when the lab is dropped (also on a failing
//! test's unwind). Namespaces left behind by a test process that itself
//! was killed are removed by the next lab that starts.

use anyhow::{Context, bail};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

const PREFIX: &str = "bs-";
/// The HTTP token of coordinators in labs.
pub const HTTP_TOKEN: &str = "bandshare-lab-http-token";
static LABS: AtomicUsize = AtomicUsize::new(0);

/// Runs `ip ARGS`; the error carries what `ip` said.
pub fn ip(args: &[&str]) -> anyhow::Result<()> {
    run("ip", args)
}

/// Runs a command to completion; fails with its stderr unless it exits 0.
pub fn run(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Why namespaces cannot be used here, if they cannot: not root, no `ip`,
/// or a kernel that refuses. Tests skip with this message.
pub fn unavailable() -> Option<String> {
    // Labs may start at once in one process: each probe its own name.
    static PROBES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = PROBES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let probe = format!("{PREFIX}{}-probe{n}", std::process::id());
    match ip(&["netns", "add", &probe]) {
        Ok(()) => {
            let _ = ip(&["netns", "del", &probe]);
            None
        }
        Err(e) => Some(format!("network namespaces cannot be created here: {e:#}")),
    }
}

/// Whether `pid` is a live process.
fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Deletes namespaces of earlier test processes that no longer run.
fn remove_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let pid = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|p| !alive(p)) {
            let _ = ip(&["netns", "del", name]);
            let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(name));
        }
    }
}

/// A process started in a namespace, with its output in a log file.
pub struct Proc {
    pub name: String,
    pub log: PathBuf,
    child: Child,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `kill -9`, and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM (so it can clean up), then waits up to `timeout` for it to
    /// exit; whether it did.
    pub fn terminate(&mut self, timeout: std::time::Duration) -> bool {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        wait(timeout, || self.exited().is_some())
    }

    /// Whether it has exited (and how), without waiting.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

/// Polls `f` every 100 ms until it holds or `timeout` passes (for tests
/// that drive other processes from a plain thread).
pub fn wait(timeout: std::time::Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    f()
}

/// A set of namespaces and the processes in them, removed on drop.
pub struct Lab {
    tag: String,
    namespaces: Vec<String>,
    procs: Vec<Proc>,
    pub dir: tempfile::TempDir,
}

impl Lab {
    /// A new, empty lab; `Err` holds why namespaces are unavailable.
    pub fn new() -> Result<Lab, String> {
        if let Some(why) = unavailable() {
            return Err(why);
        }
        remove_stale();
        let n = LABS.fetch_add(1, Ordering::Relaxed);
        Ok(Lab {
            tag: format!("{PREFIX}{}-{n}", std::process::id()),
            namespaces: vec![],
            procs: vec![],
            dir: tempfile::tempdir().map_err(|e| e.to_string())?,
        })
    }

    /// Creates the namespace for `role` (loopback up); returns its name.
    pub fn host(&mut self, role: &str) -> anyhow::Result<String> {
        let name = format!("{}-{role}", self.tag);
        ip(&["netns", "add", &name])?;
        self.namespaces.push(name.clone());
        ip(&["-n", &name, "link", "set", "lo", "up"])?;
        Ok(name)
    }

    /// A veth pair between two namespaces: `a_if` in `a` with `a_addr`
    /// (CIDR, or "" for none), `b_if` in `b` likewise; both up.
    pub fn wire(
        &self,
        (a, a_if, a_addr): (&str, &str, &str),
        (b, b_if, b_addr): (&str, &str, &str),
    ) -> anyhow::Result<()> {
        ip(&[
            "link", "add", "name", a_if, "netns", a, "type", "veth", "peer", "name", b_if, "netns",
            b,
        ])?;
        for (ns, ifname, addr) in [(a, a_if, a_addr), (b, b_if, b_addr)] {
            if !addr.is_empty() {
                ip(&["-n", ns, "addr", "add", addr, "dev", ifname])?;
            }
            ip(&["-n", ns, "link", "set", ifname, "up"])?;
        }
        Ok(())
    }

    /// `ip -n NS ARGS...`
    pub fn ip_in(&self, ns: &str, args: &[&str]) -> anyhow::Result<()> {
        let mut all = vec!["-n", ns];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// The resolver configuration processes started in `ns` see
    /// (`ip netns exec` bind-mounts `/etc/netns/NS/resolv.conf`); removed
    /// with the namespace.
    pub fn resolv_conf(&self, ns: &str, text: &str) -> anyhow::Result<()> {
        let dir = Path::new("/etc/netns").join(ns);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("resolv.conf"), text)?;
        Ok(())
    }

    /// A file holding [`HTTP_TOKEN`], for `server --http-token-file` (a
    /// coordinator whose `--http` is on a namespace's address needs one).
    pub fn http_token_file(&self) -> anyhow::Result<String> {
        let p = self.dir.path().join("http-token");
        std::fs::write(&p, HTTP_TOKEN)?;
        Ok(p.display().to_string())
    }

    /// `curl -sS --max-time 5 ARGS` inside `ns`, presenting [`HTTP_TOKEN`]
    /// (coordinators started with [`Lab::http_token_file`] want it; other
    /// servers ignore the header).
    pub fn curl(&self, ns: &str, args: &[&str]) -> std::process::Output {
        self.command(ns, "curl")
            .args(["-sS", "--max-time", "5"])
            .args(["-H", &format!("Authorization: Bearer {HTTP_TOKEN}")])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run curl: {e}"))
    }

    /// GET `url` inside `ns` as JSON, if it answers with some.
    pub fn json(&self, ns: &str, url: &str) -> Option<serde_json::Value> {
        let out = self.curl(ns, &[url]);
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).ok())
            .flatten()
    }

    /// A command that will run inside `ns`.
    pub fn command(&self, ns: &str, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns, program]);
        c
    }

    /// Starts `program ARGS` inside `ns` with its output in `<name>.log`;
    /// killed when the lab is dropped. Returns its index for [`Lab::proc`].
    pub fn spawn(
        &mut self,
        ns: &str,
        name: &str,
        program: &str,
        args: &[String],
    ) -> anyhow::Result<usize> {
        let log = self.dir.path().join(format!("{name}.log"));
        let out = std::fs::File::create(&log)?;
        // `ip netns exec` execs the program: the child's pid is its pid.
        let child = self
            .command(ns, program)
            .args(args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("cannot start {program} in {ns}"))?;
        self.procs.push(Proc {
            name: name.to_string(),
            log,
            child,
        });
        Ok(self.procs.len() - 1)
    }

    pub fn proc(&mut self, i: usize) -> &mut Proc {
        &mut self.procs[i]
    }

    /// The last `n` lines of every process's log.
    pub fn log_tails(&self, n: usize) -> String {
        let mut out = String::new();
        for p in &self.procs {
            let text = std::fs::read_to_string(&p.log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            out.push_str(&format!("---- {} ({})\n", p.name, p.log.display()));
            for l in &lines[lines.len().saturating_sub(n)..] {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    /// Runs `f` in a thread that entered `ns` (a socket it makes stays in
    /// that namespace).
    fn in_ns<T: Send + 'static>(
        &self,
        ns: &str,
        f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
    ) -> anyhow::Result<T> {
        let path = PathBuf::from("/run/netns").join(ns);
        std::thread::spawn(move || -> anyhow::Result<T> {
            let file = std::fs::File::open(&path)
                .with_context(|| format!("cannot open {}", path.display()))?;
            rustix::thread::move_into_link_name_space(
                std::os::fd::AsFd::as_fd(&file),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )
            .with_context(|| format!("cannot enter {}", path.display()))?;
            f()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("namespace thread panicked"))?
    }

    /// A TCP listener bound to `addr` inside `ns`.
    pub fn bind_tcp(&self, ns: &str, addr: SocketAddr) -> anyhow::Result<std::net::TcpListener> {
        self.in_ns(ns, move || {
            let l = std::net::TcpListener::bind(addr)
                .with_context(|| format!("cannot bind {addr} in the namespace"))?;
            l.set_nonblocking(true)?;
            Ok(l)
        })
    }

    /// A UDP socket bound to `addr` inside `ns`.
    pub fn bind_udp(&self, ns: &str, addr: SocketAddr) -> anyhow::Result<std::net::UdpSocket> {
        self.in_ns(ns, move || {
            let s = std::net::UdpSocket::bind(addr)
                .with_context(|| format!("cannot bind {addr} in the namespace"))?;
            s.set_nonblocking(true)?;
            Ok(s)
        })
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.log_tails(40));
        }
        for p in &mut self.procs {
            p.kill();
        }
        for ns in self.namespaces.iter().rev() {
            if let Err(e) = ip(&["netns", "del", ns]) {
                eprintln!("cannot delete namespace {ns}: {e:#}");
            }
            let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(ns));
        }
    }
}
