//! The direct path, the async shell around [`own_link`]: light probes out
//! of the own link (timed TCP connects to `--probe` targets, the gateway,
//! the coordinator when it is reached that way), flows dialled straight
//! from this device and watched for stalls ([`stalls`]), and the race of a
//! direct flow that is slow to answer against the pool.

use super::own_link::{Change, OwnLink, Path, State, Thresholds, Trial, Via};
use super::pool::Pool;
use super::stalls::{self, Watched};
use bandshare_relay::FlowHeader;
use bandshare_relay::mark;
use bandshare_relay::wire::Host;
use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tracing::{info, warn};

/// How often the own link is probed (one target per round, in turn).
pub const PROBE_EVERY: Duration = Duration::from_millis(250);
/// A probe not answered within this is lost (at most; see
/// [`Direct::probe_timeout`]).
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(1000);
/// The shortest a probe is waited for.
pub const PROBE_TIMEOUT_MIN: Duration = Duration::from_millis(250);
/// A direct flow not connected within this is raced through the pool.
pub const FLOW_DEADLINE: Duration = Duration::from_millis(300);
/// A trial download before new flows return to the own link: this many
/// bytes from the coordinator ...
pub const TRIAL_BYTES: u32 = 16 * 1024;
/// ... at no less than this rate, over and above two probe RTTs: twice
/// the QoS map's weak threshold (250 kbit/s). A link hovering at the edge
/// of weak passes a trial at 250 only to stall the next second; as the
/// hold asks a link to stay good for a while, this asks it to be clearly
/// good (hysteresis in rate).
pub const TRIAL_KBPS: f64 = 500.0;
/// The RTT assumed before any probe answered.
const TRIAL_RTT: Duration = Duration::from_millis(200);
/// How often a trial is checked for.
const TRIAL_CHECK: Duration = Duration::from_millis(250);

/// The own link and the flows it carries.
pub struct Direct {
    via: Via,
    link: Mutex<OwnLink>,
    /// What the own link is probed with (set when probing starts).
    targets: Mutex<Vec<String>>,
    /// The last trial download, as `/status` shows it.
    last_trial: Mutex<Option<String>>,
    /// Trial downloads by result: passed, failed, skipped.
    trials: [AtomicU64; 3],
    /// The direct flows open now, watched for stalls.
    watched: Watched,
    /// Flows carried direct, those that failed there, and their bytes.
    pub flows: AtomicU64,
    pub failed: AtomicU64,
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
}

/// What `/status` shows of the own link.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct OwnLinkStatus {
    pub via: &'static str,
    /// unknown, healthy or degraded.
    pub state: &'static str,
    pub rtt_ms: Option<f64>,
    pub loss: f64,
    /// The `HOST:PORT`s probed.
    pub probes: Vec<String>,
    pub flows: u64,
    pub failed: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// Seconds it must be good before new flows return to it (grows when
    /// it relapses soon after recovering).
    pub hold_s: f64,
    /// Returns wait for a trial download from the coordinator over the own
    /// link (it is reached that way and can send one).
    pub trials: bool,
    /// The last trial: passed or failed, with its rate.
    pub last_trial: Option<String>,
    /// A forecast is over and new flows wait on the pool for a trial.
    pub forecast_ending: bool,
    /// Trial downloads so far: passed, failed, skipped.
    pub trials_run: [u64; 3],
}

/// The results a trial download is counted under, in
/// [`OwnLinkStatus::trials_run`]'s order.
pub const TRIAL_RESULTS: [&str; 3] = ["passed", "failed", "skipped"];

impl Direct {
    pub fn new(via: Via, t: Thresholds) -> Direct {
        Direct {
            via,
            link: Mutex::new(OwnLink::new(t)),
            targets: Mutex::new(vec![]),
            last_trial: Mutex::new(None),
            trials: Default::default(),
            watched: Watched::default(),
            flows: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            bytes_up: AtomicU64::new(0),
            bytes_down: AtomicU64::new(0),
        }
    }

    pub fn via(&self) -> Via {
        self.via
    }

    fn link(&self) -> MutexGuard<'_, OwnLink> {
        match self.link.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// The path new flows take now.
    pub fn path(&self) -> Path {
        self.link().path(self.via)
    }

    pub fn state(&self) -> State {
        self.link().state()
    }

    pub fn status(&self) -> OwnLinkStatus {
        let l = self.link();
        OwnLinkStatus {
            via: self.via.as_str(),
            state: l.state().as_str(),
            rtt_ms: l.rtt().map(|d| (d.as_secs_f64() * 1e4).round() / 10.0),
            loss: l.loss(),
            probes: self.targets.lock().map(|t| t.clone()).unwrap_or_default(),
            flows: self.flows.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            bytes_up: self.bytes_up.load(Ordering::Relaxed),
            bytes_down: self.bytes_down.load(Ordering::Relaxed),
            hold_s: l.hold().as_secs_f64(),
            trials: l.trials(),
            last_trial: self.last_trial.lock().ok().and_then(|t| t.clone()),
            forecast_ending: l.forecast_ending(),
            trials_run: self.trials.each_ref().map(|n| n.load(Ordering::Relaxed)),
        }
    }

    /// Logs a change and wakes the pool's maintainer: a degraded own link
    /// fills the pool at once, a recovered one lets it shrink to standby.
    fn changed(&self, c: Option<Change>, pool: &Pool) {
        match c {
            Some(Change::Degraded(why)) => {
                warn!(reason = %why, "own link degraded: new flows go through the pool")
            }
            Some(Change::Recovered) => {
                info!("own link healthy again: new flows go direct")
            }
            Some(Change::Forecast(why)) => {
                info!(forecast = %why, "weak zone predicted: new flows go through the pool before the own link drops")
            }
            Some(Change::ForecastOver) => {
                info!(
                    "predicted weak zone behind: new flows go direct while the own link is healthy"
                )
            }
            None => return,
        }
        pool.changed.notify_one();
    }

    /// The forecast new flows are moved for, if any.
    pub fn forecasting(&self) -> Option<String> {
        self.link().forecasting().map(str::to_string)
    }

    /// Acts on a forecast (or its end): see [`OwnLink::forecast`].
    pub fn forecast(&self, why: Option<String>, pool: &Pool) {
        let c = self.link().forecast(why, Instant::now());
        self.changed(c, pool);
    }

    /// How long a probe may take before it counts as lost: four mean
    /// RTTs, within [`PROBE_TIMEOUT_MIN`]..=[`PROBE_TIMEOUT`].
    fn probe_timeout(&self) -> Duration {
        self.link().rtt().map_or(PROBE_TIMEOUT, |r| {
            (r * 4).clamp(PROBE_TIMEOUT_MIN, PROBE_TIMEOUT)
        })
    }

    /// Probes `targets` in turn out of the own link, one every
    /// [`PROBE_EVERY`], each on its own task so a lost probe does not delay
    /// the next; forever.
    pub async fn probe_loop(
        self: Arc<Self>,
        asked: Vec<String>,
        coordinator: String,
        pool: Arc<Pool>,
    ) {
        if self.via != Via::Auto {
            return;
        }
        let targets = probe_targets(&asked, &coordinator).await;
        if targets.is_empty() {
            warn!(
                "nothing to probe the own link with (the coordinator is reached over another link): \
                 pass --probe HOST:PORT; until then only failed direct flows move new ones to the pool"
            );
            return;
        }
        info!(?targets, "probing the own link");
        if let Ok(mut t) = self.targets.lock() {
            t.clone_from(&targets);
        }
        let mut tick = tokio::time::interval(PROBE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        for target in targets.iter().cycle() {
            tick.tick().await;
            let (me, pool, target) = (self.clone(), pool.clone(), target.clone());
            let timeout = me.probe_timeout();
            tokio::spawn(async move {
                let started = Instant::now();
                let answered = tokio::time::timeout(timeout, probe(&target)).await;
                let rtt = match answered {
                    Ok(Ok(_)) => Some(started.elapsed()),
                    // Refused is an answer: the path works, the port is shut.
                    Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                        Some(started.elapsed())
                    }
                    _ => None,
                };
                let c = me.link().probe(rtt, Instant::now());
                me.changed(c, &pool);
            });
        }
    }

    /// Runs trial downloads when a return to the own link waits for one
    /// (see [`OwnLink::wants_trial`]), forever: [`TRIAL_BYTES`] from the
    /// coordinator, over the own link. Only under `auto`, and only when the
    /// coordinator is reached over the own link; a coordinator that cannot
    /// send one turns trials off (the probes alone decide, as before).
    pub async fn trial_loop(self: Arc<Self>, url: crate::client::ServerUrl, pool: Arc<Pool>) {
        if self.via != Via::Auto || !over_own_link(url.host_port()).await {
            return;
        }
        self.link().enable_trials();
        let mut channel = None;
        let mut tick = tokio::time::interval(TRIAL_CHECK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if !self.link().wants_trial(Instant::now()) {
                continue;
            }
            let (trial, shown) = match self.trial(&url, &mut channel).await {
                Ok(r) => r,
                Err(why) => {
                    warn!(reason = %why, "trial downloads are off: new flows return to the own link on its probes alone");
                    if let Ok(mut t) = self.last_trial.lock() {
                        *t = Some(format!("off: {why}"));
                    }
                    let c = self.link().disable_trials(Instant::now());
                    self.changed(c, &pool);
                    return;
                }
            };
            // `shown` begins with its result.
            let result = shown.split(':').next().unwrap_or_default();
            if let Some(i) = TRIAL_RESULTS.iter().position(|r| *r == result) {
                self.trials[i].fetch_add(1, Ordering::Relaxed);
            }
            if let Trial::Failed(why) = &trial {
                info!(reason = %why, "own link failed a trial download: new flows stay on the pool");
            }
            if let Ok(mut t) = self.last_trial.lock() {
                *t = Some(shown);
            }
            let c = self.link().trial(trial, Instant::now());
            self.changed(c, &pool);
        }
    }

    /// One trial download; `Err` when the coordinator cannot send one (an
    /// older version).
    async fn trial(
        &self,
        url: &crate::client::ServerUrl,
        channel: &mut Option<tonic::transport::Channel>,
    ) -> Result<(Trial, String), String> {
        let rtt = self.link().rtt().unwrap_or(TRIAL_RTT);
        let deadline =
            rtt * 2 + Duration::from_secs_f64(f64::from(TRIAL_BYTES) * 8.0 / (TRIAL_KBPS * 1000.0));
        // The coordinator not there (down, or its connection broke) says
        // nothing of the own link's rate: the probes decide, as without
        // trials. Only a download too slow fails a trial.
        let skipped =
            |why: String| Ok((Trial::Passed, format!("skipped: {why}; the probes decide")));
        let ch = match channel.clone() {
            Some(c) => c,
            None => match tokio::time::timeout(
                crate::client::CONNECT_TIMEOUT,
                crate::client::connect(url),
            )
            .await
            {
                Ok(Ok(c)) => channel.insert(c).clone(),
                Ok(Err(e)) => return skipped(format!("coordinator not reached ({e})")),
                Err(_) => return skipped("coordinator not reached in time".into()),
            },
        };
        let mut client = bandshare_proto::v1::health_client::HealthClient::new(ch);
        let started = Instant::now();
        let asked = bandshare_proto::v1::SampleRequest { bytes: TRIAL_BYTES };
        match tokio::time::timeout(deadline, client.sample(asked)).await {
            Ok(Ok(r)) => {
                let took = started.elapsed();
                let got = r.into_inner().filler.len();
                let kbps = got as f64 * 8.0 / took.as_secs_f64().max(1e-6) / 1000.0;
                Ok((
                    Trial::Passed,
                    format!(
                        "passed: {got} bytes in {} ms ({kbps:.0} kbit/s)",
                        took.as_millis()
                    ),
                ))
            }
            Ok(Err(s)) if s.code() == tonic::Code::Unimplemented => {
                Err("the coordinator sends no trial downloads (an older version)".into())
            }
            Ok(Err(s)) if s.code() == tonic::Code::ResourceExhausted => {
                skipped("the coordinator is busy sending others".into())
            }
            Ok(Err(s)) => {
                *channel = None;
                skipped(format!("{}: {}", s.code(), s.message()))
            }
            Err(_) => {
                // A late answer would still be arriving on this connection.
                *channel = None;
                let why = format!(
                    "{TRIAL_BYTES} bytes not in {} ms (below {TRIAL_KBPS:.0} kbit/s)",
                    deadline.as_millis()
                );
                Ok((Trial::Failed(why.clone()), format!("failed: {why}")))
            }
        }
    }

    /// Checks the direct flows for stalls every [`PROBE_EVERY`], forever: a
    /// flow whose data goes unacknowledged through
    /// [`stalls::STALL_RETRANSMITS`] retransmissions degrades the own link,
    /// as a failed flow does.
    pub async fn stall_loop(self: Arc<Self>, pool: Arc<Pool>) {
        if self.via != Via::Auto {
            return;
        }
        let mut tick = tokio::time::interval(PROBE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if self.watched.is_empty() {
                continue;
            }
            for (to, n) in self.watched.newly_stalled(&stalls::read()) {
                self.failed.fetch_add(1, Ordering::Relaxed);
                let why = format!("stalled, sent {n} more times to {to}, unanswered");
                let c = self.link().flow_failed(&why, Instant::now());
                self.changed(c, &pool);
            }
        }
    }

    /// Dials `target` straight from this device (a marked socket: in
    /// whole-device mode it keeps the original routes).
    async fn dial(target: &FlowHeader) -> std::io::Result<TcpStream> {
        match &target.host {
            Host::Ip(ip) => mark::tcp_connect(std::net::SocketAddr::new(*ip, target.port)).await,
            Host::Name(n) => mark::tcp_connect_host(n, target.port).await,
        }
    }

    /// Dials `target` out of the own link. [`Dialed::NoPath`] when the own
    /// link did not answer within [`FLOW_DEADLINE`] or has no route (the
    /// caller then uses the pool, and the own link counts as degraded).
    pub async fn connect(&self, target: &FlowHeader, pool: &Pool) -> Dialed<'_> {
        let why = match tokio::time::timeout(FLOW_DEADLINE, Direct::dial(target)).await {
            Ok(Ok(s)) => {
                self.flows.fetch_add(1, Ordering::Relaxed);
                let c = self.link().flow_ok(Instant::now());
                self.changed(c, pool);
                let watch = Watch::new(&self.watched, &s);
                return Dialed::Open(s, watch);
            }
            // The destination itself answered "no": the own link works.
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                return Dialed::Refused(e);
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("not answered within {} ms", FLOW_DEADLINE.as_millis()),
        };
        self.failed.fetch_add(1, Ordering::Relaxed);
        let c = self.link().flow_failed(&why, Instant::now());
        self.changed(c, pool);
        Dialed::NoPath(why)
    }
}

/// The word for the own link's gateway in `--probe`.
pub const GATEWAY: &str = "gateway";
/// Ports tried on the gateway; it is probed on the first that answers.
const GATEWAY_PORTS: [u16; 2] = [53, 80];

/// What the own link is probed with: the `--probe` targets (`gateway`
/// stands for the own link's default gateway, if it answers a TCP connect
/// on [`GATEWAY_PORTS`], accepted or refused), and the coordinator when it
/// is reached over the own link (over another link, a LAN to a sharer,
/// its answers would say nothing about the own link).
pub async fn probe_targets(asked: &[String], coordinator: &str) -> Vec<String> {
    let table = super::routes::read();
    let mut targets: Vec<String> = vec![];
    for a in asked {
        if a != GATEWAY {
            targets.push(a.clone());
            continue;
        }
        let Some(gw) = super::routes::default_route(&table).and_then(|r| r.gateway) else {
            warn!("--probe gateway: the own link has no default gateway");
            continue;
        };
        match gateway_port(gw).await {
            Some(port) => targets.push(format!("{gw}:{port}")),
            None => {
                warn!(%gw, "--probe gateway: the gateway answers no TCP probe (ports 53, 80); not probed")
            }
        }
    }
    if over_own_link(coordinator).await && !targets.iter().any(|t| t == coordinator) {
        targets.push(coordinator.to_string());
    }
    targets
}

/// Whether `HOST:PORT` is reached over the own link (over another link, a
/// LAN to a sharer, its answers would say nothing about the own link).
async fn over_own_link(host_port: &str) -> bool {
    let table = super::routes::read();
    match tokio::net::lookup_host(host_port).await {
        Ok(mut addrs) => addrs.any(|a| super::routes::over_own_link(&table, a.ip())),
        // Not resolvable now: it may be once the link is up.
        Err(_) => true,
    }
}

/// The first of [`GATEWAY_PORTS`] on which `gw` answers within a second.
async fn gateway_port(gw: std::net::Ipv4Addr) -> Option<u16> {
    for port in GATEWAY_PORTS {
        let answered =
            tokio::time::timeout(PROBE_TIMEOUT, mark::tcp_connect((gw, port).into())).await;
        match answered {
            Ok(Ok(_)) => return Some(port),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => return Some(port),
            _ => {}
        }
    }
    None
}

/// One probe: a timed, marked TCP connect to `HOST:PORT`.
async fn probe(target: &str) -> std::io::Result<TcpStream> {
    let (host, port) = target
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h.trim_matches(|c| c == '[' || c == ']'), p.parse().ok()?)))
        .ok_or_else(|| std::io::Error::other(format!("{target} is not HOST:PORT")))?;
    mark::tcp_connect_host(host, port).await
}

/// A direct flow watched for stalls while this lives.
pub struct Watch<'a> {
    watched: &'a Watched,
    ends: Option<(std::net::SocketAddr, std::net::SocketAddr)>,
}

impl<'a> Watch<'a> {
    fn new(watched: &'a Watched, s: &TcpStream) -> Watch<'a> {
        let ends = s.local_addr().ok().zip(s.peer_addr().ok());
        if let Some((l, r)) = ends {
            watched.add(l, r);
        }
        Watch { watched, ends }
    }
}

impl Drop for Watch<'_> {
    fn drop(&mut self) {
        if let Some((l, r)) = self.ends {
            self.watched.remove(l, r);
        }
    }
}

/// What dialling a flow out of the own link gave.
pub enum Dialed<'a> {
    /// Connected; watched for stalls while the [`Watch`] lives.
    Open(TcpStream, Watch<'a>),
    /// The destination refused the connection.
    Refused(std::io::Error),
    /// The own link could not carry it (why).
    NoPath(String),
}
