//! `bench qos`: the QoS map on the real commute traces in
//! `../shared/qos-data` — leave-one-run-out per Norway HSDPA route and on
//! the UCC 5G driving traces, against the reference baseline (100 m grid,
//! weak when ≥ 50 % of its training time was) in the same run, with the
//! issue's targets checked per route, and the ceiling: the same map with
//! the held-out run in its training, what a map of place and time can
//! reach on these runs at all. Onsets ready: weak onsets, however short,
//! with a forecast within the requester's lead out just before (or within
//! its tail), with and without warnings of recurring dips.

use bandshare_qos::eval::{RouteReport, leave_one_run_out};
use bandshare_qos::track::{Reading, parse_norway, parse_ucc};
use bandshare_qos::{Config, Horizon};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};

pub struct QosOptions {
    pub data: PathBuf,
}

/// The routes evaluated, with (F1 target, warned-ahead target) where the
/// issue sets one.
const NORWAY: [(&str, Option<f64>, Option<f64>); 5] = [
    ("metro.kalbakken-jernbanetorget", Some(0.85), Some(0.85)),
    ("ferry.nesoddtangen-oslo", None, Some(0.85)),
    ("tram.ljabru-jernbanetorget", None, None),
    ("bus.ljansbakken-oslo", None, None),
    ("car.snaroya-smestad", Some(0.85), Some(0.85)),
];

fn files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    v.sort();
    Ok(v)
}

fn runs(
    dir: &Path,
    parse: fn(&str) -> Result<Vec<Reading>, bandshare_qos::track::TrackError>,
) -> anyhow::Result<Vec<Vec<Reading>>> {
    files(dir)?
        .iter()
        .map(|f| {
            let text = std::fs::read_to_string(f)?;
            parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))
        })
        .collect()
}

fn r3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// One route's figures; `plain` is the same evaluation without warnings of
/// recurring dips, for what they add and cost.
fn report(
    name: &str,
    r: &RouteReport,
    plain: &RouteReport,
    f1_target: Option<f64>,
    warn_target: Option<f64>,
) -> Value {
    let f1 = r.map.f1();
    let base = r.baseline.f1();
    eprintln!(
        "{name:<32} runs {:>2}  weak {:>4.1} %  F1 {:.3} (P {:.2} R {:.2})  baseline {:.3}  ceiling {:.3}  warned {:>3.0} % (baseline {:>3.0} %)  predicted/true weak {:.2}  warning out {:>3.0} % of the time, followed {:>3.0} % (any time {:>3.0} %)  onsets ready {:>3.0} % of {} at {:>3.0} % of the time (without recurring dips {:>3.0} % at {:>3.0} %)",
        r.runs,
        100.0 * r.weak_seconds / r.seconds.max(1e-9),
        f1,
        r.map.precision(),
        r.map.recall(),
        base,
        r.ceiling.f1(),
        r.warned * 100.0,
        r.baseline_warned * 100.0,
        r.map.weak_ratio(),
        r.warning_time * 100.0,
        r.warnings_followed * 100.0,
        r.any_time_followed * 100.0,
        r.onsets_ready * 100.0,
        r.onsets,
        r.ready_time * 100.0,
        plain.onsets_ready * 100.0,
        plain.ready_time * 100.0
    );
    json!({
        "route": name,
        "runs": r.runs,
        "hours": r3(r.seconds / 3600.0),
        "weak_share": r3(r.weak_seconds / r.seconds.max(1e-9)),
        "map": {"f1": r3(f1), "precision": r3(r.map.precision()), "recall": r3(r.map.recall()),
                "warned_5_30s": r3(r.warned), "predicted_over_true_weak": r3(r.map.weak_ratio()),
                "warning_time": r3(r.warning_time), "warnings_followed_60s": r3(r.warnings_followed),
                "any_time_followed_60s": r3(r.any_time_followed),
                "onsets": r.onsets, "onsets_ready": r3(r.onsets_ready), "ready_time": r3(r.ready_time),
                "without_recurring_dips": {"onsets_ready": r3(plain.onsets_ready),
                                           "ready_time": r3(plain.ready_time),
                                           "warned_5_30s": r3(plain.warned)},
                "answered": r3(r.answered)},
        "baseline": {"f1": r3(base), "precision": r3(r.baseline.precision()),
                     "recall": r3(r.baseline.recall()), "warned_5_30s": r3(r.baseline_warned)},
        "ceiling": {"f1": r3(r.ceiling.f1()), "precision": r3(r.ceiling.precision()),
                    "recall": r3(r.ceiling.recall())},
        "targets": {
            "f1_above_baseline": f1 > base,
            "f1": f1_target.map(|t| json!({"target": t, "met": f1 >= t})),
            "warned": warn_target.map(|t| json!({"target": t, "met": r.warned >= t})),
            "predicted_weak_at_most_1_5x": r.map.weak_ratio() <= 1.5,
        },
    })
}

pub fn run(o: &QosOptions) -> anyhow::Result<Value> {
    let norway = o.data.join("norway-hsdpa/derived-logs");
    anyhow::ensure!(
        norway.is_dir(),
        "no traces under {}: pass --data DIR (the qos-data directory; see its README.md)",
        o.data.display()
    );
    let cfg = Config::default();
    let horizon = Horizon::default();
    let plain_horizon = Horizon {
        warn_recurring_dips: false,
        ..horizon
    };
    let bar = crate::stats::bar(NORWAY.len() as u64 + 1, "leave-one-run-out");
    let mut routes = vec![];
    for (route, f1, warned) in NORWAY {
        let rs = runs(&norway.join(route), parse_norway)?;
        let r = leave_one_run_out(&rs, cfg, horizon);
        let plain = leave_one_run_out(&rs, cfg, plain_horizon);
        bar.inc(1);
        routes.push(report(route, &r, &plain, f1, warned));
    }
    let ucc = o.data.join("ucc-5g/5G-production-dataset/Download/Driving");
    let ucc_report = if ucc.is_dir() {
        let rs = runs(&ucc, parse_ucc)?;
        let r = leave_one_run_out(&rs, cfg, horizon);
        let plain = leave_one_run_out(&rs, cfg, plain_horizon);
        Some(report("ucc-5g driving (16 traces)", &r, &plain, None, None))
    } else {
        eprintln!("ucc-5g: missing under {}", o.data.display());
        None
    };
    bar.finish_and_clear();
    Ok(json!({
        "bench": "qos",
        "weak_kbps": cfg.weak_kbps,
        "config": {"resolution": cfg.resolution, "k": cfg.k, "weak_share": cfg.weak_share,
                   "half_life_days": cfg.half_life_s / 86400.0, "horizon_s": horizon.ahead_s,
                   "dip_share": cfg.dip_share, "dip_passes": cfg.dip_passes,
                   "ready_lead_s": bandshare_qos::eval::READY_LEAD_S,
                   "ready_tail_s": bandshare_qos::eval::READY_TAIL_S},
        "norway": routes,
        "ucc_5g": ucc_report,
    }))
}
