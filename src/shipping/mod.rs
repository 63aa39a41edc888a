//! Shipping model versions to a fleet (roles `train` and `serve`), the way Gorse ships a
//! master's model: the files go to an object store (`objects`), a small announcement of each
//! goes to a compacted, one-partition Kafka topic (`topic`), which every replica and trainer
//! follows and reads by one rule (`log`): announcements are fenced by epochs that trainers
//! claim when a consumer group elects them (`election`). A serving replica loads whatever is
//! current (`loader`); the active trainer fetches and ships versions (`trainer`); an operator
//! lists versions and rolls back while everything runs (`list`, `rollback`). With live-gated
//! promotion a version is first a canary: serving replicas report its evidence on the same
//! topic (`evidence`), the trainer (or an operator: `decide`) promotes or rejects it.

mod election;
mod evidence;
mod loader;
pub mod log;
mod objects;
mod topic;
mod trainer;

use anyhow::{bail, Context, Result};

pub(crate) use election::{Election, Elector};
pub(crate) use evidence::Reporter;
pub(crate) use loader::Loader;
pub use loader::{load_for_serving, LoadError};
pub use objects::Objects;
pub(crate) use topic::{follow, Follower, Publisher};
pub(crate) use trainer::FleetTrainer;

use crate::config::Config;
use crate::promotion::{Decided, Evidence};
use log::{decision_key, model_key, Announcement, Decision, ModelLog, Record};

/// One version as `multivaed models list` shows it.
#[derive(Debug, Clone)]
pub struct Listed {
    pub announcement: Announcement,
    pub accepted: bool,
    pub current: bool,
    /// The running canary.
    pub canary: bool,
    /// For a canary version: the decision taken about it, and its evidence.
    pub decision: Option<Decision>,
    pub evidence: Evidence,
    /// Whether every file is in the object store with its announced size.
    pub files: Result<(), String>,
}

/// Every announcement on the models topic (current, accepted, fenced), and whether its files
/// are in the object store.
pub async fn list(config: &Config) -> Result<Vec<Listed>> {
    let log = read(config).await?;
    let objects = Objects::open(&config.models)?;
    let current = log.current().map(|a| model_key(a));
    let canary = log.canary().map(|a| model_key(a));
    let mut out = Vec::new();
    for e in log.entries() {
        let a = e.announcement.as_ref().clone();
        let files = check_files(&objects, &a).await;
        out.push(Listed {
            current: current.as_deref() == Some(e.key.as_str()),
            canary: canary.as_deref() == Some(e.key.as_str()),
            decision: a.canary.and(log.decision(a.version).cloned()),
            evidence: log.evidence(a.version),
            accepted: e.accepted,
            files,
            announcement: a,
        });
    }
    Ok(out)
}

async fn read(config: &Config) -> Result<ModelLog> {
    let (kafka, topic) = (config.kafka.clone(), config.models.topic.clone());
    let key = control_key(config)?;
    tokio::task::spawn_blocking(move || topic::read_to_end(&kafka, &topic, &key))
        .await
        .context("cannot read the models topic")?
}

/// The fleet's control-plane key (`models.signing_key_file`).
pub fn control_key(config: &Config) -> Result<crate::control::ControlKey> {
    if config.models.signing_key_file.as_os_str().is_empty() {
        bail!("models.signing_key_file: the fleet's control-plane key is needed to read and write the models topic");
    }
    crate::control::ControlKey::read(&config.models.signing_key_file)
}

async fn check_files(objects: &Objects, a: &Announcement) -> Result<(), String> {
    for d in [&a.model, &a.optimizer, &a.items] {
        match objects.size(&a.path, &d.name).await {
            Ok(Some(n)) if n == d.bytes => {}
            Ok(Some(n)) => return Err(format!("{}: {n} bytes, announced {}", d.name, d.bytes)),
            Ok(None) => return Err(format!("{}: missing", d.name)),
            Err(e) => return Err(format!("{e:#}")),
        }
    }
    Ok(())
}

/// An operator's decision about the running canary `version` (`multivaed models
/// promote|reject`), under the current epoch, on the evidence so far. Returns it once it was
/// read back as taken.
pub async fn decide(config: &Config, version: u64, decision: Decided) -> Result<Decision> {
    let log = read(config).await?;
    match log.canary() {
        Some(c) if c.version == version => {}
        Some(c) => bail!(
            "version {version} is not the running canary (version {} is)",
            c.version
        ),
        None => bail!("no canary runs now (multivaed models list shows the versions)"),
    }
    let d = Decision {
        version,
        epoch: log.epoch().0,
        decision,
        by: "operator".into(),
        reason: "decided by hand".into(),
        evidence: log.evidence(version),
        at_unix_ms: crate::wire::now_ms(),
    };
    let producer = crate::kafka::producer(&config.kafka)?;
    topic::write(
        &producer,
        &config.models.topic,
        &decision_key(&d),
        Some(&Record::Decision(d.clone())),
        &control_key(config)?,
    )
    .await?;
    let after = read(config).await?;
    if after.decision(version) != Some(&d) {
        bail!("the decision was not taken: the canary was decided, or a trainer claimed a new epoch, meanwhile (multivaed models list shows what holds)");
    }
    Ok(d)
}

/// Announces `version` again, as the current one, under the current epoch (no process stops):
/// every replica swaps to it and the active trainer continues from it (its next version gets
/// a new number). Returns the announcement written once it was read back as current.
pub async fn rollback(config: &Config, version: u64) -> Result<Announcement> {
    let log = read(config).await?;
    let Some(target) = log.accepted_version(version).cloned() else {
        bail!("model version {version} was never announced, or was pruned (multivaed models list shows what there is)");
    };
    let objects = Objects::open(&config.models)?;
    check_files(&objects, &target)
        .await
        .map_err(|e| anyhow::anyhow!("model version {version}'s files are not usable: {e}"))?;
    let mut a = target.as_ref().clone();
    a.epoch = log.epoch().0;
    a.trainer = "rollback".into();
    a.rollback = true;
    a.base_version = log.current().map(|c| c.version);
    a.announced_unix_ms = crate::wire::now_ms();
    let key = model_key(&a);
    let producer = crate::kafka::producer(&config.kafka)?;
    topic::write(
        &producer,
        &config.models.topic,
        &key,
        Some(&Record::Model(Box::new(a.clone()))),
        &control_key(config)?,
    )
    .await?;
    let after = read(config).await?;
    match after.accepted(&key) {
        Some(true) if after.current().is_some_and(|c| model_key(c) == key) => Ok(a),
        Some(true) => bail!(
            "the rollback to {version} was announced, but version {} was announced right after it and is current: run the rollback again",
            after.current().map_or(0, |c| c.version)
        ),
        _ => bail!("the rollback to {version} was not accepted: a trainer claimed a new epoch meanwhile; run it again"),
    }
}
