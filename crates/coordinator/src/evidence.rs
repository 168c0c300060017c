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

pub fn evidence(loc: &v1::Location) -> Result<Evidence, String> {
    let fix = match &loc.gnss {
        Some(f) => Some(cv::fix_from_wire(f).map_err(|e| e.to_string())?),
        None => None,
    };
    let accuracy_m = loc.gnss.as_ref().and_then(|f| f.accuracy_m);
    if accuracy_m.is_some_and(|a| !(0.0..=100_000.0).contains(&a)) {
        return Err(format!(
            "accuracy must be within 0..=100000 m, got {accuracy_m:?}"
        ));
    }
    if loc.heading_deg.is_some_and(|h| !(0.0..360.0).contains(&h)) {
        return Err(format!(
            "heading must be within 0..360 degrees, got {:?}",
            loc.heading_deg
        ));
    }
    if loc.speed_mps.is_some_and(|v| !(0.0..=150.0).contains(&v)) {
        return Err(format!(
            "speed must be within 0..=150 m/s, got {:?}",
            loc.speed_mps
        ));
    }
    let obs: Vec<(String, i32)> = loc
        .wifi
        .iter()
        .map(|w| (w.bssid.clone(), w.rssi_dbm))
        .collect();
    let wifi = Fingerprint::parse(&obs).map_err(|e| e.to_string())?;
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
        assert!(evidence(&loc).is_err_and(|e| e.contains("heading")));
        loc.heading_deg = None;
        loc.wifi[0].bssid = "nonsense".into();
        assert!(evidence(&loc).is_err_and(|e| e.contains("BSSID")));
    }
}
