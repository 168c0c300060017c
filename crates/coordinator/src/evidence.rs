//! Reading a wire `Location` into the matcher's evidence, checking every
//! value: a bad coordinate, BSSID or heading is an error naming it.

use bandshare_core::Fingerprint;
use bandshare_matcher::Evidence;
use bandshare_proto::convert as cv;
use bandshare_proto::v1;
use std::sync::Arc;

fn nonempty(s: &str) -> Option<Arc<str>> {
    let s = s.trim();
    (!s.is_empty() && s.len() <= 64).then(|| s.into())
}

/// A location with a value out of range; says which and what was sent.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BadLocation {
    #[error("{0}")]
    Fix(String),
    #[error("accuracy must be within 0..=100000 m, got {0}")]
    Accuracy(f64),
    #[error("heading must be within 0..360 degrees, got {0}")]
    Heading(f64),
    #[error("speed must be within 0..=150 m/s, got {0}")]
    Speed(f64),
    #[error("{0}")]
    Wifi(String),
}

pub fn evidence(loc: &v1::Location) -> Result<Evidence, BadLocation> {
    let fix = match &loc.gnss {
        Some(f) => Some(cv::fix_from_wire(f).map_err(|e| BadLocation::Fix(e.to_string()))?),
        None => None,
    };
    let accuracy_m = loc.gnss.as_ref().and_then(|f| f.accuracy_m);
    if let Some(a) = accuracy_m.filter(|a| !(0.0..=100_000.0).contains(a)) {
        return Err(BadLocation::Accuracy(a));
    }
    if let Some(h) = loc.heading_deg.filter(|h| !(0.0..360.0).contains(h)) {
        return Err(BadLocation::Heading(h));
    }
    if let Some(v) = loc.speed_mps.filter(|v| !(0.0..=150.0).contains(v)) {
        return Err(BadLocation::Speed(v));
    }
    let obs: Vec<(String, i32)> = loc
        .wifi
        .iter()
        .map(|w| (w.bssid.clone(), w.rssi_dbm))
        .collect();
    let wifi = Fingerprint::parse(&obs).map_err(|e| BadLocation::Wifi(e.to_string()))?;
    let anchor = loc.anchor.clone().unwrap_or_default();
    Ok(Evidence {
        scene_hint: cv::scene_from_wire(loc.scene_hint),
        fix,
        accuracy_m,
        heading_deg: loc.heading_deg,
        speed_mps: loc.speed_mps,
        wifi,
        cell: nonempty(&anchor.cell_id),
        router: nonempty(&anchor.router_id),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_values() {
        let mut loc = v1::Location {
            gnss: Some(v1::GnssFix {
                lat: 39.9,
                lon: 116.4,
                alt_m: Some(-8.0),
                accuracy_m: Some(5.0),
            }),
            wifi: vec![v1::WifiObservation {
                bssid: "AA:bb:cc:dd:ee:01".into(),
                rssi_dbm: -50,
            }],
            anchor: Some(v1::Anchor {
                cell_id: "460-00-1-2".into(),
                router_id: String::new(),
            }),
            heading_deg: Some(90.0),
            ..Default::default()
        };
        let ev = evidence(&loc).expect("valid");
        assert_eq!(ev.wifi.len(), 1);
        assert_eq!(ev.cell.as_deref(), Some("460-00-1-2"));
        assert!(ev.router.is_none());
        loc.heading_deg = Some(400.0);
        assert!(evidence(&loc).is_err_and(|e| e.to_string().contains("heading")));
        loc.heading_deg = None;
        loc.wifi[0].bssid = "nonsense".into();
        assert!(evidence(&loc).is_err_and(|e| e.to_string().contains("BSSID")));
    }
}
