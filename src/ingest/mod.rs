//! Events in, the first stage: an rdkafka consumer in a consumer group on the clicks topic.
//! Messages are handled in batches: parsed (`wire`), bad ones dead-lettered (delivery awaited),
//! good ones stored with the next offset of each partition in one atomic `store` batch, the store
//! flushed, then offsets committed to Kafka (for lag visibility); each stored batch is reported to
//! the `activity` record (which wakes the scorer and feeds training) and the online evaluation.
//! On assignment each partition starts from the store's offset, so a crash anywhere loses no
//! acknowledged click and counts none twice.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::kafka::Producers;
use anyhow::{Context, Result};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::ClientContext;
use tracing::{debug, error, info, warn};

mod changelog;
mod dead_letter;
mod follow;
mod items;

pub use changelog::Horizon;
use changelog::{Changelog, Consumed, Marker, UserRecord, WriteError};
use dead_letter::{DeadLetter, DeadLetterWriter};
pub use follow::ChangelogReader;
pub use items::ItemsReader;

use crate::activity::Activity;
use crate::config::KafkaConfig;
use crate::health::Health;
use crate::kafka::{client_config, client_error};
use crate::metrics::Metrics;
use crate::online::OnlineEval;
use crate::shutdown::Shutdown;
use crate::store::{Applied, Change, ChangelogPosition, PartitionOffset, Store};
use crate::wire::{parse_event, Event};

/// What ingestion uses: the clicks topic's settings, the store it writes, the activity record
/// and online evaluation it tells about each stored batch, and the health it reports.
pub struct Ingest {
    pub kafka: KafkaConfig,
    /// What each event type means (weights, negatives).
    pub event_types: crate::wire::EventTypes,
    /// Role `serve`: the changelog and partition ownership (`None`: role `all`).
    pub fleet: Option<Arc<Fleet>>,
    pub store: Arc<Store>,
    pub activity: Arc<Activity>,
    pub online: Arc<OnlineEval>,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    pub shutdown: Arc<Shutdown>,
}

/// What a serving replica adds to ingestion: the changelog it writes after each batch and
/// restores partitions from, and the ownership it keeps.
pub struct Fleet {
    pub kafka: KafkaConfig,
    pub ownership: Arc<crate::ownership::Ownership>,
    changelog: Changelog,
    /// Held while a batch is stored and its changelog written: a revocation waits for it, so
    /// nothing is written for a partition after its revocation completes.
    batch: std::sync::Mutex<()>,
    /// Per partition, the clicks offset the local store had reached past the changelog's last
    /// marker (a crash between the two): re-consumed clicks below it are written to the
    /// changelog although the store has them, and their dead letters are not sent again.
    replay_until: std::sync::Mutex<std::collections::HashMap<i32, i64>>,
    /// A restore that failed (in the rebalance callback): ingestion stops with it.
    failed: std::sync::Mutex<Option<String>>,
    /// Users whose records a fenced transaction left out (the group moved on while their batch
    /// was written): written with the next batch of a partition this replica still owns.
    unwritten: std::sync::Mutex<Vec<String>>,
    /// `multivaed_changelog_transactions_total` (label: result).
    transactions: prometheus::IntCounterVec,
    /// Partitions this replica does not own whose local copy is still on disk, since when:
    /// dropped after `serve.state_cleanup_delay` unless assigned back.
    unowned_since: std::sync::Mutex<std::collections::HashMap<i32, Instant>>,
    cleanup_delay: Duration,
    /// Past it, a local copy is restored from the changelog's beginning (see [`Horizon`]).
    horizon: Horizon,
    /// Restored users active within it are re-scored after the next model swap
    /// (`serve.rescore_window`).
    rescore_window: Duration,
    /// Tells the other replicas which partitions this one owns now.
    announcer: crate::members::Announcer,
}

impl Fleet {
    /// A replica's part, announcing itself through `announcer` (whose id names the replica).
    pub fn new(
        kafka: KafkaConfig,
        announcer: crate::members::Announcer,
        ownership: Arc<crate::ownership::Ownership>,
        rescore_window: Duration,
        cleanup_delay: Duration,
        horizon: Horizon,
        transactions: prometheus::IntCounterVec,
    ) -> Self {
        let changelog = Changelog::new(&kafka, announcer.id.clone());
        Self {
            kafka,
            ownership,
            changelog,
            batch: std::sync::Mutex::new(()),
            replay_until: std::sync::Mutex::new(Default::default()),
            failed: std::sync::Mutex::new(None),
            unwritten: std::sync::Mutex::new(Vec::new()),
            transactions,
            unowned_since: std::sync::Mutex::new(Default::default()),
            cleanup_delay,
            horizon,
            announcer,
            rescore_window,
        }
    }

    /// Partitions whose local copy stays on disk unowned from now (revoked, or found on disk
    /// at start), to be dropped after the cleanup delay.
    fn note_unowned(&self, partitions: &[i32]) {
        let now = Instant::now();
        let mut unowned = self.unowned_since.lock().unwrap_or_else(|e| e.into_inner());
        for &p in partitions {
            unowned.entry(p).or_insert(now);
        }
    }

    /// Drops the local copy of every partition unowned for longer than the cleanup delay
    /// (under the batch lock: no batch, restore or revocation runs meanwhile).
    fn drop_unowned(&self, store: &Store, clicks_topic: &str) -> Result<()> {
        let due: Vec<i32> = self
            .unowned_since
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(_, since)| since.elapsed() >= self.cleanup_delay)
            .map(|(p, _)| *p)
            .collect();
        if due.is_empty() {
            return Ok(());
        }
        let _b = self.batch.lock().unwrap_or_else(|e| e.into_inner());
        for p in due {
            if !self.ownership.owns(p) {
                let users = store
                    .drop_partition(p, clicks_topic, |u| self.ownership.partition_of(u) == p)?;
                info!(
                    partition = p,
                    users,
                    "the local copy of a partition owned elsewhere was deleted (serve.state_cleanup_delay)"
                );
            }
            self.unowned_since
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&p);
        }
        Ok(())
    }

    fn replay_until(&self, partition: i32) -> Option<i64> {
        self.replay_until
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&partition)
            .copied()
    }
}

/// Consumer callbacks: seek to stored offsets on assignment (restoring a serving replica's
/// partitions from the changelog first), track assignment, lag and broker health.
pub struct IngestContext {
    store: Arc<Store>,
    activity: Arc<Activity>,
    fleet: Option<Arc<Fleet>>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

/// A partition is caught up when at most this many of its messages are left to fetch.
const CAUGHT_UP_LAG: i64 = 1000;

impl IngestContext {
    /// Users a restore found active within the re-score window are re-scored after the next
    /// model swap by this replica, their new owner, as if they had clicked here.
    fn note_restored_activity(&self, active: &[(String, i64)], now_ms: i64) -> Result<()> {
        let now = Instant::now();
        let mut seen = Vec::with_capacity(active.len());
        for (user, at) in active {
            let ago = Duration::from_millis(now_ms.saturating_sub(*at).max(0) as u64);
            if let (Some(u), Some(at)) = (self.store.user_index(user)?, now.checked_sub(ago)) {
                seen.push((u, at));
            }
        }
        self.activity.seen_at(&seen);
        Ok(())
    }

    /// Once every assigned partition is fetched up to (near) its end, readiness says caught up.
    fn note_caught_up(&self, stats: &Statistics) {
        if !self.health.joined() || self.health.caught_up() {
            return;
        }
        let near_end = stats
            .topics
            .values()
            .flat_map(|t| t.partitions.values())
            .filter(|p| p.partition >= 0 && p.fetch_state == "active")
            .filter(|p| p.hi_offset >= 0 && p.next_offset >= 0)
            .filter(|p| p.hi_offset - p.next_offset <= CAUGHT_UP_LAG)
            .count();
        if near_end >= self.health.partitions() {
            info!(
                partitions = near_end,
                "caught up on the assigned partitions"
            );
            self.health.set_caught_up();
        }
    }
}

impl ClientContext for IngestContext {
    fn stats(&self, stats: Statistics) {
        self.note_caught_up(&stats);
        for topic in stats.topics.values() {
            for (p, part) in &topic.partitions {
                // messages behind the high watermark: from what this instance consumed, else
                // from the committed offset
                let position = if part.app_offset >= 0 {
                    part.app_offset
                } else {
                    part.committed_offset
                };
                if *p >= 0 && part.hi_offset >= 0 && position >= 0 {
                    self.metrics
                        .consumer_lag
                        .with_label_values(&[&p.to_string()])
                        .set((part.hi_offset - position).max(0));
                }
            }
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if matches!(
            error.rdkafka_error_code(),
            Some(rdkafka::types::RDKafkaErrorCode::PartitionEOF)
        ) {
            // the end of a partition reached: news for readiness (see `run`), not an error
            return;
        }
        if matches!(
            error.rdkafka_error_code(),
            Some(rdkafka::types::RDKafkaErrorCode::AllBrokersDown)
        ) {
            self.health.set_broker_up(false);
        }
        crate::kafka::log_client_error(&error, reason);
    }
}

impl ConsumerContext for IngestContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let incremental = matches!(
            consumer.rebalance_protocol(),
            rdkafka::consumer::RebalanceProtocol::Cooperative
        );
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let elems: Vec<(String, i32)> = tpl
                    .elements()
                    .iter()
                    .map(|e| (e.topic().to_string(), e.partition()))
                    .collect();
                // a local copy being dropped meanwhile is dropped first
                let _b = self
                    .fleet
                    .as_ref()
                    .map(|f| f.batch.lock().unwrap_or_else(|e| e.into_inner()));
                for (topic, partition) in &elems {
                    let start = match &self.fleet {
                        Some(fleet) => self.restore(fleet, topic, *partition),
                        None => self.stored_start(topic, *partition),
                    };
                    if let Err(e) = tpl.set_partition_offset(topic, *partition, start) {
                        error!(error = %e, topic, partition, "cannot set the start offset");
                    }
                }
                let assigned = if incremental {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                };
                if let Err(e) = assigned {
                    error!(error = %e, "cannot assign partitions");
                }
                self.note_assignment(consumer);
                info!(partitions = ?elems.iter().map(|e| e.1).collect::<Vec<_>>(), "partitions assigned; resuming from stored offsets");
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let revoked: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
                if let Some(fleet) = &self.fleet {
                    // the batch being stored finishes (its changelog records written) first;
                    // nothing is written or published for these partitions after this
                    let _b = fleet.batch.lock().unwrap_or_else(|e| e.into_inner());
                    for &p in &revoked {
                        fleet.ownership.lose(p);
                    }
                    fleet.note_unowned(&revoked);
                }
                let unassigned = if incremental {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                };
                if let Err(e) = unassigned {
                    error!(error = %e, "cannot unassign partitions");
                }
                self.metrics.consumer_lag.reset();
                self.note_assignment(consumer);
                info!(partitions = ?revoked, "partitions revoked");
            }
            other => {
                error!(error = ?other, "rebalance error");
                if let Some(fleet) = &self.fleet {
                    let _b = fleet.batch.lock().unwrap_or_else(|e| e.into_inner());
                    let owned: Vec<i32> = fleet
                        .ownership
                        .owned()
                        .iter()
                        .map(|o| o.partition)
                        .collect();
                    for &p in &owned {
                        fleet.ownership.lose(p);
                    }
                    fleet.note_unowned(&owned);
                }
                let _ = consumer.unassign();
                self.health.revoked();
            }
        }
    }
}

impl IngestContext {
    /// Where a partition starts in role `all`: the store's offset, or the beginning.
    fn stored_start(&self, topic: &str, partition: i32) -> Offset {
        match self.store.stored_offset(topic, partition) {
            Ok(Some(o)) => Offset::Offset(o),
            Ok(None) => Offset::Beginning,
            Err(e) => {
                error!(error = %e, "cannot read stored offsets");
                Offset::Beginning
            }
        }
    }

    /// Readiness and the gauge follow the assignment (with cooperative rebalancing, each
    /// callback adds or takes away some partitions).
    fn note_assignment(&self, consumer: &BaseConsumer<Self>) {
        let n = consumer.assignment().map(|a| a.count()).unwrap_or(0);
        self.health.assigned(n);
        self.metrics.partitions_assigned.set(n as i64);
        if let Some(f) = &self.fleet {
            let owned = f.ownership.owned();
            f.announcer
                .announce(owned.iter().map(|o| (o.partition, o.epoch)).collect());
        }
    }

    /// Role `serve`: restores a newly assigned partition from the changelog (from the local
    /// copy's position when it has one), claims it with a marker of the next epoch and owns
    /// it; returns where its clicks resume (the changelog's last marker). Runs in the rebalance
    /// callback, so no click of the partition is consumed before it is restored. A restore that
    /// fails leaves the partition unowned and stops ingestion (the daemon restarts it).
    fn restore(&self, fleet: &Fleet, topic: &str, partition: i32) -> Offset {
        self.metrics.partitions_restoring.inc();
        self.health.restoring(true);
        let started = Instant::now();
        let result = self.restore_and_claim(fleet, topic, partition);
        if result.is_ok() {
            // a failed restore stays counted: not ready until the daemon stops
            self.health.restoring(false);
        }
        self.metrics.partitions_restoring.dec();
        match result {
            Ok((resume, records, from_beginning, epoch)) => {
                info!(
                    partition,
                    records,
                    from_beginning,
                    epoch,
                    resume,
                    seconds = started.elapsed().as_secs_f64(),
                    "partition restored from the changelog"
                );
                Offset::Offset(resume)
            }
            Err(e) => {
                let msg = format!("cannot restore partition {partition} from the changelog: {e:#}");
                error!(error = %msg, "restore failed: ingestion stops (a restart restores again)");
                *fleet.failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(msg);
                Offset::End
            }
        }
    }

    fn restore_and_claim(
        &self,
        fleet: &Fleet,
        topic: &str,
        partition: i32,
    ) -> Result<(i64, u64, bool, u64)> {
        let restore_records = self.metrics.restore_records.clone();
        let counted = std::sync::atomic::AtomicU64::new(0);
        let progress = |n: u64| {
            let before = counted.swap(n, std::sync::atomic::Ordering::AcqRel);
            restore_records.inc_by(n.saturating_sub(before));
        };
        let now_ms = crate::wire::now_ms() as i64;
        let window_ms = i64::try_from(fleet.rescore_window.as_millis()).unwrap_or(i64::MAX);
        let belongs = |user: &str| fleet.ownership.partition_of(user) == partition;
        let restored = changelog::restore(
            &fleet.kafka,
            partition,
            &self.store,
            changelog::Bounds {
                horizon: fleet.horizon,
                deadline: Instant::now() + restore_limit(&fleet.kafka),
            },
            &belongs,
            now_ms.saturating_sub(window_ms),
            &progress,
        )?;
        self.note_restored_activity(&restored.active, now_ms)?;
        let resume = restored.position.clicks_next;
        // a crash after the store but before the changelog: re-consume from the marker
        let local = self.store.stored_offset(topic, partition)?.unwrap_or(0);
        {
            let mut replay = fleet.replay_until.lock().unwrap_or_else(|e| e.into_inner());
            if local > resume {
                replay.insert(partition, local);
            } else {
                replay.remove(&partition);
            }
        }
        let epoch = restored.position.epoch + 1;
        // bounded: a broker down during the claim fails the restore instead of holding the
        // rebalance callback for ever
        let give_up = Instant::now() + Duration::from_secs(60);
        let claimed = fleet
            .changelog
            .write(
                &[],
                &[Marker {
                    partition,
                    next_offset: resume,
                    epoch,
                }],
                None,
                || Instant::now() < give_up,
            )
            .map_err(|e| anyhow::anyhow!("cannot claim partition {partition}: {e}"))?;
        let position = claimed
            .first()
            .map(|(_, p)| *p)
            .unwrap_or(restored.position);
        self.store.restore_histories(
            &[],
            partition,
            position,
            Some(&PartitionOffset {
                topic: topic.to_string(),
                partition,
                next_offset: resume,
            }),
        )?;
        fleet.ownership.gain(partition, epoch);
        fleet
            .unowned_since
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&partition);
        Ok((resume, restored.records, restored.from_beginning, epoch))
    }
}

impl Ingest {
    /// Creates the group consumer, subscribed to the clicks topic.
    pub fn consumer(&self) -> Result<StreamConsumer<IngestContext>> {
        let k = &self.kafka;
        // serving replicas rebalance as configured (incrementally by default: only the
        // partitions that must move stop); the `all` role keeps the eager assignors it always had
        let (strategy, instance) = match &self.fleet {
            Some(f) => (
                k.rebalance.strategy(),
                k.static_membership.then(|| f.changelog.owner.clone()),
            ),
            None => (
                crate::config::Rebalance::Eager.strategy(),
                k.group_instance_id(crate::config::Role::All),
            ),
        };
        let mut config = client_config(
            &k.brokers,
            &[
                ("group.id", &k.group_id),
                ("enable.auto.commit", "false"),
                ("enable.auto.offset.store", "false"),
                ("auto.offset.reset", "earliest"),
                ("partition.assignment.strategy", strategy),
                ("statistics.interval.ms", "5000"),
                ("session.timeout.ms", "10000"),
                ("heartbeat.interval.ms", "1000"),
                // the longest an empty fetch waits in the broker (a fetch returns as soon as a
                // click arrives): measured on Apache Kafka at 1k clicks/s, 100 ms answered no
                // worse than librdkafka's 500 (README "Speed")
                ("fetch.wait.max.ms", "100"),
                // reaching a partition's end is reported (readiness: caught up)
                ("enable.partition.eof", "true"),
                // a serving replica restores a newly assigned partition inside the rebalance
                // callback, where the consumer does not poll: the group waits this long for it
                // (a restore is cut off before, see `restore_limit`)
                ("max.poll.interval.ms", MAX_POLL_INTERVAL_MS),
            ],
            &k.properties,
        );
        if let Some(id) = instance {
            // static membership: a replica restarted within the session timeout keeps its
            // partitions
            config.set("group.instance.id", id);
        }
        let consumer: StreamConsumer<IngestContext> = config
            .create_with_context(IngestContext {
                store: self.store.clone(),
                activity: self.activity.clone(),
                fleet: self.fleet.clone(),
                metrics: self.metrics.clone(),
                health: self.health.clone(),
            })
            .map_err(|e| client_error("cannot create the Kafka consumer", e))?;
        consumer
            .subscribe(&[&k.clicks_topic])
            .context("cannot subscribe to the clicks topic")?;
        Ok(consumer)
    }
}

/// A consumed batch, parsed: the clicks and forgotten users to store, the messages to
/// dead-letter, and the next offset of each partition it read.
struct Parsed {
    changes: Vec<Change>,
    /// When each request to forget a user was produced (ms since the epoch, the message's
    /// timestamp), for the time until the store has forgotten them.
    forget_requested: Vec<i64>,
    letters: Vec<DeadLetter>,
    offsets: Vec<PartitionOffset>,
    /// Users of clicks consumed again after a crash (role `serve`): written to the changelog.
    replayed: Vec<String>,
    /// When its messages were consumed (the scorer's latency counts from here).
    received: Instant,
    /// Messages in the batch (clicks, ignored and dead-lettered).
    messages: u64,
}

/// A batch being written to the store.
struct StoreTask {
    handle: tokio::task::JoinHandle<Result<Applied>>,
    offsets: Vec<PartitionOffset>,
    received: Instant,
    forget_requested: Vec<i64>,
}

impl Ingest {
    /// The ingest loop; returns at shutdown after committing what it stored. While one batch is
    /// written to the store the next is consumed and parsed; batches are stored one at a time,
    /// in order, and each is committed to Kafka only once stored.
    pub async fn run(
        self,
        consumer: StreamConsumer<IngestContext>,
        producers: Arc<Producers>,
    ) -> Result<()> {
        // shared with the changelog writer, which may ask for the group's metadata again
        let consumer = Arc::new(consumer);
        let mut shutdown = self.shutdown.subscribe();
        let mut storing: Option<StoreTask> = None;
        if let Some(f) = &self.fleet {
            // copies a previous run left on disk are unowned until assigned again
            f.note_unowned(&self.store.changelog_partitions()?);
        }
        let mut cleanup = tokio::time::interval(Duration::from_secs(5));
        loop {
            // wait for the first message of a batch (finishing the batch being stored meanwhile)
            let first = tokio::select! {
                m = consumer.recv() => m,
                done = async { storing.as_mut().map(|t| &mut t.handle).expect("guarded").await },
                    if storing.is_some() =>
                {
                    if let Some(task) = storing.take() {
                        self.finish_batch(&consumer, &task, done)?;
                    }
                    continue;
                }
                _ = cleanup.tick(), if self.fleet.is_some() => {
                    self.stop_if_a_restore_failed()?;
                    self.drop_unowned().await?;
                    continue;
                }
                _ = shutdown.changed() => break,
            };
            self.stop_if_a_restore_failed()?;
            let first = match first {
                Ok(m) => m,
                Err(KafkaError::PartitionEOF(p)) => {
                    self.health.partition_at_end(p);
                    continue;
                }
                Err(e) => {
                    warn!(error = %e, "consume error");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let msgs = self.fill_batch(&consumer, first).await;
            let parsed = self.parse_batch(&msgs, Instant::now());
            drop(msgs);
            crate::fault::crash_point("ingest.parsed");
            if !parsed.letters.is_empty()
                && !self
                    .dead_letters(&producers)
                    .write_all(&parsed.letters)
                    .await
            {
                warn!("shutdown while dead letters were undelivered: the batch is not stored and will be consumed again");
                break;
            }
            // the group's generation this batch was consumed in: its changelog transaction
            // commits only if the group has not moved on since
            let group = self.fleet.as_ref().and_then(|_| {
                consumer.group_metadata().map(|metadata| Group {
                    metadata,
                    consumer: consumer.clone(),
                })
            });
            // one batch in the store at a time, in consumption order
            self.finish_stored(&consumer, &mut storing).await?;
            storing = Some(self.store_batch(parsed, group));
        }
        self.finish_stored(&consumer, &mut storing).await?;
        self.commit_what_is_stored(&consumer);
        if let Some(f) = &self.fleet {
            f.announcer.leave();
        }
        info!("ingest stopped");
        Ok(())
    }

    /// Role `serve`: a restore that failed (in the rebalance callback) ends ingestion with its
    /// error, so the daemon stops (and is restarted) rather than running without the partition.
    fn stop_if_a_restore_failed(&self) -> Result<()> {
        if let Some(f) = &self.fleet {
            if let Some(msg) = f.failed.lock().unwrap_or_else(|e| e.into_inner()).take() {
                anyhow::bail!(msg);
            }
        }
        Ok(())
    }

    /// Role `serve`: drops the local copies of partitions owned elsewhere for longer than
    /// `serve.state_cleanup_delay`, on a blocking thread.
    async fn drop_unowned(&self) -> Result<()> {
        let Some(fleet) = self.fleet.clone() else {
            return Ok(());
        };
        let (store, topic) = (self.store.clone(), self.kafka.clicks_topic.clone());
        tokio::task::spawn_blocking(move || fleet.drop_unowned(&store, &topic))
            .await
            .context("the cleanup task failed")?
    }

    /// The rest of a batch after its first message: up to `kafka.batch_size` messages, waiting
    /// at most `kafka.batch_timeout`.
    async fn fill_batch<'c>(
        &self,
        consumer: &'c StreamConsumer<IngestContext>,
        first: BorrowedMessage<'c>,
    ) -> Vec<BorrowedMessage<'c>> {
        let k = &self.kafka;
        let mut msgs = Vec::with_capacity(k.batch_size);
        msgs.push(first);
        let deadline = tokio::time::Instant::now() + k.batch_timeout;
        while msgs.len() < k.batch_size {
            match tokio::time::timeout_at(deadline, consumer.recv()).await {
                Ok(Ok(m)) => msgs.push(m),
                Ok(Err(KafkaError::PartitionEOF(p))) => self.health.partition_at_end(p),
                Ok(Err(e)) => {
                    warn!(error = %e, "consume error");
                    break;
                }
                Err(_) => break,
            }
        }
        self.health.set_broker_up(true);
        msgs
    }

    /// Parses a batch consumed at `received`: good clicks, dead letters (counted by reason),
    /// next offsets. A serving replica leaves out the messages of partitions it does not own
    /// (revoked while the batch was consumed), dead-letters a click on another partition than
    /// its user's, and notes the users of re-consumed clicks (see [`Fleet`]).
    fn parse_batch(&self, msgs: &[BorrowedMessage<'_>], received: Instant) -> Parsed {
        let k = &self.kafka;
        let mut changes: Vec<Change> = Vec::with_capacity(msgs.len());
        let mut forget_requested = Vec::new();
        let mut letters = Vec::new();
        let mut replayed = Vec::new();
        let mut next: BTreeMap<(String, i32), i64> = BTreeMap::new();
        let mut messages = 0;
        for m in msgs {
            let (p, offset) = (m.partition(), m.offset());
            let replay = match &self.fleet {
                Some(f) if !f.ownership.owns(p) => continue,
                Some(f) => f.replay_until(p).is_some_and(|until| offset < until),
                None => false,
            };
            messages += 1;
            self.metrics.events_consumed.inc();
            let e = next.entry((m.topic().to_string(), p)).or_insert(0);
            *e = (*e).max(offset + 1);
            let parsed = parse_event(m.key(), m.payload(), k.max_message_bytes, &self.event_types)
                .map_err(|r| (r.reason(), r.to_string()))
                .and_then(|event| self.check_partition(event, p));
            match parsed {
                Ok(Event::Click(c)) => {
                    if replay {
                        replayed.push(c.user.clone());
                    }
                    changes.push(Change::Click(c))
                }
                Ok(Event::Negative(c)) => {
                    if replay {
                        replayed.push(c.user.clone());
                    }
                    changes.push(Change::Negative(c))
                }
                Ok(Event::Forget { user }) => {
                    if replay {
                        replayed.push(user.clone());
                    }
                    let at = m.timestamp().to_millis();
                    forget_requested.push(at.unwrap_or_else(|| crate::wire::now_ms() as i64));
                    changes.push(Change::Forget(user))
                }
                Ok(Event::Ignored { .. }) => self.metrics.events_ignored.inc(),
                // dead-lettered before the crash that made this a replay
                Err(_) if replay => {}
                Err((reason, detail)) => {
                    self.metrics
                        .events_rejected
                        .with_label_values(&[reason])
                        .inc();
                    debug!(partition = p, offset, reason, "dead-lettering a message");
                    letters.push(DeadLetter {
                        topic: m.topic().to_string(),
                        partition: p,
                        offset,
                        key: m.key().map(|k| k.to_vec()),
                        payload: m.payload().map(|p| p.to_vec()).unwrap_or_default(),
                        reason,
                        detail,
                    });
                }
            }
        }
        let offsets = next
            .into_iter()
            .map(|((topic, partition), next_offset)| PartitionOffset {
                topic,
                partition,
                next_offset,
            })
            .collect();
        Parsed {
            changes,
            forget_requested,
            letters,
            offsets,
            replayed,
            received,
            messages,
        }
    }

    /// A serving replica owns a user through the partition the producers' partitioner gives
    /// their id: a click that arrived on another partition (a producer keying by something
    /// else, or with another partitioner) is refused, not stored where no pull finds it.
    fn check_partition(
        &self,
        event: Event,
        partition: i32,
    ) -> std::result::Result<Event, (&'static str, String)> {
        let user = match &event {
            Event::Click(c) | Event::Negative(c) => &c.user,
            Event::Forget { user } => user,
            Event::Ignored { .. } => return Ok(event),
        };
        let Some(f) = &self.fleet else {
            return Ok(event);
        };
        let expected = f.ownership.partition_of(user);
        if expected == partition {
            return Ok(event);
        }
        Err((
            "wrong_partition",
            format!(
                "user {user:?} belongs to partition {expected} with the {} partitioner (kafka.partitioner), but the event arrived on partition {partition}: produce events keyed by user id with that partitioner",
                f.kafka.partitioner.librdkafka_name()
            ),
        ))
    }

    fn dead_letters<'a>(&'a self, producer: &'a Producers) -> DeadLetterWriter<'a> {
        DeadLetterWriter {
            topic: &self.kafka.dead_letter_topic,
            max_payload: self.kafka.max_message_bytes,
            producer,
            metrics: &self.metrics,
            health: &self.health,
            shutdown: &self.shutdown,
        }
    }

    /// Starts writing a parsed batch (clicks and offsets in one atomic store batch, then
    /// fsync; then, for a serving replica, the changelog) on a blocking thread.
    fn store_batch(&self, parsed: Parsed, group: Option<Group>) -> StoreTask {
        let store = self.store.clone();
        let fleet = self.fleet.clone();
        let shutdown = self.shutdown.clone();
        let (changes, offsets, n) = (parsed.changes, parsed.offsets.clone(), parsed.messages);
        let replayed = parsed.replayed;
        let handle = tokio::task::spawn_blocking(move || {
            let _batch = fleet
                .as_ref()
                .map(|f| f.batch.lock().unwrap_or_else(|e| e.into_inner()));
            let a = store.apply_changes(&changes, &offsets, n)?;
            crate::fault::crash_point("ingest.applied");
            store.flush()?;
            crate::fault::crash_point("ingest.flushed");
            if let Some(f) = &fleet {
                write_changelog(f, &store, &a, &replayed, &offsets, group, &shutdown)?;
                crate::fault::crash_point("ingest.changelog");
            }
            anyhow::Ok(a)
        });
        StoreTask {
            handle,
            offsets: parsed.offsets,
            received: parsed.received,
            forget_requested: parsed.forget_requested,
        }
    }

    /// After a batch is stored: commits its offsets to Kafka, tells the activity record and the
    /// online evaluation, updates the metrics. A store failure ends ingestion (nothing is
    /// committed).
    fn finish_batch(
        &self,
        consumer: &StreamConsumer<IngestContext>,
        task: &StoreTask,
        done: Result<Result<Applied>, tokio::task::JoinError>,
    ) -> Result<()> {
        let applied = done
            .context("store task failed")?
            .context("cannot store a batch")?;
        let mut tpl = TopicPartitionList::new();
        for o in &task.offsets {
            if self
                .fleet
                .as_ref()
                .is_some_and(|f| !f.ownership.owns(o.partition))
            {
                continue;
            }
            let _ = tpl.add_partition_offset(&o.topic, o.partition, Offset::Offset(o.next_offset));
        }
        if tpl.count() == 0 {
        } else if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
            debug!(error = %e, "offset commit to Kafka failed (the store holds the offsets)");
        }
        self.online.clicked(&applied.new_pairs, &self.metrics);
        self.forgotten(&applied, &task.forget_requested);
        let dropped = self.activity.batch_stored(
            &applied.changed_users,
            applied.new_interactions,
            task.received,
        );
        let m = &self.metrics;
        m.ingest_batches.inc();
        m.events_duplicate.inc_by(applied.duplicates);
        m.items_excluded.inc_by(applied.excluded);
        m.dirty_users_dropped.inc_by(dropped);
        m.set_store_counts(self.store.counts());
        m.store_index_capacity.set(self.store.index_capacity_used());
        if applied.quarantined > 0 {
            m.store_quarantined.inc_by(applied.quarantined);
            error!(
                records = applied.quarantined,
                "damaged user records were moved aside (quarantine keys 'Q'); their users start again"
            );
        }
        Ok(())
    }

    /// Users a stored batch forgot: nothing of them is kept in memory either, their
    /// recommendation is withdrawn (the scorer publishes a tombstone), and the time since each
    /// request was produced is measured.
    fn forgotten(&self, applied: &Applied, requested: &[i64]) {
        if applied.forgotten.is_empty() {
            return;
        }
        for f in &applied.forgotten {
            if let Some(u) = f.index {
                self.online.forget(u);
            }
        }
        self.activity.forgotten(&applied.forgotten);
        let now = crate::wire::now_ms() as i64;
        for &at in requested {
            let seconds = (now - at).max(0) as f64 / 1000.0;
            self.metrics.forget_seconds.observe(seconds);
        }
        self.metrics
            .users_forgotten
            .inc_by(applied.forgotten.len() as u64);
        info!(
            users = applied.forgotten.len(),
            "users forgotten: their histories are deleted"
        );
    }

    /// Waits for the batch being stored, if any, and finishes it.
    async fn finish_stored(
        &self,
        consumer: &StreamConsumer<IngestContext>,
        storing: &mut Option<StoreTask>,
    ) -> Result<()> {
        if let Some(mut task) = storing.take() {
            let done = (&mut task.handle).await;
            self.finish_batch(consumer, &task, done)?;
        }
        Ok(())
    }

    /// At shutdown: one synchronous commit of the offsets the store holds for the partitions
    /// this instance owns.
    fn commit_what_is_stored(&self, consumer: &StreamConsumer<IngestContext>) {
        let owned: Vec<(String, i32)> = consumer
            .assignment()
            .map(|a| {
                a.elements()
                    .iter()
                    .map(|e| (e.topic().to_string(), e.partition()))
                    .collect()
            })
            .unwrap_or_default();
        let Ok(offsets) = self.store.stored_offsets() else {
            return;
        };
        let mut tpl = TopicPartitionList::new();
        for o in offsets
            .iter()
            .filter(|o| owned.contains(&(o.topic.clone(), o.partition)))
        {
            let _ = tpl.add_partition_offset(&o.topic, o.partition, Offset::Offset(o.next_offset));
        }
        if tpl.count() > 0 {
            if let Err(e) = consumer.commit(&tpl, CommitMode::Sync) {
                debug!(error = %e, "final offset commit failed (the store holds the offsets)");
            }
        }
    }
}

/// `max.poll.interval.ms` of the group consumer unless `[kafka.properties]` sets it: 15 minutes.
const MAX_POLL_INTERVAL_MS: &str = "900000";

/// The longest a restore may take: four fifths of the consumer's `max.poll.interval.ms`, so a
/// restore that would outlast the group's patience fails with a clear error (the replica stops,
/// not ready, and owns nothing of it) instead of being evicted mid-restore while the partition
/// moves on to another owner.
fn restore_limit(k: &KafkaConfig) -> Duration {
    let ms = k
        .properties
        .get("max.poll.interval.ms")
        .map_or(MAX_POLL_INTERVAL_MS, String::as_str)
        .parse::<u64>()
        .unwrap_or(300_000);
    Duration::from_millis(ms / 5 * 4)
}

/// How long a fenced changelog transaction is tried again with the consumer's metadata of now.
const REFRESH_FOR: Duration = Duration::from_secs(5);

/// The consumer group's metadata when a batch was consumed, and the consumer to ask again.
struct Group {
    metadata: rdkafka::consumer::ConsumerGroupMetadata,
    consumer: Arc<StreamConsumer<IngestContext>>,
}

/// After a serving replica stored a batch: every changed user's history (and every user of a
/// re-consumed event, or left out by a fenced transaction before; a tombstone for each user
/// forgotten) to the changelog, then each owned partition's marker, with the batch's clicks
/// offsets, in one transaction. Partitions revoked meanwhile are left out (the revocation
/// waited for this batch only if it came later). A transaction the broker fences (the group
/// moved on since the batch was consumed) is aborted: the store keeps the batch, its users are
/// written with the next batch if their partitions are still owned, and otherwise the next
/// owner re-consumes the clicks from the last committed marker.
fn write_changelog(
    fleet: &Fleet,
    store: &Store,
    applied: &Applied,
    replayed: &[String],
    offsets: &[PartitionOffset],
    group: Option<Group>,
    shutdown: &Shutdown,
) -> Result<()> {
    let (ids, users, markers) = batch_records(fleet, store, applied, replayed, offsets)?;
    let written = commit_batch(fleet, &users, &markers, offsets, group, shutdown);
    let positions = match written {
        Ok(p) => p,
        Err(WriteError::Fenced(e)) => {
            fleet.transactions.with_label_values(&["fenced"]).inc();
            warn!(error = %e, users = ids.len(), "the changelog transaction was fenced (the consumer group moved on): aborted; its users are written again with the next batch of a partition still owned");
            *fleet.unwritten.lock().unwrap_or_else(|e| e.into_inner()) = ids;
            return Ok(());
        }
        Err(e) if shutdown.is_set() => {
            // stored but not in the changelog: the next owner re-consumes from the last marker
            warn!(error = %e, "shutdown before the changelog had the last batch");
            return Ok(());
        }
        Err(e) => return Err(anyhow::anyhow!("cannot write the changelog: {e}")),
    };
    fleet.transactions.with_label_values(&["committed"]).inc();
    note_written(fleet, store, positions)
}

/// A stored batch's changelog records: the ids of every user to write (changed, re-consumed,
/// forgotten, left out by a fenced transaction before), the records of those in partitions still
/// owned (a tombstone for a user the store no longer holds), and each owned partition's marker.
fn batch_records(
    fleet: &Fleet,
    store: &Store,
    applied: &Applied,
    replayed: &[String],
    offsets: &[PartitionOffset],
) -> Result<(Vec<String>, Vec<UserRecord>, Vec<Marker>)> {
    let owned = |p: i32| fleet.ownership.epoch(p);
    let mut ids: Vec<String> = Vec::with_capacity(applied.changed_users.len() + replayed.len());
    for &u in &applied.changed_users {
        if let Some(id) = store.user_id(u)? {
            ids.push(id);
        }
    }
    ids.extend(replayed.iter().cloned());
    ids.extend(applied.forgotten.iter().map(|f| f.user.clone()));
    ids.append(&mut fleet.unwritten.lock().unwrap_or_else(|e| e.into_inner()));
    ids.sort_unstable();
    ids.dedup();
    let mut users = Vec::with_capacity(ids.len());
    for user in &ids {
        let partition = fleet.ownership.partition_of(user);
        if owned(partition).is_some() {
            // a user the store no longer holds was forgotten: a tombstone
            let history = store.history_record(user)?;
            users.push(UserRecord {
                partition,
                user: user.clone(),
                history,
            });
        }
    }
    let markers: Vec<Marker> = offsets
        .iter()
        .filter_map(|o| {
            owned(o.partition).map(|epoch| Marker {
                partition: o.partition,
                next_offset: o.next_offset,
                epoch,
            })
        })
        .collect();
    Ok((ids, users, markers))
}

/// Writes a batch's records and markers in one transaction with the owned partitions' clicks
/// offsets and the group's metadata from when the batch was consumed. The group may only have
/// moved on to a generation this replica is still a member of (any rebalance does that): for
/// [`REFRESH_FOR`] a fenced transaction is tried again with the consumer's metadata of now. A
/// member the group dropped cannot rejoin while this batch holds the revocation back, so its
/// metadata stays refused.
fn commit_batch(
    fleet: &Fleet,
    users: &[UserRecord],
    markers: &[Marker],
    offsets: &[PartitionOffset],
    group: Option<Group>,
    shutdown: &Shutdown,
) -> Result<Vec<(i32, ChangelogPosition)>, WriteError> {
    let consumed = |group| {
        let mut tpl = TopicPartitionList::new();
        for o in offsets.iter().filter(|o| fleet.ownership.owns(o.partition)) {
            let _ = tpl.add_partition_offset(&o.topic, o.partition, Offset::Offset(o.next_offset));
        }
        Consumed {
            offsets: tpl,
            group,
        }
    };
    let (mut current, consumer) = match group {
        Some(g) => (Some(consumed(g.metadata)), Some(g.consumer)),
        None => (None, None),
    };
    let deadline = Instant::now() + REFRESH_FOR;
    loop {
        let attempt = fleet
            .changelog
            .write(users, markers, current.as_ref(), || !shutdown.is_set());
        let fresh = match (&attempt, &consumer) {
            (Err(WriteError::Fenced(_)), Some(c)) if Instant::now() < deadline => {
                c.group_metadata()
            }
            _ => None,
        };
        let Some(metadata) = fresh else {
            return attempt;
        };
        info!("the changelog transaction met a newer group generation: trying again with the consumer's metadata of now");
        current = Some(consumed(metadata));
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// After a committed batch: each partition's changelog position, the time its copy was last in
/// sync (its only writer wrote it), and the end of a replay the batch reached.
fn note_written(
    fleet: &Fleet,
    store: &Store,
    positions: Vec<(i32, ChangelogPosition)>,
) -> Result<()> {
    let mut replay = fleet.replay_until.lock().unwrap_or_else(|e| e.into_inner());
    let now = crate::wire::now_ms();
    for (p, position) in positions {
        store.set_changelog_position(p, position)?;
        store.set_synced(p, now)?;
        if replay
            .get(&p)
            .is_some_and(|&until| position.clicks_next >= until)
        {
            replay.remove(&p);
        }
    }
    Ok(())
}

/// Asks the cluster about the consumer group every 2 s and keeps "brokers up" (part of
/// readiness) true only while it answers within 3 s: a broker that is down, unreachable or
/// frozen turns the daemon not-ready without waiting for client timeouts.
pub struct BrokerProbe {
    pub group_id: String,
    pub health: Arc<Health>,
    pub shutdown: Arc<Shutdown>,
}

impl BrokerProbe {
    pub async fn run(self, producers: Arc<Producers>) -> Result<()> {
        let mut shutdown = self.shutdown.subscribe();
        let mut was_up = true;
        loop {
            let (p, group) = (producers.get(), self.group_id.clone());
            // a small request answered by the group coordinator (a topic metadata request could
            // auto-create the topic on some brokers)
            let probe = tokio::task::spawn_blocking(move || {
                use rdkafka::producer::Producer;
                p.client()
                    .fetch_group_list(Some(&group), Duration::from_secs(3))
                    .map(|_| ())
            });
            let up = matches!(probe.await, Ok(Ok(())));
            self.health.set_broker_up(up);
            if up != was_up {
                if up {
                    info!("kafka brokers reachable again");
                } else {
                    warn!("kafka brokers unreachable: not ready until they answer");
                }
                was_up = up;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                _ = shutdown.changed() => return Ok(()),
            }
        }
    }
}
