//! What a requester may move through this sharer: byte allowances (the
//! ticket's quota, a per-requester daily quota, the sharer's daily cap) and a
//! per-requester token-bucket rate.
//!
//! Readers reserve bytes *before* they read and give back what the read did
//! not use, so no allowance is ever overrun, however many flows share it:
//! the bytes relayed never exceed an allowance, and a rate limit lets at most
//! `burst + rate × t` bytes through in any `t`.

use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// The sharer's limits on relayed bytes; 0 means none. Days are UTC days.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    /// Per requester, both directions together, bytes per second.
    pub rate_bytes_per_s: u64,
    /// Bytes a requester may send at once above the rate; default: a tenth
    /// of a second of the rate, at least 16 KiB.
    pub burst_bytes: u64,
    /// Per requester per day, both directions.
    pub requester_daily_bytes: u64,
    /// All requesters together per day.
    pub daily_cap_bytes: u64,
}

impl Limits {
    pub(crate) fn burst(&self) -> u64 {
        if self.burst_bytes > 0 {
            self.burst_bytes
        } else {
            (self.rate_bytes_per_s / 10).max(16 * 1024)
        }
    }
}

/// Today's number (UTC days since 1970).
pub fn today() -> u64 {
    bandshare_core::clock::unix_now() / 86_400
}

/// A byte allowance, optionally renewed every day.
pub struct Allowance {
    /// 0 stands for unlimited only at construction; `u64::MAX` after.
    cap: std::sync::atomic::AtomicU64,
    daily: bool,
    /// Why a read stops when it is used up, told to the requester.
    reason: String,
    state: Mutex<(u64, u64)>, // (day, used)
}

impl Allowance {
    /// `cap` 0 = unlimited.
    pub fn new(cap: u64, daily: bool, reason: impl Into<String>) -> Allowance {
        Allowance {
            cap: std::sync::atomic::AtomicU64::new(if cap == 0 { u64::MAX } else { cap }),
            daily,
            reason: reason.into(),
            state: Mutex::new((today(), 0)),
        }
    }

    /// Starts with `used` bytes already spent today (a restart keeps a cap).
    pub fn with_used(self, used: u64) -> Allowance {
        if let Ok(mut s) = self.state.lock() {
            s.1 = used;
        }
        self
    }

    fn roll(&self, s: &mut (u64, u64)) {
        if self.daily {
            let d = today();
            if d != s.0 {
                *s = (d, 0);
            }
        }
    }

    /// Takes up to `want` bytes; returns how many were granted.
    pub fn reserve(&self, want: u64) -> u64 {
        let Ok(mut s) = self.state.lock() else {
            return 0;
        };
        self.roll(&mut s);
        let cap = self.cap.load(std::sync::atomic::Ordering::Relaxed);
        let grant = want.min(cap.saturating_sub(s.1));
        s.1 += grant;
        grant
    }

    /// Gives back bytes reserved but not moved.
    pub fn refund(&self, n: u64) {
        if let Ok(mut s) = self.state.lock() {
            s.1 = s.1.saturating_sub(n);
        }
    }

    /// Bytes spent (today, for a daily allowance).
    pub fn used(&self) -> u64 {
        self.state
            .lock()
            .map(|mut s| {
                self.roll(&mut s);
                s.1
            })
            .unwrap_or(0)
    }

    /// Bytes left; `u64::MAX` when unlimited.
    pub fn left(&self) -> u64 {
        let cap = self.cap.load(std::sync::atomic::Ordering::Relaxed);
        if cap == u64::MAX {
            return u64::MAX;
        }
        cap.saturating_sub(self.used())
    }

    /// From now on `more` bytes are left (a renewed ticket's quota),
    /// whatever was left before.
    pub fn grant_from_now(&self, more: u64) {
        let Ok(s) = self.state.lock() else { return };
        let cap = if more == 0 {
            u64::MAX
        } else {
            s.1.saturating_add(more)
        };
        self.cap.store(cap, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn reason(&self) -> &str {
        &self.reason
    }
}

/// A token bucket: `rate` bytes a second, holding at most `burst`.
pub struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    pub fn new(rate_bytes_per_s: u64, burst_bytes: u64) -> Bucket {
        let burst = burst_bytes.max(1) as f64;
        Bucket {
            rate: rate_bytes_per_s.max(1) as f64,
            burst,
            tokens: burst,
            last: Instant::now(),
        }
    }

    /// Grants up to `want` bytes now, or says how long to wait for a chunk.
    pub fn take(&mut self, want: u64, now: Instant) -> Result<u64, Duration> {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            let grant = (want as f64).min(self.tokens.floor()) as u64;
            self.tokens -= grant as f64;
            return Ok(grant);
        }
        // Wait for a useful chunk rather than trickling byte by byte.
        let chunk = (want as f64).min(self.burst).clamp(1.0, 16_384.0);
        Err(Duration::from_secs_f64((chunk - self.tokens) / self.rate))
    }

    pub fn refund(&mut self, n: u64) {
        self.tokens = (self.tokens + n as f64).min(self.burst);
    }
}

/// Everything that limits one reader: a rate and the allowances it draws on.
#[derive(Clone, Default)]
pub struct Meter {
    pub bucket: Option<Arc<Mutex<Bucket>>>,
    pub allowances: Vec<Arc<Allowance>>,
}

impl Meter {
    /// Takes `n` bytes from the rate and every allowance at once, or none
    /// (a datagram is sent whole or dropped, never queued or cut).
    pub fn admit_whole(&self, n: u64) -> bool {
        if let Some(b) = &self.bucket {
            let Ok(mut b) = b.lock() else { return false };
            match b.take(n, Instant::now()) {
                Ok(g) if g == n => {}
                Ok(g) => {
                    b.refund(g);
                    return false;
                }
                Err(_) => return false,
            }
        }
        for (i, a) in self.allowances.iter().enumerate() {
            let g = a.reserve(n);
            if g < n {
                a.refund(g);
                for earlier in &self.allowances[..i] {
                    earlier.refund(n);
                }
                if let Some(b) = &self.bucket
                    && let Ok(mut b) = b.lock()
                {
                    b.refund(n);
                }
                return false;
            }
        }
        true
    }

    /// Takes up to `want` bytes (at least 1) from the rate and every
    /// allowance; what is not used afterwards goes back with
    /// [`Meter::refund`].
    pub(crate) fn try_grant(&self, want: u64) -> Grant {
        let mut grant = want;
        if let Some(b) = &self.bucket {
            let taken = match b.lock() {
                Ok(mut b) => b.take(grant, Instant::now()),
                Err(_) => return Grant::Exhausted("rate limiter poisoned".into()),
            };
            match taken {
                Ok(g) => grant = g,
                Err(wait) => return Grant::Wait(wait),
            }
        }
        let mut taken: u64 = grant; // what every earlier allowance holds
        for (i, a) in self.allowances.iter().enumerate() {
            let g = a.reserve(taken);
            if g < taken {
                for earlier in &self.allowances[..i] {
                    earlier.refund(taken - g);
                }
            }
            taken = g;
            if g == 0 {
                if let Some(b) = &self.bucket
                    && let Ok(mut b) = b.lock()
                {
                    b.refund(grant);
                }
                return Grant::Exhausted(a.reason().to_string());
            }
        }
        if let Some(b) = &self.bucket
            && let Ok(mut b) = b.lock()
        {
            b.refund(grant - taken);
        }
        Grant::Bytes(taken)
    }

    /// The reason of the first allowance that is used up, if any.
    pub fn exhausted(&self) -> Option<&str> {
        self.allowances
            .iter()
            .find(|a| a.left() == 0)
            .map(|a| a.reason())
    }

    pub(crate) fn refund(&self, n: u64) {
        if n == 0 {
            return;
        }
        for a in &self.allowances {
            a.refund(n);
        }
        if let Some(b) = &self.bucket
            && let Ok(mut b) = b.lock()
        {
            b.refund(n);
        }
    }
}

pub(crate) enum Grant {
    Bytes(u64),
    Wait(Duration),
    Exhausted(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowance_never_overruns() {
        let a = Allowance::new(1000, false, "quota");
        assert_eq!(a.reserve(600), 600);
        assert_eq!(a.reserve(600), 400);
        assert_eq!(a.reserve(1), 0);
        a.refund(100);
        assert_eq!(a.left(), 100);
        assert_eq!(Allowance::new(0, true, "none").left(), u64::MAX);
        assert_eq!(Allowance::new(10, true, "x").with_used(7).left(), 3);
    }

    #[test]
    fn bucket_grants_burst_then_waits() {
        let t0 = Instant::now();
        // (tokio's clock: paused in tests, so waits are exact)
        let mut b = Bucket::new(1000, 100);
        b.last = t0;
        assert_eq!(b.take(500, t0), Ok(100));
        let wait = b.take(500, t0).expect_err("empty");
        assert_eq!(wait, Duration::from_millis(100));
        assert_eq!(b.take(500, t0 + Duration::from_millis(50)), Ok(50));
        b.refund(20);
        assert_eq!(b.take(500, t0 + Duration::from_millis(50)), Ok(20));
    }

    /// Moves `len` bytes in reads of at most 64 KiB as `meter` grants them,
    /// as the splice does; returns what moved and how it ended.
    async fn drain(meter: &Meter, len: usize) -> (usize, std::io::Result<()>) {
        let mut moved = 0;
        while moved < len {
            match meter.try_grant(65_536) {
                Grant::Bytes(g) => {
                    let n = (g as usize).min(len - moved);
                    meter.refund(g - n as u64);
                    moved += n;
                }
                Grant::Wait(d) => tokio::time::sleep(d).await,
                Grant::Exhausted(reason) => return (moved, Err(std::io::Error::other(reason))),
            }
        }
        (moved, Ok(()))
    }

    #[tokio::test]
    async fn metered_moves_stop_at_the_smallest_allowance() {
        let data = vec![7u8; 100_000];
        let small = Arc::new(Allowance::new(12_345, false, "ticket byte quota used up"));
        let big = Arc::new(Allowance::new(50_000, true, "daily"));
        let meter = Meter {
            bucket: None,
            allowances: vec![big.clone(), small.clone()],
        };
        let (moved, end) = drain(&meter, data.len()).await;
        let err = end.expect_err("quota ends it");
        assert_eq!(moved, 12_345);
        assert_eq!(err.to_string(), "ticket byte quota used up");
        assert_eq!(big.used(), 12_345, "the refund keeps the larger one exact");
        assert_eq!(meter.exhausted(), Some("ticket byte quota used up"));
    }

    #[tokio::test(start_paused = true)]
    async fn metered_moves_keep_to_the_rate() {
        let data = vec![1u8; 300_000];
        let meter = Meter {
            bucket: Some(Arc::new(Mutex::new(Bucket::new(100_000, 10_000)))),
            allowances: vec![],
        };
        let started = tokio::time::Instant::now();
        let (moved, end) = drain(&meter, data.len()).await;
        end.expect("within every allowance");
        assert_eq!(moved, data.len());
        // 10 000 at once, then 290 000 at 100 000/s: 2.9 s of (paused) time.
        let secs = started.elapsed().as_secs_f64();
        assert!((2.85..3.0).contains(&secs), "{secs}");
    }
}
