//! The sharer's own addresses, current at every dial. An address added
//! after start (a DHCP change, an IPv6 temporary address, a VPN coming up)
//! must be refused like the others, or a service listening on 0.0.0.0
//! becomes reachable through the relay.
//!
//! On Linux a netlink socket subscribed to address changes says when to
//! read the list again: the kernel queues the notification before `ip addr
//! add` returns, so a non-blocking read at dial time (one system call)
//! sees every change made before the dial, with no window. Elsewhere, or
//! if the socket cannot be made, the list is read fresh at every dial.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use tracing::{debug, warn};

/// Addresses of this machine, kept current.
pub struct OwnAddresses {
    inner: Mutex<Inner>,
}

struct Inner {
    addrs: Arc<Vec<IpAddr>>,
    #[cfg(target_os = "linux")]
    watch: Option<std::os::fd::OwnedFd>,
}

fn read_addrs() -> Vec<IpAddr> {
    match if_addrs::get_if_addrs() {
        Ok(ifs) => ifs.iter().map(|i| i.ip()).collect(),
        Err(e) => {
            warn!(error = %e, "cannot list this machine's addresses");
            vec![]
        }
    }
}

#[cfg(target_os = "linux")]
fn watch_socket() -> std::io::Result<std::os::fd::OwnedFd> {
    use rustix::net::{AddressFamily, SocketFlags, SocketType, bind, netlink, socket_with};
    // RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR (linux/rtnetlink.h).
    const GROUPS: u32 = 0x10 | 0x100;
    let fd = socket_with(
        AddressFamily::NETLINK,
        SocketType::RAW,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None, // NETLINK_ROUTE
    )?;
    bind(&fd, &netlink::SocketAddrNetlink::new(0, GROUPS))?;
    Ok(fd)
}

/// Drains the watch socket; true if anything changed (or may have: an
/// overflowed queue reports ENOBUFS, which also means "read again").
#[cfg(target_os = "linux")]
fn drained(fd: &std::os::fd::OwnedFd) -> bool {
    use rustix::net::{RecvFlags, recv};
    let mut buf = [0u8; 8192];
    let mut changed = false;
    // Bounded: a flood of changes is read at most 64 messages a dial,
    // and any message at all means a fresh read of the list.
    for _ in 0..64 {
        match recv(fd, &mut buf[..], RecvFlags::DONTWAIT) {
            Ok((_, 0)) => break,
            Ok(_) => changed = true,
            Err(rustix::io::Errno::AGAIN) => break,
            Err(rustix::io::Errno::INTR) => continue,
            Err(_) => {
                changed = true;
                break;
            }
        }
    }
    changed
}

impl OwnAddresses {
    pub fn new() -> OwnAddresses {
        #[cfg(target_os = "linux")]
        let watch = match watch_socket() {
            Ok(fd) => Some(fd),
            Err(e) => {
                warn!(error = %e, "no netlink address watch; reading addresses at every dial");
                None
            }
        };
        // The watch is open before the first read, so nothing added
        // between the two is missed.
        OwnAddresses {
            inner: Mutex::new(Inner {
                addrs: Arc::new(read_addrs()),
                #[cfg(target_os = "linux")]
                watch,
            }),
        }
    }

    /// This machine's addresses as of now.
    pub fn current(&self) -> Arc<Vec<IpAddr>> {
        let Ok(mut g) = self.inner.lock() else {
            return Arc::new(read_addrs());
        };
        #[cfg(target_os = "linux")]
        let stale = g.watch.as_ref().is_none_or(drained);
        #[cfg(not(target_os = "linux"))]
        let stale = true;
        if stale {
            g.addrs = Arc::new(read_addrs());
            debug!(addresses = g.addrs.len(), "own addresses read");
        }
        g.addrs.clone()
    }
}

impl Default for OwnAddresses {
    fn default() -> Self {
        OwnAddresses::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_own_and_reads_are_stable() {
        let own = OwnAddresses::new();
        let a = own.current();
        assert!(a.iter().any(|ip| ip.is_loopback()), "{a:?}");
        assert_eq!(*own.current(), *a);
    }
}
