//! Prometheus metrics for `GET /metrics` (OpenMetrics text, which
//! Prometheus scrapes natively). Built on `prometheus-client`, the
//! Prometheus project's own Rust client: its registries are values, not a
//! process-wide recorder, so the demo and the tests, which run a
//! coordinator, sharers and a requester in one process, keep their numbers
//! apart.
//!
//! Events are counted where they happen ([`Metrics`]); what the
//! coordinator already knows (online sharers, revocations in force, shed
//! requests, state reports, the QoS map's size) is read when scraped.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use std::time::{Duration, Instant};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AnswerLabel {
    pub answer: &'static str,
}

/// The coordinator's event metrics (cheap to clone: shared inside).
#[derive(Clone, Debug)]
pub struct Metrics {
    share_requests: Family<ResultLabel, Counter>,
    share_request_seconds: Histogram,
    offers_per_request: Histogram,
    access_requests: Family<AnswerLabel, Counter>,
    tickets_issued: Counter,
    tickets_refreshed: Counter,
    usage_bytes: Counter,
    /// The last [`LIVE_WINDOW`] of share requests (when, how long, whether
    /// they got offers), for the dashboard's live figures.
    recent: std::sync::Arc<std::sync::Mutex<std::collections::VecDeque<(Instant, f64, bool)>>>,
}

/// The dashboard's live figures are over this window.
pub const LIVE_WINDOW: Duration = Duration::from_secs(10);
/// Requests remembered for them at most.
const LIVE_MAX: usize = 50_000;

/// Share requests over the last [`LIVE_WINDOW`].
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct Live {
    pub per_s: f64,
    /// Share that got offers, 0..=1 (`None`: no requests).
    pub success: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            share_requests: Family::default(),
            // 100 µs .. about 1.6 s.
            share_request_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 15)),
            offers_per_request: Histogram::new([0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0]),
            access_requests: Family::default(),
            tickets_issued: Counter::default(),
            tickets_refreshed: Counter::default(),
            usage_bytes: Counter::default(),
            recent: Default::default(),
        }
    }
}

/// The result label of a share request that failed with `code`.
pub fn result_of(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::InvalidArgument | Code::OutOfRange => "invalid",
        Code::Unauthenticated => "unauthenticated",
        Code::PermissionDenied => "denied",
        Code::ResourceExhausted => "limited",
        Code::Unavailable => "unavailable",
        _ => "error",
    }
}

impl Metrics {
    /// One share request answered with `offers` offers (`Err`: refused with
    /// that code) after `took`.
    pub fn share_request(&self, outcome: Result<usize, tonic::Code>, took: Duration) {
        let result = match outcome {
            Ok(n) => {
                self.offers_per_request.observe(n as f64);
                self.tickets_issued.inc_by(n as u64);
                if n == 0 { "no_offers" } else { "offered" }
            }
            Err(code) => result_of(code),
        };
        self.share_requests
            .get_or_create(&ResultLabel { result })
            .inc();
        self.share_request_seconds.observe(took.as_secs_f64());
        if let Ok(mut r) = self.recent.lock() {
            let now = Instant::now();
            r.push_back((now, took.as_secs_f64(), result == "offered"));
            while r.len() > LIVE_MAX
                || r.front()
                    .is_some_and(|(t, _, _)| now.duration_since(*t) > LIVE_WINDOW)
            {
                r.pop_front();
            }
        }
    }

    /// Share requests over the last [`LIVE_WINDOW`], as of `now`.
    pub fn live(&self, now: Instant) -> Live {
        let Ok(r) = self.recent.lock() else {
            return Live::default();
        };
        let mut took: Vec<f64> = vec![];
        let mut ok = 0usize;
        for (t, secs, offered) in r.iter() {
            if now.saturating_duration_since(*t) <= LIVE_WINDOW {
                took.push(*secs);
                ok += usize::from(*offered);
            }
        }
        drop(r);
        if took.is_empty() {
            return Live::default();
        }
        took.sort_by(f64::total_cmp);
        let q = |p: f64| took[((took.len() - 1) as f64 * p).round() as usize] * 1000.0;
        Live {
            per_s: took.len() as f64 / LIVE_WINDOW.as_secs_f64(),
            success: Some(ok as f64 / took.len() as f64),
            p50_ms: Some(q(0.5)),
            p99_ms: Some(q(0.99)),
        }
    }

    /// A sharer's answer to an access request: accepted, declined or silent.
    pub fn access_answer(&self, answer: &'static str) {
        self.access_requests
            .get_or_create(&AnswerLabel { answer })
            .inc();
    }

    pub fn tickets_refreshed(&self, n: usize) {
        self.tickets_refreshed.inc_by(n as u64);
    }

    /// Usage bytes written to the ledger and acknowledged to a sharer.
    pub fn usage_acknowledged(&self, bytes: u64) {
        self.usage_bytes.inc_by(bytes);
    }
}

/// What is read at scrape time.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub online_sharers: usize,
    pub revocations: usize,
    pub requests_shed: u64,
    pub joins_shed: u64,
    pub state_reports: u64,
    pub connections_refused: u64,
    pub qos: Option<crate::qos::QosStatus>,
    pub uptime_s: u64,
    /// Scaled out (`server --redis`).
    pub cluster: Option<ClusterSnapshot>,
}

/// What a coordinator of a scaled-out service reports of its Redis side.
#[derive(Default, Debug, Clone)]
pub struct ClusterSnapshot {
    pub local_sharers: usize,
    pub redis_up: bool,
    pub presence_written: u64,
    pub presence_applied: u64,
    pub writes_dropped: u64,
}

/// The OpenMetrics text of `m` and `s`.
pub fn render(m: &Metrics, s: &Snapshot) -> String {
    let mut r = Registry::with_prefix("bandshare");
    r.register(
        "online_sharers",
        "Online sharers in this coordinator's index (scaled out: its own and the other coordinators')",
        ConstGauge::new(s.online_sharers as i64),
    );
    r.register(
        "share_requests",
        "Share requests by result (offered, no_offers, invalid, unauthenticated, denied, limited, unavailable, error)",
        m.share_requests.clone(),
    );
    r.register_with_unit(
        "share_request_duration",
        "Time to answer a share request, including the sharers' answers",
        Unit::Seconds,
        m.share_request_seconds.clone(),
    );
    r.register(
        "offers_per_request",
        "Offers returned per answered share request",
        m.offers_per_request.clone(),
    );
    r.register(
        "access_requests",
        "Access requests sent to sharers, by their answer (accepted, declined, silent)",
        m.access_requests.clone(),
    );
    r.register(
        "requests_shed",
        "Requests refused because the coordinator was at its in-flight limit",
        ConstCounter::new(s.requests_shed),
    );
    r.register(
        "joins_shed",
        "Sharers refused (they retry with backoff) because too many were waiting to join",
        ConstCounter::new(s.joins_shed),
    );
    r.register(
        "tickets_issued",
        "Tickets issued with offers",
        m.tickets_issued.clone(),
    );
    r.register(
        "tickets_refreshed",
        "Tickets issued by refreshes",
        m.tickets_refreshed.clone(),
    );
    r.register(
        "revocations",
        "Devices revoked by the operator (in force)",
        ConstGauge::new(s.revocations as i64),
    );
    r.register_with_unit(
        "usage_acknowledged",
        "Relayed bytes (both directions) written to the ledger and acknowledged",
        Unit::Bytes,
        m.usage_bytes.clone(),
    );
    r.register(
        "state_reports",
        "Sharer state reports processed",
        ConstCounter::new(s.state_reports),
    );
    r.register(
        "connections_refused",
        "Connections refused by the per-source limits",
        ConstCounter::new(s.connections_refused),
    );
    if let Some(q) = &s.qos {
        r.register(
            "qos_published_cells",
            "QoS map cells seen by at least k devices (answered and exported)",
            ConstGauge::new(q.published_cells as i64),
        );
        r.register(
            "qos_samples_accepted",
            "Link-quality samples taken into the QoS map",
            ConstCounter::new(q.samples_accepted),
        );
        r.register(
            "qos_samples_rejected",
            "Link-quality samples refused (implausible, rate-limited or invalid)",
            ConstCounter::new(q.samples_rejected),
        );
    }
    if let Some(c) = &s.cluster {
        r.register(
            "cluster_local_sharers",
            "Sharers whose stream is open on this coordinator",
            ConstGauge::new(c.local_sharers as i64),
        );
        r.register(
            "cluster_redis_up",
            "1 when the last Redis command succeeded, 0 when Redis is unreachable",
            ConstGauge::new(i64::from(c.redis_up)),
        );
        r.register(
            "cluster_presence_written",
            "Presence entries of this coordinator's sharers written to Redis",
            ConstCounter::new(c.presence_written),
        );
        r.register(
            "cluster_presence_applied",
            "Presence entries of other coordinators' sharers applied to the index",
            ConstCounter::new(c.presence_applied),
        );
        r.register(
            "cluster_writes_dropped",
            "Presence and QoS writes dropped because the queue to Redis was full",
            ConstCounter::new(c.writes_dropped),
        );
    }
    r.register_with_unit(
        "uptime",
        "Seconds since the coordinator started",
        Unit::Seconds,
        ConstGauge::new(s.uptime_s as i64),
    );
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &r);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_what_was_counted() {
        let m = Metrics::default();
        m.share_request(Ok(3), Duration::from_millis(2));
        m.share_request(Ok(0), Duration::from_millis(1));
        m.share_request(Err(tonic::Code::Unauthenticated), Duration::from_micros(50));
        m.access_answer("accepted");
        m.usage_acknowledged(1500);
        let text = render(
            &m,
            &Snapshot {
                online_sharers: 4,
                ..Snapshot::default()
            },
        );
        for line in [
            "bandshare_online_sharers 4",
            "bandshare_share_requests_total{result=\"offered\"} 1",
            "bandshare_share_requests_total{result=\"no_offers\"} 1",
            "bandshare_share_requests_total{result=\"unauthenticated\"} 1",
            "bandshare_share_request_duration_seconds_count 3",
            "bandshare_offers_per_request_sum 3.0",
            "bandshare_access_requests_total{answer=\"accepted\"} 1",
            "bandshare_tickets_issued_total 3",
            "bandshare_usage_acknowledged_bytes_total 1500",
            "# EOF",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        let live = m.live(Instant::now());
        assert_eq!(live.per_s, 0.3);
        assert_eq!(live.success, Some(1.0 / 3.0));
        assert_eq!(live.p99_ms, Some(2.0));
        assert_eq!(
            m.live(Instant::now() + LIVE_WINDOW * 2),
            Live::default(),
            "old requests leave the window"
        );
    }
}
