//! Parsers for what local applications send the requester's proxy: SOCKS5
//! (RFC 1928, no-auth CONNECT) and HTTP CONNECT. Sans-I/O: each takes the
//! bytes received so far and returns `Incomplete`, a value and how many
//! bytes it used, or an error. Never panics on any input.

use bandshare_relay::wire::{FlowHeader, Host, check_name};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

#[derive(Debug, PartialEq, Eq)]
pub enum Parse<T> {
    Incomplete,
    Done(T, usize),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProxyError {
    #[error("not SOCKS version 5 (got {0})")]
    Version(u8),
    #[error("client offers no 'no authentication' method")]
    NoAcceptableMethod,
    #[error("unsupported SOCKS command {0} (CONNECT and UDP ASSOCIATE only)")]
    Command(u8),
    #[error("bad SOCKS UDP datagram: {0}")]
    Udp(&'static str),
    #[error("unsupported address type {0}")]
    AddressType(u8),
    #[error("bad host name")]
    Name,
    #[error("bad HTTP request: {0}")]
    Http(String),
    #[error("request head larger than {MAX_HEAD} bytes")]
    TooLarge,
}

pub const MAX_HEAD: usize = 8192;

/// Greeting: `VER NMETHODS METHODS...`; Ok when method 0 (no auth) is offered.
pub fn parse_greeting(b: &[u8]) -> Result<Parse<()>, ProxyError> {
    let (Some(&v), Some(&n)) = (b.first(), b.get(1)) else {
        return Ok(Parse::Incomplete);
    };
    if v != 5 {
        return Err(ProxyError::Version(v));
    }
    let Some(methods) = b.get(2..2 + n as usize) else {
        return Ok(Parse::Incomplete);
    };
    if !methods.contains(&0) {
        return Err(ProxyError::NoAcceptableMethod);
    }
    Ok(Parse::Done((), 2 + n as usize))
}

/// Request: `VER CMD RSV ATYP DST.ADDR DST.PORT`. Only CONNECT (1).
pub fn parse_request(b: &[u8]) -> Result<Parse<FlowHeader>, ProxyError> {
    match parse_command(b)? {
        Parse::Done((CONNECT, h), used) => Ok(Parse::Done(h, used)),
        Parse::Done((cmd, _), _) => Err(ProxyError::Command(cmd)),
        Parse::Incomplete => Ok(Parse::Incomplete),
    }
}

/// The SOCKS5 command CONNECT.
pub const CONNECT: u8 = 1;
/// The SOCKS5 command UDP ASSOCIATE (RFC 1928 §7).
pub const UDP_ASSOCIATE: u8 = 3;

/// A request `VER CMD RSV ATYP ADDR PORT` for CONNECT or UDP ASSOCIATE:
/// the command and the address.
pub fn parse_command(b: &[u8]) -> Result<Parse<(u8, FlowHeader)>, ProxyError> {
    if b.len() < 5 {
        return Ok(Parse::Incomplete);
    }
    if b[0] != 5 {
        return Err(ProxyError::Version(b[0]));
    }
    if b[1] != CONNECT && b[1] != UDP_ASSOCIATE {
        return Err(ProxyError::Command(b[1]));
    }
    match parse_address(&b[3..])? {
        Some((h, used)) => Ok(Parse::Done((b[1], h), 3 + used)),
        None => Ok(Parse::Incomplete),
    }
}

/// `ATYP ADDR PORT` at the start of `b`: the address and the bytes it took;
/// `None` when more bytes are needed.
fn parse_address(b: &[u8]) -> Result<Option<(FlowHeader, usize)>, ProxyError> {
    let Some(&atyp) = b.first() else {
        return Ok(None);
    };
    let (addr_len, start) = match atyp {
        1 => (4, 1),
        4 => (16, 1),
        3 => match b.get(1) {
            Some(&n) => (n as usize, 2),
            None => return Ok(None),
        },
        t => return Err(ProxyError::AddressType(t)),
    };
    let end = start + addr_len;
    let Some(port) = b.get(end..end + 2) else {
        return Ok(None);
    };
    let port = u16::from_be_bytes([port[0], port[1]]);
    let a = &b[start..end];
    let host = match atyp {
        1 => Host::Ip(IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3]))),
        4 => {
            let mut o = [0u8; 16];
            o.copy_from_slice(a);
            Host::Ip(IpAddr::V6(Ipv6Addr::from(o)))
        }
        _ => Host::Name(check_name(a).map_err(|_| ProxyError::Name)?.to_string()),
    };
    Ok(Some((FlowHeader { host, port }, end + 2)))
}

/// A SOCKS5 UDP request datagram `RSV(2) FRAG ATYP ADDR PORT DATA`: the
/// destination and the data. Fragments are not supported (RFC 1928 lets a
/// relay drop them).
pub fn parse_udp(b: &[u8]) -> Result<(FlowHeader, &[u8]), ProxyError> {
    if b.len() < 4 {
        return Err(ProxyError::Udp("shorter than its header"));
    }
    if b[0] != 0 || b[1] != 0 {
        return Err(ProxyError::Udp("reserved bytes are not zero"));
    }
    if b[2] != 0 {
        return Err(ProxyError::Udp("fragments are not supported"));
    }
    match parse_address(&b[3..])? {
        Some((h, used)) => Ok((h, &b[3 + used..])),
        None => Err(ProxyError::Udp("address cut short")),
    }
}

/// A SOCKS5 UDP reply datagram from `from` carrying `data`.
pub fn encode_udp(from: std::net::SocketAddr, data: &[u8]) -> Vec<u8> {
    let mut b = vec![0, 0, 0];
    match from.ip().to_canonical() {
        IpAddr::V4(a) => {
            b.push(1);
            b.extend_from_slice(&a.octets());
        }
        IpAddr::V6(a) => {
            b.push(4);
            b.extend_from_slice(&a.octets());
        }
    }
    b.extend_from_slice(&from.port().to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// A SOCKS5 success reply naming the bound address (UDP ASSOCIATE tells
/// the client where to send its datagrams).
pub fn reply_bound(bound: std::net::SocketAddr) -> Vec<u8> {
    let mut b = vec![5, 0, 0];
    b.extend_from_slice(&encode_udp(bound, &[])[3..]);
    b
}

/// A SOCKS5 reply with `code` and an all-zero bound address.
pub fn reply(code: u8) -> [u8; 10] {
    [5, code, 0, 1, 0, 0, 0, 0, 0, 0]
}

/// `host:port` or `[v6]:port` into a flow target.
pub fn parse_authority(s: &str) -> Option<FlowHeader> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, p) = rest.split_once("]:")?;
        (Host::Ip(IpAddr::V6(h.parse().ok()?)), p)
    } else {
        let (h, p) = s.rsplit_once(':')?;
        let host = match h.parse::<IpAddr>() {
            Ok(ip) => Host::Ip(ip),
            Err(_) => Host::Name(check_name(h.as_bytes()).ok()?.to_string()),
        };
        (host, p)
    };
    Some(FlowHeader {
        host,
        port: port.parse().ok().filter(|p| *p > 0)?,
    })
}

/// Where the head ends: the first empty line, its terminator CRLF or a
/// bare LF (RFC 9112 §2.2 lets a recipient accept a bare LF). Returns the
/// length of the head before the blank line and of the whole head.
fn head_end(b: &[u8]) -> Option<(usize, usize)> {
    let mut line_start = 0;
    for (i, &c) in b.iter().enumerate() {
        if c != b'\n' {
            continue;
        }
        let line = &b[line_start..i];
        if line.is_empty() || line == b"\r" {
            return Some((line_start, i + 1));
        }
        line_start = i + 1;
    }
    None
}

/// The reply a SOCKS4 client understands: version 0, "request rejected
/// or failed" (91), no address. bandshare speaks SOCKS5 only.
pub const SOCKS4_REJECTED: [u8; 8] = [0, 91, 0, 0, 0, 0, 0, 0];

/// The SOCKS5 reply code for a request that could not be parsed.
pub fn request_error_code(e: &ProxyError) -> u8 {
    match e {
        ProxyError::Command(_) => 0x07,
        ProxyError::AddressType(_) => 0x08,
        _ => 0x01,
    }
}

/// `CONNECT host:port HTTP/1.x` and headers up to the blank line.
pub fn parse_http_connect(b: &[u8]) -> Result<Parse<FlowHeader>, ProxyError> {
    let Some((end, used)) = head_end(b) else {
        return if b.len() > MAX_HEAD {
            Err(ProxyError::TooLarge)
        } else {
            Ok(Parse::Incomplete)
        };
    };
    if end > MAX_HEAD {
        return Err(ProxyError::TooLarge);
    }
    let head = std::str::from_utf8(&b[..end]).map_err(|_| ProxyError::Http("not UTF-8".into()))?;
    let line = head
        .lines()
        .next()
        .unwrap_or_default()
        .trim_end_matches('\r');
    let mut parts = line.split(' ');
    let (method, target, version) = (parts.next(), parts.next(), parts.next());
    if method != Some("CONNECT") {
        return Err(ProxyError::Http(format!(
            "only CONNECT is supported, got {:?}",
            method.unwrap_or_default()
        )));
    }
    if !version.is_some_and(|v| v.starts_with("HTTP/1.")) || parts.next().is_some() {
        return Err(ProxyError::Http(format!("malformed request line {line:?}")));
    }
    let target = target
        .and_then(parse_authority)
        .ok_or_else(|| ProxyError::Http(format!("bad CONNECT target in {line:?}")))?;
    Ok(Parse::Done(target, used))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn http_connect_heads_end_at_crlf_or_bare_lf() {
        let t = FlowHeader {
            host: Host::Name("example.net".into()),
            port: 443,
        };
        for (head, used) in [
            (
                &b"CONNECT example.net:443 HTTP/1.1\r\nHost: x\r\n\r\nEARLY"[..],
                45,
            ),
            (b"CONNECT example.net:443 HTTP/1.1\nHost: x\n\nEARLY", 42),
            (b"CONNECT example.net:443 HTTP/1.1\n\n", 34),
            (b"CONNECT example.net:443 HTTP/1.1\r\n\n", 35),
        ] {
            assert_eq!(
                parse_http_connect(head),
                Ok(Parse::Done(t.clone(), used)),
                "{head:?}"
            );
        }
        assert_eq!(
            parse_http_connect(b"CONNECT example.net:443 HTTP/1.1\n"),
            Ok(Parse::Incomplete)
        );
        assert_eq!(request_error_code(&ProxyError::AddressType(9)), 0x08);
        assert_eq!(request_error_code(&ProxyError::Command(2)), 0x07);
    }

    #[test]
    fn socks() {
        assert_eq!(parse_greeting(&[5]), Ok(Parse::Incomplete));
        assert_eq!(parse_greeting(&[5, 2, 2, 0]), Ok(Parse::Done((), 4)));
        assert_eq!(
            parse_greeting(&[5, 1, 2]),
            Err(ProxyError::NoAcceptableMethod)
        );
        assert_eq!(parse_greeting(&[4, 1, 0]), Err(ProxyError::Version(4)));
        let req = [
            5, 1, 0, 3, 9, b'l', b'o', b'c', b'a', b'l', b'h', b'o', b's', b't', 0, 80,
        ];
        assert_eq!(parse_request(&req[..10]), Ok(Parse::Incomplete));
        assert_eq!(
            parse_request(&req),
            Ok(Parse::Done(
                FlowHeader {
                    host: Host::Name("localhost".into()),
                    port: 80
                },
                16
            ))
        );
        assert_eq!(
            parse_request(&[5, 2, 0, 1, 0, 0, 0, 0, 0, 0]),
            Err(ProxyError::Command(2))
        );
        let v6 = [[5, 1, 0, 4].as_slice(), &[0; 15], &[1, 1, 187]].concat();
        assert_eq!(
            parse_request(&v6),
            Ok(Parse::Done(
                FlowHeader {
                    host: Host::Ip("::1".parse().expect("ip")),
                    port: 443
                },
                22
            ))
        );
    }

    #[test]
    fn http() {
        let r = b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\nextra";
        assert_eq!(
            parse_http_connect(r),
            Ok(Parse::Done(
                FlowHeader {
                    host: Host::Name("example.com".into()),
                    port: 443
                },
                r.len() - 5
            ))
        );
        assert_eq!(
            parse_http_connect(b"CONNECT a:1 HTTP/1.1\r\n"),
            Ok(Parse::Incomplete)
        );
        assert!(parse_http_connect(b"GET / HTTP/1.1\r\n\r\n").is_err());
        assert!(parse_http_connect(b"CONNECT nohost HTTP/1.1\r\n\r\n").is_err());
        let r = b"CONNECT [::1]:8080 HTTP/1.0\r\n\r\n";
        assert!(matches!(
            parse_http_connect(r),
            Ok(Parse::Done(FlowHeader { port: 8080, .. }, _))
        ));
        assert_eq!(
            parse_http_connect(&vec![b'a'; MAX_HEAD + 1]),
            Err(ProxyError::TooLarge)
        );
    }

    fn host() -> impl Strategy<Value = Host> {
        prop_oneof![
            any::<[u8; 4]>().prop_map(|o| Host::Ip(std::net::IpAddr::from(o))),
            any::<[u8; 16]>().prop_map(|o| Host::Ip(std::net::IpAddr::from(o))),
            "[a-z0-9][a-z0-9.-]{0,60}".prop_map(Host::Name),
        ]
    }

    proptest! {
        /// A SOCKS5 client's request for any target parses back to it; its
        /// address part is the flow header's after the version byte.
        #[test]
        fn socks_request_round_trip(host in host(), port in any::<u16>(), tail in proptest::collection::vec(any::<u8>(), 0..8)) {
            let h = FlowHeader { host, port };
            let wire = h.encode().expect("encodes");
            let req = [&[5u8, 1, 0][..], &wire[1..], &tail].concat();
            prop_assert_eq!(parse_request(&req), Ok(Parse::Done(h, req.len() - tail.len())));
        }

        #[test]
        fn http_connect_round_trip(host in host(), port in any::<u16>()) {
            let authority = match &host {
                Host::Ip(std::net::IpAddr::V6(v6)) => format!("[{v6}]:{port}"),
                Host::Ip(v4) => format!("{v4}:{port}"),
                Host::Name(n) => format!("{n}:{port}"),
            };
            let req = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n");
            match parse_http_connect(req.as_bytes()) {
                Ok(Parse::Done(got, used)) => {
                    prop_assert_eq!(used, req.len());
                    prop_assert_eq!(got.port, port);
                    let same = match (&got.host, &host) {
                        (Host::Name(a), Host::Ip(b)) => a.parse::<std::net::IpAddr>().ok() == Some(*b),
                        (a, b) => a == b,
                    };
                    prop_assert!(same, "{:?} != {:?}", got.host, host);
                }
                other => prop_assert!(false, "{req:?} -> {other:?}"),
            }
        }

        #[test]
        fn never_panic(b in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse_greeting(&b);
            let _ = parse_request(&b);
            let _ = parse_http_connect(&b);
        }
    }

    #[test]
    fn udp_associate_and_datagrams() {
        let req = [5, 3, 0, 1, 0, 0, 0, 0, 0, 0];
        assert_eq!(
            parse_command(&req),
            Ok(Parse::Done(
                (
                    UDP_ASSOCIATE,
                    FlowHeader {
                        host: Host::Ip(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
                        port: 0
                    }
                ),
                10
            ))
        );
        assert_eq!(parse_request(&req), Err(ProxyError::Command(3)));
        let mut d = vec![0, 0, 0, 3, 7];
        d.extend_from_slice(b"example");
        d.extend_from_slice(&53u16.to_be_bytes());
        d.extend_from_slice(b"query");
        let (h, data) = parse_udp(&d).expect("parses");
        assert_eq!(
            (h.host, h.port, data),
            (Host::Name("example".into()), 53, &b"query"[..])
        );
        let mut frag = d.clone();
        frag[2] = 1;
        assert!(parse_udp(&frag).is_err());
        for cut in 0..12 {
            assert!(parse_udp(&d[..cut]).is_err(), "cut at {cut}");
        }
        let from: std::net::SocketAddr = "[::ffff:10.0.0.1]:53".parse().expect("addr");
        let back = encode_udp(from, b"answer");
        let (h, data) = parse_udp(&back).expect("round trip");
        assert_eq!(h.host, Host::Ip("10.0.0.1".parse().expect("ip")));
        assert_eq!(data, b"answer");
        assert_eq!(
            reply_bound("127.0.0.1:9".parse().expect("a")),
            vec![5, 0, 0, 1, 127, 0, 0, 1, 0, 9]
        );
    }
}
