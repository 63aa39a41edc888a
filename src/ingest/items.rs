//! The items topic in (roles `all` and `serve`): every partition read from its beginning (it is
//! compacted: the latest message of each item is what holds) and followed, each message applied
//! to the item rules. Once every partition was read to its end the rules say they are loaded
//! (nothing is ranked before: an item hidden before a restart stays hidden after it). Without
//! the topic every item may be recommended; it is looked for again every 30 s.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use tracing::{info, warn};

use crate::config::KafkaConfig;
use crate::items::{parse_item, ItemRules};
use crate::kafka::{client_config, client_error, EofReader};
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;

/// What the items reader uses.
pub struct ItemsReader {
    pub kafka: KafkaConfig,
    pub topic: String,
    pub rules: Arc<ItemRules>,
    pub metrics: Arc<Metrics>,
    pub shutdown: Arc<Shutdown>,
}

/// What the cluster says of the items topic.
enum Lookup {
    Found(i32),
    Missing,
    /// No answer (the brokers are away).
    Unknown,
}

/// How often a missing items topic is looked for again.
const LOOK_AGAIN: Duration = Duration::from_secs(30);

impl ItemsReader {
    pub async fn run(self) -> Result<()> {
        let consumer: Arc<StreamConsumer<EofReader>> = Arc::new(
            client_config(
                &self.kafka.brokers,
                &[
                    ("group.id", &format!("{}.items", self.kafka.group_id)),
                    ("enable.auto.commit", "false"),
                    ("auto.offset.reset", "earliest"),
                    ("fetch.wait.max.ms", "100"),
                    ("enable.partition.eof", "true"),
                ],
                &self.kafka.properties,
            )
            .create_with_context(EofReader)
            .map_err(|e| client_error("cannot create the items reader", e))?,
        );
        let mut stop = self.shutdown.subscribe();
        let partitions = loop {
            let wait = match self.partitions(&consumer).await {
                Lookup::Found(n) => break n,
                Lookup::Missing => {
                    // nothing to wait for: every item may be recommended meanwhile
                    self.rules.set_loaded();
                    LOOK_AGAIN
                }
                // the cluster did not answer: whether items are hidden is not known yet
                Lookup::Unknown => Duration::from_secs(2),
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.changed() => return Ok(()),
            }
        };
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(&self.topic, p, Offset::Beginning)?;
        }
        consumer.assign(&tpl)?;
        info!(topic = %self.topic, partitions, "reading the items topic");
        let mut at_end: HashSet<i32> = HashSet::new();
        loop {
            let m = tokio::select! {
                m = consumer.recv() => m,
                _ = stop.changed() => return Ok(()),
            };
            match m {
                Ok(m) => self.apply(m.partition(), m.offset(), m.key(), m.payload()),
                Err(KafkaError::PartitionEOF(p)) => {
                    if at_end.insert(p) && at_end.len() == partitions as usize {
                        info!(
                            topic = %self.topic,
                            unavailable = self.rules.unavailable(),
                            "items topic read: unavailable items are never recommended"
                        );
                        self.rules.set_loaded();
                    }
                }
                Err(e) => {
                    warn!(error = %e, topic = %self.topic, "items topic: read error");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }

    /// The topic's partition count, if the cluster says it exists (a missing topic is said
    /// once).
    async fn partitions(&self, consumer: &Arc<StreamConsumer<EofReader>>) -> Lookup {
        let topic = self.topic.clone();
        let consumer = consumer.clone();
        let found = tokio::task::spawn_blocking(move || {
            let Ok(md) = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10)) else {
                return Lookup::Unknown;
            };
            match md.topics().first() {
                Some(t) if t.error().is_none() && !t.partitions().is_empty() => {
                    Lookup::Found(t.partitions().len() as i32)
                }
                _ => Lookup::Missing,
            }
        })
        .await
        .unwrap_or(Lookup::Unknown);
        if matches!(found, Lookup::Missing) && !self.rules.loaded() {
            info!(topic = %self.topic, "no items topic: every item may be recommended (looked for again every 30 s)");
        }
        found
    }

    fn apply(&self, partition: i32, offset: i64, key: Option<&[u8]>, value: Option<&[u8]>) {
        match parse_item(key, value) {
            Ok((item, state)) => {
                self.rules.set(item, state);
                self.metrics
                    .item_updates
                    .with_label_values(&["applied"])
                    .inc();
            }
            Err(why) => {
                self.metrics
                    .item_updates
                    .with_label_values(&["rejected"])
                    .inc();
                warn!(topic = %self.topic, partition, offset, error = %why, "an items-topic message is refused");
            }
        }
    }
}
