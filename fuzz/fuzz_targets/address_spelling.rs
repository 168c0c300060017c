//! Host names a SOCKS client sends, as the relay reads them: an address
//! spelled any way is found without panicking, and the egress decision on
//! it never panics.
#![no_main]
use bandshare_core::EgressPolicy;
use bandshare_core::egress::literal_ip;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(name) = std::str::from_utf8(data) {
        if let Some(ip) = literal_ip(name) {
            let _ = EgressPolicy::default().decide(ip, 80);
        }
    }
});
