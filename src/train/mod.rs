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
use crate::eval::evaluate_model;
use crate::model::{splitmix as mix, Checkpoints, Interactions, MultiVae, Trainer};
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
    RejectedNdcg,
    Abandoned,
    Failed,
}

impl RoundResult {
    pub fn label(self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::RejectedNonFinite => "rejected_nonfinite",
            Self::RejectedNdcg => "rejected_ndcg",
            Self::Abandoned => "abandoned",
            Self::Failed => "failed",
        }
    }
}

/// The worker's state between rounds.
pub struct Worker {
    shared: Arc<Shared>,
    device: Device,
    checkpoints: Checkpoints,
    trainer: Option<Trainer>,
    version: u64,
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
                    let ndcg = manifest
                        .training
                        .get("validation_ndcg")
                        .and_then(|v| v.as_f64())
                        .unwrap_or(0.0);
                    self.publish(&trainer, manifest.model_version, ndcg)?;
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

    fn publish(&self, trainer: &Trainer, version: u64, ndcg: f64) -> Result<()> {
        let model = trainer.model().for_serving()?;
        let m = &self.shared.metrics;
        m.model_version.set(version as i64);
        m.model_items.set(model.n_items() as i64);
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

    /// Whether a round is due now.
    fn due(&self, last_round: Instant) -> bool {
        let c = &self.shared.config.train;
        let new = self.shared.new_interactions.load(Ordering::Acquire);
        if self.shared.registry.current().is_none() {
            let users = self.shared.store.counts().users as usize;
            return new > 0 && users >= c.min_users;
        }
        new >= c.min_new_events || (new > 0 && last_round.elapsed() >= c.interval)
    }

    /// One fine-tuning round.
    pub fn round(&mut self) -> Result<RoundResult> {
        let cfg = self.shared.config.clone();
        let started = Instant::now();
        let consumed = self.shared.new_interactions.swap(0, Ordering::AcqRel);
        let active = self.shared.recently_active.take();
        let mut picked = 0usize;
        let (max_val, seed) = (cfg.train.validation_users, cfg.train.seed);
        let sample = self
            .shared
            .store
            .sample(
                cfg.train.max_users_per_round,
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
        let n_items = sample.rows.n_items();
        drop(sample);
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
        info!(
            users = train.n_users(),
            items = n_items,
            stored_users = self.shared.store.counts().users,
            interactions = train.nnz(),
            new_interactions = consumed,
            validation_users = val.users.len(),
            update_count = trainer.update_count(),
            beta = trainer.beta(),
            "round started"
        );
        let deadline = started + cfg.train.max_duration;
        let mut last = None;
        for _ in 0..cfg.train.epochs_per_round {
            let shutdown = &self.shared.shutdown;
            let stats = trainer
                .train_epoch_while(&train, |_| !shutdown.is_set() && Instant::now() < deadline)?;
            match stats {
                Some(s) => last = Some(s),
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
                    self.reload_latest(false)?;
                    // the round's events were not learnt: count them again
                    self.shared
                        .new_interactions
                        .fetch_add(consumed, Ordering::AcqRel);
                    return Ok(RoundResult::Abandoned);
                }
            }
        }
        let trainer = self.trainer.as_ref().expect("set above");
        let stats = last.unwrap_or_default();
        let m = &self.shared.metrics;
        m.train_loss.set(stats.loss);
        m.training_duration.observe(started.elapsed().as_secs_f64());
        if !stats.loss.is_finite() || !trainer.model().is_finite()? {
            warn!(
                loss = stats.loss,
                "round rejected: non-finite loss or weights"
            );
            self.reload_latest(false)?;
            return Ok(RoundResult::RejectedNonFinite);
        }
        let ndcg = validation_ndcg(trainer.model(), &val)?;
        m.validation_ndcg.set(ndcg);
        let live_ndcg = match self.shared.registry.current() {
            Some(live) => Some(validation_ndcg(&live.model, &val)?),
            None => None,
        };
        if let Some(live) = live_ndcg {
            if ndcg < live - cfg.train.max_ndcg_drop {
                warn!(
                    validation_ndcg = ndcg,
                    live_ndcg = live,
                    max_drop = cfg.train.max_ndcg_drop,
                    "round rejected: validation NDCG fell"
                );
                self.reload_latest(false)?;
                return Ok(RoundResult::RejectedNdcg);
            }
        }
        let figures = serde_json::json!({
            "loss": stats.loss, "nll": stats.nll, "kl": stats.kl, "beta": stats.beta,
            "validation_ndcg": ndcg, "live_validation_ndcg": live_ndcg,
            "validation_users": val.users.len(), "training_users": train.n_users(),
            "interactions": train.nnz(), "seconds": started.elapsed().as_secs_f64(),
        });
        self.checkpoints.save(trainer, next_version, figures)?;
        if let Err(e) = self.checkpoints.prune(cfg.train.keep_versions) {
            warn!(error = %e, "cannot prune old model versions");
        }
        self.version = next_version;
        self.publish(trainer, next_version, ndcg)?;
        info!(validation_ndcg = ndcg, live_ndcg = ?live_ndcg, loss = stats.loss, beta = trainer.beta(), update_count = trainer.update_count(), seconds = started.elapsed().as_secs_f64(), "model accepted and swapped in");
        Ok(RoundResult::Accepted)
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
            self.shared
                .metrics
                .training_rounds
                .with_label_values(&[result.label()])
                .inc();
        }
        info!("training worker stopped");
    }
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
