//! Tickets: the coordinator's permission for one requester key to use one
//! sharer's relay, until an expiry, for a byte quota.
//!
//! Two wire versions share one body (big-endian integers):
//! `version:u8 | key_id:u8 | sharer:[32] | requester:[32] | expires_unix:u64 |
//!  nonce:[16] | quota_bytes:u64` (98 bytes), then
//! - v1 (162 bytes): an Ed25519 signature by the coordinator's key over a
//!   domain-separation prefix and the body. Anyone can verify it.
//! - v2 (130 bytes): an HMAC-SHA256 over a prefix and the body, under a key
//!   only the coordinator and the named sharer hold. The coordinator derives
//!   that key from its signing seed and the sharer's device key, and sends
//!   it to the sharer sealed to the sharer's device key ([`SealedMacKey`]:
//!   X25519 with the Montgomery form of the Ed25519 key), so it is readable
//!   by that sharer only, whatever carries it. A MAC costs the coordinator
//!   about a microsecond where a signature costs tens; the sharer checks it
//!   offline as before. What it gives up: a sharer can make tickets for
//!   itself, which lets nobody do anything the sharer could not already
//!   allow on its own relay (see SECURITY.md).

use crate::key::DeviceKey;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use ring::hmac;

pub const TICKET_LEN: usize = 162;
/// A v2 (MAC'd) ticket's length.
pub const MAC_TICKET_LEN: usize = 130;
const BODY_LEN: usize = 98;
const MAC_LEN: usize = 32;
const DOMAIN: &[u8] = b"bandshare ticket v1\0";
const MAC_DOMAIN: &[u8] = b"bandshare ticket v2\0";
const MAC_MASTER_DOMAIN: &[u8] = b"bandshare ticket mac master v2\0";
const WRAP_DOMAIN: &[u8] = b"bandshare ticket mac key wrap v2\0";
const CHECK_DOMAIN: &[u8] = b"bandshare ticket mac key check v2\0";
/// Tickets never live longer than this.
pub const MAX_TICKET_LIFETIME_S: u64 = 300;
/// Clock skew tolerated between coordinator and sharer.
pub const CLOCK_SKEW_S: u64 = 30;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ticket {
    pub key_id: u8,
    pub sharer: DeviceKey,
    pub requester: DeviceKey,
    pub expires_unix: u64,
    pub nonce: [u8; 16],
    pub quota_bytes: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TicketError {
    #[error(
        "malformed ticket: expected {TICKET_LEN} bytes of version 1 or {MAC_TICKET_LEN} of version 2, got {len} bytes (version {version})"
    )]
    Malformed { len: usize, version: u8 },
    #[error("ticket signature does not verify with any coordinator key")]
    BadSignature,
    #[error("ticket MAC does not verify with this sharer's key {0} from the coordinator")]
    BadMac(u8),
    #[error("ticket is MAC'd under coordinator key {0}, which this sharer has not been given")]
    NoMacKey(u8),
    #[error("ticket expired {0} s ago")]
    Expired(u64),
    #[error("ticket expiry is {0} s ahead, more than the {MAX_TICKET_LIFETIME_S} s maximum")]
    TooLong(u64),
    #[error("ticket is for another sharer ({0})")]
    WrongSharer(String),
    #[error("ticket is bound to another requester key ({0})")]
    WrongRequester(String),
}

/// What vouches for a ticket's body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Seal {
    /// v1: the coordinator's Ed25519 signature.
    Signature(Signature),
    /// v2: HMAC-SHA256 under the sharer's key.
    Mac([u8; MAC_LEN]),
}

impl Ticket {
    fn body(&self, version: u8) -> [u8; BODY_LEN] {
        let mut b = [0u8; BODY_LEN];
        b[0] = version;
        b[1] = self.key_id;
        b[2..34].copy_from_slice(&self.sharer.0);
        b[34..66].copy_from_slice(&self.requester.0);
        b[66..74].copy_from_slice(&self.expires_unix.to_be_bytes());
        b[74..90].copy_from_slice(&self.nonce);
        b[90..98].copy_from_slice(&self.quota_bytes.to_be_bytes());
        b
    }

    /// Wire bytes: the body, then the signature or the MAC.
    pub fn encode(&self, seal: &Seal) -> Vec<u8> {
        let mut out = Vec::with_capacity(TICKET_LEN);
        match seal {
            Seal::Signature(sig) => {
                out.extend_from_slice(&self.body(1));
                out.extend_from_slice(&sig.to_bytes());
            }
            Seal::Mac(mac) => {
                out.extend_from_slice(&self.body(2));
                out.extend_from_slice(mac);
            }
        }
        out
    }

    /// Splits wire bytes into the ticket and its seal, checking only the
    /// shape. Use [`TicketVerifier::verify`] before trusting it.
    pub fn decode(bytes: &[u8]) -> Result<(Ticket, Seal), TicketError> {
        let version = bytes.first().copied().unwrap_or(0);
        let len_ok = match version {
            1 => bytes.len() == TICKET_LEN,
            2 => bytes.len() == MAC_TICKET_LEN,
            _ => false,
        };
        if !len_ok {
            return Err(TicketError::Malformed {
                len: bytes.len(),
                version,
            });
        }
        let arr = |r: std::ops::Range<usize>| -> [u8; 32] {
            let mut a = [0u8; 32];
            a.copy_from_slice(&bytes[r]);
            a
        };
        let u64_at = |at: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&bytes[at..at + 8]);
            u64::from_be_bytes(a)
        };
        let mut nonce = [0u8; 16];
        nonce.copy_from_slice(&bytes[74..90]);
        let seal = if version == 1 {
            let mut sig = [0u8; 64];
            sig.copy_from_slice(&bytes[BODY_LEN..]);
            Seal::Signature(Signature::from_bytes(&sig))
        } else {
            let mut mac = [0u8; MAC_LEN];
            mac.copy_from_slice(&bytes[BODY_LEN..]);
            Seal::Mac(mac)
        };
        Ok((
            Ticket {
                key_id: bytes[1],
                sharer: DeviceKey(arr(2..34)),
                requester: DeviceKey(arr(34..66)),
                expires_unix: u64_at(66),
                nonce,
                quota_bytes: u64_at(90),
            },
            seal,
        ))
    }
}

fn mac_message(body: &[u8; BODY_LEN]) -> Vec<u8> {
    let mut m = Vec::with_capacity(MAC_DOMAIN.len() + BODY_LEN);
    m.extend_from_slice(MAC_DOMAIN);
    m.extend_from_slice(body);
    m
}

fn signed_message(body: &[u8; BODY_LEN]) -> Vec<u8> {
    let mut m = Vec::with_capacity(DOMAIN.len() + BODY_LEN);
    m.extend_from_slice(DOMAIN);
    m.extend_from_slice(body);
    m
}

/// How far a request's signing time may be from the coordinator's clock.
pub const REQUEST_WINDOW_S: u64 = 300;

/// What a requester signs to show it holds the key its request names.
pub fn request_proof_message(requester: &DeviceKey, signed_at_unix: u64) -> Vec<u8> {
    let mut m = b"bandshare request v1\0".to_vec();
    m.extend_from_slice(&requester.0);
    m.extend_from_slice(&signed_at_unix.to_be_bytes());
    m
}

/// Signs a request as `key` at `now_unix`: (proof, signed_at).
pub fn sign_request(key: &SigningKey, now_unix: u64) -> (Vec<u8>, u64) {
    let me = DeviceKey(key.verifying_key().to_bytes());
    let sig = key.sign(&request_proof_message(&me, now_unix));
    (sig.to_bytes().to_vec(), now_unix)
}

/// What is wrong with a request's proof of holding its key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    #[error("request is not signed by the key it names (no proof)")]
    Missing,
    #[error(
        "request was signed {0} s away from the coordinator's clock (at most {REQUEST_WINDOW_S} s)"
    )]
    Skewed(u64),
    #[error("proof is {0} bytes, expected 64")]
    Length(usize),
    #[error("requester_key is not a valid Ed25519 key")]
    BadKey,
    #[error("request is not signed by the key it names")]
    Forged,
}

/// Checks a request's proof.
pub fn verify_request(
    requester: &DeviceKey,
    proof: &[u8],
    signed_at_unix: u64,
    now_unix: u64,
) -> Result<(), ProofError> {
    if proof.is_empty() {
        return Err(ProofError::Missing);
    }
    if signed_at_unix.abs_diff(now_unix) > REQUEST_WINDOW_S {
        return Err(ProofError::Skewed(signed_at_unix.abs_diff(now_unix)));
    }
    let sig: [u8; 64] = proof
        .try_into()
        .map_err(|_| ProofError::Length(proof.len()))?;
    let key = VerifyingKey::from_bytes(&requester.0).map_err(|_| ProofError::BadKey)?;
    key.verify(
        &request_proof_message(requester, signed_at_unix),
        &Signature::from_bytes(&sig),
    )
    .map_err(|_| ProofError::Forged)
}

/// A client may present the same proof for this long (it is a proof of
/// holding the key at a time, not of a request), saving a signature per
/// request; well inside [`REQUEST_WINDOW_S`].
pub const PROOF_REUSE_S: u64 = 60;

/// The proofs that verified, one per key: the same proof presented again
/// (see [`PROOF_REUSE_S`]) is checked by comparing bytes instead of by an
/// Ed25519 verification, with the same result. Held by the coordinator;
/// forgets everything once it holds `cap` keys.
pub struct ProofCache {
    seen: std::collections::HashMap<DeviceKey, (u64, [u8; 64])>,
    cap: usize,
}

impl ProofCache {
    pub fn new(cap: usize) -> ProofCache {
        ProofCache {
            seen: std::collections::HashMap::new(),
            cap: cap.max(1),
        }
    }

    /// Whether exactly this proof verified before (the time window is not
    /// checked here: see [`verify_request`]).
    pub fn known(&self, requester: &DeviceKey, proof: &[u8], signed_at_unix: u64) -> bool {
        self.seen
            .get(requester)
            .is_some_and(|(at, p)| *at == signed_at_unix && p.as_slice() == proof)
    }

    /// Remembers a proof that verified.
    pub fn remember(&mut self, requester: DeviceKey, proof: &[u8], signed_at_unix: u64) {
        let Ok(p) = <[u8; 64]>::try_from(proof) else {
            return;
        };
        if self.seen.len() >= self.cap && !self.seen.contains_key(&requester) {
            self.seen.clear();
        }
        self.seen.insert(requester, (signed_at_unix, p));
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

/// One sharer's ticket MAC key under one signer (see
/// [`TicketSigner::sharer_mac_key`]).
#[derive(Clone)]
pub struct SharerMacKey {
    signer: [u8; 32],
    sharer: DeviceKey,
    key: hmac::Key,
}

impl std::fmt::Debug for SharerMacKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharerMacKey")
            .field("sharer", &self.sharer.short())
            .finish_non_exhaustive()
    }
}

/// Signs tickets; owned by the coordinator.
pub struct TicketSigner {
    key: SigningKey,
    key_id: u8,
    /// Derives each sharer's MAC key (from the seed: every coordinator
    /// with the same seed derives the same keys).
    mac_master: hmac::Key,
}

impl TicketSigner {
    pub fn from_seed(seed: &[u8; 32], key_id: u8) -> Self {
        let master = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, seed), MAC_MASTER_DOMAIN);
        TicketSigner {
            key: SigningKey::from_bytes(seed),
            key_id,
            mac_master: hmac::Key::new(hmac::HMAC_SHA256, master.as_ref()),
        }
    }

    /// The key `sharer`'s v2 tickets are MAC'd under.
    pub fn mac_key(&self, sharer: &DeviceKey) -> [u8; 32] {
        let mut k = [0u8; 32];
        k.copy_from_slice(hmac::sign(&self.mac_master, &sharer.0).as_ref());
        k
    }

    /// `sharer`'s MAC key, ready to MAC with: derived once and kept while
    /// its stream is up, it spares each ticket a derivation (about half
    /// the cost of a v2 ticket).
    pub fn sharer_mac_key(&self, sharer: &DeviceKey) -> SharerMacKey {
        SharerMacKey {
            signer: self.public_key(),
            sharer: *sharer,
            key: hmac::Key::new(hmac::HMAC_SHA256, &self.mac_key(sharer)),
        }
    }

    /// A v2 ticket: MAC'd for the sharer it names.
    pub fn mac(&self, ticket: Ticket) -> Vec<u8> {
        self.mac_with(None, ticket)
    }

    /// The same, with the sharer's key kept from [`Self::sharer_mac_key`];
    /// a key this signer did not derive for this ticket's sharer (the
    /// signer rotated since) is not used: the key is derived again.
    pub fn mac_with(&self, kept: Option<&SharerMacKey>, mut ticket: Ticket) -> Vec<u8> {
        ticket.key_id = self.key_id;
        let fresh;
        let key = match kept {
            Some(k) if k.sharer == ticket.sharer && k.signer == self.public_key() => &k.key,
            _ => {
                fresh = self.sharer_mac_key(&ticket.sharer);
                &fresh.key
            }
        };
        let tag = hmac::sign(key, &mac_message(&ticket.body(2)));
        let mut mac = [0u8; MAC_LEN];
        mac.copy_from_slice(tag.as_ref());
        ticket.encode(&Seal::Mac(mac))
    }

    /// `sharer`'s MAC key sealed to its device key, with the ephemeral
    /// secret `ephemeral` (32 random bytes); `None` if `sharer` is not a
    /// valid Ed25519 key.
    pub fn seal_mac_key(&self, sharer: &DeviceKey, ephemeral: [u8; 32]) -> Option<SealedMacKey> {
        seal_mac_keys([self], sharer, ephemeral).pop()
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }

    pub fn key_id(&self) -> u8 {
        self.key_id
    }

    /// A v1 ticket: Ed25519-signed.
    pub fn sign(&self, mut ticket: Ticket) -> Vec<u8> {
        ticket.key_id = self.key_id;
        let sig = self.key.sign(&signed_message(&ticket.body(1)));
        ticket.encode(&Seal::Signature(sig))
    }

    /// Reads back a ticket this key issued: its signature (v1) or MAC (v2)
    /// must be this key's, and it must be bound to `requester`. Expiry is
    /// the caller's to judge (a report about a past session outlives its
    /// ticket). The coordinator uses it to accept what a requester saw
    /// through a sharer only from a requester it sent to that sharer.
    pub fn issued(&self, bytes: &[u8], requester: &DeviceKey) -> Result<Ticket, TicketError> {
        let (ticket, seal) = Ticket::decode(bytes)?;
        match seal {
            Seal::Signature(sig) => {
                let msg = signed_message(&ticket.body(1));
                if ticket.key_id != self.key_id
                    || self.key.verifying_key().verify(&msg, &sig).is_err()
                {
                    return Err(TicketError::BadSignature);
                }
            }
            Seal::Mac(mac) => {
                let key = hmac::Key::new(hmac::HMAC_SHA256, &self.mac_key(&ticket.sharer));
                if ticket.key_id != self.key_id
                    || hmac::verify(&key, &mac_message(&ticket.body(2)), &mac).is_err()
                {
                    return Err(TicketError::BadMac(ticket.key_id));
                }
            }
        }
        if ticket.requester != *requester {
            return Err(TicketError::WrongRequester(ticket.requester.short()));
        }
        Ok(ticket)
    }
}

/// `sharer`'s MAC key under each of `signers`, sealed to its device key
/// with one ephemeral secret (32 random bytes) for all of them: one X25519
/// however many keys (each pad is bound to its key id). Empty if `sharer`
/// is not a valid Ed25519 key.
pub fn seal_mac_keys<'a>(
    signers: impl IntoIterator<Item = &'a TicketSigner>,
    sharer: &DeviceKey,
    ephemeral: [u8; 32],
) -> Vec<SealedMacKey> {
    let Ok(theirs) = VerifyingKey::from_bytes(&sharer.0) else {
        return vec![];
    };
    let shared = theirs.to_montgomery().mul_clamped(ephemeral);
    if shared.0 == [0; 32] {
        return vec![];
    }
    let e_pub = curve25519_dalek::MontgomeryPoint::mul_base_clamped(ephemeral).0;
    signers
        .into_iter()
        .map(|s| {
            let pad = wrap_pad(&shared.0, &e_pub, sharer, s.key_id);
            let mut sealed = s.mac_key(sharer);
            for (b, p) in sealed.iter_mut().zip(pad) {
                *b ^= p;
            }
            SealedMacKey {
                key_id: s.key_id,
                ephemeral: e_pub,
                check: check_tag(&pad, &sealed),
                sealed,
            }
        })
        .collect()
}

/// A sharer's MAC key as the coordinator sends it: XORed with a pad that
/// only the holder of the sharer's device key can compute (X25519 of an
/// ephemeral key and the sharer's key), and a check of the pad.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SealedMacKey {
    pub key_id: u8,
    /// The ephemeral X25519 public key.
    pub ephemeral: [u8; 32],
    pub sealed: [u8; 32],
    pub check: [u8; 16],
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("sealed ticket key {0} is not for this device (its check fails)")]
    NotForMe(u8),
    #[error("sealed ticket key {0} has a degenerate ephemeral key")]
    Degenerate(u8),
}

impl SealedMacKey {
    /// The MAC key, opened with this sharer's device key.
    pub fn open(&self, me: &SigningKey) -> Result<[u8; 32], SealError> {
        let shared =
            curve25519_dalek::MontgomeryPoint(self.ephemeral).mul_clamped(me.to_scalar_bytes());
        if shared.0 == [0; 32] {
            return Err(SealError::Degenerate(self.key_id));
        }
        let mine = DeviceKey(me.verifying_key().to_bytes());
        let pad = wrap_pad(&shared.0, &self.ephemeral, &mine, self.key_id);
        if !constant_time_eq(&check_tag(&pad, &self.sealed), &self.check) {
            return Err(SealError::NotForMe(self.key_id));
        }
        let mut key = self.sealed;
        for (b, p) in key.iter_mut().zip(pad) {
            *b ^= p;
        }
        Ok(key)
    }
}

fn wrap_pad(shared: &[u8; 32], e_pub: &[u8; 32], sharer: &DeviceKey, key_id: u8) -> [u8; 32] {
    let k = hmac::Key::new(hmac::HMAC_SHA256, shared);
    let mut ctx = hmac::Context::with_key(&k);
    ctx.update(WRAP_DOMAIN);
    ctx.update(e_pub);
    ctx.update(&sharer.0);
    ctx.update(&[key_id]);
    let mut pad = [0u8; 32];
    pad.copy_from_slice(ctx.sign().as_ref());
    pad
}

fn check_tag(pad: &[u8; 32], sealed: &[u8; 32]) -> [u8; 16] {
    let k = hmac::Key::new(hmac::HMAC_SHA256, pad);
    let mut ctx = hmac::Context::with_key(&k);
    ctx.update(CHECK_DOMAIN);
    ctx.update(sealed);
    let mut out = [0u8; 16];
    out.copy_from_slice(&ctx.sign().as_ref()[..16]);
    out
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Verifies tickets offline; held by every sharer. Several keys may verify
/// at once so that the coordinator can rotate its key without failures.
#[derive(Clone, Default)]
pub struct TicketVerifier {
    keys: Vec<VerifyingKey>,
    /// This sharer's MAC keys by coordinator key id (v2 tickets).
    macs: Vec<(u8, hmac::Key)>,
}

impl TicketVerifier {
    pub fn new(keys: &[[u8; 32]]) -> Self {
        TicketVerifier {
            keys: keys
                .iter()
                .filter_map(|k| VerifyingKey::from_bytes(k).ok())
                .collect(),
            macs: vec![],
        }
    }

    /// Also verifies v2 tickets MAC'd under these (key id, MAC key).
    pub fn with_mac_keys(mut self, macs: &[(u8, [u8; 32])]) -> Self {
        self.macs = macs
            .iter()
            .map(|(id, k)| (*id, hmac::Key::new(hmac::HMAC_SHA256, k)))
            .collect();
        self
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Checks signature, binding to `me` and `requester`, and expiry.
    pub fn verify(
        &self,
        bytes: &[u8],
        me: &DeviceKey,
        requester: &DeviceKey,
        now_unix: u64,
    ) -> Result<Ticket, TicketError> {
        let (ticket, seal) = Ticket::decode(bytes)?;
        match seal {
            Seal::Signature(sig) => {
                let msg = signed_message(&ticket.body(1));
                if !self.keys.iter().any(|k| k.verify(&msg, &sig).is_ok()) {
                    return Err(TicketError::BadSignature);
                }
            }
            Seal::Mac(mac) => {
                let (_, key) = self
                    .macs
                    .iter()
                    .find(|(id, _)| *id == ticket.key_id)
                    .ok_or(TicketError::NoMacKey(ticket.key_id))?;
                hmac::verify(key, &mac_message(&ticket.body(2)), &mac)
                    .map_err(|_| TicketError::BadMac(ticket.key_id))?;
            }
        }
        if ticket.sharer != *me {
            return Err(TicketError::WrongSharer(ticket.sharer.short()));
        }
        if ticket.requester != *requester {
            return Err(TicketError::WrongRequester(ticket.requester.short()));
        }
        if ticket.expires_unix + CLOCK_SKEW_S <= now_unix {
            return Err(TicketError::Expired(now_unix - ticket.expires_unix));
        }
        let ahead = ticket.expires_unix.saturating_sub(now_unix);
        if ahead > MAX_TICKET_LIFETIME_S + CLOCK_SKEW_S {
            return Err(TicketError::TooLong(ahead));
        }
        Ok(ticket)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn request_proofs() {
        let k = SigningKey::from_bytes(&[3; 32]);
        let me = DeviceKey(k.verifying_key().to_bytes());
        let (proof, at) = sign_request(&k, 1000);
        assert_eq!(verify_request(&me, &proof, at, 1100), Ok(()));
        assert!(verify_request(&me, &proof, at, 1000 + REQUEST_WINDOW_S + 1).is_err());
        assert!(
            verify_request(&me, &proof, at + 1, 1000).is_err(),
            "time is signed"
        );
        assert!(verify_request(&DeviceKey([9; 32]), &proof, at, 1000).is_err());
        assert!(verify_request(&me, &[], at, 1000).is_err());
        assert!(verify_request(&me, &proof[..63], at, 1000).is_err());
    }

    #[test]
    fn the_proof_cache_knows_only_exact_proofs() {
        let k = SigningKey::from_bytes(&[3; 32]);
        let me = DeviceKey(k.verifying_key().to_bytes());
        let (proof, at) = sign_request(&k, 1000);
        let mut c = ProofCache::new(2);
        assert!(!c.known(&me, &proof, at));
        c.remember(me, &proof, at);
        assert!(c.known(&me, &proof, at));
        assert!(!c.known(&me, &proof, at + 1), "another time");
        let mut other = proof.clone();
        other[5] ^= 1;
        assert!(!c.known(&me, &other, at), "other bytes");
        assert!(!c.known(&DeviceKey([1; 32]), &proof, at), "another key");
        c.remember(DeviceKey([1; 32]), &proof, at);
        c.remember(DeviceKey([2; 32]), &proof, at);
        assert_eq!(c.len(), 1, "full: forgot the rest");
        assert!(!c.known(&me, &proof, at));
    }

    fn ticket(exp: u64) -> Ticket {
        Ticket {
            key_id: 0,
            sharer: DeviceKey([1; 32]),
            requester: DeviceKey([2; 32]),
            expires_unix: exp,
            nonce: [7; 16],
            quota_bytes: 1 << 30,
        }
    }

    #[test]
    fn verify_checks_everything() {
        let s = TicketSigner::from_seed(&[9; 32], 3);
        let v = TicketVerifier::new(&[s.public_key()]);
        let t = s.sign(ticket(1000));
        let (me, req) = (DeviceKey([1; 32]), DeviceKey([2; 32]));
        assert_eq!(v.verify(&t, &me, &req, 900).map(|t| t.key_id), Ok(3));
        assert_eq!(
            v.verify(&t, &me, &req, 1100),
            Err(TicketError::Expired(100))
        );
        assert!(matches!(
            v.verify(&t, &DeviceKey([3; 32]), &req, 900),
            Err(TicketError::WrongSharer(_))
        ));
        assert!(matches!(
            v.verify(&t, &me, &DeviceKey([3; 32]), 900),
            Err(TicketError::WrongRequester(_))
        ));
        assert_eq!(v.verify(&t, &me, &req, 0), Err(TicketError::TooLong(1000)));
        let mut forged = t.clone();
        forged[70] ^= 1; // later expiry
        assert_eq!(
            v.verify(&forged, &me, &req, 900),
            Err(TicketError::BadSignature)
        );
        let other = TicketSigner::from_seed(&[8; 32], 0);
        let t2 = other.sign(ticket(1000));
        assert_eq!(
            v.verify(&t2, &me, &req, 900),
            Err(TicketError::BadSignature)
        );
        assert!(matches!(
            v.verify(&t[..100], &me, &req, 900),
            Err(TicketError::Malformed { len: 100, .. })
        ));
    }

    #[test]
    fn the_issuer_reads_back_only_its_own_tickets_for_their_requester() {
        let s = TicketSigner::from_seed(&[9; 32], 3);
        let req = DeviceKey([2; 32]);
        for t in [s.sign(ticket(1000)), s.mac(ticket(1000))] {
            // Expired at 1000 (long ago): read back all the same.
            let got = s.issued(&t, &req).expect("its own ticket");
            assert_eq!((got.sharer, got.key_id), (DeviceKey([1; 32]), 3));
            assert!(matches!(
                s.issued(&t, &DeviceKey([3; 32])),
                Err(TicketError::WrongRequester(_))
            ));
            let mut forged = t.clone();
            forged[2] ^= 1; // another sharer
            assert!(s.issued(&forged, &req).is_err());
            let other = TicketSigner::from_seed(&[8; 32], 3);
            assert!(other.issued(&t, &req).is_err(), "another coordinator key");
            assert!(matches!(
                s.issued(&t[..40], &req),
                Err(TicketError::Malformed { len: 40, .. })
            ));
        }
    }

    #[test]
    fn a_kept_mac_key_gives_the_same_ticket_and_a_stale_one_is_not_used() {
        let s = TicketSigner::from_seed(&[9; 32], 3);
        let (a, b) = (DeviceKey([1; 32]), DeviceKey([7; 32]));
        let t = Ticket {
            sharer: a,
            ..ticket(1000)
        };
        let plain = s.mac(t.clone());
        assert_eq!(s.mac_with(Some(&s.sharer_mac_key(&a)), t.clone()), plain);
        // Kept for another sharer, or under the signer before a rotation:
        // derived again, so the ticket is still this signer's for `a`.
        assert_eq!(s.mac_with(Some(&s.sharer_mac_key(&b)), t.clone()), plain);
        let before = TicketSigner::from_seed(&[8; 32], 3);
        assert_eq!(
            s.mac_with(Some(&before.sharer_mac_key(&a)), t.clone()),
            plain
        );
        assert_ne!(before.mac(t.clone()), plain, "the seeds differ");
    }

    #[test]
    fn mac_tickets_verify_only_with_the_sharers_key() {
        let s = TicketSigner::from_seed(&[9; 32], 3);
        let sharer_key = SigningKey::from_bytes(&[1; 32]);
        let me = DeviceKey(sharer_key.verifying_key().to_bytes());
        let req = DeviceKey([2; 32]);
        let sealed = s.seal_mac_key(&me, [5; 32]).expect("seals");
        assert_eq!(sealed.key_id, 3);
        let opened = sealed.open(&sharer_key).expect("opens");
        assert_eq!(opened, s.mac_key(&me));
        assert_ne!(sealed.sealed, opened, "not sent in the clear");
        // Another device cannot open it.
        let other = SigningKey::from_bytes(&[4; 32]);
        assert_eq!(sealed.open(&other), Err(SealError::NotForMe(3)));
        // Not even a new coordinator seal for the same key opens with the
        // wrong ephemeral.
        let mut swapped = sealed.clone();
        swapped.ephemeral = s.seal_mac_key(&me, [6; 32]).expect("seals").ephemeral;
        assert!(swapped.open(&sharer_key).is_err());

        let v = TicketVerifier::new(&[s.public_key()]).with_mac_keys(&[(3, opened)]);
        let t = s.mac(Ticket {
            sharer: me,
            ..ticket(1000)
        });
        assert_eq!(t.len(), MAC_TICKET_LEN);
        assert_eq!(v.verify(&t, &me, &req, 900).map(|t| t.key_id), Ok(3));
        assert_eq!(
            v.verify(&t, &me, &req, 1100),
            Err(TicketError::Expired(100))
        );
        assert!(matches!(
            v.verify(&t, &me, &DeviceKey([3; 32]), 900),
            Err(TicketError::WrongRequester(_))
        ));
        assert_eq!(v.verify(&t, &me, &req, 0), Err(TicketError::TooLong(1000)));
        for at in [1usize, 40, 70, 80, 95, 100, 129] {
            let mut forged = t.clone();
            forged[at] ^= 1;
            assert!(v.verify(&forged, &me, &req, 900).is_err(), "byte {at}");
        }
        // A ticket for another sharer, MAC'd under that sharer's key, does
        // not verify here; nor does one under a key id this sharer lacks.
        let elsewhere = s.mac(ticket(1000));
        assert_eq!(
            v.verify(&elsewhere, &me, &req, 900),
            Err(TicketError::BadMac(3))
        );
        let rotated = TicketSigner::from_seed(&[8; 32], 4).mac(Ticket {
            sharer: me,
            ..ticket(1000)
        });
        assert_eq!(
            v.verify(&rotated, &me, &req, 900),
            Err(TicketError::NoMacKey(4))
        );
        // A verifier without MAC keys refuses v2 and still takes v1.
        let v1_only = TicketVerifier::new(&[s.public_key()]);
        assert_eq!(
            v1_only.verify(&t, &me, &req, 900),
            Err(TicketError::NoMacKey(3))
        );
        let signed = s.sign(Ticket {
            sharer: me,
            ..ticket(1000)
        });
        assert!(v.verify(&signed, &me, &req, 900).is_ok());
        // A sharer's key does not make tickets for another sharer: the
        // other's MAC key is a different derivation.
        assert_ne!(s.mac_key(&me), s.mac_key(&DeviceKey([1; 32])));
    }

    #[test]
    fn keys_sealed_together_open_apart() {
        let (a, b) = (
            TicketSigner::from_seed(&[9; 32], 3),
            TicketSigner::from_seed(&[8; 32], 4),
        );
        let sharer_key = SigningKey::from_bytes(&[1; 32]);
        let me = DeviceKey(sharer_key.verifying_key().to_bytes());
        let sealed = seal_mac_keys([&a, &b], &me, [5; 32]);
        assert_eq!(sealed.len(), 2);
        assert_eq!(sealed[0].ephemeral, sealed[1].ephemeral);
        assert_eq!(sealed[0].open(&sharer_key), Ok(a.mac_key(&me)));
        assert_eq!(sealed[1].open(&sharer_key), Ok(b.mac_key(&me)));
        // Each pad is bound to its key id: relabelled, a key does not open.
        let mut relabelled = sealed[0].clone();
        relabelled.key_id = 4;
        assert_eq!(relabelled.open(&sharer_key), Err(SealError::NotForMe(4)));
    }

    #[test]
    fn a_degenerate_sharer_key_gets_no_sealed_key() {
        let s = TicketSigner::from_seed(&[9; 32], 1);
        // The identity point (a low-order key) would give an all-zero secret.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        assert_eq!(s.seal_mac_key(&DeviceKey(identity), [5; 32]), None);
    }

    proptest! {
        #[test]
        fn mac_round_trip(exp in any::<u64>(), quota in any::<u64>(), nonce in any::<[u8; 16]>(),
                          s in any::<[u8; 32]>(), r in any::<[u8; 32]>()) {
            let signer = TicketSigner::from_seed(&[5; 32], 2);
            let t = Ticket { key_id: 2, sharer: DeviceKey(s), requester: DeviceKey(r),
                             expires_unix: exp, nonce, quota_bytes: quota };
            let bytes = signer.mac(t.clone());
            prop_assert_eq!(bytes.len(), MAC_TICKET_LEN);
            let (back, seal) = Ticket::decode(&bytes).expect("decodes");
            prop_assert_eq!(back, t);
            prop_assert!(matches!(seal, Seal::Mac(_)));
        }

        #[test]
        fn round_trip(exp in any::<u64>(), quota in any::<u64>(), nonce in any::<[u8; 16]>(),
                      s in any::<[u8; 32]>(), r in any::<[u8; 32]>()) {
            let signer = TicketSigner::from_seed(&[5; 32], 1);
            let t = Ticket { key_id: 1, sharer: DeviceKey(s), requester: DeviceKey(r),
                             expires_unix: exp, nonce, quota_bytes: quota };
            let bytes = signer.sign(t.clone());
            prop_assert_eq!(bytes.len(), TICKET_LEN);
            let (back, _) = Ticket::decode(&bytes).expect("decodes");
            prop_assert_eq!(back, t);
        }

        #[test]
        fn decode_never_panics(b in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = Ticket::decode(&b);
        }
    }
}
