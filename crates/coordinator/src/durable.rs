//! The coordinator's durable state, wherever it lives: this coordinator's
//! SQLite store, or Redis when it is one of several (`server --redis`; see
//! [`crate::cluster::durable`]). Every service goes through these, so the
//! choice is made once.

use crate::{State, unix_now};
use bandshare_core::DeviceKey;
use bandshare_store::{DeviceRow, Role, UsageRecord};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, watch};
use tracing::warn;

/// Sharers seen and not yet written. A sharer coming online is noted here
/// and written with the others that came online within
/// [`SEEN_COALESCE`], in one transaction: a restart storm of 100,000
/// sharers is a few hundred writes, not 100,000 syncs to disk.
#[derive(Default)]
pub struct Seen {
    pending: Mutex<HashMap<DeviceKey, (String, Role)>>,
    wake: Notify,
}

/// How long the writer gathers devices seen before it writes them.
pub const SEEN_COALESCE: Duration = Duration::from_millis(200);

/// How long the writer waits before it tries a batch that failed again.
const SEEN_RETRY: Duration = Duration::from_secs(1);

/// Writes the devices [`State::note_device`] noted, a batch at a time,
/// until `stop`; what is pending then is written before it returns. A
/// batch that cannot be written is tried again after [`SEEN_RETRY`], also
/// when no other device is noted meanwhile.
pub async fn device_writer(state: Arc<State>, mut stop: watch::Receiver<bool>) {
    let mut retry = false;
    loop {
        let stopping = tokio::select! {
            _ = state.seen().wake.notified(), if !retry => false,
            _ = tokio::time::sleep(SEEN_RETRY), if retry => false,
            _ = stop.wait_for(|s| *s) => true,
        };
        if !stopping {
            tokio::time::sleep(SEEN_COALESCE).await;
        }
        retry = !state.write_seen().await;
        if stopping {
            return;
        }
    }
}

impl State {
    /// Notes a device seen, for [`device_writer`] to record with others.
    pub fn note_device(&self, key: DeviceKey, name: String, role: Role) {
        if let Ok(mut p) = self.seen().pending.lock() {
            p.insert(key, (name, role));
        }
        self.seen().wake.notify_one();
    }

    /// Writes what [`State::note_device`] noted; what cannot be written
    /// now is kept for the next batch (unless noted again since). False
    /// when some of it could not be written.
    async fn write_seen(&self) -> bool {
        let batch: Vec<(DeviceKey, String, Role)> = match self.seen().pending.lock() {
            Ok(mut p) => p.drain().map(|(k, (n, r))| (k, n, r)).collect(),
            Err(_) => return true,
        };
        if batch.is_empty() {
            return true;
        }
        let now = unix_now();
        let failed: Vec<_> = match self.cluster() {
            Some(c) => {
                let mut failed = vec![];
                for (key, name, role) in batch {
                    if let Err(e) = c.upsert_device(&key, &name, role, now).await {
                        warn!(error = %e, "cannot record device");
                        failed.push((key, name, role));
                    }
                }
                failed
            }
            None => {
                let store = self.store().clone();
                let r = tokio::task::spawn_blocking(move || {
                    let r = store.upsert_devices(&batch, now);
                    (r, batch)
                })
                .await;
                match r {
                    Ok((Ok(()), _)) => vec![],
                    Ok((Err(e), batch)) => {
                        warn!(error = %e, devices = batch.len(), "cannot record devices; retrying with the next batch");
                        batch
                    }
                    Err(e) => {
                        warn!(error = %e, "device writer failed");
                        vec![]
                    }
                }
            }
        };
        if failed.is_empty() {
            return true;
        }
        if let Ok(mut p) = self.seen().pending.lock() {
            for (k, n, r) in failed {
                p.entry(k).or_insert((n, r));
            }
        }
        false
    }

    /// Records a device seen; a failure is logged, never the caller's.
    pub async fn record_device(&self, key: DeviceKey, name: String, role: Role) {
        let r = match self.cluster() {
            Some(c) => c
                .upsert_device(&key, &name, role, unix_now())
                .await
                .map_err(|e| e.to_string()),
            None => {
                let store = self.store().clone();
                tokio::task::spawn_blocking(move || {
                    store.upsert_device(&key, &name, role, unix_now())
                })
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r.map_err(|e| e.to_string()))
            }
        };
        if let Err(e) = r {
            warn!(error = %e, "cannot record device");
        }
    }

    /// Binds a sharer name to `key` (see `Store::bind_name`):
    /// `Ok(Err(owner))` when another device holds it.
    pub async fn bind_name(
        &self,
        name: &str,
        key: DeviceKey,
    ) -> Result<Result<(), DeviceKey>, String> {
        // A sharer reconnecting keeps its name: no store round trip.
        let folded = name.to_lowercase();
        if self
            .names()
            .lock()
            .is_ok_and(|n| n.get(&folded) == Some(&key))
        {
            return Ok(Ok(()));
        }
        let r = match self.cluster() {
            Some(c) => c.bind_name(name, &key).await.map_err(|e| e.to_string()),
            None => {
                let store = self.store().clone();
                let n = name.to_string();
                tokio::task::spawn_blocking(move || store.bind_name(&n, &key, unix_now()))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())
            }
        };
        if let Ok(Ok(())) = r
            && let Ok(mut n) = self.names().lock()
        {
            n.insert(folded, key);
        }
        r
    }

    /// Devices known to the service.
    pub async fn device_count(&self) -> Option<u64> {
        match self.cluster() {
            Some(c) => c.device_count().await.ok(),
            None => {
                let store = self.store().clone();
                tokio::task::spawn_blocking(move || store.device_count().ok())
                    .await
                    .ok()
                    .flatten()
            }
        }
    }

    /// Every device known, with its decision.
    pub async fn devices(&self) -> Vec<DeviceRow> {
        match self.cluster() {
            Some(c) => c.devices().await.unwrap_or_default(),
            None => {
                let store = self.store().clone();
                tokio::task::spawn_blocking(move || store.devices().ok())
                    .await
                    .ok()
                    .flatten()
                    .unwrap_or_default()
            }
        }
    }

    /// Records one usage batch once; `Ok(fresh)` only when durable (in
    /// Redis: on a replica too).
    pub async fn record_usage_batch(
        &self,
        sharer: DeviceKey,
        batch: u64,
        rows: Vec<UsageRecord>,
    ) -> Result<bool, String> {
        match self.cluster() {
            Some(c) => c
                .record_usage_batch(
                    &sharer,
                    batch,
                    &rows,
                    unix_now(),
                    self.config().redis_ack_replicas,
                )
                .await
                .map_err(|e| e.to_string()),
            None => {
                let store = self.store().clone();
                tokio::task::spawn_blocking(move || {
                    store.record_usage_batch(&sharer, batch, &rows, unix_now())
                })
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())
            }
        }
    }
}
