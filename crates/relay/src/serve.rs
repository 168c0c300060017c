//! The sharer's relay, the async shell: accepts QUIC connections from
//! requesters, asks the [`Gate`](crate::admit::Gate) whether to admit each
//! hello (the certificate pin is checked requester side; the proof of key,
//! ticket, replay cache and consent capacity in `admit.rs`), spends the
//! byte allowances read by read (`limits.rs`), and relays each flow to a
//! destination the egress policy allows (`dial.rs`) over the sharer's own
//! uplink. Shared state lives in `state.rs`.

use crate::admit::Gate;
use crate::limits::{Allowance, Limits, Meter};
use crate::splice::{from_quic, to_quic};
use crate::state::{Counters, RelayHandle, RelayState, now_unix, uplink_of};
use crate::tls;
use crate::wire::{self, Hello, Opening, StreamOpen, reply};
use bandshare_core::{DeviceKey, EgressPolicy};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::{Instrument, debug, info, info_span, warn};

/// The QUIC handshake and the hello together must finish within this.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections one source address may hold open (or in handshake) at once.
pub const MAX_CONNS_PER_SOURCE: u32 = 16;
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Debug)]
pub struct RelayOptions {
    pub listen: SocketAddr,
    pub me: DeviceKey,
    pub egress: EgressPolicy,
    /// Distinct requesters served at once; 0 = no limit.
    pub max_requesters: u32,
    /// Connections per source address at once ([`MAX_CONNS_PER_SOURCE`]).
    pub max_conns_per_source: u32,
    /// Handshake plus hello deadline ([`HELLO_TIMEOUT`]).
    pub hello_timeout: Duration,
    /// Rate and byte limits of relayed traffic.
    pub limits: Limits,
    /// Bytes already relayed today (kept across restarts by the agent), so
    /// the daily cap holds.
    pub daily_used: u64,
}

impl RelayOptions {
    /// Options with the default limits.
    pub fn new(
        listen: SocketAddr,
        me: DeviceKey,
        egress: EgressPolicy,
        max_requesters: u32,
    ) -> Self {
        RelayOptions {
            listen,
            me,
            egress,
            max_requesters,
            max_conns_per_source: MAX_CONNS_PER_SOURCE,
            hello_timeout: HELLO_TIMEOUT,
            limits: Limits::default(),
            daily_used: 0,
        }
    }
}

pub struct Relay {
    endpoint: quinn::Endpoint,
    shared: Arc<RelayState>,
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("tls: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("cannot bind the relay on {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
}

impl Relay {
    /// Binds the UDP socket and makes a fresh certificate.
    pub fn bind(opts: RelayOptions) -> Result<Relay, RelayError> {
        let (cfg, pin) = tls::server_config()?;
        let socket = tls::quic_socket(opts.listen).map_err(|e| RelayError::Bind(opts.listen, e))?;
        let endpoint =
            tls::endpoint(socket, Some(cfg)).map_err(|e| RelayError::Bind(opts.listen, e))?;
        let egress = opts.egress;
        let shared = Arc::new(RelayState {
            pin,
            gate: Mutex::new(Gate::new(
                opts.me,
                pin,
                opts.max_requesters,
                opts.max_conns_per_source,
            )),
            egress,
            // Every address of this machine is off limits, whatever the
            // range, including addresses it gains after start.
            own: crate::own::OwnAddresses::new(),
            usage: Mutex::default(),
            total: AtomicU64::new(0),
            total_up: AtomicU64::new(0),
            total_down: AtomicU64::new(0),
            flows_refused: Default::default(),
            hello_timeout: opts.hello_timeout,
            refused_sources: AtomicU64::new(0),
            uplink: AtomicU32::new(0),
            limits: opts.limits,
            daily: Arc::new(
                Allowance::new(
                    opts.limits.daily_cap_bytes,
                    true,
                    format!(
                        "the sharer's daily data cap ({} bytes) is reached",
                        opts.limits.daily_cap_bytes
                    ),
                )
                .with_used(opts.daily_used),
            ),
            requesters: Mutex::default(),
            conns: Mutex::default(),
            udp: Default::default(),
            lanes: Mutex::default(),
        });
        Ok(Relay { endpoint, shared })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    pub fn handle(&self) -> RelayHandle {
        RelayHandle(self.shared.clone())
    }

    /// Serves until `shutdown` resolves, then closes every connection so
    /// requesters learn at once that this sharer is gone.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                incoming = self.endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    let source = bandshare_core::egress::canonical(incoming.remote_address().ip());
                    let Some(slot) = SourceSlot::take(&self.shared, source) else {
                        self.shared.refused_sources.fetch_add(1, Ordering::Relaxed);
                        debug!(%source, "refused: too many connections from this source");
                        incoming.refuse();
                        continue;
                    };
                    let shared = self.shared.clone();
                    let span = info_span!("relay_conn", from = %incoming.remote_address());
                    tokio::spawn(async move {
                        if let Err(e) = serve_connection(incoming, shared, slot).await {
                            debug!(error = %e, "connection ended");
                        }
                    }.instrument(span));
                }
            }
        }
        self.endpoint.close(0u32.into(), b"sharer leaving");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }
}

/// Releases a requester's slot when its connection ends.
struct ActiveGuard {
    shared: Arc<RelayState>,
    key: DeviceKey,
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        if let Ok(mut c) = self.shared.conns.lock()
            && let Some(list) = c.get_mut(&self.key)
        {
            list.retain(|c| c.close_reason().is_none());
            if list.is_empty() {
                c.remove(&self.key);
            }
        }
        if let Ok(mut g) = self.shared.gate() {
            g.leave(&self.key);
        }
    }
}

/// Admits a hello: the gate's checks, then today's allowances, then a
/// place among the requesters. `Err` is the reason told to the requester.
fn admit(shared: &Arc<RelayState>, hello: &Hello) -> Result<(DeviceKey, u64), String> {
    let (requester, ticket) = shared
        .gate()?
        .hello(hello, now_unix())
        .map_err(|r| r.to_string())?;
    if shared.daily.left() == 0 {
        return Err(shared.daily.reason().to_string());
    }
    let per = shared.requester(&requester)?;
    if per.quota.left() == 0 {
        return Err(per.quota.reason().to_string());
    }
    shared.gate()?.enter(requester).map_err(|r| r.to_string())?;
    Ok((requester, ticket.quota_bytes))
}

/// What every stream of one admitted connection shares.
struct Admitted {
    requester: DeviceKey,
    /// The byte quota of the connection's current ticket.
    ticket_quota: Arc<Allowance>,
    /// What a lane shows to join this connection (see [`serve_lane`]).
    lane_token: [u8; wire::LANE_TOKEN_LEN],
}

/// A renewal stream: a fresh ticket gives the connection its quota anew.
async fn renew(
    mut send: quinn::SendStream,
    ticket: &[u8],
    shared: &RelayState,
    admitted: &Admitted,
) -> Result<(), String> {
    let result = shared.gate().and_then(|mut g| {
        g.fresh_ticket(ticket, &admitted.requester, now_unix())
            .map_err(|r| r.to_string())
    });
    let reply = match &result {
        Ok(t) => {
            admitted.ticket_quota.grant_from_now(t.quota_bytes);
            info!(requester = %admitted.requester.short(), quota = t.quota_bytes, "ticket renewed on the connection");
            wire::encode_hello_reply(true, "")
        }
        Err(reason) => {
            warn!(requester = %admitted.requester.short(), %reason, "ticket renewal refused");
            wire::encode_hello_reply(false, reason)
        }
    };
    send.write_all(&reply).await.map_err(|e| e.to_string())?;
    let _ = send.finish();
    result.map(drop)
}

/// One connection slot of a source address, given back on drop.
struct SourceSlot {
    shared: Arc<RelayState>,
    source: std::net::IpAddr,
}

impl SourceSlot {
    fn take(shared: &Arc<RelayState>, source: std::net::IpAddr) -> Option<SourceSlot> {
        shared
            .gate()
            .ok()?
            .source_enter(source)
            .then(|| SourceSlot {
                shared: shared.clone(),
                source,
            })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        if let Ok(mut g) = self.shared.gate() {
            g.source_leave(&self.source);
        }
    }
}

/// Tells a peer why its hello was refused, gives the answer up to 2 s to
/// arrive, closes the connection and returns the reason.
async fn refuse(conn: &quinn::Connection, mut send: quinn::SendStream, reason: String) -> String {
    let _ = send
        .write_all(&wire::encode_hello_reply(false, &reason))
        .await;
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
    conn.close(1u32.into(), b"refused");
    reason
}

/// Lists `conn` under `requester`, so a revocation closes it; a revocation
/// that raced the admission closes it now.
fn follow_revocation(
    shared: &RelayState,
    conn: &quinn::Connection,
    requester: DeviceKey,
) -> Result<(), String> {
    if let Ok(mut c) = shared.conns.lock() {
        c.entry(requester).or_default().push(conn.clone());
    }
    if shared
        .gate()
        .map(|g| g.is_revoked(&requester))
        .unwrap_or(true)
    {
        conn.close(2u32.into(), b"requester revoked by the coordinator");
        return Err("requester revoked".into());
    }
    Ok(())
}

async fn serve_connection(
    incoming: quinn::Incoming,
    shared: Arc<RelayState>,
    slot: SourceSlot,
) -> Result<(), String> {
    // Handshake and hello share one deadline: a slow or silent peer holds
    // its slot at most this long.
    let hello = async {
        let conn = incoming.await.map_err(|e| e.to_string())?;
        let (send, mut recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
        let opening = Opening::read(&mut recv).await.map_err(|e| e.to_string())?;
        Ok::<_, String>((conn, send, recv, opening))
    };
    let (conn, mut send, recv, opening) = tokio::time::timeout(shared.hello_timeout, hello)
        .await
        .map_err(|_| "handshake or hello timed out".to_string())??;
    let hello = match opening {
        Opening::Hello(h) => h,
        Opening::Lane(token) => return serve_lane(conn, send, &token, shared, slot).await,
    };
    // The source's slot is held for as long as the connection lives.
    let _slot = slot;
    let (requester, quota) = match admit(&shared, &hello) {
        Ok(ok) => ok,
        Err(reason) => {
            warn!(%reason, "refused requester");
            return Err(refuse(&conn, send, reason).await);
        }
    };
    let _guard = ActiveGuard {
        shared: shared.clone(),
        key: requester,
    };
    follow_revocation(&shared, &conn, requester)?;
    info!(requester = %requester.short(), "requester admitted");
    send.write_all(&wire::encode_hello_reply(true, ""))
        .await
        .map_err(|e| e.to_string())?;
    // The hello stream stays open as the probe channel.
    tokio::spawn(echo_probes(send, recv, shared.clone()));
    let counters = shared
        .usage
        .lock()
        .map_err(|_| "poisoned".to_string())?
        .entry(requester)
        .or_default()
        .clone();
    let per = shared.requester(&requester)?;
    let admitted = Arc::new(Admitted {
        requester,
        ticket_quota: Arc::new(Allowance::new(quota, false, wire::QUOTA_USED_UP)),
        lane_token: lane_token()?,
    });
    let meter = Meter {
        bucket: per.bucket.clone(),
        allowances: vec![
            admitted.ticket_quota.clone(),
            per.quota.clone(),
            shared.daily.clone(),
        ],
    };
    tokio::spawn(crate::udp::serve(
        conn.clone(),
        shared.clone(),
        counters.clone(),
        meter.clone(),
        per.udp_flows.clone(),
    ));
    // Dropped first when the connection ends: its lanes close with it.
    let _lanes = LaneGuard::register(
        &shared,
        LaneGrant {
            counters: counters.clone(),
            meter: meter.clone(),
            admitted: admitted.clone(),
            lanes: vec![],
        },
    )?;
    serve_flows(&conn, &shared, &counters, &meter, &admitted).await
}

/// At most this many lanes join one admitted connection.
pub const MAX_LANES: usize = 3;

/// What a lane joining an admitted connection shares with it.
pub(crate) struct LaneGrant {
    counters: Arc<Counters>,
    meter: Meter,
    admitted: Arc<Admitted>,
    /// The lanes that joined (closed ones are dropped on the next join).
    lanes: Vec<quinn::Connection>,
}

/// A fresh lane token: 32 bytes from the system's random source.
fn lane_token() -> Result<[u8; wire::LANE_TOKEN_LEN], String> {
    use ring::rand::SecureRandom;
    let mut t = [0u8; wire::LANE_TOKEN_LEN];
    ring::rand::SystemRandom::new()
        .fill(&mut t)
        .map_err(|_| "no random bytes for a lane token".to_string())?;
    Ok(t)
}

/// Keeps an admitted connection's lane grant while it lives; on drop the
/// token stops working and every lane that joined is closed.
struct LaneGuard {
    shared: Arc<RelayState>,
    token: [u8; wire::LANE_TOKEN_LEN],
}

impl LaneGuard {
    fn register(shared: &Arc<RelayState>, grant: LaneGrant) -> Result<LaneGuard, String> {
        let token = grant.admitted.lane_token;
        shared
            .lanes
            .lock()
            .map_err(|_| "relay state poisoned".to_string())?
            .insert(token, grant);
        Ok(LaneGuard {
            shared: shared.clone(),
            token,
        })
    }
}

impl Drop for LaneGuard {
    fn drop(&mut self) {
        let grant = self
            .shared
            .lanes
            .lock()
            .ok()
            .and_then(|mut l| l.remove(&self.token));
        for lane in grant.map(|g| g.lanes).unwrap_or_default() {
            lane.close(0u32.into(), b"the admitted connection closed");
        }
    }
}

/// A lane: a further connection of an admitted requester, joined with the
/// token its admitted connection gave it. It carries flows under that
/// connection's ticket, quota and limits, and closes with it. Probes and
/// UDP stay on the admitted connection.
async fn serve_lane(
    conn: quinn::Connection,
    mut send: quinn::SendStream,
    token: &[u8; wire::LANE_TOKEN_LEN],
    shared: Arc<RelayState>,
    slot: SourceSlot,
) -> Result<(), String> {
    let joined = match shared.lanes.lock() {
        Err(_) => Err("relay state poisoned".to_string()),
        Ok(mut lanes) => match lanes.get_mut(token) {
            None => Err("unknown lane token (its connection is gone)".to_string()),
            Some(g) => {
                g.lanes.retain(|c| c.close_reason().is_none());
                if g.lanes.len() >= MAX_LANES {
                    Err(format!("at most {MAX_LANES} lanes per connection"))
                } else {
                    g.lanes.push(conn.clone());
                    Ok((g.counters.clone(), g.meter.clone(), g.admitted.clone()))
                }
            }
        },
    };
    let (counters, meter, admitted) = match joined {
        Ok(j) => j,
        Err(reason) => {
            warn!(%reason, "refused lane");
            return Err(refuse(&conn, send, reason).await);
        }
    };
    let requester = admitted.requester;
    follow_revocation(&shared, &conn, requester)?;
    // Lanes are bounded by their connection (at most MAX_LANES each), which
    // holds its source slot: a joined lane gives its own back, so lanes
    // never crowd out other devices behind the same address.
    drop(slot);
    send.write_all(&wire::encode_hello_reply(true, ""))
        .await
        .map_err(|e| e.to_string())?;
    let _ = send.finish();
    debug!(requester = %requester.short(), "lane joined");
    serve_flows(&conn, &shared, &counters, &meter, &admitted).await
}

/// Relays every flow the requester opens on `conn`, each on a task of its
/// own, until the connection ends.
async fn serve_flows(
    conn: &quinn::Connection,
    shared: &Arc<RelayState>,
    counters: &Arc<Counters>,
    meter: &Meter,
    admitted: &Arc<Admitted>,
) -> Result<(), String> {
    let requester = admitted.requester;
    loop {
        let (s, r) = conn.accept_bi().await.map_err(|e| e.to_string())?;
        let (shared, counters, meter, admitted) = (
            shared.clone(),
            counters.clone(),
            meter.clone(),
            admitted.clone(),
        );
        tokio::spawn(
            async move {
                if let Err(e) = relay_flow(s, r, &shared, &counters, &meter, &admitted).await {
                    debug!(error = %e, "flow ended with error");
                }
            }
            .instrument(info_span!("relay_flow", requester = %requester.short())),
        );
    }
}

/// Answers the requester's probes (8-byte frames) with the sequence number
/// and this sharer's uplink health, at most [`wire::MAX_PROBES_PER_S`] a
/// second, so the channel cannot be used to make the sharer send much.
async fn echo_probes(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    shared: Arc<RelayState>,
) {
    let mut frame = [0u8; wire::PROBE_LEN];
    let min_gap = Duration::from_secs(1) / wire::MAX_PROBES_PER_S;
    let mut last = tokio::time::Instant::now() - min_gap;
    while recv.read_exact(&mut frame).await.is_ok() {
        let since = last.elapsed();
        if since < min_gap {
            tokio::time::sleep(min_gap - since).await;
        }
        last = tokio::time::Instant::now();
        let answer = wire::encode_probe_reply(frame, uplink_of(&shared));
        if send.write_all(&answer).await.is_err() {
            break;
        }
    }
}

async fn relay_flow(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    shared: &RelayState,
    counters: &Counters,
    meter: &Meter,
    admitted: &Admitted,
) -> Result<(), String> {
    let opened = tokio::time::timeout(HEADER_TIMEOUT, StreamOpen::read(&mut recv))
        .await
        .map_err(|_| "flow header timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let header = match opened {
        StreamOpen::Flow(h) => h,
        StreamOpen::Renew(ticket) => return renew(send, &ticket, shared, admitted).await,
        StreamOpen::Lane => {
            send.write_all(&wire::encode_lane_grant(&admitted.lane_token))
                .await
                .map_err(|e| e.to_string())?;
            let _ = send.finish();
            return Ok(());
        }
    };
    counters.flows.fetch_add(1, Ordering::Relaxed);
    let (dialed, over_quota) = match meter.exhausted() {
        Some(reason) => (Err((reply::NOT_ALLOWED, reason.to_string())), true),
        None => (
            crate::dial::dial(&header, &shared.egress, &shared.own).await,
            false,
        ),
    };
    let tcp = match dialed {
        Ok(s) => s,
        Err((code, reason)) => {
            debug!(target_host = %header.host, port = header.port, code, %reason, "flow refused");
            let why = match code {
                _ if over_quota => "quota",
                reply::NOT_ALLOWED => "egress_denied",
                reply::NETWORK_UNREACHABLE | reply::HOST_UNREACHABLE => "unreachable",
                reply::REFUSED => "target_refused",
                reply::TTL_EXPIRED => "timeout",
                reply::ADDRESS_TYPE => "bad_target",
                _ => "failure",
            };
            if let Ok(mut m) = shared.flows_refused.lock() {
                *m.entry(why).or_default() += 1;
            }
            let _ = send
                .write_all(&wire::encode_flow_refusal(code, &reason))
                .await;
            let _ = send.finish();
            return Ok(());
        }
    };
    send.write_all(&[reply::OK])
        .await
        .map_err(|e| e.to_string())?;
    let (tr, tw) = tcp.into_split();
    let up = from_quic(
        recv,
        Some(meter),
        tw,
        [&counters.up, &shared.total, &shared.total_up],
    );
    let down = to_quic(
        tr,
        Some(meter),
        send,
        [&counters.down, &shared.total, &shared.total_down],
    );
    let (u, d) = tokio::join!(up, down);
    debug!(target_host = %header.host, port = header.port, up = ?u, down = ?d, "flow done");
    Ok(())
}
