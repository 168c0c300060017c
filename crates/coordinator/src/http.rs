//! The coordinator's HTTP side: `GET /healthz`, `GET /status` (JSON) for
//! operators and scripts, `GET /metrics` for Prometheus, and the live
//! dashboard at `GET /` (its page, script and Leaflet are built into the
//! binary: nothing is fetched from elsewhere). `/api/map` gives sharers only
//! as counts per H3 cell, and only where at least k (the QoS map's k) are;
//! `/events` streams the live figures (server-sent events).
//!
//! With `[http] token` set (required by the server on any address but
//! loopback) every route but `/healthz` needs `Authorization: Bearer
//! TOKEN` or the cookie that `GET /?token=TOKEN` sets, compared in
//! constant time.

use crate::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::{Json, Router, extract, routing::get};
use std::sync::Arc;

/// Sharer counts on the dashboard are per H3 cell of this resolution
/// (about 0.7 km² each).
const SHARER_CELLS: h3o::Resolution = h3o::Resolution::Eight;
const COOKIE: &str = "bandshare_token";

pub fn router(state: Arc<State>) -> Router {
    let page = |body: &'static str, ctype: &'static str| {
        get(move || async move { ([(header::CONTENT_TYPE, ctype)], body) })
    };
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route(
            "/",
            page(
                include_str!("../web/index.html"),
                "text/html; charset=utf-8",
            ),
        )
        .route(
            "/app.js",
            page(
                include_str!("../web/app.js"),
                "text/javascript; charset=utf-8",
            ),
        )
        .route(
            "/vendor/leaflet/leaflet.js",
            page(
                include_str!("../web/vendor/leaflet/leaflet.js"),
                "text/javascript; charset=utf-8",
            ),
        )
        .route(
            "/vendor/leaflet/leaflet.css",
            page(
                include_str!("../web/vendor/leaflet/leaflet.css"),
                "text/css; charset=utf-8",
            ),
        )
        .route(
            "/vendor/leaflet/LICENSE",
            page(
                include_str!("../web/vendor/leaflet/LICENSE"),
                "text/plain; charset=utf-8",
            ),
        )
        .route("/api/map", get(api_map))
        .route("/api/trust", get(api_trust))
        .route("/events", get(events))
        .layer(axum::middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state)
}

/// Equal in time that depends only on `secret`'s length.
fn ct_eq(given: &[u8], secret: &[u8]) -> bool {
    let mut diff = given.len() ^ secret.len();
    for (i, s) in secret.iter().enumerate() {
        diff |= usize::from(given.get(i).copied().unwrap_or(0) ^ s);
    }
    diff == 0
}

/// The token a request presents: a bearer header, or the dashboard cookie.
fn presented(req: &axum::extract::Request) -> Option<String> {
    let h = req.headers();
    if let Some(b) = h
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    {
        return Some(b.trim().to_string());
    }
    h.get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix(COOKIE)?.strip_prefix('='))
        .map(str::to_string)
}

async fn guard(
    extract::State(state): extract::State<Arc<State>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let Some(token) = state.config().http_token.as_deref() else {
        return next.run(req).await;
    };
    if req.uri().path() == "/healthz"
        || presented(&req).is_some_and(|t| ct_eq(t.as_bytes(), token.as_bytes()))
    {
        return next.run(req).await;
    }
    // `/?token=…` (a link an operator can open): set the cookie, then
    // show the page without the token in the address bar.
    let from_query = req.uri().query().and_then(|q| {
        q.split('&')
            .find_map(|kv| kv.strip_prefix("token="))
            .map(str::to_string)
    });
    if req.uri().path() == "/" && from_query.is_some_and(|t| ct_eq(t.as_bytes(), token.as_bytes()))
    {
        return (
            axum::http::StatusCode::SEE_OTHER,
            [
                (header::LOCATION, "/".to_string()),
                (
                    header::SET_COOKIE,
                    format!("{COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/"),
                ),
            ],
        )
            .into_response();
    }
    (
        axum::http::StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        "this coordinator's HTTP side needs its token: Authorization: Bearer TOKEN (or open /?token=TOKEN)\n",
    )
        .into_response()
}

/// Sharer counts per cell (only cells with at least k) and the QoS map's
/// published cells, each with its outline.
async fn api_map(extract::State(state): extract::State<Arc<State>>) -> Json<serde_json::Value> {
    let k = state.config().qos.map.k;
    let sharer_cells: Vec<serde_json::Value> = state
        .registry()
        .cell_counts(SHARER_CELLS)
        .into_iter()
        .filter(|(_, n)| *n >= k)
        .filter_map(|(cell, count)| {
            Some(serde_json::json!({
                "cell": format!("{cell:x}"),
                "count": count,
                "boundary": bandshare_qos::cell_boundary(cell)?,
            }))
        })
        .collect();
    let qos_cells: Vec<serde_json::Value> = state
        .qos_book(|b| b.map.published())
        .unwrap_or_default()
        .into_iter()
        .filter_map(|p| {
            let cell = u64::from(p.cell);
            Some(serde_json::json!({
                "cell": format!("{cell:x}"),
                "kbps": p.estimate.kbps,
                "weak_share": p.estimate.weak_share,
                "weak": p.estimate.weak(),
                "dip_share": p.dip_share,
                "dips_recur": p.dips_recur,
                "boundary": bandshare_qos::cell_boundary(cell)?,
            }))
        })
        .collect();
    Json(serde_json::json!({
        "k": k,
        "sharer_cells": sharer_cells,
        "qos_cells": qos_cells,
    }))
}

/// Pending enrollments, revoked devices and the ticket keys' state.
async fn api_trust(extract::State(state): extract::State<Arc<State>>) -> Json<serde_json::Value> {
    let rows = state.devices().await;
    let approve = state.config().enroll == crate::config::Enroll::Approve;
    let show = |r: &bandshare_store::DeviceRow| {
        serde_json::json!({
            "key": r.key.short(),
            "name": r.name,
            "role": r.role,
            "last_seen_unix": r.last_seen,
        })
    };
    let pending: Vec<_> = rows
        .iter()
        .filter(|r| approve && r.decision.is_none())
        .map(show)
        .collect();
    let revoked: Vec<_> = rows
        .iter()
        .filter(|r| r.decision == Some(bandshare_store::Decision::Revoked))
        .map(show)
        .collect();
    Json(serde_json::json!({
        "enroll": format!("{:?}", state.config().enroll).to_lowercase(),
        "pending": pending,
        "revoked": revoked,
        "keys": state.key_state(),
    }))
}

/// The live figures once a second, as server-sent events.
async fn events(
    extract::State(state): extract::State<Arc<State>>,
) -> axum::response::sse::Sse<
    impl futures::Stream<Item = Result<axum::response::sse::Event, std::convert::Infallible>>,
> {
    use axum::response::sse::{Event, KeepAlive, Sse};
    let stream = futures::stream::unfold((state, true), |(state, first)| async move {
        if !first {
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
        let c = state.counters();
        let data = serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "online_sharers": c.online_sharers,
            "share_requests": c.share_requests,
            "requests_shed": c.requests_shed,
            "joins_shed": c.joins_shed,
            "joins_waiting": c.joins_waiting,
            "live": state.metrics().live(std::time::Instant::now()),
        });
        Some((Ok(Event::default().data(data.to_string())), (state, false)))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

async fn status(extract::State(state): extract::State<Arc<State>>) -> Json<serde_json::Value> {
    let devices = state.device_count().await;
    let mut body = serde_json::json!({
        "status": "serving",
        "known_devices": devices,
        "tls_pin": state.tls_pin(),
        "enroll": format!("{:?}", state.config().enroll).to_lowercase(),
        "version": env!("CARGO_PKG_VERSION"),
        "qos": state.qos_book(|b| b.status()).ok(),
        "cluster": state.cluster().map(|c| serde_json::json!({
            "id": c.id(),
            "redis": c.urls(),
            "redis_reachable": !c.is_down(),
            "local_sharers": state.registry().local_len(),
            "presence_written": c.presence_written(),
            "presence_applied": c.presence_applied(),
            "presence_writes_dropped": c.dropped_writes(),
        })),
    });
    if let (Some(o), Ok(serde_json::Value::Object(c))) =
        (body.as_object_mut(), serde_json::to_value(state.counters()))
    {
        o.extend(c);
    }
    Json(body)
}

async fn metrics(extract::State(state): extract::State<Arc<State>>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.render_metrics(),
    )
}
