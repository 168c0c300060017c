//! The QUIC data plane (ALPN `bandshare/1`).
//!
//! - [`wire`]: the versioned hello and flow-header formats (pure codecs).
//! - [`tls`]: self-signed relay certificates and pin verification.
//! - [`serve`]: the sharer's relay: verifies tickets offline, applies the
//!   egress policy to resolved addresses, dials, splices bytes both ways
//!   with half-close, and counts bytes per requester.
//! - [`tunnel`]: the requester's client: connect with a ticket, open flows.
//!
//! Tested end to end through `bandshare-testkit` (real QUIC on loopback) and
//! by round-trip property tests of the codecs.

pub mod admit;
mod dial;
pub mod limits;
pub mod own;
pub mod serve;
pub mod splice;
pub mod state;
pub mod tls;
pub mod tunnel;
pub mod wire;

pub use limits::Limits;
pub use serve::{Relay, RelayOptions};
pub use state::{RelayHandle, UsageDelta};
pub use tunnel::{FlowError, Tunnel, TunnelError};
pub use wire::{FlowHeader, Host, UplinkHealth};
