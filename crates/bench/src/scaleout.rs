//! `bandshare bench scaleout`: coordinators on a real Redis Cluster (three
//! masters, three replicas of the machine's `redis-server`, started for the
//! run) against one coordinator on its own, in the same run:
//!
//! - share requests per second and p99 through one embedded coordinator,
//!   one coordinator on Redis, and two coordinators on Redis with the
//!   sharers split between them (the clients spread over both; about half
//!   of every fan-out is routed to the other coordinator);
//! - the latency of one access request asked locally vs routed through
//!   Redis to the coordinator holding the sharer (added p50/p99);
//! - presence updates per second: into the embedded index vs written to
//!   Redis by one coordinator and applied by the other.
//!
//! Sharers live in the coordinators' registries (as in `bench match`) and
//! answer every access request at once; nothing here asserts a speed.

use crate::matching::{info, key_of, random_point, share_load, spawn_answerer};
use crate::stats::Latencies;
use bandshare_coordinator::State;
use bandshare_coordinator::cluster::Cluster;
use bandshare_coordinator::registry::{Handle, Route};
use bandshare_local::redis_cluster::{self, RedisCluster};
use bandshare_proto::v1;
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct ScaleoutOptions {
    pub sharers: usize,
    pub seconds: f64,
    pub concurrency: usize,
    pub asks: usize,
    pub seed: u64,
}

/// One coordinator serving gRPC on loopback until the returned trigger.
struct Node {
    state: Arc<State>,
    url: String,
    trigger: bandshare_agent::shutdown::Trigger,
    task: tokio::task::JoinHandle<Result<(), bandshare_coordinator::ServerError>>,
    /// Every sharer's stream: the answerer.
    tx: bandshare_coordinator::registry::Outbound,
    _dir: tempfile::TempDir,
}

async fn node(cluster: Option<Arc<Cluster>>) -> anyhow::Result<Node> {
    let dir = tempfile::tempdir()?;
    let store = bandshare_store::Store::open(dir.path())?;
    let state = match cluster {
        Some(c) => State::new_clustered(crate::matching::bench_config(), store, c).await?,
        None => State::new(crate::matching::bench_config(), store)?,
    };
    let (tx, rx) = tokio::sync::mpsc::channel(1 << 16);
    spawn_answerer(state.clone(), rx);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = listener.local_addr()?.to_string();
    let (trigger, shutdown) = bandshare_agent::Shutdown::new();
    let task = tokio::spawn(bandshare_coordinator::run(
        state.clone(),
        listener,
        None,
        shutdown.wait(),
    ));
    Ok(Node {
        state,
        url,
        trigger,
        task,
        tx,
        _dir: dir,
    })
}

impl Node {
    async fn stop(self) {
        self.trigger.fire();
        let _ = self.task.await;
    }
}

/// Puts sharers `range` online at `n` (and into Redis when scaled out).
fn load(n: &Node, range: std::ops::Range<usize>, seed: u64) {
    let mut rng = fastrand::Rng::with_seed(seed);
    for i in range {
        let p = random_point(&mut rng);
        let handle = Handle {
            key: key_of(i),
            relay_endpoints: vec!["127.0.0.1:9".into()],
            relay_cert_sha256: vec![0; 32],
            route: Route::Local(n.tx.clone()),
            generation: 0,
            last_seen: Instant::now(),
            mac_key: Default::default(),
        };
        n.state.registry().add(info(i, p, &mut rng), handle);
        if let Some(c) = n.state.cluster() {
            c.changed(&n.state, &key_of(i));
        }
    }
}

async fn until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f()
}

struct Load {
    qps: f64,
    p50: u64,
    p99: u64,
    offers: f64,
}

async fn load_run(url: &str, o: &ScaleoutOptions, seed: u64) -> anyhow::Result<Load> {
    let url = bandshare_agent::client::ServerUrl::parse(url)?;
    let (mut lat, offers) = share_load(&url, o.concurrency, o.seconds, seed).await?;
    let n = lat.0.len();
    Ok(Load {
        qps: n as f64 / o.seconds,
        p50: lat.percentile(50.0),
        p99: lat.percentile(99.0),
        offers: offers as f64 / n.max(1) as f64,
    })
}

fn report(what: &str, l: &Load) {
    eprintln!(
        "  {what}: {:.0} share requests/s, p50 {} µs, p99 {} µs, {:.1} offers each",
        l.qps, l.p50, l.p99, l.offers
    );
}

/// One access request to sharer `i` at `at`, asked as a share request
/// would: down its local stream, or routed through Redis.
async fn ask_once(at: &State, i: usize) -> Option<Duration> {
    let c = at.registry().contact_of(&key_of(i))?;
    let req = v1::AccessRequest {
        request_id: 0,
        requester_key: vec![1; 32],
        conditions: None,
        distance_band: "near".into(),
        deadline_ms: 300,
    };
    let deadline = Duration::from_millis(300);
    let t = Instant::now();
    let answered = match &c.handle.route {
        Route::Local(tx) => at.registry().ask_local(&c, tx, req, deadline).await,
        Route::Remote { owner, .. } => at.cluster()?.ask(owner, &c.handle.key, req, deadline).await,
    };
    answered.filter(|a| a.accept).map(|_| t.elapsed())
}

pub async fn run(o: &ScaleoutOptions) -> anyhow::Result<serde_json::Value> {
    if !redis_cluster::available() {
        eprintln!(
            "  redis-server/redis-cli are not installed: no scale-out run (apt-get install redis-server redis-tools)"
        );
        return Ok(json!({"skipped": "redis-server not installed"}));
    }
    let n = o.sharers;
    eprintln!(
        "scale-out: {n} sharers over 50 km × 50 km, {} clients, {} s per phase",
        o.concurrency, o.seconds
    );
    let redis = tokio::task::spawn_blocking(RedisCluster::start).await?;
    let urls: Vec<String> = redis.urls().split(',').map(String::from).collect();

    // 1. One coordinator on its own.
    let solo = node(None).await?;
    load(&solo, 0..n, o.seed);
    let embedded = load_run(&solo.url, o, o.seed + 1).await?;
    report("one coordinator, embedded", &embedded);
    let mut rng = fastrand::Rng::with_seed(o.seed + 2);
    let (t0, mut u) = (Instant::now(), 0u64);
    let now = Instant::now();
    while t0.elapsed().as_secs_f64() < o.seconds.min(2.0) {
        for _ in 0..1000 {
            let c = solo.state.registry().contact_of(&key_of(rng.usize(..n)));
            if let Some(c) = c {
                let p = random_point(&mut rng);
                solo.state
                    .registry()
                    .update(c.id, c.handle.generation, now, |i| {
                        i.position = p;
                        i.exact = p;
                    });
            }
            u += 1;
        }
    }
    let embedded_updates = u as f64 / t0.elapsed().as_secs_f64();
    eprintln!("  presence updates into the embedded index: {embedded_updates:.0}/s");
    solo.stop().await;

    // 2. One coordinator on Redis, every sharer its own.
    let ca = Cluster::connect(&urls).await?;
    let a = node(Some(ca.clone())).await?;
    // 3. Two: the second one holds half of the sharers.
    let cb = Cluster::connect(&urls).await?;
    let b = node(Some(cb.clone())).await?;
    load(&a, 0..n / 2, o.seed);
    load(&b, n / 2..n, o.seed + 3);
    let synced = until(Duration::from_secs(60), || {
        a.state.registry().len() == n && b.state.registry().len() == n
    })
    .await;
    eprintln!(
        "  presence: both indexes hold {} / {} sharers ({})",
        a.state.registry().len(),
        b.state.registry().len(),
        if synced {
            "in sync"
        } else {
            "NOT in sync after 60 s"
        }
    );
    let one = load_run(&a.url, o, o.seed + 4).await?;
    report(
        "one coordinator of two on Redis (half its sharers routed)",
        &one,
    );
    let two = load_run(&format!("{},{}", a.url, b.url), o, o.seed + 5).await?;
    report("two coordinators on Redis, clients spread over both", &two);

    // 4. One access request: local vs routed.
    let (mut local, mut routed) = (Latencies::default(), Latencies::default());
    for k in 0..o.asks {
        if let Some(d) = ask_once(&a.state, k % (n / 2)).await {
            local.push(d);
        }
        if let Some(d) = ask_once(&a.state, n / 2 + k % (n - n / 2)).await {
            routed.push(d);
        }
    }
    let (lp50, lp99, rp50, rp99) = (
        local.percentile(50.0),
        local.percentile(99.0),
        routed.percentile(50.0),
        routed.percentile(99.0),
    );
    eprintln!(
        "  access request: local p50 {lp50} µs p99 {lp99} µs; routed through Redis p50 {rp50} µs p99 {rp99} µs ({} of {} answered); added p99 {} µs",
        routed.0.len(),
        o.asks,
        rp99.saturating_sub(lp99)
    );

    // 5. Presence updates written to Redis by A and applied at B.
    let (w0, a0) = (ca.presence_written(), cb.presence_applied());
    let t0 = Instant::now();
    let mut rng = fastrand::Rng::with_seed(o.seed + 6);
    while t0.elapsed().as_secs_f64() < o.seconds.min(2.0) {
        for _ in 0..1000 {
            ca.changed(&a.state, &key_of(rng.usize(..n / 2)));
        }
        tokio::task::yield_now().await;
    }
    let queued_for = t0.elapsed();
    let _ = until(Duration::from_secs(30), || {
        ca.presence_written() - w0 >= 1 && cb.presence_applied() - a0 >= ca.presence_written() - w0
    })
    .await;
    let took = t0.elapsed().as_secs_f64();
    let written = ca.presence_written() - w0;
    let applied = cb.presence_applied() - a0;
    let redis_updates = written as f64 / took;
    eprintln!(
        "  presence through Redis: {written} written in {took:.2} s ({redis_updates:.0}/s; queued for {:.1} s, {} dropped), {applied} applied at the other coordinator",
        queued_for.as_secs_f64(),
        ca.dropped_writes()
    );
    // Both stopped before the Redis Cluster goes.
    a.stop().await;
    b.stop().await;
    Ok(json!({
        "sharers": n,
        "concurrency": o.concurrency,
        "embedded": {"qps": embedded.qps, "p50_us": embedded.p50, "p99_us": embedded.p99, "offers": embedded.offers},
        "one_of_two_on_redis": {"qps": one.qps, "p50_us": one.p50, "p99_us": one.p99, "offers": one.offers},
        "two_on_redis": {"qps": two.qps, "p50_us": two.p50, "p99_us": two.p99, "offers": two.offers},
        "ask_local_p50_us": lp50, "ask_local_p99_us": lp99,
        "ask_routed_p50_us": rp50, "ask_routed_p99_us": rp99,
        "ask_routed_answered": routed.0.len(),
        "presence_updates_embedded_per_s": embedded_updates,
        "presence_updates_redis_per_s": redis_updates,
        "presence_applied_at_other": applied,
        "presence_dropped": ca.dropped_writes(),
    }))
}
