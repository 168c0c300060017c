//! The pool: tunnels to several sharers at once, one of them active for
//! new flows. A member whose tunnel closes leaves at once and the next
//! best takes over; the maintainer refills the pool in the background.

use super::select::{self, View};
use crate::probe::PingTracker;
use bandshare_core::{DeviceKey, DistanceBand, LinkState, NetworkType};
use bandshare_relay::wire::reply;
use bandshare_relay::{FlowError, FlowHeader, Tunnel};
use serde::Serialize;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tracing::{info, warn};

/// How often each member is probed.
pub const PROBE_EVERY: Duration = Duration::from_millis(100);
/// A member that answers no probe for this long is stalled: new flows
/// move to another member at once, and the pool refills.
pub const DEAD_AFTER: Duration = Duration::from_millis(600);
/// How long flows already open through a stalled member wait for it (a
/// phone's radio pause, a stopped process) before they are ended and the
/// member leaves the pool. At most the QUIC idle timeout (10 s).
pub const STALL_GRACE: Duration = Duration::from_secs(10);
/// A flow not answered within this long is raced on the next member.
pub const HEDGE_AFTER: Duration = Duration::from_millis(250);
/// A member that answered "network unreachable" is avoided this long
/// (unless its probe answers say its uplink is fine sooner... they do not
/// shorten it: a route can vanish before the sharer's own check notices).
pub const UNREACHABLE_AVOID: Duration = Duration::from_secs(3);

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
    /// Probe results: smoothed RTT in µs (0 until the first answer), loss
    /// per mille, and when the last answer came (ms since `joined`).
    pub probe_rtt_us: AtomicU64,
    pub probe_loss_permille: AtomicU64,
    pub last_answer_ms: AtomicU64,
    pub joined: Instant,
    /// The sharer's own uplink as its probe answers tell: loss per mille,
    /// and whether it is down.
    pub uplink_loss_permille: AtomicU64,
    pub uplink_down: AtomicBool,
    /// Until when (ms since `joined`) new flows avoid this member because it
    /// answered a flow with "network unreachable".
    pub unreachable_until_ms: AtomicU64,
    /// Silent past [`DEAD_AFTER`]: no new flows, open ones wait.
    pub stalled: AtomicBool,
    /// The byte quota of the connection's current ticket (0: unknown), and
    /// the bytes moved when it was given.
    pub ticket_quota: AtomicU64,
    pub renewed_at_bytes: AtomicU64,
}

impl Member {
    /// Whether a probe was answered within two probe intervals.
    pub fn fresh(&self) -> bool {
        let last = Duration::from_millis(self.last_answer_ms.load(Ordering::Relaxed));
        self.joined.elapsed().saturating_sub(last) <= PROBE_EVERY * 2
    }

    /// Whether new flows should avoid this member: its uplink is down, or it
    /// just answered a flow with "network unreachable".
    pub fn uplink_failing(&self) -> bool {
        self.uplink_down.load(Ordering::Relaxed)
            || (self.joined.elapsed().as_millis() as u64)
                < self.unreachable_until_ms.load(Ordering::Relaxed)
    }

    fn bytes(&self) -> u64 {
        self.bytes_up.load(Ordering::Relaxed) + self.bytes_down.load(Ordering::Relaxed)
    }

    /// Whether half the current ticket's quota is spent: time to renew.
    fn ticket_half_spent(&self) -> bool {
        let quota = self.ticket_quota.load(Ordering::Relaxed);
        quota > 0
            && self
                .bytes()
                .saturating_sub(self.renewed_at_bytes.load(Ordering::Relaxed))
                >= quota / 2
    }

    pub fn is_stalled(&self) -> bool {
        self.stalled.load(Ordering::Relaxed)
    }

    fn avoid_for(&self, d: Duration) {
        let until = (self.joined.elapsed() + d).as_millis() as u64;
        self.unreachable_until_ms.store(until, Ordering::Relaxed);
    }
}

/// Pings the member over its probe channel; removes it from the pool when
/// it stops answering (a silently cut link, a killed process).
async fn probe(pool: Arc<Pool>, m: Arc<Member>) {
    let Some((mut send, mut recv)) = m.tunnel.take_probe() else {
        return;
    };
    let tracker = Arc::new(std::sync::Mutex::new(PingTracker::new(DEAD_AFTER)));
    let reader = {
        let (tracker, m, pool) = (tracker.clone(), m.clone(), pool.clone());
        tokio::spawn(async move {
            let mut frame = [0u8; bandshare_relay::wire::PROBE_REPLY_LEN];
            while recv.read_exact(&mut frame).await.is_ok() {
                let now = Instant::now();
                let (seq, uplink) = bandshare_relay::wire::decode_probe_reply(&frame);
                let was_down = m.uplink_down.swap(uplink.down, Ordering::Relaxed);
                let was_loss = m
                    .uplink_loss_permille
                    .swap(uplink.loss_permille as u64, Ordering::Relaxed);
                if was_down != uplink.down || was_loss.abs_diff(uplink.loss_permille as u64) > 50 {
                    if was_down != uplink.down {
                        info!(sharer = %m.name, down = uplink.down, "sharer's uplink changed");
                    }
                    pool.reselect();
                }
                let Ok(mut t) = tracker.lock() else { break };
                t.pong(seq, now);
                m.probe_rtt_us.store(
                    t.rtt().map_or(0, |d| d.as_micros() as u64),
                    Ordering::Relaxed,
                );
                m.probe_loss_permille
                    .store(t.loss_permille(now) as u64, Ordering::Relaxed);
                m.last_answer_ms.store(
                    now.duration_since(m.joined).as_millis() as u64,
                    Ordering::Relaxed,
                );
                drop(t);
                if m.stalled.swap(false, Ordering::Relaxed) {
                    info!(sharer = %m.name, "stalled sharer answers again; its open flows carry on");
                    pool.reselect();
                }
            }
        })
    };
    let mut tick = tokio::time::interval(PROBE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = Instant::now();
        let (seq, silent) = match tracker.lock() {
            Ok(mut t) => {
                let since = now.saturating_duration_since(t.last_answer().unwrap_or(m.joined));
                (t.ping(now), since)
            }
            Err(_) => break,
        };
        if silent > pool.stall_grace.max(DEAD_AFTER) {
            pool.remove(
                &m.key,
                &format!("no answer to probes for {} ms", silent.as_millis()),
            );
            break;
        }
        if silent > DEAD_AFTER && !m.stalled.swap(true, Ordering::Relaxed) {
            warn!(
                sharer = %m.name,
                silent_ms = silent.as_millis() as u64,
                open_flows_wait_s = pool.stall_grace.as_secs_f64(),
                "sharer stalled: new flows move; open flows wait for it"
            );
            pool.reselect();
            // A replacement, so the pool stays at its size meanwhile.
            pool.changed.notify_one();
        }
        if send.write_all(&seq.to_be_bytes()).await.is_err() {
            break;
        }
    }
    reader.abort();
}

/// Keeps a member's ticket ahead of its traffic: once half the quota is
/// spent, a spare ticket (kept fresh by the maintainer) goes to the sharer
/// over the open connection and the quota starts over, so a long transfer
/// never meets "the ticket's byte quota is used up".
async fn keep_ticket(pool: Arc<Pool>, m: Arc<Member>) {
    let mut tick = tokio::time::interval(RENEW_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if m.tunnel.close_reason().is_some() || !pool.contains(&m.key) {
            return;
        }
        if !m.ticket_half_spent() {
            continue;
        }
        let Some(ticket) = pool.take_spare(&m.key) else {
            // The maintainer fetches one (throttled); ask again soon.
            pool.changed.notify_one();
            continue;
        };
        let quota = bandshare_core::Ticket::decode(&ticket).map_or(0, |(t, _)| t.quota_bytes);
        let at = m.bytes();
        match m.tunnel.renew(&ticket).await {
            Ok(Ok(())) => {
                m.renewed_at_bytes.store(at, Ordering::Relaxed);
                m.ticket_quota.store(quota, Ordering::Relaxed);
                info!(sharer = %m.name, moved = at, quota, "ticket renewed on the open connection");
            }
            Ok(Err(reason)) => {
                warn!(sharer = %m.name, %reason, "sharer refused the renewed ticket")
            }
            Err(e) => warn!(sharer = %m.name, error = %e, "cannot renew the ticket"),
        }
        pool.changed.notify_one();
    }
}

/// How often each member's ticket use is checked.
const RENEW_CHECK: Duration = Duration::from_millis(250);

/// A sharer this requester used successfully: enough to dial it again
/// without the coordinator, given a ticket refreshed while it was reachable.
#[derive(Clone, Debug)]
pub struct Trusted {
    pub name: String,
    pub endpoint: std::net::SocketAddr,
    pub pin: [u8; 32],
    pub band: Option<DistanceBand>,
    pub network: Option<NetworkType>,
    pub link: LinkState,
    /// An unused ticket and its expiry (unix seconds).
    pub ticket: Option<(Vec<u8>, u64)>,
}

#[derive(Default)]
pub struct Pool {
    members: RwLock<Vec<Arc<Member>>>,
    active: RwLock<Option<DeviceKey>>,
    /// Wakes the maintainer when a member leaves.
    pub changed: Notify,
    /// Total bytes through the pool, both directions.
    pub total_bytes: AtomicU64,
    pub strategy: select::Strategy,
    /// Sharers used successfully, by key.
    pub trusted: std::sync::Mutex<std::collections::HashMap<DeviceKey, Trusted>>,
    /// How long open flows wait for a stalled member ([`STALL_GRACE`]).
    pub stall_grace: Duration,
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

/// How the selector sees a member. One whose uplink fails is not a
/// candidate for new flows; loss is the worse of the link to it and its
/// own uplink.
fn view(m: &Member) -> View {
    let probe_rtt = m.probe_rtt_us.load(Ordering::Relaxed);
    let loss = m
        .probe_loss_permille
        .load(Ordering::Relaxed)
        .max(m.uplink_loss_permille.load(Ordering::Relaxed));
    View {
        alive: m.tunnel.close_reason().is_none() && !m.uplink_failing() && !m.is_stalled(),
        link_quality: m.link.quality(),
        rtt: if probe_rtt > 0 {
            Duration::from_micros(probe_rtt)
        } else {
            m.tunnel.rtt()
        },
        loss: loss.min(1000) as f64 / 1000.0,
        band: m.band,
    }
}

impl Pool {
    pub fn len(&self) -> usize {
        self.members.read().map(|m| m.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Remembers `m` as a sharer that served us (keeping any ticket held).
    fn trust(&self, m: &Member) {
        let Ok(mut t) = self.trusted.lock() else {
            return;
        };
        let fresh = !t.contains_key(&m.key);
        let entry = t.entry(m.key).or_insert_with(|| Trusted {
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
    fn take_spare(&self, key: &DeviceKey) -> Option<Vec<u8>> {
        let now = bandshare_core::clock::unix_now();
        let mut t = self.trusted.lock().ok()?;
        let entry = t.get_mut(key)?;
        match &entry.ticket {
            Some((_, exp)) if *exp > now + 5 => entry.ticket.take().map(|(b, _)| b),
            _ => None,
        }
    }

    /// Whether some trusted sharer has no spare ticket.
    pub fn needs_ticket(&self) -> bool {
        self.trusted
            .lock()
            .map(|t| t.values().any(|x| x.ticket.is_none()))
            .unwrap_or(false)
    }

    /// Trusted sharers holding a spare ticket.
    pub fn trusted_with_ticket(&self) -> usize {
        self.trusted
            .lock()
            .map(|t| t.values().filter(|x| x.ticket.is_some()).count())
            .unwrap_or(0)
    }

    pub fn new(strategy: select::Strategy, stall_grace: Duration) -> Pool {
        Pool {
            strategy,
            stall_grace,
            ..Pool::default()
        }
    }

    /// Members that take new flows (not stalled): what the maintainer
    /// keeps at the pool's size.
    pub fn serving(&self) -> usize {
        self.members
            .read()
            .map(|m| m.iter().filter(|x| !x.is_stalled()).count())
            .unwrap_or(0)
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
        self.reselect();
        tokio::spawn(probe(self.clone(), member.clone()));
        tokio::spawn(keep_ticket(self.clone(), member.clone()));
        let pool = self.clone();
        tokio::spawn(async move {
            let why = member.tunnel.closed().await;
            pool.remove(&member.key, &why);
        });
    }

    /// Drops a member (its tunnel closed or failed) and picks again.
    pub fn remove(&self, key: &DeviceKey, why: &str) {
        let gone = self.members.write().ok().and_then(|mut m| {
            let i = m.iter().position(|x| x.key == *key)?;
            Some(m.remove(i))
        });
        if let Some(g) = gone {
            warn!(sharer = %g.name, reason = %why, "left the pool");
            g.tunnel.close();
            self.reselect();
            self.changed.notify_one();
        }
    }

    /// Recomputes the active member; logs a switch.
    pub fn reselect(&self) -> Option<Arc<Member>> {
        let members = self.members.read().ok()?.clone();
        let views: Vec<View> = members.iter().map(|m| view(m)).collect();
        let mut active = self.active.write().ok()?;
        let current = active.and_then(|k| members.iter().position(|m| m.key == k));
        let chosen = select::choose(&views, current, self.strategy, |n| {
            if n == 0 { 0 } else { fastrand::usize(..n) }
        });
        let next = chosen.map(|i| members[i].clone());
        let next_key = next.as_ref().map(|m| m.key);
        if next_key != *active {
            let from = active
                .and_then(|k| members.iter().find(|m| m.key == k))
                .map(|m| m.name.clone());
            info!(from = ?from, to = ?next.as_ref().map(|m| m.name.clone()), "active sharer changed");
            *active = next_key;
        }
        next
    }

    pub fn active(&self) -> Option<Arc<Member>> {
        let key = (*self.active.read().ok()?)?;
        self.members
            .read()
            .ok()?
            .iter()
            .find(|m| m.key == key)
            .cloned()
    }

    /// The best live member other than those in `skip`.
    fn next_best(&self, skip: &[DeviceKey]) -> Option<Arc<Member>> {
        let members = self.members.read().ok()?.clone();
        members
            .into_iter()
            .filter(|m| {
                !skip.contains(&m.key) && m.tunnel.close_reason().is_none() && !m.is_stalled()
            })
            .max_by(|a, b| {
                self.strategy
                    .rank(&view(a))
                    .total_cmp(&self.strategy.rank(&view(b)))
            })
    }

    /// Opens a flow through the active member. A lost tunnel moves on to the
    /// next member at once; a flow not answered within [`HEDGE_AFTER`] is
    /// raced on the next member and the first answer wins, so a sharer that
    /// died without a word costs new flows at most that long. A refusal by
    /// the sharer is returned as is. See [`Tunnel::open_flow`] for
    /// `wait_reply`: it is honoured only while the member answers probes.
    pub async fn open_flow(
        &self,
        target: &FlowHeader,
        wait_reply: bool,
    ) -> Result<(quinn::SendStream, quinn::RecvStream, Arc<Member>), FlowError> {
        type Opened = (quinn::SendStream, quinn::RecvStream, Arc<Member>);
        let attempt = |m: Arc<Member>, wait: bool| {
            let target = target.clone();
            async move {
                match m.tunnel.open_flow(&target, wait).await {
                    Ok((s, r)) => Ok((s, r, m)),
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
            let wait = wait_reply || !m.fresh();
            let mut a = Box::pin(attempt(m.clone(), wait));
            let result: Result<Opened, (FlowError, Arc<Member>)> = if !wait {
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
                Ok((s, r, m)) => {
                    m.flows.fetch_add(1, Ordering::Relaxed);
                    self.trust(&m);
                    return Ok((s, r, m));
                }
                Err((FlowError::Lost(why), m)) => {
                    self.remove(&m.key, &why);
                    last = FlowError::Lost(why);
                    next = self.next_best(&tried);
                }
                // The sharer has no route out (its uplink went away): the
                // next member may well have one.
                // Its ticket is spent (renewal did not come in time): a
                // new connection brings a new ticket; the next member now.
                Err((FlowError::Refused(reply::NOT_ALLOWED, why), m))
                    if why == bandshare_relay::wire::QUOTA_USED_UP =>
                {
                    self.remove(
                        &m.key,
                        "its ticket's byte quota is used up; reconnecting with a new ticket",
                    );
                    last = FlowError::Refused(reply::NOT_ALLOWED, why);
                    next = self.next_best(&tried);
                }
                Err((e @ FlowError::Refused(reply::NETWORK_UNREACHABLE, _), m)) => {
                    warn!(sharer = %m.name, "sharer's network is unreachable; trying the next");
                    m.avoid_for(UNREACHABLE_AVOID);
                    self.reselect();
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
        let active = self.active.read().ok().and_then(|a| *a);
        Status {
            active: members
                .iter()
                .find(|m| Some(m.key) == active)
                .map(|m| m.name.clone()),
            pool: members
                .iter()
                .map(|m| {
                    let v = view(m);
                    MemberStatus {
                        sharer: m.name.clone(),
                        key: m.key.short(),
                        state: if m.tunnel.close_reason().is_some() {
                            "closed"
                        } else if m.is_stalled() {
                            "stalled"
                        } else if m.uplink_failing() {
                            "uplink-down"
                        } else {
                            "ready"
                        },
                        rtt_ms: (v.rtt.as_secs_f64() * 1e5).round() / 100.0,
                        loss: v.loss,
                        uplink_loss: m.uplink_loss_permille.load(Ordering::Relaxed) as f64 / 1000.0,
                        score: (select::score(&v) * 1000.0).round() / 1000.0,
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
