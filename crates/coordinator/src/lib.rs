//! The coordinator (`bandshare server`): gRPC services for sharers
//! (`SharerLink`), requesters (`Matchmaker`) and operators (`Health`), the
//! registry of online sharers, offers and tickets (`offer.rs`), the
//! listeners' guards (`listen.rs`), and an HTTP status endpoint.
//!
//! [`run`] takes already-bound listeners and a shutdown future, so tests
//! start it on port 0 in-process (see `bandshare-local`). It never writes
//! live positions to disk; the store holds devices, keys and the ledger.

pub mod cluster;
pub mod config;
pub mod durable;
pub mod evidence;
pub mod http;
pub mod listen;
pub mod matchmaker;
pub mod metrics;
pub mod offer;
pub mod privacy;
pub mod qos;
pub mod registry;
pub mod sharer_link;
pub mod state;
pub mod tls;
pub mod trust;

pub use config::Config;
pub use state::State;

use bandshare_proto::v1;
use std::sync::Arc;
use std::time::Instant;
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};
use tracing::info;

pub(crate) use bandshare_core::clock::unix_now;

/// How long shutdown waits for open requests before cutting streams.
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_millis(1500);

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
    #[error("QoS map: {0}")]
    Qos(String),
    #[error("scale-out: {0}")]
    Cluster(String),
}

/// 32 random bytes from the system.
pub fn random_seed(out: &mut [u8; 32]) -> Result<(), ServerError> {
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), out)
        .map_err(|_| ServerError::Rng)
}

struct HealthService {
    state: Arc<State>,
    samples: SampleBudget,
}

#[tonic::async_trait]
impl v1::health_server::Health for HealthService {
    async fn check(
        &self,
        _: Request<v1::HealthRequest>,
    ) -> Result<Response<v1::HealthResponse>, Status> {
        let c = self.state.counters();
        Ok(Response::new(v1::HealthResponse {
            status: "serving".into(),
            online_sharers: c.online_sharers as u64,
            uptime_s: c.uptime_s,
            version: env!("CARGO_PKG_VERSION").into(),
            reports_received: c.reports_received,
            share_requests: c.share_requests,
        }))
    }

    async fn sample(
        &self,
        req: Request<v1::SampleRequest>,
    ) -> Result<Response<v1::SampleResponse>, Status> {
        let asked = req.into_inner().bytes as usize;
        if asked > MAX_SAMPLE_BYTES {
            return Err(Status::invalid_argument(format!(
                "a sample is at most {MAX_SAMPLE_BYTES} bytes, not {asked}"
            )));
        }
        if !self.samples.take(asked as u64, Instant::now()) {
            return Err(Status::resource_exhausted(
                "samples are sent at most 16 MiB a second in all; retry in a second",
            ));
        }
        Ok(Response::new(v1::SampleResponse {
            filler: vec![0u8; asked],
        }))
    }
}

/// The largest [`v1::SampleRequest`] answered.
pub const MAX_SAMPLE_BYTES: usize = 64 * 1024;
/// What all samples together may send a second: they cost the coordinator
/// bandwidth and nothing else, so one budget bounds them.
const SAMPLE_BYTES_PER_S: u64 = 16 << 20;

/// Bytes granted in the current second.
#[derive(Default)]
struct SampleBudget(std::sync::Mutex<(Option<Instant>, u64)>);

impl SampleBudget {
    fn take(&self, bytes: u64, now: Instant) -> bool {
        let Ok(mut g) = self.0.lock() else {
            return false;
        };
        let (since, used) = &mut *g;
        if since
            .is_none_or(|s| now.saturating_duration_since(s) >= std::time::Duration::from_secs(1))
        {
            *since = Some(now);
            *used = 0;
        }
        if *used + bytes > SAMPLE_BYTES_PER_S {
            return false;
        }
        *used += bytes;
        true
    }
}

/// Takes sharers offline that have been silent longer than
/// `expire_after`, checking four times as often, until `stop` fires.
async fn expire_silent(state: Arc<State>, mut rx: tokio::sync::watch::Receiver<bool>) {
    let every = (state.config().expire_after / 4).max(std::time::Duration::from_millis(50));
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = rx.changed() => break,
        }
        for name in state
            .registry()
            .expire(Instant::now(), state.config().expire_after)
        {
            info!(sharer = %name, "sharer expired: silent too long");
        }
    }
}

/// Serves gRPC on `grpc` (and HTTP status on `http`, if given) until
/// `shutdown` resolves; then stops accepting and ends every sharer stream.
pub async fn run(
    state: Arc<State>,
    grpc: TcpListener,
    http: Option<TcpListener>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    run_with(state, grpc, http, None, shutdown).await
}

/// [`run`], serving gRPC over TLS when `tls` is given.
pub async fn run_with(
    state: Arc<State>,
    grpc: TcpListener,
    http: Option<TcpListener>,
    tls: Option<tls::Tls>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    if let Some(t) = &tls {
        state.set_tls_pin(t.pin_hex());
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let sweeper = tokio::spawn(expire_silent(state.clone(), stop_rx.clone()));
    // Operators' decisions and key rotations, read from the store.
    let trust_task = tokio::spawn(trust::watch(state.clone(), stop_rx.clone()));
    let qos_saver = tokio::spawn(qos::saver(state.clone(), stop_rx.clone()));
    let device_writer = tokio::spawn(durable::device_writer(state.clone(), stop_rx.clone()));
    if let Some(c) = state.cluster() {
        c.start(state.clone(), stop_rx.clone());
    }
    let cap = state.config().max_connections_per_source;
    let http_task = match http {
        Some(l) => {
            let app = http::router(state.clone());
            let stop = stopped(stop_rx.clone());
            let incoming = listen::guarded(l, "http", cap, state.sources(state::Listener::Http));
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
        .max_concurrent_streams(state.config().max_streams_per_connection)
        // Beyond this many requests on one connection, refuse with
        // RESOURCE_EXHAUSTED instead of buffering.
        .concurrency_limit_per_connection(state.config().max_streams_per_connection as usize)
        .load_shed(true)
        // h2 guards against rapid reset (CVE-2023-44487) and similar
        // abuse by closing a connection once its peer has reset more than
        // 20 streams still waiting to be accepted, caused more than 1,024
        // streams to be refused, or has more small DATA frames unread than
        // half the connection window allows (about 2,600 in 1 MiB). A
        // connection that carries many sharers' streams does all three in
        // a restart storm (a hello or a report on each stream, unread while
        // the sharers ahead join), and closing it loses every stream on
        // it: `bench scale --restart` then never recovered. Allow one of
        // each per permitted stream instead (512 bytes of window each, at
        // least the usual 1 MiB, at most 32 MiB); the per-connection
        // concurrency limit still bounds the work.
        .initial_connection_window_size(Some(
            (state
                .config()
                .max_streams_per_connection
                .saturating_mul(512))
            .clamp(1 << 20, 32 << 20),
        ))
        .http2_max_pending_accept_reset_streams(Some(
            state.config().max_streams_per_connection as usize,
        ))
        .http2_max_local_error_reset_streams(Some(
            state.config().max_streams_per_connection as usize,
        ))
        .add_service(v1::sharer_link_server::SharerLinkServer::new(
            sharer_link::SharerLinkService {
                state: state.clone(),
            },
        ))
        .add_service(v1::matchmaker_server::MatchmakerServer::new(
            matchmaker::MatchmakerService {
                state: state.clone(),
            },
        ))
        .add_service(v1::qos_server::QosServer::new(qos::QosService {
            state: state.clone(),
        }))
        .add_service(v1::health_server::HealthServer::new(HealthService {
            state: state.clone(),
            samples: SampleBudget::default(),
        }));
    type Serving = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<(), tonic::transport::Error>> + Send>,
    >;
    let stop = stopped(stop_rx.clone());
    let incoming = listen::guarded(grpc, "grpc", cap, state.sources(state::Listener::Grpc));
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
            info!(online = state.registry().local_len(), "grace period over, closing sharer streams");
            Ok(())
        }
    };
    // Each stream is ended with the reason, so a sharer reconnects at once
    // (to another coordinator of the service, if it has more than one)
    // even where the connection outlives this function (in-process).
    for (_, tx) in state.registry().outbound() {
        let _ = tx.try_send(Err(Status::unavailable(
            "coordinator shutting down; reconnect",
        )));
    }
    sweeper.abort();
    trust_task.abort();
    // The map's last changes reach the store before `run` returns.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), qos_saver).await;
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), device_writer).await;
    if let Some(h) = http_task {
        h.abort();
    }
    info!("coordinator stopped");
    Ok(result?)
}
