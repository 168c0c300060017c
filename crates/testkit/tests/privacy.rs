//! An attacker who fakes positions tries to trilaterate a sharer through the
//! real coordinator; rate limits and plausibility are enforced per device;
//! live positions never reach the disk.

use bandshare_agent::identity;
use bandshare_agent::location::{ConditionSpec, LocationSpec};
use bandshare_coordinator::Config;
use bandshare_core::Position;
use bandshare_testkit::{Cluster, SharerSpec, center, exact_config};

/// Where the target really is, metres east and north of the centre.
const TARGET: (f64, f64) = (37.0, 21.0);

/// The target's band for one share request of `me` claiming to be `e`, `n`
/// metres from the centre, if it was offered.
async fn band_at(c: &Cluster, me: &ed25519_dalek::SigningKey, e: f64, n: f64) -> Option<String> {
    let loc = LocationSpec {
        at: Some(center().offset_m(e, n)),
        ..Default::default()
    };
    let r = c
        .ask_as(me, loc, ConditionSpec::default())
        .await
        .expect("share request");
    r.offers
        .iter()
        .find(|o| o.sharer == "target")
        .map(|o| o.distance_band.clone())
}

/// The centroid of the points where the innermost band was seen, that
/// band, and how many points.
fn innermost_centroid(by_band: &[(String, f64, f64)]) -> Option<((f64, f64), &'static str, usize)> {
    let inner = ["<10m", "10-50m", "50-200m"]
        .into_iter()
        .find(|b| by_band.iter().any(|x| x.0 == *b))?;
    let pts: Vec<&(String, f64, f64)> = by_band.iter().filter(|x| x.0 == inner).collect();
    let (e, n) = pts.iter().fold((0.0, 0.0), |a, x| (a.0 + x.1, a.1 + x.2));
    Some((
        (e / pts.len() as f64, n / pts.len() as f64),
        inner,
        pts.len(),
    ))
}

/// Sweeps a grid of claimed positions with one key, notes the target's band
/// at each, and estimates the target as the centroid of the innermost band
/// seen. Returns the estimate's error in metres.
async fn attack(config: Config) -> f64 {
    let c = Cluster::start_with(config, vec![SharerSpec::new("target", TARGET.0, TARGET.1)])
        .await
        .expect("cluster");
    let me = identity::generate().expect("key");
    let mut by_band: Vec<(String, f64, f64)> = vec![];
    for i in -10..=30 {
        for j in -10..=25 {
            let (e, n) = (i as f64 * 4.0, j as f64 * 4.0);
            if let Some(band) = band_at(&c, &me, e, n).await {
                by_band.push((band, e, n));
            }
        }
    }
    let (guess, inner, points) =
        innermost_centroid(&by_band).expect("the target was offered somewhere");
    let error = (guess.0 - TARGET.0).hypot(guess.1 - TARGET.1);
    eprintln!(
        "attacker: {} queries, innermost band {inner} at {} points, error {error:.1} m",
        41 * 36,
        points
    );
    error
}

fn unlimited(mut c: Config) -> Config {
    // The attacker here is patient; lift the limits so the test runs in
    // seconds. The rate limit and plausibility have their own test below.
    c.privacy.requests_per_minute = 1e9;
    c.privacy.burst = 1e9;
    c.privacy.max_speed_mps = 1e9;
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trilateration_misses_by_at_least_the_band_width() {
    // Without the offset, bands alone give the target away within metres.
    let naive = attack(unlimited(exact_config())).await;
    assert!(
        naive < 10.0,
        "the attack should work without the offset, error {naive:.1} m"
    );
    // With the sharer shown at its secret offset point it cannot get closer than
    // the <10m band's width.
    let defended = attack(unlimited(Config::default())).await;
    eprintln!("best position error: {naive:.1} m without the offset, {defended:.1} m with it");
    assert!(
        defended >= 10.0,
        "attacker located the sharer within {defended:.1} m"
    );
}

/// One key's sweep: a 5 m grid of claimed positions over 90 m x 90 m around
/// the target, started at its own corner (each key walks its own path);
/// the estimate is the centroid of the innermost band it saw.
async fn sweep(c: &Cluster, k: usize) -> Option<(f64, f64)> {
    let me = identity::generate().expect("key");
    let (e0, n0) = (
        TARGET.0 - 45.0 + (k % 5) as f64,
        TARGET.1 - 45.0 + (k / 5 % 5) as f64,
    );
    let mut by_band: Vec<(String, f64, f64)> = vec![];
    for i in 0..19 {
        for j in 0..19 {
            // A walk: up one column, down the next.
            let j = if i % 2 == 0 { j } else { 18 - j };
            let (e, n) = (e0 + i as f64 * 5.0, n0 + j as f64 * 5.0);
            if let Some(band) = band_at(c, &me, e, n).await {
                by_band.push((band, e, n));
            }
        }
    }
    innermost_centroid(&by_band).map(|(g, _, _)| g)
}

/// Many keys, one machine: 32 fresh keys sweep the target at once (11,552
/// share requests) and average their estimates. Per-key noise would
/// average away; the target is shown at one point for every key, so the
/// average lands on that point, not on the target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_keys_averaged_still_miss_by_at_least_the_band_width() {
    const KEYS: usize = 32;
    let run = |config: Config, keys: usize| async move {
        let c = Cluster::start_with(config, vec![SharerSpec::new("target", TARGET.0, TARGET.1)])
            .await
            .expect("cluster");
        let guesses: Vec<(f64, f64)> = futures::future::join_all((0..keys).map(|k| sweep(&c, k)))
            .await
            .into_iter()
            .map(|g| g.expect("the target was offered"))
            .collect();
        let per_key: Vec<f64> = guesses
            .iter()
            .map(|g| (g.0 - TARGET.0).hypot(g.1 - TARGET.1))
            .collect();
        let (e, n) = guesses
            .iter()
            .fold((0.0, 0.0), |a, g| (a.0 + g.0, a.1 + g.1));
        let avg = (e / keys as f64, n / keys as f64);
        let averaged = (avg.0 - TARGET.0).hypot(avg.1 - TARGET.1);
        let lo = per_key.iter().cloned().fold(f64::MAX, f64::min);
        let hi = per_key.iter().cloned().fold(0.0, f64::max);
        (averaged, lo, hi)
    };
    // Without offsets the same attack finds the target within metres (four
    // keys are plenty).
    let (naive, _, _) = run(unlimited(exact_config()), 4).await;
    let (averaged, lo, hi) = run(unlimited(Config::default()), KEYS).await;
    eprintln!(
        "{KEYS} keys x 361 queries = {} share requests: each key {lo:.1}-{hi:.1} m off, \
         their average {averaged:.1} m off (without offsets: {naive:.1} m)",
        KEYS * 361
    );
    assert!(
        naive < 10.0,
        "the attack should work without offsets: {naive:.1} m"
    );
    assert!(
        averaged >= 10.0,
        "{KEYS} keys together located the sharer within {averaged:.1} m"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limited_and_no_teleporting() {
    let c = Cluster::start_with(Config::default(), vec![SharerSpec::new("target", 5.0, 5.0)])
        .await
        .expect("cluster");
    let me = identity::generate().expect("key");
    let here = LocationSpec {
        at: Some(center()),
        ..Default::default()
    };
    for _ in 0..10 {
        c.ask_as(&me, here.clone(), ConditionSpec::default())
            .await
            .expect("within the burst");
    }
    let e = c
        .ask_as(&me, here.clone(), ConditionSpec::default())
        .await
        .expect_err("over the limit");
    assert!(e.to_string().contains("rate limited"), "{e}");

    let you = identity::generate().expect("key");
    c.ask_as(&you, here, ConditionSpec::default())
        .await
        .expect("first request");
    let far = LocationSpec {
        at: Some(center().offset_m(5000.0, 0.0)),
        ..Default::default()
    };
    let e = c
        .ask_as(&you, far, ConditionSpec::default())
        .await
        .expect_err("5 km in a moment");
    assert!(e.to_string().contains("implausible movement"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_positions_never_reach_the_disk() {
    let c = Cluster::start(vec![SharerSpec::new("target", TARGET.0, TARGET.1)])
        .await
        .expect("cluster");
    let r = c.requester(c.requester_options()).await.expect("requester");
    let (status, _) =
        bandshare_testkit::http::socks_get(r.socks(), "localhost", c.target.addr.port(), "/")
            .await
            .expect("fetch");
    assert!(status.contains("200"));
    let ledger = c.coordinator.state.store().clone();
    bandshare_testkit::wait_until(std::time::Duration::from_secs(5), || {
        ledger.usage_rows().unwrap_or(0) > 0
    })
    .await;
    let p: Position = center().offset_m(TARGET.0, TARGET.1);
    let mut needles: Vec<Vec<u8>> = vec![];
    for v in [p.lat, p.lon] {
        needles.push(v.to_le_bytes().to_vec());
        needles.push(v.to_be_bytes().to_vec());
        needles.push(format!("{v:.4}").into_bytes());
    }
    let mut files = 0;
    for entry in std::fs::read_dir(c.coordinator.data_dir.path()).expect("data dir") {
        let path = entry.expect("entry").path();
        let bytes = std::fs::read(&path).expect("read");
        files += 1;
        for n in &needles {
            assert!(
                !bytes.windows(n.len()).any(|w| w == n.as_slice()),
                "{} holds a live coordinate",
                path.display()
            );
        }
    }
    assert!(files >= 1);
}

/// Every sharer inside the scene's region around the requester is offered,
/// whatever secret offset it is shown at: circles and spheres are searched
/// past their edge by the largest offset, the car's box tests the exact
/// point. Sharers (each with its own key, so its own offset) sit just
/// inside the edge in 24 directions (in the station also above and below,
/// in the car at its four corners); each of 4 requester keys must be
/// offered all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn privacy_does_not_shrink_any_region() {
    use bandshare_core::Scene;
    let mut config = unlimited(Config::default());
    config.fanout = 64;
    config.max_offers = 64;
    let inside = |r: f64| -> Vec<(f64, f64)> {
        (0..24)
            .map(|k| {
                let a = k as f64 * std::f64::consts::TAU / 24.0;
                (r * a.sin(), r * a.cos())
            })
            .collect()
    };
    let outdoor: Vec<SharerSpec> = inside(198.0)
        .into_iter()
        .enumerate()
        .map(|(k, (e, n))| SharerSpec::new(&format!("o{k}"), e, n))
        .chain([SharerSpec::new("o-near", 3.0, 0.0)])
        .collect();
    let mut station: Vec<SharerSpec> = inside(58.0)
        .into_iter()
        .enumerate()
        .map(|(k, (e, n))| SharerSpec::new(&format!("s{k}"), e, n).alt(10.0))
        .collect();
    // A level up and a level down, within the 60 m sphere in 3-D.
    station.push(SharerSpec::new("s-up", 30.0, 0.0).alt(10.0 + 50.0));
    station.push(SharerSpec::new("s-down", 0.0, -20.0).alt(10.0 - 55.0));
    // An eastbound train at 15 m/s; the car is 25 m x 4 m.
    let car: Vec<SharerSpec> = [(12.0, 1.5), (12.0, -1.5), (-12.0, 1.5), (-12.0, -1.5)]
        .into_iter()
        .enumerate()
        .map(|(k, (e, n))| SharerSpec::new(&format!("c{k}"), e, n).moving(15.0, 90.0))
        .collect();
    for (scene, sharers) in [
        (Scene::Outdoor, outdoor),
        (Scene::Station, station),
        (Scene::Vehicle, car),
    ] {
        let want: Vec<String> = sharers.iter().map(|s| s.name.clone()).collect();
        let c = Cluster::start_with(config.clone(), sharers)
            .await
            .expect("cluster");
        let mut worst = usize::MAX;
        for _ in 0..4 {
            let me = identity::generate().expect("key");
            let mut at = center();
            at.alt = Some(10.0);
            let mut loc = LocationSpec {
                at: Some(at),
                scene: Some(scene),
                ..Default::default()
            };
            if scene == Scene::Vehicle {
                loc.at = Some(center());
                loc.speed_mps = Some(15.0);
                loc.heading_deg = Some(90.0);
            }
            let r = c
                .ask_as(&me, loc, ConditionSpec::default())
                .await
                .expect("share request");
            let got: Vec<&str> = r.offers.iter().map(|o| o.sharer.as_str()).collect();
            let missing: Vec<&String> =
                want.iter().filter(|w| !got.contains(&w.as_str())).collect();
            assert!(
                missing.is_empty(),
                "{scene:?}: sharers shown at their offsets were missed: {missing:?} (offered {got:?})"
            );
            worst = worst.min(got.len());
            // Bands stay useful: the sharer 3 m away is never `50-200m`.
            if let Some(o) = r.offers.iter().find(|o| o.sharer == "o-near") {
                assert!(
                    ["<10m", "10-50m"].contains(&o.distance_band.as_str()),
                    "{}",
                    o.distance_band
                );
            }
        }
        eprintln!(
            "{scene:?}: all {} members offered to each of 4 keys (fewest offers {worst})",
            want.len()
        );
    }
}
