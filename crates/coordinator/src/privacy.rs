//! What keeps a requester from locating a sharer: each sharer is *shown*
//! at its position moved by a secret offset of 15–25 m, the same for every
//! requester, drawn per sharer, per period and per place ([`Offsets`],
//! [`Placement`]); every distance band and every circle or sphere is
//! measured to the shown point. Queries from any number of keys converge on
//! that point, not on the sharer: averaging over keys gains nothing, only
//! a new period or a new place gives a new sample. Rate limits and
//! physically plausible movement per key add cost on top. Pure: callers
//! pass `now`. Live positions stay in memory only.

use bandshare_core::{DeviceKey, Position};
use std::collections::HashMap;
use std::time::{Duration, Instant};

#[derive(Clone, Debug, PartialEq)]
pub struct PrivacyConfig {
    pub requests_per_minute: f64,
    pub burst: f64,
    /// Fastest believable movement between two requests of one key.
    pub max_speed_mps: f64,
    /// Allowance for GNSS error on top of `max_speed_mps`.
    pub slack_m: f64,
    /// A sharer is shown moved by a distance in this range.
    pub fuzz_min_m: f64,
    pub fuzz_max_m: f64,
    /// A sharer's offset is drawn again after this long...
    pub period: Duration,
    /// ...or when it has moved this far from where it was drawn.
    pub move_m: f64,
}

impl Default for PrivacyConfig {
    fn default() -> Self {
        PrivacyConfig {
            requests_per_minute: 60.0,
            burst: 10.0,
            max_speed_mps: 120.0,
            slack_m: 500.0,
            // The innermost band is 10 m wide; a 15 m minimum keeps an
            // attacker's estimate (the offset point, give or take the grid
            // it sampled) at least a band width away.
            fuzz_min_m: 15.0,
            fuzz_max_m: 25.0,
            // Each period gives an attacker one new sample of a sharer that
            // stays put (SECURITY.md: how fast they add up).
            period: Duration::from_secs(30 * 86_400),
            move_m: 100.0,
        }
    }
}

#[derive(Debug, PartialEq)]
pub enum Refusal {
    RateLimited { per_minute: f64 },
    Implausible { metres: f64, seconds: f64 },
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::RateLimited { per_minute } => {
                write!(
                    f,
                    "rate limited: at most {per_minute:.0} share requests per minute per device"
                )
            }
            Refusal::Implausible { metres, seconds } => write!(
                f,
                "implausible movement: {metres:.0} m in {seconds:.1} s since this device's last request"
            ),
        }
    }
}

struct State {
    tokens: f64,
    refilled: Instant,
    last: Option<(Position, Instant)>,
}

/// Per-requester state, in memory, forgotten after 10 minutes of silence.
pub struct Guard {
    cfg: PrivacyConfig,
    seen: HashMap<DeviceKey, State>,
}

const FORGET_AFTER: Duration = Duration::from_secs(600);

impl Guard {
    pub fn new(cfg: PrivacyConfig) -> Guard {
        Guard {
            cfg,
            seen: HashMap::new(),
        }
    }

    /// Admits one share request of `key` from `at` (if known) at `now`.
    pub fn admit(
        &mut self,
        key: &DeviceKey,
        at: Option<Position>,
        now: Instant,
    ) -> Result<(), Refusal> {
        if self.seen.len() > 100_000 {
            self.seen
                .retain(|_, s| now.saturating_duration_since(s.refilled) < FORGET_AFTER);
        }
        let cfg = &self.cfg;
        let s = self.seen.entry(*key).or_insert(State {
            tokens: cfg.burst,
            refilled: now,
            last: None,
        });
        let dt = now.saturating_duration_since(s.refilled).as_secs_f64();
        s.tokens = (s.tokens + dt * cfg.requests_per_minute / 60.0).min(cfg.burst);
        s.refilled = now;
        if s.tokens < 1.0 {
            return Err(Refusal::RateLimited {
                per_minute: cfg.requests_per_minute,
            });
        }
        if let (Some(p), Some((q, t))) = (at, s.last) {
            let secs = now.saturating_duration_since(t).as_secs_f64();
            let metres = p.ground_distance_m(&q);
            if metres > cfg.max_speed_mps * secs + cfg.slack_m {
                return Err(Refusal::Implausible {
                    metres,
                    seconds: secs,
                });
            }
        }
        s.tokens -= 1.0;
        if let Some(p) = at {
            s.last = Some((p, now));
        }
        Ok(())
    }
}

/// The grid a sharer's offset is keyed on, in degrees (about 280 m north
/// to south): a sharer back at the same place in the same period is shown
/// at the same point, so coming and going gives no new samples.
const PLACE_DEG: f64 = 0.0025;

/// Draws sharers' offsets: a secret (surviving restarts) and the ranges.
pub struct Offsets {
    secret: ring::hmac::Key,
    min_m: f64,
    max_m: f64,
    period_s: u64,
    move_m: f64,
}

impl Offsets {
    pub fn new(cfg: &PrivacyConfig, secret: &[u8]) -> Offsets {
        Offsets {
            secret: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret),
            min_m: cfg.fuzz_min_m,
            max_m: cfg.fuzz_max_m.max(cfg.fuzz_min_m),
            period_s: cfg.period.as_secs().max(1),
            move_m: cfg.move_m,
        }
    }

    /// The offset (metres east, north) of `sharer` at `anchor` in `period`.
    fn draw(&self, sharer: &DeviceKey, anchor: &Position, period: u64) -> (f64, f64) {
        if self.max_m <= 0.0 {
            return (0.0, 0.0);
        }
        let mut msg = Vec::with_capacity(64);
        msg.extend_from_slice(b"sharer offset v2\0");
        msg.extend_from_slice(&sharer.0);
        msg.extend_from_slice(&period.to_be_bytes());
        msg.extend_from_slice(&((anchor.lat / PLACE_DEG).floor() as i64).to_be_bytes());
        msg.extend_from_slice(&((anchor.lon / PLACE_DEG).floor() as i64).to_be_bytes());
        let tag = ring::hmac::sign(&self.secret, &msg);
        let b = tag.as_ref();
        let unit = |i: usize| {
            u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]) as f64 / u32::MAX as f64
        };
        let angle = unit(0) * std::f64::consts::TAU;
        let dist = self.min_m + unit(4) * (self.max_m - self.min_m);
        (dist * angle.sin(), dist * angle.cos())
    }
}

/// Where one sharer is shown, kept by its stream: the offset stays while it
/// stays within [`PrivacyConfig::move_m`] of where it was drawn and in the
/// same period (so GNSS jitter and a cell border crossed to and fro give
/// no new samples).
#[derive(Default)]
pub struct Placement {
    drawn: Option<(Position, u64, (f64, f64))>,
}

impl Placement {
    /// Where `sharer`, really at `at`, is shown at `now_unix` (seconds).
    pub fn shown(
        &mut self,
        o: &Offsets,
        sharer: &DeviceKey,
        at: Position,
        now_unix: u64,
    ) -> Position {
        let period = now_unix / o.period_s;
        let keep = self
            .drawn
            .filter(|(anchor, p, _)| *p == period && anchor.ground_distance_m(&at) <= o.move_m);
        let (_, _, (e, n)) = match keep {
            Some(d) => d,
            None => {
                let d = (at, period, o.draw(sharer, &at, period));
                self.drawn = Some(d);
                d
            }
        };
        at.offset_m(e, n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos(e: f64, n: f64) -> Position {
        Position::new(39.9, 116.4, None)
            .expect("valid")
            .offset_m(e, n)
    }

    #[test]
    fn rate_limit_refills() {
        let cfg = PrivacyConfig {
            requests_per_minute: 60.0,
            burst: 3.0,
            ..Default::default()
        };
        let mut g = Guard::new(cfg);
        let (k, t0) = (DeviceKey([1; 32]), Instant::now());
        for _ in 0..3 {
            assert_eq!(g.admit(&k, None, t0), Ok(()));
        }
        assert!(matches!(
            g.admit(&k, None, t0),
            Err(Refusal::RateLimited { .. })
        ));
        assert_eq!(g.admit(&k, None, t0 + Duration::from_millis(1100)), Ok(()));
        // Another device has its own bucket.
        assert_eq!(g.admit(&DeviceKey([2; 32]), None, t0), Ok(()));
    }

    #[test]
    fn jumps_are_refused() {
        let mut g = Guard::new(PrivacyConfig::default());
        let (k, t0) = (DeviceKey([1; 32]), Instant::now());
        assert_eq!(g.admit(&k, Some(pos(0.0, 0.0)), t0), Ok(()));
        // 2 km in 10 s is 200 m/s: refused; in 30 s it is fine.
        let r = g.admit(&k, Some(pos(2000.0, 0.0)), t0 + Duration::from_secs(10));
        assert!(matches!(r, Err(Refusal::Implausible { .. })), "{r:?}");
        assert_eq!(
            g.admit(&k, Some(pos(2000.0, 0.0)), t0 + Duration::from_secs(30)),
            Ok(())
        );
    }

    #[test]
    fn a_sharer_is_shown_at_one_point_per_place_and_period() {
        let o = Offsets::new(&PrivacyConfig::default(), b"secret");
        let day = 86_400;
        let at = pos(0.0, 0.0);
        for i in 0..50u8 {
            let k = DeviceKey([i; 32]);
            let mut p = Placement::default();
            let a = p.shown(&o, &k, at, 1_000 * day);
            let d = at.ground_distance_m(&a);
            assert!((14.99..=25.01).contains(&d), "{d}");
            // Jitter of a few metres: the same offset, moved with it.
            let b = p.shown(&o, &k, pos(3.0, -2.0), 1_000 * day + 60);
            let moved = a.offset_m(3.0, -2.0);
            assert!(b.ground_distance_m(&moved) < 0.01);
            // Back at the same place later in the period, on a new stream.
            let c = Placement::default().shown(&o, &k, at, 1_001 * day);
            assert!(c.ground_distance_m(&a) < 0.01);
        }
        let k = DeviceKey([1; 32]);
        let mut p = Placement::default();
        let a = p.shown(&o, &k, at, 1_000 * day);
        // The next period, or another place: a new draw.
        let next = p.shown(&o, &k, at, 1_030 * day);
        assert!(next.ground_distance_m(&a) > 0.01);
        let far = pos(2_000.0, 0.0);
        let there = p.shown(&o, &k, far, 1_030 * day);
        assert!((14.99..=25.01).contains(&far.ground_distance_m(&there)));
        let other = Offsets::new(&PrivacyConfig::default(), b"another secret");
        assert!(
            Placement::default()
                .shown(&other, &k, at, 1_000 * day)
                .ground_distance_m(&a)
                > 0.01
        );
        // No offset configured: shown where it is.
        let exact = PrivacyConfig {
            fuzz_min_m: 0.0,
            fuzz_max_m: 0.0,
            ..Default::default()
        };
        let none = Offsets::new(&exact, b"secret");
        assert_eq!(Placement::default().shown(&none, &k, at, 0), at);
    }
}
