//! Who the coordinator trusts, and with which key it signs: enrollment
//! decisions (approve, revoke) and ticket-signing keys with rotation.
//!
//! Operators change both in the SQLite store (`bandshare admin approve |
//! revoke | rotate-key`, which write the file directly: access to the data
//! directory is the authority). [`watch`] reads the store every
//! [`POLL`] and acts:
//! - a revoked device is refused from then on; every online sharer is told
//!   at once (it refuses the device's tickets and closes its connections),
//!   and a revoked sharer's own stream is ended;
//! - a new signing key is first sent to every sharer alongside the old one,
//!   and signs tickets only [`PROPAGATION`] later; the old key keeps
//!   verifying until every ticket it signed has expired. No handshake fails
//!   during a rotation.

use crate::State;
use bandshare_core::{DeviceKey, TicketSigner};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// How often the store is read for operators' changes.
pub const POLL: Duration = Duration::from_millis(1000);
/// How long a new key is announced before it signs.
pub const PROPAGATION: Duration = Duration::from_millis(1000);

/// Enrollment decisions, as of the last read of the store.
#[derive(Default)]
pub struct Trust {
    pub approved: HashSet<DeviceKey>,
    pub revoked: HashSet<DeviceKey>,
}

/// The signing key and, during a rotation's overlap, the previous one.
pub struct Keys {
    pub signer: Arc<TicketSigner>,
    /// The key that signed before, and when it stops verifying.
    pub previous: Option<(Arc<TicketSigner>, Instant)>,
    /// A newer key announced to sharers, signing from the given instant.
    pub next: Option<(Arc<TicketSigner>, Instant)>,
}

impl Trust {
    /// Takes the decisions just read; returns the devices revoked since
    /// the last read.
    pub fn replace(&mut self, fresh: Trust) -> Vec<DeviceKey> {
        let new = fresh.revoked.difference(&self.revoked).copied().collect();
        *self = fresh;
        new
    }
}

impl Keys {
    /// One step of a rotation at `now`, given the seeds in the store: a
    /// newer seed is announced, an announced key starts signing after
    /// [`PROPAGATION`] (the old one verifies for a ticket `lifetime` plus
    /// clock skew more), and a previous key past its overlap is retired.
    /// True when the keys sharers must accept changed.
    pub fn advance(&mut self, seeds: &[Seed], now: Instant, lifetime: Duration) -> bool {
        let mut changed = false;
        if let Some((id, seed)) = seeds.last()
            && *id != self.signer.key_id()
            && self.next.as_ref().is_none_or(|(n, _)| n.key_id() != *id)
        {
            info!(key_id = id, "new signing key: announcing it to sharers");
            self.next = Some((
                Arc::new(TicketSigner::from_seed(seed, *id)),
                now + PROPAGATION,
            ));
            changed = true;
        }
        if let Some((next, at)) = self.next.clone()
            && now >= at
        {
            let overlap = lifetime + Duration::from_secs(bandshare_core::ticket::CLOCK_SKEW_S);
            self.previous = Some((self.signer.clone(), now + overlap));
            info!(
                key_id = next.key_id(),
                overlap_s = overlap.as_secs(),
                "new signing key signs now"
            );
            self.signer = next;
            self.next = None;
            changed = true;
        }
        if self
            .previous
            .as_ref()
            .is_some_and(|(_, until)| now >= *until)
        {
            info!("previous signing key retired");
            self.previous = None;
            changed = true;
        }
        changed
    }

    /// Keys sharers must accept now: the signing one, the announced next
    /// one and the previous one still in its overlap.
    pub fn verifying(&self) -> Vec<[u8; 32]> {
        self.signers().iter().map(|s| s.public_key()).collect()
    }

    /// The signers behind [`Keys::verifying`], in the same order.
    pub fn signers(&self) -> Vec<Arc<TicketSigner>> {
        let mut v = vec![self.signer.clone()];
        v.extend(self.next.as_ref().map(|(s, _)| s.clone()));
        v.extend(self.previous.as_ref().map(|(s, _)| s.clone()));
        v
    }
}

/// A key id and its seed.
pub type Seed = (u8, [u8; 32]);

/// Reads decisions and keys from the store (blocking).
pub fn read_store(state: &State) -> Option<(Trust, Vec<Seed>)> {
    let (approved, revoked) = state
        .store()
        .decisions()
        .map_err(|e| warn!(error = %e, "cannot read enrollment"))
        .ok()?;
    let seeds = state
        .store()
        .signing_seeds(crate::unix_now(), || [0; 32])
        .map_err(|e| warn!(error = %e, "cannot read signing keys"))
        .ok()?;
    Some((
        Trust {
            approved: approved.into_iter().collect(),
            revoked: revoked.into_iter().collect(),
        },
        seeds.into_iter().map(|(id, s)| (id, s.0)).collect(),
    ))
}

/// Reads decisions and keys from Redis (scale-out: `bandshare admin
/// --redis …` writes them there).
async fn read_cluster(c: &crate::cluster::Cluster) -> Option<(Trust, Vec<Seed>)> {
    let (approved, revoked) = c.decisions().await.ok()?;
    let seeds = c.read_seeds().await.ok()?;
    if seeds.is_empty() {
        return None;
    }
    Some((
        Trust {
            approved: approved.into_iter().collect(),
            revoked: revoked.into_iter().collect(),
        },
        seeds.into_iter().map(|(id, s)| (id, s.0)).collect(),
    ))
}

/// Reads the store (or Redis) every [`POLL`] until `stop` fires.
pub async fn watch(state: Arc<State>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(POLL);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let read = match state.cluster() {
            Some(c) => read_cluster(c).await,
            None => {
                let s = state.clone();
                tokio::task::spawn_blocking(move || read_store(&s))
                    .await
                    .ok()
                    .flatten()
            }
        };
        if let Some((trust, seeds)) = read {
            // Off the runtime's threads: a rotation seals every online
            // sharer's MAC keys (an X25519 each), seconds of CPU at 100k.
            let s = state.clone();
            let _ = tokio::task::spawn_blocking(move || {
                s.apply_decisions(trust, &seeds, Instant::now())
            })
            .await;
        }
    }
}
