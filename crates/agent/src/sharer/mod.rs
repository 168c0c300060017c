//! `bandshare share`: keeps one stream to the coordinator (reconnecting with
//! backoff and jitter), reports measured link state, answers access requests
//! by its consent policy, and runs the QUIC relay that serves requesters.

pub mod consent;

pub mod uplink;

use crate::location::LocationSpec;
use crate::probe::PingTracker;
use crate::{AgentError, Shutdown, coordinator};
use bandshare_core::{Backoff, EgressPolicy, LinkState, NetworkType, ServiceSet};
use bandshare_proto::convert as cv;
use bandshare_proto::v1::{self, coordinator_message::Msg as Down, sharer_message::Msg as Up};
use bandshare_relay::{Relay, RelayHandle, RelayOptions};
use consent::Consent;
use ed25519_dalek::SigningKey;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tracing::{Instrument, debug, error, info, info_span, warn};

#[derive(Clone, Debug)]
pub struct SharerOptions {
    pub server: String,
    pub name: String,
    /// The static location (`--at`, `--wifi`, `--cell`); live sources update it.
    pub location: LocationSpec,
    pub sources: crate::position::Sources,
    pub services: ServiceSet,
    pub network: Option<NetworkType>,
    /// Where the QUIC relay listens.
    pub relay_listen: SocketAddr,
    /// The address requesters dial; derived when the relay listens on an
    /// unspecified address.
    pub advertise: Option<SocketAddr>,
    pub egress: EgressPolicy,
    /// Cap of what this sharer offers, bits per second; 0 = no cap.
    pub bandwidth_bps: u64,
    pub consent: Consent,
    /// Interface whose counters measure the uplink; default: the default route's.
    pub uplink: Option<String>,
    /// HOST:PORT across the uplink that [`uplink::watch`] times connects to.
    pub uplink_check: Option<String>,
    /// Where batteries are read (`/sys/class/power_supply`).
    pub power_supply: PathBuf,
    /// Where today's relayed bytes are kept so the daily cap survives a
    /// restart; `None` keeps them in memory only.
    pub data_dir: Option<PathBuf>,
}

/// A started sharer: its relay is bound and serving.
pub struct Sharer {
    pub relay_addr: SocketAddr,
    pub relay: RelayHandle,
    /// Usage the coordinator has not yet acknowledged as durable.
    pub unacked: Unacked,
    task: tokio::task::JoinHandle<Result<(), AgentError>>,
}

/// Usage batches sent but not yet acknowledged; they ride along in every
/// report (across reconnects) until the coordinator's ledger has them.
#[derive(Clone, Default)]
pub struct Unacked {
    queue: std::sync::Arc<std::sync::Mutex<std::collections::VecDeque<v1::UsageBatch>>>,
    /// Bytes (both directions) in batches acknowledged so far.
    acked_bytes: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

/// Batches kept at most while the coordinator does not acknowledge; the
/// oldest are dropped beyond this (and a warning logged).
const MAX_UNACKED: usize = 4096;

impl Unacked {
    /// Batches waiting for an acknowledgement.
    pub fn len(&self) -> usize {
        self.queue.lock().map(|q| q.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn push(&self, usage: Vec<v1::Usage>) {
        if let Ok(mut q) = self.queue.lock() {
            q.push_back(v1::UsageBatch {
                id: fastrand::u64(..),
                usage,
            });
            while q.len() > MAX_UNACKED {
                q.pop_front();
                warn!("coordinator does not acknowledge usage: dropped the oldest batch");
            }
        }
    }

    /// The oldest batches to send now.
    fn to_send(&self) -> Vec<v1::UsageBatch> {
        self.queue
            .lock()
            .map(|q| q.iter().take(64).cloned().collect())
            .unwrap_or_default()
    }

    fn ack(&self, ids: &[u64]) {
        if let Ok(mut q) = self.queue.lock() {
            q.retain(|b| {
                let done = ids.contains(&b.id);
                if done {
                    let bytes: u64 = b.usage.iter().map(|u| u.bytes_up + u.bytes_down).sum();
                    self.acked_bytes
                        .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
                }
                !done
            });
        }
    }

    /// Relayed bytes the coordinator has acknowledged as recorded.
    pub fn acked_bytes(&self) -> u64 {
        self.acked_bytes.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Sharer {
    /// Binds the relay and starts the stream loop; both stop on `shutdown`.
    pub async fn start(
        opts: SharerOptions,
        key: SigningKey,
        shutdown: Shutdown,
    ) -> Result<Sharer, AgentError> {
        let url = coordinator::normalize_url(&opts.server)?;
        let mut relay_opts = RelayOptions::new(
            opts.relay_listen,
            bandshare_core::DeviceKey(key.verifying_key().to_bytes()),
            opts.egress.clone(),
            opts.consent.max_requesters,
        );
        relay_opts.limits = opts.consent.limits;
        relay_opts.daily_used = opts.data_dir.as_deref().map_or(0, load_daily_used);
        let relay = Relay::bind(relay_opts)?;
        let relay_addr = relay
            .local_addr()
            .map_err(|e| AgentError::Listen(opts.relay_listen, e))?;
        let advertise = match opts.advertise {
            Some(a) => a,
            None => advertised(relay_addr, &url).await,
        };
        let handle = relay.handle();
        let location =
            crate::position::start(opts.location.clone(), &opts.sources, shutdown.clone());
        let relay_task = tokio::spawn(relay.run(shutdown.clone().wait()));
        tokio::spawn(uplink::watch(
            uplink::uplink_interface(opts.uplink.as_deref()),
            opts.uplink_check.clone(),
            handle.clone(),
            shutdown.clone(),
        ));
        let span = info_span!("sharer", name = %opts.name);
        let h = handle.clone();
        let unacked = Unacked::default();
        let u = unacked.clone();
        let task = tokio::spawn(
            async move {
                let ctx = Ctx {
                    opts: &opts,
                    url: &url,
                    key: &key,
                    advertise,
                    relay: &h,
                    unacked: &u,
                };
                let result = stream_loop(ctx, location, shutdown).await;
                if result.is_err() {
                    // Refused for good: nothing may be relayed any more.
                    relay_task.abort();
                }
                let _ = relay_task.await;
                result
            }
            .instrument(span),
        );
        info!(relay = %relay_addr, advertise = %advertise, "sharer relay listening");
        Ok(Sharer {
            relay_addr: advertise,
            relay: handle,
            unacked,
            task,
        })
    }

    /// Waits until the sharer has stopped: `Err` when the coordinator
    /// refused it for good (the reason is the coordinator's).
    pub async fn join(self) -> Result<(), AgentError> {
        self.task
            .await
            .map_err(|e| AgentError::Other(format!("sharer task failed: {e}")))?
    }
}

/// The address requesters should dial: the relay's own when specific, else
/// the local address this host uses toward the coordinator (found with a
/// connected UDP socket; nothing is sent).
async fn advertised(relay: SocketAddr, url: &str) -> SocketAddr {
    if !relay.ip().is_unspecified() {
        return relay;
    }
    let hostport = url.split("://").nth(1).unwrap_or(url).to_string();
    if let Ok(mut addrs) = tokio::net::lookup_host(hostport).await
        && let Some(server) = addrs.next()
    {
        let bind: SocketAddr = if server.is_ipv4() {
            SocketAddr::from(([0, 0, 0, 0], 0))
        } else {
            SocketAddr::from(([0u16; 8], 0))
        };
        if let Ok(sock) = std::net::UdpSocket::bind(bind)
            && sock.connect(server).is_ok()
            && let Ok(local) = sock.local_addr()
        {
            return SocketAddr::new(local.ip(), relay.port());
        }
    }
    relay
}

const DAILY_FILE: &str = "relayed-today";

/// Bytes relayed today as kept in `dir` ("DAY BYTES"); 0 for another day.
fn load_daily_used(dir: &Path) -> u64 {
    let text = std::fs::read_to_string(dir.join(DAILY_FILE)).unwrap_or_default();
    let mut parts = text.split_whitespace().map(str::parse::<u64>);
    match (parts.next(), parts.next()) {
        (Some(Ok(day)), Some(Ok(bytes))) if day == bandshare_relay::limits::today() => bytes,
        _ => 0,
    }
}

/// Keeps today's relayed bytes (written whole, then renamed into place).
fn store_daily_used(dir: &Path, bytes: u64) {
    let tmp = dir.join(format!("{DAILY_FILE}.tmp"));
    let text = format!("{} {bytes}\n", bandshare_relay::limits::today());
    if std::fs::create_dir_all(dir).is_ok()
        && std::fs::write(&tmp, text).is_ok()
        && let Err(e) = std::fs::rename(&tmp, dir.join(DAILY_FILE))
    {
        debug!(error = %e, "cannot keep today's relayed bytes");
    }
}

/// Measures link state between reports.
struct LinkMeter {
    iface: Option<String>,
    power_supply: PathBuf,
    last: Option<(Instant, u64, u64, u64)>, // (at, rx, tx, relayed)
    cap_bps: u64,
    network: Option<NetworkType>,
}

impl LinkMeter {
    fn measure(&mut self, probe: &PingTracker, relay: &RelayHandle, now: Instant) -> LinkState {
        let (rx, tx) = self
            .iface
            .as_deref()
            .and_then(uplink::counters)
            .unwrap_or((0, 0));
        let relayed = relay.total_bytes();
        let (mut rx_bps, mut tx_bps, mut relay_bps) = (0, 0, 0);
        if let Some((at, lrx, ltx, lrel)) = self.last {
            let secs = now.saturating_duration_since(at).as_secs_f64().max(1e-3);
            let rate = |a: u64, b: u64| ((a.saturating_sub(b)) as f64 * 8.0 / secs) as u64;
            rx_bps = rate(rx, lrx);
            tx_bps = rate(tx, ltx);
            relay_bps = rate(relayed, lrel);
        }
        self.last = Some((now, rx, tx, relayed));
        let congestion = match self.cap_bps {
            0 => 0,
            cap => ((relay_bps as f64 / cap as f64) * 1000.0).min(1000.0) as u32,
        };
        let health = relay.uplink();
        LinkState {
            up: self.iface.as_deref().is_none_or(uplink::is_up) && !health.down,
            rtt_us: probe
                .rtt()
                .map_or(0, |d| d.as_micros().min(u32::MAX as u128) as u32),
            loss_permille: probe.loss_permille(now).max(health.loss_permille as u32),
            uplink_rx_bps: rx_bps,
            uplink_tx_bps: tx_bps,
            relay_bps,
            capacity_bps: self.cap_bps,
            congestion_permille: congestion,
            network: self.network,
            battery_pct: uplink::battery_pct(&self.power_supply),
        }
    }
}

/// What every session of the stream loop works with.
#[derive(Clone, Copy)]
struct Ctx<'a> {
    opts: &'a SharerOptions,
    url: &'a str,
    key: &'a SigningKey,
    advertise: SocketAddr,
    relay: &'a RelayHandle,
    unacked: &'a Unacked,
}

async fn stream_loop(
    ctx: Ctx<'_>,
    mut location: watch::Receiver<LocationSpec>,
    shutdown: Shutdown,
) -> Result<(), AgentError> {
    let opts = ctx.opts;
    // The coordinator places sharers by a fix: wait for the first one.
    if location.borrow().at.is_none() {
        info!("waiting for a position fix");
        tokio::select! {
            r = location.wait_for(|l| l.at.is_some()) => if r.is_err() { return Ok(()) },
            _ = shutdown.clone().wait() => return Ok(()),
        }
    }
    let mut backoff = Backoff::default();
    let mut meter = LinkMeter {
        iface: uplink::uplink_interface(opts.uplink.as_deref()),
        power_supply: opts.power_supply.clone(),
        last: None,
        cap_bps: opts.bandwidth_bps,
        network: opts.network,
    };
    loop {
        let started = Instant::now();
        let result = tokio::select! {
            r = session(ctx, &mut meter, &mut location) => r,
            _ = shutdown.clone().wait() => return Ok(()),
        };
        match result {
            Err(AgentError::Refused(reason)) => {
                error!(%reason, "the coordinator refused this sharer; stopping");
                return Err(AgentError::Refused(reason));
            }
            Err(e) => warn!(error = %e, "coordinator stream lost"),
            Ok(()) => {}
        }
        // A session that lasted a while was a success: start backoff over.
        if started.elapsed() > Duration::from_secs(30) {
            backoff.reset();
        }
        let delay = backoff.next_delay(fastrand::f64());
        info!(
            retry_in_ms = delay.as_millis() as u64,
            "reconnecting to coordinator"
        );
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.clone().wait() => return Ok(()),
        }
    }
}

/// Resolves when the location changed, no sooner than 250 ms after the last
/// report. A static location (no live source) never changes: never resolves.
async fn moved(location: &mut watch::Receiver<LocationSpec>, last_report: &Instant) {
    if location.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
    let since = last_report.elapsed();
    if since < Duration::from_millis(250) {
        tokio::time::sleep(Duration::from_millis(250) - since).await;
    }
}

/// The 32-byte keys of a list, others skipped.
fn keys_of(list: &[Vec<u8>]) -> Vec<[u8; 32]> {
    list.iter()
        .filter_map(|k| k.as_slice().try_into().ok())
        .collect()
}

fn devices_of(list: &[Vec<u8>]) -> Vec<bandshare_core::DeviceKey> {
    keys_of(list)
        .into_iter()
        .map(bandshare_core::DeviceKey)
        .collect()
}

fn up(msg: Up) -> v1::SharerMessage {
    v1::SharerMessage { msg: Some(msg) }
}

/// A status from the coordinator as an error: refusals that retrying
/// cannot change end the sharer; anything else is retried.
fn stream_error(context: &str, s: &tonic::Status) -> AgentError {
    match s.code() {
        tonic::Code::InvalidArgument | tonic::Code::AlreadyExists => {
            AgentError::Refused(s.message().to_string())
        }
        _ => AgentError::Other(format!("{context}: {}", s.message())),
    }
}

/// One stream to the coordinator, until it breaks.
async fn session(
    ctx: Ctx<'_>,
    meter: &mut LinkMeter,
    location: &mut watch::Receiver<LocationSpec>,
) -> Result<(), AgentError> {
    let Ctx {
        opts,
        url,
        key,
        advertise,
        relay,
        unacked,
    } = ctx;
    let channel = coordinator::connect(url).await?;
    let mut client = v1::sharer_link_client::SharerLinkClient::new(channel);
    let (tx, rx) = mpsc::channel(64);
    let mut probe = PingTracker::new(Duration::from_secs(2));
    let link = meter.measure(&probe, relay, Instant::now());
    let hello = v1::Hello {
        version: 1,
        name: opts.name.clone(),
        public_key: key.verifying_key().to_bytes().to_vec(),
        services: cv::services_to_wire(opts.services),
        network: cv::network_to_wire(opts.network),
        security: 0,
        relay_endpoints: vec![advertise.to_string()],
        relay_cert_sha256: relay.cert_pin().to_vec(),
        consent: Some(v1::ConsentPolicy {
            accept: opts.consent.accept,
            max_requesters: opts.consent.max_requesters,
        }),
        location: Some(location.borrow_and_update().to_wire()),
        link: Some(cv::link_to_wire(&link)),
    };
    tx.send(up(Up::Hello(hello)))
        .await
        .map_err(|_| AgentError::Other("stream closed".into()))?;
    let mut inbound = client
        .attach(ReceiverStream::new(rx))
        .await
        .map_err(|s| stream_error("coordinator refused the stream", &s))?
        .into_inner();
    let welcome = match inbound.message().await {
        Ok(Some(v1::CoordinatorMessage {
            msg: Some(Down::Welcome(w)),
        })) => w,
        Ok(_) => return Err(AgentError::Other("coordinator sent no welcome".into())),
        Err(s) => return Err(stream_error("coordinator", &s)),
    };
    let mut keys = keys_of(&welcome.coordinator_keys);
    if keys.is_empty() {
        keys = keys_of(std::slice::from_ref(&welcome.coordinator_key));
    }
    if keys.is_empty() {
        return Err(AgentError::Other(
            "coordinator sent no 32-byte ticket key".into(),
        ));
    }
    relay.set_coordinator_keys(&keys);
    relay.revoke(&devices_of(&welcome.revoked));
    let interval = |ms: u32, default: u64| {
        Duration::from_millis(if ms == 0 {
            default
        } else {
            ms.clamp(50, 60_000) as u64
        })
    };
    let ping_every = interval(welcome.ping_interval_ms, 1000);
    probe = PingTracker::new((ping_every * 2).max(Duration::from_millis(500)));
    let mut ping_tick = tokio::time::interval(ping_every);
    let mut report_tick = tokio::time::interval(interval(welcome.report_interval_ms, 2000));
    info!("online at coordinator");
    let mut last_report = Instant::now();
    loop {
        tokio::select! {
            msg = inbound.message() => {
                let msg = match msg {
                    Ok(Some(m)) => m,
                    Ok(None) => return Err(AgentError::Other("coordinator ended the stream".into())),
                    Err(s) => return Err(stream_error("coordinator", &s)),
                };
                match msg.msg {
                    Some(Down::Pong(p)) => probe.pong(p.seq, Instant::now()),
                    Some(Down::UsageAck(a)) => unacked.ack(&a.batch_ids),
                    Some(Down::TicketKeys(k)) => {
                        let keys = keys_of(&k.keys);
                        if !keys.is_empty() {
                            info!(keys = keys.len(), "coordinator ticket keys changed");
                            relay.set_coordinator_keys(&keys);
                        }
                    }
                    Some(Down::Revoked(r)) => relay.revoke(&devices_of(&r.keys)),
                    Some(Down::AccessRequest(a)) => {
                        let requester = bandshare_core::DeviceKey::from_slice(&a.requester_key).ok();
                        let decision = opts.consent.decide(&consent::Moment {
                            active_requesters: relay.active_requesters(),
                            minute_of_day: consent::local_minute_of_day(),
                            battery_pct: uplink::battery_pct(&opts.power_supply),
                            wanted: a.conditions.as_ref().map(|c| cv::services_from_wire(&c.services)).unwrap_or_default(),
                            daily_left: relay.daily_left(),
                            requester_left: requester.map_or(0, |k| relay.requester_left(&k)),
                        });
                        if let Err(reason) = &decision {
                            info!(request = a.request_id, %reason, "declined an access request");
                        }
                        debug!(request = a.request_id, accept = decision.is_ok(), "access request");
                        let link = meter.measure(&probe, relay, Instant::now());
                        let resp = v1::AccessResponse {
                            request_id: a.request_id,
                            accept: decision.is_ok(),
                            reason: decision.err().unwrap_or_default(),
                            relay_endpoints: vec![advertise.to_string()],
                            services: cv::services_to_wire(opts.services),
                            link: Some(cv::link_to_wire(&link)),
                        };
                        let _ = tx.try_send(up(Up::AccessResponse(resp)));
                    }
                    _ => {}
                }
            }
            _ = ping_tick.tick() => {
                let seq = probe.ping(Instant::now());
                let _ = tx.try_send(up(Up::Ping(v1::Ping { seq })));
            }
            // A move is reported at once (at most every 250 ms), so the
            // coordinator's index follows the device.
            _ = moved(location, &last_report) => report_tick.reset_immediately(),
            _ = report_tick.tick() => {
                last_report = Instant::now();
                if let Some(dir) = &opts.data_dir {
                    store_daily_used(dir, relay.daily_used());
                }
                let link = meter.measure(&probe, relay, Instant::now());
                let usage: Vec<v1::Usage> = relay.take_usage().into_iter().map(|u| v1::Usage {
                    requester_key: u.requester.0.to_vec(),
                    bytes_up: u.bytes_up,
                    bytes_down: u.bytes_down,
                    flows: u.flows,
                }).collect();
                if !usage.is_empty() {
                    unacked.push(usage);
                }
                let report = v1::StateReport {
                    location: Some(location.borrow_and_update().to_wire()),
                    link: Some(cv::link_to_wire(&link)),
                    active_requesters: relay.active_requesters(),
                    usage: vec![],
                    batches: unacked.to_send(),
                };
                if tx.send(up(Up::Report(report))).await.is_err() {
                    return Err(AgentError::Other("stream closed".into()));
                }
            }
        }
    }
}
