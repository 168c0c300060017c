//! From a share request's evidence to a scene, and from a scene to the
//! shape of space to search (DESIGN.md "Scenes and regions"):
//!
//! | scene | region |
//! |---|---|
//! | outdoor | circle on the ground |
//! | vehicle | box along the heading, centred on the requester; candidates must move with it |
//! | station | sphere, altitude included |
//! | indoor | same venue: Wi-Fi fingerprint similarity at or above a threshold, or the same router |
//! | anchor | same serving cell or router |
//!
//! The request's scene hint wins; otherwise the evidence decides. Every
//! decision carries the reason shown to users in `offers`.

use bandshare_core::enu::OrientedBox;
use bandshare_core::{Fingerprint, Position, Scene};
use std::sync::Arc;

/// Shape parameters per scene (the server's `[scenes.*]` config).
#[derive(Clone, Debug, PartialEq)]
pub struct RegionConfig {
    pub outdoor_radius_m: f64,
    pub vehicle_length_m: f64,
    pub vehicle_width_m: f64,
    pub vehicle_height_m: f64,
    /// Largest velocity difference of a candidate that moves with you.
    pub vehicle_max_speed_diff_mps: f64,
    /// From this speed a request without a hint counts as in a vehicle.
    pub vehicle_min_speed_mps: f64,
    pub station_radius_m: f64,
    /// Fingerprint similarity (0..=1) that means "same venue".
    pub indoor_similarity: f64,
    /// A fix at least this good (metres) means outdoor.
    pub good_accuracy_m: f64,
}

impl Default for RegionConfig {
    fn default() -> Self {
        RegionConfig {
            outdoor_radius_m: 200.0,
            vehicle_length_m: 25.0,
            vehicle_width_m: 4.0,
            vehicle_height_m: 3.0,
            vehicle_max_speed_diff_mps: 3.0,
            vehicle_min_speed_mps: 4.0,
            station_radius_m: 60.0,
            indoor_similarity: 0.3,
            good_accuracy_m: 30.0,
        }
    }
}

/// What a share request says about where the requester is.
#[derive(Clone, Debug, Default)]
pub struct Evidence {
    pub scene_hint: Option<Scene>,
    pub fix: Option<Position>,
    pub accuracy_m: Option<f64>,
    pub heading_deg: Option<f64>,
    pub speed_mps: Option<f64>,
    pub wifi: Fingerprint,
    pub cell: Option<Arc<str>>,
    pub router: Option<Arc<str>>,
}

impl Evidence {
    /// Velocity (east, north) when speed and heading are both known.
    pub fn velocity(&self) -> Option<(f64, f64)> {
        Some(bandshare_core::enu::velocity(
            self.speed_mps?,
            self.heading_deg?,
        ))
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Region {
    /// Ground distance from `center` at most `radius_m`.
    Circle { center: Position, radius_m: f64 },
    /// An oriented box around `center`; with `velocity`, candidates must
    /// also move within `max_speed_diff_mps` of it.
    Box {
        center: Position,
        shape: OrientedBox,
        velocity: Option<(f64, f64)>,
        max_speed_diff_mps: f64,
    },
    /// Distance in 3-D (ground only where an altitude is unknown).
    Sphere { center: Position, radius_m: f64 },
    /// Same venue by fingerprint similarity, or the same router.
    Venue {
        fingerprint: Fingerprint,
        threshold: f64,
        router: Option<Arc<str>>,
        /// The requester's fix, if any: only to explain who is near but elsewhere.
        near: Option<Position>,
    },
    /// Same serving cell or router.
    Anchor {
        cell: Option<Arc<str>>,
        router: Option<Arc<str>>,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct SceneDecision {
    pub scene: Scene,
    pub reason: String,
    pub region: Region,
}

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("no usable location: {0}")]
pub struct NoLocation(pub String);

fn need_fix(ev: &Evidence, scene: Scene) -> Result<Position, NoLocation> {
    ev.fix
        .ok_or_else(|| NoLocation(format!("the {scene} scene needs a GNSS fix (--at LAT,LON)")))
}

fn region_for(
    scene: Scene,
    ev: &Evidence,
    cfg: &RegionConfig,
) -> Result<(Region, Option<String>), NoLocation> {
    Ok(match scene {
        Scene::Outdoor => (
            Region::Circle {
                center: need_fix(ev, scene)?,
                radius_m: cfg.outdoor_radius_m,
            },
            None,
        ),
        Scene::Vehicle => {
            let center = need_fix(ev, scene)?;
            match ev.heading_deg {
                Some(h) => (
                    Region::Box {
                        center,
                        shape: OrientedBox {
                            heading_deg: h,
                            length_m: cfg.vehicle_length_m,
                            width_m: cfg.vehicle_width_m,
                            height_m: cfg.vehicle_height_m,
                        },
                        velocity: ev.velocity(),
                        max_speed_diff_mps: cfg.vehicle_max_speed_diff_mps,
                    },
                    None,
                ),
                // Without a heading the car cannot be oriented: search the
                // circle the car's length spans, and say so.
                None => (
                    Region::Circle {
                        center,
                        radius_m: cfg.vehicle_length_m / 2.0,
                    },
                    Some(format!(
                        "no heading: searched a {:.1} m circle",
                        cfg.vehicle_length_m / 2.0
                    )),
                ),
            }
        }
        Scene::Station => (
            Region::Sphere {
                center: need_fix(ev, scene)?,
                radius_m: cfg.station_radius_m,
            },
            None,
        ),
        Scene::Indoor => {
            if ev.wifi.is_empty() && ev.router.is_none() {
                return Err(NoLocation(
                    "the indoor scene needs a Wi-Fi scan (--wifi) or a router".into(),
                ));
            }
            (
                Region::Venue {
                    fingerprint: ev.wifi.clone(),
                    threshold: cfg.indoor_similarity,
                    router: ev.router.clone(),
                    near: ev.fix,
                },
                None,
            )
        }
        Scene::Anchor => {
            if ev.cell.is_none() && ev.router.is_none() {
                return Err(NoLocation(
                    "the anchor scene needs a serving cell (--cell) or a router".into(),
                ));
            }
            (
                Region::Anchor {
                    cell: ev.cell.clone(),
                    router: ev.router.clone(),
                },
                None,
            )
        }
    })
}

/// The scene and region for `ev`: the hint wins, then the evidence.
pub fn decide_scene(ev: &Evidence, cfg: &RegionConfig) -> Result<SceneDecision, NoLocation> {
    let (scene, mut reason) = match ev.scene_hint {
        Some(s) => (s, "scene hint from the request".to_string()),
        None => infer(ev, cfg)?,
    };
    let (region, note) = region_for(scene, ev, cfg)?;
    if let Some(n) = note {
        reason = format!("{reason}; {n}");
    }
    Ok(SceneDecision {
        scene,
        reason,
        region,
    })
}

fn infer(ev: &Evidence, cfg: &RegionConfig) -> Result<(Scene, String), NoLocation> {
    let good_fix = ev.fix.is_some() && ev.accuracy_m.is_none_or(|a| a <= cfg.good_accuracy_m);
    let accuracy = ev
        .accuracy_m
        .map_or(String::new(), |a| format!(", accuracy {a:.0} m"));
    if let (Some(_), Some(speed), Some(h)) = (ev.fix, ev.speed_mps, ev.heading_deg)
        && speed >= cfg.vehicle_min_speed_mps
    {
        return Ok((
            Scene::Vehicle,
            format!("moving at {speed:.1} m/s, heading {h:.0}°"),
        ));
    }
    if good_fix {
        return Ok((Scene::Outdoor, format!("GNSS fix{accuracy}")));
    }
    if !ev.wifi.is_empty() {
        let why = if ev.fix.is_some() {
            "poor GNSS fix"
        } else {
            "no GNSS fix"
        };
        return Ok((
            Scene::Indoor,
            format!(
                "{why}{accuracy}; Wi-Fi scan of {} access points",
                ev.wifi.len()
            ),
        ));
    }
    if let Some(p) = ev.fix
        && p.alt.is_some()
    {
        return Ok((
            Scene::Station,
            format!("poor GNSS fix{accuracy} with altitude: a hall with levels"),
        ));
    }
    if ev.fix.is_some() {
        return Ok((Scene::Outdoor, format!("only a poor GNSS fix{accuracy}")));
    }
    if ev.router.is_some() {
        return Ok((Scene::Indoor, "no GNSS fix; associated router".into()));
    }
    if ev.cell.is_some() {
        return Ok((Scene::Anchor, "only a serving cell".into()));
    }
    Err(NoLocation(
        "give a GNSS fix (--at), a Wi-Fi scan (--wifi), a cell (--cell) or a scene".into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fix() -> Option<Position> {
        Some(Position::new(39.9, 116.4, None).expect("valid"))
    }

    fn wifi() -> Fingerprint {
        Fingerprint::new([(1, -40), (2, -60), (3, -70)])
    }

    #[test]
    fn hint_wins_then_evidence() {
        let cfg = RegionConfig::default();
        let d = |ev: Evidence| decide_scene(&ev, &cfg).map(|d| d.scene);
        assert_eq!(
            d(Evidence {
                fix: fix(),
                ..Default::default()
            }),
            Ok(Scene::Outdoor)
        );
        assert_eq!(
            d(Evidence {
                fix: fix(),
                speed_mps: Some(12.0),
                heading_deg: Some(80.0),
                ..Default::default()
            }),
            Ok(Scene::Vehicle)
        );
        assert_eq!(
            d(Evidence {
                fix: fix(),
                speed_mps: Some(1.2),
                heading_deg: Some(80.0),
                ..Default::default()
            }),
            Ok(Scene::Outdoor),
            "walking is not a vehicle"
        );
        assert_eq!(
            d(Evidence {
                fix: fix(),
                accuracy_m: Some(80.0),
                wifi: wifi(),
                ..Default::default()
            }),
            Ok(Scene::Indoor)
        );
        assert_eq!(
            d(Evidence {
                wifi: wifi(),
                ..Default::default()
            }),
            Ok(Scene::Indoor)
        );
        let deep = Some(Position::new(39.9, 116.4, Some(-12.0)).expect("valid"));
        assert_eq!(
            d(Evidence {
                fix: deep,
                accuracy_m: Some(90.0),
                ..Default::default()
            }),
            Ok(Scene::Station)
        );
        assert_eq!(
            d(Evidence {
                cell: Some("460-00-1-2".into()),
                ..Default::default()
            }),
            Ok(Scene::Anchor)
        );
        assert_eq!(
            d(Evidence {
                fix: fix(),
                scene_hint: Some(Scene::Station),
                ..Default::default()
            }),
            Ok(Scene::Station)
        );
        assert!(d(Evidence::default()).is_err());
        let e = d(Evidence {
            scene_hint: Some(Scene::Indoor),
            fix: fix(),
            ..Default::default()
        });
        assert!(e.is_err_and(|e| e.0.contains("Wi-Fi")));
    }

    #[test]
    fn vehicle_without_heading_says_so() {
        let ev = Evidence {
            fix: fix(),
            scene_hint: Some(Scene::Vehicle),
            ..Default::default()
        };
        let d = decide_scene(&ev, &RegionConfig::default()).expect("decides");
        assert!(matches!(d.region, Region::Circle { radius_m, .. } if radius_m == 12.5));
        assert!(d.reason.contains("no heading"), "{}", d.reason);
    }
}
