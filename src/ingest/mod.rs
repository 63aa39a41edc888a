//! Events in, the first stage: an rdkafka consumer in a consumer group on the clicks topic.
//! Messages are handled in batches: parsed (`wire`), bad ones dead-lettered (delivery awaited),
//! good ones stored with the next offset of each partition in one atomic `store` batch, the store
//! flushed, then offsets committed to Kafka (for lag visibility); each stored batch is reported to
//! the `activity` record (which wakes the scorer and feeds training) and the online evaluation.
//! How partitions are owned is one interface ([`Partitions`]): in role `all` each assigned
//! partition starts from the store's offset, so a crash anywhere loses no acknowledged click and
//! counts none twice; a serving replica's partitions are paused on assignment and restored beside
//! the consumer loop (which keeps polling) before their clicks are consumed.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
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
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

mod dead_letter;
mod items;
mod partitions;

use dead_letter::{DeadLetter, DeadLetterWriter};
pub use items::ItemsReader;
pub use partitions::{Group, Partitions, Standalone, Start, Take};

use crate::activity::Activity;
use crate::config::KafkaConfig;
use crate::health::Health;
use crate::kafka::{client_config, client_error};
use crate::metrics::Metrics;
use crate::online::OnlineEval;
use crate::shutdown::Shutdown;
use crate::store::{Applied, Change, PartitionOffset, Store};
use crate::wire::{parse_event, Event};

/// What ingestion uses: the clicks topic's settings, the store it writes, how it owns partitions
/// (role `all` or a serving replica), the activity record and online evaluation it tells about
/// each stored batch, and the health it reports.
pub struct Ingest {
    pub kafka: KafkaConfig,
    /// What each event type means (weights, negatives).
    pub event_types: crate::wire::EventTypes,
    pub partitions: Arc<dyn Partitions>,
    pub store: Arc<Store>,
    pub activity: Arc<Activity>,
    pub online: Arc<OnlineEval>,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    pub shutdown: Arc<Shutdown>,
}

/// Consumer callbacks: where an assigned partition starts (or its pause until restored), the
/// assignment, lag and broker health.
pub struct IngestContext {
    partitions: Arc<dyn Partitions>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    /// Partitions to restore, handed from the rebalance callback to the consumer task.
    restores: mpsc::UnboundedSender<(String, i32)>,
    restores_rx: Mutex<Option<mpsc::UnboundedReceiver<(String, i32)>>>,
}

/// A partition is caught up when at most this many of its messages are left to fetch.
const CAUGHT_UP_LAG: i64 = 1000;

impl IngestContext {
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

    /// Newly assigned partitions: each starts where [`Partitions::assigned`] says; those to
    /// restore are paused and handed to the consumer task (not ready meanwhile).
    fn assign(
        &self,
        consumer: &BaseConsumer<Self>,
        tpl: &mut TopicPartitionList,
        incremental: bool,
    ) {
        let elems: Vec<(String, i32)> = tpl
            .elements()
            .iter()
            .map(|e| (e.topic().to_string(), e.partition()))
            .collect();
        let (mut restore, mut stored) = (TopicPartitionList::new(), TopicPartitionList::new());
        for (topic, partition) in &elems {
            match self.partitions.assigned(topic, *partition) {
                Start::At(start) => {
                    if let Err(e) = tpl.set_partition_offset(topic, *partition, start) {
                        error!(error = %e, topic, partition, "cannot set the start offset");
                    }
                    if let Offset::Offset(_) = start {
                        let _ = stored.add_partition_offset(topic, *partition, start);
                    }
                }
                Start::Restore => {
                    restore.add_partition(topic, *partition);
                }
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
        // the group learns where the store is at once (its lag metric and tools read the group's
        // offsets), also for a partition with nothing new to consume; the store stays the truth
        if stored.count() > 0 {
            if let Err(e) = consumer.commit(&stored, CommitMode::Async) {
                debug!(error = %e, "committing the stored offsets at assignment failed");
            }
        }
        if restore.count() > 0 {
            if let Err(e) = consumer.pause(&restore) {
                error!(error = %e, "cannot pause partitions to restore");
            }
            for e in restore.elements() {
                self.health.restoring(true);
                self.metrics.partitions_restoring.inc();
                let _ = self.restores.send((e.topic().to_string(), e.partition()));
            }
        }
        self.note_assignment(consumer);
        info!(partitions = ?elems.iter().map(|e| e.1).collect::<Vec<_>>(), restoring = restore.count(), "partitions assigned");
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
                self.assign(consumer, tpl, incremental)
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let revoked: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
                self.partitions.revoked(Some(&revoked));
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
                self.partitions.revoked(None);
                let _ = consumer.unassign();
                self.health.revoked();
                self.partitions.assignment_changed();
            }
        }
    }
}

impl IngestContext {
    /// Readiness and the gauge follow the assignment (with cooperative rebalancing, each
    /// callback adds or takes away some partitions).
    fn note_assignment(&self, consumer: &BaseConsumer<Self>) {
        let n = consumer.assignment().map(|a| a.count()).unwrap_or(0);
        self.health.assigned(n);
        self.metrics.partitions_assigned.set(n as i64);
        self.metrics.note_owned();
        self.partitions.assignment_changed();
    }
}

impl Ingest {
    /// Creates the group consumer, subscribed to the clicks topic.
    pub fn consumer(&self) -> Result<StreamConsumer<IngestContext>> {
        let k = &self.kafka;
        let (strategy, instance) = self.partitions.membership();
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
            ],
            &k.properties,
        );
        if let Some(id) = instance {
            // static membership: a replica restarted within the session timeout keeps its
            // partitions
            config.set("group.instance.id", id);
        }
        let (restores, restores_rx) = mpsc::unbounded_channel();
        let consumer: StreamConsumer<IngestContext> = config
            .create_with_context(IngestContext {
                partitions: self.partitions.clone(),
                metrics: self.metrics.clone(),
                health: self.health.clone(),
                restores,
                restores_rx: Mutex::new(Some(restores_rx)),
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

/// What hears of a batch as soon as it is in the store (fsynced), before whatever the
/// partitions' owner adds (a serving replica's changelog transaction): the online evaluation
/// scores the batch's clicks against the recommendations they followed, forgotten users leave
/// memory, and the scorer learns whom to score, so a click's recommendation never waits on the
/// changelog. A crash before the changelog commits loses nothing: the clicks' offsets are
/// committed only after it, so they are consumed again.
struct Stored {
    online: Arc<OnlineEval>,
    activity: Arc<Activity>,
    metrics: Arc<Metrics>,
    received: Instant,
    /// When each forget request in the batch was produced (ms since the epoch).
    forget_requested: Vec<i64>,
}

impl Stored {
    fn announce(&self, applied: &Applied, started: Instant) {
        let m = &self.metrics;
        m.click_stage
            .with_label_values(&["store"])
            .observe(started.elapsed().as_secs_f64());
        self.online.clicked(&applied.new_pairs, m);
        self.forgotten(applied);
        let dropped = self.activity.batch_stored(
            &applied.changed_users,
            applied.new_interactions,
            self.received,
        );
        m.dirty_users_dropped.inc_by(dropped);
    }

    /// Users a stored batch forgot: nothing of them is kept in memory either, their
    /// recommendation is withdrawn (the scorer publishes a tombstone), and the time since each
    /// request was produced is measured.
    fn forgotten(&self, applied: &Applied) {
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
        for &at in &self.forget_requested {
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
}

/// A batch being written to the store.
struct StoreTask {
    handle: tokio::task::JoinHandle<Result<Applied>>,
    offsets: Vec<PartitionOffset>,
}

/// A partition's restore running on a blocking thread.
struct RestoreTask {
    partition: i32,
    handle: tokio::task::JoinHandle<Result<Option<i64>>>,
}

impl Ingest {
    /// The ingest loop; returns at shutdown after committing what it stored. While one batch is
    /// written to the store the next is consumed and parsed; batches are stored one at a time,
    /// in order, and each is committed to Kafka only once stored. Partitions to restore are
    /// restored one at a time beside it, while the consumer keeps polling.
    pub async fn run(
        self,
        consumer: StreamConsumer<IngestContext>,
        producers: Arc<Producers>,
    ) -> Result<()> {
        let mut restores = consumer
            .context()
            .restores_rx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .context("the consumer's restore queue was taken already")?;
        // shared with the restores and the changelog writer, which ask for the group's metadata
        let consumer = Arc::new(consumer);
        let mut shutdown = self.shutdown.subscribe();
        let mut storing: Option<StoreTask> = None;
        let mut to_restore: VecDeque<(String, i32)> = VecDeque::new();
        let mut restoring: Option<RestoreTask> = None;
        self.partitions.started()?;
        let mut cleanup = tokio::time::interval(Duration::from_secs(5));
        loop {
            // wait for the first message of a batch (finishing the batch being stored, and
            // restores, meanwhile)
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
                Some(next) = restores.recv() => {
                    to_restore.push_back(next);
                    self.next_restore(&consumer, &mut to_restore, &mut restoring);
                    continue;
                }
                done = async { restoring.as_mut().map(|t| &mut t.handle).expect("guarded").await },
                    if restoring.is_some() =>
                {
                    if let Some(task) = restoring.take() {
                        self.restored(task.partition, done)?;
                    }
                    self.next_restore(&consumer, &mut to_restore, &mut restoring);
                    continue;
                }
                _ = cleanup.tick() => {
                    self.tick().await?;
                    continue;
                }
                _ = shutdown.changed() => break,
            };
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
            // the group's generation this batch was consumed in: a serving replica's changelog
            // transaction commits only if the group has not moved on since
            let group = group_of(&consumer);
            // one batch in the store at a time, in consumption order
            self.finish_stored(&consumer, &mut storing).await?;
            storing = Some(self.store_batch(parsed, group));
        }
        self.finish_stored(&consumer, &mut storing).await?;
        self.commit_what_is_stored(&consumer);
        self.partitions.stop();
        info!("ingest stopped");
        Ok(())
    }

    /// Starts the next queued restore if none runs: on a blocking thread, the partition is
    /// restored and claimed, then consumed from where its clicks resume.
    fn next_restore(
        &self,
        consumer: &Arc<StreamConsumer<IngestContext>>,
        queue: &mut VecDeque<(String, i32)>,
        restoring: &mut Option<RestoreTask>,
    ) {
        if restoring.is_some() {
            return;
        }
        let Some((topic, partition)) = queue.pop_front() else {
            return;
        };
        let (partitions, consumer) = (self.partitions.clone(), consumer.clone());
        let handle = tokio::task::spawn_blocking(move || {
            let Some(group) = group_of(&consumer) else {
                anyhow::bail!("partition {partition}: the consumer has no group metadata");
            };
            let Some(resume) = partitions.restore(&topic, partition, group)? else {
                return Ok(None);
            };
            if let Err(e) = seek_when_fetching(&consumer, &topic, partition, resume) {
                if partitions.take(partition, resume) == Take::Skip {
                    // revoked since its claim
                    return Ok(None);
                }
                anyhow::bail!("partition {partition}: cannot start consuming at {resume}: {e}");
            }
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition(&topic, partition);
            consumer
                .resume(&tpl)
                .with_context(|| format!("partition {partition}: cannot resume consuming"))?;
            Ok(Some(resume))
        });
        *restoring = Some(RestoreTask { partition, handle });
    }

    /// A restore ended: the partition is consumed (or was revoked meanwhile); a failed restore
    /// ends ingestion with its error, the partition unowned and the replica not ready, so the
    /// daemon stops (and is restarted) rather than running without it.
    fn restored(
        &self,
        partition: i32,
        done: Result<Result<Option<i64>>, tokio::task::JoinError>,
    ) -> Result<()> {
        let result = done
            .context("the restore task failed")
            .and_then(|r| r)
            .with_context(|| format!("cannot restore partition {partition} from the changelog"));
        if let Err(e) = result {
            error!(error = %format!("{e:#}"), "restore failed: ingestion stops (a restart restores again)");
            return Err(e);
        }
        self.metrics.partitions_restoring.dec();
        self.metrics.note_owned();
        self.health.restoring(false);
        self.partitions.assignment_changed();
        Ok(())
    }

    /// Every few seconds: the partitions' housekeeping, on a blocking thread.
    async fn tick(&self) -> Result<()> {
        let partitions = self.partitions.clone();
        tokio::task::spawn_blocking(move || partitions.tick())
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
    /// its user's, and notes the users of re-consumed clicks (see [`Take`]).
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
            let replay = match self.partitions.take(p, offset) {
                Take::Skip => continue,
                Take::New => false,
                Take::Replay => true,
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

    /// A user's event must arrive on the partition that owns them (see [`Partitions::check`]):
    /// one that arrived on another (a producer keying by something else, or with another
    /// partitioner) is refused, not stored where no pull finds it.
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
        match self.partitions.check(user, partition) {
            Ok(()) => Ok(event),
            Err(why) => Err(("wrong_partition", why)),
        }
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

    /// Starts writing a parsed batch (clicks and offsets in one atomic store batch, then fsync;
    /// then whatever the partitions' owner adds, a serving replica's changelog) on a blocking
    /// thread.
    fn store_batch(&self, parsed: Parsed, group: Option<Group>) -> StoreTask {
        let (store, partitions) = (self.store.clone(), self.partitions.clone());
        let (changes, offsets, n) = (parsed.changes, parsed.offsets.clone(), parsed.messages);
        let replayed = parsed.replayed;
        let stored = Stored {
            online: self.online.clone(),
            activity: self.activity.clone(),
            metrics: self.metrics.clone(),
            received: parsed.received,
            forget_requested: parsed.forget_requested,
        };
        let handle = tokio::task::spawn_blocking(move || {
            let mut apply = || {
                let started = Instant::now();
                let a = store.apply_changes(&changes, &offsets, n)?;
                crate::fault::crash_point("ingest.applied");
                store.flush()?;
                crate::fault::crash_point("ingest.flushed");
                stored.announce(&a, started);
                Ok(a)
            };
            partitions.store(&mut apply, &replayed, &offsets, group)
        });
        StoreTask {
            handle,
            offsets: parsed.offsets,
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
            if !self.partitions.commits(o.partition) {
                continue;
            }
            let _ = tpl.add_partition_offset(&o.topic, o.partition, Offset::Offset(o.next_offset));
        }
        if tpl.count() == 0 {
        } else if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
            debug!(error = %e, "offset commit to Kafka failed (the store holds the offsets)");
        }
        let m = &self.metrics;
        m.ingest_batches.inc();
        m.events_duplicate.inc_by(applied.duplicates);
        m.items_excluded.inc_by(applied.excluded);
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

/// How rdkafka words a seek of a partition the consumer does not fetch yet (librdkafka's
/// `ERR__STATE`, in `rd_kafka_err2str`'s words).
const NOT_FETCHED_YET: &str = "Local: Erroneous state";

/// Seeks a restored partition to where its clicks resume, once the consumer fetches it: the
/// consumer starts a partition only when its committed offsets are stable, which an earlier
/// owner's open transaction (a zombie frozen mid-write) delays until the broker aborts it.
fn seek_when_fetching(
    consumer: &StreamConsumer<IngestContext>,
    topic: &str,
    partition: i32,
    resume: i64,
) -> rdkafka::error::KafkaResult<()> {
    let give_up = Instant::now() + crate::kafka::CHANGELOG_TXN_TIMEOUT * 2;
    let mut waits = crate::retry::backoff(Duration::from_millis(50), Duration::from_secs(1));
    let mut told = false;
    loop {
        let seek = consumer.seek(
            topic,
            partition,
            Offset::Offset(resume),
            Duration::from_secs(10),
        );
        match seek {
            Err(KafkaError::Seek(why)) if why == NOT_FETCHED_YET && Instant::now() < give_up => {
                if !told {
                    info!(partition, "waiting for the partition's committed offsets to be stable (an earlier owner's transaction is open until the broker aborts it)");
                    told = true;
                }
                std::thread::sleep(waits.next().unwrap_or(Duration::from_secs(1)));
            }
            other => return other,
        }
    }
}

/// The consumer's group metadata now, with a way to ask again.
fn group_of(consumer: &Arc<StreamConsumer<IngestContext>>) -> Option<Group> {
    let again = consumer.clone();
    consumer.group_metadata().map(|metadata| Group {
        metadata,
        now: Arc::new(move || again.group_metadata()),
    })
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

#[cfg(test)]
mod tests {
    /// A seek refused because the partition is not fetched yet is told apart by librdkafka's
    /// words for `ERR__STATE`.
    #[test]
    fn a_seek_before_the_partition_is_fetched_is_recognised() {
        let words = rdkafka::error::RDKafkaErrorCode::State.to_string();
        assert!(words.contains(super::NOT_FETCHED_YET), "{words}");
    }
}
