//! The sharer's relay: accepts QUIC connections from requesters that hold a
//! ticket for this sharer, and relays each flow to its destination over the
//! sharer's own uplink.
//!
//! Trust decisions, in order: the certificate pin (requester side), the
//! requester's proof of its key, the ticket (offline, against the
//! coordinator's keys), the replay cache, consent capacity; then per flow the
//! egress policy on every *resolved* address and the ticket's byte quota.

use crate::limits::{Allowance, Bucket, Limits, Meter, Metered};
use crate::splice::copy_counted;
use crate::tls;
use crate::wire::{self, FlowHeader, Hello, Host, StreamOpen, UplinkHealth, reply};
use bandshare_core::{DeviceKey, EgressPolicy, TicketVerifier};
use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::net::TcpStream;
use tracing::{Instrument, debug, info, info_span, warn};

/// The QUIC handshake and the hello together must finish within this.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections one source address may hold open (or in handshake) at once.
pub const MAX_CONNS_PER_SOURCE: u32 = 16;
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

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

/// Bytes one requester moved since the last [`RelayHandle::take_usage`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsageDelta {
    pub requester: DeviceKey,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub flows: u32,
}

#[derive(Default)]
struct Counters {
    up: AtomicU64,
    down: AtomicU64,
    flows: AtomicU64,
}

struct Shared {
    me: DeviceKey,
    pin: [u8; 32],
    verifier: RwLock<TicketVerifier>,
    egress: EgressPolicy,
    /// This machine's addresses, read again whenever they change.
    own: crate::own::OwnAddresses,
    max_requesters: u32,
    usage: Mutex<HashMap<DeviceKey, Arc<Counters>>>,
    /// Open connections per requester.
    active: Mutex<HashMap<DeviceKey, u32>>,
    /// Ticket nonces seen, with their expiry: a ticket opens one connection.
    replay: Mutex<HashMap<[u8; 16], u64>>,
    total: AtomicU64,
    max_conns_per_source: u32,
    hello_timeout: Duration,
    /// Connections open per source address.
    per_source: Mutex<HashMap<std::net::IpAddr, u32>>,
    /// Connections refused because their source had too many.
    refused_sources: AtomicU64,
    /// The agent's view of its uplink: bit 16 down, low 16 bits loss ‰.
    uplink: AtomicU32,
    limits: Limits,
    /// All requesters together, today.
    daily: Arc<Allowance>,
    /// Each requester's rate and daily quota, shared by its connections.
    requesters: Mutex<HashMap<DeviceKey, Arc<PerRequester>>>,
    /// Requesters the coordinator revoked: refused, their connections closed.
    revoked: RwLock<std::collections::HashSet<DeviceKey>>,
    /// Open connections by requester, so a revocation can close them.
    conns: Mutex<HashMap<DeviceKey, Vec<quinn::Connection>>>,
}

struct PerRequester {
    bucket: Option<Arc<Mutex<Bucket>>>,
    quota: Arc<Allowance>,
}

impl Shared {
    fn requester(&self, key: &DeviceKey) -> Result<Arc<PerRequester>, String> {
        let mut map = self
            .requesters
            .lock()
            .map_err(|_| "relay state poisoned".to_string())?;
        let limits = self.limits;
        Ok(map
            .entry(*key)
            .or_insert_with(|| {
                Arc::new(PerRequester {
                    bucket: (limits.rate_bytes_per_s > 0).then(|| {
                        Arc::new(Mutex::new(Bucket::new(
                            limits.rate_bytes_per_s,
                            limits.burst(),
                        )))
                    }),
                    quota: Arc::new(Allowance::new(
                        limits.requester_daily_bytes,
                        true,
                        format!(
                            "this requester's daily quota at this sharer ({} bytes) is used up",
                            limits.requester_daily_bytes
                        ),
                    )),
                })
            })
            .clone())
    }
}

/// What the sharer agent needs of its relay: set the coordinator's keys,
/// read counters. Cheap to clone.
#[derive(Clone)]
pub struct RelayHandle(Arc<Shared>);

impl RelayHandle {
    pub fn set_coordinator_keys(&self, keys: &[[u8; 32]]) {
        if let Ok(mut v) = self.0.verifier.write() {
            *v = TicketVerifier::new(keys);
        }
    }

    /// Whether the coordinator's keys arrived (tickets can be verified).
    pub fn knows_coordinator(&self) -> bool {
        self.0
            .verifier
            .read()
            .map(|v| !v.is_empty())
            .unwrap_or(false)
    }

    /// What probe answers tell requesters about this sharer's uplink.
    pub fn set_uplink(&self, h: UplinkHealth) {
        let v = (h.down as u32) << 16 | h.loss_permille.min(1000) as u32;
        self.0.uplink.store(v, Ordering::Relaxed);
    }

    pub fn uplink(&self) -> UplinkHealth {
        uplink_of(&self.0)
    }

    /// Refuses these requesters from now on and closes their connections.
    pub fn revoke(&self, keys: &[DeviceKey]) {
        if let Ok(mut r) = self.0.revoked.write() {
            r.extend(keys.iter().copied());
        }
        let closing: Vec<quinn::Connection> = self
            .0
            .conns
            .lock()
            .map(|mut c| keys.iter().filter_map(|k| c.remove(k)).flatten().collect())
            .unwrap_or_default();
        for c in closing {
            c.close(2u32.into(), b"requester revoked by the coordinator");
        }
        if !keys.is_empty() {
            info!(count = keys.len(), "requesters revoked");
        }
    }

    /// Bytes relayed today, all requesters (what the daily cap counts).
    pub fn daily_used(&self) -> u64 {
        self.0.daily.used()
    }

    /// Bytes left of the daily cap (`u64::MAX` without one).
    pub fn daily_left(&self) -> u64 {
        self.0.daily.left()
    }

    /// Bytes `requester` may still move today (`u64::MAX` without a quota).
    pub fn requester_left(&self, requester: &DeviceKey) -> u64 {
        if self.0.limits.requester_daily_bytes == 0 {
            return u64::MAX;
        }
        self.0
            .requesters
            .lock()
            .ok()
            .and_then(|m| m.get(requester).map(|r| r.quota.left()))
            .unwrap_or(self.0.limits.requester_daily_bytes)
    }

    /// Connections refused so far because their source had too many open.
    pub fn refused_sources(&self) -> u64 {
        self.0.refused_sources.load(Ordering::Relaxed)
    }

    pub fn cert_pin(&self) -> [u8; 32] {
        self.0.pin
    }

    /// All bytes relayed so far, both directions.
    pub fn total_bytes(&self) -> u64 {
        self.0.total.load(Ordering::Relaxed)
    }

    pub fn active_requesters(&self) -> u32 {
        self.0.active.lock().map(|a| a.len() as u32).unwrap_or(0)
    }

    /// Per-requester usage since the previous call.
    pub fn take_usage(&self) -> Vec<UsageDelta> {
        let Ok(mut map) = self.0.usage.lock() else {
            return vec![];
        };
        let mut out = vec![];
        map.retain(|k, c| {
            let d = UsageDelta {
                requester: *k,
                bytes_up: c.up.swap(0, Ordering::Relaxed),
                bytes_down: c.down.swap(0, Ordering::Relaxed),
                flows: c.flows.swap(0, Ordering::Relaxed) as u32,
            };
            let busy = d.bytes_up + d.bytes_down + d.flows as u64 > 0;
            if busy {
                out.push(d);
            }
            // Keep counters of connected requesters; drop idle ones.
            Arc::strong_count(c) > 1 || busy
        });
        out
    }
}

pub struct Relay {
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("tls: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("cannot bind the relay on {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
}

fn uplink_of(shared: &Shared) -> UplinkHealth {
    let v = shared.uplink.load(Ordering::Relaxed);
    UplinkHealth {
        down: v >> 16 & 1 == 1,
        loss_permille: (v & 0xffff) as u16,
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Relay {
    /// Binds the UDP socket and makes a fresh certificate.
    pub fn bind(opts: RelayOptions) -> Result<Relay, RelayError> {
        let (cfg, pin) = tls::server_config()?;
        let endpoint = quinn::Endpoint::server(cfg, opts.listen)
            .map_err(|e| RelayError::Bind(opts.listen, e))?;
        let egress = opts.egress;
        let shared = Arc::new(Shared {
            me: opts.me,
            pin,
            verifier: RwLock::new(TicketVerifier::default()),
            egress,
            // Every address of this machine is off limits, whatever the
            // range, including addresses it gains after start.
            own: crate::own::OwnAddresses::new(),
            max_requesters: opts.max_requesters,
            usage: Mutex::default(),
            active: Mutex::default(),
            replay: Mutex::default(),
            total: AtomicU64::new(0),
            max_conns_per_source: opts.max_conns_per_source.max(1),
            hello_timeout: opts.hello_timeout,
            per_source: Mutex::default(),
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
            revoked: RwLock::default(),
            conns: Mutex::default(),
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
                        let _slot = slot;
                        if let Err(e) = serve_connection(incoming, shared).await {
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
    shared: Arc<Shared>,
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
        if let Ok(mut a) = self.shared.active.lock()
            && let Some(n) = a.get_mut(&self.key)
        {
            *n -= 1;
            if *n == 0 {
                a.remove(&self.key);
            }
        }
    }
}

/// Checks a hello; `Err` carries the reason told to the requester.
fn admit(shared: &Arc<Shared>, hello: &Hello) -> Result<(DeviceKey, u64), String> {
    let key = VerifyingKey::from_bytes(&hello.requester_key)
        .map_err(|_| "requester key is not a valid Ed25519 key".to_string())?;
    key.verify(
        &wire::hello_proof_message(&hello.ticket, &shared.pin),
        &Signature::from_bytes(&hello.proof),
    )
    .map_err(|_| "requester did not prove it holds the ticket's key".to_string())?;
    let requester = DeviceKey(hello.requester_key);
    if shared
        .revoked
        .read()
        .map(|r| r.contains(&requester))
        .unwrap_or(true)
    {
        return Err("requester revoked by the coordinator".into());
    }
    let ticket = fresh_ticket(shared, &hello.ticket, &requester)?;
    if shared.daily.left() == 0 {
        return Err(shared.daily.reason().to_string());
    }
    let per = shared.requester(&requester)?;
    if per.quota.left() == 0 {
        return Err(per.quota.reason().to_string());
    }
    let mut active = shared
        .active
        .lock()
        .map_err(|_| "relay state poisoned".to_string())?;
    if shared.max_requesters > 0
        && !active.contains_key(&requester)
        && active.len() as u32 >= shared.max_requesters
    {
        return Err(format!(
            "sharer at capacity ({} requesters)",
            shared.max_requesters
        ));
    }
    *active.entry(requester).or_insert(0) += 1;
    Ok((requester, ticket.quota_bytes))
}

/// Verifies a ticket for `requester` at this sharer and spends its nonce:
/// signed by a coordinator key, bound to both, unexpired, never seen.
fn fresh_ticket(
    shared: &Shared,
    bytes: &[u8],
    requester: &DeviceKey,
) -> Result<bandshare_core::Ticket, String> {
    let now = now_unix();
    let ticket = {
        let v = shared
            .verifier
            .read()
            .map_err(|_| "relay state poisoned".to_string())?;
        if v.is_empty() {
            return Err("sharer has not yet heard from its coordinator".into());
        }
        v.verify(bytes, &shared.me, requester, now)
            .map_err(|e| e.to_string())?
    };
    let mut seen = shared
        .replay
        .lock()
        .map_err(|_| "relay state poisoned".to_string())?;
    seen.retain(|_, exp| *exp + bandshare_core::ticket::CLOCK_SKEW_S > now);
    if seen.insert(ticket.nonce, ticket.expires_unix).is_some() {
        return Err("ticket already used (replay)".into());
    }
    Ok(ticket)
}

/// What every stream of one admitted connection shares.
struct Admitted {
    requester: DeviceKey,
    /// The byte quota of the connection's current ticket.
    ticket_quota: Arc<Allowance>,
}

/// A renewal stream: a fresh ticket gives the connection its quota anew.
async fn renew(
    mut send: quinn::SendStream,
    ticket: &[u8],
    shared: &Shared,
    admitted: &Admitted,
) -> Result<(), String> {
    let revoked = shared
        .revoked
        .read()
        .map(|r| r.contains(&admitted.requester))
        .unwrap_or(true);
    let result = if revoked {
        Err("requester revoked by the coordinator".to_string())
    } else {
        fresh_ticket(shared, ticket, &admitted.requester)
    };
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
    shared: Arc<Shared>,
    source: std::net::IpAddr,
}

impl SourceSlot {
    fn take(shared: &Arc<Shared>, source: std::net::IpAddr) -> Option<SourceSlot> {
        let mut map = shared.per_source.lock().ok()?;
        let n = map.entry(source).or_insert(0);
        if *n >= shared.max_conns_per_source {
            return None;
        }
        *n += 1;
        Some(SourceSlot {
            shared: shared.clone(),
            source,
        })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        if let Ok(mut map) = self.shared.per_source.lock()
            && let Some(n) = map.get_mut(&self.source)
        {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.source);
            }
        }
    }
}

async fn serve_connection(incoming: quinn::Incoming, shared: Arc<Shared>) -> Result<(), String> {
    // Handshake and hello share one deadline: a slow or silent peer holds
    // its slot at most this long.
    let hello = async {
        let conn = incoming.await.map_err(|e| e.to_string())?;
        let (send, mut recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
        let hello = Hello::read(&mut recv).await.map_err(|e| e.to_string())?;
        Ok::<_, String>((conn, send, recv, hello))
    };
    let (conn, mut send, recv, hello) =
        tokio::time::timeout(shared.hello_timeout, hello)
            .await
            .map_err(|_| "handshake or hello timed out".to_string())??;
    let (requester, quota) = match admit(&shared, &hello) {
        Ok(ok) => ok,
        Err(reason) => {
            warn!(%reason, "refused requester");
            let _ = send
                .write_all(&wire::encode_hello_reply(false, &reason))
                .await;
            let _ = send.finish();
            let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
            conn.close(1u32.into(), b"refused");
            return Err(reason);
        }
    };
    let _guard = ActiveGuard {
        shared: shared.clone(),
        key: requester,
    };
    if let Ok(mut c) = shared.conns.lock() {
        c.entry(requester).or_default().push(conn.clone());
    }
    // A revocation that raced the admission still closes this connection.
    if shared
        .revoked
        .read()
        .map(|r| r.contains(&requester))
        .unwrap_or(true)
    {
        conn.close(2u32.into(), b"requester revoked by the coordinator");
        return Err("requester revoked".into());
    }
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
    });
    let meter = Meter {
        bucket: per.bucket.clone(),
        allowances: vec![
            admitted.ticket_quota.clone(),
            per.quota.clone(),
            shared.daily.clone(),
        ],
    };
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
    shared: Arc<Shared>,
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

/// Addresses `host` stands for: itself; the address a name spells in any
/// form (`127.1`, `0x7f000001`, `[::1]`, a trailing dot), without asking a
/// resolver; else what the sharer's resolver says.
async fn resolve(host: &Host, port: u16) -> Result<Vec<SocketAddr>, u8> {
    match host {
        Host::Ip(ip) => Ok(vec![SocketAddr::new(*ip, port)]),
        Host::Name(name) => {
            if let Some(ip) = bandshare_core::egress::literal_ip(name) {
                return Ok(vec![SocketAddr::new(ip, port)]);
            }
            let name = name.trim_end_matches('.').to_string();
            match tokio::time::timeout(DIAL_TIMEOUT, tokio::net::lookup_host((name, port))).await {
                Ok(Ok(addrs)) => Ok(addrs.collect()),
                Ok(Err(_)) => Err(reply::HOST_UNREACHABLE),
                Err(_) => Err(reply::TTL_EXPIRED),
            }
        }
    }
}

fn io_reply(e: &std::io::Error) -> u8 {
    use std::io::ErrorKind::*;
    match e.kind() {
        ConnectionRefused => reply::REFUSED,
        TimedOut => reply::TTL_EXPIRED,
        NetworkUnreachable => reply::NETWORK_UNREACHABLE,
        HostUnreachable => reply::HOST_UNREACHABLE,
        _ => reply::GENERAL_FAILURE,
    }
}

/// Dials the first allowed address; `Err` is the reply code to send.
async fn dial(
    header: &FlowHeader,
    egress: &EgressPolicy,
    own: &crate::own::OwnAddresses,
) -> Result<TcpStream, (u8, String)> {
    let addrs = resolve(&header.host, header.port)
        .await
        .map_err(|code| (code, format!("cannot resolve {}", header.host)))?;
    // Read after resolving, right before the decision: as of this dial.
    let own_now = own.current();
    let mut denied = None;
    let allowed: Vec<SocketAddr> = addrs
        .iter()
        .filter(
            |a| match egress.decide_with_own(a.ip(), a.port(), &own_now) {
                Ok(()) => true,
                Err(why) => {
                    info!(target_addr = %a, reason = %why, "egress denied");
                    denied.get_or_insert_with(|| format!("{a} is off limits: {why}"));
                    false
                }
            },
        )
        .copied()
        .collect();
    if allowed.is_empty() {
        return Err(match denied {
            Some(why) => (reply::NOT_ALLOWED, why),
            None => (
                reply::HOST_UNREACHABLE,
                format!("{} has no address", header.host),
            ),
        });
    }
    let mut failed = (reply::HOST_UNREACHABLE, String::new());
    for a in allowed {
        match tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(a)).await {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Ok(Err(e)) => failed = (io_reply(&e), format!("dialing {a}: {e}")),
            Err(_) => failed = (reply::TTL_EXPIRED, format!("dialing {a} timed out")),
        }
    }
    Err(failed)
}

async fn relay_flow(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    shared: &Shared,
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
    };
    counters.flows.fetch_add(1, Ordering::Relaxed);
    let dialed = match meter.exhausted() {
        Some(reason) => Err((reply::NOT_ALLOWED, reason.to_string())),
        None => dial(&header, &shared.egress, &shared.own).await,
    };
    let tcp = match dialed {
        Ok(s) => s,
        Err((code, reason)) => {
            debug!(target_host = %header.host, port = header.port, code, %reason, "flow refused");
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
    let up = copy_counted(
        Metered::new(recv, meter.clone()),
        tw,
        [&counters.up, &shared.total],
    );
    let down = copy_counted(
        Metered::new(tr, meter.clone()),
        send,
        [&counters.down, &shared.total],
    );
    let (u, d) = tokio::join!(up, down);
    debug!(target_host = %header.host, port = header.port, up = ?u, down = ?d, "flow done");
    Ok(())
}
