//! `bandshare bench scale`: many sharer streams kept online on one
//! coordinator process. The coordinator runs as its own process (this
//! binary's `server`), so its memory is measured alone; the load generator
//! here multiplexes the sharer streams over a few HTTP/2 connections, each
//! stream saying hello, then reporting state at the coordinator's interval
//! and answering access requests. Reports memory per sharer, sustained state
//! updates per second, and share-request latency while under that load.

use crate::matching::random_point;
use crate::stats::{bar, rss_bytes};
use bandshare_agent::location::LocationSpec;
use bandshare_core::Service;
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
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
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

/// One simulated sharer: hello, then reports until the stream ends.
async fn sharer(
    ch: Channel,
    i: usize,
    interval: Duration,
    sent: Arc<AtomicU64>,
    ready: tokio::sync::OwnedSemaphorePermit,
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
    drop(ready);
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
                sent.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

pub async fn run(o: &ScaleOptions) -> anyhow::Result<serde_json::Value> {
    eprintln!(
        "bench scale: {} sharer streams over {} HTTP/2 connections, reports every {} ms",
        o.sharers, o.connections, o.report_interval_ms
    );
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("server.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nmax_streams_per_connection = {}\n[privacy]\nrequests_per_minute = 1e9\nburst = 1e9\nmax_speed_mps = 1e9\nslack_m = 1e7\n[sharers]\nreport_interval_ms = {}\nping_interval_ms = {}\nexpire_after_ms = {}\n",
            o.sharers.div_ceil(o.connections) + 16,
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
    let server = Server(
        Command::new(std::env::current_exe()?)
            .args([
                "server",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--http",
                &format!("127.0.0.1:{http}"),
            ])
            .arg("--data")
            .arg(dir.path().join("data"))
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let pid = server.0.id();
    let url = bandshare_agent::client::ServerUrl::parse(&format!("127.0.0.1:{port}"))?;
    let mut probe = None;
    for _ in 0..100 {
        if let Ok(ch) = bandshare_agent::client::connect(&url).await
            && health(&ch).await.is_ok()
        {
            probe = Some(ch);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let probe = probe.ok_or_else(|| anyhow::anyhow!("coordinator did not start"))?;
    let rss_before = rss_bytes(Some(pid));

    let mut channels = vec![];
    for _ in 0..o.connections {
        channels.push(bandshare_agent::client::connect(&url).await?);
    }
    let sent = Arc::new(AtomicU64::new(0));
    let gate = Arc::new(Semaphore::new(256));
    let interval = Duration::from_millis(o.report_interval_ms);
    let pb = bar(o.sharers as u64, "opening sharer streams");
    let mut tasks = Vec::with_capacity(o.sharers);
    let t_open = Instant::now();
    for i in 0..o.sharers {
        let permit = gate.clone().acquire_owned().await?;
        let ch = channels[i % channels.len()].clone();
        tasks.push(tokio::spawn(sharer(ch, i, interval, sent.clone(), permit)));
        if i % 1000 == 0 {
            pb.set_position(i as u64);
        }
    }
    let mut online = 0;
    for _ in 0..600 {
        online = health(&probe).await?.online_sharers as usize;
        pb.set_position(online as u64);
        if online >= o.sharers {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    pb.finish_and_clear();
    let open_s = t_open.elapsed().as_secs_f64();
    eprintln!("  {online} sharers online after {open_s:.1} s");
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
    let sent0 = sent.load(Ordering::Relaxed);
    let t0 = Instant::now();
    let (mut lat, offers) =
        crate::matching::share_load(&url, o.concurrency, o.seconds, 1000).await?;
    let secs = t0.elapsed().as_secs_f64();
    let h1 = health(&probe).await?;
    let processed = (h1.reports_received - h0.reports_received) as f64 / secs;
    let offered = (sent.load(Ordering::Relaxed) - sent0) as f64 / secs;
    let n = lat.0.len();
    let (p50, p99) = (lat.percentile(50.0), lat.percentile(99.0));
    eprintln!("  state updates: {processed:.0}/s processed ({offered:.0}/s sent)");
    eprintln!(
        "  share requests under load: {:.0}/s, p50 {p50} µs, p99 {p99} µs, {:.1} offers each",
        n as f64 / secs,
        offers as f64 / n.max(1) as f64
    );
    for t in &tasks {
        t.abort();
    }
    drop(server);
    Ok(json!({
        "sharers": o.sharers,
        "online": online,
        "connections": o.connections,
        "open_seconds": (open_s * 10.0).round() / 10.0,
        "coordinator_rss_bytes": rss_after,
        "bytes_per_sharer": bytes_per_sharer.round(),
        "report_interval_ms": o.report_interval_ms,
        "updates_per_s": processed.round(),
        "updates_sent_per_s": offered.round(),
        "share_qps": (n as f64 / secs).round(),
        "share_p50_us": p50,
        "share_p99_us": p99,
        "offers_per_request": ((offers as f64 / n.max(1) as f64) * 100.0).round() / 100.0,
    }))
}
