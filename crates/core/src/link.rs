//! Link state: how good a sharer's uplink is right now, as measured.

use crate::service::NetworkType;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinkState {
    pub up: bool,
    pub rtt_us: u32,
    pub loss_permille: u32,
    pub uplink_rx_bps: u64,
    pub uplink_tx_bps: u64,
    pub relay_bps: u64,
    /// What the sharer offers at most; 0 = no cap.
    pub capacity_bps: u64,
    pub congestion_permille: u32,
    pub network: Option<NetworkType>,
    pub battery_pct: Option<u32>,
}

impl Default for LinkState {
    fn default() -> Self {
        LinkState {
            up: true,
            rtt_us: 0,
            loss_permille: 0,
            uplink_rx_bps: 0,
            uplink_tx_bps: 0,
            relay_bps: 0,
            capacity_bps: 0,
            congestion_permille: 0,
            network: None,
            battery_pct: None,
        }
    }
}

impl LinkState {
    /// Quality in 0..=1 from what was measured: loss and congestion weigh
    /// most, then RTT, then battery. Unknown values count as neutral.
    pub fn quality(&self) -> f64 {
        if !self.up {
            return 0.0;
        }
        let loss = 1.0 - (self.loss_permille.min(1000) as f64 / 1000.0);
        let congestion = 1.0 - (self.congestion_permille.min(1000) as f64 / 1000.0);
        // 0 ms -> 1.0, 100 ms -> 0.5, 300 ms -> 0.25
        let rtt = 1.0 / (1.0 + self.rtt_us as f64 / 100_000.0);
        let battery = match self.battery_pct {
            Some(b) => 0.5 + 0.5 * (b.min(100) as f64 / 100.0),
            None => 0.9,
        };
        let network = match self.network {
            Some(NetworkType::FiveG) => 1.0,
            Some(NetworkType::Wifi) => 0.95,
            Some(NetworkType::FourG) => 0.85,
            None => 0.85,
        };
        loss.powi(2) * congestion * (0.5 + 0.5 * rtt) * battery * network
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quality_orders_links() {
        let good = LinkState {
            rtt_us: 20_000,
            network: Some(NetworkType::FiveG),
            ..Default::default()
        };
        let lossy = LinkState {
            loss_permille: 300,
            ..good
        };
        let slow = LinkState {
            rtt_us: 400_000,
            ..good
        };
        let down = LinkState { up: false, ..good };
        assert!(good.quality() > slow.quality());
        assert!(good.quality() > lossy.quality());
        assert!(slow.quality() > down.quality());
        assert_eq!(down.quality(), 0.0);
        assert!(good.quality() <= 1.0);
    }
}
