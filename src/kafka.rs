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

/// Whether a produce error will fail the same way however often it is retried: the message is
/// too large, or the topic is missing or not ours to write. Anything else (timeouts, a broker
/// down or between leaders, a full queue) may pass.
pub fn is_permanent(e: &KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as C;
    matches!(
        e.rdkafka_error_code(),
        Some(
            C::MessageSizeTooLarge
                | C::InvalidMessageSize
                | C::UnknownTopicOrPartition
                | C::UnknownTopic
                | C::UnknownPartition
                | C::TopicAuthorizationFailed
                | C::ClusterAuthorizationFailed
                | C::InvalidTopic
                | C::InvalidRecord
                | C::PolicyViolation
        )
    )
}

/// Checks at start that the topics multivaed reads and writes exist (it never creates them),
/// with a named error for one still missing after 15 s (a topic being created as the daemon
/// starts is not an error). A cluster that does not answer is not an error here: the daemon
/// starts not ready and waits for it.
pub fn check_topics<C: rdkafka::ClientContext>(
    client: &rdkafka::client::Client<C>,
    k: &KafkaConfig,
) -> Result<()> {
    use std::time::{Duration, Instant};
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let metadata = match client.fetch_metadata(None, Duration::from_secs(10)) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "cannot check the topics now: the cluster does not answer");
                return Ok(());
            }
        };
        let present: Vec<&str> = metadata.topics().iter().map(|t| t.name()).collect();
        let missing = [
            ("kafka.clicks_topic", &k.clicks_topic),
            ("kafka.recommendations_topic", &k.recommendations_topic),
            ("kafka.dead_letter_topic", &k.dead_letter_topic),
        ]
        .into_iter()
        .find(|(_, topic)| !present.contains(&topic.as_str()));
        match missing {
            None => return Ok(()),
            Some((key, topic)) if Instant::now() >= deadline => anyhow::bail!(
                "{key}: topic {topic:?} does not exist on the cluster (multivaed does not create topics; create it first)"
            ),
            Some(_) => std::thread::sleep(Duration::from_secs(1)),
        }
    }
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
