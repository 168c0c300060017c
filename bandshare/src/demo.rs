//! `bandshare demo`: a coordinator, five sharers at different places with
//! different services and network types, a local web target and a
//! requester, all real and all on loopback in this process. It shows who
//! matched and why the others did not, fetches a page through the active
//! sharer, kills that sharer and fetches again through the next one.

use bandshare_agent::location::{ConditionSpec, LocationSpec};
use bandshare_agent::requester::own_link::{Path, Thresholds, Via};
use bandshare_coordinator::Config;
use bandshare_core::{NetworkType, Service};
use bandshare_local::gateway::Gateway;
use bandshare_local::http::{PAGE_TITLE, socks_get};
use bandshare_local::{Cluster, SharerSpec, center, wait_until};
use std::time::{Duration, Instant};

fn sharers() -> Vec<(SharerSpec, &'static str)> {
    vec![
        (
            SharerSpec::new("alice", 8.0, 0.0)
                .services("hotspot,5ghz")
                .network(NetworkType::FiveG),
            "8 m east",
        ),
        (
            SharerSpec::new("bob", 0.0, 35.0)
                .services("hotspot,wifi6,5ghz")
                .network(NetworkType::Wifi),
            "35 m north",
        ),
        (
            SharerSpec::new("carol", -120.0, 0.0)
                .services("hotspot")
                .network(NetworkType::FourG),
            "120 m west",
        ),
        (
            SharerSpec::new("dave", 0.0, -60.0)
                .services("prose")
                .network(NetworkType::FiveG),
            "60 m south",
        ),
        (
            SharerSpec::new("erin", 300.0, 0.0)
                .services("hotspot,5ghz")
                .network(NetworkType::FiveG),
            "300 m east",
        ),
    ]
}

pub async fn run() -> anyhow::Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let t0 = Instant::now();
    out!("bandshare demo: a coordinator, 5 sharers, a web target and a requester, on loopback\n");
    let specs = sharers();
    let config = Config {
        report_interval: Duration::from_millis(500),
        ping_interval: Duration::from_millis(250),
        expire_after: Duration::from_secs(3),
        ..Config::default()
    };
    let cluster =
        Cluster::start_with(config, specs.iter().map(|(s, _)| s.clone()).collect()).await?;
    let port = cluster.target.addr.port();
    print_setup(&cluster, &specs);

    let want: bandshare_core::ServiceSet = [Service::Hotspot].into_iter().collect();
    out!("\n1. A requester at the centre asks for offers (wants: hotspot)");
    let ch = bandshare_agent::client::connect(&cluster.coordinator.url).await?;
    let probe_key = bandshare_agent::identity::generate()?;
    let location = LocationSpec {
        at: Some(center()),
        ..Default::default()
    };
    let conditions = ConditionSpec {
        want,
        network: None,
        ..Default::default()
    };
    let resp = bandshare_agent::client::share_request(
        ch,
        bandshare_agent::client::share_request_from(&probe_key, &location, &conditions, true),
    )
    .await?;
    out!("{}", indent(&crate::render::offers_table(&resp, true)));
    out!(
        "   (each sharer is shown at a secret point 15-25 m from where it is, the same for every\n    requester, so faked positions from any number of keys cannot trilaterate it;\n    alice at 8 m may show as 10-50m)"
    );

    // The own link's probe target, on loopback: it can go silent the way a
    // dead link does (its accept queue full, SYNs dropped).
    let gateway = Gateway::start().await?;
    out!(
        "\n2. It connects: its own link first (probed at {}), one sharer kept warm, SOCKS5 locally",
        gateway.addr
    );
    let mut opts = cluster.requester_options();
    opts.conditions = conditions;
    opts.via = Via::Auto;
    opts.standby = 1;
    opts.pool_size = 3;
    opts.probes = vec![gateway.addr.to_string()];
    opts.own_link = Thresholds {
        hold: Duration::from_secs(2),
        ..Thresholds::default()
    };
    let r = cluster.requester(opts).await?;
    wait_until(Duration::from_secs(5), || {
        r.requester.direct.status().state == "healthy"
    })
    .await;
    print_paths(&r);

    out!(
        "\n3. GET http://localhost:{port}/hello through SOCKS5 {} (as curl --socks5-hostname would)",
        r.socks()
    );
    fetch(&r, port, "/hello").await?;

    own_link_goes_silent(&r, &gateway).await?;
    let first = fetch(&r, port, "/weak").await?;
    print_paths(&r);

    fail_over(&cluster, &r, &first, port).await?;
    print_paths(&r);

    own_link_answers_again(&r, &gateway).await?;
    fetch(&r, port, "/back").await?;

    learn_and_predict(&cluster).await?;

    let ledger = cluster.coordinator.state.store().clone();
    wait_until(Duration::from_secs(3), || {
        ledger.usage_rows().unwrap_or(0) > 0
    })
    .await;
    out!(
        "\nusage ledger: {} rows in {}",
        ledger.usage_rows()?,
        ledger.path().display()
    );
    out!(
        "\n8. What an operator and the user see: GET /metrics (Prometheus), and the same live on the dashboards at http://{}/ (coordinator) and the requester's --control /",
        cluster.coordinator.http_addr
    );
    let wanted = [
        "bandshare_online_sharers",
        "bandshare_share_requests_total",
        "bandshare_access_requests_total",
        "bandshare_usage_acknowledged_bytes_total",
    ];
    for l in cluster
        .coordinator
        .state
        .render_metrics()
        .lines()
        .filter(|l| wanted.iter().any(|w| l.starts_with(w)))
    {
        out!("   {l}");
    }
    for f in r.requester.pool.counters.recent_failovers() {
        out!(
            "   requester failover: {} -> {} ({})",
            f.from,
            f.to.as_deref().unwrap_or("none"),
            f.cause
        );
    }
    r.stop();
    for s in &cluster.sharers {
        s.kill();
    }
    scale_out().await?;
    out!("demo finished in {:.1} s", t0.elapsed().as_secs_f64());
    Ok(())
}

/// Step 9: two coordinators on one Redis Cluster are one service: a share
/// request at one offers a sharer whose stream is on the other (the access
/// request routed through Redis); the one holding it stops, the sharer
/// moves to the other. Needs redis-server (skipped with a line otherwise).
async fn scale_out() -> anyhow::Result<()> {
    use bandshare_local::CoordinatorNode;
    use bandshare_local::redis_cluster::{self, RedisCluster};
    if !redis_cluster::available() {
        out!(
            "\n9. Scale out: skipped, redis-server is not installed (apt-get install redis-server redis-tools,\n   then this step runs two coordinators on a Redis Cluster as one service)"
        );
        return Ok(());
    }
    out!(
        "\n9. Scale out: two coordinators on one Redis Cluster (3 masters + 3 replicas, started for the demo)"
    );
    let redis = tokio::task::spawn_blocking(RedisCluster::start).await?;
    let urls: Vec<String> = redis.urls().split(',').map(String::from).collect();
    let a = CoordinatorNode::start_clustered(Config::default(), &urls).await?;
    let b = CoordinatorNode::start_clustered(Config::default(), &urls).await?;
    let both: bandshare_agent::client::ServerUrl =
        format!("{},{}", a.grpc_addr, b.grpc_addr).parse()?;
    let frank =
        bandshare_local::SharerNode::start(&both, &SharerSpec::new("frank", 5.0, 0.0)).await?;
    let on_a = |a: &CoordinatorNode| a.state.registry().local_len() == 1;
    wait_until(Duration::from_secs(10), || on_a(&a) || on_a(&b)).await;
    let (holder, other) = if on_a(&a) { (a, b) } else { (b, a) };
    out!(
        "   frank (given both addresses) holds its stream on {}",
        holder.grpc_addr
    );
    let ask = |url: bandshare_agent::client::ServerUrl| async move {
        let key = bandshare_agent::identity::generate()?;
        let loc = LocationSpec {
            at: Some(center()),
            ..Default::default()
        };
        let ch = bandshare_agent::client::connect(&url).await?;
        let t = Instant::now();
        let r = bandshare_agent::client::share_request(
            ch,
            bandshare_agent::client::share_request_from(
                &key,
                &loc,
                &ConditionSpec::default(),
                false,
            ),
        )
        .await?;
        anyhow::Ok((
            r.offers
                .iter()
                .map(|o| o.sharer.clone())
                .collect::<Vec<_>>(),
            t.elapsed(),
        ))
    };
    wait_until(Duration::from_secs(5), || other.state.registry().len() == 1).await;
    let (names, took) = ask(other.url.clone()).await?;
    out!(
        "   a share request at {} offers {:?} in {:.1} ms (the access request went to {} through Redis)",
        other.grpc_addr,
        names,
        took.as_secs_f64() * 1e3,
        holder.grpc_addr
    );
    let t = Instant::now();
    holder.stop().await;
    wait_until(Duration::from_secs(10), || {
        other.state.registry().local_len() == 1
    })
    .await;
    let (names, _) = ask(other.url.clone()).await?;
    out!(
        "   the coordinator holding it stops: frank re-registers on {} in {:.1} s, which offers {:?}",
        other.grpc_addr,
        t.elapsed().as_secs_f64(),
        names
    );
    frank.kill();
    other.stop().await;
    drop(redis);
    Ok(())
}

/// Step 7: devices report their links along a street (Observe); the QoS
/// map predicts, along a new rider's track, the weak stretch before it,
/// and a one-second dip further on that every rider met.
async fn learn_and_predict(cluster: &Cluster) -> anyhow::Result<()> {
    use bandshare_agent::qos;
    const SPEED: f64 = 8.0;
    const DIP: f64 = 672.0;
    let weak = 240.0..400.0;
    out!(
        "
7. Learn and predict: 3 cyclists reported their own link along a street east \
         ({:.0}-{:.0} m is weak, and each lost it for a second at {DIP:.0} m)",
        weak.start,
        weak.end
    );
    let ch = bandshare_agent::client::connect(&cluster.coordinator.url).await?;
    let now = bandshare_core::clock::unix_now() as f64;
    for d in 0..3 {
        let key = bandshare_agent::identity::generate()?;
        let samples = (0..100)
            .map(|i| {
                let x = i as f64 * SPEED;
                let p = center().offset_m(x, 0.0);
                bandshare_proto::v1::QosSample {
                    t_unix_ms: ((now - 3000.0 + d as f64 * 600.0 + i as f64) * 1000.0) as u64,
                    lat: p.lat,
                    lon: p.lon,
                    duration_ms: 1000,
                    down_kbps: if weak.contains(&x) || x == DIP {
                        60.0
                    } else {
                        9000.0
                    },
                    ..Default::default()
                }
            })
            .collect();
        qos::observe(ch.clone(), &key, samples, |_| {}).await?;
    }
    let track: Vec<bandshare_qos::track::Point> = (0..76)
        .map(|i| {
            let p = center().offset_m(i as f64 * SPEED, 0.0);
            bandshare_qos::track::Point {
                t: now + i as f64,
                pos: Some((p.lat, p.lon)),
            }
        })
        .collect();
    let key = bandshare_agent::identity::generate()?;
    let got = qos::predict(ch.clone(), &key, &track, 0.0, 60).await?;
    out!("   a new rider's track, each point answered from the points before it:");
    for (i, p) in got
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 8 == 0 || *i == 30)
    {
        // The expected throughput is the cell's time-weighted mean: a cell
        // that is weak most of the time can still average well above the
        // threshold, so a weak one says so.
        let what = match (p.weak, p.weak_in_s) {
            (true, _) => {
                "but weak most of the time here: new flows go through a sharer".to_string()
            }
            (false, Some(s)) => format!("weak zone ahead in {s:.0} s"),
            (false, None) => "no weak zone ahead".to_string(),
        };
        out!(
            "   {:>3.0} m: {:>5} kbit/s on average, {what}",
            i as f64 * SPEED,
            p.expected_kbps.map_or("-".into(), |k| format!("{k:.0}"))
        );
    }
    // Where the map says a short dip recurs though the place is not weak.
    let cells = qos::published(ch).await?;
    let origin = center();
    // The street runs east from the origin: a cell's distance along it is
    // its centre's longitude's.
    let east_m = |h3: u64| {
        let b = bandshare_qos::cell_boundary(h3)?;
        let lon = b.iter().map(|(_, lon)| lon).sum::<f64>() / b.len().max(1) as f64;
        Some(origin.ground_distance_m(&bandshare_core::Position { lon, ..origin }))
    };
    let dips: Vec<String> = cells
        .cells
        .iter()
        .filter(|c| c.dips_recur && !c.weak && c.dip_share.is_some_and(|s| s >= 0.5))
        .filter_map(|c| east_m(c.h3))
        .filter(|x| *x > weak.end)
        .map(|x| format!("{x:.0} m"))
        .collect();
    if !dips.is_empty() {
        out!(
            "   the cell around {} is not weak (a second of each pass), but every pass dipped \
             there: the map warns of it ahead (from its wider parent cell on) like a weak zone",
            dips.join(", ")
        );
    }
    out!(
        "   (connect --via auto moves new flows to a full pool --predict-lead {:.0} s before such a \
         zone, and keeps them there --predict-tail {:.0} s after its last warning)",
        bandshare_qos::eval::READY_LEAD_S,
        bandshare_qos::eval::READY_TAIL_S
    );
    Ok(())
}

/// Step 4: the own link's probe target goes silent; new flows move to the
/// pool, which fills.
async fn own_link_goes_silent(
    r: &bandshare_local::RequesterNode,
    gateway: &Gateway,
) -> anyhow::Result<()> {
    out!("\n4. The own link goes silent (packets vanish, the interface stays up)");
    gateway.cut().await?;
    let t = Instant::now();
    let moved = wait_until(Duration::from_secs(5), || {
        r.requester.direct.path() == Path::Pool
    })
    .await;
    anyhow::ensure!(moved, "new flows never moved to the pool");
    out!(
        "   after {:.0} ms new flows go through sharers; the pool fills to 3",
        t.elapsed().as_secs_f64() * 1000.0
    );
    wait_until(Duration::from_secs(5), || r.requester.pool.len() == 3).await;
    Ok(())
}

/// Step 6: the own link answers again; new flows return after the hold.
async fn own_link_answers_again(
    r: &bandshare_local::RequesterNode,
    gateway: &Gateway,
) -> anyhow::Result<()> {
    out!("\n6. The own link answers again: new flows return after a 2 s hold and a trial download");
    gateway.restore();
    let t = Instant::now();
    let back = wait_until(Duration::from_secs(10), || {
        r.requester.direct.path() == Path::Direct
    })
    .await;
    anyhow::ensure!(back, "new flows never returned to the own link");
    out!(
        "   back to the own link after {:.1} s",
        t.elapsed().as_secs_f64()
    );
    // Probes answer on a rate-limited link too: the return waited for a
    // trial download over it.
    if let Some(trial) = r.requester.direct.status().last_trial {
        out!("   trial download over it first: {trial}");
    }
    Ok(())
}

/// Where everything runs and who shares what.
fn print_setup(cluster: &Cluster, specs: &[(SharerSpec, &str)]) {
    let port = cluster.target.addr.port();
    out!(
        "coordinator   {}   (SQLite store in {})",
        cluster.coordinator.url,
        cluster.coordinator.data_dir.path().display()
    );
    out!(
        "web target    http://localhost:{port}/   (loopback: sharers reach it only through --allow-egress 127.0.0.1/32:{port})"
    );
    out!("sharers around {:.4},{:.4}:", center().lat, center().lon);
    for (s, place) in specs {
        let net = s.network.map_or("-", |n| n.as_str());
        out!(
            "  {:<6} {:<11} services {:<18} network {net}",
            s.name,
            place,
            s.services.to_string()
        );
    }
}

/// Step 4: kills the active sharer and shows new flows moving on.
async fn fail_over(
    cluster: &Cluster,
    r: &bandshare_local::RequesterNode,
    first: &str,
    port: u16,
) -> anyhow::Result<()> {
    out!("\n5. Kill the active sharer {first}: its stream ends and its relay closes");
    cluster
        .sharer(first)
        .ok_or_else(|| anyhow::anyhow!("no sharer {first}"))?
        .kill();
    let before = cluster.sharers.len();
    let gone = wait_until(Duration::from_secs(5), || {
        cluster.coordinator.online() < before
    })
    .await;
    out!(
        "   coordinator: {} sharers online{}",
        cluster.coordinator.online(),
        if gone {
            format!(", {first} is no longer offered")
        } else {
            String::new()
        }
    );
    let second = fetch(r, port, "/again").await?;
    anyhow::ensure!(second != first, "traffic did not move away from {first}");
    out!("   new flows moved from {first} to {second}");
    Ok(())
}

fn indent(s: &str) -> String {
    s.lines()
        .map(|l| {
            if l.is_empty() {
                String::new()
            } else {
                format!("   {l}")
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Which path carries new flows, the own link, and the pool.
fn print_paths(r: &bandshare_local::RequesterNode) {
    let own = r.requester.direct.status();
    out!(
        "   new flows: {}   own link {} (rtt {}, loss {:.0} %, {} flows)",
        r.requester.direct.path().as_str(),
        own.state,
        own.rtt_ms.map_or("-".into(), |v| format!("{v:.2} ms")),
        own.loss * 100.0,
        own.flows
    );
    for m in r.requester.pool.status().pool {
        out!(
            "   {} {:<6} {:<7} rtt {:>5.2} ms  score {:.3}  flows {}  bytes {}/{}",
            if m.active { "*" } else { " " },
            m.sharer,
            m.distance,
            m.rtt_ms,
            m.score,
            m.flows,
            m.bytes_up,
            m.bytes_down
        );
    }
}

/// Fetches a page through the requester's SOCKS port; returns the sharer used.
async fn fetch(
    r: &bandshare_local::RequesterNode,
    port: u16,
    path: &str,
) -> anyhow::Result<String> {
    let t = Instant::now();
    let direct_before = r.requester.direct.status().flows;
    let (status, body) = socks_get(r.socks(), "localhost", port, path).await?;
    let via = if r.requester.direct.status().flows > direct_before {
        "the own link".to_string()
    } else {
        r.active().unwrap_or_else(|| "?".into())
    };
    anyhow::ensure!(body.contains(PAGE_TITLE), "unexpected page: {body}");
    out!(
        "   {status} in {:.1} ms via {via}",
        t.elapsed().as_secs_f64() * 1000.0
    );
    for line in body.lines().take(2) {
        out!("   | {line}");
    }
    Ok(via)
}
