//! Where a device is (its *location*: a GNSS position, Wi-Fi fingerprint,
//! serving cell or router, see DESIGN's word table) and the condition flags
//! shared by `share`, `connect` and `offers`, parsed into wire messages;
//! kept current by live sources: a static `--at` (and `--wifi`, `--cell`,
//! `--router`) as the fallback, fixes from gpsd (`--gpsd`, [`gpsd`]) and
//! periodic Wi-Fi scans (`--wifi-scan IFACE`, [`wifi_scan`]). Sources update
//! one `watch` of the location; agents read it when they report or ask.

pub mod gpsd;
pub mod replay;
pub mod wifi_scan;

use bandshare_core::{NetworkType, Position, Scene, Security, ServiceSet};
use bandshare_proto::convert as cv;
use bandshare_proto::v1;
use tokio::sync::watch;

/// Where a device says it is.
#[derive(Clone, Debug, Default)]
pub struct LocationSpec {
    pub at: Option<Position>,
    pub scene: Option<Scene>,
    pub heading_deg: Option<f64>,
    pub speed_mps: Option<f64>,
    pub wifi: Vec<(String, i32)>,
    pub cell: Option<String>,
    /// BSSID of the router the device is associated with.
    pub router: Option<String>,
    /// Accuracy of the fix in metres, when the source tells.
    pub accuracy_m: Option<f64>,
}

impl LocationSpec {
    pub fn to_wire(&self) -> v1::Location {
        v1::Location {
            gnss: self.at.as_ref().map(|p| v1::GnssFix {
                accuracy_m: self.accuracy_m,
                ..cv::fix_to_wire(p)
            }),
            wifi: self
                .wifi
                .iter()
                .map(|(b, r)| v1::WifiObservation {
                    bssid: b.clone(),
                    rssi_dbm: *r,
                })
                .collect(),
            anchor: Some(v1::Anchor {
                cell_id: self.cell.clone().unwrap_or_default(),
                router_id: self.router.clone().unwrap_or_default(),
            }),
            scene_hint: cv::scene_to_wire(self.scene),
            heading_deg: self.heading_deg,
            speed_mps: self.speed_mps,
        }
    }
}

/// What a requester wants.
#[derive(Clone, Debug, Default)]
pub struct ConditionSpec {
    pub want: ServiceSet,
    pub network: Option<NetworkType>,
    /// The weakest hotspot security accepted.
    pub security: Option<Security>,
    pub max_offers: u32,
}

impl ConditionSpec {
    pub fn to_wire(&self) -> v1::Conditions {
        v1::Conditions {
            services: cv::services_to_wire(self.want),
            network: cv::network_to_wire(self.network),
            security: cv::security_to_wire(self.security),
            max_offers: self.max_offers,
            quota_bytes: 0,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FlagError {
    #[error("expected BSSID=RSSI[,BSSID=RSSI...] such as aa:bb:cc:dd:ee:ff=-60, got {0:?}")]
    Wifi(String),
    #[error("heading must be within 0..360 degrees, got {0}")]
    Heading(String),
    #[error("speed must be within 0..=150 m/s, got {0}")]
    Speed(String),
}

/// `aa:bb:cc:dd:ee:ff=-60,...`
pub fn parse_wifi(s: &str) -> Result<Vec<(String, i32)>, FlagError> {
    let bad = || FlagError::Wifi(s.to_string());
    s.split(',')
        .map(|item| {
            let (b, r) = item.trim().split_once('=').ok_or_else(bad)?;
            let parts: Vec<&str> = b.split(':').collect();
            let mac_ok = parts.len() == 6
                && parts
                    .iter()
                    .all(|p| p.len() == 2 && u8::from_str_radix(p, 16).is_ok());
            let rssi: i32 = r.parse().map_err(|_| bad())?;
            if !mac_ok || !(-120..=0).contains(&rssi) {
                return Err(bad());
            }
            Ok((b.to_ascii_lowercase(), rssi))
        })
        .collect()
}

pub fn parse_heading(s: &str) -> Result<f64, FlagError> {
    s.parse::<f64>()
        .ok()
        .filter(|h| (0.0..360.0).contains(h))
        .ok_or_else(|| FlagError::Heading(s.to_string()))
}

pub fn parse_speed(s: &str) -> Result<f64, FlagError> {
    s.parse::<f64>()
        .ok()
        .filter(|v| (0.0..=150.0).contains(v))
        .ok_or_else(|| FlagError::Speed(s.to_string()))
}

/// Where live locations come from.
#[derive(Clone, Debug, Default)]
pub struct Sources {
    /// gpsd's address, `HOST:PORT`.
    pub gpsd: Option<String>,
    /// Interface to scan for Wi-Fi access points.
    pub wifi_scan: Option<String>,
    /// A recorded track to play as the position.
    pub replay: Option<replay::Replay>,
}

impl Sources {
    pub fn is_live(&self) -> bool {
        self.gpsd.is_some() || self.wifi_scan.is_some() || self.replay.is_some()
    }
}

/// Starts the live sources (each retries on its own until `shutdown`) and
/// returns the watch of the current location, starting from `initial`.
pub fn start(
    initial: LocationSpec,
    sources: &Sources,
    shutdown: crate::Shutdown,
) -> watch::Receiver<LocationSpec> {
    let (tx, rx) = watch::channel(initial);
    if let Some(addr) = &sources.gpsd {
        let (tx, addr, stop) = (tx.clone(), addr.clone(), shutdown.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = gpsd::follow(addr, tx) => {}
                _ = stop.wait() => {}
            }
        });
    }
    if let Some(r) = &sources.replay {
        let (tx, r, stop) = (tx.clone(), r.clone(), shutdown.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = replay::follow(r, tx) => {}
                _ = stop.wait() => {}
            }
        });
    }
    if let Some(iface) = &sources.wifi_scan {
        let (tx, iface, stop) = (tx.clone(), iface.clone(), shutdown);
        tokio::spawn(async move {
            tokio::select! {
                _ = wifi_scan::follow(iface, tx) => {}
                _ = stop.wait() => {}
            }
        });
    }
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags() {
        assert_eq!(
            parse_wifi("AA:bb:cc:dd:ee:ff=-60,00:11:22:33:44:55=-81").expect("ok"),
            vec![
                ("aa:bb:cc:dd:ee:ff".into(), -60),
                ("00:11:22:33:44:55".into(), -81)
            ]
        );
        assert!(parse_wifi("aa:bb=-1").is_err());
        assert!(parse_wifi("aa:bb:cc:dd:ee:ff=10").is_err());
        assert!(parse_heading("360").is_err());
        assert_eq!(parse_heading("90.5"), Ok(90.5));
        assert!(parse_speed("-1").is_err());
    }
}
