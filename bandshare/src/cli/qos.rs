//! `bandshare qos import | predict | map`: train a coordinator's QoS map
//! from recorded traces, predict weak zones along a track, export the
//! published cells.

use super::ServerAddr;
use anyhow::Context;
use bandshare_agent::{client, identity, qos};
use bandshare_qos::track;
use clap::{Args, Subcommand, ValueEnum};
use std::path::PathBuf;

#[derive(Subcommand, Debug)]
pub(super) enum QosCommand {
    /// Report recorded link-quality traces as observations (trains the map).
    Import(ImportArgs),
    /// Predict, point by point and causally, where a track's link is weak.
    Predict(PredictArgs),
    /// Export the published cells (those at least k devices reported).
    Map(MapArgs),
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub(super) enum Format {
    /// Norway HSDPA derived logs: `unix_s mono_ms lat lon bytes ms` (NaN: no fix).
    NorwayHsdpa,
    /// UCC 5G dataset CSV (`Timestamp,Longitude,Latitude,…,DL_bitrate,…`).
    #[value(name = "ucc-5g")]
    Ucc5g,
}

#[derive(Args, Debug)]
pub(super) struct ImportArgs {
    #[command(flatten)]
    server: ServerAddr,
    /// The files' format.
    #[arg(long, value_enum)]
    format: Format,
    /// Report each file as its own device (a fresh key per file), as the
    /// recorded runs were; otherwise all as one throwaway device.
    #[arg(long)]
    device_per_file: bool,
    /// Readings without a fix get a position between the fixes around
    /// them when those are at most this many seconds apart (0: never).
    #[arg(long, default_value_t = 600.0, value_name = "SECONDS")]
    fill_gaps: f64,
    /// Print the totals as JSON.
    #[arg(long)]
    json: bool,
    /// Recorded traces.
    #[arg(required = true)]
    files: Vec<PathBuf>,
}

#[derive(Args, Debug)]
pub(super) struct PredictArgs {
    #[command(flatten)]
    server: ServerAddr,
    /// The track: GPX 1.1, or CSV with the header `time,lat,lon` (unix
    /// seconds; empty lat and lon where there was no fix).
    #[arg(long)]
    track: PathBuf,
    /// Weak below this many kbit/s.
    #[arg(long, default_value_t = 250.0)]
    weak_kbps: f64,
    /// Look this many seconds ahead along the learned route.
    #[arg(long, default_value_t = 60)]
    horizon: u32,
    /// Print JSON: {"points":[{"t","weak","weak_in_s","expected_kbps","confidence"}]}.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub(super) struct MapArgs {
    #[command(flatten)]
    server: ServerAddr,
    /// Print a GeoJSON FeatureCollection of the cells' polygons.
    #[arg(long)]
    geojson: bool,
}

pub(super) async fn run(cmd: QosCommand) -> anyhow::Result<()> {
    match cmd {
        QosCommand::Import(a) => import(a).await,
        QosCommand::Predict(a) => predict(a).await,
        QosCommand::Map(a) => map(a).await,
    }
}

/// Prints a line; a reader that went away (`| head`) ends the output
/// quietly instead of a panic.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write;
        if writeln!(std::io::stdout().lock(), $($arg)*).is_err() {
            return Ok(());
        }
    }};
}

fn read(path: &PathBuf) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

async fn import(a: ImportArgs) -> anyhow::Result<()> {
    if !(a.fill_gaps.is_finite() && a.fill_gaps >= 0.0) {
        anyhow::bail!("--fill-gaps must be 0 or more seconds");
    }
    let server = a.server.url()?;
    // Every file is read and checked before anything is sent.
    let mut files = vec![];
    for f in &a.files {
        let text = read(f)?;
        let mut rows = match a.format {
            Format::NorwayHsdpa => track::parse_norway(&text),
            Format::Ucc5g => track::parse_ucc(&text),
        }
        .map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?;
        if a.fill_gaps > 0.0 {
            track::fill_gaps(&mut rows, a.fill_gaps);
        }
        let samples: Vec<_> = rows.iter().filter_map(qos::sample_of).collect();
        files.push((f.clone(), rows.len(), samples));
    }
    let total: usize = files.iter().map(|(_, _, s)| s.len()).sum();
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {pos}/{len} samples ({per_sec}, {eta})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message("importing");
    let channel = client::connect(&server).await?;
    let shared = identity::generate()?;
    let (mut sum, mut reasons, mut rows_without) = (qos::Reported::default(), vec![], 0usize);
    for (file, rows, samples) in files {
        rows_without += rows - samples.len();
        let key = if a.device_per_file {
            identity::generate()?
        } else {
            shared.clone()
        };
        let (got, why) = qos::observe(channel.clone(), &key, samples, |n| bar.inc(n as u64))
            .await
            .with_context(|| format!("reporting {}", file.display()))?;
        sum.accepted += got.accepted;
        sum.rejected += got.rejected;
        reasons.extend(why.into_iter().map(|w| format!("{}: {w}", file.display())));
    }
    bar.finish_and_clear();
    reasons.truncate(5);
    if a.json {
        out!(
            "{}",
            serde_json::json!({
                "files": a.files.len(),
                "accepted": sum.accepted,
                "rejected": sum.rejected,
                "without_position": rows_without,
                "reasons": reasons,
            })
        );
    } else {
        out!(
            "imported {} files: {} samples accepted, {} rejected, {} readings without a position skipped",
            a.files.len(),
            sum.accepted,
            sum.rejected,
            rows_without
        );
        for r in &reasons {
            out!("  rejected: {r}");
        }
    }
    Ok(())
}

async fn predict(a: PredictArgs) -> anyhow::Result<()> {
    if !(a.weak_kbps.is_finite() && a.weak_kbps > 0.0) {
        anyhow::bail!("--weak-kbps must be a positive number");
    }
    let server = a.server.url()?;
    let text = read(&a.track)?;
    let points =
        track::parse_track(&text).map_err(|e| anyhow::anyhow!("{}: {e}", a.track.display()))?;
    let channel = client::connect(&server).await?;
    let key = identity::generate()?;
    let got = qos::predict(channel, &key, &points, a.weak_kbps, a.horizon).await?;
    let round = |v: f64, k: f64| (v * k).round() / k;
    if a.json {
        let pts: Vec<serde_json::Value> = got
            .iter()
            .map(|p| {
                serde_json::json!({
                    "t": p.t_unix_ms as f64 / 1000.0,
                    "weak": p.weak,
                    "weak_in_s": p.weak_in_s.map(|v| round(v, 10.0)),
                    "expected_kbps": p.expected_kbps.map(|v| round(v, 10.0)),
                    "confidence": round(p.confidence, 1000.0),
                })
            })
            .collect();
        out!("{}", serde_json::json!({ "points": pts }));
    } else {
        out!(
            "{:>14}  {:<5} {:>9} {:>13} {:>10}",
            "time",
            "weak",
            "weak in",
            "expected",
            "confidence"
        );
        for p in &got {
            out!(
                "{:>14.1}  {:<5} {:>9} {:>13} {:>10.2}",
                p.t_unix_ms as f64 / 1000.0,
                if p.weak { "WEAK" } else { "-" },
                p.weak_in_s.map_or("-".into(), |s| format!("{s:.0} s")),
                p.expected_kbps
                    .map_or("-".into(), |k| format!("{k:.0} kbit/s")),
                p.confidence
            );
        }
        let weak = got.iter().filter(|p| p.weak).count();
        let warned = got
            .iter()
            .filter(|p| p.weak_in_s.is_some_and(|s| s > 0.0))
            .count();
        out!(
            "{} points: {weak} predicted weak, {warned} with a weak zone ahead",
            got.len()
        );
    }
    Ok(())
}

async fn map(a: MapArgs) -> anyhow::Result<()> {
    let server = a.server.url()?;
    let channel = client::connect(&server).await?;
    let cells = qos::published(channel).await?;
    if a.geojson {
        out!("{}", qos::geojson(&cells));
    } else {
        let weak = cells.cells.iter().filter(|c| c.weak).count();
        let dips = cells
            .cells
            .iter()
            .filter(|c| c.dips_recur && !c.weak)
            .count();
        out!(
            "{} published cells (H3 resolution {}, k = {}): {weak} weak (below {} kbit/s), {dips} more where dips recur (most passes had one); --geojson exports them",
            cells.cells.len(),
            cells.resolution,
            cells.k,
            cells.weak_kbps
        );
    }
    Ok(())
}
