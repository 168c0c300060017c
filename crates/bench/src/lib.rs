//! `bandshare bench …`: measurements side by side with the systems a user
//! would build instead, in the same run on the same machine.
//!
//! - [`matching`]: the index and full share requests vs Redis GEO.
//! - [`relay`]: bulk throughput and first-byte latency vs direct TCP and
//!   shadowsocks-rust.
//! - [`scale`]: many sharer streams on one coordinator process.
//! - [`scaleout`]: coordinators on a Redis Cluster vs one on its own.
//! - [`failover`]: a sharer killed or its link cut, to the first new flow.
//! - [`qos`]: the QoS map on real commute traces vs a grid baseline.
//! - [`tun`]: whole-device mode vs the proxy vs no bandshare, across
//!   network namespaces.
//!
//! Benchmarks are not tests: nothing here asserts a speed. Every run prints
//! a readable report to stderr and, with `--json`, one JSON object as the
//! last line of stdout.

pub mod failover;
pub mod matching;
pub mod plot;
pub mod qos;
pub mod redis;
pub mod relay;
pub mod scale;
pub mod scaleout;
pub mod stats;
pub mod tun;
