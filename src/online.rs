//! `OnlineEval`: the live, prequential hit rate. The scorer records what each user was last
//! shown (top 100, by model version or "popular"); ingest checks every new click against it.
//! Bounded in users (the least recently recommended are forgotten).

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};

use crate::metrics::Metrics;

/// Rank cut-offs of the online hit rate.
pub const ONLINE_CUTOFFS: [usize; 2] = [10, 100];

/// Per user: the version label and the items shown; plus insertion order for the bound.
type Shown = (HashMap<u32, (String, Vec<u32>)>, VecDeque<u32>);

pub struct OnlineEval {
    inner: Mutex<Shown>,
    cap: usize,
}

impl OnlineEval {
    pub fn new(cap: usize) -> Self {
        Self {
            inner: Mutex::new((HashMap::new(), VecDeque::new())),
            cap: cap.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Shown> {
        self.inner
            .lock()
            .expect("online evaluation record poisoned by a panic")
    }

    /// Remembers what was published to `user` (`label`: the model version, or "popular").
    pub fn shown(&self, user: u32, label: String, items: Vec<u32>) {
        let mut g = self.lock();
        if g.0.insert(user, (label, items)).is_none() {
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
                let Some((label, items)) = g.0.get(u) else {
                    continue;
                };
                let rank = items.iter().position(|x| x == i);
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
        online.shown(1, "3".into(), (0..100).collect());
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
        online.shown(1, "1".into(), vec![5]);
        online.shown(2, "1".into(), vec![5]);
        online.clicked(&[(1, 5), (2, 5)], &m);
        assert_eq!(
            m.online_events_scored.with_label_values(&["10", "1"]).get(),
            1,
            "user 1 was forgotten"
        );
    }
}
