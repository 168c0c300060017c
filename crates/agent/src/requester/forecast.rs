//! Pre-connect: the requester keeps its recent track (one point a second:
//! its fix, or none when the live source has gone quiet, as in a tunnel),
//! asks the coordinator's QoS map for predictions along it every
//! [`ASK_EVERY`], and acts on the newest point's answer. A weak zone here
//! or within the lead sends new flows through the pool (filled to its full
//! size at once) while the own link still works. They go back (while the
//! own link is healthy) after two clear answers in a row and once the
//! last warning is [`Options::tail_s`] old: the end of a weak zone is
//! less certain than its start, and a recording's next dip often follows
//! within seconds.
//!
//! It also reports its own link where that says something: a degraded own
//! link as 0 kbit/s, a direct transfer faster than the weak threshold as
//! its rate. A slow transfer on a healthy link says only that the app
//! asked for little, so it is not reported. What each pool member carried
//! faster than the weak threshold is reported too, as seen through that
//! sharer (with the ticket that admitted us: the coordinator places it
//! where the sharer is).

use super::direct::Direct;
use super::own_link::{State, Via};
use super::pool::Pool;
use crate::client::ServerUrl;
use crate::location::LocationSpec;
use bandshare_proto::v1;
use ed25519_dalek::SigningKey;
use serde::Serialize;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tracing::debug;

/// A point a second; predictions asked this often.
pub const POINT_EVERY: Duration = Duration::from_secs(1);
pub const ASK_EVERY: Duration = Duration::from_secs(2);
/// Track points kept (and sent) at most.
pub const TRACK_POINTS: usize = 300;
/// A live source silent this long means no fix.
pub const FIX_STALE: Duration = Duration::from_secs(3);
/// The own link is reported this often.
pub const REPORT_EVERY: Duration = Duration::from_secs(10);
/// Below this a link is weak (the map's default).
const WEAK_KBPS: f64 = 250.0;

/// How pre-connect acts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Options {
    /// Move new flows to the pool this many seconds before a predicted
    /// weak zone.
    pub lead_s: f64,
    /// Keep new flows on the pool this many seconds after the last
    /// warning (the zone behind).
    pub tail_s: f64,
    /// Report the own link's quality (and what pool members carried) as
    /// observations.
    pub report: bool,
    /// How often.
    pub report_every: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            lead_s: bandshare_qos::eval::READY_LEAD_S,
            tail_s: bandshare_qos::eval::READY_TAIL_S,
            report: true,
            report_every: REPORT_EVERY,
        }
    }
}

/// What `/status` shows: the prediction acted on.
#[derive(Serialize, Debug, Clone, Default, PartialEq)]
pub struct ForecastStatus {
    /// New flows go through the pool because of it.
    pub acting: bool,
    pub weak: bool,
    pub weak_in_s: Option<f64>,
    pub expected_kbps: Option<f64>,
    pub confidence: f64,
    /// When the coordinator answered (unix seconds), and for how many points.
    pub asked_unix: Option<u64>,
    pub points: usize,
    pub lead_s: f64,
    pub tail_s: f64,
    /// Seconds since the last warning, while a forecast is in force.
    pub quiet_s: Option<f64>,
    pub error: Option<String>,
    /// Own-link samples accepted by the coordinator.
    pub reported: u64,
    /// Samples seen through sharers accepted by the coordinator.
    pub reported_through: u64,
}

/// The newest forecast, shared with `/status`.
#[derive(Default)]
pub struct Forecasts(Mutex<ForecastStatus>);

impl Forecasts {
    pub fn status(&self) -> ForecastStatus {
        self.0.lock().map(|s| s.clone()).unwrap_or_default()
    }

    fn update(&self, f: impl FnOnce(&mut ForecastStatus)) {
        if let Ok(mut s) = self.0.lock() {
            f(&mut s);
        }
    }
}

fn unix_f64() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Whether this answer calls for the pool: weak here, or within the lead.
pub fn calls_for_pool(p: &v1::PointPrediction, lead_s: f64) -> Option<String> {
    if p.weak {
        return Some("weak zone predicted here".into());
    }
    match p.weak_in_s {
        Some(s) if s <= lead_s => Some(format!("weak zone predicted in {s:.0} s")),
        _ => None,
    }
}

/// Whether a forecast in force ends at a clear answer: after
/// `clear_in_a_row` clear answers (one clear answer may be a gap in the
/// map: two in a row), with the last warning `quiet` ago (`None`: never
/// warned) and the tail `tail_s`.
pub fn forecast_ends(clear_in_a_row: u32, quiet: Option<Duration>, tail_s: f64) -> bool {
    clear_in_a_row >= 2 && quiet.is_none_or(|q| q.as_secs_f64() >= tail_s)
}

/// A sample for each pool member that carried more than the weak
/// threshold down since the last report (`last`: its byte count then; a
/// member seen for the first time only starts counting), shaped like
/// `base` and vouched for by the member's ticket.
fn through_sharers(
    pool: &Pool,
    last: &mut HashMap<bandshare_core::DeviceKey, u64>,
    secs: f64,
    base: &v1::QosSample,
) -> Vec<v1::QosSample> {
    let members = pool.members();
    last.retain(|k, _| members.iter().any(|m| m.key == *k));
    let mut out = vec![];
    for m in members {
        let now = m.bytes_down.load(Ordering::Relaxed);
        let Some(before) = last.insert(m.key, now) else {
            continue;
        };
        let kbps = now.saturating_sub(before) as f64 * 8.0 / secs.max(0.001) / 1000.0;
        let ticket = m.ticket.lock().map(|t| t.clone()).unwrap_or_default();
        if kbps >= WEAK_KBPS && !ticket.is_empty() {
            out.push(v1::QosSample {
                down_kbps: kbps,
                network: bandshare_proto::convert::network_to_wire(m.network),
                through_ticket: ticket,
                ..base.clone()
            });
        }
    }
    out
}

pub(super) struct Forecaster {
    pub direct: Arc<Direct>,
    pub pool: Arc<Pool>,
    pub url: ServerUrl,
    pub key: SigningKey,
    pub location: watch::Receiver<LocationSpec>,
    /// The location comes from live sources (a quiet source: no fix).
    pub live: bool,
    pub opts: Options,
    pub shown: Arc<Forecasts>,
}

impl Forecaster {
    pub async fn run(mut self) {
        let mut track: VecDeque<bandshare_qos::track::Point> = VecDeque::new();
        let mut tick = tokio::time::interval(POINT_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_fix = Instant::now();
        let mut last_ask = Instant::now() - ASK_EVERY;
        let mut last_report = Instant::now();
        let mut reported_bytes = self.direct.bytes_down.load(Ordering::Relaxed);
        let mut through_bytes = HashMap::new();
        let (mut clear_in_a_row, mut failed_in_a_row) = (0, 0);
        let mut last_warned: Option<Instant> = None;
        let mut channel = None;
        self.shown.update(|s| {
            s.lead_s = self.opts.lead_s;
            s.tail_s = self.opts.tail_s;
        });
        loop {
            tick.tick().await;
            if self.location.has_changed().unwrap_or(false) {
                last_fix = Instant::now();
            }
            let here = self.location.borrow_and_update().clone();
            let fresh = !self.live || last_fix.elapsed() < FIX_STALE;
            let pos = here.at.filter(|_| fresh).map(|p| (p.lat, p.lon));
            track.push_back(bandshare_qos::track::Point { t: unix_f64(), pos });
            while track.len() > TRACK_POINTS {
                track.pop_front();
            }
            if track.iter().all(|p| p.pos.is_none()) {
                continue;
            }
            if channel.is_none() {
                channel = crate::client::connect(&self.url).await.ok();
            }
            let Some(ch) = channel.clone() else { continue };
            if self.opts.report && last_report.elapsed() >= self.opts.report_every {
                let secs = last_report.elapsed().as_secs_f64();
                last_report = Instant::now();
                let now_bytes = self.direct.bytes_down.load(Ordering::Relaxed);
                let kbps = (now_bytes.saturating_sub(reported_bytes)) as f64 * 8.0 / secs / 1000.0;
                reported_bytes = now_bytes;
                let down = if self.direct.state() == State::Degraded {
                    Some(0.0)
                } else {
                    (kbps >= WEAK_KBPS).then_some(kbps)
                };
                if let Some((lat, lon)) = pos {
                    let sample = v1::QosSample {
                        t_unix_ms: (unix_f64() * 1000.0) as u64,
                        lat,
                        lon,
                        accuracy_m: here.accuracy_m,
                        duration_ms: (secs * 1000.0) as u32,
                        ..Default::default()
                    };
                    if let Some(down) = down {
                        let own = v1::QosSample {
                            down_kbps: down,
                            ..sample.clone()
                        };
                        match crate::qos::observe(ch.clone(), &self.key, vec![own], |_| {}).await {
                            Ok((r, _)) => self.shown.update(|s| s.reported += r.accepted),
                            Err(e) => debug!(error = %e, "own-link report not taken"),
                        }
                    }
                    let through = through_sharers(&self.pool, &mut through_bytes, secs, &sample);
                    if !through.is_empty() {
                        match crate::qos::observe(ch.clone(), &self.key, through, |_| {}).await {
                            Ok((r, why)) => {
                                if r.rejected > 0 {
                                    debug!(?why, "through-sharer reports refused");
                                }
                                self.shown.update(|s| s.reported_through += r.accepted)
                            }
                            Err(e) => debug!(error = %e, "through-sharer report not taken"),
                        }
                    }
                }
            }
            if last_ask.elapsed() < ASK_EVERY {
                continue;
            }
            last_ask = Instant::now();
            let points: Vec<_> = track.iter().copied().collect();
            match crate::qos::predict(ch, &self.key, &points, 0.0, 60).await {
                Ok(answers) => {
                    let Some(newest) = answers.last() else {
                        continue;
                    };
                    let why = calls_for_pool(newest, self.opts.lead_s);
                    clear_in_a_row = if why.is_some() { 0 } else { clear_in_a_row + 1 };
                    if why.is_some() {
                        last_warned = Some(Instant::now());
                    }
                    let quiet = last_warned.map(|t| t.elapsed());
                    // Only `auto` chooses a path by forecast; the others
                    // show it (and report what they see).
                    if self.direct.via() == Via::Auto
                        && (why.is_some() || forecast_ends(clear_in_a_row, quiet, self.opts.tail_s))
                    {
                        self.direct.forecast(why.clone(), &self.pool);
                    }
                    failed_in_a_row = 0;
                    let acting = self.direct.forecasting().is_some();
                    self.shown.update(|s| {
                        s.acting = acting;
                        s.quiet_s = quiet.filter(|_| acting).map(|q| q.as_secs_f64());
                        s.weak = newest.weak;
                        s.weak_in_s = newest.weak_in_s;
                        s.expected_kbps = newest.expected_kbps;
                        s.confidence = newest.confidence;
                        s.asked_unix = Some(unix_f64() as u64);
                        s.points = points.len();
                        s.error = None;
                    });
                }
                Err(e) => {
                    debug!(error = %e, "no prediction");
                    channel = None;
                    // A forecast nobody renews ends (the probes still
                    // guard the own link).
                    failed_in_a_row += 1;
                    if failed_in_a_row >= 3 {
                        self.direct.forecast(None, &self.pool);
                    }
                    self.shown.update(|s| s.error = Some(e.to_string()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forecast_ends_after_two_clear_answers_and_its_tail() {
        let s = Duration::from_secs;
        // One clear answer is never enough, however old the warning.
        assert!(!forecast_ends(1, Some(s(60)), 16.0));
        // Two clear answers, but the last warning is younger than the tail.
        assert!(!forecast_ends(2, Some(s(4)), 16.0));
        assert!(!forecast_ends(7, Some(s(15)), 16.0));
        assert!(forecast_ends(2, Some(s(16)), 16.0));
        // No tail: two clear answers end it, as before the tail.
        assert!(forecast_ends(2, Some(s(4)), 0.0));
        // Never warned (a forecast set before this loop knew of it).
        assert!(forecast_ends(2, None, 16.0));
    }

    #[test]
    fn a_warning_within_the_lead_calls_for_the_pool() {
        let p = |weak, weak_in_s| v1::PointPrediction {
            weak,
            weak_in_s,
            ..Default::default()
        };
        assert!(calls_for_pool(&p(true, None), 20.0).is_some());
        assert!(calls_for_pool(&p(false, Some(20.0)), 20.0).is_some());
        assert!(calls_for_pool(&p(false, Some(21.0)), 20.0).is_none());
        assert!(calls_for_pool(&p(false, None), 20.0).is_none());
    }
}
