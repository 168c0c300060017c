//! `bandshare bench failover`: rounds of the two ways a sharer fails —
//! its process killed with SIGKILL (no goodbye on the wire), and its link
//! silently dropping every packet — timing from the failure to the first
//! new flow that succeeds through the requester's pool.

use crate::stats::{Latencies, Proc};
use bandshare_coordinator::Config;
use bandshare_local::http::{HttpTarget, socks_get};
use bandshare_local::{Cluster, CoordinatorNode, SharerSpec, center, exact_config, wait_until};
use serde_json::json;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct FailoverOptions {
    pub rounds: usize,
}

/// Milliseconds from now until a new flow through `socks` succeeds.
async fn time_to_recover(socks: std::net::SocketAddr, port: u16) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(15) {
        let attempt = tokio::time::timeout(
            Duration::from_secs(2),
            socks_get(socks, "localhost", port, "/"),
        )
        .await;
        if let Ok(Ok((status, _))) = attempt
            && status.contains("200")
        {
            return Ok(t0.elapsed());
        }
    }
    anyhow::bail!("no new flow succeeded within 15 s")
}

fn summary(mut l: Latencies) -> serde_json::Value {
    let ms = |us: u64| (us as f64 / 100.0).round() / 10.0;
    let max = l.0.iter().copied().max().unwrap_or(0);
    json!({
        "rounds": l.0.len(),
        "p50_ms": ms(l.percentile(50.0)),
        "p99_ms": ms(l.percentile(99.0)),
        "max_ms": ms(max),
    })
}

fn fast() -> Config {
    Config {
        report_interval: Duration::from_millis(300),
        ping_interval: Duration::from_millis(200),
        expire_after: Duration::from_millis(1500),
        ..exact_config()
    }
}

/// Silent links: in-process sharers behind UDP relays that can be cut.
async fn silent(rounds: usize) -> anyhow::Result<Latencies> {
    let specs = (0..3)
        .map(|i| SharerSpec::new(&format!("s{i}"), 5.0 + 10.0 * i as f64, 0.0).behind_udp_relay())
        .collect();
    let c = Cluster::start_with(fast(), specs).await?;
    let r = c.requester(c.requester_options()).await?;
    let port = c.target.addr.port();
    let mut lat = Latencies::default();
    for round in 0..rounds {
        let full = wait_until(Duration::from_secs(15), || r.requester.pool.len() == 3).await;
        anyhow::ensure!(full, "pool did not refill before round {round}");
        time_to_recover(r.socks(), port).await?;
        let active = r
            .active()
            .ok_or_else(|| anyhow::anyhow!("no active sharer"))?;
        let node = c
            .sharer(&active)
            .ok_or_else(|| anyhow::anyhow!("unknown sharer {active}"))?;
        let link = node
            .link
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("no UDP relay"))?;
        link.cut(true);
        lat.push(time_to_recover(r.socks(), port).await?);
        // Wait until the pool dropped it, then heal the link for later rounds.
        wait_until(Duration::from_secs(5), || {
            !r.requester
                .pool
                .status()
                .pool
                .iter()
                .any(|m| m.sharer == active)
        })
        .await;
        link.cut(false);
        eprintln!(
            "  silent link, round {}: {:.0} ms",
            round + 1,
            lat.0.last().copied().unwrap_or(0) as f64 / 1000.0
        );
    }
    r.stop();
    Ok(lat)
}

fn spawn_sharer(
    url: &bandshare_agent::client::ServerUrl,
    name: &str,
    east: f64,
    target_port: u16,
    dir: &std::path::Path,
) -> anyhow::Result<Proc> {
    let p = center().offset_m(east, 0.0);
    Ok(Proc(
        Command::new(std::env::current_exe()?)
            .args([
                "share",
                "--server",
                url.as_str(),
                "--name",
                name,
                "--at",
                &format!("{},{}", p.lat, p.lon),
            ])
            .args([
                "--relay",
                "127.0.0.1:0",
                "--allow-egress",
                &format!("127.0.0.1/32:{target_port}"),
            ])
            .arg("--data")
            .arg(dir.join(name))
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    ))
}

/// Killed processes: sharers as child processes, killed with SIGKILL.
async fn killed(rounds: usize) -> anyhow::Result<Latencies> {
    let target = HttpTarget::start().await?;
    let coord = CoordinatorNode::start(fast()).await?;
    let dir = tempfile::tempdir()?;
    let mut procs: Vec<(String, Proc)> = vec![];
    for i in 0..3 {
        let name = format!("k{i}");
        procs.push((
            name.clone(),
            spawn_sharer(
                &coord.url,
                &name,
                5.0 + 10.0 * i as f64,
                target.addr.port(),
                dir.path(),
            )?,
        ));
    }
    anyhow::ensure!(
        wait_until(Duration::from_secs(15), || coord.online() == 3).await,
        "sharers did not come online"
    );
    // A requester in this process, as in the testkit's clusters.
    let mut opts = bandshare_agent::requester::RequesterOptions {
        server: coord.url.clone(),
        location: bandshare_agent::location::LocationSpec {
            at: Some(center()),
            ..Default::default()
        },
        sources: Default::default(),
        conditions: Default::default(),
        pool_size: 3,
        strategy: Default::default(),
        socks: Some("127.0.0.1:0".parse()?),
        forwards: vec![],
        control: None,
        stall_grace: bandshare_agent::requester::pool::STALL_GRACE,
        // The pool path: these runs measure and test sharers.
        via: bandshare_agent::requester::own_link::Via::Pool,
        standby: 1,
        lanes: bandshare_agent::requester::pool::LANES,
        probes: vec![],
        own_link: Default::default(),
        predict: None,
    };
    opts.pool_size = 3;
    let (stop, shutdown) = bandshare_agent::Shutdown::new();
    let r = bandshare_agent::requester::Requester::start(
        opts,
        bandshare_agent::identity::generate()?,
        shutdown,
    )
    .await?;
    let socks = r
        .socks_addr
        .ok_or_else(|| anyhow::anyhow!("no socks port"))?;
    let mut lat = Latencies::default();
    for round in 0..rounds {
        let full = wait_until(Duration::from_secs(15), || r.pool.len() == 3).await;
        anyhow::ensure!(full, "pool did not refill before round {round}");
        time_to_recover(socks, target.addr.port()).await?;
        let active = r
            .pool
            .status()
            .active
            .ok_or_else(|| anyhow::anyhow!("no active sharer"))?;
        let i = procs
            .iter()
            .position(|(n, _)| *n == active)
            .ok_or_else(|| anyhow::anyhow!("unknown {active}"))?;
        let (_, mut proc) = procs.remove(i);
        let pid = proc.0.id().to_string();
        Command::new("kill").args(["-KILL", &pid]).status()?;
        lat.push(time_to_recover(socks, target.addr.port()).await?);
        let _ = proc.0.wait();
        wait_until(Duration::from_secs(5), || {
            !r.pool.status().pool.iter().any(|m| m.sharer == active)
        })
        .await;
        eprintln!(
            "  killed process, round {}: {:.0} ms",
            round + 1,
            lat.0.last().copied().unwrap_or(0) as f64 / 1000.0
        );
        // A new sharer takes the dead one's place.
        let name = format!("k{}", round + 3);
        procs.push((
            name.clone(),
            spawn_sharer(&coord.url, &name, 15.0, target.addr.port(), dir.path())?,
        ));
    }
    stop.fire();
    drop(procs);
    coord.stop().await;
    Ok(lat)
}

pub async fn run(o: &FailoverOptions) -> anyhow::Result<serde_json::Value> {
    eprintln!(
        "bench failover: {} rounds of each kind on loopback",
        o.rounds
    );
    let k = killed(o.rounds).await?;
    let s = silent(o.rounds).await?;
    let (k, s) = (summary(k), summary(s));
    eprintln!(
        "  killed process: p50 {} ms, p99 {} ms, max {} ms (target 300 ms)",
        k["p50_ms"], k["p99_ms"], k["max_ms"]
    );
    eprintln!(
        "  silent link:    p50 {} ms, p99 {} ms, max {} ms (target 1000 ms)",
        s["p50_ms"], s["p99_ms"], s["max_ms"]
    );
    Ok(json!({
        "killed": k,
        "silent": s,
        "targets_ms": {"killed": 300, "silent": 1000},
        "pool": 3,
        "probe_every_ms": bandshare_agent::requester::pool::PROBE_EVERY.as_millis() as u64,
        "hedge_after_ms": bandshare_agent::requester::pool::HEDGE_AFTER.as_millis() as u64,
        "dead_after_ms": bandshare_agent::requester::pool::DEAD_AFTER.as_millis() as u64,
    }))
}
