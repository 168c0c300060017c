//! `bandshare bench …` (the `bench` feature): flags and the report. The
//! measurements themselves live in `crates/bench`.

use clap::{Args, Subcommand};
use std::path::PathBuf;

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Matching: index and full gRPC share requests vs Redis GEOSEARCH/GEOADD.
    Match(BenchMatchArgs),
    /// Relay: bulk throughput and first-byte latency vs direct TCP and shadowsocks-rust.
    Relay(BenchRelayArgs),
    /// Scale: many sharer streams on one coordinator process.
    Scale(BenchScaleArgs),
    /// Scale-out: share requests, routed access requests and presence
    /// updates with two coordinators on a Redis Cluster (started for the
    /// run) vs one coordinator on its own.
    Scaleout(BenchScaleoutArgs),
    /// Failover: a sharer killed (SIGKILL) or its link cut, to the first new flow that works.
    Failover(BenchFailoverArgs),
    /// Whole-device mode: TCP and UDP through the TUN device vs the SOCKS
    /// proxy vs no bandshare, across network namespaces (needs root).
    Tun(BenchTunArgs),
    /// QoS map: leave-one-run-out on the real commute traces vs a 100 m grid baseline.
    Qos(BenchQosArgs),
}

#[derive(Args, Debug)]
pub struct BenchQosArgs {
    /// The qos-data directory (norway-hsdpa/, ucc-5g/) [default:
    /// $BANDSHARE_QOS_DATA, else ../shared/qos-data].
    #[arg(long)]
    data: Option<PathBuf>,
    /// Print one JSON object as the last line of stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct BenchTunArgs {
    /// Megabytes per download.
    #[arg(long, default_value_t = 200)]
    mbytes: u64,
    /// UDP echo round trips per path.
    #[arg(long, default_value_t = 2000)]
    udp_rounds: usize,
    /// Print one JSON object as the last line of stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct BenchFailoverArgs {
    /// Rounds of each kind of failure.
    #[arg(long, default_value_t = 20)]
    rounds: usize,
    /// Print one JSON object as the last line of stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct BenchScaleoutArgs {
    /// Sharers online, split between the two coordinators.
    #[arg(long, default_value_t = 20_000)]
    sharers: usize,
    /// Seconds of each share-request phase.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Concurrent share-request clients.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Access requests timed one by one, local and routed.
    #[arg(long, default_value_t = 2000)]
    asks: usize,
    /// Print one JSON object as the last line of stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct BenchScaleArgs {
    /// Sharer streams to keep online.
    #[arg(long, default_value_t = 100_000)]
    sharers: usize,
    /// HTTP/2 connections the streams are multiplexed over.
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// How often each sharer reports state.
    #[arg(long, default_value_t = 2000)]
    report_interval_ms: u64,
    /// Seconds of measurement under load.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Concurrent share-request clients during the measurement.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// One HTTP/2 connection per sharer, each from its own loopback
    /// address (127.1.0.0/15, 200 per address), as real devices would
    /// connect; needs a descriptor per sharer (raised as root).
    #[arg(long)]
    real_connections: bool,
    /// After the load phase, kill the coordinator and start it again:
    /// every sharer reconnects at once (with the agent's backoff); reports
    /// the time until all are back.
    #[arg(long)]
    restart: bool,
    /// Keep one core busy with another process for the whole run.
    #[arg(long)]
    busy_core: bool,
    /// Run the simulated sharers at this nice value (0..=19) during the
    /// measurement, the share-request clients and the coordinator at 0:
    /// on a small machine the load generator shares the coordinator's
    /// cores, where real sharers would be devices of their own (needs
    /// root to set the clients back to 0).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(i32).range(0..=19))]
    generator_nice: i32,
    /// Print one JSON object as the last line of stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct BenchRelayArgs {
    /// Seconds per throughput run.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// New flows timed for first-byte latency.
    #[arg(long, default_value_t = 300)]
    rounds: usize,
    /// Lanes the requester opens to the sharer besides the first
    /// connection (as `connect --lanes`).
    #[arg(long, default_value_t = bandshare_agent::requester::pool::LANES,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(0..=3))]
    lanes: usize,
    /// Print one JSON object as the last line of stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct BenchMatchArgs {
    /// Online sharers, uniformly over 50 km x 50 km around 39.9,116.4.
    #[arg(long, default_value_t = 1_000_000)]
    sharers: usize,
    /// Seconds each timed phase runs.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Concurrent clients for gRPC and Redis queries, one timed phase per
    /// level and side; each side is compared at its best level.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 2, 4, 8, 16])]
    concurrency: Vec<usize>,
    /// Skip the Redis reference.
    #[arg(long)]
    no_redis: bool,
    /// Print one JSON object as the last line of stdout.
    #[arg(long)]
    json: bool,
    /// Also measure share-request latency at these sizes and draw an SVG.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    /// Sizes for --plot.
    #[arg(long, value_delimiter = ',', default_value = "10000,100000,1000000")]
    plot_sizes: Vec<usize>,
}

fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("error"))
        .with_writer(std::io::stderr)
        .try_init();
}

pub async fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Match(a) => bench_match(a).await,
        BenchCommand::Tun(a) => {
            init_logs();
            anyhow::ensure!(
                a.mbytes > 0 && a.udp_rounds > 0,
                "--mbytes and --udp-rounds must be positive"
            );
            let v = bandshare_bench::tun::run(&bandshare_bench::tun::TunOptions {
                mbytes: a.mbytes,
                udp_rounds: a.udp_rounds,
            })
            .await?;
            print_report(&v, a.json)
        }
        BenchCommand::Qos(a) => {
            init_logs();
            let data = a
                .data
                .or_else(|| std::env::var_os("BANDSHARE_QOS_DATA").map(PathBuf::from))
                .unwrap_or_else(|| PathBuf::from("../shared/qos-data"));
            let mut v = bandshare_bench::qos::run(&bandshare_bench::qos::QosOptions { data })?;
            v["machine"] = serde_json::json!(bandshare_bench::stats::machine());
            print_report(&v, a.json)
        }
        BenchCommand::Scaleout(a) => {
            init_logs();
            anyhow::ensure!(
                a.sharers >= 2 && a.concurrency > 0 && a.seconds > 0.0 && a.asks > 0,
                "--sharers must be at least 2, --concurrency, --seconds and --asks positive"
            );
            let mut v =
                bandshare_bench::scaleout::run(&bandshare_bench::scaleout::ScaleoutOptions {
                    sharers: a.sharers,
                    seconds: a.seconds,
                    concurrency: a.concurrency,
                    asks: a.asks,
                    seed: 7,
                })
                .await?;
            v["machine"] = serde_json::json!(bandshare_bench::stats::machine());
            print_report(&v, a.json)
        }
        BenchCommand::Failover(a) => {
            init_logs();
            anyhow::ensure!(a.rounds > 0, "--rounds must be positive");
            let mut v =
                bandshare_bench::failover::run(&bandshare_bench::failover::FailoverOptions {
                    rounds: a.rounds,
                })
                .await?;
            v["machine"] = serde_json::json!(bandshare_bench::stats::machine());
            print_report(&v, a.json)
        }
        BenchCommand::Scale(a) => {
            init_logs();
            anyhow::ensure!(
                a.sharers > 0
                    && a.connections > 0
                    && a.concurrency > 0
                    && a.seconds > 0.0
                    && a.report_interval_ms >= 100,
                "--sharers, --connections, --concurrency and --seconds must be positive, --report-interval-ms at least 100"
            );
            let o = bandshare_bench::scale::ScaleOptions {
                sharers: a.sharers,
                connections: a.connections,
                report_interval_ms: a.report_interval_ms,
                seconds: a.seconds,
                concurrency: a.concurrency,
                real_connections: a.real_connections,
                restart: a.restart,
                busy_core: a.busy_core,
                generator_nice: a.generator_nice,
            };
            let mut v = bandshare_bench::scale::run(&o).await?;
            v["machine"] = serde_json::json!(bandshare_bench::stats::machine());
            print_report(&v, a.json)
        }
        BenchCommand::Relay(a) => {
            init_logs();
            anyhow::ensure!(
                a.seconds > 0.0 && a.rounds > 0,
                "--seconds and --rounds must be positive"
            );
            let o = bandshare_bench::relay::RelayBenchOptions {
                seconds: a.seconds,
                first_byte_rounds: a.rounds,
                lanes: a.lanes,
            };
            let mut v = bandshare_bench::relay::run(&o).await?;
            v["machine"] = serde_json::json!(bandshare_bench::stats::machine());
            print_report(&v, a.json)
        }
    }
}

async fn bench_match(a: BenchMatchArgs) -> anyhow::Result<()> {
    use bandshare_bench::matching::{MatchOptions, run};
    init_logs();
    anyhow::ensure!(
        a.sharers > 0
            && !a.concurrency.is_empty()
            && a.concurrency.iter().all(|c| *c > 0)
            && a.seconds > 0.0,
        "--sharers, every --concurrency level and --seconds must be positive"
    );
    let o = MatchOptions {
        sharers: a.sharers,
        seconds: a.seconds,
        concurrency: a.concurrency,
        redis: !a.no_redis,
        ..MatchOptions::default()
    };
    let mut report = run(&o).await?;
    if let Some(path) = &a.plot {
        bandshare_bench::matching::plot_latency(&o, &mut report, &a.plot_sizes, path).await?;
        eprintln!("plot written to {}", path.display());
    }
    report["machine"] = serde_json::json!(bandshare_bench::stats::machine());
    print_report(&report, a.json)
}

fn print_report(v: &serde_json::Value, json: bool) -> anyhow::Result<()> {
    if json {
        out!("{v}");
    } else {
        out!("{}", serde_json::to_string_pretty(v)?);
    }
    Ok(())
}
