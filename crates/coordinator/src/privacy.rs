//! What keeps a requester from locating a sharer: per-key rate limits,
//! physically plausible movement between requests, and a fixed, secret
//! offset of 15–25 m per requester key applied to where distances are
//! measured from, so repeated queries converge on a point that is not the
//! sharer. Pure: callers pass `now`. Live positions stay in memory only.

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
    /// The measuring point is offset by a distance in this range.
    pub fuzz_min_m: f64,
    pub fuzz_max_m: f64,
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
    secret: ring::hmac::Key,
    seen: HashMap<DeviceKey, State>,
}

const FORGET_AFTER: Duration = Duration::from_secs(600);

impl Guard {
    pub fn new(cfg: PrivacyConfig, secret: &[u8]) -> Guard {
        Guard {
            cfg,
            secret: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret),
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

    /// Where to measure from for `key`: `at` moved by its fixed secret offset.
    pub fn measuring_point(&self, key: &DeviceKey, at: &Position) -> Position {
        let tag = ring::hmac::sign(&self.secret, &key.0);
        let b = tag.as_ref();
        let unit = |i: usize| {
            u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]) as f64 / u32::MAX as f64
        };
        let angle = unit(0) * std::f64::consts::TAU;
        let dist =
            self.cfg.fuzz_min_m + unit(4) * (self.cfg.fuzz_max_m - self.cfg.fuzz_min_m).max(0.0);
        if dist <= 0.0 {
            return *at;
        }
        at.offset_m(dist * angle.sin(), dist * angle.cos())
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
        let mut g = Guard::new(cfg, b"secret");
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
        let mut g = Guard::new(PrivacyConfig::default(), b"secret");
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
    fn offsets_are_fixed_per_key_and_in_range() {
        let g = Guard::new(PrivacyConfig::default(), b"secret");
        let at = pos(0.0, 0.0);
        for i in 0..50u8 {
            let k = DeviceKey([i; 32]);
            let (a, b) = (g.measuring_point(&k, &at), g.measuring_point(&k, &at));
            assert_eq!(a, b);
            let d = at.ground_distance_m(&a);
            assert!((14.99..=25.01).contains(&d), "{d}");
        }
        let other = Guard::new(PrivacyConfig::default(), b"another secret");
        assert_ne!(
            other.measuring_point(&DeviceKey([1; 32]), &at),
            g.measuring_point(&DeviceKey([1; 32]), &at)
        );
    }
}
