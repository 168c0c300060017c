//! The QoS map on real commute traces (Norway HSDPA, Riiser et al.; see
//! `../shared/qos-data/README.md`): leave-one-run-out per route — train on
//! every other run of the route, predict each row of the held-out run —
//! with weak = below 250 kbit/s, time-weighted. Compared in the same run
//! with the reference baseline (a 100 m square grid; a cell is weak when at
//! least half its training time was weak). Skips, saying so, when the data
//! is absent.

use bandshare_qos::{Config, Map, Sample};
use std::path::PathBuf;

struct Row {
    t: f64,
    pos: Option<(f64, f64)>,
    dur: f64,
    kbps: f64,
}

fn data_dir() -> PathBuf {
    std::env::var_os("BANDSHARE_QOS_DATA").map_or_else(
        || {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../../shared/qos-data"
            ))
        },
        PathBuf::from,
    )
}

fn runs(route: &str) -> Option<Vec<Vec<Row>>> {
    let dir = data_dir().join("norway-hsdpa/derived-logs").join(route);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    files.sort();
    let mut out = vec![];
    for f in files {
        let text = std::fs::read_to_string(&f).ok()?;
        let mut rows: Vec<Row> = text
            .lines()
            .filter_map(|l| {
                let v: Vec<f64> = l
                    .split_whitespace()
                    .map(|x| x.parse().unwrap_or(f64::NAN))
                    .collect();
                let [t, _mono, lat, lon, bytes, ms] = v[..] else {
                    return None;
                };
                (ms > 0.0).then(|| Row {
                    t,
                    pos: (lat.is_finite() && lon.is_finite()).then_some((lat, lon)),
                    dur: ms / 1000.0,
                    kbps: 8.0 * bytes / ms,
                })
            })
            .collect();
        // One run is logged in reverse order.
        rows.sort_by(|a, b| a.t.total_cmp(&b.t));
        out.push(rows);
    }
    Some(out)
}

#[derive(Default, Debug)]
struct Score {
    tp: f64,
    fp: f64,
    fn_: f64,
}

impl Score {
    fn add(&mut self, predicted: bool, truth: bool, w: f64) {
        match (predicted, truth) {
            (true, true) => self.tp += w,
            (true, false) => self.fp += w,
            (false, true) => self.fn_ += w,
            _ => {}
        }
    }

    fn f1(&self) -> f64 {
        let d = 2.0 * self.tp + self.fp + self.fn_;
        if d == 0.0 { 1.0 } else { 2.0 * self.tp / d }
    }
}

const WEAK: f64 = 250.0;

/// The reference: 100 m squares, weak when ≥ 50 % of training time was.
fn grid_key(lat: f64, lon: f64) -> (i64, i64) {
    let y = lat * 111_320.0;
    let x = lon * 111_320.0 * lat.to_radians().cos();
    ((y / 100.0).floor() as i64, (x / 100.0).floor() as i64)
}

/// (map F1, baseline F1, share of rows the map answered) for one route.
fn evaluate(route: &str, cfg: Config) -> Option<(f64, f64, f64)> {
    let runs = runs(route)?;
    let (mut map_score, mut base_score) = (Score::default(), Score::default());
    let (mut answered, mut total) = (0.0, 0.0);
    for held in 0..runs.len() {
        let mut map = Map::new(cfg).expect("map");
        let mut grid: std::collections::HashMap<(i64, i64), (f64, f64)> = Default::default();
        for (i, run) in runs.iter().enumerate().filter(|(i, _)| *i != held) {
            for r in run {
                let Some((lat, lon)) = r.pos else { continue };
                map.add(&Sample {
                    t: r.t,
                    lat,
                    lon,
                    duration_s: r.dur,
                    down_kbps: r.kbps,
                    device: i as u64,
                })
                .expect("a valid sample");
                let g = grid.entry(grid_key(lat, lon)).or_default();
                g.0 += r.dur;
                if r.kbps < WEAK {
                    g.1 += r.dur;
                }
            }
        }
        // Rows without a fix use the last one (a stand-in for dead
        // reckoning along the learned route, still to come).
        let mut last = None;
        for r in &runs[held] {
            last = r.pos.or(last);
            let truth = r.kbps < WEAK;
            total += r.dur;
            let Some((lat, lon)) = last else {
                map_score.add(false, truth, r.dur);
                base_score.add(false, truth, r.dur);
                continue;
            };
            let e = map.estimate(lat, lon, r.t).expect("valid position");
            if e.is_some() {
                answered += r.dur;
            }
            map_score.add(e.is_some_and(|e| e.weak()), truth, r.dur);
            let b = grid
                .get(&grid_key(lat, lon))
                .is_some_and(|(all, weak)| *weak >= 0.5 * all);
            base_score.add(b, truth, r.dur);
        }
    }
    Some((map_score.f1(), base_score.f1(), answered / total))
}

#[test]
fn leave_one_run_out_on_norway_routes() {
    let routes = [
        "metro.kalbakken-jernbanetorget",
        "ferry.nesoddtangen-oslo",
        "tram.ljabru-jernbanetorget",
        "bus.ljansbakken-oslo",
        "car.snaroya-smestad",
    ];
    let mut seen = 0;
    for route in routes {
        if std::env::var_os("QOS_EXPLORE").is_some() {
            for (name, cfg) in [
                (
                    "half-life 30 d",
                    Config {
                        half_life_s: 30.0 * 86400.0,
                        ..Config::default()
                    },
                ),
                (
                    "no decay",
                    Config {
                        half_life_s: 1e15,
                        ..Config::default()
                    },
                ),
                (
                    "no parent",
                    Config {
                        parent_levels: 0,
                        ..Config::default()
                    },
                ),
                (
                    "resolution 11",
                    Config {
                        resolution: 11,
                        ..Config::default()
                    },
                ),
            ] {
                if let Some((m, b, a)) = evaluate(route, cfg) {
                    eprintln!("  {route:<32} {name:<14} map {m:.3} base {b:.3} answered {a:.2}");
                }
            }
        }
        let Some((map, base, answered)) = evaluate(route, Config::default()) else {
            eprintln!("SKIP {route}: no data under {}", data_dir().display());
            continue;
        };
        seen += 1;
        eprintln!(
            "{route:<32} map F1 {map:.3}  baseline F1 {base:.3}  answered {:.0} % of the time",
            answered * 100.0
        );
        // What holds today (measured: metro 0.77 against the baseline's
        // 0.81; ferry 0.16 against 0.24): the map answers most of every
        // route, and on the metro, the route with the clearest weak zone
        // (the tunnel), it finds it. The targets — above the
        // baseline everywhere, ≥ 0.85 on metro and car — need the learned
        // routes and dead reckoning still to come, so they are not asserted.
        assert!(answered > 0.8, "{route}: answered {answered:.2}");
        if route.starts_with("metro") {
            assert!(map > 0.7, "{route}: map F1 {map:.3}");
        }
    }
    if seen == 0 {
        eprintln!("SKIP: ../shared/qos-data is absent; nothing evaluated");
    }
}
