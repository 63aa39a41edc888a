//! The changelog's group commit: batches a serving replica has stored and not yet written to the
//! changelog, merged so that one transaction carries every batch stored since the previous one
//! began, at most one transaction per commit interval (as Kafka Streams commits under
//! exactly-once). A click waits for its store write, never for a transaction.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::ingest::Group;
use crate::store::{HistoryIds, PartitionOffset};

/// Stored batches waiting for their changelog transaction, merged in storing order.
#[derive(Default)]
pub(super) struct Pending {
    /// Each user's record as the newest merged batch stored it (`None`: deleted).
    stored: HashMap<String, Option<HistoryIds>>,
    /// Users whose record is read from the store when written: re-consumed events and
    /// forgotten users, whose newest state only the store knows.
    reread: HashSet<String>,
    /// The clicks offsets reached, per topic and partition.
    offsets: BTreeMap<(String, i32), i64>,
    /// The consumer group's metadata of the newest batch (the member's current generation).
    group: Option<Group>,
    batches: usize,
    oldest: Option<Instant>,
}

/// One merged transaction's content, taken out of [`Pending`].
pub(super) struct Batch {
    pub stored: HashMap<String, Option<HistoryIds>>,
    pub reread: HashSet<String>,
    pub offsets: Vec<PartitionOffset>,
    pub group: Group,
    /// How many stored batches it merges.
    pub batches: usize,
    /// When its oldest batch was stored.
    pub since: Instant,
}

impl Pending {
    pub fn len(&self) -> usize {
        self.batches
    }

    pub fn is_empty(&self) -> bool {
        self.batches == 0
    }

    /// Adds a stored batch: users written with their records as stored, then users to read back
    /// (a user in both reads back: the store holds their newest state).
    pub fn add(
        &mut self,
        written: impl IntoIterator<Item = (String, Option<HistoryIds>)>,
        reread: impl IntoIterator<Item = String>,
        offsets: &[PartitionOffset],
        group: Group,
    ) {
        for (user, history) in written {
            self.reread.remove(&user);
            self.stored.insert(user, history);
        }
        for user in reread {
            self.stored.remove(&user);
            self.reread.insert(user);
        }
        for o in offsets {
            let at = self
                .offsets
                .entry((o.topic.clone(), o.partition))
                .or_insert(o.next_offset);
            *at = (*at).max(o.next_offset);
        }
        self.group = Some(group);
        self.batches += 1;
        self.oldest.get_or_insert_with(Instant::now);
    }

    /// Everything pending as one transaction's content, leaving nothing pending.
    pub fn take(&mut self) -> Option<Batch> {
        let taken = std::mem::take(self);
        Some(Batch {
            group: taken.group?,
            stored: taken.stored,
            reread: taken.reread,
            offsets: taken
                .offsets
                .into_iter()
                .map(|((topic, partition), next_offset)| PartitionOffset {
                    topic,
                    partition,
                    next_offset,
                })
                .collect(),
            batches: taken.batches,
            since: taken.oldest.unwrap_or_else(Instant::now),
        })
    }
}

/// How the writer paces its transactions.
#[derive(Debug, Clone, Copy)]
pub(super) struct Pace {
    /// The shortest time between the starts of two transactions: each costs the broker a
    /// transaction log write and a marker in every partition it touched, whatever it carries.
    pub interval: Duration,
    /// Stored batches that may wait: the store waits beyond it, and the writer does not wait
    /// for the interval once half of it waits.
    pub max_waiting: usize,
}

/// The stored batches a replica's changelog writer takes, one merged transaction at a time.
pub(super) struct Queue {
    pace: Pace,
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Default)]
struct State {
    pending: Pending,
    /// A transaction is being written.
    writing: bool,
    /// When the last transaction was taken.
    last_taken: Option<Instant>,
    /// Callers waiting for everything pending to be written: the writer does not wait for the
    /// interval meanwhile.
    draining: usize,
    /// Why the writer stopped: every later batch is refused with it.
    failed: Option<String>,
    closed: bool,
}

impl Queue {
    pub fn new(pace: Pace) -> Self {
        Self {
            pace: Pace {
                max_waiting: pace.max_waiting.max(1),
                ..pace
            },
            state: Mutex::default(),
            changed: Condvar::new(),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait_while(&self, busy: impl Fn(&State) -> bool) -> Result<MutexGuard<'_, State>, String> {
        self.wait_while_until(busy, None)
    }

    /// [`Queue::wait_while`], giving up at `until` (an error saying so).
    fn wait_while_until(
        &self,
        busy: impl Fn(&State) -> bool,
        until: Option<Instant>,
    ) -> Result<MutexGuard<'_, State>, String> {
        let mut s = self.state();
        while s.failed.is_none() && !s.closed && busy(&s) {
            s = match until {
                None => self.changed.wait(s).unwrap_or_else(|e| e.into_inner()),
                Some(until) => {
                    let left = until.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(
                            "the changelog transaction in flight did not end in time".into()
                        );
                    }
                    let waited = self.changed.wait_timeout(s, left);
                    waited.unwrap_or_else(|e| e.into_inner()).0
                }
            };
        }
        match &s.failed {
            Some(why) => Err(why.clone()),
            None => Ok(s),
        }
    }

    /// Adds a stored batch once fewer than [`Pace::max_waiting`] wait (the store never runs more
    /// than that ahead of the changelog); the writer's failure if it failed.
    pub fn push(&self, add: impl FnOnce(&mut Pending)) -> Result<(), String> {
        let max_waiting = self.pace.max_waiting;
        let mut s = self.wait_while(|s| s.pending.len() >= max_waiting)?;
        add(&mut s.pending);
        self.changed.notify_all();
        Ok(())
    }

    /// Waits until every pushed batch is written (or the writer failed: its reason), giving up
    /// at `until` when there is one.
    pub fn wait_idle(&self, until: Option<Instant>) -> Result<(), String> {
        self.state().draining += 1;
        self.changed.notify_all();
        let idle = (self.wait_while_until(|s| s.writing || !s.pending.is_empty(), until)).map(drop);
        self.state().draining -= 1;
        idle
    }

    /// The writer's next transaction: everything pending, once something is and the interval
    /// since the last one has passed (at once while the store waits for room or someone waits
    /// for the queue to drain); `None` once the queue is closed or the writer failed.
    pub fn next(&self) -> Option<Batch> {
        let mut s = self.wait_while(|s| s.pending.is_empty()).ok()?;
        loop {
            if s.closed || s.failed.is_some() {
                return None;
            }
            let due = s.last_taken.map(|at| at + self.pace.interval);
            let wait = due.map_or(Duration::ZERO, |due| {
                due.saturating_duration_since(Instant::now())
            });
            let hurry = s.draining > 0 || 2 * s.pending.len() >= self.pace.max_waiting;
            if wait.is_zero() || hurry {
                break;
            }
            s = self
                .changed
                .wait_timeout(s, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        let batch = s.pending.take()?;
        s.writing = true;
        s.last_taken = Some(Instant::now());
        Some(batch)
    }

    /// The writer finished a transaction, or failed (its reason).
    pub fn finished(&self, failure: Option<String>) {
        let mut s = self.state();
        s.writing = false;
        if failure.is_some() {
            s.failed = failure;
        }
        self.changed.notify_all();
    }

    pub fn close(&self) {
        self.state().closed = true;
        self.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::ClientConfig;
    use std::sync::Arc;

    fn group() -> Group {
        // a consumer's metadata needs no broker: it is the group id until the member joins
        let consumer: BaseConsumer = ClientConfig::new()
            .set("group.id", "pending-test")
            .set("bootstrap.servers", "127.0.0.1:1")
            .create()
            .expect("a consumer");
        Group {
            metadata: consumer.group_metadata().expect("metadata"),
            now: Arc::new(|| None),
        }
    }

    fn history(items: &[&str]) -> Option<HistoryIds> {
        Some(HistoryIds {
            items: items.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
    }

    fn offset(partition: i32, next_offset: i64) -> PartitionOffset {
        PartitionOffset {
            topic: "clicks".into(),
            partition,
            next_offset,
        }
    }

    #[test]
    fn merged_batches_keep_each_users_newest_record_and_the_furthest_offsets() {
        let mut p = Pending::default();
        assert!(p.take().is_none(), "nothing pending, nothing to write");
        p.add(
            [
                ("u1".into(), history(&["a"])),
                ("u2".into(), history(&["b"])),
            ],
            ["u3".to_string()],
            &[offset(0, 10), offset(1, 7)],
            group(),
        );
        p.add(
            [
                ("u1".into(), history(&["a", "c"])),
                ("u3".into(), history(&["d"])),
            ],
            ["u2".to_string()],
            &[offset(0, 12)],
            group(),
        );
        assert_eq!(p.len(), 2);
        let b = p.take().expect("a batch");
        assert!(p.is_empty() && p.take().is_none(), "taken: nothing left");
        assert_eq!(b.batches, 2);
        assert_eq!(
            b.stored.get("u1"),
            Some(&history(&["a", "c"])),
            "newest kept"
        );
        assert_eq!(
            b.stored.get("u3"),
            Some(&history(&["d"])),
            "stored after its re-read"
        );
        assert!(!b.stored.contains_key("u2") && b.reread.contains("u2"));
        assert!(!b.reread.contains("u3"));
        assert_eq!(b.offsets, vec![offset(0, 12), offset(1, 7)]);
    }

    #[test]
    fn a_user_written_and_read_back_in_one_batch_is_read_back() {
        let mut p = Pending::default();
        p.add(
            [("u1".into(), history(&["a"]))],
            ["u1".to_string()],
            &[offset(0, 3)],
            group(),
        );
        let b = p.take().expect("a batch");
        assert!(b.reread.contains("u1") && !b.stored.contains_key("u1"));
    }

    fn add(p: &mut Pending) {
        p.add([], ["u".to_string()], &[offset(0, 1)], group())
    }

    #[test]
    fn transactions_start_an_interval_apart_unless_the_store_or_a_drain_waits() {
        let interval = Duration::from_millis(300);
        let q = Arc::new(Queue::new(Pace {
            interval,
            max_waiting: 4,
        }));
        q.push(add).expect("room");
        let first = Instant::now();
        assert_eq!(q.next().expect("the first at once").batches, 1);
        assert!(first.elapsed() < interval, "the first waits for nothing");
        q.finished(None);
        q.push(add).expect("room");
        assert_eq!(q.next().expect("the second").batches, 1);
        assert!(
            first.elapsed() >= interval,
            "the second an interval after the first"
        );
        q.finished(None);

        // half of the room taken: the store would soon wait, so no interval
        let taken = Instant::now();
        q.push(add).expect("room");
        q.push(add).expect("room");
        assert_eq!(q.next().expect("two merged").batches, 2);
        assert!(
            taken.elapsed() < interval,
            "taken at once when half the room waits"
        );
        q.finished(None);

        // a drain does not wait for the interval either
        q.push(add).expect("room");
        let drained = Instant::now();
        let drain = {
            let q = q.clone();
            std::thread::spawn(move || q.wait_idle(None))
        };
        assert_eq!(q.next().expect("drained").batches, 1);
        q.finished(None);
        assert_eq!(drain.join().expect("drain"), Ok(()));
        assert!(
            drained.elapsed() < interval / 2,
            "a drain hurries the writer"
        );
    }

    #[test]
    fn the_queue_bounds_what_waits_hands_it_over_merged_and_reports_a_failure() {
        let q = Arc::new(Queue::new(Pace {
            interval: Duration::ZERO,
            max_waiting: 2,
        }));
        q.push(add).expect("room");
        q.push(add).expect("room");
        let writer = {
            let q = q.clone();
            std::thread::spawn(move || {
                let first = q.next().expect("a batch");
                std::thread::sleep(std::time::Duration::from_millis(50));
                q.finished(None);
                let second = q.next().expect("a batch");
                q.finished(Some("the broker refused".into()));
                (first.batches, second.batches, q.next().is_none())
            })
        };
        // a third batch waits for room: pushed once the writer took the first two
        q.push(add)
            .expect("room after the writer took the first two");
        let idle = q.wait_idle(None);
        let (first, second, stopped) = writer.join().expect("writer");
        assert_eq!((first, second), (2, 1), "two merged, then the third");
        assert_eq!(idle, Err("the broker refused".to_string()));
        assert!(stopped, "a failed writer takes nothing more");
        assert_eq!(q.push(add), Err("the broker refused".to_string()));
    }

    #[test]
    fn a_bounded_wait_gives_up_on_a_transaction_that_does_not_end() {
        let q = Queue::new(Pace {
            interval: Duration::ZERO,
            max_waiting: 2,
        });
        q.push(add).expect("room");
        let _in_flight = q.next().expect("a batch");
        let started = Instant::now();
        let limit = std::time::Duration::from_millis(100);
        let idle = q.wait_idle(Some(started + limit));
        assert!(idle.is_err(), "a transaction still in flight: {idle:?}");
        assert!(started.elapsed() >= limit);
        q.finished(None);
        assert_eq!(q.wait_idle(Some(Instant::now() + limit)), Ok(()));
    }
}
