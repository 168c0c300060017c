//! Scenes: the kind of place a requester is in, which decides the shape of
//! space the coordinator searches.

use std::fmt;
use std::str::FromStr;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scene {
    Outdoor,
    Indoor,
    Vehicle,
    Station,
    Anchor,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "unknown scene {0:?}: expected outdoor, indoor, vehicle (subway-car), station (subway-hall) or anchor"
)]
pub struct UnknownScene(pub String);

impl Scene {
    pub fn as_str(&self) -> &'static str {
        match self {
            Scene::Outdoor => "outdoor",
            Scene::Indoor => "indoor",
            Scene::Vehicle => "vehicle",
            Scene::Station => "station",
            Scene::Anchor => "anchor",
        }
    }
}

impl FromStr for Scene {
    type Err = UnknownScene;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.trim().to_ascii_lowercase().as_str() {
            "outdoor" => Scene::Outdoor,
            "indoor" => Scene::Indoor,
            "vehicle" | "subway-car" | "bus" | "train" => Scene::Vehicle,
            "station" | "subway-hall" => Scene::Station,
            "anchor" => Scene::Anchor,
            _ => return Err(UnknownScene(s.to_string())),
        })
    }
}

impl fmt::Display for Scene {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases() {
        assert_eq!("subway-car".parse(), Ok(Scene::Vehicle));
        assert_eq!("subway-hall".parse(), Ok(Scene::Station));
        assert_eq!("Outdoor".parse(), Ok(Scene::Outdoor));
        assert!("spaceship".parse::<Scene>().is_err());
    }
}
