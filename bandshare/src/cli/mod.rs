//! Flags of every subcommand (DESIGN.md's CLI contract), their checks,
//! and their conversion into the crates' options; [`run`] does the work.

use anyhow::Context;
use bandshare_agent::client;
use bandshare_agent::location::{self, ConditionSpec, LocationSpec};
use bandshare_agent::requester::Forward;
use bandshare_agent::requester::own_link::Via;
use bandshare_core::{EgressRule, NetworkType, Position, Scene, Security, ServiceSet};
use clap::{Args, Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "bandshare",
    version,
    about = "Share network connections between nearby devices, on demand.",
    long_about = "Share network connections between nearby devices, on demand.\n\n\
A coordinator (`server`) knows where willing sharers are; a sharer (`share`) offers \
its uplink through a QUIC relay; a requester (`connect`) asks for offers near it, \
keeps a pool of sharers and serves local apps through SOCKS5 / HTTP CONNECT.\n\n\
Try `bandshare demo` to see it all in one process. Logs: RUST_LOG=debug."
)]
pub struct Cli {
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the coordinator: matches requesters to nearby sharers.
    Server(ServerArgs),
    /// Offer this device's network to nearby requesters.
    Share(ShareArgs),
    /// Get a network through nearby sharers; serve it locally as SOCKS5/HTTP CONNECT.
    Connect(ConnectArgs),
    /// Ask once for offers near a place and print them.
    Offers(OffersArgs),
    /// The QoS map: import recorded traces, predict weak zones along a
    /// track, export the published cells.
    #[command(subcommand)]
    Qos(qos::QosCommand),
    /// Run a coordinator, five sharers, a web target and a requester in one process.
    Demo,
    /// Operate a coordinator's store: list, approve and revoke devices, rotate
    /// the ticket-signing key. Works while the server runs; it applies
    /// changes within a second (revocations reach sharers at once).
    Admin(AdminArgs),
    /// Measure bandshare side by side with what you would build instead.
    #[cfg(feature = "bench")]
    #[command(subcommand)]
    Bench(crate::bench::BenchCommand),
}

#[derive(Args, Debug)]
struct AdminArgs {
    /// The server's data directory [default: $XDG_DATA_HOME/bandshare/server].
    #[arg(long, global = true)]
    data: Option<PathBuf>,
    /// A scaled-out service: act on its Redis Cluster (comma-separated
    /// redis://HOST:PORT, as `server --redis`) instead of a data directory;
    /// every coordinator applies the change within a second.
    #[arg(long, global = true, value_name = "URL,...")]
    redis: Option<String>,
    #[command(subcommand)]
    cmd: AdminCommand,
}

#[derive(Subcommand, Debug)]
enum AdminCommand {
    /// Devices seen or decided, with their state (pending, approved, revoked).
    List,
    /// Let a device use the coordinator (needed with `server --enroll approve`).
    Approve {
        /// Its key: at least 8 leading hex digits from `admin list`, or all 64.
        key: String,
    },
    /// Refuse a device from now on; sharers drop its connections within seconds.
    Revoke {
        /// Its key: at least 8 leading hex digits from `admin list`, or all 64.
        key: String,
    },
    /// Print the pin of the self-signed TLS certificate (`server --tls`).
    Pin,
    /// Make a new ticket-signing key. Sharers learn it before it signs; the
    /// old key keeps verifying until its tickets have expired.
    RotateKey,
}

#[derive(Args, Debug)]
struct ServerArgs {
    /// gRPC address for sharers and requesters.
    #[arg(long, default_value = "127.0.0.1:7400")]
    listen: SocketAddr,
    /// HTTP address for the dashboard (GET /), GET /status, GET /metrics
    /// and GET /healthz; anything but loopback needs --http-token-file.
    #[arg(long, default_value = "127.0.0.1:7480")]
    http: SocketAddr,
    /// Directory of the SQLite store [default: $XDG_DATA_HOME/bandshare/server].
    #[arg(long)]
    data: Option<PathBuf>,
    /// File holding the bearer token the HTTP side (dashboard, /status,
    /// /metrics) requires (as [http] token; at least 16 characters).
    /// Needed when --http is not a loopback address.
    #[arg(long, value_name = "FILE")]
    http_token_file: Option<PathBuf>,
    /// TOML configuration (match radius, fan-out, deadlines, tickets).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Who may use this coordinator: open (trust on first use) or approve
    /// (only devices approved with `bandshare admin approve`) [default: the
    /// config's server.enroll, else open].
    #[arg(long, value_parser = parsed::<bandshare_coordinator::config::Enroll>)]
    enroll: Option<bandshare_coordinator::config::Enroll>,
    /// Serve gRPC over TLS with a certificate made on first start and kept
    /// in --data (agents pin it: --server https://ADDR --server-pin PIN).
    #[arg(long)]
    tls: bool,
    /// Serve gRPC over TLS with this certificate (PEM; needs --tls-key).
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Scale out: the nodes of a Redis Cluster (comma-separated
    /// redis://HOST:PORT). Every coordinator started with the same cluster
    /// is one service: each offers the others' sharers and routes access
    /// requests to them [default: the config's server.redis; none: this
    /// coordinator on its own, SQLite only].
    #[arg(long, value_name = "URL,...")]
    redis: Option<String>,
}

/// Where the device is (state by share, connect and offers).
#[derive(Args, Debug, Clone)]
struct LocationArgs {
    /// Position: LAT,LON[,ALT] in degrees (and metres); the fallback when
    /// live sources are given.
    #[arg(long, value_name = "LAT,LON[,ALT]", value_parser = parsed::<Position>, allow_hyphen_values = true)]
    at: Option<Position>,
    /// Follow live fixes from gpsd at HOST:PORT (e.g. 127.0.0.1:2947).
    #[arg(long, value_name = "HOST:PORT")]
    gpsd: Option<String>,
    /// Scan for Wi-Fi access points on this interface (nmcli, else iw).
    #[arg(long, value_name = "IFACE")]
    wifi_scan: Option<String>,
    /// Play a recorded track as the live position: GPX 1.1, or CSV with the
    /// header time,lat,lon (unix seconds; empty lat/lon: no fix, as in a
    /// tunnel). Each fix plays at its own time, shifted so the first one is
    /// now (or at --replay-start).
    #[arg(long, value_name = "FILE")]
    replay_track: Option<PathBuf>,
    /// Unix time at which the first point of --replay-track plays (to play
    /// several devices in step).
    #[arg(long, value_name = "UNIX_S", requires = "replay_track", value_parser = parse_unix_s)]
    replay_start: Option<f64>,
    /// Scene hint: outdoor, indoor, vehicle (subway-car), station (subway-hall).
    #[arg(long, value_parser = parsed::<Scene>)]
    scene: Option<Scene>,
    /// Heading in degrees, 0 = north, clockwise.
    #[arg(long, value_parser = location::parse_heading)]
    heading: Option<f64>,
    /// Speed in metres per second.
    #[arg(long, value_parser = location::parse_speed)]
    speed: Option<f64>,
    /// Wi-Fi scan: BSSID=RSSI,... (e.g. aa:bb:cc:dd:ee:ff=-60), repeatable.
    #[arg(long, value_name = "BSSID=RSSI,...", value_delimiter = ',', value_parser = parse_wifi_one, allow_hyphen_values = true)]
    wifi: Vec<(String, i32)>,
    /// Serving cell id.
    #[arg(long)]
    cell: Option<String>,
    /// BSSID of the Wi-Fi router this device is associated with.
    #[arg(long, value_parser = parse_router)]
    router: Option<String>,
    /// Accuracy of --at in metres (poor accuracy suggests indoors).
    #[arg(long, value_parser = parsed::<f64>)]
    accuracy: Option<f64>,
}

fn parse_hostport(s: &str) -> Result<String, String> {
    match s.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {
            Ok(s.to_string())
        }
        _ => Err(format!("{s:?} is not HOST:PORT (e.g. example.net:443)")),
    }
}

/// A `--probe`: `HOST:PORT` or the word `gateway`.
fn parse_probe(s: &str) -> Result<String, String> {
    if s == bandshare_agent::requester::direct::GATEWAY {
        return Ok(s.to_string());
    }
    parse_hostport(s).map_err(|e| format!("{e}, or `gateway`"))
}

/// One `BSSID=RSSI` of `--wifi` (clap splits the list at commas).
fn parse_wifi_one(s: &str) -> Result<(String, i32), String> {
    location::parse_wifi(s)
        .map_err(|e| e.to_string())?
        .pop()
        .ok_or_else(|| format!("expected BSSID=RSSI, got {s:?}"))
}

/// A number within `lo..=hi` (`unit` names it in the error).
fn bounded(s: &str, lo: f64, hi: f64, unit: &str) -> Result<f64, String> {
    let v: f64 = parsed(s)?;
    if !(lo..=hi).contains(&v) {
        return Err(format!("{s} is not between {lo} and {hi}{unit}"));
    }
    Ok(v)
}

/// `--stall-grace`: 1–10 s (the QUIC connection itself ends after 10 s of
/// silence).
fn parse_grace(s: &str) -> Result<f64, String> {
    bounded(s, 1.0, 10.0, " seconds")
}

/// A unix time in seconds (after 2001, before 2100).
fn parse_unix_s(s: &str) -> Result<f64, String> {
    bounded(s, 1e9, 4.1e9, " (unix seconds)")
}

/// `--direct-hold`: 0–3600 s.
fn parse_hold(s: &str) -> Result<f64, String> {
    bounded(s, 0.0, 3600.0, " seconds")
}

/// A fraction 0..=1.
fn parse_fraction(s: &str) -> Result<f64, String> {
    bounded(s, 0.0, 1.0, "")
}

/// A service list that names at least one service.
fn some_services(s: &str) -> Result<ServiceSet, String> {
    let set: ServiceSet = parsed(s)?;
    if set.is_empty() {
        return Err("no service given: name at least one of hotspot, wifi6, 5ghz, prose".into());
    }
    Ok(set)
}

/// An address requesters can dial: a real IP and a port.
fn dialable(s: &str) -> Result<SocketAddr, String> {
    let a: SocketAddr = parsed(s)?;
    if a.ip().is_unspecified() || a.port() == 0 {
        return Err(format!(
            "{a} cannot be dialled: give the address and port requesters reach the relay at (e.g. 192.0.2.7:4433)"
        ));
    }
    Ok(a)
}

fn parse_router(s: &str) -> Result<String, String> {
    bandshare_core::radio::parse_bssid(s)
        .map(bandshare_core::radio::format_bssid)
        .ok_or_else(|| format!("expected a BSSID like aa:bb:cc:dd:ee:ff, got {s:?}"))
}

impl LocationArgs {
    /// The live sources; errors when there is nothing to locate by.
    fn sources(&self) -> anyhow::Result<bandshare_agent::location::Sources> {
        let any = self.at.is_some()
            || self.gpsd.is_some()
            || self.replay_track.is_some()
            || !self.wifi.is_empty()
            || self.wifi_scan.is_some()
            || self.cell.is_some()
            || self.router.is_some();
        anyhow::ensure!(
            any,
            "no location: give --at LAT,LON, --gpsd HOST:PORT, --replay-track FILE, --wifi, --wifi-scan IFACE, --cell or --router"
        );
        let replay = match &self.replay_track {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read --replay-track {}", path.display()))?;
                let points = bandshare_qos::track::parse_track(&text)
                    .with_context(|| format!("--replay-track {}", path.display()))?;
                anyhow::ensure!(
                    points.iter().any(|p| p.pos.is_some()),
                    "--replay-track {} has no point with a position",
                    path.display()
                );
                Some(bandshare_agent::location::replay::Replay {
                    points,
                    start: self
                        .replay_start
                        .unwrap_or_else(|| bandshare_core::clock::unix_now() as f64),
                })
            }
            None => None,
        };
        Ok(bandshare_agent::location::Sources {
            gpsd: self.gpsd.clone(),
            wifi_scan: self.wifi_scan.clone(),
            replay,
        })
    }

    fn spec(&self) -> LocationSpec {
        LocationSpec {
            at: self.at,
            scene: self.scene,
            heading_deg: self.heading,
            speed_mps: self.speed,
            wifi: self.wifi.clone(),
            cell: self.cell.clone(),
            router: self.router.clone(),
            accuracy_m: self.accuracy,
        }
    }
}

/// Where the coordinator is: `--server` and, over TLS, `--server-pin`.
#[derive(Args, Debug, Clone)]
struct ServerAddr {
    /// Coordinator address, e.g. http://127.0.0.1:7400 (or https://… with
    /// --server-pin); several coordinators of one service (server --redis)
    /// comma-separated: tried in a random order, the next on failure.
    #[arg(long)]
    server: String,
    /// SHA-256 of the coordinator's TLS certificate, 64 hex digits, for an
    /// https:// server (printed by `bandshare server --tls` and `bandshare admin pin`).
    #[arg(long, value_name = "HEX")]
    server_pin: Option<String>,
}

impl ServerAddr {
    /// The address, checked once: a bad one is a clear error before
    /// anything starts.
    fn url(&self) -> Result<client::ServerUrl, client::CoordinatorError> {
        client::ServerUrl::parse(&client::with_pin(&self.server, self.server_pin.as_deref()))
    }
}

/// `connect`'s coordinator: as [`ServerAddr`], but not needed for
/// `--tun NAME --cleanup`.
#[derive(Args, Debug, Clone)]
struct ConnectServer {
    /// Coordinator address, e.g. http://127.0.0.1:7400 (or https://… with
    /// --server-pin); several coordinators of one service (server --redis)
    /// comma-separated: tried in a random order, the next on failure.
    #[arg(long, required_unless_present = "cleanup")]
    server: Option<String>,
    /// SHA-256 of the coordinator's TLS certificate, 64 hex digits, for an
    /// https:// server (printed by `bandshare server --tls` and `bandshare admin pin`).
    #[arg(long, value_name = "HEX")]
    server_pin: Option<String>,
}

impl ConnectServer {
    fn url(&self) -> anyhow::Result<client::ServerUrl> {
        let server = self
            .server
            .as_deref()
            .ok_or_else(|| anyhow::anyhow!("--server is required"))?;
        Ok(ServerAddr {
            server: server.to_string(),
            server_pin: self.server_pin.clone(),
        }
        .url()?)
    }
}

#[derive(Args, Debug)]
struct ShareArgs {
    #[command(flatten)]
    server: ServerAddr,
    /// Name shown to requesters.
    #[arg(long)]
    name: String,
    #[command(flatten)]
    location: LocationArgs,
    /// Services offered: hotspot, wifi6, 5ghz, prose (comma-separated).
    #[arg(long, default_value = "hotspot", value_parser = some_services)]
    services: ServiceSet,
    /// Uplink network type: 5g, 4g or wifi.
    #[arg(long, value_parser = parsed::<NetworkType>)]
    network: Option<NetworkType>,
    /// How the hotspot's Wi-Fi is secured: open, wpa2 or wpa3 (requesters
    /// may ask for at least one).
    #[arg(long, value_parser = parsed::<Security>)]
    security: Option<Security>,
    /// UDP address of the QUIC relay.
    #[arg(long, default_value = "0.0.0.0:0")]
    relay: SocketAddr,
    /// Address requesters dial [default: the relay's, or the address used toward the coordinator].
    #[arg(long, value_parser = dialable)]
    advertise: Option<SocketAddr>,
    /// Open a destination the default policy denies: CIDR[:PORT], repeatable.
    #[arg(long = "allow-egress", value_name = "CIDR[:PORT]", value_parser = parsed::<EgressRule>)]
    allow_egress: Vec<EgressRule>,
    /// Cap what this sharer offers, in Mbit/s (link state is measured, this only caps).
    #[arg(long)]
    bandwidth_mbps: Option<u64>,
    /// Serve at most this many requesters at once (0 = no limit).
    #[arg(long, default_value_t = 0)]
    max_requesters: u32,
    /// Decline every access request (stay visible but serve nobody).
    #[arg(long)]
    decline: bool,
    /// Consent policy file (TOML): max_requesters, daily_cap, schedule,
    /// min_battery_pct, allowed_services, [per_requester] rate, burst,
    /// daily_quota. `--max-requesters` and `--decline` override it.
    #[arg(long, value_name = "FILE")]
    consent: Option<PathBuf>,
    /// Directory of batteries, sysfs layout.
    #[arg(long, value_name = "DIR", default_value = bandshare_agent::sharer::uplink::POWER_SUPPLY)]
    power_supply: PathBuf,
    /// Interface whose counters measure the uplink [default: the default route's].
    #[arg(long)]
    uplink: Option<String>,
    /// Check the uplink by timing a TCP connect to this HOST:PORT across it
    /// every 250 ms; its loss, or its failing, reaches connected requesters
    /// in their probe answers so they move to another sharer.
    #[arg(long, value_name = "HOST:PORT", value_parser = parse_hostport)]
    uplink_check: Option<String>,
    /// Serve GET /status (JSON) and GET /metrics (Prometheus) here, e.g.
    /// 127.0.0.1:7701: what is relayed, to how many requesters, what was
    /// refused and why, the uplink.
    #[arg(long, value_name = "ADDR")]
    control: Option<SocketAddr>,
    /// Directory of this device's key [default: $XDG_DATA_HOME/bandshare/share-NAME].
    #[arg(long)]
    data: Option<PathBuf>,
}

#[derive(Args, Debug, Clone)]
struct WantArgs {
    /// Services wanted: hotspot, wifi6, 5ghz, prose (comma-separated).
    #[arg(long, value_parser = some_services)]
    want: Option<ServiceSet>,
    /// Uplink network type wanted: 5g, 4g or wifi.
    #[arg(long, value_parser = parsed::<NetworkType>)]
    network: Option<NetworkType>,
    /// Weakest hotspot security accepted: open, wpa2 or wpa3 (wpa2 also
    /// takes wpa3; sharers that declare none are left out).
    #[arg(long, value_parser = parsed::<Security>)]
    security: Option<Security>,
}

impl WantArgs {
    fn spec(&self) -> ConditionSpec {
        ConditionSpec {
            want: self.want.unwrap_or_default(),
            network: self.network,
            security: self.security,
            max_offers: 0,
        }
    }
}

#[derive(Args, Debug)]
struct ConnectArgs {
    #[command(flatten)]
    server: ConnectServer,
    #[command(flatten)]
    location: LocationArgs,
    #[command(flatten)]
    want: WantArgs,
    /// Where new flows go: auto (the own link while it is healthy, sharers
    /// the moment it is not, back after --direct-hold), direct (never
    /// sharers) or pool (always sharers, e.g. when the data plan is used up).
    #[arg(long, default_value = "auto", value_parser = parsed::<Via>)]
    via: Via,
    /// Sharers kept connected at once while new flows go through them.
    #[arg(long, default_value_t = 3)]
    pool: usize,
    /// Sharers kept warm (connected, with a ticket, probed) while new flows
    /// go direct, so the first move costs no share request.
    #[arg(long, default_value_t = 1)]
    standby: usize,
    /// QUIC connections each sharer gets besides the first, flows taking
    /// turns over them: parallel downloads then use more than one core on
    /// both devices. They join the first connection's ticket and quota,
    /// and close with it; 0 keeps one connection per sharer.
    #[arg(long, default_value_t = bandshare_agent::requester::pool::LANES,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(0..=3))]
    lanes: usize,
    /// HOST:PORT probed out of the own link with timed TCP connects,
    /// repeatable; `gateway` is the own link's default gateway (on TCP 53
    /// or 80, if it answers). The coordinator is probed too when it is
    /// reached over the own link.
    #[arg(long, value_name = "HOST:PORT|gateway", value_parser = parse_probe)]
    probe: Vec<String>,
    /// Seconds the own link must be healthy before new flows return to it
    /// (doubled, up to 300, each time it relapses within a minute of
    /// recovering; back to this after a healthy minute). Where the
    /// coordinator is reached over the own link, a return also waits for a
    /// trial download from it: 16 KiB at 500 kbit/s or better (twice the weak threshold).
    #[arg(long, value_name = "SECONDS", default_value_t = 10.0, value_parser = parse_hold)]
    direct_hold: f64,
    /// Mean probe RTT above which the own link is degraded, milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 500)]
    direct_max_rtt_ms: u64,
    /// Probe loss (0 to 1, over the last 10 probes) above which the own
    /// link is degraded; 3 lost in a row always degrade it.
    #[arg(long, value_name = "FRACTION", default_value_t = 0.2, value_parser = parse_fraction)]
    direct_max_loss: f64,
    /// Pre-connect: with --via auto, new flows move to the pool this many
    /// seconds before a weak zone the coordinator's QoS map predicts along
    /// this device's track. On every path the own link's quality, and what
    /// each sharer carried, is reported to the map.
    #[arg(long, value_name = "SECONDS", default_value_t = bandshare_qos::eval::READY_LEAD_S,
          value_parser = parse_hold)]
    predict_lead: f64,
    /// Pre-connect: new flows stay on the pool this many seconds after the
    /// last warning of a predicted weak zone (the end of a zone is less
    /// certain than its start); then they go back once the own link is
    /// healthy and a trial download from it passed.
    #[arg(long, value_name = "SECONDS", default_value_t = bandshare_qos::eval::READY_TAIL_S,
          value_parser = parse_hold)]
    predict_tail: f64,
    /// Never ask for predictions and never report link quality.
    #[arg(long)]
    no_predict: bool,
    /// How the active sharer is chosen: best (link state, probes, distance),
    /// lowest-rtt or nearest.
    #[arg(long, default_value = "best", value_parser = parsed::<bandshare_agent::requester::select::Strategy>)]
    strategy: bandshare_agent::requester::select::Strategy,
    /// Local SOCKS5 and HTTP CONNECT proxy address.
    #[arg(long, default_value = "127.0.0.1:1080")]
    socks: SocketAddr,
    /// Fixed port forward LOCAL=HOST:PORT, repeatable.
    #[arg(long, value_name = "LOCAL=HOST:PORT")]
    forward: Vec<Forward>,
    /// Serve GET /status (path, own link and pool as JSON) and GET /metrics
    /// (Prometheus) on this address.
    #[arg(long)]
    control: Option<SocketAddr>,
    /// Seconds that flows already open through a sharer that went silent
    /// wait for it (new flows move at once), 1 to 10.
    #[arg(long, value_name = "SECONDS", default_value_t = 10.0, value_parser = parse_grace)]
    stall_grace: f64,
    /// Directory of this device's key [default: $XDG_DATA_HOME/bandshare/requester].
    #[arg(long)]
    data: Option<PathBuf>,
    /// Whole-device mode (Linux, CAP_NET_ADMIN): create the TUN device NAME
    /// and route the default IPv4 and IPv6 routes through it, so every app
    /// is carried without a proxy setting; removed again on exit.
    #[arg(long, value_name = "NAME")]
    tun: Option<String>,
    /// With --tun NAME: remove what an earlier run left (rules, routes, the
    /// device) and exit.
    #[arg(long, requires = "tun")]
    cleanup: bool,
}

#[derive(Args, Debug)]
struct OffersArgs {
    #[command(flatten)]
    server: ServerAddr,
    #[command(flatten)]
    location: LocationArgs,
    #[command(flatten)]
    want: WantArgs,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Also say why each nearby sharer was or was not offered.
    #[arg(long)]
    explain: bool,
    /// Ask as the device whose key is in this directory (the one `connect`
    /// uses, so an approved requester is served) [default:
    /// $XDG_DATA_HOME/bandshare/requester; a throwaway key when absent].
    #[arg(long)]
    data: Option<PathBuf>,
}

/// Parses a flag with the type's own `FromStr`, whose error names what was
/// expected (clap puts it after the flag's name).
fn parsed<T: std::str::FromStr>(s: &str) -> Result<T, String>
where
    T::Err: std::fmt::Display,
{
    s.parse().map_err(|e: T::Err| e.to_string())
}

mod qos;
mod run;
pub use run::run;

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn clap_definitions_are_consistent() {
        Cli::command().debug_assert();
    }

    /// `connect --help` states the trial's rate as the requester asks it.
    #[test]
    fn connect_help_gives_the_trial_rate_in_force() {
        let mut cli = Cli::command();
        let connect = cli
            .find_subcommand_mut("connect")
            .expect("connect")
            .render_long_help()
            .to_string();
        let rate = format!(
            "{:.0} kbit/s",
            bandshare_agent::requester::direct::TRIAL_KBPS
        );
        assert!(connect.contains(&rate), "{rate} not in:\n{connect}");
    }
}
