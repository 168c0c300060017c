//! Talking to the coordinator: parsing its URL, connecting with a clear
//! error when it cannot be reached, and the one-shot share request.

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

/// Accepts `http://host:port` or `host:port`.
pub fn normalize_url(s: &str) -> Result<String, CoordinatorError> {
    let url = if s.contains("://") {
        s.to_string()
    } else {
        format!("http://{s}")
    };
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| CoordinatorError::Url(s.to_string()))?;
    let hostport = rest.trim_end_matches('/');
    let ok = hostport
        .rsplit_once(':')
        .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
    if !ok || hostport.contains('/') {
        return Err(CoordinatorError::Url(s.to_string()));
    }
    Ok(url.trim_end_matches('/').to_string())
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

pub async fn connect(url: &str) -> Result<Channel, CoordinatorError> {
    let url = normalize_url(url)?;
    let ep = Endpoint::from_shared(url.clone())
        .map_err(|_| CoordinatorError::Url(url.clone()))?
        .connect_timeout(Duration::from_secs(3))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    ep.connect()
        .await
        .map_err(|e| CoordinatorError::Unreachable(url, chain(&e)))
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
        .map_err(|s| match s.code() {
            tonic::Code::Unavailable | tonic::Code::Unknown => {
                CoordinatorError::Unreachable("coordinator".into(), s.message().to_string())
            }
            _ => CoordinatorError::Status(s.code(), s.message().to_string()),
        })
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
        ] {
            assert!(normalize_url(bad).is_err(), "{bad}");
        }
    }
}
