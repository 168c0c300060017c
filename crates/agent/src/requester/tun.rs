//! Whole-device mode (`connect --tun NAME`, Linux): a TUN device takes the
//! default IPv4 and IPv6 routes, userspace TCP/IP stacks terminate the
//! device's TCP connections (smoltcp, through `netstack-smoltcp`) and UDP
//! flows (`ipstack`), and each goes on
//! the path new flows take — out of the own link, or through the active
//! sharer — exactly as the proxy's flows do. No app needs a proxy setting.
//!
//! Routing, as `wg-quick` does it: the default routes live in table
//! [`TABLE`], used by everything *without* the mark [`MARK`] (rule
//! [`PREF_TUN`]); a rule before it ([`PREF_SUPPRESS`]) keeps the main
//! table's more specific routes (the LAN, the own link's subnet). bandshare
//! marks its own sockets (`bandshare_relay::mark`), so the coordinator,
//! sharers' relays and the direct path keep the original routes. On exit
//! the rules, routes and device are removed; after a crash, `--cleanup`
//! does it.

use super::direct::{Dialed, Direct};
use super::own_link::{Path, Via};
use super::pool::Pool;
use super::udp;
use bandshare_relay::FlowHeader;
use bandshare_relay::wire::Host;
use ipstack::{IpStack, IpStackConfig, IpStackStream};
use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{debug, info, warn};

/// The mark on bandshare's own sockets.
pub const MARK: u32 = 0x00b5_0001;
/// The routing table holding the default routes into the device.
pub const TABLE: &str = "181";
/// Rule priorities: keep specific main routes, then the table.
pub const PREF_SUPPRESS: &str = "18100";
pub const PREF_TUN: &str = "18101";
/// The device's MTU: the hop from the apps to this process only (what
/// leaves the machine is re-segmented by the kernel), so as large as the
/// kernel's TCP takes, and few packets cross the device per byte. `bench
/// tun` (six runs each): `ipstack` alone — no window scaling, one 64 KiB
/// window in flight, retransmits only when the device sends it something —
/// gave 0.77–0.97 of the SOCKS path at 16,000 bytes and stalled now and
/// then above; TCP in smoltcp (window scaling, timers) at 65,000 gives
/// 0.95–1.22.
const MTU: u16 = 65_000;
/// Copy buffer from a flow to the device: about one segment's payload.
const SEGMENT: usize = MTU as usize - 60;
/// Copy buffer from the device to a flow.
const COPY_UP: usize = 64 * 1024;

/// The TUN device, read and written by [`serve`].
pub use tun::AsyncDevice as Device;

#[derive(Debug, thiserror::Error)]
pub enum TunError {
    #[error(
        "connect --tun needs CAP_NET_ADMIN to create {0} and change routes: run it as root (or give the binary cap_net_admin)"
    )]
    Permission(String),
    #[error(
        "a network device {0} exists already (left by an earlier run?): `bandshare connect --tun {0} --cleanup` removes it"
    )]
    Exists(String),
    #[error("cannot create TUN device {0}: {1}")]
    Create(String, String),
    #[error("`ip {0}` failed: {1}")]
    Ip(String, String),
}

fn ip(args: &[&str]) -> Result<(), TunError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| TunError::Ip(args.join(" "), format!("cannot run ip (iproute2): {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(TunError::Ip(
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

fn device_exists(name: &str) -> bool {
    std::path::Path::new("/sys/class/net").join(name).exists()
}

/// Removes what a run with device `name` set up (rules, the table's
/// routes, the device); says what it removed. Safe to run when nothing is
/// there.
pub fn cleanup(name: &str) -> Vec<String> {
    let mut removed = vec![];
    for family in ["-4", "-6"] {
        for pref in [PREF_TUN, PREF_SUPPRESS] {
            while ip(&[family, "rule", "del", "pref", pref]).is_ok() {
                removed.push(format!("ip {family} rule {pref}"));
            }
        }
        if ip(&[family, "route", "flush", "table", TABLE]).is_ok() {
            removed.push(format!("ip {family} routes of table {TABLE}"));
        }
    }
    if device_exists(name) && ip(&["link", "del", name]).is_ok() {
        removed.push(format!("device {name}"));
    }
    removed
}

/// The routes, rules and device of one run; removed when dropped.
pub struct Routes {
    name: String,
}

impl Drop for Routes {
    fn drop(&mut self) {
        let removed = cleanup(&self.name);
        bandshare_relay::mark::set(0);
        info!(device = %self.name, removed = removed.len(), "whole-device routes removed");
    }
}

/// Creates the TUN device `name`, takes the default routes, and marks
/// bandshare's own sockets from now on.
pub fn setup(name: &str) -> Result<(Routes, tun::AsyncDevice), TunError> {
    if device_exists(name) {
        return Err(TunError::Exists(name.into()));
    }
    let mut cfg = tun::Configuration::default();
    cfg.tun_name(name)
        .address((198, 18, 0, 1))
        .netmask((255, 255, 255, 252))
        .destination((198, 18, 0, 2))
        .mtu(MTU)
        .up();
    let device = tun::create_as_async(&cfg).map_err(|e| {
        let text = e.to_string();
        if text.contains("ermission") || text.contains("EPERM") || text.contains("not permitted") {
            TunError::Permission(name.into())
        } else {
            TunError::Create(name.into(), text)
        }
    })?;
    // From here on a failure undoes what was done.
    let routes = Routes { name: name.into() };
    bandshare_relay::mark::set(MARK);
    let mark = format!("{MARK:#x}");
    take_default_routes("-4", name, &mark)?;
    // IPv6 where the machine has it.
    let v6 = ip(&["-6", "addr", "add", "fdb5:a1::1/126", "dev", name])
        .and_then(|_| take_default_routes("-6", name, &mark));
    if let Err(e) = v6 {
        warn!(error = %e, "no IPv6 default route through the device");
    }
    info!(
        device = name,
        "whole-device mode: default routes through {name}"
    );
    Ok((routes, device))
}

/// The default route of `family` (`-4`, `-6`) into the device for every
/// unmarked packet, after the main table's more specific routes.
fn take_default_routes(family: &str, name: &str, mark: &str) -> Result<(), TunError> {
    ip(&[
        family, "route", "add", "default", "dev", name, "table", TABLE,
    ])?;
    ip(&[
        family, "rule", "add", "not", "fwmark", mark, "table", TABLE, "pref", PREF_TUN,
    ])?;
    ip(&[
        family,
        "rule",
        "add",
        "table",
        "main",
        "suppress_prefixlength",
        "0",
        "pref",
        PREF_SUPPRESS,
    ])
}

/// Packets queued between the device and the stacks, each way.
const QUEUE: usize = 1024;
/// Receive and send buffers of one TCP connection in the stack: with
/// window scaling, the window a flow may keep in flight.
const TCP_BUFFER: u32 = 512 * 1024;

/// The UDP stack's device: each read is one UDP packet the TUN device
/// delivered, each write one packet back to it. A full queue drops the
/// datagram, as a congested link would (never blocks, never grows).
struct UdpPackets {
    from_tun: tokio::sync::mpsc::Receiver<Vec<u8>>,
    to_tun: tokio::sync::mpsc::Sender<Vec<u8>>,
}

impl tokio::io::AsyncRead for UdpPackets {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.from_tun.poll_recv(cx) {
            std::task::Poll::Ready(Some(p)) => {
                let n = p.len().min(buf.remaining());
                buf.put_slice(&p[..n]);
                std::task::Poll::Ready(Ok(()))
            }
            std::task::Poll::Ready(None) => std::task::Poll::Ready(Ok(())),
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }
}

impl tokio::io::AsyncWrite for UdpPackets {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let _ = self.to_tun.try_send(buf.to_vec());
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// The IP protocol number of a packet (IPv4 or IPv6, no extension headers).
fn protocol(p: &[u8]) -> Option<u8> {
    match p.first()? >> 4 {
        4 => p.get(9).copied(),
        6 => p.get(6).copied(),
        _ => None,
    }
}

/// Carries the device's TCP connections and UDP flows until it closes:
/// TCP through a smoltcp stack (`netstack-smoltcp`: window scaling, so a
/// flow keeps [`TCP_BUFFER`] in flight), UDP flows through `ipstack` (a
/// 5-tuple each, with an idle timeout).
pub async fn serve(device: tun::AsyncDevice, pool: Arc<Pool>, direct: Arc<Direct>) {
    use futures::{SinkExt, StreamExt};
    let built = netstack_smoltcp::StackBuilder::default()
        .enable_tcp(true)
        .enable_udp(false)
        .enable_icmp(false)
        .mtu(MTU as usize)
        .stack_buffer_size(QUEUE)
        .tcp_buffer_size(QUEUE)
        .tcp_recv_buffer_size(TCP_BUFFER)
        .tcp_send_buffer_size(TCP_BUFFER)
        .build();
    let (stack, runner, _, listener) = match built {
        Ok(b) => b,
        Err(e) => {
            warn!(error = %e, "cannot build the TCP stack for the device");
            return;
        }
    };
    let Some(mut listener) = listener else { return };
    if let Some(runner) = runner {
        tokio::spawn(runner);
    }
    let (mut stack_in, mut stack_out) = stack.split();
    let (mut tun_in, mut tun_out) = device.into_framed().split();
    let (to_tun, mut to_tun_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(QUEUE);
    let (udp_in, udp_from_tun) = tokio::sync::mpsc::channel::<Vec<u8>>(QUEUE);
    // One writer to the device: the TCP stack's packets and the UDP stack's.
    tokio::spawn(async move {
        while let Some(p) = to_tun_rx.recv().await {
            if tun_in.send(p).await.is_err() {
                break;
            }
        }
    });
    let t = to_tun.clone();
    tokio::spawn(async move {
        while let Some(Ok(p)) = stack_out.next().await {
            if t.send(p).await.is_err() {
                break;
            }
        }
    });
    // The device's packets, by protocol: TCP to smoltcp, UDP to ipstack.
    tokio::spawn(async move {
        while let Some(Ok(p)) = tun_out.next().await {
            match protocol(&p) {
                // A packet the stack refuses (malformed) is dropped, and
                // the device read on.
                Some(6) => {
                    if let Err(e) = stack_in.send(p).await {
                        debug!(error = %e, "device packet dropped");
                    }
                }
                Some(17) => {
                    let _ = udp_in.try_send(p);
                }
                // ICMP and the like: not carried (ping answers nothing).
                _ => {}
            }
        }
    });
    let mut cfg = IpStackConfig::default();
    cfg.mtu_unchecked(MTU);
    let mut udp_stack = IpStack::new(
        cfg,
        UdpPackets {
            from_tun: udp_from_tun,
            to_tun,
        },
    );
    {
        let (pool, direct) = (pool.clone(), direct.clone());
        tokio::spawn(async move {
            while let Ok(stream) = udp_stack.accept().await {
                if let IpStackStream::Udp(u) = stream {
                    tokio::spawn(carry_udp(u, pool.clone(), direct.clone()));
                }
            }
        });
    }
    while let Some((tcp, _from, to)) = listener.next().await {
        let (pool, direct) = (pool.clone(), direct.clone());
        tokio::spawn(async move {
            if let Err(e) = carry_tcp(tcp, to, &pool, &direct).await {
                debug!(%to, error = %e, "device TCP flow ended");
            }
        });
    }
}

fn header(to: SocketAddr) -> FlowHeader {
    FlowHeader {
        host: Host::Ip(to.ip().to_canonical()),
        port: to.port(),
    }
}

/// One TCP connection of the device, on the path new flows take.
async fn carry_tcp(
    mut tcp: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    to: SocketAddr,
    pool: &Pool,
    direct: &Direct,
) -> std::io::Result<()> {
    let target = header(to);
    if direct.path() == Path::Direct {
        match direct.connect(&target, pool).await {
            Dialed::Open(mut out, _watch) => {
                let (up, down) =
                    tokio::io::copy_bidirectional_with_sizes(&mut tcp, &mut out, COPY_UP, SEGMENT)
                        .await?;
                direct
                    .bytes_up
                    .fetch_add(up, std::sync::atomic::Ordering::Relaxed);
                direct
                    .bytes_down
                    .fetch_add(down, std::sync::atomic::Ordering::Relaxed);
                return Ok(());
            }
            // The app sees its connection end, as a refusal would.
            Dialed::Refused(e) => return Err(e),
            Dialed::NoPath(why) if direct.via() == Via::Direct => {
                return Err(std::io::Error::other(why));
            }
            Dialed::NoPath(_) => {}
        }
    }
    let super::pool::OpenFlow {
        send,
        recv,
        member,
        open: _open,
        ..
    } = pool
        .open_flow(&target, true)
        .await
        .map_err(std::io::Error::other)?;
    let mut through = tokio::io::join(recv, send);
    let (up, down) =
        tokio::io::copy_bidirectional_with_sizes(&mut tcp, &mut through, COPY_UP, SEGMENT).await?;
    member
        .bytes_up
        .fetch_add(up, std::sync::atomic::Ordering::Relaxed);
    member
        .bytes_down
        .fetch_add(down, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

/// One UDP flow of the device (a 5-tuple, ended by the stack's idle
/// timeout): each datagram on the path new flows take, replies back.
async fn carry_udp(mut u: ipstack::IpStackUdpStream, pool: Arc<Pool>, direct: Arc<Direct>) {
    let target = header(u.peer_addr());
    let out = match bandshare_relay::mark::udp_bind_any().and_then(tokio::net::UdpSocket::from_std)
    {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "cannot open a UDP socket for a device flow");
            return;
        }
    };
    let router = pool.udp.clone();
    let (id, mut replies) = router.open();
    // Whole datagrams: the stack hands one per read, up to the buffer.
    let mut from_app = vec![0u8; 65_536];
    let mut from_out = vec![0u8; 65_536];
    loop {
        tokio::select! {
            got = u.read(&mut from_app) => match got {
                Ok(n) if n > 0 => udp::send(&pool, &direct, &out, id, &target, &from_app[..n]).await,
                _ => break,
            },
            got = out.recv_from(&mut from_out) => {
                if let Ok((n, _)) = got
                    && u.write_all(&from_out[..n]).await.is_err()
                {
                    break;
                }
            }
            Some((_, data)) = replies.recv() => {
                if u.write_all(&data).await.is_err() {
                    break;
                }
            }
        }
    }
    router.close(id);
}
