//! Where a flow goes: the target's addresses (a name that spells an
//! address is that address; otherwise the sharer's resolver), each decided
//! by the egress policy and the machine's current own addresses, then
//! dialled over the sharer's uplink.

use crate::own::OwnAddresses;
use crate::wire::{FlowHeader, Host, reply};
use bandshare_core::EgressPolicy;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpStream;
use tracing::info;

const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// Addresses `host` stands for: itself; the address a name spells in any
/// form (`127.1`, `0x7f000001`, `[::1]`, a trailing dot), without asking a
/// resolver; else what the sharer's resolver says.
async fn resolve(host: &Host, port: u16) -> Result<Vec<SocketAddr>, u8> {
    match host {
        Host::Ip(ip) => Ok(vec![SocketAddr::new(*ip, port)]),
        Host::Name(name) => {
            if let Some(ip) = bandshare_core::egress::literal_ip(name) {
                return Ok(vec![SocketAddr::new(ip, port)]);
            }
            let name = name.trim_end_matches('.').to_string();
            match tokio::time::timeout(DIAL_TIMEOUT, tokio::net::lookup_host((name, port))).await {
                Ok(Ok(addrs)) => Ok(addrs.collect()),
                Ok(Err(_)) => Err(reply::HOST_UNREACHABLE),
                Err(_) => Err(reply::TTL_EXPIRED),
            }
        }
    }
}

fn io_reply(e: &std::io::Error) -> u8 {
    use std::io::ErrorKind::*;
    match e.kind() {
        ConnectionRefused => reply::REFUSED,
        TimedOut => reply::TTL_EXPIRED,
        NetworkUnreachable => reply::NETWORK_UNREACHABLE,
        HostUnreachable => reply::HOST_UNREACHABLE,
        _ => reply::GENERAL_FAILURE,
    }
}

/// The addresses of `header` the egress policy allows as of now (the
/// machine's own addresses read right before the decision); `Err` is the
/// reply code and the reason.
pub(crate) async fn allowed(
    header: &FlowHeader,
    egress: &EgressPolicy,
    own: &OwnAddresses,
) -> Result<Vec<SocketAddr>, (u8, String)> {
    let addrs = resolve(&header.host, header.port)
        .await
        .map_err(|code| (code, format!("cannot resolve {}", header.host)))?;
    let own_now = own.current();
    let mut denied = None;
    let allowed: Vec<SocketAddr> = addrs
        .iter()
        .filter(
            |a| match egress.decide_with_own(a.ip(), a.port(), &own_now) {
                Ok(()) => true,
                Err(why) => {
                    info!(target_addr = %a, reason = %why, "egress denied");
                    denied.get_or_insert_with(|| format!("{a} is off limits: {why}"));
                    false
                }
            },
        )
        .copied()
        .collect();
    if allowed.is_empty() {
        return Err(match denied {
            Some(why) => (reply::NOT_ALLOWED, why),
            None => (
                reply::HOST_UNREACHABLE,
                format!("{} has no address", header.host),
            ),
        });
    }
    Ok(allowed)
}

/// Dials the first allowed address; `Err` is the reply code to send.
pub(crate) async fn dial(
    header: &FlowHeader,
    egress: &EgressPolicy,
    own: &OwnAddresses,
) -> Result<TcpStream, (u8, String)> {
    let allowed = allowed(header, egress, own).await?;
    let mut failed = (reply::HOST_UNREACHABLE, String::new());
    for a in allowed {
        match tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(a)).await {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Ok(Err(e)) => failed = (io_reply(&e), format!("dialing {a}: {e}")),
            Err(_) => failed = (reply::TTL_EXPIRED, format!("dialing {a} timed out")),
        }
    }
    Err(failed)
}
