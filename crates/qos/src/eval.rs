//! Leave-one-run-out evaluation on recorded runs of one route: train a map
//! on every other run (each run as its own device, gaps filled between
//! fixes), then replay the held-out run through a [`Tracker`] from its raw
//! fixes only (causal, no filling) and score every reading by its duration.
//! The reference baseline runs on the same split: a 100 m square grid, a
//! square weak when at least half its training time was weak, the last fix
//! held through gaps. The ceiling replays each run through a map that has
//! seen every run, itself included: what place and time can explain.

use crate::track::{Reading, fill_gaps};
use crate::{Config, Horizon, Map, Sample, Tracker};
use std::collections::HashMap;

/// Time-weighted confusion counts of "weak".
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Score {
    pub tp: f64,
    pub fp: f64,
    pub fn_: f64,
    pub tn: f64,
}

impl Score {
    pub fn add(&mut self, predicted: bool, truth: bool, w: f64) {
        match (predicted, truth) {
            (true, true) => self.tp += w,
            (true, false) => self.fp += w,
            (false, true) => self.fn_ += w,
            (false, false) => self.tn += w,
        }
    }

    pub fn precision(&self) -> f64 {
        ratio(self.tp, self.tp + self.fp)
    }

    pub fn recall(&self) -> f64 {
        ratio(self.tp, self.tp + self.fn_)
    }

    pub fn f1(&self) -> f64 {
        ratio(2.0 * self.tp, 2.0 * self.tp + self.fp + self.fn_)
    }

    /// Predicted-weak time over true weak time.
    pub fn weak_ratio(&self) -> f64 {
        ratio(self.tp + self.fp, self.tp + self.fn_)
    }
}

fn ratio(a: f64, b: f64) -> f64 {
    if b == 0.0 { 1.0 } else { a / b }
}

/// One route's result.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RouteReport {
    pub runs: usize,
    pub seconds: f64,
    pub weak_seconds: f64,
    pub map: Score,
    pub baseline: Score,
    /// The map's score when the held-out run is in its training too: how
    /// well a map of place and time can describe these runs at all (an
    /// upper bound for leave-one-run-out, not a prediction).
    pub ceiling: Score,
    /// Share of the time the map answered at all.
    pub answered: f64,
    /// Share of weak time (in episodes ≥ 3 s) whose episode was warned
    /// 5–30 s before it began (`weak_in_s` not null at some point then).
    pub warned: f64,
    pub baseline_warned: f64,
    /// What the warnings cost: the share of the time a warning was out
    /// (pre-connect keeps the pool full then), and the share of that time
    /// a weak reading did follow within the horizon.
    pub warning_time: f64,
    pub warnings_followed: f64,
    /// The same share over all the time: what warning always would give.
    pub any_time_followed: f64,
    /// Weak onsets (a weak reading after one that was not, however short
    /// the dip), and the share of them a warning within [`READY_LEAD_S`]
    /// was out for at the reading before, or [`READY_TAIL_S`] before it:
    /// where a requester acting on the forecast already has new flows on
    /// a sharer when the link drops.
    pub onsets: usize,
    pub onsets_ready: f64,
    /// Share of the time a warning within [`READY_LEAD_S`] (or a weak
    /// answer) was out, or had been within [`READY_TAIL_S`]: what acting
    /// on the forecast costs in pool time.
    pub ready_time: f64,
}

/// A warning within this many seconds (the requester's default lead)
/// counts as ready for an onset.
pub const READY_LEAD_S: f64 = 20.0;

/// A requester acting on the forecast stays on the pool this long after
/// its last warning (its `--predict-tail`): an onset this soon after the
/// forecast went quiet is ready too. 16 s covered every onset that the
/// end-to-end replays lost after a forecast's end (3.5–14 s after its
/// last warning), with an ask's 2 s to spare.
pub const READY_TAIL_S: f64 = 16.0;

/// Weak below this, kbit/s.
pub const WEAK_KBPS: f64 = 250.0;
/// Gaps between fixes filled for training up to this long.
pub const FILL_GAP_S: f64 = 600.0;

/// The baseline's squares: (observed seconds, weak seconds) each.
type Grid = HashMap<(i64, i64), (f64, f64)>;

fn grid_key(lat: f64, lon: f64) -> (i64, i64) {
    let y = lat * 111_320.0;
    let x = lon * 111_320.0 * lat.to_radians().cos();
    ((y / 100.0).floor() as i64, (x / 100.0).floor() as i64)
}

/// Weak episodes of a run: (start, end, weak seconds), ≥ 3 s long.
fn episodes(run: &[Reading]) -> Vec<(f64, f64, f64)> {
    let mut out = vec![];
    let mut open: Option<(f64, f64, f64)> = None;
    for r in run {
        if r.down_kbps < WEAK_KBPS {
            let e = open.get_or_insert((r.t - r.duration_s, r.t, 0.0));
            e.1 = r.t;
            e.2 += r.duration_s;
        } else if let Some(e) = open.take() {
            out.push(e);
        }
    }
    out.extend(open);
    out.retain(|e| e.2 >= 3.0);
    out
}

/// Share of weak episode time warned 5–30 s ahead, given the times at
/// which a warning was given.
fn warned_share(eps: &[(f64, f64, f64)], warnings: &[f64]) -> (f64, f64) {
    let (mut warned, mut total) = (0.0, 0.0);
    for &(start, _, secs) in eps {
        total += secs;
        if warnings
            .iter()
            .any(|w| *w >= start - 30.0 && *w <= start - 5.0)
        {
            warned += secs;
        }
    }
    (warned, total)
}

/// A map (and the baseline's grid) learned from every run but `skip`:
/// each run as its own device, gaps between fixes filled for training.
fn train(runs: &[Vec<Reading>], skip: Option<usize>, cfg: Config) -> Option<(Map, Grid)> {
    let mut map = Map::new(cfg).ok()?;
    let mut grid = Grid::new();
    for (i, run) in runs.iter().enumerate().filter(|(i, _)| Some(*i) != skip) {
        let mut filled = run.clone();
        fill_gaps(&mut filled, FILL_GAP_S);
        let mut trail = None;
        for r in &filled {
            let Some((lat, lon)) = r.pos else { continue };
            let s = Sample {
                t: r.t,
                lat,
                lon,
                duration_s: r.duration_s,
                down_kbps: r.down_kbps,
                device: i as u64 + 1,
            };
            if map.observe(&s, &mut trail).is_err() {
                continue;
            }
            if !r.filled {
                let g = grid.entry(grid_key(lat, lon)).or_default();
                g.0 += r.duration_s;
                if r.down_kbps < WEAK_KBPS {
                    g.1 += r.duration_s;
                }
            }
        }
    }
    Some((map, grid))
}

/// Evaluates one route's runs (at least 4 for k = 3 to answer at all).
pub fn leave_one_run_out(runs: &[Vec<Reading>], cfg: Config, horizon: Horizon) -> RouteReport {
    let mut rep = RouteReport {
        runs: runs.len(),
        ..RouteReport::default()
    };
    let (mut answered, mut warned, mut base_warned, mut ep_total) = (0.0, 0.0, 0.0, 0.0);
    let (mut warning_s, mut followed_s, mut any_followed_s) = (0.0, 0.0, 0.0);
    let (mut onsets_ready, mut ready_s) = (0usize, 0.0);
    // The ceiling: a map that has seen every run, the held-out one too.
    let seen_all = train(runs, None, cfg).map(|(m, _)| m);
    for held in 0..runs.len() {
        let Some((map, grid)) = train(runs, Some(held), cfg) else {
            return rep;
        };
        if let Some(seen) = &seen_all {
            let mut tracker = Tracker::new();
            for r in &runs[held] {
                let p = tracker.step(seen, r.t, r.pos, &horizon).ok();
                rep.ceiling.add(
                    p.is_some_and(|p| p.weak),
                    r.down_kbps < WEAK_KBPS,
                    r.duration_s,
                );
            }
        }
        let mut tracker = Tracker::new();
        let mut last = None;
        let mut ready_before: Option<(bool, bool)> = None;
        let mut last_warned: Option<f64> = None;
        let (mut warnings, mut base_warnings) = (vec![], vec![]);
        for r in &runs[held] {
            let truth = r.down_kbps < WEAK_KBPS;
            rep.seconds += r.duration_s;
            if truth {
                rep.weak_seconds += r.duration_s;
            }
            let p = tracker.step(&map, r.t, r.pos, &horizon).ok();
            if p.is_some_and(|p| p.expected_kbps.is_some()) {
                answered += r.duration_s;
            }
            rep.map.add(p.is_some_and(|p| p.weak), truth, r.duration_s);
            if truth && ready_before.is_some_and(|(weak, _)| !weak) {
                rep.onsets += 1;
                if ready_before.is_some_and(|(_, ready)| ready) {
                    onsets_ready += 1;
                }
            }
            let warned_now =
                p.is_some_and(|p| p.weak || p.weak_in_s.is_some_and(|w| w <= READY_LEAD_S));
            if warned_now {
                last_warned = Some(r.t);
            }
            let ready = last_warned.is_some_and(|w| r.t - w <= READY_TAIL_S);
            if ready {
                ready_s += r.duration_s;
            }
            ready_before = Some((truth, ready));
            let weak_follows = runs[held]
                .iter()
                .skip_while(|x| x.t < r.t)
                .take_while(|x| x.t <= r.t + horizon.ahead_s)
                .any(|x| x.down_kbps < WEAK_KBPS);
            if weak_follows {
                any_followed_s += r.duration_s;
            }
            if p.is_some_and(|p| p.weak_in_s.is_some_and(|w| w <= horizon.ahead_s)) {
                warnings.push(r.t);
                warning_s += r.duration_s;
                if weak_follows {
                    followed_s += r.duration_s;
                }
            }
            last = r.pos.or(last);
            let b = last.is_some_and(|(lat, lon)| {
                grid.get(&grid_key(lat, lon))
                    .is_some_and(|(all, weak)| *weak >= 0.5 * all)
            });
            rep.baseline.add(b, truth, r.duration_s);
            if b {
                base_warnings.push(r.t);
            }
        }
        let eps = episodes(&runs[held]);
        let (w, total) = warned_share(&eps, &warnings);
        let (bw, _) = warned_share(&eps, &base_warnings);
        warned += w;
        base_warned += bw;
        ep_total += total;
    }
    rep.answered = ratio(answered, rep.seconds);
    rep.warned = ratio(warned, ep_total);
    rep.baseline_warned = ratio(base_warned, ep_total);
    rep.warning_time = ratio(warning_s, rep.seconds);
    rep.warnings_followed = ratio(followed_s, warning_s);
    rep.any_time_followed = ratio(any_followed_s, rep.seconds);
    rep.onsets_ready = ratio(onsets_ready as f64, rep.onsets as f64);
    rep.ready_time = ratio(ready_s, rep.seconds);
    rep
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn episodes_and_warnings() {
        let r = |t: f64, kbps: f64| Reading {
            t,
            duration_s: 1.0,
            down_kbps: kbps,
            ..Reading::default()
        };
        let run: Vec<Reading> = (1..=100)
            .map(|t| r(t as f64, if (50..55).contains(&t) { 0.0 } else { 1000.0 }))
            .collect();
        let eps = episodes(&run);
        assert_eq!(eps, vec![(49.0, 54.0, 5.0)]);
        assert_eq!(warned_share(&eps, &[30.0]), (5.0, 5.0));
        assert_eq!(warned_share(&eps, &[46.0]), (0.0, 5.0), "too late");
        assert_eq!(warned_share(&eps, &[10.0]), (0.0, 5.0), "too early");
    }
}
