//! Pre-connect against reactive switching, end to end, on a real commute:
//! a held-out Norway HSDPA run is replayed as two requesters' own link
//! (its throughput, second by second, applied by `tc tbf` to each one's
//! uplink in both directions), while both ride the run's track
//! (`--replay-track`, fixes missing where the recording had none) with
//! three sharers riding along on good links. The coordinator's QoS map is
//! trained on the route's other runs (`bandshare qos import`), all moved in
//! time by one shift that puts the held-out run's start on the ride's (less
//! whole weeks, into the past): the ride meets the map at the hour of week
//! it was recorded at, with the runs' ages as recorded, as in the
//! leave-one-run-out evaluation.
//!
//! One requester switches reactively (`--no-predict`: its own link's probes
//! and stalled flows move new flows to the pool); the other also acts on
//! the map's prediction (pre-connect). Every second each fetches 16 KiB
//! through its SOCKS5 proxy with real curl and a 1 s deadline; a second
//! whose fetch fails is a second without a working path (16 KiB in a
//! second needs about 150 kbit/s, below the 250 kbit/s that counts as
//! weak).
//!
//! ```text
//!             coordinator 10.81.3.2          internet 10.81.1.1 (HTTP :8080)
//!                                    \      /  |  \ (tbf on r0, r1)
//!   sharers s0..s2 10.81.2{k}.2 (uplinks)     own links 10.81.9.2, 10.81.10.2
//!          \________ LAN 10.81.2.0/24 ________/ requesters (reactive, pre-connect)
//! ```
//!
//! In CI it replays two minutes around the metro's tunnel; with
//! `BANDSHARE_REPLAY=full` whole held-out runs of the metro, ferry and car
//! routes (about 50 minutes, for BENCHMARKS.md). The held-out run is the
//! one with the median weak time; `BANDSHARE_REPLAY_HELD=0.25,0.75` rides
//! the runs at those quantiles of weak time instead, one after another
//! (each trained on all the others), for more seconds to count;
//! `BANDSHARE_REPLAY_ROUTES=car` rides only the routes so named;
//! `BANDSHARE_REPLAY_LOGS=DIR` keeps every process's log and the
//! timelines there. Skips,
//! saying why, where namespaces, tc or the data are missing.

use bandshare_qos::track::{Reading, parse_norway};
use bandshare_testkit::HttpTarget;
use bandshare_testkit::netns::{Lab, wait};
use serde_json::Value;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_bandshare");
const INTERNET: &str = "10.81.1.1";
const HTTP_PORT: u16 = 8080;
const COORD: &str = "10.81.3.2";
const SHARERS: usize = 3;
const WEEK_S: f64 = 7.0 * 86_400.0;
/// A fetch of this many bytes within [`DEADLINE_S`] is a working path.
const FETCH_BYTES: usize = 16 * 1024;
const DEADLINE_S: f64 = 1.0;
/// The slowest shaped rate (a 0 kbit/s row: almost nothing gets through).
const FLOOR_KBPS: f64 = 8.0;
/// Seconds of riding before the scored part, for the pools to warm up.
const WARM_S: f64 = 20.0;

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn which(p: &str) -> bool {
    std::process::Command::new("sh")
        .args(["-c", &format!("command -v {p}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
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

/// A route's runs: (file, its text, its readings), in file order.
fn runs(route: &str) -> Option<Vec<(PathBuf, String, Vec<Reading>)>> {
    let dir = data_dir().join("norway-hsdpa/derived-logs").join(route);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|f| {
            let text = std::fs::read_to_string(&f).ok()?;
            let rows = parse_norway(&text).ok()?;
            Some((f, text, rows))
        })
        .collect()
}

/// Weak seconds (below 250 kbit/s) of a stretch of readings.
fn weak_seconds(rows: &[Reading]) -> f64 {
    rows.iter()
        .filter(|r| r.down_kbps < 250.0)
        .map(|r| r.duration_s)
        .sum()
}

/// Three minutes around the first onset of a weak stretch (at least 10 s)
/// that follows at least 30 s of a good link with fixes: from 60 s before
/// the onset to 120 s after it.
fn window(rows: &[Reading]) -> Option<&[Reading]> {
    let weak = |r: &Reading| r.down_kbps < 250.0;
    let onset = (1..rows.len()).find(|&s| {
        let t = rows[s].t - rows[s].duration_s;
        let before: Vec<&Reading> = rows[..s]
            .iter()
            .rev()
            .take_while(|x| x.t > t - 30.0)
            .collect();
        let stretch: f64 = rows[s..]
            .iter()
            .take_while(|x| weak(x))
            .map(|x| x.duration_s)
            .sum();
        weak(&rows[s])
            && !weak(&rows[s - 1])
            && before.iter().all(|x| !weak(x))
            && before.iter().any(|x| x.pos.is_some())
            && rows[s - 1].t - rows[0].t >= 60.0
            && stretch >= 10.0
    })?;
    let t = rows[onset].t;
    let from = rows.iter().position(|x| x.t >= t - 60.0)?;
    let to = rows.iter().rposition(|x| x.t <= t + 120.0)?;
    Some(&rows[from..=to])
}

/// A run's text with every unix time moved by `shift` seconds.
fn shifted(text: &str, shift: f64) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let mut cols = line.split_whitespace();
        match cols.next().and_then(|t| t.parse::<f64>().ok()) {
            Some(t) => {
                out.push_str(&format!("{}", (t + shift) as i64));
                for c in cols {
                    out.push(' ');
                    out.push_str(c);
                }
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// The readings' track as CSV `time,lat,lon`.
fn track_csv(rows: &[Reading]) -> String {
    let mut s = String::from("time,lat,lon\n");
    for r in rows {
        match r.pos {
            Some((lat, lon)) => s.push_str(&format!("{},{lat},{lon}\n", r.t)),
            None => s.push_str(&format!("{},,\n", r.t)),
        }
    }
    s
}

/// The two ways of switching compared.
const MODES: [(&str, &[&str]); 2] = [("reactive", &["--no-predict"]), ("pre-connect", &[])];

struct World {
    lab: Lab,
    inet: String,
    coord: String,
    /// Each requester's namespace, in [`MODES`] order.
    reqs: Vec<String>,
    sharers: Vec<String>,
    _http: HttpTarget,
    _rt: tokio::runtime::Runtime,
}

impl World {
    fn build() -> anyhow::Result<World> {
        let mut lab = Lab::new().map_err(anyhow::Error::msg)?;
        let inet = lab.host("inet")?;
        let lan = lab.host("lan")?;
        let coord = lab.host("coord")?;
        lab.ip_in(
            &inet,
            &["addr", "add", &format!("{INTERNET}/32"), "dev", "lo"],
        )?;
        let fwd = lab
            .command(&inet, "sysctl")
            .args(["-qw", "net.ipv4.ip_forward=1"])
            .status()?;
        anyhow::ensure!(fwd.success(), "cannot enable forwarding");
        lab.wire(
            (&inet, "c0", "10.81.3.1/24"),
            (&coord, "up0", &format!("{COORD}/24")),
        )?;
        lab.ip_in(&coord, &["route", "add", "default", "via", "10.81.3.1"])?;
        lab.ip_in(&lan, &["link", "add", "br0", "type", "bridge"])?;
        lab.ip_in(&lan, &["link", "set", "br0", "up"])?;
        let mut port = 0;
        let mut on_lan = |lab: &Lab, host: &str, addr: &str| -> anyhow::Result<()> {
            let p = format!("p{port}");
            port += 1;
            lab.wire((host, "lan0", addr), (&lan, &p, ""))?;
            lab.ip_in(&lan, &["link", "set", &p, "master", "br0"])
        };
        let mut reqs = vec![];
        for (m, (name, _)) in MODES.iter().enumerate() {
            let req = lab.host(&format!("req-{name}"))?;
            let net = 9 + m;
            lab.wire(
                (&inet, &format!("r{m}"), &format!("10.81.{net}.1/24")),
                (&req, "own0", &format!("10.81.{net}.2/24")),
            )?;
            lab.ip_in(
                &req,
                &["route", "add", "default", "via", &format!("10.81.{net}.1")],
            )?;
            on_lan(&lab, &req, &format!("10.81.2.{}/24", 100 + m))?;
            reqs.push(req);
        }
        let mut sharers = vec![];
        for k in 0..SHARERS {
            let s = lab.host(&format!("s{k}"))?;
            let net = 20 + k;
            lab.wire(
                (&inet, &format!("u{k}"), &format!("10.81.{net}.1/24")),
                (&s, "up0", &format!("10.81.{net}.2/24")),
            )?;
            lab.ip_in(
                &s,
                &["route", "add", "default", "via", &format!("10.81.{net}.1")],
            )?;
            on_lan(&lab, &s, &format!("10.81.2.{}/24", 11 + k))?;
            sharers.push(s);
        }
        let listener = lab.bind_tcp(
            &inet,
            SocketAddr::new(INTERNET.parse().expect("ip"), HTTP_PORT),
        )?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let http = {
            let _in = rt.enter();
            HttpTarget::serve_std(listener)?
        };
        let dc = lab.dir.path().join("coord").display().to_string();
        lab.spawn(
            &coord,
            "coordinator",
            BIN,
            &strings(&[
                "server",
                "--listen",
                &format!("{COORD}:7400"),
                "--http",
                &format!("{COORD}:7480"),
                "--http-token-file",
                &lab.http_token_file()?,
                "--data",
                &dc,
            ]),
        )?;
        Ok(World {
            lab,
            inet,
            coord,
            reqs,
            sharers,
            _http: http,
            _rt: rt,
        })
    }

    fn coord_status(&self) -> Option<Value> {
        self.lab
            .json(&self.coord, &format!("http://{COORD}:7480/status"))
    }

    /// Trains the map on the other runs (each its own device).
    fn train(&self, files: &[PathBuf]) -> anyhow::Result<()> {
        let mut c = self.lab.command(&self.inet, BIN);
        c.args([
            "qos",
            "import",
            "--server",
            &format!("http://{COORD}:7400"),
            "--format",
            "norway-hsdpa",
            "--device-per-file",
        ])
        .args(files);
        let out = c.output()?;
        anyhow::ensure!(
            out.status.success(),
            "qos import: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    /// Sharers and requesters riding `track` from `start`.
    fn ride(&mut self, track: &Path, start: f64) -> anyhow::Result<()> {
        let track = track.display().to_string();
        let start = format!("{start:.0}");
        let server = format!("http://{COORD}:7400");
        for (k, ns) in self.sharers.clone().iter().enumerate() {
            let name = format!("s{k}");
            let data = self.lab.dir.path().join(&name).display().to_string();
            self.lab.spawn(
                ns,
                &name,
                BIN,
                &strings(&[
                    "share",
                    "--server",
                    &server,
                    "--name",
                    &name,
                    "--replay-track",
                    &track,
                    "--replay-start",
                    &start,
                    "--relay",
                    &format!("10.81.2.{}:7500", 11 + k),
                    "--allow-egress",
                    "10.81.1.0/24",
                    "--allow-egress",
                    &format!("{COORD}/32:7400"),
                    "--data",
                    &data,
                ]),
            )?;
        }
        let online = wait(Duration::from_secs(30), || {
            self.coord_status()
                .is_some_and(|v| v["online_sharers"] == SHARERS)
        });
        anyhow::ensure!(online, "sharers not online\n{}", self.lab.log_tails(20));
        for (m, (name, extra)) in MODES.iter().enumerate() {
            let data = self
                .lab
                .dir
                .path()
                .join(format!("req-{name}"))
                .display()
                .to_string();
            let mut args = strings(&[
                "connect",
                "--server",
                &server,
                "--replay-track",
                &track,
                "--replay-start",
                &start,
                "--via",
                "auto",
                "--pool",
                "2",
                "--standby",
                "1",
                "--probe",
                &format!("{INTERNET}:{HTTP_PORT}"),
                "--probe",
                "gateway",
                "--socks",
                "127.0.0.1:1080",
                "--control",
                "127.0.0.1:7700",
                "--data",
                &data,
            ]);
            args.extend(strings(extra));
            let ns = self.reqs[m].clone();
            self.lab.spawn(&ns, &format!("req-{name}"), BIN, &args)?;
        }
        Ok(())
    }

    /// Shapes both requesters' own links, both directions, to `kbps`.
    fn shape(&self, kbps: f64) {
        let kbps = kbps.max(FLOOR_KBPS);
        // A burst of 20 ms at the rate (at least two packets), a queue of
        // up to a second (cellular buffers are deep).
        let burst = ((kbps * 1000.0 / 8.0) * 0.02).max(3200.0) as u64;
        let rate = format!("{}kbit", kbps.round() as u64);
        let burst = burst.to_string();
        for (m, req) in self.reqs.iter().enumerate() {
            for (ns, dev) in [(&self.inet, format!("r{m}")), (req, "own0".to_string())] {
                let _ = self
                    .lab
                    .command(ns, "tc")
                    .args([
                        "qdisc", "replace", "dev", &dev, "root", "tbf", "rate", &rate, "burst",
                        &burst, "latency", "1s",
                    ])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }

    /// One fetch through requester `m`'s proxy, started now.
    fn fetch(&self, m: usize) -> Option<Child> {
        self.lab
            .command(&self.reqs[m], "curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "--max-time",
                &DEADLINE_S.to_string(),
                "--socks5-hostname",
                "127.0.0.1:1080",
                &format!("http://{INTERNET}:{HTTP_PORT}/bytes/{FETCH_BYTES}"),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()
    }

    /// Which path new flows take ("direct", "pool" or "?" when it does
    /// not answer), and whether a forecast put them there.
    fn path_of(&self, m: usize) -> (String, bool) {
        let s = self.lab.json(&self.reqs[m], "http://127.0.0.1:7700/status");
        let path = s
            .as_ref()
            .and_then(|s| s["path"].as_str().map(String::from))
            .unwrap_or_else(|| "?".into());
        let acting = s.is_some_and(|s| s["forecast"]["acting"] == true);
        (path, acting)
    }
}

/// What one replay measured, per mode.
#[derive(Debug, Default)]
struct Outcome {
    scored_s: usize,
    weak_s: f64,
    /// Seconds without a working path, per mode.
    outage_s: [usize; 2],
    /// Seconds new flows went through the pool, per mode.
    pooled_s: [usize; 2],
    /// One character per second per mode: `.` fine direct, `p` fine
    /// through the pool, `P` the same because of a forecast, `X` no
    /// working path.
    timeline: [String; 2],
    /// The recording, one character per second: `w` weak, `.` not.
    recorded: String,
}

/// Replays `rows` (a held-out run or a stretch of one), the map trained on
/// `training`.
fn replay(route: &str, rows: &[Reading], training: &[(PathBuf, String)]) -> Outcome {
    let mut w = World::build().expect("topology");
    let online = wait(Duration::from_secs(20), || w.coord_status().is_some());
    assert!(online, "coordinator\n{}", w.lab.log_tails(20));
    let now = unix_now();
    // The ride starts once everyone is up and the pools are warm; planned
    // now, so the training can be moved to it.
    let t0 = rows[0].t - rows[0].duration_s;
    let mut start = (now + 60.0).ceil();
    let newest_of = |text: &str| {
        parse_norway(text)
            .ok()
            .and_then(|r| r.iter().map(|r| r.t).reduce(f64::max))
            .unwrap_or(now)
    };
    // All training runs move by one shift that puts the held-out run's
    // start on the ride's, less whole weeks until the newest training run
    // is in the past: their hour of week against the ride and their ages
    // against each other are as recorded, as in the leave-one-run-out
    // evaluation. (`BANDSHARE_REPLAY_TIME=recent`: each run moved by whole
    // weeks into the past week instead, as before 2026-12-07: same hour
    // of week as recorded, not the ride's, and all about equally recent.)
    let recent = std::env::var("BANDSHARE_REPLAY_TIME").is_ok_and(|v| v == "recent");
    let newest = training
        .iter()
        .map(|(_, text)| newest_of(text))
        .fold(f64::MIN, f64::max);
    let aligned = {
        let delta = start - t0;
        delta - ((newest + delta - (now - 3600.0)) / WEEK_S).ceil().max(0.0) * WEEK_S
    };
    let dir = w.lab.dir.path().join("training");
    std::fs::create_dir_all(&dir).expect("dir");
    let mut files = vec![];
    for (i, (f, text)) in training.iter().enumerate() {
        let shift = if recent {
            ((now - newest_of(text)) / WEEK_S).floor() * WEEK_S
        } else {
            aligned
        };
        let name = f.file_name().map_or_else(
            || format!("run{i}.log"),
            |n| n.to_string_lossy().into_owned(),
        );
        let path = dir.join(name);
        std::fs::write(&path, shifted(text, shift)).expect("write");
        files.push(path);
    }
    w.train(&files).expect("train");
    let cells = w
        .coord_status()
        .and_then(|s| s["qos"]["cells"].as_u64())
        .unwrap_or(0);
    eprintln!(
        "{route}: map trained on {} runs, {cells} cells",
        files.len()
    );

    let track = w.lab.dir.path().join("track.csv");
    std::fs::write(&track, track_csv(rows)).expect("track");
    w.shape(rows[0].down_kbps);
    // Later than planned only if training took long (then the hour of
    // week is off by as much).
    start = start.max((unix_now() + 30.0).ceil());
    w.ride(&track, start).expect("ride");
    // Up: answering, with a warm pool member (the pre-connect one may
    // already be on it, where the start is predicted weak).
    let ready = wait(Duration::from_secs(40), || {
        (0..MODES.len()).all(|m| {
            w.lab
                .json(&w.reqs[m], "http://127.0.0.1:7700/status")
                .is_some_and(|s| s["pool"].as_array().is_some_and(|p| !p.is_empty()))
        })
    });
    assert!(ready, "requesters not up\n{}", w.lab.log_tails(30));
    let at = |t: f64| start + (t - t0);
    while unix_now() < start {
        std::thread::sleep(Duration::from_millis(50));
    }

    let mut out = Outcome::default();
    let mut next_row = 0;
    let end = at(rows[rows.len() - 1].t);
    let mut second = 0usize;
    let mut inflight: Vec<(usize, usize, Child, bool)> = vec![];
    let mut results: Vec<[Option<bool>; 2]> = vec![];
    let mut paths: Vec<[(bool, bool); 2]> = vec![];
    let mut weak_now = vec![];
    while at(t0) + second as f64 <= end {
        let tick = at(t0) + second as f64;
        while unix_now() < tick {
            std::thread::sleep(Duration::from_millis(10));
        }
        // The recording's rate for the interval that begins now.
        while next_row < rows.len() && at(rows[next_row].t - rows[next_row].duration_s) <= tick {
            w.shape(rows[next_row].down_kbps);
            next_row += 1;
        }
        let rate = rows[next_row.saturating_sub(1)].down_kbps;
        weak_now.push(rate < 250.0);
        results.push([None, None]);
        let mut now_on = [(false, false); 2];
        for (m, on) in now_on.iter_mut().enumerate() {
            if let Some(c) = w.fetch(m) {
                inflight.push((second, m, c, false));
            }
            let (path, acting) = w.path_of(m);
            *on = (path == "pool", acting);
        }
        paths.push(now_on);
        // Collect what has finished (curl's own deadline ends the rest).
        for f in inflight.iter_mut() {
            if let Ok(Some(st)) = f.2.try_wait() {
                results[f.0][f.1] = Some(st.success());
                f.3 = true;
            }
        }
        inflight.retain(|f| !f.3);
        second += 1;
    }
    for mut f in inflight {
        let ok = wait(Duration::from_secs(3), || {
            matches!(f.2.try_wait(), Ok(Some(_)))
        }) && f.2.try_wait().ok().flatten().is_some_and(|s| s.success());
        let _ = f.2.kill();
        results[f.0][f.1] = Some(ok);
    }
    let warm = WARM_S as usize;
    for (s, r) in results.iter().enumerate() {
        if s < warm.min(results.len() / 4) {
            continue;
        }
        out.scored_s += 1;
        if weak_now[s] {
            out.weak_s += 1.0;
        }
        out.recorded.push(if weak_now[s] { 'w' } else { '.' });
        for m in 0..MODES.len() {
            let ok = r[m] == Some(true);
            if !ok {
                out.outage_s[m] += 1;
            }
            let (pooled, forecast) = paths[s][m];
            if pooled {
                out.pooled_s[m] += 1;
            }
            out.timeline[m].push(match (ok, pooled, forecast) {
                (false, _, _) => 'X',
                (true, true, true) => 'P',
                (true, true, false) => 'p',
                (true, false, _) => '.',
            });
        }
    }
    eprintln!(
        "{route}: {} s scored, {:.0} s weak in the recording\n  recorded\n  {}",
        out.scored_s, out.weak_s, out.recorded
    );
    keep_logs(&w, route, rows, at(t0), warm.min(results.len() / 4), &out);
    for (m, (name, _)) in MODES.iter().enumerate() {
        eprintln!(
            "  {name:<12} {:>4} s without a working path, {:>4} s on the pool\n  {}",
            out.outage_s[m], out.pooled_s[m], out.timeline[m]
        );
    }
    out
}

/// `BANDSHARE_REPLAY_LOGS=DIR`: every process's log and the timelines
/// (each scored second with its unix time) go to `DIR/ROUTE-START/`, to
/// look into a lost second afterwards.
fn keep_logs(
    w: &World,
    route: &str,
    rows: &[Reading],
    t0_unix: f64,
    skipped: usize,
    out: &Outcome,
) {
    let Some(dir) = std::env::var_os("BANDSHARE_REPLAY_LOGS") else {
        return;
    };
    let dir = PathBuf::from(dir).join(format!("{route}-{:.0}-{:.0}", rows[0].t, t0_unix));
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("{}: {e}", dir.display());
        return;
    }
    if let Ok(entries) = std::fs::read_dir(w.lab.dir.path()) {
        for e in entries.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "log") {
                let _ = std::fs::copy(&p, dir.join(e.file_name()));
            }
        }
    }
    let mut text = String::from("second unix recorded reactive pre-connect\n");
    let cols: Vec<Vec<char>> = [&out.recorded, &out.timeline[0], &out.timeline[1]]
        .iter()
        .map(|s| s.chars().collect())
        .collect();
    for i in 0..cols[0].len() {
        let s = i + skipped;
        text.push_str(&format!(
            "{s} {:.0} {} {} {}\n",
            t0_unix + s as f64,
            cols[0][i],
            cols[1].get(i).copied().unwrap_or(' '),
            cols[2].get(i).copied().unwrap_or(' ')
        ));
    }
    let _ = std::fs::write(dir.join("timeline.txt"), text);
    eprintln!("{route}: logs kept in {}", dir.display());
}

fn skip_reason() -> Option<String> {
    if let Some(why) = bandshare_testkit::netns::unavailable() {
        return Some(why);
    }
    for tool in ["tc", "curl"] {
        if !which(tool) {
            return Some(format!("{tool} is not installed"));
        }
    }
    None
}

#[test]
fn pre_connect_has_fewer_seconds_without_a_path_than_reactive_switching() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIP: {why}");
        return;
    }
    let full = std::env::var("BANDSHARE_REPLAY").is_ok_and(|v| v == "full");
    let all: &[&str] = if full {
        &[
            "metro.kalbakken-jernbanetorget",
            "ferry.nesoddtangen-oslo",
            "car.snaroya-smestad",
        ]
    } else {
        &["metro.kalbakken-jernbanetorget"]
    };
    // `BANDSHARE_REPLAY_ROUTES=car,ferry`: only the routes whose names
    // contain one of these.
    let only = std::env::var("BANDSHARE_REPLAY_ROUTES").ok();
    let routes: Vec<&str> = all
        .iter()
        .copied()
        .filter(|r| {
            only.as_deref().is_none_or(|o| {
                o.split(',')
                    .any(|w| !w.trim().is_empty() && r.contains(w.trim()))
            })
        })
        .collect();
    assert!(
        !routes.is_empty(),
        "BANDSHARE_REPLAY_ROUTES={only:?} names none of {all:?}"
    );
    let held = held_quantiles();
    // Whole runs take minutes each: the routes ride at once, each in its
    // own lab; a route's held-out runs one after another.
    let outcomes: Vec<Outcome> = std::thread::scope(|scope| {
        let rides: Vec<_> = routes
            .iter()
            .map(|route| {
                let held = &held;
                scope.spawn(move || {
                    held.iter()
                        .filter_map(|q| ride_route(route, *q, full))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        rides
            .into_iter()
            .flat_map(|h| h.join().expect("a route's replay panicked"))
            .collect()
    });
    let mut all = [0usize; 2];
    for o in outcomes {
        all[0] += o.outage_s[0];
        all[1] += o.outage_s[1];
    }
    if full && all[0] > 0 {
        // Over whole runs pre-connect is never worse.
        assert!(
            all[1] <= all[0],
            "pre-connect {} > reactive {}",
            all[1],
            all[0]
        );
    }
}

/// Which runs are held out, as quantiles of weak time:
/// `BANDSHARE_REPLAY_HELD` (comma-separated, each in 0..=1), else the
/// median (a typical commute, not the best or the worst day).
fn held_quantiles() -> Vec<f64> {
    let Ok(v) = std::env::var("BANDSHARE_REPLAY_HELD") else {
        return vec![0.5];
    };
    v.split(',')
        .map(|q| match q.trim().parse::<f64>() {
            Ok(q) if (0.0..=1.0).contains(&q) => q,
            _ => panic!("BANDSHARE_REPLAY_HELD: {q:?} is not a quantile between 0 and 1"),
        })
        .collect()
}

/// Replays one route's held-out run, the one at quantile `held` of weak
/// time (whole, or the stretch around its longest weak episode); `None`
/// without data.
fn ride_route(route: &str, held: f64, full: bool) -> Option<Outcome> {
    let Some(runs) = runs(route) else {
        eprintln!("SKIP {route}: no data under {}", data_dir().display());
        return None;
    };
    let mut by_weak: Vec<usize> = (0..runs.len()).collect();
    by_weak.sort_by(|a, b| weak_seconds(&runs[*a].2).total_cmp(&weak_seconds(&runs[*b].2)));
    let at = ((by_weak.len() as f64 * held) as usize).min(by_weak.len().saturating_sub(1));
    let held = *by_weak.get(at)?;
    let training: Vec<(PathBuf, String)> = runs
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != held)
        .map(|(_, (f, t, _))| (f.clone(), t.clone()))
        .collect();
    let rows = &runs[held].2;
    let rows = if full {
        rows.as_slice()
    } else {
        window(rows).expect("a weak stretch")
    };
    eprintln!(
        "{route}: held out {}, replaying {:.0} s",
        runs[held].0.display(),
        rows.iter().map(|r| r.duration_s).sum::<f64>()
    );
    let o = replay(route, rows, &training);
    let removed = 1.0 - o.outage_s[1] as f64 / (o.outage_s[0].max(1)) as f64;
    eprintln!(
        "{route}: pre-connect removed {:.0} % of reactive's outage seconds ({} -> {})",
        removed * 100.0,
        o.outage_s[0],
        o.outage_s[1]
    );
    // Both requesters carried traffic, and the weak stretch was felt.
    assert!(o.scored_s > 60, "{route}: {o:?}");
    assert!(
        o.pooled_s[1] > 0,
        "{route}: pre-connect never used the pool: {o:?}"
    );
    if !full {
        // The stretch begins after a good minute: a forecast moved new
        // flows to the pool before the first weak second, so the onset
        // cost pre-connect nothing (elsewhere a busy test machine can fail
        // a fetch in either mode, so only these seconds are asserted).
        let onset = o.recorded.find('w').expect("a weak second");
        assert!(
            o.timeline[1][..onset].contains('P'),
            "{route}: no forecast acted before the onset: {o:?}"
        );
        let around = &o.timeline[1][onset.saturating_sub(2)..(onset + 3).min(o.timeline[1].len())];
        assert!(
            !around.contains('X'),
            "{route}: pre-connect lost the path at the onset: {o:?}"
        );
    }
    Some(o)
}
