//! Training a round until it stops improving: epoch after epoch, each judged on the validation
//! users' NDCG@100 (or, with too few of them, on the training loss), stopping after `patience`
//! epochs without a better one, at `train.max_epochs_per_round` or at the round's deadline. The
//! best epoch's state is kept — weights, Adam moments and its lifelong update count, so the
//! anneal goes on from where that state was.

use anyhow::Result;
use tracing::debug;

use crate::model::{EpochStats, Interactions, Trainer};

use super::validation::{validation_ndcg, Validation};

/// What a round's epochs are judged by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// Validation NDCG@100 (enough validation users): the best epoch is kept.
    Ndcg,
    /// The training loss (too few validation users): training stops when it no longer falls by
    /// [`LOSS_PLATEAU`] of itself; the last epoch is kept.
    Loss,
}

/// A training loss that falls by less than this share of itself is not an improvement.
pub const LOSS_PLATEAU: f64 = 1e-3;

/// Why a round's training stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// `patience` epochs without improvement: converged on this data.
    Converged,
    /// `train.max_epochs_per_round` reached while still improving.
    MaxEpochs,
    /// `train.max_duration` reached.
    Deadline,
    /// The loss or the weights are no longer finite.
    Diverged,
}

impl Stop {
    pub fn label(self) -> &'static str {
        match self {
            Self::Converged => "converged",
            Self::MaxEpochs => "max_epochs",
            Self::Deadline => "max_duration",
            Self::Diverged => "diverged",
        }
    }
}

/// What stops a round from outside: the deadline, or a shutdown (the round is then abandoned).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interrupt {
    Deadline,
    Shutdown,
}

/// The limits of one round's training.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_epochs: usize,
    pub patience: usize,
    pub signal: Signal,
}

/// What a round's training did.
#[derive(Debug, Clone)]
pub struct Trained {
    /// The kept epoch's figures.
    pub stats: EpochStats,
    pub epochs: usize,
    /// The kept epoch (1-based).
    pub kept_epoch: usize,
    pub stop: Stop,
    /// The judged figure of each epoch (validation NDCG@100, or the training loss).
    pub curve: Vec<f64>,
}

/// The best epoch so far.
struct Best {
    score: f64,
    epoch: usize,
    stats: EpochStats,
    /// The trainer at that epoch, when a later one may need to go back to it.
    state: Option<Trainer>,
}

/// Trains `trainer` on `train` within `limits`; `interrupted` is asked after every step.
/// `None`: shut down, or interrupted before one epoch was done (the trainer is then mid-epoch
/// and must be discarded).
pub fn train_until_converged(
    trainer: &mut Trainer,
    train: &Interactions,
    val: &Validation,
    limits: Limits,
    interrupted: impl Fn() -> Option<Interrupt>,
) -> Result<Option<Trained>> {
    let mut best: Option<Best> = None;
    let mut last = EpochStats::default();
    let mut curve = Vec::new();
    let mut stop = Stop::MaxEpochs;
    for epoch in 1..=limits.max_epochs.max(1) {
        let mut why = None;
        let done = trainer.train_epoch_while(train, |_| {
            why = interrupted();
            why.is_none()
        })?;
        let Some(stats) = done else {
            if why == Some(Interrupt::Shutdown) || best.is_none() {
                return Ok(None);
            }
            stop = Stop::Deadline;
            break;
        };
        if !stats.loss.is_finite() {
            best = Some(Best {
                score: f64::NAN,
                epoch,
                stats,
                state: None,
            });
            stop = Stop::Diverged;
            break;
        }
        last = stats;
        let score = judge_epoch(trainer, &stats, val, limits.signal)?;
        curve.push(score);
        debug!(epoch, score, loss = stats.loss, signal = ?limits.signal, "epoch");
        if improves(score, best.as_ref().map(|b| b.score), limits.signal) {
            let keep_state = limits.signal == Signal::Ndcg && epoch < limits.max_epochs;
            best = Some(Best {
                score,
                epoch,
                stats,
                state: keep_state.then(|| trainer.snapshot()).transpose()?,
            });
        } else if best
            .as_ref()
            .is_some_and(|b| epoch - b.epoch >= limits.patience)
        {
            stop = Stop::Converged;
            break;
        }
    }
    let Some(best) = best else {
        return Ok(None);
    };
    let epochs = curve.len().max(best.epoch);
    if limits.signal == Signal::Ndcg && best.epoch < epochs {
        if let Some(state) = best.state {
            *trainer = state;
        }
    }
    let (kept_epoch, stats) = match limits.signal {
        Signal::Ndcg => (best.epoch, best.stats),
        Signal::Loss if stop == Stop::Diverged => (epochs, best.stats),
        Signal::Loss => (epochs, last),
    };
    Ok(Some(Trained {
        stats,
        epochs,
        kept_epoch,
        stop,
        curve,
    }))
}

/// An epoch's figure: its validation NDCG@100 (higher is better) or its training loss (lower
/// is better).
fn judge_epoch(
    trainer: &Trainer,
    stats: &EpochStats,
    val: &Validation,
    signal: Signal,
) -> Result<f64> {
    Ok(match signal {
        Signal::Ndcg => validation_ndcg(trainer.model(), val)?,
        Signal::Loss => stats.loss,
    })
}

/// Whether `score` improves on `best`: any higher NDCG, or a loss lower by the plateau share.
fn improves(score: f64, best: Option<f64>, signal: Signal) -> bool {
    let Some(best) = best else {
        return true;
    };
    match signal {
        Signal::Ndcg => score > best,
        Signal::Loss => score < best - LOSS_PLATEAU * best.abs(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelConfig;
    use candle_core::Device;

    fn grouped(users: u32) -> Interactions {
        Interactions::from_rows(
            (0..users).map(|u| (0..8u32).map(move |k| (u % 4) * 25 + (u * 7 + k * 3) % 25)),
            100,
        )
        .unwrap()
    }

    fn trainer() -> Trainer {
        let cfg = ModelConfig {
            mlp_hidden_size: vec![32],
            latent_dimension: 8,
            batch_size: 50,
            ..ModelConfig::default()
        };
        Trainer::new(&cfg, 100, 7, &Device::Cpu).unwrap()
    }

    fn no_validation() -> Validation {
        Validation {
            users: Vec::new(),
            fold_in: Interactions::new(100),
            heldout: Interactions::new(100),
        }
    }

    #[test]
    fn the_loss_plateau_stops_training_before_the_epoch_limit() {
        let mut t = trainer();
        let limits = Limits {
            max_epochs: 2000,
            patience: 3,
            signal: Signal::Loss,
        };
        let done = train_until_converged(&mut t, &grouped(400), &no_validation(), limits, || None)
            .unwrap()
            .unwrap();
        assert_eq!(done.stop, Stop::Converged);
        assert!(done.epochs < 2000, "{}", done.epochs);
        assert_eq!(
            done.kept_epoch, done.epochs,
            "the loss keeps the last epoch"
        );
        assert_eq!(t.epochs_done(), done.epochs as u64);
    }

    #[test]
    fn the_best_epoch_by_validation_is_kept_with_its_update_count() {
        // validation users whose held-out items are the ones training never shows them
        let data = grouped(400);
        let val = Validation {
            users: (0..40).collect(),
            fold_in: Interactions::from_rows(
                (0..40u32).map(|u| data.row(u as usize)[..6].to_vec()),
                100,
            )
            .unwrap(),
            heldout: Interactions::from_rows(
                (0..40u32).map(|u| data.row(u as usize)[6..].to_vec()),
                100,
            )
            .unwrap(),
        };
        let mut t = trainer();
        let limits = Limits {
            max_epochs: 40,
            patience: 5,
            signal: Signal::Ndcg,
        };
        let done = train_until_converged(&mut t, &data, &val, limits, || None)
            .unwrap()
            .unwrap();
        let best = done.curve.iter().copied().fold(f64::MIN, f64::max);
        assert_eq!(done.curve[done.kept_epoch - 1], best);
        let now = validation_ndcg(t.model(), &val).unwrap();
        assert!((now - best).abs() < 1e-12, "kept {now} vs best {best}");
        let steps_per_epoch = 400u64.div_ceil(50);
        assert_eq!(t.update_count(), done.kept_epoch as u64 * steps_per_epoch);
    }

    #[test]
    fn a_deadline_after_an_epoch_keeps_it_and_one_before_abandons() {
        let mut t = trainer();
        let limits = Limits {
            max_epochs: 100,
            patience: 100,
            signal: Signal::Loss,
        };
        let steps = std::cell::Cell::new(0);
        let deadline = || {
            steps.set(steps.get() + 1);
            (steps.get() > 20).then_some(Interrupt::Deadline)
        };
        let done = train_until_converged(&mut t, &grouped(400), &no_validation(), limits, deadline)
            .unwrap()
            .unwrap();
        assert_eq!(done.stop, Stop::Deadline);
        assert_eq!(done.epochs, 2, "8 steps an epoch: two done before step 21");
        let mut t = trainer();
        let now = || Some(Interrupt::Deadline);
        assert!(
            train_until_converged(&mut t, &grouped(400), &no_validation(), limits, now)
                .unwrap()
                .is_none()
        );
        let mut t = trainer();
        let steps = std::cell::Cell::new(0);
        let shutdown = || {
            steps.set(steps.get() + 1);
            (steps.get() > 20).then_some(Interrupt::Shutdown)
        };
        assert!(
            train_until_converged(&mut t, &grouped(400), &no_validation(), limits, shutdown)
                .unwrap()
                .is_none(),
            "a shutdown abandons the round"
        );
    }
}
