//! The sharer's link state as it reports it: interface counters, relayed
//! bytes, the coordinator ping's RTT and loss, the uplink check, battery.

use super::uplink;
use crate::probe::PingTracker;
use bandshare_core::{LinkState, NetworkType};
use bandshare_relay::RelayHandle;
use std::path::PathBuf;
use std::time::Instant;

/// Measures link state between reports.
pub(super) struct LinkMeter {
    pub(super) iface: Option<String>,
    pub(super) power_supply: PathBuf,
    pub(super) last: Option<(Instant, u64, u64, u64)>, // (at, rx, tx, relayed)
    pub(super) cap_bps: u64,
    pub(super) network: Option<NetworkType>,
}

impl LinkMeter {
    pub(super) fn measure(
        &mut self,
        probe: &PingTracker,
        relay: &RelayHandle,
        now: Instant,
    ) -> LinkState {
        let (rx, tx) = self
            .iface
            .as_deref()
            .and_then(uplink::counters)
            .unwrap_or((0, 0));
        let relayed = relay.total_bytes();
        let (mut rx_bps, mut tx_bps, mut relay_bps) = (0, 0, 0);
        if let Some((at, lrx, ltx, lrel)) = self.last {
            let secs = now.saturating_duration_since(at).as_secs_f64().max(1e-3);
            let rate = |a: u64, b: u64| ((a.saturating_sub(b)) as f64 * 8.0 / secs) as u64;
            rx_bps = rate(rx, lrx);
            tx_bps = rate(tx, ltx);
            relay_bps = rate(relayed, lrel);
        }
        self.last = Some((now, rx, tx, relayed));
        let congestion = match self.cap_bps {
            0 => 0,
            cap => ((relay_bps as f64 / cap as f64) * 1000.0).min(1000.0) as u32,
        };
        let health = relay.uplink();
        LinkState {
            up: self.iface.as_deref().is_none_or(uplink::is_up) && !health.down,
            rtt_us: probe
                .rtt()
                .map_or(0, |d| d.as_micros().min(u32::MAX as u128) as u32),
            loss_permille: probe.loss_permille(now).max(health.loss_permille as u32),
            uplink_rx_bps: rx_bps,
            uplink_tx_bps: tx_bps,
            relay_bps,
            capacity_bps: self.cap_bps,
            congestion_permille: congestion,
            network: self.network,
            battery_pct: uplink::battery_pct(&self.power_supply),
        }
    }
}
