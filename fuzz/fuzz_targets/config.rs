//! The TOML files bandshare reads: the coordinator's configuration and a
//! sharer's consent policy. Any text gives a value or an error naming what
//! is wrong, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = bandshare_coordinator::Config::parse(text);
        let _ = bandshare_agent::sharer::consent::Consent::from_toml(text);
        let _ = bandshare_agent::sharer::consent::parse_rate(text);
    }
});
