//! How offers look to people (a table) and to scripts (DESIGN.md's JSON).

use bandshare_proto::convert as cv;
use bandshare_proto::v1;
use serde_json::json;

fn scene_name(resp: &v1::ShareResponse) -> &'static str {
    cv::scene_from_wire(resp.scene).map_or("unknown", |s| s.as_str())
}

fn services(o: &v1::Offer) -> Vec<String> {
    cv::services_from_wire(&o.services)
        .iter()
        .map(|s| s.to_string())
        .collect()
}

/// The first 8 bytes of the sharer's key in hex (`admin` takes it as a prefix).
fn key_of(o: &v1::Offer) -> String {
    bandshare_core::DeviceKey::from_slice(&o.sharer_key).map_or_else(|_| "-".into(), |k| k.short())
}

/// Text from the network, escaped for a terminal.
fn shown(s: &str) -> std::borrow::Cow<'_, str> {
    bandshare_core::name::printable(s)
}

fn network(n: i32) -> String {
    cv::network_from_wire(n).map_or("-".into(), |n| n.to_string())
}

pub fn offers_json(resp: &v1::ShareResponse, explain: bool) -> String {
    let offers: Vec<_> = resp
        .offers
        .iter()
        .map(|o| {
            let l = o.link.unwrap_or_default();
            json!({
                "sharer": o.sharer,
                "key": key_of(o),
                "distance": o.distance_band,
                "services": services(o),
                "network": network(o.network),
                "link": {
                    "up": l.up,
                    "rtt_ms": l.rtt_us as f64 / 1000.0,
                    "loss": l.loss_permille as f64 / 1000.0,
                    "uplink_rx_bps": l.uplink_rx_bps,
                    "uplink_tx_bps": l.uplink_tx_bps,
                    "relay_bps": l.relay_bps,
                    "capacity_bps": l.capacity_bps,
                    "congestion": l.congestion_permille as f64 / 1000.0,
                    "battery_pct": l.battery_pct,
                },
                "score": (o.score * 1000.0).round() / 1000.0,
            })
        })
        .collect();
    let mut v =
        json!({ "scene": scene_name(resp), "scene_reason": resp.scene_reason, "offers": offers });
    if explain {
        v["explain"] = resp
            .explain
            .iter()
            .map(|e| json!({"sharer": e.sharer, "offered": e.offered, "reason": e.reason, "distance": e.distance_band}))
            .collect();
    }
    v.to_string()
}

pub fn offers_table(resp: &v1::ShareResponse, explain: bool) -> String {
    let mut out = format!(
        "scene: {} ({})\n",
        scene_name(resp),
        shown(&resp.scene_reason)
    );
    if resp.offers.is_empty() {
        out.push_str("no offers\n");
    } else {
        out.push_str(&format!(
            "{:<3} {:<14} {:<16} {:<9} {:<20} {:<6} {:>8} {:>6} {:>6}\n",
            "#", "sharer", "key", "distance", "services", "net", "rtt", "loss", "score"
        ));
        for (i, o) in resp.offers.iter().enumerate() {
            let l = o.link.unwrap_or_default();
            out.push_str(&format!(
                "{:<3} {:<14} {:<16} {:<9} {:<20} {:<6} {:>6.1}ms {:>5.1}% {:>6.3}\n",
                i + 1,
                shown(&o.sharer),
                key_of(o),
                shown(&o.distance_band),
                services(o).join(","),
                network(o.network),
                l.rtt_us as f64 / 1000.0,
                l.loss_permille as f64 / 10.0,
                o.score
            ));
        }
    }
    if explain && !resp.explain.is_empty() {
        out.push_str("\nwhy:\n");
        for e in &resp.explain {
            let mark = if e.offered { "+" } else { "-" };
            out.push_str(&format!(
                "  {mark} {:<14} {:<9} {}\n",
                shown(&e.sharer),
                shown(&e.distance_band),
                shown(&e.reason)
            ));
        }
    }
    out.trim_end().to_string()
}
