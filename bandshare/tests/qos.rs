//! The QoS map through the real binary: `qos import` trains a coordinator
//! from recorded traces, `qos predict` answers point by point (causally),
//! `qos map --geojson` exports the published cells, the map survives a
//! restart, and bad observations and tracks get clear answers. The real
//! traces come from `../shared/qos-data` (skipped, saying so, when absent).

use bandshare_testkit::process::Process;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;

const EXE: &str = env!("CARGO_BIN_EXE_bandshare");

fn server(data: &Path) -> (Process, String) {
    let (p, grpc) = Process::server(EXE, "127.0.0.1:0", data, &[]);
    (p, format!("http://{grpc}"))
}

fn stop(mut p: Process) {
    p.signal("TERM");
    assert!(
        p.wait_exit(Duration::from_secs(15)).is_some(),
        "server stops on SIGTERM"
    );
}

/// Runs bandshare; its stdout as JSON, or a panic with its stderr.
fn json(args: &[&str]) -> Value {
    let out = bandshare_testkit::process::run_once(EXE, args, &[], None);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON on stdout")
}

fn data_dir() -> PathBuf {
    std::env::var_os("BANDSHARE_QOS_DATA").map_or_else(
        || {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../shared/qos-data"
            ))
        },
        PathBuf::from,
    )
}

/// A Norway log as a `time,lat,lon` track, and its rows' (duration, weak).
fn track_of(log: &Path, out: &Path) -> Vec<(f64, bool)> {
    let text = std::fs::read_to_string(log).expect("log");
    let rows = bandshare_qos::track::parse_norway(&text).expect("parse");
    let mut csv = String::from("time,lat,lon\n");
    for r in &rows {
        match r.pos {
            Some((a, b)) => csv.push_str(&format!("{},{a},{b}\n", r.t)),
            None => csv.push_str(&format!("{},,\n", r.t)),
        }
    }
    std::fs::write(out, csv).expect("write track");
    rows.iter()
        .map(|r| (r.duration_s, r.down_kbps < 250.0))
        .collect()
}

#[test]
fn metro_runs_train_a_map_that_predicts_the_held_out_run_and_survives_a_restart() {
    let route = data_dir().join("norway-hsdpa/derived-logs/metro.kalbakken-jernbanetorget");
    let Ok(dir) = std::fs::read_dir(&route) else {
        eprintln!("SKIP: no traces under {}", route.display());
        return;
    };
    let mut runs: Vec<PathBuf> = dir.filter_map(|e| e.ok().map(|e| e.path())).collect();
    runs.sort();
    let held = runs.pop().expect("a run to hold out");
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("server");
    let (srv, url) = server(&data);

    let mut args = vec![
        "qos",
        "import",
        "--server",
        &url,
        "--format",
        "norway-hsdpa",
    ];
    args.extend(["--device-per-file", "--fill-gaps", "600", "--json"]);
    let files: Vec<String> = runs.iter().map(|p| p.display().to_string()).collect();
    args.extend(files.iter().map(String::as_str));
    let imported = json(&args);
    eprintln!("import: {imported}");
    assert!(imported["accepted"].as_u64() > Some(10_000), "{imported}");
    assert_eq!(imported["rejected"], 0, "{imported}");

    let track = tmp.path().join("held.csv");
    let truth = track_of(&held, &track);
    let t = track.to_str().expect("utf-8");
    let got = json(&["qos", "predict", "--server", &url, "--track", t, "--json"]);
    let points = got["points"].as_array().expect("points");
    assert_eq!(points.len(), truth.len(), "one answer per row");
    let mut s = bandshare_qos::eval::Score::default();
    for (p, (dur, weak)) in points.iter().zip(&truth) {
        s.add(p["weak"].as_bool().expect("weak"), *weak, *dur);
        let c = p["confidence"].as_f64().expect("confidence");
        assert!((0.0..=1.0).contains(&c), "{p}");
    }
    eprintln!(
        "held-out run {}: F1 {:.3} (P {:.2} R {:.2})",
        held.display(),
        s.f1(),
        s.precision(),
        s.recall()
    );
    assert!(s.f1() > 0.7, "{s:?}");
    assert!(
        points
            .iter()
            .any(|p| p["weak_in_s"].as_f64().is_some_and(|w| w > 5.0)),
        "a weak zone is announced ahead"
    );

    // Causal: the first half alone gets the same answers.
    let half = tmp.path().join("half.csv");
    let text = std::fs::read_to_string(&track).expect("track");
    let n = truth.len() / 2;
    let head: Vec<&str> = text.lines().take(n + 1).collect();
    std::fs::write(&half, head.join("\n")).expect("half");
    let h = half.to_str().expect("utf-8");
    let first = json(&["qos", "predict", "--server", &url, "--track", h, "--json"]);
    assert_eq!(
        first["points"].as_array().map(|v| &v[..]),
        Some(&points[..n])
    );

    let geo = json(&["qos", "map", "--server", &url, "--geojson"]);
    let features = geo["features"].as_array().expect("features");
    assert!(features.len() >= 20, "{} cells", features.len());
    let ring = &features[0]["geometry"]["coordinates"][0];
    assert_eq!(ring.as_array().map(Vec::len), Some(7), "a closed hexagon");
    assert!(features.iter().any(|f| f["properties"]["weak"] == true));
    // Every cell counted passes; somewhere most passes dipped where the
    // weak share alone does not say so.
    assert!(features.iter().all(|f| {
        f["properties"]["dip_share"]
            .as_f64()
            .is_some_and(|d| (0.0..=1.0).contains(&d))
    }));
    assert!(
        features
            .iter()
            .any(|f| f["properties"]["dips_recur"] == true && f["properties"]["weak"] == false)
    );

    // The map is in the store: a restarted coordinator publishes the same.
    stop(srv);
    let (srv, url) = server(&data);
    let again = json(&["qos", "map", "--server", &url, "--geojson"]);
    assert_eq!(again["features"], geo["features"]);
    stop(srv);
}

#[test]
fn implausible_samples_one_device_and_bad_tracks_get_clear_answers() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (srv, url) = server(&tmp.path().join("server"));
    // A Norway-format log whose device jumps 111 km in 10 s.
    let log = tmp.path().join("teleport.log");
    let mut text = String::new();
    for i in 0..20 {
        let lat = if i == 10 { 60.9 } else { 59.9 };
        text.push_str(&format!(
            "{} {} {lat} 10.7 30000 1000\n",
            1_285_653_600 + i,
            i * 1000
        ));
    }
    std::fs::write(&log, text).expect("log");
    let l = log.to_str().expect("utf-8");
    let got = json(&[
        "qos",
        "import",
        "--server",
        &url,
        "--format",
        "norway-hsdpa",
        "--json",
        l,
    ]);
    assert_eq!(got["accepted"], 19, "{got}");
    assert_eq!(got["rejected"], 1, "{got}");
    assert!(
        got["reasons"][0]
            .as_str()
            .is_some_and(|r| r.contains("implausible speed")),
        "{got}"
    );
    // One device is fewer than k = 3: nothing is published.
    let geo = json(&["qos", "map", "--server", &url, "--geojson"]);
    assert_eq!(geo["features"].as_array().map(Vec::len), Some(0), "{geo}");

    let bad = tmp.path().join("bad.csv");
    let b = bad.to_str().expect("utf-8");
    for (content, needle) in [
        (
            "time,lat,lon\n10,59.9,10.7\n5,59.9,10.7\n",
            "line 3: time 5 is before",
        ),
        ("t,x,y\n", "header must be time,lat,lon"),
        ("time,lat,lon\n1,91,10\n", "not a latitude"),
        (
            "<gpx><trk><trkpt lat=\"1\" lon=\"2\"></trkpt></trk></gpx>",
            "has no <time>",
        ),
    ] {
        std::fs::write(&bad, content).expect("track");
        bandshare_testkit::process::fails_with_one_line(
            EXE,
            &["qos", "predict", "--server", &url, "--track", b],
            needle,
        );
    }
    bandshare_testkit::process::fails_with_one_line(
        EXE,
        &["qos", "import", "--server", &url, "--format", "gpx", l],
        "invalid value 'gpx'",
    );
    bandshare_testkit::process::fails_with_one_line(
        EXE,
        &["qos", "import", "--server", &url, "--format", "ucc-5g", l],
        "no column",
    );
    stop(srv);
}

#[test]
fn bench_qos_reports_every_route_against_the_baseline() {
    let data = data_dir();
    if !data.join("norway-hsdpa").is_dir() {
        eprintln!("SKIP: no traces under {}", data.display());
        bandshare_testkit::process::fails_with_one_line(
            EXE,
            &["bench", "qos", "--data", "/nonexistent", "--json"],
            "no traces under /nonexistent",
        );
        return;
    }
    let d = data.to_str().expect("utf-8");
    let out = bandshare_testkit::process::run_once(
        EXE,
        &["bench", "qos", "--data", d, "--json"],
        &[],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(text.lines().last().expect("a line")).expect("JSON");
    let routes = v["norway"].as_array().expect("routes");
    assert_eq!(routes.len(), 5, "{v}");
    let metro = &routes[0];
    assert_eq!(metro["route"], "metro.kalbakken-jernbanetorget");
    assert_eq!(metro["targets"]["f1_above_baseline"], true, "{metro}");
    assert!(
        metro["map"]["warned_5_30s"].as_f64() >= Some(0.85),
        "{metro}"
    );
    bandshare_testkit::process::fails_with_one_line(
        EXE,
        &["bench", "qos", "--data", "/nonexistent"],
        "no traces under /nonexistent",
    );
}
