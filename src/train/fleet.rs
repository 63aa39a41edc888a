//! What training needs from a fleet (role `train`), as a trait the `shipping` module implements:
//! whether this trainer is the active one, the version the fleet serves (which a trainer taking
//! over, or one told of a rollback, continues from), fetching a version, and shipping a new one.
//! The worker's rounds are the same as role `all`'s; only where a version comes from and goes to
//! differs.

use anyhow::{Context, Result};
use candle_core::Device;
use tracing::info;

use crate::model::{Checkpoints, ItemTable, Trainer};
use crate::promotion::{Decided, Evidence};

use super::columns::Columns;
use super::Worker;

/// A version as the fleet announced it: its number, and the key of its files (a number may
/// name a deposed trainer's version too; the key never names two).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announced {
    pub version: u64,
    pub key: String,
}

/// This trainer's standing in the fleet now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Standing {
    /// Another trainer is active (or none is elected yet): keep the store warm, train nothing.
    Standby,
    /// This one trains, continuing from `current` (none before the fleet's first version).
    Active { current: Option<Announced> },
}

/// A new version to ship.
pub struct Shipment<'a> {
    pub trainer: &'a Trainer,
    pub items: &'a ItemTable,
    pub version: u64,
    /// The announced version it was trained from.
    pub base: Option<&'a Announced>,
    /// Training figures for the announcement (validation NDCG@100, …).
    pub figures: &'a serde_json::Value,
    /// Announce it as a canary scoring this share of the users (live-gated promotion).
    pub canary: Option<f64>,
}

/// The fleet's running canary, as its decider sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct RunningCanary {
    pub version: u64,
    /// When it was announced (milliseconds since the epoch).
    pub announced_unix_ms: u64,
    /// Every serving replica's counts, summed.
    pub evidence: Evidence,
}

/// The fleet, as training sees it.
pub trait Fleet: Send {
    fn standing(&self) -> Standing;
    /// The highest version number announced so far, by any trainer (numbers are never reused).
    fn highest_version(&self) -> u64;
    /// Downloads and verifies an announced version: a trainer continuing from it (weights,
    /// optimiser moments, counters) on `device`, and its item table.
    fn fetch(&self, version: &Announced, device: &Device) -> Result<(Trainer, ItemTable)>;
    /// Uploads a version and announces it; `None` when it was not announced or not accepted
    /// because this trainer is no longer the one that may (deposed, or a rollback came first).
    fn ship(&self, shipment: Shipment<'_>) -> Result<Option<Announced>>;
    /// The canary the fleet runs now, if any.
    fn canary(&self) -> Option<RunningCanary>;
    /// Announces a decision about the running canary `version` (promoted: the current version;
    /// rejected: its slice back to the current one); whether the fleet took it.
    fn decide(
        &self,
        version: u64,
        decision: Decided,
        by: &str,
        reason: &str,
        evidence: Evidence,
    ) -> Result<bool>;
    /// Removes old versions' files and announcements (keeping the `keep` newest and anything
    /// announced in the last hour).
    fn prune(&self, keep: usize);
}

impl Worker {
    /// Makes the announced `current` version this worker's state, as its newest local
    /// checkpoint (fetched unless this trainer holds that very version; newer local ones — never
    /// announced, or rolled back — are moved aside) and its live model.
    pub(super) fn adopt(&mut self, current: Option<Announced>) -> Result<()> {
        let Some(a) = current else {
            // nothing announced yet: the first version starts from the local state
            self.base = None;
            return Ok(());
        };
        // the local copy of that version, when this trainer has it (it made it, or fetched it)
        let local = self.checkpoints.path_of(a.version);
        let have = Checkpoints::read_manifest(&local)
            .ok()
            .and_then(|m| {
                m.training
                    .get("bundle")
                    .and_then(|b| b.as_str())
                    .map(String::from)
            })
            .is_some_and(|k| k == a.key);
        if !have {
            let fleet = self.ctx.fleet.as_ref().context("no fleet")?;
            let (trainer, items) = fleet
                .fetch(&a, &self.ctx.device)
                .with_context(|| format!("cannot fetch model version {}", a.version))?;
            self.checkpoints.set_aside_from(a.version)?;
            let figures = serde_json::json!({ "bundle": a.key, "fetched": true });
            self.checkpoints
                .save(&trainer, a.version, figures, None, Some(&items))?;
        } else {
            self.checkpoints
                .set_aside_from(a.version.saturating_add(1))?;
        }
        self.reload_latest(true)?;
        self.best_version = Some(a.version);
        self.version = self.version.max(a.version);
        info!(
            model_version = a.version,
            key = %a.key,
            fetched = !have,
            "continuing from the fleet's announced version"
        );
        self.base = Some(a);
        Ok(())
    }

    /// The columns a checkpoint's item table gives (a fleet trainer's), or the store's.
    pub(super) fn columns_for(&self, items: Option<ItemTable>) -> Columns {
        match (items, &self.ctx.fleet) {
            (Some(t), _) => Columns::table(t),
            (None, Some(_)) => Columns::table(ItemTable::default()),
            (None, None) => Columns::Store,
        }
    }
}
