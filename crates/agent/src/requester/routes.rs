//! The own link's routes, read from the kernel's main IPv4 table
//! (`/proc/net/route`, which lists only the main table: in whole-device
//! mode the default route into the TUN device lives in its own table and
//! does not show here). They answer two questions for the probes: which
//! gateway the own link goes through, and whether the coordinator is
//! reached over the own link or over some other link (a LAN to a sharer),
//! where probing it would say nothing about the own link.

use std::net::{IpAddr, Ipv4Addr};

/// `RTF_UP`, `RTF_GATEWAY` from `<linux/route.h>`.
const RTF_UP: u32 = 0x1;
const RTF_GATEWAY: u32 = 0x2;

/// One route of the main table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub dev: String,
    pub dest: Ipv4Addr,
    pub mask: Ipv4Addr,
    pub gateway: Option<Ipv4Addr>,
    pub metric: u32,
}

impl Route {
    fn is_default(&self) -> bool {
        self.mask.is_unspecified()
    }

    fn covers(&self, a: Ipv4Addr) -> bool {
        u32::from(a) & u32::from(self.mask) == u32::from(self.dest) & u32::from(self.mask)
    }
}

/// The kernel prints each address as the 32-bit value of its bytes in
/// network order, read in the host's order.
fn addr(hex: &str) -> Option<Ipv4Addr> {
    let v = u32::from_str_radix(hex, 16).ok()?;
    Some(Ipv4Addr::from(v.to_ne_bytes()))
}

/// The routes that are up; lines that do not parse are skipped.
pub fn parse(text: &str) -> Vec<Route> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 8 {
                return None;
            }
            let flags = u32::from_str_radix(f[3], 16).ok()?;
            if flags & RTF_UP == 0 {
                return None;
            }
            Some(Route {
                dev: f[0].to_string(),
                dest: addr(f[1])?,
                gateway: (flags & RTF_GATEWAY != 0).then_some(addr(f[2])?),
                metric: f[6].parse().ok()?,
                mask: addr(f[7])?,
            })
        })
        .collect()
}

/// This machine's main table, or none when it cannot be read (not Linux).
pub fn read() -> Vec<Route> {
    std::fs::read_to_string("/proc/net/route")
        .map(|t| parse(&t))
        .unwrap_or_default()
}

/// The default route with the lowest metric: the own link.
pub fn default_route(routes: &[Route]) -> Option<&Route> {
    routes
        .iter()
        .filter(|r| r.is_default())
        .min_by_key(|r| r.metric)
}

/// The route `a` takes: the longest prefix, then the lowest metric.
pub fn route_for(routes: &[Route], a: Ipv4Addr) -> Option<&Route> {
    routes
        .iter()
        .filter(|r| r.covers(a))
        .max_by_key(|r| (u32::from(r.mask).count_ones(), std::cmp::Reverse(r.metric)))
}

/// Whether packets to `a` leave by the own link's device. Loopback and
/// IPv6 addresses, and a machine without a default route, count as yes
/// (nothing says otherwise; on one host the own link is loopback).
pub fn over_own_link(routes: &[Route], a: IpAddr) -> bool {
    let IpAddr::V4(a) = a.to_canonical() else {
        return true;
    };
    if a.is_loopback() {
        return true;
    }
    match (default_route(routes), route_for(routes, a)) {
        (Some(d), Some(r)) => r.dev == d.dev,
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // As a laptop's main table prints it: a default via 192.168.1.1 on
    // wlan0 (metric 600), one via eth0 (metric 100), a LAN on lan0, and a
    // route that is down.
    const TABLE: &str =
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
wlan0\t00000000\t0101A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0
eth0\t00000000\t0100000A\t0003\t0\t0\t100\t00000000\t0\t0\t0
eth0\t0000000A\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0
lan0\t0002500A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
down0\t0003500A\t00000000\t0000\t0\t0\t0\t00FFFFFF\t0\t0\t0
garbage line
";

    #[test]
    fn the_default_route_is_the_one_with_the_lowest_metric() {
        let r = parse(TABLE);
        assert_eq!(r.len(), 4, "the down route and the garbage are skipped");
        let d = default_route(&r).expect("a default");
        assert_eq!(d.dev, "eth0");
        assert_eq!(d.gateway, Some(Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!(r[0].gateway, Some(Ipv4Addr::new(192, 168, 1, 1)));
        assert_eq!(r[2].gateway, None, "a link route has no gateway");
    }

    #[test]
    fn an_address_on_another_link_is_not_over_the_own_link() {
        let r = parse(TABLE);
        let on = |a: [u8; 4]| over_own_link(&r, IpAddr::from(a));
        assert!(!on([10, 80, 2, 1]), "the LAN to a sharer");
        assert!(on([10, 0, 0, 7]), "the own link's subnet");
        assert!(on([203, 0, 113, 5]), "the internet, by the default");
        assert!(on([127, 0, 0, 1]), "loopback");
        assert!(on([10, 80, 3, 1]), "a route that is down does not count");
        assert!(over_own_link(&r, "2001:db8::1".parse().expect("v6")));
        assert!(over_own_link(&[], IpAddr::from([10, 80, 2, 1])));
        assert_eq!(
            route_for(&r, Ipv4Addr::new(10, 80, 2, 9)).map(|r| r.dev.as_str()),
            Some("lan0")
        );
    }
}
