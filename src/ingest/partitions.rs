//! How ingestion owns the clicks topic's partitions, behind one small interface: role `all` owns
//! whatever the group assigns, from the store's offsets ([`Standalone`]); a serving replica
//! (`fleet::Replica`) restores a partition from the changelog before consuming it, claims it,
//! writes each stored batch to the changelog in a transaction and deletes what it gave up.

use std::sync::Arc;

use anyhow::Result;
use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::topic_partition_list::Offset;

use crate::config::KafkaConfig;
use crate::store::{Applied, PartitionOffset, Store};

/// Where a newly assigned partition starts.
pub enum Start {
    /// Consumed from this offset at once.
    At(Offset),
    /// Paused until [`Partitions::restore`] (run in the consumer task, outside the rebalance
    /// callback) says where its clicks resume.
    Restore,
}

/// What becomes of a consumed message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Take {
    /// Not this instance's (its partition is not owned, or not yet restored).
    Skip,
    /// Consumed for the first time.
    New,
    /// Consumed again after a crash between the store and the changelog: stored already, its
    /// user is written to the changelog again and a bad one is not dead-lettered twice.
    Replay,
}

/// The consumer group's metadata when a batch was consumed (a transaction with it commits only
/// if the group has not moved on), and a way to ask the consumer for its metadata of now.
pub struct Group {
    pub metadata: ConsumerGroupMetadata,
    pub now: Arc<dyn Fn() -> Option<ConsumerGroupMetadata> + Send + Sync>,
}

/// A partition life cycle: assigned, (restored,) consumed and stored, revoked.
pub trait Partitions: Send + Sync {
    /// The group consumer's assignment strategy and static instance id.
    fn membership(&self) -> (&'static str, Option<String>);

    /// Once, before consuming: what a previous run left on disk.
    fn started(&self) -> Result<()>;

    /// A partition the group assigned (in the rebalance callback: quick, no I/O to Kafka).
    fn assigned(&self, topic: &str, partition: i32) -> Start;

    /// Partitions the group took away (`None`: every one, the assignment was lost); returns once
    /// the batch being stored is done, so nothing is written for them afterwards.
    fn revoked(&self, partitions: Option<&[i32]>);

    /// Restores a partition [`Self::assigned`] paused (on a blocking thread): where its clicks
    /// resume, or `None` when it was revoked meanwhile. An error leaves it unowned.
    fn restore(&self, topic: &str, partition: i32, group: Group) -> Result<Option<i64>>;

    /// What becomes of the message at `offset` of `partition`.
    fn take(&self, partition: i32, offset: i64) -> Take;

    /// Refuses (with why) a user's event that arrived on a partition other than theirs.
    fn check(&self, user: &str, partition: i32) -> Result<(), String>;

    /// Stores a batch with `apply` (the store's atomic write and fsync) and whatever must follow
    /// it before a revocation may complete; `group`: the group's metadata at consumption.
    fn store(
        &self,
        apply: &mut dyn FnMut() -> Result<Applied>,
        replayed: &[String],
        offsets: &[PartitionOffset],
        group: Option<Group>,
    ) -> Result<Applied>;

    /// Whether the stored offset of `partition` is committed to the group after a batch.
    fn commits(&self, partition: i32) -> bool;

    /// Every few seconds, on a blocking thread.
    fn tick(&self) -> Result<()>;

    /// After the assignment changed (a rebalance, a restore done).
    fn assignment_changed(&self);

    /// At shutdown, after the last batch.
    fn stop(&self);
}

/// Role `all`: every assigned partition is consumed from the store's offset (or the beginning);
/// nothing is restored, written elsewhere or given up.
pub struct Standalone {
    pub kafka: KafkaConfig,
    pub store: Arc<Store>,
}

impl Partitions for Standalone {
    fn membership(&self) -> (&'static str, Option<String>) {
        (
            crate::config::Rebalance::Eager.strategy(),
            self.kafka.group_instance_id(crate::config::Role::All),
        )
    }

    fn started(&self) -> Result<()> {
        Ok(())
    }

    fn assigned(&self, topic: &str, partition: i32) -> Start {
        Start::At(match self.store.stored_offset(topic, partition) {
            Ok(Some(o)) => Offset::Offset(o),
            Ok(None) => Offset::Beginning,
            Err(e) => {
                tracing::error!(error = %e, "cannot read stored offsets");
                Offset::Beginning
            }
        })
    }

    fn revoked(&self, _: Option<&[i32]>) {}

    fn restore(&self, _: &str, partition: i32, _: Group) -> Result<Option<i64>> {
        anyhow::bail!("role all restores nothing (partition {partition})")
    }

    fn take(&self, _: i32, _: i64) -> Take {
        Take::New
    }

    fn check(&self, _: &str, _: i32) -> Result<(), String> {
        Ok(())
    }

    fn store(
        &self,
        apply: &mut dyn FnMut() -> Result<Applied>,
        _: &[String],
        _: &[PartitionOffset],
        _: Option<Group>,
    ) -> Result<Applied> {
        apply()
    }

    fn commits(&self, _: i32) -> bool {
        true
    }

    fn tick(&self) -> Result<()> {
        Ok(())
    }

    fn assignment_changed(&self) {}

    fn stop(&self) {}
}
