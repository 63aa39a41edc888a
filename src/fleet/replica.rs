//! Role `serve`: a replica's partition life cycle. An assigned partition is paused, restored
//! from the changelog in the consumer task (never in the rebalance callback, so the member keeps
//! polling and is not evicted by a long restore), claimed with a marker of the next epoch in a
//! transaction fenced by the consumer group, then consumed; stored batches go to the changelog
//! from a writer thread, every batch stored while a transaction was in flight merged into the
//! next one with its clicks offsets; a revoked partition's copy is deleted after
//! `serve.state_cleanup_delay`.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use tracing::{info, warn};

use super::changelog::{self, Changelog, Consumed, Horizon, Marker, UserRecord, WriteError};
use super::pending::{Batch, Pace, Queue};
use crate::activity::Activity;
use crate::config::KafkaConfig;
use crate::ingest::{Group, Partitions, Start, Take};
use crate::ownership::Ownership;
use crate::shutdown::Shutdown;
use crate::store::{Applied, ChangelogPosition, PartitionOffset, Store};

/// What a replica is built from.
pub struct ReplicaContext {
    pub kafka: KafkaConfig,
    pub announcer: crate::members::Announcer,
    pub ownership: Arc<Ownership>,
    pub store: Arc<Store>,
    pub activity: Arc<Activity>,
    pub shutdown: Arc<Shutdown>,
    /// Restored users active within it are re-scored after the next model swap.
    pub rescore_window: Duration,
    /// `serve.state_cleanup_delay`.
    pub cleanup_delay: Duration,
    /// `serve.restore_timeout`: the longest one partition's restore may take.
    pub restore_timeout: Duration,
    /// `serve.changelog_commit_interval`: the shortest time between two changelog transactions.
    pub commit_interval: Duration,
    /// Past it, a local copy is restored from the changelog's beginning (see [`Horizon`]).
    pub horizon: Horizon,
    /// `multivaed_changelog_transactions_total` (label: result).
    pub transactions: prometheus::IntCounterVec,
    /// `multivaed_restore_records_total`.
    pub restore_records: prometheus::IntCounter,
    /// `multivaed_click_stage_seconds{stage="changelog"}`: each changelog transaction, from its
    /// oldest batch's store to its commit.
    pub changelog_seconds: prometheus::Histogram,
}

/// A serving replica's partitions.
pub struct Replica {
    cx: ReplicaContext,
    changelog: Changelog,
    /// Held while a batch is stored and queued for the changelog, and (with the queue written
    /// out first) while a claim is written and while a revocation or a cleanup runs: one
    /// changelog transaction at a time, and nothing written for a partition after its
    /// revocation completes.
    batch: Mutex<()>,
    /// Stored batches waiting for the writer thread's next transaction.
    queue: Arc<Queue>,
    /// Partitions assigned and not yet restored (a revocation takes them out: their restore
    /// stops and claims nothing).
    pending: Mutex<HashSet<i32>>,
    /// Per owned partition, where its consumption resumed and up to where it is a replay.
    consumed: Mutex<HashMap<i32, Resumed>>,
    /// Users whose records a fenced transaction left out (the group moved on while their batch
    /// was written): written with the next batch of a partition this replica still owns.
    unwritten: Mutex<Vec<String>>,
    /// Partitions not owned whose local copy is still on disk, since when: deleted after the
    /// cleanup delay unless assigned back.
    unowned_since: Mutex<HashMap<i32, Instant>>,
    /// Set at shutdown: the partitions the replica holds then are still its own on disk (an
    /// export of the stopped replica holds their users).
    stopping: std::sync::atomic::AtomicBool,
}

/// Where an owned partition's consumption resumed.
#[derive(Debug, Clone, Copy)]
struct Resumed {
    /// The last marker's clicks offset: a message before it (fetched before the partition was
    /// paused) is not taken.
    from: i64,
    /// The clicks offset the local store had reached past the marker (a crash between the store
    /// and the changelog): messages below it are a replay.
    replay_until: Option<i64>,
}

/// Stored batches that may wait for the changelog writer: beyond, the store waits for it (at
/// 1k clicks/s a replica stores ~100 small batches a second).
const MAX_WAITING: usize = 64;
/// How long a fenced changelog transaction is tried again with the consumer's metadata of now.
const REFRESH_FOR: Duration = Duration::from_secs(5);
/// The longest a claim is tried (a broker down fails the restore instead of holding it).
const CLAIM_FOR: Duration = Duration::from_secs(60);
/// At shutdown, the longest the replica waits for its last changelog transaction (a slow broker
/// can hold one for the transaction timeout): the stop fits systemd's 30 s `TimeoutStopSec` and
/// the next owner re-consumes whatever the changelog did not get from the last marker.
const DRAIN_AT_SHUTDOWN: Duration = Duration::from_secs(10);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Replica {
    /// The replica and its changelog writer thread.
    pub fn start(cx: ReplicaContext) -> Result<Arc<Self>> {
        let changelog = Changelog::new(&cx.kafka, cx.announcer.id.clone());
        let queue = Queue::new(Pace {
            interval: cx.commit_interval,
            max_waiting: MAX_WAITING,
        });
        let replica = Arc::new(Self {
            cx,
            changelog,
            batch: Mutex::new(()),
            queue: Arc::new(queue),
            pending: Mutex::new(HashSet::new()),
            consumed: Mutex::new(HashMap::new()),
            unwritten: Mutex::new(Vec::new()),
            unowned_since: Mutex::new(HashMap::new()),
            stopping: std::sync::atomic::AtomicBool::new(false),
        });
        let (weak, queue) = (Arc::downgrade(&replica), replica.queue.clone());
        std::thread::Builder::new()
            .name("changelog-writer".into())
            .spawn(move || write_queued(&weak, &queue))
            .context("cannot start the changelog writer thread")?;
        Ok(replica)
    }

    /// Waits until every stored batch is in the changelog (under the batch lock: nothing is
    /// queued meanwhile); at shutdown, until [`DRAIN_AT_SHUTDOWN`] after it began at most (one
    /// deadline for the stop and the revocation the consumer's close brings after it).
    fn written_out(&self) -> Result<()> {
        let until = (self.cx.shutdown.triggered_at()).map(|at| at + DRAIN_AT_SHUTDOWN);
        self.queue
            .wait_idle(until)
            .map_err(|e| anyhow::anyhow!("cannot write the changelog: {e}"))
    }

    fn note_unowned(&self, partitions: &[i32]) {
        let now = Instant::now();
        let mut unowned = lock(&self.unowned_since);
        for &p in partitions {
            unowned.entry(p).or_insert(now);
        }
    }

    /// Partitions revoked or lost: not owned from now; their copies are marked given up (left
    /// out of an export) unless the replica is stopping, and deleted after the cleanup delay.
    fn lose(&self, partitions: &[i32]) {
        let mut pending = lock(&self.pending);
        let mut consumed = lock(&self.consumed);
        for &p in partitions {
            self.cx.ownership.lose(p);
            pending.remove(&p);
            consumed.remove(&p);
        }
        drop((pending, consumed));
        if !self.stopping.load(std::sync::atomic::Ordering::Acquire) {
            for &p in partitions {
                if let Err(e) = self.cx.store.set_given_up(p, true) {
                    warn!(partition = p, error = %e, "cannot mark a revoked partition's copy as given up");
                }
            }
        }
        self.note_unowned(partitions);
    }

    fn still_pending(&self, partition: i32) -> bool {
        lock(&self.pending).contains(&partition)
    }

    /// Reads the partition's changelog into the store, from the local copy's position when it
    /// can resume, stopping early (`None`) if the partition is revoked meanwhile.
    fn read_changelog(&self, partition: i32) -> Result<Option<changelog::Restored>> {
        let counted = std::sync::atomic::AtomicU64::new(0);
        let progress = |n: u64| {
            let before = counted.swap(n, std::sync::atomic::Ordering::AcqRel);
            self.cx.restore_records.inc_by(n.saturating_sub(before));
        };
        let now_ms = crate::wire::now_ms() as i64;
        let window_ms = i64::try_from(self.cx.rescore_window.as_millis()).unwrap_or(i64::MAX);
        let belongs = |user: &str| self.cx.ownership.partition_of(user) == partition;
        let go_on = || self.still_pending(partition) && !self.cx.shutdown.is_set();
        let restored = changelog::restore(
            &self.cx.kafka,
            partition,
            &self.cx.store,
            changelog::Bounds {
                horizon: self.cx.horizon,
                deadline: Instant::now() + self.cx.restore_timeout,
            },
            &belongs,
            now_ms.saturating_sub(window_ms),
            &progress,
            &go_on,
        )?;
        if restored.is_some() && !go_on() {
            return Ok(None);
        }
        Ok(restored)
    }

    /// Users a restore found active within the re-score window are re-scored after the next
    /// model swap by this replica, their new owner, as if they had clicked here.
    fn note_restored_activity(&self, active: &[(String, i64)]) -> Result<()> {
        let (now, now_ms) = (Instant::now(), crate::wire::now_ms() as i64);
        let mut seen = Vec::with_capacity(active.len());
        for (user, at) in active {
            let ago = Duration::from_millis(now_ms.saturating_sub(*at).max(0) as u64);
            if let (Some(u), Some(at)) = (self.cx.store.user_index(user)?, now.checked_sub(ago)) {
                seen.push((u, at));
            }
        }
        self.cx.activity.seen_at(&seen);
        Ok(())
    }

    /// Claims a restored partition under the batch lock: a marker of the next epoch, committed
    /// with the clicks offset it resumes at and the group's metadata (a member the group has
    /// dropped meanwhile is refused by the broker), then owns it. `None`: revoked meanwhile.
    fn claim(
        &self,
        topic: &str,
        partition: i32,
        restored: ChangelogPosition,
        group: Group,
    ) -> Result<Option<u64>> {
        let _b = lock(&self.batch);
        if !self.still_pending(partition) {
            return Ok(None);
        }
        self.written_out()?;
        let resume = restored.clicks_next;
        let epoch = restored
            .epoch
            .checked_add(1)
            .ok_or_else(|| anyhow::anyhow!("partition {partition}: the epoch is exhausted"))?;
        let marker = Marker {
            partition,
            next_offset: resume,
            epoch,
        };
        let offsets = [PartitionOffset {
            topic: topic.to_string(),
            partition,
            next_offset: resume,
        }];
        let give_up = Instant::now() + CLAIM_FOR;
        let go_on = || Instant::now() < give_up && !self.cx.shutdown.is_set();
        let claimed = match self.commit(&[], &[marker], &offsets, group, &go_on) {
            Ok(c) => c,
            Err(WriteError::Fenced(e)) => {
                anyhow::bail!("cannot claim partition {partition}: the consumer group moved on without this replica ({e})")
            }
            Err(e) => anyhow::bail!("cannot claim partition {partition}: {e}"),
        };
        let position = claimed.first().map(|(_, p)| *p).unwrap_or(restored);
        // where the local store had reached, read before the claim's position replaces it
        let local = self.cx.store.stored_offset(topic, partition)?.unwrap_or(0);
        self.cx
            .store
            .restore_histories(&[], partition, position, Some(&offsets[0]))?;
        self.own(partition, epoch, resume, local)?;
        Ok(Some(epoch))
    }

    /// Owns a claimed partition from `resume`, noting a replay up to `local`, the clicks offset
    /// the local store had reached (a crash after the store but before the changelog).
    fn own(&self, partition: i32, epoch: u64, resume: i64, local: i64) -> Result<()> {
        lock(&self.consumed).insert(
            partition,
            Resumed {
                from: resume,
                replay_until: (local > resume).then_some(local),
            },
        );
        lock(&self.pending).remove(&partition);
        lock(&self.unowned_since).remove(&partition);
        self.cx.store.set_given_up(partition, false)?;
        self.cx.ownership.gain(partition, epoch);
        Ok(())
    }

    /// Writes records and markers in one transaction with `offsets` (clicks offsets of partitions
    /// this replica holds) and the group's metadata. The group may only have moved on to a
    /// generation this replica is still a member of (any rebalance does that): for
    /// [`REFRESH_FOR`] a fenced transaction is tried again with the consumer's metadata of now.
    /// A member the group dropped cannot rejoin while the batch lock holds the revocation back,
    /// so its metadata stays refused.
    fn commit(
        &self,
        users: &[UserRecord],
        markers: &[Marker],
        offsets: &[PartitionOffset],
        group: Group,
        go_on: &dyn Fn() -> bool,
    ) -> Result<Vec<(i32, ChangelogPosition)>, WriteError> {
        let consumed = |metadata| {
            let mut tpl = TopicPartitionList::new();
            for o in offsets {
                let _ =
                    tpl.add_partition_offset(&o.topic, o.partition, Offset::Offset(o.next_offset));
            }
            Consumed {
                offsets: tpl,
                group: metadata,
            }
        };
        let mut current = consumed(group.metadata);
        let deadline = Instant::now() + REFRESH_FOR;
        let mut waits = crate::retry::backoff(Duration::from_millis(100), Duration::from_secs(1));
        loop {
            let attempt = self.changelog.write(users, markers, Some(&current), go_on);
            let fresh = match &attempt {
                Err(WriteError::Fenced(_)) if Instant::now() < deadline => (group.now)(),
                _ => None,
            };
            let Some(metadata) = fresh else {
                return attempt;
            };
            info!("a changelog transaction met a newer group generation: trying again with the consumer's metadata of now");
            current = consumed(metadata);
            std::thread::sleep(waits.next().unwrap_or(Duration::from_secs(1)));
        }
    }

    /// The writer thread's transaction: every user the merged batches wrote (and every user of
    /// a re-consumed event, or left out by a fenced transaction before; a tombstone for each
    /// user forgotten), then each owned partition's marker, with the batches' clicks offsets.
    /// A transaction the broker fences (the group moved on since the batches were consumed) is
    /// aborted: the store keeps the batches, their users are written with the next transaction
    /// if their partitions are still owned, and otherwise the next owner re-consumes the clicks
    /// from the last committed marker.
    fn write_batch(&self, mut batch: Batch) -> Result<()> {
        let (ids, users, markers) = self.batch_records(&mut batch)?;
        let owned: Vec<PartitionOffset> = batch
            .offsets
            .iter()
            .filter(|o| self.cx.ownership.owns(o.partition))
            .cloned()
            .collect();
        let shutdown = &self.cx.shutdown;
        let written = self.commit(&users, &markers, &owned, batch.group, &|| {
            !shutdown.is_set()
        });
        let positions = match written {
            Ok(p) => p,
            Err(WriteError::Fenced(e)) => {
                self.cx.transactions.with_label_values(&["fenced"]).inc();
                warn!(error = %e, users = ids.len(), "the changelog transaction was fenced (the consumer group moved on): aborted; its users are written again with the next batch of a partition still owned");
                *lock(&self.unwritten) = ids;
                return Ok(());
            }
            Err(e) if shutdown.is_set() => {
                // stored but not in the changelog: the next owner re-consumes from the last marker
                warn!(error = %e, batches = batch.batches, "shutdown before the changelog had the last batches");
                return Ok(());
            }
            Err(e) => return Err(anyhow::anyhow!("cannot write the changelog: {e}")),
        };
        self.cx.transactions.with_label_values(&["committed"]).inc();
        self.cx
            .changelog_seconds
            .observe(batch.since.elapsed().as_secs_f64());
        self.note_written(positions)?;
        crate::fault::crash_point("ingest.changelog");
        Ok(())
    }

    /// A transaction's records: the ids of every user to write (written, re-consumed,
    /// forgotten, left out by a fenced transaction before), the records of those in partitions
    /// still owned (as the batch stored them, or read from the store: a tombstone for a user it
    /// no longer holds), and each owned partition's marker.
    fn batch_records(
        &self,
        batch: &mut Batch,
    ) -> Result<(Vec<String>, Vec<UserRecord>, Vec<Marker>)> {
        let (store, ownership) = (&self.cx.store, &self.cx.ownership);
        let mut ids: Vec<String> = Vec::with_capacity(batch.stored.len() + batch.reread.len());
        ids.extend(batch.stored.keys().cloned());
        ids.extend(batch.reread.iter().cloned());
        ids.append(&mut lock(&self.unwritten));
        ids.sort_unstable();
        ids.dedup();
        let mut users = Vec::with_capacity(ids.len());
        for user in &ids {
            let partition = ownership.partition_of(user);
            if ownership.owns(partition) {
                users.push(UserRecord {
                    partition,
                    user: user.clone(),
                    history: match batch.stored.remove(user.as_str()) {
                        Some(h) => h,
                        None => store.history_record(user)?,
                    },
                });
            }
        }
        let markers: Vec<Marker> = batch
            .offsets
            .iter()
            .filter_map(|o| {
                ownership.epoch(o.partition).map(|epoch| Marker {
                    partition: o.partition,
                    next_offset: o.next_offset,
                    epoch,
                })
            })
            .collect();
        Ok((ids, users, markers))
    }

    /// After a committed batch: each partition's changelog position, the time its copy was last
    /// in sync (its only writer wrote it), and the end of a replay the batch reached.
    fn note_written(&self, positions: Vec<(i32, ChangelogPosition)>) -> Result<()> {
        let mut consumed = lock(&self.consumed);
        let now = crate::wire::now_ms();
        for (p, position) in positions {
            self.cx.store.set_changelog_position(p, position)?;
            self.cx.store.set_synced(p, now)?;
            if let Some(r) = consumed.get_mut(&p) {
                if r.replay_until.is_some_and(|u| position.clicks_next >= u) {
                    r.replay_until = None;
                }
            }
        }
        Ok(())
    }

    /// Deletes the local copy of every partition unowned for longer than the cleanup delay
    /// (under the batch lock: no batch, claim or revocation runs meanwhile; an assignment takes
    /// a partition off the list before its restore starts).
    fn drop_unowned(&self) -> Result<()> {
        let due = |unowned: &HashMap<i32, Instant>| -> Vec<i32> {
            unowned
                .iter()
                .filter(|(_, since)| since.elapsed() >= self.cx.cleanup_delay)
                .map(|(p, _)| *p)
                .collect()
        };
        if due(&lock(&self.unowned_since)).is_empty() {
            return Ok(());
        }
        let _b = lock(&self.batch);
        let due = due(&lock(&self.unowned_since));
        for p in due {
            let topic = &self.cx.kafka.clicks_topic;
            let users = self
                .cx
                .store
                .drop_partition(p, topic, |u| self.cx.ownership.partition_of(u) == p)?;
            info!(
                partition = p,
                users,
                "the local copy of a partition owned elsewhere was deleted (serve.state_cleanup_delay)"
            );
            lock(&self.unowned_since).remove(&p);
        }
        Ok(())
    }
}

impl Partitions for Replica {
    fn membership(&self) -> (&'static str, Option<String>) {
        let k = &self.cx.kafka;
        (
            k.rebalance.strategy(),
            k.static_membership.then(|| self.changelog.owner.clone()),
        )
    }

    fn started(&self) -> Result<()> {
        // copies a previous run left on disk are unowned until assigned again
        self.note_unowned(&self.cx.store.changelog_partitions()?);
        self.cx
            .store
            .set_partition_count(self.cx.ownership.partition_count())
    }

    fn assigned(&self, _: &str, partition: i32) -> Start {
        // off the cleanup list before its restore can start (see `drop_unowned`)
        lock(&self.unowned_since).remove(&partition);
        lock(&self.pending).insert(partition);
        Start::Restore
    }

    fn revoked(&self, partitions: Option<&[i32]>) {
        // the batch being stored finishes and every stored batch is written to the changelog
        // first (a failed writer ends ingestion at the next batch)
        let _b = lock(&self.batch);
        if let Err(e) = self.written_out() {
            warn!(error = %format!("{e:#}"), "revoking partitions whose last batches are not in the changelog: their next owner re-consumes them");
        }
        let all: Vec<i32>;
        let partitions = match partitions {
            Some(p) => p,
            None => {
                let mut owned: HashSet<i32> = self
                    .cx
                    .ownership
                    .owned()
                    .iter()
                    .map(|o| o.partition)
                    .collect();
                owned.extend(lock(&self.pending).iter().copied());
                all = owned.into_iter().collect();
                &all
            }
        };
        self.lose(partitions);
    }

    fn restore(&self, topic: &str, partition: i32, group: Group) -> Result<Option<i64>> {
        let started = Instant::now();
        // a cleanup of this partition's old copy that began before the assignment ends first
        drop(lock(&self.batch));
        let Some(restored) = self.read_changelog(partition)? else {
            info!(partition, "revoked during its restore");
            return Ok(None);
        };
        self.note_restored_activity(&restored.active)?;
        let Some(epoch) = self.claim(topic, partition, restored.position, group)? else {
            info!(partition, "revoked before its claim");
            return Ok(None);
        };
        let resume = restored.position.clicks_next;
        info!(
            partition,
            records = restored.records,
            from_beginning = restored.from_beginning,
            epoch,
            resume,
            seconds = started.elapsed().as_secs_f64(),
            "partition restored from the changelog"
        );
        Ok(Some(resume))
    }

    fn take(&self, partition: i32, offset: i64) -> Take {
        if !self.cx.ownership.owns(partition) {
            return Take::Skip;
        }
        match lock(&self.consumed).get(&partition) {
            None => Take::Skip,
            Some(r) if offset < r.from => Take::Skip,
            Some(r) if r.replay_until.is_some_and(|u| offset < u) => Take::Replay,
            Some(_) => Take::New,
        }
    }

    fn check(&self, user: &str, partition: i32) -> Result<(), String> {
        let expected = self.cx.ownership.partition_of(user);
        if expected == partition {
            return Ok(());
        }
        Err(format!(
            "user {user:?} belongs to partition {expected} with the {} partitioner (kafka.partitioner), but the event arrived on partition {partition}: produce events keyed by user id with that partitioner",
            self.cx.kafka.partitioner.librdkafka_name()
        ))
    }

    fn store(
        &self,
        apply: &mut dyn FnMut() -> Result<Applied>,
        replayed: &[String],
        offsets: &[PartitionOffset],
        group: Option<Group>,
    ) -> Result<Applied> {
        let _b = lock(&self.batch);
        let group =
            group.context("the consumer has no group metadata for the changelog transaction")?;
        let applied = apply()?;
        let store = &self.cx.store;
        let written = applied.written.iter().map(|w| {
            let history = w.history.as_ref().map(|h| store.history_by_id(h));
            (w.user.clone(), history)
        });
        let reread =
            (replayed.iter().cloned()).chain(applied.forgotten.iter().map(|f| f.user.clone()));
        self.queue
            .push(|pending| pending.add(written, reread, offsets, group))
            .map_err(|e| anyhow::anyhow!("cannot write the changelog: {e}"))?;
        Ok(applied)
    }

    fn commits(&self, partition: i32) -> bool {
        self.cx.ownership.owns(partition)
    }

    fn tick(&self) -> Result<()> {
        self.drop_unowned()
    }

    fn assignment_changed(&self) {
        let owned = self.cx.ownership.owned();
        self.cx
            .announcer
            .announce(owned.iter().map(|o| (o.partition, o.epoch)).collect());
    }

    fn stop(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::Release);
        let _b = lock(&self.batch);
        if let Err(e) = self.written_out() {
            warn!(error = %format!("{e:#}"), "stopping with stored batches not in the changelog: the next owner re-consumes them");
        }
        self.cx.announcer.leave();
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.queue.close();
    }
}

/// The changelog writer thread: one merged transaction at a time while the replica lives; a
/// failed transaction stops it, and the replica's next batch fails ingestion with its reason.
fn write_queued(replica: &Weak<Replica>, queue: &Queue) {
    while let Some(batch) = queue.next() {
        let Some(replica) = replica.upgrade() else {
            return;
        };
        let failure = replica.write_batch(batch).err();
        if let Some(e) = &failure {
            tracing::error!(error = %format!("{e:#}"), "the changelog writer stopped");
        }
        drop(replica);
        queue.finished(failure.map(|e| format!("{e:#}")));
    }
}
