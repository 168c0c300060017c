//! Which pool member carries new flows. Pure: scores from link state,
//! measured RTT and distance band; hysteresis keeps the current member
//! unless another is clearly better; exact ties are broken at random.

use bandshare_core::DistanceBand;
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct View {
    pub alive: bool,
    /// The offer's link quality, 0..=1.
    pub link_quality: f64,
    pub rtt: Duration,
    /// Probe loss, 0..=1.
    pub loss: f64,
    pub band: Option<DistanceBand>,
}

/// How the active member is chosen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Strategy {
    /// Link state, probes and distance together (the default).
    #[default]
    Best,
    /// The lowest probe RTT.
    LowestRtt,
    /// The nearest distance band, then the best score.
    Nearest,
}

impl std::str::FromStr for Strategy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "best" => Ok(Strategy::Best),
            "lowest-rtt" => Ok(Strategy::LowestRtt),
            "nearest" => Ok(Strategy::Nearest),
            _ => Err(format!(
                "unknown strategy {s:?}: expected best, lowest-rtt or nearest"
            )),
        }
    }
}

impl Strategy {
    /// The number `choose` maximises.
    pub fn rank(&self, v: &View) -> f64 {
        if !v.alive {
            return 0.0;
        }
        match self {
            Strategy::Best => score(v),
            Strategy::LowestRtt => 1.0 / (1.0 + v.rtt.as_secs_f64() * 1000.0),
            Strategy::Nearest => {
                let band = match v.band {
                    Some(DistanceBand::Under10m) => 3.0,
                    Some(DistanceBand::From10To50m) => 2.0,
                    Some(DistanceBand::From50To200m) => 1.0,
                    _ => 0.0,
                };
                band + score(v)
            }
        }
    }
}

/// Another member must beat the current one by this fraction to take over.
pub const HYSTERESIS: f64 = 0.15;

pub fn score(v: &View) -> f64 {
    if !v.alive {
        return 0.0;
    }
    let rtt = 1.0 / (1.0 + v.rtt.as_secs_f64() * 1000.0 / 50.0);
    let near = match v.band {
        Some(DistanceBand::Under10m) => 1.0,
        Some(DistanceBand::From10To50m) => 0.8,
        Some(DistanceBand::From50To200m) => 0.5,
        Some(DistanceBand::Over200m) | None => 0.2,
    };
    let delivered = (1.0 - v.loss.clamp(0.0, 1.0)).powi(2);
    0.5 * v.link_quality * delivered + 0.3 * rtt * delivered + 0.2 * near
}

/// The index to use now. `pick(n)` returns a random number below `n`.
pub fn choose(
    views: &[View],
    current: Option<usize>,
    strategy: Strategy,
    pick: impl FnOnce(usize) -> usize,
) -> Option<usize> {
    let scores: Vec<f64> = views.iter().map(|v| strategy.rank(v)).collect();
    let best = scores
        .iter()
        .zip(views)
        .filter(|(_, v)| v.alive)
        .map(|(s, _)| *s)
        .fold(None, |m: Option<f64>, s| Some(m.map_or(s, |m| m.max(s))))?;
    if let Some(c) = current
        && views.get(c).is_some_and(|v| v.alive)
        && scores[c] >= best * (1.0 - HYSTERESIS)
    {
        return Some(c);
    }
    let tied: Vec<usize> = (0..views.len())
        .filter(|&i| views[i].alive && (scores[i] - best).abs() < 1e-12)
        .collect();
    tied.get(pick(tied.len()).min(tied.len().saturating_sub(1)))
        .copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(q: f64, rtt_ms: u64) -> View {
        View {
            alive: true,
            link_quality: q,
            rtt: Duration::from_millis(rtt_ms),
            loss: 0.0,
            band: Some(DistanceBand::From10To50m),
        }
    }

    #[test]
    fn best_then_sticky_then_moves() {
        let views = vec![v(0.5, 20), v(0.9, 5)];
        assert_eq!(choose(&views, None, Strategy::Best, |_| 0), Some(1));
        // Slightly better is not enough to leave the current one.
        let views = vec![v(0.88, 5), v(0.9, 5)];
        assert_eq!(choose(&views, Some(0), Strategy::Best, |_| 0), Some(0));
        // Clearly better is.
        let views = vec![v(0.3, 200), v(0.9, 5)];
        assert_eq!(choose(&views, Some(0), Strategy::Best, |_| 0), Some(1));
        // A dead current member is left at once.
        let mut views = vec![v(0.9, 5), v(0.5, 50)];
        views[0].alive = false;
        assert_eq!(choose(&views, Some(0), Strategy::Best, |_| 0), Some(1));
        views[1].alive = false;
        assert_eq!(choose(&views, Some(0), Strategy::Best, |_| 0), None);
    }

    #[test]
    fn probe_loss_moves_the_choice() {
        let mut lossy = v(0.9, 5);
        lossy.loss = 0.3;
        let views = vec![lossy, v(0.8, 10)];
        assert_eq!(choose(&views, Some(0), Strategy::Best, |_| 0), Some(1));
    }

    #[test]
    fn strategies() {
        let mut near = v(0.5, 40);
        near.band = Some(DistanceBand::Under10m);
        let fast = v(0.9, 2);
        let views = vec![near, fast];
        assert_eq!(choose(&views, None, Strategy::Best, |_| 0), Some(1));
        assert_eq!(choose(&views, None, Strategy::LowestRtt, |_| 0), Some(1));
        assert_eq!(choose(&views, None, Strategy::Nearest, |_| 0), Some(0));
        assert_eq!("lowest-rtt".parse(), Ok(Strategy::LowestRtt));
        assert!("fastest".parse::<Strategy>().is_err());
    }

    #[test]
    fn ties_are_random() {
        let views = vec![v(0.9, 5), v(0.9, 5), v(0.9, 5)];
        assert_eq!(choose(&views, None, Strategy::Best, |n| n - 1), Some(2));
        assert_eq!(choose(&views, None, Strategy::Best, |_| 0), Some(0));
    }
}
