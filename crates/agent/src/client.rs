//! The coordinator client: parsing the coordinator's URL, connecting with
//! a clear error when it cannot be reached, and the one-shot share request.

use bandshare_proto::v1;
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error("bad coordinator address {0:?}: expected http://HOST:PORT or HOST:PORT")]
    Url(String),
    #[error("cannot reach coordinator at {0}: {1}")]
    Unreachable(String, String),
    #[error("coordinator refused the request: {1}")]
    Status(tonic::Code, String),
    #[error("{0}")]
    Pin(String),
}

impl CoordinatorError {
    /// The gRPC code of a refusal (RESOURCE_EXHAUSTED when overloaded or
    /// rate limited), if the coordinator answered at all.
    pub fn status_code(&self) -> Option<tonic::Code> {
        match self {
            CoordinatorError::Status(code, _) => Some(*code),
            _ => None,
        }
    }
}

/// A coordinator's address, checked and normalised once where it enters
/// (a flag, a config, a test): `http://HOST:PORT` or `https://HOST:PORT#PIN`,
/// or several of them separated by commas — coordinators of one service
/// (`server --redis`), tried in a random order until one answers.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ServerUrl(String);

impl ServerUrl {
    /// See [`normalize_url`] for what is accepted, for each of a
    /// comma-separated list.
    pub fn parse(s: &str) -> Result<ServerUrl, CoordinatorError> {
        let all = s
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(normalize_url)
            .collect::<Result<Vec<_>, _>>()?;
        if all.is_empty() {
            return Err(CoordinatorError::Url(s.to_string()));
        }
        Ok(ServerUrl(all.join(",")))
    }

    /// The address as given, normalised (comma-separated when several).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Each coordinator's address.
    pub fn urls(&self) -> impl Iterator<Item = &str> {
        self.0.split(',')
    }

    /// `HOST:PORT` of the first coordinator, without the scheme and the pin.
    pub fn host_port(&self) -> &str {
        let first = self.urls().next().unwrap_or(&self.0);
        let rest = first.split_once("://").map_or(first, |(_, r)| r);
        rest.split('#').next().unwrap_or(rest)
    }
}

impl std::str::FromStr for ServerUrl {
    type Err = CoordinatorError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ServerUrl::parse(s)
    }
}

impl std::fmt::Display for ServerUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Accepts `http://host:port`, `host:port`, or `https://host:port#PIN`
/// where PIN is the 64 hex digits of the server certificate's SHA-256
/// (`--server-pin`; the server prints it).
pub fn normalize_url(s: &str) -> Result<String, CoordinatorError> {
    let url = if s.contains("://") {
        s.to_string()
    } else {
        format!("http://{s}")
    };
    let (url, pin) = match url.split_once('#') {
        Some((u, p)) => (u.to_string(), Some(p.to_string())),
        None => (url, None),
    };
    let (tls, rest) = match (url.strip_prefix("http://"), url.strip_prefix("https://")) {
        (Some(r), _) => (false, r),
        (_, Some(r)) => (true, r),
        _ => return Err(CoordinatorError::Url(s.to_string())),
    };
    let hostport = rest.trim_end_matches('/');
    let ok = hostport
        .rsplit_once(':')
        .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
    if !ok || hostport.contains('/') {
        return Err(CoordinatorError::Url(s.to_string()));
    }
    match (tls, pin) {
        (false, None) => Ok(format!("http://{hostport}")),
        (false, Some(_)) => Err(CoordinatorError::Pin(
            "--server-pin needs an https:// server address".into(),
        )),
        (true, None) => Err(CoordinatorError::Pin(
            "https:// needs --server-pin (the server prints its pin at start; `bandshare admin pin` shows it)".into(),
        )),
        (true, Some(p)) => {
            parse_pin(&p)?;
            Ok(format!("https://{hostport}#{}", p.to_ascii_lowercase()))
        }
    }
}

/// 64 hex digits (optionally `sha256:`-prefixed, with `:` separators).
pub fn parse_pin(s: &str) -> Result<[u8; 32], CoordinatorError> {
    let hex: String = s
        .trim()
        .trim_start_matches("sha256:")
        .chars()
        .filter(|c| *c != ':')
        .collect();
    let bad = || CoordinatorError::Pin(format!("server pin {s:?} is not 64 hex digits"));
    if hex.len() != 64 {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16)
            .map_err(|_| bad())?;
    }
    Ok(out)
}

/// Adds `--server-pin` to a server address (to each of a comma-separated
/// list) as its `#PIN` part.
pub fn with_pin(server: &str, pin: Option<&str>) -> String {
    match pin {
        Some(p) => server
            .split(',')
            .map(|s| format!("{}#{p}", s.split('#').next().unwrap_or(s)))
            .collect::<Vec<_>>()
            .join(","),
        None => server.to_string(),
    }
}

/// The error and its causes on one line.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

/// A byte stream to the coordinator.
pub trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static> Io for T {}

/// Opens a byte stream to `(host, port)` some other way than a TCP connect
/// out of the own link: e.g. a flow through a sharer when the own link is
/// down.
pub type Dial = std::sync::Arc<
    dyn Fn(
            String,
            u16,
        ) -> std::pin::Pin<Box<dyn Future<Output = std::io::Result<Box<dyn Io>>> + Send>>
        + Send
        + Sync,
>;

/// How long a connection to the coordinator may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// A channel to the coordinator over a direct TCP connection.
pub async fn connect(url: &ServerUrl) -> Result<Channel, CoordinatorError> {
    connect_with(url, None).await
}

/// A channel to the coordinator; its bytes go through `dial` when given.
/// Over TLS the pinned certificate is checked either way. Of several
/// coordinators, each is tried in a random order until one answers (so
/// agents spread over the service, and move on when one is gone); the
/// error is the last one's.
pub async fn connect_with(
    url: &ServerUrl,
    dial: Option<Dial>,
) -> Result<Channel, CoordinatorError> {
    let mut all: Vec<&str> = url.urls().collect();
    fastrand::shuffle(&mut all);
    let mut last = CoordinatorError::Url(url.0.clone());
    for one in all {
        match connect_one(one, dial.clone()).await {
            Ok(c) => return Ok(c),
            Err(e @ CoordinatorError::Pin(_)) => return Err(e),
            Err(e) => last = e,
        }
    }
    Err(last)
}

async fn connect_one(url: &str, dial: Option<Dial>) -> Result<Channel, CoordinatorError> {
    let (base, pin) = match url.split_once('#') {
        Some((u, p)) => (u.to_string(), Some(parse_pin(p)?)),
        None => (url.to_string(), None),
    };
    // Over TLS, tonic sees a plain http:// endpoint and the connector below
    // does TLS itself, trusting only the pinned certificate.
    let plain = base.replacen("https://", "http://", 1);
    let ep = Endpoint::from_shared(plain)
        .map_err(|_| CoordinatorError::Url(base.clone()))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    let unreachable =
        |e: tonic::transport::Error| CoordinatorError::Unreachable(base.clone(), chain(&e));
    if pin.is_none() && dial.is_none() && bandshare_relay::mark::get().is_none() {
        return ep.connect().await.map_err(unreachable);
    }
    let tls = match pin {
        Some(pin) => Some(tokio_rustls::TlsConnector::from(std::sync::Arc::new(
            bandshare_relay::tls::pinned_client(
                pin,
                vec![b"h2".to_vec()],
                "coordinator certificate does not match --server-pin",
            )
            .map_err(|e| CoordinatorError::Pin(e.to_string()))?,
        ))),
        None => None,
    };
    let connector = tower::service_fn(move |uri: tonic::codegen::http::Uri| {
        let (tls, dial) = (tls.clone(), dial.clone());
        async move {
            let host = uri
                .host()
                .unwrap_or("localhost")
                .trim_matches(|c| c == '[' || c == ']')
                .to_string();
            let port = uri.port_u16().unwrap_or(443);
            let stream: Box<dyn Io> = match dial {
                Some(d) => d(host, port).await?,
                // Marked in whole-device mode: the original routes.
                None => Box::new(bandshare_relay::mark::tcp_connect_host(&host, port).await?),
            };
            let stream: Box<dyn Io> = match tls {
                Some(connector) => {
                    let name = rustls::pki_types::ServerName::try_from("bandshare-coordinator")
                        .map_err(std::io::Error::other)?;
                    Box::new(connector.connect(name, stream).await?)
                }
                None => stream,
            };
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
        }
    });
    ep.connect_with_connector(connector)
        .await
        .map_err(unreachable)
}

/// A proof of holding `key`, signed now or reused from the last
/// [`bandshare_core::ticket::PROOF_REUSE_S`] seconds (the coordinator
/// compares a proof it verified before instead of verifying it again).
pub fn request_proof(key: &ed25519_dalek::SigningKey) -> (Vec<u8>, u64) {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    /// Per key: the last proof and when it was signed.
    type Proofs = HashMap<[u8; 32], (Vec<u8>, u64)>;
    static LAST: OnceLock<Mutex<Proofs>> = OnceLock::new();
    let now = unix_now();
    let me = key.verifying_key().to_bytes();
    let last = LAST.get_or_init(Mutex::default);
    if let Ok(g) = last.lock()
        && let Some((proof, at)) = g.get(&me)
        && now >= *at
        && now - at < bandshare_core::ticket::PROOF_REUSE_S
    {
        return (proof.clone(), *at);
    }
    let fresh = bandshare_core::ticket::sign_request(key, now);
    if let Ok(mut g) = last.lock() {
        if g.len() >= 1024 {
            g.clear();
        }
        g.insert(me, fresh.clone());
    }
    fresh
}

/// The requester's key and its proof of holding it: the rest of a
/// [`v1::ShareRequest`] (`..signed_by(&key)`).
pub fn signed_by(key: &ed25519_dalek::SigningKey) -> v1::ShareRequest {
    let (proof, signed_at_unix) = request_proof(key);
    v1::ShareRequest {
        requester_key: key.verifying_key().to_bytes().to_vec(),
        proof,
        signed_at_unix,
        ..Default::default()
    }
}

use bandshare_core::clock::unix_now;

/// A share request from `key` at `location` for `conditions`, signed now;
/// with `explain` the coordinator says why each nearby sharer was or was
/// not offered.
pub fn share_request_from(
    key: &ed25519_dalek::SigningKey,
    location: &crate::location::LocationSpec,
    conditions: &crate::location::ConditionSpec,
    explain: bool,
) -> v1::ShareRequest {
    v1::ShareRequest {
        location: Some(location.to_wire()),
        conditions: Some(conditions.to_wire()),
        explain,
        ..signed_by(key)
    }
}

pub async fn share_request(
    channel: Channel,
    req: v1::ShareRequest,
) -> Result<v1::ShareResponse, CoordinatorError> {
    let mut client = v1::matchmaker_client::MatchmakerClient::new(channel);
    client
        .request_share(req)
        .await
        .map(|r| r.into_inner())
        .map_err(status_error)
}

/// A refusal as the user reads it; a plaintext client talking to a TLS
/// server sees an HTTP/2 protocol error, so that one says what to do.
pub fn status_error(s: tonic::Status) -> CoordinatorError {
    let msg = s.message().to_string();
    // The connection was made but the call broke: how a plaintext HTTP/2
    // client sees a TLS server hang up on it (the message varies: "h2
    // protocol error", "operation was canceled", a reset...).
    // A refusal the coordinator itself sent (UNAVAILABLE with its reason,
    // e.g. its Redis is unreachable) has no local cause and is kept as is.
    let broken = (matches!(
        s.code(),
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
    ) && std::error::Error::source(&s).is_some())
        || msg.contains("h2 protocol error");
    match s.code() {
        _ if broken => CoordinatorError::Unreachable(
            "coordinator".into(),
            format!("{msg} (does the server use TLS? then give https://… and --server-pin)"),
        ),
        code => CoordinatorError::Status(code, msg),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            normalize_url("127.0.0.1:7400").expect("ok"),
            "http://127.0.0.1:7400"
        );
        assert_eq!(normalize_url("http://h:1/").expect("ok"), "http://h:1");
        for bad in [
            "",
            "nohost",
            "http://h",
            "h:0",
            "h:99999",
            "ftp://h:1",
            "h:1/x",
            "http://h:1#00",
            "https://h:1",
            "https://h:1#abc",
        ] {
            assert!(normalize_url(bad).is_err(), "{bad}");
        }
        let pin = "AB".repeat(32);
        assert_eq!(
            normalize_url(&with_pin("https://h:1", Some(&pin))).expect("ok"),
            format!("https://h:1#{}", pin.to_lowercase())
        );
        assert_eq!(
            parse_pin(&format!("sha256:{pin}")).expect("pin"),
            [0xab; 32]
        );
        let tls = ServerUrl::parse(&with_pin("https://h:1/", Some(&pin))).expect("ok");
        assert_eq!(tls.host_port(), "h:1");
        assert_eq!(
            ServerUrl::parse("[::1]:7").expect("ok").host_port(),
            "[::1]:7"
        );
        assert_eq!(
            "h:2".parse::<ServerUrl>().expect("ok").to_string(),
            "http://h:2"
        );
    }
}
