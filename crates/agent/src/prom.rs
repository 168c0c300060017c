//! What the requester's and the sharer's `/metrics` share: one-label sets,
//! the OpenMetrics encoding and its content type.

use prometheus_client::registry::Registry;

/// One label: its name and value.
pub(crate) type L1 = [(&'static str, String); 1];

pub(crate) fn l1(name: &'static str, v: &str) -> L1 {
    [(name, v.to_string())]
}

/// The content type Prometheus scrapes OpenMetrics text as.
pub(crate) const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The OpenMetrics text of `r`.
pub(crate) fn encode(r: &Registry) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, r);
    out
}
