//! `bandshare share`: keeps one stream to the coordinator (reconnecting with
//! backoff and jitter), reports measured link state, answers access requests
//! by its consent policy, and runs the QUIC relay that serves requesters.

pub mod consent;
pub mod control;
mod daily;
mod meter;
mod session;

pub mod uplink;

use crate::location::LocationSpec;
use crate::{AgentError, Shutdown, client};
use bandshare_core::{EgressPolicy, NetworkType, ServiceSet};
use bandshare_proto::v1;
use bandshare_relay::{Relay, RelayHandle, RelayOptions};
use consent::Consent;
use daily::load_daily_used;
use ed25519_dalek::SigningKey;
use session::{Ctx, stream_loop};
use std::net::SocketAddr;
use std::path::PathBuf;
use tracing::{Instrument, info, info_span, warn};

#[derive(Clone, Debug)]
pub struct SharerOptions {
    pub server: crate::client::ServerUrl,
    pub name: String,
    /// The static location (`--at`, `--wifi`, `--cell`); live sources update it.
    pub location: LocationSpec,
    pub sources: crate::location::Sources,
    pub services: ServiceSet,
    pub network: Option<NetworkType>,
    /// How the hotspot's Wi-Fi is secured, when declared.
    pub security: Option<bandshare_core::Security>,
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
    /// Where `/status` and `/metrics` are served, if anywhere.
    pub control: Option<SocketAddr>,
}

/// A started sharer: its relay is bound and serving.
pub struct Sharer {
    pub relay_addr: SocketAddr,
    pub relay: RelayHandle,
    /// Where `/status` and `/metrics` answer, when `control` was given.
    pub control_addr: Option<SocketAddr>,
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
        let url = opts.server.clone();
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
        let control_addr = match opts.control {
            Some(a) => {
                let l = tokio::net::TcpListener::bind(a)
                    .await
                    .map_err(|e| AgentError::Listen(a, e))?;
                let at = l.local_addr().map_err(|e| AgentError::Listen(a, e))?;
                tokio::spawn(control::serve(
                    l,
                    opts.name.clone(),
                    advertise,
                    handle.clone(),
                    shutdown.clone(),
                ));
                Some(at)
            }
            None => None,
        };
        let location =
            crate::location::start(opts.location.clone(), &opts.sources, shutdown.clone());
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
            control_addr,
            unacked,
            task,
        })
    }

    /// Waits until the sharer has stopped: `Err` when the coordinator
    /// refused it for good (the reason is the coordinator's).
    pub async fn join(self) -> Result<(), AgentError> {
        self.task.await?
    }
}

/// The address requesters should dial: the relay's own when specific, else
/// the local address this host uses toward the coordinator (found with a
/// connected UDP socket; nothing is sent).
async fn advertised(relay: SocketAddr, url: &client::ServerUrl) -> SocketAddr {
    if !relay.ip().is_unspecified() {
        return relay;
    }
    let hostport = url.host_port().to_string();
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
