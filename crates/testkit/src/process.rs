//! A bandshare process under test: started with its listeners on port 0,
//! its `listening KEY=ADDR` lines read from stdout (the CLI prints one per
//! bound address), its stderr kept for assertions, and killed on drop.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

#[derive(Default)]
struct Seen {
    addrs: HashMap<String, Vec<SocketAddr>>,
    stdout: String,
    stderr: String,
    stdout_closed: bool,
}

/// A child process whose output is collected in the background.
pub struct Process {
    pub child: Child,
    seen: Arc<(Mutex<Seen>, Condvar)>,
}

impl Process {
    /// Spawns `cmd` with stdout and stderr piped and collected.
    pub fn spawn(mut cmd: Command) -> std::io::Result<Process> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let seen = Arc::new((Mutex::new(Seen::default()), Condvar::new()));
        if let Some(out) = child.stdout.take() {
            let seen = seen.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    let (lock, cv) = &*seen;
                    let Ok(mut s) = lock.lock() else { break };
                    if let Some((key, addr)) = line
                        .strip_prefix("listening ")
                        .and_then(|rest| rest.split_once('='))
                        && let Ok(addr) = addr.trim().parse()
                    {
                        s.addrs.entry(key.to_string()).or_default().push(addr);
                    }
                    s.stdout.push_str(&line);
                    s.stdout.push('\n');
                    cv.notify_all();
                }
                if let Ok(mut s) = seen.0.lock() {
                    s.stdout_closed = true;
                }
                seen.1.notify_all();
            });
        }
        if let Some(mut err) = child.stderr.take() {
            let seen = seen.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = err.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    if let Ok(mut s) = seen.0.lock() {
                        s.stderr.push_str(&String::from_utf8_lossy(&buf[..n]));
                    }
                    seen.1.notify_all();
                }
            });
        }
        Ok(Process { child, seen })
    }

    /// Spawns the bandshare binary at `exe` with `args`, logs at `info`.
    pub fn bandshare(exe: &str, args: &[&str]) -> std::io::Result<Process> {
        let mut cmd = Command::new(exe);
        cmd.args(args).env("RUST_LOG", "info");
        Process::spawn(cmd)
    }

    /// `bandshare server` with its store in `data`, gRPC on `listen`, HTTP on
    /// a free port and `extra` flags, once it listens: (process, gRPC address).
    pub fn server(
        exe: &str,
        listen: &str,
        data: &std::path::Path,
        extra: &[&str],
    ) -> (Process, SocketAddr) {
        let d = data.to_str().expect("a UTF-8 data path");
        let mut args = vec![
            "server",
            "--listen",
            listen,
            "--http",
            "127.0.0.1:0",
            "--data",
            d,
        ];
        args.extend_from_slice(extra);
        let p = Process::bandshare(exe, &args).expect("spawn server");
        let grpc = p
            .addr("grpc", Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("server not listening: {e}"));
        (p, grpc)
    }

    /// The address the process printed as `listening KEY=ADDR`, waited for
    /// at most `timeout`; the error carries what it wrote so far.
    pub fn addr(&self, key: &str, timeout: Duration) -> Result<SocketAddr, String> {
        let deadline = Instant::now() + timeout;
        let (lock, cv) = &*self.seen;
        let mut s = lock
            .lock()
            .map_err(|_| "output lock poisoned".to_string())?;
        loop {
            if let Some(a) = s.addrs.get(key).and_then(|v| v.first()) {
                return Ok(*a);
            }
            let now = Instant::now();
            if now >= deadline || s.stdout_closed {
                return Err(format!(
                    "no `listening {key}=` line within {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                    s.stdout, s.stderr
                ));
            }
            s = cv
                .wait_timeout(s, deadline - now)
                .map_err(|_| "output lock poisoned".to_string())?
                .0;
        }
    }

    /// Waits until stderr contains `needle`, at most `timeout`.
    pub fn wait_stderr(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let (lock, cv) = &*self.seen;
        let Ok(mut s) = lock.lock() else { return false };
        loop {
            if s.stderr.contains(needle) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            match cv.wait_timeout(s, deadline - now) {
                Ok((g, _)) => s = g,
                Err(_) => return false,
            }
        }
    }

    /// What the process wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.seen
            .0
            .lock()
            .map(|s| s.stderr.clone())
            .unwrap_or_default()
    }

    /// Waits for the process to exit by itself, at most `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                // Let the readers drain the pipes.
                std::thread::sleep(Duration::from_millis(50));
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends a signal to this process (by its own PID).
    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the binary at `exe` once with `args`, a fresh `XDG_DATA_HOME` and
/// no `RUST_LOG`, plus `envs`, in `cwd` if given; returns what it printed.
pub fn run_once(
    exe: &str,
    args: &[&str],
    envs: &[(&str, &str)],
    cwd: Option<&std::path::Path>,
) -> std::process::Output {
    let home = tempfile::tempdir().expect("tempdir");
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .env("XDG_DATA_HOME", home.path())
        .env_remove("RUST_LOG");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    if let Some(d) = cwd {
        cmd.current_dir(d);
    }
    cmd.output().expect("run the binary")
}

/// Asserts that `exe ARGS` fails with exactly one line on stderr, holding
/// `needle`, and no panic: how bad input must look to a user.
pub fn fails_with_one_line(exe: &str, args: &[&str], needle: &str) {
    let out = run_once(exe, args, &[], None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} succeeded");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{args:?}: expected one line, got:\n{err}");
    assert!(
        lines[0].contains(needle),
        "{args:?}: {:?} lacks {needle:?}",
        lines[0]
    );
}
