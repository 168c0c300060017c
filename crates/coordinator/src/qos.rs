//! `Qos`: devices' link-quality observations into the QoS map, predictions
//! along a track, and the published cells.
//!
//! An observation batch is proven like a share request; its samples are
//! rate-limited per device (a token bucket of `qos.samples_per_minute`) and
//! checked for plausibility (a speed above `qos.max_speed_mps` from the
//! device's previous sample, a timestamp in the future, an accuracy worse
//! than the map's cells). The map sees each device only as a keyed hash of
//! its key (`device`), and keeps per cell at most k cell-keyed tags of it;
//! a device's last position lives in memory only, to check the next sample
//! and learn its route. Aggregates are written to the store every few
//! seconds when they changed, and at shutdown.
//!
//! A requester also reports what it saw through a sharer: such a sample
//! carries the ticket that admitted it, is accepted only for a ticket this
//! coordinator issued to that requester, and is placed at the sharer's
//! position (never told to the requester). It counts for the requester's
//! device, like its own samples, and teaches no route.

use crate::State;
use crate::matchmaker::proven;
use bandshare_core::DeviceKey;
use bandshare_proto::v1;
use bandshare_qos::{Horizon, Map, Sample, Tracker, Trail};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn};

/// Samples per batch, points per prediction, at most.
pub const MAX_SAMPLES: usize = 1000;
pub const MAX_POINTS: usize = 20_000;
/// Devices whose last position is remembered at most (then all are
/// forgotten at once: they only lose one route step each).
const MAX_DEVICES: usize = 200_000;
/// A sample is refused when its position is less accurate than this.
const MAX_ACCURACY_M: f64 = 200.0;
/// A sample may not be from further ahead than this (clock skew).
const FUTURE_SLACK_S: f64 = 300.0;
/// A ticket vouches for reports through its sharer this long after it
/// expires (a warm connection outlives the ticket that opened it).
pub const THROUGH_REPORT_WINDOW_S: u64 = 3600;

/// An accepted sample and whether it teaches its device's route (samples
/// measured through a sharer do not: the requester did not go there).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Accepted {
    pub sample: Sample,
    pub route: bool,
}

/// What one device last reported, in memory only.
struct Seen {
    trail: Option<Trail>,
    last: Option<(f64, f64, f64)>,
    tokens: f64,
    refilled: Instant,
}

/// The map and what checking observations needs.
pub struct Book {
    pub map: Map,
    devices: HashMap<u64, Seen>,
    /// Route trails of the devices other coordinators report (scale-out).
    shared: HashMap<u64, Option<Trail>>,
    pub accepted: u64,
    pub rejected: u64,
}

impl Book {
    pub fn new(map: Map) -> Book {
        Book {
            map,
            devices: HashMap::new(),
            shared: HashMap::new(),
            accepted: 0,
            rejected: 0,
        }
    }
}

impl Book {
    /// Samples another coordinator of the service accepted (checked there).
    pub fn apply_shared(&mut self, samples: &[Accepted]) {
        if self.shared.len() >= MAX_DEVICES {
            self.shared.clear();
        }
        for a in samples {
            let s = &a.sample;
            let took = if a.route {
                let trail = self.shared.entry(s.device).or_default();
                self.map.observe(s, trail)
            } else {
                self.map.add(s)
            };
            if took.is_ok() {
                self.accepted += 1;
            }
        }
    }
}

/// What `/status` shows of the map.
#[derive(Debug, Clone, serde::Serialize)]
pub struct QosStatus {
    pub cells: usize,
    pub published_cells: usize,
    pub routes: usize,
    pub samples_accepted: u64,
    pub samples_rejected: u64,
    pub newest_sample_unix: Option<f64>,
}

pub struct QosService {
    pub(crate) state: Arc<State>,
}

fn meters(a: (f64, f64), b: (f64, f64)) -> f64 {
    let dy = (b.0 - a.0) * 111_320.0;
    let dx = (b.1 - a.1) * 111_320.0 * a.0.to_radians().cos();
    (dx * dx + dy * dy).sqrt()
}

/// One sample checked against the device's previous one.
fn check(
    s: &v1::QosSample,
    prev: Option<(f64, f64, f64)>,
    max_speed: f64,
    now: f64,
) -> Result<Sample, String> {
    let t = s.t_unix_ms as f64 / 1000.0;
    if t > now + FUTURE_SLACK_S {
        return Err(format!("sample at {t:.0} is in the future (now {now:.0})"));
    }
    if !(s.lat.is_finite() && s.lon.is_finite() && s.lat.abs() <= 90.0 && s.lon.abs() <= 180.0)
        || (s.lat == 0.0 && s.lon == 0.0)
    {
        return Err(format!("position {},{} is not a place", s.lat, s.lon));
    }
    if let Some(acc) = s.accuracy_m
        && !(acc.is_finite() && (0.0..=MAX_ACCURACY_M).contains(&acc))
    {
        return Err(format!("accuracy {acc} m is worse than {MAX_ACCURACY_M} m"));
    }
    if !(s.down_kbps.is_finite() && s.down_kbps >= 0.0 && s.down_kbps < 1e8) {
        return Err(format!("down_kbps {} is not a rate", s.down_kbps));
    }
    if s.duration_ms == 0 || s.duration_ms > 600_000 {
        return Err(format!(
            "duration {} ms is outside 1..=600000",
            s.duration_ms
        ));
    }
    if let Some((pt, plat, plon)) = prev {
        let dt = t - pt;
        if dt < 0.0 {
            return Err(format!(
                "sample at {t:.3} is older than the previous one ({pt:.3})"
            ));
        }
        let d = meters((plat, plon), (s.lat, s.lon));
        // One second of slack covers jitter between close samples.
        if d > max_speed * (dt + 1.0) {
            return Err(format!(
                "implausible speed: {d:.0} m in {dt:.1} s (at most {max_speed} m/s)"
            ));
        }
    }
    Ok(Sample {
        t,
        lat: s.lat,
        lon: s.lon,
        duration_s: s.duration_ms as f64 / 1000.0,
        down_kbps: s.down_kbps,
        device: 0,
    })
}

#[tonic::async_trait]
impl v1::qos_server::Qos for QosService {
    async fn observe(
        &self,
        req: Request<v1::ObserveBatch>,
    ) -> Result<Response<v1::ObserveAck>, Status> {
        let _permit = self.state.admit_request()?;
        let req = req.into_inner();
        let key = proven(&self.state, &req.device_key, &req.proof, req.signed_at_unix).await?;
        if req.samples.len() > MAX_SAMPLES {
            return Err(Status::invalid_argument(format!(
                "{} samples in one batch; at most {MAX_SAMPLES}",
                req.samples.len()
            )));
        }
        let placed: Vec<_> = req
            .samples
            .iter()
            .map(|s| place(&self.state, &key, s))
            .collect();
        let ack = self
            .state
            .qos_book(|book| observe(book, &self.state, &key, &placed, Instant::now()))?;
        debug!(device = %key.short(), accepted = ack.accepted, rejected = ack.rejected, "observations");
        Ok(Response::new(ack))
    }

    async fn predict(
        &self,
        req: Request<v1::PredictRequest>,
    ) -> Result<Response<v1::PredictResponse>, Status> {
        let _permit = self.state.admit_request()?;
        let req = req.into_inner();
        proven(&self.state, &req.device_key, &req.proof, req.signed_at_unix).await?;
        if req.points.len() > MAX_POINTS {
            return Err(Status::invalid_argument(format!(
                "{} points in one track; at most {MAX_POINTS}",
                req.points.len()
            )));
        }
        let weak_kbps = self.state.config().qos.map.weak_kbps;
        let horizon = Horizon {
            ahead_s: if req.horizon_s == 0 {
                60.0
            } else {
                f64::from(req.horizon_s.min(3600))
            },
            weak_kbps: if req.weak_kbps > 0.0 && req.weak_kbps.is_finite() {
                req.weak_kbps
            } else {
                weak_kbps
            },
            ..Horizon::default()
        };
        let points = self.state.qos_book(|book| {
            let mut tracker = Tracker::new();
            req.points
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    let pos = match (p.lat, p.lon) {
                        (Some(a), Some(b)) => Some((a, b)),
                        (None, None) => None,
                        _ => {
                            return Err(Status::invalid_argument(format!(
                                "point {i}: give both lat and lon, or neither"
                            )));
                        }
                    };
                    let t = p.t_unix_ms as f64 / 1000.0;
                    let got = tracker
                        .step(&book.map, t, pos, &horizon)
                        .map_err(|e| Status::invalid_argument(format!("point {i}: {e}")))?;
                    Ok(v1::PointPrediction {
                        t_unix_ms: p.t_unix_ms,
                        weak: got.weak,
                        weak_in_s: got.weak_in_s,
                        expected_kbps: got.expected_kbps,
                        confidence: got.confidence,
                        reckoned_s: got.reckoned_s,
                    })
                })
                .collect::<Result<Vec<_>, Status>>()
        })??;
        Ok(Response::new(v1::PredictResponse { points }))
    }

    async fn published_cells(
        &self,
        _: Request<v1::CellsRequest>,
    ) -> Result<Response<v1::CellsResponse>, Status> {
        let _permit = self.state.admit_request()?;
        let cfg = self.state.config().qos.map;
        let cells = self.state.qos_book(|book| {
            book.map
                .published()
                .into_iter()
                .map(|p| v1::PublishedCell {
                    h3: u64::from(p.cell),
                    kbps: p.estimate.kbps,
                    weak_share: p.estimate.weak_share,
                    weak: p.estimate.weak(),
                    confidence: p.estimate.confidence,
                    dip_share: p.dip_share,
                    dips_recur: p.dips_recur,
                })
                .collect()
        })?;
        Ok(Response::new(v1::CellsResponse {
            resolution: u32::from(cfg.resolution),
            k: cfg.k as u32,
            weak_kbps: cfg.weak_kbps,
            cells,
        }))
    }
}

/// A sample as the map takes it: where it belongs and whether it teaches
/// the device's route.
struct Placed {
    sample: v1::QosSample,
    through: bool,
}

/// Where a reported sample belongs: a sample over the device's own link
/// where it says; one through a sharer at that sharer's position, when its
/// ticket is one this coordinator issued to `key` (done outside the map's
/// lock: a signature check may take 50 µs).
fn place(state: &State, key: &DeviceKey, s: &v1::QosSample) -> Result<Placed, String> {
    if s.through_ticket.is_empty() {
        return Ok(Placed {
            sample: s.clone(),
            through: false,
        });
    }
    let ticket = state
        .issued_ticket(&s.through_ticket, key)
        .map_err(|e| format!("through-sharer sample refused: {e}"))?;
    let t = s.t_unix_ms / 1000;
    let opened = ticket
        .expires_unix
        .saturating_sub(bandshare_core::ticket::MAX_TICKET_LIFETIME_S);
    if t + bandshare_core::ticket::CLOCK_SKEW_S < opened
        || t > ticket.expires_unix + THROUGH_REPORT_WINDOW_S
    {
        return Err(format!(
            "through-sharer sample at {t} is outside its ticket's time ({opened}..{} and {THROUGH_REPORT_WINDOW_S} s after)",
            ticket.expires_unix
        ));
    }
    let mut sample = s.clone();
    if let Some(c) = state.registry().contact_of(&ticket.sharer) {
        sample.lat = c.info.exact.lat;
        sample.lon = c.info.exact.lon;
        sample.accuracy_m = None;
    }
    Ok(Placed {
        sample,
        through: true,
    })
}

fn observe(
    book: &mut Book,
    state: &State,
    key: &DeviceKey,
    samples: &[Result<Placed, String>],
    now: Instant,
) -> v1::ObserveAck {
    let qcfg = &state.config().qos;
    let device = state.qos_device(key);
    if book.devices.len() >= MAX_DEVICES && !book.devices.contains_key(&device) {
        book.devices.clear();
    }
    let per_s = qcfg.samples_per_minute / 60.0;
    let seen = book.devices.entry(device).or_insert(Seen {
        trail: None,
        last: None,
        tokens: qcfg.samples_per_minute,
        refilled: now,
    });
    seen.tokens = (seen.tokens + now.duration_since(seen.refilled).as_secs_f64() * per_s)
        .min(qcfg.samples_per_minute);
    seen.refilled = now;
    let unix = crate::unix_now() as f64;
    let mut ack = v1::ObserveAck::default();
    let refuse = |ack: &mut v1::ObserveAck, why: String| {
        ack.rejected += 1;
        if ack.reasons.len() < 5 {
            ack.reasons.push(why);
        }
    };
    for placed in samples {
        if seen.tokens < 1.0 {
            refuse(
                &mut ack,
                format!(
                    "rate limited: at most {} samples per minute",
                    qcfg.samples_per_minute
                ),
            );
            continue;
        }
        seen.tokens -= 1.0;
        let placed = match placed {
            Ok(p) => p,
            Err(why) => {
                refuse(&mut ack, why.clone());
                continue;
            }
        };
        // A sample through a sharer is where the sharer is: no speed from
        // the requester's own previous sample, no route step.
        let prev = seen.last.filter(|_| !placed.through);
        match check(&placed.sample, prev, qcfg.max_speed_mps, unix) {
            Ok(mut sample) => {
                sample.device = device;
                let took = if placed.through {
                    book.map.add(&sample)
                } else {
                    book.map.observe(&sample, &mut seen.trail)
                };
                match took {
                    Ok(()) => {
                        if let Some(c) = state.cluster() {
                            c.share_sample(&Accepted {
                                sample,
                                route: !placed.through,
                            });
                        }
                        if !placed.through {
                            seen.last = Some((sample.t, sample.lat, sample.lon));
                        }
                        ack.accepted += 1;
                    }
                    Err(e) => refuse(&mut ack, e.to_string()),
                }
            }
            Err(why) => refuse(&mut ack, why),
        }
    }
    book.accepted += u64::from(ack.accepted);
    book.rejected += u64::from(ack.rejected);
    ack
}

/// A sharer's state report as an observation of its uplink at its true
/// position: a link that is down as 0 kbit/s over the report interval, an
/// uplink carrying more than the weak threshold as that rate. A quieter
/// uplink says only that little was asked of it, so it is not counted.
pub(crate) fn sharer_uplink(
    state: &State,
    key: &DeviceKey,
    at: bandshare_core::Position,
    link: &v1::LinkState,
) {
    let weak = state.config().qos.map.weak_kbps;
    let rx_kbps = link.uplink_rx_bps as f64 / 1000.0;
    let down = if !link.up {
        0.0
    } else if rx_kbps >= weak {
        rx_kbps
    } else {
        return;
    };
    let sample = v1::QosSample {
        t_unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        lat: at.lat,
        lon: at.lon,
        duration_ms: state.config().report_interval.as_millis().clamp(1, 600_000) as u32,
        down_kbps: down,
        ..Default::default()
    };
    let placed = Ok(Placed {
        sample,
        through: false,
    });
    let _ = state.qos_book(|b| observe(b, state, key, &[placed], Instant::now()));
}

/// Writes the aggregates that changed since the last save to the store
/// (upserts: a map of many cells costs only what moved); what cannot be
/// written is written with the next save.
pub(crate) async fn save(state: &Arc<State>) {
    let Ok(Some(changes)) =
        state.qos_book(|book| book.map.has_changes().then(|| book.map.take_changes()))
    else {
        return;
    };
    let n = (changes.0.len(), changes.1.len());
    let failed = match state.cluster() {
        Some(c) => match c.save_qos(&changes.0, &changes.1).await {
            Ok(()) => None,
            Err(e) => {
                warn!(error = %e, "cannot save the QoS map to Redis; retrying");
                Some(changes)
            }
        },
        None => {
            let store = state.store().clone();
            match tokio::task::spawn_blocking(move || {
                let r = store.save_qos(&changes.0, &changes.1);
                (r, changes)
            })
            .await
            {
                Ok((Ok(()), _)) => None,
                Ok((Err(e), changes)) => {
                    warn!(error = %e, "cannot save the QoS map; retrying");
                    Some(changes)
                }
                // Cancelled: the runtime is going away without a stop
                // (a stop saves once more first); nothing to tell.
                Err(e) if e.is_cancelled() => {
                    debug!("QoS save not run: the runtime is shutting down");
                    None
                }
                Err(e) => {
                    warn!(error = %e, "QoS save task failed");
                    None
                }
            }
        }
    };
    match failed {
        Some(changes) => {
            let _ = state.qos_book(|b| b.map.unsaved(&changes));
        }
        None => debug!(cells = n.0, routes = n.1, "QoS map saved"),
    }
}

/// Saves every few seconds until `stop`, and once more then.
pub(crate) async fn saver(state: Arc<State>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = tick.tick() => save(&state).await,
            _ = stop.changed() => break,
        }
    }
    save(&state).await;
    info!("QoS map saved at shutdown");
}

impl Book {
    pub fn status(&self) -> QosStatus {
        QosStatus {
            cells: self.map.len(),
            published_cells: self.map.published().len(),
            routes: self.map.routes().len(),
            samples_accepted: self.accepted,
            samples_rejected: self.rejected,
            newest_sample_unix: self.map.newest(),
        }
    }
}
