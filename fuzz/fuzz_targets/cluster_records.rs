//! What coordinators of a scaled-out service read back from Redis: a
//! presence, a routed access request or answer, a QoS sample, a saved
//! cell or route. Junk is refused without panicking (Redis is shared
//! infrastructure; a bad entry must not take a coordinator down).
#![no_main]
use bandshare_coordinator::cluster::{presence, qos};
use bandshare_proto::v1;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = v1::Presence::decode(data) {
        let _ = presence::decode(&p);
    }
    let _ = v1::Routed::decode(data);
    let _ = qos::bytes_sample(data);
    let split = data.len().min(24);
    if let Ok(field) = std::str::from_utf8(&data[..split]) {
        let _ = qos::decode_cell(field, &data[split..]);
        let _ = qos::decode_route(field, &data[split..]);
    }
});
