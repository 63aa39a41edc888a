//! The training worker: its own thread (candle training blocks). A fine-tuning round starts every
//! `train.interval` (when there is new data) or after `train.min_new_events`. It reads (while
//! ingestion continues) the histories of at most `train.max_users_per_round` users, those
//! active since the last round first, then a uniform sample of the others; grows the model to new items, trains
//! `train.epochs_per_round` epochs continuing the lifelong KL anneal, validates on a fixed
//! sample of held-out users, and publishes the model only if it is finite and its NDCG@100 is
//! not worse than the live model's by more than `train.max_ndcg_drop`. Accepted models are
//! checkpointed before they are published.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use candle_core::Device;
use tracing::{error, info, info_span, warn};

use crate::daemon::Shared;
use crate::eval::{evaluate_model, evaluate_popularity};
use crate::model::{splitmix as mix, Checkpoints, EpochStats, Interactions, MultiVae, Trainer};
use crate::registry::LiveModel;
use crate::store::Sample;

/// Validation data: the fold-in and held-out items of a fixed sample of users.
pub struct Validation {
    pub users: Vec<u32>,
    pub fold_in: Interactions,
    pub heldout: Interactions,
}

/// Whether a user belongs to the fixed validation sample (about 1 in 20, chosen by a hash of the
/// user index, so the sample never changes as data grows).
pub fn is_validation_user(user: u32, seed: u64) -> bool {
    mix(user as u64 ^ seed.rotate_left(17)) % 20 == 0
}

/// Whether user `u` (with `items`) is one of the validation users, `picked` being how many were
/// picked before it in user order: the first `max_users` hashed-in users with at least 5 items.
fn picks_for_validation(u: u32, items: &[u32], picked: usize, max_users: usize, seed: u64) -> bool {
    picked < max_users && items.len() >= 5 && is_validation_user(u, seed)
}

/// Splits a sample (in user order) into training rows and validation data: the validation users
/// (see `picks_for_validation`), 20% of their items (chosen by hash) held out, are not trained on.
pub fn split_validation(
    sample: &Sample,
    max_users: usize,
    seed: u64,
) -> Result<(Interactions, Validation)> {
    let n_items = sample.rows.n_items();
    let mut train = Interactions::new(n_items);
    let mut val = Validation {
        users: Vec::new(),
        fold_in: Interactions::new(n_items),
        heldout: Interactions::new(n_items),
    };
    for (&u, row) in sample.users.iter().zip(sample.rows.rows()) {
        if picks_for_validation(u, row, val.users.len(), max_users, seed) {
            let mut order: Vec<u32> = row.to_vec();
            order.sort_by_key(|&i| mix(((u as u64) << 32) ^ i as u64 ^ seed));
            let n_te = row.len() / 5;
            val.heldout
                .push_row(order[..n_te].iter().copied())
                .map_err(anyhow::Error::msg)?;
            val.fold_in
                .push_row(order[n_te..].iter().copied())
                .map_err(anyhow::Error::msg)?;
            val.users.push(u);
        } else {
            train
                .push_row(row.iter().copied())
                .map_err(anyhow::Error::msg)?;
        }
    }
    Ok((train, val))
}

/// Users whose history changed since the last round started (bounded: past `cap` the newest are
/// not noted; they may still be drawn in the round's random sample).
pub struct RecentlyActive {
    users: Mutex<HashSet<u32>>,
    cap: usize,
}

impl RecentlyActive {
    pub fn new(cap: usize) -> Self {
        Self {
            users: Mutex::new(HashSet::new()),
            cap,
        }
    }

    pub fn note(&self, users: &[u32]) {
        if let Ok(mut set) = self.users.lock() {
            for &u in users {
                if set.len() >= self.cap {
                    break;
                }
                set.insert(u);
            }
        }
    }

    /// The users noted so far, forgetting them.
    pub fn take(&self) -> HashSet<u32> {
        self.users
            .lock()
            .map(|mut s| std::mem::take(&mut *s))
            .unwrap_or_default()
    }
}

/// NDCG@100 of `model` on the validation users (fold-in items the model does not know are
/// dropped from its input; held-out items it does not know count as misses).
pub fn validation_ndcg(model: &MultiVae, val: &Validation) -> Result<f64> {
    if val.users.is_empty() {
        return Ok(0.0);
    }
    let n = model.n_items() as u32;
    let known = Interactions::from_rows(
        val.fold_in
            .rows()
            .map(|r| r.iter().copied().filter(|&i| i < n).collect::<Vec<_>>()),
        model.n_items(),
    )
    .map_err(anyhow::Error::msg)?;
    Ok(evaluate_model(model, &known, &val.heldout)?.ndcg100.mean)
}

/// How a round ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoundResult {
    Accepted,
    RejectedNonFinite,
    /// Below a floor every model must clear: a uniform guess's loss or, with enough validation
    /// users, popularity's NDCG@100.
    RejectedFloor,
    RejectedNdcg,
    Abandoned,
    Failed,
}

impl RoundResult {
    pub fn label(self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::RejectedNonFinite => "rejected_nonfinite",
            Self::RejectedFloor => "rejected_floor",
            Self::RejectedNdcg => "rejected_ndcg",
            Self::Abandoned => "abandoned",
            Self::Failed => "failed",
        }
    }
}

/// Training users whose loss is compared with a uniform guess's, at most (evenly spread).
const FLOOR_USERS: usize = 2000;

/// The loss floor: the trained model's multinomial NLL on (up to `FLOOR_USERS` of) its training
/// users, z = μ and no dropout, against a uniform guess over the catalogue on the same users
/// (`−Σ x·log(1/I)` = `|x|·ln I` per user). Returns (model, uniform), both per-user means.
pub fn loss_floor(model: &MultiVae, train: &Interactions) -> Result<(f64, f64)> {
    let rows: Vec<&[u32]> = train.rows().filter(|r| !r.is_empty()).collect();
    let step = rows.len().div_ceil(FLOOR_USERS).max(1);
    let rows: Vec<&[u32]> = rows.into_iter().step_by(step).collect();
    if rows.is_empty() {
        return Ok((0.0, 0.0));
    }
    let ln_items = (model.n_items().max(1) as f64).ln();
    let uniform = rows.iter().map(|r| r.len() as f64).sum::<f64>() * ln_items / rows.len() as f64;
    Ok((model.mean_nll(&rows)?, uniform))
}

/// What a round's validation said about a trained model.
struct Judgement {
    result: RoundResult,
    /// Why, for the log (empty when accepted).
    reason: String,
    ndcg: f64,
    live_ndcg: Option<f64>,
    popularity_ndcg: Option<f64>,
    nll: f64,
    uniform_nll: f64,
}

/// The worker's state between rounds.
pub struct Worker {
    shared: Arc<Shared>,
    device: Device,
    checkpoints: Checkpoints,
    trainer: Option<Trainer>,
    version: u64,
    /// After a round that was not accepted, no round starts before this.
    not_before: Option<Instant>,
}

impl Worker {
    /// Loads the newest valid checkpoint (skipping broken ones) and publishes it.
    pub fn start(shared: Arc<Shared>, device: Device) -> Result<Self> {
        let checkpoints = Checkpoints::new(shared.config.data_dir.join("models"));
        let mut w = Self {
            shared,
            device,
            checkpoints,
            trainer: None,
            version: 0,
            not_before: None,
        };
        w.version = w.checkpoints.versions()?.last().copied().unwrap_or(0);
        w.reload_latest(true)?;
        Ok(w)
    }

    fn reload_latest(&mut self, publish: bool) -> Result<()> {
        let loaded = self.checkpoints.load_latest(&self.device, |v, e| {
            warn!(model_version = v, error = %e, "skipping a checkpoint that does not load");
        })?;
        match loaded {
            Some((mut trainer, manifest)) => {
                // the optimiser's step size follows the configuration (the architecture and the
                // anneal state come from the checkpoint)
                let lr = self.shared.config.model.learning_rate;
                if lr != manifest.config.learning_rate {
                    info!(
                        checkpoint = manifest.config.learning_rate,
                        configured = lr,
                        "fine-tuning with the configured learning rate"
                    );
                }
                trainer.set_learning_rate(lr);
                if publish {
                    let figure = |k: &str| manifest.training.get(k).and_then(|v| v.as_f64());
                    let ndcg = figure("validation_ndcg").unwrap_or(0.0);
                    let read = figure("training_interactions")
                        .map(|t| t + figure("validation_interactions").unwrap_or(0.0))
                        .or_else(|| figure("interactions"))
                        .unwrap_or(0.0);
                    self.publish(&trainer, manifest.model_version, ndcg, read as u64)?;
                    info!(
                        model_version = manifest.model_version,
                        update_count = manifest.update_count,
                        beta = manifest.beta,
                        "loaded model"
                    );
                }
                self.trainer = Some(trainer);
            }
            None => self.trainer = None,
        }
        Ok(())
    }

    fn publish(&self, trainer: &Trainer, version: u64, ndcg: f64, read: u64) -> Result<()> {
        let model = trainer.model().for_serving()?;
        let m = &self.shared.metrics;
        m.model_version.set(version as i64);
        m.model_items.set(model.n_items() as i64);
        m.model_round_interactions.set(read as i64);
        m.kl_beta.set(trainer.beta());
        m.update_count.set(trainer.update_count() as i64);
        let now = SystemTime::now();
        m.model_swap_time.set(
            now.duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
        );
        self.shared.registry.publish(LiveModel {
            version,
            model,
            swapped_at: now,
            validation_ndcg: ndcg,
        });
        Ok(())
    }

    /// Whether a round is due now. After a round that was not accepted none starts before
    /// `not_before` (one `train.interval` later), so failures never spin.
    fn due(&self, last_round: Instant) -> bool {
        if self.not_before.is_some_and(|t| Instant::now() < t) {
            return false;
        }
        let c = &self.shared.config.train;
        let new = self.shared.new_interactions.load(Ordering::Acquire);
        if self.shared.registry.current().is_none() {
            let users = self.shared.store.counts().users as usize;
            return new > 0 && users >= c.min_users;
        }
        new >= c.min_new_events || (new > 0 && last_round.elapsed() >= c.interval)
    }

    /// Reads the round's users from the store: training rows and the validation users.
    fn read_sample(&self) -> Result<(Interactions, Validation, usize)> {
        let cfg = &self.shared.config.train;
        let active = self.shared.recently_active.take();
        let mut picked = 0usize;
        let (max_val, seed) = (cfg.validation_users, cfg.seed);
        let sample = self
            .shared
            .store
            .sample(
                cfg.max_users_per_round,
                &active,
                |u, items| {
                    let p = picks_for_validation(u, items, picked, max_val, seed);
                    picked += p as usize;
                    p
                },
                seed ^ self.version.wrapping_mul(0x9E37_79B9_7F4A_7C15),
            )
            .context("cannot read the store")?;
        drop(active);
        let (train, val) = split_validation(&sample, max_val, seed)?;
        Ok((train, val, sample.rows.n_items()))
    }

    /// Trains the round's epochs; `false` when it was abandoned (shutdown or
    /// `train.max_duration`): the trainer is then mid-epoch and must be discarded.
    fn train_epochs(
        &mut self,
        train: &Interactions,
        started: Instant,
    ) -> Result<Option<EpochStats>> {
        let cfg = &self.shared.config.train;
        let deadline = started + cfg.max_duration;
        let shutdown = &self.shared.shutdown;
        let trainer = self.trainer.as_mut().context("no trainer")?;
        let mut last = EpochStats::default();
        for _ in 0..cfg.epochs_per_round {
            match trainer
                .train_epoch_while(train, |_| !shutdown.is_set() && Instant::now() < deadline)?
            {
                Some(s) => last = s,
                None => {
                    let why = if shutdown.is_set() {
                        "shutdown"
                    } else {
                        "train.max_duration exceeded"
                    };
                    warn!(
                        reason = why,
                        "round abandoned; the live model keeps serving"
                    );
                    return Ok(None);
                }
            }
        }
        Ok(Some(last))
    }

    /// Judges a trained model: finite; better than a uniform guess on its training users; with
    /// at least `train.min_validation_users`, better than popularity on the validation users and
    /// not more than `train.max_ndcg_drop` below the live model.
    fn judge(
        &self,
        stats: &EpochStats,
        train: &Interactions,
        val: &Validation,
    ) -> Result<Judgement> {
        let cfg = &self.shared.config.train;
        let trainer = self.trainer.as_ref().context("no trainer")?;
        let model = trainer.model();
        let mut j = Judgement {
            result: RoundResult::Accepted,
            reason: String::new(),
            ndcg: 0.0,
            live_ndcg: None,
            popularity_ndcg: None,
            nll: f64::NAN,
            uniform_nll: f64::NAN,
        };
        if !stats.loss.is_finite() || !model.is_finite()? {
            j.result = RoundResult::RejectedNonFinite;
            j.reason = format!("non-finite loss ({}) or weights", stats.loss);
            return Ok(j);
        }
        (j.nll, j.uniform_nll) = loss_floor(model, train)?;
        if !(j.nll.is_finite() && j.nll < j.uniform_nll) {
            j.result = RoundResult::RejectedFloor;
            j.reason = format!(
                "its loss on the training users ({:.4}) is not below a uniform guess's ({:.4})",
                j.nll, j.uniform_nll
            );
            return Ok(j);
        }
        j.ndcg = validation_ndcg(model, val)?;
        if val.users.len() < cfg.min_validation_users {
            return Ok(j);
        }
        let pop = popularity_ndcg(train, val);
        j.popularity_ndcg = Some(pop);
        if j.ndcg <= pop {
            j.result = RoundResult::RejectedFloor;
            j.reason = format!(
                "validation NDCG@100 {:.4} does not beat popularity's {pop:.4}",
                j.ndcg
            );
            return Ok(j);
        }
        if let Some(live) = self.shared.registry.current() {
            let live = validation_ndcg(&live.model, val)?;
            j.live_ndcg = Some(live);
            if j.ndcg < live - cfg.max_ndcg_drop {
                j.result = RoundResult::RejectedNdcg;
                j.reason = format!(
                    "validation NDCG@100 {:.4} fell below the live model's {live:.4} by more than {}",
                    j.ndcg, cfg.max_ndcg_drop
                );
            }
        }
        Ok(j)
    }

    /// One fine-tuning round: read a sample, grow and train, judge, checkpoint and swap in.
    pub fn round(&mut self) -> Result<RoundResult> {
        let cfg = self.shared.config.clone();
        let started = Instant::now();
        let consumed = self.shared.new_interactions.swap(0, Ordering::AcqRel);
        let (train, val, n_items) = self.read_sample()?;
        let trainer = match self.trainer.as_mut() {
            Some(t) => t,
            None => self.trainer.insert(Trainer::new(
                &cfg.model,
                n_items.max(1),
                cfg.train.seed,
                &self.device,
            )?),
        };
        trainer.grow(n_items)?;
        let next_version = self.version + 1;
        let span = info_span!("training_round", model_version = next_version);
        let _enter = span.enter();
        let validation_interactions = val.fold_in.nnz() + val.heldout.nnz();
        info!(
            users = train.n_users(),
            items = n_items,
            stored_users = self.shared.store.counts().users,
            stored_interactions = self.shared.store.counts().interactions,
            training_interactions = train.nnz(),
            validation_interactions,
            new_interactions = consumed,
            validation_users = val.users.len(),
            update_count = trainer.update_count(),
            beta = trainer.beta(),
            "round started"
        );
        let Some(stats) = self.train_epochs(&train, started)? else {
            self.reload_latest(false)?;
            // the round's events were not learnt: count them again
            self.shared
                .new_interactions
                .fetch_add(consumed, Ordering::AcqRel);
            return Ok(RoundResult::Abandoned);
        };
        let m = &self.shared.metrics;
        m.train_loss.set(stats.loss);
        m.training_duration.observe(started.elapsed().as_secs_f64());
        let j = self.judge(&stats, &train, &val)?;
        m.validation_ndcg.set(j.ndcg);
        if let Some(p) = j.popularity_ndcg {
            m.validation_popularity_ndcg.set(p);
        }
        if j.result != RoundResult::Accepted {
            return self.reject(j, consumed);
        }
        if j.popularity_ndcg.is_none() {
            warn!(
                validation_users = val.users.len(),
                min_validation_users = cfg.train.min_validation_users,
                nll = j.nll,
                uniform_nll = j.uniform_nll,
                "too few validation users for an NDCG check: the model is accepted on its loss floor alone"
            );
        }
        let trainer = self.trainer.as_ref().context("no trainer")?;
        let figures = serde_json::json!({
            "loss": stats.loss, "nll": stats.nll, "kl": stats.kl, "beta": stats.beta,
            "validation_ndcg": j.ndcg, "live_validation_ndcg": j.live_ndcg,
            "popularity_validation_ndcg": j.popularity_ndcg,
            "training_nll": j.nll, "uniform_nll": j.uniform_nll,
            "validation_users": val.users.len(), "training_users": train.n_users(),
            "training_interactions": train.nnz(), "validation_interactions": validation_interactions,
            "seconds": started.elapsed().as_secs_f64(),
        });
        self.checkpoints.save(trainer, next_version, figures)?;
        if let Err(e) = self.checkpoints.prune(cfg.train.keep_versions) {
            warn!(error = %e, "cannot prune old model versions");
        }
        self.version = next_version;
        let read = (train.nnz() + validation_interactions) as u64;
        self.publish(trainer, next_version, j.ndcg, read)?;
        info!(validation_ndcg = j.ndcg, live_ndcg = ?j.live_ndcg, popularity_ndcg = ?j.popularity_ndcg, nll = j.nll, uniform_nll = j.uniform_nll, loss = stats.loss, beta = trainer.beta(), update_count = trainer.update_count(), seconds = started.elapsed().as_secs_f64(), "model accepted and swapped in");
        Ok(RoundResult::Accepted)
    }

    /// A model that was not accepted. With a live model, training goes back to the live state.
    /// Before the first model, a finite model below a floor is kept (unpublished) and trained
    /// further next round with the same data counted again, so a first model that needs more
    /// than one round gets it; a non-finite one is dropped and training restarts from scratch.
    fn reject(&mut self, j: Judgement, consumed: u64) -> Result<RoundResult> {
        warn!(
            reason = %j.reason,
            validation_ndcg = j.ndcg,
            popularity_ndcg = ?j.popularity_ndcg,
            live_ndcg = ?j.live_ndcg,
            nll = j.nll,
            uniform_nll = j.uniform_nll,
            "round rejected; the live model (or popularity) keeps serving"
        );
        let first_model = self.shared.registry.current().is_none();
        if first_model && j.result != RoundResult::RejectedNonFinite {
            self.shared
                .new_interactions
                .fetch_add(consumed, Ordering::AcqRel);
        } else {
            self.reload_latest(false)?;
        }
        Ok(j.result)
    }

    /// Runs rounds until shutdown.
    pub fn run(mut self) {
        // Training gets a thread pool of its own, so the scorer's parallel work (in the global
        // pool) never queues behind a multi-second training GEMM, and its threads run at a lower
        // OS priority, so scoring and ingestion take the cores first when they need them.
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(rayon::current_num_threads())
            .thread_name(|i| format!("multivaed-train-{i}"))
            .start_handler(|_| lower_this_threads_priority())
            .build();
        let mut last_round = Instant::now();
        while !self.shared.shutdown.is_set() {
            if !self.due(last_round) {
                self.shared
                    .shutdown
                    .wait_timeout(Duration::from_millis(200));
                continue;
            }
            last_round = Instant::now();
            let outcome = match &pool {
                Ok(p) => p.install(|| self.round()),
                Err(_) => self.round(),
            };
            let result = match outcome {
                Ok(r) => r,
                Err(e) => {
                    error!(error = %format!("{e:#}"), "training round failed");
                    let _ = self.reload_latest(false);
                    RoundResult::Failed
                }
            };
            self.pace(result);
        }
        info!("training worker stopped");
    }

    /// Counts a round and, if it was not accepted, holds the next one back by `train.interval`.
    fn pace(&mut self, result: RoundResult) {
        let m = &self.shared.metrics;
        m.training_rounds.with_label_values(&[result.label()]).inc();
        if result == RoundResult::Accepted || self.shared.shutdown.is_set() {
            self.not_before = None;
            m.training_next_round.set(0.0);
            return;
        }
        let wait = self.shared.config.train.interval;
        self.not_before = Some(Instant::now() + wait);
        let at = SystemTime::now() + wait;
        m.training_next_round.set(
            at.duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
        );
        info!(
            result = result.label(),
            wait = %humantime::format_duration(wait),
            "next training round after train.interval"
        );
    }
}

/// NDCG@100 of the popularity ranking (items by how many training users hold them) on the
/// validation users (all three share the round's catalogue).
pub fn popularity_ndcg(train: &Interactions, val: &Validation) -> f64 {
    evaluate_popularity(train, &val.fold_in, &val.heldout)
        .ndcg100
        .mean
}

/// Training threads yield to the scorer: nice 10 (on Linux, setpriority with who = 0 applies
/// to the calling thread only). Best effort: a refusal leaves the priority as it was.
fn lower_this_threads_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: a system call on the calling thread's own scheduling priority, no memory involved
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, TRAINING_NICE);
    }
}

/// The nice value of the training threads (CFS gives a nice-0 thread ~9× their share).
const TRAINING_NICE: i32 = 10;

/// Starts the worker thread.
pub fn spawn(shared: Arc<Shared>, device: Device) -> Result<JoinHandle<()>> {
    let worker = Worker::start(shared, device)?;
    std::thread::Builder::new()
        .name("multivaed-train".into())
        .spawn(move || worker.run())
        .context("cannot start the training thread")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelConfig;

    /// 400 users in 4 taste groups of 25 items; each user holds 8 items of their group.
    fn grouped_users() -> Interactions {
        let rows = (0..400u32).map(|u| {
            let group = u % 4;
            (0..8u32).map(move |k| group * 25 + (u * 7 + k * 3) % 25)
        });
        Interactions::from_rows(rows, 100).unwrap()
    }

    fn trained(lr: f64, epochs: usize) -> Trainer {
        let cfg = ModelConfig {
            mlp_hidden_size: vec![32],
            latent_dimension: 8,
            learning_rate: lr,
            batch_size: 50,
            ..ModelConfig::default()
        };
        let data = grouped_users();
        let mut t = Trainer::new(&cfg, data.n_items(), 7, &Device::Cpu).unwrap();
        for _ in 0..epochs {
            t.train_epoch(&data, |_| {}).unwrap();
        }
        t
    }

    #[test]
    fn a_trained_model_beats_the_uniform_guess_and_an_exploded_one_does_not() {
        let data = grouped_users();
        let uniform = 8.0 * (100f64).ln();
        let (nll, u) = loss_floor(trained(1e-3, 8).model(), &data).unwrap();
        assert!((u - uniform).abs() < 1e-9, "uniform guess {u} vs {uniform}");
        assert!(nll < uniform, "trained: {nll} vs uniform {uniform}");
        // an absurd learning rate: finite weights far from anything the data supports
        let t = trained(1.0, 3);
        assert!(t.model().is_finite().unwrap());
        let (nll, _) = loss_floor(t.model(), &data).unwrap();
        assert!(nll > uniform, "lr 1: {nll} vs uniform {uniform}");
    }

    #[test]
    fn popularity_is_scored_on_the_validation_users() {
        // everyone holds items 0..4 and one of 5..9; held out: item 0 or 9
        let train =
            Interactions::from_rows((0..50u32).map(|u| vec![0, 1, 2, 3, 5 + u % 5]), 10).unwrap();
        let val = Validation {
            users: vec![100, 101],
            fold_in: Interactions::from_rows(vec![vec![1, 2, 3], vec![1, 2, 3]], 10).unwrap(),
            heldout: Interactions::from_rows(vec![vec![0], vec![9]], 10).unwrap(),
        };
        // user 100: item 0 ranked first (NDCG 1); user 101: item 9 held by nobody, ranked
        // after 0 and 5..8 (5 popular items first, ties by index), so at rank 6
        let expect = (1.0 + 1.0 / (7f64).log2()) / 2.0;
        let got = popularity_ndcg(&train, &val);
        assert!((got - expect).abs() < 1e-6, "{got} vs {expect}");
    }
}
