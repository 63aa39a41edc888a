//! Ranking, the one path by which push scoring, the pull API and offline `recommend` rank a
//! user's items: the live model's top items (never one the user has), or the popularity ranking
//! for users it cannot score yet; then mapped to external ids as a [`Recommendation`]. Histories
//! and results are in store item indices; a shipped model's columns are mapped on the way in and
//! out.

use anyhow::{Context, Result};

use crate::live::{LiveModel, Models};
use crate::model::Input;
use crate::promotion::Side;
use crate::store::{History, Store};
use crate::wire::{now_ms, Recommendation, ScoredItem, Source};

/// A user's ranked items before publishing (store indices).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Scored {
    pub user: u32,
    /// The user's external id (the store index when the store has none).
    pub user_id: String,
    pub items: Vec<(u32, f32)>,
    pub source: Source,
}

/// Ranks the top `depth` items for `users` (store indices) with the live model, or the popular
/// items for users the model cannot score (no model yet, or only items newer than the model).
/// Never an item the user has, nor one of `hidden` (store indices, ascending: unavailable,
/// excluded). A user whose id the store does not hold is left out (logged): a recommendation is
/// never published under an id that is not the user's.
pub fn score_users(
    store: &Store,
    live: Option<&LiveModel>,
    users: &[u32],
    depth: usize,
    hidden: &[u32],
) -> Result<Vec<Scored>> {
    let mut known = Vec::with_capacity(users.len());
    let mut histories = Vec::with_capacity(users.len());
    let mut ids = Vec::with_capacity(users.len());
    for &u in users {
        match store.user(u)? {
            Some((id, h)) => {
                known.push(u);
                histories.push(h);
                ids.push(id);
            }
            None => tracing::warn!(
                user_index = u,
                "a user index without an id record: not scored"
            ),
        }
    }
    score_histories(store, live, &known, ids, histories, depth, hidden)
}

/// As [`score_users`], while a canary may run: the users in its slice are ranked by the canary,
/// the others by the live model; each with the side of the canary it was on.
pub(crate) fn score_users_split(
    store: &Store,
    models: &Models,
    users: &[u32],
    depth: usize,
    hidden: &[u32],
) -> Result<Vec<(Scored, Option<Side>)>> {
    let Some(_) = models.canary_version() else {
        let live = models.live.as_deref();
        return Ok(score_users(store, live, users, depth, hidden)?
            .into_iter()
            .map(|s| (s, None))
            .collect());
    };
    // the users of each side, with their ids and histories
    let mut sides: [(Vec<u32>, Vec<String>, Vec<History>); 2] = Default::default();
    for &u in users {
        match store.user(u)? {
            Some((id, h)) => {
                let side = models.side(&id);
                let g = &mut sides[usize::from(side == Some(Side::Canary))];
                g.0.push(u);
                g.1.push(id);
                g.2.push(h);
            }
            None => tracing::warn!(
                user_index = u,
                "a user index without an id record: not scored"
            ),
        }
    }
    let mut out = Vec::with_capacity(users.len());
    for (side, (known, ids, histories)) in [Side::Live, Side::Canary].into_iter().zip(sides) {
        if known.is_empty() {
            continue;
        }
        let model = models.for_side(Some(side)).map(|m| m.as_ref());
        for sc in score_histories(store, model, &known, ids, histories, depth, hidden)? {
            out.push((sc, Some(side)));
        }
    }
    Ok(out)
}

/// As [`score_users`], for users given by their id and history (store item indices): the one
/// ranking path of the scorer, the pull API and offline `recommend`. A user's own items and
/// excluded items (negative events) are never ranked for them.
pub(crate) fn score_histories(
    store: &Store,
    live: Option<&LiveModel>,
    users: &[u32],
    ids: Vec<String>,
    histories: Vec<History>,
    depth: usize,
    hidden: &[u32],
) -> Result<Vec<Scored>> {
    // what each user must not be offered, ascending
    let seen: Vec<Vec<u32>> = histories
        .iter()
        .map(|h| {
            let mut s: Vec<u32> = h.items.iter().chain(&h.excluded).copied().collect();
            s.sort_unstable();
            s.dedup();
            s
        })
        .collect();
    let mut scored: Vec<Option<Vec<(u32, f32)>>> = vec![None; users.len()];
    if let Some(live) = live {
        let ranked = rank_with_model(live, &histories, hidden, depth)?;
        for (j, r) in ranked {
            scored[j] = Some(
                r.into_iter()
                    .filter(|(i, _)| seen[j].binary_search(i).is_err())
                    .take(depth)
                    .collect(),
            );
        }
    }
    // the popular ranking once for the batch: deep enough that every user keeps `depth` items
    // after dropping the ones they have (the same result as ranking per user); a shipped
    // model's own (the fleet's) when it has one, else the store's
    let longest = (0..users.len())
        .filter(|&j| scored[j].is_none())
        .map(|j| seen[j].len())
        .max();
    let popular = longest
        .map(|n| {
            let deep = depth.saturating_add(n).saturating_add(hidden.len());
            live.and_then(|l| l.popular(deep, &[]))
                .unwrap_or_else(|| store.popular(deep, &[]))
        })
        .unwrap_or_default();
    Ok(users
        .iter()
        .zip(ids)
        .zip(&seen)
        .zip(scored)
        .map(|(((&user, user_id), h), s)| match s {
            Some(items) => Scored {
                user,
                user_id,
                items,
                source: Source::Model,
            },
            None => Scored {
                user,
                user_id,
                items: popular
                    .iter()
                    .filter(|(i, _)| {
                        h.binary_search(i).is_err() && hidden.binary_search(i).is_err()
                    })
                    .take(depth)
                    .copied()
                    .collect(),
                source: Source::Popular,
            },
        })
        .collect())
}

/// Store items with their scores, best first.
type Ranked = Vec<(u32, f32)>;

/// The live model's ranking (store items) of each user `j` of `histories` it can score (one of
/// whose items it knows): deep enough that `depth` remain once their excluded items are
/// dropped. A weighted model reads each item's weight.
fn rank_with_model(
    live: &LiveModel,
    histories: &[History],
    hidden: &[u32],
    depth: usize,
) -> Result<Vec<(usize, Ranked)>> {
    // the model's columns of each history, ascending (items it does not know are left out)
    let inputs: Vec<(Vec<u32>, Vec<f32>)> = histories
        .iter()
        .map(|h| {
            let mut c: Vec<(u32, f32)> = h
                .items
                .iter()
                .zip(&h.weights)
                .filter_map(|(&i, &w)| live.column(i).map(|c| (c, w)))
                .collect();
            c.sort_unstable_by_key(|p| p.0);
            c.dedup_by_key(|p| p.0);
            c.into_iter().unzip()
        })
        .collect();
    let idx: Vec<usize> = (0..histories.len())
        .filter(|&j| !inputs[j].0.is_empty())
        .collect();
    if idx.is_empty() {
        return Ok(Vec::new());
    }
    let rows: Vec<&[u32]> = idx.iter().map(|&j| inputs[j].0.as_slice()).collect();
    let weights: Option<Vec<&[f32]>> = (live.model.config().input == Input::Weighted)
        .then(|| idx.iter().map(|&j| inputs[j].1.as_slice()).collect());
    let mut hidden_columns: Vec<u32> = hidden.iter().filter_map(|&i| live.column(i)).collect();
    hidden_columns.sort_unstable();
    let most_excluded = idx.iter().map(|&j| histories[j].excluded.len()).max();
    let deep = depth.saturating_add(most_excluded.unwrap_or(0));
    let recs = live
        .model
        .recommend_weighted(&rows, weights.as_deref(), &hidden_columns, deep)?;
    Ok(idx
        .into_iter()
        .zip(recs)
        .map(|(j, r)| {
            let items = r
                .into_iter()
                .map(|(c, s)| (live.store_item(c), s))
                .collect();
            (j, items)
        })
        .collect())
}

/// The first `k` of ranked store items, by external id (items unknown to the store are skipped).
pub(crate) fn scored_items(store: &Store, items: &[(u32, f32)], k: usize) -> Vec<ScoredItem> {
    items
        .iter()
        .take(k)
        .filter_map(|&(i, score)| {
            store
                .item_id(i)
                .map(|item_id| ScoredItem { item_id, score })
        })
        .collect()
}

/// The published message of a scored user: its top `k` items by external id.
pub(crate) fn to_recommendation(
    store: &Store,
    s: &Scored,
    k: usize,
    model_version: Option<u64>,
) -> Recommendation {
    let items = scored_items(store, &s.items, k);
    Recommendation {
        user_id: s.user_id.clone(),
        fewer_than_k: items.len() < k,
        items,
        model_version: model_version.filter(|_| s.source == Source::Model),
        generated_at: now_ms(),
        source: s.source,
        canary: false,
        owner: None,
    }
}

/// Top-`k` recommendations for `users` (store indices); see [`score_users`].
pub(crate) fn recommend_users(
    store: &Store,
    live: Option<&LiveModel>,
    users: &[u32],
    k: usize,
) -> Result<Vec<Recommendation>> {
    let version = live.map(|l| l.version);
    Ok(score_users(store, live, users, k, &[])?
        .iter()
        .map(|s| to_recommendation(store, s, k, version))
        .collect())
}

/// Top-`k` for one user (store index) without the items of `hidden` (store indices,
/// ascending): never padded with them (fewer than `k` when nothing else qualifies). `None` for
/// a user the store does not hold.
pub(crate) fn recommend_hiding(
    store: &Store,
    live: Option<&LiveModel>,
    user: u32,
    k: usize,
    hidden: &[u32],
) -> Result<Option<Recommendation>> {
    let Some(scored) = score_users(store, live, &[user], k, hidden)?.pop() else {
        return Ok(None);
    };
    Ok(Some(to_recommendation(
        store,
        &scored,
        k,
        live.map(|l| l.version),
    )))
}

/// An offline question: a user the store knows, or an ad-hoc history of external item ids.
#[derive(Debug, Clone)]
pub enum OfflineQuery {
    User(String),
    Items(Vec<String>),
}

/// The answer to an [`OfflineQuery`], with the given items the model cannot use.
#[derive(Debug)]
pub struct OfflineAnswer {
    pub recommendation: Option<Recommendation>,
    pub ignored_items: Vec<String>,
}

/// Offline `recommend`: the same ranking as the scorer and the pull API, from a stopped daemon's
/// store and a loaded model. An ad-hoc history needs a model; an unknown user is an error.
pub fn recommend_offline(
    store: &Store,
    live: Option<&LiveModel>,
    query: &OfflineQuery,
    k: usize,
) -> Result<OfflineAnswer> {
    match query {
        OfflineQuery::User(user) => {
            let u = store
                .user_index(user)?
                .with_context(|| format!("unknown user {user:?}"))?;
            Ok(OfflineAnswer {
                recommendation: recommend_users(store, live, &[u], k)?.pop(),
                ignored_items: Vec::new(),
            })
        }
        OfflineQuery::Items(items) => {
            let live = live.context("no model version to score with")?;
            let mut history = Vec::new();
            let mut ignored_items = Vec::new();
            for i in items {
                match store.item_index(i)? {
                    Some(x) if live.column(x).is_some() => history.push(x),
                    _ => ignored_items.push(i.clone()),
                }
            }
            let scored = score_histories(
                store,
                Some(live),
                &[u32::MAX],
                vec![String::new()],
                vec![History::binary(history)],
                k,
                &[],
            )?;
            Ok(OfflineAnswer {
                recommendation: scored
                    .first()
                    .map(|s| to_recommendation(store, s, k, Some(live.version))),
                ignored_items,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_model_each_user_gets_the_popular_items_they_do_not_have() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 100).unwrap();
        let click = |u: &str, i: usize| crate::store::Click::new(u, format!("i{i}"));
        // item i is held by 40 - i fillers; "heavy" holds the 30 most popular, "light" one
        let mut clicks: Vec<_> = (0..40)
            .flat_map(|i| (0..40 - i).map(move |f| click(&format!("f{f}"), i)))
            .collect();
        clicks.extend((0..30).map(|i| click("heavy", i)));
        clicks.push(click("light", 3));
        store
            .apply(
                &clicks,
                &[crate::store::PartitionOffset {
                    topic: "clicks".into(),
                    partition: 0,
                    next_offset: 1,
                }],
            )
            .unwrap();
        let heavy = store.user_index("heavy").unwrap().unwrap();
        let light = store.user_index("light").unwrap().unwrap();
        let scored = score_users(&store, None, &[heavy, light], 5, &[]).unwrap();
        for (s, u) in scored.iter().zip([heavy, light]) {
            let mut h = store.history(u).unwrap();
            h.sort_unstable();
            assert_eq!(s.items, store.popular(5, &h), "user {u}");
            assert_eq!(s.items.len(), 5);
            assert!(s.items.iter().all(|(i, _)| !h.contains(i)));
            assert_eq!(s.source, Source::Popular);
        }
        assert_eq!(scored[0].user_id, "heavy");
        assert_eq!(store.item_id(scored[0].items[0].0).unwrap(), "i30");
        assert_eq!(store.item_id(scored[1].items[0].0).unwrap(), "i0");

        // excluded items are left out, never padded: "heavy" has 30 of the 40 items
        let ids = |r: &Recommendation| -> Vec<String> {
            r.items.iter().map(|i| i.item_id.clone()).collect()
        };
        let mut exclude: Vec<u32> = ["i30", "i32", "i39"]
            .iter()
            .map(|i| store.item_index(i).unwrap().unwrap())
            .collect();
        exclude.sort_unstable();
        let r = recommend_hiding(&store, None, heavy, 5, &exclude)
            .unwrap()
            .unwrap();
        assert_eq!(ids(&r), ["i31", "i33", "i34", "i35", "i36"]);
        assert!(!r.fewer_than_k);
        let r = recommend_hiding(&store, None, heavy, 20, &exclude)
            .unwrap()
            .unwrap();
        assert_eq!(ids(&r), ["i31", "i33", "i34", "i35", "i36", "i37", "i38"]);
        assert!(r.fewer_than_k);
        assert!(recommend_hiding(&store, None, 9999, 5, &exclude)
            .unwrap()
            .is_none());
    }
}
