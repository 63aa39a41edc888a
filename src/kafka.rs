//! Kafka clients: one way to configure them. `client_config` applies multivaed's defaults for a
//! kind of client, then the operator's `[kafka.properties]` once, on top (they win); client
//! errors never show a property's value (it may be a password).

use std::collections::BTreeMap;

use anyhow::Result;
use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::producer::FutureProducer;

use crate::config::KafkaConfig;

/// The brokers, `defaults` (multivaed's choices for this kind of client), then the configured
/// passthrough properties, which win over the defaults.
pub fn client_config(
    brokers: &str,
    defaults: &[(&str, &str)],
    properties: &BTreeMap<String, String>,
) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers);
    for (k, v) in defaults {
        c.set(*k, *v);
    }
    for (k, v) in properties {
        c.set(k, v);
    }
    c
}

/// The producer of dead letters and recommendations (latency-bound: batches for 1 ms at most).
/// Idempotent, so the broker keeps each partition's messages in the order they were sent even
/// across retries (a user's stale recommendation never lands after their fresh one).
pub fn producer(k: &KafkaConfig) -> Result<FutureProducer> {
    client_config(
        &k.brokers,
        &[
            ("linger.ms", "1"),
            ("message.timeout.ms", "30000"),
            ("enable.idempotence", "true"),
        ],
        &k.properties,
    )
    .create()
    .map_err(|e| client_error("cannot create the Kafka producer", e))
}

/// How long one step of a transaction (init, commit, abort, offsets) may take.
pub const TXN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The broker aborts a changelog transaction left open this long (its writer frozen or gone):
/// the partition's next owner cannot start consuming before, as its committed offsets are
/// unstable until then. Short, as Kafka Streams' exactly-once default (10 s) is; a changelog
/// transaction takes milliseconds.
pub const CHANGELOG_TXN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// A transactional producer under `id` (`what` names it in errors), initialised: that fences
/// every earlier producer of the same id — an earlier incarnation, a deposed writer — whose
/// later writes the broker then refuses. The broker aborts a transaction left open for
/// `open_for`; a message not delivered within it fails its transaction.
pub fn transactional_producer(
    k: &KafkaConfig,
    id: &str,
    what: &str,
    open_for: std::time::Duration,
) -> Result<FutureProducer> {
    use rdkafka::producer::Producer;
    let timeout = open_for.as_millis().to_string();
    let p: FutureProducer = client_config(
        &k.brokers,
        &[
            ("transactional.id", id),
            ("transaction.timeout.ms", &timeout),
            ("message.timeout.ms", &timeout),
            ("linger.ms", "1"),
        ],
        &k.properties,
    )
    .create()
    .map_err(|e| client_error(&format!("cannot create {what}"), e))?;
    p.init_transactions(TXN_TIMEOUT)
        .map_err(|e| anyhow::Error::new(e).context(format!("cannot initialise {what}")))?;
    Ok(p)
}

/// The producer of dead letters and recommendations, replaced when librdkafka reports it
/// unusable: after a fatal error (an idempotent producer fenced after an outage, say) an
/// instance never sends again and librdkafka requires a new one.
pub struct Producers {
    /// What a replacement is built from (`None`: never replaced, for tests).
    config: Option<KafkaConfig>,
    current: arc_swap::ArcSwap<FutureProducer>,
}

impl Producers {
    pub fn new(k: &KafkaConfig) -> Result<Self> {
        Ok(Self {
            config: Some(k.clone()),
            current: arc_swap::ArcSwap::from_pointee(producer(k)?),
        })
    }

    /// A fixed producer, never replaced.
    #[cfg(test)]
    pub fn fixed(p: FutureProducer) -> Self {
        Self {
            config: None,
            current: arc_swap::ArcSwap::from_pointee(p),
        }
    }

    /// The producer to send with now.
    pub fn get(&self) -> std::sync::Arc<FutureProducer> {
        self.current.load_full()
    }

    /// After a send on `failed` failed with `e`: replaces the producer if it is broken for good — a fatal
    /// error, or a producer-state error it keeps answering with (fenced, out of sequence:
    /// seen with Tansu after an outage) — logged; true when it was replaced.
    pub fn recover(&self, failed: &std::sync::Arc<FutureProducer>, e: &KafkaError) -> bool {
        use rdkafka::producer::Producer;
        use rdkafka::types::RDKafkaErrorCode as C;
        let current = self.current.load_full();
        if !std::sync::Arc::ptr_eq(failed, &current) {
            // already replaced (by another send that failed the same way)
            return false;
        }
        let broken = matches!(
            e.rdkafka_error_code(),
            Some(
                C::ProducerFenced
                    | C::Fenced
                    | C::Fatal
                    | C::InvalidProducerEpoch
                    | C::OutOfOrderSequenceNumber
                    | C::UnknownProducerId
                    | C::InvalidProducerIdMapping
            )
        );
        let (code, reason) = match current.client().fatal_error() {
            Some((code, reason)) => (code, reason),
            None if broken => (e.rdkafka_error_code().unwrap_or(C::Fatal), e.to_string()),
            None => return false,
        };
        let Some(k) = &self.config else {
            return false;
        };
        match producer(k) {
            Ok(p) => {
                tracing::error!(error = %code, reason, "the Kafka producer failed fatally: replaced by a new one");
                self.current.store(std::sync::Arc::new(p));
                true
            }
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "the Kafka producer failed fatally and cannot be replaced now");
                false
            }
        }
    }
}

/// Whether a produce error will fail the same way however often it is retried: the message is
/// too large, or the topic is missing or not ours to write. Anything else (timeouts, a broker
/// down or between leaders, a full queue) may pass.
pub fn is_permanent(e: &KafkaError) -> bool {
    permanent_cause(e).is_some()
}

/// Why a produce error is permanent (see [`is_permanent`]), as the label
/// `multivaed_dead_letters_blocked` uses: `too_large`, `unknown_topic`, `not_authorized` or
/// `rejected_by_broker`; `None` when a retry may pass.
pub fn permanent_cause(e: &KafkaError) -> Option<&'static str> {
    use rdkafka::types::RDKafkaErrorCode as C;
    match e.rdkafka_error_code()? {
        C::MessageSizeTooLarge | C::InvalidMessageSize => Some("too_large"),
        C::UnknownTopicOrPartition | C::UnknownTopic | C::UnknownPartition => Some("unknown_topic"),
        C::TopicAuthorizationFailed | C::ClusterAuthorizationFailed => Some("not_authorized"),
        C::InvalidTopic | C::InvalidRecord | C::PolicyViolation => Some("rejected_by_broker"),
        _ => None,
    }
}

/// Checks at start that the topics multivaed reads and writes exist (it never creates them),
/// with a named error for one still missing after 15 s (a topic being created as the daemon
/// starts is not an error). A cluster that does not answer is not an error here: the daemon
/// starts not ready and waits for it. Returns the partition count of `clicks_topic` (`None`
/// when the cluster did not answer). `wanted`: (setting, topic) pairs, the role's topics as
/// `topics::topics` lists them; their partition counts and compaction are `topics::check`'s.
pub fn check_topics<C: rdkafka::ClientContext>(
    client: &rdkafka::client::Client<C>,
    wanted: &[(&'static str, String)],
    clicks_topic: &str,
    refused: impl Fn() -> bool,
) -> Result<Option<i32>> {
    use std::time::{Duration, Instant};
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let metadata = match client.fetch_metadata(None, Duration::from_secs(10)) {
            Ok(m) => m,
            Err(e)
                if refused()
                    || e.rdkafka_error_code()
                        == Some(rdkafka::types::RDKafkaErrorCode::Authentication) =>
            {
                anyhow::bail!(
                "Kafka authentication failed: the broker refused this client's credentials (kafka.properties: security.protocol, sasl.mechanisms, sasl.username, sasl.password)"
                )
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot check the topics now: the cluster does not answer");
                return Ok(None);
            }
        };
        let partitions = |name: &str| {
            metadata
                .topics()
                .iter()
                .find(|t| t.name() == name && !t.partitions().is_empty())
                .map(|t| t.partitions().len() as i32)
        };
        match wanted.iter().find(|(_, name)| partitions(name).is_none()) {
            None => return Ok(Some(partitions(clicks_topic).unwrap_or(1))),
            Some((key, name)) if Instant::now() >= deadline => anyhow::bail!(
                "{key}: topic {name:?} does not exist on the cluster (multivaed does not create topics; create it first, e.g. with `multivaed topics create`)"
            ),
            Some(_) => std::thread::sleep(Duration::from_secs(1)),
        }
    }
}

/// Logs a client error librdkafka reported. A refused login is said plainly, at error level:
/// it never heals by retrying, and librdkafka's own words bury the cause.
pub fn log_client_error(error: &KafkaError, reason: &str) {
    if error.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::Authentication) {
        tracing::error!(error = %error, reason, "Kafka authentication failed: the broker refused this client's credentials (kafka.properties: security.protocol, sasl.mechanisms, sasl.username, sasl.password); not ready until they are right");
    } else {
        tracing::warn!(error = %error, reason, "kafka client error");
    }
}

/// The context of a client that checks the cluster at start: it remembers whether the broker
/// refused its credentials, so a failed check can say so instead of "no answer".
#[derive(Default)]
pub struct LoginWatch {
    refused: std::sync::atomic::AtomicBool,
}

impl LoginWatch {
    pub fn refused(&self) -> bool {
        self.refused.load(std::sync::atomic::Ordering::Acquire)
    }
}

impl rdkafka::ClientContext for LoginWatch {
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::Authentication) {
            self.refused
                .store(true, std::sync::atomic::Ordering::Release);
        }
        log_client_error(&error, reason);
    }
}

impl rdkafka::consumer::ConsumerContext for LoginWatch {}

/// A client for checking the cluster at start (metadata only; it never joins a group).
pub fn checker(k: &KafkaConfig) -> Result<rdkafka::consumer::BaseConsumer<LoginWatch>> {
    client_config(
        &k.brokers,
        &[("group.id", &format!("{}.check", k.group_id))],
        &k.properties,
    )
    .create_with_context(LoginWatch::default())
    .map_err(|e| client_error("cannot create the Kafka client", e))
}

/// The context of a reader that asks to be told of partition ends (`enable.partition.eof`):
/// reaching one is news it polls for, not an error to log.
pub struct EofReader;

impl rdkafka::ClientContext for EofReader {
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() != Some(rdkafka::types::RDKafkaErrorCode::PartitionEOF) {
            log_client_error(&error, reason);
        }
    }
}

impl rdkafka::consumer::ConsumerContext for EofReader {}

/// Follows partition 0 of a (compacted, one-partition) topic from its beginning until shutdown,
/// handing each record's offset, key, value (`None`: a tombstone) and signature (the
/// [`crate::control::SIGNATURE_HEADER`]) to `apply`, in log order.
/// `reader` names the reader in its group id (`<group_id>.<reader>`) and in logs.
pub async fn follow_topic(
    k: &KafkaConfig,
    reader: &str,
    topic: &str,
    shutdown: &crate::shutdown::Shutdown,
    mut apply: impl FnMut(i64, &[u8], Option<&[u8]>, Option<&[u8]>),
) -> Result<()> {
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::message::Message;
    use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
    let consumer: StreamConsumer = client_config(
        &k.brokers,
        &[
            ("group.id", &format!("{}.{reader}", k.group_id)),
            ("enable.auto.commit", "false"),
            ("auto.offset.reset", "earliest"),
            ("fetch.wait.max.ms", "100"),
            // records of an aborted transaction (a fenced writer's) are never read
            ("isolation.level", "read_committed"),
        ],
        &k.properties,
    )
    .create()
    .map_err(|e| client_error(&format!("cannot create the {reader}"), e))?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)?;
    consumer.assign(&tpl)?;
    let mut stop = shutdown.subscribe();
    loop {
        let m = tokio::select! {
            m = consumer.recv() => m,
            _ = stop.changed() => return Ok(()),
        };
        match m {
            Ok(m) => {
                apply(
                    m.offset(),
                    m.key().unwrap_or_default(),
                    m.payload(),
                    signature(&m),
                );
                crate::fault::delay_point(reader).await;
            }
            Err(e) => {
                tracing::warn!(error = %e, topic, "{reader}: read error");
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
        }
    }
}

/// A record's signature header, if it has one.
pub fn signature(m: &impl rdkafka::message::Message) -> Option<&[u8]> {
    use rdkafka::message::Headers;
    m.headers()?
        .iter()
        .find(|h| h.key == crate::control::SIGNATURE_HEADER)
        .and_then(|h| h.value)
}

/// A client-creation error that never shows a property's value (it may be a password).
pub fn client_error(what: &str, e: KafkaError) -> anyhow::Error {
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

#[cfg(test)]
mod tests {
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

    #[test]
    fn configured_properties_win_over_the_defaults() {
        let mut props = BTreeMap::new();
        props.insert("linger.ms".to_string(), "50".to_string());
        let c = client_config("b:9092", &[("linger.ms", "1"), ("acks", "all")], &props);
        assert_eq!(c.get("linger.ms"), Some("50"));
        assert_eq!(c.get("acks"), Some("all"));
        assert_eq!(c.get("bootstrap.servers"), Some("b:9092"));
    }
}
