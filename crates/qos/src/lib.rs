//! The QoS map: how good links are where and when, learned from many
//! devices' observations. Pure: no I/O, every call takes the time it is
//! about.
//!
//! - Cells are H3 cells at [`Config::resolution`] (default 10, about 120 m
//!   across) × hour of week, with coarser fallbacks: the same cell at any
//!   hour, then its parent [`Config::parent_levels`] resolutions up.
//! - A sample counts by its *duration*, not as one row (a 60 s outage row
//!   weighs sixty 1 s rows), and fades with [`Config::half_life`]. Age is
//!   measured from the newest sample the map holds, so importing a
//!   historical dataset does not erase it.
//! - Passes: each cell (at any hour) also counts the passes through it and
//!   those with a weak reading, decayed the same way, so a dip that recurs
//!   on most passes is known ([`Map::dips_recur`]) even where it is too
//!   short to make the cell weak by its share of time. Counts only: which
//!   device passed is not kept.
//! - k-anonymity: a cell answers only once at least [`Config::k`] distinct
//!   devices reported it. The map keeps no device ids: per cell it keeps at
//!   most k tags that are keyed by the cell (unlinkable across cells), so
//!   no track can be rebuilt from it.

use h3o::{CellIndex, LatLng, Resolution};
use std::collections::{HashMap, HashSet};

pub mod eval;
mod predict;
pub mod routes;
pub mod track;

pub use predict::{Horizon, Prediction, Tracker};
pub use routes::Routes;

/// Seconds in a week, and in an hour.
const WEEK_S: i64 = 7 * 24 * 3600;
const HOUR_S: i64 = 3600;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Config {
    /// H3 resolution of the finest cells (0..=15).
    pub resolution: u8,
    /// How many resolutions up the last fallback looks.
    pub parent_levels: u8,
    /// Weight halves over this many seconds (default 180 days: on the Norway
    /// traces, a year of commutes, 30 days left the older runs too faint to
    /// predict from — metro F1 0.45 against 0.78 at 180 days).
    pub half_life_s: f64,
    /// Distinct devices before a cell is used.
    pub k: usize,
    /// Below this a link is weak.
    pub weak_kbps: f64,
    /// A cell is weak when at least this share of its observed time was
    /// (0.3: on the Norway routes, leave-one-run-out, metro F1 0.82 against
    /// 0.77 at 0.5, ferry 0.37 against 0.16, with predicted-weak time 1.0–1.3×
    /// the true weak time).
    pub weak_share: f64,
    /// Observed seconds (after decay) before a cell answers.
    pub min_weight_s: f64,
    /// Observed seconds a cell needs at an hour of the week before that
    /// hour answers instead of the cell as a whole.
    pub min_hour_weight_s: f64,
    /// A device's samples further apart than this are two trips, not one
    /// (no route is learned across the gap).
    pub trip_gap_s: f64,
    /// Dips recur in a cell when at least this share of the passes through
    /// it had a weak reading ([`Map::dips_recur`]) ...
    pub dip_share: f64,
    /// ... out of at least this many passes (decayed: 2.5 takes three
    /// recent passes, or more older ones).
    pub dip_passes: f64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            resolution: 10,
            parent_levels: 2,
            half_life_s: 180.0 * 24.0 * 3600.0,
            k: 3,
            weak_kbps: 250.0,
            weak_share: 0.3,
            min_weight_s: 5.0,
            min_hour_weight_s: 30.0,
            trip_gap_s: 120.0,
            dip_share: 0.5,
            dip_passes: 2.5,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum QosError {
    #[error("resolution {0} is not an H3 resolution (0..=15)")]
    Resolution(u8),
    #[error("position {lat},{lon} is not a valid latitude/longitude")]
    Position { lat: f64, lon: f64 },
    #[error("{what} must be finite and not negative, got {value}")]
    Value { what: &'static str, value: f64 },
}

/// One link-quality observation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample {
    /// When it ended, unix seconds.
    pub t: f64,
    pub lat: f64,
    pub lon: f64,
    /// How long it covers, seconds.
    pub duration_s: f64,
    pub down_kbps: f64,
    /// An opaque number for the reporting device (e.g. a keyed hash of its
    /// key); only k cell-keyed tags derived from it are kept.
    pub device: u64,
}

/// Which level of the map answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// The cell at this hour of the week.
    CellHour,
    /// The cell at any hour.
    Cell,
    /// A parent cell.
    Parent,
}

/// What the map expects at a place and time.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Estimate {
    /// Duration-weighted mean throughput.
    pub kbps: f64,
    /// Share of the observed time that was weak, 0..=1.
    pub weak_share: f64,
    /// The map's [`Config::weak_share`] threshold.
    pub threshold: f64,
    /// 0..=1: how much weight, how many devices, how fine the level.
    pub confidence: f64,
    pub level: Level,
}

impl Estimate {
    /// Weak when at least the map's threshold share (by default half) of
    /// the time seen here was weak.
    pub fn weak(&self) -> bool {
        self.weak_share >= self.threshold
    }
}

/// One cell's aggregate, decayed lazily to `at`; what is stored.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Agg {
    /// Decayed observed seconds, their kbps-seconds, and the weak seconds.
    pub weight: f64,
    pub kbps_s: f64,
    pub weak_s: f64,
    pub at: f64,
    /// Up to k cell-keyed device tags.
    pub tags: Vec<u64>,
    /// Decayed count of passes through the cell (a device entering it; kept
    /// for cells at any hour), and of those passes with at least one weak
    /// reading: a dip that recurs on most passes, however short, shows
    /// here where the weak share of the time does not.
    pub passes: f64,
    pub dip_passes: f64,
}

impl Agg {
    fn decay_to(&mut self, t: f64, half_life_s: f64) {
        if t > self.at {
            let f = 0.5f64.powf((t - self.at) / half_life_s);
            self.weight *= f;
            self.kbps_s *= f;
            self.weak_s *= f;
            self.passes *= f;
            self.dip_passes *= f;
            self.at = t;
        }
    }

    fn add(&mut self, s: &Sample, tag: u64, cfg: &Config) {
        self.decay_to(s.t, cfg.half_life_s);
        // A sample older than the aggregate counts as already decayed.
        let f = if s.t < self.at {
            0.5f64.powf((self.at - s.t) / cfg.half_life_s)
        } else {
            1.0
        };
        let w = s.duration_s * f;
        self.weight += w;
        self.kbps_s += w * s.down_kbps;
        if s.down_kbps < cfg.weak_kbps {
            self.weak_s += w;
        }
        if self.tags.len() < cfg.k && !self.tags.contains(&tag) {
            self.tags.push(tag);
        }
    }

    /// Counts a pass (`new_pass`) and a pass's first dip (`first_dip`) of
    /// a sample at time `t`.
    fn count_pass(&mut self, t: f64, new_pass: bool, first_dip: bool, half_life_s: f64) {
        let f = if t < self.at {
            0.5f64.powf((self.at - t) / half_life_s)
        } else {
            1.0
        };
        if new_pass {
            self.passes += f;
        }
        if first_dip {
            self.dip_passes += f;
        }
    }

    /// Whether dips recur here: k devices saw the cell, at least
    /// [`Config::dip_passes`] passes were counted, and at least
    /// [`Config::dip_share`] of them had a weak reading.
    fn dips_recur(&self, cfg: &Config) -> bool {
        self.tags.len() >= cfg.k
            && self.passes >= cfg.dip_passes
            && self.passes > 0.0
            && self.dip_passes / self.passes >= cfg.dip_share
    }

    /// The estimate as of `now`, if k devices saw it and it has weight.
    fn estimate(&self, now: f64, cfg: &Config, level: Level) -> Option<Estimate> {
        if self.tags.len() < cfg.k {
            return None;
        }
        let f = if now > self.at {
            0.5f64.powf((now - self.at) / cfg.half_life_s)
        } else {
            1.0
        };
        let weight = self.weight * f;
        let least = match level {
            Level::CellHour => cfg.min_hour_weight_s.max(cfg.min_weight_s),
            _ => cfg.min_weight_s,
        };
        if weight < least || self.weight <= 0.0 {
            return None;
        }
        let fineness = match level {
            Level::CellHour => 1.0,
            Level::Cell => 0.8,
            Level::Parent => 0.5,
        };
        Some(Estimate {
            kbps: self.kbps_s / self.weight,
            weak_share: self.weak_s / self.weight,
            threshold: cfg.weak_share,
            confidence: fineness * (weight / (weight + 60.0)),
            level,
        })
    }
}

/// A key: a cell, and the hour of week or none.
pub type Key = (u64, Option<u8>);

#[derive(Clone, Debug)]
pub struct Map {
    cfg: Config,
    resolution: Resolution,
    cells: HashMap<Key, Agg>,
    routes: Routes,
    /// The newest sample's time: "now" for ages.
    newest: f64,
    /// Cells changed since [`Map::take_changes`], for saving only those.
    changed: HashSet<Key>,
}

/// What changed in a map since it was last saved: (cell, aggregate) and
/// (edge, transition), as they are now.
pub type Changes = (Vec<(Key, Agg)>, Vec<(routes::Edge, routes::Transition)>);

/// Where one device was last, for learning its route from its next
/// sample. Held only while its samples arrive (never stored).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Trail {
    from: u64,
    entered: f64,
    last: f64,
    /// The cell's chain (the cell it is in, then its parents; 0 past its
    /// end), as passes are counted in.
    levels: [u64; CHAIN],
    /// Whether the current pass had a weak reading yet, per level.
    dipped: [bool; CHAIN],
}

impl Trail {
    /// The cell the device is in.
    fn here(&self) -> u64 {
        self.levels[0]
    }
}

/// Levels of a cell's chain that count passes: the cell and its first two
/// parents (with more parent levels configured, the others count none).
const CHAIN: usize = 3;

/// A published cell: a finest cell that k devices saw, as the map answers
/// for it at any hour.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Published {
    pub cell: CellIndex,
    pub estimate: Estimate,
    /// Share of the passes through the cell that had a weak reading
    /// (`None` before any pass was counted).
    pub dip_share: Option<f64>,
    /// Dips recur here ([`Map::dips_recur`] of the cell alone).
    pub dips_recur: bool,
}

/// A cell's corners as (lat, lon), for drawing it; `None` for a number
/// that is not an H3 cell.
pub fn cell_boundary(cell: u64) -> Option<Vec<(f64, f64)>> {
    let c = CellIndex::try_from(cell).ok()?;
    Some(c.boundary().iter().map(|ll| (ll.lat(), ll.lng())).collect())
}

/// Hour of the week (0 = Thursday 00:00 UTC, the unix epoch's weekday).
pub fn hour_of_week(t: f64) -> u8 {
    ((t.floor() as i64).rem_euclid(WEEK_S) / HOUR_S) as u8
}

pub(crate) fn tag(device: u64, cell: u64) -> u64 {
    // A keyed mix (splitmix64 over device ^ cell): equal for one device in
    // one cell, unrelated across cells.
    let mut z = device ^ cell.rotate_left(17) ^ 0x9E37_79B9_7F4A_7C15;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Map {
    pub fn new(cfg: Config) -> Result<Map, QosError> {
        let resolution = Resolution::try_from(cfg.resolution)
            .map_err(|_| QosError::Resolution(cfg.resolution))?;
        for (what, value) in [
            ("half_life_s", cfg.half_life_s),
            ("weak_kbps", cfg.weak_kbps),
            ("min_weight_s", cfg.min_weight_s),
            ("min_hour_weight_s", cfg.min_hour_weight_s),
            ("dip_share", cfg.dip_share),
            ("dip_passes", cfg.dip_passes),
        ] {
            if !value.is_finite() || value < 0.0 {
                return Err(QosError::Value { what, value });
            }
        }
        if cfg.half_life_s == 0.0 {
            return Err(QosError::Value {
                what: "half_life_s",
                value: 0.0,
            });
        }
        Ok(Map {
            cfg,
            resolution,
            cells: HashMap::new(),
            routes: Routes::default(),
            changed: HashSet::new(),
            newest: f64::MIN,
        })
    }

    pub fn routes(&self) -> &Routes {
        &self.routes
    }

    /// Every aggregate, for storing.
    pub fn cells(&self) -> impl Iterator<Item = (&Key, &Agg)> {
        self.cells.iter()
    }

    /// Restores one stored aggregate (and the newest time it implies).
    pub fn restore(&mut self, key: Key, agg: Agg) {
        self.newest = self.newest.max(agg.at);
        self.cells.insert(key, agg);
    }

    /// Restores one stored transition.
    pub fn restore_route(&mut self, edge: routes::Edge, tr: routes::Transition) {
        self.newest = self.newest.max(tr.at);
        self.routes.restore(edge, tr);
    }

    /// The finest cells that answer, as they answer at any hour.
    pub fn published(&self) -> Vec<Published> {
        let now = self.newest;
        let res = self.resolution;
        let mut out: Vec<Published> = self
            .cells
            .iter()
            .filter(|((_, hour), _)| hour.is_none())
            .filter_map(|((cell, _), agg)| {
                let cell = CellIndex::try_from(*cell).ok()?;
                (cell.resolution() == res).then_some(())?;
                let estimate = agg.estimate(now, &self.cfg, Level::Cell)?;
                Some(Published {
                    cell,
                    estimate,
                    dip_share: (agg.passes > 0.0).then(|| agg.dip_passes / agg.passes),
                    dips_recur: agg.dips_recur(&self.cfg),
                })
            })
            .collect();
        out.sort_by_key(|p| u64::from(p.cell));
        out
    }

    /// Adds one observation of a device and learns its route from where
    /// the device was before (`trail`, updated; start with `None`).
    pub fn observe(&mut self, s: &Sample, trail: &mut Option<Trail>) -> Result<(), QosError> {
        self.add(s)?;
        let cell = self.cell_of(s.lat, s.lon)?;
        let cfg = self.cfg;
        // The trip goes on from the trail (in order, without a long gap),
        // or this sample starts one.
        let goes_on = trail.filter(|tr| s.t >= tr.last && s.t - tr.last <= cfg.trip_gap_s);
        if trail.is_some_and(|tr| s.t < tr.last) {
            // Out of order: keep the trail, learn nothing more from it.
            return Ok(());
        }
        let (levels, dipped) = self.count_passes(s, cell, goes_on.as_ref());
        let cell = u64::from(cell);
        *trail = Some(match goes_on {
            Some(tr) if cell == tr.here() => Trail {
                last: s.t,
                levels,
                dipped,
                ..tr
            },
            Some(tr) => {
                self.routes.add(
                    (tr.from, tr.here(), cell),
                    s.t - tr.entered,
                    s.t,
                    s.device,
                    &cfg,
                );
                Trail {
                    from: tr.here(),
                    entered: s.t,
                    last: s.t,
                    levels,
                    dipped,
                }
            }
            None => Trail {
                from: routes::NONE,
                entered: s.t,
                last: s.t,
                levels,
                dipped,
            },
        });
        Ok(())
    }

    /// Counts passes, and passes with a dip, in the cell's chain at any
    /// hour: a level's pass begins where the trip enters that level's cell
    /// (or begins). Returns the levels' cells and which of their current
    /// passes have dipped.
    fn count_passes(
        &mut self,
        s: &Sample,
        cell: CellIndex,
        before: Option<&Trail>,
    ) -> ([u64; CHAIN], [bool; CHAIN]) {
        let weak = s.down_kbps < self.cfg.weak_kbps;
        let mut levels = [0; CHAIN];
        let mut dipped = [false; CHAIN];
        for (i, c) in self.chain(cell).into_iter().enumerate().take(CHAIN) {
            levels[i] = c;
            let same_pass = before.filter(|tr| tr.levels[i] == c);
            let had = same_pass.is_some_and(|tr| tr.dipped[i]);
            dipped[i] = had || weak;
            if let Some(a) = self.cells.get_mut(&(c, None)) {
                a.count_pass(s.t, same_pass.is_none(), weak && !had, self.cfg.half_life_s);
            }
        }
        (levels, dipped)
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Whether anything changed since [`Map::take_changes`] (restoring is
    /// not a change).
    pub fn has_changes(&self) -> bool {
        !self.changed.is_empty() || self.routes.has_changes()
    }

    /// The cells and transitions changed since the last call, as they are
    /// now; the map then counts nothing as changed.
    pub fn take_changes(&mut self) -> Changes {
        let cells = self
            .changed
            .drain()
            .filter_map(|k| self.cells.get(&k).map(|a| (k, a.clone())))
            .collect();
        (cells, self.routes.take_changes())
    }

    /// Counts `changes` as changed again (their save failed).
    pub fn unsaved(&mut self, changes: &Changes) {
        self.changed.extend(changes.0.iter().map(|(k, _)| *k));
        self.routes.unsaved(changes.1.iter().map(|(e, _)| *e));
    }

    /// Cells held (all levels).
    pub fn len(&self) -> usize {
        self.cells.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cells.is_empty()
    }

    /// The time ages are measured from: the newest sample held.
    pub fn newest(&self) -> Option<f64> {
        (self.newest > f64::MIN).then_some(self.newest)
    }

    /// The H3 cell of a position at the map's resolution.
    pub fn cell_of(&self, lat: f64, lon: f64) -> Result<CellIndex, QosError> {
        if !(-90.0..=90.0).contains(&lat) || !(-180.0..=180.0).contains(&lon) {
            return Err(QosError::Position { lat, lon });
        }
        LatLng::new(lat, lon)
            .map(|ll| ll.to_cell(self.resolution))
            .map_err(|_| QosError::Position { lat, lon })
    }

    /// The cells a position falls in, finest first: the cell, then each
    /// parent up to `parent_levels`.
    fn chain(&self, cell: CellIndex) -> Vec<u64> {
        let mut v = vec![u64::from(cell)];
        let res = u8::from(self.resolution);
        for up in 1..=self.cfg.parent_levels.min(res) {
            if let Some(p) = Resolution::try_from(res - up)
                .ok()
                .and_then(|r| cell.parent(r))
            {
                v.push(u64::from(p));
            }
        }
        v
    }

    /// Adds one observation.
    pub fn add(&mut self, s: &Sample) -> Result<(), QosError> {
        for (what, value) in [
            ("duration_s", s.duration_s),
            ("down_kbps", s.down_kbps),
            ("t", s.t.abs()),
        ] {
            if !value.is_finite() || value < 0.0 {
                return Err(QosError::Value { what, value });
            }
        }
        let cell = self.cell_of(s.lat, s.lon)?;
        let how = hour_of_week(s.t);
        let cfg = self.cfg;
        for (i, c) in self.chain(cell).into_iter().enumerate() {
            let t = tag(s.device, c);
            if i == 0 {
                self.cells
                    .entry((c, Some(how)))
                    .or_default()
                    .add(s, t, &cfg);
                self.changed.insert((c, Some(how)));
            }
            self.cells.entry((c, None)).or_default().add(s, t, &cfg);
            self.changed.insert((c, None));
        }
        self.newest = self.newest.max(s.t);
        Ok(())
    }

    /// What the map expects at a position at time `t`: the finest level
    /// that k devices saw with enough weight.
    pub fn estimate(&self, lat: f64, lon: f64, t: f64) -> Result<Option<Estimate>, QosError> {
        let cell = self.cell_of(lat, lon)?;
        Ok(self.estimate_cell(cell, t))
    }

    /// Whether dips recur in this cell or its parent (one level up, about
    /// 3× wider): most passes through it had a weak reading, even where
    /// each lasted too short to make the cell weak.
    pub fn dips_recur(&self, cell: CellIndex) -> bool {
        self.chain(cell).into_iter().take(2).any(|c| {
            self.cells
                .get(&(c, None))
                .is_some_and(|a| a.dips_recur(&self.cfg))
        })
    }

    /// The same for a cell.
    pub fn estimate_cell(&self, cell: CellIndex, t: f64) -> Option<Estimate> {
        let now = self.newest.max(f64::MIN);
        let chain = self.chain(cell);
        let fine = chain.first().copied()?;
        let tries = [
            ((fine, Some(hour_of_week(t))), Level::CellHour),
            ((fine, None), Level::Cell),
        ]
        .into_iter()
        .chain(chain.iter().skip(1).map(|p| ((*p, None), Level::Parent)));
        tries
            .filter_map(|(key, level)| self.cells.get(&key)?.estimate(now, &self.cfg, level))
            .next()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LAT: f64 = 59.9139;
    const LON: f64 = 10.7522;

    fn sample(t: f64, kbps: f64, device: u64) -> Sample {
        Sample {
            t,
            lat: LAT,
            lon: LON,
            duration_s: 1.0,
            down_kbps: kbps,
            device,
        }
    }

    #[test]
    fn only_what_changed_is_saved_again() {
        let mut m = Map::new(Config::default()).expect("map");
        let mut trail = None;
        m.observe(&sample(1000.0, 100.0, 1), &mut trail)
            .expect("add");
        let east = Sample {
            lon: LON + 0.01,
            ..sample(1010.0, 100.0, 1)
        };
        m.observe(&east, &mut trail).expect("add");
        assert!(m.has_changes());
        let (cells, routes) = m.take_changes();
        // Two cells, each at its hour and at every level above.
        let levels = 1 + usize::from(Config::default().parent_levels);
        assert_eq!(cells.len(), m.len(), "everything is new once");
        assert!(
            cells.len() > levels && cells.len() <= 2 * (levels + 1),
            "{}",
            cells.len()
        );
        assert_eq!(routes.len(), m.routes().len());
        assert!(!m.has_changes());
        assert_eq!(m.take_changes().0.len(), 0, "nothing moved since");

        // One more sample where the first was: its cell, its hour and its
        // parents change; the other cell does not.
        m.observe(&sample(1020.0, 50.0, 2), &mut None).expect("add");
        let (again, routes) = m.take_changes();
        assert!(routes.is_empty(), "a first sample learns no route");
        let here = u64::from(m.cell_of(LAT, LON).expect("cell"));
        let there = u64::from(m.cell_of(LAT, LON + 0.01).expect("cell"));
        assert!(again.iter().any(|((c, _), a)| *c == here && a.weight > 1.5));
        assert!(again.iter().all(|((c, _), _)| *c != there));
        assert!(again.len() < cells.len());

        // A failed save counts its cells as changed again.
        m.unsaved(&(again.clone(), vec![]));
        assert_eq!(m.take_changes().0.len(), again.len());
    }

    #[test]
    fn needs_k_devices() {
        let mut m = Map::new(Config::default()).expect("map");
        for d in 0..2 {
            for i in 0..30 {
                m.add(&sample(1000.0 + i as f64, 100.0, d)).expect("add");
            }
        }
        assert_eq!(
            m.estimate(LAT, LON, 1000.0).expect("ok"),
            None,
            "two devices"
        );
        m.add(&sample(1040.0, 100.0, 2)).expect("add");
        let e = m
            .estimate(LAT, LON, 1000.0)
            .expect("ok")
            .expect("three devices");
        assert!(e.weak() && (e.kbps - 100.0).abs() < 1e-9, "{e:?}");
    }

    #[test]
    fn weighted_by_duration_not_rows() {
        let mut m = Map::new(Config::default()).expect("map");
        // Ten 1 s rows of 2000 kbps and one 60 s outage row at 0.
        for d in 0..3 {
            for i in 0..10 {
                m.add(&sample(1000.0 + i as f64, 2000.0, d)).expect("add");
            }
            m.add(&Sample {
                duration_s: 60.0,
                ..sample(1070.0, 0.0, d)
            })
            .expect("add");
        }
        // (Within the decay of a 30-day half-life over 70 s.)
        let e = m.estimate(LAT, LON, 1000.0).expect("ok").expect("answers");
        assert!((e.weak_share - 60.0 / 70.0).abs() < 1e-4, "{e:?}");
        assert!((e.kbps - 2000.0 * 10.0 / 70.0).abs() < 0.1, "{e:?}");
    }

    #[test]
    fn decays_from_the_newest_sample_not_the_clock() {
        let cfg = Config {
            half_life_s: 3600.0,
            ..Config::default()
        };
        let mut m = Map::new(cfg).expect("map");
        // An old dataset (1990) still answers: age is from its newest row.
        let old = 631_152_000.0;
        for d in 0..3 {
            for i in 0..20 {
                m.add(&sample(old + i as f64, 100.0, d)).expect("add");
            }
        }
        assert!(m.estimate(LAT, LON, old).expect("ok").is_some());
        // Newer good samples outweigh old weak ones; a day later the old
        // ones have faded to nothing.
        for d in 0..3 {
            for i in 0..20 {
                m.add(&sample(old + 86_400.0 + i as f64, 5000.0, d))
                    .expect("add");
            }
        }
        let e = m
            .estimate(LAT, LON, old + 86_400.0)
            .expect("ok")
            .expect("answers");
        assert!(e.weak_share < 1e-6 && e.kbps > 4999.0, "{e:?}");
    }

    #[test]
    fn falls_back_to_the_cell_then_the_parent() {
        let mut m = Map::new(Config::default()).expect("map");
        for d in 0..3 {
            for i in 0..20 {
                m.add(&sample(1000.0 + i as f64, 100.0, d)).expect("add");
            }
        }
        let same_hour = m.estimate(LAT, LON, 1000.0).expect("ok").expect("answers");
        assert_eq!(same_hour.level, Level::CellHour);
        let other_hour = m
            .estimate(LAT, LON, 1000.0 + 5.0 * 3600.0)
            .expect("ok")
            .expect("answers");
        assert_eq!(other_hour.level, Level::Cell);
        assert!(other_hour.confidence < same_hour.confidence);
        // A neighbouring cell under the same parent two levels up.
        let home = m.cell_of(LAT, LON).expect("cell");
        let up = Resolution::try_from(8u8).expect("res");
        let (lat, lon) = (1..40)
            .flat_map(|i| [(i as f64 * 0.0002, 0.0), (0.0, i as f64 * 0.0004)])
            .map(|(a, b)| (LAT + a, LON + b))
            .find(|(a, b)| {
                let c = m.cell_of(*a, *b).expect("cell");
                c != home && c.parent(up) == home.parent(up)
            })
            .expect("a sibling cell nearby");
        let e = m
            .estimate(lat, lon, 1000.0)
            .expect("ok")
            .expect("parent answers");
        assert_eq!(e.level, Level::Parent);
        assert_eq!(m.estimate(LAT + 1.0, LON, 1000.0).expect("ok"), None);
    }

    #[test]
    fn bad_input_is_an_error() {
        assert!(
            Map::new(Config {
                resolution: 16,
                ..Config::default()
            })
            .is_err()
        );
        let mut m = Map::new(Config::default()).expect("map");
        assert!(
            m.add(&Sample {
                lat: 91.0,
                ..sample(1.0, 1.0, 1)
            })
            .is_err()
        );
        assert!(
            m.add(&Sample {
                duration_s: f64::NAN,
                ..sample(1.0, 1.0, 1)
            })
            .is_err()
        );
        assert!(m.add(&sample(1.0, -5.0, 1)).is_err());
        assert!(m.is_empty(), "nothing was added");
    }

    #[test]
    fn tags_do_not_link_cells() {
        assert_ne!(tag(7, 1), tag(7, 2));
        assert_eq!(tag(7, 1), tag(7, 1));
        assert_eq!(hour_of_week(0.0), 0);
        assert_eq!(hour_of_week(3600.0 * 24.0 * 7.0 + 7200.0), 2);
    }
}
