//! The replicas' directory (role `serve`): each replica announces, on a small compacted topic
//! keyed by its instance id, its HTTP address and the partitions it owns with their epochs
//! (again after every assignment change; a tombstone when it stops), and every replica follows
//! the topic from its beginning. A pull for a user this replica does not own is redirected to
//! the address of the member owning the user's partition under the highest epoch. Kafka carries
//! it, so there is nothing to coordinate besides (Kafka's DescribeGroups names no member's HTTP
//! address). Whoever can write to the topic cannot steer pulls: a record counts only when the
//! fleet's key signed it, its address matches `http.advertise_pattern` and its epochs are in
//! bounds; any other is ignored and counted.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use anyhow::Result;
use rdkafka::producer::FutureRecord;
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use crate::config::KafkaConfig;
use crate::control::{ControlKey, Topic};
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
    pub key: Arc<ControlKey>,
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
        let headers = self.key.headers(Topic::Members, self.id.as_bytes(), value);
        let mut record: FutureRecord<'_, str, [u8]> = FutureRecord::to(&self.topic)
            .partition(0)
            .key(self.id.as_str())
            .headers(headers);
        if let Some(v) = value {
            record = record.payload(v);
        }
        if let Err((e, _)) = self.producers.get().send_result(record) {
            warn!(error = %e, "cannot announce this replica on the members topic");
        }
    }
}

/// What a members record must be to count.
pub struct MemberCheck {
    pub key: Arc<ControlKey>,
    /// `http.advertise_pattern`, resolved.
    pub pattern: String,
    /// `multivaed_control_records_refused_total`.
    pub refused: prometheus::IntCounterVec,
}

impl MemberCheck {
    /// The record's member (`None`: it leaves), or why it does not count: `signature`,
    /// `unreadable`, `address` or `bound` (the label of the refused counter).
    fn read(
        &self,
        key: &[u8],
        value: Option<&[u8]>,
        signature: Option<&[u8]>,
    ) -> Result<Option<Member>, (&'static str, String)> {
        if !self.key.verify(Topic::Members, key, value, signature) {
            return Err(("signature", "not signed with the fleet's key".into()));
        }
        let Some(v) = value else { return Ok(None) };
        let member: Member =
            serde_json::from_slice(v).map_err(|e| ("unreadable", e.to_string()))?;
        if !matches_pattern(&self.pattern, &member.http) {
            return Err((
                "address",
                format!(
                    "{:?} does not match http.advertise_pattern {:?}",
                    member.http, self.pattern
                ),
            ));
        }
        if let Some((p, e)) = member
            .partitions
            .iter()
            .find(|(p, e)| *p < 0 || !crate::control::in_bounds(*e))
        {
            return Err(("bound", format!("partition {p} epoch {e} out of bounds")));
        }
        Ok(Some(member))
    }
}

/// Follows the members topic into `directory` until shutdown; records `check` refuses are
/// logged, counted and ignored.
pub async fn follow(
    kafka: KafkaConfig,
    topic: String,
    directory: Arc<Directory>,
    check: MemberCheck,
    shutdown: Arc<Shutdown>,
) -> Result<()> {
    crate::kafka::follow_topic(
        &kafka,
        "members",
        &topic,
        &shutdown,
        |offset, key, value, signature| {
            let id = String::from_utf8_lossy(key).into_owned();
            match check.read(key, value, signature) {
                Ok(member) => {
                    debug!(member = id, ?member, "members topic");
                    directory.apply(id, member);
                }
                Err((reason, why)) => {
                    check.refused.with_label_values(&["members", reason]).inc();
                    warn!(member = id, offset, reason, error = %why, "a members record is ignored");
                }
            }
        },
    )
    .await
}

/// The pattern other replicas' addresses must match when `http.advertise_pattern` is empty:
/// `own` (this replica's advertised address) with its host's first DNS label, or for an IP
/// address its port, as the wildcard.
pub fn default_pattern(own: &str) -> String {
    let Ok(url) = url::Url::parse(own) else {
        return own.to_string();
    };
    let scheme = url.scheme();
    match url.host() {
        Some(url::Host::Domain(d)) => {
            let rest = d
                .split_once('.')
                .map_or(String::new(), |(_, r)| format!(".{r}"));
            let port = url.port().map_or(String::new(), |p| format!(":{p}"));
            format!("{scheme}://*{rest}{port}")
        }
        Some(host) => format!("{scheme}://{host}:*"),
        None => own.to_string(),
    }
}

/// Whether `address` matches `pattern`, where `*` stands for any run of characters but `/`,
/// `@`, `?` and `#` (so a wildcard never reaches past the host and port). Trailing slashes are
/// ignored.
pub fn matches_pattern(pattern: &str, address: &str) -> bool {
    fn go(p: &[u8], a: &[u8]) -> bool {
        match p.split_first() {
            None => a.is_empty(),
            Some((b'*', rest)) => {
                let mut i = 0;
                loop {
                    if go(rest, &a[i..]) {
                        return true;
                    }
                    match a.get(i) {
                        Some(c) if !b"/@?#".contains(c) => i += 1,
                        _ => return false,
                    }
                }
            }
            Some((c, rest)) => a.first() == Some(c) && go(rest, &a[1..]),
        }
    }
    go(
        pattern.trim_end_matches('/').as_bytes(),
        address.trim_end_matches('/').as_bytes(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_must_match_the_pattern_and_a_wildcard_stays_in_the_host() {
        let k8s = default_pattern("http://serve-0.multivaed-serve.ns.svc.cluster.local:9464");
        assert_eq!(k8s, "http://*.multivaed-serve.ns.svc.cluster.local:9464");
        assert!(matches_pattern(
            &k8s,
            "http://serve-1.multivaed-serve.ns.svc.cluster.local:9464/"
        ));
        for forged in [
            "http://evil.example:9464",
            "http://evil.example/.multivaed-serve.ns.svc.cluster.local:9464",
            "http://x@evil.example#.multivaed-serve.ns.svc.cluster.local:9464",
            "https://serve-1.multivaed-serve.ns.svc.cluster.local:9464",
            "http://serve-1.multivaed-serve.ns.svc.cluster.local:9999",
        ] {
            assert!(!matches_pattern(&k8s, forged), "{forged}");
        }
        let local = default_pattern("http://127.0.0.1:4000");
        assert_eq!(local, "http://127.0.0.1:*");
        assert!(matches_pattern(&local, "http://127.0.0.1:4001"));
        assert!(!matches_pattern(&local, "http://127.0.0.2:4001"));
        assert!(!matches_pattern(&local, "http://127.0.0.1:1@evil.example"));
    }

    #[test]
    fn a_record_counts_only_signed_in_bounds_and_at_a_matching_address() {
        let key = Arc::new(ControlKey::new(&[3u8; 32]));
        let check = MemberCheck {
            key: key.clone(),
            pattern: "http://127.0.0.1:*".into(),
            refused: prometheus::IntCounterVec::new(
                prometheus::Opts::new("r", "r"),
                &["topic", "reason"],
            )
            .unwrap(),
        };
        let record = |http: &str, epoch: u64| {
            serde_json::to_vec(&Member {
                http: http.into(),
                partitions: vec![(0, epoch)],
            })
            .unwrap()
        };
        let signed = |v: &[u8]| key.sign(Topic::Members, b"r1", Some(v));
        let good = record("http://127.0.0.1:5000", 3);
        assert!(check
            .read(b"r1", Some(&good), Some(signed(&good).as_bytes()))
            .is_ok_and(|m| m.is_some()));
        assert_eq!(
            check.read(b"r1", Some(&good), None).unwrap_err().0,
            "signature"
        );
        let elsewhere = record("http://evil.example:80", 3);
        assert_eq!(
            check
                .read(b"r1", Some(&elsewhere), Some(signed(&elsewhere).as_bytes()))
                .unwrap_err()
                .0,
            "address"
        );
        let huge = record("http://127.0.0.1:5000", u64::MAX);
        assert_eq!(
            check
                .read(b"r1", Some(&huge), Some(signed(&huge).as_bytes()))
                .unwrap_err()
                .0,
            "bound"
        );
        let leave = key.sign(Topic::Members, b"r1", None);
        assert!(check
            .read(b"r1", None, Some(leave.as_bytes()))
            .is_ok_and(|m| m.is_none()));
    }

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
