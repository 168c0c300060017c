//! The relay's hello (the first stream a requester opens): decode must
//! return an error, never panic; whatever decodes re-encodes to the same
//! bytes. Also a lane's opening, the probe answer, and the hello reply and
//! lane grant readers.
#![no_main]
use bandshare_relay::wire::{self, Hello};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = Hello::decode(data) {
        assert_eq!(Hello::decode(&h.encode()), Ok(h));
    }
    // The first stream of any connection: a hello or a lane's token.
    if let Ok(o) = wire::Opening::decode(data) {
        assert_eq!(o.encode(), data);
    }
    let mut r = data;
    if let Ok(o) = futures_lite_block_on(wire::Opening::read(&mut r)) {
        let used = data.len() - r.len();
        assert_eq!(wire::Opening::decode(&data[..used]), Ok(o));
    }
    let mut r = data;
    let _ = futures_lite_block_on(wire::read_lane_grant(&mut r));
    if let Ok(b) = <[u8; wire::PROBE_REPLY_LEN]>::try_from(data) {
        let (_, health) = wire::decode_probe_reply(&b);
        assert!(health.loss_permille <= 1000);
    }
    let mut r = data;
    let _ = futures_lite_block_on(wire::read_hello_reply(&mut r));
});

/// Polls a future that never waits (it reads from a slice) to completion.
fn futures_lite_block_on<F: std::future::Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    loop {
        if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
    }
}
