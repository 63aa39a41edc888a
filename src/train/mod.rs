//! The training worker: its own thread (candle training blocks). A round starts every
//! `train.interval` (when there is new data), after `train.min_new_events` new interactions or
//! once the new ones reach `train.min_new_fraction` of what the last round read, and at once
//! after a round that stopped while still improving (`train.catch_up`). It reads (while
//! ingestion continues) the histories of at most `train.max_users_per_round` users, those
//! active since the last round first, then a uniform sample of the others; grows the model to
//! new items; trains until the validation NDCG@100 stops improving (`converge`), continuing the
//! lifelong KL anneal; and publishes the model only if it passes the gates (`judge`). A model
//! that fails a quality gate is kept and trained further next round unless the live one is
//! better, so a weak live model never traps training. Accepted models are checkpointed before
//! they are published. A fleet's trainer (role `train`, `fleet`) trains only while it is the
//! active one, continues from the version the fleet announced, keeps the fleet's item table as
//! its columns (`columns`) and ships what it accepts.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::Device;
use serde::Serialize;
use tracing::{debug, error, info, info_span, warn};

use crate::activity::Activity;
use crate::config::TrainConfig;
use crate::live::{LiveModel, LiveModelSlot};
use crate::metrics::Metrics;
use crate::model::{Checkpoints, EpochStats, Interactions, ModelConfig, MultiVae, Trainer};
use crate::shutdown::Shutdown;
use crate::store::Store;

mod columns;
mod converge;
mod fleet;
mod promote;
mod validation;

use columns::Columns;
use converge::{train_until_converged, Interrupt, Limits, Signal, Stop, Trained};
pub use fleet::{Announced, Fleet, RunningCanary, Shipment, Standing};
pub use validation::{popularity_ndcg, validation_ndcg, Validation};

/// What training uses: its settings, where model versions live, the device, the store it
/// reads histories from, the activity record that says what is new, and the live-model slot
/// it publishes to.
pub struct Training {
    pub train: TrainConfig,
    pub model: ModelConfig,
    pub models_dir: PathBuf,
    pub device: Device,
    pub store: Arc<Store>,
    pub activity: Arc<Activity>,
    pub live: Arc<LiveModelSlot>,
    pub metrics: Arc<Metrics>,
    pub shutdown: Arc<Shutdown>,
    /// Role `train`: the fleet it trains for (`None`: role `all`, which serves what it trains).
    pub fleet: Option<Box<dyn Fleet>>,
    /// Live-gated promotion: whether a new version serves a canary slice first, and the test
    /// that decides it.
    pub promotion: crate::config::PromotionConfig,
    /// Role `all`: the canary evidence this process's scorer counts.
    pub tally: Arc<crate::promotion::Tally>,
}

/// The log target of [`log_round_users`].
pub const ROUND_USERS_TARGET: &str = "multivaed::train::round_users";

/// Names every user a training round read (training and validation), as the pseudonymous key of
/// their id ([`crate::store::user_key`], hex), at debug level under [`ROUND_USERS_TARGET`]: off
/// unless asked for (`RUST_LOG=info,multivaed::train::round_users=debug`), so an operator can
/// check that a forgotten user is in no later round. No user id is logged.
fn log_round_users(version: u64, keys: &[u64]) {
    if tracing::enabled!(target: ROUND_USERS_TARGET, tracing::Level::DEBUG) {
        let mut list = String::with_capacity(keys.len() * 17);
        for k in keys {
            use std::fmt::Write as _;
            let _ = write!(list, "{k:016x} ");
        }
        debug!(target: ROUND_USERS_TARGET, version, users = keys.len(), keys = %list.trim_end(), "training round users");
    }
}

/// How a round ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoundResult {
    Accepted,
    RejectedNonFinite,
    /// Below a floor every model must clear: a uniform guess's loss or, with validation users,
    /// popularity's NDCG@100.
    RejectedFloor,
    /// Below the live model, or the best model accepted since start, by more than
    /// `train.max_ndcg_drop` (judged with at least `train.min_validation_users`).
    RejectedNdcg,
    Abandoned,
    /// A fleet trainer's version that was not announced: another trainer became the active
    /// one, or a rollback came, while it trained.
    Superseded,
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
            Self::Superseded => "superseded",
            Self::Failed => "failed",
        }
    }
}

/// Training users whose loss is compared with a uniform guess's, at most (evenly spread).
const FLOOR_USERS: usize = 2000;

/// The loss floor: the trained model's multinomial NLL on (up to `FLOOR_USERS` of) its training
/// users, z = μ and no dropout, against a uniform guess over the catalogue on the same users
/// (`−Σ x·log(1/I)` = `|x|·ln I` per user; x weighted for a weighted model). Returns (model,
/// uniform), both per-user means.
pub fn loss_floor(model: &MultiVae, train: &Interactions) -> Result<(f64, f64)> {
    let users: Vec<usize> = (0..train.n_users())
        .filter(|&u| !train.row(u).is_empty())
        .collect();
    let step = users.len().div_ceil(FLOOR_USERS).max(1);
    let users: Vec<usize> = users.into_iter().step_by(step).collect();
    if users.is_empty() {
        return Ok((0.0, 0.0));
    }
    let rows: Vec<&[u32]> = users.iter().map(|&u| train.row(u)).collect();
    // a weighted model is judged on its weighted likelihood (a uniform guess's: Σw·ln I)
    let weights: Option<Vec<&[f32]>> = (model.config().input == crate::model::Input::Weighted)
        .then(|| users.iter().map(|&u| train.weights(u)).collect())
        .flatten();
    let mass = |r: usize| match &weights {
        Some(w) => w[r].iter().map(|&x| f64::from(x)).sum::<f64>(),
        None => rows[r].len() as f64,
    };
    let ln_items = (model.n_items().max(1) as f64).ln();
    let uniform = (0..rows.len()).map(mass).sum::<f64>() * ln_items / rows.len() as f64;
    Ok((model.mean_nll(&rows, weights.as_deref())?, uniform))
}

/// What a round's validation said about a trained model.
struct Judgement {
    result: RoundResult,
    /// Why, for the log (empty when accepted).
    reason: String,
    ndcg: f64,
    live_ndcg: Option<f64>,
    /// The best accepted model's (when it is not the live one), on the same validation users.
    best_ndcg: Option<f64>,
    popularity_ndcg: Option<f64>,
    nll: f64,
    uniform_nll: f64,
    /// Judged on at least `train.min_validation_users` validation users.
    validated: bool,
}

impl Judgement {
    fn rejected(mut self, result: RoundResult, reason: String) -> Self {
        self.result = result;
        self.reason = reason;
        self
    }
}

/// A round's data: training rows and validation users, and what it read.
struct RoundData {
    train: Interactions,
    val: Validation,
    n_items: usize,
    /// Validation users' held-out interactions (never trained on).
    held_out: usize,
    /// The validation share the round used.
    share: f64,
}

impl RoundData {
    /// Every interaction the round read.
    fn read(&self) -> u64 {
        (self.train.nnz() + self.held_out) as u64
    }
}

/// A round's figures, kept in the version's manifest (and shipped with it by a fleet's
/// trainer).
#[derive(Debug, Clone, Serialize)]
struct RoundFigures {
    loss: f64,
    nll: f64,
    kl: f64,
    beta: f64,
    validation_ndcg: f64,
    live_validation_ndcg: Option<f64>,
    best_validation_ndcg: Option<f64>,
    validated: bool,
    popularity_validation_ndcg: Option<f64>,
    training_nll: f64,
    uniform_nll: f64,
    validation_users: usize,
    validation_share: f64,
    training_users: usize,
    training_interactions: usize,
    /// Validation users' held-out interactions (never trained on).
    withheld_interactions: usize,
    epochs: usize,
    kept_epoch: usize,
    /// Why training stopped: converged, max_epochs, max_duration or diverged.
    stopped: &'static str,
    /// Each epoch's judged figure (validation NDCG@100, or the training loss).
    epoch_scores: Vec<f64>,
    seconds: f64,
}

/// The worker's state between rounds.
pub struct Worker {
    ctx: Training,
    checkpoints: Checkpoints,
    trainer: Option<Trainer>,
    version: u64,
    /// After a round that was not accepted, no round starts before this.
    not_before: Option<Instant>,
    /// The best model accepted since start (on the validation users of the round that last
    /// compared it): no model more than `train.max_ndcg_drop` below it is accepted, so drops
    /// within the tolerance cannot add up.
    best_version: Option<u64>,
    /// How the model's columns map to the store's items.
    columns: Columns,
    /// Role `train`: the announced version the trainer's state is (`None` before the first).
    base: Option<Announced>,
    /// The validation share: it only ever shrinks (see `validation`), also across restarts
    /// (it is kept in each version's figures).
    validation_share: f64,
    /// Interactions the last round read (the growth that makes a round due is measured by it).
    last_read: u64,
    /// The last round stopped while still improving: the next one is due without new data.
    unfinished: bool,
    /// Role `all`: the canary running in the live slot.
    local_canary: Option<promote::LocalCanary>,
}

impl Worker {
    /// Loads the newest valid checkpoint (skipping broken ones) and publishes it.
    pub fn start(ctx: Training) -> Result<Self> {
        let checkpoints = Checkpoints::new(ctx.models_dir.clone());
        let mut w = Self {
            ctx,
            checkpoints,
            trainer: None,
            version: 0,
            not_before: None,
            best_version: None,
            columns: Columns::Store,
            base: None,
            validation_share: validation::MAX_SHARE,
            last_read: 0,
            unfinished: false,
            local_canary: None,
        };
        // never reuse a number, even one a rollback moved aside
        w.version = w.checkpoints.highest_version_ever()?;
        w.reload_latest(true)?;
        w.best_version = w.ctx.live.current().map(|l| l.version);
        Ok(w)
    }

    fn reload_latest(&mut self, publish: bool) -> Result<()> {
        let loaded = self.checkpoints.load_latest(&self.ctx.device, |v, e| {
            warn!(model_version = v, error = %e, "skipping a checkpoint that does not load");
        })?;
        match loaded {
            Some((mut trainer, manifest)) => {
                let path = self.checkpoints.path_of(manifest.model_version);
                let items = Checkpoints::items(&path, &manifest)?;
                if items.is_none()
                    && !self.ctx.store.matches_catalogue(
                        manifest.n_items,
                        manifest.catalogue_fingerprint.as_deref(),
                    )
                {
                    bail!(
                        "model version {} was trained on other items than this store holds (its item catalogue fingerprint differs): the store was rebuilt beside old models. Move {} aside to train afresh, or restore the store it was trained with",
                        manifest.model_version,
                        self.checkpoints.dir().display()
                    );
                }
                // the optimiser's step size follows the configuration (the architecture and the
                // anneal state come from the checkpoint)
                let lr = self.ctx.model.learning_rate;
                if lr != manifest.config.learning_rate {
                    info!(
                        checkpoint = manifest.config.learning_rate,
                        configured = lr,
                        "fine-tuning with the configured learning rate"
                    );
                }
                trainer.set_learning_rate(lr);
                let figure = |k: &str| manifest.training.get(k).and_then(|v| v.as_f64());
                if let Some(share) = figure("validation_share") {
                    self.validation_share = self.validation_share.min(share);
                }
                let read = figure("training_interactions")
                    .map(|t| {
                        t + figure("validation_interactions").unwrap_or(0.0)
                            + figure("withheld_interactions").unwrap_or(0.0)
                    })
                    .or_else(|| figure("interactions"))
                    .unwrap_or(0.0);
                self.last_read = self.last_read.max(read as u64);
                if publish {
                    let validated = manifest
                        .training
                        .get("validated")
                        .and_then(|v| v.as_bool())
                        .unwrap_or(true);
                    self.publish(&trainer, manifest.model_version, read as u64, validated)?;
                    info!(
                        model_version = manifest.model_version,
                        update_count = manifest.update_count,
                        beta = manifest.beta,
                        "loaded model"
                    );
                }
                self.trainer = Some(trainer);
                self.columns = self.columns_for(items);
            }
            None => {
                self.trainer = None;
                self.columns = self.columns_for(None);
            }
        }
        Ok(())
    }

    fn publish(&self, trainer: &Trainer, version: u64, read: u64, validated: bool) -> Result<()> {
        let model = trainer.model().for_serving()?;
        let m = &self.ctx.metrics;
        m.model_validated.set(i64::from(validated));
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
        self.ctx.live.publish(LiveModel::local(version, model));
        Ok(())
    }

    /// Whether a round is due now. After a round that was not accepted none starts before
    /// `not_before` (one `train.interval` later), so failures never spin.
    fn due(&self, last_round: Instant) -> bool {
        if self.not_before.is_some_and(|t| Instant::now() < t) {
            return false;
        }
        let c = &self.ctx.train;
        let new = self.ctx.activity.new_interactions();
        if self.ctx.live.current().is_none() {
            let users = self.ctx.store.counts().users as usize;
            return (new > 0 || self.unfinished) && users >= c.min_users;
        }
        let grown = new as f64 >= c.min_new_fraction * self.last_read.max(1) as f64;
        self.unfinished
            || new >= c.min_new_events
            || (new > 0 && (grown || last_round.elapsed() >= c.interval))
    }

    /// The validation share for a round now: sized from the users stored, never larger than
    /// before.
    fn round_share(&mut self) -> f64 {
        let users = self.ctx.store.counts().users;
        let share = validation::share_for(users, self.ctx.train.validation_users);
        self.validation_share = self.validation_share.min(share);
        self.validation_share
    }

    /// Reads the round's users from the store (those in `active` first) and splits them into
    /// training rows and validation users.
    fn read_round(&mut self, active: std::collections::HashSet<u32>) -> Result<RoundData> {
        let share = self.round_share();
        let cfg = &self.ctx.train;
        let plan = validation::Plan {
            share,
            max_users: cfg.validation_users,
            seed: cfg.seed,
        };
        let mut picked = 0usize;
        let mut sample = self
            .ctx
            .store
            .sample(
                cfg.max_users_per_round,
                &active,
                |_, key, items| {
                    let p = plan.pick(key, items, picked);
                    picked += usize::from(p == crate::store::Pick::Always);
                    p
                },
                cfg.seed ^ self.version.wrapping_mul(0x9E37_79B9_7F4A_7C15),
                self.ctx.model.input == crate::model::Input::Weighted,
            )
            .context("cannot read the store")?;
        drop(active);
        log_round_users(self.version, &sample.keys);
        let n_items = self.columns.map_sample(&self.ctx.store, &mut sample)?;
        let item_keys = self.columns.item_keys(&self.ctx.store, n_items);
        let split = validation::split(&sample, &plan, &item_keys)?;
        Ok(RoundData {
            train: split.train,
            val: split.validation,
            n_items,
            held_out: split.held_out,
            share,
        })
    }

    /// Trains the round until it converges (see `converge`); `None` when it was abandoned
    /// (shutdown, or `train.max_duration` before one epoch was done): the trainer is then
    /// mid-epoch and must be discarded.
    fn train_round(&mut self, data: &RoundData, started: Instant) -> Result<Option<Trained>> {
        let cfg = &self.ctx.train;
        let deadline = started + cfg.max_duration;
        let signal = if data.val.users.len() >= cfg.min_validation_users {
            Signal::Ndcg
        } else {
            Signal::Loss
        };
        let limits = Limits {
            max_epochs: cfg.max_epochs_per_round,
            patience: cfg.patience,
            signal,
        };
        let shutdown = &self.ctx.shutdown;
        let trainer = self.trainer.as_mut().context("no trainer")?;
        let trained = train_until_converged(trainer, &data.train, &data.val, limits, || {
            if shutdown.is_set() {
                Some(Interrupt::Shutdown)
            } else {
                (Instant::now() >= deadline).then_some(Interrupt::Deadline)
            }
        })?;
        match &trained {
            Some(t) => {
                let m = &self.ctx.metrics;
                m.training_epochs.inc_by(t.epochs as u64);
                m.training_stops.with_label_values(&[t.stop.label()]).inc();
                info!(epochs = t.epochs, kept_epoch = t.kept_epoch, stopped = t.stop.label(), signal = ?signal, "training stopped");
            }
            None => {
                let why = if shutdown.is_set() {
                    "shutdown"
                } else {
                    "train.max_duration exceeded before an epoch was done"
                };
                warn!(
                    reason = why,
                    "round abandoned; the live model keeps serving"
                );
            }
        }
        Ok(trained)
    }

    /// Judges a trained model: finite; better than a uniform guess on its training users; with
    /// any validation users, not worse than popularity on them (better, with at least
    /// `train.min_validation_users`); with at least
    /// `train.min_validation_users`, not more than `train.max_ndcg_drop` below the live model
    /// or the best accepted one (fewer are too noisy to hold a model back from a live one).
    fn judge(&self, stats: &EpochStats, data: &RoundData) -> Result<Judgement> {
        let cfg = &self.ctx.train;
        let (train, val) = (&data.train, &data.val);
        let trainer = self.trainer.as_ref().context("no trainer")?;
        let model = trainer.model();
        let mut j = Judgement {
            result: RoundResult::Accepted,
            reason: String::new(),
            ndcg: 0.0,
            live_ndcg: None,
            best_ndcg: None,
            popularity_ndcg: None,
            nll: f64::NAN,
            uniform_nll: f64::NAN,
            validated: false,
        };
        if !stats.loss.is_finite() || !model.is_finite()? {
            return Ok(j.rejected(
                RoundResult::RejectedNonFinite,
                format!("non-finite loss ({}) or weights", stats.loss),
            ));
        }
        (j.nll, j.uniform_nll) = loss_floor(model, train)?;
        let live = self.ctx.live.current();
        if !val.users.is_empty() {
            // measured before any gate: a rejection keeps the better of this and the live model
            j.ndcg = validation_ndcg(model, val)?;
            if let Some(live) = &live {
                j.live_ndcg = Some(validation_ndcg(&live.model, val)?);
            }
        }
        if !(j.nll.is_finite() && j.nll < j.uniform_nll) {
            let why = format!(
                "its loss on the training users ({:.4}) is not below a uniform guess's ({:.4})",
                j.nll, j.uniform_nll
            );
            return Ok(j.rejected(RoundResult::RejectedFloor, why));
        }
        if val.users.is_empty() {
            return Ok(j);
        }
        let pop = popularity_ndcg(train, val);
        j.popularity_ndcg = Some(pop);
        // with enough validation users a model must beat popularity; with fewer (too few to
        // tell a tie from a win) it must not lose to it
        let enough = val.users.len() >= cfg.min_validation_users;
        if j.ndcg < pop || (enough && j.ndcg == pop) {
            let why = format!(
                "validation NDCG@100 {:.4} does not beat popularity's {pop:.4} ({} validation users)",
                j.ndcg,
                val.users.len()
            );
            return Ok(j.rejected(RoundResult::RejectedFloor, why));
        }
        if !enough {
            return Ok(j);
        }
        j.validated = true;
        if let Some(live_ndcg) = j.live_ndcg {
            if j.ndcg < live_ndcg - cfg.max_ndcg_drop {
                let why = format!(
                    "validation NDCG@100 {:.4} fell below the live model's {live_ndcg:.4} by more than {}",
                    j.ndcg, cfg.max_ndcg_drop
                );
                return Ok(j.rejected(RoundResult::RejectedNdcg, why));
            }
        }
        if let Some((best, best_model)) = self.best_model(live.as_deref().map(|l| l.version))? {
            let best_ndcg = validation_ndcg(&best_model, val)?;
            j.best_ndcg = Some(best_ndcg);
            if j.ndcg < best_ndcg - cfg.max_ndcg_drop {
                let why = format!(
                    "validation NDCG@100 {:.4} fell below the best accepted model's (v{best}) {best_ndcg:.4} by more than {}",
                    j.ndcg, cfg.max_ndcg_drop
                );
                return Ok(j.rejected(RoundResult::RejectedNdcg, why));
            }
        }
        Ok(j)
    }

    /// The best accepted model when it is not the live one (`live`), loaded from its
    /// checkpoint; `None` when it is live or gone (pruned or rolled back: the floor then
    /// restarts from the live model).
    fn best_model(&self, live: Option<u64>) -> Result<Option<(u64, MultiVae)>> {
        let Some(best) = self.best_version.filter(|&b| Some(b) != live) else {
            return Ok(None);
        };
        match Checkpoints::load(&self.checkpoints.path_of(best), &Device::Cpu) {
            Ok((t, _)) => Ok(Some((best, t.model().for_serving()?))),
            Err(e) => {
                debug!(version = best, error = %e, "the best accepted model cannot be loaded: no cumulative floor this round");
                Ok(None)
            }
        }
    }

    /// One fine-tuning round: read a sample, grow and train to convergence, judge, checkpoint
    /// and swap in.
    pub fn round(&mut self) -> Result<RoundResult> {
        let started = Instant::now();
        let round = self.ctx.activity.start_round();
        let consumed = round.new_interactions;
        let data = self.read_round(round.active)?;
        let trainer = match self.trainer.as_mut() {
            Some(t) => t,
            None => self.trainer.insert(Trainer::new(
                &self.ctx.model,
                data.n_items.max(1),
                self.ctx.train.seed,
                &self.ctx.device,
            )?),
        };
        trainer.grow(data.n_items)?;
        let announced = self.ctx.fleet.as_ref().map_or(0, |f| f.highest_version());
        let next_version = self
            .version
            .max(announced)
            .checked_add(1)
            .context("model versions are exhausted (u64)")?;
        let span = info_span!("training_round", model_version = next_version);
        let _enter = span.enter();
        let stored = self.ctx.store.counts();
        info!(
            users = data.train.n_users(),
            items = data.n_items,
            stored_users = stored.users,
            stored_interactions = stored.interactions,
            training_interactions = data.train.nnz(),
            withheld_interactions = data.held_out,
            new_interactions = consumed,
            validation_users = data.val.users.len(),
            validation_share = data.share,
            update_count = trainer.update_count(),
            beta = trainer.beta(),
            "round started"
        );
        self.last_read = data.read();
        let Some(trained) = self.train_round(&data, started)? else {
            self.unfinished = false;
            self.reload_latest(false)?;
            self.ctx.activity.round_not_learnt(consumed);
            return Ok(RoundResult::Abandoned);
        };
        self.unfinished =
            self.ctx.train.catch_up && matches!(trained.stop, Stop::MaxEpochs | Stop::Deadline);
        let m = &self.ctx.metrics;
        m.train_loss.set(trained.stats.loss);
        m.training_duration.observe(started.elapsed().as_secs_f64());
        m.training_converged
            .set(i64::from(trained.stop == Stop::Converged));
        let j = self.judge(&trained.stats, &data)?;
        m.validation_ndcg.set(j.ndcg);
        if let Some(p) = j.popularity_ndcg {
            m.validation_popularity_ndcg.set(p);
        }
        if j.result != RoundResult::Accepted {
            return self.reject(j, consumed);
        }
        if !j.validated {
            warn!(
                validation_users = data.val.users.len(),
                min_validation_users = self.ctx.train.min_validation_users,
                nll = j.nll,
                uniform_nll = j.uniform_nll,
                "too few validation users to compare with the live model: published unvalidated (multivaed_model_validated 0)"
            );
        }
        let figures = self.figures(&trained, &j, &data, started);
        self.accept(next_version, figures, &j, &data, consumed)
    }

    /// The figures of an accepted round.
    fn figures(
        &self,
        trained: &Trained,
        j: &Judgement,
        data: &RoundData,
        started: Instant,
    ) -> RoundFigures {
        let s = &trained.stats;
        RoundFigures {
            loss: s.loss,
            nll: s.nll,
            kl: s.kl,
            beta: s.beta,
            validation_ndcg: j.ndcg,
            live_validation_ndcg: j.live_ndcg,
            best_validation_ndcg: j.best_ndcg,
            validated: j.validated,
            popularity_validation_ndcg: j.popularity_ndcg,
            training_nll: j.nll,
            uniform_nll: j.uniform_nll,
            validation_users: data.val.users.len(),
            validation_share: data.share,
            training_users: data.train.n_users(),
            training_interactions: data.train.nnz(),
            withheld_interactions: data.held_out,
            epochs: trained.epochs,
            kept_epoch: trained.kept_epoch,
            stopped: trained.stop.label(),
            epoch_scores: trained.curve.clone(),
            seconds: started.elapsed().as_secs_f64(),
        }
    }

    /// Ships (role `train`), checkpoints and publishes an accepted model.
    fn accept(
        &mut self,
        next_version: u64,
        figures: RoundFigures,
        j: &Judgement,
        data: &RoundData,
        consumed: u64,
    ) -> Result<RoundResult> {
        let started_at = figures.seconds;
        let mut figures = serde_json::to_value(&figures)?;
        let trainer = self.trainer.as_ref().context("no trainer")?;
        let items = self
            .columns
            .shipped(&self.ctx.store, trainer.model().n_items());
        let canary = self.canary_fraction();
        match self.ship(next_version, items.as_ref(), &figures, canary)? {
            Shipped::Local => {}
            Shipped::Announced(a) => {
                figures["bundle"] = a.key.clone().into();
                self.base = Some(a);
            }
            Shipped::Superseded => return self.superseded(consumed),
        }
        let previous_live = self.ctx.live.current().map(|l| l.version);
        let beats = |other: Option<f64>| other.is_none_or(|o| j.ndcg >= o);
        let best_version = match (j.live_ndcg, j.best_ndcg) {
            _ if beats(j.live_ndcg) && beats(j.best_ndcg) => Some(next_version),
            (Some(live), Some(best)) if live > best => previous_live,
            (Some(_), None) => previous_live,
            _ => self.best_version,
        };
        self.version = next_version;
        if let (None, Some(fraction)) = (&self.ctx.fleet, canary) {
            // role all: checkpointed once the live evidence decides
            let c = promote::LocalCanary {
                version: next_version,
                started_unix_ms: crate::wire::now_ms(),
                figures,
                items,
                read: data.read(),
                validated: j.validated,
                best_version,
            };
            return self
                .start_local_canary(c, fraction)
                .map(|()| RoundResult::Accepted);
        }
        self.checkpoint(next_version, figures, items.as_ref())?;
        self.prune_checkpoints();
        let trainer = self.trainer.as_ref().context("no trainer")?;
        if let Some(fleet) = &self.ctx.fleet {
            fleet.prune(self.ctx.train.keep_versions);
        }
        self.publish(trainer, next_version, data.read(), j.validated)?;
        self.best_version = best_version;
        info!(validation_ndcg = j.ndcg, live_ndcg = ?j.live_ndcg, popularity_ndcg = ?j.popularity_ndcg, nll = j.nll, uniform_nll = j.uniform_nll, beta = trainer.beta(), update_count = trainer.update_count(), seconds = started_at, "model accepted and swapped in");
        Ok(RoundResult::Accepted)
    }

    /// Keeps the trainer's state as local checkpoint `version`, with its item catalogue's
    /// fingerprint.
    fn checkpoint(
        &self,
        version: u64,
        figures: serde_json::Value,
        items: Option<&crate::model::ItemTable>,
    ) -> Result<()> {
        let trainer = self.trainer.as_ref().context("no trainer")?;
        let fingerprint = self
            .ctx
            .store
            .catalogue_fingerprint(trainer.model().n_items());
        self.checkpoints
            .save(trainer, version, figures, fingerprint, items)?;
        Ok(())
    }

    /// Prunes local checkpoints to `train.keep_versions` (a failure is logged: pruning is
    /// housekeeping).
    fn prune_checkpoints(&self) {
        if let Err(e) = self.checkpoints.prune(self.ctx.train.keep_versions) {
            warn!(error = %e, "cannot prune old model versions");
        }
    }

    /// Role `train`: uploads and announces an accepted version before it is kept locally (a
    /// version the fleet never announced is never a base).
    fn ship(
        &self,
        version: u64,
        items: Option<&crate::model::ItemTable>,
        figures: &serde_json::Value,
        canary: Option<f64>,
    ) -> Result<Shipped> {
        let Some(fleet) = &self.ctx.fleet else {
            return Ok(Shipped::Local);
        };
        let trainer = self.trainer.as_ref().context("no trainer")?;
        let items = items.context("a fleet trainer without an item table")?;
        crate::fault::crash_point("train.before_ship");
        let scrambled;
        let items = if crate::fault::scramble_point("train.ship") {
            scrambled = items.rotated();
            &scrambled
        } else {
            items
        };
        let shipped = fleet.ship(Shipment {
            trainer,
            items,
            version,
            base: self.base.as_ref(),
            figures,
            canary,
        })?;
        Ok(shipped.map_or(Shipped::Superseded, Shipped::Announced))
    }

    /// A version the fleet did not take: training goes back to the last local (announced)
    /// state, the round's data is counted again, and the next round starts from whatever the
    /// fleet announced meanwhile (when this trainer is still the active one).
    fn superseded(&mut self, consumed: u64) -> Result<RoundResult> {
        warn!("the version was not announced: another trainer is active now, or a rollback came first; training continues from the fleet's announced version");
        self.reload_latest(false)?;
        self.base = None;
        self.ctx.activity.round_not_learnt(consumed);
        Ok(RoundResult::Superseded)
    }

    /// A model that was not accepted. A finite one is kept and trained further next round (its
    /// data counted again), unless the live model is better on the validation users (or, with
    /// none, it does not even beat a uniform guess while a live model exists): then training
    /// goes back to the live state. A non-finite one is dropped: training goes back to the live
    /// state, or restarts from scratch before the first model.
    fn reject(&mut self, j: Judgement, consumed: u64) -> Result<RoundResult> {
        let below_uniform = !(j.nll.is_finite() && j.nll < j.uniform_nll);
        let live_is_better = match j.live_ndcg {
            Some(live) => live > j.ndcg,
            None => below_uniform && self.ctx.live.current().is_some(),
        };
        let keep = j.result != RoundResult::RejectedNonFinite && !live_is_better;
        warn!(
            reason = %j.reason,
            validation_ndcg = j.ndcg,
            popularity_ndcg = ?j.popularity_ndcg,
            live_ndcg = ?j.live_ndcg,
            nll = j.nll,
            uniform_nll = j.uniform_nll,
            next = if keep { "training on from this model" } else { "training on from the live model" },
            "round rejected; the live model (or popularity) keeps serving"
        );
        self.unfinished = false;
        if keep {
            self.ctx.activity.round_not_learnt(consumed);
        } else {
            self.reload_latest(false)?;
        }
        Ok(j.result)
    }

    /// Runs the worker on a thread of its own (candle training blocks); resolves when it stops,
    /// with an error if it panicked.
    pub fn run_on_thread(self) -> impl Future<Output = Result<()>> + Send + 'static {
        let thread = std::thread::Builder::new()
            .name("multivaed-train".into())
            .spawn(move || {
                std::panic::catch_unwind(AssertUnwindSafe(|| self.run()))
                    .map_err(|p| anyhow!("panicked: {}", crate::fault::panic_message(&*p)))
            });
        async move {
            let thread = thread.context("cannot start the training thread")?;
            tokio::task::spawn_blocking(move || thread.join())
                .await
                .context("cannot wait for the training thread")?
                .map_err(|_| anyhow!("the training thread died"))?
        }
    }

    /// Runs rounds until shutdown.
    fn run(mut self) {
        // Training gets a thread pool of its own, so the scorer's parallel work (in the global
        // pool) never queues behind a multi-second training GEMM, and its threads run at a lower
        // OS priority, so scoring and ingestion take the cores first when they need them.
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(rayon::current_num_threads())
            .thread_name(|i| format!("multivaed-train-{i}"))
            .start_handler(|_| lower_this_threads_priority())
            .build();
        let mut last_round = Instant::now();
        while !self.ctx.shutdown.is_set() {
            if !self.may_train() || !self.due(last_round) {
                self.ctx.shutdown.wait_timeout(Duration::from_millis(200));
                continue;
            }
            crate::fault::panic_point("train.round");
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

    /// Role `train`: whether this trainer may train now — it is the active one, no canary runs,
    /// and its state is the version the fleet announced (adopted first when that moved: a
    /// takeover, a rollback, a rejected canary). Role `all`: whenever no canary runs.
    fn may_train(&mut self) -> bool {
        let Some(fleet) = &self.ctx.fleet else {
            return !self.canary_pending();
        };
        let Standing::Active { current } = fleet.standing() else {
            return false;
        };
        if self.canary_pending() {
            return false;
        }
        if current == self.base {
            return true;
        }
        match self.adopt(current) {
            Ok(()) => true,
            Err(e) => {
                error!(error = %format!("{e:#}"), "cannot continue from the fleet's announced version; retrying in 5 s");
                self.ctx.shutdown.wait_timeout(Duration::from_secs(5));
                false
            }
        }
    }

    /// Counts a round and, if it was not accepted, holds the next one back by `train.interval`.
    fn pace(&mut self, result: RoundResult) {
        let m = &self.ctx.metrics;
        m.training_rounds.with_label_values(&[result.label()]).inc();
        if result == RoundResult::Accepted || self.ctx.shutdown.is_set() {
            self.not_before = None;
            m.training_next_round.set(0.0);
            return;
        }
        let wait = self.ctx.train.interval;
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

/// Where an accepted version went.
enum Shipped {
    /// Role `all`: nowhere but the local checkpoints and the live slot.
    Local,
    /// Announced to the fleet.
    Announced(Announced),
    /// Not announced (see [`Fleet::ship`]).
    Superseded,
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

#[cfg(test)]
mod tests {
    use super::*;

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

    /// A worker on a temporary store holding `users` users of 8 items each in 4 taste groups.
    fn worker_on(
        dir: &std::path::Path,
        users: u32,
        tweak: impl FnOnce(&mut TrainConfig, &mut ModelConfig),
    ) -> Worker {
        worker_with_items(dir, users, 8, tweak)
    }

    /// As `worker_on`, with `per_user` items per user.
    fn worker_with_items(
        dir: &std::path::Path,
        users: u32,
        per_user: u32,
        tweak: impl FnOnce(&mut TrainConfig, &mut ModelConfig),
    ) -> Worker {
        start_on(dir, users, per_user, "i", tweak).unwrap()
    }

    /// A worker started on a store of `users` users of `per_user` items named `item_prefix`N.
    fn start_on(
        dir: &std::path::Path,
        users: u32,
        per_user: u32,
        item_prefix: &'static str,
        tweak: impl FnOnce(&mut TrainConfig, &mut ModelConfig),
    ) -> Result<Worker> {
        let store = Arc::new(Store::open(&dir.join("store"), 100).unwrap());
        let clicks: Vec<crate::store::Click> = (0..users)
            .flat_map(|u| {
                (0..per_user).map(move |k| crate::store::Click {
                    user: format!("u{u}"),
                    item: format!("{item_prefix}{}", (u % 4) * 25 + (u * 7 + k * 3) % 25),
                    timestamp_ms: None,
                    weight: 1.0,
                })
            })
            .collect();
        let offsets = [crate::store::PartitionOffset {
            topic: "clicks".into(),
            partition: 0,
            next_offset: clicks.len() as i64,
        }];
        let applied = store.apply(&clicks, &offsets).unwrap();
        let activity = Arc::new(Activity::new(10_000, 10_000));
        activity.batch_stored(
            &applied.changed_users,
            applied.new_interactions,
            std::time::Instant::now(),
        );
        let mut train = TrainConfig {
            max_epochs_per_round: 5,
            validation_users: 100,
            min_validation_users: 10,
            min_users: 1,
            ..TrainConfig::default()
        };
        let mut model = ModelConfig {
            mlp_hidden_size: vec![32],
            latent_dimension: 8,
            batch_size: 50,
            ..ModelConfig::default()
        };
        tweak(&mut train, &mut model);
        Worker::start(Training {
            train,
            model,
            models_dir: dir.join("models"),
            device: Device::Cpu,
            store,
            activity,
            live: Arc::new(LiveModelSlot::new()),
            metrics: Arc::new(Metrics::new().unwrap()),
            shutdown: Arc::new(Shutdown::default()),
            fleet: None,
            promotion: crate::config::PromotionConfig::default(),
            tally: Arc::default(),
        })
    }

    /// Counts `trials` clicks of one side of canary `version`, `hits` of them hits.
    fn evidence(w: &Worker, version: u64, side: crate::promotion::Side, trials: u64, hits: u64) {
        for t in 0..trials {
            w.ctx.tally.record(version, side, t < hits);
        }
    }

    #[test]
    fn role_all_serves_a_new_version_as_a_canary_and_the_evidence_rolls_it_back_or_promotes_it() {
        use crate::promotion::Side;
        let dir = tempfile::tempdir().unwrap();
        let mut w = worker_on(dir.path(), 400, |t, _| {
            t.catch_up = false;
            t.max_ndcg_drop = 1.0;
        });
        w.ctx.promotion.enabled = true;
        // the first version has nothing to be compared with: it goes live
        assert_eq!(w.round().unwrap(), RoundResult::Accepted);
        assert_eq!(w.ctx.live.models().canary_version(), None);
        assert!(w.may_train());
        let live_updates = w.trainer.as_ref().unwrap().update_count();

        // the next one is a canary: not live, not checkpointed, no round while it runs
        assert_eq!(w.round().unwrap(), RoundResult::Accepted);
        let models = w.ctx.live.models();
        assert_eq!(models.live.as_ref().unwrap().version, 1);
        assert_eq!(models.canary_version(), Some(2));
        assert_eq!(w.checkpoints.versions().unwrap(), vec![1]);
        assert!(!w.may_train(), "undecided: no round");

        // its slice never hits while the live model does: rolled back
        evidence(&w, 2, Side::Canary, 400, 0);
        evidence(&w, 2, Side::Live, 4000, 1200);
        assert!(w.canary_pending(), "decided at this look");
        assert_eq!(w.ctx.live.models().canary_version(), None);
        assert_eq!(w.ctx.live.current().unwrap().version, 1);
        assert_eq!(w.checkpoints.versions().unwrap(), vec![1], "moved aside");
        let metrics = w.ctx.metrics.clone();
        let decisions = &metrics.canary_decisions;
        assert_eq!(decisions.with_label_values(&["reject", "test"]).get(), 1);
        assert!(w.may_train(), "training continues");
        assert_eq!(
            w.trainer.as_ref().unwrap().update_count(),
            live_updates,
            "from the live version's state, not the rejected one's"
        );

        // a better one is promoted: live and checkpointed, and its number is new
        assert_eq!(w.round().unwrap(), RoundResult::Accepted);
        assert_eq!(w.ctx.live.models().canary_version(), Some(3));
        evidence(&w, 3, Side::Canary, 3000, 1200);
        evidence(&w, 3, Side::Live, 20000, 6000);
        assert!(w.canary_pending());
        assert_eq!(w.ctx.live.current().unwrap().version, 3);
        assert_eq!(w.ctx.live.models().canary_version(), None);
        assert_eq!(w.checkpoints.versions().unwrap(), vec![1, 3]);
        let manifest = Checkpoints::read_manifest(&w.checkpoints.path_of(3)).unwrap();
        assert_eq!(manifest.training["canary"], "promote");
        assert_eq!(decisions.with_label_values(&["promote", "test"]).get(), 1);

        // one that stays undecided past promotion.max_duration is rolled back
        w.ctx.promotion.max_duration = Duration::from_millis(1);
        assert_eq!(w.round().unwrap(), RoundResult::Accepted);
        std::thread::sleep(Duration::from_millis(5));
        assert!(w.canary_pending());
        assert_eq!(w.ctx.live.current().unwrap().version, 3);
        assert_eq!(decisions.with_label_values(&["reject", "timeout"]).get(), 1);
    }

    #[test]
    fn a_store_rebuilt_beside_old_models_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = worker_on(dir.path(), 100, |_, _| {});
        assert_eq!(w.round().unwrap(), RoundResult::Accepted);
        drop(w);
        // the same users and as many items, under other ids: column j is another item now
        std::fs::remove_dir_all(dir.path().join("store")).unwrap();
        let e = start_on(dir.path(), 100, 8, "other-", |_, _| {})
            .err()
            .expect("refused");
        assert!(
            format!("{e:#}").contains("other items than this store holds"),
            "{e:#}"
        );
        // the same ids again: it loads
        std::fs::remove_dir_all(dir.path().join("store")).unwrap();
        let w = start_on(dir.path(), 100, 8, "i", |_, _| {}).unwrap();
        assert_eq!(w.ctx.live.current().unwrap().version, 1);
    }

    #[test]
    fn a_round_on_a_store_checkpoints_and_publishes_a_model_that_beats_the_floors() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = worker_on(dir.path(), 400, |t, _| t.catch_up = false);
        assert!(
            w.due(Instant::now()),
            "data and users: the first round is due"
        );
        assert_eq!(w.round().unwrap(), RoundResult::Accepted);
        let live = w.ctx.live.current().expect("a model is live");
        assert_eq!(live.version, 1);
        assert_eq!(w.checkpoints.versions().unwrap(), vec![1]);
        let m = &w.ctx.metrics;
        assert!(m.validation_ndcg.get() > m.validation_popularity_ndcg.get());
        assert_eq!(m.model_round_interactions.get(), 400 * 8 - dup_pairs(400));
        assert!(!w.due(Instant::now()), "nothing new since: no round due");
    }

    #[test]
    fn a_round_still_improving_at_its_epoch_limit_is_followed_at_once_and_a_converged_one_waits() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = worker_on(dir.path(), 400, |t, _| t.max_epochs_per_round = 1);
        assert_eq!(w.round().unwrap(), RoundResult::Accepted);
        assert!(w.unfinished);
        assert!(w.due(Instant::now()), "no new data, but not converged");
        assert_eq!(w.ctx.metrics.training_converged.get(), 0);
        // long rounds with a short patience converge, and then wait for data
        w.ctx.train.max_epochs_per_round = 500;
        w.ctx.train.patience = 2;
        let mut rounds = 0;
        while w.due(Instant::now()) && rounds < 10 {
            w.round().unwrap();
            rounds += 1;
        }
        assert!(!w.unfinished, "converged within {rounds} rounds");
        assert_eq!(w.ctx.metrics.training_converged.get(), 1);
        assert!(
            !w.due(Instant::now()),
            "converged, nothing new: no round due"
        );
    }

    #[test]
    fn a_growing_store_makes_a_round_due_before_the_interval() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = worker_on(dir.path(), 400, |t, _| t.catch_up = false);
        assert_eq!(w.round().unwrap(), RoundResult::Accepted);
        let read = w.last_read;
        w.ctx.activity.learnable(&[], read / 20);
        assert!(!w.due(Instant::now()), "5% more: not yet");
        w.ctx.activity.learnable(&[], read / 10);
        assert!(
            w.due(Instant::now()),
            "15% more: due (train.min_new_fraction 0.1)"
        );
    }

    /// (user, item) pairs the test data repeats (histories are sets).
    fn dup_pairs(users: u32) -> i64 {
        (0..users)
            .map(|u| {
                let mut items: Vec<u32> = (0..8u32)
                    .map(|k| (u % 4) * 25 + (u * 7 + k * 3) % 25)
                    .collect();
                items.sort_unstable();
                items.dedup();
                (8 - items.len()) as i64
            })
            .sum()
    }

    #[test]
    fn garbage_is_rejected_kept_for_the_next_round_and_paced() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = worker_on(dir.path(), 400, |_, m| m.learning_rate = 1.0);
        let result = w.round().unwrap();
        assert_eq!(result, RoundResult::RejectedFloor);
        assert!(w.ctx.live.current().is_none(), "nothing published");
        assert!(
            w.checkpoints.versions().unwrap().is_empty(),
            "nothing saved"
        );
        // the first model's finite state is kept and its data counted again for a retry...
        assert!(w.trainer.is_some());
        assert!(w.ctx.activity.new_interactions() > 0);
        // ...but only after train.interval
        w.pace(result);
        assert!(
            !w.due(Instant::now()),
            "a retry is held back by train.interval"
        );
        assert!(w.ctx.metrics.training_next_round.get() > 0.0);
    }

    #[test]
    fn a_non_finite_first_model_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = worker_on(dir.path(), 400, |_, m| m.learning_rate = 1e6);
        assert_eq!(w.round().unwrap(), RoundResult::RejectedNonFinite);
        assert!(w.ctx.live.current().is_none());
        assert!(w.trainer.is_none(), "training restarts from scratch");
    }

    #[test]
    fn a_round_past_max_duration_is_abandoned_and_its_data_counted_again() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = worker_on(dir.path(), 400, |t, _| {
            t.max_duration = Duration::ZERO;
        });
        let before = w.ctx.activity.new_interactions();
        assert_eq!(w.round().unwrap(), RoundResult::Abandoned);
        assert!(w.ctx.live.current().is_none());
        assert_eq!(w.ctx.activity.new_interactions(), before);
    }

    #[test]
    fn a_later_model_worse_than_the_live_one_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = worker_on(dir.path(), 400, |t, _| t.max_ndcg_drop = 0.0);
        assert_eq!(w.round().unwrap(), RoundResult::Accepted);
        // the next round climbs the loss instead of descending it (a negative rate): worse than
        // the live model by construction, whatever the arithmetic's rounding
        w.ctx.model.learning_rate = -0.01;
        if let Some(t) = w.trainer.as_mut() {
            t.set_learning_rate(-0.01);
        }
        w.ctx.activity.round_not_learnt(1);
        let result = w.round().unwrap();
        assert!(
            matches!(
                result,
                RoundResult::RejectedFloor
                    | RoundResult::RejectedNdcg
                    | RoundResult::RejectedNonFinite
            ),
            "{result:?}"
        );
        assert_eq!(w.ctx.live.current().unwrap().version, 1, "v1 keeps serving");
        // far worse than the live model: training goes back to it, not on from the garbage
        let v1 = Checkpoints::read_manifest(&w.checkpoints.path_of(1)).unwrap();
        assert_eq!(w.trainer.as_ref().unwrap().update_count(), v1.update_count);
    }

    #[test]
    fn with_too_few_validation_users_every_model_is_published_unvalidated() {
        // every user has 4 items: none can be evaluated (5 needed)
        let dir = tempfile::tempdir().unwrap();
        let mut w = worker_with_items(dir.path(), 400, 4, |_, _| {});
        for version in 1..=3 {
            assert_eq!(w.round().unwrap(), RoundResult::Accepted);
            assert_eq!(w.ctx.live.current().unwrap().version, version);
            assert_eq!(
                w.ctx.metrics.model_validated.get(),
                0,
                "published unvalidated"
            );
            w.ctx.activity.round_not_learnt(1);
        }
        // a learning rate that makes garbage: never published as validated either
        let dir = tempfile::tempdir().unwrap();
        let mut w = worker_with_items(dir.path(), 400, 4, |_, m| m.learning_rate = 3.0);
        for _ in 0..3 {
            let r = w.round().unwrap();
            assert_ne!(w.ctx.metrics.model_validated.get(), 1, "{r:?}");
            w.ctx.activity.round_not_learnt(1);
        }
    }

    #[test]
    fn a_small_site_validates_on_a_quarter_of_its_users_and_trains_on_all_of_them() {
        let dir = tempfile::tempdir().unwrap();
        // 200 users asking for 500 validation users: the largest share, a quarter
        let mut w = worker_on(dir.path(), 200, |t, _| {
            t.validation_users = 500;
            t.min_validation_users = 30;
        });
        assert_eq!(w.round().unwrap(), RoundResult::Accepted);
        assert_eq!(w.ctx.metrics.model_validated.get(), 1, "validated");
        assert_eq!(w.validation_share, validation::MAX_SHARE);
        let figures = Checkpoints::read_manifest(&w.checkpoints.path_of(1))
            .unwrap()
            .training;
        let n = |k: &str| figures[k].as_u64().unwrap();
        assert!(n("validation_users") >= 30, "{figures}");
        assert_eq!(n("training_users"), 200, "validation users train too");
        assert_eq!(
            n("training_interactions") + n("withheld_interactions"),
            200 * 8 - dup_pairs(200) as u64
        );
        for key in ["epochs", "kept_epoch", "stopped", "seconds"] {
            assert!(figures.get(key).is_some(), "{key} missing: {figures}");
        }
        // a later model replaces it
        w.ctx.activity.round_not_learnt(1);
        assert_eq!(w.round().unwrap(), RoundResult::Accepted);
        assert_eq!(w.ctx.live.current().unwrap().version, 2);
    }

    #[test]
    fn a_weak_live_model_does_not_trap_training_below_the_floor() {
        let dir = tempfile::tempdir().unwrap();
        // one small-step epoch a round: no single round from the weak model beats popularity
        let mut w = worker_on(dir.path(), 400, |t, m| {
            t.max_epochs_per_round = 1;
            m.learning_rate = 1e-4;
        });
        let n_items = w.ctx.store.counts().items as usize;
        let mut weak = Trainer::new(&w.ctx.model, n_items, 3, &Device::Cpu).unwrap();
        let rows: Vec<Vec<u32>> = (0..50u32)
            .map(|u| w.ctx.store.history(u).unwrap())
            .collect();
        let rows: Vec<&[u32]> = rows.iter().map(|r| r.as_slice()).collect();
        weak.train_step(&rows).unwrap();
        w.checkpoints
            .save(&weak, 1, serde_json::json!({}), None, None)
            .unwrap();
        w.version = 1;
        w.publish(&weak, 1, 0, false).unwrap();
        w.trainer = Some(weak);
        let mut rounds = 0;
        let accepted = loop {
            rounds += 1;
            let r = w.round().unwrap();
            if r == RoundResult::Accepted || rounds == 60 {
                break r == RoundResult::Accepted;
            }
            assert_eq!(r, RoundResult::RejectedFloor);
        };
        assert!(
            accepted,
            "no model beat popularity in {rounds} rounds: trapped"
        );
        assert_eq!(w.ctx.metrics.model_validated.get(), 1);
        assert!(rounds > 1, "the test needs rounds that are rejected first");
        eprintln!("a validated model after {rounds} rounds");
    }

    #[test]
    fn no_model_is_accepted_far_below_the_best_accepted_one_even_when_the_live_one_is_worse() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = worker_on(dir.path(), 400, |t, _| t.max_ndcg_drop = 0.0);
        for _ in 0..3 {
            assert_eq!(w.round().unwrap(), RoundResult::Accepted);
        }
        assert_eq!(w.best_version, Some(3));
        // the live model drifted down (an untrained one stands in for it); the best is v3
        let n_items = w.ctx.store.counts().items as usize;
        let junk = Trainer::new(&w.ctx.model, n_items, 5, &Device::Cpu).unwrap();
        w.ctx
            .live
            .publish(LiveModel::local(3, junk.model().for_serving().unwrap()));
        w.best_version = Some(2);
        // a fresh model trained once is within the tolerance of the junk, but not of v2
        w.ctx.train.max_ndcg_drop = 0.05;
        w.trainer = Some(Trainer::new(&w.ctx.model, n_items, 99, &Device::Cpu).unwrap());
        w.ctx.activity.round_not_learnt(1);
        assert_eq!(w.round().unwrap(), RoundResult::RejectedNdcg);
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
