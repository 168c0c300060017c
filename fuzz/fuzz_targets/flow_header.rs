//! The flow header and the ticket renewal (every further stream): decode
//! and read never panic and round-trip whatever they accept. Also the sharer's answers the requester
//! reads: the hello reply and a refusal's reason.
#![no_main]
use bandshare_relay::{FlowHeader, wire};
use libfuzzer_sys::fuzz_target;
use std::future::Future;
use std::task::{Context, Poll, Waker};

/// Polls a future over an in-memory reader; it never waits.
fn now<F: Future>(f: F) -> Option<F::Output> {
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => Some(v),
        Poll::Pending => None,
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = FlowHeader::decode(data) {
        let again = h.encode().expect("a decoded header encodes");
        assert_eq!(FlowHeader::decode(&again), Ok(h));
    }
    match wire::StreamOpen::decode(data) {
        Ok(wire::StreamOpen::Renew(t)) => {
            let again = wire::encode_renewal(&t).expect("a decoded renewal encodes");
            assert_eq!(again, data);
        }
        Ok(wire::StreamOpen::Flow(h)) => assert_eq!(FlowHeader::decode(data), Ok(h)),
        Ok(wire::StreamOpen::Lane) => assert_eq!(data, wire::LANE_REQUEST),
        Err(_) => {}
    }
    let mut r = data;
    if let Some(Ok(open)) = now(wire::StreamOpen::read(&mut r)) {
        let used = data.len() - r.len();
        assert_eq!(wire::StreamOpen::decode(&data[..used]), Ok(open));
    }
    let mut r = data;
    let _ = now(wire::read_hello_reply(&mut r));
    let mut r = data;
    if let Some(Ok(Some(reason))) = now(wire::read_flow_reason(&mut r)) {
        assert!(reason.len() <= 255 * 3);
    }
});
