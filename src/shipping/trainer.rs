//! A fleet trainer's side (role `train`), the `train::Fleet` the training worker is given: its
//! standing from the election and the models topic, fetching an announced version (weights,
//! optimiser moments, item table: the standby that takes over continues exactly), shipping a
//! new one (files first, the announcement last, then read back: accepted or fenced), pruning.
//! The worker runs on a thread of its own, so the async object store and producer are driven
//! through the runtime's handle.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use candle_core::Device;
use tokio::runtime::Handle;
use tracing::{info, warn};

use super::election::Election;
use super::log::{decision_key, model_key, Announcement, Decision, Record};
use super::objects::{folder, Objects, ANNOUNCEMENT_FILE};
use super::topic::{Follower, Publisher};
use crate::model::bundle::{self, FileDigest, TrainingState};
use crate::model::{ItemTable, Trainer};
use crate::promotion::{Decided, Evidence};
use crate::train::{Announced, Fleet, RunningCanary, Shipment, Standing};

/// What a fleet trainer uses.
pub struct FleetTrainer {
    pub id: String,
    pub topic: String,
    pub objects: Objects,
    /// Where fetched files are downloaded to and verified.
    pub downloads: std::path::PathBuf,
    /// `models.max_file_bytes`.
    pub max_file_bytes: u64,
    pub follower: Arc<Follower>,
    pub election: Arc<Election>,
    /// The models topic's transactional writer (taken over when this trainer was elected).
    pub publisher: Arc<Publisher>,
    pub keep_announced_for: Duration,
    pub runtime: Handle,
}

fn announced(a: &Announcement) -> Announced {
    Announced {
        version: a.version,
        key: a.path.clone(),
    }
}

impl FleetTrainer {
    fn epoch(&self) -> Option<u64> {
        self.election.active_epoch(&self.id, &self.follower)
    }

    fn current(&self) -> Option<Announced> {
        self.follower.with(|l| l.current().map(|a| announced(a)))
    }

    /// Uploads the files, then the announcement, and reads it back.
    async fn ship_async(&self, s: Shipment<'_>, epoch: u64) -> Result<Option<Announced>> {
        let encoded = bundle::encode(s.trainer, s.items).map_err(anyhow::Error::msg)?;
        let path = folder(s.version, epoch);
        let figure = |k: &str| s.figures.get(k).and_then(|v| v.as_f64());
        let mut a = Announcement {
            version: s.version,
            epoch,
            trainer: self.id.clone(),
            path: path.clone(),
            uri: self.objects.uri(&path),
            model: FileDigest::of(bundle::MODEL_FILE, &encoded.model),
            optimizer: FileDigest::of(bundle::OPTIMIZER_FILE, &encoded.optimizer),
            items: FileDigest::of(bundle::ITEMS_FILE, &encoded.items),
            n_items: s.trainer.model().n_items(),
            config: s.trainer.model().config().clone(),
            state: TrainingState::of(s.trainer),
            validation_ndcg: figure("validation_ndcg"),
            validated: s
                .figures
                .get("validated")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
            base_version: s.base.map(|b| b.version),
            created_at: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            announced_unix_ms: crate::wire::now_ms(),
            rollback: false,
            canary: s.canary,
        };
        for (name, bytes) in encoded.files() {
            self.objects.put(&path, name, bytes.to_vec()).await?;
        }
        // the files are in: what follows is the announcement
        a.announced_unix_ms = crate::wire::now_ms();
        let record = Record::Model(Box::new(a.clone()));
        self.objects
            .put(
                &path,
                ANNOUNCEMENT_FILE,
                serde_json::to_vec_pretty(&record)?,
            )
            .await?;
        drop(encoded);
        // the last look before announcing: still the active trainer, still on the same base
        if self.epoch() != Some(epoch) || self.current().as_ref() != s.base {
            return Ok(None);
        }
        crate::fault::crash_point("ship.before_announce");
        let key = model_key(&a);
        let offset = match self.announce(&key, &record).await {
            Ok(offset) => offset,
            Err(e) => {
                warn!(error = %format!("{e:#}"), model_version = a.version, "the announcement was refused by the broker (fenced: another trainer holds the models topic's transactional id, or the transaction failed)");
                return Ok(None);
            }
        };
        self.follower
            .wait_past(offset, Duration::from_secs(30))
            .await?;
        let accepted = self.follower.with(|l| l.accepted(&key)) == Some(true);
        info!(model_version = a.version, epoch, path = %path, offset, accepted, "model version announced");
        Ok(accepted.then(|| announced(&a)))
    }

    /// Writes an announcement through the transactional publisher, taking the transactional id
    /// over again first if a failed transaction dropped it (this trainer is still the active
    /// one: the caller checked its epoch).
    async fn announce(&self, key: &str, record: &Record) -> Result<i64> {
        if !self.publisher.holds() {
            let publisher = self.publisher.clone();
            tokio::task::spawn_blocking(move || publisher.take_over())
                .await
                .context("the take-over task failed")??;
        }
        self.publisher
            .write(&self.topic, key, Some(record), self.follower.signer())
            .await
    }

    /// Writes a decision about the running canary under this trainer's epoch and reads it back.
    async fn decide_async(&self, d: Decision) -> Result<bool> {
        let key = decision_key(&d);
        let record = Record::Decision(d.clone());
        let offset = self.announce(&key, &record).await?;
        self.follower
            .wait_past(offset, Duration::from_secs(30))
            .await?;
        Ok(self.follower.with(|l| l.decision(d.version) == Some(&d)))
    }

    /// Fetches and verifies one file of a version.
    async fn file(&self, a: &Announcement, d: &FileDigest) -> Result<memmap2::Mmap> {
        self.objects
            .download(&a.path, d, self.max_file_bytes, &self.downloads)
            .await
            .map_err(|e| match e {
                super::LoadError::Refused(e) | super::LoadError::Failed(e) => e,
            })
    }

    async fn prune_async(&self, keep: usize) -> Result<()> {
        let log = self.follower.log();
        let now = crate::wire::now_ms();
        let recent = self.keep_announced_for.as_millis() as u64;
        let mut versions: Vec<u64> = log
            .entries()
            .filter(|e| e.accepted)
            .map(|e| e.announcement.version)
            .collect();
        versions.sort_unstable();
        versions.dedup();
        let newest: HashSet<u64> = versions.iter().rev().take(keep).copied().collect();
        let current = log.current().map(|a| a.path.clone());
        let kept = |a: &Announcement| {
            (newest.contains(&a.version) && !a.path.is_empty())
                || Some(&a.path) == current.as_ref()
                || a.announced_unix_ms + recent > now
        };
        // a folder stays while any record that stays names it
        let mut keep_folders: HashSet<String> = HashSet::new();
        for e in log.entries() {
            if kept(&e.announcement)
                && (e.accepted || e.announcement.announced_unix_ms + recent > now)
            {
                keep_folders.insert(e.announcement.path.clone());
            }
        }
        for e in log.entries() {
            if !keep_folders.contains(&e.announcement.path) {
                self.publisher
                    .write(&self.topic, &e.key, None, self.follower.signer())
                    .await?;
            }
        }
        // canaries decided a while ago: their evidence, and the decisions of pruned versions
        let kept: HashSet<u64> = log
            .entries()
            .filter(|e| keep_folders.contains(&e.announcement.path))
            .map(|e| e.announcement.version)
            .collect();
        for key in log.decided_before(now.saturating_sub(recent), &kept) {
            self.publisher
                .write(&self.topic, &key, None, self.follower.signer())
                .await?;
        }
        for f in self.objects.folders().await? {
            let young = f.modified_unix_ms.max(0) as u64 + recent > now;
            if !keep_folders.contains(&f.name) && !young {
                self.objects.delete_folder(&f.name).await?;
                info!(folder = %f.name, "pruned a model version from the object store");
            }
        }
        Ok(())
    }
}

impl Fleet for FleetTrainer {
    fn standing(&self) -> Standing {
        match self.epoch() {
            Some(_) => Standing::Active {
                current: self.current(),
            },
            None => Standing::Standby,
        }
    }

    fn highest_version(&self) -> u64 {
        self.follower.with(|l| l.highest_version())
    }

    fn fetch(&self, version: &Announced, device: &Device) -> Result<(Trainer, ItemTable)> {
        let a = self
            .follower
            .with(|l| l.by_path(&version.key).cloned())
            .with_context(|| format!("version {} is not on the models topic", version.version))?;
        let (model, optimizer, items) = self.runtime.block_on(async {
            anyhow::Ok((
                self.file(&a, &a.model).await?,
                self.file(&a, &a.optimizer).await?,
                self.file(&a, &a.items).await?,
            ))
        })?;
        let trainer =
            bundle::decode_trainer(&a.config, a.n_items, &a.state, &model, &optimizer, device)
                .map_err(anyhow::Error::msg)?;
        let items = ItemTable::decode(&items).map_err(anyhow::Error::msg)?;
        anyhow::ensure!(
            items.len() == a.n_items,
            "version {}: {} items for {} columns",
            a.version,
            items.len(),
            a.n_items
        );
        Ok((trainer, items))
    }

    fn ship(&self, shipment: Shipment<'_>) -> Result<Option<Announced>> {
        let Some(epoch) = self.epoch() else {
            return Ok(None);
        };
        self.runtime.block_on(self.ship_async(shipment, epoch))
    }

    fn canary(&self) -> Option<RunningCanary> {
        self.follower.with(|l| {
            l.canary().map(|c| RunningCanary {
                version: c.version,
                announced_unix_ms: c.announced_unix_ms,
                evidence: l.evidence(c.version),
            })
        })
    }

    fn decide(
        &self,
        version: u64,
        decision: Decided,
        by: &str,
        reason: &str,
        evidence: Evidence,
    ) -> Result<bool> {
        let Some(epoch) = self.epoch() else {
            return Ok(false);
        };
        let d = Decision {
            version,
            epoch,
            decision,
            by: by.into(),
            reason: reason.into(),
            evidence,
            at_unix_ms: crate::wire::now_ms(),
        };
        self.runtime.block_on(self.decide_async(d))
    }

    fn prune(&self, keep: usize) {
        if let Err(e) = self.runtime.block_on(self.prune_async(keep)) {
            warn!(error = %format!("{e:#}"), "cannot prune old model versions from the object store");
        }
    }
}
