//! Keeping the pool full: the first share request and every refill, the
//! dials of new offers, spare tickets for known sharers (refreshed while
//! the coordinator is reachable, dialled directly while it is not), and the
//! make-before-break rotation when the device moves or changes scene.

use super::RequesterOptions;
use super::direct::Direct;
use super::own_link::{Path, State};
use super::pool::{KnownSharer, Member, Pool};
use crate::client;
use crate::location::LocationSpec;
use bandshare_core::{Backoff, DeviceKey, DistanceBand};
use bandshare_proto::convert as cv;
use bandshare_proto::v1;
use bandshare_relay::FlowHeader;
use bandshare_relay::Tunnel;
use bandshare_relay::wire::Host;
use ed25519_dalek::SigningKey;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;
use tracing::{debug, info, warn};

/// A move this far (or a change of scene) asks for fresh offers.
pub const MOVE_THRESHOLD_M: f64 = 50.0;

/// Whether the requester moved enough since `asked` to ask again.
pub fn moved_far(asked: &LocationSpec, now: &LocationSpec) -> Option<String> {
    if asked.scene != now.scene {
        return Some(format!(
            "scene changed to {:?}",
            now.scene.map(|s| s.to_string())
        ));
    }
    match (asked.at, now.at) {
        (Some(a), Some(b)) => {
            let d = a.ground_distance_m(&b);
            (d > MOVE_THRESHOLD_M).then(|| format!("moved {d:.0} m"))
        }
        (None, Some(_)) => Some("got a position fix".into()),
        _ => (asked.wifi != now.wifi && !now.wifi.is_empty())
            .then(|| "Wi-Fi surroundings changed".into()),
    }
}

pub(super) fn request(
    opts: &RequesterOptions,
    location: &LocationSpec,
    key: &SigningKey,
) -> v1::ShareRequest {
    client::share_request_from(key, location, &opts.conditions, false)
}

/// Dials the offers not yet in the pool, concurrently, and adds those that
/// answer, up to `room` of them.
pub(super) async fn connect_offers(
    pool: &Arc<Pool>,
    offers: Vec<v1::Offer>,
    key: &SigningKey,
    room: usize,
) {
    let fresh: Vec<v1::Offer> = offers
        .into_iter()
        .filter(|o| DeviceKey::from_slice(&o.sharer_key).is_ok_and(|k| !pool.contains(&k)))
        .take(room)
        .collect();
    let dials = fresh.into_iter().map(|o| async move {
        let addr = o
            .relay_endpoints
            .iter()
            .find_map(|e| e.parse::<SocketAddr>().ok());
        let pin: Option<[u8; 32]> = o.relay_cert_sha256.as_slice().try_into().ok();
        let (Some(addr), Some(pin), Ok(sharer_key)) =
            (addr, pin, DeviceKey::from_slice(&o.sharer_key))
        else {
            return Err(format!("offer from {} is malformed", o.sharer));
        };
        let tunnel = Tunnel::connect(addr, pin, &o.ticket, key)
            .await
            .map_err(|e| format!("{}: {e}", o.sharer))?;
        let mut link = o.link.as_ref().map(cv::link_from_wire).unwrap_or_default();
        link.network = cv::network_from_wire(o.network);
        Ok(member(
            o.sharer.clone(),
            sharer_key,
            addr,
            pin,
            DistanceBand::parse(&o.distance_band),
            cv::network_from_wire(o.network),
            link,
            tunnel,
            &o.ticket,
        ))
    });
    for r in futures::future::join_all(dials).await {
        match r {
            Ok(m) => pool.add(m),
            Err(e) => warn!(error = %e, "cannot join sharer"),
        }
    }
}

use bandshare_core::clock::unix_now;

#[allow(clippy::too_many_arguments)]
fn member(
    name: String,
    key: DeviceKey,
    endpoint: SocketAddr,
    pin: [u8; 32],
    band: Option<DistanceBand>,
    network: Option<bandshare_core::NetworkType>,
    link: bandshare_core::LinkState,
    tunnel: Tunnel,
    ticket: &[u8],
) -> Member {
    // The quota is read, not trusted: the sharer enforces it; knowing it
    // lets the pool renew the ticket before a long transfer runs into it.
    let quota = bandshare_core::Ticket::decode(ticket).map_or(0, |(t, _)| t.quota_bytes);
    Member {
        name,
        key,
        endpoint,
        pin,
        band,
        network,
        link,
        tunnel,
        bytes_up: AtomicU64::new(0),
        bytes_down: AtomicU64::new(0),
        flows: AtomicU64::new(0),
        open: AtomicU64::new(0),
        idle: tokio::sync::Notify::new(),
        ticket_quota: AtomicU64::new(quota),
        renewed_at_bytes: AtomicU64::new(0),
        ticket: std::sync::Mutex::new(ticket.to_vec()),
    }
}

/// Fetches spare tickets for every known sharer; returns when to refresh
/// next (half the shortest ticket lifetime, at least 2 s).
async fn refresh_tickets(
    control: &Control,
    pool: &Pool,
    key: &SigningKey,
) -> Result<Duration, client::CoordinatorError> {
    let keys: Vec<Vec<u8>> = pool
        .known
        .lock()
        .map(|t| t.keys().map(|k| k.0.to_vec()).collect())
        .unwrap_or_default();
    if keys.is_empty() {
        return Ok(Duration::from_secs(30));
    }
    let ch = control.channel().await?;
    let mut client = v1::matchmaker_client::MatchmakerClient::new(ch);
    let resp = client
        .refresh_tickets({
            let signed = client::signed_by(key);
            v1::TicketRefresh {
                requester_key: signed.requester_key,
                sharer_keys: keys.into_iter().take(16).collect(),
                proof: signed.proof,
                signed_at_unix: signed.signed_at_unix,
            }
        })
        .await
        .map_err(|s| client::CoordinatorError::Status(s.code(), s.message().to_string()))?
        .into_inner();
    let now = unix_now();
    let mut next = Duration::from_secs(30);
    if let Ok(mut t) = pool.known.lock() {
        for o in resp.offers {
            let (Ok(k), Some(addr), Ok(pin)) = (
                DeviceKey::from_slice(&o.sharer_key),
                o.relay_endpoints
                    .iter()
                    .find_map(|e| e.parse::<SocketAddr>().ok()),
                <[u8; 32]>::try_from(o.relay_cert_sha256.as_slice()),
            ) else {
                continue;
            };
            if let Some(entry) = t.get_mut(&k) {
                entry.endpoint = addr;
                entry.pin = pin;
                entry.ticket = Some((o.ticket, o.ticket_expires_unix));
                let half = o.ticket_expires_unix.saturating_sub(now) / 2;
                next = next.min(Duration::from_secs(half.max(2)));
            }
        }
    }
    Ok(next)
}

/// While the coordinator cannot be reached: dials known sharers that
/// hold an unexpired spare ticket, up to `room` of them.
async fn reconnect_known(pool: &Arc<Pool>, key: &SigningKey, room: usize) {
    let now = unix_now();
    let picks: Vec<(DeviceKey, KnownSharer, Vec<u8>)> = match pool.known.lock() {
        Ok(mut t) => t
            .iter_mut()
            .filter(|(k, x)| {
                !pool.contains(k) && x.ticket.as_ref().is_some_and(|(_, exp)| *exp > now + 1)
            })
            .take(room)
            .filter_map(|(k, x)| {
                let (ticket, _) = x.ticket.take()?; // one ticket, one connection
                Some((*k, x.clone(), ticket))
            })
            .collect(),
        Err(_) => return,
    };
    for (k, x, ticket) in picks {
        match Tunnel::connect(x.endpoint, x.pin, &ticket, key).await {
            Ok(tunnel) => {
                info!(sharer = %x.name, "reconnected directly to a known sharer");
                pool.add(member(
                    x.name.clone(),
                    k,
                    x.endpoint,
                    x.pin,
                    x.band,
                    x.network,
                    x.link,
                    tunnel,
                    &ticket,
                ));
            }
            Err(e) => warn!(sharer = %x.name, error = %e, "known sharer unreachable"),
        }
    }
}

/// Joins the offered sharers. After a move (`moved` says why) it makes
/// before it breaks: it joins the new sharers first, then drops those no
/// longer offered here; otherwise it only fills the free places.
async fn take_offers(
    pool: &Arc<Pool>,
    offers: Vec<v1::Offer>,
    moved: Option<String>,
    key: &SigningKey,
    size: usize,
) {
    let Some(why) = moved else {
        connect_offers(pool, offers, key, size.saturating_sub(pool.serving())).await;
        return;
    };
    let offered: Vec<DeviceKey> = offers
        .iter()
        .filter_map(|o| DeviceKey::from_slice(&o.sharer_key).ok())
        .collect();
    info!(reason = %why, offers = offered.len(), "rotating the pool");
    // Members still offered here stay and count towards the size, so a
    // move does not dial sharers only to let them go again.
    let staying = pool.keys().iter().filter(|k| offered.contains(k)).count();
    connect_offers(pool, offers, key, size.saturating_sub(staying)).await;
    if !offered.is_empty() {
        for k in pool.keys() {
            if !offered.contains(&k) {
                pool.retire(&k, "no longer offered here after moving");
            }
        }
    }
}

/// How the requester reaches the coordinator: out of the own link, or —
/// while the own link is degraded — as a flow through the active sharer
/// (falling back to the own link if the sharer refuses), so a requester
/// whose own link is down can still refill its pool and refresh tickets.
pub(super) struct Control {
    pub url: client::ServerUrl,
    pub pool: Arc<Pool>,
    pub direct: Arc<Direct>,
}

impl Control {
    pub async fn channel(&self) -> Result<tonic::transport::Channel, client::CoordinatorError> {
        if self.direct.state() != State::Degraded || self.pool.active().is_none() {
            return client::connect(&self.url).await;
        }
        let pool = self.pool.clone();
        let dial: client::Dial = Arc::new(move |host: String, port: u16| {
            let pool = pool.clone();
            Box::pin(async move {
                let host = match host.parse::<std::net::IpAddr>() {
                    Ok(ip) => Host::Ip(ip),
                    Err(_) => Host::Name(host),
                };
                let f = pool
                    .open_flow(&FlowHeader { host, port }, true)
                    .await
                    .map_err(std::io::Error::other)?;
                debug!(via = %f.member.name, "coordinator reached through a sharer");
                Ok(Box::new(tokio::io::join(f.recv, f.send)) as Box<dyn client::Io>)
            })
        });
        match client::connect_with(&self.url, Some(dial)).await {
            Ok(ch) => Ok(ch),
            // The sharer may not let us through (a coordinator on a private
            // address is off limits by default): the own link may still
            // reach it (e.g. over a LAN).
            Err(e) => {
                debug!(error = %e, "coordinator not reached through the sharer: trying the own link");
                client::connect(&self.url).await
            }
        }
    }
}

/// How many members the pool keeps: `--pool` while new flows go through
/// it, `--standby` (warm, with tickets, probed) while they go direct.
pub(super) struct Size {
    pub pool: usize,
    pub standby: usize,
    pub direct: Arc<Direct>,
}

impl Size {
    pub fn now(&self) -> usize {
        match self.direct.path() {
            Path::Direct => self.standby.min(self.pool),
            Path::Pool => self.pool,
        }
    }
}

/// Members beyond `size` leave, the active one last: the own link carries
/// new flows again, so the pool shrinks back to its standby.
fn shrink(pool: &Pool, size: usize) {
    let active = pool.active().map(|m| m.key);
    let mut keys = pool.keys();
    keys.sort_by_key(|k| Some(*k) == active);
    let extra = keys.len().saturating_sub(size);
    for k in keys.into_iter().take(extra) {
        pool.retire(&k, "own link healthy: back to standby");
    }
}

/// Keeps the pool at its [`Size`]: refills after a member leaves and every
/// 10 s, with backoff while the coordinator cannot be reached; fills at
/// once when the own link degrades and shrinks when it recovers.
pub(super) async fn maintain(
    pool: Arc<Pool>,
    url: client::ServerUrl,
    opts: RequesterOptions,
    mut location: tokio::sync::watch::Receiver<LocationSpec>,
    mut asked: LocationSpec,
    key: SigningKey,
    sizes: Size,
) {
    let control = Control {
        url,
        pool: pool.clone(),
        direct: sizes.direct.clone(),
    };
    let mut backoff = Backoff::new(
        Duration::from_millis(500),
        bandshare_core::backoff::RECONNECT_CAP,
    );
    let mut rotate: Option<String> = None;
    let mut refresh_at = tokio::time::Instant::now();
    let mut retry_at = refresh_at;
    // A moving device wakes this loop at every fix, and must not ask at
    // that rate. After a refused or failed share request, none before
    // `ask_at` (its backoff); after an answer that left the pool short, a
    // fix alone asks again only from `short_until` (a member leaving, the
    // own link degrading or moving far asks at once).
    let mut ask_at = refresh_at;
    let mut short_until = refresh_at;
    let mut woke_by_fix = false;
    loop {
        // Keep a spare ticket for every known sharer while we can.
        let needs_ticket = pool.needs_ticket();
        // A sharer newly known is refreshed at once, but never more often
        // than every 2 s (the coordinator may be down).
        let now = tokio::time::Instant::now();
        if (needs_ticket && now >= retry_at) || now >= refresh_at {
            retry_at = now + Duration::from_secs(2);
            refresh_at = now
                + match refresh_tickets(&control, &pool, &key).await {
                    Ok(next) => next,
                    Err(_) => Duration::from_secs(2),
                };
        }
        let size = sizes.now();
        if pool.len() > size {
            shrink(&pool, size);
        }
        let now = tokio::time::Instant::now();
        let wants = pool.serving() < size || rotate.is_some();
        let not_before = if std::mem::take(&mut woke_by_fix) && rotate.is_none() {
            ask_at.max(short_until)
        } else {
            ask_at
        };
        let wait = if wants && now < not_before {
            not_before - now
        } else if wants {
            let here = location.borrow_and_update().clone();
            // Whichever path led here, asking from elsewhere rotates.
            let moved = rotate.take().or_else(|| moved_far(&asked, &here));
            let result = async {
                let ch = control.channel().await?;
                client::share_request(ch, request(&opts, &here, &key)).await
            }
            .await;
            match result {
                Ok(resp) => {
                    backoff.reset();
                    asked = here;
                    take_offers(&pool, resp.offers, moved, &key, size).await;
                    if pool.serving() < size {
                        short_until = tokio::time::Instant::now() + Duration::from_secs(2);
                        Duration::from_secs(2)
                    } else {
                        Duration::from_secs(10)
                    }
                }
                Err(e) => {
                    rotate = moved;
                    reconnect_known(&pool, &key, size.saturating_sub(pool.serving())).await;
                    let d = backoff.next_delay(fastrand::f64());
                    warn!(error = %e, retry_in_ms = d.as_millis() as u64, "cannot refill the pool; the pool keeps serving");
                    ask_at = tokio::time::Instant::now() + d;
                    d
                }
            }
        } else {
            Duration::from_secs(10)
        };
        let needs_ticket = pool.needs_ticket();
        let due = if needs_ticket {
            refresh_at.min(retry_at)
        } else {
            refresh_at
        };
        let wait = wait.min(
            due.saturating_duration_since(tokio::time::Instant::now())
                .max(Duration::from_millis(200)),
        );
        tokio::select! {
            _ = pool.changed.notified() => {}
            _ = tokio::time::sleep(wait) => {}
            changed = location.changed() => {
                if changed.is_err() {
                    // No source can move it any more: wait on the rest.
                    tokio::select! {
                        _ = pool.changed.notified() => {}
                        _ = tokio::time::sleep(wait) => {}
                    }
                } else if let Some(why) = moved_far(&asked, &location.borrow_and_update()) {
                    rotate = Some(why);
                } else {
                    woke_by_fix = true;
                }
            }
        }
        pool.reselect();
    }
}
