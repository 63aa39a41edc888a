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

mod dead_letter;

use dead_letter::{DeadLetter, DeadLetterWriter};

use crate::activity::Activity;
use crate::config::KafkaConfig;
use crate::health::Health;
use crate::kafka::{client_config, client_error};
use crate::metrics::Metrics;
use crate::online::OnlineEval;
use crate::shutdown::Shutdown;
use crate::store::{Applied, Click, PartitionOffset, Store};
use crate::wire::{parse_event, Event};

/// What ingestion uses: the clicks topic's settings, the store it writes, the activity record
/// and online evaluation it tells about each stored batch, and the health it reports.
pub struct Ingest {
    pub kafka: KafkaConfig,
    pub store: Arc<Store>,
    pub activity: Arc<Activity>,
    pub online: Arc<OnlineEval>,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    pub shutdown: Arc<Shutdown>,
}

/// Consumer callbacks: seek to stored offsets on assignment, track assignment, lag and broker
/// health.
pub struct IngestContext {
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
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
        warn!(error = %error, reason, "kafka client error");
    }
}

impl ConsumerContext for IngestContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let elems: Vec<(String, i32)> = tpl
                    .elements()
                    .iter()
                    .map(|e| (e.topic().to_string(), e.partition()))
                    .collect();
                for (topic, partition) in &elems {
                    match self.store.stored_offset(topic, *partition) {
                        Ok(Some(o)) => {
                            if let Err(e) =
                                tpl.set_partition_offset(topic, *partition, Offset::Offset(o))
                            {
                                error!(error = %e, topic, partition, "cannot set the start offset");
                            }
                        }
                        Ok(None) => {
                            let _ = tpl.set_partition_offset(topic, *partition, Offset::Beginning);
                        }
                        Err(e) => error!(error = %e, "cannot read stored offsets"),
                    }
                }
                if let Err(e) = consumer.assign(tpl) {
                    error!(error = %e, "cannot assign partitions");
                }
                self.health.assigned(elems.len());
                self.metrics.partitions_assigned.set(elems.len() as i64);
                info!(partitions = ?elems.iter().map(|e| e.1).collect::<Vec<_>>(), "partitions assigned; resuming from stored offsets");
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                if let Err(e) = consumer.unassign() {
                    error!(error = %e, "cannot unassign partitions");
                }
                self.health.revoked();
                self.metrics.partitions_assigned.set(0);
                self.metrics.consumer_lag.reset();
                info!("partitions revoked");
            }
            other => {
                error!(error = ?other, "rebalance error");
                let _ = consumer.unassign();
                self.health.revoked();
            }
        }
    }
}

impl Ingest {
    /// Creates the group consumer, subscribed to the clicks topic.
    pub fn consumer(&self) -> Result<StreamConsumer<IngestContext>> {
        let k = &self.kafka;
        let consumer: StreamConsumer<IngestContext> = client_config(
            &k.brokers,
            &[
                ("group.id", &k.group_id),
                ("enable.auto.commit", "false"),
                ("enable.auto.offset.store", "false"),
                ("auto.offset.reset", "earliest"),
                ("partition.assignment.strategy", "range,roundrobin"),
                ("statistics.interval.ms", "5000"),
                ("session.timeout.ms", "10000"),
                ("heartbeat.interval.ms", "1000"),
                // how long a click may wait in the broker before a fetch returns it: 100 ms
                // keeps latency low without the empty-fetch storm shorter waits caused on a
                // broker busy with a training CPU (README "The data path")
                ("fetch.wait.max.ms", "100"),
                // reaching a partition's end is reported (readiness: caught up)
                ("enable.partition.eof", "true"),
            ],
            &k.properties,
        )
        .create_with_context(IngestContext {
            store: self.store.clone(),
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

/// A consumed batch, parsed: the clicks to store, the messages to dead-letter, and the next
/// offset of each partition it read.
struct Parsed {
    clicks: Vec<Click>,
    letters: Vec<DeadLetter>,
    offsets: Vec<PartitionOffset>,
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
        let mut shutdown = self.shutdown.subscribe();
        let mut storing: Option<StoreTask> = None;
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
            // one batch in the store at a time, in consumption order
            self.finish_stored(&consumer, &mut storing).await?;
            storing = Some(self.store_batch(parsed));
        }
        self.finish_stored(&consumer, &mut storing).await?;
        self.commit_what_is_stored(&consumer);
        info!("ingest stopped");
        Ok(())
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
    /// next offsets.
    fn parse_batch(&self, msgs: &[BorrowedMessage<'_>], received: Instant) -> Parsed {
        let k = &self.kafka;
        let mut clicks: Vec<Click> = Vec::with_capacity(msgs.len());
        let mut letters = Vec::new();
        let mut next: BTreeMap<(String, i32), i64> = BTreeMap::new();
        for m in msgs {
            self.metrics.events_consumed.inc();
            let e = next
                .entry((m.topic().to_string(), m.partition()))
                .or_insert(0);
            *e = (*e).max(m.offset() + 1);
            match parse_event(m.payload(), k.max_message_bytes, &k.positive_event_types) {
                Ok(Event::Click(c)) => clicks.push(c),
                Ok(Event::Ignored { .. }) => self.metrics.events_ignored.inc(),
                Err(r) => {
                    self.metrics
                        .events_rejected
                        .with_label_values(&[r.reason()])
                        .inc();
                    debug!(
                        partition = m.partition(),
                        offset = m.offset(),
                        reason = r.reason(),
                        "dead-lettering a message"
                    );
                    letters.push(DeadLetter {
                        topic: m.topic().to_string(),
                        partition: m.partition(),
                        offset: m.offset(),
                        key: m.key().map(|k| k.to_vec()),
                        payload: m.payload().map(|p| p.to_vec()).unwrap_or_default(),
                        reason: r.reason(),
                        detail: r.to_string(),
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
            clicks,
            letters,
            offsets,
            received,
            messages: msgs.len() as u64,
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

    /// Starts writing a parsed batch (clicks and offsets in one atomic store batch, then
    /// fsync) on a blocking thread.
    fn store_batch(&self, parsed: Parsed) -> StoreTask {
        let store = self.store.clone();
        let (clicks, offsets, n) = (parsed.clicks, parsed.offsets.clone(), parsed.messages);
        let handle = tokio::task::spawn_blocking(move || {
            let a = store.apply_consumed(&clicks, &offsets, n)?;
            crate::fault::crash_point("ingest.applied");
            store.flush()?;
            crate::fault::crash_point("ingest.flushed");
            anyhow::Ok(a)
        });
        StoreTask {
            handle,
            offsets: parsed.offsets,
            received: parsed.received,
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
            let _ = tpl.add_partition_offset(&o.topic, o.partition, Offset::Offset(o.next_offset));
        }
        if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
            debug!(error = %e, "offset commit to Kafka failed (the store holds the offsets)");
        }
        self.online.clicked(&applied.new_pairs, &self.metrics);
        let dropped = self.activity.batch_stored(
            &applied.changed_users,
            applied.new_interactions,
            task.received,
        );
        let m = &self.metrics;
        m.ingest_batches.inc();
        m.events_duplicate.inc_by(applied.duplicates);
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
