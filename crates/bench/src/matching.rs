//! `bandshare bench match`: N sharers uniformly over a 50 km × 50 km square
//! around Beijing (lon 116.4, lat 39.9), then
//! - `index_qps`: region query + filters + scoring, top 10, in process;
//! - `grpc_qps`, `grpc_p50_us`, `grpc_p99_us`: full share requests through
//!   the real gRPC service on loopback, access requests answered at once by
//!   in-process sharers;
//! - `updates_per_s`: position updates into the index;
//! - `bytes_per_sharer`: resident memory growth per online sharer;
//!
//! and, when `redis-server` is installed, the same points in Redis: GEOADD
//! pipelined and `GEOSEARCH FROMLONLAT … BYRADIUS 200 m ASC COUNT 10`.

use crate::redis::{RedisServer, Reply, Resp};
use crate::stats::{Latencies, bar, rss_bytes};
use bandshare_agent::location::{ConditionSpec, LocationSpec};
use bandshare_coordinator::registry::{Handle, Registry};
use bandshare_coordinator::{Config, State};
use bandshare_core::{DeviceKey, LinkState, NetworkType, Position, Service, ServiceSet};
use bandshare_matcher::{MatchConfig, Query, RegionConfig, SharerInfo};
use bandshare_proto::v1::{self, coordinator_message::Msg as Down};
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const CENTER_LAT: f64 = 39.9;
pub const CENTER_LON: f64 = 116.4;
const HALF_SIDE_M: f64 = 25_000.0;

#[derive(Clone, Debug)]
pub struct MatchOptions {
    pub sharers: usize,
    /// Seconds each timed phase runs.
    pub seconds: f64,
    /// Concurrent clients for gRPC and Redis queries: each level is one
    /// timed phase per side, and each side is compared at its best.
    pub concurrency: Vec<usize>,
    pub seed: u64,
    pub redis: bool,
}

impl Default for MatchOptions {
    fn default() -> Self {
        MatchOptions {
            sharers: 1_000_000,
            seconds: 3.0,
            concurrency: vec![1, 2, 4, 8, 16],
            seed: 7,
            redis: true,
        }
    }
}

/// A uniformly random point of the square.
pub fn random_point(rng: &mut fastrand::Rng) -> Position {
    let c = Position {
        lat: CENTER_LAT,
        lon: CENTER_LON,
        alt: None,
    };
    c.offset_m(
        (rng.f64() * 2.0 - 1.0) * HALF_SIDE_M,
        (rng.f64() * 2.0 - 1.0) * HALF_SIDE_M,
    )
}

pub(crate) fn info(i: usize, p: Position, rng: &mut fastrand::Rng) -> SharerInfo {
    let network = [NetworkType::FiveG, NetworkType::FourG, NetworkType::Wifi][i % 3];
    let mut services: ServiceSet = [Service::Hotspot].into_iter().collect();
    if i.is_multiple_of(2) {
        services.insert(Service::FiveGhz);
    }
    SharerInfo {
        name: format!("s{i}").into(),
        position: p,
        exact: p,
        heading_deg: None,
        speed_mps: None,
        services,
        network: Some(network),
        security: Some(bandshare_core::Security::Wpa2),
        link: LinkState {
            rtt_us: 5_000 + rng.u32(0..80_000),
            loss_permille: rng.u32(0..30),
            network: Some(network),
            ..LinkState::default()
        },
        accepting: true,
        active_requesters: rng.u32(0..3),
        max_requesters: 4,
        fingerprint: Default::default(),
        cell: None,
        router: None,
    }
}

pub(crate) fn key_of(i: usize) -> DeviceKey {
    let mut k = [0u8; 32];
    k[..8].copy_from_slice(&(i as u64).to_le_bytes());
    DeviceKey(k)
}

fn query(p: Position) -> Query {
    Query {
        evidence: bandshare_matcher::Evidence {
            fix: Some(p),
            ..Default::default()
        },
        wanted: [Service::Hotspot].into_iter().collect(),
        network: None,
        security: None,
        margin_m: 0.0,
        explain: false,
    }
}

/// Answers every access request pushed to the bench sharers, at once.
pub(crate) fn spawn_answerer(
    state: Arc<State>,
    mut rx: tokio::sync::mpsc::Receiver<Result<v1::CoordinatorMessage, tonic::Status>>,
) {
    tokio::spawn(async move {
        while let Some(Ok(msg)) = rx.recv().await {
            if let Some(Down::AccessRequest(a)) = msg.msg
                && let Some((id, generation)) = state.registry().pending_sharer(a.request_id)
            {
                state.registry().answer(
                    id,
                    generation,
                    v1::AccessResponse {
                        request_id: a.request_id,
                        accept: true,
                        ..Default::default()
                    },
                );
            }
        }
    });
}

/// `concurrency` clients, each on its own connection, send share requests
/// from random points of the square for `seconds`. Returns the latencies
/// and the number of offers received.
pub async fn share_load(
    url: &bandshare_agent::client::ServerUrl,
    concurrency: usize,
    seconds: f64,
    seed: u64,
) -> anyhow::Result<(Latencies, usize)> {
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let mut clients = vec![];
    for c in 0..concurrency {
        let url = url.clone();
        clients.push(tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(seed + c as u64);
            let ch = bandshare_agent::client::connect(&url).await?;
            let key = bandshare_agent::identity::generate()?;
            let (mut lat, mut offers) = (Latencies::default(), 0usize);
            let cond = ConditionSpec {
                want: [Service::Hotspot].into_iter().collect(),
                network: None,
                security: None,
                max_offers: 10,
            };
            while Instant::now() < deadline {
                let loc = LocationSpec {
                    at: Some(random_point(&mut rng)),
                    ..Default::default()
                };
                let req = bandshare_agent::client::share_request_from(&key, &loc, &cond, false);
                let t = Instant::now();
                let resp = bandshare_agent::client::share_request(ch.clone(), req).await?;
                lat.push(t.elapsed());
                offers += resp.offers.len();
            }
            anyhow::Ok((lat, offers))
        }));
    }
    let (mut lat, mut offers) = (Latencies::default(), 0usize);
    for c in clients {
        let (l, o) = c.await??;
        lat.extend(l);
        offers += o;
    }
    Ok((lat, offers))
}

/// Fills `registry` with `n` sharers; returns their (id, generation).
pub(crate) fn load(
    registry: &Registry,
    n: usize,
    rng: &mut fastrand::Rng,
    tx: &bandshare_coordinator::registry::Outbound,
) -> Vec<(u32, u64)> {
    let pb = bar(n as u64, "loading sharers");
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let p = random_point(rng);
        let handle = Handle {
            key: key_of(i),
            relay_endpoints: vec!["127.0.0.1:9".into()],
            relay_cert_sha256: vec![0; 32],
            route: bandshare_coordinator::registry::Route::Local(tx.clone()),
            generation: 0,
            last_seen: Instant::now(),
            mac_key: Default::default(),
        };
        ids.push(registry.add(info(i, p, rng), handle));
        if i % 10_000 == 0 {
            pb.set_position(i as u64);
        }
    }
    pb.finish_and_clear();
    ids
}

/// A coordinator's configuration for the benches: fan-out and offers 10,
/// and the per-device rate and speed limits lifted (bench clients ask from
/// random points across 50 km many times a second).
pub(crate) fn bench_config() -> Config {
    let mut config = Config {
        fanout: 10,
        max_offers: 10,
        ..Config::default()
    };
    config.privacy.requests_per_minute = 1e9;
    config.privacy.burst = 1e9;
    config.privacy.max_speed_mps = 1e9;
    config.privacy.slack_m = 1e12;
    // The loaded sharers send no pings: keep them online for the run.
    config.expire_after = Duration::from_secs(3600);
    config
}

/// One timed phase of queries at one concurrency.
#[derive(Clone, Copy, Debug)]
struct Level {
    concurrency: usize,
    qps: f64,
    p50_us: u64,
    p99_us: u64,
}

impl Level {
    /// The level `concurrency` clients reached in `seconds`, told on stderr
    /// as `what`.
    fn of(what: &str, concurrency: usize, lat: &mut Latencies, seconds: f64) -> Level {
        let l = Level {
            concurrency,
            qps: lat.0.len() as f64 / seconds,
            p50_us: lat.percentile(50.0),
            p99_us: lat.percentile(99.0),
        };
        eprintln!(
            "  {what}: {:.0}/s with {concurrency} clients, p50 {} µs, p99 {} µs",
            l.qps, l.p50_us, l.p99_us
        );
        l
    }

    fn json(&self) -> serde_json::Value {
        json!({"concurrency": self.concurrency, "qps": self.qps.round(),
               "p50_us": self.p50_us, "p99_us": self.p99_us})
    }
}

/// The level with the most queries per second.
fn best(levels: &[Level]) -> Level {
    levels
        .iter()
        .copied()
        .max_by(|a, b| a.qps.total_cmp(&b.qps))
        .unwrap_or(Level {
            concurrency: 0,
            qps: 0.0,
            p50_us: 0,
            p99_us: 0,
        })
}

struct Ours {
    index_qps: f64,
    updates_per_s: f64,
    grpc: Vec<Level>,
    offers_per_request: f64,
    bytes_per_sharer: f64,
}

async fn measure_ours(o: &MatchOptions) -> anyhow::Result<Ours> {
    let mut rng = fastrand::Rng::with_seed(o.seed);
    let dir = tempfile::tempdir()?;
    let state = State::new(bench_config(), bandshare_store::Store::open(dir.path())?)?;
    let (tx, rx) = tokio::sync::mpsc::channel(1 << 16);
    let before = rss_bytes(None);
    let ids = load(state.registry(), o.sharers, &mut rng, &tx);
    let bytes_per_sharer = rss_bytes(None).saturating_sub(before) as f64 / o.sharers.max(1) as f64;
    eprintln!(
        "  {} sharers online, {:.0} bytes each (resident memory growth)",
        o.sharers, bytes_per_sharer
    );

    // Index only: region query + filters + scoring, top 10, one thread.
    let cfg = MatchConfig {
        region: RegionConfig::default(),
        fanout: 10,
    };
    let (t0, mut n, mut found) = (Instant::now(), 0u64, 0usize);
    while t0.elapsed().as_secs_f64() < o.seconds {
        for _ in 0..100 {
            let r = state.registry().rank(&query(random_point(&mut rng)), &cfg);
            found += r.map_or(0, |r| r.contacts.len());
            n += 1;
        }
    }
    let index_qps = n as f64 / t0.elapsed().as_secs_f64();
    eprintln!(
        "  index: {index_qps:.0} queries/s, {:.1} candidates per query",
        found as f64 / n as f64
    );

    // Position updates, one thread.
    let (t0, mut u) = (Instant::now(), 0u64);
    let now = Instant::now();
    while t0.elapsed().as_secs_f64() < o.seconds {
        for _ in 0..1000 {
            let (id, generation) = ids[rng.usize(..ids.len())];
            let p = random_point(&mut rng);
            state.registry().update(id, generation, now, |i| {
                i.position = p;
                i.exact = p;
            });
            u += 1;
        }
    }
    let updates_per_s = u as f64 / t0.elapsed().as_secs_f64();
    eprintln!("  index: {updates_per_s:.0} position updates/s");

    // Full share requests through gRPC on loopback.
    spawn_answerer(state.clone(), rx);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = bandshare_agent::client::ServerUrl::parse(&listener.local_addr()?.to_string())?;
    let (trigger, shutdown) = bandshare_agent::Shutdown::new();
    let server = tokio::spawn(bandshare_coordinator::run(
        state.clone(),
        listener,
        None,
        shutdown.wait(),
    ));
    let (mut grpc, mut offers, mut requests) = (vec![], 0usize, 0usize);
    for &conc in &o.concurrency {
        let (mut lat, n_offers) = share_load(&url, conc, o.seconds, o.seed + 100).await?;
        requests += lat.0.len();
        offers += n_offers;
        grpc.push(Level::of("gRPC share requests", conc, &mut lat, o.seconds));
    }
    trigger.fire();
    let _ = server.await;
    let offers_per_request = offers as f64 / requests.max(1) as f64;
    eprintln!("  {offers_per_request:.1} offers per share request");
    // Each request should be offered about the candidates the index found
    // (at most 10): far fewer means sharers dropped out during the run.
    // Below one candidate a query (a sparse run, as in the tests) the two
    // averages are over different random points and too few hits to
    // compare.
    let candidates = (found as f64 / n.max(1) as f64).min(10.0);
    anyhow::ensure!(
        candidates < 1.0 || offers_per_request >= 0.5 * candidates,
        "share requests got {offers_per_request:.1} offers each where the index finds {candidates:.1}: the figures would not be of full requests"
    );
    Ok(Ours {
        index_qps,
        updates_per_s,
        grpc,
        offers_per_request,
        bytes_per_sharer,
    })
}

struct Theirs {
    version: String,
    geoadd_per_s: f64,
    geosearch: Vec<Level>,
    results_per_query: f64,
}

async fn measure_redis(o: &MatchOptions) -> anyhow::Result<Option<Theirs>> {
    let Some(server) = RedisServer::start().await? else {
        eprintln!(
            "  redis-server is not installed: no Redis reference in this run (apt-get install redis-server)"
        );
        return Ok(None);
    };
    let mut rng = fastrand::Rng::with_seed(o.seed);
    let mut c = Resp::connect(server.port).await?;
    // GEOADD pipelined, 1000 members per batch.
    let pb = bar(o.sharers as u64, "GEOADD into redis");
    let t0 = Instant::now();
    let mut i = 0;
    while i < o.sharers {
        let end = (i + 1000).min(o.sharers);
        for j in i..end {
            let p = random_point(&mut rng);
            c.queue(&[
                "GEOADD",
                "sharers",
                &format!("{:.7}", p.lon),
                &format!("{:.7}", p.lat),
                &format!("s{j}"),
            ]);
        }
        c.flush().await?;
        for _ in i..end {
            c.read().await?;
        }
        i = end;
        pb.set_position(i as u64);
    }
    pb.finish_and_clear();
    let geoadd_per_s = o.sharers as f64 / t0.elapsed().as_secs_f64();
    eprintln!(
        "  redis {}: GEOADD pipelined {geoadd_per_s:.0}/s",
        RedisServer::version()
    );

    let (mut geosearch, mut results, mut queries) = (vec![], 0usize, 0usize);
    for &conc in &o.concurrency {
        let (mut lat, r) = geosearch_load(server.port, conc, o.seconds, o.seed + 100).await?;
        queries += lat.0.len();
        results += r;
        geosearch.push(Level::of("redis: GEOSEARCH", conc, &mut lat, o.seconds));
    }
    let results_per_query = results as f64 / queries.max(1) as f64;
    eprintln!("  redis: {results_per_query:.1} results per GEOSEARCH");
    Ok(Some(Theirs {
        version: RedisServer::version(),
        geoadd_per_s,
        geosearch,
        results_per_query,
    }))
}

/// `concurrency` Redis clients, each on its own connection, send
/// GEOSEARCH for `seconds`: their latencies and the results found.
async fn geosearch_load(
    port: u16,
    concurrency: usize,
    seconds: f64,
    seed: u64,
) -> anyhow::Result<(Latencies, usize)> {
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let mut clients = vec![];
    for k in 0..concurrency {
        let seed = seed + k as u64;
        clients.push(tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(seed);
            let mut c = Resp::connect(port).await?;
            let (mut lat, mut results) = (Latencies::default(), 0usize);
            while Instant::now() < deadline {
                let p = random_point(&mut rng);
                let (lon, lat_s) = (format!("{:.7}", p.lon), format!("{:.7}", p.lat));
                let t = Instant::now();
                let r = c
                    .call(&[
                        "GEOSEARCH",
                        "sharers",
                        "FROMLONLAT",
                        &lon,
                        &lat_s,
                        "BYRADIUS",
                        "200",
                        "m",
                        "ASC",
                        "COUNT",
                        "10",
                    ])
                    .await?;
                lat.push(t.elapsed());
                if let Reply::Array(v) = r {
                    results += v.len();
                }
            }
            anyhow::Ok((lat, results))
        }));
    }
    let (mut lat, mut results) = (Latencies::default(), 0usize);
    for c in clients {
        let (l, r) = c.await??;
        lat.extend(l);
        results += r;
    }
    Ok((lat, results))
}

fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

/// Runs the whole comparison; returns the JSON report.
pub async fn run(o: &MatchOptions) -> anyhow::Result<serde_json::Value> {
    eprintln!(
        "bench match: {} sharers over 50 km x 50 km around {CENTER_LAT},{CENTER_LON}",
        o.sharers
    );
    let ours = measure_ours(o).await?;
    let theirs = if o.redis {
        measure_redis(o).await?
    } else {
        None
    };
    let ours_best = best(&ours.grpc);
    let mut v = json!({
        "sharers": o.sharers,
        "index_qps": ours.index_qps.round(),
        "grpc_qps": ours_best.qps.round(),
        "grpc_concurrency": ours_best.concurrency,
        "grpc_p50_us": ours_best.p50_us,
        "grpc_p99_us": ours_best.p99_us,
        "grpc_levels": ours.grpc.iter().map(Level::json).collect::<Vec<_>>(),
        "offers_per_request": round(ours.offers_per_request, 2),
        "updates_per_s": ours.updates_per_s.round(),
        "bytes_per_sharer": ours.bytes_per_sharer.round(),
        "seconds_per_phase": o.seconds,
    });
    if let Some(t) = theirs {
        let their_best = best(&t.geosearch);
        v["redis"] = json!({
            "version": t.version,
            "geosearch_qps": their_best.qps.round(),
            "geosearch_concurrency": their_best.concurrency,
            "geosearch_p99_us": their_best.p99_us,
            "geosearch_levels": t.geosearch.iter().map(Level::json).collect::<Vec<_>>(),
            "results_per_query": round(t.results_per_query, 2),
            "geoadd_pipelined_per_s": t.geoadd_per_s.round(),
        });
        // Each side at its best concurrency.
        v["ratios"] = json!({
            "grpc_vs_geosearch": round(ours_best.qps / their_best.qps, 2),
            "index_vs_geosearch": round(ours.index_qps / their_best.qps, 2),
            "updates_vs_geoadd": round(ours.updates_per_s / t.geoadd_per_s, 2),
        });
        eprintln!(
            "  best against best: share requests {:.2}x GEOSEARCH ({} vs {} clients), index {:.2}x",
            ours_best.qps / their_best.qps,
            ours_best.concurrency,
            their_best.concurrency,
            ours.index_qps / their_best.qps
        );
    }
    Ok(v)
}

/// Share-request latency at each of `sizes` online sharers (the run in
/// `report` counts for its own size), drawn as an SVG at `path` and noted
/// in `report["plot"]`.
pub async fn plot_latency(
    o: &MatchOptions,
    report: &mut serde_json::Value,
    sizes: &[usize],
    path: &std::path::Path,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let mut series = vec![];
    for n in sizes {
        let (p50, p99) = if *n == o.sharers {
            (
                report["grpc_p50_us"].as_f64().unwrap_or(0.0),
                report["grpc_p99_us"].as_f64().unwrap_or(0.0),
            )
        } else {
            let r = run(&MatchOptions {
                sharers: *n,
                redis: false,
                ..o.clone()
            })
            .await?;
            (
                r["grpc_p50_us"].as_f64().unwrap_or(0.0),
                r["grpc_p99_us"].as_f64().unwrap_or(0.0),
            )
        };
        series.push((*n as f64, p50, p99));
    }
    use crate::plot::{Series, svg};
    let doc = svg(
        "share request latency vs online sharers (gRPC, loopback)",
        "online sharers",
        "latency (µs)",
        &[
            Series {
                label: "p50",
                colour: "#1f77b4",
                points: series.iter().map(|s| (s.0, s.1)).collect(),
            },
            Series {
                label: "p99",
                colour: "#d62728",
                points: series.iter().map(|s| (s.0, s.2)).collect(),
            },
        ],
    );
    std::fs::write(path, doc).with_context(|| format!("cannot write {}", path.display()))?;
    report["plot"] = serde_json::json!({
        "file": path.display().to_string(),
        "points": series.iter().map(|s| serde_json::json!({"sharers": s.0, "p50_us": s.1, "p99_us": s.2})).collect::<Vec<_>>(),
    });
    Ok(())
}
