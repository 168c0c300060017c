//! Who the relay lets in, decided in one place and without I/O: a
//! requester's hello (its proof of key, revocation, the ticket's signature,
//! binding, expiry and nonce), its place among the sharer's requesters, a
//! renewed ticket on an open connection, and the connections each source
//! address may hold. The async relay (`serve.rs`) holds one [`Gate`] behind
//! a lock, passes `now`, and only moves bytes. Byte quotas are not here:
//! they are spent read by read (`limits.rs`).
//!
//! Tested by unit tests with a fake clock and tickets signed in the test.

use crate::wire::{self, Hello};
use bandshare_core::{DeviceKey, Ticket, TicketVerifier};
use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

/// Why a hello, a renewal or a connection is refused; told to the peer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("requester key is not a valid Ed25519 key")]
    BadKey,
    #[error("requester did not prove it holds the ticket's key")]
    NoProof,
    #[error("requester revoked by the coordinator")]
    Revoked,
    #[error("sharer has not yet heard from its coordinator")]
    NoCoordinator,
    #[error("{0}")]
    Ticket(String),
    #[error("ticket already used (replay)")]
    Replay,
    #[error("sharer at capacity ({0} requesters)")]
    AtCapacity(u32),
}

/// The relay's admission state.
pub struct Gate {
    me: DeviceKey,
    /// SHA-256 of this relay's certificate, which hello proofs cover.
    pin: [u8; 32],
    verifier: TicketVerifier,
    revoked: HashSet<DeviceKey>,
    /// Ticket nonces seen, with their expiry: a ticket opens one connection.
    replay: HashMap<[u8; 16], u64>,
    /// Open connections per requester.
    active: HashMap<DeviceKey, u32>,
    /// Serve at most this many requesters at once (0 = no limit).
    max_requesters: u32,
    per_source: HashMap<IpAddr, u32>,
    max_per_source: u32,
}

impl Gate {
    pub fn new(me: DeviceKey, pin: [u8; 32], max_requesters: u32, max_per_source: u32) -> Gate {
        Gate {
            me,
            pin,
            verifier: TicketVerifier::default(),
            revoked: HashSet::new(),
            replay: HashMap::new(),
            active: HashMap::new(),
            max_requesters,
            per_source: HashMap::new(),
            max_per_source: max_per_source.max(1),
        }
    }

    /// The coordinator's ticket keys (all that currently verify) and this
    /// sharer's MAC keys for v2 tickets, by key id.
    pub fn set_keys(&mut self, keys: &[[u8; 32]], macs: &[(u8, [u8; 32])]) {
        self.verifier = TicketVerifier::new(keys).with_mac_keys(macs);
    }

    pub fn knows_coordinator(&self) -> bool {
        !self.verifier.is_empty()
    }

    pub fn revoke(&mut self, keys: &[DeviceKey]) {
        self.revoked.extend(keys.iter().copied());
    }

    pub fn is_revoked(&self, key: &DeviceKey) -> bool {
        self.revoked.contains(key)
    }

    /// Checks a hello at `now_unix`: the requester proved its key over the
    /// ticket and this relay's certificate, is not revoked, and the ticket
    /// is fresh ([`Gate::fresh_ticket`]). Spends the ticket's nonce.
    pub fn hello(&mut self, hello: &Hello, now_unix: u64) -> Result<(DeviceKey, Ticket), Refusal> {
        let key = VerifyingKey::from_bytes(&hello.requester_key).map_err(|_| Refusal::BadKey)?;
        key.verify(
            &wire::hello_proof_message(&hello.ticket, &self.pin),
            &Signature::from_bytes(&hello.proof),
        )
        .map_err(|_| Refusal::NoProof)?;
        let requester = DeviceKey(hello.requester_key);
        let ticket = self.fresh_ticket(&hello.ticket, &requester, now_unix)?;
        Ok((requester, ticket))
    }

    /// A ticket for `requester` at this sharer: not revoked, signed by a
    /// coordinator key, bound to both, unexpired, its nonce never seen
    /// (and now spent). Also how an open connection renews its quota.
    pub fn fresh_ticket(
        &mut self,
        bytes: &[u8],
        requester: &DeviceKey,
        now_unix: u64,
    ) -> Result<Ticket, Refusal> {
        if self.revoked.contains(requester) {
            return Err(Refusal::Revoked);
        }
        if self.verifier.is_empty() {
            return Err(Refusal::NoCoordinator);
        }
        let ticket = self
            .verifier
            .verify(bytes, &self.me, requester, now_unix)
            .map_err(|e| Refusal::Ticket(e.to_string()))?;
        self.replay
            .retain(|_, exp| *exp + bandshare_core::ticket::CLOCK_SKEW_S > now_unix);
        if self
            .replay
            .insert(ticket.nonce, ticket.expires_unix)
            .is_some()
        {
            return Err(Refusal::Replay);
        }
        Ok(ticket)
    }

    /// Takes a requester's place for one more connection; a new requester
    /// needs a free place under `max_requesters`.
    pub fn enter(&mut self, requester: DeviceKey) -> Result<(), Refusal> {
        if self.max_requesters > 0
            && !self.active.contains_key(&requester)
            && self.active.len() as u32 >= self.max_requesters
        {
            return Err(Refusal::AtCapacity(self.max_requesters));
        }
        *self.active.entry(requester).or_insert(0) += 1;
        Ok(())
    }

    /// A connection of `requester` ended.
    pub fn leave(&mut self, requester: &DeviceKey) {
        if let Some(n) = self.active.get_mut(requester) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.active.remove(requester);
            }
        }
    }

    /// Requesters with a connection open.
    pub fn active_requesters(&self) -> u32 {
        self.active.len() as u32
    }

    /// Takes one of `source`'s connection slots; false when it holds all.
    pub fn source_enter(&mut self, source: IpAddr) -> bool {
        let n = self.per_source.entry(source).or_insert(0);
        if *n >= self.max_per_source {
            return false;
        }
        *n += 1;
        true
    }

    pub fn source_leave(&mut self, source: &IpAddr) {
        if let Some(n) = self.per_source.get_mut(source) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_source.remove(source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bandshare_core::TicketSigner;
    use ed25519_dalek::{Signer, SigningKey};

    const NOW: u64 = 1_800_000_000;

    struct World {
        coordinator: TicketSigner,
        sharer: DeviceKey,
        requester: SigningKey,
        pin: [u8; 32],
        gate: Gate,
        /// Tickets MAC'd for the sharer (v2) instead of signed (v1).
        v2: bool,
    }

    fn world(max_requesters: u32) -> World {
        let coordinator = TicketSigner::from_seed(&[9; 32], 1);
        let sharer = DeviceKey([3; 32]);
        let pin = [5; 32];
        let mut gate = Gate::new(sharer, pin, max_requesters, 2);
        gate.set_keys(
            &[coordinator.public_key()],
            &[(1, coordinator.mac_key(&sharer))],
        );
        World {
            coordinator,
            sharer,
            requester: SigningKey::from_bytes(&[7; 32]),
            pin,
            gate,
            v2: false,
        }
    }

    impl World {
        fn ticket(
            &self,
            nonce: u8,
            expires: u64,
            sharer: DeviceKey,
            requester: &SigningKey,
        ) -> Vec<u8> {
            let t = Ticket {
                sharer,
                requester: DeviceKey(requester.verifying_key().to_bytes()),
                expires_unix: expires,
                nonce: [nonce; 16],
                quota_bytes: 1000,
                key_id: 0,
            };
            if self.v2 {
                self.coordinator.mac(t)
            } else {
                self.coordinator.sign(t)
            }
        }

        fn hello(&self, ticket: Vec<u8>, signer: &SigningKey) -> Hello {
            let proof = signer.sign(&wire::hello_proof_message(&ticket, &self.pin));
            Hello {
                ticket,
                requester_key: self.requester.verifying_key().to_bytes(),
                proof: proof.to_bytes(),
            }
        }
    }

    #[test]
    fn a_fresh_bound_ticket_with_proof_is_admitted_once() {
        admitted_once(world(0));
        admitted_once(World {
            v2: true,
            ..world(0)
        });
    }

    fn admitted_once(mut w: World) {
        let t = w.ticket(1, NOW + 60, w.sharer, &w.requester);
        let h = w.hello(t.clone(), &w.requester);
        let (who, ticket) = w.gate.hello(&h, NOW).expect("admitted");
        assert_eq!(who, DeviceKey(w.requester.verifying_key().to_bytes()));
        assert_eq!(ticket.quota_bytes, 1000);
        assert_eq!(w.gate.hello(&h, NOW + 1), Err(Refusal::Replay));
        // Expired, for another sharer, proved by another key, revoked.
        let t = w.ticket(2, NOW - 400, w.sharer, &w.requester);
        assert!(matches!(
            w.gate.hello(&w.hello(t, &w.requester), NOW),
            Err(Refusal::Ticket(_))
        ));
        let t = w.ticket(3, NOW + 60, DeviceKey([4; 32]), &w.requester);
        assert!(matches!(
            w.gate.hello(&w.hello(t, &w.requester), NOW),
            Err(Refusal::Ticket(_))
        ));
        let thief = SigningKey::from_bytes(&[8; 32]);
        let t = w.ticket(4, NOW + 60, w.sharer, &w.requester);
        assert_eq!(
            w.gate.hello(&w.hello(t, &thief), NOW),
            Err(Refusal::NoProof)
        );
        w.gate.revoke(&[who]);
        let t = w.ticket(5, NOW + 60, w.sharer, &w.requester);
        assert_eq!(
            w.gate.hello(&w.hello(t.clone(), &w.requester), NOW),
            Err(Refusal::Revoked)
        );
        assert_eq!(w.gate.fresh_ticket(&t, &who, NOW), Err(Refusal::Revoked));
    }

    #[test]
    fn nonces_are_forgotten_only_after_their_ticket_expired() {
        forgotten_after_expiry(world(0));
        forgotten_after_expiry(World {
            v2: true,
            ..world(0)
        });
    }

    fn forgotten_after_expiry(mut w: World) {
        let who = DeviceKey(w.requester.verifying_key().to_bytes());
        let t = w.ticket(1, NOW + 60, w.sharer, &w.requester);
        w.gate.fresh_ticket(&t, &who, NOW).expect("first");
        assert_eq!(
            w.gate.fresh_ticket(&t, &who, NOW + 59),
            Err(Refusal::Replay)
        );
        assert_eq!(w.gate.replay.len(), 1);
        let other = w.ticket(2, NOW + 200, w.sharer, &w.requester);
        w.gate
            .fresh_ticket(
                &other,
                &who,
                NOW + 60 + bandshare_core::ticket::CLOCK_SKEW_S + 1,
            )
            .expect("second");
        assert_eq!(w.gate.replay.len(), 1, "the expired nonce was dropped");
    }

    #[test]
    fn no_keys_capacity_and_sources() {
        let mut g = Gate::new(DeviceKey([3; 32]), [0; 32], 2, 2);
        assert!(!g.knows_coordinator());
        assert_eq!(
            g.fresh_ticket(&[0; 10], &DeviceKey([1; 32]), NOW),
            Err(Refusal::NoCoordinator)
        );
        let (a, b, c) = (DeviceKey([1; 32]), DeviceKey([2; 32]), DeviceKey([3; 32]));
        g.enter(a).expect("a");
        g.enter(a).expect("a again: the same requester");
        g.enter(b).expect("b");
        assert_eq!(g.enter(c), Err(Refusal::AtCapacity(2)));
        g.leave(&a);
        assert_eq!(g.enter(c), Err(Refusal::AtCapacity(2)), "a still has one");
        g.leave(&a);
        g.enter(c).expect("a left");
        assert_eq!(g.active_requesters(), 2);
        let ip: IpAddr = "192.0.2.1".parse().expect("ip");
        assert!(g.source_enter(ip) && g.source_enter(ip));
        assert!(!g.source_enter(ip));
        g.source_leave(&ip);
        assert!(g.source_enter(ip));
    }
}
