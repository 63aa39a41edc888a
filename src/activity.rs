//! `Activity`: the one record of who did what recently, written once per stored batch by ingest
//! (`batch_stored`) and read by scoring and training: who waits to be scored (with the receipt
//! time of their earliest unscored click), who was active since the last training round (trained
//! on first), how many interactions arrived since it, and when each user was last seen (for
//! re-scoring after a model swap), and whose recommendation must be withdrawn (forgotten users,
//! each a tombstone for the scorer to publish). Every part but the last is bounded (forgotten
//! users wait there until their tombstone is delivered: none may be dropped).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

struct Inner {
    /// Users waiting because of a click (or a failed delivery of one), oldest first, each once.
    queue: VecDeque<u32>,
    /// Those users' earliest unscored click receipt.
    pending: HashMap<u32, Instant>,
    /// Users to re-score after a model swap, with the swap's time, oldest first; an entry is
    /// live only while its user is in `rescore_set` (a click in between takes the user over).
    rescore: VecDeque<(u32, Instant)>,
    rescore_set: HashSet<u32>,
    /// When each user last clicked (re-scoring after a swap reads it, never refreshes it).
    last_seen: HashMap<u32, Instant>,
    /// Users active since the last training round started.
    since_round: HashSet<u32>,
    /// Forgotten users whose recommendation the scorer withdraws, oldest first.
    withdrawn: VecDeque<String>,
}

pub struct Activity {
    inner: Mutex<Inner>,
    /// Interactions stored since the last training round started.
    new_interactions: AtomicU64,
    /// Users waiting to be scored for a click, users waiting to be re-scored, and users
    /// remembered as last seen: each at most this many.
    max_waiting: usize,
    /// Users noted as active since the last round, at most (past it they may still be drawn in
    /// the round's random sample).
    max_since_round: usize,
    /// Wakes the scorer when users start waiting.
    waiting: tokio::sync::Notify,
}

/// Why a user waits to be scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// A click (or a failed delivery of the answer to one), received at `since`.
    Click,
    /// A model swap at `since`: the user clicked within the re-score window before it.
    Rescore,
}

/// A user taken from the record to be scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Waiting {
    pub user: u32,
    pub why: Why,
    /// The click's receipt (for `Click`) or the swap's time (for `Rescore`): latency counts
    /// from here.
    pub since: Instant,
}

/// What training takes at the start of a round.
pub struct RoundStart {
    /// Interactions stored since the previous round started.
    pub new_interactions: u64,
    /// Users active since then.
    pub active: HashSet<u32>,
}

/// Users dropped because a queue was full.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Dropped {
    pub clicks: u64,
    pub rescores: u64,
}

impl Activity {
    pub fn new(max_waiting: usize, max_since_round: usize) -> Self {
        Self {
            inner: Mutex::new(Inner {
                queue: VecDeque::new(),
                pending: HashMap::new(),
                rescore: VecDeque::new(),
                rescore_set: HashSet::new(),
                last_seen: HashMap::new(),
                since_round: HashSet::new(),
                withdrawn: VecDeque::new(),
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
        self.learnable(changed, new_interactions);
        let mut g = self.lock();
        for &u in changed {
            g.last_seen.insert(u, received);
        }
        self.forget_least_recently_seen(&mut g);
        let users: Vec<(u32, Instant)> = changed.iter().map(|&u| (u, received)).collect();
        self.queue_clicks(g, &users)
    }

    /// Users a serving replica restored with a partition, each with when they were last
    /// active (their changelog record's time): the re-scoring after the next model swap takes
    /// them as if they had clicked here (an earlier time never replaces a later one). Nobody is
    /// scored now.
    pub fn seen_at(&self, users: &[(u32, Instant)]) {
        let mut g = self.lock();
        for &(u, at) in users {
            let t = g.last_seen.entry(u).or_insert(at);
            *t = (*t).max(at);
        }
        self.forget_least_recently_seen(&mut g);
    }

    /// Histories a fleet trainer read from the changelog: `changed` users, `new_interactions`
    /// new pairs — what makes a round due and who is trained on first (nobody is scored).
    pub fn learnable(&self, changed: &[u32], new_interactions: u64) {
        self.new_interactions
            .fetch_add(new_interactions, Ordering::AcqRel);
        let mut g = self.lock();
        for &u in changed {
            if g.since_round.len() >= self.max_since_round {
                break;
            }
            g.since_round.insert(u);
        }
    }

    /// Users a stored batch forgot: nothing is kept of them here, and each waits for the
    /// scorer to withdraw their recommendation (a later click of the same batch queues them
    /// again after this, through [`Activity::batch_stored`]).
    pub fn forgotten(&self, users: &[crate::store::Forgotten]) {
        let gone: HashSet<u32> = users.iter().filter_map(|f| f.index).collect();
        let mut g = self.lock();
        g.queue.retain(|u| !gone.contains(u));
        g.pending.retain(|u, _| !gone.contains(u));
        g.rescore_set.retain(|u| !gone.contains(u));
        g.rescore.retain(|(u, _)| !gone.contains(u));
        g.last_seen.retain(|u, _| !gone.contains(u));
        g.since_round.retain(|u| !gone.contains(u));
        g.withdrawn.extend(users.iter().map(|f| f.user.clone()));
        drop(g);
        self.waiting.notify_one();
    }

    /// Takes the users whose recommendation is to be withdrawn.
    pub fn take_withdrawn(&self) -> Vec<String> {
        self.lock().withdrawn.drain(..).collect()
    }

    /// Withdrawals whose delivery failed: they wait again, first.
    pub fn withdraw_failed(&self, users: Vec<String>) {
        let mut g = self.lock();
        for u in users.into_iter().rev() {
            g.withdrawn.push_front(u);
        }
        drop(g);
        self.waiting.notify_one();
    }

    /// Deliveries that failed: their users wait again, with their click's receipt time
    /// (re-scorings wait again as re-scorings). Returns how many waiting users were dropped.
    pub fn delivery_failed(&self, failed: &[Waiting]) -> Dropped {
        let mut g = self.lock();
        let mut dropped = Dropped::default();
        let rescores: Vec<(u32, Instant)> = failed
            .iter()
            .filter(|w| w.why == Why::Rescore)
            .map(|w| (w.user, w.since))
            .collect();
        dropped.rescores = self.queue_rescores(&mut g, &rescores);
        let clicks: Vec<(u32, Instant)> = failed
            .iter()
            .filter(|w| w.why == Why::Click)
            .map(|w| (w.user, w.since))
            .collect();
        dropped.clicks = self.queue_clicks(g, &clicks);
        dropped
    }

    /// Queues users waiting for a click, under the lock `g` (released before the scorer is
    /// woken); returns how many were dropped over the bound (the oldest).
    fn queue_clicks(&self, mut g: MutexGuard<'_, Inner>, users: &[(u32, Instant)]) -> u64 {
        let (mut dropped, mut queued) = (0, false);
        for &(u, since) in users {
            // a click takes over a pending re-scoring: the user is scored once, for the click
            g.rescore_set.remove(&u);
            if let Some(t) = g.pending.get_mut(&u) {
                *t = (*t).min(since);
                continue;
            }
            g.pending.insert(u, since);
            g.queue.push_back(u);
            queued = true;
            while g.queue.len() > self.max_waiting {
                if let Some(old) = g.queue.pop_front() {
                    g.pending.remove(&old);
                    dropped += 1;
                }
            }
        }
        drop(g);
        if queued {
            // one scorer waits; a permit is kept if it is busy, so no wake-up is lost
            self.waiting.notify_one();
        }
        dropped
    }

    /// Queues re-scorings (users neither waiting for a click nor already queued); past the
    /// bound the newest are not queued. Returns how many were not.
    fn queue_rescores(&self, g: &mut Inner, users: &[(u32, Instant)]) -> u64 {
        let mut dropped = 0;
        for &(u, since) in users {
            if g.pending.contains_key(&u) || g.rescore_set.contains(&u) {
                continue;
            }
            if g.rescore_set.len() >= self.max_waiting {
                dropped += 1;
                continue;
            }
            g.rescore_set.insert(u);
            g.rescore.push_back((u, since));
        }
        // entries a click took over are skipped when taken; keep the queue from growing
        // with them
        if g.rescore.len() > 2 * self.max_waiting {
            let live = std::mem::take(&mut g.rescore_set);
            g.rescore.retain(|(u, _)| live.contains(u));
            g.rescore_set = live;
        }
        dropped
    }

    /// Forgets the least recently seen users, down to 3/4 of the bound (amortised).
    fn forget_least_recently_seen(&self, g: &mut Inner) {
        if g.last_seen.len() <= self.max_waiting {
            return;
        }
        let keep = (self.max_waiting * 3 / 4).max(1);
        let mut v: Vec<(Instant, u32)> = g.last_seen.iter().map(|(u, t)| (*t, *u)).collect();
        v.sort_unstable_by(|a, b| b.cmp(a));
        v.truncate(keep);
        g.last_seen = v.into_iter().map(|(t, u)| (u, t)).collect();
    }

    /// Resolves once users are waiting (at once if some were queued since the last call).
    pub async fn wait(&self) {
        if self.waiting_count() == 0 {
            self.waiting.notified().await;
        }
    }

    /// Resolves once a click waits (re-scorings alone do not wake it).
    pub async fn wait_for_click(&self) {
        while self.lock().queue.is_empty() {
            self.waiting.notified().await;
        }
    }

    /// Whether a user waits because of a click.
    pub fn clicks_waiting(&self) -> bool {
        !self.lock().queue.is_empty()
    }

    /// Takes up to `n` waiting users: every waiting click first (oldest first), then up to
    /// `max_rescores` re-scorings with what capacity is left, so re-scoring never delays a
    /// click.
    pub fn take_waiting(&self, n: usize, max_rescores: usize) -> Vec<Waiting> {
        let mut g = self.lock();
        let k = n.min(g.queue.len());
        let users: Vec<u32> = g.queue.drain(..k).collect();
        let mut taken: Vec<Waiting> = users
            .into_iter()
            .filter_map(|u| {
                g.pending.remove(&u).map(|since| Waiting {
                    user: u,
                    why: Why::Click,
                    since,
                })
            })
            .collect();
        let n = n.min(taken.len().saturating_add(max_rescores));
        while taken.len() < n {
            let Some((u, since)) = g.rescore.pop_front() else {
                break;
            };
            if g.rescore_set.remove(&u) {
                taken.push(Waiting {
                    user: u,
                    why: Why::Rescore,
                    since,
                });
            }
        }
        taken
    }

    /// After a model swap at `now`: queues a re-scoring for every user whose last click is
    /// within `window` (their last-click time is left as it is, so each is re-scored for
    /// `window` after their click at most). Returns how many were queued and how many dropped.
    pub fn requeue_seen_within(&self, window: Duration) -> (usize, u64) {
        let now = Instant::now();
        let mut g = self.lock();
        g.last_seen.retain(|_, t| now.duration_since(*t) <= window);
        let recent: Vec<(u32, Instant)> = g.last_seen.keys().map(|&u| (u, now)).collect();
        let dropped = self.queue_rescores(&mut g, &recent);
        let queued = !g.rescore_set.is_empty();
        drop(g);
        if queued {
            self.waiting.notify_one();
        }
        (recent.len(), dropped)
    }

    /// Users waiting to be scored (for a click or a re-scoring) or to have their
    /// recommendation withdrawn.
    pub fn waiting_count(&self) -> usize {
        let g = self.lock();
        g.queue.len() + g.rescore_set.len() + g.withdrawn.len()
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

    fn users(w: &[Waiting]) -> Vec<u32> {
        w.iter().map(|w| w.user).collect()
    }

    #[test]
    fn a_forgotten_user_stops_waiting_and_waits_to_be_withdrawn() {
        let d = Activity::new(10, 10);
        let t = Instant::now();
        d.batch_stored(&[1, 2, 3], 3, t);
        d.requeue_seen_within(Duration::from_secs(60));
        let gone = |u: &str, index| crate::store::Forgotten {
            user: u.into(),
            index,
        };
        d.forgotten(&[gone("two", Some(2)), gone("never-seen", None)]);
        assert_eq!(d.take_withdrawn(), vec!["two", "never-seen"]);
        assert!(d.take_withdrawn().is_empty());
        d.withdraw_failed(vec!["two".into()]);
        assert_eq!(d.waiting_count(), 3, "1, 3 and a withdrawal");
        assert_eq!(users(&d.take_waiting(10, usize::MAX)), vec![1, 3]);
        assert!(!d.start_round().active.contains(&2));
        // a swap re-scores the users seen lately: not the forgotten one
        d.requeue_seen_within(Duration::from_secs(60));
        let mut rescored = users(&d.take_waiting(10, usize::MAX));
        rescored.sort_unstable(); // (queued in no particular order)
        assert_eq!(rescored, vec![1, 3]);
        assert_eq!(d.take_withdrawn(), vec!["two"]);
    }

    #[test]
    fn the_waiting_queue_is_bounded_and_deduplicated() {
        let d = Activity::new(3, 10);
        let t = Instant::now() - Duration::from_secs(10);
        assert_eq!(d.batch_stored(&[1, 2, 1, 3], 4, t), 0);
        assert_eq!(d.waiting_count(), 3);
        let later = t + Duration::from_millis(1);
        assert_eq!(d.batch_stored(&[4], 1, later), 1); // 1 dropped
        let got = d.take_waiting(10, usize::MAX);
        assert_eq!(users(&got), vec![2, 3, 4]);
        assert!(got.iter().all(|w| w.why == Why::Click));
        assert_eq!((got[0].since, got[2].since), (t, later));
        assert_eq!(d.waiting_count(), 0);
        // the last-seen record is bounded too: the least recent were forgotten
        assert_eq!(d.requeue_seen_within(Duration::from_secs(60)), (2, 0));
        let again = users(&d.take_waiting(10, usize::MAX));
        assert!(again.contains(&4), "{again:?}");
        assert_eq!(d.requeue_seen_within(Duration::ZERO), (0, 0));
    }

    #[test]
    fn a_waiting_user_keeps_the_receipt_of_their_earliest_unscored_click() {
        let a = Activity::new(10, 10);
        let first = Instant::now();
        a.batch_stored(&[7], 1, first);
        a.batch_stored(&[7], 1, first + Duration::from_secs(1));
        let got = a.take_waiting(10, usize::MAX);
        assert_eq!((users(&got), got[0].since), (vec![7], first));
    }

    #[test]
    fn re_scoring_after_swaps_ends_one_window_after_the_last_click() {
        let a = Activity::new(10, 10);
        let window = Duration::from_millis(300);
        a.batch_stored(&[1], 1, Instant::now());
        a.take_waiting(10, usize::MAX);
        // a swap within the window re-scores the user, and does not restart the window
        assert_eq!(a.requeue_seen_within(window).0, 1);
        let got = a.take_waiting(10, usize::MAX);
        assert_eq!((users(&got), got[0].why), (vec![1], Why::Rescore));
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(a.requeue_seen_within(window).0, 1);
        a.take_waiting(10, usize::MAX);
        std::thread::sleep(Duration::from_millis(150));
        assert_eq!(a.requeue_seen_within(window).0, 0, "350 ms after the click");
        assert!(a.take_waiting(10, usize::MAX).is_empty());
    }

    #[test]
    fn users_restored_as_recently_active_are_re_scored_after_a_swap_and_older_ones_not() {
        let a = Activity::new(10, 10);
        let now = Instant::now();
        let window = Duration::from_secs(60);
        a.seen_at(&[
            (1, now - Duration::from_secs(5)),
            (2, now - Duration::from_secs(3600)),
        ]);
        assert!(
            a.take_waiting(10, usize::MAX).is_empty(),
            "nobody is scored at a restore"
        );
        assert_eq!(a.requeue_seen_within(window).0, 1);
        let got = a.take_waiting(10, usize::MAX);
        assert_eq!((users(&got), got[0].why), (vec![1], Why::Rescore));
        // a later click here is never replaced by an older restored time
        a.batch_stored(&[3], 1, now);
        a.seen_at(&[(3, now - Duration::from_secs(3600))]);
        a.take_waiting(10, usize::MAX);
        assert_eq!(a.requeue_seen_within(window).0, 2);
    }

    #[test]
    fn re_scorings_never_displace_a_waiting_click() {
        let a = Activity::new(2, 10);
        a.batch_stored(&[1, 2], 2, Instant::now());
        a.take_waiting(10, usize::MAX);
        a.requeue_seen_within(Duration::from_secs(60));
        // the re-scoring queue is full; a click still queues, and is taken first
        assert_eq!(a.batch_stored(&[3], 1, Instant::now()), 0);
        let got = a.take_waiting(1, usize::MAX);
        assert_eq!((users(&got), got[0].why), (vec![3], Why::Click));
        // a click takes over its user's pending re-scoring: scored once
        a.batch_stored(&[1], 1, Instant::now());
        let got = a.take_waiting(10, usize::MAX);
        assert_eq!(users(&got), vec![1, 2]);
        assert_eq!(
            got.iter().map(|w| w.why).collect::<Vec<_>>(),
            vec![Why::Click, Why::Rescore]
        );
    }

    #[test]
    fn re_scorings_are_taken_up_to_their_allowance_and_clicks_regardless() {
        let a = Activity::new(10, 10);
        a.batch_stored(&[1, 2, 3], 3, Instant::now());
        a.take_waiting(10, 0);
        a.requeue_seen_within(Duration::from_secs(60));
        a.batch_stored(&[4, 5], 2, Instant::now());
        assert!(a.clicks_waiting());
        // the clicks, then one re-scoring (which one: the swap queues them in no set order)
        let got = a.take_waiting(10, 1);
        assert_eq!(users(&got[..2]), vec![4, 5]);
        assert_eq!((got.len(), got[2].why), (3, Why::Rescore));
        assert!(!a.clicks_waiting());
        assert!(a.take_waiting(10, 0).is_empty());
        let mut rest = users(&a.take_waiting(10, 5));
        rest.push(got[2].user);
        rest.sort_unstable();
        assert_eq!(rest, vec![1, 2, 3]);
    }

    #[test]
    fn a_failed_delivery_queues_its_user_again_with_the_click_time() {
        let a = Activity::new(10, 10);
        let t = Instant::now();
        a.batch_stored(&[5], 1, t);
        let taken = a.take_waiting(10, usize::MAX);
        assert_eq!(a.delivery_failed(&taken), Dropped::default());
        let again = a.take_waiting(10, usize::MAX);
        assert_eq!(again, taken);
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
