//! The relay's shared state (`RelayState`): who is admitted (the [`Gate`]),
//! the egress policy and the machine's own addresses, per-requester
//! allowances and counters, open connections by requester; and
//! [`RelayHandle`], the narrow view the sharer agent holds.

use crate::admit::Gate;
use crate::limits::{Allowance, Bucket, Limits};
use crate::wire::UplinkHealth;
use bandshare_core::{DeviceKey, EgressPolicy};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::info;

/// Bytes one requester moved since the last [`RelayHandle::take_usage`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsageDelta {
    pub requester: DeviceKey,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub flows: u32,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) up: AtomicU64,
    pub(crate) down: AtomicU64,
    pub(crate) flows: AtomicU64,
}

pub(crate) struct RelayState {
    pub(crate) pin: [u8; 32],
    /// Who may connect: tickets, revocations, places, source slots.
    pub(crate) gate: Mutex<Gate>,
    pub(crate) egress: EgressPolicy,
    /// This machine's addresses, read again whenever they change.
    pub(crate) own: crate::own::OwnAddresses,
    pub(crate) usage: Mutex<HashMap<DeviceKey, Arc<Counters>>>,
    pub(crate) total: AtomicU64,
    /// TCP bytes relayed since start: towards the destination (up) and
    /// back to requesters (down).
    pub(crate) total_up: AtomicU64,
    pub(crate) total_down: AtomicU64,
    /// Flows refused since start, by reason.
    pub(crate) flows_refused: Mutex<std::collections::BTreeMap<&'static str, u64>>,
    pub(crate) hello_timeout: Duration,
    /// Connections refused because their source had too many.
    pub(crate) refused_sources: AtomicU64,
    /// The agent's view of its uplink: bit 16 down, low 16 bits loss ‰.
    pub(crate) uplink: AtomicU32,
    pub(crate) limits: Limits,
    /// All requesters together, today.
    pub(crate) daily: Arc<Allowance>,
    /// Each requester's rate and daily quota, shared by its connections.
    pub(crate) requesters: Mutex<HashMap<DeviceKey, Arc<PerRequester>>>,
    /// Open connections by requester, so a revocation can close them.
    pub(crate) conns: Mutex<HashMap<DeviceKey, Vec<quinn::Connection>>>,
    /// What happened to UDP datagrams.
    pub(crate) udp: crate::udp::UdpStats,
    /// Admitted connections' lane grants, by token.
    pub(crate) lanes: Mutex<HashMap<[u8; crate::wire::LANE_TOKEN_LEN], crate::serve::LaneGrant>>,
}

pub(crate) struct PerRequester {
    pub(crate) bucket: Option<Arc<Mutex<Bucket>>>,
    pub(crate) quota: Arc<Allowance>,
    /// UDP flows open, over all its connections.
    pub(crate) udp_flows: Arc<AtomicU64>,
}

impl RelayState {
    /// The gate, for one decision (it holds no lock across an await).
    pub(crate) fn gate(&self) -> Result<std::sync::MutexGuard<'_, Gate>, String> {
        self.gate
            .lock()
            .map_err(|_| "relay state poisoned".to_string())
    }

    pub(crate) fn requester(&self, key: &DeviceKey) -> Result<Arc<PerRequester>, String> {
        let mut map = self
            .requesters
            .lock()
            .map_err(|_| "relay state poisoned".to_string())?;
        let limits = self.limits;
        Ok(map
            .entry(*key)
            .or_insert_with(|| {
                Arc::new(PerRequester {
                    bucket: (limits.rate_bytes_per_s > 0).then(|| {
                        Arc::new(Mutex::new(Bucket::new(
                            limits.rate_bytes_per_s,
                            limits.burst(),
                        )))
                    }),
                    quota: Arc::new(Allowance::new(
                        limits.requester_daily_bytes,
                        true,
                        format!(
                            "this requester's daily quota at this sharer ({} bytes) is used up",
                            limits.requester_daily_bytes
                        ),
                    )),
                    udp_flows: Arc::default(),
                })
            })
            .clone())
    }
}

/// What the sharer agent needs of its relay: set the coordinator's keys,
/// read counters. Cheap to clone.
#[derive(Clone)]
pub struct RelayHandle(pub(crate) Arc<RelayState>);

impl RelayHandle {
    pub fn set_coordinator_keys(&self, keys: &[[u8; 32]], macs: &[(u8, [u8; 32])]) {
        if let Ok(mut g) = self.0.gate() {
            g.set_keys(keys, macs);
        }
    }

    /// Whether the coordinator's keys arrived (tickets can be verified).
    pub fn knows_coordinator(&self) -> bool {
        self.0
            .gate()
            .map(|g| g.knows_coordinator())
            .unwrap_or(false)
    }

    /// What probe answers tell requesters about this sharer's uplink.
    pub fn set_uplink(&self, h: UplinkHealth) {
        let v = (h.down as u32) << 16 | h.loss_permille.min(1000) as u32;
        self.0.uplink.store(v, Ordering::Relaxed);
    }

    pub fn uplink(&self) -> UplinkHealth {
        uplink_of(&self.0)
    }

    /// Refuses these requesters from now on and closes their connections.
    pub fn revoke(&self, keys: &[DeviceKey]) {
        if let Ok(mut g) = self.0.gate() {
            g.revoke(keys);
        }
        let closing: Vec<quinn::Connection> = self
            .0
            .conns
            .lock()
            .map(|mut c| keys.iter().filter_map(|k| c.remove(k)).flatten().collect())
            .unwrap_or_default();
        for c in closing {
            c.close(2u32.into(), b"requester revoked by the coordinator");
        }
        if !keys.is_empty() {
            info!(count = keys.len(), "requesters revoked");
        }
    }

    /// Bytes relayed today, all requesters (what the daily cap counts).
    pub fn daily_used(&self) -> u64 {
        self.0.daily.used()
    }

    /// Bytes left of the daily cap (`u64::MAX` without one).
    pub fn daily_left(&self) -> u64 {
        self.0.daily.left()
    }

    /// Bytes `requester` may still move today (`u64::MAX` without a quota).
    pub fn requester_left(&self, requester: &DeviceKey) -> u64 {
        if self.0.limits.requester_daily_bytes == 0 {
            return u64::MAX;
        }
        self.0
            .requesters
            .lock()
            .ok()
            .and_then(|m| m.get(requester).map(|r| r.quota.left()))
            .unwrap_or(self.0.limits.requester_daily_bytes)
    }

    /// Connections refused so far because their source had too many open.
    pub fn refused_sources(&self) -> u64 {
        self.0.refused_sources.load(Ordering::Relaxed)
    }

    /// What happened to UDP datagrams here.
    pub fn udp_counts(&self) -> crate::udp::UdpCounts {
        self.0.udp.counts()
    }

    pub fn cert_pin(&self) -> [u8; 32] {
        self.0.pin
    }

    /// All bytes relayed so far, both directions.
    /// TCP bytes relayed since start, (up, down).
    pub fn bytes_by_direction(&self) -> (u64, u64) {
        (
            self.0.total_up.load(Ordering::Relaxed),
            self.0.total_down.load(Ordering::Relaxed),
        )
    }

    /// Flows refused since start, by reason (egress_denied, quota,
    /// unreachable, target_refused, timeout, bad_target, failure).
    pub fn flows_refused(&self) -> std::collections::BTreeMap<&'static str, u64> {
        self.0
            .flows_refused
            .lock()
            .map(|m| m.clone())
            .unwrap_or_default()
    }

    pub fn total_bytes(&self) -> u64 {
        self.0.total.load(Ordering::Relaxed)
    }

    pub fn active_requesters(&self) -> u32 {
        self.0.gate().map(|g| g.active_requesters()).unwrap_or(0)
    }

    /// Per-requester usage since the previous call.
    pub fn take_usage(&self) -> Vec<UsageDelta> {
        let Ok(mut map) = self.0.usage.lock() else {
            return vec![];
        };
        let mut out = vec![];
        map.retain(|k, c| {
            let d = UsageDelta {
                requester: *k,
                bytes_up: c.up.swap(0, Ordering::Relaxed),
                bytes_down: c.down.swap(0, Ordering::Relaxed),
                flows: c.flows.swap(0, Ordering::Relaxed) as u32,
            };
            let busy = d.bytes_up + d.bytes_down + d.flows as u64 > 0;
            if busy {
                out.push(d);
            }
            // Keep counters of connected requesters; drop idle ones.
            Arc::strong_count(c) > 1 || busy
        });
        out
    }
}

pub(crate) fn uplink_of(shared: &RelayState) -> UplinkHealth {
    let v = shared.uplink.load(Ordering::Relaxed);
    UplinkHealth {
        down: v >> 16 & 1 == 1,
        loss_permille: (v & 0xffff) as u16,
    }
}

pub(crate) use bandshare_core::clock::unix_now as now_unix;
