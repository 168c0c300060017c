//! Measuring the sharer's own uplink from the kernel: which interface
//! carries the default route, whether it is up, how many bytes it moved,
//! and the battery level. Parsers are pure and tested on captured text.
//! [`watch`] keeps checking the uplink and tells the relay, whose probe
//! answers carry it to every connected requester.

use crate::Shutdown;
use bandshare_relay::{RelayHandle, UplinkHealth};
use std::collections::VecDeque;
use std::path::Path;
use std::time::Duration;
use tracing::{info, warn};

/// How often the uplink is checked.
pub const CHECK_EVERY: Duration = Duration::from_millis(250);
/// A check connect slower than this counts as lost (a lost SYN or SYN-ACK
/// costs a whole second before the kernel retries).
pub const CHECK_TIMEOUT: Duration = Duration::from_millis(500);
/// Loss is the share of failed checks among the last this many.
pub const CHECK_WINDOW: usize = 16;
/// This many failed checks in a row: the uplink is down.
pub const DOWN_AFTER: usize = 3;

/// Results of the last [`CHECK_WINDOW`] checks.
#[derive(Default, Debug)]
pub struct CheckWindow(VecDeque<bool>);

impl CheckWindow {
    pub fn record(&mut self, ok: bool) {
        if self.0.len() == CHECK_WINDOW {
            self.0.pop_front();
        }
        self.0.push_back(ok);
    }

    pub fn loss_permille(&self) -> u16 {
        if self.0.is_empty() {
            return 0;
        }
        let lost = self.0.iter().filter(|ok| !**ok).count();
        (lost * 1000 / self.0.len()) as u16
    }

    /// The last [`DOWN_AFTER`] checks all failed.
    pub fn failing(&self) -> bool {
        self.0.len() >= DOWN_AFTER && self.0.iter().rev().take(DOWN_AFTER).all(|ok| !*ok)
    }
}

/// One timed connect to `target` (HOST:PORT) across the uplink.
async fn check_once(target: &str) -> bool {
    let attempt = async {
        let addr = tokio::net::lookup_host(target).await.ok()?.next()?;
        tokio::net::TcpStream::connect(addr).await.ok()
    };
    matches!(
        tokio::time::timeout(CHECK_TIMEOUT, attempt).await,
        Ok(Some(_))
    )
}

/// Checks the uplink until `shutdown`: the interface's state and, when
/// `check` names a host across the uplink, timed TCP connects to it. Every
/// result goes to the relay, and a change of state is logged.
pub async fn watch(
    iface: Option<String>,
    check: Option<String>,
    relay: RelayHandle,
    shutdown: Shutdown,
) {
    if iface.is_none() && check.is_none() {
        return;
    }
    let mut window = CheckWindow::default();
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut was = UplinkHealth::default();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.clone().wait() => return,
        }
        let iface_down = iface.as_deref().is_some_and(|i| !is_up(i));
        if let Some(target) = &check {
            window.record(!iface_down && check_once(target).await);
        }
        let now = UplinkHealth {
            down: iface_down || window.failing(),
            loss_permille: window.loss_permille(),
        };
        relay.set_uplink(now);
        if now.down != was.down {
            if now.down {
                warn!(iface = ?iface, check = ?check, "uplink down");
            } else {
                info!(iface = ?iface, "uplink up again");
            }
        } else if now.loss_permille.abs_diff(was.loss_permille) >= 200 {
            info!(loss_permille = now.loss_permille, "uplink loss changed");
        }
        was = now;
    }
}

/// (rx_bytes, tx_bytes) of `iface` from `/proc/net/dev` text.
pub fn parse_net_dev(text: &str, iface: &str) -> Option<(u64, u64)> {
    text.lines().skip(2).find_map(|line| {
        let (name, rest) = line.split_once(':')?;
        if name.trim() != iface {
            return None;
        }
        let f: Vec<u64> = rest
            .split_whitespace()
            .filter_map(|v| v.parse().ok())
            .collect();
        Some((*f.first()?, *f.get(8)?))
    })
}

/// The interface of the IPv4 default route from `/proc/net/route` text.
pub fn parse_default_route(text: &str) -> Option<String> {
    text.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f.len() > 2 && f[1] == "00000000").then(|| f[0].to_string())
    })
}

/// The uplink to measure: the one named, else the default route's.
pub fn uplink_interface(named: Option<&str>) -> Option<String> {
    if let Some(n) = named {
        return Some(n.to_string());
    }
    parse_default_route(&std::fs::read_to_string("/proc/net/route").ok()?)
}

pub fn counters(iface: &str) -> Option<(u64, u64)> {
    parse_net_dev(&std::fs::read_to_string("/proc/net/dev").ok()?, iface)
}

/// Up unless the kernel says the interface is down or gone.
pub fn is_up(iface: &str) -> bool {
    match std::fs::read_to_string(Path::new("/sys/class/net").join(iface).join("operstate")) {
        Ok(s) => s.trim() != "down",
        Err(_) => false,
    }
}

/// Where Linux lists batteries and chargers.
pub const POWER_SUPPLY: &str = "/sys/class/power_supply";

/// Battery percentage of the first battery under `power_supply` (sysfs
/// layout: `*/type` = Battery, `*/capacity`), if the device has one.
pub fn battery_pct(power_supply: &std::path::Path) -> Option<u32> {
    let dir = std::fs::read_dir(power_supply).ok()?;
    dir.flatten().find_map(|e| {
        let kind = std::fs::read_to_string(e.path().join("type")).ok()?;
        if kind.trim() != "Battery" {
            return None;
        }
        std::fs::read_to_string(e.path().join("capacity"))
            .ok()?
            .trim()
            .parse()
            .ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_window_loss_and_down() {
        let mut w = CheckWindow::default();
        assert_eq!((w.loss_permille(), w.failing()), (0, false));
        for i in 0..40 {
            w.record(i % 2 == 0);
        }
        assert_eq!(w.loss_permille(), 500);
        assert!(!w.failing());
        for _ in 0..DOWN_AFTER {
            w.record(false);
        }
        assert!(w.failing());
        w.record(true);
        assert!(!w.failing());
        assert_eq!(w.0.len(), CHECK_WINDOW);
    }

    #[tokio::test]
    async fn a_refused_check_counts_as_lost() {
        // A port nobody listens on: the connect is refused at once.
        let free = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = free.local_addr().expect("addr").to_string();
        drop(free);
        assert!(!check_once(&addr).await);
        let live = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        assert!(check_once(&live.local_addr().expect("addr").to_string()).await);
    }

    const NET_DEV: &str = "Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:  123456     100    0    0    0     0          0         0   123456     100    0    0    0     0       0          0
  eth0: 9876543210 5000000    0    3    0     0          0      1200 1234567890 4000000    0    0    0     0       0          0
";

    const ROUTE: &str =
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t0000A8C0\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0
wlan0\t00000000\t0100A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0
";

    #[test]
    fn parses_kernel_text() {
        assert_eq!(
            parse_net_dev(NET_DEV, "eth0"),
            Some((9_876_543_210, 1_234_567_890))
        );
        assert_eq!(parse_net_dev(NET_DEV, "lo"), Some((123_456, 123_456)));
        assert_eq!(parse_net_dev(NET_DEV, "wlan9"), None);
        assert_eq!(parse_default_route(ROUTE).as_deref(), Some("wlan0"));
        assert_eq!(parse_default_route("Iface\tDestination\n"), None);
    }
}
