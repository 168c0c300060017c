//! [`State`]: what every service of one coordinator shares — its
//! configuration, the registry of online sharers, the store, the ticket
//! keys and enrollment decisions, the privacy guard and the counters
//! `/status` shows. Fields are private; services go through the methods
//! below, so each rule (admission, who may refresh which ticket, who is
//! trusted) is written once.

use crate::config::{Config, Enroll};
use crate::registry::Registry;
use crate::trust::{Keys, Seed, Trust};
use crate::{ServerError, listen, privacy};
use bandshare_core::{DeviceKey, TicketSigner};
use bandshare_proto::v1::{self, coordinator_message::Msg as Down};
use bandshare_store::Store;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Instant;
use tonic::Status;
use tracing::info;

/// Requesters whose offered sharers are remembered at most (then all are
/// forgotten at once), and sharers remembered per requester.
const OFFERED_REQUESTERS: usize = 100_000;
const OFFERED_PER_REQUESTER: usize = 64;

/// Keys whose last proof is remembered (then all are forgotten).
const PROOF_CACHE_KEYS: usize = 100_000;

pub struct State {
    config: Config,
    registry: Registry,
    store: Store,
    /// Ticket-signing keys (see [`crate::trust`]).
    keys: RwLock<Keys>,
    /// Enrollment decisions (see [`crate::trust`]).
    trust: RwLock<Trust>,
    started: Instant,
    /// State reports processed since start.
    reports_received: AtomicU64,
    /// Share requests answered since start.
    share_requests: AtomicU64,
    /// Requesters seen since start (recorded in the store once each).
    known_requesters: Mutex<HashSet<DeviceKey>>,
    /// Request proofs that verified, one per key (a client reuses its
    /// proof for a minute).
    proofs: Mutex<bandshare_core::ticket::ProofCache>,
    /// Rate limits and plausibility per requester.
    privacy: Mutex<privacy::Guard>,
    /// The secret offsets sharers are shown at.
    offsets: privacy::Offsets,
    /// The QoS map and what checking observations needs.
    qos: Mutex<crate::qos::Book>,
    /// Keys the map's device numbers (never a device key in the map).
    qos_secret: [u8; 32],
    /// Sharers offered to each requester: the only ones whose tickets it
    /// may refresh.
    offered: Mutex<HashMap<DeviceKey, HashSet<DeviceKey>>>,
    /// Permits for requests in flight (`server.max_inflight_requests`).
    inflight: tokio::sync::Semaphore,
    /// Requests refused because every permit was taken.
    shed: AtomicU64,
    /// Permits for sharers being admitted (`server.max_joining`), those
    /// waiting for one, and those refused because the queue was full.
    joining: tokio::sync::Semaphore,
    joins_waiting: AtomicU64,
    joins_shed: AtomicU64,
    /// SHA-256 of the gRPC TLS certificate, hex, when serving TLS.
    tls_pin: OnceLock<String>,
    /// Connections per source address on each listener (see [`listen`]).
    grpc_sources: Arc<listen::Sources>,
    http_sources: Arc<listen::Sources>,
    /// What `/metrics` counts as it happens.
    metrics: crate::metrics::Metrics,
    /// The rest of the service, when scaled out (`server --redis`).
    cluster: Option<Arc<crate::cluster::Cluster>>,
    /// Sharers seen, waiting to be recorded together.
    seen: crate::durable::Seen,
    /// Names known to be bound to a device (case-folded): a reconnecting
    /// sharer's name is checked here, not in the store. Loaded at start
    /// (SQLite), filled as names bind, cleared when a device is revoked.
    names: Mutex<HashMap<String, DeviceKey>>,
}

/// What `/status` and `Health.Check` report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Counters {
    pub online_sharers: usize,
    pub uptime_s: u64,
    pub reports_received: u64,
    pub share_requests: u64,
    pub requests_shed: u64,
    /// Sharers refused because too many were waiting to join.
    pub joins_shed: u64,
    /// Sharers waiting their turn to join now.
    pub joins_waiting: u64,
    pub connections_refused: u64,
    pub connections_silent: u64,
}

/// The listener a connection arrived on.
#[derive(Debug, Clone, Copy)]
pub enum Listener {
    Grpc,
    Http,
}

impl State {
    /// Opens the coordinator's state over `store`: its signing keys (made on
    /// first start), the privacy secret derived from them, and the
    /// operators' decisions.
    pub fn new(config: Config, store: Store) -> Result<Arc<State>, ServerError> {
        let mut fresh_err = false;
        let seeds = store.signing_seeds(crate::unix_now(), || {
            let mut s = [0u8; 32];
            fresh_err = crate::random_seed(&mut s).is_err();
            s
        })?;
        if fresh_err {
            return Err(ServerError::Rng);
        }
        let decisions = store.decisions()?;
        let state = State::build(config, store, seeds, decisions, None)?;
        let names = state.store.name_bindings()?;
        if let Ok(mut n) = state.names.lock() {
            n.extend(names);
        }
        Ok(state)
    }

    /// A coordinator that is one of several on the Redis Cluster
    /// `cluster`: it signs tickets with the service's keys (kept in Redis)
    /// and shares presence and access requests with the others.
    pub async fn new_clustered(
        config: Config,
        store: Store,
        cluster: Arc<crate::cluster::Cluster>,
    ) -> Result<Arc<State>, ServerError> {
        let mut fresh = [0u8; 32];
        crate::random_seed(&mut fresh)?;
        let seeds = cluster
            .signing_seeds(|| fresh)
            .await
            .map_err(|e| ServerError::Cluster(e.to_string()))?;
        let decisions = cluster
            .decisions()
            .await
            .map_err(|e| ServerError::Cluster(e.to_string()))?;
        State::build(config, store, seeds, decisions, Some(cluster))
    }

    fn build(
        config: Config,
        store: Store,
        seeds: Vec<bandshare_store::SigningSeed>,
        (approved, revoked): (Vec<DeviceKey>, Vec<DeviceKey>),
        cluster: Option<Arc<crate::cluster::Cluster>>,
    ) -> Result<Arc<State>, ServerError> {
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
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(b"bandshare qos devices v1\0");
        ctx.update(&first.0);
        let mut qos_secret = [0u8; 32];
        qos_secret.copy_from_slice(ctx.finish().as_ref());
        let mut map =
            bandshare_qos::Map::new(config.qos.map).map_err(|e| ServerError::Qos(e.to_string()))?;
        // Scaled out, the map comes from Redis (see `cluster::qos`).
        if cluster.is_none() {
            let (cells, routes) = store.load_qos(&mut map)?;
            if cells > 0 {
                info!(cells, routes, "QoS map loaded");
            }
        }
        // After a restart, the key before the newest still verifies for one
        // ticket lifetime: tickets it signed may still be in use.
        let previous = (seeds.len() >= 2).then(|| {
            let (id, s) = &seeds[seeds.len() - 2];
            (
                Arc::new(TicketSigner::from_seed(&s.0, *id)),
                Instant::now() + config.ticket_lifetime,
            )
        });
        Ok(Arc::new(State {
            privacy: Mutex::new(privacy::Guard::new(config.privacy.clone())),
            offsets: privacy::Offsets::new(&config.privacy, privacy_secret.as_ref()),
            qos: Mutex::new(crate::qos::Book::new(map)),
            qos_secret,
            keys: RwLock::new(Keys {
                signer: Arc::new(TicketSigner::from_seed(&seed.0, *key_id)),
                previous,
                next: None,
            }),
            trust: RwLock::new(Trust {
                approved: approved.into_iter().collect(),
                revoked: revoked.into_iter().collect(),
            }),
            registry: Registry::default(),
            store,
            started: Instant::now(),
            reports_received: Default::default(),
            share_requests: Default::default(),
            known_requesters: Mutex::default(),
            proofs: Mutex::new(bandshare_core::ticket::ProofCache::new(PROOF_CACHE_KEYS)),
            offered: Mutex::default(),
            inflight: tokio::sync::Semaphore::new(config.max_inflight_requests as usize),
            shed: Default::default(),
            joining: tokio::sync::Semaphore::new(config.max_joining as usize),
            joins_waiting: Default::default(),
            joins_shed: Default::default(),
            tls_pin: Default::default(),
            grpc_sources: Default::default(),
            http_sources: Default::default(),
            metrics: Default::default(),
            cluster,
            seen: Default::default(),
            names: Mutex::default(),
            config,
        }))
    }

    /// The rest of the service, when scaled out (`server --redis`).
    pub fn cluster(&self) -> Option<&Arc<crate::cluster::Cluster>> {
        self.cluster.as_ref()
    }

    /// Where ticket-signing keys stand, in words, for the dashboard.
    pub fn key_state(&self) -> String {
        let k = match self.keys.read() {
            Ok(k) => k,
            Err(p) => p.into_inner(),
        };
        let now = Instant::now();
        let mut s = format!("signing with key {}", k.signer.key_id());
        if let Some((_, until)) = &k.previous
            && *until > now
        {
            s += &format!(
                "; the previous one verifies for {} s more",
                until.duration_since(now).as_secs()
            );
        }
        if let Some((next, from)) = &k.next {
            s += &format!(
                "; key {} announced, signing in {} s",
                next.key_id(),
                from.saturating_duration_since(now).as_secs()
            );
        }
        s
    }

    /// The event metrics `/metrics` shows.
    pub fn metrics(&self) -> &crate::metrics::Metrics {
        &self.metrics
    }

    /// `/metrics`: the event metrics and what is read now.
    pub fn render_metrics(&self) -> String {
        let c = self.counters();
        let snapshot = crate::metrics::Snapshot {
            online_sharers: c.online_sharers,
            revocations: self.trust.read().map_or(0, |t| t.revoked.len()),
            requests_shed: c.requests_shed,
            joins_shed: c.joins_shed,
            state_reports: c.reports_received,
            connections_refused: c.connections_refused,
            qos: self.qos.lock().ok().map(|b| b.status()),
            uptime_s: c.uptime_s,
            cluster: self
                .cluster
                .as_ref()
                .map(|cl| crate::metrics::ClusterSnapshot {
                    local_sharers: self.registry.local_len(),
                    redis_up: !cl.is_down(),
                    presence_written: cl.presence_written(),
                    presence_applied: cl.presence_applied(),
                    writes_dropped: cl.dropped_writes(),
                }),
        };
        crate::metrics::render(&self.metrics, &snapshot)
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The online sharers.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The SQLite store (devices, keys, ledger). Its calls block: use it
    /// from `spawn_blocking`.
    pub fn store(&self) -> &Store {
        &self.store
    }

    pub(crate) fn seen(&self) -> &crate::durable::Seen {
        &self.seen
    }

    pub(crate) fn names(&self) -> &Mutex<HashMap<String, DeviceKey>> {
        &self.names
    }

    /// A permit to handle one request, or RESOURCE_EXHAUSTED at once when
    /// `server.max_inflight_requests` are already in flight: load is shed,
    /// never queued without bound.
    pub fn admit_request(&self) -> Result<tokio::sync::SemaphorePermit<'_>, Status> {
        self.inflight.try_acquire().map_err(|_| {
            self.shed.fetch_add(1, Ordering::Relaxed);
            Status::resource_exhausted(format!(
                "coordinator overloaded: {} requests in flight; retry with backoff",
                self.config.max_inflight_requests
            ))
        })
    }

    /// A turn to admit a sharer: at once while fewer than
    /// `server.max_joining` are being admitted, else after those ahead of
    /// it; refused with UNAVAILABLE (the sharer retries with backoff) when
    /// `server.join_queue` are already waiting.
    pub async fn join_turn(&self) -> Result<tokio::sync::SemaphorePermit<'_>, Status> {
        if let Ok(p) = self.joining.try_acquire() {
            return Ok(p);
        }
        struct InQueue<'a>(&'a AtomicU64);
        impl Drop for InQueue<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::Relaxed);
            }
        }
        let ahead = self.joins_waiting.fetch_add(1, Ordering::Relaxed);
        let _in_queue = InQueue(&self.joins_waiting);
        if ahead >= u64::from(self.config.join_queue) {
            self.joins_shed.fetch_add(1, Ordering::Relaxed);
            return Err(Status::unavailable(format!(
                "coordinator busy: {ahead} sharers are waiting to join; retry with backoff"
            )));
        }
        self.joining
            .acquire()
            .await
            .map_err(|_| Status::unavailable("coordinator shutting down"))
    }

    /// The secret offsets sharers are shown at.
    pub fn offsets(&self) -> &privacy::Offsets {
        &self.offsets
    }

    /// Runs `f` with the QoS map.
    pub fn qos_book<R>(&self, f: impl FnOnce(&mut crate::qos::Book) -> R) -> Result<R, Status> {
        let mut g = self
            .qos
            .lock()
            .map_err(|_| Status::internal("QoS map poisoned"))?;
        Ok(f(&mut g))
    }

    /// The number the QoS map knows a device by: a keyed hash of its key.
    pub fn qos_device(&self, key: &DeviceKey) -> u64 {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(&self.qos_secret);
        ctx.update(&key.0);
        let d = ctx.finish();
        let mut b = [0u8; 8];
        b.copy_from_slice(&d.as_ref()[..8]);
        u64::from_le_bytes(b)
    }

    /// Runs `f` with the privacy guard (rate limits, plausibility).
    pub fn privacy<R>(&self, f: impl FnOnce(&mut privacy::Guard) -> R) -> Result<R, Status> {
        let mut g = self
            .privacy
            .lock()
            .map_err(|_| Status::internal("privacy state poisoned"))?;
        Ok(f(&mut g))
    }

    /// Notes which sharers `requester` was offered (bounded: forgets
    /// everyone when too many requesters are remembered).
    pub fn remember_offered(
        &self,
        requester: &DeviceKey,
        sharers: impl Iterator<Item = DeviceKey>,
    ) {
        let sharers: Vec<DeviceKey> = sharers.collect();
        if let Some(c) = &self.cluster {
            c.remember_offered(requester, &sharers);
        }
        if let Ok(mut m) = self.offered.lock() {
            if m.len() > OFFERED_REQUESTERS {
                m.clear();
            }
            let set = m.entry(*requester).or_default();
            set.extend(sharers);
            if set.len() > OFFERED_PER_REQUESTER {
                set.clear();
            }
        }
    }

    /// The sharers `requester` was offered: the only ones whose tickets it
    /// may refresh.
    pub fn offered_to(&self, requester: &DeviceKey) -> HashSet<DeviceKey> {
        self.offered
            .lock()
            .map(|m| m.get(requester).cloned().unwrap_or_default())
            .unwrap_or_default()
    }

    /// The sharers `requester` was offered here or, scaled out, by any
    /// coordinator of the service.
    pub async fn offered_by_service(&self, requester: &DeviceKey) -> HashSet<DeviceKey> {
        let mut set = self.offered_to(requester);
        if let Some(c) = &self.cluster {
            set.extend(c.offered_to(requester).await);
        }
        set
    }

    /// True the first time `requester` is seen since start.
    pub fn first_sight(&self, requester: &DeviceKey) -> bool {
        self.known_requesters
            .lock()
            .map(|mut k| k.insert(*requester))
            .unwrap_or(false)
    }

    pub fn count_report(&self) {
        self.reports_received.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count_share_request(&self) {
        self.share_requests.fetch_add(1, Ordering::Relaxed);
    }

    pub fn counters(&self) -> Counters {
        let both = |f: fn(&listen::Sources) -> &AtomicU64| {
            f(&self.grpc_sources).load(Ordering::Relaxed)
                + f(&self.http_sources).load(Ordering::Relaxed)
        };
        Counters {
            online_sharers: self.registry.len(),
            uptime_s: self.started.elapsed().as_secs(),
            reports_received: self.reports_received.load(Ordering::Relaxed),
            share_requests: self.share_requests.load(Ordering::Relaxed),
            requests_shed: self.shed.load(Ordering::Relaxed),
            joins_shed: self.joins_shed.load(Ordering::Relaxed),
            joins_waiting: self.joins_waiting.load(Ordering::Relaxed),
            connections_refused: both(|s| &s.refused),
            connections_silent: both(|s| &s.silent),
        }
    }

    /// Connections per source on one listener.
    pub fn sources(&self, l: Listener) -> Arc<listen::Sources> {
        match l {
            Listener::Grpc => self.grpc_sources.clone(),
            Listener::Http => self.http_sources.clone(),
        }
    }

    pub fn set_tls_pin(&self, pin: String) {
        let _ = self.tls_pin.set(pin);
    }

    pub fn tls_pin(&self) -> Option<&str> {
        self.tls_pin.get().map(String::as_str)
    }

    /// The key that signs tickets now.
    pub fn signer(&self) -> Arc<TicketSigner> {
        match self.keys.read() {
            Ok(k) => k.signer.clone(),
            Err(p) => p.into_inner().signer.clone(),
        }
    }

    /// Every key whose tickets sharers must accept now.
    pub fn ticket_keys(&self) -> Vec<Vec<u8>> {
        self.keys
            .read()
            .map(|k| k.verifying().iter().map(|k| k.to_vec()).collect())
            .unwrap_or_default()
    }

    /// Checks a request's proof of holding `requester`'s key: a proof seen
    /// before is compared, a new one verified (and then remembered).
    pub fn verify_proof(
        &self,
        requester: &DeviceKey,
        proof: &[u8],
        signed_at_unix: u64,
    ) -> Result<(), bandshare_core::ticket::ProofError> {
        use bandshare_core::ticket::{ProofError, REQUEST_WINDOW_S, verify_request};
        let now = crate::unix_now();
        let known = self
            .proofs
            .lock()
            .is_ok_and(|c| c.known(requester, proof, signed_at_unix));
        if known {
            let skew = signed_at_unix.abs_diff(now);
            return if skew > REQUEST_WINDOW_S {
                Err(ProofError::Skewed(skew))
            } else {
                Ok(())
            };
        }
        verify_request(requester, proof, signed_at_unix, now)?;
        if let Ok(mut c) = self.proofs.lock() {
            c.remember(*requester, proof, signed_at_unix);
        }
        Ok(())
    }

    /// The signers behind [`State::ticket_keys`].
    fn signers(&self) -> Vec<Arc<TicketSigner>> {
        match self.keys.read() {
            Ok(k) => k.signers(),
            Err(p) => p.into_inner().signers(),
        }
    }

    /// Reads back a ticket one of the current keys issued to `requester`
    /// (see [`TicketSigner::issued`]).
    pub fn issued_ticket(
        &self,
        bytes: &[u8],
        requester: &DeviceKey,
    ) -> Result<bandshare_core::Ticket, bandshare_core::TicketError> {
        let (ticket, _) = bandshare_core::Ticket::decode(bytes)?;
        let signers = self.signers();
        let signer = signers
            .iter()
            .find(|s| s.key_id() == ticket.key_id)
            .ok_or(bandshare_core::TicketError::BadSignature)?;
        signer.issued(bytes, requester)
    }

    /// `sharer`'s MAC keys for v2 tickets, one per key in
    /// [`State::ticket_keys`], sealed to its device key.
    pub fn ticket_mac_keys(&self, sharer: &DeviceKey) -> Vec<v1::SealedTicketKey> {
        let signers = self.signers();
        let mut e = [0u8; 32];
        if crate::random_seed(&mut e).is_err() {
            return vec![];
        }
        bandshare_core::ticket::seal_mac_keys(signers.iter().map(|s| &**s), sharer, e)
            .into_iter()
            .map(|k| v1::SealedTicketKey {
                key_id: u32::from(k.key_id),
                ephemeral: k.ephemeral.to_vec(),
                sealed: k.sealed.to_vec(),
                check: k.check.to_vec(),
            })
            .collect()
    }

    /// Revoked device keys, for a sharer's welcome.
    pub fn revoked(&self) -> Vec<Vec<u8>> {
        self.trust
            .read()
            .map(|t| t.revoked.iter().map(|k| k.0.to_vec()).collect())
            .unwrap_or_default()
    }

    /// Whether `key` may use the coordinator: `Err(PERMISSION_DENIED)` with
    /// what to do about it.
    pub fn check_device(&self, key: &DeviceKey) -> Result<(), Status> {
        let t = self
            .trust
            .read()
            .map_err(|_| Status::internal("trust state poisoned"))?;
        if t.revoked.contains(key) {
            return Err(Status::permission_denied(format!(
                "device {} is revoked by the coordinator's operator",
                key.short()
            )));
        }
        if self.config.enroll == Enroll::Approve && !t.approved.contains(key) {
            return Err(Status::permission_denied(format!(
                "device {} is not approved yet: the operator runs `bandshare admin approve {}` on the coordinator",
                key.short(),
                key.short()
            )));
        }
        Ok(())
    }

    /// Applies what operators changed in the store (see
    /// [`crate::trust::watch`]): newly revoked devices are cut off and every
    /// sharer is told; signing keys advance through their rotation and
    /// sharers get the new list.
    pub fn apply_decisions(&self, trust: Trust, seeds: &[Seed], now: Instant) {
        let newly_revoked = match self.trust.write() {
            Ok(mut t) => t.replace(trust),
            Err(_) => vec![],
        };
        if !newly_revoked.is_empty() {
            // A revoked device's name may pass to another device.
            if let Ok(mut n) = self.names.lock() {
                n.clear();
            }
            for k in &newly_revoked {
                info!(device = %k.short(), "device revoked: telling every sharer");
                self.registry
                    .end_stream(k, "device revoked by the operator");
            }
            self.tell_every_sharer(Down::Revoked(v1::Revoked {
                keys: newly_revoked.iter().map(|k| k.0.to_vec()).collect(),
            }));
        }
        let list = match self.keys.write() {
            Ok(mut keys) => keys
                .advance(seeds, now, self.config.ticket_lifetime)
                .then(|| {
                    keys.verifying()
                        .iter()
                        .map(|k| k.to_vec())
                        .collect::<Vec<Vec<u8>>>()
                }),
            Err(_) => None,
        };
        if let Some(keys) = list {
            // Each sharer gets its own MAC keys with the common list.
            for (key, tx) in self.registry.outbound() {
                let _ = tx.try_send(Ok(v1::CoordinatorMessage {
                    msg: Some(Down::TicketKeys(v1::TicketKeys {
                        keys: keys.clone(),
                        mac_keys: self.ticket_mac_keys(&key),
                    })),
                }));
            }
        }
    }

    fn tell_every_sharer(&self, msg: Down) {
        for (_, tx) in self.registry.outbound() {
            let _ = tx.try_send(Ok(v1::CoordinatorMessage {
                msg: Some(msg.clone()),
            }));
        }
    }
}
