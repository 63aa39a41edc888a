//! Every topic multivaed reads or writes, in one place, with the partitions and cleanup policy
//! it needs: `multivaed topics create` creates what is missing, `multivaed topics check` (and a
//! serving replica or trainer at start) verifies them. The clicks topic's partition count is the
//! unit: the changelog must have as many, the members and models topics one.

use std::time::Duration;

use anyhow::{Context, Result};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;

use crate::config::{Config, Role};
use crate::kafka::{client_config, client_error};

/// A topic and what it must be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topic {
    /// The setting naming it.
    pub key: &'static str,
    pub name: String,
    /// Partitions required: `None` for "any", `Some(0)` for "as many as the clicks topic".
    pub partitions: Option<i32>,
    pub compact: bool,
    /// May be missing (the items topic): created by `topics create`, not required at start.
    pub optional: bool,
}

/// The topics of `config`'s role.
pub fn topics(config: &Config) -> Vec<Topic> {
    let k = &config.kafka;
    let t = |key, name: &str, partitions, compact| Topic {
        key,
        name: name.to_string(),
        partitions,
        compact,
        optional: false,
    };
    // every role knows the clicks topic (its partition count is the changelog's)
    let mut out = vec![t("kafka.clicks_topic", &k.clicks_topic, None, false)];
    if config.role != Role::Train {
        out.push(t(
            "kafka.recommendations_topic",
            &k.recommendations_topic,
            None,
            false,
        ));
        out.push(t(
            "kafka.dead_letter_topic",
            &k.dead_letter_topic,
            None,
            false,
        ));
        out.push(Topic {
            optional: true,
            ..t("items.topic", &config.items.topic(k), None, true)
        });
    }
    if config.role != Role::All {
        out.push(t("kafka.changelog_topic", &k.changelog(), Some(0), true));
    }
    if config.role == Role::Serve {
        out.push(t("kafka.members_topic", &k.members(), Some(1), true));
    }
    if config.role != Role::All {
        out.push(t("models.topic", &config.models.topic, Some(1), true));
    }
    out
}

/// What `check` found of one topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub topic: Topic,
    pub partitions: Option<i32>,
    /// `cleanup.policy`, when the broker says.
    pub policy: Option<String>,
    /// `delete.retention.ms` (how long a tombstone stays readable), when the broker says.
    pub delete_retention: Option<Duration>,
    /// What is wrong with it, if anything.
    pub problem: Option<String>,
}

fn admin(config: &Config) -> Result<AdminClient<DefaultClientContext>> {
    client_config(&config.kafka.brokers, &[], &config.kafka.properties)
        .create()
        .map_err(|e| client_error("cannot create a Kafka admin client", e))
}

/// Checks every topic: present, partitions as required, compacted where required. A broker
/// that cannot describe topic configs leaves `policy` empty (not a problem in itself).
pub async fn check(config: &Config) -> Result<Vec<Found>> {
    let admin = admin(config)?;
    let metadata = admin
        .inner()
        .fetch_metadata(None, Duration::from_secs(10))
        .context("cannot read the cluster's topics")?;
    let count = |name: &str| {
        metadata
            .topics()
            .iter()
            .find(|t| t.name() == name && !t.partitions().is_empty())
            .map(|t| t.partitions().len() as i32)
    };
    let clicks = count(&config.kafka.clicks_topic);
    let mut found = Vec::new();
    for topic in topics(config) {
        let partitions = count(&topic.name);
        let (policy, delete_retention) = match (partitions, topic.compact) {
            (Some(_), true) => compaction_configs(&admin, &topic.name).await,
            _ => (None, None),
        };
        let wanted = match topic.partitions {
            Some(0) => clicks,
            other => other,
        };
        let problem = match partitions {
            None if topic.optional => None,
            _ => problem(partitions, wanted, policy.as_deref(), topic.compact),
        };
        found.push(Found {
            topic,
            partitions,
            policy,
            delete_retention,
            problem,
        });
    }
    Ok(found)
}

/// What is wrong with a topic of `partitions` (`None`: missing) that needs `wanted` partitions
/// (`None`: any) and, when `compact`, a compacting cleanup policy that deletes nothing by age
/// (`None`: not described): `compact,delete` would drop inactive users' histories and the
/// current model's announcement once they are older than the retention.
fn problem(
    partitions: Option<i32>,
    wanted: Option<i32>,
    policy: Option<&str>,
    compact: bool,
) -> Option<String> {
    match (partitions, wanted) {
        (None, _) => Some("missing".to_string()),
        (Some(n), Some(w)) if n != w => Some(format!("{n} partitions, needs {w}")),
        _ => match policy {
            Some(p) if compact && !p.split(',').any(|x| x.trim() == "compact") => {
                Some(format!("cleanup.policy={p}, needs compact"))
            }
            Some(p) if compact && p.split(',').any(|x| x.trim() == "delete") => Some(format!(
                "cleanup.policy={p}: retention would delete old records of users still present; needs compact alone"
            )),
            _ => None,
        },
    }
}

/// A compacted topic's `cleanup.policy` and `delete.retention.ms`, when the broker says.
async fn compaction_configs(
    admin: &AdminClient<DefaultClientContext>,
    topic: &str,
) -> (Option<String>, Option<Duration>) {
    let spec = ResourceSpecifier::Topic(topic);
    let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
    let Ok(results) = admin.describe_configs([&spec], &opts).await else {
        return (None, None);
    };
    let Some(Ok(resource)) = results.into_iter().next() else {
        return (None, None);
    };
    let value = |key: &str| resource.get(key).and_then(|e| e.value.clone());
    let retention = value("delete.retention.ms")
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_millis);
    (value("cleanup.policy"), retention)
}

/// Creates the topics that are missing: the clicks topic with `partitions`, the changelog with
/// as many as the clicks topic has, the members topic with one; changelog and members
/// compacted. Returns the names created.
pub async fn create(config: &Config, partitions: i32, replication: i32) -> Result<Vec<String>> {
    let before = check(config).await?;
    let clicks = before
        .iter()
        .find(|f| f.topic.key == "kafka.clicks_topic")
        .and_then(|f| f.partitions)
        .unwrap_or(partitions);
    let missing: Vec<(&Topic, i32)> = before
        .iter()
        .filter(|f| f.partitions.is_none())
        .map(|f| {
            let n = match f.topic.partitions {
                Some(0) | None => clicks,
                Some(n) => n,
            };
            (&f.topic, n)
        })
        .collect();
    let retention_ms = config.kafka.expected_absence.as_millis().to_string();
    let new: Vec<NewTopic> = missing
        .iter()
        .map(|(t, n)| {
            let nt = NewTopic::new(&t.name, *n, TopicReplication::Fixed(replication));
            if t.compact {
                // a tombstone stays readable as long as a replica may be away
                nt.set("cleanup.policy", "compact")
                    .set("delete.retention.ms", &retention_ms)
            } else {
                nt
            }
        })
        .collect();
    if new.is_empty() {
        return Ok(Vec::new());
    }
    let admin = admin(config)?;
    let results = admin
        .create_topics(
            &new,
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        )
        .await
        .context("cannot create topics")?;
    let mut created = Vec::new();
    for r in results {
        match r {
            Ok(name) => created.push(name),
            Err((name, e)) => anyhow::bail!("cannot create topic {name}: {e}"),
        }
    }
    Ok(created)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_topic_is_wrong_when_missing_miscounted_or_not_compacted() {
        assert_eq!(problem(None, None, None, false).as_deref(), Some("missing"));
        assert_eq!(
            problem(Some(2), Some(3), Some("compact"), true).as_deref(),
            Some("2 partitions, needs 3")
        );
        assert_eq!(
            problem(Some(3), Some(3), Some("delete"), true).as_deref(),
            Some("cleanup.policy=delete, needs compact")
        );
        assert!(problem(Some(3), Some(3), Some("compact,delete"), true)
            .is_some_and(|p| p.contains("compact alone")));
        assert_eq!(problem(Some(3), Some(3), Some("compact"), true), None);
        // a broker that does not describe the policy: not refused (the daemon warns)
        assert_eq!(problem(Some(3), Some(3), None, true), None);
        assert_eq!(problem(Some(5), None, Some("delete"), false), None);
    }
}
