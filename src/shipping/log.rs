//! The models topic's records and the one rule every reader applies to them, in log order, so
//! serving replicas, trainers and the `models` command always agree on the current version:
//!
//! - a **claim** (`claim-<epoch>-<trainer>`) raises the fencing epoch; the first claim of an
//!   epoch higher than any before makes its trainer the epoch's owner (a later claim of the
//!   same or a lower epoch changes nothing);
//! - a **model** announcement (`model-<version>-<epoch>`) is accepted only under the highest
//!   epoch and from that epoch's owner — or, for an operator's rollback, under the highest
//!   epoch — and then it is the current version. A deposed trainer (frozen past its session,
//!   then thawed) announces under an epoch a newer claim has passed: ignored by everyone;
//! - a tombstone removes a pruned version's record.
//!
//! Every key is unique (compaction keeps each record, so no later record of another meaning
//! can replace an earlier one), which keeps the rule's result the same on the compacted log.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::model::bundle::{FileDigest, TrainingState};
use crate::model::ModelConfig;

/// A record's value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Record {
    /// A trainer elected by the consumer group takes the next epoch.
    Claim {
        epoch: u64,
        trainer: String,
        at_unix_ms: u64,
    },
    /// A model version (or, with `rollback`, an older one again).
    Model(Box<Announcement>),
}

/// What a version's announcement says: where its files are and what they must be, and the
/// training figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Announcement {
    pub version: u64,
    /// The fencing epoch it is announced under.
    pub epoch: u64,
    /// Who announced it (a trainer's instance id; "rollback" for an operator's rollback).
    pub trainer: String,
    /// The files' folder, relative to the object store's root (`v0000000042-e3`): unique to a
    /// (version, epoch), so a deposed trainer's upload never overwrites a current one's.
    pub path: String,
    /// The same folder as a URL, for people (replicas read `path` from their own store).
    pub uri: String,
    pub model: FileDigest,
    pub optimizer: FileDigest,
    pub items: FileDigest,
    pub n_items: usize,
    pub config: ModelConfig,
    pub state: TrainingState,
    pub validation_ndcg: Option<f64>,
    pub validated: bool,
    /// The version it was trained from (or, for a rollback, the one it replaces).
    pub base_version: Option<u64>,
    /// When the version was trained (RFC 3339) and announced.
    pub created_at: String,
    pub announced_unix_ms: u64,
    #[serde(default)]
    pub rollback: bool,
}

/// The key of a claim.
pub fn claim_key(epoch: u64, trainer: &str) -> String {
    format!("claim-{epoch:020}-{trainer}")
}

/// The key of an announcement (a rollback's adds when it was made: each one is a new record).
pub fn model_key(a: &Announcement) -> String {
    let key = format!("model-{:020}-{:020}", a.version, a.epoch);
    if a.rollback {
        format!("{key}-rollback-{}", a.announced_unix_ms)
    } else {
        key
    }
}

/// Why a record's epoch or version is out of bounds, if it is.
fn out_of_bounds(record: &Record) -> Option<String> {
    let (what, n) = match record {
        Record::Claim { epoch, .. } => ("epoch", *epoch),
        Record::Model(a) if !crate::control::in_bounds(a.epoch) => ("epoch", a.epoch),
        Record::Model(a) => ("version", a.version),
    };
    (!crate::control::in_bounds(n))
        .then(|| format!("{what} {n} is beyond {}", crate::control::MAX_SEQUENCE))
}

/// What reading one record did.
#[derive(Debug, Clone, PartialEq)]
pub enum Read {
    Claimed {
        epoch: u64,
        trainer: String,
    },
    /// A claim under an epoch already reached.
    ClaimIgnored,
    Accepted,
    /// Not under the highest epoch or not from its owner.
    Ignored(String),
    Removed,
    Unreadable(String),
    /// An epoch or version out of bounds ([`crate::control::MAX_SEQUENCE`]).
    OutOfBounds(String),
}

/// One announcement record still in the log, and whether the rule accepted it.
#[derive(Debug, Clone)]
pub struct Entry {
    pub key: String,
    pub announcement: Arc<Announcement>,
    pub accepted: bool,
}

/// The models topic as read so far.
#[derive(Debug, Default, Clone)]
pub struct ModelLog {
    epoch: u64,
    owner: Option<String>,
    current: Option<Arc<Announcement>>,
    /// Announcements still present (not removed by a tombstone), by key, in log order.
    entries: BTreeMap<i64, Entry>,
    highest_version: u64,
    next_offset: i64,
}

impl ModelLog {
    /// Reads the record at `offset` (`None`: a tombstone).
    pub fn apply(&mut self, offset: i64, key: &str, value: Option<&[u8]>) -> Read {
        self.next_offset = self.next_offset.max(offset + 1);
        let Some(value) = value else {
            self.entries.retain(|_, e| e.key != key);
            return Read::Removed;
        };
        let record = match serde_json::from_slice::<Record>(value) {
            Ok(r) => r,
            Err(e) => return Read::Unreadable(e.to_string()),
        };
        if let Some(why) = out_of_bounds(&record) {
            return Read::OutOfBounds(why);
        }
        match record {
            Record::Claim { epoch, trainer, .. } => {
                if epoch <= self.epoch {
                    return Read::ClaimIgnored;
                }
                self.epoch = epoch;
                self.owner = Some(trainer.clone());
                Read::Claimed { epoch, trainer }
            }
            Record::Model(a) => {
                self.highest_version = self.highest_version.max(a.version);
                let verdict = self.judge(&a);
                let accepted = verdict.is_none();
                let a = Arc::new(*a);
                if accepted {
                    self.current = Some(a.clone());
                }
                self.entries.insert(
                    offset,
                    Entry {
                        key: key.to_string(),
                        announcement: a,
                        accepted,
                    },
                );
                verdict.map_or(Read::Accepted, Read::Ignored)
            }
        }
    }

    /// Passes over a record not applied (its signature is not the fleet's).
    pub fn skip(&mut self, offset: i64) {
        self.next_offset = self.next_offset.max(offset + 1);
    }

    /// Why an announcement is not accepted, if it is not.
    fn judge(&self, a: &Announcement) -> Option<String> {
        if a.epoch != self.epoch {
            return Some(format!(
                "epoch {} is not the highest claimed ({})",
                a.epoch, self.epoch
            ));
        }
        if !a.rollback && self.owner.as_deref() != Some(a.trainer.as_str()) {
            return Some(format!(
                "{} does not own epoch {} ({:?} does)",
                a.trainer, a.epoch, self.owner
            ));
        }
        None
    }

    /// The version the fleet serves now.
    pub fn current(&self) -> Option<&Arc<Announcement>> {
        self.current.as_ref()
    }

    /// The highest epoch claimed, and its owner.
    pub fn epoch(&self) -> (u64, Option<&str>) {
        (self.epoch, self.owner.as_deref())
    }

    /// The highest version number any announcement carried (accepted or not).
    pub fn highest_version(&self) -> u64 {
        self.highest_version
    }

    /// The offset after the last record read.
    pub fn next_offset(&self) -> i64 {
        self.next_offset
    }

    /// Every announcement still in the log, in log order.
    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries.values()
    }

    /// Whether the record under `key` was read and accepted.
    pub fn accepted(&self, key: &str) -> Option<bool> {
        self.entries
            .values()
            .find(|e| e.key == key)
            .map(|e| e.accepted)
    }

    /// The newest accepted announcement of `version` still in the log.
    pub fn accepted_version(&self, version: u64) -> Option<&Arc<Announcement>> {
        self.entries
            .values()
            .rev()
            .find(|e| e.accepted && e.announcement.version == version)
            .map(|e| &e.announcement)
    }

    /// The announcement whose files are at `path`.
    pub fn by_path(&self, path: &str) -> Option<&Arc<Announcement>> {
        self.entries
            .values()
            .rev()
            .find(|e| e.announcement.path == path)
            .map(|e| &e.announcement)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn announcement(version: u64, epoch: u64, trainer: &str) -> Announcement {
        let digest = FileDigest {
            name: "f".into(),
            bytes: 1,
            sha256: "00".into(),
        };
        Announcement {
            version,
            epoch,
            trainer: trainer.into(),
            path: format!("v{version:010}-e{epoch}"),
            uri: String::new(),
            model: digest.clone(),
            optimizer: digest.clone(),
            items: digest,
            n_items: 3,
            config: ModelConfig::default(),
            state: TrainingState {
                update_count: version.wrapping_mul(10),
                adam_step: 0,
                epochs_done: 0,
                seed: 1,
                beta: 0.0,
            },
            validation_ndcg: None,
            validated: true,
            base_version: None,
            created_at: String::new(),
            announced_unix_ms: version,
            rollback: false,
        }
    }

    fn claim(epoch: u64, trainer: &str) -> Vec<u8> {
        serde_json::to_vec(&Record::Claim {
            epoch,
            trainer: trainer.into(),
            at_unix_ms: 0,
        })
        .unwrap()
    }

    fn model(a: &Announcement) -> Vec<u8> {
        serde_json::to_vec(&Record::Model(Box::new(a.clone()))).unwrap()
    }

    /// Applies records in order, from offset 0.
    fn read(records: &[(String, Option<Vec<u8>>)]) -> (ModelLog, Vec<Read>) {
        let mut log = ModelLog::default();
        let reads = records
            .iter()
            .enumerate()
            .map(|(o, (k, v))| log.apply(o as i64, k, v.as_deref()))
            .collect();
        (log, reads)
    }

    #[test]
    fn a_deposed_trainers_late_announcement_is_ignored_and_a_rollback_accepted() {
        let a1 = announcement(1, 1, "t0");
        let a2 = announcement(2, 1, "t0");
        // t1 takes over (epoch 2); t0, thawed, announces v3 under its old epoch
        let late = announcement(3, 1, "t0");
        let b3 = announcement(3, 2, "t1");
        // a second claim of epoch 2 (t0 claiming in the same window) changes nothing
        let mut rollback = announcement(1, 2, "rollback");
        rollback.rollback = true;
        let forged = announcement(4, 2, "t0");
        let records = vec![
            (claim_key(1, "t0"), Some(claim(1, "t0"))),
            (model_key(&a1), Some(model(&a1))),
            (model_key(&a2), Some(model(&a2))),
            (claim_key(2, "t1"), Some(claim(2, "t1"))),
            (claim_key(2, "t0"), Some(claim(2, "t0"))),
            (model_key(&late), Some(model(&late))),
            (model_key(&b3), Some(model(&b3))),
            (model_key(&forged), Some(model(&forged))),
            (model_key(&rollback), Some(model(&rollback))),
            (model_key(&a2), None),
            ("junk".into(), Some(b"{".to_vec())),
        ];
        let (log, reads) = read(&records);
        assert_eq!(reads[4], Read::ClaimIgnored);
        assert!(matches!(reads[5], Read::Ignored(_)), "{:?}", reads[5]);
        assert_eq!(reads[6], Read::Accepted);
        assert!(matches!(reads[7], Read::Ignored(_)), "not the owner");
        assert_eq!(reads[8], Read::Accepted);
        assert!(matches!(reads[10], Read::Unreadable(_)));
        assert_eq!(log.current().unwrap().version, 1, "the rollback is current");
        assert_eq!(log.highest_version(), 4, "numbers seen, accepted or not");
        assert_eq!(log.epoch(), (2, Some("t1")));
        assert_eq!(log.accepted(&model_key(&late)), Some(false));
        assert_eq!(log.accepted(&model_key(&a2)), None, "pruned");
        assert_eq!(log.accepted_version(3).unwrap().trainer, "t1");
        assert_eq!(log.next_offset(), records.len() as i64);
    }

    #[test]
    fn an_epoch_or_version_out_of_bounds_changes_nothing() {
        let a1 = announcement(1, 1, "t0");
        let mut huge_version = announcement(u64::MAX, 1, "t0");
        huge_version.path = "v-huge".into();
        let records = vec![
            (claim_key(1, "t0"), Some(claim(1, "t0"))),
            (model_key(&a1), Some(model(&a1))),
            (claim_key(u64::MAX, "x"), Some(claim(u64::MAX, "x"))),
            (model_key(&huge_version), Some(model(&huge_version))),
            (
                model_key(&announcement(2, u64::MAX, "x")),
                Some(model(&announcement(2, u64::MAX, "x"))),
            ),
        ];
        let (log, reads) = read(&records);
        for r in &reads[2..] {
            assert!(matches!(r, Read::OutOfBounds(_)), "{r:?}");
        }
        assert_eq!(log.epoch(), (1, Some("t0")));
        assert_eq!(log.current().unwrap().version, 1);
        assert_eq!(log.highest_version(), 1);
        assert_eq!(log.next_offset(), records.len() as i64);
    }

    #[test]
    fn every_key_is_unique_so_compaction_keeps_the_verdicts() {
        let a = announcement(7, 3, "t");
        let mut r = a.clone();
        r.rollback = true;
        let mut r2 = r.clone();
        r2.announced_unix_ms += 1;
        let keys = [
            model_key(&a),
            model_key(&r),
            model_key(&r2),
            claim_key(3, "t"),
        ];
        let distinct: std::collections::HashSet<_> = keys.iter().collect();
        assert_eq!(distinct.len(), keys.len(), "{keys:?}");
    }
}
