//! The changelog of user state (role `serve`), Kafka Streams' way: a compacted topic with the
//! clicks topic's partition count, where the owner of a partition writes, after each stored
//! batch, every changed user's whole history (keyed by user id, to the click's partition
//! number) and then a marker with the next clicks offset the partition's records reflect and the
//! owner's epoch. A new owner restores the partition from it (from its local position when it
//! has one) and resumes the clicks at the last marker; records of an epoch older than one
//! already seen are skipped.
//!
//! Each batch's records, markers and clicks offsets go in one Kafka transaction (exactly-once
//! v2, KIP-447): the offsets are sent with the consumer's group metadata as it was when the
//! batch was consumed, so the broker refuses to commit the transaction of a replica the group
//! has since moved on from (frozen past its session, cut off while the write retried), and
//! aborts it: readers see committed records only, and the log cleaner removes aborted ones, so
//! a late writer never wins, compacted or not.

use std::time::Duration;

use anyhow::{Context, Result};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::config::KafkaConfig;
use crate::kafka::{client_config, client_error, transactional_producer, EofReader, TXN_TIMEOUT};
use crate::store::{ChangelogPosition, HistoryIds, Store};

/// The key of a partition's marker: user ids never hold control characters.
pub(super) const MARKER_KEY: &str = "\u{1}multivaed.marker";

/// A changelog record's value (a user's record, or the partition's marker under
/// [`MARKER_KEY`]); a null value (tombstone) forgets the user.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(super) enum Record {
    History {
        /// External item ids, oldest first; their weights (absent: 1 each) and the user's
        /// excluded items (absent: none).
        #[serde(flatten)]
        history: HistoryIds,
        /// The owner's epoch.
        epoch: u64,
    },
    Marker {
        /// The clicks offset to resume the partition at: every click before it is reflected
        /// in the records before this marker.
        next_offset: i64,
        epoch: u64,
        owner: String,
    },
}

/// A user's history to write (`None`: the user was forgotten, a tombstone).
pub(super) struct UserRecord {
    pub partition: i32,
    pub user: String,
    pub history: Option<HistoryIds>,
}

/// A partition's marker to write after its users.
#[derive(Debug, Clone, Copy)]
pub(super) struct Marker {
    pub partition: i32,
    pub next_offset: i64,
    pub epoch: u64,
}

pub(super) struct Changelog {
    pub topic: String,
    pub owner: String,
    kafka: KafkaConfig,
    /// The transactional producer, initialised on first use and replaced after a fatal error.
    producer: std::sync::Mutex<Option<FutureProducer>>,
}

/// The clicks offsets a batch's records reflect and the consumer's group metadata when the
/// batch was consumed: committed in the batch's transaction.
pub(super) struct Consumed {
    pub offsets: TopicPartitionList,
    pub group: rdkafka::consumer::ConsumerGroupMetadata,
}

/// Why a write did not happen.
#[derive(Debug)]
pub(super) enum WriteError {
    /// The group has moved on from the generation the batch was consumed in: the broker
    /// refused its offsets and the transaction was aborted (nothing of it is visible).
    Fenced(KafkaError),
    /// Anything else, after retrying while allowed.
    Failed(anyhow::Error),
}

impl std::fmt::Display for WriteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WriteError::Fenced(e) => write!(f, "fenced by the consumer group: {e}"),
            WriteError::Failed(e) => write!(f, "{e:#}"),
        }
    }
}

/// Whether an error says the group no longer knows the generation or member the offsets were
/// sent for (retrying with the same metadata cannot pass).
fn is_fenced(e: &KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as C;
    matches!(
        e.rdkafka_error_code(),
        Some(
            C::IllegalGeneration
                | C::UnknownMemberId
                | C::FencedInstanceId
                | C::RebalanceInProgress
                | C::ProducerFenced
                | C::InvalidProducerEpoch
        )
    )
}

impl Changelog {
    /// The writer of `topic` for the replica `owner`: its transactional id is
    /// `<group_id>.changelog.<owner>`, so a restarted replica fences its previous incarnation.
    pub fn new(kafka: &KafkaConfig, owner: String) -> Self {
        Self {
            topic: kafka.changelog(),
            owner,
            kafka: kafka.clone(),
            producer: std::sync::Mutex::new(None),
        }
    }

    /// Writes the users' records, then each partition's marker, with `consumed`'s offsets, in
    /// one transaction, retrying with backoff what failed for another reason than fencing while
    /// `keep_trying` says so. Returns the changelog position after each marker.
    pub fn write(
        &self,
        users: &[UserRecord],
        markers: &[Marker],
        consumed: Option<&Consumed>,
        keep_trying: impl Fn() -> bool,
    ) -> Result<Vec<(i32, ChangelogPosition)>, WriteError> {
        let mut waits = crate::retry::backoff(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            let e = match self.producer() {
                Ok(p) => match self.transaction(&p, users, markers, consumed) {
                    Ok(done) => return Ok(done),
                    Err(e) => e,
                },
                Err(e) => e,
            };
            if let Some(k) = e.downcast_ref::<KafkaError>() {
                if is_fenced(k) {
                    return Err(WriteError::Fenced(k.clone()));
                }
            }
            if !keep_trying() {
                return Err(WriteError::Failed(
                    e.context("shutdown while the changelog was being written"),
                ));
            }
            warn!(error = %format!("{e:#}"), "cannot write the changelog; retrying");
            std::thread::sleep(waits.next().unwrap_or(Duration::from_secs(5)));
        }
    }

    /// The transactional producer, created and initialised (fencing an earlier incarnation of
    /// this replica) when there is none.
    fn producer(&self) -> Result<FutureProducer> {
        let mut slot = self.producer.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = slot.as_ref() {
            return Ok(p.clone());
        }
        let id = format!("{}.changelog.{}", self.kafka.group_id, self.owner);
        let p = transactional_producer(
            &self.kafka,
            &id,
            "the changelog's transactional producer",
            crate::kafka::CHANGELOG_TXN_TIMEOUT,
        )?;
        *slot = Some(p.clone());
        Ok(p)
    }

    /// One transaction: begin, the records, the offsets, commit; aborted on any error (a fatal
    /// one drops the producer, so the next attempt starts a new one).
    fn transaction(
        &self,
        producer: &FutureProducer,
        users: &[UserRecord],
        markers: &[Marker],
        consumed: Option<&Consumed>,
    ) -> Result<Vec<(i32, ChangelogPosition)>> {
        use rdkafka::producer::Producer;
        producer.begin_transaction()?;
        let result = self.write_once(producer, users, markers).and_then(|done| {
            if let Some(c) = consumed {
                producer.send_offsets_to_transaction(&c.offsets, &c.group, TXN_TIMEOUT)?;
            }
            crate::fault::crash_point("changelog.before_commit");
            producer.commit_transaction(TXN_TIMEOUT)?;
            Ok(done)
        });
        if let Err(e) = &result {
            let fatal = matches!(
                e.downcast_ref::<KafkaError>(),
                Some(KafkaError::Transaction(r)) if r.is_fatal()
            );
            if fatal || producer.abort_transaction(TXN_TIMEOUT).is_err() {
                *self.producer.lock().unwrap_or_else(|e| e.into_inner()) = None;
            }
        }
        result
    }

    fn write_once(
        &self,
        producer: &FutureProducer,
        users: &[UserRecord],
        markers: &[Marker],
    ) -> Result<Vec<(i32, ChangelogPosition)>> {
        let epoch_of = |p: i32| markers.iter().find(|m| m.partition == p).map(|m| m.epoch);
        let mut pending = Vec::with_capacity(users.len());
        for u in users {
            let value = match &u.history {
                Some(history) => Some(serde_json::to_vec(&Record::History {
                    history: history.clone(),
                    epoch: epoch_of(u.partition).unwrap_or(0),
                })?),
                None => None,
            };
            pending.push(self.send(producer, u.partition, &u.user, value.as_deref())?);
        }
        // the markers go after their partition's users (one producer: in order)
        let mut marks = Vec::with_capacity(markers.len());
        for m in markers {
            let value = serde_json::to_vec(&Record::Marker {
                next_offset: m.next_offset,
                epoch: m.epoch,
                owner: self.owner.clone(),
            })?;
            marks.push((
                *m,
                self.send(producer, m.partition, MARKER_KEY, Some(&value))?,
            ));
        }
        for d in pending {
            futures::executor::block_on(d)
                .context("changelog delivery cancelled")?
                .map_err(|(e, _)| e)?;
        }
        let mut done = Vec::with_capacity(marks.len());
        for (m, d) in marks {
            let delivered = futures::executor::block_on(d)
                .context("changelog delivery cancelled")?
                .map_err(|(e, _)| e)?;
            done.push((
                m.partition,
                ChangelogPosition {
                    // the transaction's commit marker follows the last record
                    next_offset: delivered.offset + 1,
                    epoch: m.epoch,
                    clicks_next: m.next_offset,
                },
            ));
        }
        Ok(done)
    }

    fn send(
        &self,
        producer: &FutureProducer,
        partition: i32,
        key: &str,
        value: Option<&[u8]>,
    ) -> Result<rdkafka::producer::DeliveryFuture> {
        let record = FutureRecord::<str, [u8]>::to(&self.topic)
            .partition(partition)
            .key(key);
        let record = match value {
            Some(v) => record.payload(v),
            None => record,
        };
        producer
            .send_result(record)
            .map_err(|(e, _)| anyhow::Error::new(e).context("cannot queue a changelog record"))
    }
}

/// What one changelog record at `offset` means for a partition's copy at `position` (which
/// moves past it): a user's new history (empty: forgotten), or nothing — a marker (its epoch
/// and clicks offset are taken), a record of an older owner written after a newer one's (a late
/// writer's), an unreadable one (logged).
pub(crate) fn read_record(
    position: &mut ChangelogPosition,
    partition: i32,
    offset: i64,
    key: Option<&[u8]>,
    payload: Option<&[u8]>,
) -> Option<(String, HistoryIds)> {
    position.next_offset = offset + 1;
    let key = String::from_utf8_lossy(key?).into_owned();
    let Some(value) = payload else {
        return Some((key, HistoryIds::default()));
    };
    match serde_json::from_slice::<Record>(value) {
        Ok(Record::Marker {
            next_offset, epoch, ..
        }) if epoch >= position.epoch => {
            position.epoch = epoch;
            position.clicks_next = next_offset;
            None
        }
        Ok(Record::History { history, epoch }) if epoch >= position.epoch => Some((key, history)),
        Ok(_) => None,
        Err(e) => {
            warn!(error = %e, partition, offset, "an unreadable changelog record is skipped");
            None
        }
    }
}

/// How long a local copy may have been out of sync with the changelog and still resume from its
/// position: the changelog's `delete.retention.ms` (how long a tombstone stays readable once the
/// cleaner has reached it) less a margin (a tenth, at most an hour) for clocks and the cleaner's
/// timing. A copy away longer may have missed a forgotten user's tombstone: it is dropped and the
/// partition read from the beginning. Unknown (the broker did not say): no limit.
#[derive(Debug, Clone, Copy, Default)]
pub struct Horizon(Option<Duration>);

impl Horizon {
    /// The horizon of a changelog whose `delete.retention.ms` is `retention`.
    pub fn of(retention: Option<Duration>) -> Self {
        Self(retention.map(|r| r.saturating_sub((r / 10).min(Duration::from_secs(3600)))))
    }

    /// Whether a copy last in sync at `synced_at` (Unix ms; `None`: never recorded) is past it.
    pub fn passed(&self, synced_at: Option<u64>, now_ms: u64) -> bool {
        let Some(h) = self.0 else { return false };
        synced_at.is_none_or(|t| now_ms.saturating_sub(t) > h.as_millis() as u64)
    }
}

/// A partition's local copy, and where a restore or a read of the changelog starts from: its
/// position, unless it cannot resume — the log no longer reaches back to it (`low`, the first
/// offset), or it is past the `horizon` — and then it is dropped (`belongs` says which users are
/// the partition's) and the partition is read from the beginning. Returns the position to start
/// at (`None`: the beginning).
pub(crate) fn resumable_copy(
    store: &Store,
    partition: i32,
    low: i64,
    horizon: Horizon,
    clicks_topic: &str,
    belongs: &dyn Fn(&str) -> bool,
) -> Result<Option<ChangelogPosition>> {
    let local = store.changelog_position(partition)?;
    let now = crate::wire::now_ms();
    let stale = local.is_some() && horizon.passed(store.synced_at(partition)?, now);
    let resumable = local.filter(|p| p.next_offset >= low && !stale);
    if resumable.is_none() && store.has_copy_of(partition, clicks_topic)? {
        let users = store.drop_partition(partition, clicks_topic, belongs)?;
        tracing::info!(
            partition,
            users,
            past_horizon = stale,
            "the local copy cannot resume (away longer than the changelog keeps tombstones, or the log no longer reaches its position): dropped; reading the partition from the beginning"
        );
    }
    Ok(resumable)
}

/// What bounds a restore: the tombstone horizon of its local copy, and when it must be done.
#[derive(Debug, Clone, Copy)]
pub(super) struct Bounds {
    pub horizon: Horizon,
    pub deadline: std::time::Instant,
}

/// What a restore found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Restored {
    pub position: ChangelogPosition,
    pub records: u64,
    pub from_beginning: bool,
    /// Users whose last record is at least `active_since` (ms since the epoch), with its time:
    /// a record is written when its user's history changed, so its time is their last activity.
    pub active: Vec<(String, i64)>,
}

/// Histories applied to the store at once during a restore.
const RESTORE_CHUNK: usize = 2000;

/// Reads partition `partition` of the changelog from the local copy's position (or from the
/// beginning when there is none, or the log no longer reaches back to it) to its end, applying
/// every user record to the store; `progress` is told of each chunk of records applied. Stops
/// early (`None`) when `go_on` says so (the partition was revoked).
#[allow(clippy::too_many_arguments)]
pub(super) fn restore(
    k: &KafkaConfig,
    partition: i32,
    store: &Store,
    bounds: Bounds,
    belongs: &dyn Fn(&str) -> bool,
    active_since: i64,
    progress: &dyn Fn(u64),
    go_on: &dyn Fn() -> bool,
) -> Result<Option<Restored>> {
    let consumer: BaseConsumer<EofReader> = client_config(
        &k.brokers,
        &[
            ("group.id", &format!("{}.restore", k.group_id)),
            ("enable.auto.commit", "false"),
            // an aborted transaction's records (a fenced writer's) are never read
            ("isolation.level", "read_committed"),
            ("enable.partition.eof", "true"),
            ("auto.offset.reset", "earliest"),
        ],
        &k.properties,
    )
    .create_with_context(EofReader)
    .map_err(|e| client_error("cannot create the changelog reader", e))?;
    let topic = &k.changelog();
    let (low, _high) = consumer
        .fetch_watermarks(topic, partition, Duration::from_secs(10))
        .with_context(|| format!("cannot read the bounds of changelog partition {partition}"))?;
    let local = resumable_copy(
        store,
        partition,
        low,
        bounds.horizon,
        &k.clicks_topic,
        belongs,
    )?;
    let (start, mut position, from_beginning) = match local {
        Some(p) => (Offset::Offset(p.next_offset), p, false),
        None => (
            Offset::Beginning,
            ChangelogPosition {
                next_offset: 0,
                epoch: 0,
                clicks_next: 0,
            },
            true,
        ),
    };
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, start)?;
    consumer.assign(&tpl)?;
    let mut chunk: Vec<(String, HistoryIds)> = Vec::new();
    let mut active: std::collections::HashMap<String, i64> = Default::default();
    let mut records = 0u64;
    // only a record read counts as progress: errors (a broker down) do not hold the restore open
    let deadline_idle = Duration::from_secs(30);
    let mut progress_at = std::time::Instant::now();
    loop {
        if progress_at.elapsed() > deadline_idle {
            anyhow::bail!("changelog partition {partition}: no record read for 30 s during the restore (is the broker up?)");
        }
        if std::time::Instant::now() > bounds.deadline {
            anyhow::bail!("changelog partition {partition}: the restore took longer than serve.restore_timeout ({records} records read); raise it or use more partitions");
        }
        if !go_on() {
            store.restore_histories(&chunk, partition, position, None)?;
            return Ok(None);
        }
        let m = match consumer.poll(Duration::from_millis(500)) {
            None => continue,
            Some(Ok(m)) => m,
            Some(Err(KafkaError::PartitionEOF(_))) => break,
            Some(Err(e)) => {
                warn!(error = %e, partition, "changelog read error during a restore; retrying");
                continue;
            }
        };
        progress_at = std::time::Instant::now();
        records += 1;
        if let Some(user) = read_record(&mut position, partition, m.offset(), m.key(), m.payload())
        {
            let at = m.timestamp().to_millis().unwrap_or(0);
            if user.1.items.is_empty() || at < active_since {
                active.remove(&user.0);
            } else {
                active.insert(user.0.clone(), at);
            }
            chunk.push(user);
        }
        if chunk.len() >= RESTORE_CHUNK {
            store.restore_histories(&std::mem::take(&mut chunk), partition, position, None)?;
            progress(records);
            crate::fault::crash_point("restore.applied");
        }
    }
    store.restore_histories(&chunk, partition, position, None)?;
    store.set_synced(partition, crate::wire::now_ms())?;
    progress(records);
    crate::fault::crash_point("restore.applied");
    Ok(Some(Restored {
        position,
        records,
        from_beginning,
        active: active.into_iter().collect(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(payload: Option<&[u8]>) -> Option<(String, HistoryIds)> {
        let mut position = ChangelogPosition {
            next_offset: 0,
            epoch: 0,
            clicks_next: 0,
        };
        read_record(&mut position, 0, 7, Some(b"u1"), payload)
    }

    #[test]
    fn a_history_record_carries_weights_and_exclusions_and_older_records_still_read() {
        let history = HistoryIds {
            items: vec!["a".into(), "b".into()],
            weights: vec![3.0, 0.5],
            excluded: vec!["c".into()],
        };
        let bytes = serde_json::to_vec(&Record::History {
            history: history.clone(),
            epoch: 2,
        })
        .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&bytes),
            r#"{"kind":"history","items":["a","b"],"weights":[3.0,0.5],"excluded":["c"],"epoch":2}"#
        );
        assert_eq!(read(Some(&bytes)), Some(("u1".into(), history)));
        // a record written before weights: items of weight 1, no exclusions
        let old = br#"{"kind":"history","items":["a"],"epoch":1}"#;
        assert_eq!(
            read(Some(old)),
            Some(("u1".into(), HistoryIds::items(vec!["a".into()])))
        );
        // a tombstone: nothing (the user is forgotten)
        assert_eq!(read(None), Some(("u1".into(), HistoryIds::default())));
    }

    #[test]
    fn a_copy_resumes_only_within_the_tombstone_horizon() {
        let day = Duration::from_secs(24 * 3600);
        let h = Horizon::of(Some(day));
        let now = 100 * 24 * 3600 * 1000;
        let hours_ago = |n: u64| Some(now - n * 3600 * 1000);
        // a day's retention less an hour's margin
        assert!(!h.passed(hours_ago(22), now));
        assert!(h.passed(hours_ago(24), now));
        assert!(
            h.passed(None, now),
            "never recorded: read from the beginning"
        );
        // a second's retention less a tenth
        let s = Horizon::of(Some(Duration::from_secs(1)));
        assert!(!s.passed(Some(now - 800), now));
        assert!(s.passed(Some(now - 950), now));
        // unknown retention: no limit
        assert!(!Horizon::of(None).passed(None, now));
    }
}
