//! The local side of the requester: SOCKS5 and HTTP CONNECT on one port
//! (told apart by the first byte), and fixed port forwards. Each accepted
//! connection becomes one flow through the pool's active sharer.

use super::direct::{Dialed, Direct};
use super::own_link::{Path, Via};
use super::pool::{OpenFlow, Pool};
use super::socks::{self, Parse, ProxyError};
use bandshare_core::accept::AcceptFailures;
use bandshare_relay::splice::{copy_counted, from_quic, to_quic};
use bandshare_relay::wire::reply;
use bandshare_relay::{FlowError, FlowHeader, Tunnel};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{Instrument, debug, info, info_span, warn};

const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// The two paths a flow can take: the own link and the pool of sharers.
#[derive(Clone)]
pub struct Paths {
    pub pool: Arc<Pool>,
    pub direct: Arc<Direct>,
}

/// Why a request head could not be read: what the client sent, or the
/// connection.
#[derive(Debug, thiserror::Error)]
enum HeadError {
    #[error(transparent)]
    Parse(#[from] ProxyError),
    #[error("{0}")]
    Io(String),
}

/// Why one local client's connection ended early: logged, never fatal.
#[derive(Debug, thiserror::Error)]
enum Ended {
    #[error(transparent)]
    Head(#[from] HeadError),
    #[error("SOCKS4 client: only SOCKS5 is supported")]
    Socks4,
    #[error("unknown protocol (first byte {0:#04x})")]
    UnknownProtocol(u8),
    #[error("client too slow to send its request")]
    Slow,
    #[error("client closed")]
    Closed,
    #[error("{target}: {error}")]
    Open { target: String, error: FlowError },
    #[error("flow via {via} ended: {error}")]
    Cut { via: String, error: std::io::Error },
    #[error("{target} (direct): {reason}")]
    Direct { target: String, reason: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl Ended {
    /// How `/metrics` counts it: a refusal's reason, `cut`, or `None` for
    /// an ordinary end.
    fn counted(&self) -> Option<&'static str> {
        match self {
            Ended::Head(_) | Ended::Socks4 | Ended::UnknownProtocol(_) | Ended::Slow => {
                Some("bad_request")
            }
            Ended::Open { error, .. } => Some(match error {
                FlowError::Refused(..) => "sharer_refused",
                FlowError::Lost(_) => "no_path",
                FlowError::Target(_) => "bad_target",
            }),
            Ended::Direct { .. } => Some("direct_refused"),
            Ended::Cut { .. } => Some("cut"),
            Ended::Closed | Ended::Io(_) => None,
        }
    }

    /// Counts it on `pool`'s counters.
    fn count(&self, pool: &Pool) {
        match self.counted() {
            Some("cut") => {
                pool.counters
                    .cut
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Some(reason) => pool.counters.refused(reason),
            None => {}
        }
    }
}

/// Reads until `parse` has a value; returns it and the bytes after it.
async fn read_until<T>(
    tcp: &mut TcpStream,
    buf: &mut Vec<u8>,
    parse: impl Fn(&[u8]) -> Result<Parse<T>, ProxyError>,
) -> Result<T, HeadError> {
    loop {
        match parse(buf)? {
            Parse::Done(v, used) => {
                buf.drain(..used);
                return Ok(v);
            }
            Parse::Incomplete => {
                if buf.len() > socks::MAX_HEAD {
                    return Err(HeadError::Parse(ProxyError::TooLarge));
                }
                let mut chunk = [0u8; 1024];
                let n = tcp
                    .read(&mut chunk)
                    .await
                    .map_err(|e| HeadError::Io(e.to_string()))?;
                if n == 0 {
                    return Err(HeadError::Io(
                        "client closed before the request was complete".into(),
                    ));
                }
                buf.extend_from_slice(&chunk[..n]);
            }
        }
    }
}

enum Dialect {
    Socks,
    Http,
}

/// What to answer the client for a failed flow.
fn failure_code(e: &FlowError) -> u8 {
    match e {
        FlowError::Refused(code, _) => *code,
        FlowError::Lost(_) => reply::NETWORK_UNREACHABLE,
        FlowError::Target(_) => reply::ADDRESS_TYPE,
    }
}

fn http_status(code: u8) -> &'static str {
    match code {
        reply::OK => "200 Connection established",
        reply::NOT_ALLOWED => "403 Forbidden",
        reply::TTL_EXPIRED => "504 Gateway Timeout",
        reply::NETWORK_UNREACHABLE => "503 Service Unavailable",
        _ => "502 Bad Gateway",
    }
}

/// Answers the local client; an HTTP client also gets the sharer's reason
/// for a refusal in the body (SOCKS5 has only the code; the log has it).
async fn answer(
    tcp: &mut TcpStream,
    dialect: &Dialect,
    code: u8,
    reason: &str,
) -> std::io::Result<()> {
    match dialect {
        Dialect::Socks => tcp.write_all(&socks::reply(code)).await,
        Dialect::Http => {
            let body = if code == reply::OK {
                String::new()
            } else {
                format!("{}: {reason}\n", reply::describe(code))
            };
            let extra = if code == reply::OK {
                String::new()
            } else {
                format!("Content-Length: {}\r\nConnection: close\r\n", body.len())
            };
            tcp.write_all(format!("HTTP/1.1 {}\r\n{extra}\r\n{body}", http_status(code)).as_bytes())
                .await
        }
    }
}

/// Handles one local client of the proxy port.
async fn serve_proxy_client(mut tcp: TcpStream, paths: Paths) -> Result<(), Ended> {
    let mut buf = Vec::with_capacity(512);
    let head = async {
        let first = loop {
            if let Some(b) = buf.first() {
                break *b;
            }
            let mut chunk = [0u8; 512];
            let n = tcp.read(&mut chunk).await?;
            if n == 0 {
                return Err(Ended::Closed);
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        if first == 4 {
            // SOCKS4 or 4a: refuse in its own words at once, not by silence.
            let _ = tcp.write_all(&socks::SOCKS4_REJECTED).await;
            return Err(Ended::Socks4);
        }
        if first == 5 {
            read_until(&mut tcp, &mut buf, socks::parse_greeting).await?;
            tcp.write_all(&[5, 0]).await?;
            let target = match read_until(&mut tcp, &mut buf, socks::parse_command).await {
                Ok((socks::UDP_ASSOCIATE, _)) => return Ok(None),
                Ok((_, t)) => t,
                Err(e) => {
                    let code = match &e {
                        HeadError::Parse(p) => socks::request_error_code(p),
                        HeadError::Io(_) => 0x01,
                    };
                    let _ = tcp.write_all(&socks::reply(code)).await;
                    return Err(e.into());
                }
            };
            Ok(Some((Dialect::Socks, target)))
        } else if !first.is_ascii_uppercase() {
            // Neither SOCKS nor an HTTP method (a TLS hello, a stray
            // protocol): say so now instead of waiting for a blank line.
            let body = "this port speaks SOCKS5 and HTTP CONNECT only\n";
            let msg = format!(
                "HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            let _ = tcp.write_all(msg.as_bytes()).await;
            Err(Ended::UnknownProtocol(first))
        } else {
            match read_until(&mut tcp, &mut buf, socks::parse_http_connect).await {
                Ok(t) => Ok(Some((Dialect::Http, t))),
                Err(e) => {
                    let why = e.to_string();
                    let msg = format!(
                        "HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{why}\n",
                        why.len() + 1
                    );
                    let _ = tcp.write_all(msg.as_bytes()).await;
                    Err(e.into())
                }
            }
        }
    };
    let Some((dialect, target)) = tokio::time::timeout(HEAD_TIMEOUT, head)
        .await
        .map_err(|_| Ended::Slow)??
    else {
        // SOCKS5 UDP ASSOCIATE: the TCP connection holds the association.
        return Ok(super::udp::associate(tcp, paths.pool.clone(), paths.direct.clone()).await?);
    };
    relay_to(tcp, &paths, &target, Some(dialect), buf).await
}

/// Opens the flow on the path new flows take — out of the own link, or
/// through the pool when the own link is degraded or does not answer in
/// time — answers the client (if it speaks a proxy dialect), and splices
/// until both directions end.
async fn relay_to(
    mut tcp: TcpStream,
    paths: &Paths,
    target: &FlowHeader,
    dialect: Option<Dialect>,
    early: Vec<u8>,
) -> Result<(), Ended> {
    let pool = &*paths.pool;
    let direct = &*paths.direct;
    if direct.path() == Path::Direct {
        let refused = match direct.connect(target, pool).await {
            Dialed::Open(out, _watch) => {
                return direct_flow(tcp, out, direct, dialect, early).await;
            }
            Dialed::Refused(e) => Some((reply::REFUSED, e.to_string())),
            Dialed::NoPath(why) if direct.via() == Via::Direct => {
                Some((reply::NETWORK_UNREACHABLE, format!("own link: {why}")))
            }
            Dialed::NoPath(why) => {
                debug!(target_host = %target.host, port = target.port, %why, "direct path did not answer: through the pool");
                None
            }
        };
        if let Some((code, reason)) = refused {
            if let Some(d) = &dialect {
                let _ = answer(&mut tcp, d, code, &reason).await;
            }
            return Err(Ended::Direct {
                target: format!("{}:{}", target.host, target.port),
                reason,
            });
        }
    }
    // A port forward has no proxy reply to give, so its first bytes go
    // right behind the flow header; the sharer's reply is read after.
    let wait_reply = dialect.is_some();
    let opened = match pool.open_flow(target, wait_reply).await {
        Ok(ok) => ok,
        Err(e) => {
            if let FlowError::Refused(_, reason) = &e {
                warn!(target_host = %target.host, port = target.port, %reason, "sharer refused the flow");
            }
            if let Some(d) = &dialect {
                let reason = match &e {
                    FlowError::Refused(_, reason) => reason.clone(),
                    other => other.to_string(),
                };
                let _ = answer(&mut tcp, d, failure_code(&e), &reason).await;
            }
            return Err(Ended::Open {
                target: format!("{}:{}", target.host, target.port),
                error: e,
            });
        }
    };
    let OpenFlow {
        mut send,
        mut recv,
        member,
        replied,
        open: _open,
    } = opened;
    debug!(target_host = %target.host, port = target.port, via = %member.name, "flow open");
    pool.counters
        .pool_flows
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if let Some(d) = &dialect {
        answer(&mut tcp, d, reply::OK, "").await?;
    }
    if !early.is_empty() {
        send.write_all(&early).await.map_err(std::io::Error::from)?;
        member
            .bytes_up
            .fetch_add(early.len() as u64, std::sync::atomic::Ordering::Relaxed);
    }
    let _ = tcp.set_nodelay(true);
    let (r, w) = tcp.into_split();
    let up = to_quic(r, None, send, [&member.bytes_up, &pool.counters.pool_up]);
    let down = async {
        if !replied {
            // On refusal the flow ends; the client sees its connection close.
            Tunnel::read_reply(&mut recv)
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))?;
        }
        from_quic(
            recv,
            None,
            w,
            [&member.bytes_down, &pool.counters.pool_down],
        )
        .await
    };
    let (u, d) = tokio::join!(up, down);
    // A flow cut by a dying sharer ends here with an error the app sees as
    // a reset/close, never a hang.
    if let (Err(error), _) | (_, Err(error)) = (u, d) {
        return Err(Ended::Cut {
            via: member.name.to_string(),
            error,
        });
    }
    Ok(())
}

/// A flow out of the own link: answers the client, then splices, counting
/// bytes as the own link's.
async fn direct_flow(
    mut tcp: TcpStream,
    out: TcpStream,
    direct: &Direct,
    dialect: Option<Dialect>,
    early: Vec<u8>,
) -> Result<(), Ended> {
    if let Some(d) = &dialect {
        answer(&mut tcp, d, reply::OK, "").await?;
    }
    let (r, w) = tcp.into_split();
    let (or, mut ow) = out.into_split();
    if !early.is_empty() {
        ow.write_all(&early).await?;
        direct
            .bytes_up
            .fetch_add(early.len() as u64, std::sync::atomic::Ordering::Relaxed);
    }
    let none = std::sync::atomic::AtomicU64::new(0);
    let up = copy_counted(r, ow, [&direct.bytes_up, &none]);
    let down = copy_counted(or, w, [&direct.bytes_down, &none]);
    let (u, d) = tokio::join!(up, down);
    if let (Err(error), _) | (_, Err(error)) = (u, d) {
        return Err(Ended::Cut {
            via: "the own link".into(),
            error,
        });
    }
    Ok(())
}

/// Accepts the next connection; when accept fails for want of file
/// descriptors it backs off (logging once) instead of spinning, and the
/// flows already open keep going.
async fn accept(
    listener: &TcpListener,
    failures: &mut AcceptFailures,
    what: &'static str,
) -> (TcpStream, std::net::SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(x) => {
                if failures.succeeded() {
                    info!(listener = what, "accepting connections again");
                }
                return x;
            }
            Err(e) => {
                let retry = failures.failed(e.raw_os_error(), std::time::Instant::now());
                if retry.warn {
                    warn!(listener = what, error = %e, "cannot accept: out of file descriptors; backing off, open flows continue");
                }
                if retry.after.is_zero() {
                    tokio::task::yield_now().await;
                } else {
                    tokio::time::sleep(retry.after).await;
                }
            }
        }
    }
}

pub async fn serve_proxy(listener: TcpListener, paths: Paths) {
    let mut failures = AcceptFailures::default();
    loop {
        let (tcp, from) = accept(&listener, &mut failures, "proxy").await;
        let paths = paths.clone();
        tokio::spawn(
            async move {
                let pool = paths.pool.clone();
                if let Err(e) = serve_proxy_client(tcp, paths).await {
                    e.count(&pool);
                    debug!(error = %e, "proxy client ended");
                }
            }
            .instrument(info_span!("proxy_flow", %from)),
        );
    }
}

pub async fn serve_forward(listener: TcpListener, target: FlowHeader, paths: Paths) {
    let mut failures = AcceptFailures::default();
    loop {
        let (tcp, from) = accept(&listener, &mut failures, "forward").await;
        let (paths, target) = (paths.clone(), target.clone());
        tokio::spawn(
            async move {
                if let Err(e) = relay_to(tcp, &paths, &target, None, vec![]).await {
                    e.count(&paths.pool);
                    debug!(error = %e, "forward ended");
                }
            }
            .instrument(info_span!("forward_flow", %from)),
        );
    }
}
