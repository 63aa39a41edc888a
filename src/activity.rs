//! `Activity`: the one record of who did what recently, written once per stored batch by ingest
//! (`batch_stored`) and read by scoring and training: who waits to be scored (with the receipt
//! time of their earliest unscored click), who was active since the last training round (trained
//! on first), how many interactions arrived since it, and when each user was last seen (for
//! re-scoring after a model swap). Every part is bounded.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

struct Inner {
    /// Users waiting to be scored, oldest first (each once).
    queue: VecDeque<u32>,
    /// The waiting users' earliest unscored click receipt.
    pending: HashMap<u32, Instant>,
    /// When each user was last marked (for re-scoring after a swap).
    last_seen: HashMap<u32, Instant>,
    /// Users active since the last training round started.
    since_round: HashSet<u32>,
}

pub struct Activity {
    inner: Mutex<Inner>,
    /// Interactions stored since the last training round started.
    new_interactions: AtomicU64,
    /// Users waiting to be scored (and users remembered as last seen), at most.
    max_waiting: usize,
    /// Users noted as active since the last round, at most (past it they may still be drawn in
    /// the round's random sample).
    max_since_round: usize,
    /// Wakes the scorer when users start waiting.
    waiting: tokio::sync::Notify,
}

/// What training takes at the start of a round.
pub struct RoundStart {
    /// Interactions stored since the previous round started.
    pub new_interactions: u64,
    /// Users active since then.
    pub active: HashSet<u32>,
}

impl Activity {
    pub fn new(max_waiting: usize, max_since_round: usize) -> Self {
        Self {
            inner: Mutex::new(Inner {
                queue: VecDeque::new(),
                pending: HashMap::new(),
                last_seen: HashMap::new(),
                since_round: HashSet::new(),
            }),
            new_interactions: AtomicU64::new(0),
            max_waiting: max_waiting.max(1),
            max_since_round,
            waiting: tokio::sync::Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // a panic while holding it left the record half-changed: a bug, not an empty record
        self.inner
            .lock()
            .expect("activity record poisoned by a panic")
    }

    /// A stored batch: `changed` users (their history changed), `new_interactions` new pairs,
    /// consumed at `received`. Returns how many waiting users were dropped (over the bound).
    pub fn batch_stored(&self, changed: &[u32], new_interactions: u64, received: Instant) -> u64 {
        self.new_interactions
            .fetch_add(new_interactions, Ordering::AcqRel);
        let mut g = self.lock();
        for &u in changed {
            if g.since_round.len() >= self.max_since_round {
                break;
            }
            g.since_round.insert(u);
        }
        self.mark(g, changed, received)
    }

    /// Queues users to be scored as of `received`, under the lock `g` (released before the
    /// scorer is woken); returns how many waiting users were dropped.
    fn mark(&self, mut g: MutexGuard<'_, Inner>, users: &[u32], received: Instant) -> u64 {
        let (mut dropped, mut queued) = (0, false);
        for &u in users {
            g.last_seen.insert(u, received);
            if g.pending.contains_key(&u) {
                continue;
            }
            g.pending.insert(u, received);
            g.queue.push_back(u);
            queued = true;
            while g.queue.len() > self.max_waiting {
                if let Some(old) = g.queue.pop_front() {
                    g.pending.remove(&old);
                    dropped += 1;
                }
            }
        }
        if g.last_seen.len() > self.max_waiting {
            // forget the least recently seen, down to 3/4 of the bound (amortised)
            let keep = (self.max_waiting * 3 / 4).max(1);
            let mut v: Vec<(Instant, u32)> = g.last_seen.iter().map(|(u, t)| (*t, *u)).collect();
            v.sort_unstable_by(|a, b| b.cmp(a));
            v.truncate(keep);
            g.last_seen = v.into_iter().map(|(t, u)| (u, t)).collect();
        }
        drop(g);
        if queued {
            // one scorer waits; a permit is kept if it is busy, so no wake-up is lost
            self.waiting.notify_one();
        }
        dropped
    }

    /// Resolves once users are waiting (at once if some were queued since the last call).
    pub async fn wait(&self) {
        if self.waiting_count() == 0 {
            self.waiting.notified().await;
        }
    }

    /// Takes up to `n` waiting users, oldest first, with their earliest unscored click receipt.
    pub fn take_waiting(&self, n: usize) -> Vec<(u32, Instant)> {
        let mut g = self.lock();
        let n = n.min(g.queue.len());
        let users: Vec<u32> = g.queue.drain(..n).collect();
        users
            .into_iter()
            .filter_map(|u| g.pending.remove(&u).map(|t| (u, t)))
            .collect()
    }

    /// Queues every user seen within `window` again (after a model swap); returns how many.
    pub fn requeue_seen_within(&self, window: Duration) -> usize {
        let now = Instant::now();
        let mut g = self.lock();
        g.last_seen.retain(|_, t| now.duration_since(*t) <= window);
        let recent: Vec<u32> = g.last_seen.keys().copied().collect();
        self.mark(g, &recent, now);
        recent.len()
    }

    /// Users waiting to be scored.
    pub fn waiting_count(&self) -> usize {
        self.lock().queue.len()
    }

    /// Interactions stored since the last round started.
    pub fn new_interactions(&self) -> u64 {
        self.new_interactions.load(Ordering::Acquire)
    }

    /// Starts a training round: takes (and resets) the new-interaction count and the users
    /// active since the last round.
    pub fn start_round(&self) -> RoundStart {
        let new_interactions = self.new_interactions.swap(0, Ordering::AcqRel);
        let active = std::mem::take(&mut self.lock().since_round);
        RoundStart {
            new_interactions,
            active,
        }
    }

    /// A round's interactions were not learnt (it was abandoned, or will be retried): counts
    /// them again so the next round is due.
    pub fn round_not_learnt(&self, new_interactions: u64) {
        self.new_interactions
            .fetch_add(new_interactions, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_waiting_queue_is_bounded_and_deduplicated() {
        let d = Activity::new(3, 10);
        let t = Instant::now();
        assert_eq!(d.batch_stored(&[1, 2, 1, 3], 4, t), 0);
        assert_eq!(d.waiting_count(), 3);
        let later = t + Duration::from_millis(1);
        assert_eq!(d.batch_stored(&[4], 1, later), 1); // 1 dropped
        let got: Vec<(u32, Instant)> = d.take_waiting(10);
        assert_eq!(got, vec![(2, t), (3, t), (4, later)]);
        assert_eq!(d.waiting_count(), 0);
        // the last-seen record is bounded too: the least recent were forgotten
        assert_eq!(d.requeue_seen_within(Duration::from_secs(60)), 2);
        let again: Vec<u32> = d.take_waiting(10).into_iter().map(|(u, _)| u).collect();
        assert!(again.contains(&4), "{again:?}");
        assert_eq!(d.requeue_seen_within(Duration::ZERO), 0);
    }

    #[test]
    fn a_waiting_user_keeps_the_receipt_of_their_earliest_unscored_click() {
        let a = Activity::new(10, 10);
        let first = Instant::now();
        a.batch_stored(&[7], 1, first);
        a.batch_stored(&[7], 1, first + Duration::from_secs(1));
        assert_eq!(a.take_waiting(10), vec![(7, first)]);
    }

    #[test]
    fn a_round_takes_the_new_interactions_and_the_active_users() {
        let a = Activity::new(10, 2);
        a.batch_stored(&[1, 2, 3], 5, Instant::now());
        assert_eq!(a.new_interactions(), 5);
        let r = a.start_round();
        assert_eq!(r.new_interactions, 5);
        assert_eq!(r.active.len(), 2, "bounded by max_since_round");
        assert_eq!(a.new_interactions(), 0);
        assert!(a.start_round().active.is_empty());
        a.round_not_learnt(5);
        assert_eq!(a.new_interactions(), 5);
    }

    #[tokio::test]
    async fn a_stored_batch_wakes_the_scorer() {
        let a = std::sync::Arc::new(Activity::new(10, 10));
        let waiter = {
            let a = a.clone();
            tokio::spawn(async move { a.wait().await })
        };
        tokio::task::yield_now().await;
        a.batch_stored(&[1], 1, Instant::now());
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .unwrap();
    }
}
