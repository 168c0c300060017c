//! The sharer's side of UDP: datagrams that arrive in QUIC DATAGRAM frames
//! (see [`crate::datagram`]) under the connection's ticket — or, when one
//! is too large for the path's DATAGRAM frames, alone on a unidirectional
//! stream ([`send_frame`], [`next_frame`]; never cut short). Each datagram's
//! destination is resolved and decided by the same egress policy as a TCP
//! flow; its bytes count against the same rate, quotas and daily cap. Each
//! flow id gets its own UDP socket on the sharer (its replies come back
//! with the same id) until it has been idle for [`IDLE`]. Per requester at
//! most [`MAX_FLOWS`] flows at once and [`MAX_PPS`] datagrams a second;
//! what is over is dropped and counted, never queued.

use crate::datagram::Udp;
use crate::limits::{Bucket, Meter};
use crate::state::{Counters, RelayState};
use crate::wire::{FlowHeader, Host};
use bytes::Bytes;
use serde::Serialize;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;
use tracing::debug;

/// A flow with no datagram either way for this long is closed.
pub const IDLE: Duration = Duration::from_secs(60);
/// UDP flows one requester may have open at once (over all its connections).
pub const MAX_FLOWS: usize = 256;
/// Datagrams a second one connection may send (a burst of as many).
pub const MAX_PPS: u64 = 5_000;

/// What happened to UDP datagrams at this sharer.
#[derive(Default, Debug)]
pub struct UdpStats {
    pub sent: AtomicU64,
    pub received: AtomicU64,
    /// Dropped: the egress policy refused the destination.
    pub denied: AtomicU64,
    /// Dropped: over the packet rate, the byte rate or a quota.
    pub over_limit: AtomicU64,
    /// Dropped: the requester had [`MAX_FLOWS`] flows open.
    pub too_many_flows: AtomicU64,
    /// Dropped: not a valid datagram frame.
    pub malformed: AtomicU64,
    /// Replies too large for a DATAGRAM frame, sent on a stream instead.
    pub streamed: AtomicU64,
}

/// The same, as numbers.
#[derive(Serialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UdpCounts {
    pub sent: u64,
    pub received: u64,
    pub denied: u64,
    pub over_limit: u64,
    pub too_many_flows: u64,
    pub malformed: u64,
    pub streamed: u64,
}

impl UdpStats {
    pub fn counts(&self) -> UdpCounts {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        UdpCounts {
            sent: l(&self.sent),
            received: l(&self.received),
            denied: l(&self.denied),
            over_limit: l(&self.over_limit),
            too_many_flows: l(&self.too_many_flows),
            malformed: l(&self.malformed),
            streamed: l(&self.streamed),
        }
    }
}

fn bump(a: &AtomicU64) {
    a.fetch_add(1, Ordering::Relaxed);
}

/// One connection's UDP flows.
struct Flows {
    open: Mutex<HashMap<u32, Arc<Flow>>>,
    /// UDP flows of this requester over all its connections.
    per_requester: Arc<AtomicU64>,
}

struct Flow {
    socket: Arc<UdpSocket>,
    last: Mutex<Instant>,
}

impl Flow {
    fn touch(&self) {
        if let Ok(mut l) = self.last.lock() {
            *l = Instant::now();
        }
    }

    fn idle_for(&self) -> Duration {
        self.last.lock().map_or(IDLE, |l| l.elapsed())
    }
}

/// The largest frame read from a stream: a whole UDP datagram and its
/// header.
const MAX_STREAMED: usize = 65_535 + 300;
/// How long a frame on a stream may take to arrive whole.
const STREAM_WAIT: Duration = Duration::from_secs(1);

/// How [`send_frame`] sent a frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Sent {
    Datagram,
    Stream,
}

/// Sends one encoded frame: in a DATAGRAM frame where it fits the path,
/// otherwise alone on a unidirectional stream. `Err` when the connection
/// is gone or takes no datagrams.
pub async fn send_frame(conn: &quinn::Connection, frame: Vec<u8>) -> Result<Sent, String> {
    let Some(max) = conn.max_datagram_size() else {
        return Err("the peer takes no datagrams".into());
    };
    if frame.len() <= max {
        return conn
            .send_datagram(Bytes::from(frame))
            .map(|_| Sent::Datagram)
            .map_err(|e| e.to_string());
    }
    let mut s = conn.open_uni().await.map_err(|e| e.to_string())?;
    s.write_all(&frame).await.map_err(|e| e.to_string())?;
    s.finish().map_err(|e| e.to_string())?;
    Ok(Sent::Stream)
}

/// The next frame from the peer: a DATAGRAM frame, or a unidirectional
/// stream read to its end. A stream cut short, too long or too slow gives
/// an empty frame (which does not decode: the caller counts it).
pub async fn next_frame(conn: &quinn::Connection) -> Result<Bytes, quinn::ConnectionError> {
    tokio::select! {
        d = conn.read_datagram() => d,
        s = conn.accept_uni() => {
            let mut s = s?;
            match tokio::time::timeout(STREAM_WAIT, s.read_to_end(MAX_STREAMED)).await {
                Ok(Ok(b)) => Ok(Bytes::from(b)),
                _ => Ok(Bytes::new()),
            }
        }
    }
}

/// Destinations already decided on this connection (a name is resolved
/// once), at most this many.
const DECIDED: usize = 1024;

/// Relays the connection's datagrams until it closes.
pub(crate) async fn serve(
    conn: quinn::Connection,
    shared: Arc<RelayState>,
    counters: Arc<Counters>,
    meter: Meter,
    per_requester: Arc<AtomicU64>,
) {
    let flows = Arc::new(Flows {
        open: Mutex::new(HashMap::new()),
        per_requester,
    });
    let mut decided: HashMap<FlowHeader, Option<SocketAddr>> = HashMap::new();
    let mut pps = Bucket::new(MAX_PPS, MAX_PPS);
    while let Ok(d) = next_frame(&conn).await {
        let stats = &shared.udp;
        let Ok(udp) = Udp::decode(&d) else {
            bump(&stats.malformed);
            continue;
        };
        if pps.take(1, tokio::time::Instant::now()) != Ok(1)
            || !meter.admit_whole(udp.payload.len() as u64)
        {
            bump(&stats.over_limit);
            continue;
        }
        if decided.len() > DECIDED {
            decided.clear();
        }
        let to = match decided.get(&udp.peer) {
            Some(a) => *a,
            None => {
                let a = destination(&udp.peer, &shared).await;
                decided.insert(udp.peer.clone(), a);
                a
            }
        };
        let Some(to) = to else {
            bump(&stats.denied);
            continue;
        };
        let Some(flow) = flow_for(&conn, &flows, udp.flow, &shared, &counters, &meter) else {
            bump(&stats.too_many_flows);
            continue;
        };
        flow.touch();
        if flow.socket.send_to(udp.payload, to).await.is_ok() {
            bump(&stats.sent);
            let n = udp.payload.len() as u64;
            counters.up.fetch_add(n, Ordering::Relaxed);
            shared.total.fetch_add(n, Ordering::Relaxed);
        }
    }
    // The connection is gone: its flows close (their readers end).
    if let Ok(mut open) = flows.open.lock() {
        flows
            .per_requester
            .fetch_sub(open.len() as u64, Ordering::Relaxed);
        open.clear();
    }
}

/// The address `peer` stands for, if the egress policy allows it.
async fn destination(peer: &FlowHeader, shared: &RelayState) -> Option<SocketAddr> {
    match crate::dial::allowed(peer, &shared.egress, &shared.own).await {
        Ok(addrs) => addrs.first().copied(),
        Err((_, why)) => {
            debug!(peer = %peer.host, port = peer.port, %why, "UDP datagram refused");
            None
        }
    }
}

/// The flow `id`; a new one (with its socket and the reader of its
/// replies) if the requester has room.
fn flow_for(
    conn: &quinn::Connection,
    flows: &Arc<Flows>,
    id: u32,
    shared: &Arc<RelayState>,
    counters: &Arc<Counters>,
    meter: &Meter,
) -> Option<Arc<Flow>> {
    let mut open = flows.open.lock().ok()?;
    if let Some(f) = open.get(&id) {
        return Some(f.clone());
    }
    if flows.per_requester.load(Ordering::Relaxed) >= MAX_FLOWS as u64 {
        return None;
    }
    // Dual stack where the machine has IPv6, so one socket reaches both.
    let std = crate::mark::udp_bind_any().ok()?;
    let flow = Arc::new(Flow {
        socket: Arc::new(UdpSocket::from_std(std).ok()?),
        last: Mutex::new(Instant::now()),
    });
    flows.per_requester.fetch_add(1, Ordering::Relaxed);
    open.insert(id, flow.clone());
    tokio::spawn(replies(
        conn.clone(),
        flows.clone(),
        id,
        flow.clone(),
        shared.clone(),
        counters.clone(),
        meter.clone(),
    ));
    Some(flow)
}

/// Sends a flow's replies back in datagram frames until it is idle for
/// [`IDLE`]; then the flow closes.
async fn replies(
    conn: quinn::Connection,
    flows: Arc<Flows>,
    id: u32,
    flow: Arc<Flow>,
    shared: Arc<RelayState>,
    counters: Arc<Counters>,
    meter: Meter,
) {
    let mut buf = vec![0u8; 65_536];
    loop {
        let left = IDLE.saturating_sub(flow.idle_for());
        let (n, from) = match tokio::time::timeout(left, flow.socket.recv_from(&mut buf)).await {
            Ok(Ok(x)) => x,
            Ok(Err(_)) => continue,
            Err(_) if flow.idle_for() >= IDLE => break,
            Err(_) => continue,
        };
        flow.touch();
        let from = SocketAddr::new(from.ip().to_canonical(), from.port());
        let frame = Udp {
            flow: id,
            peer: FlowHeader {
                host: Host::Ip(from.ip()),
                port: from.port(),
            },
            payload: &buf[..n],
        };
        let Ok(bytes) = frame.encode() else { continue };
        if !meter.admit_whole(n as u64) {
            bump(&shared.udp.over_limit);
            continue;
        }
        match send_frame(&conn, bytes).await {
            Ok(Sent::Datagram) => {}
            Ok(Sent::Stream) => bump(&shared.udp.streamed),
            Err(_) => break,
        }
        bump(&shared.udp.received);
        counters.down.fetch_add(n as u64, Ordering::Relaxed);
        shared.total.fetch_add(n as u64, Ordering::Relaxed);
    }
    if let Ok(mut open) = flows.open.lock()
        && open.get(&id).is_some_and(|f| Arc::ptr_eq(f, &flow))
    {
        open.remove(&id);
        flows.per_requester.fetch_sub(1, Ordering::Relaxed);
    }
}
