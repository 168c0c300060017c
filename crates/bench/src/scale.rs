//! `bandshare bench scale`: many sharer streams kept online on one
//! coordinator process. The coordinator runs as its own process (this
//! binary's `server`), so its memory is measured alone; the load generator
//! here multiplexes the sharer streams over a few HTTP/2 connections (or,
//! with `--real-connections`, opens one per sharer from its own loopback
//! address, as real devices would), each stream saying hello, then
//! reporting state at the coordinator's interval and answering access
//! requests. A stream that ends or is refused reconnects with the agent's
//! own backoff and jitter. Reports memory per sharer, sustained state
//! updates per second, and share-request latency under that load (the
//! requesters run on their own threads, as other devices would); with
//! `--restart`, the coordinator is killed and started again and every
//! sharer reconnects at once: the time until all are back. `--busy-core`
//! keeps one core busy with another process for the whole run.

use crate::matching::random_point;
use crate::stats::{bar, cpu_seconds, rss_bytes};
use bandshare_agent::location::LocationSpec;
use bandshare_core::{Backoff, Service};
use bandshare_proto::convert as cv;
use bandshare_proto::v1::{self, coordinator_message::Msg as Down, sharer_message::Msg as Up};
use serde_json::json;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tonic::transport::Channel;

#[derive(Clone, Debug)]
pub struct ScaleOptions {
    pub sharers: usize,
    pub connections: usize,
    pub report_interval_ms: u64,
    pub seconds: f64,
    pub concurrency: usize,
    /// One HTTP/2 connection per sharer instead of `connections` shared.
    pub real_connections: bool,
    /// Kill the coordinator after the load phase and time the storm.
    pub restart: bool,
    /// Keep one core busy with another process throughout.
    pub busy_core: bool,
    /// The simulated sharers' nice value during the measurement (the
    /// share-request clients stay at 0).
    pub generator_nice: i32,
}

/// What the simulated sharers saw.
#[derive(Default)]
struct Counts {
    reports: AtomicU64,
    /// Hellos refused because the coordinator's join queue was full.
    shed: AtomicU64,
    /// Streams that failed or ended otherwise.
    lost: AtomicU64,
    /// Why, by message.
    why: std::sync::Mutex<std::collections::HashMap<String, u64>>,
}

impl Counts {
    fn lost(&self, why: String) {
        self.lost.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut w) = self.why.lock() {
            *w.entry(why).or_default() += 1;
        }
    }

    /// The commonest reasons streams were lost, commonest first.
    fn top_reasons(&self, n: usize) -> Vec<(String, u64)> {
        let mut v: Vec<_> = self
            .why
            .lock()
            .map(|w| w.iter().map(|(k, v)| (k.clone(), *v)).collect())
            .unwrap_or_default();
        v.sort_by_key(|r| std::cmp::Reverse(r.1));
        v.truncate(n);
        v
    }
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.0.try_wait() {
            return;
        }
        let pid = self.0.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        for _ in 0..50 {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn health(ch: &Channel) -> anyhow::Result<v1::HealthResponse> {
    let mut c = v1::health_client::HealthClient::new(ch.clone());
    Ok(c.check(v1::HealthRequest {}).await?.into_inner())
}

/// How the simulated sharers reach the coordinator.
#[derive(Clone)]
enum Link {
    /// Streams multiplexed over a few channels (tonic reconnects them).
    Shared(Vec<Channel>),
    /// A new connection per session from the sharer's own address.
    Own(String),
}

impl Link {
    async fn channel(&self, i: usize) -> anyhow::Result<Channel> {
        match self {
            Link::Shared(chs) => Ok(chs[i % chs.len()].clone()),
            Link::Own(url) => Ok(tonic::transport::Endpoint::from_shared(url.clone())?
                .local_address(Some(source_address(i)))
                .connect_timeout(Duration::from_secs(10))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_while_idle(true)
                .connect()
                .await?),
        }
    }
}

/// Sharer `i`'s own loopback address: 200 sharers per address, from
/// 127.1.0.1 on, so no address runs out of ports or over the
/// coordinator's per-source cap.
fn source_address(i: usize) -> std::net::IpAddr {
    let a = i / 200;
    std::net::Ipv4Addr::new(
        127,
        1 + (a / 250) as u8,
        (a % 250) as u8,
        (i % 200 + 1) as u8,
    )
    .into()
}

/// One simulated sharer for the whole run: sessions, and between them the
/// agent's backoff. `ready` is released when its first session is welcomed
/// (or fails).
async fn sharer_life(
    link: Link,
    i: usize,
    interval: Duration,
    counts: Arc<Counts>,
    ready: tokio::sync::OwnedSemaphorePermit,
) {
    let mut ready = Some(ready);
    let mut backoff = Backoff::default();
    let mut rng = fastrand::Rng::with_seed(i as u64 ^ 0x5eed);
    loop {
        let started = Instant::now();
        let r = match link.channel(i).await {
            Ok(ch) => session(ch, i, interval, &counts, &mut ready).await,
            Err(e) => Err(e),
        };
        drop(ready.take());
        let shed = r
            .as_ref()
            .err()
            .and_then(|e| e.downcast_ref::<tonic::Status>())
            .is_some_and(|s| s.code() == tonic::Code::Unavailable && s.message().contains("busy"));
        if shed {
            counts.shed.fetch_add(1, Ordering::Relaxed);
        } else {
            counts.lost(match &r {
                Ok(()) => "stream ended".to_string(),
                Err(e) => format!("{e:#}").chars().take(400).collect(),
            });
        }
        if started.elapsed() > Duration::from_secs(30) {
            backoff.reset();
        }
        tokio::time::sleep(backoff.next_delay(rng.f64())).await;
    }
}

/// One session: hello, then reports until the stream ends.
async fn session(
    ch: Channel,
    i: usize,
    interval: Duration,
    counts: &Counts,
    ready: &mut Option<tokio::sync::OwnedSemaphorePermit>,
) -> anyhow::Result<()> {
    let mut rng = fastrand::Rng::with_seed(i as u64);
    let p = random_point(&mut rng);
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&(i as u64).to_le_bytes());
    key[8] = 0xbe;
    let loc = LocationSpec {
        at: Some(p),
        ..Default::default()
    };
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tx.send(v1::SharerMessage {
        msg: Some(Up::Hello(v1::Hello {
            version: 1,
            name: format!("load{i}"),
            public_key: key.to_vec(),
            services: cv::services_to_wire([Service::Hotspot].into_iter().collect()),
            relay_endpoints: vec!["127.0.0.1:9".into()],
            relay_cert_sha256: vec![0; 32],
            location: Some(loc.to_wire()),
            ..Default::default()
        })),
    })
    .await?;
    let mut client = v1::sharer_link_client::SharerLinkClient::new(ch);
    let mut inbound = client
        .attach(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let _welcome = inbound.message().await?;
    drop(ready.take());
    // Spread reports over the interval.
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::now() + interval.mul_f64(rng.f64()),
        interval,
    );
    loop {
        tokio::select! {
            m = inbound.message() => match m? {
                Some(v1::CoordinatorMessage { msg: Some(Down::AccessRequest(a)) }) => {
                    let _ = tx.try_send(v1::SharerMessage { msg: Some(Up::AccessResponse(v1::AccessResponse {
                        request_id: a.request_id, accept: true, ..Default::default() })) });
                }
                Some(_) => {}
                None => return Ok(()),
            },
            _ = tick.tick() => {
                let q = p.offset_m(rng.f64() * 4.0 - 2.0, rng.f64() * 4.0 - 2.0);
                let loc = LocationSpec { at: Some(q), ..Default::default() };
                let report = v1::StateReport { location: Some(loc.to_wire()), ..Default::default() };
                if tx.send(v1::SharerMessage { msg: Some(Up::Report(report)) }).await.is_err() {
                    return Ok(());
                }
                counts.reports.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Another process keeping one core busy, ended (by its PID) on drop;
/// `timeout` ends it by itself should this process die first.
struct BusyCore(Child);

impl BusyCore {
    fn start() -> anyhow::Result<BusyCore> {
        Ok(BusyCore(
            Command::new("timeout")
                .args(["1800", "sh", "-c", "while :; do :; done"])
                .stdout(Stdio::null())
                .spawn()?,
        ))
    }
}

impl Drop for BusyCore {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

/// Lets this process (and the coordinator it starts) hold one descriptor
/// per connection; returns the limit now in force.
/// Sets the nice value of threads of this process (`renice`, util-linux):
/// `tids`, or the calling thread.
fn renice(nice: i32, tids: Option<Vec<String>>) -> anyhow::Result<()> {
    let tids = match tids {
        Some(t) => t,
        None => {
            let me = std::fs::read_link("/proc/thread-self")?;
            vec![
                me.file_name()
                    .map(|t| t.to_string_lossy().into_owned())
                    .ok_or_else(|| anyhow::anyhow!("no thread id in {}", me.display()))?,
            ]
        }
    };
    let st = Command::new("renice")
        .args(["-n", &nice.to_string(), "-p"])
        .args(&tids)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()?;
    anyhow::ensure!(
        st.status.success(),
        "renice -n {nice}: {}",
        String::from_utf8_lossy(&st.stderr).trim()
    );
    Ok(())
}

/// Every thread of this process so far.
fn threads() -> anyhow::Result<Vec<String>> {
    Ok(std::fs::read_dir("/proc/self/task")?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect())
}

fn raise_fd_limit(want: u64) -> u64 {
    let pid = std::process::id().to_string();
    let limit = || {
        std::fs::read_to_string(format!("/proc/{pid}/limits"))
            .ok()
            .and_then(|l| {
                l.lines()
                    .find(|l| l.starts_with("Max open files"))
                    .and_then(|l| l.split_whitespace().nth(3)?.parse().ok())
            })
            .unwrap_or(0)
    };
    if limit() >= want {
        return limit();
    }
    let _ = Command::new("prlimit")
        .args(["--pid", &pid, &format!("--nofile={want}:{want}")])
        .stderr(Stdio::null())
        .status();
    limit()
}

fn start_server(dir: &std::path::Path, port: u16, http: u16) -> anyhow::Result<Server> {
    Ok(Server(
        Command::new(std::env::current_exe()?)
            .args([
                "server",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--http",
                &format!("127.0.0.1:{http}"),
            ])
            .arg("--data")
            .arg(dir.join("data"))
            .arg("--config")
            .arg(dir.join("server.toml"))
            // Warnings, and why any HTTP/2 connection failed.
            .env("RUST_LOG", "warn,tonic::transport::server=debug")
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::options()
                    .create(true)
                    .append(true)
                    .open(dir.join("server.log"))?,
            )
            .spawn()?,
    ))
}

/// A channel to a coordinator that has just been started, once it answers.
async fn wait_healthy(url: &bandshare_agent::client::ServerUrl) -> anyhow::Result<Channel> {
    for _ in 0..200 {
        if let Ok(ch) = bandshare_agent::client::connect(url).await
            && health(&ch).await.is_ok()
        {
            return Ok(ch);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("coordinator did not start")
}

/// Waits until `want` sharers are online (at most `limit`), showing
/// progress; the online count every half second, from `t0`.
async fn wait_online(
    probe: &Channel,
    want: usize,
    limit: Duration,
    t0: Instant,
    what: &str,
) -> anyhow::Result<(usize, f64, Vec<(f64, usize)>)> {
    let pb = bar(want as u64, what);
    let mut timeline = vec![];
    let mut online = 0;
    let mut last = Instant::now() - Duration::from_secs(1);
    while t0.elapsed() < limit {
        online = health(probe)
            .await
            .map_or(online, |h| h.online_sharers as usize);
        pb.set_position(online as u64);
        if last.elapsed() >= Duration::from_millis(500) || online >= want {
            timeline.push(((t0.elapsed().as_secs_f64() * 10.0).round() / 10.0, online));
            last = Instant::now();
        }
        if online >= want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    pb.finish_and_clear();
    Ok((online, t0.elapsed().as_secs_f64(), timeline))
}

/// Share requests from their own runtime threads (other devices, not
/// queued behind the simulated sharers' tasks).
async fn share_load_apart(
    url: &bandshare_agent::client::ServerUrl,
    concurrency: usize,
    seconds: f64,
    generator_nice: i32,
) -> anyhow::Result<(crate::stats::Latencies, usize)> {
    let url = url.clone();
    tokio::task::spawn_blocking(move || {
        // The clients at nice 0 when the generator runs nicer (threads
        // inherit their creator's value).
        if generator_nice != 0
            && let Err(e) = renice(0, None)
        {
            tracing::warn!(error = %e, "the share-request clients keep the generator's nice value");
        }
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .on_thread_start(move || {
                if generator_nice != 0
                    && let Err(e) = renice(0, None)
                {
                    tracing::warn!(error = %e, "a share-request client thread keeps the generator's nice value");
                }
            })
            .enable_all()
            .build()?
            .block_on(crate::matching::share_load(
                &url,
                concurrency,
                seconds,
                1000,
            ))
    })
    .await?
}

pub async fn run(o: &ScaleOptions) -> anyhow::Result<serde_json::Value> {
    let _busy = if o.busy_core {
        Some(BusyCore::start()?)
    } else {
        None
    };
    let fd_limit = if o.real_connections {
        let l = raise_fd_limit(o.sharers as u64 * 2 + 10_000);
        anyhow::ensure!(
            l >= o.sharers as u64 + 1000,
            "--real-connections needs a descriptor per sharer: the limit is {l} (raise it with ulimit -n, as root)"
        );
        l
    } else {
        0
    };
    eprintln!(
        "bench scale: {} sharer streams over {}, reports every {} ms{}",
        o.sharers,
        if o.real_connections {
            "one HTTP/2 connection each (from 127.1.0.0/15)".to_string()
        } else {
            format!("{} HTTP/2 connections", o.connections)
        },
        o.report_interval_ms,
        if o.busy_core {
            ", one core kept busy by another process"
        } else {
            ""
        }
    );
    let dir = tempfile::tempdir()?;
    std::fs::write(
        dir.path().join("server.toml"),
        format!(
            "[server]\nmax_streams_per_connection = {}\nmax_connections_per_source = 1024\n[privacy]\nrequests_per_minute = 1e9\nburst = 1e9\nmax_speed_mps = 1e9\nslack_m = 1e7\n[sharers]\nreport_interval_ms = {}\nping_interval_ms = {}\nexpire_after_ms = {}\n",
            // Room for a storm's retries beside the streams being replaced.
            2 * o.sharers.div_ceil(o.connections) + 16,
            o.report_interval_ms,
            o.report_interval_ms,
            o.report_interval_ms * 30
        ),
    )?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let http = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut server = start_server(dir.path(), port, http)?;
    let pid = server.0.id();
    let url = bandshare_agent::client::ServerUrl::parse(&format!("127.0.0.1:{port}"))?;
    let probe = wait_healthy(&url).await?;
    let rss_before = rss_bytes(Some(pid));

    let link = if o.real_connections {
        Link::Own(format!("http://127.0.0.1:{port}"))
    } else {
        let mut channels = vec![];
        for _ in 0..o.connections {
            channels.push(bandshare_agent::client::connect(&url).await?);
        }
        Link::Shared(channels)
    };
    let counts = Arc::new(Counts::default());
    let gate = Arc::new(Semaphore::new(256));
    let interval = Duration::from_millis(o.report_interval_ms);
    let mut tasks = Vec::with_capacity(o.sharers);
    let t_open = Instant::now();
    let opening = {
        let gate = gate.clone();
        let (link, counts) = (link.clone(), counts.clone());
        let n = o.sharers;
        tokio::spawn(async move {
            let mut tasks = Vec::with_capacity(n);
            for i in 0..n {
                let Ok(permit) = gate.clone().acquire_owned().await else {
                    break;
                };
                tasks.push(tokio::spawn(sharer_life(
                    link.clone(),
                    i,
                    interval,
                    counts.clone(),
                    permit,
                )));
            }
            tasks
        })
    };
    let (online, open_s, _) = wait_online(
        &probe,
        o.sharers,
        Duration::from_secs(300),
        t_open,
        "opening sharer streams",
    )
    .await?;
    tasks.extend(opening.await?);
    let shed_open = counts.shed.load(Ordering::Relaxed);
    eprintln!(
        "  {online} sharers online after {open_s:.1} s ({shed_open} hellos shed and retried)"
    );
    // Let a full report interval pass so memory includes steady state.
    tokio::time::sleep(interval + Duration::from_millis(500)).await;
    let rss_after = rss_bytes(Some(pid));
    let bytes_per_sharer = rss_after.saturating_sub(rss_before) as f64 / online.max(1) as f64;
    eprintln!(
        "  coordinator resident memory {:.0} MiB, {:.0} bytes ({:.1} KiB) per sharer",
        rss_after as f64 / 1048576.0,
        bytes_per_sharer,
        bytes_per_sharer / 1024.0
    );

    // Sustained updates and share requests under that load.
    let h0 = health(&probe).await?;
    let sent0 = counts.reports.load(Ordering::Relaxed);
    let (cpu_server0, cpu_self0) = (cpu_seconds(Some(pid)), cpu_seconds(None));
    let t0 = Instant::now();
    if o.generator_nice != 0 {
        renice(o.generator_nice, Some(threads()?))?;
    }
    let loaded = share_load_apart(&url, o.concurrency, o.seconds, o.generator_nice).await;
    if o.generator_nice != 0
        && let Err(e) = renice(0, Some(threads()?))
    {
        tracing::warn!(error = %e, "the simulated sharers keep nice {}", o.generator_nice);
    }
    let (mut lat, offers) = loaded?;
    let secs = t0.elapsed().as_secs_f64();
    let cpu_server = (cpu_seconds(Some(pid)) - cpu_server0) / secs;
    let cpu_self = (cpu_seconds(None) - cpu_self0) / secs;
    let h1 = health(&probe).await?;
    let processed = (h1.reports_received - h0.reports_received) as f64 / secs;
    let offered = (counts.reports.load(Ordering::Relaxed) - sent0) as f64 / secs;
    let n = lat.0.len();
    let (p50, p99) = (lat.percentile(50.0), lat.percentile(99.0));
    eprintln!(
        "  state updates: {processed:.0}/s processed ({offered:.0}/s sent){}",
        if o.generator_nice != 0 {
            format!(", simulated sharers at nice {}", o.generator_nice)
        } else {
            String::new()
        }
    );
    eprintln!(
        "  cores used meanwhile: coordinator {cpu_server:.2}, load generator and requesters {cpu_self:.2}"
    );
    eprintln!(
        "  share requests under load: {:.0}/s, p50 {p50} µs, p99 {p99} µs, {:.1} offers each",
        n as f64 / secs,
        offers as f64 / n.max(1) as f64
    );
    let mut v = json!({
        "sharers": o.sharers,
        "online": online,
        "connections": if o.real_connections { o.sharers } else { o.connections },
        "real_connections": o.real_connections,
        "busy_core": o.busy_core,
        "generator_nice": o.generator_nice,
        "open_seconds": (open_s * 10.0).round() / 10.0,
        "open_shed": shed_open,
        "coordinator_rss_bytes": rss_after,
        "bytes_per_sharer": bytes_per_sharer.round(),
        "report_interval_ms": o.report_interval_ms,
        "updates_per_s": processed.round(),
        "updates_sent_per_s": offered.round(),
        "share_qps": (n as f64 / secs).round(),
        "share_p50_us": p50,
        "share_p99_us": p99,
        "coordinator_cores": (cpu_server * 100.0).round() / 100.0,
        "generator_cores": (cpu_self * 100.0).round() / 100.0,
        "offers_per_request": ((offers as f64 / n.max(1) as f64) * 100.0).round() / 100.0,
    });
    if o.real_connections {
        v["fd_limit"] = json!(fd_limit);
    }
    if o.restart {
        // A crash, not a clean stop: every stream breaks at once and every
        // sharer reconnects after its first backoff (1 s ± 20 %).
        let _ = server.0.kill();
        let _ = server.0.wait();
        let shed0 = counts.shed.load(Ordering::Relaxed);
        let t_kill = Instant::now();
        server = start_server(dir.path(), port, http)?;
        let probe = wait_healthy(&url).await?;
        let started_s = t_kill.elapsed().as_secs_f64();
        let (back, back_s, timeline) = wait_online(
            &probe,
            o.sharers,
            Duration::from_secs(180),
            t_kill,
            "restart storm: sharers reconnecting",
        )
        .await?;
        let shed = counts.shed.load(Ordering::Relaxed) - shed0;
        eprintln!(
            "  restart storm: coordinator answering {started_s:.1} s after the kill; {back} of {} back online after {back_s:.1} s ({shed} hellos shed and retried)",
            o.sharers
        );
        v["restart"] = json!({
            "back_online": back,
            "seconds": (back_s * 10.0).round() / 10.0,
            "coordinator_up_s": (started_s * 10.0).round() / 10.0,
            "shed": shed,
            "timeline": timeline,
        });
    }
    v["streams_lost"] = json!(counts.lost.load(Ordering::Relaxed));
    let reasons = counts.top_reasons(5);
    for (why, n) in &reasons {
        eprintln!("  streams lost: {n} × {why}");
    }
    v["streams_lost_why"] = json!(reasons);
    for t in &tasks {
        t.abort();
    }
    drop(server);
    let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap_or_default();
    let logged: Vec<&str> = log.lines().collect();
    if !logged.is_empty() {
        eprintln!(
            "  the coordinator logged {} warnings and connection failures; the last:",
            logged.len()
        );
        for l in logged.iter().rev().take(3) {
            eprintln!("    {}", l.chars().take(240).collect::<String>());
        }
    }
    v["coordinator_log_lines"] = json!(logged.len());
    Ok(v)
}
