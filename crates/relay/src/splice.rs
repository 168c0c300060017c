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
        // Wait for one chunk, then take what else has already arrived.
        let mut used = 0;
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
                read.await?
            } else {
                match read.now_or_never() {
                    Some(next) => next?,
                    None => break,
                }
            };
            match next {
                Some(c) => {
                    used += c.bytes.len();
                    chunks.push(c.bytes);
                }
                None => {
                    end = true;
                    break;
                }
            }
        }
        total += used as u64;
        count(&counters, used);
        write_all_chunks(&mut w, &mut chunks).await?;
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
