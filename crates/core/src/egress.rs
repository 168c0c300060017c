//! Where a sharer lets relayed flows go. Decided on the *resolved* address,
//! so a name that resolves to a private address is refused like the address.
//!
//! Default: deny loopback, unspecified, private, link-local (cloud metadata
//! lives there), CGNAT, multicast, broadcast, benchmarking, documentation,
//! IPv6 ULA and link-local, the IPv4-mapped / -compatible / NAT64 forms of
//! all of these, the sharer's own addresses, and SMTP submission ports.
//! `allow` rules (from `--allow-egress CIDR[:PORT]`) are checked first and
//! open exactly what they name.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// An address block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - self.prefix as u32).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - self.prefix as u32).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BadCidr {
    #[error(
        "expected CIDR[:PORT] such as 127.0.0.1/32:8080, 10.0.0.0/8 or [::1]/128:443, got {0:?}"
    )]
    Syntax(String),
    #[error(
        "{0:?} is ambiguous: IPv6 with a port needs brackets, as in [::1]:8000; the address alone is [{0}] or {0}/128"
    )]
    AmbiguousV6(String),
}

impl FromStr for Cidr {
    type Err = BadCidr;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadCidr::Syntax(s.to_string());
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.parse::<u8>().map_err(|_| bad())?,
            None => max,
        };
        if prefix > max {
            return Err(bad());
        }
        Ok(Cidr { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// One `--allow-egress` rule: a block and optionally one port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EgressRule {
    pub cidr: Cidr,
    pub port: Option<u16>,
}

impl FromStr for EgressRule {
    type Err = BadCidr;
    /// `CIDR[:PORT]`; IPv6 with a port needs brackets or a prefix:
    /// `[::1]:443`, `::1/128:443`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadCidr::Syntax(s.to_string());
        // Bracketed IPv6: "[addr]/p:port" or "[addr]:port".
        let (cidr_part, port) = if let Some(rest) = s.strip_prefix('[') {
            let (addr, after) = rest.split_once(']').ok_or_else(bad)?;
            let (prefix, port) = match after.split_once(':') {
                Some((p, port)) => (p, Some(port)),
                None => (after, None),
            };
            (format!("{addr}{prefix}"), port)
        } else if let Some((net, prefix_port)) = s.split_once('/') {
            match prefix_port.split_once(':') {
                Some((p, port)) => (format!("{net}/{p}"), Some(port)),
                None => (s.to_string(), None),
            }
        } else if s.matches(':').count() == 1 {
            let (a, port) = s.split_once(':').ok_or_else(bad)?;
            (a.to_string(), Some(port))
        } else {
            // Bare IPv6 with neither brackets nor a prefix: `::1:8000` is
            // both the address ::1:8000 and ::1 port 8000, so say which.
            return Err(BadCidr::AmbiguousV6(s.to_string()));
        };
        let cidr: Cidr = cidr_part.parse().map_err(|_| bad())?;
        let port = match port {
            Some(p) => Some(p.parse::<u16>().map_err(|_| bad())?),
            None => None,
        };
        Ok(EgressRule { cidr, port })
    }
}

impl EgressRule {
    fn matches(&self, ip: IpAddr, port: u16) -> bool {
        self.cidr.contains(ip) && self.port.is_none_or(|p| p == port)
    }
}

/// Why a destination is refused; shown to the requester.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denied(pub &'static str);

impl fmt::Display for Denied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "egress denied: {}", self.0)
    }
}

#[derive(Clone, Debug, Default)]
pub struct EgressPolicy {
    pub allow: Vec<EgressRule>,
    /// Addresses of the sharer itself.
    pub own: Vec<IpAddr>,
    /// Allow SMTP ports 25/465/587 (denied by default).
    pub allow_smtp: bool,
}

const SMTP_PORTS: [u16; 3] = [25, 465, 587];

impl EgressPolicy {
    pub fn decide(&self, ip: IpAddr, port: u16) -> Result<(), Denied> {
        self.decide_with_own(ip, port, &[])
    }

    /// As `decide`, with `own_now` (the machine's addresses as of this
    /// dial) refused besides `self.own`.
    pub fn decide_with_own(&self, ip: IpAddr, port: u16, own_now: &[IpAddr]) -> Result<(), Denied> {
        if self.allow.iter().any(|r| r.matches(ip, port)) {
            return Ok(());
        }
        let canon = canonical(ip);
        if let Some(reason) = special_range(canon) {
            return Err(Denied(reason));
        }
        if self
            .own
            .iter()
            .chain(own_now)
            .any(|o| canonical(*o) == canon)
        {
            return Err(Denied("address of the sharer itself"));
        }
        if !self.allow_smtp && SMTP_PORTS.contains(&port) {
            return Err(Denied("SMTP port"));
        }
        Ok(())
    }
}

/// The address a host name *spells*, if it is one: an IPv6 literal (with or
/// without brackets or a zone), or an IPv4 address in any form the C
/// library's `inet_aton` accepts — one to four parts, each decimal, octal
/// (leading 0) or hex (0x), the last filling the remaining bytes: `127.1`,
/// `2130706433`, `0x7f000001`, `0177.0.0.1`, `0x7f.1`. A trailing dot is
/// ignored. A relay must treat such a name as the address, never as a name
/// to look up, so the egress decision does not depend on a resolver.
pub fn literal_ip(name: &str) -> Option<IpAddr> {
    let name = name.strip_suffix('.').unwrap_or(name);
    let bare = name
        .strip_prefix('[')
        .and_then(|n| n.strip_suffix(']'))
        .unwrap_or(name);
    let no_zone = bare.split('%').next().unwrap_or(bare);
    if let Ok(v6) = no_zone.parse::<Ipv6Addr>() {
        return Some(IpAddr::V6(v6));
    }
    loose_ipv4(name).map(IpAddr::V4)
}

fn loose_part(p: &str) -> Option<u64> {
    let (digits, radix) = if let Some(h) = p.strip_prefix("0x").or_else(|| p.strip_prefix("0X")) {
        (h, 16)
    } else if p.len() > 1 && p.starts_with('0') {
        (&p[1..], 8)
    } else {
        (p, 10)
    };
    // inet_aton takes a bare "0x" as zero.
    if digits.is_empty() {
        return (radix == 16).then_some(0);
    }
    if digits.len() > 16 || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    u64::from_str_radix(digits, radix).ok()
}

fn loose_ipv4(name: &str) -> Option<Ipv4Addr> {
    let parts: Vec<&str> = name.split('.').collect();
    if parts.is_empty() || parts.len() > 4 {
        return None;
    }
    let nums = parts
        .iter()
        .map(|p| loose_part(p))
        .collect::<Option<Vec<u64>>>()?;
    let (last, head) = nums.split_last()?;
    if head.iter().any(|h| *h > 255) {
        return None;
    }
    let rest_bits = 8 * (4 - head.len() as u32);
    if *last >= 1u64 << rest_bits {
        return None;
    }
    let mut v = *last as u32;
    for (i, h) in head.iter().enumerate() {
        v |= (*h as u32) << (24 - 8 * i as u32);
    }
    Some(Ipv4Addr::from(v))
}

/// The IPv4 address hidden in an IPv4-mapped, IPv4-compatible, NAT64 or
/// 6to4 IPv6 address, else the address itself.
pub fn canonical(ip: IpAddr) -> IpAddr {
    let IpAddr::V6(v6) = ip else { return ip };
    if let Some(v4) = v6.to_ipv4_mapped() {
        return IpAddr::V4(v4);
    }
    let s = v6.segments();
    let embedded = || Ipv4Addr::from((u128::from(v6) & 0xffff_ffff) as u32);
    // NAT64 well-known prefix 64:ff9b::/96
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return IpAddr::V4(embedded());
    }
    // Deprecated IPv4-compatible ::a.b.c.d (but not :: and ::1)
    if s[..6] == [0; 6] && u128::from(v6) > 1 {
        return IpAddr::V4(embedded());
    }
    // 6to4 2002:AABB:CCDD::/48 carries AA.BB.CC.DD
    if s[0] == 0x2002 {
        return IpAddr::V4(Ipv4Addr::from((s[1] as u32) << 16 | s[2] as u32));
    }
    ip
}

fn special_range(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => special_v4(v4),
        IpAddr::V6(v6) => special_v6(v6),
    }
}

fn special_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let o = ip.octets();
    Some(match o {
        [0, ..] => "unspecified / this network",
        [127, ..] => "loopback",
        [10, ..] => "private (RFC 1918)",
        [172, b, ..] if (16..32).contains(&b) => "private (RFC 1918)",
        [192, 168, ..] => "private (RFC 1918)",
        [169, 254, ..] => "link-local or cloud metadata",
        [100, b, ..] if (64..128).contains(&b) => "carrier-grade NAT",
        [198, 18 | 19, ..] => "benchmarking",
        [192, 0, 2, _] | [198, 51, 100, _] | [203, 0, 113, _] => "documentation",
        [192, 0, 0, _] => "IETF protocol assignments",
        [168, 63, 129, 16] => "cloud metadata (Azure wire server)",
        [a, ..] if (224..240).contains(&a) => "multicast",
        [255, 255, 255, 255] => "broadcast",
        [a, ..] if a >= 240 => "reserved",
        _ => return None,
    })
}

fn special_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let s = ip.segments();
    Some(if ip.is_unspecified() {
        "unspecified"
    } else if ip.is_loopback() {
        "loopback"
    } else if s[0] & 0xfe00 == 0xfc00 {
        "unique local (ULA) or cloud metadata"
    } else if s[0] & 0xffc0 == 0xfe80 {
        "link-local"
    } else if s[0] & 0xff00 == 0xff00 {
        "multicast"
    } else if s[0] == 0x2001 && s[1] == 0x0db8 {
        "documentation"
    } else {
        return None;
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn default_denies_special_ranges() {
        let p = EgressPolicy::default();
        for a in [
            "127.0.0.1",
            "127.9.9.9",
            "0.0.0.0",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "100.127.255.255",
            "224.0.0.1",
            "255.255.255.255",
            "198.18.0.1",
            "192.0.2.1",
            "198.51.100.7",
            "203.0.113.9",
            "::1",
            "::",
            "fd00:ec2::254",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "::127.0.0.1",
            "2001:db8::1",
        ] {
            assert!(p.decide(ip(a), 80).is_err(), "{a} must be denied");
        }
        for a in [
            "93.184.215.14",
            "1.1.1.1",
            "172.32.0.1",
            "100.128.0.1",
            "2606:4700::1111",
        ] {
            assert_eq!(p.decide(ip(a), 443), Ok(()), "{a} must be allowed");
        }
        assert_eq!(p.decide(ip("1.1.1.1"), 25), Err(Denied("SMTP port")));
    }

    #[test]
    fn own_addresses_and_allow_rules() {
        let p = EgressPolicy {
            allow: vec!["127.0.0.1/32:8080".parse().expect("rule")],
            own: vec![ip("93.184.215.14")],
            allow_smtp: false,
        };
        assert_eq!(p.decide(ip("127.0.0.1"), 8080), Ok(()));
        assert!(p.decide(ip("127.0.0.1"), 8081).is_err());
        assert!(p.decide(ip("93.184.215.14"), 80).is_err());
        assert!(p.decide(ip("::ffff:93.184.215.14"), 80).is_err());
    }

    #[test]
    fn rule_syntax() {
        let r: EgressRule = "10.0.0.0/8".parse().expect("rule");
        assert_eq!((r.cidr.prefix, r.port), (8, None));
        let r: EgressRule = "127.0.0.1:9000".parse().expect("rule");
        assert_eq!((r.cidr.prefix, r.port), (32, Some(9000)));
        // Unbracketed IPv6 is refused rather than read as a port-less address.
        assert_eq!(
            "::1:8000".parse::<EgressRule>(),
            Err(BadCidr::AmbiguousV6("::1:8000".into()))
        );
        assert!("::1".parse::<EgressRule>().is_err());
        let r: EgressRule = "[::1]".parse().expect("rule");
        assert_eq!((r.cidr.addr, r.port), (ip("::1"), None));
        let r: EgressRule = "[::1]:443".parse().expect("rule");
        assert_eq!((r.cidr.addr, r.port), (ip("::1"), Some(443)));
        let r: EgressRule = "::1/128:443".parse().expect("rule");
        assert_eq!((r.cidr.prefix, r.port), (128, Some(443)));
        let r: EgressRule = "2001:db8::/32".parse().expect("rule");
        assert_eq!((r.cidr.prefix, r.port), (32, None));
        for bad in ["", "10.0.0.0/33", "nope", "1.2.3.4:99999", "[::1"] {
            assert!(bad.parse::<EgressRule>().is_err(), "{bad}");
        }
    }

    /// Every special range in every IPv6 wrapping, every odd spelling a
    /// SOCKS client can send as a name, and public controls: each entry is
    /// decided as the relay decides it (spelling -> address -> policy).
    #[test]
    fn table_of_addresses_and_spellings() {
        let p = EgressPolicy {
            own: vec![ip("93.184.215.14")],
            ..Default::default()
        };
        let mut checked = 0;
        let denied_v4 = [
            "0.0.0.0",
            "0.1.2.3",
            "127.0.0.1",
            "127.0.0.2",
            "127.255.255.254",
            "10.0.0.1",
            "10.255.255.255",
            "172.16.0.1",
            "172.20.10.5",
            "172.31.255.255",
            "192.168.0.1",
            "192.168.255.254",
            "169.254.0.1",
            "169.254.169.254",
            "169.254.170.2",
            "100.64.0.1",
            "100.100.100.200",
            "100.127.255.254",
            "198.18.0.1",
            "198.19.255.254",
            "192.0.2.1",
            "198.51.100.1",
            "203.0.113.254",
            "192.0.0.192",
            "224.0.0.1",
            "239.255.255.250",
            "233.252.0.1",
            "255.255.255.255",
            "240.0.0.1",
            "250.1.2.3",
            "168.63.129.16",
            "93.184.215.14",
        ];
        for a in denied_v4 {
            let v4: Ipv4Addr = a.parse().expect("v4");
            let o = v4.octets();
            let forms = [
                a.to_string(),
                format!("::ffff:{a}"),
                format!("64:ff9b::{a}"),
                format!("2002:{:02x}{:02x}:{:02x}{:02x}::1", o[0], o[1], o[2], o[3]),
                format!("{}", u32::from(v4)),
                format!("{:#x}", u32::from(v4)),
            ];
            for f in forms {
                let got = literal_ip(&f).unwrap_or_else(|| panic!("{f} is an address"));
                assert!(p.decide(got, 80).is_err(), "{f} ({got}) must be denied");
                checked += 1;
            }
            if u32::from(v4) > 1 {
                assert!(p.decide(ip(&format!("::{a}")), 443).is_err(), "::{a}");
                checked += 1;
            }
        }
        let denied_v6 = [
            "::1",
            "::",
            "fc00::1",
            "fd00:ec2::254",
            "fdff:ffff::1",
            "fe80::1",
            "fe80::a:b:c:d",
            "febf::1",
            "ff02::1",
            "ff05::1:3",
            "ff0e::1",
            "2001:db8::1",
            "2001:db8:ffff::1",
        ];
        for a in denied_v6 {
            for f in [a.to_string(), format!("[{a}]"), format!("{a}.")] {
                let got = literal_ip(&f).unwrap_or_else(|| panic!("{f} is an address"));
                assert!(p.decide(got, 80).is_err(), "{f} must be denied");
                checked += 1;
            }
        }
        // Odd spellings and what they are.
        let spellings = [
            ("127.1", "127.0.0.1"),
            ("127.0.1", "127.0.0.1"),
            ("127.1.", "127.0.0.1"),
            ("127.0.0.1.", "127.0.0.1"),
            ("2130706433", "127.0.0.1"),
            ("2130706433.", "127.0.0.1"),
            ("0x7f000001", "127.0.0.1"),
            ("0X7F000001", "127.0.0.1"),
            ("0x7f.1", "127.0.0.1"),
            ("0x7f.0.0.1", "127.0.0.1"),
            ("0177.0.0.1", "127.0.0.1"),
            ("0177.1", "127.0.0.1"),
            ("017700000001", "127.0.0.1"),
            ("127.000.000.001", "127.0.0.1"),
            ("0x7f.0x0.0x0.0x1", "127.0.0.1"),
            ("0", "0.0.0.0"),
            ("0x", "0.0.0.0"),
            ("0.0", "0.0.0.0"),
            ("2852039166", "169.254.169.254"),
            ("0xa9fea9fe", "169.254.169.254"),
            ("0251.0376.0251.0376", "169.254.169.254"),
            ("169.254.43518", "169.254.169.254"),
            ("169.16689662", "169.254.169.254"),
            ("167772161", "10.0.0.1"),
            ("10.1", "10.0.0.1"),
            ("012.1", "10.0.0.1"),
            ("3232235521", "192.168.0.1"),
            ("192.168.1", "192.168.0.1"),
            ("0xc0a80001", "192.168.0.1"),
            ("0xc0.0xa8.1", "192.168.0.1"),
            ("[::ffff:127.0.0.1]", "::ffff:127.0.0.1"),
            ("::ffff:7f00:1", "::ffff:127.0.0.1"),
            ("0:0:0:0:0:ffff:127.0.0.1", "::ffff:127.0.0.1"),
            ("fe80::1%eth0", "fe80::1"),
            ("[fe80::1%25eth0]", "fe80::1"),
            ("0:0:0:0:0:0:0:1", "::1"),
        ];
        for (name, addr) in spellings {
            assert_eq!(literal_ip(name), Some(ip(addr)), "{name}");
            assert!(p.decide(ip(addr), 80).is_err(), "{name} must be denied");
            checked += 1;
        }
        // Not addresses: left to the resolver (and decided on its answer).
        for name in [
            "example.com",
            "127.0.0.1.example.com",
            "localhost",
            "1.2.3.4.5",
            "256.1.1.1",
            "1.256.1.1",
            "1.2.65536",
            "0x100000000",
            "4294967296",
            "1..1",
            "",
            ".",
            "08.1.1.1",
            "0xg1",
            "::ffff:1.2.3",
            "[::1",
            "1.2.3.4:80",
        ] {
            assert_eq!(literal_ip(name), None, "{name:?} is not an address");
            checked += 1;
        }
        // Public controls stay open in every form, except SMTP ports.
        for a in [
            "1.1.1.1",
            "8.8.4.4",
            "93.184.215.15",
            "172.32.0.1",
            "100.128.0.1",
            "11.0.0.1",
        ] {
            for f in [
                a.to_string(),
                format!("::ffff:{a}"),
                format!("64:ff9b::{a}"),
            ] {
                let got = literal_ip(&f).expect("address");
                assert_eq!(p.decide(got, 443), Ok(()), "{f} must be allowed");
                for smtp in SMTP_PORTS {
                    assert_eq!(p.decide(got, smtp), Err(Denied("SMTP port")), "{f}:{smtp}");
                }
                checked += 1;
            }
        }
        for a in ["2606:4700::1111", "2a00:1450::1", "2001:4860:4860::8888"] {
            assert_eq!(p.decide(ip(a), 443), Ok(()), "{a} must be allowed");
            checked += 1;
        }
        assert!(checked >= 200, "only {checked} entries");
    }

    #[test]
    fn cidr_zero_prefix_matches_all_of_family() {
        let c: Cidr = "0.0.0.0/0".parse().expect("cidr");
        assert!(c.contains(ip("8.8.8.8")));
        assert!(!c.contains(ip("::1")));
    }
}
