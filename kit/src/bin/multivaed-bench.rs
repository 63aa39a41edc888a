//! `multivaed-bench` (also `multivaed bench …`): the benchmarks. `model` and `store` need no
//! broker; `stream` and `suite` run the `multivaed` binary beside this one against one.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use multivaed_kit::bench;

#[path = "../../../src/cli/model_args.rs"]
mod model_args;
use model_args::ModelArgs;

/// The same allocator as the daemon, so benchmarks measure what it runs.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(name = "multivaed-bench", version, about = "multivaed's benchmarks")]
struct Cli {
    #[command(subcommand)]
    command: BenchCommand,
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// A training step and top-100 scoring at several catalogue sizes (synthetic users).
    Model(ModelBenchArgs),
    /// The daemon against a real broker: ingest rate vs raw consume, click-to-recommendation
    /// latency under steady load with a 20k-item model.
    Stream(StreamBenchArgs),
    /// Serving replicas against a real broker: ingest with the changelog written, and a
    /// replica with an empty volume restoring every partition.
    Fleet(FleetBenchArgs),
    /// Shipping one model version (no broker): encoding and uploading the bundle, and a
    /// replica's download, verification and load, at several catalogue sizes.
    Ship(ShipBenchArgs),
    /// The store alone (no broker): the ingest benchmark's clicks written in ingest batches,
    /// then history reads as the scorer does them.
    Store(StoreBenchArgs),
    /// Live quality on real clicks in real order: the deployment with its shipped defaults
    /// pulled before each click, next to popularity, item-kNN and the offline Multi-VAE.
    Live(LiveBenchArgs),
    /// Everything, each part in its own process, with the PyTorch reference beside it:
    /// writes report.json and report.md.
    Suite(SuiteArgs),
}

#[derive(Debug, Args)]
struct FleetBenchArgs {
    /// Bootstrap servers of the broker to measure against (topics are created per run).
    #[arg(long, env = "KAFKA_BROKERS")]
    brokers: String,
    /// Clicks produced (users: a quarter as many).
    #[arg(long, default_value_t = 400_000)]
    events: usize,
    #[arg(long, default_value_t = 2)]
    partitions: i32,
    /// Working directory (daemon data and logs).
    #[arg(long, default_value = "bench-out/work")]
    work_dir: PathBuf,
    /// Write the figures as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Measure click → recommendation through a serving replica instead, with a model over this
    /// many items (the paper's layer sizes; users: as many).
    #[arg(long)]
    latency_items: Option<usize>,
    /// Clicks per second of the latency load, each measured in turn.
    #[arg(long, value_delimiter = ',', default_value = "1000")]
    rates: Vec<f64>,
    /// Seconds of load per rate.
    #[arg(long, default_value_t = 30.0)]
    seconds: f64,
    /// The replica's serve.scoring (int8 or exact), each measured in turn.
    #[arg(long, value_delimiter = ',', default_value = "int8")]
    scoring: Vec<String>,
}

#[derive(Debug, Args)]
struct StreamBenchArgs {
    /// Bootstrap servers of the broker to measure against (topics are created per run).
    #[arg(long, env = "KAFKA_BROKERS")]
    brokers: String,
    /// Clicks in the ingest benchmark.
    #[arg(long, default_value_t = 300_000)]
    events: usize,
    /// Loads of the latency benchmark, clicks/s (`--rates=` alone: ingest only).
    #[arg(long, value_delimiter = ',', num_args = 0.., default_value = "1000,5000")]
    rates: Vec<f64>,
    /// Seconds per load.
    #[arg(long, default_value_t = 40.0)]
    seconds: f64,
    /// Catalogue size of the latency benchmark's model.
    #[arg(long, default_value_t = 20_000)]
    items: usize,
    /// Working directory (daemon data and logs).
    #[arg(long, default_value = "bench-out/work")]
    work_dir: PathBuf,
    /// Write the figures as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct LiveBenchArgs {
    /// Bootstrap servers (without: the offline baselines only).
    #[arg(long, env = "KAFKA_BROKERS")]
    brokers: Option<String>,
    /// Rated interactions with timestamps (a RecBole .inter file).
    #[arg(long, default_value = "../shared/data/ml-100k/ml-100k.inter")]
    data: PathBuf,
    /// Ratings that count as clicks.
    #[arg(long, default_value_t = 4.0)]
    min_rating: f64,
    /// Share of the time-ordered clicks produced first.
    #[arg(long, default_value_t = 0.8)]
    prefix: f64,
    /// Clicks measured after the prefix.
    #[arg(long, default_value_t = 3000)]
    clicks: usize,
    /// Longest wait between the prefix and the measured clicks (seconds).
    #[arg(long, default_value_t = 300)]
    wait: u64,
    /// Deployments: all (one process), fleet (a trainer and a serving replica).
    #[arg(long, value_delimiter = ',', default_value = "all,fleet")]
    roles: Vec<String>,
    /// Runs of each deployment.
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Epochs of the offline reference Multi-VAE, each reported.
    #[arg(long, value_delimiter = ',', default_value = "20,50,100,200")]
    reference_epochs: Vec<usize>,
    /// Working directory (daemon data and logs).
    #[arg(long, default_value = "bench-out/work")]
    work_dir: PathBuf,
    /// Write the figures as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct ShipBenchArgs {
    /// Catalogue sizes.
    #[arg(long, value_delimiter = ',', default_value = "20000,100000")]
    items: Vec<usize>,
    /// The object store to ship through (a directory, or a URL as `models.store` takes).
    #[arg(long, default_value = "bench-out/work/object-store")]
    store: String,
    /// Working directory (the replica's store).
    #[arg(long, default_value = "bench-out/work")]
    work_dir: PathBuf,
    /// Write the rows as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    #[command(flatten)]
    model: ModelArgs,
}

#[derive(Debug, Args)]
struct StoreBenchArgs {
    /// Clicks to write.
    #[arg(long, default_value_t = 300_000)]
    events: usize,
    /// Clicks per batch (the ingest loop's `kafka.batch_size`).
    #[arg(long, default_value_t = 2000)]
    batch_size: usize,
    /// Where the store is created (a fresh directory inside it; removed afterwards).
    #[arg(long, default_value = "bench-out/work")]
    work_dir: PathBuf,
}

#[derive(Debug, Args)]
struct SuiteArgs {
    /// Bootstrap servers for the ingest and latency parts (skipped without).
    #[arg(long, env = "KAFKA_BROKERS")]
    brokers: Option<String>,
    /// Where report.json, report.md and each part's output go.
    #[arg(long, default_value = "bench-out")]
    out: PathBuf,
    /// Worker threads of every part (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// The reference MovieLens-100K split (vae_cf format).
    #[arg(long, default_value = "../shared/reference/ml-100k-split")]
    ml100k_split: PathBuf,
    /// Gowalla's train.txt (one line per user).
    #[arg(long, default_value = "../shared/data/gowalla/train.txt")]
    gowalla: PathBuf,
    /// Python with PyTorch for the reference run (skipped without).
    #[arg(long, env = "REF_PYTHON")]
    python: Option<PathBuf>,
    /// The directory holding the reference's paper_protocol.py.
    #[arg(long, default_value = "../shared/reference")]
    reference: PathBuf,
    /// Smaller and shorter: 50k ingest events, 15 s per load, 10 epochs, no Gowalla.
    #[arg(long)]
    quick: bool,
}

#[derive(Debug, Args)]
struct ModelBenchArgs {
    /// Catalogue sizes.
    #[arg(long, value_delimiter = ',', default_value = "1700,20000,100000")]
    items: Vec<usize>,
    /// Sizes at which the dense first layer is measured too.
    #[arg(long, value_delimiter = ',', default_value = "20000")]
    dense_at: Vec<usize>,
    /// Timed training steps per size.
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Users scored per size.
    #[arg(long, default_value_t = 2000)]
    score_users: usize,
    /// Users ranked per call, as a serving replica's scoring batch (default: all at once).
    #[arg(long)]
    score_batch: Option<usize>,
    /// Device: "cpu", "cuda:N" or "auto" (CUDA needs a `--features cuda` build).
    #[arg(long, default_value = "cpu")]
    device: multivaed::config::DeviceChoice,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Write the rows as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    #[command(flatten)]
    model: ModelArgs,
}

/// Figures as pretty JSON, to `path` or standard output.
fn print_or_write(figures: &impl serde::Serialize, path: Option<&std::path::Path>) -> Result<()> {
    let text = serde_json::to_string_pretty(figures)?;
    match path {
        Some(path) => std::fs::write(path, text)
            .with_context(|| format!("cannot write {}", path.display()))?,
        None => println!("{text}"),
    }
    Ok(())
}

fn run_bench(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Stream(args) => {
            let figures = bench::run_stream_bench(&bench::StreamBenchOptions {
                brokers: args.brokers,
                ingest_events: args.events,
                items: args.items,
                rates: args.rates,
                seconds: args.seconds,
                exe: multivaed_kit::harness::daemon_exe(),
                work_dir: args.work_dir,
            })?;
            print_or_write(&figures, args.json.as_deref())
        }
        BenchCommand::Fleet(args) => {
            let opts = bench::FleetBenchOptions {
                brokers: args.brokers,
                events: args.events,
                partitions: args.partitions,
                exe: multivaed_kit::harness::daemon_exe(),
                work_dir: args.work_dir,
            };
            if let Some(items) = args.latency_items {
                let mut out = Vec::new();
                for scoring in &args.scoring {
                    for &rate in &args.rates {
                        out.push(bench::serve_latency(
                            &opts,
                            items,
                            rate,
                            args.seconds,
                            scoring,
                        )?);
                    }
                }
                return print_or_write(&out, args.json.as_deref());
            }
            let figures = bench::run_fleet_bench(&opts)?;
            print_or_write(&figures, args.json.as_deref())
        }
        BenchCommand::Live(args) => {
            let roles = args
                .roles
                .iter()
                .map(|r| bench::LiveRole::parse(r))
                .collect::<Result<Vec<_>>>()?;
            let figures = bench::run_live_bench(&bench::LiveBenchOptions {
                brokers: args.brokers,
                data: args.data,
                min_rating: args.min_rating,
                prefix: args.prefix,
                clicks: args.clicks,
                wait: std::time::Duration::from_secs(args.wait),
                roles,
                runs: args.runs,
                reference_epochs: args.reference_epochs,
                exe: multivaed_kit::harness::daemon_exe(),
                work_dir: args.work_dir,
            })?;
            println!("{}", bench::live_table(&figures));
            if let Some(path) = args.json {
                print_or_write(&figures, Some(&path))?;
            }
            Ok(())
        }
        BenchCommand::Ship(args) => {
            let rows = bench::run_ship_bench(&bench::ShipBenchOptions {
                items: args.items,
                store: args.store,
                work_dir: args.work_dir,
                config: args.model.config()?,
            })?;
            println!("{}", bench::ship_table(&rows));
            if let Some(path) = args.json {
                print_or_write(&rows, Some(&path))?;
            }
            Ok(())
        }
        BenchCommand::Store(args) => {
            std::fs::create_dir_all(&args.work_dir)
                .with_context(|| format!("cannot create {}", args.work_dir.display()))?;
            let dir = args
                .work_dir
                .join(format!("bench-store-{}", std::process::id()));
            let figures = bench::run_store_bench(&dir, args.events, args.batch_size);
            let _ = std::fs::remove_dir_all(&dir);
            println!("{}", serde_json::to_string_pretty(&figures?)?);
            Ok(())
        }
        BenchCommand::Suite(args) => {
            let threads = args.threads.unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1)
            });
            let existing = |p: PathBuf| p.exists().then_some(p);
            let md = bench::run_suite(&bench::SuiteOptions {
                brokers: args.brokers,
                out: args.out.clone(),
                threads,
                ml100k_split: existing(args.ml100k_split),
                gowalla: existing(args.gowalla),
                python: args.python,
                reference: existing(args.reference),
                quick: args.quick,
            })?;
            println!("{md}");
            eprintln!("report: {}", args.out.join("report.md").display());
            Ok(())
        }
        BenchCommand::Model(args) => {
            multivaed::model::set_threads(args.threads)?;
            let (device, device_name) = multivaed::daemon::open_device(args.device)?;
            let opts = bench::ModelBenchOptions {
                device,
                device_name,
                items: args.items,
                dense_at: args.dense_at,
                steps: args.steps,
                score_users: args.score_users,
                score_batch: args.score_batch,
                config: args.model.config()?,
            };
            let rows = bench::run_model_bench(&opts, |r| {
                eprintln!(
                    "{} items, {} first layer, {}: {:.4} s/step, {:.0} users/s",
                    r.items, r.first_layer, r.device, r.step_seconds, r.users_per_second
                )
            })?;
            println!("{}", bench::model_table(&rows));
            if let Some(path) = args.json {
                std::fs::write(&path, serde_json::to_string_pretty(&rows)?)
                    .with_context(|| format!("cannot write {}", path.display()))?;
            }
            Ok(())
        }
    }
}

fn main() -> std::process::ExitCode {
    match run_bench(Cli::parse().command) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
