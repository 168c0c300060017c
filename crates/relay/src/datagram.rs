//! UDP over QUIC DATAGRAM frames (RFC 9221): one UDP datagram per QUIC
//! datagram, with a small header.
//!
//! ```text
//! kind (1) = 0x01 · flow id (4, big-endian, chosen by the requester)
//! · the peer as in a flow header (version, address type, address, port)
//! · payload (the rest)
//! ```
//!
//! Requester → sharer the peer is the destination; sharer → requester it is
//! the source of the reply. A datagram larger than the path's QUIC datagram
//! size is never cut short: it is dropped and counted.

use crate::wire::{FlowHeader, WireError};

/// The first byte of a UDP datagram frame.
pub const KIND_UDP: u8 = 0x01;
/// Bytes of header before the peer.
const PREFIX: usize = 5;

/// One UDP datagram: its flow, its peer, and the payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Udp<'a> {
    pub flow: u32,
    pub peer: FlowHeader,
    pub payload: &'a [u8],
}

impl<'a> Udp<'a> {
    pub fn encode(&self) -> Result<Vec<u8>, WireError> {
        let peer = self.peer.encode()?;
        let mut b = Vec::with_capacity(PREFIX + peer.len() + self.payload.len());
        b.push(KIND_UDP);
        b.extend_from_slice(&self.flow.to_be_bytes());
        b.extend_from_slice(&peer);
        b.extend_from_slice(self.payload);
        Ok(b)
    }

    /// Bytes of header a datagram to `peer` carries before its payload.
    pub fn overhead(peer: &FlowHeader) -> usize {
        PREFIX + peer.encode().map_or(2 + 255 + 2, |p| p.len())
    }

    pub fn decode(buf: &'a [u8]) -> Result<Udp<'a>, WireError> {
        let truncated = || WireError::Truncated {
            what: "UDP datagram",
            need: PREFIX + 3,
            got: buf.len(),
        };
        let (&kind, rest) = buf.split_first().ok_or_else(truncated)?;
        if kind != KIND_UDP {
            return Err(WireError::Version(kind));
        }
        let flow = rest
            .get(..4)
            .and_then(|f| <[u8; 4]>::try_from(f).ok())
            .map(u32::from_be_bytes)
            .ok_or_else(truncated)?;
        let after = &buf[PREFIX..];
        let len = FlowHeader::total_len(after)?.ok_or_else(truncated)?;
        let head = after.get(..len).ok_or(WireError::Truncated {
            what: "UDP datagram peer",
            need: len,
            got: after.len(),
        })?;
        Ok(Udp {
            flow,
            peer: FlowHeader::decode(head)?,
            payload: &after[len..],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Host;
    use proptest::prelude::*;

    #[test]
    fn round_trip_and_bad_input() {
        let d = Udp {
            flow: 7,
            peer: FlowHeader {
                host: Host::Name("dns.example".into()),
                port: 53,
            },
            payload: b"query",
        };
        let b = d.encode().expect("encodes");
        assert_eq!(Udp::decode(&b).expect("decodes"), d);
        assert_eq!(b.len(), Udp::overhead(&d.peer) + 5);
        for cut in 0..b.len() - 5 {
            assert!(Udp::decode(&b[..cut]).is_err(), "cut at {cut}");
        }
        let mut other = b.clone();
        other[0] = 2;
        assert!(Udp::decode(&other).is_err());
        let empty = Udp {
            payload: b"",
            ..d.clone()
        };
        assert_eq!(
            Udp::decode(&empty.encode().expect("enc"))
                .expect("dec")
                .payload,
            b""
        );
    }

    proptest! {
        #[test]
        fn any_bytes_decode_or_fail_cleanly(b in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Udp::decode(&b);
        }

        #[test]
        fn ip_peers_round_trip(flow in any::<u32>(), ip in any::<[u8; 4]>(), port in any::<u16>(),
                               payload in proptest::collection::vec(any::<u8>(), 0..200)) {
            let d = Udp {
                flow,
                peer: FlowHeader { host: Host::Ip(std::net::IpAddr::from(ip)), port },
                payload: &payload,
            };
            let b = d.encode().expect("encodes");
            prop_assert_eq!(Udp::decode(&b).expect("decodes"), d);
        }
    }
}
