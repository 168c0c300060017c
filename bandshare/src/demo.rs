//! `bandshare demo`: a coordinator, five sharers at different places with
//! different services and network types, a local web target and a
//! requester, all real and all on loopback in this process. It shows who
//! matched and why the others did not, fetches a page through the active
//! sharer, kills that sharer and fetches again through the next one.

use bandshare_agent::location::{ConditionSpec, LocationSpec};
use bandshare_coordinator::Config;
use bandshare_core::{NetworkType, Service};
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
    println!(
        "bandshare demo: a coordinator, 5 sharers, a web target and a requester, on loopback\n"
    );
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
    println!("\n1. A requester at the centre asks for offers (wants: hotspot)");
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
    println!("{}", indent(&crate::render::offers_table(&resp, true)));
    println!(
        "   (distance bands are measured from a point 15-25 m from the requester, fixed per device,\n    so faked positions cannot trilaterate a sharer; alice at 8 m may show as 10-50m)"
    );

    println!("\n2. It connects to a pool of 3 and serves SOCKS5 locally");
    let mut opts = cluster.requester_options();
    opts.conditions = conditions;
    let r = cluster.requester(opts).await?;
    print_pool(&r);

    println!(
        "\n3. GET http://localhost:{port}/hello through SOCKS5 {} (as curl --socks5-hostname would; the sharer resolves the name)",
        r.socks()
    );
    let first = fetch(&r, port, "/hello").await?;

    fail_over(&cluster, &r, &first, port).await?;
    print_pool(&r);

    let ledger = cluster.coordinator.state.store().clone();
    wait_until(Duration::from_secs(3), || {
        ledger.usage_rows().unwrap_or(0) > 0
    })
    .await;
    println!(
        "\nusage ledger: {} rows in {}",
        ledger.usage_rows()?,
        ledger.path().display()
    );
    println!("demo finished in {:.1} s", t0.elapsed().as_secs_f64());
    r.stop();
    for s in &cluster.sharers {
        s.kill();
    }
    Ok(())
}

/// Where everything runs and who shares what.
fn print_setup(cluster: &Cluster, specs: &[(SharerSpec, &str)]) {
    let port = cluster.target.addr.port();
    println!(
        "coordinator   {}   (SQLite store in {})",
        cluster.coordinator.url,
        cluster.coordinator.data_dir.path().display()
    );
    println!(
        "web target    http://localhost:{port}/   (loopback: sharers reach it only through --allow-egress 127.0.0.1/32:{port})"
    );
    println!("sharers around {:.4},{:.4}:", center().lat, center().lon);
    for (s, place) in specs {
        let net = s.network.map_or("-", |n| n.as_str());
        println!(
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
    println!("\n4. Kill the active sharer {first}: its stream ends and its relay closes");
    cluster
        .sharer(first)
        .ok_or_else(|| anyhow::anyhow!("no sharer {first}"))?
        .kill();
    let before = cluster.sharers.len();
    let gone = wait_until(Duration::from_secs(5), || {
        cluster.coordinator.online() < before
    })
    .await;
    println!(
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
    println!("   new flows moved from {first} to {second}");
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

fn print_pool(r: &bandshare_local::RequesterNode) {
    for m in r.requester.pool.status().pool {
        println!(
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
    let (status, body) = socks_get(r.socks(), "localhost", port, path).await?;
    let via = r.active().unwrap_or_else(|| "?".into());
    anyhow::ensure!(body.contains(PAGE_TITLE), "unexpected page: {body}");
    println!(
        "   {status} in {:.1} ms via {via}",
        t.elapsed().as_secs_f64() * 1000.0
    );
    for line in body.lines().take(2) {
        println!("   | {line}");
    }
    Ok(via)
}
