//! The words of bandshare as plain types: device keys, positions and distance
//! bands, scenes, services and network types, link state, tickets, the
//! egress policy and reconnect backoff.
//!
//! Pure: no sockets, files or clocks. Callers pass `now`. Every parser of
//! outside input returns a `Result` whose error says what was expected and
//! what came. Tested by unit and property tests in each module.

pub mod accept;
pub mod backoff;
pub mod clock;
pub mod egress;
pub mod enu;
pub mod geo;
pub mod key;
pub mod link;
pub mod name;
pub mod radio;
pub mod scene;
pub mod service;
pub mod ticket;

pub use backoff::Backoff;
pub use egress::{Cidr, EgressPolicy, EgressRule};
pub use geo::{DistanceBand, Position};
pub use key::DeviceKey;
pub use link::LinkState;
pub use radio::Fingerprint;
pub use scene::Scene;
pub use service::{NetworkType, Security, Service, ServiceSet};
pub use ticket::{
    MAC_TICKET_LEN, Seal, SealError, SealedMacKey, Ticket, TicketError, TicketSigner,
    TicketVerifier,
};
