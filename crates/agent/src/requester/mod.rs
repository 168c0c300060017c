//! `bandshare connect`: asks the coordinator for offers, keeps a pool of
//! tunnels to several sharers, and serves local applications through SOCKS5,
//! HTTP CONNECT, fixed port forwards and a `GET /status` endpoint. Failover
//! is decided in `failover.rs`, carried out by `pool.rs`; refilling the
//! pool is `refill.rs`.

pub mod direct;
pub mod failover;
pub mod forecast;
mod member;
pub mod metrics;
pub mod own_link;
pub mod pool;
pub mod proxy;
mod refill;
pub mod routes;
pub mod select;
pub mod socks;
pub mod stalls;
#[cfg(all(feature = "tun", target_os = "linux"))]
pub mod tun;
pub mod udp;

use crate::location::{ConditionSpec, LocationSpec};
use crate::{AgentError, Shutdown, client};
use bandshare_proto::v1;
use bandshare_relay::FlowHeader;
use direct::Direct;
use ed25519_dalek::SigningKey;
use pool::Pool;
pub use refill::{MOVE_THRESHOLD_M, moved_far};
use refill::{Size, connect_offers, maintain, request};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tracing::info;

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
    pub server: crate::client::ServerUrl,
    pub location: LocationSpec,
    pub sources: crate::location::Sources,
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
    /// Where new flows may go: the own link first (auto), only it, or only
    /// the pool.
    pub via: own_link::Via,
    /// Members kept warm while new flows go direct.
    pub standby: usize,
    /// Connections each member opens to its sharer besides the first
    /// ([`pool::LANES`] by default; 0 for one connection).
    pub lanes: usize,
    /// `HOST:PORT`s probed out of the own link (`gateway`: the own link's
    /// default gateway), besides the coordinator when it is reached over
    /// the own link.
    pub probes: Vec<String>,
    /// When the own link counts as degraded, and the hold before returning.
    pub own_link: own_link::Thresholds,
    /// Pre-connect on the QoS map's predictions along the track (and
    /// report the own link); `None`: never ask.
    pub predict: Option<forecast::Options>,
}

/// A running requester; listeners are bound and the pool is filling.
pub struct Requester {
    pub pool: Arc<Pool>,
    /// The own link and the flows it carries.
    pub direct: Arc<Direct>,
    pub socks_addr: Option<SocketAddr>,
    pub control_addr: Option<SocketAddr>,
    pub forward_addrs: Vec<SocketAddr>,
    /// The coordinator's answer to the first share request.
    pub first_response: v1::ShareResponse,
    /// The prediction acted on (pre-connect).
    pub forecasts: Arc<forecast::Forecasts>,
    location: Arc<tokio::sync::watch::Sender<LocationSpec>>,
}

impl Requester {
    /// Moves the requester by hand (live sources move it too): a move of
    /// more than [`MOVE_THRESHOLD_M`] or a new scene rotates the pool.
    pub fn relocate(&self, to: LocationSpec) {
        self.location.send_replace(to);
    }
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, AgentError> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| AgentError::Listen(addr, e))
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
        let url = opts.server.clone();
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
                crate::location::start(opts.location.clone(), &opts.sources, shutdown.clone());
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
        let pool = Arc::new(Pool::new(opts.strategy, opts.stall_grace, opts.lanes));
        let direct = Arc::new(Direct::new(opts.via, opts.own_link));
        let sizes = Size {
            pool: opts.pool_size.max(1),
            standby: opts.standby,
            direct: direct.clone(),
        };
        let here = location.borrow_and_update().clone();
        // Only the own link: the coordinator is never needed.
        let first = if opts.via == own_link::Via::Direct {
            v1::ShareResponse::default()
        } else {
            let channel = client::connect(&url).await?;
            let first = client::share_request(channel, request(&opts, &here, &key)).await?;
            connect_offers(&pool, first.offers.clone(), &key, sizes.now()).await;
            first
        };
        let paths = proxy::Paths {
            pool: pool.clone(),
            direct: direct.clone(),
        };
        let forecasts = Arc::new(forecast::Forecasts::default());
        let me = Requester {
            pool: pool.clone(),
            direct: direct.clone(),
            socks_addr: socks.as_ref().and_then(|l| l.local_addr().ok()),
            control_addr: control.as_ref().and_then(|l| l.local_addr().ok()),
            forward_addrs: forwards
                .iter()
                .filter_map(|(l, _)| l.local_addr().ok())
                .collect(),
            first_response: first,
            forecasts: forecasts.clone(),
            location: location_tx,
        };
        let mut tasks = vec![];
        if let Some(l) = socks {
            tasks.push(tokio::spawn(proxy::serve_proxy(l, paths.clone())));
        }
        for (l, t) in forwards {
            tasks.push(tokio::spawn(proxy::serve_forward(l, t, paths.clone())));
        }
        // Every path asks and reports; only `auto` acts on the answers.
        let predicting = opts.predict;
        if let Some(l) = control {
            let shown = predicting.map(|_| forecasts.clone());
            let app = status_router(paths.clone(), shown);
            tasks.push(tokio::spawn(async move {
                let _ = axum::serve(l, app).await;
            }));
        }
        tasks.push(tokio::spawn(direct.clone().stall_loop(pool.clone())));
        tasks.push(tokio::spawn(
            direct.clone().trial_loop(url.clone(), pool.clone()),
        ));
        tasks.push(tokio::spawn(direct.clone().probe_loop(
            opts.probes.clone(),
            url.host_port().to_string(),
            pool.clone(),
        )));
        if let Some(p) = predicting {
            let f = forecast::Forecaster {
                direct: direct.clone(),
                pool: pool.clone(),
                url: url.clone(),
                key: key.clone(),
                location: location.clone(),
                live: opts.sources.is_live(),
                opts: p,
                shown: forecasts,
            };
            tasks.push(tokio::spawn(f.run()));
        }
        if opts.via != own_link::Via::Direct {
            tasks.push(tokio::spawn(maintain(
                pool.clone(),
                url,
                opts,
                location,
                here,
                key,
                sizes,
            )));
        }
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

/// What `GET /status` shows: the path new flows take, the own link, and
/// the pool.
#[derive(serde::Serialize)]
struct Status {
    path: &'static str,
    own_link: direct::OwnLinkStatus,
    udp: udp::UdpStatus,
    /// The prediction acted on, when pre-connect is on.
    forecast: Option<forecast::ForecastStatus>,
    /// The last changes of the active member, with their cause.
    failovers: Vec<metrics::Failover>,
    #[serde(flatten)]
    pool: pool::Status,
}

fn status_router(paths: proxy::Paths, forecasts: Option<Arc<forecast::Forecasts>>) -> axum::Router {
    use axum::routing::get;
    let (mpaths, mforecasts) = (paths.clone(), forecasts.clone());
    let page = |body: &'static str, ctype: &'static str| {
        get(move || async move { ([(axum::http::header::CONTENT_TYPE, ctype)], body) })
    };
    axum::Router::new()
        .route(
            "/",
            page(include_str!("web/index.html"), "text/html; charset=utf-8"),
        )
        .route(
            "/app.js",
            page(include_str!("web/app.js"), "text/javascript; charset=utf-8"),
        )
        .route(
            "/metrics",
            get(move || {
                let text = metrics::render(&metrics::View {
                    path: mpaths.direct.path().as_str(),
                    own: &mpaths.direct.status(),
                    pool: &mpaths.pool.status(),
                    udp: &mpaths.pool.udp.status(),
                    forecast: mforecasts.as_ref().map(|f| f.status()).as_ref(),
                    counters: &mpaths.pool.counters,
                });
                async move {
                    (
                        [(axum::http::header::CONTENT_TYPE, crate::prom::CONTENT_TYPE)],
                        text,
                    )
                }
            }),
        )
        .route(
            "/status",
            get(move || {
                let paths = paths.clone();
                let forecast = forecasts.as_ref().map(|f| f.status());
                async move {
                    axum::Json(Status {
                        path: paths.direct.path().as_str(),
                        own_link: paths.direct.status(),
                        udp: paths.pool.udp.status(),
                        forecast,
                        failovers: paths.pool.counters.recent_failovers(),
                        pool: paths.pool.status(),
                    })
                }
            }),
        )
}
