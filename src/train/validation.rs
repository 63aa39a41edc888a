//! Who validates a round, and on what. A share of the users, chosen by a hash of their id for
//! life, are validation users; a fifth of each validation user's items, chosen by a hash of
//! (user, item id) for life, are held out and never trained on. The rest of their items are
//! trained on like anyone's, so a small site loses little training data to validation, and the
//! figure measured is the one serving needs: ranking a known user's next items from the rest
//! of their history. The share is sized from the users stored — large for a small site, so it
//! has enough validation users to decide, small for a large one — and only ever shrinks, so an
//! item once trained on for a user is never held out for them later.

use anyhow::Result;

use crate::eval::{evaluate_model, evaluate_popularity};
use crate::model::{splitmix as mix, Interactions, MultiVae};
use crate::store::{Pick, Sample};

/// The share of validation users, at most (a small site) …
pub const MAX_SHARE: f64 = 0.25;
/// … and at least (a large one).
pub const MIN_SHARE: f64 = 0.05;
/// A validation user's items held out: one in this many, by hash.
const HELD_OUT_ONE_IN: u64 = 5;
/// Items a validation user needs before they are evaluated.
pub const MIN_ITEMS: usize = 5;

/// An item and its weight.
type Pair = (u32, f32);

/// Hash resolution of the share.
const SHARE_STEPS: u64 = 1 << 20;

/// The share of users that validate when `users` are stored and `wanted` validation users are
/// asked for (`train.validation_users`): about twice as many as wanted (not every user has
/// enough items), within [`MIN_SHARE`, `MAX_SHARE`].
pub fn share_for(users: u64, wanted: usize) -> f64 {
    let share = 2.0 * wanted as f64 / users.max(1) as f64;
    share.clamp(MIN_SHARE, MAX_SHARE)
}

/// Whether the user of `user_key` ([`crate::store::user_key`]) is a validation user at `share`.
/// A smaller share keeps a subset of a larger one's users, so shrinking it only ever turns
/// validation users into plain training users.
pub fn is_validation_user(user_key: u64, seed: u64, share: f64) -> bool {
    let h = mix(user_key ^ seed.rotate_left(17)) % SHARE_STEPS;
    (h as f64) < share * SHARE_STEPS as f64
}

/// Whether a validation user's item (by the hash of its id) is held out, for life.
pub fn is_held_out(user_key: u64, item_key: u64, seed: u64) -> bool {
    mix(user_key.rotate_left(32) ^ item_key ^ seed).is_multiple_of(HELD_OUT_ONE_IN)
}

/// The validation settings of one round.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub share: f64,
    /// Validation users evaluated, at most (`train.validation_users`).
    pub max_users: usize,
    pub seed: u64,
}

impl Plan {
    /// How the sample treats the user of `key` with `items`, `picked` validation users having
    /// been picked before: the first `max_users` validation users with enough items always
    /// (evaluated); everyone else by the sample's budget.
    pub fn pick(&self, key: u64, items: &[u32], picked: usize) -> Pick {
        if is_validation_user(key, self.seed, self.share)
            && picked < self.max_users
            && items.len() >= MIN_ITEMS
        {
            Pick::Always
        } else {
            Pick::Maybe
        }
    }
}

/// Validation data: the fold-in and held-out items of the evaluated validation users.
pub struct Validation {
    pub users: Vec<u32>,
    pub fold_in: Interactions,
    pub heldout: Interactions,
}

/// A round's sample split into training rows and validation data. `item_keys[c]` is the hash
/// of column c's item id.
pub struct Split {
    pub train: Interactions,
    pub validation: Validation,
    /// Interactions held out of training (validation users' held-out items).
    pub held_out: usize,
}

/// Splits a sample (in user order, its rows in model columns): every validation user's
/// held-out items leave training; the evaluated ones (see [`Plan::pick`]) with at least one
/// held-out and one other item are validated on them, the others are trained on the rest.
pub fn split(sample: &Sample, plan: &Plan, item_keys: &[u64]) -> Result<Split> {
    let n_items = sample.rows.n_items();
    let mut out = Split {
        train: sample.rows.like(n_items),
        validation: Validation {
            users: Vec::new(),
            fold_in: sample.rows.like(n_items),
            heldout: Interactions::new(n_items),
        },
        held_out: 0,
    };
    let item_key = |i: u32| item_keys.get(i as usize).copied().unwrap_or(u64::from(i));
    for (r, (&u, &key)) in sample.users.iter().zip(&sample.keys).enumerate() {
        if !is_validation_user(key, plan.seed, plan.share) {
            out.train
                .push_pairs(sample.rows.pairs(r))
                .map_err(anyhow::Error::msg)?;
            continue;
        }
        let (held, kept): (Vec<Pair>, Vec<Pair>) = sample
            .rows
            .pairs(r)
            .partition(|&(i, _)| is_held_out(key, item_key(i), plan.seed));
        out.held_out += held.len();
        let evaluated = out.validation.users.len() < plan.max_users
            && sample.rows.row(r).len() >= MIN_ITEMS
            && !held.is_empty()
            && !kept.is_empty();
        if evaluated {
            let v = &mut out.validation;
            v.heldout
                .push_row(held.iter().map(|p| p.0))
                .map_err(anyhow::Error::msg)?;
            v.fold_in
                .push_pairs(kept.iter().copied())
                .map_err(anyhow::Error::msg)?;
            v.users.push(u);
        }
        out.train.push_pairs(kept).map_err(anyhow::Error::msg)?;
    }
    Ok(out)
}

/// NDCG@100 of `model` on the validation users (fold-in items the model does not know are
/// dropped from its input; held-out items it does not know count as misses).
pub fn validation_ndcg(model: &MultiVae, val: &Validation) -> Result<f64> {
    if val.users.is_empty() {
        return Ok(0.0);
    }
    let n = model.n_items() as u32;
    let known = val
        .fold_in
        .map_items(model.n_items(), |i| (i < n).then_some(i))
        .map_err(anyhow::Error::msg)?;
    Ok(evaluate_model(model, &known, &val.heldout)?.ndcg100.mean)
}

/// NDCG@100 of the popularity ranking (items by how many training users hold them) on the
/// validation users (all three share the round's catalogue).
pub fn popularity_ndcg(train: &Interactions, val: &Validation) -> f64 {
    evaluate_popularity(train, &val.fold_in, &val.heldout)
        .ndcg100
        .mean
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_smaller_share_keeps_a_subset_of_the_validation_users() {
        let keys: Vec<u64> = (0..20_000u64).map(mix).collect();
        let at = |share| -> Vec<u64> {
            keys.iter()
                .copied()
                .filter(|&k| is_validation_user(k, 1, share))
                .collect()
        };
        let (large, small) = (at(MAX_SHARE), at(MIN_SHARE));
        assert!(small.iter().all(|k| large.contains(k)));
        let frac = |v: &Vec<u64>| v.len() as f64 / keys.len() as f64;
        assert!((frac(&large) - MAX_SHARE).abs() < 0.01, "{}", frac(&large));
        assert!((frac(&small) - MIN_SHARE).abs() < 0.01, "{}", frac(&small));
    }

    #[test]
    fn the_share_is_large_for_a_small_site_and_small_for_a_large_one() {
        assert_eq!(share_for(700, 500), MAX_SHARE);
        assert_eq!(share_for(1_000_000, 500), MIN_SHARE);
        assert!((share_for(10_000, 500) - 0.1).abs() < 1e-12);
        assert_eq!(share_for(0, 500), MAX_SHARE);
    }

    #[test]
    fn held_out_items_are_never_trained_on_and_the_rest_are() {
        let rows: Vec<Vec<u32>> = (0..400u32)
            .map(|u| (0..12).map(|k| (u * 7 + k * 3) % 50).collect())
            .collect();
        let sample = Sample {
            users: (0..400).collect(),
            keys: (0..400u64).map(|u| mix(u + 1)).collect(),
            rows: Interactions::from_rows(rows.clone(), 50).unwrap(),
        };
        let item_keys: Vec<u64> = (0..50u64).map(|i| mix(i ^ 0xabc)).collect();
        let plan = Plan {
            share: MAX_SHARE,
            max_users: 1000,
            seed: 3,
        };
        let s = split(&sample, &plan, &item_keys).unwrap();
        assert_eq!(s.train.n_users(), 400, "every user trains");
        let v = &s.validation;
        assert!(
            v.users.len() > 60 && v.users.len() < 140,
            "{}",
            v.users.len()
        );
        for (r, &u) in v.users.iter().enumerate() {
            let trained = s.train.row(u as usize);
            for i in v.heldout.row(r) {
                assert!(
                    !trained.contains(i),
                    "user {u}: held-out item {i} trained on"
                );
            }
            assert_eq!(trained, v.fold_in.row(r));
        }
        assert_eq!(
            s.train.nnz() + s.held_out,
            sample.rows.nnz(),
            "only held-out items leave training"
        );
        // a larger history keeps the same items held out
        let grown = Sample {
            rows: Interactions::from_rows(
                rows.iter()
                    .map(|r| r.iter().copied().chain([49]).collect::<Vec<_>>()),
                50,
            )
            .unwrap(),
            ..sample.clone()
        };
        let g = split(&grown, &plan, &item_keys).unwrap();
        for (r, &u) in v.users.iter().enumerate() {
            let gr = g.validation.users.iter().position(|&x| x == u).unwrap();
            let before = v.heldout.row(r);
            assert!(before
                .iter()
                .all(|i| g.validation.heldout.row(gr).contains(i)));
        }
    }
}
