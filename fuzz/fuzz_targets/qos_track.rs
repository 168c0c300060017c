//! Tracks and recorded traces given to `bandshare qos predict` and
//! `qos import`: every parser returns points or an error, never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = bandshare_qos::track::parse_track(text);
    let _ = bandshare_qos::track::parse_csv(text);
    if let Ok(mut rows) = bandshare_qos::track::parse_norway(text) {
        bandshare_qos::track::fill_gaps(&mut rows, 600.0);
    }
    let _ = bandshare_qos::track::parse_ucc(text);
});
