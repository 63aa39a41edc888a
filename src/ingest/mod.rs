//! Events in: an rdkafka consumer in a consumer group on the clicks topic. Messages are handled
//! in batches: parsed, bad ones dead-lettered (delivery awaited), good ones stored with the next
//! offset of each partition in one atomic store batch, the store flushed, then offsets committed
//! to Kafka (for lag visibility). On assignment each partition starts from the store's offset, so
//! a crash anywhere loses no acknowledged click and counts none twice.

pub mod event;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::ClientContext;
use tracing::{debug, error, info, warn};

use crate::daemon::Shared;
use crate::store::{Applied, Click, PartitionOffset};
use event::{parse_event, Event};

/// Consumer callbacks: seek to stored offsets on assignment, track assignment, lag and broker
/// health.
pub struct IngestContext {
    shared: Arc<Shared>,
}

impl ClientContext for IngestContext {
    fn stats(&self, stats: Statistics) {
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
                    self.shared
                        .metrics
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
            Some(rdkafka::types::RDKafkaErrorCode::AllBrokersDown)
        ) {
            self.shared.health.broker_up.store(false, Ordering::Release);
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
                    match self.shared.store.stored_offset(topic, *partition) {
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
                self.shared
                    .health
                    .partitions
                    .store(elems.len(), Ordering::Release);
                self.shared
                    .metrics
                    .partitions_assigned
                    .set(elems.len() as i64);
                info!(partitions = ?elems.iter().map(|e| e.1).collect::<Vec<_>>(), "partitions assigned; resuming from stored offsets");
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                if let Err(e) = consumer.unassign() {
                    error!(error = %e, "cannot unassign partitions");
                }
                self.shared.health.partitions.store(0, Ordering::Release);
                self.shared.metrics.partitions_assigned.set(0);
                self.shared.metrics.consumer_lag.reset();
                info!("partitions revoked");
            }
            other => {
                error!(error = ?other, "rebalance error");
                let _ = consumer.unassign();
                self.shared.health.partitions.store(0, Ordering::Release);
            }
        }
    }
}

/// The client configuration shared by every client: brokers plus the configured passthrough
/// librdkafka properties.
pub fn client_config(shared: &Shared) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &shared.config.kafka.brokers);
    for (k, v) in &shared.config.kafka.properties {
        c.set(k, v);
    }
    c
}

/// Creates the group consumer, subscribed to the clicks topic.
pub fn consumer(shared: Arc<Shared>) -> Result<StreamConsumer<IngestContext>> {
    let k = &shared.config.kafka;
    let mut c = client_config(&shared);
    c.set("group.id", &k.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("partition.assignment.strategy", "range,roundrobin")
        .set("statistics.interval.ms", "5000")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        // a click waits at most this long in the broker before a fetch returns it (librdkafka's
        // 500 ms default dominated click-to-recommendation latency on brokers that do not wake
        // waiting fetches). Not shorter: with 20 ms, Tansu on a CPU busy with training answered
        // fetches empty or with one message while thousands waited (consumption fell to ~150
        // clicks/s and stayed there), and its fetch handling took a core at 1k clicks/s
        .set("fetch.wait.max.ms", "100");
    // passthrough properties win over the defaults above
    for (key, v) in &k.properties {
        c.set(key, v);
    }
    let topic = k.clicks_topic.clone();
    let consumer: StreamConsumer<IngestContext> = c
        .create_with_context(IngestContext {
            shared: shared.clone(),
        })
        .map_err(|e| client_error("cannot create the Kafka consumer", e))?;
    consumer
        .subscribe(&[&topic])
        .context("cannot subscribe to the clicks topic")?;
    Ok(consumer)
}

/// Creates a producer (dead letters, recommendations).
pub fn producer(shared: &Shared) -> Result<FutureProducer> {
    let mut c = client_config(shared);
    // recommendations are latency-bound: batch for 1 ms at most
    c.set("linger.ms", "1").set("message.timeout.ms", "30000");
    for (key, v) in &shared.config.kafka.properties {
        c.set(key, v);
    }
    c.create()
        .map_err(|e| client_error("cannot create the Kafka producer", e))
}

/// A client-creation error that never shows a property's value (it may be a password).
fn client_error(what: &str, e: KafkaError) -> anyhow::Error {
    match e {
        KafkaError::ClientConfig(_, desc, key, value) => {
            let desc = if value.is_empty() {
                desc
            } else {
                desc.replace(&value, "<redacted>")
            };
            anyhow::anyhow!("{what}: kafka property {key:?}: {desc}")
        }
        e => anyhow::Error::new(e).context(what.to_string()),
    }
}

struct DeadLetter {
    topic: String,
    partition: i32,
    offset: i64,
    key: Option<Vec<u8>>,
    payload: Vec<u8>,
    reason: &'static str,
    detail: String,
}

/// Delivers the dead letters, retrying; false when shutdown came first (the batch must then not
/// be stored: it is consumed again, dead letters included, after the restart).
async fn send_dead_letters(
    shared: &Shared,
    producer: &FutureProducer,
    letters: &[DeadLetter],
) -> bool {
    let topic = &shared.config.kafka.dead_letter_topic;
    for l in letters {
        let (partition, offset) = (l.partition.to_string(), l.offset.to_string());
        let mut attempt = 0u32;
        loop {
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: "multivaed.source.topic",
                    value: Some(l.topic.as_bytes()),
                })
                .insert(Header {
                    key: "multivaed.source.partition",
                    value: Some(partition.as_bytes()),
                })
                .insert(Header {
                    key: "multivaed.source.offset",
                    value: Some(offset.as_bytes()),
                })
                .insert(Header {
                    key: "multivaed.error",
                    value: Some(l.reason.as_bytes()),
                })
                .insert(Header {
                    key: "multivaed.error.detail",
                    value: Some(l.detail.as_bytes()),
                });
            let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic)
                .payload(&l.payload[..])
                .headers(headers);
            if let Some(k) = &l.key {
                record = record.key(&k[..]);
            }
            match producer.send(record, Duration::from_secs(10)).await {
                Ok(_) => {
                    shared.metrics.events_dead_lettered.inc();
                    break;
                }
                Err((e, _)) => {
                    attempt += 1;
                    // the offset is not stored until the dead letter is delivered: keep trying
                    warn!(error = %e, attempt, "cannot write a dead letter; retrying");
                    if shared.shutdown.is_set() {
                        return false;
                    }
                    tokio::time::sleep(Duration::from_millis(200 * attempt.min(25) as u64)).await;
                }
            }
        }
    }
    true
}

/// Asks the cluster about the consumer group every 2 s and keeps `broker_up` (part of
/// `/readyz`) true only while it answers within 3 s: a broker that is down, unreachable or
/// frozen turns the daemon not-ready without waiting for client timeouts.
pub async fn probe_brokers(shared: Arc<Shared>, producer: FutureProducer) {
    let mut shutdown = shared.shutdown.subscribe();
    let mut was_up = true;
    loop {
        let (p, group) = (producer.clone(), shared.config.kafka.group_id.clone());
        // a small request answered by the group coordinator (a topic metadata request could
        // auto-create the topic on some brokers)
        let probe = tokio::task::spawn_blocking(move || {
            use rdkafka::producer::Producer;
            p.client()
                .fetch_group_list(Some(&group), Duration::from_secs(3))
                .map(|_| ())
        });
        let up = matches!(probe.await, Ok(Ok(())));
        shared.health.broker_up.store(up, Ordering::Release);
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
            _ = shutdown.changed() => return,
        }
    }
}

/// A batch being written to the store.
struct StoreTask {
    handle: tokio::task::JoinHandle<Result<Applied>>,
    offsets: Vec<PartitionOffset>,
    /// When its messages were consumed (the scorer's latency counts from here).
    received: Instant,
}

/// After a batch is stored: commits its offsets to Kafka, tells the scorer and the online
/// evaluation, updates the metrics. A store failure ends ingestion (nothing is committed).
fn finish_batch(
    shared: &Arc<Shared>,
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
    shared
        .last_recs
        .observe(&applied.new_pairs, &shared.metrics);
    shared.metrics.ingest_batches.inc();
    shared.metrics.events_duplicate.inc_by(applied.duplicates);
    shared
        .new_interactions
        .fetch_add(applied.new_interactions, Ordering::AcqRel);
    shared.recently_active.note(&applied.changed_users);
    let dropped = shared.dirty.mark(&applied.changed_users, task.received);
    shared.metrics.dirty_users_dropped.inc_by(dropped);
    let counts = shared.store.counts();
    shared.metrics.store_users.set(counts.users as i64);
    shared.metrics.store_items.set(counts.items as i64);
    shared
        .metrics
        .store_interactions
        .set(counts.interactions as i64);
    Ok(())
}

/// Waits for the batch being stored, if any, and finishes it.
async fn finish_stored(
    shared: &Arc<Shared>,
    consumer: &StreamConsumer<IngestContext>,
    storing: &mut Option<StoreTask>,
) -> Result<()> {
    if let Some(mut task) = storing.take() {
        let done = (&mut task.handle).await;
        finish_batch(shared, consumer, &task, done)?;
    }
    Ok(())
}

/// The ingest loop; returns at shutdown after committing what it stored.
pub async fn run(
    shared: Arc<Shared>,
    consumer: StreamConsumer<IngestContext>,
    producer: FutureProducer,
) -> Result<()> {
    let k = shared.config.kafka.clone();
    let mut shutdown = shared.shutdown.subscribe();
    // the batch being written to the store while the next one is consumed and parsed; batches
    // are stored one at a time, in order, and each is committed to Kafka only once stored
    let mut storing: Option<StoreTask> = None;
    loop {
        // wait for the first message of a batch (finishing the batch being stored meanwhile)
        let first = tokio::select! {
            m = consumer.recv() => m,
            done = async { storing.as_mut().map(|t| &mut t.handle).expect("guarded").await },
                if storing.is_some() =>
            {
                if let Some(task) = storing.take() {
                    finish_batch(&shared, &consumer, &task, done)?;
                }
                continue;
            }
            _ = shutdown.changed() => break,
        };
        let mut msgs: Vec<BorrowedMessage<'_>> = Vec::with_capacity(k.batch_size);
        match first {
            Ok(m) => msgs.push(m),
            Err(e) => {
                warn!(error = %e, "consume error");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        }
        let deadline = tokio::time::Instant::now() + k.batch_timeout;
        while msgs.len() < k.batch_size {
            match tokio::time::timeout_at(deadline, consumer.recv()).await {
                Ok(Ok(m)) => msgs.push(m),
                Ok(Err(e)) => {
                    warn!(error = %e, "consume error");
                    break;
                }
                Err(_) => break,
            }
        }
        let received = Instant::now();
        shared.health.broker_up.store(true, Ordering::Release);
        let mut clicks: Vec<Click> = Vec::with_capacity(msgs.len());
        let mut letters = Vec::new();
        let mut next: BTreeMap<(String, i32), i64> = BTreeMap::new();
        for m in &msgs {
            shared.metrics.events_consumed.inc();
            let e = next
                .entry((m.topic().to_string(), m.partition()))
                .or_insert(0);
            *e = (*e).max(m.offset() + 1);
            match parse_event(m.payload(), k.max_message_bytes, &k.positive_event_types) {
                Ok(Event::Click(c)) => clicks.push(c),
                Ok(Event::Ignored { .. }) => shared.metrics.events_ignored.inc(),
                Err(r) => {
                    shared
                        .metrics
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
        crate::fault::crash_point("ingest.parsed");
        if !letters.is_empty() && !send_dead_letters(&shared, &producer, &letters).await {
            warn!("shutdown while dead letters were undelivered: the batch is not stored and will be consumed again");
            break;
        }
        let offsets: Vec<PartitionOffset> = next
            .iter()
            .map(|((topic, partition), o)| PartitionOffset {
                topic: topic.clone(),
                partition: *partition,
                next_offset: *o,
            })
            .collect();
        drop(msgs);
        // one batch in the store at a time, in consumption order
        finish_stored(&shared, &consumer, &mut storing).await?;
        let store = shared.store.clone();
        let offsets_for_store = offsets.clone();
        let handle = tokio::task::spawn_blocking(move || {
            let a = store.apply(&clicks, &offsets_for_store)?;
            crate::fault::crash_point("ingest.applied");
            store.flush()?;
            crate::fault::crash_point("ingest.flushed");
            anyhow::Ok(a)
        });
        storing = Some(StoreTask {
            handle,
            offsets,
            received,
        });
    }
    finish_stored(&shared, &consumer, &mut storing).await?;
    // final synchronous commit of what the store holds
    let owned: Vec<(String, i32)> = consumer
        .assignment()
        .map(|a| {
            a.elements()
                .iter()
                .map(|e| (e.topic().to_string(), e.partition()))
                .collect()
        })
        .unwrap_or_default();
    if let Ok(offsets) = shared.store.stored_offsets() {
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
    info!("ingest stopped");
    Ok(())
}

#[cfg(test)]
mod client_error_tests {
    use rdkafka::producer::BaseProducer;

    use super::*;

    #[test]
    fn a_rejected_property_value_is_never_shown() {
        let secret = "hunter2-secret";
        let err = ClientConfig::new()
            .set("queue.buffering.max.ms", secret)
            .create::<BaseProducer>()
            .err()
            .expect("an invalid value is refused");
        let raw = err.to_string();
        assert!(
            raw.contains(secret),
            "rdkafka's own message shows it: {raw}"
        );
        let shown = format!("{:#}", client_error("cannot create", err));
        assert!(!shown.contains(secret), "{shown}");
        assert!(shown.contains("queue.buffering.max.ms"), "{shown}");
    }
}
