//! Measuring the sharer's own uplink from the kernel: which interface
//! carries the default route, whether it is up, how many bytes it moved,
//! and the battery level. Parsers are pure and tested on captured text.

use std::path::Path;

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

/// Battery percentage of the first battery, if the device has one.
pub fn battery_pct() -> Option<u32> {
    let dir = std::fs::read_dir("/sys/class/power_supply").ok()?;
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
