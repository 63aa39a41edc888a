//! The command line: `run` (the daemon), `demo` (everything embedded), `produce` (replay a
//! dataset, or an export, into Kafka), `export` (every user's history, for audits and
//! migrations), `recommend` (offline, from a checkpoint), `eval` (the paper's protocol) and
//! `bench` (throughput).

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::{Args, Parser, Subcommand};

use multivaed::config::Config;
use multivaed::eval::{self, RawFormat};
use multivaed::live::LiveModel;
use multivaed::model::{set_threads, Checkpoints};
use multivaed::serve::{recommend_offline, OfflineQuery};
use multivaed::store::Store;

mod model_args;
pub use model_args::ModelArgs;

/// A streaming Multi-VAE recommender.
#[derive(Debug, Parser)]
#[command(name = "multivaed", version, about)]
pub struct Cli {
    /// Log format: human-readable text, or one JSON object per line for collectors.
    #[arg(long, global = true, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: consume clicks, train, publish recommendations.
    Run(RunArgs),
    /// Everything embedded: an in-process Kafka broker, a synthetic click stream, the daemon.
    Demo(DemoArgs),
    /// Replay a dataset file into a topic as click events, in timestamp order.
    Produce(ProduceArgs),
    /// Recommend offline from the newest model version and the store of a (stopped) daemon.
    Recommend(RecommendArgs),
    /// Write every user's history as JSON lines (`{"user_id", "items"}`, items oldest first)
    /// from the store of a (stopped) daemon: for audits and migrations (`multivaed produce
    /// --data FILE.jsonl` imports it into a fresh deployment).
    Export(ExportArgs),
    /// List the model versions of a data_dir, or roll back to one (daemon stopped).
    Models(ModelsArgs),
    /// Create or check every topic the configured role needs (partitions, compaction).
    Topics(TopicsArgs),
    /// Train and evaluate under the paper's strong-generalisation protocol.
    Eval(EvalArgs),
    /// The benchmarks (model, store, stream, suite): runs `multivaed-bench` from beside this
    /// binary (`cargo build --release -p multivaed-kit`).
    Bench(BenchArgs),
}

/// `multivaed bench`'s arguments, passed on to `multivaed-bench` as they are.
#[derive(Debug, Args)]
pub struct BenchArgs {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<std::ffi::OsString>,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// A split directory in dawenl/vae_cf's format (train.csv, validation_tr.csv, …, unique_sid.txt).
    #[arg(long, conflicts_with = "data", required_unless_present = "data")]
    pub split: Option<PathBuf>,
    /// A raw interaction file to split with the paper's rules.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Layout of --data (default: from the extension: .inter, .csv, else one line per user).
    #[arg(long, value_enum, requires = "data")]
    pub format: Option<RawFormat>,
    /// Validation users, and as many test users (default: 10% of the users, at most 10,000).
    #[arg(long, requires = "data")]
    pub heldout_users: Option<usize>,
    /// Interactions with a rating below this are dropped (where the file has ratings).
    #[arg(long, default_value_t = 4.0, requires = "data")]
    pub min_rating: f64,
    /// Seed of the user shuffle and the 80/20 fold-in split.
    #[arg(long, default_value_t = 98765, requires = "data")]
    pub split_seed: u64,
    /// Write the split built from --data in vae_cf's format to this directory.
    #[arg(long, requires = "data")]
    pub write_split: Option<PathBuf>,
    /// Training epochs; the epoch with the best validation NDCG@100 is kept.
    #[arg(long, default_value_t = 200)]
    pub epochs: usize,
    /// Seed of initialisation, shuffling, dropout and ε.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Print one JSON object as the last line of standard output.
    #[arg(long)]
    pub json: bool,
    /// Training device: "cpu", "cuda:N" or "auto" (CUDA needs a `--features cuda` build).
    #[arg(long, default_value = "cpu")]
    pub device: multivaed::config::DeviceChoice,
    #[command(flatten)]
    pub model: ModelArgs,
}

#[derive(Debug, Args)]
pub struct TopicsArgs {
    #[command(subcommand)]
    pub action: TopicsAction,
    /// The TOML configuration naming the topics.
    #[arg(long, short, env = "MULTIVAED_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// The role whose topics to handle (default: the config's).
    #[arg(long, value_enum, global = true)]
    pub role: Option<multivaed::config::Role>,
}

#[derive(Debug, Subcommand)]
pub enum TopicsAction {
    /// Lists every topic with its partitions and cleanup policy; exits 1 if one is wrong.
    Check,
    /// Creates the missing topics (then checks them all).
    Create {
        /// Partitions of a new clicks topic (the others follow it; members: 1).
        #[arg(long, default_value_t = 6)]
        partitions: i32,
        /// Replication factor of new topics.
        #[arg(long, default_value_t = 1)]
        replication: i32,
    },
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The TOML configuration (configs/multivaed.toml documents every key).
    #[arg(long, short, env = "MULTIVAED_CONFIG")]
    pub config: Option<PathBuf>,
    /// What this process does (overrides the config's `role`, and `MULTIVAED_ROLE`).
    #[arg(long, value_enum)]
    pub role: Option<multivaed::config::Role>,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Stop by itself after this many seconds (or, if no model is live by then, as soon as the
    /// first one is, at most 5 minutes later) and print a summary.
    #[arg(long)]
    pub duration: Option<u64>,
    /// Replay this dataset (ml-100k .inter, CSV, or one line per user) instead of synthetic clicks.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Clicks per second.
    #[arg(long, default_value_t = 2000.0)]
    pub rate: f64,
    /// Keep the store and models here (default: a fresh temporary directory).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// HTTP address (metrics, health, pull API).
    #[arg(long, default_value = "127.0.0.1:9464")]
    pub listen: std::net::SocketAddr,
}

#[derive(Debug, Args)]
pub struct ProduceArgs {
    /// Bootstrap servers.
    #[arg(long, env = "KAFKA_BROKERS")]
    pub brokers: String,
    #[arg(long, default_value = "clicks")]
    pub topic: String,
    /// The dataset file (an export's `.jsonl` replays histories with their weights and
    /// excluded items).
    #[arg(long)]
    pub data: PathBuf,
    /// The configuration of the deployment an export is replayed into: its `[events]` give
    /// each weight its event type (default: the built-in types).
    #[arg(long, env = "MULTIVAED_CONFIG")]
    pub config: Option<PathBuf>,
    #[arg(long, value_enum)]
    pub format: Option<RawFormat>,
    /// Skip interactions rated below this (where the file has ratings).
    #[arg(long)]
    pub min_rating: Option<f64>,
    /// Clicks per second (0: as fast as possible).
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// Send at most this many clicks.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Extra librdkafka properties, KEY=VALUE (repeatable), e.g. security.protocol=SASL_SSL.
    #[arg(long = "property", short = 'X')]
    pub properties: Vec<String>,
    /// The partitioner (as the daemon's `kafka.partitioner`): clicks are keyed by user id.
    #[arg(long, value_enum, default_value = "consistent-random")]
    pub partitioner: multivaed::partition::Partitioner,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The configuration of the daemon whose store to read.
    #[arg(long, short, env = "MULTIVAED_CONFIG")]
    pub config: Option<PathBuf>,
    /// Where to write (default: standard output).
    #[arg(long, short)]
    pub output: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct RecommendArgs {
    /// The configuration of the daemon whose data to read.
    #[arg(long, short, env = "MULTIVAED_CONFIG")]
    pub config: Option<PathBuf>,
    /// A user id known to the store.
    #[arg(long, conflicts_with = "items", required_unless_present = "items")]
    pub user: Option<String>,
    /// Or an ad-hoc history: item ids, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub items: Option<Vec<String>>,
    #[arg(long, short, default_value_t = 10)]
    pub k: usize,
}

#[derive(Debug, Args)]
pub struct ModelsArgs {
    /// The configuration of the daemon whose models to read.
    #[arg(long, short, env = "MULTIVAED_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// The role whose versions to handle (default: the config's): `all` reads data_dir/models,
    /// `serve` and `train` the fleet's models topic and object store.
    #[arg(long, value_enum, global = true)]
    pub role: Option<multivaed::config::Role>,
    #[command(subcommand)]
    pub command: ModelsCommand,
}

#[derive(Debug, Subcommand)]
pub enum ModelsCommand {
    /// Every version with its figures and whether it loads. Role `all`: the versions on disk;
    /// roles `serve` and `train`: the models topic's announcements and their files in the
    /// object store.
    List,
    /// Make VERSION the current one again. Role `all` (daemon stopped): newer ones are moved
    /// aside and the daemon loads it at start. Roles `serve` and `train` (everything running):
    /// it is announced again; every replica swaps to it and the trainer continues from it.
    Rollback {
        /// The version to return to.
        version: u64,
    },
    /// Roles `serve` and `train`: make the running canary VERSION live for everyone now,
    /// whatever its evidence says.
    Promote {
        /// The running canary's version.
        version: u64,
    },
    /// Roles `serve` and `train`: roll the running canary VERSION back now (its slice returns
    /// to the live version; the trainer continues from the live version).
    Reject {
        /// The running canary's version.
        version: u64,
    },
}

fn run_eval(args: EvalArgs) -> Result<()> {
    set_threads(args.threads)?;
    let config = args.model.config()?;
    let split = match (&args.split, &args.data) {
        (Some(dir), _) => {
            eval::read_split_dir(dir).with_context(|| format!("--split {}", dir.display()))?
        }
        (None, Some(file)) => {
            let format = args.format.unwrap_or_else(|| RawFormat::from_path(file));
            let raw = eval::read_raw(file, format)
                .with_context(|| format!("--data {}", file.display()))?;
            let n_users = raw
                .iter()
                .map(|r| r.user.as_str())
                .collect::<std::collections::HashSet<_>>()
                .len();
            let heldout = args
                .heldout_users
                .unwrap_or_else(|| (n_users / 10).clamp(1, 10_000));
            let mut split = eval::build_split(&raw, args.min_rating, heldout, args.split_seed)?;
            if config.input == multivaed::model::Input::Weighted {
                split = split.weighted_by_rating(&raw)?;
                eprintln!("weighted input: each interaction weighs its rating");
            }
            if let Some(dir) = &args.write_split {
                eval::write_split_dir(&split, dir)?;
                eprintln!("split written to {}", dir.display());
            }
            split
        }
        (None, None) => bail!("give --split DIR or --data FILE"),
    };
    eprintln!(
        "{} training users, {} validation, {} test, {} items, {} training interactions",
        split.train.n_users(),
        split.validation_tr.n_users(),
        split.test_tr.n_users(),
        split.item_ids.len(),
        split.train.nnz()
    );
    let opts = eval::EvalOptions {
        config,
        epochs: args.epochs,
        seed: args.seed,
        device: multivaed::daemon::open_device(args.device)?.0,
    };
    let bar = indicatif::ProgressBar::new(args.epochs as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} epochs [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let interactive = std::io::stderr().is_terminal();
    let report = eval::run(&split, &opts, &mut |epoch, loss, beta, ndcg, best| {
        bar.set_message(format!(
            "loss {loss:.2} β {beta:.5} val ndcg@100 {ndcg:.4} (best {best:.4})"
        ));
        bar.inc(1);
        if !interactive && (epoch % 20 == 0 || epoch + 1 == args.epochs) {
            eprintln!(
                "epoch {epoch}: loss {loss:.3} β {beta:.5} val ndcg@100 {ndcg:.4} (best {best:.4})"
            );
        }
    })?;
    bar.finish_and_clear();
    let m = &report.multivae;
    let p = &report.popularity;
    println!("| model | NDCG@100 | Recall@20 | Recall@50 |");
    println!("|---|---|---|---|");
    println!(
        "| Multi-VAE (best epoch {}) | {:.4} ± {:.4} | {:.4} | {:.4} |",
        m.best_epoch, m.test.ndcg100, m.ndcg100_se, m.test.recall20, m.test.recall50
    );
    println!(
        "| Popularity | {:.4} | {:.4} | {:.4} |",
        p.ndcg100, p.recall20, p.recall50
    );
    println!(
        "{} test users, {} items, {:.3} s per training epoch",
        report.users.test, report.items, m.train_seconds_per_epoch
    );
    if let Some(s) = &report.scoring {
        println!(
            "scoring: exact NDCG@100 {:.5} at {:.0} users/s, int8 {:.5} at {:.0} users/s; identical top 10 {:.2}%, top 100 {:.2}%",
            s.exact_ndcg100,
            s.exact_users_per_second,
            s.int8_ndcg100,
            s.int8_users_per_second,
            100.0 * s.top10_identical_share,
            100.0 * s.top100_identical_share
        );
    }
    if args.json {
        let mut v = serde_json::to_value(&report)?;
        v["peak_rss_bytes"] = multivaed::metrics::peak_rss_bytes(None).into();
        println!("{}", serde_json::to_string(&v)?);
    }
    Ok(())
}

/// `multivaed bench …`: runs `multivaed-bench` (the benchmarks, built from the `kit/` workspace
/// member) from beside this binary with the same arguments.
fn run_bench(args: Vec<std::ffi::OsString>) -> Result<()> {
    let exe = std::env::current_exe().context("cannot find this executable")?;
    let bench = exe.with_file_name("multivaed-bench");
    if !bench.is_file() {
        bail!(
            "{} not found: the benchmarks are a binary of their own; build them with `cargo build --release -p multivaed-kit`",
            bench.display()
        );
    }
    let status = std::process::Command::new(&bench)
        .args(args)
        .status()
        .with_context(|| format!("cannot run {}", bench.display()))?;
    if !status.success() {
        bail!("{} exited with {status}", bench.display());
    }
    Ok(())
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rdkafka=warn"));
    // a log line that cannot be written (its reader gone: a collector restarted, a pipe closed)
    // is dropped: reporting the failure would print to that same stderr, which panics there
    // and, in the signal task, would leave SIGTERM unheard
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .log_internal_errors(false);
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
    };
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn run_recommend(args: RecommendArgs) -> Result<()> {
    let config = Config::load(args.config.as_deref())?;
    let store = Store::open(&config.data_dir, config.store.max_history)
        .context("cannot open the store (is a daemon still running on this data_dir?)")?;
    let checkpoints = Checkpoints::new(config.data_dir.join("models"));
    let live = LiveModel::load_latest(&checkpoints, &store, &Device::Cpu, |v, e| {
        eprintln!("skipping model version {v}: {e}")
    })?;
    let query = match (args.user, args.items) {
        (Some(user), _) => OfflineQuery::User(user),
        (None, Some(items)) => OfflineQuery::Items(items),
        (None, None) => bail!("give --user or --items"),
    };
    let answer = recommend_offline(&store, live.as_ref(), &query, args.k)?;
    for i in &answer.ignored_items {
        eprintln!("ignoring item {i:?}: unknown to the model");
    }
    println!("{}", serde_json::to_string_pretty(&answer.recommendation)?);
    Ok(())
}

fn run_export(args: ExportArgs) -> Result<()> {
    use std::io::Write;
    let config = Config::load(args.config.as_deref())?;
    let store = Store::open(&config.data_dir, config.store.max_history)
        .context("cannot open the store (is a daemon still running on this data_dir?)")?;
    let mut out: Box<dyn Write> = match &args.output {
        Some(p) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("cannot create {}", p.display()))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    // a serving replica's export holds the users of the partitions it holds, not of those it
    // gave up and keeps only until serve.state_cleanup_delay
    let (given_up, partitions) = store.given_up()?;
    let partitioner = config.kafka.partitioner;
    let kept = |user: &str| match partitions {
        Some(n) if !given_up.is_empty() => {
            !given_up.contains(&partitioner.partition(user.as_bytes(), n))
        }
        _ => true,
    };
    let mut users = 0u64;
    store.export(|user_id, history| {
        if !kept(user_id) {
            return Ok(());
        }
        users += 1;
        let line = multivaed::store::ExportedHistory {
            user_id: user_id.to_string(),
            history,
        };
        serde_json::to_writer(&mut out, &line)?;
        out.write_all(b"\n")?;
        Ok(())
    })?;
    out.flush()?;
    eprintln!("exported {users} users");
    Ok(())
}

fn run_models(args: ModelsArgs) -> Result<()> {
    let mut config = Config::load(args.config.as_deref())?;
    if let Some(role) = args.role {
        config.role = role;
    }
    if config.role != multivaed::config::Role::All {
        return runtime()?.block_on(fleet_models(&config, &args.command));
    }
    let checkpoints = Checkpoints::new(config.data_dir.join("models"));
    match args.command {
        ModelsCommand::List => {
            println!(
                "| version | created | update_count | β | items | validation NDCG@100 | status |"
            );
            println!("|---:|---|---:|---:|---:|---:|---|");
            for v in checkpoints.versions()? {
                let path = checkpoints.path_of(v);
                match Checkpoints::load(&path, &Device::Cpu) {
                    Ok((_, m)) => println!(
                        "| {} | {} | {} | {:.5} | {} | {} | ok |",
                        m.model_version,
                        m.created_at,
                        m.update_count,
                        m.beta,
                        m.n_items,
                        m.training
                            .get("validation_ndcg")
                            .and_then(|x| x.as_f64())
                            .map(|x| format!("{x:.4}"))
                            .unwrap_or_else(|| "-".into())
                    ),
                    Err(e) => println!("| {v} | | | | | | unusable: {e} |"),
                }
            }
            Ok(())
        }
        ModelsCommand::Rollback { version } => {
            // the store's lock is the data directory's: held by a running daemon
            let _lock = Store::open(&config.data_dir, config.store.max_history).context(
                "cannot take the data directory's lock: stop the daemon before a rollback",
            )?;
            let moved = checkpoints.rollback(version)?;
            println!(
                "model version {version} is the newest again; moved aside: {moved:?}. Restart the daemon to serve it."
            );
            Ok(())
        }
        ModelsCommand::Promote { .. } | ModelsCommand::Reject { .. } => bail!(
            "role all decides its canary itself (promotion.*); promote and reject are for a fleet's canary (--role serve or train)"
        ),
    }
}

/// `multivaed models list|rollback` for a fleet: the models topic and the object store.
async fn fleet_models(config: &Config, command: &ModelsCommand) -> Result<()> {
    match command {
        ModelsCommand::List => {
            println!("| version | epoch | trainer | created | update_count | β | items | validation NDCG@100 | status | live evidence (hits/clicks at 10) | files |");
            println!("|---:|---:|---|---|---:|---:|---:|---:|---|---|---|");
            for l in multivaed::shipping::list(config).await? {
                let a = &l.announcement;
                let status = match (l.current, l.accepted, a.rollback) {
                    _ if l.canary => "canary (running)".to_string(),
                    (true, _, true) => "current (rollback)".into(),
                    (true, _, false) => "current".into(),
                    (false, true, true) => "rollback".into(),
                    (false, true, false) => "announced".into(),
                    (false, false, _) => "ignored (fenced)".into(),
                };
                let status = match (&l.decision, a.canary) {
                    (Some(d), _) => format!("{status}; canary {} by {}", d.decision.as_str(), d.by),
                    (None, Some(f)) if !l.canary => format!("{status}; canary ({f} of users)"),
                    _ => status,
                };
                let evidence = match a.canary {
                    Some(_) => {
                        let e = &l.evidence;
                        format!(
                            "canary {}/{} ({:.4}), live {}/{} ({:.4})",
                            e.canary.hits,
                            e.canary.trials,
                            e.canary.rate(),
                            e.live.hits,
                            e.live.trials,
                            e.live.rate()
                        )
                    }
                    None => "-".into(),
                };
                println!(
                    "| {} | {} | {} | {} | {} | {:.5} | {} | {} | {status} | {evidence} | {} |",
                    a.version,
                    a.epoch,
                    a.trainer,
                    a.created_at,
                    a.state.update_count,
                    a.state.beta,
                    a.n_items,
                    a.validation_ndcg
                        .map(|x| format!("{x:.4}"))
                        .unwrap_or_else(|| "-".into()),
                    match &l.files {
                        Ok(()) => "ok".to_string(),
                        Err(e) => format!("unusable: {e}"),
                    }
                );
            }
            Ok(())
        }
        ModelsCommand::Rollback { version } => {
            let a = multivaed::shipping::rollback(config, *version).await?;
            println!(
                "model version {} (update_count {}, files {}) is announced as current again, under epoch {}: every serving replica swaps to it, and the trainer continues from it",
                a.version, a.state.update_count, a.uri, a.epoch
            );
            Ok(())
        }
        ModelsCommand::Promote { version } | ModelsCommand::Reject { version } => {
            let decision = match command {
                ModelsCommand::Promote { .. } => multivaed::promotion::Decided::Promote,
                _ => multivaed::promotion::Decided::Reject,
            };
            let d = multivaed::shipping::decide(config, *version, decision).await?;
            println!(
                "canary version {} decided: {} (on canary {}/{} hits, live {}/{}), under epoch {}",
                d.version,
                d.decision.as_str(),
                d.evidence.canary.hits,
                d.evidence.canary.trials,
                d.evidence.live.hits,
                d.evidence.live.trials,
                d.epoch
            );
            Ok(())
        }
    }
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    init_logging(cli.log_format);
    match cli.command {
        Command::Run(args) => {
            set_threads(None)?;
            let mut config = Config::load(args.config.as_deref())?;
            if let Some(role) = args.role {
                config.role = role;
                config.validate()?;
            }
            let rt = runtime()?;
            let ran =
                rt.block_on(async move { multivaed::daemon::Daemon::open(config)?.run().await });
            // every stage has ended and the store is flushed: blocking work one left behind (a
            // restore between two checks of the shutdown) does not hold the exit
            rt.shutdown_timeout(std::time::Duration::from_secs(2));
            ran
        }
        Command::Topics(args) => {
            let mut config = Config::load(args.config.as_deref())?;
            if let Some(role) = args.role {
                config.role = role;
            }
            runtime()?.block_on(topics(&config, &args.action))
        }
        Command::Demo(args) => {
            set_threads(None)?;
            runtime()?.block_on(multivaed::demo::run_demo(multivaed::demo::DemoOptions {
                duration: args.duration.map(std::time::Duration::from_secs),
                data: args.data,
                rate: args.rate,
                data_dir: args.data_dir,
                listen: args.listen,
            }))
        }
        Command::Produce(args) => {
            let format = args
                .format
                .unwrap_or_else(|| RawFormat::from_path(&args.data));
            let mut msgs = if format == RawFormat::Jsonl {
                let events = Config::load(args.config.as_deref())?.events;
                multivaed::demo::export_messages(&args.data, &events)?
            } else {
                multivaed::demo::dataset_messages(&args.data, Some(format), args.min_rating)?
            };
            if let Some(n) = args.limit {
                msgs.truncate(n);
            }
            let mut props = Vec::new();
            for p in &args.properties {
                let (k, v) = p
                    .split_once('=')
                    .with_context(|| format!("--property {p:?}: expected KEY=VALUE"))?;
                props.push((k.to_string(), v.to_string()));
            }
            props.push((
                "partitioner".to_string(),
                args.partitioner.librdkafka_name().to_string(),
            ));
            let sent = runtime()?.block_on(multivaed::demo::run_produce(
                &args.brokers,
                &args.topic,
                msgs,
                args.rate,
                &props,
            ))?;
            eprintln!("produced {sent} clicks to {}", args.topic);
            Ok(())
        }
        Command::Recommend(args) => run_recommend(args),
        Command::Export(args) => run_export(args),
        Command::Models(args) => run_models(args),
        Command::Eval(args) => run_eval(args),
        Command::Bench(args) => run_bench(args.args),
    }
}

/// `multivaed topics check|create`.
async fn topics(config: &Config, action: &TopicsAction) -> Result<()> {
    if let TopicsAction::Create {
        partitions,
        replication,
    } = action
    {
        for name in multivaed::topics::create(config, *partitions, *replication).await? {
            println!("created {name}");
        }
    }
    let found = multivaed::topics::check(config).await?;
    println!(
        "{:<28} {:<40} {:>10}  {:<10} status",
        "setting", "topic", "partitions", "policy"
    );
    for f in &found {
        println!(
            "{:<28} {:<40} {:>10}  {:<10} {}",
            f.topic.key,
            f.topic.name,
            f.partitions.map_or("-".to_string(), |n| n.to_string()),
            match (&f.policy, f.topic.compact) {
                (Some(p), _) => p.as_str(),
                (None, true) => "?",
                (None, false) => "-",
            },
            match (&f.problem, f.partitions) {
                (Some(p), _) => p.as_str(),
                (None, None) => "absent (optional)",
                (None, Some(_)) => "ok",
            }
        );
    }
    if found.iter().any(|f| f.problem.is_some()) {
        bail!("some topics are missing or wrong (multivaed topics create makes the missing ones)");
    }
    Ok(())
}
