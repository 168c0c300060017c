//! Candidates: sharers in the region that pass the compatibility filters,
//! scored by distance, measured link state and load, best first.

use crate::index::{Index, SharerId, Summary};
use crate::region::{NoLocation, Region, RegionConfig, SceneDecision, decide_scene};
use bandshare_core::{DistanceBand, NetworkType, Position, Scene, ServiceSet};

#[derive(Clone, Debug)]
pub struct Query {
    pub fix: Option<Position>,
    pub scene_hint: Option<Scene>,
    pub wanted: ServiceSet,
    pub network: Option<NetworkType>,
    /// Also explain sharers that were filtered out.
    pub explain: bool,
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

/// Score in 0..=1: link quality weighs half, closeness a third, spare
/// capacity the rest.
pub fn score(info: &Summary, distance_m: f64) -> f64 {
    let proximity = 1.0 / (1.0 + distance_m / 50.0);
    let load = match info.max_requesters {
        0 => 1.0 / (1.0 + info.active_requesters as f64 / 4.0),
        max => 1.0 - (info.active_requesters.min(max) as f64 / max as f64),
    };
    0.5 * info.quality as f64 + 0.33 * proximity + 0.17 * load
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

pub fn rank(index: &Index, q: &Query, cfg: &MatchConfig) -> Result<Outcome, NoLocation> {
    let scene = decide_scene(q.scene_hint, q.fix, &cfg.region)?;
    let mut candidates = Vec::with_capacity(64);
    let mut rejected = Vec::new();
    match &scene.region {
        Region::Circle { center, radius_m } => {
            // With explain, look twice as far to say who was just outside.
            let look = if q.explain { radius_m * 2.0 } else { *radius_m };
            index.within(center, look, |id, info, d| {
                let band = DistanceBand::of_metres(d);
                if d > *radius_m {
                    rejected.push(Verdict {
                        id,
                        band,
                        reason: format!("outside the {radius_m:.0} m circle"),
                    });
                } else if let Some(reason) = filter(info, q) {
                    if q.explain {
                        rejected.push(Verdict { id, band, reason });
                    }
                } else {
                    candidates.push(Candidate {
                        id,
                        score: score(info, d),
                        distance_m: d,
                        band,
                    });
                }
            });
        }
    }
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
    Ok(Outcome {
        scene,
        candidates,
        rejected,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::tests::sharer;
    use bandshare_core::{LinkState, Service};

    fn query(at: Position) -> Query {
        Query {
            fix: Some(at),
            scene_hint: None,
            wanted: ServiceSet::default(),
            network: None,
            explain: true,
        }
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
