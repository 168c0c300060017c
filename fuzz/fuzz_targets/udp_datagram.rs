//! UDP datagrams from outside: the relay's DATAGRAM frame decoder (what a
//! requester sends a sharer, and a sharer's replies) and the SOCKS5 UDP
//! request header a local client sends. Never panic; what decodes
//! re-encodes to the same frame.
#![no_main]
use bandshare_agent::requester::socks;
use bandshare_relay::datagram::Udp;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(d) = Udp::decode(data) {
        let again = d.encode().expect("a decoded frame encodes");
        assert_eq!(Udp::decode(&again).expect("re-decodes"), d);
    }
    if let Ok((_, payload)) = socks::parse_udp(data) {
        assert!(payload.len() <= data.len());
    }
});
