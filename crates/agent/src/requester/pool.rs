//! The pool: tunnels to several sharers at once, one of them active for
//! new flows. The async shell of failover: it races a slow flow on the next
//! member and carries out what the failover state machine (`failover.rs`)
//! decides from probe answers, silence and flow results (each member's
//! probes and ticket renewal run in `member.rs`); the maintainer refills
//! the pool in the background (`refill.rs`).

pub use super::failover::{DEAD_AFTER, PROBE_EVERY, STALL_GRACE, UNREACHABLE_AVOID};
use super::failover::{Decision, Failover, FlowFailure};
use super::select;
use bandshare_core::{DeviceKey, DistanceBand, LinkState, NetworkType};
use bandshare_relay::wire::reply;
use bandshare_relay::{FlowError, FlowHeader, Tunnel};
use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tracing::{debug, info, warn};

/// A flow not answered within this long is raced on the next member.
pub const HEDGE_AFTER: Duration = Duration::from_millis(250);
/// Connections each member opens to its sharer besides the first, by
/// default ("lanes", see `Tunnel::add_lanes`): flows take turns over them,
/// so parallel bulk flows are not all driven by one task on each side.
pub const LANES: usize = 1;
/// A member let go while flows are open through it (the requester moved,
/// the own link carries new flows again) takes no new flows but keeps its
/// tunnel until those end, at most this long.
pub const DRAIN_AT_MOST: Duration = Duration::from_secs(30);

pub struct Member {
    pub name: String,
    pub key: DeviceKey,
    /// Where its relay is and the pin of its certificate.
    pub endpoint: std::net::SocketAddr,
    pub pin: [u8; 32],
    pub band: Option<DistanceBand>,
    pub network: Option<NetworkType>,
    pub link: LinkState,
    pub tunnel: Tunnel,
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
    pub flows: AtomicU64,
    /// Flows open through it now (each held by an [`OpenGuard`]).
    pub open: AtomicU64,
    /// Told when its last open flow ends.
    pub idle: tokio::sync::Notify,
    /// The byte quota of the connection's current ticket (0: unknown), and
    /// the bytes moved when it was given.
    pub ticket_quota: AtomicU64,
    pub renewed_at_bytes: AtomicU64,
    /// The ticket the connection holds now: it vouches for what this
    /// requester reports having seen through the sharer.
    pub ticket: Mutex<Vec<u8>>,
}

impl Member {
    pub(super) fn bytes(&self) -> u64 {
        self.bytes_up.load(Ordering::Relaxed) + self.bytes_down.load(Ordering::Relaxed)
    }

    /// Whether half the current ticket's quota is spent: time to renew.
    pub(super) fn ticket_half_spent(&self) -> bool {
        let quota = self.ticket_quota.load(Ordering::Relaxed);
        quota > 0
            && self
                .bytes()
                .saturating_sub(self.renewed_at_bytes.load(Ordering::Relaxed))
                >= quota / 2
    }
}

/// A sharer this requester used successfully: enough to dial it again
/// without the coordinator, given a ticket refreshed while it was reachable.
#[derive(Clone, Debug)]
pub struct KnownSharer {
    pub name: String,
    pub endpoint: std::net::SocketAddr,
    pub pin: [u8; 32],
    pub band: Option<DistanceBand>,
    pub network: Option<NetworkType>,
    pub link: LinkState,
    /// An unused ticket and its expiry (unix seconds).
    pub ticket: Option<(Vec<u8>, u64)>,
}

/// A flow opened through a pool member.
pub struct OpenFlow {
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
    pub member: Arc<Member>,
    /// Whether the sharer's reply was already read: it was asked to wait,
    /// or the member had not answered a probe lately, so it waited anyway.
    pub replied: bool,
    /// Counts the flow as open through `member` while held: a member let
    /// go keeps its tunnel for the flows it still carries.
    pub open: OpenGuard,
}

/// One flow open through a member, counted in [`Member::open`] until
/// dropped.
pub struct OpenGuard(Arc<Member>);

impl OpenGuard {
    fn new(m: Arc<Member>) -> OpenGuard {
        m.open.fetch_add(1, Ordering::Relaxed);
        OpenGuard(m)
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

pub struct Pool {
    members: RwLock<Vec<Arc<Member>>>,
    /// Which member carries new flows, and every member's health.
    failover: Mutex<Failover>,
    /// Wakes the maintainer when a member leaves or stalls.
    pub changed: Notify,
    /// What `/metrics` counts: bytes, flows, failovers, refusals.
    pub counters: super::metrics::Counters,
    /// Sharers used successfully, by key.
    pub known: std::sync::Mutex<std::collections::HashMap<DeviceKey, KnownSharer>>,
    /// Replies to UDP datagrams, to their associations.
    pub udp: Arc<super::udp::Router>,
    /// Lanes each member opens ([`LANES`] by default).
    lanes: usize,
}

#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct MemberStatus {
    pub sharer: String,
    /// The first 8 bytes of the sharer's key in hex: two sharers may show
    /// the same-looking name, never the same key.
    pub key: String,
    /// ready, stalled (silent; open flows wait for it), uplink-down (the
    /// sharer's own network fails) or closed.
    pub state: &'static str,
    pub rtt_ms: f64,
    /// The largest UDP payload the tunnel sends, as path MTU discovery
    /// found it.
    pub mtu: u16,
    /// Connections to the sharer besides the first (flows take turns).
    pub lanes: usize,
    /// The worse of probe loss (last 20 probes) and the sharer's reported
    /// uplink loss, 0..=1.
    pub loss: f64,
    /// Loss on the sharer's own uplink as it reports it, 0..=1.
    pub uplink_loss: f64,
    pub score: f64,
    pub active: bool,
    pub distance: String,
    pub network: Option<String>,
    pub flows: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
}

#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct Status {
    pub active: Option<String>,
    pub pool: Vec<MemberStatus>,
}

impl Pool {
    pub fn len(&self) -> usize {
        self.members.read().map(|m| m.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Remembers `m` as a sharer that served us (keeping any ticket held).
    fn remember(&self, m: &Member) {
        let Ok(mut t) = self.known.lock() else {
            return;
        };
        let fresh = !t.contains_key(&m.key);
        let entry = t.entry(m.key).or_insert_with(|| KnownSharer {
            name: m.name.clone(),
            endpoint: m.endpoint,
            pin: m.pin,
            band: m.band,
            network: m.network,
            link: m.link,
            ticket: None,
        });
        entry.endpoint = m.endpoint;
        entry.pin = m.pin;
        drop(t);
        if fresh {
            // Wake the maintainer to fetch a spare ticket for it.
            self.changed.notify_one();
        }
    }

    /// Takes the spare ticket held for `key` if it is good for a while yet.
    pub(super) fn take_spare(&self, key: &DeviceKey) -> Option<Vec<u8>> {
        let now = bandshare_core::clock::unix_now();
        let mut t = self.known.lock().ok()?;
        let entry = t.get_mut(key)?;
        match &entry.ticket {
            Some((_, exp)) if *exp > now + 5 => entry.ticket.take().map(|(b, _)| b),
            _ => None,
        }
    }

    /// Whether some known sharer has no spare ticket.
    pub fn needs_ticket(&self) -> bool {
        self.known
            .lock()
            .map(|t| t.values().any(|x| x.ticket.is_none()))
            .unwrap_or(false)
    }

    /// KnownSharer sharers holding a spare ticket.
    pub fn known_with_ticket(&self) -> usize {
        self.known
            .lock()
            .map(|t| t.values().filter(|x| x.ticket.is_some()).count())
            .unwrap_or(0)
    }

    pub fn new(strategy: select::Strategy, stall_grace: Duration, lanes: usize) -> Pool {
        Pool {
            lanes,
            members: RwLock::default(),
            failover: Mutex::new(Failover::new(strategy, stall_grace)),
            changed: Notify::new(),
            counters: Default::default(),
            known: Default::default(),
            udp: Default::default(),
        }
    }

    /// Failover's state, for one decision (never held across an await or
    /// while [`Pool::apply`] runs).
    pub(super) fn failover(&self) -> MutexGuard<'_, Failover> {
        match self.failover.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn member(&self, key: &DeviceKey) -> Option<Arc<Member>> {
        self.members
            .read()
            .ok()?
            .iter()
            .find(|m| m.key == *key)
            .cloned()
    }

    fn name_of(&self, key: Option<DeviceKey>) -> Option<String> {
        key.and_then(|k| self.member(&k)).map(|m| m.name.clone())
    }

    /// Carries out what failover decided.
    pub(super) fn apply(&self, decisions: Vec<Decision>) {
        self.apply_because(decisions, None, None)
    }

    /// The same, with the cause of a change of the active member known
    /// (a routine retirement is not a failure).
    fn apply_because(
        &self,
        decisions: Vec<Decision>,
        known: Option<&'static str>,
        gone: Option<(DeviceKey, &str)>,
    ) {
        // A change of the active member is a failover when it moves away
        // from one that served; its cause is what came before it, or the
        // state the member it left is in.
        let mut cause = known;
        for d in decisions {
            match &d {
                Decision::Stalled { .. } => cause = Some("stall"),
                Decision::Drop { .. } => cause = Some("drop"),
                Decision::Switched { from: Some(k), to } => {
                    let c = cause.unwrap_or_else(|| self.failover_cause(k));
                    // The member may be gone already (`gone` names it).
                    let from = self
                        .name_of(Some(*k))
                        .or_else(|| gone.filter(|(g, _)| g == k).map(|(_, n)| n.to_string()))
                        .unwrap_or_else(|| k.short());
                    self.counters.failover(c, from, self.name_of(*to));
                }
                _ => {}
            }
            match d {
                Decision::Stalled { key, silent } => {
                    warn!(
                        sharer = ?self.name_of(Some(key)),
                        silent_ms = silent.as_millis() as u64,
                        open_flows_wait_s = self.failover().stall_grace().as_secs_f64(),
                        "sharer stalled: new flows move; open flows wait for it"
                    );
                    // A replacement, so the pool stays at its size meanwhile.
                    self.changed.notify_one();
                }
                Decision::Resumed(key) => {
                    info!(sharer = ?self.name_of(Some(key)), "stalled sharer answers again; its open flows carry on");
                }
                Decision::Drop { key, why } => self.remove(&key, &why),
                Decision::Switched { from, to } => {
                    info!(from = ?self.name_of(from), to = ?self.name_of(to), "active sharer changed");
                }
            }
        }
    }

    /// Why new flows left `key` when nothing in the same decisions says:
    /// its tunnel closed, it stalled, its uplink fails, it lost probes, or
    /// another member simply scores better.
    fn failover_cause(&self, key: &DeviceKey) -> &'static str {
        if self
            .member(key)
            .is_none_or(|m| m.tunnel.close_reason().is_some())
        {
            return "closed";
        }
        let f = self.failover();
        match f.health(key) {
            None => "drop",
            Some(h) if h.stalled => "stall",
            Some(h) if h.uplink_failing(Instant::now()) => "uplink",
            Some(h) if h.loss() > 0.0 => "loss",
            Some(_) => "better",
        }
    }

    /// Members that take new flows (not stalled): what the maintainer
    /// keeps at the pool's size.
    pub fn serving(&self) -> usize {
        self.failover().serving()
    }

    /// Every member, in pool order.
    pub fn members(&self) -> Vec<Arc<Member>> {
        self.members.read().map(|m| m.clone()).unwrap_or_default()
    }

    pub fn keys(&self) -> Vec<DeviceKey> {
        self.members
            .read()
            .map(|m| m.iter().map(|x| x.key).collect())
            .unwrap_or_default()
    }

    pub fn contains(&self, key: &DeviceKey) -> bool {
        self.members
            .read()
            .map(|m| m.iter().any(|x| x.key == *key))
            .unwrap_or(false)
    }

    pub fn add(self: &Arc<Self>, member: Member) {
        let member = Arc::new(member);
        info!(sharer = %member.name, relay = %member.tunnel.remote(), "joined the pool");
        if let Ok(mut m) = self.members.write() {
            m.push(member.clone());
        }
        let d = self.failover().join(
            member.key,
            member.link.quality(),
            member.band,
            Instant::now(),
        );
        self.apply(d);
        if self.lanes > 0 {
            let (m, n) = (member.clone(), self.lanes);
            tokio::spawn(async move {
                match m.tunnel.add_lanes(n).await {
                    Ok(n) => debug!(sharer = %m.name, lanes = n, "lanes joined"),
                    // Flows still go over the first connection.
                    Err(e) => debug!(sharer = %m.name, error = %e, "no lanes"),
                }
            });
        }
        tokio::spawn(super::member::probe(self.clone(), member.clone()));
        tokio::spawn(super::member::keep_ticket(self.clone(), member.clone()));
        tokio::spawn(self.udp.clone().follow(member.clone()));
        let pool = self.clone();
        tokio::spawn(async move {
            let why = member.tunnel.closed().await;
            pool.remove(&member.key, &why);
        });
    }

    /// Drops a member (its tunnel closed or failed) and picks again.
    pub fn remove(&self, key: &DeviceKey, why: &str) {
        self.take_out(key, why, false)
    }

    /// Lets a member go because it is not needed (the own link carries new
    /// flows again, the requester moved): as [`Pool::remove`], logged as
    /// routine.
    pub fn retire(&self, key: &DeviceKey, why: &str) {
        self.take_out(key, why, true)
    }

    fn take_out(&self, key: &DeviceKey, why: &str, routine: bool) {
        let gone = self.members.write().ok().and_then(|mut m| {
            let i = m.iter().position(|x| x.key == *key)?;
            Some(m.remove(i))
        });
        if let Some(g) = gone {
            let open = g.open.load(Ordering::Relaxed);
            if routine && open > 0 {
                // No new flows from now on; the open ones finish first.
                info!(sharer = %g.name, reason = %why, open, "left the pool; its open flows finish first");
                let g = g.clone();
                tokio::spawn(async move {
                    let idle = async {
                        loop {
                            // Armed before the count is read: an end
                            // between the two is not missed.
                            let told = g.idle.notified();
                            tokio::pin!(told);
                            told.as_mut().enable();
                            if g.open.load(Ordering::Acquire) == 0 {
                                return;
                            }
                            told.await;
                        }
                    };
                    tokio::select! {
                        () = idle => {}
                        _ = g.tunnel.closed() => {}
                        () = tokio::time::sleep(DRAIN_AT_MOST) => {}
                    }
                    g.tunnel.close();
                });
            } else {
                if routine {
                    info!(sharer = %g.name, reason = %why, "left the pool");
                } else {
                    warn!(sharer = %g.name, reason = %why, "left the pool");
                }
                g.tunnel.close();
            }
            let d = self.failover().leave(key, Instant::now());
            self.apply_because(d, routine.then_some("retired"), Some((g.key, &g.name)));
            self.changed.notify_one();
        }
    }

    /// Lets failover choose again; the member new flows go to now.
    pub fn reselect(&self) -> Option<Arc<Member>> {
        let d = self.failover().reselect(Instant::now());
        self.apply(d);
        self.active()
    }

    pub fn active(&self) -> Option<Arc<Member>> {
        let key = self.failover().active()?;
        self.member(&key)
    }

    /// The best member other than those in `skip`.
    fn next_best(&self, skip: &[DeviceKey]) -> Option<Arc<Member>> {
        let key = self.failover().next_best(skip, Instant::now())?;
        self.member(&key)
            .filter(|m| m.tunnel.close_reason().is_none())
    }

    /// A flow through `m` failed in a way failover acts on.
    fn flow_failed(&self, m: &Member, f: FlowFailure) {
        let d = self.failover().flow_failed(&m.key, f, Instant::now());
        self.apply(d);
    }

    /// Opens a flow through the active member. A lost tunnel moves on to the
    /// next member at once; a flow not answered within [`HEDGE_AFTER`] is
    /// raced on the next member and the first answer wins, so a sharer that
    /// died without a word costs new flows at most that long. A refusal by
    /// the sharer is returned as is. See [`Tunnel::open_flow`] for
    /// `wait_reply`: `false` is honoured only while the member answers
    /// probes, so [`OpenFlow::replied`] says whether the reply is still to
    /// be read.
    pub async fn open_flow(
        &self,
        target: &FlowHeader,
        wait_reply: bool,
    ) -> Result<OpenFlow, FlowError> {
        let attempt = |m: Arc<Member>, wait: bool| {
            let target = target.clone();
            async move {
                match m.tunnel.open_flow(&target, wait).await {
                    Ok((send, recv)) => Ok(OpenFlow {
                        send,
                        recv,
                        open: OpenGuard::new(m.clone()),
                        member: m,
                        replied: wait,
                    }),
                    Err(e) => Err((e, m)),
                }
            }
        };
        let mut tried: Vec<DeviceKey> = vec![];
        let mut last = FlowError::Lost("no sharer in the pool".into());
        // With every uplink reported failing, still try the best live tunnel.
        let first = self.reselect().or_else(|| self.next_best(&[]));
        let mut next = first;
        while let Some(m) = next.take() {
            tried.push(m.key);
            // Optimistic data only through a member that answers probes now.
            let wait = wait_reply || !self.failover().fresh(&m.key, Instant::now());
            let mut a = Box::pin(attempt(m.clone(), wait));
            let result: Result<OpenFlow, (FlowError, Arc<Member>)> = if !wait {
                a.await
            } else {
                match tokio::time::timeout(HEDGE_AFTER, &mut a).await {
                    Ok(r) => r,
                    Err(_) => match self.next_best(&tried) {
                        // Slow: race the next member; first success wins.
                        Some(m2) => {
                            tried.push(m2.key);
                            let b = attempt(m2, true);
                            tokio::pin!(b);
                            tokio::select! {
                                r = &mut a => match r { Ok(ok) => Ok(ok), Err(_) => b.await },
                                r = &mut b => match r { Ok(ok) => Ok(ok), Err(_) => a.await },
                            }
                        }
                        None => a.await,
                    },
                }
            };
            match result {
                Ok(opened) => {
                    opened.member.flows.fetch_add(1, Ordering::Relaxed);
                    self.remember(&opened.member);
                    return Ok(opened);
                }
                Err((FlowError::Lost(why), m)) => {
                    self.flow_failed(&m, FlowFailure::Lost(why.clone()));
                    last = FlowError::Lost(why);
                    next = self.next_best(&tried);
                }
                // Its ticket is spent (renewal did not come in time): a
                // new connection brings a new ticket; the next member now.
                Err((FlowError::Refused(reply::NOT_ALLOWED, why), m))
                    if why == bandshare_relay::wire::QUOTA_USED_UP =>
                {
                    self.flow_failed(&m, FlowFailure::QuotaUsedUp);
                    last = FlowError::Refused(reply::NOT_ALLOWED, why);
                    next = self.next_best(&tried);
                }
                // The sharer has no route out (its uplink went away): the
                // next member may well have one.
                Err((e @ FlowError::Refused(reply::NETWORK_UNREACHABLE, _), m)) => {
                    warn!(sharer = %m.name, "sharer's network is unreachable; trying the next");
                    self.flow_failed(&m, FlowFailure::Unreachable);
                    last = e;
                    next = self.next_best(&tried);
                }
                Err((e, _)) => return Err(e),
            }
        }
        Err(last)
    }

    /// Closes every tunnel (at shutdown).
    pub fn close_all(&self) {
        let all = self
            .members
            .write()
            .map(|mut m| std::mem::take(&mut *m))
            .unwrap_or_default();
        for m in all {
            m.tunnel.close();
        }
    }

    pub fn status(&self) -> Status {
        let members = self.members.read().map(|m| m.clone()).unwrap_or_default();
        let now = Instant::now();
        let failover = self.failover();
        let active = failover.active();
        Status {
            active: members
                .iter()
                .find(|m| Some(m.key) == active)
                .map(|m| m.name.clone()),
            pool: members
                .iter()
                .map(|m| {
                    let h = failover.health(&m.key);
                    let rtt = h
                        .map(|h| h.rtt)
                        .filter(|r| !r.is_zero())
                        .unwrap_or_else(|| m.tunnel.rtt());
                    MemberStatus {
                        sharer: m.name.clone(),
                        key: m.key.short(),
                        state: if m.tunnel.close_reason().is_some() {
                            "closed"
                        } else if h.is_some_and(|h| h.stalled) {
                            "stalled"
                        } else if h.is_some_and(|h| h.uplink_failing(now)) {
                            "uplink-down"
                        } else {
                            "ready"
                        },
                        rtt_ms: (rtt.as_secs_f64() * 1e5).round() / 100.0,
                        mtu: m.tunnel.mtu(),
                        lanes: m.tunnel.lanes(),
                        loss: h.map_or(0.0, |h| h.loss()),
                        uplink_loss: h.map_or(0.0, |h| h.uplink.loss_permille as f64 / 1000.0),
                        score: (failover.score(&m.key, now) * 1000.0).round() / 1000.0,
                        active: Some(m.key) == active,
                        distance: m.band.map(|b| b.to_string()).unwrap_or_default(),
                        network: m.network.map(|n| n.to_string()),
                        flows: m.flows.load(Ordering::Relaxed),
                        bytes_up: m.bytes_up.load(Ordering::Relaxed),
                        bytes_down: m.bytes_down.load(Ordering::Relaxed),
                    }
                })
                .collect(),
        }
    }
}
