//! Role `train`: the changelog topic as a read model. The trainer reads every partition of it
//! (the serving replicas are its only writers) into its own store, continuously, from the
//! position its store keeps for each partition (written in the same atomic batch as the
//! histories, so a restart resumes where it stopped), by the same rule as a restore: whole
//! histories replace the user's, a tombstone forgets, a late writer's records are skipped.
//! Each applied chunk tells the activity record what is new (what makes a round due, and who
//! is trained on first). Ready once every partition was read to its end.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use tracing::{info, warn};

use super::changelog::{read_record, resumable_copy};
use crate::activity::Activity;
use crate::config::KafkaConfig;
use crate::health::Health;
use crate::kafka::{client_config, client_error, EofReader};
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;
use crate::store::{ChangelogPosition, Store};

/// Histories applied at once, at most.
const CHUNK: usize = 2000;
/// A partition's pending histories are applied at least this often.
const FLUSH_EVERY: Duration = Duration::from_millis(200);

/// What the trainer's changelog reader uses.
pub struct ChangelogReader {
    pub kafka: KafkaConfig,
    /// Past it, a partition's local copy is dropped and read from the beginning.
    pub horizon: super::Horizon,
    pub store: Arc<Store>,
    pub activity: Arc<Activity>,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    pub shutdown: Arc<Shutdown>,
}

/// One partition's read state.
struct Partition {
    position: ChangelogPosition,
    chunk: Vec<(String, crate::store::HistoryIds)>,
    at_end: bool,
}

impl ChangelogReader {
    /// Reads until shutdown (on a blocking thread: the reads and store writes block).
    pub async fn run(self) -> Result<()> {
        tokio::task::spawn_blocking(move || self.read())
            .await
            .context("the changelog reader failed")?
    }

    fn read(self) -> Result<()> {
        let topic = self.kafka.changelog();
        let consumer: BaseConsumer<EofReader> = client_config(
            &self.kafka.brokers,
            &[
                (
                    "group.id",
                    &format!("{}.trainer-changelog", self.kafka.group_id),
                ),
                ("enable.auto.commit", "false"),
                ("enable.partition.eof", "true"),
                ("auto.offset.reset", "earliest"),
                ("fetch.wait.max.ms", "100"),
                // an aborted transaction's records (a fenced writer's) are never read
                ("isolation.level", "read_committed"),
            ],
            &self.kafka.properties,
        )
        .create_with_context(EofReader)
        .map_err(|e| client_error("cannot create the changelog reader", e))?;
        let mut parts = self.assign(&consumer, &topic)?;
        self.health.restoring(true);
        let mut caught_up = false;
        let mut last_flush = Instant::now();
        while !self.shutdown.is_set() {
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => {
                    if let Some(p) = parts.get_mut(&m.partition()) {
                        self.metrics.restore_records.inc();
                        let user = read_record(
                            &mut p.position,
                            m.partition(),
                            m.offset(),
                            m.key(),
                            m.payload(),
                        );
                        p.chunk.extend(user);
                        if p.chunk.len() >= CHUNK {
                            self.apply(m.partition(), p)?;
                        }
                    }
                }
                Some(Err(KafkaError::PartitionEOF(partition))) => {
                    if let Some(p) = parts.get_mut(&partition) {
                        p.at_end = true;
                        self.apply(partition, p)?;
                        self.store.set_synced(partition, crate::wire::now_ms())?;
                    }
                }
                Some(Err(e)) => warn!(error = %e, "changelog read error; retrying"),
                None => {}
            }
            if last_flush.elapsed() >= FLUSH_EVERY {
                for (&partition, p) in parts.iter_mut() {
                    self.apply(partition, p)?;
                }
                last_flush = Instant::now();
            }
            if !caught_up && parts.values().all(|p| p.at_end) {
                caught_up = true;
                self.health.restoring(false);
                let c = self.store.counts();
                info!(
                    users = c.users,
                    interactions = c.interactions,
                    "the changelog is read to its end"
                );
            }
        }
        for (&partition, p) in parts.iter_mut() {
            self.apply(partition, p)?;
        }
        self.store.flush()
    }

    /// Assigns every partition of the changelog at the store's position for it.
    fn assign(
        &self,
        consumer: &BaseConsumer<EofReader>,
        topic: &str,
    ) -> Result<HashMap<i32, Partition>> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let n = loop {
            let found = consumer
                .fetch_metadata(Some(topic), Duration::from_secs(10))
                .ok()
                .and_then(|m| m.topics().first().map(|t| t.partitions().len()))
                .filter(|&n| n > 0);
            match found {
                Some(n) => break n as i32,
                None if Instant::now() < deadline && !self.shutdown.is_set() => {
                    std::thread::sleep(Duration::from_secs(1))
                }
                None => {
                    anyhow::bail!("kafka.changelog_topic: cannot read the partitions of {topic:?}")
                }
            }
        };
        let mut tpl = TopicPartitionList::new();
        let mut parts = HashMap::new();
        for partition in 0..n {
            let (low, _) = consumer
                .fetch_watermarks(topic, partition, Duration::from_secs(10))
                .with_context(|| {
                    format!("cannot read the bounds of changelog partition {partition}")
                })?;
            let belongs =
                |user: &str| self.kafka.partitioner.partition(user.as_bytes(), n) == partition;
            let local = resumable_copy(
                &self.store,
                partition,
                low,
                self.horizon,
                &self.kafka.clicks_topic,
                &belongs,
            )?;
            let start = local.map_or(Offset::Beginning, |p| Offset::Offset(p.next_offset));
            tpl.add_partition_offset(topic, partition, start)?;
            parts.insert(
                partition,
                Partition {
                    position: local.unwrap_or(ChangelogPosition {
                        next_offset: 0,
                        epoch: 0,
                        clicks_next: 0,
                    }),
                    chunk: Vec::new(),
                    at_end: false,
                },
            );
        }
        consumer.assign(&tpl)?;
        info!(partitions = n, topic, "reading the changelog");
        Ok(parts)
    }

    /// Applies a partition's pending histories with its position, and tells what is new.
    fn apply(&self, partition: i32, p: &mut Partition) -> Result<()> {
        if p.chunk.is_empty() {
            return Ok(());
        }
        let written = self.store.restore_histories(
            &std::mem::take(&mut p.chunk),
            partition,
            p.position,
            None,
        )?;
        self.activity.learnable(&written.users, written.added);
        self.metrics.users_forgotten.inc_by(written.forgotten);
        Ok(())
    }
}
