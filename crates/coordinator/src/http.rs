//! The coordinator's HTTP side: `GET /healthz`, `GET /status` (JSON) for
//! operators and scripts, and `GET /metrics` for Prometheus.

use crate::State;
use axum::response::IntoResponse;
use axum::{Json, Router, extract, routing::get};
use std::sync::Arc;

pub fn router(state: Arc<State>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn status(extract::State(state): extract::State<Arc<State>>) -> Json<serde_json::Value> {
    let store = state.store().clone();
    let devices = tokio::task::spawn_blocking(move || store.device_count().ok())
        .await
        .ok()
        .flatten();
    let mut body = serde_json::json!({
        "status": "serving",
        "known_devices": devices,
        "tls_pin": state.tls_pin(),
        "enroll": format!("{:?}", state.config().enroll).to_lowercase(),
        "version": env!("CARGO_PKG_VERSION"),
        "qos": state.qos_book(|b| b.status()).ok(),
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
