//! Learned routes: which cell devices move to next from a cell, given the
//! cell they came from, and how long they stay in a cell on the way. A
//! prediction walks these ahead of a device (to warn before a weak zone)
//! and carries it through GNSS gaps (dead reckoning along the path others
//! took).
//!
//! Transitions are second order — (came from, here) → next — so the two
//! directions of one line stay apart, with a first-order fallback (here →
//! next) for a device whose previous cell is unknown. Like the map's cells,
//! a transition is used only once k distinct devices made it, is weighted
//! and decayed the same way, and keeps only cell-keyed device tags.

use crate::{Config, tag};
use std::collections::{HashMap, HashSet};

/// The previous-cell value for "unknown" (no H3 index is 0).
pub const NONE: u64 = 0;

/// One learned transition's aggregate, as stored.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Transition {
    /// Decayed count of devices that made it.
    pub weight: f64,
    /// Decayed sum of weight × seconds spent in `here` before moving on.
    pub dwell_w_s: f64,
    /// Time the decay was last applied to, unix seconds.
    pub at: f64,
    /// Up to k tags keyed by the transition.
    pub tags: Vec<u64>,
}

impl Transition {
    fn decay_to(&mut self, t: f64, half_life_s: f64) {
        if t > self.at {
            let f = 0.5f64.powf((t - self.at) / half_life_s);
            self.weight *= f;
            self.dwell_w_s *= f;
            self.at = t;
        }
    }

    /// Mean seconds spent in `here` by devices that moved on this way.
    pub fn dwell_s(&self) -> f64 {
        if self.weight > 0.0 {
            self.dwell_w_s / self.weight
        } else {
            0.0
        }
    }
}

/// A transition's key: (came from or [`NONE`], here, next).
pub type Edge = (u64, u64, u64);

/// Where a device goes from a cell, and after how long.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Step {
    pub next: u64,
    /// Mean seconds spent in the current cell before moving on.
    pub dwell_s: f64,
    /// Share of the learned weight that went this way, 0..=1.
    pub share: f64,
}

#[derive(Clone, Debug, Default)]
pub struct Routes {
    edges: HashMap<Edge, Transition>,
    /// Out-edges by (came from, here), for lookups.
    out: HashMap<(u64, u64), Vec<u64>>,
    /// Edges changed since [`Routes::take_changes`].
    changed: HashSet<Edge>,
}

impl Routes {
    pub fn len(&self) -> usize {
        self.edges.len()
    }

    pub fn is_empty(&self) -> bool {
        self.edges.is_empty()
    }

    /// Records that a device stayed `dwell_s` in `here` (having come from
    /// `from`, or [`NONE`]) and then moved to `next` (`edge`), at time `t`. Both the
    /// second- and the first-order transition learn it.
    pub fn add(&mut self, edge: Edge, dwell_s: f64, t: f64, device: u64, cfg: &Config) {
        let (from, here, next) = edge;
        if here == next || !dwell_s.is_finite() || dwell_s < 0.0 {
            return;
        }
        let mut keys = vec![(NONE, here, next)];
        if from != NONE && from != here {
            keys.push((from, here, next));
        }
        for key in keys {
            let tr = self.edges.entry(key).or_insert_with(|| {
                self.out.entry((key.0, key.1)).or_default().push(key.2);
                Transition::default()
            });
            tr.decay_to(t, cfg.half_life_s);
            let f = if t < tr.at {
                0.5f64.powf((tr.at - t) / cfg.half_life_s)
            } else {
                1.0
            };
            tr.weight += f;
            tr.dwell_w_s += f * dwell_s;
            let tg = tag(
                device,
                key.0 ^ key.1.rotate_left(21) ^ key.2.rotate_left(42),
            );
            if tr.tags.len() < cfg.k && !tr.tags.contains(&tg) {
                tr.tags.push(tg);
            }
            self.changed.insert(key);
        }
    }

    pub(crate) fn has_changes(&self) -> bool {
        !self.changed.is_empty()
    }

    /// The transitions changed since the last call, as they are now.
    pub(crate) fn take_changes(&mut self) -> Vec<(Edge, Transition)> {
        self.changed
            .drain()
            .filter_map(|e| self.edges.get(&e).map(|t| (e, t.clone())))
            .collect()
    }

    pub(crate) fn unsaved(&mut self, edges: impl Iterator<Item = Edge>) {
        self.changed.extend(edges);
    }

    /// Restores one stored transition.
    pub fn restore(&mut self, edge: Edge, tr: Transition) {
        if self.edges.insert(edge, tr).is_none() {
            self.out.entry((edge.0, edge.1)).or_default().push(edge.2);
        }
    }

    /// Every transition, for storing.
    pub fn iter(&self) -> impl Iterator<Item = (&Edge, &Transition)> {
        self.edges.iter()
    }

    /// The most likely step on from `here` (having come from `from`):
    /// second order when k devices made it, else first order.
    pub fn next(&self, from: u64, here: u64, now: f64, cfg: &Config) -> Option<Step> {
        let orders = if from != NONE && from != here {
            vec![from, NONE]
        } else {
            vec![NONE]
        };
        orders.into_iter().find_map(|f| {
            let nexts = self.out.get(&(f, here))?;
            let usable: Vec<(u64, f64, f64)> = nexts
                .iter()
                .filter_map(|n| Some((*n, self.edges.get(&(f, here, *n))?)))
                .filter(|(_, tr)| tr.tags.len() >= cfg.k && tr.weight > 0.0)
                .map(|(n, tr)| {
                    // Decayed to one time, so older and newer edges compare.
                    let f = 0.5f64.powf((now - tr.at).max(0.0) / cfg.half_life_s);
                    (n, tr.weight * f, tr.dwell_s())
                })
                .collect();
            let total: f64 = usable.iter().map(|(_, w, _)| w).sum();
            let (next, weight, dwell_s) = usable.into_iter().max_by(|a, b| a.1.total_cmp(&b.1))?;
            Some(Step {
                next,
                dwell_s,
                share: weight / total,
            })
        })
    }
}
