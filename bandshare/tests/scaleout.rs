//! Scale-out on a real Redis Cluster (three masters, three replicas of the
//! system's redis-server, started here on free ports): two `bandshare
//! server --redis` processes are one service. A share request at B offers
//! the sharers whose streams are on A, and the requester reaches them (the
//! access requests are routed through Redis); kill -9 of A moves its
//! sharers to B (they were given both addresses) while the requester's
//! pool keeps fetching; kill -9 of a Redis master stops nothing.

use bandshare_agent::client::{self, ServerUrl};
use bandshare_agent::identity;
use bandshare_agent::location::{ConditionSpec, LocationSpec};
use bandshare_core::EgressRule;
use bandshare_testkit::http::{HttpTarget, socks_get};
use bandshare_testkit::process::Process;
use bandshare_testkit::redis_cluster::RedisCluster;
use bandshare_testkit::{SharerNode, SharerSpec, center, wait_until};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const EXE: &str = env!("CARGO_BIN_EXE_bandshare");

/// A coordinator of the service on `listen`, its store in `data`.
fn coordinator(
    listen: &str,
    data: &std::path::Path,
    redis: &RedisCluster,
) -> (Process, SocketAddr, SocketAddr) {
    let urls = redis.urls();
    let (p, grpc) = Process::server(EXE, listen, data, &["--redis", &urls]);
    let http = p
        .addr("http", Duration::from_secs(5))
        .expect("http address");
    (p, grpc, http)
}

/// A loopback port free now (for a coordinator started later, whose
/// address the sharers are given in advance).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// `GET /status` of a coordinator, as JSON (curl, as an operator would).
fn status(http: SocketAddr) -> serde_json::Value {
    let out = std::process::Command::new("curl")
        .args(["-s", "--max-time", "2", &format!("http://{http}/status")])
        .output()
        .expect("curl");
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

/// `GET /metrics` of a coordinator.
fn metrics(http: SocketAddr) -> String {
    let out = std::process::Command::new("curl")
        .args(["-s", "--max-time", "2", &format!("http://{http}/metrics")])
        .output()
        .expect("curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn count(v: &serde_json::Value, path: &[&str]) -> u64 {
    let mut cur = v;
    for p in path {
        cur = &cur[*p];
    }
    cur.as_u64().unwrap_or(0)
}

/// The names a share request at `url` is offered.
async fn offered(url: &ServerUrl) -> Vec<String> {
    let Ok(key) = identity::generate() else {
        return vec![];
    };
    let loc = LocationSpec {
        at: Some(center()),
        ..Default::default()
    };
    let Ok(ch) = client::connect(url).await else {
        return vec![];
    };
    let req = client::share_request_from(&key, &loc, &ConditionSpec::default(), false);
    match client::share_request(ch, req).await {
        Ok(r) => {
            let mut n: Vec<String> = r.offers.into_iter().map(|o| o.sharer).collect();
            n.sort();
            n
        }
        Err(_) => vec![],
    }
}

async fn until_offered(url: &ServerUrl, names: &[&str], timeout: Duration) -> Option<Duration> {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        let got = offered(url).await;
        if names.iter().all(|n| got.iter().any(|g| g == n)) {
            return Some(t0.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

#[test]
fn two_coordinators_are_one_service_and_survive_kill_9_of_one_and_of_a_redis_master() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let mut redis = RedisCluster::start();
        let (da, db) = (
            tempfile::tempdir().expect("dir"),
            tempfile::tempdir().expect("dir"),
        );
        let dt = tempfile::tempdir().expect("dir");
        let (mut a, a_grpc, a_http) = coordinator("127.0.0.1:0", da.path(), &redis);
        let b_port = free_port();
        // Both addresses: B is not up yet, so every sharer starts on A.
        let both: ServerUrl = format!("{a_grpc},127.0.0.1:{b_port}")
            .parse()
            .expect("urls");
        let target = HttpTarget::start().await.expect("target");
        let rule: EgressRule = format!("127.0.0.1/32:{}", target.addr.port())
            .parse()
            .expect("rule");
        let mut sharers = vec![];
        for (name, east) in [("alice", 10.0), ("bob", -10.0)] {
            sharers.push(
                SharerNode::start(&both, &SharerSpec::new(name, east, 0.0).allow(rule))
                    .await
                    .expect("sharer"),
            );
        }
        assert!(
            wait_until(Duration::from_secs(10), || count(
                &status(a_http),
                &["cluster", "local_sharers"]
            ) == 2)
            .await,
            "the sharers never came online at A: {}",
            status(a_http)
        );
        let (_b, b_grpc, b_http) = coordinator(&format!("127.0.0.1:{b_port}"), db.path(), &redis);
        let b_url: ServerUrl = b_grpc.to_string().parse().expect("url");

        // 1. B offers A's sharers: its index learned them from Redis, and
        // the access requests went to A and back.
        let took = until_offered(&b_url, &["alice", "bob"], Duration::from_secs(10)).await;
        let took = took
            .unwrap_or_else(|| panic!("B never offered A's sharers; B status {}", status(b_http)));
        println!(
            "B offered A's two sharers {:.0} ms after it started",
            took.as_secs_f64() * 1e3
        );
        let sb = status(b_http);
        assert_eq!(count(&sb, &["online_sharers"]), 2, "{sb}");
        assert_eq!(count(&sb, &["cluster", "local_sharers"]), 0, "{sb}");
        let m = metrics(b_http);
        for line in [
            "bandshare_cluster_redis_up 1",
            "bandshare_cluster_local_sharers 0",
            "bandshare_online_sharers 2",
        ] {
            assert!(
                m.lines().any(|l| l == line),
                "no {line:?} in B's /metrics:\n{m}"
            );
        }

        // A requester of B reaches them: its tickets (signed by B with the
        // service's key) verify at sharers that only ever talked to A.
        let key = identity::generate().expect("key");
        let (_trigger, shutdown) = bandshare_agent::Shutdown::new();
        let mut opts = bandshare_testkit::requester_options(&b_url);
        opts.pool_size = 2;
        let requester = bandshare_agent::requester::Requester::start(opts, key, shutdown)
            .await
            .expect("requester");
        let socks = requester.socks_addr.expect("socks");
        assert!(
            wait_until(Duration::from_secs(10), || requester.pool.len() == 2).await,
            "the pool never filled through B"
        );
        let (st, body) = socks_get(socks, "127.0.0.1", target.addr.port(), "/bytes/100000")
            .await
            .expect("fetch through a sharer offered by B");
        assert!(st.contains("200") && body.len() == 100_000, "{st}");

        // The QoS map is the service's: three devices report a weak street
        // at A; B publishes the cell (k = 3).
        observe_weak_street(&a_url_of(a_grpc)).await;
        let published = wait_until_async(Duration::from_secs(10), || published_cells(&b_url)).await;
        assert!(
            published > 0,
            "B never published what A learned: {}",
            status(b_http)
        );
        println!("QoS: {published} cell(s) learned at A published by B");

        // 2. kill -9 A: its sharers re-register on B; the pool keeps
        // fetching meanwhile.
        let _ = a.child.kill();
        let _ = a.child.wait();
        let t0 = Instant::now();
        let mut fetched = 0;
        while count(&status(b_http), &["cluster", "local_sharers"]) < 2 {
            assert!(
                t0.elapsed() < Duration::from_secs(15),
                "A's sharers never moved to B: {}",
                status(b_http)
            );
            let (st, _) = socks_get(socks, "127.0.0.1", target.addr.port(), "/bytes/1000")
                .await
                .expect("the pool keeps fetching while A is gone");
            assert!(st.contains("200"), "{st}");
            fetched += 1;
        }
        let moved = t0.elapsed();
        println!(
            "after kill -9 of A: its sharers on B in {:.0} ms ({fetched} fetches meanwhile)",
            moved.as_secs_f64() * 1e3
        );
        let again = until_offered(&b_url, &["alice", "bob"], Duration::from_secs(10)).await;
        assert!(again.is_some(), "B does not offer the moved sharers");
        println!(
            "offered by B again {:.0} ms after the kill",
            t0.elapsed().as_secs_f64() * 1e3
        );

        // 3. A coordinator on A's port again, and kill -9 of the Redis
        // master holding the shard: the replica is promoted, matching and
        // routing go on.
        let (a2, a2_grpc, a2_http) = coordinator(&a_grpc.to_string(), da.path(), &redis);
        let a2_url: ServerUrl = a2_grpc.to_string().parse().expect("url");
        // It starts with the service's QoS map (aggregates from Redis).
        let published =
            wait_until_async(Duration::from_secs(10), || published_cells(&a2_url)).await;
        assert!(
            published > 0,
            "a new coordinator started without the QoS map: {}",
            status(a2_http)
        );
        assert!(
            until_offered(&a2_url, &["alice", "bob"], Duration::from_secs(10))
                .await
                .is_some(),
            "a new coordinator does not offer B's sharers: {}",
            status(a2_http)
        );
        let shard = redis.cli(&["SMEMBERS", "bs:shards"]);
        let shard = shard.lines().next().unwrap_or_default().trim().to_string();
        let master = redis
            .master_of(&format!("bs:{{p:{shard}}}:feed"))
            .expect("the shard's master");
        redis.kill(master);
        let t1 = Instant::now();
        redis.wait_promoted(master, Duration::from_secs(20));
        println!(
            "Redis master {master} killed: cluster ok again in {:.0} ms",
            t1.elapsed().as_secs_f64() * 1e3
        );
        // A sharer joining now is seen through the promoted replica.
        let carol = SharerNode::start(&b_url, &SharerSpec::new("carol", 0.0, 10.0).allow(rule))
            .await
            .expect("sharer");
        let t2 = until_offered(&a2_url, &["alice", "bob", "carol"], Duration::from_secs(15)).await;
        assert!(
            t2.is_some(),
            "after the failover the new coordinator never offered carol: {}\n{}",
            status(a2_http),
            a2.stderr()
        );
        println!(
            "after the master's kill: routed offers of carol at A2 {:.0} ms after it started",
            t2.unwrap_or_default().as_secs_f64() * 1e3
        );
        let (st, _) = socks_get(socks, "127.0.0.1", target.addr.port(), "/bytes/200000")
            .await
            .expect("fetch after the failover");
        assert!(st.contains("200"), "{st}");

        // 4. No acknowledged byte lost. Usage is acknowledged only once a
        // replica holds it, so the shard that lost its replica with the
        // master acknowledges again when the old master is back (as a
        // replica); then the ledger in Redis holds exactly what the sharers
        // relayed.
        redis.restart(master);
        redis.wait_ok(Duration::from_secs(20));
        let all_acked = wait_until(Duration::from_secs(20), || {
            sharers.iter().all(|s| {
                s.sharer.unacked.is_empty()
                    && s.sharer.unacked.acked_bytes() == s.sharer.relay.total_bytes()
            })
        })
        .await;
        assert!(all_acked, "usage never acknowledged after the failover");
        for s in &sharers {
            let ledger = ledger_total(&redis, &s.key);
            assert_eq!(
                ledger,
                s.sharer.relay.total_bytes(),
                "{}: the ledger in Redis holds what the sharer relayed",
                s.name
            );
            println!(
                "{}: relayed {} bytes, ledger {} bytes",
                s.name,
                s.sharer.relay.total_bytes(),
                ledger
            );
        }

        // 5. Names are the service's: another device calling itself alice
        // at the other coordinator is refused.
        let mut thief = Process::bandshare(
            EXE,
            &[
                "share",
                "--server",
                &a2_grpc.to_string(),
                "--name",
                "alice",
                "--at",
                "39.9042,116.4074",
                "--relay",
                "127.0.0.1:0",
                "--data",
                &dt.path().display().to_string(),
            ],
        )
        .expect("spawn share");
        let exit = thief.wait_exit(Duration::from_secs(20));
        assert!(
            exit.is_some_and(|e| !e.success())
                && thief.stderr().contains("belongs to another device"),
            "a second alice was let in: {exit:?}\n{}",
            thief.stderr()
        );

        // 6. A revocation through Redis reaches every coordinator: bob
        // (on B) is ended and offered by neither.
        let bob = sharers.iter().find(|s| s.name == "bob").expect("bob");
        let prefix = bob.key.to_string()[..16].to_string();
        let out = std::process::Command::new(EXE)
            .args(["admin", "--redis", &redis.urls(), "revoke", &prefix])
            .output()
            .expect("admin revoke");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let gone = wait_until(Duration::from_secs(10), || {
            count(&status(b_http), &["cluster", "local_sharers"]) == 2
        })
        .await;
        assert!(gone, "bob still on B: {}", status(b_http));
        let mut left = vec![];
        for _ in 0..50 {
            left = offered(&a2_url).await;
            if !left.iter().any(|n| n == "bob") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            !left.iter().any(|n| n == "bob"),
            "bob is still offered after the revocation: {left:?}"
        );
        let list = std::process::Command::new(EXE)
            .args(["admin", "--redis", &redis.urls(), "list"])
            .output()
            .expect("admin list");
        let list = String::from_utf8_lossy(&list.stdout).into_owned();
        assert!(
            list.contains(&bob.key.to_string()) && list.contains("revoked"),
            "{list}"
        );

        // 7. Tickets: offered by one coordinator, refreshed by another.
        let key = identity::generate().expect("key");
        let loc = LocationSpec {
            at: Some(center()),
            ..Default::default()
        };
        let ch = client::connect(&a2_url).await.expect("A2");
        let req = client::share_request_from(&key, &loc, &ConditionSpec::default(), false);
        let offers = client::share_request(ch, req).await.expect("offers").offers;
        assert!(!offers.is_empty());
        let (proof, signed_at_unix) =
            bandshare_core::ticket::sign_request(&key, bandshare_core::clock::unix_now());
        let ch = client::connect(&b_url).await.expect("B");
        let refreshed = bandshare_proto::v1::matchmaker_client::MatchmakerClient::new(ch)
            .refresh_tickets(bandshare_proto::v1::TicketRefresh {
                requester_key: key.verifying_key().to_bytes().to_vec(),
                sharer_keys: offers.iter().map(|o| o.sharer_key.clone()).collect(),
                proof,
                signed_at_unix,
            })
            .await
            .expect("refresh at B")
            .into_inner()
            .offers;
        assert_eq!(refreshed.len(), offers.len(), "B refreshes what A2 offered");

        // 8. A key rotation through Redis: both coordinators sign with the
        // new key within seconds, and its tickets verify at every sharer.
        let out = std::process::Command::new(EXE)
            .args(["admin", "--redis", &redis.urls(), "rotate-key"])
            .output()
            .expect("admin rotate-key");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let signing = |http: SocketAddr| {
            let out = std::process::Command::new("curl")
                .args(["-s", "--max-time", "2", &format!("http://{http}/api/trust")])
                .output()
                .expect("curl");
            String::from_utf8_lossy(&out.stdout).contains("signing with key 2")
        };
        assert!(
            wait_until(Duration::from_secs(10), || signing(b_http)
                && signing(a2_http))
            .await,
            "the rotation did not reach both coordinators"
        );
        let (_t2, shutdown) = bandshare_agent::Shutdown::new();
        let fresh = bandshare_agent::requester::Requester::start(
            bandshare_testkit::requester_options(&a2_url),
            identity::generate().expect("key"),
            shutdown,
        )
        .await
        .expect("requester");
        assert!(
            wait_until(Duration::from_secs(10), || fresh
                .pool
                .status()
                .active
                .is_some())
            .await,
            "no pool with tickets of the new key"
        );
        let (st, _) = socks_get(
            fresh.socks_addr.expect("socks"),
            "127.0.0.1",
            target.addr.port(),
            "/bytes/1000",
        )
        .await
        .expect("fetch with a ticket of the new key");
        assert!(st.contains("200"), "{st}");
        fresh.pool.close_all();
        carol.kill();
        for s in &sharers {
            s.kill();
        }
        requester.pool.close_all();
    });
}

fn a_url_of(grpc: SocketAddr) -> ServerUrl {
    grpc.to_string().parse().expect("url")
}

/// Three devices each report 20 one-second samples of 100 kbit/s at one
/// spot near the centre (weak: below 250 kbit/s).
async fn observe_weak_street(url: &ServerUrl) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    let c = center();
    for _ in 0..3 {
        let key = identity::generate().expect("key");
        let samples = (0..20u64)
            .map(|i| bandshare_proto::v1::QosSample {
                t_unix_ms: now - 30_000 + i * 1000,
                lat: c.lat,
                lon: c.lon,
                duration_ms: 1000,
                down_kbps: 100.0,
                ..Default::default()
            })
            .collect();
        let ch = client::connect(url).await.expect("connect");
        let (got, why) = bandshare_agent::qos::observe(ch, &key, samples, |_| {})
            .await
            .expect("observe");
        assert_eq!(got.rejected, 0, "{why:?}");
    }
}

/// How many cells the coordinator at `url` publishes.
async fn published_cells(url: &ServerUrl) -> usize {
    match client::connect(url).await {
        Ok(ch) => bandshare_agent::qos::published(ch)
            .await
            .map_or(0, |c| c.cells.len()),
        Err(_) => 0,
    }
}

/// Polls `f` until it gives a non-zero count, at most `timeout`.
async fn wait_until_async<F: std::future::Future<Output = usize>>(
    timeout: Duration,
    mut f: impl FnMut() -> F,
) -> usize {
    let t0 = Instant::now();
    loop {
        let n = f().await;
        if n > 0 || t0.elapsed() > timeout {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Bytes both ways in the Redis ledger of sharer `key`.
fn ledger_total(redis: &RedisCluster, key: &bandshare_core::DeviceKey) -> u64 {
    let hex = key.to_string();
    let out = redis.cli(&[
        "HMGET",
        &format!("bs:{{u:{hex}}}:usage"),
        "total:up",
        "total:down",
    ]);
    out.lines()
        .filter_map(|l| l.trim().parse::<u64>().ok())
        .sum()
}

#[test]
fn with_redis_unreachable_coordinators_serve_their_own_sharers_say_unavailable_and_recover() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let redis = RedisCluster::start();
        let (da, db) = (
            tempfile::tempdir().expect("dir"),
            tempfile::tempdir().expect("dir"),
        );
        let (_a, a_grpc, a_http) = coordinator("127.0.0.1:0", da.path(), &redis);
        let (_b, b_grpc, b_http) = coordinator("127.0.0.1:0", db.path(), &redis);
        let a_url: ServerUrl = a_grpc.to_string().parse().expect("url");
        let b_url: ServerUrl = b_grpc.to_string().parse().expect("url");
        let alice = SharerNode::start(&a_url, &SharerSpec::new("alice", 10.0, 0.0))
            .await
            .expect("sharer");
        assert!(
            until_offered(&b_url, &["alice"], Duration::from_secs(10))
                .await
                .is_some(),
            "B never offered alice: {}",
            status(b_http)
        );

        // Every Redis node stopped: connections stay open, nothing answers.
        redis.signal_all("STOP");
        let t0 = Instant::now();
        // A still offers its own sharer from memory.
        let got = offered(&a_url).await;
        assert_eq!(
            got,
            vec!["alice".to_string()],
            "A lost its own sharer: {}",
            status(a_http)
        );
        // B, once alice's presence has expired from its index, answers
        // UNAVAILABLE and says why.
        let key = identity::generate().expect("key");
        let loc = LocationSpec {
            at: Some(center()),
            ..Default::default()
        };
        let mut said = String::new();
        while t0.elapsed() < Duration::from_secs(20) {
            let ch = client::connect(&b_url).await.expect("B answers");
            let req = client::share_request_from(&key, &loc, &ConditionSpec::default(), false);
            match client::share_request(ch, req).await {
                Err(e) if e.status_code() == Some(tonic::Code::Unavailable) => {
                    said = e.to_string();
                    break;
                }
                other => {
                    println!(
                        "B at {:.1} s: {:?}",
                        t0.elapsed().as_secs_f64(),
                        other.map(|r| r.offers.len())
                    );
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
            }
        }
        println!(
            "B with Redis stopped, after {:.1} s: {said}",
            t0.elapsed().as_secs_f64()
        );
        assert!(said.contains("Redis Cluster is unreachable"), "{said:?}");
        assert_eq!(status(b_http)["cluster"]["redis_reachable"], false);
        assert!(
            metrics(b_http)
                .lines()
                .any(|l| l == "bandshare_cluster_redis_up 0")
        );
        // A sharer arriving now is not let in without its name bound...
        let dave = SharerNode::start(&a_url, &SharerSpec::new("dave", 0.0, 10.0))
            .await
            .expect("sharer");
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(count(&status(a_http), &["cluster", "local_sharers"]), 1);
        assert!(offered(&a_url).await.iter().all(|n| n != "dave"));

        // ...and once Redis answers again, both coordinators recover without
        // a restart: dave comes online, both are offered at B.
        redis.signal_all("CONT");
        let t1 = Instant::now();
        let back = until_offered(&b_url, &["alice", "dave"], Duration::from_secs(20)).await;
        assert!(back.is_some(), "no recovery: {}", status(b_http));
        println!(
            "Redis continued: B offers alice and dave after {:.1} s",
            t1.elapsed().as_secs_f64()
        );
        assert_eq!(status(b_http)["cluster"]["redis_reachable"], true);
        alice.kill();
        dave.kill();
    });
}
