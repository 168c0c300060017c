//! A local east-north-up frame around a point, and the shapes scenes
//! search in it: the oriented box of a vehicle, the sphere of a station
//! hall, co-movement, and how long two devices stay in range.
//!
//! Points go through WGS84 earth-centred coordinates (ECEF), so the frame
//! is exact at any latitude, at the poles and across the antimeridian.

use crate::geo::Position;

const A: f64 = 6_378_137.0; // WGS84 semi-major axis
const E2: f64 = 6.694_379_990_14e-3; // first eccentricity squared

/// Metres east, north and up of the frame's origin.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Enu {
    pub e: f64,
    pub n: f64,
    pub u: f64,
}

impl Enu {
    pub fn ground(&self) -> f64 {
        self.e.hypot(self.n)
    }
}

fn ecef(p: &Position, alt: f64) -> [f64; 3] {
    let (la, lo) = (p.lat.to_radians(), p.lon.to_radians());
    let n = A / (1.0 - E2 * la.sin().powi(2)).sqrt();
    [
        (n + alt) * la.cos() * lo.cos(),
        (n + alt) * la.cos() * lo.sin(),
        (n * (1.0 - E2) + alt) * la.sin(),
    ]
}

/// A local tangent frame at `origin`.
#[derive(Clone, Copy, Debug)]
pub struct Frame {
    origin: [f64; 3],
    sin_la: f64,
    cos_la: f64,
    sin_lo: f64,
    cos_lo: f64,
}

impl Frame {
    /// Altitudes that are unknown count as the origin's (or 0).
    pub fn new(origin: &Position) -> Frame {
        let (la, lo) = (origin.lat.to_radians(), origin.lon.to_radians());
        Frame {
            origin: ecef(origin, origin.alt.unwrap_or(0.0)),
            sin_la: la.sin(),
            cos_la: la.cos(),
            sin_lo: lo.sin(),
            cos_lo: lo.cos(),
        }
    }

    /// `p` in this frame. An unknown altitude is taken as 0 m, so `u` is
    /// meaningful only when both altitudes are known.
    pub fn enu(&self, p: &Position) -> Enu {
        let x = ecef(p, p.alt.unwrap_or(0.0));
        let d = [
            x[0] - self.origin[0],
            x[1] - self.origin[1],
            x[2] - self.origin[2],
        ];
        Enu {
            e: -self.sin_lo * d[0] + self.cos_lo * d[1],
            n: -self.sin_la * self.cos_lo * d[0] - self.sin_la * self.sin_lo * d[1]
                + self.cos_la * d[2],
            u: self.cos_la * self.cos_lo * d[0]
                + self.cos_la * self.sin_lo * d[1]
                + self.sin_la * d[2],
        }
    }
}

/// Velocity (east, north) in m/s from speed and heading (0 = north, clockwise).
pub fn velocity(speed_mps: f64, heading_deg: f64) -> (f64, f64) {
    let h = heading_deg.to_radians();
    (speed_mps * h.sin(), speed_mps * h.cos())
}

/// Where a point lies relative to an oriented box, when outside.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum BoxMiss {
    Ahead(f64),
    Behind(f64),
    Left(f64),
    Right(f64),
    Above(f64),
    Below(f64),
}

impl std::fmt::Display for BoxMiss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (side, by) = match self {
            BoxMiss::Ahead(m) => ("ahead of", m),
            BoxMiss::Behind(m) => ("behind", m),
            BoxMiss::Left(m) => ("left of", m),
            BoxMiss::Right(m) => ("right of", m),
            BoxMiss::Above(m) => ("above", m),
            BoxMiss::Below(m) => ("below", m),
        };
        write!(f, "{by:.1} m {side} the car")
    }
}

/// An oriented box centred on the origin, its length along `heading_deg`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OrientedBox {
    pub heading_deg: f64,
    pub length_m: f64,
    pub width_m: f64,
    pub height_m: f64,
}

impl OrientedBox {
    /// Metres along the heading and to its right.
    pub fn along_across(&self, p: &Enu) -> (f64, f64) {
        let h = self.heading_deg.to_radians();
        (p.e * h.sin() + p.n * h.cos(), p.e * h.cos() - p.n * h.sin())
    }

    /// `Ok` inside; otherwise the face it is beyond and by how much. The
    /// vertical is checked only when `vertical_known`.
    pub fn contains(&self, p: &Enu, vertical_known: bool) -> Result<(), BoxMiss> {
        let (along, across) = self.along_across(p);
        let (hl, hw, hh) = (self.length_m / 2.0, self.width_m / 2.0, self.height_m / 2.0);
        if along > hl {
            return Err(BoxMiss::Ahead(along - hl));
        }
        if along < -hl {
            return Err(BoxMiss::Behind(-hl - along));
        }
        if across > hw {
            return Err(BoxMiss::Right(across - hw));
        }
        if across < -hw {
            return Err(BoxMiss::Left(-hw - across));
        }
        if vertical_known && p.u > hh {
            return Err(BoxMiss::Above(p.u - hh));
        }
        if vertical_known && p.u < -hh {
            return Err(BoxMiss::Below(-hh - p.u));
        }
        Ok(())
    }

    /// Radius of the circle around the box on the ground.
    pub fn ground_radius(&self) -> f64 {
        (self.length_m / 2.0).hypot(self.width_m / 2.0)
    }
}

/// Seconds until a point at `p` moving at relative velocity `v` (east,
/// north) leaves the circle of `range_m`; `cap_s` when it never does (or is
/// slower than that), 0 when it is already outside.
pub fn contact_time_s(p: (f64, f64), v: (f64, f64), range_m: f64, cap_s: f64) -> f64 {
    let (px, py) = p;
    let c = px * px + py * py - range_m * range_m;
    if c > 0.0 {
        return 0.0;
    }
    let a = v.0 * v.0 + v.1 * v.1;
    if a < 1e-9 {
        return cap_s;
    }
    let b = 2.0 * (px * v.0 + py * v.1);
    let t = (-b + (b * b - 4.0 * a * c).max(0.0).sqrt()) / (2.0 * a);
    t.clamp(0.0, cap_s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pos(lat: f64, lon: f64) -> Position {
        Position::new(lat, lon, None).expect("valid")
    }

    #[test]
    fn frame_axes() {
        let o = pos(39.9, 116.4);
        let f = Frame::new(&o);
        let east = f.enu(&o.offset_m(100.0, 0.0));
        assert!(
            (east.e - 100.0).abs() < 0.5 && east.n.abs() < 0.5,
            "{east:?}"
        );
        let north = f.enu(&o.offset_m(0.0, 100.0));
        assert!(
            (north.n - 100.0).abs() < 0.5 && north.e.abs() < 0.5,
            "{north:?}"
        );
        let up = f.enu(&Position {
            alt: Some(12.0),
            ..o
        });
        assert!((up.u - 12.0).abs() < 1e-6 && up.ground() < 1e-6, "{up:?}");
    }

    #[test]
    fn antimeridian_and_pole() {
        let f = Frame::new(&pos(0.0, 179.9999));
        let p = f.enu(&pos(0.0, -179.9999));
        assert!((p.e - 22.26).abs() < 0.1 && p.n.abs() < 0.01, "{p:?}");
        let f = Frame::new(&pos(89.9999, 0.0));
        let p = f.enu(&pos(89.9999, 180.0));
        assert!((p.ground() - 22.3).abs() < 0.2, "{p:?}");
    }

    #[test]
    fn box_faces() {
        let b = OrientedBox {
            heading_deg: 90.0,
            length_m: 25.0,
            width_m: 4.0,
            height_m: 3.0,
        };
        let at = |e, n, u| Enu { e, n, u };
        assert_eq!(b.contains(&at(12.0, 1.9, 1.4), true), Ok(()));
        assert!(matches!(
            b.contains(&at(13.0, 0.0, 0.0), true),
            Err(BoxMiss::Ahead(_))
        ));
        assert!(matches!(
            b.contains(&at(-13.0, 0.0, 0.0), true),
            Err(BoxMiss::Behind(_))
        ));
        assert!(matches!(
            b.contains(&at(0.0, 2.1, 0.0), true),
            Err(BoxMiss::Left(_))
        ));
        assert!(matches!(
            b.contains(&at(0.0, -2.1, 0.0), true),
            Err(BoxMiss::Right(_))
        ));
        assert!(matches!(
            b.contains(&at(0.0, 0.0, 1.6), true),
            Err(BoxMiss::Above(_))
        ));
        assert!(matches!(
            b.contains(&at(0.0, 0.0, -1.6), true),
            Err(BoxMiss::Below(_))
        ));
        assert_eq!(b.contains(&at(0.0, 0.0, -9.0), false), Ok(()));
    }

    #[test]
    fn contact_times() {
        // Walking away at 1 m/s from 10 m inside a 50 m circle: 40 s.
        assert!((contact_time_s((10.0, 0.0), (1.0, 0.0), 50.0, 600.0) - 40.0).abs() < 1e-9);
        // Coming towards: crosses and leaves on the far side (60 s).
        assert!((contact_time_s((10.0, 0.0), (-1.0, 0.0), 50.0, 600.0) - 60.0).abs() < 1e-9);
        assert_eq!(contact_time_s((0.0, 0.0), (0.0, 0.0), 50.0, 600.0), 600.0);
        assert_eq!(contact_time_s((60.0, 0.0), (0.0, 0.0), 50.0, 600.0), 0.0);
    }

    proptest! {
        #[test]
        fn rotating_the_whole_scene_keeps_inside_inside(
            heading in 0.0f64..360.0, turn in 0.0f64..360.0,
            along in -12.4f64..12.4, across in -1.9f64..1.9,
        ) {
            let b = OrientedBox { heading_deg: heading, length_m: 25.0, width_m: 4.0, height_m: 3.0 };
            // A point placed by (along, across) relative to the heading ...
            let h = heading.to_radians();
            let p = Enu { e: along * h.sin() + across * h.cos(), n: along * h.cos() - across * h.sin(), u: 0.0 };
            prop_assert!(b.contains(&p, true).is_ok());
            // ... stays inside when the car and the point turn together.
            let t = turn.to_radians();
            let q = Enu { e: p.e * t.cos() + p.n * t.sin(), n: -p.e * t.sin() + p.n * t.cos(), u: 0.0 };
            let b2 = OrientedBox { heading_deg: (heading + turn) % 360.0, ..b };
            prop_assert!(b2.contains(&q, true).is_ok());
        }

        #[test]
        fn the_box_follows_the_heading(heading in 0.0f64..360.0, ahead in 13.0f64..100.0) {
            let b = OrientedBox { heading_deg: heading, length_m: 25.0, width_m: 4.0, height_m: 3.0 };
            let (ve, vn) = velocity(1.0, heading);
            let p = Enu { e: ve * ahead, n: vn * ahead, u: 0.0 };
            prop_assert!(matches!(b.contains(&p, true), Err(BoxMiss::Ahead(_))));
            let inside = Enu { e: ve * 12.0, n: vn * 12.0, u: 0.0 };
            prop_assert!(b.contains(&inside, true).is_ok());
        }

        #[test]
        fn enu_matches_ground_distance(lat in -89.0f64..89.0, lon in -180.0f64..180.0,
                                       e in -300.0f64..300.0, n in -300.0f64..300.0) {
            let o = pos(lat, lon);
            let p = o.offset_m(e, n);
            let got = Frame::new(&o).enu(&p).ground();
            let want = o.ground_distance_m(&p);
            // Mean sphere vs WGS84 ellipsoid: the meridian radius differs
            // from the mean by up to 0.56 % (at the equator).
            prop_assert!((got - want).abs() < 0.007 * want + 0.05, "{} vs {}", got, want);
        }
    }
}
