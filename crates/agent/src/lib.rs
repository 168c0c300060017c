//! The agents on devices.
//!
//! - [`sharer`]: `bandshare share`: the stream to the coordinator with
//!   reconnect, measured link-state reports, automatic consent answers, and
//!   the QUIC relay it runs beside.
//! - [`requester`]: `bandshare connect`: share requests, the warm pool of
//!   tunnels, the active choice, and the local SOCKS5 / HTTP CONNECT proxy,
//!   port forwards and `GET /status`.
//!
//! Shared pieces: device [`identity`], the coordinator [`client`] and
//! [`location`] flags. Pure decisions (consent, probe statistics, pool
//! choice, SOCKS parsing) are plain functions with unit tests; the async
//! shells are tested end to end through `bandshare-testkit`.

pub mod client;
pub mod identity;
pub mod location;
pub mod probe;
mod prom;
pub mod qos;
pub mod requester;
pub mod sharer;
pub mod shutdown;

pub use shutdown::Shutdown;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Coordinator(#[from] client::CoordinatorError),
    #[error("device identity: {0}")]
    Identity(#[from] identity::IdentityError),
    #[error("relay: {0}")]
    Relay(#[from] bandshare_relay::serve::RelayError),
    #[error("cannot listen on {0}: {1}")]
    Listen(std::net::SocketAddr, std::io::Error),
    /// The coordinator refused this device for a reason retrying cannot
    /// change (a bad or taken name, a second process with the same key).
    #[error("coordinator refused this sharer: {0}")]
    Refused(String),
    /// The stream to the coordinator broke or broke its protocol; the
    /// sharer reconnects with backoff.
    #[error("coordinator stream: {0}")]
    Stream(String),
    /// An agent's own task ended by panicking or being cancelled.
    #[error("agent task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}
