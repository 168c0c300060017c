//! RTT and loss from echoed pings: the sharer pings the coordinator over
//! its stream, the requester pings each sharer over the tunnel's probe
//! channel. Pure: the caller passes `now`.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Pings remembered for the loss estimate.
const WINDOW: usize = 20;

#[derive(Debug)]
pub struct PingTracker {
    next_seq: u64,
    /// (seq, sent, answered)
    sent: VecDeque<(u64, Instant, bool)>,
    srtt: Option<Duration>,
    timeout: Duration,
    last_answer: Option<Instant>,
}

impl PingTracker {
    /// A ping unanswered after `timeout` counts as lost.
    pub fn new(timeout: Duration) -> Self {
        PingTracker {
            next_seq: 1,
            sent: VecDeque::with_capacity(WINDOW),
            srtt: None,
            timeout,
            last_answer: None,
        }
    }

    pub fn ping(&mut self, now: Instant) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        if self.sent.len() == WINDOW {
            self.sent.pop_front();
        }
        self.sent.push_back((seq, now, false));
        seq
    }

    pub fn pong(&mut self, seq: u64, now: Instant) {
        if let Some(e) = self.sent.iter_mut().find(|e| e.0 == seq && !e.2) {
            e.2 = true;
            self.last_answer = Some(now);
            let rtt = now.saturating_duration_since(e.1);
            // RFC 6298 smoothing, alpha = 1/8.
            self.srtt = Some(match self.srtt {
                None => rtt,
                Some(s) => (s * 7 + rtt) / 8,
            });
        }
    }

    /// When the last answer arrived, if any.
    pub fn last_answer(&self) -> Option<Instant> {
        self.last_answer
    }

    pub fn rtt(&self) -> Option<Duration> {
        self.srtt
    }

    /// Lost pings per thousand among those old enough to judge.
    pub fn loss_permille(&self, now: Instant) -> u32 {
        let judged: Vec<bool> = self
            .sent
            .iter()
            .filter(|e| e.2 || now.saturating_duration_since(e.1) >= self.timeout)
            .map(|e| e.2)
            .collect();
        if judged.is_empty() {
            return 0;
        }
        let lost = judged.iter().filter(|a| !**a).count();
        (lost * 1000 / judged.len()) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rtt_and_loss() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut p = PingTracker::new(ms(1000));
        let a = p.ping(t0);
        p.pong(a, t0 + ms(10));
        assert_eq!(p.rtt(), Some(ms(10)));
        let b = p.ping(t0 + ms(100));
        p.pong(b, t0 + ms(190));
        assert_eq!(p.rtt(), Some(ms(20))); // (7*10 + 90) / 8
        let _lost = p.ping(t0 + ms(200));
        let c = p.ping(t0 + ms(300));
        // Not yet judged: no loss.
        assert_eq!(p.loss_permille(t0 + ms(400)), 0);
        p.pong(c, t0 + ms(400));
        assert_eq!(p.loss_permille(t0 + ms(1300)), 250);
        p.pong(a, t0 + ms(2000)); // duplicate answer changes nothing
        assert_eq!(p.loss_permille(t0 + ms(1300)), 250);
    }
}
