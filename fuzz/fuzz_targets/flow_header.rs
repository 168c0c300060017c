//! The flow header (every further stream): decode never panics and
//! round-trips whatever it accepts.
#![no_main]
use bandshare_relay::FlowHeader;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = FlowHeader::decode(data) {
        let again = h.encode().expect("a decoded header encodes");
        assert_eq!(FlowHeader::decode(&again), Ok(h));
    }
});
