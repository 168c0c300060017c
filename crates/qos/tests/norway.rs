//! The QoS map on real commute traces (Norway HSDPA, Riiser et al.; see
//! `../shared/qos-data/README.md`): leave-one-run-out per route (see
//! `bandshare_qos::eval`), weak = below 250 kbit/s, time-weighted, against
//! the reference baseline (100 m grid, weak when ≥ 50 % of its training
//! time was) in the same run. Skips, saying so, when the data is absent.

use bandshare_qos::eval::{RouteReport, leave_one_run_out};
use bandshare_qos::track::{Reading, parse_norway};
use bandshare_qos::{Config, Horizon};
use std::path::PathBuf;

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

fn runs(route: &str) -> Option<Vec<Vec<Reading>>> {
    let dir = data_dir().join("norway-hsdpa/derived-logs").join(route);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    files.sort();
    files
        .iter()
        .map(|f| {
            let text = std::fs::read_to_string(f).ok()?;
            Some(parse_norway(&text).unwrap_or_else(|e| panic!("{}: {e}", f.display())))
        })
        .collect()
}

fn show(route: &str, r: &RouteReport) {
    eprintln!(
        "{route:<32} F1 {:.3} (P {:.2} R {:.2}) baseline {:.3} ceiling {:.3} | warned {:>3.0} % (baseline {:>3.0} %) | predicted/true weak {:.2} | answered {:.0} % | warning out {:.0} % of the time, followed {:.0} % (any time {:.0} %) | onsets ready {:.0} % of {}, ready {:.0} % of the time",
        r.map.f1(),
        r.map.precision(),
        r.map.recall(),
        r.baseline.f1(),
        r.ceiling.f1(),
        r.warned * 100.0,
        r.baseline_warned * 100.0,
        r.map.weak_ratio(),
        r.answered * 100.0,
        r.warning_time * 100.0,
        r.warnings_followed * 100.0,
        r.any_time_followed * 100.0,
        r.onsets_ready * 100.0,
        r.onsets,
        r.ready_time * 100.0
    );
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
        let Some(runs) = runs(route) else {
            eprintln!("SKIP {route}: no data under {}", data_dir().display());
            continue;
        };
        seen += 1;
        let r = leave_one_run_out(&runs, Config::default(), Horizon::default());
        show(route, &r);
        assert!(r.answered > 0.8, "{route}: answered {:.2}", r.answered);
        // What holds today (2026-12-04: metro 0.82 / baseline 0.81, warned
        // 95 %; ferry 0.37 / 0.24, warned 87 % (the expected weak seconds
        // ahead); tram 0.52 / 0.30; car 0.84 / 0.86, warned 100 %): above
        // the baseline on the routes with weak zones tied to places, and
        // metro, ferry and car warned ahead. The car's F1 (4 training runs:
        // few transitions reach k = 3) and the bus (weak zones not tied to
        // a place) are reported, not asserted.
        if route.starts_with("metro") {
            assert!(r.map.f1() >= 0.8, "{route}: F1 {:.3}", r.map.f1());
        }
        if ["metro", "ferry", "car"]
            .iter()
            .any(|p| route.starts_with(p))
        {
            assert!(r.warned >= 0.85, "{route}: warned {:.2}", r.warned);
        }
        if !route.starts_with("car") && !route.starts_with("bus") {
            assert!(r.map.f1() > r.baseline.f1(), "{route}: {:?}", r.map);
        }
        assert!(
            r.map.weak_ratio() <= 1.5,
            "{route}: {:.2}",
            r.map.weak_ratio()
        );
    }
    if seen == 0 {
        eprintln!("SKIP: ../shared/qos-data is absent; nothing evaluated");
    }
}

/// Warnings of recurring dips (most passes through a cell had a weak
/// reading, however short): more weak onsets have a forecast out just
/// before them on the routes whose dips are tied to places (car, tram),
/// and where dips are not (the bus) they do not turn into warning all
/// the time.
#[test]
fn recurring_dips_are_warned_where_they_recur() {
    let plain = Horizon {
        warn_recurring_dips: false,
        ..Horizon::default()
    };
    for route in [
        "car.snaroya-smestad",
        "tram.ljabru-jernbanetorget",
        "bus.ljansbakken-oslo",
    ] {
        let Some(runs) = runs(route) else {
            eprintln!("SKIP {route}: no data under {}", data_dir().display());
            continue;
        };
        let with = leave_one_run_out(&runs, Config::default(), Horizon::default());
        let without = leave_one_run_out(&runs, Config::default(), plain);
        eprintln!(
            "{route:<32} onsets ready {:.0} % of {} at {:.0} % of the time; without recurring dips {:.0} % at {:.0} %",
            with.onsets_ready * 100.0,
            with.onsets,
            with.ready_time * 100.0,
            without.onsets_ready * 100.0,
            without.ready_time * 100.0
        );
        // 2026-12-07: car 41 → 64 % of onsets (11 → 18 % of the time),
        // tram 71 → 90 % (38 → 66 %), bus 34 → 38 % (43 → 46 %).
        if route.starts_with("bus") {
            assert!(
                with.ready_time - without.ready_time < 0.1,
                "{route}: ready {:.2} against {:.2}",
                with.ready_time,
                without.ready_time
            );
        } else {
            assert!(
                with.onsets_ready > without.onsets_ready + 0.1,
                "{route}: onsets ready {:.2} against {:.2}",
                with.onsets_ready,
                without.onsets_ready
            );
        }
        assert_eq!(with.map, without.map, "{route}: `weak` itself is unchanged");
    }
}

/// `QOS_EXPLORE=1`: the same evaluation under other settings (for tuning).
#[test]
fn explore_settings() {
    if std::env::var_os("QOS_EXPLORE").is_none() {
        return;
    }
    let d = Config::default();
    let variants = [
        (
            "share .5",
            Config {
                weak_share: 0.5,
                ..d
            },
        ),
        ("res 9", Config { resolution: 9, ..d }),
        (
            "no decay",
            Config {
                half_life_s: 1e12,
                ..d
            },
        ),
        ("k 2", Config { k: 2, ..d }),
        (
            "res 11",
            Config {
                resolution: 11,
                ..d
            },
        ),
        (
            "no hour",
            Config {
                min_hour_weight_s: 1e12,
                ..d
            },
        ),
        (
            "no parent",
            Config {
                parent_levels: 0,
                ..d
            },
        ),
        (
            "min w 30",
            Config {
                min_weight_s: 30.0,
                ..d
            },
        ),
    ];
    for route in [
        "metro.kalbakken-jernbanetorget",
        "ferry.nesoddtangen-oslo",
        "car.snaroya-smestad",
        "tram.ljabru-jernbanetorget",
    ] {
        let Some(runs) = runs(route) else { return };
        for (name, cfg) in variants {
            let r = leave_one_run_out(&runs, cfg, Horizon::default());
            show(&format!("{route} {name}"), &r);
        }
    }
}
