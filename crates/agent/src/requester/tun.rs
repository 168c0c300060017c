//! Whole-device mode (`connect --tun NAME`, Linux): a TUN device takes the
//! default IPv4 and IPv6 routes, a userspace TCP/IP stack (`ipstack`)
//! terminates the device's TCP connections and UDP flows, and each goes on
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
/// The device's MTU. The stack (`ipstack` 1.0) keeps at most one 16-bit
/// window in flight (it offers no window scaling), so throughput is set
/// by how few, large segments fill it: 16,000 bytes is four segments per
/// 64 KiB window, the fewest with which a lost one is still recovered by
/// three duplicate ACKs (the stack retransmits on a timer only when the
/// device sends it something). `bench tun`: 1,500 bytes gave 0.3–0.4 of
/// the SOCKS path, 16,000 gives ~0.8; larger ones were faster still but
/// stalled downloads now and then. The MTU is that of the hop to this
/// process only: what leaves the machine is re-segmented by the kernel.
const MTU: u16 = 16_000;
/// Bytes the stack keeps in flight to the device, and buffers from it:
/// the largest 16-bit window.
const WINDOW: u16 = u16::MAX;
/// Copy buffer from a flow to the device: one segment's payload (after an
/// IPv6 header), as the stack makes one segment per write and copies all
/// it is handed each time.
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

/// Carries the device's TCP connections and UDP flows until it closes.
pub async fn serve(device: tun::AsyncDevice, pool: Arc<Pool>, direct: Arc<Direct>) {
    let mut tcp = ipstack::TcpConfig::default();
    tcp.max_unacked_bytes = WINDOW.into();
    tcp.read_buffer_size = WINDOW.into();
    let mut cfg = IpStackConfig::default();
    cfg.mtu_unchecked(MTU).with_tcp_config(tcp);
    let mut stack = IpStack::new(cfg, device);
    while let Ok(stream) = stack.accept().await {
        match stream {
            IpStackStream::Tcp(tcp) => {
                let (pool, direct) = (pool.clone(), direct.clone());
                tokio::spawn(async move {
                    let to = tcp.peer_addr();
                    if let Err(e) = carry_tcp(tcp, to, &pool, &direct).await {
                        debug!(%to, error = %e, "device TCP flow ended");
                    }
                });
            }
            IpStackStream::Udp(u) => {
                tokio::spawn(carry_udp(u, pool.clone(), direct.clone()));
            }
            // ICMP and the like: not carried (ping answers nothing).
            _ => {}
        }
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
    mut tcp: ipstack::IpStackTcpStream,
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
    let (send, recv, member) = pool
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
