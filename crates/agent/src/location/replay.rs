//! A recorded track played back as the live position (`--replay-track`):
//! each fix at its own time, shifted so that the track's first point falls
//! at a chosen start (now, or `--replay-start` to play several devices in
//! step). Points without a fix leave the source quiet, as a GNSS receiver
//! in a tunnel is. For demos and for replaying real commutes end to end.

use crate::location::LocationSpec;
use bandshare_core::Position;
use bandshare_qos::track::Point;
use tokio::sync::watch;
use tracing::info;

/// Slower than this is standing still (no heading).
const MOVING_MPS: f64 = 0.5;

/// A track and when its first point plays.
#[derive(Clone, Debug, PartialEq)]
pub struct Replay {
    pub points: Vec<Point>,
    /// Unix seconds at which the first point plays.
    pub start: f64,
}

/// One fix to apply: when (unix seconds), where, and the speed and heading
/// from the fix before it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Played {
    pub at: f64,
    pub position: Position,
    pub speed_mps: Option<f64>,
    pub heading_deg: Option<f64>,
}

/// The fixes of a replay with their play times (points without a fix and
/// invalid positions are skipped).
pub fn schedule(r: &Replay) -> Vec<Played> {
    let Some(t0) = r.points.first().map(|p| p.t) else {
        return vec![];
    };
    let mut out: Vec<Played> = vec![];
    let mut prev: Option<(f64, Position)> = None;
    for p in &r.points {
        let Some((lat, lon)) = p.pos else { continue };
        let Ok(position) = Position::new(lat, lon, None) else {
            continue;
        };
        let (speed_mps, heading_deg) = match prev {
            Some((pt, pp)) if p.t > pt => {
                let (north, east) = offset_m(&pp, &position);
                let v = (north * north + east * east).sqrt() / (p.t - pt);
                let heading = (v >= MOVING_MPS)
                    .then(|| east.atan2(north).to_degrees().rem_euclid(360.0))
                    .filter(|h| *h < 360.0);
                (Some(v), heading)
            }
            _ => (None, None),
        };
        prev = Some((p.t, position));
        out.push(Played {
            at: r.start + (p.t - t0),
            position,
            speed_mps,
            heading_deg,
        });
    }
    out
}

/// Metres north and east from `a` to `b` (flat earth, fine over a step).
fn offset_m(a: &Position, b: &Position) -> (f64, f64) {
    let north = (b.lat - a.lat) * 111_320.0;
    let east = (b.lon - a.lon) * 111_320.0 * a.lat.to_radians().cos();
    (north, east)
}

/// Plays the track into `tx`; the first fix at once (so the device has a
/// position before the track starts), the rest at their times. Ends after
/// the last point, leaving the last fix in place.
pub async fn follow(r: Replay, tx: watch::Sender<LocationSpec>) {
    let fixes = schedule(&r);
    info!(
        fixes = fixes.len(),
        start = r.start,
        "replaying a recorded track as the position"
    );
    for (i, f) in fixes.iter().enumerate() {
        let wait = f.at - precise_now();
        if i > 0 && wait > 0.0 {
            tokio::time::sleep(std::time::Duration::from_secs_f64(wait)).await;
        }
        tx.send_modify(|loc| {
            loc.at = Some(f.position);
            loc.speed_mps = f.speed_mps;
            loc.heading_deg = f.heading_deg;
        });
    }
    info!("the replayed track has ended");
}

fn precise_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_fixes_at_their_times_from_the_start() {
        let p = |t: f64, pos: Option<(f64, f64)>| Point { t, pos };
        let r = Replay {
            points: vec![
                p(100.0, Some((59.9, 10.7))),
                p(101.0, Some((59.9001, 10.7))),
                p(102.0, None),
                p(103.0, Some((59.9003, 10.7))),
                p(104.0, Some((91.0, 10.7))),
            ],
            start: 5000.0,
        };
        let s = schedule(&r);
        assert_eq!(s.len(), 3, "no fix and an invalid one are skipped");
        assert_eq!(s[0].at, 5000.0);
        assert_eq!((s[0].speed_mps, s[0].heading_deg), (None, None));
        assert_eq!(s[1].at, 5001.0);
        let v = s[1].speed_mps.expect("speed");
        assert!((v - 11.132).abs() < 0.01, "{v}");
        assert!(s[1].heading_deg.is_some_and(|h| h.abs() < 1e-6), "north");
        // Across the gap: 22 m over 2 s.
        assert_eq!(s[2].at, 5003.0);
        assert!(s[2].speed_mps.is_some_and(|v| (v - 11.132).abs() < 0.01));
        assert!(
            schedule(&Replay {
                points: vec![],
                start: 1.0
            })
            .is_empty()
        );
    }
}
