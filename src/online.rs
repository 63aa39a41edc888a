//! `OnlineEval`: the live, prequential hit rate. The scorer records what each user was last
//! shown (top 100, by model version or "popular"); ingest checks every new click against it.
//! Bounded in users (the least recently recommended are forgotten). While a canary runs, what
//! a user was shown also says which side of it they were on, and every click counts in the
//! canary's evidence ([`Tally`]).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::metrics::Metrics;
use crate::promotion::{Side, Tally};

/// Rank cut-offs of the online hit rate.
pub const ONLINE_CUTOFFS: [usize; 2] = [10, 100];

/// What one user was last shown: the version label, the items, and the canary side if a canary
/// ran (its version).
type Last = (String, Vec<u32>, Option<(u64, Side)>);

/// Per user: what they were last shown; plus insertion order for the bound.
type Shown = (HashMap<u32, Last>, VecDeque<u32>);

pub struct OnlineEval {
    inner: Mutex<Shown>,
    cap: usize,
    tally: Arc<Tally>,
}

impl OnlineEval {
    pub fn new(cap: usize) -> Self {
        Self {
            inner: Mutex::new((HashMap::new(), VecDeque::new())),
            cap: cap.max(1),
            tally: Arc::default(),
        }
    }

    /// The canary evidence counted here.
    pub fn tally(&self) -> Arc<Tally> {
        self.tally.clone()
    }

    fn lock(&self) -> MutexGuard<'_, Shown> {
        self.inner
            .lock()
            .expect("online evaluation record poisoned by a panic")
    }

    /// Remembers what was published to `user` (`label`: the model version, or "popular"; `side`:
    /// which side of a running canary, by its version, the model that ranked it was).
    pub fn shown(&self, user: u32, label: String, items: Vec<u32>, side: Option<(u64, Side)>) {
        let mut g = self.lock();
        if g.0.insert(user, (label, items, side)).is_none() {
            g.1.push_back(user);
        }
        while g.0.len() > self.cap {
            match g.1.pop_front() {
                Some(old) => {
                    g.0.remove(&old);
                }
                None => break,
            }
        }
    }

    /// Drops what was shown to a forgotten user.
    pub fn forget(&self, user: u32) {
        let mut g = self.lock();
        if g.0.remove(&user).is_some() {
            g.1.retain(|&u| u != user);
        }
    }

    /// Counts, for each new (user, item) click, whether the item was in the top k of the user's
    /// last published recommendation.
    pub fn clicked(&self, clicks: &[(u32, u32)], metrics: &Metrics) {
        // counted per (label, cut-off) first: one metric update per label and batch
        let mut counts: HashMap<String, [(u64, u64); ONLINE_CUTOFFS.len()]> = HashMap::new();
        {
            let g = self.lock();
            for (u, i) in clicks {
                let Some((label, items, side)) = g.0.get(u) else {
                    continue;
                };
                let rank = items.iter().position(|x| x == i);
                if let Some((version, side)) = side {
                    let hit = rank.is_some_and(|r| r < ONLINE_CUTOFFS[0]);
                    self.tally.record(*version, *side, hit);
                }
                let c = counts.entry(label.clone()).or_default();
                for (slot, k) in c.iter_mut().zip(ONLINE_CUTOFFS) {
                    slot.1 += 1;
                    if rank.is_some_and(|r| r < k) {
                        slot.0 += 1;
                    }
                }
            }
        }
        for (label, c) in counts {
            for ((hits, scored), k) in c.into_iter().zip(ONLINE_CUTOFFS) {
                let k = k.to_string();
                metrics
                    .online_events_scored
                    .with_label_values(&[&k, &label])
                    .inc_by(scored);
                metrics
                    .online_hits
                    .with_label_values(&[&k, &label])
                    .inc_by(hits);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn online_hits_count_clicks_on_recommended_items_by_cutoff() {
        let m = Metrics::new().unwrap();
        let online = OnlineEval::new(10);
        online.shown(1, "3".into(), (0..100).collect(), None);
        online.clicked(&[(1, 5), (1, 50), (1, 500), (9, 5)], &m);
        let get = |c: &prometheus::IntCounterVec, k: &str| c.with_label_values(&[k, "3"]).get();
        assert_eq!(get(&m.online_events_scored, "10"), 3);
        assert_eq!(get(&m.online_hits, "10"), 1);
        assert_eq!(get(&m.online_events_scored, "100"), 3);
        assert_eq!(get(&m.online_hits, "100"), 2);
    }

    #[test]
    fn the_record_is_bounded_in_users() {
        let m = Metrics::new().unwrap();
        let online = OnlineEval::new(1);
        online.shown(1, "1".into(), vec![5], None);
        online.shown(2, "1".into(), vec![5], None);
        online.clicked(&[(1, 5), (2, 5)], &m);
        assert_eq!(
            m.online_events_scored.with_label_values(&["10", "1"]).get(),
            1,
            "user 1 was forgotten"
        );
    }

    #[test]
    fn clicks_of_users_on_either_side_of_a_canary_count_in_its_evidence() {
        let m = Metrics::new().unwrap();
        let online = OnlineEval::new(10);
        online.shown(1, "8".into(), (0..20).collect(), Some((8, Side::Canary)));
        online.shown(2, "7".into(), (0..20).collect(), Some((8, Side::Live)));
        online.shown(3, "7".into(), (0..20).collect(), None);
        // user 1's click at rank 15 is a miss at 10; user 3 ran outside any canary
        online.clicked(&[(1, 15), (1, 3), (2, 4), (3, 1)], &m);
        let e = online.tally().get(8);
        assert_eq!((e.canary.trials, e.canary.hits), (2, 1));
        assert_eq!((e.live.trials, e.live.hits), (1, 1));
    }
}
