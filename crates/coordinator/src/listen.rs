//! Every listener of the coordinator (gRPC, HTTP) accepts through here, so
//! no peer can hold its file descriptors: a connection must send its first
//! bytes within [`FIRST_BYTES_TIMEOUT`] or is closed; each source address
//! holds at most `max_per_source` connections; and when accept fails for
//! want of descriptors the loop backs off and says so once, while the
//! connections already open keep being served.

use bandshare_core::accept::AcceptFailures;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

/// A connection that has sent nothing by then is closed (HTTP/2 and TLS
/// clients speak first; so does every HTTP/1 client).
pub const FIRST_BYTES_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections open per source address, state by a listener's slots.
#[derive(Default)]
pub struct Sources {
    open: Mutex<HashMap<IpAddr, u32>>,
    /// Connections refused for being over the cap, or silent too long.
    pub refused: AtomicU64,
    pub silent: AtomicU64,
}

/// One connection's place in its source's count, given back on drop.
pub struct Slot {
    sources: Arc<Sources>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut m) = self.sources.open.lock()
            && let Some(n) = m.get_mut(&self.ip)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

impl Sources {
    fn take(self: &Arc<Self>, ip: IpAddr, max: u32) -> Option<Slot> {
        let mut m = self.open.lock().ok()?;
        let n = m.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(Slot {
            sources: self.clone(),
            ip,
        })
    }
}

/// An accepted TCP connection holding its slot.
pub struct Guarded {
    tcp: TcpStream,
    peer: SocketAddr,
    _slot: Slot,
}

impl Guarded {
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }
}

impl tonic::transport::server::Connected for Guarded {
    type ConnectInfo = Option<SocketAddr>;
    fn connect_info(&self) -> Self::ConnectInfo {
        Some(self.peer)
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }
}

/// Waits until the peer has sent at least one byte (not consumed).
async fn spoke(tcp: &TcpStream) -> bool {
    let mut b = [0u8; 1];
    matches!(tcp.peek(&mut b).await, Ok(n) if n > 0)
}

/// Accepts on `listener` for `what` ("grpc", "http") and hands over
/// connections that spoke in time, at most `max_per_source` per address;
/// runs until the receiver is dropped.
pub fn guarded(
    listener: TcpListener,
    what: &'static str,
    max_per_source: u32,
    sources: Arc<Sources>,
) -> tokio_stream::wrappers::ReceiverStream<Result<Guarded, std::io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(128);
    tokio::spawn(async move {
        let mut failures = AcceptFailures::default();
        loop {
            let accepted = tokio::select! {
                r = listener.accept() => r,
                _ = tx.closed() => return,
            };
            let (tcp, peer) = match accepted {
                Ok(x) => {
                    if failures.succeeded() {
                        info!(listener = what, "accepting connections again");
                    }
                    x
                }
                Err(e) => {
                    let retry = failures.failed(e.raw_os_error(), std::time::Instant::now());
                    if retry.warn {
                        warn!(listener = what, error = %e, "cannot accept: out of file descriptors; backing off, open connections are still served");
                    } else if retry.after.is_zero() {
                        debug!(listener = what, error = %e, "accept failed");
                    }
                    if retry.after.is_zero() {
                        tokio::task::yield_now().await;
                    } else {
                        tokio::time::sleep(retry.after).await;
                    }
                    continue;
                }
            };
            let Some(slot) =
                sources.take(bandshare_core::egress::canonical(peer.ip()), max_per_source)
            else {
                let n = sources.refused.fetch_add(1, Ordering::Relaxed);
                if n.is_power_of_two() {
                    warn!(listener = what, %peer, refused = n + 1, max_per_source, "connection refused: its address holds too many");
                }
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let (tx, sources) = (tx.clone(), sources.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(FIRST_BYTES_TIMEOUT, spoke(&tcp)).await {
                    Ok(true) => {
                        let _ = tx
                            .send(Ok(Guarded {
                                tcp,
                                peer,
                                _slot: slot,
                            }))
                            .await;
                    }
                    Ok(false) => debug!(listener = what, %peer, "closed before speaking"),
                    Err(_) => {
                        sources.silent.fetch_add(1, Ordering::Relaxed);
                        debug!(listener = what, %peer, "closed: sent nothing within 10 s");
                    }
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Serves HTTP/1 and HTTP/2 `app` on connections from `incoming`, with a
/// header deadline on every request (slow or idle keep-alive clients are
/// closed), until `stop` resolves.
pub async fn serve_http(
    mut incoming: tokio_stream::wrappers::ReceiverStream<Result<Guarded, std::io::Error>>,
    app: axum::Router,
    stop: impl std::future::Future<Output = ()>,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use tokio_stream::StreamExt;
    tokio::pin!(stop);
    loop {
        let conn = tokio::select! {
            c = incoming.next() => c,
            _ = &mut stop => return,
        };
        let Some(Ok(conn)) = conn else { return };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let mut b = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            b.http1()
                .timer(TokioTimer::new())
                .header_read_timeout(FIRST_BYTES_TIMEOUT);
            if let Err(e) = b.serve_connection(TokioIo::new(conn), service).await {
                debug!(error = %e, "http connection ended");
            }
        });
    }
}
