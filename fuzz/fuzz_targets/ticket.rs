//! Tickets as a sharer receives them: decoding and verifying arbitrary
//! bytes never panics, whatever decodes re-encodes to the same bytes, and
//! nothing forged verifies.
#![no_main]
use bandshare_core::{DeviceKey, Ticket, TicketVerifier};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((t, sig)) = Ticket::decode(data) {
        assert_eq!(t.encode(&sig), data);
    }
    let v = TicketVerifier::new(&[[7u8; 32]]);
    let me = DeviceKey([1; 32]);
    let requester = DeviceKey([2; 32]);
    assert!(v.verify(data, &me, &requester, 1_700_000_000).is_err());
});
