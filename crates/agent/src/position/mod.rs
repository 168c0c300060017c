//! Where this device is, kept current: a static `--at` (and `--wifi`,
//! `--cell`, `--router`) as the fallback, live fixes from gpsd (`--gpsd`),
//! and periodic Wi-Fi scans (`--wifi-scan IFACE`). Sources update one
//! `watch` of the location; agents read it when they report or ask.

pub mod gpsd;
pub mod wifi_scan;

use crate::location::LocationSpec;
use tokio::sync::watch;

/// Where positions come from.
#[derive(Clone, Debug, Default)]
pub struct Sources {
    /// gpsd's address, `HOST:PORT`.
    pub gpsd: Option<String>,
    /// Interface to scan for Wi-Fi access points.
    pub wifi_scan: Option<String>,
}

impl Sources {
    pub fn is_live(&self) -> bool {
        self.gpsd.is_some() || self.wifi_scan.is_some()
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
