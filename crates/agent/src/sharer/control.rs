//! The sharer's control endpoint (`share --control ADDR`): `GET /status`
//! (JSON) and `GET /metrics` (OpenMetrics, via `prometheus-client` like
//! the coordinator's and the requester's): what it relays, to how many
//! requesters, what it refused and why, and its uplink.

use crate::prom::{L1, l1};
use bandshare_relay::RelayHandle;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Registry, Unit};

/// What `/status` shows.
#[derive(serde::Serialize)]
pub struct Status {
    pub name: String,
    pub relay: String,
    pub active_requesters: u32,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub daily_used: u64,
    pub daily_left: u64,
    pub uplink_down: bool,
    pub uplink_loss: f64,
    pub flows_refused: std::collections::BTreeMap<&'static str, u64>,
    pub connections_refused: u64,
}

pub fn status(name: &str, relay_addr: std::net::SocketAddr, h: &RelayHandle) -> Status {
    let (up, down) = h.bytes_by_direction();
    let uplink = h.uplink();
    Status {
        name: name.to_string(),
        relay: relay_addr.to_string(),
        active_requesters: h.active_requesters(),
        bytes_up: up,
        bytes_down: down,
        daily_used: h.daily_used(),
        daily_left: h.daily_left(),
        uplink_down: uplink.down,
        uplink_loss: f64::from(uplink.loss_permille) / 1000.0,
        flows_refused: h.flows_refused(),
        connections_refused: h.refused_sources(),
    }
}

/// The OpenMetrics text of one sharer.
pub fn render(s: &Status, h: &RelayHandle) -> String {
    let mut r = Registry::with_prefix("bandshare_sharer");
    r.register(
        "active_requesters",
        "Requesters with a connection open to this sharer's relay",
        ConstGauge::new(i64::from(s.active_requesters)),
    );
    let relayed = Family::<L1, Counter>::default();
    relayed
        .get_or_create(&l1("direction", "up"))
        .inc_by(s.bytes_up);
    relayed
        .get_or_create(&l1("direction", "down"))
        .inc_by(s.bytes_down);
    r.register_with_unit(
        "relayed",
        "TCP bytes relayed, towards destinations (up) and back to requesters (down)",
        Unit::Bytes,
        relayed,
    );
    let refused = Family::<L1, Counter>::default();
    for reason in ["egress_denied", "quota"] {
        let _ = refused.get_or_create(&l1("reason", reason));
    }
    for (reason, n) in &s.flows_refused {
        refused.get_or_create(&l1("reason", reason)).inc_by(*n);
    }
    r.register(
        "flows_refused",
        "Flows refused, by reason (egress_denied: the egress policy; quota: a rate, daily or ticket limit; unreachable, target_refused, timeout, bad_target, failure)",
        refused,
    );
    r.register(
        "connections_refused",
        "Relay connections refused because their source had too many",
        ConstCounter::new(s.connections_refused),
    );
    r.register_with_unit(
        "daily_used",
        "Bytes relayed today (the daily cap's count)",
        Unit::Bytes,
        ConstGauge::new(s.daily_used as i64),
    );
    r.register(
        "uplink_up",
        "1 while the sharer's own uplink works",
        ConstGauge::new(i64::from(!s.uplink_down)),
    );
    r.register(
        "uplink_loss_ratio",
        "Recent loss on the sharer's own uplink",
        ConstGauge::new(s.uplink_loss),
    );
    let u = h.udp_counts();
    let udp = Family::<L1, Counter>::default();
    for (what, n) in [
        ("sent", u.sent),
        ("received", u.received),
        ("denied", u.denied),
        ("over_limit", u.over_limit),
        ("malformed", u.malformed),
    ] {
        udp.get_or_create(&l1("outcome", what)).inc_by(n);
    }
    r.register("udp_datagrams", "UDP datagrams relayed or dropped", udp);
    crate::prom::encode(&r)
}

/// Serves `/status` and `/metrics` on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    name: String,
    relay_addr: std::net::SocketAddr,
    h: RelayHandle,
    shutdown: crate::Shutdown,
) {
    use axum::routing::get;
    let (n2, h2) = (name.clone(), h.clone());
    let app = axum::Router::new()
        .route(
            "/status",
            get(move || {
                let s = status(&name, relay_addr, &h);
                async move { axum::Json(s) }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let text = render(&status(&n2, relay_addr, &h2), &h2);
                async move {
                    (
                        [(axum::http::header::CONTENT_TYPE, crate::prom::CONTENT_TYPE)],
                        text,
                    )
                }
            }),
        );
    let _ = axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.wait().await })
        .await;
}
