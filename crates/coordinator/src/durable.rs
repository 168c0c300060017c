//! The coordinator's durable state, wherever it lives: this coordinator's
//! SQLite store, or Redis when it is one of several (`server --redis`; see
//! [`crate::cluster::durable`]). Every service goes through these, so the
//! choice is made once.

use crate::{State, unix_now};
use bandshare_core::DeviceKey;
use bandshare_store::{DeviceRow, Role, UsageRecord};
use tracing::warn;

impl State {
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
        match self.cluster() {
            Some(c) => c.bind_name(name, &key).await.map_err(|e| e.to_string()),
            None => {
                let store = self.store().clone();
                let n = name.to_string();
                tokio::task::spawn_blocking(move || store.bind_name(&n, &key, unix_now()))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())
            }
        }
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
