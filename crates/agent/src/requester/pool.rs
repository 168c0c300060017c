//! The pool: tunnels to several sharers at once, one of them active for
//! new flows. A member whose tunnel closes leaves at once and the next
//! best takes over; the maintainer refills the pool in the background.

use super::select::{self, View};
use bandshare_core::{DeviceKey, DistanceBand, LinkState, NetworkType};
use bandshare_relay::{FlowError, FlowHeader, Tunnel};
use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use tokio::sync::Notify;
use tracing::{info, warn};

pub struct Member {
    pub name: String,
    pub key: DeviceKey,
    pub band: Option<DistanceBand>,
    pub network: Option<NetworkType>,
    pub link: LinkState,
    pub tunnel: Tunnel,
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
    pub flows: AtomicU64,
}

#[derive(Default)]
pub struct Pool {
    members: RwLock<Vec<Arc<Member>>>,
    active: RwLock<Option<DeviceKey>>,
    /// Wakes the maintainer when a member leaves.
    pub changed: Notify,
    /// Total bytes through the pool, both directions.
    pub total_bytes: AtomicU64,
}

#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct MemberStatus {
    pub sharer: String,
    pub state: &'static str,
    pub rtt_ms: f64,
    pub score: f64,
    pub active: bool,
    pub distance: String,
    pub network: Option<String>,
    pub flows: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
}

#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct Status {
    pub active: Option<String>,
    pub pool: Vec<MemberStatus>,
}

fn view(m: &Member) -> View {
    View {
        alive: m.tunnel.close_reason().is_none(),
        link_quality: m.link.quality(),
        rtt: m.tunnel.rtt(),
        band: m.band,
    }
}

impl Pool {
    pub fn len(&self) -> usize {
        self.members.read().map(|m| m.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn contains(&self, key: &DeviceKey) -> bool {
        self.members
            .read()
            .map(|m| m.iter().any(|x| x.key == *key))
            .unwrap_or(false)
    }

    pub fn add(self: &Arc<Self>, member: Member) {
        let member = Arc::new(member);
        info!(sharer = %member.name, relay = %member.tunnel.remote(), "joined the pool");
        if let Ok(mut m) = self.members.write() {
            m.push(member.clone());
        }
        self.reselect();
        let pool = self.clone();
        tokio::spawn(async move {
            let why = member.tunnel.closed().await;
            pool.remove(&member.key, &why);
        });
    }

    /// Drops a member (its tunnel closed or failed) and picks again.
    pub fn remove(&self, key: &DeviceKey, why: &str) {
        let gone = self.members.write().ok().and_then(|mut m| {
            let i = m.iter().position(|x| x.key == *key)?;
            Some(m.remove(i))
        });
        if let Some(g) = gone {
            warn!(sharer = %g.name, reason = %why, "left the pool");
            g.tunnel.close();
            self.reselect();
            self.changed.notify_one();
        }
    }

    /// Recomputes the active member; logs a switch.
    pub fn reselect(&self) -> Option<Arc<Member>> {
        let members = self.members.read().ok()?.clone();
        let views: Vec<View> = members.iter().map(|m| view(m)).collect();
        let mut active = self.active.write().ok()?;
        let current = active.and_then(|k| members.iter().position(|m| m.key == k));
        let chosen = select::choose(&views, current, |n| {
            if n == 0 { 0 } else { fastrand::usize(..n) }
        });
        let next = chosen.map(|i| members[i].clone());
        let next_key = next.as_ref().map(|m| m.key);
        if next_key != *active {
            let from = active
                .and_then(|k| members.iter().find(|m| m.key == k))
                .map(|m| m.name.clone());
            info!(from = ?from, to = ?next.as_ref().map(|m| m.name.clone()), "active sharer changed");
            *active = next_key;
        }
        next
    }

    pub fn active(&self) -> Option<Arc<Member>> {
        let key = (*self.active.read().ok()?)?;
        self.members
            .read()
            .ok()?
            .iter()
            .find(|m| m.key == key)
            .cloned()
    }

    /// Opens a flow through the active member; when its tunnel is lost,
    /// tries the next one. A refusal by the sharer is returned as is. See
    /// [`Tunnel::open_flow`] for `wait_reply`.
    pub async fn open_flow(
        &self,
        target: &FlowHeader,
        wait_reply: bool,
    ) -> Result<(quinn::SendStream, quinn::RecvStream, Arc<Member>), FlowError> {
        let attempts = self.len().max(1);
        let mut last = FlowError::Lost("no sharer in the pool".into());
        for _ in 0..attempts {
            let Some(m) = self.reselect() else { break };
            match m.tunnel.open_flow(target, wait_reply).await {
                Ok((s, r)) => {
                    m.flows.fetch_add(1, Ordering::Relaxed);
                    return Ok((s, r, m));
                }
                Err(FlowError::Lost(why)) => {
                    self.remove(&m.key, &why);
                    last = FlowError::Lost(why);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }

    /// Closes every tunnel (at shutdown).
    pub fn close_all(&self) {
        let all = self
            .members
            .write()
            .map(|mut m| std::mem::take(&mut *m))
            .unwrap_or_default();
        for m in all {
            m.tunnel.close();
        }
    }

    pub fn status(&self) -> Status {
        let members = self.members.read().map(|m| m.clone()).unwrap_or_default();
        let active = self.active.read().ok().and_then(|a| *a);
        Status {
            active: members
                .iter()
                .find(|m| Some(m.key) == active)
                .map(|m| m.name.clone()),
            pool: members
                .iter()
                .map(|m| {
                    let v = view(m);
                    MemberStatus {
                        sharer: m.name.clone(),
                        state: if v.alive { "ready" } else { "closed" },
                        rtt_ms: (m.tunnel.rtt().as_secs_f64() * 1e5).round() / 100.0,
                        score: (select::score(&v) * 1000.0).round() / 1000.0,
                        active: Some(m.key) == active,
                        distance: m.band.map(|b| b.to_string()).unwrap_or_default(),
                        network: m.network.map(|n| n.to_string()),
                        flows: m.flows.load(Ordering::Relaxed),
                        bytes_up: m.bytes_up.load(Ordering::Relaxed),
                        bytes_down: m.bytes_down.load(Ordering::Relaxed),
                    }
                })
                .collect(),
        }
    }
}
