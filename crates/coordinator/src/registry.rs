//! The registry: the one owner of online sharers. It holds the spatial
//! index and, per sharer, the handle to push access requests down its
//! stream. The gRPC services hold an `Arc<Registry>` and call its narrow
//! methods; no lock is held across an await.

use bandshare_core::DeviceKey;
use bandshare_matcher::{Index, MatchConfig, Outcome, Query, SceneDecision, SharerId, SharerInfo};
use bandshare_proto::v1;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tonic::Status;

/// Why a sharer's stream was ended for a newer one of the same device.
pub const REPLACED: &str = "replaced: another connection with this device key came online at the coordinator (is the same key in use by a second process?)";

pub type Outbound = mpsc::Sender<Result<v1::CoordinatorMessage, Status>>;

/// Where a sharer's stream is.
#[derive(Clone)]
pub enum Route {
    /// On this coordinator: access requests go down `Outbound`.
    Local(Outbound),
    /// On another coordinator of the same service (`server --redis`):
    /// access requests are routed to `owner` through Redis. `seq` is the
    /// owner's write clock of the presence this entry came from.
    Remote { owner: Arc<str>, seq: u64 },
}

/// How to reach one online sharer, besides what matching needs.
#[derive(Clone)]
pub struct Handle {
    pub key: DeviceKey,
    pub relay_endpoints: Vec<String>,
    pub relay_cert_sha256: Vec<u8>,
    pub route: Route,
    /// Distinguishes this stream from a later one of the same device.
    pub generation: u64,
    pub last_seen: Instant,
    /// The sharer's ticket MAC key, derived at its first ticket and kept
    /// while its stream is up.
    pub mac_key: std::sync::OnceLock<bandshare_core::ticket::SharerMacKey>,
}

/// A candidate with what the fan-out needs, copied out of the lock.
#[derive(Clone)]
pub struct Contact {
    pub id: SharerId,
    pub info: Arc<SharerInfo>,
    pub handle: Arc<Handle>,
}

/// The sharer stream asked (id, generation) and where its answer goes.
type Pending = (SharerId, u64, oneshot::Sender<v1::AccessResponse>);

/// Matching's outcome with the contacts of the candidates and the names of
/// every sharer a verdict mentions, copied out of the lock.
pub struct Ranked {
    pub outcome: Outcome,
    pub contacts: Vec<Contact>,
    pub names: HashMap<SharerId, String>,
}

#[derive(Default)]
struct Inner {
    index: Index,
    by_key: HashMap<DeviceKey, SharerId>,
    /// By `SharerId` (dense slot numbers of the index).
    handles: Vec<Option<Arc<Handle>>>,
}

impl Inner {
    fn handle(&self, id: SharerId) -> Option<&Arc<Handle>> {
        self.handles.get(id as usize)?.as_ref()
    }

    /// Indexes a sharer not yet in the index; returns its id.
    fn insert(&mut self, info: SharerInfo, handle: Handle) -> SharerId {
        let id = self.index.insert(info);
        self.by_key.insert(handle.key, id);
        if self.handles.len() <= id as usize {
            self.handles.resize(id as usize + 1, None);
        }
        self.handles[id as usize] = Some(Arc::new(handle));
        id
    }

    fn take_handle(&mut self, id: SharerId) -> Option<Arc<Handle>> {
        self.handles.get_mut(id as usize)?.take()
    }
}

#[derive(Default)]
pub struct Registry {
    inner: RwLock<Inner>,
    /// Access requests awaiting an answer, with the sharer stream asked.
    pending: Mutex<HashMap<u64, Pending>>,
    next_generation: AtomicU64,
    next_request: AtomicU64,
}

impl Registry {
    /// Puts a sharer online, replacing an older stream of the same device.
    /// Returns its id and stream generation.
    pub fn add(&self, info: SharerInfo, mut handle: Handle) -> (SharerId, u64) {
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed) + 1;
        handle.generation = generation;
        let Ok(mut g) = self.inner.write() else {
            return (u32::MAX, generation);
        };
        if let Some(old) = g.by_key.remove(&handle.key) {
            g.index.remove(old);
            if let Some(h) = g.take_handle(old) {
                // The older stream is ended, not left open and never
                // offered again: its process logs why and stops (the same
                // key online twice is a copied key or a second instance).
                if let Route::Local(tx) = &h.route {
                    let _ = tx.try_send(Err(Status::already_exists(REPLACED)));
                }
            }
        }
        let id = g.insert(info, handle);
        (id, generation)
    }

    /// Applies `f` to the sharer if `generation` is still its stream.
    pub fn update(
        &self,
        id: SharerId,
        generation: u64,
        now: Instant,
        f: impl FnOnce(&mut SharerInfo),
    ) {
        let Ok(mut g) = self.inner.write() else {
            return;
        };
        match g.handles.get_mut(id as usize).and_then(|h| h.as_mut()) {
            Some(h) if h.generation == generation => {
                // Only this stream's task touches last_seen; no clone is
                // made while contacts are out, except by a racing rank.
                Arc::make_mut(h).last_seen = now;
            }
            _ => return,
        }
        g.index.update(id, f);
    }

    pub fn touch(&self, id: SharerId, generation: u64, now: Instant) {
        self.update(id, generation, now, |_| {});
    }

    /// Takes the sharer offline if `generation` is still its stream.
    pub fn remove(&self, id: SharerId, generation: u64) -> Option<String> {
        let mut g = self.inner.write().ok()?;
        if g.handle(id)?.generation != generation {
            return None;
        }
        let h = g.take_handle(id)?;
        g.by_key.remove(&h.key);
        g.index.remove(id).map(|i| i.name.to_string())
    }

    /// Removes sharers not heard from within `max_silence`; returns names.
    pub fn expire(&self, now: Instant, max_silence: Duration) -> Vec<String> {
        let Ok(mut g) = self.inner.write() else {
            return vec![];
        };
        let stale: Vec<(SharerId, DeviceKey)> = g
            .handles
            .iter()
            .enumerate()
            .filter_map(|(id, h)| Some((id as SharerId, h.as_ref()?)))
            .filter(|(_, h)| now.saturating_duration_since(h.last_seen) > max_silence)
            .map(|(id, h)| (id, h.key))
            .collect();
        let mut names = vec![];
        for (id, key) in stale {
            g.take_handle(id);
            g.by_key.remove(&key);
            if let Some(i) = g.index.remove(id) {
                names.push(i.name.to_string());
            }
        }
        names
    }

    /// Every outbound stream of the sharers on this coordinator, with its
    /// sharer's key.
    pub fn outbound(&self) -> Vec<(DeviceKey, Outbound)> {
        self.inner
            .read()
            .map(|g| {
                g.handles
                    .iter()
                    .flatten()
                    .filter_map(|h| match &h.route {
                        Route::Local(tx) => Some((h.key, tx.clone())),
                        Route::Remote { .. } => None,
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Puts (or moves) a sharer whose stream is on another coordinator into
    /// the index, unless its stream is here or a newer presence is known.
    /// Returns whether the entry changed.
    pub fn upsert_remote(&self, info: SharerInfo, mut handle: Handle, now: Instant) -> bool {
        let Route::Remote { seq, .. } = handle.route else {
            return false;
        };
        let Ok(mut g) = self.inner.write() else {
            return false;
        };
        handle.last_seen = now;
        if let Some(&id) = g.by_key.get(&handle.key) {
            match g.handle(id).map(|h| &h.route) {
                Some(Route::Remote { seq: have, .. }) if *have < seq => {}
                _ => return false,
            }
            handle.generation = g.handle(id).map_or(0, |h| h.generation);
            g.index.update(id, |i| *i = info);
            g.handles[id as usize] = Some(Arc::new(handle));
            return true;
        }
        handle.generation = self.next_generation.fetch_add(1, Ordering::Relaxed) + 1;
        g.insert(info, handle);
        true
    }

    /// Takes a sharer on another coordinator out of the index: when its
    /// entry is not newer than `seq` (0: whatever its age). Returns its name.
    pub fn remove_remote(&self, key: &DeviceKey, seq: u64) -> Option<String> {
        let mut g = self.inner.write().ok()?;
        let id = *g.by_key.get(key)?;
        match g.handle(id).map(|h| &h.route) {
            Some(Route::Remote { seq: have, .. }) if seq == 0 || *have <= seq => {}
            _ => return None,
        }
        g.take_handle(id);
        g.by_key.remove(key);
        g.index.remove(id).map(|i| i.name.to_string())
    }

    /// Sharers whose streams are on this coordinator (the rest of the
    /// index came from other coordinators through Redis).
    pub fn local_len(&self) -> usize {
        self.inner
            .read()
            .map(|g| {
                g.handles
                    .iter()
                    .flatten()
                    .filter(|h| matches!(h.route, Route::Local(_)))
                    .count()
            })
            .unwrap_or(0)
    }

    /// Ends the stream of the sharer with `key` (if online) with
    /// PERMISSION_DENIED and takes it offline.
    pub fn end_stream(&self, key: &DeviceKey, why: &str) {
        let Ok(mut g) = self.inner.write() else {
            return;
        };
        let Some(id) = g.by_key.remove(key) else {
            return;
        };
        if let Some(h) = g.take_handle(id)
            && let Route::Local(tx) = &h.route
        {
            let _ = tx.try_send(Err(Status::permission_denied(why.to_string())));
        }
        g.index.remove(id);
    }

    /// The live (exact) position of the sharer called `name`, for tests; never
    /// persisted (feature `introspect`).
    #[cfg(feature = "introspect")]
    pub fn position_of(&self, name: &str) -> Option<bandshare_core::Position> {
        let g = self.inner.read().ok()?;
        g.handles
            .iter()
            .enumerate()
            .filter(|(_, h)| h.is_some())
            .find_map(|(id, _)| {
                g.index
                    .get(id as SharerId)
                    .filter(|i| &*i.name == name)
                    .map(|i| i.exact)
            })
    }

    pub fn len(&self) -> usize {
        self.inner.read().map(|g| g.index.len()).unwrap_or(0)
    }

    /// Online sharers per H3 cell at `res`: counts only, for the
    /// dashboard (no position leaves the registry).
    pub fn cell_counts(&self, res: h3o::Resolution) -> HashMap<u64, usize> {
        let mut out = HashMap::new();
        let Ok(g) = self.inner.read() else {
            return out;
        };
        for (id, h) in g.handles.iter().enumerate() {
            if h.is_none() {
                continue;
            }
            let Some(i) = g.index.get(id as SharerId) else {
                continue;
            };
            if let Ok(ll) = h3o::LatLng::new(i.exact.lat, i.exact.lon) {
                *out.entry(u64::from(ll.to_cell(res))).or_default() += 1;
            }
        }
        out
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Ranks for `q` and copies out the candidates' contacts and the names
    /// of every sharer a verdict mentions.
    pub fn rank(
        &self,
        q: &Query,
        cfg: &MatchConfig,
    ) -> Result<Ranked, bandshare_matcher::region::NoLocation> {
        let scene = bandshare_matcher::decide_scene(&q.evidence, &cfg.region)?;
        Ok(self.rank_in(q, cfg, scene))
    }

    /// Ranks in a scene already decided (see `matcher::rank_in`).
    pub fn rank_in(&self, q: &Query, cfg: &MatchConfig, scene: SceneDecision) -> Ranked {
        let Ok(g) = self.inner.read() else {
            return Ranked {
                outcome: Outcome {
                    scene,
                    candidates: vec![],
                    rejected: vec![],
                },
                contacts: vec![],
                names: HashMap::new(),
            };
        };
        let outcome = bandshare_matcher::rank_in(&g.index, q, cfg, scene);
        // Read every winner's two records before taking references to them:
        // plain loads overlap their cache misses, where the reference
        // counts' atomic increments would wait for each miss in turn.
        let warm: usize = outcome
            .candidates
            .iter()
            .map(|c| {
                g.index.shared(c.id).map_or(0, Arc::strong_count)
                    + g.handle(c.id).map_or(0, Arc::strong_count)
            })
            .sum();
        std::hint::black_box(warm);
        let contacts = outcome
            .candidates
            .iter()
            .filter_map(|c| {
                Some(Contact {
                    id: c.id,
                    info: g.index.shared(c.id)?.clone(),
                    handle: g.handle(c.id)?.clone(),
                })
            })
            .collect();
        let names = outcome
            .rejected
            .iter()
            .filter_map(|v| Some((v.id, g.index.get(v.id)?.name.to_string())))
            .collect();
        Ranked {
            outcome,
            contacts,
            names,
        }
    }

    /// The online sharer with device key `key`.
    pub fn contact_of(&self, key: &DeviceKey) -> Option<Contact> {
        let g = self.inner.read().ok()?;
        let id = *g.by_key.get(key)?;
        Some(Contact {
            id,
            info: g.index.shared(id)?.clone(),
            handle: g.handle(id)?.clone(),
        })
    }

    /// Registers a pending access request; the answer arrives through
    /// [`Registry::answer`].
    pub fn expect_answer(
        &self,
        from: SharerId,
        generation: u64,
    ) -> (u64, oneshot::Receiver<v1::AccessResponse>) {
        let id = self.next_request.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = oneshot::channel();
        if let Ok(mut p) = self.pending.lock() {
            p.insert(id, (from, generation, tx));
        }
        (id, rx)
    }

    /// Asks the sharer `c`, whose stream is here (`tx`), with `req` and
    /// waits for its answer at most `deadline`; `None` when it stays silent
    /// (or its stream is full).
    pub async fn ask_local(
        &self,
        c: &Contact,
        tx: &Outbound,
        req: v1::AccessRequest,
        deadline: Duration,
    ) -> Option<v1::AccessResponse> {
        tokio::time::timeout(deadline, self.ask_local_waiting(c, tx, req))
            .await
            .ok()
            .flatten()
    }

    /// The same without a deadline of its own, for a caller that bounds
    /// many asks with one timer (a share request's fan-out): dropping the
    /// future forgets the pending request.
    pub async fn ask_local_waiting(
        &self,
        c: &Contact,
        tx: &Outbound,
        mut req: v1::AccessRequest,
    ) -> Option<v1::AccessResponse> {
        let (request_id, rx) = self.expect_answer(c.id, c.handle.generation);
        let mut pending = Forget {
            registry: self,
            request_id: Some(request_id),
        };
        req.request_id = request_id;
        tx.try_send(Ok(v1::CoordinatorMessage {
            msg: Some(v1::coordinator_message::Msg::AccessRequest(req)),
        }))
        .ok()?;
        let answer = rx.await.ok();
        if answer.is_some() {
            // `answer` took it out of the map already.
            pending.request_id = None;
        }
        answer
    }

    /// Access requests still waiting for an answer.
    pub fn pending_asks(&self) -> usize {
        self.pending.lock().map_or(0, |p| p.len())
    }

    pub fn forget_answer(&self, request_id: u64) {
        if let Ok(mut p) = self.pending.lock() {
            p.remove(&request_id);
        }
    }

    /// Which sharer stream (id, generation) a pending access request went
    /// to; lets an in-process sharer (benchmarks) answer as that stream
    /// (feature `introspect`).
    #[cfg(feature = "introspect")]
    pub fn pending_sharer(&self, request_id: u64) -> Option<(SharerId, u64)> {
        let p = self.pending.lock().ok()?;
        p.get(&request_id).map(|(id, g, _)| (*id, *g))
    }

    /// Delivers a sharer's access response to the waiting share request;
    /// answers to requests that went to another sharer are dropped.
    pub fn answer(&self, from: SharerId, generation: u64, resp: v1::AccessResponse) {
        let Ok(mut p) = self.pending.lock() else {
            return;
        };
        if p.get(&resp.request_id)
            .is_some_and(|(id, g, _)| (*id, *g) == (from, generation))
            && let Some((_, _, tx)) = p.remove(&resp.request_id)
        {
            let _ = tx.send(resp);
        }
    }
}

/// Forgets a pending access request when its asker stops waiting
/// (silent sharer, deadline, cancelled request).
struct Forget<'a> {
    registry: &'a Registry,
    request_id: Option<u64>,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.request_id {
            self.registry.forget_answer(id);
        }
    }
}
