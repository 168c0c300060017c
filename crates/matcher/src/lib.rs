//! Matching, the coordinator's pure core: a spatial index of online sharers,
//! the region a scene gives the search, compatibility filters and scoring.
//!
//! No I/O, no clocks: the coordinator owns one [`Index`] and calls
//! [`rank`] with a [`Query`]; the result says who is offered and, when asked,
//! why every nearby sharer was or was not. Tested by unit and property tests
//! against a brute-force scan.

pub mod index;
pub mod rank;
pub mod region;

pub use index::{Index, RadioKey, SharerId, SharerInfo, Summary};
pub use rank::{Candidate, MatchConfig, Outcome, Query, Verdict, rank, rank_in};
pub use region::{Evidence, Region, RegionConfig, SceneDecision, decide_scene};
