//! The QUIC data plane (ALPN `bandshare/1`).
//!
//! - [`wire`]: the versioned hello, flow-header, renewal and probe formats
//!   (pure codecs); [`datagram`]: UDP in QUIC DATAGRAM frames.
//! - [`admit`]: who is let in, sans-I/O (proof of key, ticket, replay,
//!   revocation, capacity, source slots).
//! - [`limits`]: byte allowances and the rate, spent read by read.
//! - [`state`]: the relay's shared state and the agent's [`RelayHandle`].
//! - [`own`]: this machine's addresses, current at every dial.
//! - [`serve`]: the async relay: accepts, admits, relays each flow to a
//!   destination the egress policy allows, with half-close, and counts;
//!   [`udp`]: the same for UDP datagrams, with per-requester caps.
//! - [`tls`]: self-signed relay certificates and pin verification.
//! - [`mark`]: the `SO_MARK` on bandshare's own outgoing sockets.
//! - [`tunnel`]: the requester's client: connect with a ticket, open flows,
//!   renew the ticket.
//!
//! Tested end to end through `bandshare-testkit` (real QUIC on loopback) and
//! by round-trip property tests of the codecs.

pub mod admit;
pub mod datagram;
mod dial;
pub mod limits;
pub mod mark;
pub mod own;
pub mod serve;
pub mod splice;
pub mod state;
pub mod tls;
pub mod tunnel;
pub mod udp;
pub mod wire;

pub use limits::Limits;
pub use serve::{Relay, RelayOptions};
pub use state::{RelayHandle, UsageDelta};
pub use tunnel::{FlowError, Tunnel, TunnelError};
pub use wire::{FlowHeader, Host, UplinkHealth};
