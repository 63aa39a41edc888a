//! Dead letters: each rejected click message is written to the dead-letter topic with headers
//! naming its source and why, before its batch is stored (so its offset is stored only once
//! its dead letter is delivered). A payload over `kafka.max_message_bytes` is written truncated
//! (the original stays in the clicks topic at its offset); a retriable error is retried with
//! backoff; a topic that is missing or not ours to write turns the daemon not ready, with the
//! cause in a log line and in `multivaed_dead_letters_blocked{cause}`, until it can be written.

use std::time::Duration;

use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tracing::{error, info, warn};

use crate::health::Health;
use crate::kafka::{permanent_cause, Producers};
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;

/// A rejected message, as consumed.
pub(super) struct DeadLetter {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub reason: &'static str,
    pub detail: String,
}

/// What writing dead letters uses.
pub(super) struct DeadLetterWriter<'a> {
    pub topic: &'a str,
    /// Payloads are cut to this many bytes (the largest click message accepted).
    pub max_payload: usize,
    pub producer: &'a Producers,
    pub metrics: &'a Metrics,
    pub health: &'a Health,
    pub shutdown: &'a Shutdown,
}

/// Why a dead letter could not be written, as far as retrying goes.
enum Failure {
    /// May pass: retried with backoff.
    Transient(KafkaError),
    /// The record is too large for the producer or the broker: cut it shorter.
    TooLarge,
    /// The topic is missing or denied: not ready until it can be written.
    Blocked(&'static str, KafkaError),
}

fn classify(e: KafkaError) -> Failure {
    match permanent_cause(&e) {
        Some("too_large") => Failure::TooLarge,
        Some(cause) => Failure::Blocked(cause, e),
        None => Failure::Transient(e),
    }
}

impl DeadLetterWriter<'_> {
    /// Writes every dead letter of a batch, in order; false when shutdown came first (the batch
    /// must then not be stored: it is consumed again, dead letters included, after a restart).
    pub async fn write_all(&self, letters: &[DeadLetter]) -> bool {
        for l in letters {
            if !self.write(l).await {
                return false;
            }
        }
        true
    }

    /// Writes one dead letter, cutting it shorter while it is too large and waiting out other
    /// failures; false at shutdown.
    async fn write(&self, l: &DeadLetter) -> bool {
        let mut limit = self.max_payload;
        let mut attempt = 0u32;
        let mut waits = crate::retry::backoff(Duration::from_millis(200), Duration::from_secs(5));
        loop {
            let producer = self.producer.get();
            let result = self.send(&producer, l, limit).await;
            let failure = match result {
                Ok(()) => {
                    self.unblock();
                    self.metrics.events_dead_lettered.inc();
                    if l.payload.len() > limit {
                        self.metrics.dead_letters_truncated.inc();
                    }
                    return true;
                }
                Err(e) => {
                    self.producer.recover(&producer, &e);
                    classify(e)
                }
            };
            attempt += 1;
            let wait = match failure {
                Failure::TooLarge if limit > 0 => {
                    limit = (limit.min(l.payload.len()) / 4).min(1024);
                    warn!(
                        offset = l.offset,
                        bytes = l.payload.len(),
                        limit,
                        "a dead letter is too large for the producer or broker: cutting it shorter"
                    );
                    continue;
                }
                Failure::TooLarge => {
                    self.block("too_large", "even an empty dead letter is too large");
                    Duration::from_secs(5)
                }
                Failure::Blocked(cause, e) => {
                    self.block(cause, &e.to_string());
                    Duration::from_secs(5)
                }
                Failure::Transient(e) => {
                    warn!(error = %e, attempt, "cannot write a dead letter; retrying");
                    waits.next().unwrap_or(Duration::from_secs(5))
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.shutdown.wait() => return false,
            }
        }
    }

    /// One attempt: the payload cut to `limit` bytes, headers naming the source, the reason
    /// and (when cut) the original size.
    async fn send(
        &self,
        producer: &FutureProducer,
        l: &DeadLetter,
        limit: usize,
    ) -> Result<(), KafkaError> {
        let (partition, offset) = (l.partition.to_string(), l.offset.to_string());
        let original = l.payload.len().to_string();
        let truncated = l.payload.len() > limit;
        let mut headers = OwnedHeaders::new()
            .insert(header("multivaed.source.topic", l.topic.as_bytes()))
            .insert(header("multivaed.source.partition", partition.as_bytes()))
            .insert(header("multivaed.source.offset", offset.as_bytes()))
            .insert(header("multivaed.error", l.reason.as_bytes()))
            .insert(header("multivaed.error.detail", l.detail.as_bytes()));
        if truncated {
            headers = headers
                .insert(header("multivaed.truncated", b"true"))
                .insert(header("multivaed.original.bytes", original.as_bytes()));
        }
        let payload = &l.payload[..l.payload.len().min(limit)];
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(self.topic)
            .payload(payload)
            .headers(headers);
        if let Some(k) = &l.key {
            record = record.key(&k[..]);
        }
        producer
            .send(record, Duration::from_secs(10))
            .await
            .map(|_| ())
            .map_err(|(e, _)| e)
    }

    /// The topic cannot be written: not ready, and say why (once per cause).
    fn block(&self, cause: &'static str, detail: &str) {
        if self.health.set_dead_letters_blocked(Some(cause)) != Some(cause) {
            error!(
                topic = self.topic,
                cause,
                detail,
                "cannot write to the dead-letter topic: ingestion waits and the daemon is not ready until it can"
            );
        }
        self.metrics.set_dead_letters_blocked(Some(cause));
    }

    fn unblock(&self) {
        if self.health.set_dead_letters_blocked(None).is_some() {
            info!(
                topic = self.topic,
                "the dead-letter topic can be written again"
            );
            self.metrics.set_dead_letters_blocked(None);
        }
    }
}

fn header<'a>(key: &'a str, value: &'a [u8]) -> Header<'a, &'a [u8]> {
    Header {
        key,
        value: Some(value),
    }
}

#[cfg(test)]
mod tests {
    use rdkafka::types::RDKafkaErrorCode;

    use super::*;

    fn code(c: RDKafkaErrorCode) -> KafkaError {
        KafkaError::MessageProduction(c)
    }

    #[test]
    fn too_large_is_cut_a_missing_or_denied_topic_blocks_the_rest_is_retried() {
        use RDKafkaErrorCode as C;
        assert!(matches!(
            classify(code(C::MessageSizeTooLarge)),
            Failure::TooLarge
        ));
        assert!(matches!(
            classify(code(C::UnknownTopicOrPartition)),
            Failure::Blocked("unknown_topic", _)
        ));
        assert!(matches!(
            classify(code(C::TopicAuthorizationFailed)),
            Failure::Blocked("not_authorized", _)
        ));
        for transient in [
            C::MessageTimedOut,
            C::QueueFull,
            C::NotLeaderForPartition,
            C::AllBrokersDown,
        ] {
            assert!(matches!(classify(code(transient)), Failure::Transient(_)));
        }
    }
}
