//! What a listener does when `accept` fails. Out of file descriptors
//! (EMFILE, ENFILE) or buffers (ENOBUFS, ENOMEM), retrying at once spins a
//! core at 100 % and starves the connections already open; so it backs off
//! (10 ms doubling to 1 s), says so at most once a minute (a listener at
//! the limit flaps between failing and succeeding as descriptors free up),
//! and says when it accepts again after it warned. Other errors (a peer that reset before accept) are
//! retried at once. Pure: the caller sleeps and logs.

use std::time::{Duration, Instant};

/// At most one warning in this long.
pub const WARN_EVERY: Duration = Duration::from_secs(60);

/// Linux errno values of resource exhaustion.
const EMFILE: i32 = 24;
const ENFILE: i32 = 23;
const ENOBUFS: i32 = 105;
const ENOMEM: i32 = 12;

/// What to do after a failed accept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retry {
    /// Wait this long before accepting again.
    pub after: Duration,
    /// Log a warning now (the first failure of an episode).
    pub warn: bool,
}

#[derive(Clone, Debug, Default)]
pub struct AcceptFailures {
    exhausted: u32,
    warned: Option<Instant>,
    /// A warning was given since the last recovery was logged.
    owe_recovery: bool,
}

impl AcceptFailures {
    /// An accept failed with `os_error` (`io::Error::raw_os_error`) at `now`.
    pub fn failed(&mut self, os_error: Option<i32>, now: Instant) -> Retry {
        if !matches!(os_error, Some(EMFILE | ENFILE | ENOBUFS | ENOMEM)) {
            return Retry {
                after: Duration::ZERO,
                warn: false,
            };
        }
        let n = self.exhausted;
        self.exhausted = self.exhausted.saturating_add(1);
        let warn = n == 0
            && self
                .warned
                .is_none_or(|w| now.duration_since(w) >= WARN_EVERY);
        if warn {
            self.warned = Some(now);
            self.owe_recovery = true;
        }
        Retry {
            after: Duration::from_millis(10u64 << n.min(7)).min(Duration::from_secs(1)),
            warn,
        }
    }

    /// An accept succeeded: true if a warning is still to be answered by a
    /// "accepting again" line.
    pub fn succeeded(&mut self) -> bool {
        self.exhausted = 0;
        std::mem::take(&mut self.owe_recovery)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exhaustion_backs_off_warns_once_and_recovers() {
        let t0 = Instant::now();
        let mut f = AcceptFailures::default();
        let first = f.failed(Some(EMFILE), t0);
        assert_eq!(
            first,
            Retry {
                after: Duration::from_millis(10),
                warn: true
            }
        );
        let delays: Vec<Duration> = (0..10).map(|_| f.failed(Some(ENFILE), t0).after).collect();
        assert_eq!(delays[0], Duration::from_millis(20));
        assert_eq!(*delays.last().expect("some"), Duration::from_secs(1));
        assert!(!f.failed(Some(EMFILE), t0).warn, "once");
        assert!(f.succeeded());
        assert!(!f.succeeded());
        // Flapping at the limit: the delay starts over, the warning does not.
        let again = f.failed(Some(EMFILE), t0 + Duration::from_secs(5));
        assert_eq!(again.after, Duration::from_millis(10));
        assert!(!again.warn);
        assert!(!f.succeeded(), "no recovery line without a warning");
        assert!(
            f.failed(Some(EMFILE), t0 + WARN_EVERY * 2).warn,
            "a minute later it warns again"
        );
        // A connection reset before accept is not exhaustion.
        let mut g = AcceptFailures::default();
        assert_eq!(
            g.failed(Some(103), t0),
            Retry {
                after: Duration::ZERO,
                warn: false
            }
        );
        assert_eq!(g.failed(None, t0).after, Duration::ZERO);
    }
}
