//! bandshare on loopback in one process: a coordinator on port 0 with a
//! temporary data directory, sharers at chosen offsets from a centre, a
//! requester, a local HTTP target and a UDP relay that can cut a link; and
//! real network namespaces ([`netns`]) for what loopback cannot show. Every
//! part is the real component; nothing here is a mock. `bandshare demo` and
//! the benchmarks run on it, and the tests (through `bandshare-testkit`).

pub mod gateway;
pub mod http;
pub mod netns;
pub mod redis_cluster;
pub mod udp;

use anyhow::Context;
use bandshare_agent::client::ServerUrl;
use bandshare_agent::location::{ConditionSpec, LocationSpec};
use bandshare_agent::requester::{Requester, RequesterOptions};
use bandshare_agent::sharer::consent::Consent;
use bandshare_agent::sharer::{Sharer, SharerOptions};
use bandshare_agent::shutdown::Trigger;
use bandshare_agent::{Shutdown, identity};
use bandshare_coordinator::{Config, State};
use bandshare_core::{DeviceKey, EgressPolicy, EgressRule, NetworkType, Position, ServiceSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use http::HttpTarget;

/// Beijing, where the demo happens.
pub const CENTER: (f64, f64) = (39.9042, 116.4074);

pub fn center() -> Position {
    Position {
        lat: CENTER.0,
        lon: CENTER.1,
        alt: None,
    }
}

/// The default configuration without the privacy offset, for tests that
/// check geometry to the metre (the offset shows each sharer 15–25 m from
/// where it is on purpose; `tests/privacy.rs` tests it).
pub fn exact_config() -> Config {
    let mut c = Config::default();
    c.privacy.fuzz_min_m = 0.0;
    c.privacy.fuzz_max_m = 0.0;
    c
}

/// Logs to stderr at `RUST_LOG` (default: warnings), once per process.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .try_init();
}

/// Polls `f` every 20 ms until it holds or `timeout` passes.
pub async fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub struct CoordinatorNode {
    pub url: ServerUrl,
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub state: Arc<State>,
    pub data_dir: tempfile::TempDir,
    trigger: Trigger,
    task: tokio::task::JoinHandle<()>,
}

impl CoordinatorNode {
    pub async fn start(config: Config) -> anyhow::Result<CoordinatorNode> {
        CoordinatorNode::start_at(
            config,
            SocketAddr::from(([127, 0, 0, 1], 0)),
            tempfile::tempdir()?,
        )
        .await
    }

    /// Starts on `grpc` with the store in `data_dir` (to start one again
    /// where a stopped one was: same address, same keys and ledger).
    pub async fn start_at(
        config: Config,
        grpc: SocketAddr,
        data_dir: tempfile::TempDir,
    ) -> anyhow::Result<CoordinatorNode> {
        let store = bandshare_store::Store::open(data_dir.path())?;
        let state = State::new(config, store)?;
        CoordinatorNode::serve(state, grpc, data_dir).await
    }

    /// One of several coordinators on the Redis Cluster at `redis` (one
    /// service: see `bandshare_coordinator::cluster`).
    pub async fn start_clustered(
        config: Config,
        redis: &[String],
    ) -> anyhow::Result<CoordinatorNode> {
        let data_dir = tempfile::tempdir()?;
        let store = bandshare_store::Store::open(data_dir.path())?;
        let cluster = bandshare_coordinator::cluster::Cluster::connect(redis).await?;
        let state = State::new_clustered(config, store, cluster).await?;
        CoordinatorNode::serve(state, SocketAddr::from(([127, 0, 0, 1], 0)), data_dir).await
    }

    async fn serve(
        state: Arc<State>,
        grpc: SocketAddr,
        data_dir: tempfile::TempDir,
    ) -> anyhow::Result<CoordinatorNode> {
        let grpc = tokio::net::TcpListener::bind(grpc).await?;
        let http = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let (grpc_addr, http_addr) = (grpc.local_addr()?, http.local_addr()?);
        let (trigger, shutdown) = Shutdown::new();
        let s = state.clone();
        let task = tokio::spawn(async move {
            if let Err(e) = bandshare_coordinator::run(s, grpc, Some(http), shutdown.wait()).await {
                tracing::error!(error = %e, "coordinator failed");
            }
        });
        Ok(CoordinatorNode {
            url: ServerUrl::parse(&grpc_addr.to_string())?,
            grpc_addr,
            http_addr,
            state,
            data_dir,
            trigger,
            task,
        })
    }

    pub fn online(&self) -> usize {
        self.state.registry().len()
    }

    pub async fn stop(self) {
        self.trigger.fire();
        let _ = self.task.await;
    }

    /// Stops it, giving back what [`CoordinatorNode::start_at`] needs to
    /// start it again: its configuration, address and data directory.
    pub async fn stop_keeping(self) -> (Config, SocketAddr, tempfile::TempDir) {
        self.trigger.fire();
        let _ = self.task.await;
        (self.state.config().clone(), self.grpc_addr, self.data_dir)
    }
}

/// How to place and equip one test sharer.
#[derive(Clone, Debug)]
pub struct SharerSpec {
    pub name: String,
    /// Metres east and north of the centre.
    pub east_m: f64,
    pub north_m: f64,
    pub services: ServiceSet,
    pub network: Option<NetworkType>,
    pub security: Option<bandshare_core::Security>,
    pub allow: Vec<EgressRule>,
    pub consent: Consent,
    pub alt: Option<f64>,
    /// (speed m/s, heading degrees)
    pub motion: Option<(f64, f64)>,
    pub wifi: Vec<(String, i32)>,
    pub cell: Option<String>,
    pub router: Option<String>,
    /// Follow this gpsd instead of a fixed position.
    pub gpsd: Option<String>,
    /// A sysfs-like directory of batteries (default: the machine's).
    pub power_supply: Option<PathBuf>,
    /// Where the sharer keeps today's relayed bytes.
    pub data_dir: Option<PathBuf>,
    /// Put a [`udp::UdpRelay`] between requesters and this sharer's relay.
    pub behind_udp_relay: bool,
    /// `share --uplink-check HOST:PORT`.
    pub uplink_check: Option<String>,
    /// Serve `/status` and `/metrics` on a loopback port (`share --control`).
    pub control: bool,
}

impl SharerSpec {
    pub fn uplink_check(mut self, addr: &str) -> Self {
        self.uplink_check = Some(addr.into());
        self
    }

    pub fn gpsd(mut self, addr: &str) -> Self {
        self.gpsd = Some(addr.into());
        self
    }

    pub fn alt(mut self, m: f64) -> Self {
        self.alt = Some(m);
        self
    }

    pub fn moving(mut self, speed_mps: f64, heading_deg: f64) -> Self {
        self.motion = Some((speed_mps, heading_deg));
        self
    }

    pub fn wifi(mut self, obs: &[(&str, i32)]) -> Self {
        self.wifi = obs.iter().map(|(b, r)| (b.to_string(), *r)).collect();
        self
    }

    pub fn cell(mut self, id: &str) -> Self {
        self.cell = Some(id.into());
        self
    }

    pub fn router(mut self, bssid: &str) -> Self {
        self.router = Some(bssid.into());
        self
    }

    /// Where this sharer says it is.
    pub fn location(&self) -> LocationSpec {
        let mut at = center().offset_m(self.east_m, self.north_m);
        at.alt = self.alt;
        LocationSpec {
            at: if self.gpsd.is_some() { None } else { Some(at) },
            speed_mps: self.motion.map(|m| m.0),
            heading_deg: self.motion.map(|m| m.1),
            wifi: self.wifi.clone(),
            cell: self.cell.clone(),
            router: self.router.clone(),
            ..Default::default()
        }
    }

    pub fn new(name: &str, east_m: f64, north_m: f64) -> SharerSpec {
        SharerSpec {
            name: name.into(),
            east_m,
            north_m,
            services: "hotspot".parse().unwrap_or_default(),
            network: Some(NetworkType::FiveG),
            security: Some(bandshare_core::Security::Wpa2),
            allow: vec![],
            consent: Consent::default(),
            alt: None,
            motion: None,
            wifi: vec![],
            cell: None,
            router: None,
            gpsd: None,
            power_supply: None,
            data_dir: None,
            behind_udp_relay: false,
            uplink_check: None,
            control: false,
        }
    }

    /// With `/status` and `/metrics` on a loopback port.
    pub fn control(mut self) -> Self {
        self.control = true;
        self
    }

    /// Requesters reach this sharer through a UDP relay the test can cut.
    pub fn behind_udp_relay(mut self) -> Self {
        self.behind_udp_relay = true;
        self
    }

    pub fn services(mut self, s: &str) -> Self {
        self.services = s.parse().unwrap_or_default();
        self
    }

    pub fn network(mut self, n: NetworkType) -> Self {
        self.network = Some(n);
        self
    }

    pub fn security(mut self, s: bandshare_core::Security) -> Self {
        self.security = Some(s);
        self
    }

    pub fn allow(mut self, rule: EgressRule) -> Self {
        self.allow.push(rule);
        self
    }
}

pub struct SharerNode {
    pub name: String,
    pub key: DeviceKey,
    pub sharer: Sharer,
    /// The UDP relay in front of it, when the spec asked for one.
    pub link: Option<udp::UdpRelay>,
    trigger: Trigger,
}

impl SharerNode {
    pub async fn start(
        coordinator_url: &ServerUrl,
        spec: &SharerSpec,
    ) -> anyhow::Result<SharerNode> {
        let key = identity::generate()?;
        let (trigger, shutdown) = Shutdown::new();
        // With a UDP relay in front, bind the QUIC relay on a known port and
        // advertise the UDP relay's address instead.
        let (relay_listen, link) = if spec.behind_udp_relay {
            let port = std::net::UdpSocket::bind("127.0.0.1:0")?
                .local_addr()?
                .port();
            let listen = SocketAddr::from(([127, 0, 0, 1], port));
            (listen, Some(udp::UdpRelay::start(listen).await?))
        } else {
            ("127.0.0.1:0".parse()?, None)
        };
        let opts = SharerOptions {
            server: coordinator_url.clone(),
            name: spec.name.clone(),
            location: spec.location(),
            sources: bandshare_agent::location::Sources {
                gpsd: spec.gpsd.clone(),
                ..Default::default()
            },
            services: spec.services,
            network: spec.network,
            security: spec.security,
            relay_listen,
            advertise: link.as_ref().map(|l| l.addr),
            egress: EgressPolicy {
                allow: spec.allow.clone(),
                ..Default::default()
            },
            bandwidth_bps: 0,
            consent: spec.consent.clone(),
            uplink: Some("lo".into()),
            uplink_check: spec.uplink_check.clone(),
            power_supply: spec
                .power_supply
                .clone()
                .unwrap_or_else(|| bandshare_agent::sharer::uplink::POWER_SUPPLY.into()),
            data_dir: spec.data_dir.clone(),
            control: spec.control.then(|| SocketAddr::from(([127, 0, 0, 1], 0))),
        };
        let dkey = DeviceKey(key.verifying_key().to_bytes());
        let sharer = Sharer::start(opts, key, shutdown).await?;
        Ok(SharerNode {
            name: spec.name.clone(),
            key: dkey,
            sharer,
            link,
            trigger,
        })
    }

    /// Stops the sharer: its stream ends and its relay closes every tunnel,
    /// as when the process exits.
    pub fn kill(&self) {
        self.trigger.fire();
    }
}

/// A coordinator, sharers and a local HTTP target, all on loopback.
pub struct Cluster {
    pub coordinator: CoordinatorNode,
    pub sharers: Vec<SharerNode>,
    pub target: HttpTarget,
}

impl Cluster {
    /// Starts everything and waits until every sharer is online, with
    /// [`exact_config`]. Specs get an egress rule for the HTTP target added.
    pub async fn start(specs: Vec<SharerSpec>) -> anyhow::Result<Cluster> {
        Cluster::start_with(exact_config(), specs).await
    }

    pub async fn start_with(config: Config, specs: Vec<SharerSpec>) -> anyhow::Result<Cluster> {
        init_tracing();
        let target = HttpTarget::start().await?;
        let coordinator = CoordinatorNode::start(config).await?;
        let rule: EgressRule = format!("{}/32:{}", target.addr.ip(), target.addr.port())
            .parse()
            .context("target rule")?;
        let mut sharers = vec![];
        for s in specs {
            sharers.push(SharerNode::start(&coordinator.url, &s.clone().allow(rule)).await?);
        }
        let n = sharers.len();
        let ok = wait_until(Duration::from_secs(10), || {
            coordinator.online() == n && sharers.iter().all(|s| s.sharer.relay.knows_coordinator())
        })
        .await;
        anyhow::ensure!(
            ok,
            "only {} of {n} sharers came online",
            coordinator.online()
        );
        Ok(Cluster {
            coordinator,
            sharers,
            target,
        })
    }

    pub fn sharer(&self, name: &str) -> Option<&SharerNode> {
        self.sharers.iter().find(|s| s.name == name)
    }

    /// Requester options at the centre with a SOCKS port and status port.
    pub fn requester_options(&self) -> RequesterOptions {
        requester_options(&self.coordinator.url)
    }

    /// One share request with explain, as `bandshare offers --explain` sends it.
    pub async fn ask(
        &self,
        location: LocationSpec,
        conditions: ConditionSpec,
    ) -> anyhow::Result<bandshare_proto::v1::ShareResponse> {
        self.ask_as(&identity::generate()?, location, conditions)
            .await
    }

    /// The same, as the device with `key`.
    pub async fn ask_as(
        &self,
        key: &ed25519_dalek::SigningKey,
        location: LocationSpec,
        conditions: ConditionSpec,
    ) -> anyhow::Result<bandshare_proto::v1::ShareResponse> {
        let ch = bandshare_agent::client::connect(&self.coordinator.url).await?;
        Ok(bandshare_agent::client::share_request(
            ch,
            bandshare_agent::client::share_request_from(key, &location, &conditions, true),
        )
        .await?)
    }

    pub async fn requester(&self, opts: RequesterOptions) -> anyhow::Result<RequesterNode> {
        self.requester_as(opts, identity::generate()?).await
    }

    /// A requester with the device key `key`.
    pub async fn requester_as(
        &self,
        opts: RequesterOptions,
        key: ed25519_dalek::SigningKey,
    ) -> anyhow::Result<RequesterNode> {
        let (trigger, shutdown) = Shutdown::new();
        let requester = Requester::start(opts, key, shutdown).await?;
        Ok(RequesterNode { requester, trigger })
    }
}

/// Requester options for the coordinator(s) at `url`, at the centre, with
/// a SOCKS port and a status port, on the pool path.
pub fn requester_options(url: &bandshare_agent::client::ServerUrl) -> RequesterOptions {
    RequesterOptions {
        server: url.clone(),
        location: LocationSpec {
            at: Some(center()),
            ..Default::default()
        },
        sources: Default::default(),
        conditions: ConditionSpec::default(),
        pool_size: 3,
        strategy: Default::default(),
        socks: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
        forwards: vec![],
        control: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
        stall_grace: bandshare_agent::requester::pool::STALL_GRACE,
        // The pool path: these runs measure and test sharers.
        via: bandshare_agent::requester::own_link::Via::Pool,
        standby: 1,
        lanes: bandshare_agent::requester::pool::LANES,
        probes: vec![],
        own_link: Default::default(),
        predict: None,
    }
}

pub struct RequesterNode {
    pub requester: Requester,
    trigger: Trigger,
}

impl RequesterNode {
    pub fn socks(&self) -> SocketAddr {
        self.requester
            .socks_addr
            .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    pub fn active(&self) -> Option<String> {
        self.requester.pool.status().active
    }

    pub fn stop(&self) {
        self.trigger.fire();
    }
}
