//! The own link, decided without I/O: whether the device's own uplink (its
//! Wi-Fi or cellular, the *direct* path) is good enough to carry new flows,
//! and so which path new flows take. `direct.rs` feeds it light probes
//! (timed TCP connects out of the own link) and the results of the flows
//! it carries itself, with `now`.
//!
//! The rules:
//! - *degraded* at once when, over the last [`Thresholds::window`] probes,
//!   loss exceeds `max_loss` or the mean RTT exceeds `max_rtt`; when the last
//!   [`LOST_IN_A_ROW`] probes were all lost (a silent cut is seen within
//!   about a second at the default probe interval); or when a flow on the
//!   direct path failed or was not answered within the deadline;
//! - *healthy* again only after it has been good for `hold` (hysteresis: a
//!   flapping link does not drag flows back and forth), and, where the
//!   own link can be tried ([`OwnLink::enable_trials`]), once a trial
//!   download over it came at a usable rate: probes see an idle link, and
//!   a rate-limited one answers them while it stalls every real flow;
//! - the end of a forecast sends new flows back only after such a trial
//!   too; a failed trial degrades the link;
//! - *unknown* before the first probe: new flows try direct, and a flow that
//!   fails there is raced through the pool.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Probes lost in a row that degrade the own link however good the window.
pub const LOST_IN_A_ROW: usize = 3;

/// Where new flows may go (`connect --via`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Via {
    /// The own link while it is healthy, the pool when it is not.
    #[default]
    Auto,
    /// Only the own link; sharers are never used.
    Direct,
    /// Only sharers (a device whose data plan is used up).
    Pool,
}

impl Via {
    pub fn as_str(&self) -> &'static str {
        match self {
            Via::Auto => "auto",
            Via::Direct => "direct",
            Via::Pool => "pool",
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown path {0:?}: expected auto, direct or pool")]
pub struct UnknownVia(pub String);

impl std::str::FromStr for Via {
    type Err = UnknownVia;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Via::Auto),
            "direct" => Ok(Via::Direct),
            "pool" => Ok(Via::Pool),
            _ => Err(UnknownVia(s.to_string())),
        }
    }
}

/// The path that carries new flows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    Direct,
    Pool,
}

impl Path {
    pub fn as_str(&self) -> &'static str {
        match self {
            Path::Direct => "direct",
            Path::Pool => "pool",
        }
    }
}

/// The own link's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Unknown,
    Healthy,
    Degraded,
}

impl State {
    pub fn as_str(&self) -> &'static str {
        match self {
            State::Unknown => "unknown",
            State::Healthy => "healthy",
            State::Degraded => "degraded",
        }
    }
}

/// When the own link counts as degraded, and how long it must be good again.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Thresholds {
    /// Probe loss over the window above which it is degraded (0..=1).
    pub max_loss: f64,
    /// Mean probe RTT over the window above which it is degraded.
    pub max_rtt: Duration,
    /// How long it must be good before new flows return to it.
    pub hold: Duration,
    /// How many recent probes the loss and RTT are taken over.
    pub window: usize,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            max_loss: 0.2,
            max_rtt: Duration::from_millis(500),
            hold: Duration::from_secs(10),
            window: 10,
        }
    }
}

/// What changed after an event, for the log and the pool's size.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    Degraded(String),
    Recovered,
    /// A weak zone is predicted here or just ahead: new flows go through
    /// the pool before the own link drops (pre-connect).
    Forecast(String),
    /// The predicted zone is behind.
    ForecastOver,
}

#[derive(Debug)]
pub struct OwnLink {
    t: Thresholds,
    /// Recent probes, newest last: the RTT, or `None` when lost.
    probes: VecDeque<Option<Duration>>,
    state: State,
    /// Since when it has been good while degraded.
    good_since: Option<Instant>,
    /// Why a weak zone is expected now or just ahead (pre-connect).
    forecast: Option<String>,
    /// The hold in force: [`Thresholds::hold`], doubled each time the link
    /// degrades again soon after it recovered (flap damping).
    hold: Duration,
    /// When it last recovered.
    recovered_at: Option<Instant>,
    /// Returns to the own link wait for a passed trial.
    trials: bool,
    /// When a trial last passed.
    trial_passed: Option<Instant>,
    /// No trial before this (after a failed one).
    trial_due: Option<Instant>,
    /// The forecast is over, but new flows stay on the pool until a trial
    /// passes.
    forecast_ending: bool,
}

/// What a trial download over the own link found.
#[derive(Clone, Debug, PartialEq)]
pub enum Trial {
    /// It came at a usable rate.
    Passed,
    /// Too slow, or not at all (why).
    Failed(String),
}

/// A passed trial lets the own link back for this long.
pub const TRIAL_FRESH: Duration = Duration::from_secs(3);
/// After a failed trial, the next one waits this long.
pub const TRIAL_AGAIN: Duration = Duration::from_secs(3);

/// A degradation this soon after a recovery is a flap: the next hold is
/// twice as long. A link that stays healthy this long earns the base hold
/// back.
const FLAP_WITHIN: Duration = Duration::from_secs(60);
/// The longest hold damping grows to.
const MAX_HOLD: Duration = Duration::from_secs(300);

impl OwnLink {
    pub fn new(t: Thresholds) -> OwnLink {
        OwnLink {
            t: Thresholds {
                window: t.window.max(LOST_IN_A_ROW),
                ..t
            },
            probes: VecDeque::new(),
            state: State::Unknown,
            good_since: None,
            forecast: None,
            hold: t.hold,
            recovered_at: None,
            trials: false,
            trial_passed: None,
            trial_due: None,
            forecast_ending: false,
        }
    }

    /// From now on, new flows return to the own link only after a passed
    /// trial ([`OwnLink::wants_trial`], [`OwnLink::trial`]).
    pub fn enable_trials(&mut self) {
        self.trials = true;
    }

    /// Trials are no longer possible (the coordinator cannot send one):
    /// returns go by the probes alone, as before trials.
    pub fn disable_trials(&mut self, now: Instant) -> Option<Change> {
        self.trials = false;
        self.trial_due = None;
        self.settle(now)
    }

    pub fn trials(&self) -> bool {
        self.trials
    }

    fn trial_fresh(&self, now: Instant) -> bool {
        self.trial_passed
            .is_some_and(|t| now.saturating_duration_since(t) < TRIAL_FRESH)
    }

    /// Held long enough to return, but for a trial.
    fn held(&self, now: Instant) -> bool {
        self.state == State::Degraded
            && self
                .good_since
                .is_some_and(|s| now.saturating_duration_since(s) >= self.hold)
    }

    /// Whether a trial download should run now: a return to the own link
    /// waits for one, and none failed within [`TRIAL_AGAIN`].
    pub fn wants_trial(&self, now: Instant) -> bool {
        self.trials
            && self.trial_due.is_none_or(|d| now >= d)
            && !self.trial_fresh(now)
            && (self.forecast_ending || self.held(now))
    }

    /// A trial's result.
    pub fn trial(&mut self, t: Trial, now: Instant) -> Option<Change> {
        match t {
            Trial::Passed => {
                self.trial_passed = Some(now);
                self.trial_due = None;
                self.settle(now)
            }
            Trial::Failed(why) => {
                self.trial_passed = None;
                self.trial_due = Some(now + TRIAL_AGAIN);
                // The forecast's end is settled: the link itself is weak.
                if std::mem::take(&mut self.forecast_ending) {
                    self.forecast = None;
                }
                // Like a failed flow: degraded (if not already), and the
                // hold starts over from the next good probe.
                self.degrade(format!("a trial download over it: {why}"), now)
            }
        }
    }

    /// Makes the returns that were waiting for a trial.
    fn settle(&mut self, now: Instant) -> Option<Change> {
        let open = !self.trials || self.trial_fresh(now);
        if open && self.forecast_ending {
            self.forecast_ending = false;
            self.forecast = None;
            if self.state != State::Degraded {
                return Some(Change::ForecastOver);
            }
        }
        if open && self.held(now) {
            return self.recover(now);
        }
        None
    }

    fn recover(&mut self, now: Instant) -> Option<Change> {
        self.state = State::Healthy;
        self.good_since = None;
        self.recovered_at = Some(now);
        Some(Change::Recovered)
    }

    /// The hold in force now (grown by flaps).
    pub fn hold(&self) -> Duration {
        self.hold
    }

    /// Sets or clears the forecast of a weak zone; under `auto` a forecast
    /// sends new flows through the pool while the own link still works.
    /// Its end sends new flows back once a trial passed (see
    /// [`OwnLink::enable_trials`]); until then the forecast stays in force.
    pub fn forecast(&mut self, why: Option<String>, now: Instant) -> Option<Change> {
        let change = match (&self.forecast, &why) {
            (None, Some(w)) => Some(Change::Forecast(w.clone())),
            (Some(_), None)
                if self.trials && self.state != State::Degraded && !self.trial_fresh(now) =>
            {
                self.forecast_ending = true;
                return None;
            }
            (Some(_), None) => Some(Change::ForecastOver),
            _ => None,
        };
        self.forecast_ending = false;
        self.forecast = why;
        change
    }

    /// A forecast is over and waits for a trial before new flows return.
    pub fn forecast_ending(&self) -> bool {
        self.forecast_ending
    }

    /// The forecast acted on, if any.
    pub fn forecasting(&self) -> Option<&str> {
        self.forecast.as_deref()
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// The path new flows take under `via`.
    pub fn path(&self, via: Via) -> Path {
        match (via, self.state) {
            (Via::Direct, _) => Path::Direct,
            (Via::Pool, _) => Path::Pool,
            (Via::Auto, State::Degraded) => Path::Pool,
            (Via::Auto, _) if self.forecast.is_some() => Path::Pool,
            (Via::Auto, _) => Path::Direct,
        }
    }

    /// Lost probes over the window, 0..=1 (0 before any probe).
    pub fn loss(&self) -> f64 {
        if self.probes.is_empty() {
            return 0.0;
        }
        let lost = self.probes.iter().filter(|p| p.is_none()).count();
        lost as f64 / self.probes.len() as f64
    }

    /// Mean RTT of the answered probes in the window.
    pub fn rtt(&self) -> Option<Duration> {
        let answered: Vec<Duration> = self.probes.iter().flatten().copied().collect();
        let n = u32::try_from(answered.len()).ok().filter(|n| *n > 0)?;
        Some(answered.iter().sum::<Duration>() / n)
    }

    /// A probe's result: its RTT, or `None` when it was not answered.
    pub fn probe(&mut self, rtt: Option<Duration>, now: Instant) -> Option<Change> {
        self.probes.push_back(rtt);
        while self.probes.len() > self.t.window {
            self.probes.pop_front();
        }
        match self.why_bad() {
            Some(why) => self.degrade(why, now),
            None => self.good(now),
        }
    }

    /// A flow on the direct path connected and was answered.
    pub fn flow_ok(&mut self, now: Instant) -> Option<Change> {
        if self.state == State::Unknown {
            return self.good(now);
        }
        None
    }

    /// A flow on the direct path failed or was not answered in time.
    pub fn flow_failed(&mut self, why: &str, now: Instant) -> Option<Change> {
        self.degrade(format!("a direct flow failed: {why}"), now)
    }

    fn why_bad(&self) -> Option<String> {
        let tail_lost = self.probes.len() >= LOST_IN_A_ROW
            && self
                .probes
                .iter()
                .rev()
                .take(LOST_IN_A_ROW)
                .all(Option::is_none);
        if tail_lost {
            return Some(format!("the last {LOST_IN_A_ROW} probes were lost"));
        }
        if self.probes.len() < LOST_IN_A_ROW {
            return None;
        }
        let loss = self.loss();
        if loss > self.t.max_loss {
            return Some(format!(
                "probe loss {:.0} % over the last {} (at most {:.0} %)",
                loss * 100.0,
                self.probes.len(),
                self.t.max_loss * 100.0
            ));
        }
        match self.rtt() {
            Some(rtt) if rtt > self.t.max_rtt => Some(format!(
                "probe RTT {} ms (at most {} ms)",
                rtt.as_millis(),
                self.t.max_rtt.as_millis()
            )),
            _ => None,
        }
    }

    fn degrade(&mut self, why: String, now: Instant) -> Option<Change> {
        self.good_since = None;
        if self.state == State::Degraded {
            return None;
        }
        // Probes see an idle link; a weak one often answers them and then
        // fails the first real flow. Each quick relapse doubles the hold.
        if self
            .recovered_at
            .is_some_and(|r| now.saturating_duration_since(r) < FLAP_WITHIN)
        {
            self.hold = (self.hold * 2).min(MAX_HOLD.max(self.t.hold));
        }
        self.state = State::Degraded;
        Some(Change::Degraded(why))
    }

    fn good(&mut self, now: Instant) -> Option<Change> {
        match self.state {
            State::Healthy => {
                if self
                    .recovered_at
                    .is_some_and(|r| now.saturating_duration_since(r) >= FLAP_WITHIN)
                {
                    self.hold = self.t.hold;
                    self.recovered_at = None;
                }
                None
            }
            State::Unknown => {
                self.state = State::Healthy;
                None
            }
            State::Degraded => {
                self.good_since.get_or_insert(now);
                self.settle(now)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn link() -> (OwnLink, Instant) {
        (OwnLink::new(Thresholds::default()), Instant::now())
    }

    #[test]
    fn via_parses_and_decides_the_path() {
        assert_eq!("AUTO".parse::<Via>(), Ok(Via::Auto));
        assert!("sideways".parse::<Via>().is_err());
        let (mut l, t0) = link();
        assert_eq!(l.path(Via::Auto), Path::Direct, "unknown tries direct");
        for k in 0..3 {
            l.probe(None, t0 + MS * (250 * k));
        }
        assert_eq!(l.state(), State::Degraded);
        assert_eq!(l.path(Via::Auto), Path::Pool);
        assert_eq!(l.path(Via::Direct), Path::Direct);
        let mut good = OwnLink::new(Thresholds::default());
        good.probe(Some(MS * 20), t0);
        assert_eq!(good.path(Via::Pool), Path::Pool);
    }

    #[test]
    fn a_silent_cut_degrades_within_three_probes() {
        let (mut l, t0) = link();
        for k in 0..10 {
            assert_eq!(l.probe(Some(MS * 20), t0 + MS * (250 * k)), None);
        }
        assert_eq!(l.state(), State::Healthy);
        // Packets vanish: two lost probes are not yet enough (loss 20 %).
        assert_eq!(l.probe(None, t0 + MS * 2500), None);
        assert_eq!(l.probe(None, t0 + MS * 2750), None);
        assert_eq!(l.state(), State::Healthy);
        let c = l.probe(None, t0 + MS * 3000);
        assert!(
            matches!(c, Some(Change::Degraded(ref why)) if why.contains("last 3")),
            "{c:?}"
        );
        assert!((l.loss() - 0.3).abs() < 1e-9);
    }

    #[test]
    fn loss_and_rtt_over_the_window() {
        let (mut l, t0) = link();
        // One probe in three lost: 33 % > 20 %, never three in a row.
        let mut changed = None;
        for k in 0..9u32 {
            let rtt = (k % 3 != 2).then_some(MS * 30);
            changed = changed.or(l.probe(rtt, t0 + MS * (250 * k)));
        }
        assert!(
            matches!(changed, Some(Change::Degraded(ref w)) if w.contains("loss")),
            "{changed:?}"
        );
        let (mut slow, t0) = link();
        for k in 0..3u32 {
            slow.probe(Some(MS * 800), t0 + MS * (250 * k));
        }
        assert_eq!(slow.state(), State::Degraded);
        assert_eq!(slow.rtt(), Some(MS * 800));
    }

    #[test]
    fn back_to_direct_only_after_the_hold() {
        let (mut l, t0) = link();
        l.probe(Some(MS * 20), t0);
        assert!(matches!(
            l.flow_failed("timed out", t0),
            Some(Change::Degraded(_))
        ));
        assert_eq!(
            l.flow_failed("again", t0),
            None,
            "one change, not one per flow"
        );
        let hold = Thresholds::default().hold;
        let mut t = t0;
        // Good probes, but a loss inside the hold restarts it.
        for _ in 0..20 {
            t += MS * 250;
            assert_eq!(l.probe(Some(MS * 20), t), None);
        }
        // Three lost in a row degrades again; good probes start the hold anew.
        for _ in 0..3 {
            t += MS * 250;
            l.probe(None, t);
        }
        let restart = t + MS * 250;
        let mut recovered_at = None;
        let mut now = t;
        for _ in 0..100 {
            now += MS * 250;
            if l.probe(Some(MS * 20), now) == Some(Change::Recovered) {
                recovered_at = Some(now);
                break;
            }
        }
        let at = recovered_at.expect("recovers");
        assert!(
            at.duration_since(restart) >= hold,
            "held {:?}",
            at.duration_since(restart)
        );
        assert!(at.duration_since(restart) <= hold + MS * 2500);
        assert_eq!(l.path(Via::Auto), Path::Direct);
    }

    #[test]
    fn a_forecast_moves_new_flows_to_the_pool_and_back() {
        let (mut l, t0) = link();
        for i in 0..3 {
            l.probe(Some(10 * MS), t0 + i * MS);
        }
        assert_eq!(l.path(Via::Auto), Path::Direct);
        let c = l.forecast(Some("weak zone in 12 s".into()), t0);
        assert_eq!(c, Some(Change::Forecast("weak zone in 12 s".into())));
        assert_eq!(l.path(Via::Auto), Path::Pool);
        assert_eq!(l.path(Via::Direct), Path::Direct, "direct never moves");
        assert_eq!(l.state(), State::Healthy, "the link itself is fine");
        assert_eq!(l.forecast(Some("weak here".into()), t0), None);
        assert_eq!(l.forecasting(), Some("weak here"));
        assert_eq!(l.forecast(None, t0), Some(Change::ForecastOver));
        assert_eq!(l.path(Via::Auto), Path::Direct);
    }

    #[test]
    fn a_good_direct_flow_settles_an_unknown_link() {
        let (mut l, t0) = link();
        assert_eq!(l.state(), State::Unknown);
        l.flow_ok(t0);
        assert_eq!(l.state(), State::Healthy);
        l.flow_failed("refused", t0);
        assert_eq!(l.flow_ok(t0), None, "one good flow does not undo the hold");
        assert_eq!(l.state(), State::Degraded);
    }

    /// Good probes for `secs` from `t`, 250 ms apart; the time after.
    fn good_for(l: &mut OwnLink, t: Instant, secs: u64) -> Instant {
        let mut t = t;
        for _ in 0..secs * 4 {
            t += MS * 250;
            l.probe(Some(MS * 20), t);
        }
        t
    }

    #[test]
    fn a_link_that_relapses_soon_after_recovering_is_held_longer() {
        let (mut l, t0) = link();
        let base = Thresholds::default().hold;
        l.probe(Some(MS * 20), t0);
        l.flow_failed("stalled", t0);
        let t = good_for(&mut l, t0, base.as_secs() + 1);
        assert_eq!(l.state(), State::Healthy, "recovered after the base hold");
        // The first real flow fails again 3 s later: a flap.
        let t = good_for(&mut l, t, 3);
        l.flow_failed("stalled", t);
        assert_eq!(l.hold(), base * 2);
        let t = good_for(&mut l, t, base.as_secs() + 1);
        assert_eq!(l.state(), State::Degraded, "the doubled hold is not over");
        let t = good_for(&mut l, t, base.as_secs());
        assert_eq!(l.state(), State::Healthy);
        // Flaps keep doubling, up to the cap.
        let mut t = t;
        for _ in 0..8 {
            l.flow_failed("stalled", t);
            let hold = l.hold().as_secs();
            t = good_for(&mut l, t, hold + 1);
        }
        assert_eq!(l.hold(), MAX_HOLD);
        // Healthy for a minute: the base hold again.
        good_for(&mut l, t, FLAP_WITHIN.as_secs() + 1);
        assert_eq!(l.hold(), base);
        // A relapse long after a recovery is no flap.
        let (mut l, t0) = link();
        l.probe(Some(MS * 20), t0);
        l.flow_failed("stalled", t0);
        let t = good_for(&mut l, t0, base.as_secs() + 1);
        let t = good_for(&mut l, t, FLAP_WITHIN.as_secs() + 5);
        l.flow_failed("stalled", t);
        assert_eq!(l.hold(), base);
    }

    #[test]
    fn with_trials_a_forecast_ends_only_after_the_own_link_carried_one() {
        let (mut l, t0) = link();
        l.enable_trials();
        let t = good_for(&mut l, t0, 1);
        l.forecast(Some("weak zone in 12 s".into()), t);
        assert!(!l.wants_trial(t), "nothing to return to yet");
        // The map says clear; the link answers its probes, but is it fast?
        assert_eq!(l.forecast(None, t), None, "not before a trial");
        assert!(l.forecast_ending());
        assert_eq!(l.path(Via::Auto), Path::Pool);
        assert!(l.wants_trial(t));
        let c = l.trial(Trial::Failed("16384 bytes not in 0.6 s".into()), t);
        assert!(
            matches!(&c, Some(Change::Degraded(why)) if why.contains("trial download")),
            "{c:?}"
        );
        assert_eq!(l.path(Via::Auto), Path::Pool);
        assert_eq!(l.forecasting(), None, "settled: the link itself is weak");
        // It is tried again only after the hold, and not sooner than
        // TRIAL_AGAIN after the failure.
        let t = good_for(&mut l, t, 11);
        assert_eq!(
            l.state(),
            State::Degraded,
            "good probes alone do not return"
        );
        assert!(l.wants_trial(t));
        assert_eq!(l.trial(Trial::Passed, t), Some(Change::Recovered));
        assert_eq!(l.path(Via::Auto), Path::Direct);
    }

    #[test]
    fn a_passed_trial_ends_the_forecast_at_once_and_stays_fresh_a_while() {
        let (mut l, t0) = link();
        l.enable_trials();
        let t = good_for(&mut l, t0, 1);
        l.forecast(Some("weak here".into()), t);
        l.forecast(None, t);
        assert_eq!(l.trial(Trial::Passed, t), Some(Change::ForecastOver));
        assert_eq!(l.path(Via::Auto), Path::Direct);
        // A new forecast and its end within TRIAL_FRESH: no new trial.
        let t = t + MS * 500;
        l.forecast(Some("weak zone in 8 s".into()), t);
        assert_eq!(l.forecast(None, t), Some(Change::ForecastOver));
        assert!(!l.wants_trial(t));
    }

    #[test]
    fn a_failed_trial_waits_before_the_next_and_disabling_trials_returns() {
        let (mut l, t0) = link();
        l.enable_trials();
        let t = good_for(&mut l, t0, 1);
        l.flow_failed("reset", t);
        let t = good_for(&mut l, t, 11);
        assert!(l.wants_trial(t));
        assert_eq!(
            l.trial(Trial::Failed("slow".into()), t),
            None,
            "already degraded"
        );
        // The hold starts over, as after a failed flow.
        let t = good_for(&mut l, t, 5);
        assert!(!l.wants_trial(t));
        let t = good_for(&mut l, t, 6);
        assert!(l.wants_trial(t));
        // The coordinator cannot send trials: the probes decide again.
        assert_eq!(l.disable_trials(t), Some(Change::Recovered));
        assert!(!l.wants_trial(t));
    }
}
