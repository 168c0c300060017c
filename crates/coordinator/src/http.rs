//! The coordinator's HTTP side: `GET /healthz` and `GET /status` (JSON) for
//! operators and scripts.

use crate::Shared;
use axum::{Json, Router, extract::State, routing::get};
use std::sync::Arc;

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/status", get(status))
        .with_state(shared)
}

async fn status(State(shared): State<Arc<Shared>>) -> Json<serde_json::Value> {
    let store = shared.store.clone();
    let devices = tokio::task::spawn_blocking(move || store.device_count().ok())
        .await
        .ok()
        .flatten();
    Json(serde_json::json!({
        "status": "serving",
        "online_sharers": shared.registry.len(),
        "known_devices": devices,
        "uptime_s": shared.started.elapsed().as_secs(),
        "reports_received": shared.reports_received.load(std::sync::atomic::Ordering::Relaxed),
        "share_requests": shared.share_requests.load(std::sync::atomic::Ordering::Relaxed),
        "requests_shed": shared.shed.load(std::sync::atomic::Ordering::Relaxed),
        "connections_refused": shared.grpc_sources.refused.load(std::sync::atomic::Ordering::Relaxed)
            + shared.http_sources.refused.load(std::sync::atomic::Ordering::Relaxed),
        "connections_silent": shared.grpc_sources.silent.load(std::sync::atomic::Ordering::Relaxed)
            + shared.http_sources.silent.load(std::sync::atomic::Ordering::Relaxed),
        "tls_pin": shared.tls_pin.get(),
        "enroll": format!("{:?}", shared.config.enroll).to_lowercase(),
        "version": env!("CARGO_PKG_VERSION"),
    }))
}
