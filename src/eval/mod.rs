//! The paper's strong-generalisation evaluation (`multivaed eval`): train on the training users,
//! keep the epoch with the best validation NDCG@100, report test NDCG@100, Recall@20 and
//! Recall@50 for Multi-VAE and a popularity baseline.

mod metrics;
mod split;

use std::time::Instant;

use anyhow::Result;
use candle_core::Device;
use serde::{Deserialize, Serialize};

pub(crate) use metrics::{score_rankings, RankingScores};
pub use split::{
    build_split, read_raw, read_split_dir, write_split_dir, RawFormat, RawInteraction, Split,
};

use crate::model::{top_k_unseen, Interactions, ModelConfig, MultiVae, Scoring, Trainer};

/// Ranks the top 100 items of each fold-in user with `model` and scores them against held-out.
pub(crate) fn evaluate_model(
    model: &MultiVae,
    fold_in: &Interactions,
    heldout: &Interactions,
) -> Result<RankingScores> {
    let ranked = top_100(model, fold_in)?;
    Ok(score_rankings(
        ranked.iter().map(|r| r.as_slice()).zip(heldout.rows()),
    ))
}

/// Each fold-in user's top 100 items by `model` (weighted where the model reads weights).
fn top_100(model: &MultiVae, fold_in: &Interactions) -> Result<Vec<Vec<u32>>> {
    let rows: Vec<&[u32]> = fold_in.rows().collect();
    let weights = fold_in
        .all_weights()
        .filter(|_| model.config().input == crate::model::Input::Weighted);
    let recs = model.recommend_weighted(&rows, weights.as_deref(), &[], 100)?;
    Ok(recs
        .into_iter()
        .map(|r| r.into_iter().map(|(i, _)| i).collect())
        .collect())
}

/// Scores the popularity baseline (items ranked by how many training users hold them).
pub(crate) fn evaluate_popularity(
    train: &Interactions,
    fold_in: &Interactions,
    heldout: &Interactions,
) -> RankingScores {
    let pop: Vec<f32> = train.item_counts().into_iter().map(|c| c as f32).collect();
    let ranked: Vec<Vec<u32>> = fold_in
        .rows()
        .map(|seen| {
            top_k_unseen(&pop, None, seen, 100)
                .into_iter()
                .map(|(i, _)| i)
                .collect()
        })
        .collect();
    score_rankings(ranked.iter().map(|r| r.as_slice()).zip(heldout.rows()))
}

/// Options of one evaluation run.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub config: ModelConfig,
    pub epochs: usize,
    pub seed: u64,
    pub device: Device,
}

/// Multi-VAE's test figures in the `--json` report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VaeFigures {
    #[serde(flatten)]
    pub test: BaselineFigures,
    #[serde(rename = "ndcg@100_se")]
    pub ndcg100_se: f64,
    pub best_epoch: usize,
    pub train_seconds_per_epoch: f64,
}

/// The three test figures of a model in the `--json` report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BaselineFigures {
    #[serde(rename = "ndcg@100")]
    pub ndcg100: f64,
    #[serde(rename = "recall@20")]
    pub recall20: f64,
    #[serde(rename = "recall@50")]
    pub recall50: f64,
}

/// User counts of the split.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UserCounts {
    pub train: usize,
    pub test: usize,
}

/// What `multivaed eval --json` prints as its last line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalReport {
    pub multivae: VaeFigures,
    pub popularity: BaselineFigures,
    pub users: UserCounts,
    pub items: usize,
    /// The best model's test users ranked by a serving copy, exact and int8 (absent where the
    /// CPU has no int8 pass or the catalogue is below its minimum).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scoring: Option<ScoringFigures>,
}

/// The int8 candidate pass against exact fp32 scoring, on the same users and model.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScoringFigures {
    #[serde(rename = "exact_ndcg@100")]
    pub exact_ndcg100: f64,
    #[serde(rename = "int8_ndcg@100")]
    pub int8_ndcg100: f64,
    /// Users whose top 10 (items and order) is the same both ways.
    pub top10_identical_share: f64,
    pub top100_identical_share: f64,
    /// Top-100 users scored per second (batches of 1,024, all threads).
    pub exact_users_per_second: f64,
    pub int8_users_per_second: f64,
}

/// Ranks the fold-in users' top 100 with a serving copy of `model` scored exactly and in int8:
/// NDCG@100 of both, how many lists agree, and the speed of each.
pub fn compare_scoring(
    model: &MultiVae,
    fold_in: &Interactions,
    heldout: &Interactions,
) -> Result<Option<ScoringFigures>> {
    if !crate::model::int8_supported() || model.n_items() < crate::model::INT8_MIN_ITEMS {
        return Ok(None);
    }
    let rank = |how: Scoring| -> Result<(Vec<Vec<u32>>, f64)> {
        let serving = model.for_serving_with(how)?;
        let t0 = Instant::now();
        let ranked = top_100(&serving, fold_in)?;
        Ok((
            ranked,
            fold_in.n_users() as f64 / t0.elapsed().as_secs_f64(),
        ))
    };
    let (exact, exact_rate) = rank(Scoring::Exact)?;
    let (int8, int8_rate) = rank(Scoring::Int8)?;
    let ndcg = |ranked: &[Vec<u32>]| {
        score_rankings(ranked.iter().map(|r| r.as_slice()).zip(heldout.rows()))
            .ndcg100
            .mean
    };
    let identical = |depth: usize| {
        let same = exact
            .iter()
            .zip(&int8)
            .filter(|(a, b)| a[..a.len().min(depth)] == b[..b.len().min(depth)])
            .count();
        same as f64 / exact.len().max(1) as f64
    };
    Ok(Some(ScoringFigures {
        exact_ndcg100: ndcg(&exact),
        int8_ndcg100: ndcg(&int8),
        top10_identical_share: identical(10),
        top100_identical_share: identical(100),
        exact_users_per_second: exact_rate,
        int8_users_per_second: int8_rate,
    }))
}

/// Per-epoch progress: (epoch, mean loss, β, validation NDCG@100, best so far).
pub(crate) type EpochCallback<'a> = dyn FnMut(usize, f64, f64, f64, f64) + 'a;

/// Runs the protocol on `split`.
pub fn run(
    split: &Split,
    opts: &EvalOptions,
    on_epoch: &mut EpochCallback<'_>,
) -> Result<EvalReport> {
    let n_items = split.item_ids.len();
    let mut trainer = Trainer::new(&opts.config, n_items, opts.seed, &opts.device)?;
    let mut best: Option<(f64, usize, MultiVae)> = None;
    let mut train_seconds = 0.0;
    for epoch in 0..opts.epochs {
        let t0 = Instant::now();
        let stats = trainer.train_epoch(&split.train, |_| {})?;
        train_seconds += t0.elapsed().as_secs_f64();
        let val = evaluate_model(trainer.model(), &split.validation_tr, &split.validation_te)?;
        let ndcg = val.ndcg100.mean;
        if best.as_ref().is_none_or(|(b, _, _)| ndcg > *b) {
            best = Some((ndcg, epoch, trainer.model().deep_copy()?));
        }
        let best_ndcg = best.as_ref().map(|b| b.0).unwrap_or(ndcg);
        on_epoch(epoch, stats.loss, stats.beta, ndcg, best_ndcg);
    }
    let (_, best_epoch, best_model) = match best {
        Some(b) => b,
        None => (f64::NAN, 0, trainer.model().deep_copy()?),
    };
    let test = evaluate_model(&best_model, &split.test_tr, &split.test_te)?;
    let pop = evaluate_popularity(&split.train, &split.test_tr, &split.test_te);
    let scoring = compare_scoring(&best_model, &split.test_tr, &split.test_te)?;
    Ok(EvalReport {
        multivae: VaeFigures {
            test: BaselineFigures {
                ndcg100: test.ndcg100.mean,
                recall20: test.recall20.mean,
                recall50: test.recall50.mean,
            },
            ndcg100_se: test.ndcg100.se,
            best_epoch,
            train_seconds_per_epoch: train_seconds / opts.epochs.max(1) as f64,
        },
        popularity: BaselineFigures {
            ndcg100: pop.ndcg100.mean,
            recall20: pop.recall20.mean,
            recall50: pop.recall50.mean,
        },
        users: UserCounts {
            train: split.train.n_users(),
            test: test.ndcg100.n,
        },
        items: n_items,
        scoring,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Users belong to one of 4 clusters of 25 items each: a model that learns the clusters
    /// beats popularity by far.
    #[test]
    fn multivae_beats_popularity_on_structured_data() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut raw = Vec::new();
        for u in 0..400 {
            let c = u % 4;
            for _ in 0..12 {
                let item = c * 25 + rng.gen_range(0..25);
                raw.push(RawInteraction {
                    user: u.to_string(),
                    item: item.to_string(),
                    rating: None,
                    timestamp: None,
                });
            }
            // a few globally popular items
            raw.push(RawInteraction {
                user: u.to_string(),
                item: "1000".into(),
                rating: None,
                timestamp: None,
            });
        }
        let split = build_split(&raw, 4.0, 40, 7).unwrap();
        let opts = EvalOptions {
            config: ModelConfig {
                mlp_hidden_size: vec![32],
                latent_dimension: 8,
                batch_size: 64,
                total_anneal_steps: 1000,
                ..Default::default()
            },
            epochs: 30,
            seed: 1,
            device: Device::Cpu,
        };
        let mut epochs = 0;
        let report = run(&split, &opts, &mut |_, loss, _, ndcg, _| {
            assert!(loss.is_finite() && ndcg.is_finite());
            epochs += 1;
        })
        .unwrap();
        assert_eq!(epochs, 30);
        assert!(
            report.multivae.test.ndcg100 > report.popularity.ndcg100 + 0.05
                && report.multivae.test.recall20 > report.popularity.recall20 + 0.2,
            "{report:?}"
        );
        let json = serde_json::to_value(&report).unwrap();
        for key in [
            "ndcg@100",
            "recall@20",
            "recall@50",
            "ndcg@100_se",
            "best_epoch",
            "train_seconds_per_epoch",
        ] {
            assert!(json["multivae"].get(key).is_some(), "missing {key}");
        }
        assert_eq!(json["users"]["test"], 40);
    }
}
