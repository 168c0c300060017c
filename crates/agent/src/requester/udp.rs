//! UDP for local apps: SOCKS5 UDP ASSOCIATE (RFC 1928 §7) on the proxy
//! port. Each association gets a local UDP socket the client sends its
//! datagrams to; each datagram goes on the path new flows take — out of the
//! own link from the association's own socket, or as a QUIC datagram to the
//! active sharer (see `bandshare_relay::datagram`), which sends it on under
//! the same ticket and egress policy. Replies come back the same way. A
//! datagram follows the active member: when the pool fails over, the next
//! datagram of the same association goes through the next sharer.

use super::direct::Direct;
use super::own_link::Path;
use super::pool::{Member, Pool};
use super::socks;
use bandshare_relay::FlowHeader;
use bandshare_relay::datagram::Udp;
use bandshare_relay::wire::Host;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tracing::{debug, info};

/// Replies waiting for an association, at most (then dropped and counted).
const QUEUE: usize = 256;

/// A reply on its way to an association: its source and payload.
type Reply = (SocketAddr, Vec<u8>);

/// Where replies from sharers go: one channel per association, by flow id.
#[derive(Default)]
pub struct Router {
    next: AtomicU32,
    routes: Mutex<HashMap<u32, mpsc::Sender<Reply>>>,
    /// Datagrams dropped: no association, a full queue, or the tunnel gone.
    pub dropped: AtomicU64,
    pub sent: AtomicU64,
    pub received: AtomicU64,
}

/// What `/status` shows of UDP.
#[derive(serde::Serialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpStatus {
    /// Associations open now.
    pub associations: usize,
    pub sent: u64,
    pub received: u64,
    pub dropped: u64,
}

impl Router {
    pub fn status(&self) -> UdpStatus {
        UdpStatus {
            associations: self.routes.lock().map_or(0, |r| r.len()),
            sent: self.sent.load(Ordering::Relaxed),
            received: self.received.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
        }
    }

    pub(super) fn open(&self) -> (u32, mpsc::Receiver<Reply>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(QUEUE);
        if let Ok(mut r) = self.routes.lock() {
            r.insert(id, tx);
        }
        (id, rx)
    }

    pub(super) fn close(&self, id: u32) {
        if let Ok(mut r) = self.routes.lock() {
            r.remove(&id);
        }
    }

    /// Reads a member's datagrams and hands each to its association until
    /// the member's tunnel closes.
    pub async fn follow(self: Arc<Self>, member: Arc<Member>) {
        while let Ok(frame) = member.tunnel.read_datagram().await {
            let Ok(d) = Udp::decode(&frame) else {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let Host::Ip(ip) = d.peer.host else {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let to = self
                .routes
                .lock()
                .ok()
                .and_then(|r| r.get(&d.flow).cloned());
            let sent = to.is_some_and(|tx| {
                tx.try_send((SocketAddr::new(ip, d.peer.port), d.payload.to_vec()))
                    .is_ok()
            });
            if !sent {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Serves one UDP ASSOCIATE: answers with the socket's address, relays
/// until the client closes its TCP connection (the association's life, as
/// RFC 1928 says).
pub async fn associate(
    mut tcp: TcpStream,
    pool: Arc<Pool>,
    direct: Arc<Direct>,
) -> std::io::Result<()> {
    let local = tcp.local_addr()?;
    let client_ip = tcp.peer_addr()?.ip();
    let socket = Arc::new(UdpSocket::bind(SocketAddr::new(local.ip(), 0)).await?);
    // Out of the own link: a socket of its own, any address family, marked
    // (in whole-device mode it keeps the original routes).
    let out = UdpSocket::from_std(bandshare_relay::mark::udp_bind_any()?)?;
    let bound = socket.local_addr()?;
    tokio::io::AsyncWriteExt::write_all(&mut tcp, &socks::reply_bound(bound)).await?;
    let router = pool.udp.clone();
    let (id, mut replies) = router.open();
    info!(flow = id, %bound, "UDP association open");
    let client: Mutex<Option<SocketAddr>> = Mutex::new(None);
    let to_client = |from: SocketAddr, data: &[u8]| {
        let c = client.lock().ok().and_then(|c| *c);
        let socket = socket.clone();
        let frame = socks::encode_udp(from, data);
        async move {
            if let Some(c) = c {
                let _ = socket.send_to(&frame, c).await;
            }
        }
    };
    let mut from_client = vec![0u8; 65_536];
    let mut from_out = vec![0u8; 65_536];
    let mut closed = [0u8; 1];
    loop {
        tokio::select! {
            got = socket.recv_from(&mut from_client) => {
                let (n, src) = got?;
                // Only the client that asked may use the association.
                if src.ip().to_canonical() != client_ip.to_canonical() {
                    continue;
                }
                if let Ok(mut c) = client.lock() {
                    c.get_or_insert(src);
                }
                let Ok((dest, data)) = socks::parse_udp(&from_client[..n]) else {
                    router.dropped.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                send(&pool, &direct, &out, id, &dest, data).await;
            }
            got = out.recv_from(&mut from_out) => {
                if let Ok((n, from)) = got {
                    to_client(from, &from_out[..n]).await;
                    router.received.fetch_add(1, Ordering::Relaxed);
                }
            }
            Some((from, data)) = replies.recv() => {
                to_client(from, &data).await;
                router.received.fetch_add(1, Ordering::Relaxed);
            }
            r = tcp.read(&mut closed) => {
                if matches!(r, Ok(0) | Err(_)) {
                    break;
                }
            }
        }
    }
    router.close(id);
    info!(flow = id, "UDP association closed");
    Ok(())
}

/// Sends one datagram on the path new flows take.
pub(super) async fn send(
    pool: &Pool,
    direct: &Direct,
    out: &UdpSocket,
    id: u32,
    dest: &FlowHeader,
    data: &[u8],
) {
    let router = &pool.udp;
    if direct.path() == Path::Direct {
        let to = match &dest.host {
            Host::Ip(ip) => Some(SocketAddr::new(*ip, dest.port)),
            Host::Name(n) => tokio::net::lookup_host((n.as_str(), dest.port))
                .await
                .ok()
                .and_then(|mut a| a.next()),
        };
        let to = to.map(|a| match (a, out.local_addr().map(|l| l.is_ipv6())) {
            (SocketAddr::V4(v4), Ok(true)) => {
                SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port())
            }
            (other, _) => other,
        });
        match to {
            Some(to) if out.send_to(data, to).await.is_ok() => {
                router.sent.fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                router.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        return;
    }
    let Some(m) = pool.active() else {
        router.dropped.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let frame = Udp {
        flow: id,
        peer: dest.clone(),
        payload: data,
    };
    match m.tunnel.send_udp(&frame).await {
        Ok(_) => {
            router.sent.fetch_add(1, Ordering::Relaxed);
            m.bytes_up.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        Err(e) => {
            debug!(sharer = %m.name, error = %e, "UDP datagram dropped");
            router.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}
