//! The replicas' directory (role `serve`): each replica announces, on a small compacted topic
//! keyed by its instance id, its HTTP address and the partitions it owns with their epochs
//! (again after every assignment change; a tombstone when it stops), and every replica follows
//! the topic from its beginning. A pull for a user this replica does not own is redirected to
//! the address of the member owning the user's partition under the highest epoch. Kafka carries
//! it, so there is nothing to coordinate besides (the test broker's DescribeGroups lists no
//! members, so group metadata cannot serve here).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use anyhow::Result;
use rdkafka::producer::FutureRecord;
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use crate::config::KafkaConfig;
use crate::kafka::Producers;
use crate::shutdown::Shutdown;

/// One replica's announcement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Member {
    /// Where its HTTP API answers (`http.advertise`).
    pub http: String,
    /// The partitions it owns, with their epochs.
    pub partitions: Vec<(i32, u64)>,
}

/// What every replica knows of the others, from the members topic.
#[derive(Default)]
pub struct Directory {
    members: RwLock<HashMap<String, Member>>,
}

impl Directory {
    /// The member owning `partition` under the highest epoch: its id and address.
    pub fn owner_of(&self, partition: i32) -> Option<(String, String)> {
        let members = self.members.read().unwrap_or_else(|e| e.into_inner());
        members
            .iter()
            .filter_map(|(id, m)| {
                m.partitions
                    .iter()
                    .find(|(p, _)| *p == partition)
                    .map(|(_, epoch)| (*epoch, id, &m.http))
            })
            .max()
            .map(|(_, id, http)| (id.clone(), http.clone()))
    }

    fn apply(&self, id: String, member: Option<Member>) {
        let mut members = self.members.write().unwrap_or_else(|e| e.into_inner());
        match member {
            Some(m) => members.insert(id, m),
            None => members.remove(&id),
        };
    }
}

/// Writes this replica's announcements.
pub struct Announcer {
    pub topic: String,
    pub id: String,
    pub http: String,
    pub producers: Arc<Producers>,
}

impl Announcer {
    /// Announces the partitions owned now (not awaited: a later announcement replaces it).
    pub fn announce(&self, partitions: Vec<(i32, u64)>) {
        let member = Member {
            http: self.http.clone(),
            partitions,
        };
        let Ok(value) = serde_json::to_vec(&member) else {
            return;
        };
        self.send(Some(&value));
    }

    /// Leaves the directory (a tombstone), when the replica stops.
    pub fn leave(&self) {
        self.send(None);
    }

    fn send(&self, value: Option<&[u8]>) {
        let mut record: FutureRecord<'_, str, [u8]> =
            FutureRecord::to(&self.topic).partition(0).key(&self.id);
        if let Some(v) = value {
            record = record.payload(v);
        }
        if let Err((e, _)) = self.producers.get().send_result(record) {
            warn!(error = %e, "cannot announce this replica on the members topic");
        }
    }
}

/// Follows the members topic into `directory` until shutdown.
pub async fn follow(
    kafka: KafkaConfig,
    topic: String,
    directory: Arc<Directory>,
    shutdown: Arc<Shutdown>,
) -> Result<()> {
    crate::kafka::follow_topic(&kafka, "members", &topic, &shutdown, |_, key, value| {
        let id = String::from_utf8_lossy(key).into_owned();
        let member = match value {
            None => None,
            Some(v) => match serde_json::from_slice::<Member>(v) {
                Ok(member) => Some(member),
                Err(e) => {
                    warn!(error = %e, member = id, "an unreadable members record is skipped");
                    return;
                }
            },
        };
        debug!(member = id, ?member, "members topic");
        directory.apply(id, member);
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partition_belongs_to_its_highest_epoch() {
        let d = Directory::default();
        let m = |http: &str, partitions: Vec<(i32, u64)>| Member {
            http: http.into(),
            partitions,
        };
        d.apply("a".into(), Some(m("http://a", vec![(0, 1), (1, 1)])));
        assert_eq!(d.owner_of(1), Some(("a".into(), "http://a".into())));
        // b restored partition 1 (epoch 2) before a's revocation was announced
        d.apply("b".into(), Some(m("http://b", vec![(1, 2)])));
        assert_eq!(d.owner_of(1), Some(("b".into(), "http://b".into())));
        assert_eq!(d.owner_of(0), Some(("a".into(), "http://a".into())));
        d.apply("a".into(), None);
        assert_eq!(d.owner_of(0), None);
    }
}
