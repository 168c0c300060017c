//! Copying bytes between the two halves of a relayed flow, counting them,
//! and passing the end of one direction on as a half-close.

use std::sync::atomic::{AtomicU64, Ordering};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const CHUNK: usize = 64 * 1024;

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
        // Counted when read, before the writer can pass them on: whoever
        // sees the bytes arrive (a user, a test, a status poll) sees them
        // counted, and bytes fetched over the link count even if the
        // other side has gone.
        total += n as u64;
        for c in counters {
            c.fetch_add(n as u64, Ordering::Relaxed);
        }
        w.write_all(&buf[..n]).await?;
    }
    w.shutdown().await?;
    Ok(total)
}
