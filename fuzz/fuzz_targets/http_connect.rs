//! The local proxy's HTTP CONNECT parser: never panics, never claims more
//! bytes than given.
#![no_main]
use bandshare_agent::requester::socks::{self, Parse};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Parse::Done(_, used)) = socks::parse_http_connect(data) {
        assert!(used <= data.len());
    }
});
