//! Pre-connect through a real coordinator: three devices report a line
//! whose middle stretch is weak (Observe), then a requester with `--via
//! auto` moves along it. Before it reaches the weak stretch its prediction
//! (Predict along its own track) moves new flows to the pool while its own
//! link is still fine; after the stretch they go direct again. `/status`
//! shows the prediction acted on.

use bandshare_agent::requester::forecast::Options;
use bandshare_agent::requester::own_link::{Path, State, Via};
use bandshare_agent::{client, identity, location::LocationSpec, qos};
use bandshare_proto::v1;
use bandshare_testkit::{Cluster, SharerSpec, center, exact_config};
use std::time::{Duration, Instant};

/// Metres per second along the line (east of the centre): a fast train,
/// below the coordinator's plausible 120 m/s.
const SPEED: f64 = 100.0;
/// The weak stretch.
const WEAK: std::ops::Range<f64> = 1200.0..2000.0;
const LENGTH: f64 = 3300.0;
/// Seconds new flows stay on the pool after the last warning.
const TAIL_S: f64 = 5.0;

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_predicted_weak_zone_moves_new_flows_to_the_pool_before_it_and_back_after() {
    // Three sharers every 500 m up to the weak stretch's end, so a full
    // pool is possible anywhere before and in it.
    let specs = (0..15)
        .map(|i| {
            SharerSpec::new(
                &format!("s{i}"),
                (i / 3) as f64 * 500.0,
                10.0 * (i % 3) as f64,
            )
        })
        .collect();
    let c = Cluster::start_with(exact_config(), specs)
        .await
        .expect("cluster");
    let ch = client::connect(&c.coordinator.url).await.expect("channel");
    // Three devices rode the line in the last hour (1 Hz samples).
    let start = unix_now() - 3000.0;
    for d in 0..3 {
        let key = identity::generate().expect("key");
        let t0 = start + d as f64 * 600.0;
        let samples: Vec<v1::QosSample> = (0..=(LENGTH / SPEED) as usize)
            .map(|i| {
                let x = i as f64 * SPEED;
                let p = center().offset_m(x, 0.0);
                v1::QosSample {
                    t_unix_ms: ((t0 + i as f64) * 1000.0) as u64,
                    lat: p.lat,
                    lon: p.lon,
                    duration_ms: 1000,
                    down_kbps: if WEAK.contains(&x) { 40.0 } else { 8000.0 },
                    ..Default::default()
                }
            })
            .collect();
        let (got, why) = qos::observe(ch.clone(), &key, samples, |_| {})
            .await
            .expect("observe");
        assert_eq!(got.rejected, 0, "{why:?}");
    }

    let mut opts = c.requester_options();
    opts.via = Via::Auto;
    // A short tail: the ride after the stretch lasts 13 s.
    opts.predict = Some(Options {
        lead_s: 5.0,
        tail_s: TAIL_S,
        ..Default::default()
    });
    let r = c.requester(opts).await.expect("requester");
    let req = &r.requester;
    assert_eq!(req.direct.path(), Path::Direct, "own link first");

    // Ride, moved every 100 ms.
    let began = Instant::now();
    let mut acted_at = None;
    let mut back_at = None;
    let mut seen_pool_members = 0;
    let mut state_when_acting = None;
    while began.elapsed() < Duration::from_secs_f64(LENGTH / SPEED) {
        let x = began.elapsed().as_secs_f64() * SPEED;
        // Position only (with its speed the scene would be a vehicle,
        // served by co-moving sharers alone).
        req.relocate(LocationSpec {
            at: Some(center().offset_m(x, 0.0)),
            ..Default::default()
        });
        let f = req.forecasts.status();
        if acted_at.is_none() && f.acting {
            acted_at = Some((x, f.clone()));
            state_when_acting = Some(req.direct.state());
            assert_eq!(req.direct.path(), Path::Pool, "{f:?}");
        }
        if acted_at.is_some() && req.direct.path() == Path::Pool {
            seen_pool_members = seen_pool_members.max(req.pool.status().pool.len());
        }
        if acted_at.is_some() && back_at.is_none() && !f.acting && x > WEAK.end {
            back_at = Some(x);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (x, f) = acted_at.expect("the prediction acted");
    eprintln!(
        "acted at {x:.0} m ({:.1} s before the weak stretch): {f:?}; back direct at {back_at:?} m; {seen_pool_members} members",
        (WEAK.start - x) / SPEED
    );
    assert!(x < WEAK.start, "acted only at {x:.0} m");
    assert!(
        f.weak_in_s.is_some_and(|s| s > 0.0) || f.weak,
        "acting on a weak zone ahead: {f:?}"
    );
    assert_ne!(
        state_when_acting,
        Some(State::Degraded),
        "the own link was still fine"
    );
    assert!(
        seen_pool_members >= 2,
        "the pool filled past its standby of 1: {seen_pool_members}"
    );
    let back = back_at.expect("back to direct after the stretch");
    // The last warning came at the stretch's end at the latest (plus an
    // ask's 2 s), and the tail runs from there.
    assert!(
        back > WEAK.end + (TAIL_S - 2.0) * SPEED * 0.5 && back < LENGTH,
        "{back}"
    );

    // /status carries the prediction.
    let ctl = req.control_addr.expect("control");
    let out = tokio::process::Command::new("curl")
        .args(["-s", &format!("http://{ctl}/status")])
        .output()
        .await
        .expect("curl");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert!(v["forecast"]["asked_unix"].as_u64().is_some(), "{v}");
    assert_eq!(v["forecast"]["lead_s"], 5.0, "{v}");
    r.stop();
    c.coordinator.stop().await;
}

/// Sharers' state reports feed the map too: three sharers whose uplink is
/// down (their uplink check gets no answer) make their cell weak.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sharers_whose_uplink_is_down_mark_their_cell_weak() {
    let mut config = exact_config();
    config.report_interval = Duration::from_millis(500);
    // Nothing listens on port 1: every uplink check fails.
    let specs = (0..3)
        .map(|i| {
            SharerSpec::new(&format!("down{i}"), i as f64 * 5.0, 0.0).uplink_check("127.0.0.1:1")
        })
        .collect();
    let c = Cluster::start_with(config, specs).await.expect("cluster");
    let ch = client::connect(&c.coordinator.url).await.expect("channel");
    let began = Instant::now();
    let mut cells = v1::CellsResponse::default();
    while began.elapsed() < Duration::from_secs(30) {
        cells = qos::published(ch.clone()).await.expect("cells");
        if cells.cells.iter().any(|c| c.weak) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!(
        "after {:.1} s: {:?}",
        began.elapsed().as_secs_f64(),
        cells.cells
    );
    // (The first reports, before the checks failed, count the loopback
    // interface's real traffic as the uplink's rate.)
    assert!(
        cells.cells.iter().any(|c| c.weak && c.weak_share >= 0.5),
        "a weak cell where the sharers are: {cells:?}"
    );
    c.coordinator.stop().await;
}

fn cell_of(p: bandshare_core::Position, res: u32) -> u64 {
    let res = h3o::Resolution::try_from(res as u8).expect("resolution");
    u64::from(
        h3o::LatLng::new(p.lat, p.lon)
            .expect("a place")
            .to_cell(res),
    )
}

/// A requester on the pool path reports what its sharer carried, vouched
/// for by the ticket that admitted it: the map gets it where the sharer
/// is (which the requester never learns), not where the requester is. A
/// ticket issued to another device, a forged one or one far outside its
/// time vouches for nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_sharer_carried_is_reported_where_the_sharer_is_with_its_ticket() {
    let mut config = exact_config();
    config.qos.map.k = 1;
    config.qos.map.min_weight_s = 1.0;
    let c = Cluster::start_with(config, vec![SharerSpec::new("east", 150.0, 0.0)])
        .await
        .expect("cluster");
    let ch = client::connect(&c.coordinator.url).await.expect("channel");
    let here = center();
    let there = center().offset_m(150.0, 0.0);
    let res = qos::published(ch.clone()).await.expect("cells").resolution;
    assert_ne!(cell_of(here, res), cell_of(there, res), "two cells apart");

    let mut opts = c.requester_options();
    opts.predict = Some(Options {
        report_every: Duration::from_secs(1),
        ..Default::default()
    });
    let r = c.requester(opts).await.expect("requester");
    let req = &r.requester;
    assert!(
        bandshare_testkit::wait_until(Duration::from_secs(10), || !req.pool.is_empty()).await,
        "the sharer joined the pool"
    );
    // Download through the sharer until a report of it was taken.
    let began = Instant::now();
    while req.forecasts.status().reported_through == 0 && began.elapsed() < Duration::from_secs(20)
    {
        let (status, body) = bandshare_testkit::http::socks_get(
            r.socks(),
            "127.0.0.1",
            c.target.addr.port(),
            "/bytes/2000000",
        )
        .await
        .expect("through the sharer");
        assert!(status.contains("200"), "{status}");
        assert_eq!(body.len(), 2_000_000);
    }
    let f = req.forecasts.status();
    assert!(f.reported_through >= 1, "{f:?}");
    assert_eq!(f.reported, 0, "the own link carried nothing: {f:?}");
    let cells = qos::published(ch.clone()).await.expect("cells");
    eprintln!("{f:?}\n{:?}", cells.cells);
    let at = |p| cells.cells.iter().find(|x| x.h3 == cell_of(p, res));
    let sharers = at(there).expect("a cell where the sharer is");
    assert!(
        !sharers.weak && sharers.kbps > 250.0,
        "what it carried: {sharers:?}"
    );
    assert!(at(here).is_none(), "nothing where the requester is");
    r.stop();

    // The same reports by hand: only the device the ticket was issued to
    // may make one, and only around the ticket's time.
    let me = identity::generate().expect("key");
    let offers = c
        .ask_as(
            &me,
            LocationSpec {
                at: Some(here),
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .expect("offers");
    let ticket = offers.offers.first().expect("an offer").ticket.clone();
    let sample = |ticket: &[u8], ago_s: f64| v1::QosSample {
        t_unix_ms: ((unix_now() - ago_s) * 1000.0) as u64,
        lat: here.lat,
        lon: here.lon,
        duration_ms: 1000,
        down_kbps: 9000.0,
        through_ticket: ticket.to_vec(),
        ..Default::default()
    };
    let report = |key: ed25519_dalek::SigningKey, s: v1::QosSample| {
        let ch = ch.clone();
        async move {
            qos::observe(ch, &key, vec![s], |_| {})
                .await
                .expect("observe")
        }
    };
    let (got, why) = report(me.clone(), sample(&ticket, 0.0)).await;
    assert_eq!((got.accepted, got.rejected), (1, 0), "{why:?}");
    let other = identity::generate().expect("key");
    let (got, why) = report(other, sample(&ticket, 0.0)).await;
    assert_eq!(got.accepted, 0);
    assert!(why[0].contains("another requester"), "{why:?}");
    let mut forged = ticket.clone();
    forged[70] ^= 1; // a later expiry
    let (got, why) = report(me.clone(), sample(&forged, 0.0)).await;
    assert_eq!(got.accepted, 0);
    assert!(why[0].contains("does not verify"), "{why:?}");
    let (got, why) = report(me.clone(), sample(b"junk", 0.0)).await;
    assert_eq!(got.accepted, 0);
    assert!(why[0].contains("malformed ticket"), "{why:?}");
    let (got, why) = report(me.clone(), sample(&ticket, 3.0 * 3600.0)).await;
    assert_eq!(got.accepted, 0);
    assert!(why[0].contains("outside its ticket's time"), "{why:?}");
    c.coordinator.stop().await;
}
