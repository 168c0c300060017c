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

use crate::Shared;
use crate::config::Enroll;
use bandshare_core::{DeviceKey, TicketSigner};
use bandshare_proto::v1::{self, coordinator_message::Msg as Down};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::Status;
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
    pub previous: Option<([u8; 32], Instant)>,
    /// A newer key announced to sharers, signing from the given instant.
    pub next: Option<(Arc<TicketSigner>, Instant)>,
}

impl Keys {
    /// Keys sharers must accept now: the signing one, the announced next
    /// one and the previous one still in its overlap.
    pub fn verifying(&self) -> Vec<[u8; 32]> {
        let mut v = vec![self.signer.public_key()];
        v.extend(self.next.as_ref().map(|(s, _)| s.public_key()));
        v.extend(self.previous.map(|(k, _)| k));
        v
    }
}

impl Shared {
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
}

/// Reads decisions and keys from the store (blocking).
/// A key id and its seed.
pub type Seed = (u8, [u8; 32]);

fn read_store(shared: &Shared) -> Option<(Trust, Vec<Seed>)> {
    let (approved, revoked) = shared
        .store
        .decisions()
        .map_err(|e| warn!(error = %e, "cannot read enrollment"))
        .ok()?;
    let seeds = shared
        .store
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

fn send_all(shared: &Shared, msg: Down) {
    for tx in shared.registry.outbound() {
        let _ = tx.try_send(Ok(v1::CoordinatorMessage {
            msg: Some(msg.clone()),
        }));
    }
}

/// One pass: apply what operators changed. Returns nothing; logs.
pub fn apply(shared: &Shared, trust: Trust, seeds: &[Seed], now: Instant) {
    // Enrollment.
    let newly_revoked: Vec<DeviceKey> = match shared.trust.write() {
        Ok(mut t) => {
            let new: Vec<DeviceKey> = trust.revoked.difference(&t.revoked).copied().collect();
            *t = trust;
            new
        }
        Err(_) => vec![],
    };
    if !newly_revoked.is_empty() {
        for k in &newly_revoked {
            info!(device = %k.short(), "device revoked: telling every sharer");
            shared
                .registry
                .end_stream(k, "device revoked by the operator");
        }
        send_all(
            shared,
            Down::Revoked(v1::Revoked {
                keys: newly_revoked.iter().map(|k| k.0.to_vec()).collect(),
            }),
        );
    }
    // Keys.
    let Ok(mut keys) = shared.keys.write() else {
        return;
    };
    let mut changed = false;
    if let Some((id, seed)) = seeds.last()
        && *id != keys.signer.key_id()
        && keys.next.as_ref().is_none_or(|(n, _)| n.key_id() != *id)
    {
        info!(key_id = id, "new signing key: announcing it to sharers");
        keys.next = Some((
            Arc::new(TicketSigner::from_seed(seed, *id)),
            now + PROPAGATION,
        ));
        changed = true;
    }
    if let Some((next, at)) = keys.next.clone()
        && now >= at
    {
        let overlap = shared.config.ticket_lifetime
            + Duration::from_secs(bandshare_core::ticket::CLOCK_SKEW_S);
        keys.previous = Some((keys.signer.public_key(), now + overlap));
        info!(
            key_id = next.key_id(),
            overlap_s = overlap.as_secs(),
            "new signing key signs now"
        );
        keys.signer = next;
        keys.next = None;
        changed = true;
    }
    if keys.previous.is_some_and(|(_, until)| now >= until) {
        info!("previous signing key retired");
        keys.previous = None;
        changed = true;
    }
    if changed {
        let list = keys.verifying().iter().map(|k| k.to_vec()).collect();
        drop(keys);
        send_all(shared, Down::TicketKeys(v1::TicketKeys { keys: list }));
    }
}

/// Reads the store every [`POLL`] until `stop` fires.
pub async fn watch(shared: Arc<Shared>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(POLL);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let s = shared.clone();
        let Ok(Some((trust, seeds))) = tokio::task::spawn_blocking(move || read_store(&s)).await
        else {
            continue;
        };
        apply(&shared, trust, &seeds, Instant::now());
    }
}
