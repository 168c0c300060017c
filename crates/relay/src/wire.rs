//! Data-plane wire formats, version 1. Every length has a maximum and every
//! decoder returns an error on malformed input, never panics.
//!
//! Hello (first bidirectional stream, requester -> sharer):
//! `version:u8=1 | ticket_len:u16 | ticket | requester_key:[32] | proof:[64]`
//! where `proof` is the requester's Ed25519 signature over
//! `"bandshare hello v1\0" | ticket | relay certificate SHA-256`.
//! Hello reply: `code:u8 (0 ok, 1 refused) | reason_len:u8 | reason`.
//! After an accepted hello the same stream carries probes: 8-byte sequence
//! numbers; the sharer answers each (at most 50 a second) with
//! `seq:[8] | uplink_loss_permille:u16 | flags:u8 (bit 0: uplink down) | 0:u8`,
//! so the requester learns of a sharer whose own uplink fails even while
//! the link between the two is fine.
//!
//! Flow header (every further bidirectional stream):
//! `version:u8=1 | atyp:u8 (1 IPv4, 3 name, 4 IPv6) | address | port:u16`,
//! answered by one reply byte with SOCKS5's reply codes, then raw bytes.
//!
//! Ticket renewal (a further bidirectional stream instead of a flow):
//! `version:u8=1 | 0xF0 | ticket_len:u16 | ticket`, answered like a hello.
//! A fresh ticket for the same sharer and requester gives the connection
//! a new byte quota, so a long transfer outlives the first ticket's.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use tokio::io::{AsyncRead, AsyncReadExt};

pub const VERSION: u8 = 1;
pub const MAX_TICKET: usize = 512;
pub const MAX_NAME: usize = 255;
pub const HELLO_DOMAIN: &[u8] = b"bandshare hello v1\0";
/// After an accepted hello, its stream carries probes: 8-byte frames (a
/// sequence number) that the sharer echoes.
pub const PROBE_LEN: usize = 8;
/// The sharer echoes at most this many probes a second.
pub const MAX_PROBES_PER_S: u32 = 50;
/// A probe answer: the echoed sequence number and the sharer's uplink health.
pub const PROBE_REPLY_LEN: usize = 12;

/// What a sharer knows of its own uplink, carried in every probe answer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UplinkHealth {
    pub down: bool,
    /// Recent loss on the uplink, 0..=1000.
    pub loss_permille: u16,
}

pub fn encode_probe_reply(seq: [u8; PROBE_LEN], uplink: UplinkHealth) -> [u8; PROBE_REPLY_LEN] {
    let mut out = [0u8; PROBE_REPLY_LEN];
    out[..8].copy_from_slice(&seq);
    out[8..10].copy_from_slice(&uplink.loss_permille.min(1000).to_be_bytes());
    out[10] = uplink.down as u8;
    out
}

/// (sequence number, uplink health); a loss above 1000 is clamped.
pub fn decode_probe_reply(b: &[u8; PROBE_REPLY_LEN]) -> (u64, UplinkHealth) {
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&b[..8]);
    let loss = u16::from_be_bytes([b[8], b[9]]).min(1000);
    (
        u64::from_be_bytes(seq),
        UplinkHealth {
            down: b[10] & 1 == 1,
            loss_permille: loss,
        },
    )
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("unsupported version {0} (expected {VERSION})")]
    Version(u8),
    #[error("truncated {what}: need {need} bytes, got {got}")]
    Truncated {
        what: &'static str,
        need: usize,
        got: usize,
    },
    #[error("{what} is {len} bytes, above the maximum {max}")]
    TooLong {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("unknown address type {0} (expected 1, 3 or 4)")]
    AddressType(u8),
    #[error("host name is not valid: {0}")]
    Name(String),
    #[error("{0} trailing bytes after the message")]
    Trailing(usize),
    #[error("{what}: unexpected byte {value}")]
    Value { what: &'static str, value: u8 },
    #[error("stream ended: {0}")]
    Io(String),
}

fn need(what: &'static str, buf: &[u8], n: usize) -> Result<(), WireError> {
    if buf.len() < n {
        Err(WireError::Truncated {
            what,
            need: n,
            got: buf.len(),
        })
    } else {
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    pub ticket: Vec<u8>,
    pub requester_key: [u8; 32],
    pub proof: [u8; 64],
}

impl Hello {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(3 + self.ticket.len() + 96);
        b.push(VERSION);
        b.extend_from_slice(&(self.ticket.len() as u16).to_be_bytes());
        b.extend_from_slice(&self.ticket);
        b.extend_from_slice(&self.requester_key);
        b.extend_from_slice(&self.proof);
        b
    }

    /// Checks the version and returns the ticket length from the 3-byte head.
    fn ticket_len(head: [u8; 3]) -> Result<usize, WireError> {
        if head[0] != VERSION {
            return Err(WireError::Version(head[0]));
        }
        let tlen = u16::from_be_bytes([head[1], head[2]]) as usize;
        if tlen > MAX_TICKET {
            return Err(WireError::TooLong {
                what: "ticket",
                len: tlen,
                max: MAX_TICKET,
            });
        }
        Ok(tlen)
    }

    /// Decodes one complete hello.
    pub fn decode(buf: &[u8]) -> Result<Hello, WireError> {
        need("hello", buf, 3)?;
        let tlen = Hello::ticket_len([buf[0], buf[1], buf[2]])?;
        let total = 3 + tlen + 96;
        need("hello", buf, total)?;
        if buf.len() > total {
            return Err(WireError::Trailing(buf.len() - total));
        }
        let mut requester_key = [0u8; 32];
        requester_key.copy_from_slice(&buf[3 + tlen..3 + tlen + 32]);
        let mut proof = [0u8; 64];
        proof.copy_from_slice(&buf[3 + tlen + 32..total]);
        Ok(Hello {
            ticket: buf[3..3 + tlen].to_vec(),
            requester_key,
            proof,
        })
    }
}

/// The first stream of a connection: a hello with a ticket, or a lane
/// joining a connection already admitted (`[LANE, token]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Opening {
    Hello(Hello),
    Lane([u8; LANE_TOKEN_LEN]),
}

impl Opening {
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Opening::Hello(h) => h.encode(),
            Opening::Lane(token) => [&[LANE][..], token].concat(),
        }
    }

    pub fn decode(buf: &[u8]) -> Result<Opening, WireError> {
        if buf.first() != Some(&LANE) {
            return Hello::decode(buf).map(Opening::Hello);
        }
        let total = 1 + LANE_TOKEN_LEN;
        need("lane hello", buf, total)?;
        if buf.len() > total {
            return Err(WireError::Trailing(buf.len() - total));
        }
        let mut token = [0u8; LANE_TOKEN_LEN];
        token.copy_from_slice(&buf[1..total]);
        Ok(Opening::Lane(token))
    }

    pub async fn read<R: AsyncRead + Unpin>(r: &mut R) -> Result<Opening, WireError> {
        let mut first = [0u8; 1];
        read_exact(r, &mut first).await?;
        if first[0] != LANE {
            let mut rest = [0u8; 2];
            read_exact(r, &mut rest).await?;
            let tlen = Hello::ticket_len([first[0], rest[0], rest[1]])?;
            let mut all = vec![0u8; 3 + tlen + 96];
            all[..1].copy_from_slice(&first);
            all[1..3].copy_from_slice(&rest);
            read_exact(r, &mut all[3..]).await?;
            return Hello::decode(&all).map(Opening::Hello);
        }
        let mut token = [0u8; LANE_TOKEN_LEN];
        read_exact(r, &mut token).await?;
        Ok(Opening::Lane(token))
    }
}

/// The sharer's answer to a lane request: accepted, with the token as the
/// "reason" bytes of a hello reply.
pub fn encode_lane_grant(token: &[u8; LANE_TOKEN_LEN]) -> Vec<u8> {
    let mut b = vec![0, LANE_TOKEN_LEN as u8];
    b.extend_from_slice(token);
    b
}

/// Reads a lane grant: the token, or the sharer's reason for none.
pub async fn read_lane_grant<R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<Result<[u8; LANE_TOKEN_LEN], String>, WireError> {
    let mut head = [0u8; 2];
    read_exact(r, &mut head).await?;
    let mut body = vec![0u8; head[1] as usize];
    read_exact(r, &mut body).await?;
    if head[0] != 0 {
        return Ok(Err(String::from_utf8_lossy(&body).into_owned()));
    }
    <[u8; LANE_TOKEN_LEN]>::try_from(body.as_slice())
        .map(Ok)
        .map_err(|_| WireError::Truncated {
            what: "lane token",
            need: LANE_TOKEN_LEN,
            got: body.len(),
        })
}

/// The message the requester signs to prove it holds the ticket's key.
pub fn hello_proof_message(ticket: &[u8], cert_pin: &[u8; 32]) -> Vec<u8> {
    let mut m = Vec::with_capacity(HELLO_DOMAIN.len() + ticket.len() + 32);
    m.extend_from_slice(HELLO_DOMAIN);
    m.extend_from_slice(ticket);
    m.extend_from_slice(cert_pin);
    m
}

pub fn encode_hello_reply(accepted: bool, reason: &str) -> Vec<u8> {
    let reason = cut_255(reason);
    let mut b = vec![u8::from(!accepted), reason.len() as u8];
    b.extend_from_slice(reason.as_bytes());
    b
}

/// At most 255 bytes of `s`, cut on a character boundary.
fn cut_255(s: &str) -> &str {
    let mut cut = s.len().min(255);
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    &s[..cut]
}

/// A sharer's answer to a hello or a ticket renewal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HelloReply {
    Accepted,
    /// Refused, with the sharer's reason.
    Refused(String),
}

/// Reads a hello reply.
pub async fn read_hello_reply<R: AsyncRead + Unpin>(r: &mut R) -> Result<HelloReply, WireError> {
    let mut head = [0u8; 2];
    read_exact(r, &mut head).await?;
    let mut reason = vec![0u8; head[1] as usize];
    read_exact(r, &mut reason).await?;
    Ok(match head[0] {
        0 => HelloReply::Accepted,
        _ => HelloReply::Refused(String::from_utf8_lossy(&reason).into_owned()),
    })
}

/// A flow's refusal: the reply code, then (since the reason was added) a
/// length byte and up to 255 bytes of UTF-8 saying why. A reader that knows
/// only the code stops after it.
pub fn encode_flow_refusal(code: u8, reason: &str) -> Vec<u8> {
    let reason = cut_255(reason);
    let mut b = vec![code, reason.len() as u8];
    b.extend_from_slice(reason.as_bytes());
    b
}

/// Reads the reason behind a refusal code; a stream that ends right after
/// the code (an older sharer) has none.
pub async fn read_flow_reason<R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<Option<String>, WireError> {
    let mut len = [0u8; 1];
    match r.read(&mut len).await {
        Ok(0) => return Ok(None),
        Ok(_) => {}
        Err(e) => return Err(WireError::Io(e.to_string())),
    }
    let mut reason = vec![0u8; len[0] as usize];
    read_exact(r, &mut reason).await?;
    Ok(Some(String::from_utf8_lossy(&reason).into_owned()))
}

/// Where a flow goes: an address or a name the sharer resolves.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Host {
    Ip(IpAddr),
    Name(String),
}

impl std::fmt::Display for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Host::Ip(IpAddr::V6(a)) => write!(f, "[{a}]"),
            Host::Ip(a) => write!(f, "{a}"),
            Host::Name(n) => f.write_str(n),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct FlowHeader {
    pub host: Host,
    pub port: u16,
}

/// Checks a host name: 1..=255 bytes of printable ASCII without spaces.
pub fn check_name(name: &[u8]) -> Result<&str, WireError> {
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(WireError::Name(format!("length {}", name.len())));
    }
    if !name.iter().all(|b| b.is_ascii_graphic()) {
        return Err(WireError::Name(String::from_utf8_lossy(name).into_owned()));
    }
    std::str::from_utf8(name).map_err(|e| WireError::Name(e.to_string()))
}

impl FlowHeader {
    pub fn encode(&self) -> Result<Vec<u8>, WireError> {
        let mut b = vec![VERSION];
        match &self.host {
            Host::Ip(IpAddr::V4(a)) => {
                b.push(1);
                b.extend_from_slice(&a.octets());
            }
            Host::Ip(IpAddr::V6(a)) => {
                b.push(4);
                b.extend_from_slice(&a.octets());
            }
            Host::Name(n) => {
                check_name(n.as_bytes())?;
                b.push(3);
                b.push(n.len() as u8);
                b.extend_from_slice(n.as_bytes());
            }
        }
        b.extend_from_slice(&self.port.to_be_bytes());
        Ok(b)
    }

    /// Total length of the header whose first bytes are `prefix`, when known.
    pub(crate) fn total_len(prefix: &[u8]) -> Result<Option<usize>, WireError> {
        let (Some(&v), Some(&atyp)) = (prefix.first(), prefix.get(1)) else {
            return Ok(None);
        };
        if v != VERSION {
            return Err(WireError::Version(v));
        }
        Ok(match atyp {
            1 => Some(2 + 4 + 2),
            4 => Some(2 + 16 + 2),
            3 => prefix.get(2).map(|&n| 3 + n as usize + 2),
            other => return Err(WireError::AddressType(other)),
        })
    }

    pub fn decode(buf: &[u8]) -> Result<FlowHeader, WireError> {
        let total = match FlowHeader::total_len(buf)? {
            Some(t) => t,
            None => {
                return Err(WireError::Truncated {
                    what: "flow header",
                    need: 3,
                    got: buf.len(),
                });
            }
        };
        need("flow header", buf, total)?;
        if buf.len() > total {
            return Err(WireError::Trailing(buf.len() - total));
        }
        let port = u16::from_be_bytes([buf[total - 2], buf[total - 1]]);
        let host = match buf[1] {
            1 => Host::Ip(IpAddr::V4(Ipv4Addr::new(buf[2], buf[3], buf[4], buf[5]))),
            4 => {
                let mut o = [0u8; 16];
                o.copy_from_slice(&buf[2..18]);
                Host::Ip(IpAddr::V6(Ipv6Addr::from(o)))
            }
            _ => Host::Name(check_name(&buf[3..total - 2])?.to_string()),
        };
        Ok(FlowHeader { host, port })
    }

    pub async fn read<R: AsyncRead + Unpin>(r: &mut R) -> Result<FlowHeader, WireError> {
        let mut buf = vec![0u8; 3];
        read_exact(r, &mut buf).await?;
        let total = FlowHeader::total_len(&buf)?.unwrap_or(3);
        if total > buf.len() {
            let have = buf.len();
            buf.resize(total, 0);
            read_exact(r, &mut buf[have..]).await?;
        }
        FlowHeader::decode(&buf)
    }
}

/// The "address type" that marks a ticket renewal stream.
pub const RENEW: u8 = 0xF0;

/// Why a flow is refused once the connection's ticket quota is spent; the
/// requester renews or moves on when it sees it.
pub const QUOTA_USED_UP: &str = "the ticket's byte quota is used up";

/// The "address type" that asks for this connection's lane token:
/// `[VERSION, LANE, 0]`.
pub const LANE: u8 = 0xF1;
/// A lane's token: 32 random bytes.
pub const LANE_TOKEN_LEN: usize = 32;

/// What a requester opens a stream for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StreamOpen {
    Flow(FlowHeader),
    /// A fresh ticket for this connection.
    Renew(Vec<u8>),
    /// The token with which more connections ("lanes") join this one's
    /// admission: its ticket, quota and limits.
    Lane,
}

pub const LANE_REQUEST: [u8; 3] = [VERSION, LANE, 0];

pub fn encode_renewal(ticket: &[u8]) -> Result<Vec<u8>, WireError> {
    check_ticket_len(ticket.len())?;
    let mut b = vec![VERSION, RENEW];
    b.extend_from_slice(&(ticket.len() as u16).to_be_bytes());
    b.extend_from_slice(ticket);
    Ok(b)
}

/// Length of a renewal frame whose first bytes are `prefix`, when known.
fn renewal_len(prefix: &[u8]) -> Result<Option<usize>, WireError> {
    let (Some(&hi), Some(&lo)) = (prefix.get(2), prefix.get(3)) else {
        return Ok(None);
    };
    let len = u16::from_be_bytes([hi, lo]) as usize;
    check_ticket_len(len)?;
    Ok(Some(4 + len))
}

fn check_ticket_len(len: usize) -> Result<(), WireError> {
    if len == 0 {
        return Err(WireError::Truncated {
            what: "ticket",
            need: 1,
            got: 0,
        });
    }
    if len > MAX_TICKET {
        return Err(WireError::TooLong {
            what: "ticket",
            len,
            max: MAX_TICKET,
        });
    }
    Ok(())
}

impl StreamOpen {
    pub fn decode(buf: &[u8]) -> Result<StreamOpen, WireError> {
        if buf.get(1) == Some(&LANE) {
            if buf[0] != VERSION {
                return Err(WireError::Version(buf[0]));
            }
            need("lane request", buf, LANE_REQUEST.len())?;
            if buf.len() > LANE_REQUEST.len() {
                return Err(WireError::Trailing(buf.len() - LANE_REQUEST.len()));
            }
            if buf[2] != 0 {
                return Err(WireError::Value {
                    what: "lane request",
                    value: buf[2],
                });
            }
            return Ok(StreamOpen::Lane);
        }
        if buf.get(1) != Some(&RENEW) {
            return FlowHeader::decode(buf).map(StreamOpen::Flow);
        }
        if buf[0] != VERSION {
            return Err(WireError::Version(buf[0]));
        }
        let total = renewal_len(buf)?.ok_or(WireError::Truncated {
            what: "ticket renewal",
            need: 4,
            got: buf.len(),
        })?;
        need("ticket renewal", buf, total)?;
        if buf.len() > total {
            return Err(WireError::Trailing(buf.len() - total));
        }
        Ok(StreamOpen::Renew(buf[4..total].to_vec()))
    }

    pub async fn read<R: AsyncRead + Unpin>(r: &mut R) -> Result<StreamOpen, WireError> {
        let mut buf = vec![0u8; 3];
        read_exact(r, &mut buf).await?;
        if buf[1] == LANE {
            return StreamOpen::decode(&buf);
        }
        if buf[1] != RENEW {
            let total = FlowHeader::total_len(&buf)?.unwrap_or(3);
            if total > buf.len() {
                let have = buf.len();
                buf.resize(total, 0);
                read_exact(r, &mut buf[have..]).await?;
            }
            return StreamOpen::decode(&buf);
        }
        buf.resize(4, 0);
        read_exact(r, &mut buf[3..]).await?;
        let total = renewal_len(&buf)?.unwrap_or(4);
        buf.resize(total, 0);
        read_exact(r, &mut buf[4..]).await?;
        StreamOpen::decode(&buf)
    }
}

/// Reply codes of a flow, the same numbers SOCKS5 uses (RFC 1928 §6).
pub mod reply {
    pub const OK: u8 = 0x00;
    pub const GENERAL_FAILURE: u8 = 0x01;
    pub const NOT_ALLOWED: u8 = 0x02;
    pub const NETWORK_UNREACHABLE: u8 = 0x03;
    pub const HOST_UNREACHABLE: u8 = 0x04;
    pub const REFUSED: u8 = 0x05;
    pub const TTL_EXPIRED: u8 = 0x06;
    pub const ADDRESS_TYPE: u8 = 0x08;

    pub fn describe(code: u8) -> &'static str {
        match code {
            OK => "succeeded",
            GENERAL_FAILURE => "general failure",
            NOT_ALLOWED => "not allowed by the sharer",
            NETWORK_UNREACHABLE => "network unreachable",
            HOST_UNREACHABLE => "host unreachable",
            REFUSED => "connection refused",
            TTL_EXPIRED => "timed out",
            ADDRESS_TYPE => "address type not supported",
            _ => "unknown reply",
        }
    }
}

async fn read_exact<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> Result<(), WireError> {
    r.read_exact(buf)
        .await
        .map(|_| ())
        .map_err(|e| WireError::Io(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_round_trips_and_rejects_bad_lengths() {
        let t = vec![7u8; 120];
        let b = encode_renewal(&t).expect("encode");
        assert_eq!(StreamOpen::decode(&b), Ok(StreamOpen::Renew(t.clone())));
        assert!(StreamOpen::decode(&b[..b.len() - 1]).is_err());
        assert!(matches!(
            StreamOpen::decode(&[b.as_slice(), &[0]].concat()),
            Err(WireError::Trailing(1))
        ));
        assert!(encode_renewal(&[]).is_err());
        assert!(encode_renewal(&vec![0; MAX_TICKET + 1]).is_err());
        assert!(StreamOpen::decode(&[1, RENEW, 0xff, 0xff]).is_err());
        assert!(StreamOpen::decode(&[1, RENEW, 0, 0]).is_err());
        assert!(StreamOpen::decode(&[2, RENEW, 0, 1, 9]).is_err());
        let f = FlowHeader {
            host: Host::Name("example.net".into()),
            port: 443,
        };
        let enc = f.encode().expect("flow");
        assert_eq!(StreamOpen::decode(&enc), Ok(StreamOpen::Flow(f)));
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("rt");
        let read = rt.block_on(StreamOpen::read(&mut b.as_slice()));
        assert_eq!(read, Ok(StreamOpen::Renew(t)));
        let read = rt.block_on(StreamOpen::read(&mut enc.as_slice()));
        assert!(matches!(read, Ok(StreamOpen::Flow(_))));
    }

    #[test]
    fn lane_request_opening_and_grant_round_trip() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("rt");
        assert_eq!(StreamOpen::decode(&LANE_REQUEST), Ok(StreamOpen::Lane));
        assert_eq!(
            rt.block_on(StreamOpen::read(&mut LANE_REQUEST.as_slice())),
            Ok(StreamOpen::Lane)
        );
        assert!(StreamOpen::decode(&[VERSION, LANE]).is_err(), "truncated");
        assert!(
            StreamOpen::decode(&[VERSION, LANE, 1]).is_err(),
            "reserved byte"
        );
        assert!(StreamOpen::decode(&[2, LANE, 0]).is_err(), "version");
        assert!(matches!(
            StreamOpen::decode(&[VERSION, LANE, 0, 0]),
            Err(WireError::Trailing(1))
        ));

        let lane = Opening::Lane([5; LANE_TOKEN_LEN]);
        let b = lane.encode();
        assert_eq!(Opening::decode(&b), Ok(lane.clone()));
        assert_eq!(rt.block_on(Opening::read(&mut b.as_slice())), Ok(lane));
        assert!(Opening::decode(&b[..b.len() - 1]).is_err());
        assert!(Opening::decode(&[b.as_slice(), &[0]].concat()).is_err());
        let hello = Opening::Hello(Hello {
            ticket: vec![3; 40],
            requester_key: [1; 32],
            proof: [2; 64],
        });
        let b = hello.encode();
        assert_eq!(Opening::decode(&b), Ok(hello.clone()));
        assert_eq!(rt.block_on(Opening::read(&mut b.as_slice())), Ok(hello));

        let g = encode_lane_grant(&[9; LANE_TOKEN_LEN]);
        assert_eq!(
            rt.block_on(read_lane_grant(&mut g.as_slice())),
            Ok(Ok([9; LANE_TOKEN_LEN]))
        );
        let no = encode_hello_reply(false, "at most 3 lanes");
        assert_eq!(
            rt.block_on(read_lane_grant(&mut no.as_slice())),
            Ok(Err("at most 3 lanes".into()))
        );
        assert!(
            rt.block_on(read_lane_grant(&mut [0u8, 3, 1, 2, 3].as_slice()))
                .is_err()
        );
    }

    use proptest::prelude::*;

    fn host() -> impl Strategy<Value = Host> {
        prop_oneof![
            any::<[u8; 4]>().prop_map(|o| Host::Ip(IpAddr::V4(o.into()))),
            any::<[u8; 16]>().prop_map(|o| Host::Ip(IpAddr::V6(o.into()))),
            "[a-z0-9.-]{1,255}".prop_map(Host::Name),
        ]
    }

    proptest! {
        #[test]
        fn flow_header_round_trip(host in host(), port in any::<u16>()) {
            let h = FlowHeader { host, port };
            let b = h.encode().expect("encodes");
            prop_assert_eq!(FlowHeader::decode(&b).expect("decodes"), h.clone());
            let mut r = &b[..];
            let rt = tokio::runtime::Builder::new_current_thread().build().expect("rt");
            prop_assert_eq!(rt.block_on(FlowHeader::read(&mut r)).expect("reads"), h);
        }

        #[test]
        fn hello_round_trip(ticket in proptest::collection::vec(any::<u8>(), 0..=MAX_TICKET),
                            key in any::<[u8; 32]>(), p1 in any::<[u8; 32]>(), p2 in any::<[u8; 32]>()) {
            let mut proof = [0u8; 64];
            proof[..32].copy_from_slice(&p1);
            proof[32..].copy_from_slice(&p2);
            let h = Hello { ticket, requester_key: key, proof };
            prop_assert_eq!(Hello::decode(&h.encode()).expect("decodes"), h);
        }

        #[test]
        fn flow_refusal_round_trip(code in 1u8.., reason in "\\PC{0,300}") {
            let b = encode_flow_refusal(code, &reason);
            prop_assert_eq!(b[0], code);
            let mut r = &b[1..];
            let rt = tokio::runtime::Builder::new_current_thread().build().expect("rt");
            let got = rt.block_on(read_flow_reason(&mut r)).expect("reads").expect("has one");
            // Cut at 255 bytes on a character boundary, never mangled.
            prop_assert!(reason.starts_with(&got), "{:?} / {:?}", reason, got);
            prop_assert!(got.len() <= 255 && (got.len() == reason.len() || reason.len() > 251));
            let mut old = &b[1..1];
            prop_assert_eq!(rt.block_on(read_flow_reason(&mut old)).expect("reads"), None);
        }

        #[test]
        fn hello_reply_round_trip(ok in any::<bool>(), reason in "\\PC{0,60}") {
            let b = encode_hello_reply(ok, &reason);
            let mut r = &b[..];
            let rt = tokio::runtime::Builder::new_current_thread().build().expect("rt");
            let got = rt.block_on(read_hello_reply(&mut r)).expect("reads");
            prop_assert_eq!(got, if ok { HelloReply::Accepted } else { HelloReply::Refused(reason) });
        }

        #[test]
        fn probe_reply_round_trip(seq in any::<u64>(), down in any::<bool>(), loss in 0u16..=1000) {
            let h = UplinkHealth { down, loss_permille: loss };
            let b = encode_probe_reply(seq.to_be_bytes(), h);
            prop_assert_eq!(decode_probe_reply(&b), (seq, h));
        }

        #[test]
        fn probe_reply_decodes_anything(b in any::<[u8; PROBE_REPLY_LEN]>()) {
            let (_, h) = decode_probe_reply(&b);
            prop_assert!(h.loss_permille <= 1000);
        }

        #[test]
        fn decoders_never_panic(b in proptest::collection::vec(any::<u8>(), 0..700)) {
            let _ = Hello::decode(&b);
            let _ = FlowHeader::decode(&b);
        }
    }

    #[test]
    fn rejects_malformed() {
        assert_eq!(
            FlowHeader::decode(&[2, 1, 0, 0, 0, 0, 0, 0]),
            Err(WireError::Version(2))
        );
        assert_eq!(
            FlowHeader::decode(&[1, 9, 0]),
            Err(WireError::AddressType(9))
        );
        assert!(matches!(
            FlowHeader::decode(&[1, 3, 0, 0, 80]),
            Err(WireError::Name(_))
        ));
        assert!(matches!(
            FlowHeader::decode(&[1, 3, 3, b'a', b' ', b'b', 0, 80]),
            Err(WireError::Name(_))
        ));
        assert!(matches!(
            FlowHeader::decode(&[1, 1, 1, 2]),
            Err(WireError::Truncated { .. })
        ));
        assert_eq!(
            FlowHeader::decode(&[1, 1, 1, 2, 3, 4, 0, 80, 9]),
            Err(WireError::Trailing(1))
        );
        let mut big = vec![1u8, 0x02, 0x01];
        big.resize(700, 0);
        assert!(matches!(
            Hello::decode(&big),
            Err(WireError::TooLong { .. })
        ));
    }
}
