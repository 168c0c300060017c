//! Tickets: the coordinator's Ed25519-signed permission for one requester key
//! to use one sharer's relay, until an expiry, for a byte quota.
//!
//! Wire format v1 (162 bytes, big-endian integers):
//! `version:u8=1 | key_id:u8 | sharer:[32] | requester:[32] | expires_unix:u64 |
//!  nonce:[16] | quota_bytes:u64 | signature:[64]`.
//! The signature covers a domain-separation prefix and the first 98 bytes.

use crate::key::DeviceKey;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};

pub const TICKET_LEN: usize = 162;
const BODY_LEN: usize = 98;
const DOMAIN: &[u8] = b"bandshare ticket v1\0";
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
        "malformed ticket: expected {TICKET_LEN} bytes of version 1, got {len} bytes (version {version})"
    )]
    Malformed { len: usize, version: u8 },
    #[error("ticket signature does not verify with any coordinator key")]
    BadSignature,
    #[error("ticket expired {0} s ago")]
    Expired(u64),
    #[error("ticket expiry is {0} s ahead, more than the {MAX_TICKET_LIFETIME_S} s maximum")]
    TooLong(u64),
    #[error("ticket is for another sharer ({0})")]
    WrongSharer(String),
    #[error("ticket is bound to another requester key ({0})")]
    WrongRequester(String),
}

impl Ticket {
    fn body(&self) -> [u8; BODY_LEN] {
        let mut b = [0u8; BODY_LEN];
        b[0] = 1;
        b[1] = self.key_id;
        b[2..34].copy_from_slice(&self.sharer.0);
        b[34..66].copy_from_slice(&self.requester.0);
        b[66..74].copy_from_slice(&self.expires_unix.to_be_bytes());
        b[74..90].copy_from_slice(&self.nonce);
        b[90..98].copy_from_slice(&self.quota_bytes.to_be_bytes());
        b
    }

    /// Wire bytes: the body, then the signature.
    pub fn encode(&self, sig: &Signature) -> Vec<u8> {
        let mut out = Vec::with_capacity(TICKET_LEN);
        out.extend_from_slice(&self.body());
        out.extend_from_slice(&sig.to_bytes());
        out
    }

    /// Splits wire bytes into the ticket and its signature, checking only
    /// the shape. Use [`TicketVerifier::verify`] before trusting it.
    pub fn decode(bytes: &[u8]) -> Result<(Ticket, Signature), TicketError> {
        let version = bytes.first().copied().unwrap_or(0);
        if bytes.len() != TICKET_LEN || version != 1 {
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
        let mut sig = [0u8; 64];
        sig.copy_from_slice(&bytes[BODY_LEN..]);
        Ok((
            Ticket {
                key_id: bytes[1],
                sharer: DeviceKey(arr(2..34)),
                requester: DeviceKey(arr(34..66)),
                expires_unix: u64_at(66),
                nonce,
                quota_bytes: u64_at(90),
            },
            Signature::from_bytes(&sig),
        ))
    }
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

/// Signs tickets; owned by the coordinator.
pub struct TicketSigner {
    key: SigningKey,
    key_id: u8,
}

impl TicketSigner {
    pub fn from_seed(seed: &[u8; 32], key_id: u8) -> Self {
        TicketSigner {
            key: SigningKey::from_bytes(seed),
            key_id,
        }
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }

    pub fn key_id(&self) -> u8 {
        self.key_id
    }

    pub fn sign(&self, mut ticket: Ticket) -> Vec<u8> {
        ticket.key_id = self.key_id;
        let sig = self.key.sign(&signed_message(&ticket.body()));
        ticket.encode(&sig)
    }
}

/// Verifies tickets offline; held by every sharer. Several keys may verify
/// at once so that the coordinator can rotate its key without failures.
#[derive(Clone, Default)]
pub struct TicketVerifier {
    keys: Vec<VerifyingKey>,
}

impl TicketVerifier {
    pub fn new(keys: &[[u8; 32]]) -> Self {
        TicketVerifier {
            keys: keys
                .iter()
                .filter_map(|k| VerifyingKey::from_bytes(k).ok())
                .collect(),
        }
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
        let (ticket, sig) = Ticket::decode(bytes)?;
        let msg = signed_message(&ticket.body());
        if !self.keys.iter().any(|k| k.verify(&msg, &sig).is_ok()) {
            return Err(TicketError::BadSignature);
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

    proptest! {
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
