//! Stalls of the flows carried on the direct path, as the kernel sees
//! them: `/proc/net/tcp` and `/proc/net/tcp6` list every TCP socket with
//! the bytes it has sent and not had acknowledged, how many times in a
//! row its retransmission timer has fired, and how many window or
//! local-drop probes went unanswered. A direct flow whose data has been
//! sent [`STALL_RETRANSMITS`] more times, unanswered, is a path that
//! swallows packets (the kernel's minimum RTO is 200 ms, so this is seen
//! about 0.6 s after the data was first sent), whatever the probes say.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Mutex;

/// Retransmissions in a row, unanswered, that make a flow stalled.
pub const STALL_RETRANSMITS: u32 = 2;

/// One socket of the kernel's table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Socket {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// Bytes sent and not yet acknowledged.
    pub unacked: u32,
    /// Retransmission timeouts in a row.
    pub retransmits: u32,
    /// Window probes unanswered (also counted when the packets are
    /// dropped on this host).
    pub probes_out: u32,
}

impl Socket {
    fn stalled(&self) -> bool {
        self.unacked > 0 && self.retransmits.max(self.probes_out) >= STALL_RETRANSMITS
    }
}

/// `ADDR:PORT` as the kernel prints it: the address as 32-bit words of
/// its bytes in network order, read in the host's order; the port in hex.
fn endpoint(s: &str) -> Option<SocketAddr> {
    let (a, p) = s.split_once(':')?;
    let port = u16::from_str_radix(p, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        Some(
            u32::from_str_radix(a.get(i * 8..i * 8 + 8)?, 16)
                .ok()?
                .to_ne_bytes(),
        )
    };
    let ip = match a.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            IpAddr::V6(Ipv6Addr::from(b)).to_canonical()
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// The sockets of one table's text; lines that do not parse are skipped.
pub fn parse(text: &str) -> Vec<Socket> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (tx, _) = f.get(4)?.split_once(':')?;
            Some(Socket {
                local: endpoint(f.get(1)?)?,
                remote: endpoint(f.get(2)?)?,
                unacked: u32::from_str_radix(tx, 16).ok()?,
                retransmits: u32::from_str_radix(f.get(6)?, 16).ok()?,
                probes_out: f.get(8)?.parse().ok()?,
            })
        })
        .collect()
}

/// This machine's TCP sockets, IPv4 and IPv6 (none where there is no
/// `/proc`).
pub fn read() -> Vec<Socket> {
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .flat_map(|t| parse(&t))
        .collect()
}

fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// The direct flows open now, and those already reported as stalled (a
/// flow stalls the own link once, not for as long as it lives).
#[derive(Default)]
pub struct Watched {
    open: Mutex<HashSet<(SocketAddr, SocketAddr)>>,
    reported: Mutex<HashSet<(SocketAddr, SocketAddr)>>,
}

impl Watched {
    pub fn add(&self, local: SocketAddr, remote: SocketAddr) {
        if let Ok(mut o) = self.open.lock() {
            o.insert((canonical(local), canonical(remote)));
        }
    }

    pub fn remove(&self, local: SocketAddr, remote: SocketAddr) {
        let k = (canonical(local), canonical(remote));
        if let Ok(mut o) = self.open.lock() {
            o.remove(&k);
        }
        if let Ok(mut r) = self.reported.lock() {
            r.remove(&k);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.open.lock().map(|o| o.is_empty()).unwrap_or(true)
    }

    /// The remote end of each watched flow in `table` that has stalled
    /// since the last check.
    pub fn newly_stalled(&self, table: &[Socket]) -> Vec<(SocketAddr, u32)> {
        let (Ok(open), Ok(mut reported)) = (self.open.lock(), self.reported.lock()) else {
            return vec![];
        };
        table
            .iter()
            .filter(|s| s.stalled())
            .map(|s| (s, (s.local, s.remote)))
            .filter(|(_, k)| open.contains(k) && reported.insert(*k))
            .map(|(s, _)| (s.remote, s.retransmits.max(s.probes_out)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // A listener, a stalled flow (2,000 bytes unacked, 3 retransmissions),
    // a healthy flow, from /proc/net/tcp; and a v4-mapped flow from tcp6.
    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0
   1: 02094F0A:A3C2 01014F0A:2328 01 000007D0:00000000 01:00000064 00000003     0        0 2 1 0 20 4 30 10 -1
   2: 02094F0A:A3C4 01014F0A:1F90 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0 20 4 30 10 -1
   3: 02094F0A:E5C6 01014F0A:2329 01 00014810:00000000 04:00000000 00000000     0        3 90220 2 0 20 0 0 46 -1
junk
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0000000000000000FFFF000002094F0A:B000 0000000000000000FFFF000001014F0A:2328 01 00000010:00000000 01:00000010 00000002     0        0 4 1 0 20 4 30 10 -1
";

    #[test]
    fn the_kernel_table_parses() {
        let t = parse(TCP);
        assert_eq!(t.len(), 4);
        assert_eq!((t[3].retransmits, t[3].probes_out), (0, 3));
        assert!(t[3].stalled(), "probes unanswered");
        assert!(t[1].stalled() && !t[2].stalled());
        assert_eq!(t[1].local, "10.79.9.2:41922".parse().expect("addr"));
        assert_eq!(t[1].remote, "10.79.1.1:9000".parse().expect("addr"));
        assert_eq!((t[1].unacked, t[1].retransmits), (2000, 3));
        let t6 = parse(TCP6);
        assert_eq!(t6[0].local, "10.79.9.2:45056".parse().expect("mapped"));
        assert_eq!(t6[0].retransmits, 2);
    }

    #[test]
    fn a_watched_flow_stalls_once() {
        let w = Watched::default();
        let mut table = parse(TCP);
        table.extend(parse(TCP6));
        assert!(w.newly_stalled(&table).is_empty(), "nothing watched");
        let stalled: SocketAddr = "10.79.1.1:9000".parse().expect("addr");
        w.add("10.79.9.2:41922".parse().expect("addr"), stalled);
        w.add(
            "10.79.9.2:41924".parse().expect("addr"),
            "10.79.1.1:8080".parse().expect("a"),
        );
        assert_eq!(w.newly_stalled(&table), vec![(stalled, 3)]);
        assert!(w.newly_stalled(&table).is_empty(), "reported once");
        // Watched by its v4-mapped form, found in tcp6.
        w.add(
            "[::ffff:10.79.9.2]:45056".parse().expect("addr"),
            "[::ffff:10.79.1.1]:9000".parse().expect("addr"),
        );
        assert_eq!(w.newly_stalled(&table).len(), 1);
        w.remove("10.79.9.2:41922".parse().expect("addr"), stalled);
        w.remove(
            "10.79.9.2:41924".parse().expect("addr"),
            "10.79.1.1:8080".parse().expect("a"),
        );
        w.remove("10.79.9.2:45056".parse().expect("addr"), stalled);
        assert!(w.is_empty());
    }
}
