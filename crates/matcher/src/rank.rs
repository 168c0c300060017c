//! Candidates: sharers in the scene's region that pass the compatibility
//! filters, scored by measured link state, closeness, spare capacity and how
//! long they are expected to stay in range, best first.

use crate::index::{Index, RadioKey, SharerId, Summary};
use crate::region::{Evidence, NoLocation, Region, RegionConfig, SceneDecision, decide_scene};
use bandshare_core::enu::{Frame, OrientedBox, contact_time_s};
use bandshare_core::{DistanceBand, Fingerprint, NetworkType, Position, Security, ServiceSet};
use std::sync::Arc;

/// Contact times are capped here: "a long time".
pub const CONTACT_CAP_S: f64 = 600.0;

#[derive(Clone, Debug)]
pub struct Query {
    pub evidence: Evidence,
    pub wanted: ServiceSet,
    pub network: Option<NetworkType>,
    /// The weakest hotspot security accepted.
    pub security: Option<Security>,
    /// Also explain sharers that were filtered out.
    pub explain: bool,
    /// How far past a circle's or sphere's edge to search, measured from
    /// `evidence.fix`. The coordinator moves that point by up to this much
    /// for privacy, so every sharer inside the region around the true
    /// point is still found (and a few just outside it too).
    pub margin_m: f64,
}

#[derive(Clone, Debug)]
pub struct MatchConfig {
    pub region: RegionConfig,
    /// How many candidates at most go on to access requests (M).
    pub fanout: usize,
}

impl Default for MatchConfig {
    fn default() -> Self {
        MatchConfig {
            region: RegionConfig::default(),
            fanout: 8,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    pub id: SharerId,
    pub score: f64,
    pub distance_m: f64,
    pub band: DistanceBand,
    /// Expected seconds in range (capped at [`CONTACT_CAP_S`]).
    pub contact_s: f64,
}

/// Why a nearby sharer is not a candidate.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    pub id: SharerId,
    pub band: DistanceBand,
    pub reason: String,
}

#[derive(Clone, Debug)]
pub struct Outcome {
    pub scene: SceneDecision,
    /// Best first, at most `fanout`.
    pub candidates: Vec<Candidate>,
    /// Candidates beyond `fanout`, then filtered sharers (only with `explain`).
    pub rejected: Vec<Verdict>,
}

/// Score in 0..=1: link quality weighs most, then closeness, the expected
/// contact time and spare capacity.
pub fn score(info: &Summary, distance_m: f64, contact_s: f64) -> f64 {
    let proximity = 1.0 / (1.0 + distance_m / 50.0);
    let load = match info.max_requesters {
        0 => 1.0 / (1.0 + info.active_requesters as f64 / 4.0),
        max => 1.0 - (info.active_requesters.min(max) as f64 / max as f64),
    };
    // 2 minutes in range counts half as much as "a long time".
    let contact = contact_s / (contact_s + 120.0);
    0.45 * info.quality as f64 + 0.25 * proximity + 0.12 * load + 0.18 * contact
}

/// Why `info` cannot serve `q`, if it cannot.
fn filter(info: &Summary, q: &Query) -> Option<String> {
    let missing = info.services.missing(q.wanted);
    if !missing.is_empty() {
        return Some(format!("service missing: {missing}"));
    }
    if let Some(want) = q.network
        && info.network != Some(want)
    {
        let has = info.network.map_or("unknown", |n| n.as_str());
        return Some(format!("network is {has}, wanted {want}"));
    }
    if let Some(least) = q.security
        && info.security.is_none_or(|s| s < least)
    {
        let has = info.security.map_or("undeclared", |s| s.as_str());
        return Some(format!("security is {has}, wanted at least {least}"));
    }
    if !info.up {
        return Some("uplink down".into());
    }
    if !info.accepting {
        return Some("consent: not accepting requesters".into());
    }
    if info.max_requesters > 0 && info.active_requesters >= info.max_requesters {
        return Some(format!(
            "consent: at capacity ({}/{} requesters)",
            info.active_requesters, info.max_requesters
        ));
    }
    None
}

/// Collects candidates and verdicts for one query.
struct Collect<'q> {
    q: &'q Query,
    candidates: Vec<Candidate>,
    rejected: Vec<Verdict>,
}

impl Collect<'_> {
    fn reject(&mut self, id: SharerId, band: DistanceBand, reason: String) {
        if self.q.explain {
            self.rejected.push(Verdict { id, band, reason });
        }
    }

    /// Applies the compatibility filters, then scores.
    fn consider(
        &mut self,
        id: SharerId,
        s: &Summary,
        distance_m: f64,
        band: DistanceBand,
        contact_s: f64,
    ) {
        match filter(s, self.q) {
            Some(reason) => self.reject(id, band, reason),
            None => self.candidates.push(Candidate {
                id,
                score: score(s, distance_m, contact_s),
                distance_m,
                band,
                contact_s,
            }),
        }
    }
}

fn relative_velocity(s: &Summary, mine: Option<(f64, f64)>) -> (f64, f64) {
    let theirs = s.velocity.map_or((0.0, 0.0), |(e, n)| (e as f64, n as f64));
    let mine = mine.unwrap_or((0.0, 0.0));
    (theirs.0 - mine.0, theirs.1 - mine.1)
}

/// A band from radio similarity when no positions are known.
fn band_from_similarity(sim: f64) -> DistanceBand {
    if sim >= 0.8 {
        DistanceBand::Under10m
    } else if sim >= 0.5 {
        DistanceBand::From10To50m
    } else {
        DistanceBand::From50To200m
    }
}

/// Sharers that hear any of `keys`, sorted, each once.
fn heard_by(index: &Index, keys: impl Iterator<Item = RadioKey>) -> Vec<SharerId> {
    let mut ids: Vec<SharerId> = keys.flat_map(|k| index.by_radio(&k).to_vec()).collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

pub fn rank(index: &Index, q: &Query, cfg: &MatchConfig) -> Result<Outcome, NoLocation> {
    let scene = decide_scene(&q.evidence, &cfg.region)?;
    Ok(rank_in(index, q, cfg, scene))
}

/// [`rank`] in a scene already decided (once per request: the coordinator
/// decides it, then may move the region's centre for privacy).
pub fn rank_in(
    index: &Index,
    q: &Query,
    cfg: &MatchConfig,
    scene: crate::SceneDecision,
) -> Outcome {
    let mut c = Collect {
        q,
        candidates: Vec::with_capacity(64),
        rejected: Vec::new(),
    };
    let mine = q.evidence.velocity();
    match &scene.region {
        Region::Circle { center, radius_m } => in_circle(index, &mut c, mine, center, radius_m),
        Region::Box {
            center,
            shape,
            velocity,
            max_speed_diff_mps,
        } => in_box(
            index,
            &mut c,
            mine,
            center,
            shape,
            velocity,
            max_speed_diff_mps,
        ),
        Region::Sphere { center, radius_m } => in_sphere(index, &mut c, mine, center, radius_m),
        Region::Venue {
            fingerprint,
            threshold,
            router,
            near,
        } => in_venue(index, &mut c, fingerprint, threshold, router, near),
        Region::Anchor { cell, router } => in_anchor(index, &mut c, cell, router),
    }
    let (mut candidates, mut rejected) = (c.candidates, c.rejected);
    let best_first =
        |a: &Candidate, b: &Candidate| b.score.total_cmp(&a.score).then(a.id.cmp(&b.id));
    // Only the top M need an order: select them, then sort those.
    if candidates.len() > cfg.fanout && cfg.fanout > 0 {
        candidates.select_nth_unstable_by(cfg.fanout - 1, best_first);
        let (top, rest) = candidates.split_at_mut(cfg.fanout);
        top.sort_by(best_first);
        if q.explain {
            rest.sort_by(best_first);
        }
    } else {
        candidates.sort_by(best_first);
    }
    if candidates.len() > cfg.fanout {
        for c in candidates.drain(cfg.fanout..) {
            if q.explain {
                rejected.push(Verdict {
                    id: c.id,
                    band: c.band,
                    reason: format!("ranked below the top {} (score {:.3})", cfg.fanout, c.score),
                });
            }
        }
    }
    Outcome {
        scene,
        candidates,
        rejected,
    }
}

/// Outdoors: ground distance from the centre, out to the radius (and the
/// privacy margin).
fn in_circle(
    index: &Index,
    c: &mut Collect<'_>,
    mine: Option<(f64, f64)>,
    center: &Position,
    radius_m: &f64,
) {
    let reach = radius_m + c.q.margin_m.max(0.0);
    // With explain, look twice as far to say who was just outside.
    let look = if c.q.explain { reach * 2.0 } else { reach };
    index.within(center, look, |id, s, d, p| {
        let band = DistanceBand::of_metres(d);
        if d > reach {
            c.reject(id, band, format!("outside the {radius_m:.0} m circle"));
        } else {
            let t = contact_time_s(p, relative_velocity(s, mine), *radius_m, CONTACT_CAP_S);
            c.consider(id, s, d, band, t);
        }
    });
}

/// In a vehicle: inside the oriented box of the car, moving with the
/// requester when its velocity is known.
fn in_box(
    index: &Index,
    c: &mut Collect<'_>,
    mine: Option<(f64, f64)>,
    center: &Position,
    shape: &OrientedBox,
    velocity: &Option<(f64, f64)>,
    max_speed_diff_mps: &f64,
) {
    let frame = Frame::new(center);
    let reach = shape.ground_radius();
    // The index holds where sharers are shown; the box is tested on where
    // they are, at most the margin (the largest published offset) away.
    let wide = reach + c.q.margin_m.max(0.0);
    let look = if c.q.explain {
        (wide * 2.0).max(50.0)
    } else {
        wide
    };
    index.within(center, look, |id, s, d, _| {
        let band = DistanceBand::of_metres(d);
        let Some(info) = index.get(id) else { return };
        let p = frame.enu(&info.exact);
        let vertical = center.alt.is_some() && info.exact.alt.is_some();
        if let Err(miss) = shape.contains(&p, vertical) {
            return c.reject(id, band, format!("outside the car: {miss}"));
        }
        if let Some(v) = velocity {
            let Some((e, n)) = s.velocity else {
                return c.reject(
                    id,
                    band,
                    "not known to move with you (no speed and heading)".into(),
                );
            };
            let diff = (e as f64 - v.0).hypot(n as f64 - v.1);
            if diff > *max_speed_diff_mps {
                return c.reject(
                    id,
                    band,
                    format!("not moving with you (velocity differs by {diff:.1} m/s)"),
                );
            }
        }
        let t = contact_time_s((p.e, p.n), relative_velocity(s, mine), reach, CONTACT_CAP_S);
        c.consider(id, s, d, band, t);
    });
}

/// In a station hall: 3-D distance, so stairs and levels count.
fn in_sphere(
    index: &Index,
    c: &mut Collect<'_>,
    mine: Option<(f64, f64)>,
    center: &Position,
    radius_m: &f64,
) {
    let frame = Frame::new(center);
    let reach = radius_m + c.q.margin_m.max(0.0);
    let look = if c.q.explain { reach * 2.0 } else { reach };
    index.within(center, look, |id, s, d, _| {
        let Some(info) = index.get(id) else { return };
        let p = frame.enu(&info.position);
        let (dist, dz) = match (center.alt, info.position.alt) {
            (Some(_), Some(_)) => (d.hypot(p.u), Some(p.u)),
            _ => (d, None),
        };
        let band = DistanceBand::of_metres(dist);
        if dist > reach {
            let level = match dz {
                Some(u) if u.abs() > 3.0 => {
                    format!(
                        " ({:.0} m {})",
                        u.abs(),
                        if u > 0.0 { "above" } else { "below" }
                    )
                }
                _ => String::new(),
            };
            return c.reject(
                id,
                band,
                format!("outside the {radius_m:.0} m sphere{level}"),
            );
        }
        let t = contact_time_s(
            (p.e, p.n),
            relative_velocity(s, mine),
            *radius_m,
            CONTACT_CAP_S,
        );
        c.consider(id, s, dist, band, t);
    });
}

/// Indoors: the same venue by Wi-Fi similarity or the same router.
fn in_venue(
    index: &Index,
    c: &mut Collect<'_>,
    fingerprint: &Fingerprint,
    threshold: &f64,
    router: &Option<Arc<str>>,
    near: &Option<Position>,
) {
    let keys = fingerprint.bssids().map(RadioKey::Bssid);
    let ids = heard_by(
        index,
        keys.chain(router.iter().map(|r| RadioKey::Router(r.clone()))),
    );
    for id in &ids {
        let Some(info) = index.get(*id) else { continue };
        let sim = fingerprint.similarity(&info.fingerprint);
        let same_router = router.is_some() && *router == info.router;
        let (d, band) = match near {
            Some(n) => {
                let d = n.ground_distance_m(&info.position);
                (d, DistanceBand::of_metres(d))
            }
            None => (f64::NAN, band_from_similarity(sim)),
        };
        if sim < *threshold && !same_router {
            c.reject(
                *id,
                band,
                format!("other venue (Wi-Fi similarity {sim:.2} < {threshold:.2})"),
            );
            continue;
        }
        let s = crate::index::Summary::of(info);
        let dist = if d.is_nan() { 25.0 * (1.0 - sim) } else { d };
        c.consider(*id, &s, dist, band, CONTACT_CAP_S);
    }
    if c.q.explain
        && let Some(n) = near
    {
        index.within(n, 100.0, |id, _, d, _| {
            if ids.binary_search(&id).is_err() {
                c.reject(
                    id,
                    DistanceBand::of_metres(d),
                    "other venue (no shared access point or router)".into(),
                );
            }
        });
    }
}

/// No position: the same serving cell or router.
fn in_anchor(
    index: &Index,
    c: &mut Collect<'_>,
    cell: &Option<Arc<str>>,
    router: &Option<Arc<str>>,
) {
    let keys = cell.iter().map(|c| RadioKey::Cell(c.clone()));
    let ids = heard_by(
        index,
        keys.chain(router.iter().map(|r| RadioKey::Router(r.clone()))),
    );
    for id in ids {
        let Some(info) = index.get(id) else { continue };
        // Same cell can mean kilometres: the band says so.
        c.consider(
            id,
            &crate::index::Summary::of(info),
            200.0,
            DistanceBand::Over200m,
            CONTACT_CAP_S,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::tests::sharer;
    use bandshare_core::{LinkState, Position, Service};

    fn query(at: Position) -> Query {
        Query {
            evidence: Evidence {
                fix: Some(at),
                ..Default::default()
            },
            wanted: ServiceSet::default(),
            network: None,
            security: None,
            margin_m: 0.0,
            explain: true,
        }
    }

    #[test]
    fn security_is_a_minimum() {
        let c = Position::new(39.9, 116.4, None).expect("valid");
        let mut idx = Index::default();
        let mut ids = vec![];
        for (name, sec) in [
            ("undeclared", None),
            ("open", Some(Security::Open)),
            ("wpa2", Some(Security::Wpa2)),
            ("wpa3", Some(Security::Wpa3)),
        ] {
            let mut s = sharer(name, c.offset_m(5.0, 0.0));
            s.security = sec;
            ids.push(idx.insert(s));
        }
        let offered = |least| {
            let mut q = query(c);
            q.security = least;
            let out = rank(&idx, &q, &MatchConfig::default()).expect("ranks");
            let mut got: Vec<_> = out.candidates.iter().map(|c| c.id).collect();
            got.sort();
            (got, out.rejected)
        };
        assert_eq!(offered(None).0.len(), 4, "no minimum: all");
        let (got, rejected) = offered(Some(Security::Wpa2));
        assert_eq!(got, vec![ids[2], ids[3]]);
        let why = |id| {
            rejected
                .iter()
                .find(|v| v.id == id)
                .map(|v| v.reason.clone())
        };
        assert_eq!(
            why(ids[1]).as_deref(),
            Some("security is open, wanted at least wpa2")
        );
        assert_eq!(
            why(ids[0]).as_deref(),
            Some("security is undeclared, wanted at least wpa2")
        );
        assert_eq!(offered(Some(Security::Wpa3)).0, vec![ids[3]]);
    }

    #[test]
    fn filters_and_orders() {
        let c = Position::new(39.9, 116.4, None).expect("valid");
        let mut idx = Index::default();
        let mut near = sharer("near", c.offset_m(5.0, 0.0));
        near.services = "hotspot,5ghz".parse().expect("services");
        near.network = Some(NetworkType::FiveG);
        let near = idx.insert(near);
        let mut far = sharer("far", c.offset_m(150.0, 0.0));
        far.services = "hotspot".parse().expect("services");
        far.network = Some(NetworkType::FiveG);
        let far = idx.insert(far);
        let mut fourg = sharer("4g", c.offset_m(20.0, 0.0));
        fourg.services = "hotspot,5ghz".parse().expect("services");
        fourg.network = Some(NetworkType::FourG);
        let fourg = idx.insert(fourg);
        let outside = idx.insert(sharer("outside", c.offset_m(300.0, 0.0)));
        let mut full = sharer("full", c.offset_m(1.0, 0.0));
        full.max_requesters = 1;
        full.active_requesters = 1;
        let full = idx.insert(full);
        let mut down = sharer("down", c.offset_m(1.0, 0.0));
        down.link = LinkState {
            up: false,
            ..Default::default()
        };
        let down = idx.insert(down);

        let mut q = query(c);
        q.wanted = [Service::Hotspot].into_iter().collect();
        q.network = Some(NetworkType::FiveG);
        let out = rank(&idx, &q, &MatchConfig::default()).expect("ranks");
        let ids: Vec<_> = out.candidates.iter().map(|c| c.id).collect();
        assert_eq!(ids, vec![near, far]);
        assert_eq!(out.candidates[0].band, DistanceBand::Under10m);
        let why = |id| {
            out.rejected
                .iter()
                .find(|v| v.id == id)
                .map(|v| v.reason.clone())
        };
        assert_eq!(why(fourg).as_deref(), Some("network is 4g, wanted 5g"));
        assert_eq!(why(outside).as_deref(), Some("outside the 200 m circle"));
        assert_eq!(why(full).as_deref(), Some("service missing: hotspot"));
        assert_eq!(why(down).as_deref(), Some("service missing: hotspot"));

        let out = rank(&idx, &query(c), &MatchConfig::default()).expect("ranks");
        let why = |id| {
            out.rejected
                .iter()
                .find(|v| v.id == id)
                .map(|v| v.reason.clone())
        };
        assert_eq!(
            why(full).as_deref(),
            Some("consent: at capacity (1/1 requesters)")
        );
        assert_eq!(why(down).as_deref(), Some("uplink down"));
        let mut q = query(c);
        q.wanted = "wifi6".parse().expect("services");
        let out = rank(&idx, &q, &MatchConfig::default()).expect("ranks");
        assert!(out.candidates.is_empty());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
        #[test]
        fn altitude_matters_for_the_sphere_only(
            e in -40.0f64..40.0, n in -40.0f64..40.0, my_alt in -30.0f64..30.0, their_alt in -200.0f64..200.0,
        ) {
            let c = Position::new(39.9, 116.4, Some(my_alt)).expect("valid");
            let mut p = c.offset_m(e, n);
            p.alt = Some(their_alt);
            let mut idx = Index::default();
            let id = idx.insert(sharer("x", p));
            let ask = |scene| {
                let mut q = query(c);
                q.evidence.scene_hint = Some(scene);
                rank(&idx, &q, &MatchConfig::default()).expect("ranks").candidates.iter().any(|x| x.id == id)
            };
            // Within 57 m on the ground: always in the 200 m circle, whatever the altitude.
            proptest::prop_assert!(ask(bandshare_core::Scene::Outdoor));
            // The 60 m sphere takes the height difference into account.
            let d3 = (e.hypot(n)).hypot(their_alt - my_alt);
            if d3 < 59.0 {
                proptest::prop_assert!(ask(bandshare_core::Scene::Station));
            } else if d3 > 61.0 {
                proptest::prop_assert!(!ask(bandshare_core::Scene::Station));
            }
        }
    }

    #[test]
    fn fanout_limits_and_score_prefers_good_links() {
        let c = Position::new(0.0, 0.0, None).expect("valid");
        let mut idx = Index::default();
        let mut lossy = sharer("lossy", c.offset_m(1.0, 0.0));
        lossy.link.loss_permille = 400;
        let lossy = idx.insert(lossy);
        let good = idx.insert(sharer("good", c.offset_m(30.0, 0.0)));
        for i in 0..10 {
            idx.insert(sharer("x", c.offset_m(100.0 + i as f64, 0.0)));
        }
        let cfg = MatchConfig {
            fanout: 3,
            ..Default::default()
        };
        let out = rank(&idx, &query(c), &cfg).expect("ranks");
        assert_eq!(out.candidates.len(), 3);
        assert_eq!(out.candidates[0].id, good);
        assert!(out.candidates.iter().all(|x| x.id != lossy) || out.candidates[0].id != lossy);
        assert_eq!(
            out.rejected
                .iter()
                .filter(|v| v.reason.starts_with("ranked below"))
                .count(),
            9
        );
    }
}
