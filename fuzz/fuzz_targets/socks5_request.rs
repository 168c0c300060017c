//! The local proxy's SOCKS5 greeting and request parsers, fed what a local
//! client sends: never panic, never claim more bytes than given.
#![no_main]
use bandshare_agent::requester::socks::{self, Parse};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Parse::Done(_, used)) = socks::parse_greeting(data) {
        assert!(used <= data.len());
    }
    if let Ok(Parse::Done(_, used)) = socks::parse_request(data) {
        assert!(used <= data.len());
    }
});
