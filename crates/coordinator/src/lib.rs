//! The coordinator (`bandshare server`): gRPC services for sharers
//! (`SharerLink`), requesters (`Matchmaker`) and operators (`Health`), the
//! registry of online sharers, offers and tickets (`offer.rs`), the
//! listeners' guards (`listen.rs`), and an HTTP status endpoint.
//!
//! [`run`] takes already-bound listeners and a shutdown future, so tests
//! start it on port 0 in-process (see `bandshare-local`). It never writes
//! live positions to disk; the store holds devices, keys and the ledger.

pub mod config;
pub mod evidence;
pub mod http;
pub mod listen;
pub mod matchmaker;
pub mod offer;
pub mod privacy;
pub mod registry;
pub mod sharer_link;
pub mod tls;
pub mod trust;

pub use config::Config;

use bandshare_core::{DeviceKey, TicketSigner};
use bandshare_proto::v1;
use bandshare_store::Store;
use registry::Registry;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};
use tracing::info;

pub(crate) use bandshare_core::clock::unix_now;

/// How long shutdown waits for open requests before cutting streams.
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_millis(1500);

/// State every service shares: configuration, the registry, the store and
/// the ticket signer.
pub struct Shared {
    pub config: Config,
    pub registry: Registry,
    pub store: Store,
    /// Ticket-signing keys (see [`trust`]).
    pub keys: std::sync::RwLock<trust::Keys>,
    /// Enrollment decisions (see [`trust`]).
    pub trust: std::sync::RwLock<trust::Trust>,
    pub started: Instant,
    /// State reports processed since start.
    pub reports_received: std::sync::atomic::AtomicU64,
    /// Share requests answered since start.
    pub share_requests: std::sync::atomic::AtomicU64,
    known_requesters: Mutex<HashSet<DeviceKey>>,
    /// Rate limits, plausibility and measuring offsets per requester.
    pub privacy: Mutex<privacy::Guard>,
    /// Sharers offered to each requester: the only ones whose tickets it
    /// may refresh.
    pub offered: Mutex<std::collections::HashMap<DeviceKey, HashSet<DeviceKey>>>,
    /// Permits for requests in flight (`server.max_inflight_requests`).
    inflight: tokio::sync::Semaphore,
    /// Requests refused because every permit was taken.
    pub shed: std::sync::atomic::AtomicU64,
    /// SHA-256 of the gRPC TLS certificate, hex, when serving TLS.
    pub tls_pin: std::sync::OnceLock<String>,
    /// Connections per source address on each listener (see [`listen`]).
    pub grpc_sources: Arc<listen::Sources>,
    pub http_sources: Arc<listen::Sources>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("store: {0}")]
    Store(#[from] bandshare_store::StoreError),
    #[error("grpc server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("http server: {0}")]
    Http(std::io::Error),
    #[error("cannot generate a signing key")]
    Rng,
}

impl Shared {
    pub fn new(config: Config, store: Store) -> Result<Arc<Shared>, ServerError> {
        let mut fresh_err = false;
        let seeds = store.signing_seeds(unix_now(), || {
            let mut s = [0u8; 32];
            fresh_err = random_seed(&mut s).is_err();
            s
        })?;
        if fresh_err {
            return Err(ServerError::Rng);
        }
        let (Some((_, first)), Some((key_id, seed))) = (seeds.first(), seeds.last()) else {
            return Err(ServerError::Rng);
        };
        // The offsets' secret comes from the first signing seed, domain-
        // separated, so it survives restarts and key rotations without
        // another stored secret.
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(b"bandshare privacy offsets v1\0");
        ctx.update(&first.0);
        let privacy_secret = ctx.finish();
        // After a restart, the key before the newest still verifies for one
        // ticket lifetime: tickets it signed may still be in use.
        let previous = (seeds.len() >= 2).then(|| {
            let (id, s) = &seeds[seeds.len() - 2];
            (
                TicketSigner::from_seed(&s.0, *id).public_key(),
                Instant::now() + config.ticket_lifetime,
            )
        });
        let (approved, revoked) = store.decisions()?;
        Ok(Arc::new(Shared {
            privacy: Mutex::new(privacy::Guard::new(
                config.privacy.clone(),
                privacy_secret.as_ref(),
            )),
            keys: std::sync::RwLock::new(trust::Keys {
                signer: Arc::new(TicketSigner::from_seed(&seed.0, *key_id)),
                previous,
                next: None,
            }),
            trust: std::sync::RwLock::new(trust::Trust {
                approved: approved.into_iter().collect(),
                revoked: revoked.into_iter().collect(),
            }),
            registry: Registry::default(),
            store,
            started: Instant::now(),
            reports_received: Default::default(),
            share_requests: Default::default(),
            known_requesters: Mutex::default(),
            offered: Mutex::default(),
            inflight: tokio::sync::Semaphore::new(config_permits(&config)),
            shed: Default::default(),
            tls_pin: Default::default(),
            grpc_sources: Default::default(),
            http_sources: Default::default(),
            config,
        }))
    }

    /// A permit to handle one request, or RESOURCE_EXHAUSTED at once when
    /// `server.max_inflight_requests` are already in flight: load is shed,
    /// never queued without bound.
    pub fn admit_request(&self) -> Result<tokio::sync::SemaphorePermit<'_>, tonic::Status> {
        self.inflight.try_acquire().map_err(|_| {
            self.shed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tonic::Status::resource_exhausted(format!(
                "coordinator overloaded: {} requests in flight; retry with backoff",
                self.config.max_inflight_requests
            ))
        })
    }
}

/// 32 random bytes from the system.
pub fn random_seed(out: &mut [u8; 32]) -> Result<(), ServerError> {
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), out)
        .map_err(|_| ServerError::Rng)
}

fn config_permits(c: &Config) -> usize {
    c.max_inflight_requests as usize
}

struct HealthService {
    shared: Arc<Shared>,
}

#[tonic::async_trait]
impl v1::health_server::Health for HealthService {
    async fn check(
        &self,
        _: Request<v1::HealthRequest>,
    ) -> Result<Response<v1::HealthResponse>, Status> {
        Ok(Response::new(v1::HealthResponse {
            status: "serving".into(),
            online_sharers: self.shared.registry.len() as u64,
            uptime_s: self.shared.started.elapsed().as_secs(),
            version: env!("CARGO_PKG_VERSION").into(),
            reports_received: self
                .shared
                .reports_received
                .load(std::sync::atomic::Ordering::Relaxed),
            share_requests: self
                .shared
                .share_requests
                .load(std::sync::atomic::Ordering::Relaxed),
        }))
    }
}

/// Serves gRPC on `grpc` (and HTTP status on `http`, if given) until
/// `shutdown` resolves; then stops accepting and ends every sharer stream.
pub async fn run(
    shared: Arc<Shared>,
    grpc: TcpListener,
    http: Option<TcpListener>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    run_with(shared, grpc, http, None, shutdown).await
}

/// [`run`], serving gRPC over TLS when `tls` is given.
pub async fn run_with(
    shared: Arc<Shared>,
    grpc: TcpListener,
    http: Option<TcpListener>,
    tls: Option<tls::Tls>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    if let Some(t) = &tls {
        let _ = shared.tls_pin.set(t.pin_hex());
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    // Expire silent sharers.
    let sweeper = {
        let shared = shared.clone();
        let mut rx = stop_rx.clone();
        tokio::spawn(async move {
            let every = (shared.config.expire_after / 4).max(std::time::Duration::from_millis(50));
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = rx.changed() => break,
                }
                for name in shared
                    .registry
                    .expire(Instant::now(), shared.config.expire_after)
                {
                    info!(sharer = %name, "sharer expired: silent too long");
                }
            }
        })
    };
    // Operators' decisions and key rotations, read from the store.
    let trust_task = tokio::spawn(trust::watch(shared.clone(), stop_rx.clone()));
    let cap = shared.config.max_connections_per_source;
    let http_task = match http {
        Some(l) => {
            let app = http::router(shared.clone());
            let stop = stopped(stop_rx.clone());
            let incoming = listen::guarded(l, "http", cap, shared.http_sources.clone());
            Some(tokio::spawn(listen::serve_http(incoming, app, stop)))
        }
        None => None,
    };
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    info!(addr = ?grpc.local_addr().ok(), "coordinator listening");
    let router = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)))
        .max_concurrent_streams(shared.config.max_streams_per_connection)
        // Beyond this many requests on one connection, refuse with
        // RESOURCE_EXHAUSTED instead of buffering.
        .concurrency_limit_per_connection(shared.config.max_streams_per_connection as usize)
        .load_shed(true)
        .add_service(v1::sharer_link_server::SharerLinkServer::new(
            sharer_link::SharerLinkService {
                shared: shared.clone(),
            },
        ))
        .add_service(v1::matchmaker_server::MatchmakerServer::new(
            matchmaker::MatchmakerService {
                shared: shared.clone(),
            },
        ))
        .add_service(v1::health_server::HealthServer::new(HealthService {
            shared: shared.clone(),
        }));
    type Serving = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<(), tonic::transport::Error>> + Send>,
    >;
    let stop = stopped(stop_rx.clone());
    let incoming = listen::guarded(grpc, "grpc", cap, shared.grpc_sources.clone());
    let server: Serving = match tls {
        Some(t) => Box::pin(router.serve_with_incoming_shutdown(tls::incoming(incoming, t), stop)),
        None => Box::pin(router.serve_with_incoming_shutdown(incoming, stop)),
    };
    // Sharer streams never end on their own: after the signal, in-flight
    // share requests get a short grace period, then every stream is cut
    // (sharers reconnect with backoff to whoever serves next).
    let grace = async {
        stopped(stop_rx).await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    let result = tokio::select! {
        r = server => r,
        _ = grace => {
            info!(online = shared.registry.len(), "grace period over, closing sharer streams");
            Ok(())
        }
    };
    sweeper.abort();
    trust_task.abort();
    if let Some(h) = http_task {
        h.abort();
    }
    info!("coordinator stopped");
    Ok(result?)
}
