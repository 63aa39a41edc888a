//! The benchmarks (`multivaed-bench`, also run as `multivaed bench …`): the model's training step
//! and scoring, the store, the daemon against a broker, and the whole suite. Printed as markdown
//! tables and written as JSON; benchmarks report figures, they never assert timings.

mod fleet;
mod live;
mod ship;
mod stream;
mod suite;

pub use fleet::{run_fleet_bench, serve_latency, FleetBenchOptions, FleetFigures, ServeLatency};
pub use live::{live_table, run_live_bench, LiveBenchOptions, LiveFigures, LiveRole};
pub use ship::{run_ship_bench, ship_table, ShipBenchOptions, ShipBenchRow};
pub use stream::{run_stream_bench, StreamBenchOptions, StreamFigures};
pub use suite::{run_suite, SuiteOptions, SuiteReport};

use std::time::Instant;

use anyhow::Result;
use candle_core::Device;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use multivaed::model::{FirstLayer, Interactions, ModelConfig, MultiVae, Scoring, Trainer};

/// Synthetic users with a skewed (power-law-like) item popularity: `per_user` items on average.
pub fn synthetic_users(n_users: usize, n_items: usize, per_user: usize, seed: u64) -> Interactions {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let rows = (0..n_users).map(|_| {
        let n = rng.gen_range(per_user / 2..=per_user * 3 / 2).max(1);
        (0..n)
            .map(|_| {
                let r: f64 = rng.gen();
                ((r * r * r) * n_items as f64) as u32 % n_items as u32
            })
            .collect::<Vec<u32>>()
    });
    Interactions::from_rows(rows, n_items).expect("indices are in range")
}

/// One row of the model benchmark.
#[derive(Debug, Clone, Serialize)]
pub struct ModelBenchRow {
    pub device: String,
    pub items: usize,
    pub first_layer: &'static str,
    pub batch_size: usize,
    pub step_seconds: f64,
    pub steps_per_second: f64,
    pub distinct_items_per_batch: f64,
    pub score_users: usize,
    /// Users ranked per call (a serving replica's scoring batch), all at once by default.
    pub score_batch: usize,
    pub score_seconds: f64,
    pub users_per_second: f64,
    pub single_user_ms: f64,
    /// The same users through an int8 serving copy (absent where the CPU has no int8 pass).
    pub int8_users_per_second: Option<f64>,
    pub int8_single_user_ms: Option<f64>,
    /// Users whose top 10 is the same exact and int8.
    pub int8_top10_identical_share: Option<f64>,
    /// This process's peak RSS so far (all sizes measured before included).
    pub peak_rss_bytes: u64,
}

/// Options of `multivaed bench model`.
#[derive(Debug, Clone)]
pub struct ModelBenchOptions {
    pub device: Device,
    pub device_name: String,
    pub items: Vec<usize>,
    pub dense_at: Vec<usize>,
    pub steps: usize,
    pub score_users: usize,
    /// Users ranked per call (`None`: all at once).
    pub score_batch: Option<usize>,
    pub config: ModelConfig,
}

fn time_steps(
    trainer: &mut Trainer,
    data: &Interactions,
    steps: usize,
    batch: usize,
) -> Result<(f64, f64)> {
    let users: Vec<usize> = (0..data.n_users()).collect();
    let batch_rows = |s: usize| -> Vec<&[u32]> {
        let start = (s * batch) % (data.n_users() - batch + 1);
        users[start..start + batch]
            .iter()
            .map(|&u| data.row(u))
            .collect()
    };
    // counted before the clock starts: bookkeeping of the benchmark, not training
    let distinct: usize = (0..steps)
        .map(|s| {
            let mut seen: Vec<u32> = batch_rows(s)
                .iter()
                .flat_map(|r| r.iter().copied())
                .collect();
            seen.sort_unstable();
            seen.dedup();
            seen.len()
        })
        .sum();
    // one warm-up step (allocations, page faults)
    trainer.train_step(&batch_rows(0))?;
    let t0 = Instant::now();
    for s in 0..steps {
        trainer.train_step(&batch_rows(s))?;
    }
    trainer.model().device().synchronize()?;
    Ok((
        t0.elapsed().as_secs_f64() / steps as f64,
        distinct as f64 / steps as f64,
    ))
}

/// One serving copy's top-100 scoring of a batch of users.
struct ScoringTime {
    seconds: f64,
    single_user_ms: f64,
    top10: Vec<Vec<u32>>,
}

/// Times `model` ranking the top 100 of `rows`, `batch` users a call, then of 20 users one at a
/// time.
fn time_scoring(model: &MultiVae, rows: &[&[u32]], batch: usize) -> Result<ScoringTime> {
    model.recommend(&rows[..rows.len().min(100)], 100)?; // warm-up
    let t0 = Instant::now();
    let mut recs = Vec::with_capacity(rows.len());
    for part in rows.chunks(batch.max(1)) {
        recs.extend(model.recommend(part, 100)?);
    }
    let seconds = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let reps = 20;
    for r in rows.iter().take(reps) {
        model.recommend(std::slice::from_ref(r), 100)?;
    }
    Ok(ScoringTime {
        seconds,
        single_user_ms: t1.elapsed().as_secs_f64() * 1000.0 / reps as f64,
        top10: recs
            .into_iter()
            .map(|r| r.into_iter().take(10).map(|(i, _)| i).collect())
            .collect(),
    })
}

/// Runs the model benchmark: a training step and top-100 scoring at each catalogue size.
pub fn run_model_bench(
    opts: &ModelBenchOptions,
    mut log: impl FnMut(&ModelBenchRow),
) -> Result<Vec<ModelBenchRow>> {
    let mut out = Vec::new();
    let batch = opts.config.batch_size;
    for &items in &opts.items {
        let n_users = (batch * 4).max(opts.score_users);
        let data = synthetic_users(n_users, items, 50, items as u64);
        let mut layers = vec![FirstLayer::Sparse];
        if opts.dense_at.contains(&items) {
            layers.push(FirstLayer::Dense);
        }
        for layer in layers {
            let mut trainer = Trainer::new(&opts.config, items, 1, &opts.device)?;
            trainer.set_first_layer(layer);
            let (step_seconds, distinct) = time_steps(&mut trainer, &data, opts.steps, batch)?;
            let rows: Vec<&[u32]> = (0..opts.score_users).map(|u| data.row(u)).collect();
            let score_batch = opts.score_batch.unwrap_or(rows.len()).max(1);
            let exact_copy = trainer.model().for_serving_with(Scoring::Exact)?;
            let exact = time_scoring(&exact_copy, &rows, score_batch)?;
            let int8_copy = trainer.model().for_serving_with(Scoring::Int8)?;
            let int8 = if int8_copy.int8_enabled() {
                Some(time_scoring(&int8_copy, &rows, score_batch)?)
            } else {
                None
            };
            let (score_seconds, single_user_ms) = (exact.seconds, exact.single_user_ms);
            let row = ModelBenchRow {
                device: opts.device_name.clone(),
                items,
                first_layer: match layer {
                    FirstLayer::Sparse => "sparse",
                    FirstLayer::Dense => "dense",
                },
                batch_size: batch,
                step_seconds,
                steps_per_second: 1.0 / step_seconds,
                distinct_items_per_batch: distinct,
                score_users: rows.len(),
                score_batch,
                score_seconds,
                users_per_second: rows.len() as f64 / score_seconds,
                single_user_ms,
                int8_users_per_second: int8.as_ref().map(|t| rows.len() as f64 / t.seconds),
                int8_single_user_ms: int8.as_ref().map(|t| t.single_user_ms),
                int8_top10_identical_share: int8.as_ref().map(|t| {
                    let same = t
                        .top10
                        .iter()
                        .zip(&exact.top10)
                        .filter(|(a, b)| a == b)
                        .count();
                    same as f64 / rows.len().max(1) as f64
                }),
                peak_rss_bytes: multivaed::metrics::peak_rss_bytes(None),
            };
            log(&row);
            out.push(row);
        }
    }
    Ok(out)
}

/// The rows as a markdown table.
pub fn model_table(rows: &[ModelBenchRow]) -> String {
    let mut s = String::from(
        "| device | items | first layer | step (s) | steps/s | distinct items/batch | users a call | top-100 users/s | 1-user fold-in (ms) | int8 users/s | int8 1-user (ms) | same top 10 |\n|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let or_dash = |v: Option<f64>, f: &dyn Fn(f64) -> String| v.map_or("–".to_string(), f);
    for r in rows {
        s += &format!(
            "| {} | {} | {} | {:.4} | {:.2} | {:.0} | {} | {:.0} | {:.2} | {} | {} | {} |\n",
            r.device,
            r.items,
            r.first_layer,
            r.step_seconds,
            r.steps_per_second,
            r.distinct_items_per_batch,
            r.score_batch,
            r.users_per_second,
            r.single_user_ms,
            or_dash(r.int8_users_per_second, &|v| format!("{v:.0}")),
            or_dash(r.int8_single_user_ms, &|v| format!("{v:.2}")),
            or_dash(r.int8_top10_identical_share, &|v| format!(
                "{:.1}%",
                100.0 * v
            )),
        );
    }
    s
}

/// What `bench store` measured: the ingest path's store writes without a broker.
#[derive(Debug, Clone, Serialize)]
pub struct StoreBenchFigures {
    pub events: usize,
    pub batch_size: usize,
    pub users: usize,
    /// Clicks per second through `Store::apply` + `Store::flush`, one batch at a time.
    pub events_per_second: f64,
    /// Mean milliseconds per batch in `apply` and in `flush`.
    pub apply_ms: f64,
    pub flush_ms: f64,
    /// Users (id and history) read back per second, as the scorer reads each waiting user.
    pub histories_per_second: f64,
}

/// The ingest benchmark's clicks (users uniform over `events / 4`, items skewed over 5,000)
/// written to a fresh store under `dir` in batches of `batch_size`, as the ingest loop does.
pub fn run_store_bench(
    dir: &std::path::Path,
    events: usize,
    batch_size: usize,
) -> Result<StoreBenchFigures> {
    use multivaed::store::{Click, PartitionOffset, Store};
    let store = Store::open(dir, multivaed::config::StoreConfig::default().max_history)?;
    let users = (events / 4).max(1);
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let clicks: Vec<Click> = (0..events)
        .map(|_| {
            let r: f64 = rng.gen();
            Click::new(
                format!("u{}", rng.gen_range(0..users)),
                format!("i{}", (r * r * 5000.0) as u32),
            )
        })
        .collect();
    let (mut apply_s, mut flush_s) = (0.0, 0.0);
    let batch_size = batch_size.max(1);
    let t0 = Instant::now();
    for (b, chunk) in clicks.chunks(batch_size).enumerate() {
        let offsets = [PartitionOffset {
            topic: "clicks".into(),
            partition: 0,
            next_offset: (b * batch_size + chunk.len()) as i64,
        }];
        let t = Instant::now();
        store.apply(chunk, &offsets)?;
        apply_s += t.elapsed().as_secs_f64();
        let t = Instant::now();
        store.flush()?;
        flush_s += t.elapsed().as_secs_f64();
    }
    let seconds = t0.elapsed().as_secs_f64();
    let batches = events.div_ceil(batch_size).max(1) as f64;
    let n_users = store.counts().users as u32;
    let reads = 20_000usize;
    let t = Instant::now();
    for _ in 0..reads {
        let u = rng.gen_range(0..n_users.max(1));
        std::hint::black_box(store.user(u)?);
    }
    let read_s = t.elapsed().as_secs_f64();
    Ok(StoreBenchFigures {
        events,
        batch_size,
        users,
        events_per_second: events as f64 / seconds.max(1e-9),
        apply_ms: apply_s * 1000.0 / batches,
        flush_ms: flush_s * 1000.0 / batches,
        histories_per_second: reads as f64 / read_s.max(1e-9),
    })
}
