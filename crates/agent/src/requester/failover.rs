//! Failover, decided in one place and without I/O: which pool member
//! carries new flows, and which members stall, recover or leave. The pool
//! (`pool.rs`) feeds it events — a member joined, a probe answer (with the
//! sharer's own uplink health), a tick of silence, a flow's failure, a
//! tunnel that closed — with `now`, and carries out the [`Decision`]s it
//! returns; the choice among live members is `select.rs`'s score with
//! hysteresis.
//!
//! The rules:
//! - silent for [`DEAD_AFTER`]: *stalled* — no new flows, the pool refills;
//!   open flows wait; an answer makes it ready again;
//! - silent for the stall grace: it leaves the pool (its flows end);
//! - its uplink reported down, or "network unreachable" answered to a flow
//!   ([`UNREACHABLE_AVOID`]): no new flows until that passes;
//! - a lost tunnel or a spent ticket: it leaves.
//!
//! Unit tests drive it with a fake clock.

use super::select::{self, Strategy, View};
use bandshare_core::{DeviceKey, DistanceBand};
use bandshare_relay::UplinkHealth;
use std::time::{Duration, Instant};

/// How often each member is probed.
pub const PROBE_EVERY: Duration = Duration::from_millis(100);
/// A member that answers no probe for this long is stalled: new flows
/// move to another member at once, and the pool refills.
pub const DEAD_AFTER: Duration = Duration::from_millis(600);
/// How long flows already open through a stalled member wait for it (a
/// phone's radio pause, a stopped process) before they are ended and the
/// member leaves the pool. At most the QUIC idle timeout (10 s).
pub const STALL_GRACE: Duration = Duration::from_secs(10);
/// A member that answered "network unreachable" is avoided this long (its
/// probe answers do not shorten it: a route can vanish before the sharer's
/// own check notices).
pub const UNREACHABLE_AVOID: Duration = Duration::from_secs(3);

/// What the pool must do after an event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Silent too long: no new flows; ask for a replacement.
    Stalled { key: DeviceKey, silent: Duration },
    /// Answers again: its open flows carry on.
    Resumed(DeviceKey),
    /// Close its tunnel and forget it.
    Drop { key: DeviceKey, why: String },
    /// New flows now go to `to` (`None`: no member can take them).
    Switched {
        from: Option<DeviceKey>,
        to: Option<DeviceKey>,
    },
}

/// How a flow through a member failed, as failover cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FlowFailure {
    /// The tunnel is gone.
    Lost(String),
    /// The sharer has no route out.
    Unreachable,
    /// The connection's ticket quota is spent.
    QuotaUsedUp,
}

/// What failover knows of one member.
#[derive(Clone, Debug)]
pub struct Health {
    pub key: DeviceKey,
    joined: Instant,
    last_answer: Option<Instant>,
    /// Smoothed probe RTT (zero until the first answer) and loss, ‰.
    pub rtt: Duration,
    pub probe_loss_permille: u16,
    pub uplink: UplinkHealth,
    avoid_until: Option<Instant>,
    pub stalled: bool,
    /// The offer's link quality, 0..=1, and distance band.
    link_quality: f64,
    band: Option<DistanceBand>,
}

impl Health {
    /// Whether new flows should avoid it for its uplink (reported down, or
    /// it just answered "network unreachable").
    pub fn uplink_failing(&self, now: Instant) -> bool {
        self.uplink.down || self.avoid_until.is_some_and(|t| now < t)
    }

    /// Loss as the selector sees it: the worse of the probes' and the
    /// sharer's own uplink's, 0..=1.
    pub fn loss(&self) -> f64 {
        self.probe_loss_permille
            .max(self.uplink.loss_permille)
            .min(1000) as f64
            / 1000.0
    }

    fn view(&self, now: Instant) -> View {
        View {
            alive: !self.stalled && !self.uplink_failing(now),
            link_quality: self.link_quality,
            rtt: self.rtt,
            loss: self.loss(),
            band: self.band,
        }
    }

    fn silent(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.last_answer.unwrap_or(self.joined))
    }
}

/// The pool's failover state.
pub struct Failover {
    members: Vec<Health>,
    active: Option<DeviceKey>,
    strategy: Strategy,
    stall_grace: Duration,
}

impl Failover {
    pub fn new(strategy: Strategy, stall_grace: Duration) -> Failover {
        Failover {
            members: vec![],
            active: None,
            strategy,
            stall_grace: stall_grace.max(DEAD_AFTER),
        }
    }

    pub fn strategy(&self) -> Strategy {
        self.strategy
    }

    pub fn stall_grace(&self) -> Duration {
        self.stall_grace
    }

    pub fn health(&self, key: &DeviceKey) -> Option<&Health> {
        self.members.iter().find(|h| h.key == *key)
    }

    fn health_mut(&mut self, key: &DeviceKey) -> Option<&mut Health> {
        self.members.iter_mut().find(|h| h.key == *key)
    }

    /// The member new flows go to.
    pub fn active(&self) -> Option<DeviceKey> {
        self.active
    }

    /// Members that take new flows (not stalled): what the pool keeps at
    /// its size.
    pub fn serving(&self) -> usize {
        self.members.iter().filter(|h| !h.stalled).count()
    }

    /// Whether a probe was answered within two probe intervals (optimistic
    /// data goes only through such a member).
    pub fn fresh(&self, key: &DeviceKey, now: Instant) -> bool {
        self.health(key)
            .and_then(|h| h.last_answer)
            .is_some_and(|t| now.saturating_duration_since(t) <= PROBE_EVERY * 2)
    }

    /// The selector's score of a member now (0 for one that takes no flows).
    pub fn score(&self, key: &DeviceKey, now: Instant) -> f64 {
        self.health(key)
            .map_or(0.0, |h| select::score(&h.view(now)))
    }

    pub fn join(
        &mut self,
        key: DeviceKey,
        link_quality: f64,
        band: Option<DistanceBand>,
        now: Instant,
    ) -> Vec<Decision> {
        self.members.retain(|h| h.key != key);
        self.members.push(Health {
            key,
            joined: now,
            last_answer: None,
            rtt: Duration::ZERO,
            probe_loss_permille: 0,
            uplink: UplinkHealth::default(),
            avoid_until: None,
            stalled: false,
            link_quality,
            band,
        });
        self.reselect(now)
    }

    /// The member left (its tunnel closed, or the pool dropped it).
    pub fn leave(&mut self, key: &DeviceKey, now: Instant) -> Vec<Decision> {
        let before = self.members.len();
        self.members.retain(|h| h.key != *key);
        if self.members.len() == before {
            return vec![];
        }
        self.reselect(now)
    }

    /// A probe answer: RTT and loss as the tracker measures them, and the
    /// sharer's uplink as it reports it.
    pub fn probe_answer(
        &mut self,
        key: &DeviceKey,
        rtt: Duration,
        loss_permille: u16,
        uplink: UplinkHealth,
        now: Instant,
    ) -> Vec<Decision> {
        let Some(h) = self.health_mut(key) else {
            return vec![];
        };
        h.last_answer = Some(now);
        h.rtt = rtt;
        h.probe_loss_permille = loss_permille;
        let uplink_moved = h.uplink.down != uplink.down
            || h.uplink.loss_permille.abs_diff(uplink.loss_permille) > 50;
        h.uplink = uplink;
        let resumed = std::mem::take(&mut h.stalled);
        let mut out = vec![];
        if resumed {
            out.push(Decision::Resumed(*key));
        }
        if resumed || uplink_moved || self.active.is_none() {
            out.extend(self.reselect(now));
        }
        out
    }

    /// A probe tick for `key`: silence stalls it, then drops it.
    pub fn tick(&mut self, key: &DeviceKey, now: Instant) -> Vec<Decision> {
        let grace = self.stall_grace;
        let Some(h) = self.health_mut(key) else {
            return vec![];
        };
        let silent = h.silent(now);
        if silent > grace {
            return vec![Decision::Drop {
                key: *key,
                why: format!("no answer to probes for {} ms", silent.as_millis()),
            }];
        }
        if silent > DEAD_AFTER && !h.stalled {
            h.stalled = true;
            let mut out = vec![Decision::Stalled { key: *key, silent }];
            out.extend(self.reselect(now));
            return out;
        }
        vec![]
    }

    /// A flow through `key` failed.
    pub fn flow_failed(&mut self, key: &DeviceKey, f: FlowFailure, now: Instant) -> Vec<Decision> {
        match f {
            FlowFailure::Lost(why) => vec![Decision::Drop { key: *key, why }],
            FlowFailure::QuotaUsedUp => vec![Decision::Drop {
                key: *key,
                why: "its ticket's byte quota is used up; reconnecting with a new ticket".into(),
            }],
            FlowFailure::Unreachable => {
                if let Some(h) = self.health_mut(key) {
                    h.avoid_until = Some(now + UNREACHABLE_AVOID);
                }
                self.reselect(now)
            }
        }
    }

    /// The best member that takes flows, other than those in `skip`; with
    /// none, the best that is merely not stalled (every uplink may report
    /// failing while a tunnel still works).
    pub fn next_best(&self, skip: &[DeviceKey], now: Instant) -> Option<DeviceKey> {
        let rank = |h: &Health| self.strategy.rank(&h.view(now));
        let candidates = self.members.iter().filter(|h| !skip.contains(&h.key));
        let best = candidates
            .clone()
            .filter(|h| h.view(now).alive)
            .max_by(|a, b| rank(a).total_cmp(&rank(b)));
        best.or_else(|| {
            candidates
                .filter(|h| !h.stalled)
                .max_by(|a, b| rank(a).total_cmp(&rank(b)))
        })
        .map(|h| h.key)
    }

    /// Chooses the active member again (hysteresis keeps the current one
    /// unless another is clearly better; ties are broken at random).
    pub fn reselect(&mut self, now: Instant) -> Vec<Decision> {
        let views: Vec<View> = self.members.iter().map(|h| h.view(now)).collect();
        let current = self
            .active
            .and_then(|k| self.members.iter().position(|h| h.key == k));
        let chosen = select::choose(&views, current, self.strategy, |n| {
            if n == 0 { 0 } else { fastrand::usize(..n) }
        });
        let next = chosen.map(|i| self.members[i].key);
        if next == self.active {
            return vec![];
        }
        let from = std::mem::replace(&mut self.active, next);
        vec![Decision::Switched { from, to: next }]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> DeviceKey {
        DeviceKey([n; 32])
    }

    fn ok() -> UplinkHealth {
        UplinkHealth::default()
    }

    const MS: Duration = Duration::from_millis(1);

    /// Two members, `a` better; both answered at `t0`.
    fn two(t0: Instant) -> Failover {
        let mut f = Failover::new(Strategy::Best, STALL_GRACE);
        f.join(key(1), 0.9, Some(DistanceBand::Under10m), t0);
        f.join(key(2), 0.6, Some(DistanceBand::From10To50m), t0);
        f.probe_answer(&key(1), 5 * MS, 0, ok(), t0);
        f.probe_answer(&key(2), 5 * MS, 0, ok(), t0);
        f
    }

    #[test]
    fn the_best_member_is_active_and_sticks() {
        let t0 = Instant::now();
        let mut f = two(t0);
        assert_eq!(f.active(), Some(key(1)));
        // A little better is not enough to move (hysteresis).
        f.probe_answer(&key(1), 9 * MS, 0, ok(), t0 + 100 * MS);
        assert_eq!(f.reselect(t0 + 100 * MS), vec![]);
        assert_eq!(f.active(), Some(key(1)));
    }

    #[test]
    fn silence_stalls_then_drops_and_an_answer_resumes() {
        let t0 = Instant::now();
        let mut f = two(t0);
        assert_eq!(f.tick(&key(1), t0 + 500 * MS), vec![]);
        f.probe_answer(&key(2), 5 * MS, 0, ok(), t0 + 650 * MS);
        let d = f.tick(&key(1), t0 + 700 * MS);
        assert_eq!(
            d,
            vec![
                Decision::Stalled {
                    key: key(1),
                    silent: 700 * MS
                },
                Decision::Switched {
                    from: Some(key(1)),
                    to: Some(key(2))
                }
            ]
        );
        assert_eq!(f.serving(), 1, "the pool refills");
        assert_eq!(f.tick(&key(1), t0 + 800 * MS), vec![], "stalled once");
        // It answers within the grace: ready again, and best again.
        let d = f.probe_answer(&key(1), 5 * MS, 0, ok(), t0 + 3000 * MS);
        assert_eq!(d[0], Decision::Resumed(key(1)));
        assert_eq!(f.active(), Some(key(1)));
        // Silent past the grace: it leaves.
        let d = f.tick(&key(1), t0 + 3000 * MS + STALL_GRACE + MS);
        assert!(
            matches!(&d[..], [Decision::Drop { key: k, .. }] if *k == key(1)),
            "{d:?}"
        );
        assert_eq!(
            f.leave(&key(1), t0 + 14 * 1000 * MS),
            vec![Decision::Switched {
                from: Some(key(1)),
                to: Some(key(2))
            }]
        );
        assert_eq!(f.leave(&key(2), t0 + 14 * 1000 * MS).len(), 1);
        assert_eq!(f.active(), None);
    }

    #[test]
    fn a_failing_uplink_or_unreachable_avoids_a_member_for_a_while() {
        let t0 = Instant::now();
        let mut f = two(t0);
        let down = UplinkHealth {
            down: true,
            loss_permille: 0,
        };
        let d = f.probe_answer(&key(1), 5 * MS, 0, down, t0 + 100 * MS);
        assert_eq!(
            d,
            vec![Decision::Switched {
                from: Some(key(1)),
                to: Some(key(2))
            }]
        );
        f.probe_answer(&key(1), 5 * MS, 0, ok(), t0 + 200 * MS);
        assert_eq!(f.active(), Some(key(1)), "back when its uplink is");
        // "network unreachable": avoided for UNREACHABLE_AVOID.
        f.flow_failed(&key(1), FlowFailure::Unreachable, t0 + 300 * MS);
        assert_eq!(f.active(), Some(key(2)));
        assert!(
            f.health(&key(1))
                .is_some_and(|h| h.uplink_failing(t0 + 300 * MS))
        );
        assert_eq!(
            f.next_best(&[key(2)], t0 + 400 * MS),
            Some(key(1)),
            "still a last resort"
        );
        let later = t0 + 300 * MS + UNREACHABLE_AVOID + MS;
        assert!(f.health(&key(1)).is_some_and(|h| !h.uplink_failing(later)));
        f.reselect(later);
        assert_eq!(f.active(), Some(key(1)));
        // Lost tunnels and spent tickets leave.
        let d = f.flow_failed(&key(2), FlowFailure::QuotaUsedUp, later);
        assert!(matches!(&d[..], [Decision::Drop { .. }]));
        let d = f.flow_failed(&key(2), FlowFailure::Lost("reset".into()), later);
        assert_eq!(
            d,
            vec![Decision::Drop {
                key: key(2),
                why: "reset".into()
            }]
        );
    }

    #[test]
    fn loss_on_the_sharers_uplink_moves_new_flows() {
        let t0 = Instant::now();
        let mut f = two(t0);
        let lossy = UplinkHealth {
            down: false,
            loss_permille: 300,
        };
        f.probe_answer(&key(1), 5 * MS, 0, lossy, t0 + 100 * MS);
        assert_eq!(f.active(), Some(key(2)));
        assert!((f.health(&key(1)).map_or(0.0, Health::loss) - 0.3).abs() < 1e-9);
        assert!(!f.fresh(&key(1), t0 + 400 * MS));
        assert!(f.fresh(&key(1), t0 + 200 * MS));
    }
}
