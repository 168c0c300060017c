//! The Redis reference: a `redis-server` of the machine's own, started on a
//! free loopback port for the run and stopped after, and a minimal RESP2
//! client (commands as arrays of bulk strings, pipelining).

use anyhow::{Context, bail};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

pub struct RedisServer {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl RedisServer {
    /// Starts one when `redis-server` is installed; `Ok(None)` when not.
    pub async fn start() -> anyhow::Result<Option<RedisServer>> {
        let found = Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok();
        if !found {
            return Ok(None);
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let dir = tempfile::tempdir()?;
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start redis-server")?;
        let server = RedisServer {
            child,
            port,
            _dir: dir,
        };
        for _ in 0..100 {
            if let Ok(mut c) = Resp::connect(port).await
                && c.call(&["PING"]).await.is_ok()
            {
                return Ok(Some(server));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("redis-server did not answer on port {port}")
    }

    pub fn version() -> String {
        Command::new("redis-server")
            .arg("--version")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| {
                s.split_whitespace()
                    .find(|w| w.starts_with("v="))
                    .map(|w| w[2..].to_string())
            })
            .unwrap_or_default()
    }
}

/// One RESP2 connection.
pub struct Resp {
    r: BufReader<tokio::net::tcp::OwnedReadHalf>,
    w: tokio::net::tcp::OwnedWriteHalf,
    out: Vec<u8>,
}

/// A reply, reduced to what the benchmarks need.
#[derive(Debug, PartialEq)]
pub enum Reply {
    Status(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Vec<Reply>),
}

impl Resp {
    pub async fn connect(port: u16) -> anyhow::Result<Resp> {
        let s = TcpStream::connect(("127.0.0.1", port)).await?;
        s.set_nodelay(true)?;
        let (r, w) = s.into_split();
        Ok(Resp {
            r: BufReader::new(r),
            w,
            out: Vec::with_capacity(1 << 16),
        })
    }

    /// Queues a command (sent by [`Resp::flush`]).
    pub fn queue(&mut self, args: &[&str]) {
        self.out
            .extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
        for a in args {
            self.out
                .extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            self.out.extend_from_slice(a.as_bytes());
            self.out.extend_from_slice(b"\r\n");
        }
    }

    pub async fn flush(&mut self) -> anyhow::Result<()> {
        self.w.write_all(&self.out).await?;
        self.out.clear();
        Ok(())
    }

    pub async fn call(&mut self, args: &[&str]) -> anyhow::Result<Reply> {
        self.queue(args);
        self.flush().await?;
        self.read().await
    }

    pub async fn read(&mut self) -> anyhow::Result<Reply> {
        let mut line = String::new();
        if self.r.read_line(&mut line).await? == 0 {
            bail!("redis closed the connection");
        }
        let line = line.trim_end();
        let (kind, rest) = line.split_at(1.min(line.len()));
        Ok(match kind {
            "+" => Reply::Status(rest.into()),
            "-" => bail!("redis error: {rest}"),
            ":" => Reply::Int(rest.parse()?),
            "$" => {
                let n: i64 = rest.parse()?;
                if n < 0 {
                    Reply::Bulk(None)
                } else {
                    let mut b = vec![0u8; n as usize + 2];
                    self.r.read_exact(&mut b).await?;
                    b.truncate(n as usize);
                    Reply::Bulk(Some(b))
                }
            }
            "*" => {
                let n: i64 = rest.parse()?;
                let mut items = Vec::with_capacity(n.max(0) as usize);
                for _ in 0..n.max(0) {
                    items.push(Box::pin(self.read()).await?);
                }
                Reply::Array(items)
            }
            _ => bail!("unexpected RESP line {line:?}"),
        })
    }
}
