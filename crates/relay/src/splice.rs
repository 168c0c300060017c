//! Copying bytes between the two halves of a relayed flow, counting them,
//! and passing the end of one direction on as a half-close. Between a TCP
//! socket and a QUIC stream the bytes are not copied in user space: what
//! is read from TCP is handed to quinn as it is, and what quinn received
//! is written to TCP from quinn's own buffers.

use crate::limits::{Grant, Meter};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::FutureExt;
use std::future::Future;
use std::io::IoSlice;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The most one read takes.
const CHUNK: usize = 64 * 1024;

/// Adds `n` to every counter. Bytes are counted when read, before the
/// writer can pass them on: whoever sees them arrive (a user, a test, a
/// status poll) sees them counted, and bytes fetched over the link count
/// even if the other side has gone.
fn count<const N: usize>(counters: &[&AtomicU64; N], n: usize) {
    for c in counters {
        c.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// Copies until EOF, adding every chunk to each of `counters` (e.g. per
/// requester and total); then shuts the writer down so the other side sees
/// the half-close. Returns bytes copied.
pub async fn copy_counted<R, W, const N: usize>(
    mut r: R,
    mut w: W,
    counters: [&AtomicU64; N],
) -> std::io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        total += n as u64;
        count(&counters, n);
        w.write_all(&buf[..n]).await?;
    }
    w.shutdown().await?;
    Ok(total)
}

/// One read of at most `CHUNK` bytes, as far as `meter` (if any) grants:
/// `read(cx, granted)` is polled with the grant, and what it did not use
/// goes back at once. A read that waits holds no grant, so a direction
/// with nothing to move never starves the other of a shared allowance.
async fn metered<T>(
    meter: Option<&Meter>,
    mut read: impl FnMut(&mut Context<'_>, usize) -> Poll<std::io::Result<(T, usize)>>,
) -> std::io::Result<T> {
    let Some(m) = meter else {
        return std::future::poll_fn(|cx| read(cx, CHUNK))
            .await
            .map(|(t, _)| t);
    };
    loop {
        let wait = std::future::poll_fn(|cx| {
            let granted = match m.try_grant(CHUNK as u64) {
                Grant::Bytes(n) => usize::try_from(n).unwrap_or(CHUNK),
                Grant::Wait(d) => return Poll::Ready(Ok(Err(d))),
                Grant::Exhausted(reason) => {
                    return Poll::Ready(Err(std::io::Error::other(reason)));
                }
            };
            match read(cx, granted) {
                Poll::Ready(r) => {
                    let used = r.as_ref().map_or(0, |(_, n)| *n);
                    m.refund(granted.saturating_sub(used) as u64);
                    Poll::Ready(r.map(|(t, _)| Ok(t)))
                }
                Poll::Pending => {
                    m.refund(granted as u64);
                    Poll::Pending
                }
            }
        })
        .await?;
        match wait {
            Ok(t) => return Ok(t),
            Err(d) => tokio::time::sleep(d).await,
        }
    }
}

/// Chunks gathered from a QUIC stream for one write.
const GATHER: usize = 32;

/// Like [`copy_counted`] from a QUIC stream: quinn's received chunks are
/// written out as they are, as many as have arrived in one vectored
/// write. With a `meter`, moves only what it grants.
pub async fn from_quic<W, const N: usize>(
    mut r: quinn::RecvStream,
    meter: Option<&Meter>,
    mut w: W,
    counters: [&AtomicU64; N],
) -> std::io::Result<u64>
where
    W: AsyncWrite + Unpin,
{
    let mut total = 0u64;
    let mut chunks: Vec<Bytes> = Vec::with_capacity(GATHER);
    let mut end = false;
    while !end {
        // Wait for one chunk, then take what else has already arrived. An
        // error after some have arrived is returned once they are written.
        let mut used = 0;
        let mut failed = None;
        while chunks.len() < GATHER && used < CHUNK {
            let first = chunks.is_empty();
            let read = metered(meter, |cx, max| {
                let max = if first { max } else { max.min(CHUNK - used) };
                let mut f = std::pin::pin!(r.read_chunk(max, true));
                match f.as_mut().poll(cx) {
                    Poll::Ready(Ok(c)) => {
                        let n = c.as_ref().map_or(0, |c| c.bytes.len());
                        Poll::Ready(Ok((c, n)))
                    }
                    Poll::Ready(Err(e)) => Poll::Ready(Err(e.into())),
                    Poll::Pending => Poll::Pending,
                }
            });
            let next = if first {
                read.await
            } else {
                match read.now_or_never() {
                    Some(next) => next,
                    None => break,
                }
            };
            match next {
                Err(e) => {
                    failed = Some(e);
                    break;
                }
                Ok(Some(c)) => {
                    used += c.bytes.len();
                    chunks.push(c.bytes);
                }
                Ok(None) => {
                    end = true;
                    break;
                }
            }
        }
        total += used as u64;
        count(&counters, used);
        write_all_chunks(&mut w, &mut chunks).await?;
        if let Some(e) = failed {
            return Err(e);
        }
    }
    w.shutdown().await?;
    Ok(total)
}

/// Writes every chunk, in as few system calls as the writer allows;
/// leaves `chunks` empty.
async fn write_all_chunks<W: AsyncWrite + Unpin>(
    w: &mut W,
    chunks: &mut Vec<Bytes>,
) -> std::io::Result<()> {
    let mut i = 0;
    while i < chunks.len() {
        let slices: Vec<IoSlice<'_>> = chunks[i..].iter().map(|b| IoSlice::new(b)).collect();
        let mut n = w.write_vectored(&slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while n > 0 {
            let len = chunks[i].len();
            if n >= len {
                n -= len;
                i += 1;
            } else {
                chunks[i].advance(n);
                n = 0;
            }
        }
    }
    chunks.clear();
    Ok(())
}

/// Like [`copy_counted`] into a QUIC stream: each read lands in a buffer
/// that quinn then keeps until the peer has it, so nothing is copied on
/// the way in. With a `meter`, moves only what it grants. The stream is
/// finished at EOF.
pub async fn to_quic<R, const N: usize>(
    mut r: R,
    meter: Option<&Meter>,
    mut w: quinn::SendStream,
    counters: [&AtomicU64; N],
) -> std::io::Result<u64>
where
    R: AsyncRead + Unpin,
{
    let mut buf = BytesMut::new();
    let mut total = 0u64;
    loop {
        // Small reads share one allocation; a new one is made only when
        // what is left of it is too small to be worth a read.
        if buf.capacity() < CHUNK / 4 {
            buf.reserve(CHUNK);
        }
        let n = metered(meter, |cx, max| {
            let room = max.min(buf.capacity());
            let mut limited = (&mut buf).limit(room);
            match tokio_util::io::poll_read_buf(std::pin::Pin::new(&mut r), cx, &mut limited) {
                Poll::Ready(Ok(n)) => Poll::Ready(Ok((n, n))),
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            }
        })
        .await?;
        if n == 0 {
            break;
        }
        total += n as u64;
        count(&counters, n);
        w.write_chunk(buf.split().freeze())
            .await
            .map_err(std::io::Error::from)?;
    }
    w.finish().map_err(std::io::Error::other)?;
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::Allowance;
    use crate::tls;
    use std::net::SocketAddr;
    use std::sync::Arc;
    use tokio::net::{TcpListener, TcpStream};

    /// What keeps a QUIC connection open while a test uses its streams:
    /// dropping the last handle closes it, unsent data and all.
    type Keep = (
        quinn::Endpoint,
        quinn::Endpoint,
        quinn::Connection,
        quinn::Connection,
    );

    /// A QUIC endpoint on loopback, configured as the relay's are.
    fn endpoint(server: Option<quinn::ServerConfig>) -> quinn::Endpoint {
        let socket = tls::quic_socket(SocketAddr::from(([127, 0, 0, 1], 0))).expect("socket");
        tls::endpoint(socket, server).expect("endpoint")
    }

    /// A QUIC stream pair over loopback: (client's send, server's recv).
    async fn quic_pair() -> (Keep, quinn::SendStream, quinn::RecvStream) {
        let (cfg, pin) = tls::server_config().expect("server tls");
        let server = endpoint(Some(cfg));
        let addr = server.local_addr().expect("addr");
        let mut client = endpoint(None);
        client.set_default_client_config(tls::client_config(pin).expect("client tls"));
        let accept = async {
            let conn = server
                .accept()
                .await
                .expect("incoming")
                .await
                .expect("conn");
            let s = conn.accept_uni().await.expect("stream");
            (conn, s)
        };
        let open = async {
            let conn = client
                .connect(addr, "bandshare-relay")
                .expect("connect")
                .await
                .expect("conn");
            let mut s = conn.open_uni().await.expect("open");
            // A stream is announced to the peer with its first byte.
            s.write_all(b"h").await.expect("first byte");
            (conn, s)
        };
        let ((sc, mut recv), (cc, send)) = tokio::join!(accept, open);
        let mut h = [0u8; 1];
        recv.read_exact(&mut h).await.expect("first byte");
        ((server, client, sc, cc), send, recv)
    }

    async fn tcp_pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let a = l.local_addr().expect("addr");
        let (c, s) = tokio::join!(TcpStream::connect(a), l.accept());
        (c.expect("connect"), s.expect("accept").0)
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    #[tokio::test]
    async fn tcp_to_quic_to_tcp_arrives_whole_and_counted() {
        let data = pattern(3_000_003);
        let (_keep, send, recv) = quic_pair().await;
        let (mut app, tcp_in) = tcp_pair().await;
        let (tcp_out, mut sink) = tcp_pair().await;
        let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
        let writer = async {
            app.write_all(&data).await.expect("write");
            app.shutdown().await.expect("half-close");
        };
        let reader = async {
            let mut got = vec![];
            sink.read_to_end(&mut got).await.expect("read");
            got
        };
        let (_, moved_in, moved_out, got) = tokio::join!(
            writer,
            to_quic(tcp_in, None, send, [&up]),
            from_quic(recv, None, tcp_out, [&down]),
            reader
        );
        assert_eq!(moved_in.expect("into quic"), data.len() as u64);
        assert_eq!(moved_out.expect("out of quic"), data.len() as u64);
        assert_eq!(up.load(Ordering::Relaxed), data.len() as u64);
        assert_eq!(down.load(Ordering::Relaxed), data.len() as u64);
        assert!(got == data, "bytes arrive in order and unchanged");
    }

    /// Loopback carries 64 KiB datagrams: path MTU discovery must get past
    /// Ethernet's 1,472 bytes of payload there (each side advertises what
    /// it accepts, and quinn's default advertisement would cap it), with a
    /// bulk transfer running (whose losses must not hold it at 1,200).
    #[tokio::test]
    async fn path_mtu_discovery_goes_past_ethernet_on_loopback() {
        let ((_, _, _, cc), mut send, mut recv) = quic_pair().await;
        let data = pattern(8 << 20);
        let reader = async { recv.read_to_end(usize::MAX).await.expect("read").len() };
        let writer = async {
            send.write_all(&data).await.expect("write");
            send.finish().expect("finish");
        };
        let (_, n) = tokio::join!(writer, reader);
        assert_eq!(n, data.len());
        // Discovery runs in the background; give it a few round trips.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while cc.stats().path.current_mtu <= 1472 && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let client = cc.stats().path;
        assert!(
            client.current_mtu > 1472,
            "client path MTU {} (black holes detected: {}, probes {})",
            client.current_mtu,
            client.black_holes_detected,
            client.sent_plpmtud_probes
        );
    }

    #[tokio::test]
    async fn a_meter_stops_both_directions_at_the_allowance_with_its_reason() {
        const QUOTA: u64 = 100_000;
        let quota = Arc::new(Allowance::new(QUOTA, false, "ticket byte quota used up"));
        let meter = Meter {
            bucket: None,
            allowances: vec![quota.clone()],
        };
        let data = pattern(300_000);
        let (_keep, send, recv) = quic_pair().await;
        let (mut app, tcp_in) = tcp_pair().await;
        let (tcp_out, mut sink) = tcp_pair().await;
        let none = AtomicU64::new(0);
        // In: stops at the quota with the reason.
        let writer = async {
            let _ = app.write_all(&data).await;
            app
        };
        let (_app, moved) = tokio::join!(writer, to_quic(tcp_in, Some(&meter), send, [&none]));
        let err = moved.expect_err("the quota ends it");
        assert_eq!(err.to_string(), "ticket byte quota used up");
        assert_eq!(quota.used(), QUOTA, "exactly the quota, never more");
        assert_eq!(none.load(Ordering::Relaxed), QUOTA);

        // Out, under an allowance of half that: exactly half arrives, in
        // order, and the flow ends with that allowance's reason.
        let half = Meter {
            bucket: None,
            allowances: vec![Arc::new(Allowance::new(QUOTA / 2, false, "daily cap"))],
        };
        let reader = async {
            let mut got = vec![];
            let _ = sink.read_to_end(&mut got).await;
            got
        };
        let (moved, got) = tokio::join!(from_quic(recv, Some(&half), tcp_out, [&none]), reader);
        assert_eq!(moved.expect_err("the cap ends it").to_string(), "daily cap");
        assert_eq!(got.len() as u64, QUOTA / 2);
        assert!(data.starts_with(&got));
    }
}
