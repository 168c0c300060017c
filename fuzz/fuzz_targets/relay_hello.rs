//! The relay's hello (the first stream a requester opens): decode must
//! return an error, never panic; whatever decodes re-encodes to the same
//! bytes. Also the probe answer and the hello reply reader.
#![no_main]
use bandshare_relay::wire::{self, Hello};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = Hello::decode(data) {
        assert_eq!(Hello::decode(&h.encode()), Ok(h));
    }
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
