//! Which trainer is the active one, decided by Kafka alone: every trainer joins one consumer
//! group (`models.trainer_group`) on the one-partition models topic, and the member the group
//! assigns partition 0 to may train. On each such assignment it takes over the fleet's
//! transactional id (fencing the previous trainer's writes at the broker), reads the models
//! topic to its end and claims the epoch after the highest there; it is active once it has read
//! its own claim back as the epoch's first. A newer claim read later (another trainer assigned
//! after this one's session expired) makes it stand by at once, before librdkafka even notices
//! the lost assignment. One claim per assignment, unless another trainer claimed the same epoch
//! first: a trainer never out-claims the one the group chose after it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::ClientContext;
use tracing::{info, warn};

use super::log::{claim_key, Record};
use super::topic::{Follower, Publisher};
use crate::config::KafkaConfig;
use crate::health::Health;
use crate::kafka::{client_config, client_error};
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;

/// This trainer's place in the election.
#[derive(Default)]
pub struct Election {
    /// The group assigned partition 0 to this member.
    assigned: AtomicBool,
    /// Assignments of partition 0 so far (each allows one claim).
    assignments: AtomicU64,
    /// The claim made for the current assignment: (assignment, epoch, its offset).
    claim: Mutex<Option<(u64, u64, i64)>>,
}

impl Election {
    /// The epoch this trainer may announce under now, if it is the active trainer: assigned,
    /// its claim read back, and no newer claim since.
    pub fn active_epoch(&self, id: &str, follower: &Follower) -> Option<u64> {
        if !self.assigned.load(Ordering::Acquire) {
            return None;
        }
        let (assignment, epoch, offset) = (*self.claim.lock().unwrap_or_else(|e| e.into_inner()))?;
        if assignment != self.assignments.load(Ordering::Acquire) {
            return None;
        }
        follower.with(|log| {
            let (e, owner) = log.epoch();
            (log.next_offset() > offset && e == epoch && owner == Some(id)).then_some(epoch)
        })
    }
}

/// The election consumer's context: notes assignments of partition 0.
struct ElectionContext {
    election: Arc<Election>,
    health: Arc<Health>,
}

impl ClientContext for ElectionContext {}

impl ConsumerContext for ElectionContext {
    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let has_zero =
            |tpl: &rdkafka::TopicPartitionList| tpl.elements().iter().any(|e| e.partition() == 0);
        match rebalance {
            Rebalance::Assign(tpl) => {
                // joining the group (even with nothing assigned: a standby) is being up
                self.health.assigned(0);
                if has_zero(tpl) {
                    self.election.assignments.fetch_add(1, Ordering::AcqRel);
                    self.election.assigned.store(true, Ordering::Release);
                    info!("elected: this trainer holds the models topic's partition 0");
                }
            }
            Rebalance::Revoke(tpl) => {
                if has_zero(tpl) {
                    self.election.assigned.store(false, Ordering::Release);
                    info!("no longer the elected trainer (partition 0 revoked)");
                }
            }
            Rebalance::Error(e) => warn!(error = %e, "trainer election rebalance error"),
        }
    }
}

/// What the election task uses.
pub struct Elector {
    pub kafka: KafkaConfig,
    pub group: String,
    pub topic: String,
    pub id: String,
    pub election: Arc<Election>,
    pub follower: Arc<Follower>,
    /// Writes the claims; taken over at each election (fencing the previous trainer's).
    pub publisher: Arc<Publisher>,
    pub health: Arc<Health>,
    pub metrics: Arc<Metrics>,
    pub shutdown: Arc<Shutdown>,
}

impl Elector {
    /// Stays in the group until shutdown, claiming an epoch after each assignment.
    pub async fn run(self) -> Result<()> {
        let consumer: StreamConsumer<ElectionContext> = client_config(
            &self.kafka.brokers,
            &[
                ("group.id", &self.group),
                ("enable.auto.commit", "false"),
                ("auto.offset.reset", "latest"),
                ("partition.assignment.strategy", "cooperative-sticky"),
                ("session.timeout.ms", "10000"),
            ],
            &self.kafka.properties,
        )
        .create_with_context(ElectionContext {
            election: self.election.clone(),
            health: self.health.clone(),
        })
        .map_err(|e| client_error("cannot create the trainer election's consumer", e))?;
        consumer.subscribe(&[&self.topic])?;
        let mut stop = self.shutdown.subscribe();
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tokio::select! {
                // the messages themselves are the follower's to read
                m = consumer.recv() => {
                    if let Err(e) = m {
                        warn!(error = %e, "trainer election consumer error");
                    }
                }
                _ = tick.tick() => self.claim_if_elected().await,
                _ = stop.changed() => break,
            }
        }
        // leave the group at once, so a standby takes over without waiting for the session
        consumer.unsubscribe();
        Ok(())
    }

    /// Whether this trainer's claim of `epoch` (at `offset`) was read back and another trainer
    /// had claimed the same epoch first: the group still assigns partition 0 here, so it claims
    /// again (a claim of a higher epoch by another is a newer election's: never out-claimed).
    fn lost(&self, epoch: u64, offset: i64) -> bool {
        self.follower.with(|l| {
            let (e, owner) = l.epoch();
            l.next_offset() > offset && e == epoch && owner != Some(self.id.as_str())
        })
    }

    /// The highest epoch claimed on the models topic, read to its end; `None` (logged) when it
    /// cannot be read now.
    async fn highest_epoch(&self) -> Option<u64> {
        let (kafka, topic, follower) = (
            self.kafka.clone(),
            self.topic.clone(),
            self.follower.clone(),
        );
        let read = tokio::task::spawn_blocking(move || {
            super::topic::read_to_end(&kafka, &topic, follower.signer())
        })
        .await;
        match read {
            Ok(Ok(log)) => Some(log.epoch().0),
            Ok(Err(e)) => {
                warn!(error = %format!("{e:#}"), "cannot read the models topic to its end before claiming; retrying");
                None
            }
            Err(e) => {
                warn!(error = %e, "the models-topic reading task failed; retrying");
                None
            }
        }
    }

    /// After an assignment without a claim (or whose claim another trainer beat to the same
    /// epoch): claims the epoch after the highest on the topic.
    async fn claim_if_elected(&self) {
        let active = self.election.active_epoch(&self.id, &self.follower);
        self.metrics.trainer_active.set(i64::from(active.is_some()));
        if !self.election.assigned.load(Ordering::Acquire) {
            return;
        }
        let assignment = self.election.assignments.load(Ordering::Acquire);
        let claimed = *self
            .election
            .claim
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if claimed.is_some_and(|(a, e, offset)| a == assignment && !self.lost(e, offset)) {
            return;
        }
        // the epoch after the highest anyone claimed, from the whole topic read to its end
        // (the follower may lag behind it)
        let Some(epoch) = self.highest_epoch().await.and_then(|e| e.checked_add(1)) else {
            return;
        };
        let record = Record::Claim {
            epoch,
            trainer: self.id.clone(),
            at_unix_ms: crate::wire::now_ms(),
        };
        // the transactional id first: from here on the trainer elected before cannot write
        let publisher = self.publisher.clone();
        match tokio::task::spawn_blocking(move || publisher.take_over()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                warn!(error = %format!("{e:#}"), "cannot take over the models topic's transactional id; retrying");
                return;
            }
            Err(e) => {
                warn!(error = %e, "the take-over task failed; retrying");
                return;
            }
        }
        match self
            .publisher
            .write(
                &self.topic,
                &claim_key(epoch, &self.id),
                Some(&record),
                self.follower.signer(),
            )
            .await
        {
            Ok(offset) => {
                *self
                    .election
                    .claim
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = Some((assignment, epoch, offset));
                self.metrics.trainer_epoch.set(epoch as i64);
                info!(epoch, offset, "claimed the next fencing epoch");
            }
            Err(e) => warn!(error = %format!("{e:#}"), "cannot claim an epoch; retrying"),
        }
    }
}
