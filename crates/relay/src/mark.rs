//! The mark on bandshare's own outgoing sockets (Linux `SO_MARK`). In
//! whole-device mode (`connect --tun`) the default routes point into the
//! TUN device for everything *unmarked*; bandshare's own sockets — to the
//! coordinator, to sharers' QUIC relays, the direct path and its probes —
//! carry the mark and keep the original routes. Unset (0), nothing is
//! marked and sockets are made as usual.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};

static MARK: AtomicU32 = AtomicU32::new(0);

/// Marks every socket made through this module from now on (needs
/// CAP_NET_ADMIN); 0 stops marking.
pub fn set(mark: u32) {
    MARK.store(mark, Ordering::Relaxed);
}

pub fn get() -> Option<u32> {
    Some(MARK.load(Ordering::Relaxed)).filter(|m| *m != 0)
}

/// Puts the mark on `socket`, if one is set.
pub fn apply<S: std::os::fd::AsFd>(socket: &S) -> io::Result<()> {
    match get() {
        #[cfg(target_os = "linux")]
        Some(m) => socket2::SockRef::from(socket).set_mark(m),
        #[cfg(not(target_os = "linux"))]
        Some(_) => Err(io::Error::other("socket marks exist only on Linux")),
        None => Ok(()),
    }
}

/// A UDP socket bound to `addr`, marked.
pub fn udp_bind(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    if addr.is_ipv6() {
        // Dual stack where it is the unspecified address.
        let _ = s.set_only_v6(false);
    }
    apply(&s)?;
    s.bind(&addr.into())?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

/// A UDP socket on an ephemeral port for either address family (dual stack
/// where the machine has IPv6, else IPv4 only), marked.
pub fn udp_bind_any() -> io::Result<std::net::UdpSocket> {
    udp_bind((std::net::Ipv6Addr::UNSPECIFIED, 0).into())
        .or_else(|_| udp_bind((std::net::Ipv4Addr::UNSPECIFIED, 0).into()))
}

/// A TCP connection to `addr`, marked.
pub async fn tcp_connect(addr: SocketAddr) -> io::Result<tokio::net::TcpStream> {
    let s = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    apply(&s)?;
    let s = s.connect(addr).await?;
    let _ = s.set_nodelay(true);
    Ok(s)
}

/// A TCP connection to the first address of `host:port` that answers.
pub async fn tcp_connect_host(host: &str, port: u16) -> io::Result<tokio::net::TcpStream> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, format!("{host} has no address"));
    for a in tokio::net::lookup_host((host, port)).await? {
        match tcp_connect(a).await {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unmarked_sockets_work_as_usual() {
        assert_eq!(get(), None);
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let a = l.local_addr().expect("addr");
        let (c, s) = tokio::join!(tcp_connect(a), l.accept());
        assert!(c.is_ok() && s.is_ok());
        assert!(udp_bind("127.0.0.1:0".parse().expect("addr")).is_ok());
        assert!(tcp_connect_host("localhost", a.port()).await.is_ok());
    }
}
