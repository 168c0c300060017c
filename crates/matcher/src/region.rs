//! From a share request's evidence to a scene, and from a scene to the
//! shape of space to search.
//!
//! This stage knows the outdoor circle. Vehicle boxes, station spheres and
//! same-venue fingerprints are the next step (DESIGN.md "Scenes and
//! regions"); until then those scenes search the circle and say so in the
//! decision's reason, so nobody mistakes it for the real thing.

use bandshare_core::{Position, Scene};

#[derive(Clone, Debug, PartialEq)]
pub struct RegionConfig {
    pub outdoor_radius_m: f64,
}

impl Default for RegionConfig {
    fn default() -> Self {
        RegionConfig {
            outdoor_radius_m: 200.0,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Region {
    /// Ground distance from `center` at most `radius_m`.
    Circle { center: Position, radius_m: f64 },
}

#[derive(Clone, Debug, PartialEq)]
pub struct SceneDecision {
    pub scene: Scene,
    pub reason: String,
    pub region: Region,
}

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("no usable location: a GNSS fix (--at LAT,LON) is required for matching")]
pub struct NoLocation;

/// The scene: the request's hint wins; otherwise a GNSS fix means outdoor.
pub fn decide_scene(
    hint: Option<Scene>,
    fix: Option<Position>,
    cfg: &RegionConfig,
) -> Result<SceneDecision, NoLocation> {
    let center = fix.ok_or(NoLocation)?;
    let (scene, reason) = match hint {
        Some(Scene::Outdoor) => (Scene::Outdoor, "scene hint from the request".to_string()),
        Some(other) => (
            other,
            format!(
                "scene hint from the request; the {other} region is not built yet, searched the outdoor circle"
            ),
        ),
        None => (Scene::Outdoor, "GNSS fix and no scene hint".to_string()),
    };
    Ok(SceneDecision {
        scene,
        reason,
        region: Region::Circle {
            center,
            radius_m: cfg.outdoor_radius_m,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hint_wins_and_location_is_required() {
        let p = Position::new(1.0, 2.0, None).expect("valid");
        let cfg = RegionConfig::default();
        let d = decide_scene(None, Some(p), &cfg).expect("decides");
        assert_eq!(d.scene, Scene::Outdoor);
        let d = decide_scene(Some(Scene::Vehicle), Some(p), &cfg).expect("decides");
        assert_eq!(d.scene, Scene::Vehicle);
        assert!(d.reason.contains("not built yet"));
        assert_eq!(decide_scene(None, None, &cfg), Err(NoLocation));
    }
}
