//! A local HTTP/1.1 target that answers every GET with a small page naming
//! the path (or, for `/bytes/N`, N bytes), so a fetch through bandshare can be checked end to end. Also a
//! minimal GET over SOCKS5, for the demo on machines without curl.

use anyhow::{Context, bail};
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub struct HttpTarget {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for HttpTarget {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub const PAGE_TITLE: &str = "bandshare test page";

impl HttpTarget {
    pub async fn start() -> anyhow::Result<HttpTarget> {
        Self::serve(TcpListener::bind("127.0.0.1:0").await?)
    }

    /// Serves on a listener made elsewhere (e.g. inside a network namespace).
    pub fn serve_std(l: std::net::TcpListener) -> anyhow::Result<HttpTarget> {
        l.set_nonblocking(true)?;
        Self::serve(TcpListener::from_std(l)?)
    }

    fn serve(l: TcpListener) -> anyhow::Result<HttpTarget> {
        let addr = l.local_addr()?;
        let task = tokio::spawn(async move {
            while let Ok((s, from)) = l.accept().await {
                tokio::spawn(serve(s, from));
            }
        });
        Ok(HttpTarget { addr, task })
    }
}

async fn serve(mut s: TcpStream, from: SocketAddr) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 16384 {
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let head = String::from_utf8_lossy(&buf);
    let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
    // `/bytes/N`: N bytes of body, for quota and rate measurements.
    if let Some(n) = path
        .strip_prefix("/bytes/")
        .and_then(|n| n.parse::<u64>().ok())
    {
        let n = n.min(4 << 30);
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n"
        );
        if s.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        let chunk = vec![b'x'; 64 * 1024];
        let mut left = n;
        while left > 0 {
            let k = left.min(chunk.len() as u64) as usize;
            if s.write_all(&chunk[..k]).await.is_err() {
                return;
            }
            left -= k as u64;
        }
        let _ = s.shutdown().await;
        return;
    }
    let body = format!(
        "<html><head><title>{PAGE_TITLE}</title></head><body><h1>Hello through bandshare</h1><p>path {path}</p><p>from {}</p></body></html>\n",
        from.ip()
    );
    let resp = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = s.write_all(resp.as_bytes()).await;
    let _ = s.shutdown().await;
}

/// GET `http://host:port/path` through the SOCKS5 proxy at `socks`, the
/// host name resolved by the sharer. Returns (status line, body).
pub async fn socks_get(
    socks: SocketAddr,
    host: &str,
    port: u16,
    path: &str,
) -> anyhow::Result<(String, String)> {
    let mut s = TcpStream::connect(socks)
        .await
        .context("connect to SOCKS port")?;
    s.write_all(&[5, 1, 0]).await?;
    let mut two = [0u8; 2];
    s.read_exact(&mut two).await?;
    if two != [5, 0] {
        bail!("SOCKS greeting refused: {two:?}");
    }
    let mut req = vec![5, 1, 0, 3, host.len() as u8];
    req.extend_from_slice(host.as_bytes());
    req.extend_from_slice(&port.to_be_bytes());
    s.write_all(&req).await?;
    let mut rep = [0u8; 10];
    s.read_exact(&mut rep).await?;
    if rep[1] != 0 {
        bail!(
            "SOCKS reply {:#04x}: {}",
            rep[1],
            bandshare_relay::wire::reply::describe(rep[1])
        );
    }
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).await?;
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    Ok((
        head.lines().next().unwrap_or_default().to_string(),
        body.to_string(),
    ))
}
