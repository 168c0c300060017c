//! Exponential backoff with jitter and a cap, shaped like gRPC's
//! (1 s × 1.6 per attempt, ±20 %) but capped at 12.5 s instead of 120 s:
//! a coordinator back after a long outage has its sharers again within
//! 10–15 s, not two minutes. Jitter spreads the reconnects of many sharers.

use std::time::Duration;

/// The longest wait between reconnect attempts before jitter (±20 %).
pub const RECONNECT_CAP: Duration = Duration::from_millis(12_500);

#[derive(Clone, Debug)]
pub struct Backoff {
    base: Duration,
    factor: f64,
    cap: Duration,
    jitter: f64,
    attempt: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new(Duration::from_secs(1), RECONNECT_CAP)
    }
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        Backoff {
            base,
            factor: 1.6,
            cap,
            jitter: 0.2,
            attempt: 0,
        }
    }

    /// The next delay; `unit` is a random number in 0..1 (the caller owns
    /// randomness so this stays deterministic in tests).
    pub fn next_delay(&mut self, unit: f64) -> Duration {
        let raw = self.base.as_secs_f64() * self.factor.powi(self.attempt as i32);
        let capped = raw.min(self.cap.as_secs_f64());
        self.attempt = self.attempt.saturating_add(1).min(64);
        let j = 1.0 + self.jitter * (2.0 * unit.clamp(0.0, 1.0) - 1.0);
        Duration::from_secs_f64(capped * j)
    }

    /// Back to the first delay, after a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_caps_and_jitters() {
        let mut b = Backoff::default();
        assert_eq!(b.next_delay(0.5), Duration::from_secs(1));
        assert_eq!(b.next_delay(0.5), Duration::from_secs_f64(1.6));
        for _ in 0..30 {
            b.next_delay(0.5);
        }
        assert_eq!(b.next_delay(0.5), Duration::from_millis(12_500));
        assert_eq!(b.next_delay(1.0), Duration::from_secs(15));
        assert_eq!(b.next_delay(0.0), Duration::from_secs(10));
        b.reset();
        assert_eq!(b.next_delay(0.5), Duration::from_secs(1));
    }
}
