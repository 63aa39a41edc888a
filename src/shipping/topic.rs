//! Reading and writing the models topic: every replica and trainer follows it from its
//! beginning into a [`ModelLog`] (the rule of `log`), the trainers write claims and
//! announcements, and the `models` command reads it to its end.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::log::{ModelLog, Read, Record};
use crate::config::KafkaConfig;
use crate::control::{ControlKey, Topic};
use crate::kafka::{client_config, client_error, transactional_producer, EofReader, TXN_TIMEOUT};
use crate::shutdown::Shutdown;

/// The models topic as this process has read it so far; wakes its watchers on every record.
pub struct Follower {
    log: RwLock<ModelLog>,
    read: watch::Sender<i64>,
    key: Arc<ControlKey>,
    /// `multivaed_control_records_refused_total`.
    refused: prometheus::IntCounterVec,
}

impl Follower {
    /// Reads records signed with `key`; counts the others in `refused` (labels: topic, reason).
    pub fn new(key: Arc<ControlKey>, refused: prometheus::IntCounterVec) -> Self {
        Self {
            log: RwLock::new(ModelLog::default()),
            read: watch::channel(0).0,
            key,
            refused,
        }
    }

    /// The fleet's key, which signs what this process writes to the topic.
    pub fn signer(&self) -> &ControlKey {
        &self.key
    }

    /// The log read so far (a snapshot).
    pub fn log(&self) -> ModelLog {
        self.log.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Reads `f` of the log without copying it.
    pub fn with<T>(&self, f: impl FnOnce(&ModelLog) -> T) -> T {
        f(&self.log.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// A receiver woken after every record read (its value: the next offset).
    pub fn subscribe(&self) -> watch::Receiver<i64> {
        self.read.subscribe()
    }

    fn apply(&self, offset: i64, key: &str, value: Option<&[u8]>, signature: Option<&[u8]>) {
        let read = apply_signed(
            &mut self.log.write().unwrap_or_else(|e| e.into_inner()),
            &self.key,
            (offset, key, value, signature),
        );
        match &read {
            None => {
                self.refused
                    .with_label_values(&["models", "signature"])
                    .inc();
                warn!(
                    key,
                    offset, "a models-topic record without the fleet's signature is ignored"
                );
            }
            Some(Read::OutOfBounds(why)) => {
                self.refused.with_label_values(&["models", "bound"]).inc();
                warn!(key, offset, reason = %why, "a models-topic record is ignored");
            }
            Some(read) => log_read(key, offset, read),
        }
        self.read.send_replace(offset + 1);
    }

    /// Waits until the record at `offset` has been read (at most `limit`).
    pub async fn wait_past(&self, offset: i64, limit: Duration) -> Result<()> {
        let mut rx = self.subscribe();
        let deadline = tokio::time::Instant::now() + limit;
        while self.with(|l| l.next_offset()) <= offset {
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                bail!("the models topic was not read up to offset {offset} within {limit:?}");
            }
        }
        Ok(())
    }
}

/// Applies one record (offset, key, value, signature) if the fleet's key signed it; `None`
/// when it did not (the record is passed over).
fn apply_signed(
    log: &mut ModelLog,
    signer: &ControlKey,
    (offset, key, value, signature): (i64, &str, Option<&[u8]>, Option<&[u8]>),
) -> Option<Read> {
    if !signer.verify(Topic::Models, key.as_bytes(), value, signature) {
        log.skip(offset);
        return None;
    }
    Some(log.apply(offset, key, value))
}

fn log_read(key: &str, offset: i64, read: &Read) {
    match read {
        Read::Ignored(why) => {
            warn!(key, reason = %why, "a model announcement is ignored (fenced)")
        }
        Read::Unreadable(why) => {
            warn!(key, offset, error = %why, "an unreadable models-topic record is skipped")
        }
        Read::Claimed { epoch, trainer } => {
            info!(epoch, trainer = %trainer, "a trainer claimed the models topic")
        }
        _ => debug!(key, offset, ?read, "models topic"),
    }
}

/// Follows the models topic from its beginning into `follower` until shutdown.
pub async fn follow(
    kafka: KafkaConfig,
    topic: String,
    follower: Arc<Follower>,
    shutdown: Arc<Shutdown>,
) -> Result<()> {
    crate::kafka::follow_topic(
        &kafka,
        "models-reader",
        &topic,
        &shutdown,
        |offset, key, value, signature| {
            follower.apply(offset, &String::from_utf8_lossy(key), value, signature)
        },
    )
    .await
}

/// Reads the models topic from its beginning to its end (the `models` command): records not
/// signed with `signer` are passed over.
pub fn read_to_end(kafka: &KafkaConfig, topic: &str, signer: &ControlKey) -> Result<ModelLog> {
    let consumer: BaseConsumer<EofReader> = client_config(
        &kafka.brokers,
        &[
            ("group.id", &format!("{}.models-reader", kafka.group_id)),
            ("enable.auto.commit", "false"),
            ("enable.partition.eof", "true"),
            ("auto.offset.reset", "earliest"),
            // a fenced trainer's aborted writes are never read
            ("isolation.level", "read_committed"),
        ],
        &kafka.properties,
    )
    .create_with_context(EofReader)
    .map_err(|e| client_error("cannot create the models-topic reader", e))?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)?;
    consumer.assign(&tpl)?;
    let mut log = ModelLog::default();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if Instant::now() > deadline {
            bail!("models topic {topic:?}: no end within 30 s (is the broker up, does the topic exist?)");
        }
        match consumer.poll(Duration::from_millis(500)) {
            Some(Ok(m)) => {
                let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
                let signature = crate::kafka::signature(&m);
                if apply_signed(&mut log, signer, (m.offset(), &key, m.payload(), signature))
                    .is_none()
                {
                    warn!(
                        key,
                        offset = m.offset(),
                        "a models-topic record without the fleet's signature is passed over"
                    );
                }
            }
            Some(Err(KafkaError::PartitionEOF(_))) => return Ok(log),
            Some(Err(e)) => bail!("models topic {topic:?}: {e}"),
            None => {}
        }
    }
}

/// The active trainer's writer of the models topic: a transactional producer under the fleet's
/// one transactional id (`<trainer_group>.announcer`), initialised when this trainer is
/// elected. Initialising it fences the producer of whichever trainer held the id before: a
/// deposed trainer (frozen past its session, then thawed) can no longer write anything, and
/// readers (at `read_committed`) never see a record of a transaction it could not commit.
pub struct Publisher {
    kafka: KafkaConfig,
    id: String,
    producer: std::sync::Mutex<Option<FutureProducer>>,
}

impl Publisher {
    pub fn new(kafka: &KafkaConfig, trainer_group: &str) -> Self {
        Self {
            kafka: kafka.clone(),
            id: format!("{trainer_group}.announcer"),
            producer: std::sync::Mutex::new(None),
        }
    }

    /// Takes the transactional id over (blocking): a new producer, initialised, fencing the
    /// previous holder's.
    pub fn take_over(&self) -> Result<()> {
        let p = transactional_producer(
            &self.kafka,
            &self.id,
            "the models topic's transactional producer",
            std::time::Duration::from_secs(60),
        )?;
        *self.producer.lock().unwrap_or_else(|e| e.into_inner()) = Some(p);
        Ok(())
    }

    /// Whether this process holds the transactional id now.
    pub fn holds(&self) -> bool {
        self.producer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Writes a record (or a tombstone) under `key`, signed with `signer`, in a transaction of
    /// its own; returns its offset. Fails when this trainer never took the id over or was
    /// fenced since (then it must take it over again, after being elected again).
    pub async fn write(
        &self,
        topic: &str,
        key: &str,
        record: Option<&Record>,
        signer: &ControlKey,
    ) -> Result<i64> {
        use rdkafka::producer::Producer;
        let producer = self
            .producer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .context("this trainer does not hold the models topic's transactional id")?;
        let p = producer.clone();
        tokio::task::spawn_blocking(move || p.begin_transaction())
            .await
            .context("the transaction task failed")??;
        let sent = write(&producer, topic, key, record, signer).await;
        let p = producer.clone();
        let outcome = tokio::task::spawn_blocking(move || match sent {
            Ok(offset) => p
                .commit_transaction(TXN_TIMEOUT)
                .map(|()| offset)
                .map_err(|e| {
                    let _ = p.abort_transaction(TXN_TIMEOUT);
                    anyhow::Error::new(e)
                }),
            Err(e) => {
                let _ = p.abort_transaction(TXN_TIMEOUT);
                Err(e)
            }
        })
        .await
        .context("the transaction task failed")?;
        if outcome.is_err() {
            // fenced or broken: nothing more is written until the id is taken over again
            *self.producer.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
        outcome.with_context(|| format!("cannot write {key} to the models topic {topic:?}"))
    }
}

/// Writes a record (or a tombstone) under `key`, signed with `signer`, and waits for the broker
/// to have it; returns its offset.
pub async fn write(
    producer: &FutureProducer,
    topic: &str,
    key: &str,
    record: Option<&Record>,
    signer: &ControlKey,
) -> Result<i64> {
    let value = record.map(serde_json::to_vec).transpose()?;
    let headers = signer.headers(Topic::Models, key.as_bytes(), value.as_deref());
    let mut r: FutureRecord<'_, str, Vec<u8>> = FutureRecord::to(topic)
        .partition(0)
        .key(key)
        .headers(headers);
    if let Some(v) = &value {
        r = r.payload(v);
    }
    let delivered = producer
        .send(r, Duration::from_secs(30))
        .await
        .map_err(|(e, _)| e)
        .with_context(|| format!("cannot write {key} to the models topic {topic:?}"))?;
    Ok(delivered.offset)
}
