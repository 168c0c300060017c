//! Prediction along a track, causal: each point is answered from that point
//! and the ones before it. A [`Tracker`] follows one device: the cell it is
//! in, the one it came from, and when it entered; without a fix it moves on
//! along the learned route after the time devices usually spend in a cell
//! (dead reckoning), and it looks ahead along the route for the next weak
//! cell within the horizon.

use crate::routes::NONE;
use crate::{Map, QosError};

/// What is expected at one point of a track.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Prediction {
    pub t: f64,
    /// This place at this time is predicted weak.
    pub weak: bool,
    /// Seconds until the next predicted weak cell along the route within
    /// the horizon (0 when inside one), `None` when none is predicted.
    pub weak_in_s: Option<f64>,
    pub expected_kbps: Option<f64>,
    /// 0..=1.
    pub confidence: f64,
    /// The cell the device is taken to be in, if any.
    pub cell: Option<u64>,
    /// Seconds since the last fix when the cell comes from dead reckoning.
    pub reckoned_s: Option<f64>,
}

/// How far a tracker looks and carries.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Horizon {
    /// Look this many seconds ahead along the route.
    pub ahead_s: f64,
    /// Carry a device without a fix along the route at most this long.
    pub max_gap_s: f64,
    /// Below this a cell is weak (the map's own threshold answers by its
    /// weak share; any other threshold by the cell's mean throughput).
    pub weak_kbps: f64,
    /// `weak_in_s` also warns where no single cell ahead is weak but the
    /// cells along the route within the horizon add up to at least this
    /// many expected weak seconds (each cell's dwell times its weak
    /// share): scattered dips, as on a ferry crossing, where connecting
    /// early costs some pool time and a drop nobody warned of costs a
    /// stalled app. Infinite: only weak cells warn.
    pub warn_weak_s: f64,
    /// `weak_in_s` also warns of a cell ahead where dips recur (most passes
    /// through it or its parent had one, [`Map::dips_recur`]), however
    /// short: a second or two at a few kbit/s stalls every app.
    pub warn_recurring_dips: bool,
}

impl Default for Horizon {
    fn default() -> Self {
        Horizon {
            ahead_s: 60.0,
            max_gap_s: 900.0,
            weak_kbps: 250.0,
            warn_weak_s: 5.0,
            warn_recurring_dips: true,
        }
    }
}

/// Steps walked at most, ahead or reckoning (bounds the work per point).
const MAX_STEPS: usize = 256;
/// Velocity is taken over the fixes of this many seconds.
const VELOCITY_OVER_S: f64 = 10.0;
/// Where no learned route goes on, the track is extended along its
/// velocity at most this far ahead, in steps of this.
const EXTRAPOLATE_S: f64 = 30.0;
const EXTRAPOLATE_STEP_S: f64 = 2.0;
/// Slower than this is standing still (no extrapolation).
const MOVING_MPS: f64 = 1.0;

/// One device's position on the learned routes.
#[derive(Clone, Debug, Default)]
pub struct Tracker {
    from: u64,
    here: u64,
    entered: f64,
    last_fix: Option<f64>,
    last_t: Option<f64>,
    /// Recent fixes (t, lat, lon), for the velocity when no learned route
    /// goes on.
    fixes: std::collections::VecDeque<(f64, f64, f64)>,
}

impl Tracker {
    pub fn new() -> Tracker {
        Tracker {
            from: NONE,
            here: NONE,
            ..Tracker::default()
        }
    }

    /// The prediction for time `t` at `pos` (`None`: no fix at this point).
    /// Points must come in time order; an earlier one is an error.
    pub fn step(
        &mut self,
        map: &Map,
        t: f64,
        pos: Option<(f64, f64)>,
        h: &Horizon,
    ) -> Result<Prediction, QosError> {
        if !t.is_finite() || self.last_t.is_some_and(|last| t < last) {
            return Err(QosError::Value {
                what: "t (points must be in time order)",
                value: t,
            });
        }
        self.last_t = Some(t);
        let now = map.newest().unwrap_or(t);
        let cfg = *map.config();
        let mut reckoned_s = None;
        match pos {
            Some((lat, lon)) => {
                let cell = u64::from(map.cell_of(lat, lon)?);
                if cell != self.here {
                    self.from = self.here;
                    self.here = cell;
                    self.entered = t;
                }
                self.last_fix = Some(t);
                self.fixes.push_back((t, lat, lon));
                while self
                    .fixes
                    .front()
                    .is_some_and(|f| t - f.0 > VELOCITY_OVER_S)
                {
                    self.fixes.pop_front();
                }
            }
            None => match self.last_fix {
                Some(fix) if t - fix <= h.max_gap_s && self.here != NONE => {
                    for _ in 0..MAX_STEPS {
                        let Some(step) = map.routes().next(self.from, self.here, now, &cfg) else {
                            break;
                        };
                        if t - self.entered <= step.dwell_s {
                            break;
                        }
                        self.entered += step.dwell_s.max(1.0);
                        self.from = self.here;
                        self.here = step.next;
                    }
                    reckoned_s = Some(t - fix);
                }
                _ => {
                    // Lost: nothing to answer from until the next fix.
                    self.from = NONE;
                    self.here = NONE;
                    return Ok(Prediction {
                        t,
                        weak: false,
                        weak_in_s: None,
                        expected_kbps: None,
                        confidence: 0.0,
                        cell: None,
                        reckoned_s: self.last_fix.map(|f| t - f),
                    });
                }
            },
        }
        // A cell's answer for the walk: weak, and its weak share (with
        // another threshold than the map's, by its mean throughput).
        let judge = |cell: u64, at: f64| -> (bool, f64) {
            let Ok(c) = h3o::CellIndex::try_from(cell) else {
                return (false, 0.0);
            };
            map.estimate_cell(c, at).map_or((false, 0.0), |e| {
                if h.weak_kbps == cfg.weak_kbps {
                    (e.weak(), e.weak_share)
                } else {
                    let weak = e.kbps < h.weak_kbps;
                    (weak, if weak { 1.0 } else { 0.0 })
                }
            })
        };
        let here = h3o::CellIndex::try_from(self.here).ok();
        let est = here.and_then(|c| map.estimate_cell(c, t));
        let weak = judge(self.here, t).0;
        let weak_in_s = if weak {
            Some(0.0)
        } else {
            self.ahead(map, t, now, h, &judge)
        };
        let fade = reckoned_s.map_or(1.0, |s| 0.5f64.powf(s / 60.0));
        Ok(Prediction {
            t,
            weak,
            weak_in_s,
            expected_kbps: est.map(|e| e.kbps),
            confidence: est.map_or(0.0, |e| e.confidence * fade),
            cell: Some(self.here),
            reckoned_s,
        })
    }

    /// Walks the learned route ahead: seconds to the first weak cell, or
    /// to the first cell adding to the expected weak seconds (dwell times
    /// weak share, this cell's rest included) once they reach
    /// [`Horizon::warn_weak_s`].
    fn ahead(
        &self,
        map: &Map,
        t: f64,
        now: f64,
        h: &Horizon,
        judge: &dyn Fn(u64, f64) -> (bool, f64),
    ) -> Option<f64> {
        let cfg = map.config();
        let dips = |cell: u64| h3o::CellIndex::try_from(cell).is_ok_and(|c| map.dips_recur(c));
        let (mut from, mut here) = (self.from, self.here);
        let mut spent = t - self.entered;
        let (mut ahead, mut expected, mut first_risk) = (0.0, 0.0, None);
        for _ in 0..MAX_STEPS {
            let Some(step) = map.routes().next(from, here, now, cfg) else {
                // No learned way on: straight along the recent velocity.
                return self.extrapolate(map, t, h, &|c, at| judge(c, at).0);
            };
            if h.warn_recurring_dips && dips(here) {
                return Some(ahead);
            }
            let stay = (step.dwell_s - spent).max(0.0);
            let share = judge(here, t + ahead).1;
            if share > 0.0 {
                first_risk.get_or_insert(ahead);
                expected += stay.min(h.ahead_s - ahead) * share;
                if expected >= h.warn_weak_s {
                    return first_risk;
                }
            }
            ahead += stay;
            spent = 0.0;
            if ahead > h.ahead_s {
                return None;
            }
            if judge(step.next, t + ahead).0 {
                return Some(ahead);
            }
            from = here;
            here = step.next;
        }
        None
    }

    /// The first weak cell straight ahead along the velocity of the recent
    /// fixes (only while fixes are current, up to [`EXTRAPOLATE_S`]).
    fn extrapolate(
        &self,
        map: &Map,
        t: f64,
        h: &Horizon,
        is_weak: &dyn Fn(u64, f64) -> bool,
    ) -> Option<f64> {
        let (&(t0, lat0, lon0), &(t1, lat1, lon1)) = (self.fixes.front()?, self.fixes.back()?);
        if t1 - t0 < 2.0 || t - t1 > 2.0 {
            return None;
        }
        let (vlat, vlon) = ((lat1 - lat0) / (t1 - t0), (lon1 - lon0) / (t1 - t0));
        let mps = ((vlat * 111_320.0).powi(2)
            + (vlon * 111_320.0 * lat1.to_radians().cos()).powi(2))
        .sqrt();
        if mps < MOVING_MPS {
            return None;
        }
        let mut s = EXTRAPOLATE_STEP_S;
        while s <= EXTRAPOLATE_S.min(h.ahead_s) {
            let dt = t + s - t1;
            let cell = map.cell_of(lat1 + vlat * dt, lon1 + vlon * dt).ok()?;
            if u64::from(cell) != self.here && is_weak(u64::from(cell), t + s) {
                return Some(s);
            }
            s += EXTRAPOLATE_STEP_S;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Config, Sample};

    /// Three devices ride east along a line at 10 m/s, 1 Hz; from 1,500 m
    /// on, `weak(i)` says which seconds are weak.
    fn learned_with(weak: impl Fn(usize) -> bool) -> Map {
        let mut m = Map::new(Config::default()).expect("map");
        for d in 1..=3u64 {
            let mut trail = None;
            for i in 0..200 {
                let x = i as f64 * 10.0;
                let s = Sample {
                    t: 1000.0 + d as f64 * 1000.0 + i as f64,
                    lat: 59.9,
                    lon: 10.7 + x / 55_800.0,
                    duration_s: 1.0,
                    down_kbps: if x >= 1500.0 && weak(i) { 50.0 } else { 3000.0 },
                    device: d,
                };
                m.observe(&s, &mut trail).expect("observe");
            }
        }
        m
    }

    /// The last stretch (from 1,500 m) is weak.
    fn learned() -> Map {
        learned_with(|_| true)
    }

    /// Where no cell is weak but dips are scattered over the cells ahead
    /// (one second in eight: below the weak share), the expected weak
    /// seconds ahead warn; with that warning off, nothing does.
    #[test]
    fn scattered_dips_ahead_add_up_to_a_warning() {
        let m = learned_with(|i| i % 8 == 0);
        let ride = |h: Horizon| {
            let mut tr = Tracker::new();
            let mut first = None;
            for i in 0..190 {
                let x = i as f64 * 10.0;
                let pos = Some((59.9, 10.7 + x / 55_800.0));
                let p = tr.step(&m, 10_000.0 + i as f64, pos, &h).expect("step");
                assert!(!p.weak, "no cell is weak at {x} m: {p:?}");
                if first.is_none() && p.weak_in_s.is_some() {
                    first = Some(x);
                }
            }
            first
        };
        let at = ride(Horizon::default()).expect("warned");
        assert!(at < 1500.0, "warned at {at} m");
        let off = Horizon {
            warn_weak_s: f64::INFINITY,
            warn_recurring_dips: false,
            ..Horizon::default()
        };
        assert_eq!(ride(off), None);
    }

    /// One short dip at the same place on every pass (a second at 1,600
    /// m): no cell is weak and the expected weak seconds stay under the
    /// threshold, but every pass had a dip there, so it is warned ahead;
    /// with that warning off, nothing warns.
    #[test]
    fn a_short_dip_that_recurs_is_warned_ahead() {
        let m = learned_with(|i| i == 160);
        let dip = m.cell_of(59.9, 10.7 + 1600.0 / 55_800.0).expect("cell");
        assert!(m.dips_recur(dip));
        let start = m.cell_of(59.9, 10.7).expect("cell");
        assert!(!m.dips_recur(start), "no dip near the start");
        let ride = |h: Horizon| {
            let mut tr = Tracker::new();
            let mut first = None;
            for i in 0..150 {
                let x = i as f64 * 10.0;
                let pos = Some((59.9, 10.7 + x / 55_800.0));
                let p = tr.step(&m, 10_000.0 + i as f64, pos, &h).expect("step");
                assert!(!p.weak, "no cell is weak at {x} m: {p:?}");
                if first.is_none() {
                    first = p.weak_in_s.map(|s| (x, s));
                }
            }
            first
        };
        let (at, ahead) = ride(Horizon::default()).expect("warned");
        assert!(
            at < 1500.0 && ahead > 5.0,
            "warned at {at} m, {ahead} s ahead"
        );
        let off = Horizon {
            warn_recurring_dips: false,
            ..Horizon::default()
        };
        assert_eq!(ride(off), None);
    }

    #[test]
    fn warns_ahead_and_reckons_through_a_gap() {
        let m = learned();
        assert!(!m.routes().is_empty());
        let mut tr = Tracker::new();
        let h = Horizon::default();
        // Fixes up to 1,000 m, then none (a tunnel).
        let mut first_warning = None;
        let mut weak_without_fix = None;
        for i in 0..190 {
            let x = i as f64 * 10.0;
            let t = 10_000.0 + i as f64;
            let pos = (x <= 1000.0).then_some((59.9, 10.7 + x / 55_800.0));
            let p = tr.step(&m, t, pos, &h).expect("step");
            if first_warning.is_none() && p.weak_in_s.is_some() {
                first_warning = Some((x, p.weak_in_s));
            }
            if weak_without_fix.is_none() && p.weak && pos.is_none() {
                weak_without_fix = Some(x);
            }
        }
        let (at, ahead) = first_warning.expect("a warning");
        assert!(at < 1500.0, "warned at {at} m, {ahead:?} s ahead");
        assert!(ahead.is_some_and(|s| s > 5.0), "{ahead:?}");
        let x = weak_without_fix.expect("reckoned into the weak stretch");
        assert!((1400.0..1700.0).contains(&x), "weak from {x} m");
        // Out of order is an error.
        assert!(tr.step(&m, 0.0, None, &h).is_err());
    }
}
