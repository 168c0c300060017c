//! The QoS map's client side: reporting link-quality samples (batched,
//! signed like share requests), asking for predictions along a track, and
//! reading the published cells.

use crate::client::{CoordinatorError, status_error};
use bandshare_proto::v1;
use bandshare_qos::track::{Point, Reading};
use tonic::transport::Channel;

/// Samples sent per `Observe` call (the coordinator takes at most 1,000).
pub const BATCH: usize = 500;

/// (device key, proof, signed at) for `key`, now.
fn proof(key: &ed25519_dalek::SigningKey) -> (Vec<u8>, Vec<u8>, u64) {
    let (proof, at) = crate::client::request_proof(key);
    (key.verifying_key().to_bytes().to_vec(), proof, at)
}

fn ms(t: f64) -> u64 {
    (t.max(0.0) * 1000.0).round() as u64
}

/// A recorded reading as a sample; `None` without a position.
pub fn sample_of(r: &Reading) -> Option<v1::QosSample> {
    let (lat, lon) = r.pos?;
    let network = match r.network.as_deref() {
        Some("5G") => v1::NetworkType::NetworkType5g,
        Some("LTE" | "4G") => v1::NetworkType::NetworkType4g,
        _ => v1::NetworkType::Unspecified,
    };
    Some(v1::QosSample {
        t_unix_ms: ms(r.t),
        lat,
        lon,
        duration_ms: (r.duration_s * 1000.0).round().clamp(1.0, 600_000.0) as u32,
        down_kbps: r.down_kbps,
        up_kbps: r.up_kbps,
        rtt_us: r
            .rtt_ms
            .map(|m| (m * 1000.0).clamp(0.0, u32::MAX as f64) as u32),
        loss_permille: r.loss_permille,
        rsrp_dbm: r.rsrp_dbm,
        rsrq_db: r.rsrq_db,
        snr_db: r.snr_db,
        network: network as i32,
        interpolated: r.filled,
        ..Default::default()
    })
}

/// Totals of an import.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Reported {
    pub accepted: u64,
    pub rejected: u64,
}

/// Sends samples in batches of [`BATCH`]; `progress` hears each batch's
/// size. The first refusal reasons are returned with the totals.
pub async fn observe(
    channel: Channel,
    key: &ed25519_dalek::SigningKey,
    samples: Vec<v1::QosSample>,
    mut progress: impl FnMut(usize),
) -> Result<(Reported, Vec<String>), CoordinatorError> {
    let mut client = v1::qos_client::QosClient::new(channel);
    let mut total = Reported::default();
    let mut reasons = vec![];
    for chunk in samples.chunks(BATCH) {
        let (device_key, proof, signed_at_unix) = proof(key);
        let ack = client
            .observe(v1::ObserveBatch {
                device_key,
                proof,
                signed_at_unix,
                samples: chunk.to_vec(),
            })
            .await
            .map_err(status_error)?
            .into_inner();
        total.accepted += u64::from(ack.accepted);
        total.rejected += u64::from(ack.rejected);
        if reasons.len() < 5 {
            reasons.extend(ack.reasons);
        }
        progress(chunk.len());
    }
    Ok((total, reasons))
}

/// Predictions for every point of a track, in order, each causal.
pub async fn predict(
    channel: Channel,
    key: &ed25519_dalek::SigningKey,
    track: &[Point],
    weak_kbps: f64,
    horizon_s: u32,
) -> Result<Vec<v1::PointPrediction>, CoordinatorError> {
    let mut client = v1::qos_client::QosClient::new(channel);
    let (device_key, proof, signed_at_unix) = proof(key);
    let points = track
        .iter()
        .map(|p| v1::TrackPoint {
            t_unix_ms: ms(p.t),
            lat: p.pos.map(|p| p.0),
            lon: p.pos.map(|p| p.1),
        })
        .collect();
    client
        .predict(v1::PredictRequest {
            device_key,
            proof,
            signed_at_unix,
            points,
            weak_kbps,
            horizon_s,
        })
        .await
        .map(|r| r.into_inner().points)
        .map_err(status_error)
}

/// The cells at least k devices reported.
pub async fn published(channel: Channel) -> Result<v1::CellsResponse, CoordinatorError> {
    v1::qos_client::QosClient::new(channel)
        .published_cells(v1::CellsRequest {})
        .await
        .map(|r| r.into_inner())
        .map_err(status_error)
}

/// The published cells as a GeoJSON FeatureCollection of H3 polygons.
pub fn geojson(cells: &v1::CellsResponse) -> serde_json::Value {
    let features: Vec<serde_json::Value> = cells
        .cells
        .iter()
        .filter_map(|c| {
            let mut ring: Vec<[f64; 2]> = bandshare_qos::cell_boundary(c.h3)?
                .into_iter()
                .map(|(lat, lon)| [lon, lat])
                .collect();
            ring.push(*ring.first()?);
            Some(serde_json::json!({
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {
                    "h3": format!("{:x}", c.h3),
                    "expected_kbps": (c.kbps * 10.0).round() / 10.0,
                    "weak_share": (c.weak_share * 1000.0).round() / 1000.0,
                    "weak": c.weak,
                    "dip_share": c.dip_share.map(|d| (d * 1000.0).round() / 1000.0),
                    "dips_recur": c.dips_recur,
                    "confidence": (c.confidence * 1000.0).round() / 1000.0,
                },
            }))
        })
        .collect();
    serde_json::json!({
        "type": "FeatureCollection",
        "properties": {"resolution": cells.resolution, "k": cells.k, "weak_kbps": cells.weak_kbps},
        "features": features,
    })
}
