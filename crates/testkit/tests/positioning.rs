//! Live positions: a real gpsd, fed by gpsfake from an NMEA log this test
//! writes, drives a sharer (`--gpsd`); the coordinator's index follows it.

use bandshare_agent::location::{ConditionSpec, LocationSpec};
use bandshare_testkit::{Cluster, SharerSpec, center, wait_until};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

struct Gpsfake(Child);

impl Drop for Gpsfake {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// gpsfake on a free loopback port, or `None` (with a SKIP line) where
/// gpsd is not installed. gpsfake cannot bind port 0 and print it, so a
/// port is picked and, if gpsfake dies at once (taken meanwhile), another.
fn start_gpsfake(log: &std::path::Path) -> Option<(Gpsfake, u16)> {
    if Command::new("gpsfake").arg("-h").output().is_err() {
        eprintln!(
            "SKIP: gpsfake is not installed (apt install gpsd gpsd-clients, as scripts/test does)"
        );
        return None;
    }
    for _ in 0..5 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a loopback port");
        let child = Command::new("gpsfake")
            .args(["-q", "-1", "-c", "0.1", "-P", &port.to_string()])
            .arg(log)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn gpsfake");
        let mut g = Gpsfake(child);
        std::thread::sleep(Duration::from_millis(300));
        if matches!(g.0.try_wait(), Ok(None)) {
            return Some((g, port));
        }
    }
    panic!("gpsfake exited at once on five ports");
}

fn nmea(body: &str) -> String {
    let sum = body.bytes().fold(0u8, |a, b| a ^ b);
    format!("${body}*{sum:02X}\r\n")
}

fn ddmm(v: f64, width: usize) -> String {
    let d = v.abs().trunc();
    let m = (v.abs() - d) * 60.0;
    format!("{:0width$}{m:07.4}", d as u32)
}

/// A track heading north from the centre, one fix per step.
fn track(steps: usize, step_deg: f64) -> String {
    let mut log = String::new();
    for i in 0..steps {
        let lat = center().lat + i as f64 * step_deg;
        let (la, lo) = (ddmm(lat, 2), ddmm(center().lon, 3));
        let t = format!("1200{:02}.00", i % 60);
        log += &nmea(&format!("GPRMC,{t},A,{la},N,{lo},E,19.4,0.0,241126,,,A"));
        log += &nmea(&format!("GPGGA,{t},{la},N,{lo},E,1,09,0.9,44.0,M,-8.0,M,,"));
        log += &nmea("GPGSA,A,3,01,02,03,04,05,06,07,08,09,,,,1.5,0.9,1.2");
    }
    log
}

async fn offered_near(c: &Cluster, north_m: f64) -> Vec<(String, String)> {
    let loc = LocationSpec {
        at: Some(center().offset_m(0.0, north_m)),
        ..Default::default()
    };
    match c.ask(loc, ConditionSpec::default()).await {
        Ok(r) => r
            .offers
            .into_iter()
            .map(|o| (o.sharer, o.distance_band))
            .collect(),
        Err(_) => vec![],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sharer_follows_gpsd_and_the_index_follows_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("track.nmea");
    // 12 steps of 0.0005° (~55.6 m) north: ~611 m in all.
    std::fs::write(&log, track(12, 0.0005)).expect("write log");
    let Some((_gps, port)) = start_gpsfake(&log) else {
        return;
    };

    let c = Cluster::start(vec![
        SharerSpec::new("mobile", 0.0, 0.0).gpsd(&format!("127.0.0.1:{port}")),
        SharerSpec::new("fixed", 0.0, 0.0),
    ])
    .await
    .expect("sharer gets a fix from gpsd and comes online");

    // The track ends ~611 m north; the index must follow there.
    let mut last = vec![];
    let mut followed = false;
    for _ in 0..150 {
        last = offered_near(&c, 611.0).await;
        if last
            .iter()
            .any(|(n, b)| n == "mobile" && (b == "<10m" || b == "10-50m"))
        {
            followed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        followed,
        "the coordinator never saw the sharer at the end of its track: {last:?}"
    );
    // ... and it is no longer at the start, where "fixed" still is.
    let start = offered_near(&c, 0.0).await;
    assert!(start.iter().any(|(n, _)| n == "fixed"), "{start:?}");
    assert!(!start.iter().any(|(n, _)| n == "mobile"), "{start:?}");
    // The sharer's altitude came from the 3-D fix (44 m above mean sea level).
    let got_alt = wait_until(Duration::from_secs(2), || {
        c.coordinator
            .state
            .registry()
            .position_of("mobile")
            .is_some_and(|p| p.alt == Some(44.0))
    })
    .await;
    assert!(
        got_alt,
        "{:?}",
        c.coordinator.state.registry().position_of("mobile")
    );
}
