//! Conversions between wire enums/messages and core types. Wire values a
//! newer peer may send (unknown enum numbers) map to `None` or are skipped,
//! never to a panic.

use crate::v1;
use bandshare_core::{LinkState, NetworkType, Position, Scene, Security, Service, ServiceSet};

pub fn service_to_wire(s: Service) -> i32 {
    (match s {
        Service::Hotspot => v1::Service::Hotspot,
        Service::Wifi6 => v1::Service::Wifi6,
        Service::FiveGhz => v1::Service::Service5ghz,
        Service::Prose => v1::Service::Prose,
    }) as i32
}

pub fn service_from_wire(v: i32) -> Option<Service> {
    Some(match v1::Service::try_from(v).ok()? {
        v1::Service::Hotspot => Service::Hotspot,
        v1::Service::Wifi6 => Service::Wifi6,
        v1::Service::Service5ghz => Service::FiveGhz,
        v1::Service::Prose => Service::Prose,
        v1::Service::Unspecified => return None,
    })
}

pub fn services_to_wire(set: ServiceSet) -> Vec<i32> {
    set.iter().map(service_to_wire).collect()
}

pub fn services_from_wire(v: &[i32]) -> ServiceSet {
    v.iter().filter_map(|s| service_from_wire(*s)).collect()
}

pub fn security_to_wire(s: Option<Security>) -> i32 {
    (match s {
        None => v1::Security::Unspecified,
        Some(Security::Open) => v1::Security::Open,
        Some(Security::Wpa2) => v1::Security::Wpa2,
        Some(Security::Wpa3) => v1::Security::Wpa3,
    }) as i32
}

pub fn security_from_wire(v: i32) -> Option<Security> {
    match v1::Security::try_from(v).ok()? {
        v1::Security::Open => Some(Security::Open),
        v1::Security::Wpa2 => Some(Security::Wpa2),
        v1::Security::Wpa3 => Some(Security::Wpa3),
        v1::Security::Unspecified => None,
    }
}

pub fn network_to_wire(n: Option<NetworkType>) -> i32 {
    (match n {
        None => v1::NetworkType::Unspecified,
        Some(NetworkType::FiveG) => v1::NetworkType::NetworkType5g,
        Some(NetworkType::FourG) => v1::NetworkType::NetworkType4g,
        Some(NetworkType::Wifi) => v1::NetworkType::Wifi,
    }) as i32
}

pub fn network_from_wire(v: i32) -> Option<NetworkType> {
    match v1::NetworkType::try_from(v).ok()? {
        v1::NetworkType::NetworkType5g => Some(NetworkType::FiveG),
        v1::NetworkType::NetworkType4g => Some(NetworkType::FourG),
        v1::NetworkType::Wifi => Some(NetworkType::Wifi),
        v1::NetworkType::Unspecified => None,
    }
}

pub fn scene_to_wire(s: Option<Scene>) -> i32 {
    (match s {
        None => v1::Scene::Unspecified,
        Some(Scene::Outdoor) => v1::Scene::Outdoor,
        Some(Scene::Indoor) => v1::Scene::Indoor,
        Some(Scene::Vehicle) => v1::Scene::Vehicle,
        Some(Scene::Station) => v1::Scene::Station,
        Some(Scene::Anchor) => v1::Scene::Anchor,
    }) as i32
}

pub fn scene_from_wire(v: i32) -> Option<Scene> {
    match v1::Scene::try_from(v).ok()? {
        v1::Scene::Outdoor => Some(Scene::Outdoor),
        v1::Scene::Indoor => Some(Scene::Indoor),
        v1::Scene::Vehicle => Some(Scene::Vehicle),
        v1::Scene::Station => Some(Scene::Station),
        v1::Scene::Anchor => Some(Scene::Anchor),
        v1::Scene::Unspecified => None,
    }
}

pub fn link_to_wire(l: &LinkState) -> v1::LinkState {
    v1::LinkState {
        up: l.up,
        rtt_us: l.rtt_us,
        loss_permille: l.loss_permille,
        uplink_rx_bps: l.uplink_rx_bps,
        uplink_tx_bps: l.uplink_tx_bps,
        relay_bps: l.relay_bps,
        capacity_bps: l.capacity_bps,
        congestion_permille: l.congestion_permille,
        network: network_to_wire(l.network),
        battery_pct: l.battery_pct,
    }
}

pub fn link_from_wire(l: &v1::LinkState) -> LinkState {
    LinkState {
        up: l.up,
        rtt_us: l.rtt_us,
        loss_permille: l.loss_permille.min(1000),
        uplink_rx_bps: l.uplink_rx_bps,
        uplink_tx_bps: l.uplink_tx_bps,
        relay_bps: l.relay_bps,
        capacity_bps: l.capacity_bps,
        congestion_permille: l.congestion_permille.min(1000),
        network: network_from_wire(l.network),
        battery_pct: l.battery_pct.map(|b| b.min(100)),
    }
}

pub fn fix_to_wire(p: &Position) -> v1::GnssFix {
    v1::GnssFix {
        lat: p.lat,
        lon: p.lon,
        alt_m: p.alt,
        accuracy_m: None,
    }
}

/// A fix from the wire, validated: out-of-range or non-finite coordinates
/// are an error naming the value.
pub fn fix_from_wire(f: &v1::GnssFix) -> Result<Position, bandshare_core::geo::PositionError> {
    if !f.lat.is_finite() || !f.lon.is_finite() || f.alt_m.is_some_and(|a| !a.is_finite()) {
        return Err(bandshare_core::geo::PositionError::Syntax(format!(
            "{},{}",
            f.lat, f.lon
        )));
    }
    Position::new(f.lat, f.lon, f.alt_m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        for s in [
            None,
            Some(Security::Open),
            Some(Security::Wpa2),
            Some(Security::Wpa3),
        ] {
            assert_eq!(security_from_wire(security_to_wire(s)), s);
        }
        for s in Service::ALL {
            assert_eq!(service_from_wire(service_to_wire(s)), Some(s));
        }
        assert_eq!(service_from_wire(99), None);
        for n in [
            None,
            Some(NetworkType::FiveG),
            Some(NetworkType::FourG),
            Some(NetworkType::Wifi),
        ] {
            assert_eq!(network_from_wire(network_to_wire(n)), n);
        }
        for s in ["outdoor", "indoor", "vehicle", "station", "anchor"] {
            let s: Scene = s.parse().expect("scene");
            assert_eq!(scene_from_wire(scene_to_wire(Some(s))), Some(s));
        }
        let l = LinkState {
            rtt_us: 7,
            battery_pct: Some(40),
            ..Default::default()
        };
        assert_eq!(link_from_wire(&link_to_wire(&l)), l);
        assert!(
            fix_from_wire(&v1::GnssFix {
                lat: f64::NAN,
                ..Default::default()
            })
            .is_err()
        );
        assert!(
            fix_from_wire(&v1::GnssFix {
                lat: 95.0,
                ..Default::default()
            })
            .is_err()
        );
    }
}
