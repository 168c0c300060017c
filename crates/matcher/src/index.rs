//! The spatial index: online sharers bucketed into lat/lon grid cells of
//! about 220 m, so a region query touches a handful of cells instead of
//! scanning everyone. Meant for 1,000,000 sharers: slots are reused, cells are
//! small vectors in one hash map holding each point as a unit vector (a
//! reject costs one dot product), and moving a sharer is O(1).
//!
//! Cells shrink in longitude degrees with latitude (their ground width stays
//! near 220 m), and column numbers wrap at the antimeridian.

use bandshare_core::{Fingerprint, LinkState, NetworkType, Position, Security, ServiceSet};
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

/// Cell height in degrees of latitude (~222 m).
const CELL_DEG: f64 = 0.002;
const ROWS_OFFSET: i64 = (90.0 / CELL_DEG) as i64 + 1;

/// A handle into the index; reused after removal.
pub type SharerId = u32;

/// What matching needs to know about one online sharer.
#[derive(Clone, Debug)]
pub struct SharerInfo {
    pub name: Arc<str>,
    /// Where the sharer is shown: its position moved by its published
    /// offset (the coordinator's privacy), what every distance, band and
    /// circle or sphere is measured to.
    pub position: Position,
    /// Where it really is: only the car's box uses it (co-movement guards
    /// it); the same as `position` where no offset is applied.
    pub exact: Position,
    pub heading_deg: Option<f64>,
    pub speed_mps: Option<f64>,
    pub services: ServiceSet,
    pub network: Option<NetworkType>,
    /// The hotspot's Wi-Fi security, when declared.
    pub security: Option<Security>,
    pub link: LinkState,
    /// Consent: answers access requests at all.
    pub accepting: bool,
    pub active_requesters: u32,
    /// 0 = no limit.
    pub max_requesters: u32,
    /// Last Wi-Fi scan (empty when none).
    pub fingerprint: Fingerprint,
    /// Serving cell and associated router, when reported.
    pub cell: Option<Arc<str>>,
    pub router: Option<Arc<str>>,
}

/// Radio evidence a sharer can be found by without a position.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum RadioKey {
    Bssid(u64),
    Cell(Arc<str>),
    Router(Arc<str>),
}

fn radio_keys(info: &SharerInfo) -> Vec<RadioKey> {
    let mut k: Vec<RadioKey> = info.fingerprint.bssids().map(RadioKey::Bssid).collect();
    if let Some(c) = &info.cell {
        k.push(RadioKey::Cell(c.clone()));
    }
    if let Some(r) = &info.router {
        k.push(RadioKey::Router(r.clone()));
    }
    k
}

struct Slot {
    /// Shared with the contacts a share request copies out (a pointer, not
    /// the record); an update while one is held copies it first.
    info: Arc<SharerInfo>,
    cell: u64,
    at: u32, // position inside the cell's vector
}

/// What filters and scoring read, kept in the bucket next to the point so
/// ranking touches a sharer's slot only if it makes the top M.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Summary {
    pub services: ServiceSet,
    pub network: Option<NetworkType>,
    pub security: Option<Security>,
    pub up: bool,
    pub accepting: bool,
    pub active_requesters: u32,
    pub max_requesters: u32,
    /// `link.quality()`, computed when the link state changes.
    pub quality: f32,
    /// Velocity east and north (m/s) when speed and heading are known.
    pub velocity: Option<(f32, f32)>,
}

impl Summary {
    pub fn of(info: &SharerInfo) -> Summary {
        Summary {
            services: info.services,
            network: info.network,
            security: info.security,
            up: info.link.up,
            accepting: info.accepting,
            active_requesters: info.active_requesters,
            max_requesters: info.max_requesters,
            quality: info.link.quality() as f32,
            velocity: match (info.speed_mps, info.heading_deg) {
                (Some(s), Some(h)) => {
                    let (e, n) = bandshare_core::enu::velocity(s, h);
                    Some((e as f32, n as f32))
                }
                _ => None,
            },
        }
    }
}

/// A bucket entry carries the point as a unit vector, so a query rejects
/// points outside the circle with one dot product and without touching the
/// slot (a cache miss at a million sharers), and the summary for ranking.
#[derive(Clone, Copy)]
struct Entry {
    id: SharerId,
    xyz: [f64; 3],
    summary: Summary,
}

fn unit(p: &Position) -> [f64; 3] {
    let (la, lo) = (p.lat.to_radians(), p.lon.to_radians());
    [la.cos() * lo.cos(), la.cos() * lo.sin(), la.sin()]
}

/// Great-circle distance from the chord between two unit vectors.
fn chord_to_metres(chord2: f64) -> f64 {
    2.0 * bandshare_core::geo::EARTH_RADIUS_M * (chord2.max(0.0).sqrt() / 2.0).min(1.0).asin()
}

/// Multiplicative hashing of the packed cell key: keys are already well
/// spread integers, SipHash would only cost time.
#[derive(Default)]
struct CellHasher(u64);

impl Hasher for CellHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ *b as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (n ^ (n >> 29)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type Cells = HashMap<u64, Vec<Entry>, BuildHasherDefault<CellHasher>>;

#[derive(Default)]
pub struct Index {
    slots: Vec<Option<Slot>>,
    free: Vec<SharerId>,
    cells: Cells,
    /// Sharers by the access points, cell and router they hear.
    radio: HashMap<RadioKey, Vec<SharerId>>,
    len: usize,
}

fn row_of(lat: f64) -> i64 {
    (lat / CELL_DEG).floor() as i64 + ROWS_OFFSET
}

/// Longitude width of the cells in a row, and how many columns the row has.
fn row_geometry(row: i64) -> (f64, i64) {
    let lat_mid = ((row - ROWS_OFFSET) as f64 + 0.5) * CELL_DEG;
    let cos = lat_mid.to_radians().cos().max(0.01);
    let cols = ((360.0 * cos / CELL_DEG).floor() as i64).max(1);
    (360.0 / cols as f64, cols)
}

fn col_of(lon: f64, row: i64) -> i64 {
    let (width, cols) = row_geometry(row);
    (((lon + 180.0) / width).floor() as i64).rem_euclid(cols)
}

fn pack(row: i64, col: i64) -> u64 {
    ((row as u64) << 32) | (col as u64 & 0xffff_ffff)
}

fn cell_of(p: &Position) -> u64 {
    let row = row_of(p.lat);
    pack(row, col_of(p.lon, row))
}

impl Index {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn insert(&mut self, info: SharerInfo) -> SharerId {
        let cell = cell_of(&info.position);
        let id = match self.free.pop() {
            Some(id) => id,
            None => {
                self.slots.push(None);
                (self.slots.len() - 1) as SharerId
            }
        };
        self.link_radio(id, radio_keys(&info));
        let bucket = self.cells.entry(cell).or_default();
        bucket.push(Entry {
            id,
            xyz: unit(&info.position),
            summary: Summary::of(&info),
        });
        self.slots[id as usize] = Some(Slot {
            info: Arc::new(info),
            cell,
            at: (bucket.len() - 1) as u32,
        });
        self.len += 1;
        id
    }

    pub fn get(&self, id: SharerId) -> Option<&SharerInfo> {
        self.slots.get(id as usize)?.as_ref().map(|s| &*s.info)
    }

    /// The same record, shared (cloning it is one reference count).
    pub fn shared(&self, id: SharerId) -> Option<&Arc<SharerInfo>> {
        self.slots.get(id as usize)?.as_ref().map(|s| &s.info)
    }

    /// Changes a sharer; re-buckets it when its position moved to another cell.
    pub fn update(&mut self, id: SharerId, f: impl FnOnce(&mut SharerInfo)) -> bool {
        let Some(Some(slot)) = self.slots.get_mut(id as usize) else {
            return false;
        };
        let before = slot.info.position;
        let keys_before = radio_keys(&slot.info);
        f(Arc::make_mut(&mut slot.info));
        let keys_after = radio_keys(&slot.info);
        let summary = Summary::of(&slot.info);
        let moved = slot.info.position != before;
        let radio_changed = keys_before != keys_after;
        let xyz = unit(&slot.info.position);
        let cell = if moved {
            cell_of(&slot.info.position)
        } else {
            slot.cell
        };
        if cell == slot.cell {
            if let Some(e) = self
                .cells
                .get_mut(&cell)
                .and_then(|b| b.get_mut(slot.at as usize))
            {
                e.xyz = xyz;
                e.summary = summary;
            }
        } else {
            let (old, at) = (slot.cell, slot.at);
            self.unlink(old, at);
            let bucket = self.cells.entry(cell).or_default();
            bucket.push(Entry { id, xyz, summary });
            let at = (bucket.len() - 1) as u32;
            if let Some(Some(slot)) = self.slots.get_mut(id as usize) {
                slot.cell = cell;
                slot.at = at;
            }
        }
        if radio_changed {
            self.unlink_radio(id, &keys_before);
            self.link_radio(id, keys_after);
        }
        true
    }

    pub fn remove(&mut self, id: SharerId) -> Option<SharerInfo> {
        let slot = self.slots.get_mut(id as usize)?.take()?;
        self.unlink(slot.cell, slot.at);
        self.unlink_radio(id, &radio_keys(&slot.info));
        self.free.push(id);
        self.len -= 1;
        Some(Arc::try_unwrap(slot.info).unwrap_or_else(|shared| (*shared).clone()))
    }

    fn link_radio(&mut self, id: SharerId, keys: Vec<RadioKey>) {
        for k in keys {
            self.radio.entry(k).or_default().push(id);
        }
    }

    fn unlink_radio(&mut self, id: SharerId, keys: &[RadioKey]) {
        for k in keys {
            if let Some(v) = self.radio.get_mut(k) {
                v.retain(|x| *x != id);
                if v.is_empty() {
                    self.radio.remove(k);
                }
            }
        }
    }

    /// Sharers that hear `key` (an access point, cell or router).
    pub fn by_radio(&self, key: &RadioKey) -> &[SharerId] {
        self.radio.get(key).map_or(&[], |v| v.as_slice())
    }

    /// Removes entry `at` of `cell`'s bucket, fixing the moved entry's index.
    fn unlink(&mut self, cell: u64, at: u32) {
        let Some(bucket) = self.cells.get_mut(&cell) else {
            return;
        };
        let at = at as usize;
        if at >= bucket.len() {
            return;
        }
        bucket.swap_remove(at);
        if let Some(moved) = bucket.get(at).map(|e| e.id)
            && let Some(Some(s)) = self.slots.get_mut(moved as usize)
        {
            s.at = at as u32;
        }
        if bucket.is_empty() {
            self.cells.remove(&cell);
        }
    }

    /// Calls `f` with every sharer within `radius_m` ground distance of
    /// `center`: its id, its summary, that distance and its offset (metres
    /// east, north; tangent-plane approximation, good to a few km).
    pub fn within(
        &self,
        center: &Position,
        radius_m: f64,
        mut f: impl FnMut(SharerId, &Summary, f64, (f64, f64)),
    ) {
        let ang = radius_m / bandshare_core::geo::EARTH_RADIUS_M;
        let c = unit(center);
        let (sl, cl) = center.lon.to_radians().sin_cos();
        let (sp, cp) = center.lat.to_radians().sin_cos();
        let (east, north) = ([-sl, cl, 0.0], [-sp * cl, -sp * sl, cp]);
        let r = bandshare_core::geo::EARTH_RADIUS_M;
        // Squared chord of the radius, with a hair of slack for rounding;
        // the exact distance decides below.
        let max_chord2 = (2.0 * (ang.min(std::f64::consts::PI) / 2.0).sin()).powi(2) * (1.0 + 1e-9);
        let dlat = ang.to_degrees();
        let (lo, hi) = (
            row_of((center.lat - dlat).max(-90.0)),
            row_of((center.lat + dlat).min(90.0)),
        );
        // Exact half-width in longitude of a spherical cap; None when the
        // cap contains a pole and so spans every longitude.
        let coslat = center.lat.to_radians().cos();
        let dlon =
            (coslat > ang.sin()).then(|| (ang.sin() / coslat).asin().to_degrees() * 1.000_001);
        // First every bucket the query touches: the hash probes are
        // independent, so the processor overlaps their cache misses instead
        // of waiting for each in turn while it scans.
        let mut buckets: Vec<&[Entry]> = Vec::with_capacity(16);
        for row in lo..=hi {
            let (width, cols) = row_geometry(row);
            let (c0, c1) = match dlon {
                Some(dlon) => (
                    ((center.lon - dlon + 180.0) / width).floor() as i64,
                    ((center.lon + dlon + 180.0) / width).floor() as i64,
                ),
                None => (0, cols - 1),
            };
            let span = (c1 - c0 + 1).min(cols);
            for k in 0..span {
                let col = (c0 + k).rem_euclid(cols);
                if let Some(bucket) = self.cells.get(&pack(row, col)) {
                    buckets.push(bucket);
                }
            }
        }
        // Then one plain load per cache line of every bucket, independent
        // of each other, so their misses are in flight together before the
        // scan needs them (entries are 64 bytes: one per line).
        let warm: f64 = buckets
            .iter()
            .flat_map(|b| b.iter().map(|e| e.xyz[0]))
            .sum();
        std::hint::black_box(warm);
        for bucket in buckets {
            for e in bucket {
                let (dx, dy, dz) = (e.xyz[0] - c[0], e.xyz[1] - c[1], e.xyz[2] - c[2]);
                let chord2 = dx * dx + dy * dy + dz * dz;
                if chord2 > max_chord2 {
                    continue;
                }
                let d = chord_to_metres(chord2);
                if d <= radius_m {
                    let dot = |a: [f64; 3]| r * (dx * a[0] + dy * a[1] + dz * a[2]);
                    f(e.id, &e.summary, d, (dot(east), dot(north)));
                }
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    pub fn sharer(name: &str, position: Position) -> SharerInfo {
        SharerInfo {
            name: name.into(),
            position,
            exact: position,
            heading_deg: None,
            speed_mps: None,
            services: ServiceSet::default(),
            network: None,
            security: None,
            link: LinkState::default(),
            accepting: true,
            active_requesters: 0,
            max_requesters: 0,
            fingerprint: Fingerprint::default(),
            cell: None,
            router: None,
        }
    }

    fn pos(lat: f64, lon: f64) -> Position {
        Position::new(lat, lon, None).expect("test position")
    }

    #[test]
    fn insert_move_remove() {
        let mut idx = Index::default();
        let c = pos(39.9, 116.4);
        let a = idx.insert(sharer("a", c.offset_m(50.0, 0.0)));
        let b = idx.insert(sharer("b", c.offset_m(0.0, 500.0)));
        let found = |idx: &Index| {
            let mut v = vec![];
            idx.within(&c, 200.0, |id, _, _, _| v.push(id));
            v.sort();
            v
        };
        assert_eq!(found(&idx), vec![a]);
        idx.update(b, |s| s.position = c.offset_m(-10.0, 10.0));
        assert_eq!(found(&idx), vec![a, b]);
        assert!(idx.remove(a).is_some());
        assert!(idx.remove(a).is_none());
        assert_eq!(found(&idx), vec![b]);
        assert_eq!(idx.len(), 1);
        let again = idx.insert(sharer("c", c));
        assert_eq!(again, a, "slots are reused");
    }

    #[test]
    fn across_the_antimeridian_and_near_poles() {
        let mut idx = Index::default();
        let east = idx.insert(sharer("e", pos(10.0, 179.9995)));
        let west = idx.insert(sharer("w", pos(10.0, -179.9995)));
        let mut v = vec![];
        idx.within(&pos(10.0, 180.0), 200.0, |id, _, _, _| v.push(id));
        v.sort();
        assert_eq!(v, vec![east, west]);
        let polar = idx.insert(sharer("p", pos(89.999, 20.0)));
        let mut v = vec![];
        idx.within(&pos(89.999, -160.0), 300.0, |id, _, _, _| v.push(id));
        assert_eq!(v, vec![polar]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn same_as_brute_force(
            clat in -85.0f64..85.0, clon in -180.0f64..180.0,
            pts in proptest::collection::vec((-800.0f64..800.0, -800.0f64..800.0), 0..60),
            moves in proptest::collection::vec((0usize..60, -800.0f64..800.0, -800.0f64..800.0), 0..20),
            radius in 1.0f64..600.0,
        ) {
            let c = pos(clat, clon);
            let mut idx = Index::default();
            let mut truth: Vec<(SharerId, Position)> = vec![];
            for (e, n) in &pts {
                let p = c.offset_m(*e, *n);
                truth.push((idx.insert(sharer("x", p)), p));
            }
            for (i, e, n) in moves {
                if let Some((id, p)) = truth.get_mut(i) {
                    *p = c.offset_m(e, n);
                    let np = *p;
                    idx.update(*id, |s| s.position = np);
                }
            }
            let mut got = vec![];
            idx.within(&c, radius, |id, _, _, _| got.push(id));
            got.sort();
            let mut want: Vec<SharerId> = truth.iter()
                .filter(|(_, p)| c.ground_distance_m(p) <= radius).map(|(id, _)| *id).collect();
            want.sort();
            prop_assert_eq!(got, want);
        }
    }
}
