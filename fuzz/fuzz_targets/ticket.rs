//! Tickets as a sharer receives them: decoding and verifying arbitrary
//! bytes never panics, whatever decodes re-encodes to the same bytes, and
//! nothing forged verifies (v1 signed, v2 MAC'd); nor does a sealed MAC
//! key made of the same bytes open.
#![no_main]
use bandshare_core::{DeviceKey, SealedMacKey, Ticket, TicketVerifier};
use ed25519_dalek::SigningKey;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((t, seal)) = Ticket::decode(data) {
        assert_eq!(t.encode(&seal), data);
    }
    let v = TicketVerifier::new(&[[7u8; 32]]).with_mac_keys(&[(1, [8u8; 32]), (2, [9u8; 32])]);
    let me = DeviceKey([1; 32]);
    let requester = DeviceKey([2; 32]);
    assert!(v.verify(data, &me, &requester, 1_700_000_000).is_err());
    if data.len() >= 81 {
        let at = |r: std::ops::Range<usize>| -> [u8; 32] { data[r].try_into().unwrap_or_default() };
        let sealed = SealedMacKey {
            key_id: data[0],
            ephemeral: at(1..33),
            sealed: at(33..65),
            check: data[65..81].try_into().unwrap_or_default(),
        };
        assert!(sealed.open(&SigningKey::from_bytes(&[3; 32])).is_err());
    }
});
