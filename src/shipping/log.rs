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
//! - an announcement marked `canary` (accepted by the same rule) does not replace the current
//!   version: it is the running canary, scoring its slice of the users, until a **decision**
//!   (`decision-<version>-<epoch>-<ms>`, under the highest epoch, about the running canary)
//!   promotes it to current or rejects it; any later accepted announcement that is not a
//!   canary (a rollback, a version shipped with promotion off) ends the canary too;
//! - an **evidence** report (`evidence-<version>-<reporter>`) is one serving process's
//!   cumulative counts for a canary: the latest per reporter counts (compaction keeps it), and a
//!   canary's evidence is the sum over reporters;
//! - a tombstone removes a pruned version's record.
//!
//! Every key is unique (compaction keeps each record, so no later record of another meaning
//! can replace an earlier one), which keeps the rule's result the same on the compacted log.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::model::bundle::{FileDigest, TrainingState};
use crate::model::ModelConfig;
pub use crate::promotion::Decided;
use crate::promotion::Evidence;

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
    /// The running canary promoted or rejected.
    Decision(Decision),
    /// A serving process's counts for a canary.
    Evidence(Report),
}

/// A decision about the running canary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub version: u64,
    /// The epoch it is made under (the highest claimed, for it to count).
    pub epoch: u64,
    pub decision: Decided,
    /// Who decided: `test` (the sequential test), `timeout` (`promotion.max_duration`) or
    /// `operator` (`multivaed models promote|reject`).
    pub by: String,
    pub reason: String,
    /// The evidence it was made on.
    pub evidence: Evidence,
    pub at_unix_ms: u64,
}

/// One serving process's cumulative counts for a canary version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// The process: its instance id and when it started (a restart reports afresh).
    pub reporter: String,
    pub version: u64,
    pub evidence: Evidence,
    pub at_unix_ms: u64,
}

/// The key of a decision.
pub fn decision_key(d: &Decision) -> String {
    format!(
        "decision-{:020}-{:020}-{}",
        d.version, d.epoch, d.at_unix_ms
    )
}

/// The key of an evidence report: one per process and canary, overwritten as counts grow.
pub fn evidence_key(version: u64, reporter: &str) -> String {
    format!("evidence-{version:020}-{reporter}")
}

/// Reporters whose counts one canary keeps, at most.
const MAX_REPORTERS: usize = 4096;
/// Canary versions whose evidence is kept, at most (the newest).
const MAX_EVIDENCE_VERSIONS: usize = 16;

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
    /// A canary: it scores this share of the users until a decision (live-gated promotion).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<f64>,
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
        Record::Decision(d) if !crate::control::in_bounds(d.epoch) => ("epoch", d.epoch),
        Record::Decision(d) => ("version", d.version),
        Record::Evidence(r) => {
            let e = &r.evidence;
            let counts = [e.canary.trials, e.canary.hits, e.live.trials, e.live.hits];
            if let Some(&n) = counts.iter().find(|&&n| !crate::control::in_bounds(n)) {
                return Some(format!(
                    "count {n} is beyond {}",
                    crate::control::MAX_SEQUENCE
                ));
            }
            if !e.is_consistent() {
                return Some("more hits than trials".into());
            }
            if r.reporter.len() > 256 {
                return Some("a reporter name over 256 bytes".into());
            }
            ("version", r.version)
        }
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
    /// A decision taken: the canary promoted or rejected.
    Decided(Decided),
    /// Evidence counted.
    Reported,
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
    /// The running canary.
    canary: Option<Arc<Announcement>>,
    /// Per canary version, each reporter's latest counts.
    evidence: BTreeMap<u64, BTreeMap<String, Evidence>>,
    /// The decision taken about each canary version (the last accepted).
    decisions: BTreeMap<u64, Decision>,
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
            self.remove_canary_record(key);
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
                    if a.canary.is_some() && self.current.is_some() {
                        self.canary = Some(a.clone());
                    } else {
                        self.current = Some(a.clone());
                        self.canary = None;
                    }
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
            Record::Decision(d) => self.decide(d),
            Record::Evidence(r) => {
                let reports = self.evidence.entry(r.version).or_default();
                if reports.len() < MAX_REPORTERS || reports.contains_key(&r.reporter) {
                    reports.insert(r.reporter, r.evidence);
                }
                while self.evidence.len() > MAX_EVIDENCE_VERSIONS {
                    self.evidence.pop_first();
                }
                Read::Reported
            }
        }
    }

    /// Forgets the evidence report or decision a tombstone removes.
    fn remove_canary_record(&mut self, key: &str) {
        if let Some((version, reporter)) = key
            .strip_prefix("evidence-")
            .and_then(|rest| rest.split_once('-'))
        {
            let Ok(version) = version.parse::<u64>() else {
                return;
            };
            if let Some(reports) = self.evidence.get_mut(&version) {
                reports.remove(reporter);
                if reports.is_empty() {
                    self.evidence.remove(&version);
                }
            }
        } else if key.starts_with("decision-") {
            self.decisions.retain(|_, d| decision_key(d) != key);
        }
    }

    /// Applies a decision about the running canary (under the highest epoch, about that very
    /// version).
    fn decide(&mut self, d: Decision) -> Read {
        if d.epoch != self.epoch {
            return Read::Ignored(format!(
                "decision under epoch {}, not the highest claimed ({})",
                d.epoch, self.epoch
            ));
        }
        match &self.canary {
            Some(c) if c.version == d.version => {}
            other => {
                return Read::Ignored(format!(
                    "a decision about version {}, but the running canary is {:?}",
                    d.version,
                    other.as_ref().map(|c| c.version)
                ))
            }
        }
        let canary = self.canary.take();
        if d.decision == Decided::Promote {
            self.current = canary;
        }
        let decided = d.decision;
        self.decisions.insert(d.version, d);
        while self.decisions.len() > MAX_EVIDENCE_VERSIONS {
            self.decisions.pop_first();
        }
        Read::Decided(decided)
    }

    /// The running canary, if any.
    pub fn canary(&self) -> Option<&Arc<Announcement>> {
        self.canary.as_ref()
    }

    /// A canary version's evidence: every reporter's latest counts, summed.
    pub fn evidence(&self, version: u64) -> Evidence {
        self.evidence
            .get(&version)
            .into_iter()
            .flat_map(|r| r.values())
            .fold(Evidence::default(), |a, e| a.plus(*e))
    }

    /// The keys of evidence reports and decisions about canaries decided before `before_ms`,
    /// but the decision about one of `kept` (versions whose announcements stay): what pruning
    /// removes, so the topic does not grow with every canary.
    pub fn decided_before(
        &self,
        before_ms: u64,
        kept: &std::collections::HashSet<u64>,
    ) -> Vec<String> {
        let mut keys = Vec::new();
        for (version, d) in &self.decisions {
            if d.at_unix_ms >= before_ms {
                continue;
            }
            for reporter in self
                .evidence
                .get(version)
                .into_iter()
                .flat_map(|r| r.keys())
            {
                keys.push(evidence_key(*version, reporter));
            }
            if !kept.contains(version) {
                keys.push(decision_key(d));
            }
        }
        keys
    }

    /// The decision taken about a canary version, if any.
    pub fn decision(&self, version: u64) -> Option<&Decision> {
        self.decisions.get(&version)
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
            canary: None,
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

    fn decision(version: u64, epoch: u64, decided: Decided) -> (String, Option<Vec<u8>>) {
        let d = Decision {
            version,
            epoch,
            decision: decided,
            by: "test".into(),
            reason: String::new(),
            evidence: Evidence::default(),
            at_unix_ms: version,
        };
        (
            decision_key(&d),
            Some(serde_json::to_vec(&Record::Decision(d)).unwrap()),
        )
    }

    fn report(version: u64, reporter: &str, trials: u64, hits: u64) -> (String, Option<Vec<u8>>) {
        let arm = crate::promotion::Arm { trials, hits };
        let r = Report {
            reporter: reporter.into(),
            version,
            evidence: Evidence {
                canary: arm,
                live: arm,
            },
            at_unix_ms: 0,
        };
        (
            evidence_key(version, reporter),
            Some(serde_json::to_vec(&Record::Evidence(r)).unwrap()),
        )
    }

    #[test]
    fn a_canary_serves_beside_the_current_version_until_a_decision_about_it() {
        let a1 = announcement(1, 1, "t0");
        let mut c2 = announcement(2, 1, "t0");
        c2.canary = Some(0.1);
        let mut c3 = announcement(3, 1, "t0");
        c3.canary = Some(0.1);
        let records = vec![
            (claim_key(1, "t0"), Some(claim(1, "t0"))),
            (model_key(&a1), Some(model(&a1))),
            (model_key(&c2), Some(model(&c2))),
            report(2, "r1", 10, 2),
            report(2, "r2", 5, 1),
            report(2, "r1", 20, 4),
            decision(3, 1, Decided::Promote),
            decision(2, 0, Decided::Promote),
            decision(2, 1, Decided::Reject),
            (model_key(&c3), Some(model(&c3))),
            decision(3, 1, Decided::Promote),
            report(4, "r1", 1, 2),
        ];
        let (log, reads) = read(&records);
        assert_eq!(reads[2], Read::Accepted);
        assert!(
            matches!(reads[6], Read::Ignored(_)),
            "not the running canary"
        );
        assert!(matches!(reads[7], Read::Ignored(_)), "an old epoch");
        assert_eq!(reads[8], Read::Decided(Decided::Reject));
        assert_eq!(reads[10], Read::Decided(Decided::Promote));
        assert!(
            matches!(reads[11], Read::OutOfBounds(_)),
            "more hits than trials"
        );
        assert_eq!(log.current().unwrap().version, 3, "the promoted canary");
        assert!(log.canary().is_none());
        let e = log.evidence(2);
        assert_eq!(
            (e.canary.trials, e.canary.hits),
            (25, 5),
            "latest per reporter, summed"
        );
        assert_eq!(log.decision(2).unwrap().decision, Decided::Reject);
        let kept: std::collections::HashSet<u64> = [3].into();
        let pruned = log.decided_before(u64::MAX, &kept);
        assert_eq!(
            pruned.len(),
            3,
            "two reports and the decision of 2: {pruned:?}"
        );
        let mut more = records.clone();
        more.extend(pruned.into_iter().map(|k| (k, None)));
        let (log, _) = read(&more);
        assert_eq!(log.evidence(2), Evidence::default());
        assert!(log.decision(2).is_none());
        assert!(log.decision(3).is_some(), "version 3 is kept");
        assert!(
            log.decided_before(u64::MAX, &kept).is_empty(),
            "nothing left to prune"
        );

        // while it runs, the canary is not current; a rollback ends it
        let (log, _) = read(&records[..6]);
        assert_eq!(log.current().unwrap().version, 1);
        assert_eq!(log.canary().unwrap().version, 2);
        let mut rollback = announcement(1, 1, "rollback");
        rollback.rollback = true;
        let mut more = records[..6].to_vec();
        more.push((model_key(&rollback), Some(model(&rollback))));
        let (log, _) = read(&more);
        assert!(log.canary().is_none());
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
