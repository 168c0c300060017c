//! The requester's Prometheus metrics (`GET /metrics` on `--control`,
//! OpenMetrics text, via `prometheus-client` like the coordinator's):
//! which path carries new flows, the own link, each pool member's state,
//! RTT and loss, failovers by cause, bytes relayed by direction, flows
//! refused by reason. Counters that must only grow (bytes, failovers,
//! refusals) live in [`Counters`]; the rest is read from the status when
//! scraped.

use super::direct::OwnLinkStatus;
use super::forecast::ForecastStatus;
use super::pool;
use super::udp::UdpStatus;
use crate::prom::{L1, l1};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::{Registry, Unit};
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// What only grows, counted where it happens.
#[derive(Debug, Default)]
pub struct Counters {
    /// Bytes through the pool: sent towards sharers, received from them.
    pub pool_up: AtomicU64,
    pub pool_down: AtomicU64,
    /// Flows opened through the pool.
    pub pool_flows: AtomicU64,
    /// Flows cut after they opened (a sharer died under them).
    pub cut: AtomicU64,
    failovers: Mutex<BTreeMap<&'static str, u64>>,
    refused: Mutex<BTreeMap<&'static str, u64>>,
    /// The last [`RECENT_FAILOVERS`] failovers, oldest first.
    recent: Mutex<std::collections::VecDeque<Failover>>,
}

/// Failovers remembered for the page.
pub const RECENT_FAILOVERS: usize = 20;

/// One change of the active member, for `/status` and the page.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Failover {
    pub unix_ms: u64,
    pub cause: &'static str,
    pub from: String,
    /// `None`: no member could take new flows.
    pub to: Option<String>,
}

fn bump(m: &Mutex<BTreeMap<&'static str, u64>>, k: &'static str) {
    if let Ok(mut m) = m.lock() {
        *m.entry(k).or_default() += 1;
    }
}

fn read(m: &Mutex<BTreeMap<&'static str, u64>>) -> BTreeMap<&'static str, u64> {
    m.lock().map(|m| m.clone()).unwrap_or_default()
}

impl Counters {
    /// The active member changed away from one that served, because of
    /// `cause` (stall, drop, closed, uplink, loss, better; retired when the own
    /// link took over and the pool shrank).
    pub fn failover(&self, cause: &'static str, from: String, to: Option<String>) {
        bump(&self.failovers, cause);
        if let Ok(mut r) = self.recent.lock() {
            r.push_back(Failover {
                unix_ms: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64),
                cause,
                from,
                to,
            });
            while r.len() > RECENT_FAILOVERS {
                r.pop_front();
            }
        }
    }

    /// The recent failovers, oldest first.
    pub fn recent_failovers(&self) -> Vec<Failover> {
        self.recent
            .lock()
            .map(|r| r.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// A flow was refused or could not open, for `reason`.
    pub fn refused(&self, reason: &'static str) {
        bump(&self.refused, reason);
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MemberLabel {
    sharer: String,
    key: String,
}

type FGauge = Gauge<f64, AtomicU64>;

/// What one scrape shows.
pub struct View<'a> {
    pub path: &'a str,
    pub own: &'a OwnLinkStatus,
    pub pool: &'a pool::Status,
    pub udp: &'a UdpStatus,
    pub forecast: Option<&'a ForecastStatus>,
    pub counters: &'a Counters,
}

/// The OpenMetrics text of one requester.
pub fn render(v: &View) -> String {
    let mut r = Registry::with_prefix("bandshare");
    let path = Family::<L1, Gauge>::default();
    for p in ["direct", "pool"] {
        path.get_or_create(&l1("path", p))
            .set(i64::from(v.path == p));
    }
    r.register("path", "Which path new flows take (1 = this one)", path);

    let own = Family::<L1, Gauge>::default();
    for s in ["unknown", "healthy", "degraded"] {
        own.get_or_create(&l1("state", s))
            .set(i64::from(v.own.state == s));
    }
    r.register("own_link_state", "The own link's state (1 = this one)", own);
    if let Some(ms) = v.own.rtt_ms {
        r.register_with_unit(
            "own_link_rtt",
            "Mean RTT of the own link's recent probes",
            Unit::Seconds,
            ConstGauge::new(ms / 1000.0),
        );
    }
    r.register(
        "own_link_loss_ratio",
        "Share of the own link's recent probes lost",
        ConstGauge::new(v.own.loss),
    );
    r.register_with_unit(
        "own_link_hold",
        "How long the own link must be good before new flows return to it",
        Unit::Seconds,
        ConstGauge::new(v.own.hold_s),
    );
    let trials = Family::<L1, Counter>::default();
    for (result, n) in super::direct::TRIAL_RESULTS.iter().zip(v.own.trials_run) {
        trials.get_or_create(&l1("result", result)).inc_by(n);
    }
    r.register(
        "own_link_trials",
        "Trial downloads over the own link before new flows return to it, by result",
        trials,
    );
    let direct_bytes = Family::<L1, Counter>::default();
    direct_bytes
        .get_or_create(&l1("direction", "up"))
        .inc_by(v.own.bytes_up);
    direct_bytes
        .get_or_create(&l1("direction", "down"))
        .inc_by(v.own.bytes_down);
    r.register_with_unit(
        "direct",
        "Bytes carried over the own link, by direction",
        Unit::Bytes,
        direct_bytes,
    );
    r.register(
        "direct_flows",
        "Flows opened over the own link",
        ConstCounter::new(v.own.flows),
    );

    let members = Family::<L1, Gauge>::default();
    for s in ["ready", "stalled", "uplink-down", "closed"] {
        let _ = members.get_or_create(&l1("state", s));
    }
    for m in &v.pool.pool {
        members.get_or_create(&l1("state", m.state)).inc();
    }
    r.register("pool_members", "Pool members by state", members);
    let rtt = Family::<MemberLabel, FGauge>::default();
    let loss = Family::<MemberLabel, FGauge>::default();
    let active = Family::<MemberLabel, Gauge>::default();
    for m in &v.pool.pool {
        let l = MemberLabel {
            sharer: m.sharer.clone(),
            key: m.key.clone(),
        };
        rtt.get_or_create(&l).set(m.rtt_ms / 1000.0);
        loss.get_or_create(&l).set(m.loss);
        active.get_or_create(&l).set(i64::from(m.active));
    }
    r.register_with_unit(
        "member_rtt",
        "Probe RTT of each pool member",
        Unit::Seconds,
        rtt,
    );
    r.register(
        "member_loss_ratio",
        "Probe loss of each pool member (or its reported uplink loss, if worse)",
        loss,
    );
    r.register(
        "member_active",
        "1 for the member that carries new flows",
        active,
    );

    let c = v.counters;
    let failovers = Family::<L1, Counter>::default();
    for cause in [
        "stall", "drop", "closed", "uplink", "loss", "better", "retired",
    ] {
        let _ = failovers.get_or_create(&l1("cause", cause));
    }
    for (cause, n) in read(&c.failovers) {
        failovers.get_or_create(&l1("cause", cause)).inc_by(n);
    }
    r.register(
        "failovers",
        "Changes of the active member away from one that served, by cause",
        failovers,
    );
    let relayed = Family::<L1, Counter>::default();
    relayed
        .get_or_create(&l1("direction", "up"))
        .inc_by(c.pool_up.load(Ordering::Relaxed));
    relayed
        .get_or_create(&l1("direction", "down"))
        .inc_by(c.pool_down.load(Ordering::Relaxed));
    r.register_with_unit(
        "relayed",
        "Bytes relayed through the pool, by direction",
        Unit::Bytes,
        relayed,
    );
    r.register(
        "pool_flows",
        "Flows opened through the pool",
        ConstCounter::new(c.pool_flows.load(Ordering::Relaxed)),
    );
    let refused = Family::<L1, Counter>::default();
    for (reason, n) in read(&c.refused) {
        refused.get_or_create(&l1("reason", reason)).inc_by(n);
    }
    r.register(
        "flows_refused",
        "Flows refused or not opened, by reason (bad_request, sharer_refused, no_path, bad_target, direct_refused)",
        refused,
    );
    r.register(
        "flows_cut",
        "Flows cut after they opened",
        ConstCounter::new(c.cut.load(Ordering::Relaxed)),
    );
    let udp = Family::<L1, Counter>::default();
    udp.get_or_create(&l1("direction", "sent"))
        .inc_by(v.udp.sent);
    udp.get_or_create(&l1("direction", "received"))
        .inc_by(v.udp.received);
    udp.get_or_create(&l1("direction", "dropped"))
        .inc_by(v.udp.dropped);
    r.register("udp_datagrams", "UDP datagrams through the pool", udp);
    if let Some(f) = v.forecast {
        r.register(
            "forecast_acting",
            "1 while a predicted weak zone sends new flows through the pool",
            ConstGauge::new(i64::from(f.acting)),
        );
        if let Some(s) = f.weak_in_s {
            r.register_with_unit(
                "forecast_weak_in",
                "Seconds until the next predicted weak zone (0 inside one)",
                Unit::Seconds,
                ConstGauge::new(s),
            );
        }
    }
    crate::prom::encode(&r)
}
