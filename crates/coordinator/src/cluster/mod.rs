//! Scale-out (`server --redis URL,...`): every coordinator started with the
//! same Redis Cluster is one service.
//!
//! - **Presence** ([`presence`]): the coordinator holding a sharer's stream
//!   writes it (a [`v1::Presence`]) into a geographic shard — a hash, an
//!   expiry set and a change feed (a Redis Stream) under one hash tag per
//!   H3 cell — on connect, on every state report and at least every third
//!   of the expiry. Every coordinator reads every shard's feed into its own
//!   in-memory index, so matching stays as fast as on one coordinator.
//! - **Routing** ([`route`]): an access request for a sharer whose stream is
//!   elsewhere is pushed onto the owner's inbox list, with a route id and
//!   the same deadline; the answer comes back on the asker's inbox.
//! - **QoS** ([`qos`]): accepted samples go on a feed every coordinator
//!   applies; the aggregates are saved in Redis.
//! - **Keys**: the ticket-signing seeds live in Redis, so a ticket any
//!   coordinator signs verifies at every sharer (and the privacy offsets,
//!   derived from the first seed, are the same everywhere).
//!
//! Key names (hash tags keep each group in one slot):
//! `bs:{p:CELL}:presence|expiry|feed`, `bs:shards`, `bs:{c:ID}:inbox`,
//! `bs:{keys}:seeds`.

pub mod durable;
pub mod presence;
pub mod qos;
pub mod route;

use crate::State;
use bandshare_core::DeviceKey;
use bandshare_proto::v1;
use bandshare_store::{Secret, SigningSeed};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

/// Presence writes queued at most; beyond, a write is dropped and counted
/// (the next report or refresh writes the sharer again).
const WRITE_QUEUE: usize = 65_536;
/// Writes sent together at most (pipelined on each node's connection).
const WRITE_BATCH: usize = 256;
/// A batch of writes (or one routed message) not done in this long has
/// failed, whatever the client still waits for.
pub(crate) const BATCH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot reach Redis at {0}: {1}")]
    Unreachable(String, String),
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("Redis holds a ticket-signing seed that is not 32 bytes (id {0})")]
    CorruptSeed(String),
    #[error(
        "Redis did not confirm the write on {0} replica(s) within 1 s (not acknowledged; it is sent again)"
    )]
    NotReplicated(u32),
}

/// What the writer task does, in order.
pub(crate) enum Write {
    Up {
        presence: Box<v1::Presence>,
        shard: String,
    },
    Down {
        key: DeviceKey,
        seq: u64,
    },
}

/// One coordinator's side of the service.
pub struct Cluster {
    id: Arc<str>,
    urls: Vec<String>,
    /// For the blocking readers (each opens its own connections).
    blocking: ClusterClient,
    /// Multiplexed: every non-blocking command.
    conn: ClusterConnection,
    writes: mpsc::Sender<Write>,
    writes_rx: Mutex<Option<mpsc::Receiver<Write>>>,
    /// QoS samples accepted here, for the samples feed.
    samples_tx: mpsc::Sender<crate::qos::Accepted>,
    samples_rx: Mutex<Option<mpsc::Receiver<crate::qos::Accepted>>>,
    /// The samples feed id the QoS map includes.
    qos_applied: Mutex<String>,
    /// The shard each local sharer was last written to, and when.
    written: Mutex<HashMap<DeviceKey, (String, Instant, u64)>>,
    /// Access requests routed out, awaiting their answer.
    routes: Mutex<HashMap<u64, oneshot::Sender<v1::AccessResponse>>>,
    next_route: AtomicU64,
    /// The last Redis command failed (cleared by the next success).
    down: AtomicBool,
    dropped_writes: AtomicU64,
    /// Presence entries written to Redis / applied from other coordinators.
    pub(crate) written_total: AtomicU64,
    pub(crate) applied: AtomicU64,
    shard_res: h3o::Resolution,
}

impl Cluster {
    /// Connects to the cluster through any of `urls`, or says which it
    /// could not reach and why.
    pub async fn connect(urls: &[String]) -> Result<Arc<Cluster>, ClusterError> {
        let unreachable =
            |e: redis::RedisError| ClusterError::Unreachable(urls.join(","), e.to_string());
        let builder = |timeout: Duration| {
            ClusterClientBuilder::new(urls.to_vec())
                .connection_timeout(Duration::from_secs(1))
                .response_timeout(timeout)
                .retries(2)
                .min_retry_wait(50)
                .max_retry_wait(500)
        };
        let client = builder(Duration::from_secs(1))
            .build()
            .map_err(unreachable)?;
        let blocking = builder(Duration::from_secs(4))
            .build()
            .map_err(unreachable)?;
        let mut conn = client.get_async_connection().await.map_err(unreachable)?;
        let _: String = redis::cmd("PING")
            .query_async(&mut conn)
            .await
            .map_err(unreachable)?;
        let mut id = [0u8; 8];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id)
            .map_err(|_| ClusterError::Unreachable(urls.join(","), "no randomness".into()))?;
        let (writes, writes_rx) = mpsc::channel(WRITE_QUEUE);
        let (samples_tx, samples_rx) = mpsc::channel(WRITE_QUEUE);
        info!(redis = %urls.join(","), "scale-out: connected to the Redis Cluster");
        Ok(Arc::new(Cluster {
            id: hex(&id).into(),
            urls: urls.to_vec(),
            blocking,
            conn,
            writes,
            writes_rx: Mutex::new(Some(writes_rx)),
            samples_tx,
            samples_rx: Mutex::new(Some(samples_rx)),
            qos_applied: Mutex::new(String::new()),
            written: Mutex::new(HashMap::new()),
            routes: Mutex::new(HashMap::new()),
            next_route: AtomicU64::new(1),
            down: AtomicBool::new(false),
            dropped_writes: AtomicU64::new(0),
            written_total: AtomicU64::new(0),
            applied: AtomicU64::new(0),
            shard_res: h3o::Resolution::Two,
        }))
    }

    /// This coordinator's id in the service (random per start).
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    /// Whether the last Redis command failed.
    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::Relaxed)
    }

    /// Presence entries written to Redis since start.
    pub fn presence_written(&self) -> u64 {
        self.written_total.load(Ordering::Relaxed)
    }

    /// Presence entries of other coordinators applied to the index.
    pub fn presence_applied(&self) -> u64 {
        self.applied.load(Ordering::Relaxed)
    }

    /// Presence writes dropped because the queue was full.
    pub fn dropped_writes(&self) -> u64 {
        self.dropped_writes.load(Ordering::Relaxed)
    }

    pub(crate) fn conn(&self) -> ClusterConnection {
        self.conn.clone()
    }

    /// Notes the outcome of a Redis command (logged once per change).
    pub(crate) fn outcome<T>(&self, what: &str, r: &redis::RedisResult<T>) {
        match r {
            Ok(_) => {
                if self.down.swap(false, Ordering::Relaxed) {
                    info!("Redis reachable again");
                }
            }
            Err(e) => {
                if !self.down.swap(true, Ordering::Relaxed) {
                    warn!(error = %e, during = what, "Redis unreachable; serving from memory meanwhile");
                }
            }
        }
    }

    /// The ticket-signing seeds every coordinator of the service signs
    /// with: made once (by whichever coordinator starts first), then read.
    pub async fn signing_seeds(
        &self,
        fresh: impl FnOnce() -> [u8; 32],
    ) -> Result<Vec<SigningSeed>, ClusterError> {
        let mut c = self.conn();
        let seed = fresh();
        let _: i64 = redis::cmd("HSETNX")
            .arg(SEEDS)
            .arg(1)
            .arg(&seed[..])
            .query_async(&mut c)
            .await?;
        self.read_seeds().await
    }

    /// The ticket-signing seeds in Redis, oldest first.
    pub async fn read_seeds(&self) -> Result<Vec<SigningSeed>, ClusterError> {
        let all: HashMap<String, Vec<u8>> = redis::cmd("HGETALL")
            .arg(SEEDS)
            .query_async(&mut self.conn())
            .await?;
        let mut out = vec![];
        for (id, seed) in all {
            let n: u8 = id
                .parse()
                .map_err(|_| ClusterError::CorruptSeed(id.clone()))?;
            let s: [u8; 32] = seed
                .as_slice()
                .try_into()
                .map_err(|_| ClusterError::CorruptSeed(id.clone()))?;
            out.push((n, Secret(s)));
        }
        out.sort_by_key(|(id, _)| *id);
        Ok(out)
    }

    /// Starts the tasks: presence writer, shard feeds, janitor, inbox.
    pub fn start(self: &Arc<Self>, state: Arc<State>, stop: tokio::sync::watch::Receiver<bool>) {
        if let Some(rx) = self.writes_rx.lock().ok().and_then(|mut r| r.take()) {
            tokio::spawn(presence::writer(self.clone(), rx, stop.clone()));
        }
        tokio::spawn(presence::follow_shards(
            self.clone(),
            state.clone(),
            stop.clone(),
        ));
        tokio::spawn(presence::janitor(self.clone(), stop.clone()));
        if let Some(rx) = self.samples_rx.lock().ok().and_then(|mut r| r.take()) {
            tokio::spawn(qos::writer(self.clone(), rx, stop.clone()));
        }
        tokio::spawn(qos::follow(self.clone(), state.clone(), stop.clone()));
        tokio::spawn(route::inbox(self.clone(), state, stop));
    }

    pub(crate) fn queue(&self, w: Write) {
        if self.writes.try_send(w).is_err() {
            self.dropped_writes.fetch_add(1, Ordering::Relaxed);
        }
    }
}

const SEEDS: &str = "bs:{keys}:seeds";

/// Waits `backoff` after a Redis error and doubles it (at most 2 s);
/// false when `stop` fired meanwhile.
pub(crate) async fn pause(
    backoff: &mut Duration,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(*backoff) => {}
        _ = stop.wait_for(|s| *s) => return false,
    }
    *backoff = (*backoff * 2).min(Duration::from_secs(2));
    true
}

pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The owner's write clock: unix nanoseconds, never going back within one
/// process.
pub(crate) fn next_seq() -> u64 {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut last = LAST.load(Ordering::Relaxed);
    loop {
        let next = now.max(last + 1);
        match LAST.compare_exchange(last, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return next,
            Err(l) => last = l,
        }
    }
}

pub(crate) fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
