//! Positions on the WGS84 sphere, ground distance, and the distance bands that
//! offers carry instead of coordinates.

use std::fmt;
use std::str::FromStr;

/// Mean Earth radius in metres (IUGG).
pub const EARTH_RADIUS_M: f64 = 6_371_008.8;

/// A point: latitude and longitude in degrees, optional altitude in metres.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Position {
    pub lat: f64,
    pub lon: f64,
    pub alt: Option<f64>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PositionError {
    #[error("expected LAT,LON[,ALT] in degrees (e.g. 39.9042,116.4074), got {0:?}")]
    Syntax(String),
    #[error("latitude must be within -90..=90, got {0}")]
    Latitude(f64),
    #[error("longitude must be within -180..=180, got {0}")]
    Longitude(f64),
    #[error("altitude must be within -1000..=20000 m, got {0}")]
    Altitude(f64),
}

impl Position {
    pub fn new(lat: f64, lon: f64, alt: Option<f64>) -> Result<Self, PositionError> {
        if !(-90.0..=90.0).contains(&lat) {
            return Err(PositionError::Latitude(lat));
        }
        if !(-180.0..=180.0).contains(&lon) {
            return Err(PositionError::Longitude(lon));
        }
        if let Some(a) = alt
            && !(-1000.0..=20000.0).contains(&a)
        {
            return Err(PositionError::Altitude(a));
        }
        Ok(Position { lat, lon, alt })
    }

    /// Great-circle distance along the ground (haversine), metres.
    pub fn ground_distance_m(&self, other: &Position) -> f64 {
        let (p1, p2) = (self.lat.to_radians(), other.lat.to_radians());
        let dp = p2 - p1;
        let dl = (other.lon - self.lon).to_radians();
        let a = (dp / 2.0).sin().powi(2) + p1.cos() * p2.cos() * (dl / 2.0).sin().powi(2);
        2.0 * EARTH_RADIUS_M * a.sqrt().min(1.0).asin()
    }

    /// The point `east_m`, `north_m` away in the local tangent plane; for
    /// placing test devices and demo sharers.
    pub fn offset_m(&self, east_m: f64, north_m: f64) -> Position {
        let dlat = (north_m / EARTH_RADIUS_M).to_degrees();
        let coslat = self.lat.to_radians().cos().max(1e-9);
        let dlon = (east_m / (EARTH_RADIUS_M * coslat)).to_degrees();
        let mut lon = self.lon + dlon;
        if lon > 180.0 {
            lon -= 360.0;
        } else if lon < -180.0 {
            lon += 360.0;
        }
        Position {
            lat: (self.lat + dlat).clamp(-90.0, 90.0),
            lon,
            alt: self.alt,
        }
    }
}

impl FromStr for Position {
    type Err = PositionError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split(',').map(str::trim).collect();
        let num = |p: &str| {
            p.parse::<f64>()
                .ok()
                .filter(|v| v.is_finite())
                .ok_or_else(|| PositionError::Syntax(s.to_string()))
        };
        match parts.as_slice() {
            [lat, lon] => Position::new(num(lat)?, num(lon)?, None),
            [lat, lon, alt] => Position::new(num(lat)?, num(lon)?, Some(num(alt)?)),
            _ => Err(PositionError::Syntax(s.to_string())),
        }
    }
}

/// How far a sharer is, coarsely: what a requester is allowed to know.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DistanceBand {
    Under10m,
    From10To50m,
    From50To200m,
    Over200m,
}

impl DistanceBand {
    pub fn of_metres(m: f64) -> Self {
        if m < 10.0 {
            DistanceBand::Under10m
        } else if m < 50.0 {
            DistanceBand::From10To50m
        } else if m < 200.0 {
            DistanceBand::From50To200m
        } else {
            DistanceBand::Over200m
        }
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            DistanceBand::Under10m => "<10m",
            DistanceBand::From10To50m => "10-50m",
            DistanceBand::From50To200m => "50-200m",
            DistanceBand::Over200m => ">200m",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            DistanceBand::Under10m,
            DistanceBand::From10To50m,
            DistanceBand::From50To200m,
            DistanceBand::Over200m,
        ]
        .into_iter()
        .find(|b| b.as_str() == s)
    }
}

impl fmt::Display for DistanceBand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_and_validates() {
        let p: Position = "39.9042, 116.4074".parse().expect("valid");
        assert_eq!((p.lat, p.lon, p.alt), (39.9042, 116.4074, None));
        let p: Position = "39.9,116.4,-12.5".parse().expect("valid");
        assert_eq!(p.alt, Some(-12.5));
        assert!(matches!(
            "abc".parse::<Position>(),
            Err(PositionError::Syntax(_))
        ));
        assert!(matches!(
            "1,2,3,4".parse::<Position>(),
            Err(PositionError::Syntax(_))
        ));
        assert!(matches!(
            "NaN,1".parse::<Position>(),
            Err(PositionError::Syntax(_))
        ));
        assert_eq!(
            "91,0".parse::<Position>(),
            Err(PositionError::Latitude(91.0))
        );
        assert_eq!(
            "0,181".parse::<Position>(),
            Err(PositionError::Longitude(181.0))
        );
    }

    #[test]
    fn known_distance() {
        // Beijing Tiananmen to the Forbidden City's north gate: about 1.8 km.
        let a = Position::new(39.9087, 116.3975, None).expect("valid");
        let b = Position::new(39.9250, 116.3972, None).expect("valid");
        let d = a.ground_distance_m(&b);
        assert!((d - 1812.0).abs() < 10.0, "{d}");
    }

    #[test]
    fn bands() {
        assert_eq!(DistanceBand::of_metres(0.0).as_str(), "<10m");
        assert_eq!(DistanceBand::of_metres(10.0).as_str(), "10-50m");
        assert_eq!(DistanceBand::of_metres(199.9).as_str(), "50-200m");
        assert_eq!(DistanceBand::of_metres(200.0).as_str(), ">200m");
        assert_eq!(
            DistanceBand::parse("10-50m"),
            Some(DistanceBand::From10To50m)
        );
    }

    proptest! {
        #[test]
        fn offset_distance_matches(lat in -80.0f64..80.0, lon in -180.0f64..180.0,
                                   e in -500.0f64..500.0, n in -500.0f64..500.0) {
            let p = Position::new(lat, lon, None).expect("in range");
            let q = p.offset_m(e, n);
            let want = (e * e + n * n).sqrt();
            let got = p.ground_distance_m(&q);
            prop_assert!((got - want).abs() < 0.01 * want + 0.01, "{got} vs {want}");
        }
    }
}
