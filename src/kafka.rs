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
pub fn producer(k: &KafkaConfig) -> Result<FutureProducer> {
    client_config(
        &k.brokers,
        &[("linger.ms", "1"), ("message.timeout.ms", "30000")],
        &k.properties,
    )
    .create()
    .map_err(|e| client_error("cannot create the Kafka producer", e))
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
