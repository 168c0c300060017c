//! What each subcommand does once its flags are parsed: start the
//! coordinator, a sharer or a requester (each until a signal), run one
//! admin operation or one share request, and the process glue they share
//! (logs, data directories, signals, `listening` lines).

use super::{
    AdminArgs, AdminCommand, Cli, Command, ConnectArgs, OffersArgs, ServerArgs, ShareArgs,
};
use anyhow::Context;
use bandshare_agent::requester::own_link::Thresholds;
use bandshare_agent::requester::{Requester, RequesterOptions};
use bandshare_agent::sharer::consent::Consent;
use bandshare_agent::sharer::{Sharer, SharerOptions};
use bandshare_agent::{Shutdown, client, identity};
use bandshare_core::EgressPolicy;
use std::net::SocketAddr;
use std::path::PathBuf;
use tracing::info;

/// `$XDG_DATA_HOME/bandshare/SUB`, else `~/.local/share/bandshare/SUB`.
/// An empty or relative `XDG_DATA_HOME` counts as unset (the XDG spec).
fn default_data(sub: &str) -> PathBuf {
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from(".bandshare"));
    base.join("bandshare").join(sub)
}

/// One machine-readable line on stdout per bound address, so a caller that
/// passed port 0 learns the port: `listening grpc=127.0.0.1:40123`.
fn listening(what: &str, addr: SocketAddr) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "listening {what}={addr}");
    let _ = out.flush();
}

fn init_logs(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        // The Redis client's own reconnect warnings repeat what the
        // coordinator says once ("Redis unreachable").
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("{default},redis=error")));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
}

/// Resolves on SIGINT or SIGTERM.
async fn signalled() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

fn shutdown_on_signal() -> Shutdown {
    let (trigger, shutdown) = Shutdown::new();
    tokio::spawn(async move {
        signalled().await;
        info!("signal received, shutting down");
        trigger.fire();
    });
    shutdown
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Command::Server(a) => server(a).await,
        Command::Share(a) => share(a).await,
        Command::Connect(a) => connect(a).await,
        Command::Offers(a) => offers(a).await,
        Command::Qos(q) => {
            init_logs("warn");
            super::qos::run(q).await
        }
        Command::Demo => crate::demo::run().await,
        Command::Admin(a) => match a.redis.clone() {
            Some(r) => admin_redis(a, &r).await,
            None => admin(a),
        },
        #[cfg(feature = "bench")]
        Command::Bench(b) => crate::bench::run(b).await,
    }
}

async fn server(a: ServerArgs) -> anyhow::Result<()> {
    init_logs("info");
    let mut config = match &a.config {
        Some(p) => bandshare_coordinator::Config::load(p)?,
        None => bandshare_coordinator::Config::default(),
    };
    if let Some(e) = a.enroll {
        config.enroll = e;
    }
    if let Some(f) = &a.http_token_file {
        let t = std::fs::read_to_string(f)
            .with_context(|| format!("cannot read --http-token-file {}", f.display()))?;
        let t = t.trim();
        anyhow::ensure!(
            t.len() >= 16,
            "--http-token-file {}: the token must be at least 16 characters",
            f.display()
        );
        config.http_token = Some(t.to_string());
    }
    anyhow::ensure!(
        a.http.ip().is_loopback() || config.http_token.is_some(),
        "--http {} is not a loopback address: give --http-token-file FILE (or [http] token in the config) so the dashboard, /status and /metrics need a bearer token",
        a.http
    );
    if let Some(r) = &a.redis {
        config.redis = bandshare_coordinator::config::redis_urls(r.split(','))
            .map_err(|e| anyhow::anyhow!("--redis: {e}"))?;
    }
    // Scale-out: reach the cluster before anything is logged or opened, so
    // a wrong address is one line.
    let cluster = if config.redis.is_empty() {
        None
    } else {
        Some(bandshare_coordinator::cluster::Cluster::connect(&config.redis).await?)
    };
    info!(enroll = ?config.enroll, "enrollment");
    let dir = a.data.unwrap_or_else(|| default_data("server"));
    let store = bandshare_store::Store::open(&dir)?;
    info!(store = %store.path().display(), "store opened");
    let config_has_token = config.http_token.is_some();
    let state = match cluster {
        None => bandshare_coordinator::State::new(config, store)?,
        Some(cluster) => {
            info!(id = cluster.id(), redis = %cluster.urls().join(","), "scale-out: one of the coordinators on this Redis Cluster");
            bandshare_coordinator::State::new_clustered(config, store, cluster).await?
        }
    };
    let tls = match (&a.tls_cert, &a.tls_key) {
        (Some(c), Some(k)) => Some(bandshare_coordinator::tls::from_pem(c, k)?),
        _ if a.tls => Some(bandshare_coordinator::tls::self_signed(&dir)?),
        _ => None,
    };
    let grpc = tokio::net::TcpListener::bind(a.listen)
        .await
        .with_context(|| format!("cannot listen on {}", a.listen))?;
    let http = tokio::net::TcpListener::bind(a.http)
        .await
        .with_context(|| format!("cannot listen on {}", a.http))?;
    let grpc_addr = grpc.local_addr().context("gRPC listener")?;
    let http_addr = http.local_addr().context("HTTP listener")?;
    listening("grpc", grpc_addr);
    listening("http", http_addr);
    out!(
        "dashboard: http://{http_addr}/{}   metrics: http://{http_addr}/metrics",
        if config_has_token { "?token=…" } else { "" }
    );
    match &tls {
        Some(t) => info!(
            grpc = %grpc_addr,
            http = %http_addr,
            pin = %t.pin_hex(),
            "bandshare coordinator starting with TLS: agents use --server https://{} --server-pin {}",
            grpc_addr,
            t.pin_hex()
        ),
        None => {
            info!(grpc = %grpc_addr, http = %http_addr, "bandshare coordinator starting (plaintext gRPC; --tls to encrypt)")
        }
    }
    bandshare_coordinator::run_with(state, grpc, Some(http), tls, shutdown_on_signal().wait())
        .await?;
    Ok(())
}

/// Prints the device table of `admin list`.
fn print_devices(rows: &[bandshare_store::DeviceRow], now: u64) {
    out!(
        "{:<64}  {:<9}  {:<9}  {:<8}  name",
        "key",
        "role",
        "state",
        "seen"
    );
    for d in rows {
        let state = d.decision.map_or("pending", |d| d.as_str());
        let seen = if d.last_seen == 0 {
            "never".to_string()
        } else {
            format!("{}s ago", now.saturating_sub(d.last_seen))
        };
        out!(
            "{}  {:<9}  {:<9}  {:<8}  {}",
            d.key,
            d.role,
            state,
            seen,
            bandshare_core::name::printable(&d.name)
        );
    }
}

/// `admin --redis …`: the same commands on a scaled-out service's Redis.
async fn admin_redis(a: AdminArgs, redis: &str) -> anyhow::Result<()> {
    use bandshare_store::Decision;
    let urls = bandshare_coordinator::config::redis_urls(redis.split(','))
        .map_err(|e| anyhow::anyhow!("--redis: {e}"))?;
    let c = bandshare_coordinator::cluster::Cluster::connect(&urls).await?;
    let now = bandshare_core::clock::unix_now();
    let find = |rows: &[bandshare_store::DeviceRow],
                prefix: &str|
     -> anyhow::Result<bandshare_core::DeviceKey> {
        let p = prefix.trim().to_ascii_lowercase();
        anyhow::ensure!(
            p.len() >= 8,
            "give at least 8 hex digits of the key (from `admin list`)"
        );
        let found: Vec<_> = rows
            .iter()
            .filter(|d| d.key.to_string().starts_with(&p))
            .collect();
        match found.as_slice() {
            [one] => Ok(one.key),
            [] => anyhow::bail!("no device with a key starting {p}"),
            many => anyhow::bail!(
                "{} devices have keys starting {p}: give more digits",
                many.len()
            ),
        }
    };
    match a.cmd {
        AdminCommand::List => print_devices(&c.devices().await?, now),
        AdminCommand::Approve { key } => {
            let k = find(&c.devices().await?, &key)?;
            c.decide(&k, Decision::Approved).await?;
            out!("approved {k} (every coordinator of the service within a second)");
        }
        AdminCommand::Revoke { key } => {
            let k = find(&c.devices().await?, &key)?;
            c.decide(&k, Decision::Revoked).await?;
            out!("revoked {k} (every coordinator tells its sharers within a second)");
        }
        AdminCommand::Pin => {
            anyhow::bail!("the TLS pin is per coordinator: give its --data, not --redis")
        }
        AdminCommand::RotateKey => {
            let mut seed = [0u8; 32];
            bandshare_coordinator::random_seed(&mut seed)?;
            let id = c.add_signing_seed(seed).await?;
            out!(
                "new ticket-signing key {id}: every coordinator announces it to its sharers, signs with it a second later, and keeps the old one verifying until its tickets expire"
            );
        }
    }
    Ok(())
}

fn admin(a: AdminArgs) -> anyhow::Result<()> {
    use bandshare_store::Decision;
    let dir = a.data.unwrap_or_else(|| default_data("server"));
    if !dir.join("bandshare.db").exists() {
        anyhow::bail!(
            "no coordinator store in {} (give the server's --data)",
            dir.display()
        );
    }
    let store = bandshare_store::Store::open(&dir)?;
    let now = bandshare_core::clock::unix_now();
    match a.cmd {
        AdminCommand::List => print_devices(&store.devices()?, now),
        AdminCommand::Approve { key } => {
            let k = store.find_device(&key)?;
            store.decide(&k, Decision::Approved, now)?;
            out!("approved {k}");
        }
        AdminCommand::Revoke { key } => {
            let k = store.find_device(&key)?;
            store.decide(&k, Decision::Revoked, now)?;
            out!("revoked {k} (a running server tells its sharers within a second)");
        }
        AdminCommand::Pin => {
            let tls = bandshare_coordinator::tls::self_signed(&dir)?;
            out!("{}", tls.pin_hex());
        }
        AdminCommand::RotateKey => {
            let mut seed = [0u8; 32];
            bandshare_coordinator::random_seed(&mut seed)?;
            let id = store.add_signing_seed(seed, now)?;
            out!(
                "new ticket-signing key {id}: a running server announces it to sharers, signs with it a second later, and keeps the old one verifying until its tickets expire"
            );
        }
    }
    Ok(())
}

async fn share(a: ShareArgs) -> anyhow::Result<()> {
    init_logs("info");
    bandshare_core::name::check_name(&a.name).map_err(|e| anyhow::anyhow!("--name: {e}"))?;
    let server = a.server.url()?;
    let dir = a
        .data
        .clone()
        .unwrap_or_else(|| default_data(&format!("share-{}", a.name)));
    let key = identity::load_or_create(&dir.join("device.key"))?;
    let mut consent = match &a.consent {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("cannot read consent file {}: {e}", path.display()))?;
            Consent::from_toml(&text)
                .map_err(|e| anyhow::anyhow!("consent file {}: {e}", path.display()))?
        }
        None => Consent::default(),
    };
    if a.decline {
        consent.accept = false;
    }
    if a.max_requesters > 0 {
        consent.max_requesters = a.max_requesters;
    }
    let opts = SharerOptions {
        sources: a.location.sources()?,
        server,
        name: a.name,
        location: a.location.spec(),
        services: a.services,
        network: a.network,
        security: a.security,
        relay_listen: a.relay,
        advertise: a.advertise,
        egress: EgressPolicy {
            allow: a.allow_egress,
            ..Default::default()
        },
        bandwidth_bps: a.bandwidth_mbps.unwrap_or(0).saturating_mul(1_000_000),
        consent,
        uplink: a.uplink,
        uplink_check: a.uplink_check,
        power_supply: a.power_supply,
        data_dir: Some(dir),
        control: a.control,
    };
    let sharer = Sharer::start(opts, key, shutdown_on_signal()).await?;
    listening("relay", sharer.relay_addr);
    if let Some(c) = sharer.control_addr {
        listening("control", c);
        out!("status: curl http://{c}/status   metrics: curl http://{c}/metrics");
    }
    sharer.join().await?;
    Ok(())
}

#[cfg(all(feature = "tun", target_os = "linux"))]
fn setup_tun(
    name: &str,
) -> anyhow::Result<(
    bandshare_agent::requester::tun::Routes,
    bandshare_agent::requester::tun::Device,
)> {
    Ok(bandshare_agent::requester::tun::setup(name)?)
}

#[cfg(not(all(feature = "tun", target_os = "linux")))]
fn setup_tun(_name: &str) -> anyhow::Result<()> {
    anyhow::bail!("--tun needs Linux and a build with the `tun` feature")
}

#[cfg(all(feature = "tun", target_os = "linux"))]
fn cleanup_tun(name: &str) -> anyhow::Result<()> {
    let removed = bandshare_agent::requester::tun::cleanup(name);
    if removed.is_empty() {
        out!("nothing to remove for {name}");
    }
    for r in removed {
        out!("removed {r}");
    }
    Ok(())
}

#[cfg(not(all(feature = "tun", target_os = "linux")))]
fn cleanup_tun(_name: &str) -> anyhow::Result<()> {
    anyhow::bail!("--tun needs Linux and a build with the `tun` feature")
}

async fn connect(a: ConnectArgs) -> anyhow::Result<()> {
    init_logs("info");
    if a.cleanup {
        return cleanup_tun(a.tun.as_deref().unwrap_or_default());
    }
    let server = a.server.url()?;
    // Before any socket is made: from here on bandshare's own are marked.
    let tun = match &a.tun {
        Some(name) => Some(setup_tun(name)?),
        None => None,
    };
    let dir = a.data.clone().unwrap_or_else(|| default_data("requester"));
    let key = identity::load_or_create(&dir.join("device.key"))?;
    let shutdown = shutdown_on_signal();
    let opts = RequesterOptions {
        sources: a.location.sources()?,
        server,
        location: a.location.spec(),
        conditions: a.want.spec(),
        pool_size: a.pool,
        strategy: a.strategy,
        socks: Some(a.socks),
        forwards: a.forward,
        control: a.control,
        stall_grace: std::time::Duration::from_secs_f64(a.stall_grace),
        via: a.via,
        standby: a.standby,
        lanes: a.lanes,
        probes: a.probe,
        own_link: Thresholds {
            max_loss: a.direct_max_loss,
            max_rtt: std::time::Duration::from_millis(a.direct_max_rtt_ms),
            hold: std::time::Duration::from_secs_f64(a.direct_hold),
            ..Thresholds::default()
        },
        predict: (!a.no_predict).then_some(bandshare_agent::requester::forecast::Options {
            lead_s: a.predict_lead,
            tail_s: a.predict_tail,
            ..Default::default()
        }),
    };
    let r = Requester::start(opts, key, shutdown.clone()).await?;
    #[cfg(all(feature = "tun", target_os = "linux"))]
    let _routes = tun.map(|(routes, device)| {
        tokio::spawn(bandshare_agent::requester::tun::serve(
            device,
            r.pool.clone(),
            r.direct.clone(),
        ));
        routes
    });
    #[cfg(not(all(feature = "tun", target_os = "linux")))]
    let _ = tun;
    if let Some(s) = r.socks_addr {
        listening("socks", s);
    }
    for f in &r.forward_addrs {
        listening("forward", *f);
    }
    if let Some(c) = r.control_addr {
        listening("control", c);
    }
    eprintln!("{}", crate::render::offers_table(&r.first_response, false));
    if let Some(s) = r.socks_addr {
        eprintln!(
            "SOCKS5 and HTTP CONNECT proxy on {s}   e.g. curl --socks5-hostname {s} http://example.com/"
        );
    }
    for f in &r.forward_addrs {
        eprintln!("forward listening on {f}");
    }
    if let Some(c) = r.control_addr {
        eprintln!("status: curl http://{c}/status");
    }
    shutdown.wait().await;
    r.pool.close_all();
    Ok(())
}

async fn offers(a: OffersArgs) -> anyhow::Result<()> {
    init_logs("warn");
    // The requester's own key when it has one (needed in approval mode);
    // otherwise a throwaway one, so asking leaves nothing behind.
    let key_file = a
        .data
        .clone()
        .unwrap_or_else(|| default_data("requester"))
        .join("device.key");
    let key = if a.data.is_some() || key_file.exists() {
        identity::load_or_create(&key_file)?
    } else {
        identity::generate()?
    };
    let sources = a.location.sources()?;
    let mut here = a.location.spec();
    if sources.is_live() {
        // One reading from the live sources, waited for at most 5 s.
        let (_stop, shutdown) = Shutdown::new();
        let mut rx = bandshare_agent::location::start(here.clone(), &sources, shutdown);
        let want_fix = sources.gpsd.is_some();
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            rx.wait_for(|l| {
                (!want_fix || l.at.is_some()) && (sources.wifi_scan.is_none() || !l.wifi.is_empty())
            }),
        )
        .await;
        here = rx.borrow().clone();
    }
    let server = a.server.url()?;
    let channel = client::connect(&server).await?;
    let resp = client::share_request(
        channel,
        client::share_request_from(&key, &here, &a.want.spec(), a.explain),
    )
    .await?;
    if a.json {
        out!("{}", crate::render::offers_json(&resp, a.explain));
    } else {
        out!("{}", crate::render::offers_table(&resp, a.explain));
    }
    Ok(())
}
