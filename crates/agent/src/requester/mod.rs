//! `bandshare connect`: asks the coordinator for offers, keeps a pool of
//! tunnels to several sharers, and serves local applications through SOCKS5,
//! HTTP CONNECT, fixed port forwards and a `GET /status` endpoint.

pub mod pool;
pub mod proxy;
pub mod select;
pub mod socks;

use crate::location::{ConditionSpec, LocationSpec};
use crate::{AgentError, Shutdown, coordinator};
use bandshare_core::{Backoff, DeviceKey, DistanceBand};
use bandshare_proto::convert as cv;
use bandshare_proto::v1;
use bandshare_relay::{FlowHeader, Tunnel};
use ed25519_dalek::SigningKey;
use pool::{Member, Pool, Trusted};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;
use tokio::net::TcpListener;
use tracing::{info, warn};

/// `--forward LOCAL=HOST:PORT`
#[cfg(test)]
mod tests {
    use super::*;
    use bandshare_core::Position;

    #[test]
    fn what_counts_as_moving() {
        let p = Position::new(39.9, 116.4, None).expect("valid");
        let at = |e: f64| LocationSpec {
            at: Some(p.offset_m(e, 0.0)),
            ..Default::default()
        };
        assert_eq!(moved_far(&at(0.0), &at(30.0)), None);
        assert!(moved_far(&at(0.0), &at(80.0)).is_some_and(|w| w.contains("80 m")));
        let mut hall = at(0.0);
        hall.scene = Some(bandshare_core::Scene::Station);
        assert!(moved_far(&at(0.0), &hall).is_some_and(|w| w.contains("scene")));
        assert!(moved_far(&LocationSpec::default(), &at(0.0)).is_some());
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Forward {
    pub local: SocketAddr,
    pub target: FlowHeader,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("expected LOCAL=HOST:PORT such as 127.0.0.1:8080=example.com:80, got {0:?}")]
pub struct BadForward(pub String);

impl std::str::FromStr for Forward {
    type Err = BadForward;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadForward(s.to_string());
        let (l, t) = s.split_once('=').ok_or_else(bad)?;
        Ok(Forward {
            local: l.parse().map_err(|_| bad())?,
            target: socks::parse_authority(t).ok_or_else(bad)?,
        })
    }
}

#[derive(Clone, Debug)]
pub struct RequesterOptions {
    pub server: String,
    pub location: LocationSpec,
    pub sources: crate::position::Sources,
    pub conditions: ConditionSpec,
    pub pool_size: usize,
    /// How the active member is chosen.
    pub strategy: select::Strategy,
    pub socks: Option<SocketAddr>,
    pub forwards: Vec<Forward>,
    pub control: Option<SocketAddr>,
    /// How long flows open through a sharer that went silent wait for it
    /// (new flows move at once); [`pool::STALL_GRACE`] by default.
    pub stall_grace: Duration,
}

/// A running requester; listeners are bound and the pool is filling.
pub struct Requester {
    pub pool: Arc<Pool>,
    pub socks_addr: Option<SocketAddr>,
    pub control_addr: Option<SocketAddr>,
    pub forward_addrs: Vec<SocketAddr>,
    /// The coordinator's answer to the first share request.
    pub first_response: v1::ShareResponse,
    location: Arc<tokio::sync::watch::Sender<LocationSpec>>,
}

impl Requester {
    /// Moves the requester by hand (live sources move it too): a move of
    /// more than [`MOVE_THRESHOLD_M`] or a new scene rotates the pool.
    pub fn relocate(&self, to: LocationSpec) {
        self.location.send_replace(to);
    }
}

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

async fn bind(addr: SocketAddr) -> Result<TcpListener, AgentError> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| AgentError::Listen(addr, e))
}

fn request(opts: &RequesterOptions, location: &LocationSpec, key: &SigningKey) -> v1::ShareRequest {
    coordinator::share_request_from(key, location, &opts.conditions, false)
}

/// Dials the offers not yet in the pool, concurrently, and adds those that
/// answer, up to `room` of them.
async fn connect_offers(pool: &Arc<Pool>, offers: Vec<v1::Offer>, key: &SigningKey, room: usize) {
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
        probe_rtt_us: AtomicU64::new(0),
        probe_loss_permille: AtomicU64::new(0),
        last_answer_ms: AtomicU64::new(0),
        joined: std::time::Instant::now(),
        uplink_loss_permille: AtomicU64::new(0),
        uplink_down: std::sync::atomic::AtomicBool::new(false),
        unreachable_until_ms: AtomicU64::new(0),
        stalled: std::sync::atomic::AtomicBool::new(false),
        ticket_quota: AtomicU64::new(quota),
        renewed_at_bytes: AtomicU64::new(0),
    }
}

/// Fetches spare tickets for every trusted sharer; returns when to refresh
/// next (half the shortest ticket lifetime, at least 2 s).
async fn refresh_tickets(
    url: &str,
    pool: &Pool,
    key: &SigningKey,
) -> Result<Duration, coordinator::CoordinatorError> {
    let keys: Vec<Vec<u8>> = pool
        .trusted
        .lock()
        .map(|t| t.keys().map(|k| k.0.to_vec()).collect())
        .unwrap_or_default();
    if keys.is_empty() {
        return Ok(Duration::from_secs(30));
    }
    let ch = coordinator::connect(url).await?;
    let mut client = v1::matchmaker_client::MatchmakerClient::new(ch);
    let resp = client
        .refresh_tickets({
            let signed = coordinator::signed_by(key);
            v1::TicketRefresh {
                requester_key: signed.requester_key,
                sharer_keys: keys.into_iter().take(16).collect(),
                proof: signed.proof,
                signed_at_unix: signed.signed_at_unix,
            }
        })
        .await
        .map_err(|s| coordinator::CoordinatorError::Status(s.code(), s.message().to_string()))?
        .into_inner();
    let now = unix_now();
    let mut next = Duration::from_secs(30);
    if let Ok(mut t) = pool.trusted.lock() {
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

/// While the coordinator cannot be reached: dials trusted sharers that
/// hold an unexpired spare ticket, up to `room` of them.
async fn reconnect_trusted(pool: &Arc<Pool>, key: &SigningKey, room: usize) {
    let now = unix_now();
    let picks: Vec<(DeviceKey, Trusted, Vec<u8>)> = match pool.trusted.lock() {
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
                info!(sharer = %x.name, "reconnected directly to a trusted sharer");
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
            Err(e) => warn!(sharer = %x.name, error = %e, "trusted sharer unreachable"),
        }
    }
}

impl Requester {
    /// Binds the local listeners, makes the first share request (an
    /// unreachable coordinator is an error here), dials the offers, and
    /// keeps the pool filled until `shutdown`.
    pub async fn start(
        opts: RequesterOptions,
        key: SigningKey,
        shutdown: Shutdown,
    ) -> Result<Requester, AgentError> {
        let url = coordinator::normalize_url(&opts.server)?;
        let socks = match opts.socks {
            Some(a) => Some(bind(a).await?),
            None => None,
        };
        let control = match opts.control {
            Some(a) => Some(bind(a).await?),
            None => None,
        };
        let mut forwards = vec![];
        for f in &opts.forwards {
            forwards.push((bind(f.local).await?, f.target.clone()));
        }
        // One location the requester owns: live sources feed it, and
        // `relocate` moves it by hand.
        let (location_tx, mut location) = tokio::sync::watch::channel(opts.location.clone());
        let location_tx = Arc::new(location_tx);
        {
            let mut sources =
                crate::position::start(opts.location.clone(), &opts.sources, shutdown.clone());
            let tx = location_tx.clone();
            tokio::spawn(async move {
                while sources.changed().await.is_ok() {
                    let now = sources.borrow_and_update().clone();
                    tx.send_replace(now);
                }
            });
        }
        if opts.sources.is_live() && opts.location.at.is_none() {
            // Give a live source a moment for its first fix.
            let _ = tokio::time::timeout(
                Duration::from_secs(10),
                location.wait_for(|l| l.at.is_some()),
            )
            .await;
        }
        let channel = coordinator::connect(&url).await?;
        let here = location.borrow_and_update().clone();
        let first = coordinator::share_request(channel, request(&opts, &here, &key)).await?;
        let pool = Arc::new(Pool::new(opts.strategy, opts.stall_grace));
        let size = opts.pool_size.max(1);
        connect_offers(&pool, first.offers.clone(), &key, size).await;
        let me = Requester {
            pool: pool.clone(),
            socks_addr: socks.as_ref().and_then(|l| l.local_addr().ok()),
            control_addr: control.as_ref().and_then(|l| l.local_addr().ok()),
            forward_addrs: forwards
                .iter()
                .filter_map(|(l, _)| l.local_addr().ok())
                .collect(),
            first_response: first,
            location: location_tx,
        };
        let mut tasks = vec![];
        if let Some(l) = socks {
            tasks.push(tokio::spawn(proxy::serve_proxy(l, pool.clone())));
        }
        for (l, t) in forwards {
            tasks.push(tokio::spawn(proxy::serve_forward(l, t, pool.clone())));
        }
        if let Some(l) = control {
            let app = status_router(pool.clone());
            tasks.push(tokio::spawn(async move {
                let _ = axum::serve(l, app).await;
            }));
        }
        tasks.push(tokio::spawn(maintain(
            pool.clone(),
            url,
            opts,
            location,
            here,
            key,
            size,
        )));
        tokio::spawn(async move {
            shutdown.wait().await;
            for t in &tasks {
                t.abort();
            }
            for m in pool.status().pool {
                info!(sharer = %m.sharer, flows = m.flows, "leaving pool");
            }
            pool.close_all();
        });
        Ok(me)
    }
}

/// Keeps the pool at `size`: refills after a member leaves and every 10 s,
/// with backoff while the coordinator cannot be reached.
async fn maintain(
    pool: Arc<Pool>,
    url: String,
    opts: RequesterOptions,
    mut location: tokio::sync::watch::Receiver<LocationSpec>,
    mut asked: LocationSpec,
    key: SigningKey,
    size: usize,
) {
    let mut backoff = Backoff::new(
        Duration::from_millis(500),
        bandshare_core::backoff::RECONNECT_CAP,
    );
    let mut rotate: Option<String> = None;
    let mut refresh_at = tokio::time::Instant::now();
    let mut retry_at = refresh_at;
    loop {
        // Keep a spare ticket for every trusted sharer while we can.
        let needs_ticket = pool.needs_ticket();
        // A sharer newly trusted is refreshed at once, but never more often
        // than every 2 s (the coordinator may be down).
        let now = tokio::time::Instant::now();
        if (needs_ticket && now >= retry_at) || now >= refresh_at {
            retry_at = now + Duration::from_secs(2);
            refresh_at = now
                + match refresh_tickets(&url, &pool, &key).await {
                    Ok(next) => next,
                    Err(_) => Duration::from_secs(2),
                };
        }
        let wait = if pool.serving() < size || rotate.is_some() {
            let here = location.borrow_and_update().clone();
            // Whichever path led here, asking from elsewhere rotates.
            let moved = rotate.take().or_else(|| moved_far(&asked, &here));
            let result = async {
                let ch = coordinator::connect(&url).await?;
                coordinator::share_request(ch, request(&opts, &here, &key)).await
            }
            .await;
            match result {
                Ok(resp) => {
                    backoff.reset();
                    asked = here;
                    match moved {
                        // Make before break: join the new sharers first,
                        // then drop those no longer offered here.
                        Some(why) => {
                            let offered: Vec<DeviceKey> = resp
                                .offers
                                .iter()
                                .filter_map(|o| DeviceKey::from_slice(&o.sharer_key).ok())
                                .collect();
                            info!(reason = %why, offers = offered.len(), "rotating the pool");
                            connect_offers(&pool, resp.offers, &key, size).await;
                            if !offered.is_empty() {
                                for k in pool.keys() {
                                    if !offered.contains(&k) {
                                        pool.remove(&k, "no longer offered here after moving");
                                    }
                                }
                            }
                        }
                        None => {
                            connect_offers(
                                &pool,
                                resp.offers,
                                &key,
                                size.saturating_sub(pool.serving()),
                            )
                            .await
                        }
                    }
                    if pool.serving() < size {
                        Duration::from_secs(2)
                    } else {
                        Duration::from_secs(10)
                    }
                }
                Err(e) => {
                    rotate = moved;
                    reconnect_trusted(&pool, &key, size.saturating_sub(pool.serving())).await;
                    let d = backoff.next_delay(fastrand::f64());
                    warn!(error = %e, retry_in_ms = d.as_millis() as u64, "cannot refill the pool; the pool keeps serving");
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
                }
            }
        }
        pool.reselect();
    }
}

fn status_router(pool: Arc<Pool>) -> axum::Router {
    use axum::routing::get;
    axum::Router::new().route(
        "/status",
        get(move || {
            let pool = pool.clone();
            async move { axum::Json(pool.status()) }
        }),
    )
}
