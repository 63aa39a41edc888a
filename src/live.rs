//! `LiveModelSlot`: the live model behind an atomic pointer, between training or the fleet's
//! model loader (which publish) and scoring and the HTTP API (which read); a swap never blocks a
//! reader and a reader never sees half a model. A model trained on this store uses the store's
//! item indices as its columns; a model shipped by a fleet's trainer comes with its item table,
//! mapped onto the store's items once, when it is loaded (`ColumnMap`). The versions on disk are
//! `model::Checkpoints`. Beside the live model the slot may hold a canary: a new version that
//! scores only its slice of the users until the evidence promotes or rejects it.

use std::sync::Arc;

use arc_swap::ArcSwapOption;
use tokio::sync::watch;

use candle_core::Device;

use crate::model::{CheckpointError, Checkpoints, ItemTable, MultiVae};
use crate::promotion::{in_slice, Side};
use crate::store::Store;

/// A published model version (host memory, inference only).
pub struct LiveModel {
    pub(crate) version: u64,
    pub(crate) model: MultiVae,
    /// How the columns map onto the store's items: `None` when they are the store's indices.
    pub(crate) columns: Option<ColumnMap>,
}

/// A shipped model's columns on this store: both ways, and the model's (global) popularity by
/// store index. Items the store interns after the model was loaded are unknown to it.
pub(crate) struct ColumnMap {
    to_store: Vec<u32>,
    from_store: Vec<u32>,
    popularity: Vec<f32>,
}

/// No column.
const NONE: u32 = u32::MAX;

impl ColumnMap {
    /// Interns the table's items into `store` (a replica may not have met them yet) and maps
    /// them.
    pub(crate) fn new(store: &Store, table: &ItemTable) -> anyhow::Result<Self> {
        let to_store = store.intern_items(table.ids())?;
        let n = to_store.iter().map(|&i| i as usize + 1).max().unwrap_or(0);
        let mut from_store = vec![NONE; n];
        let mut popularity = vec![0f32; n];
        for (c, (&i, &count)) in to_store.iter().zip(table.counts()).enumerate() {
            from_store[i as usize] = c as u32;
            popularity[i as usize] = count as f32;
        }
        Ok(Self {
            to_store,
            from_store,
            popularity,
        })
    }
}

impl LiveModel {
    /// A model whose columns are `store`'s item indices (trained on this store).
    pub(crate) fn local(version: u64, model: MultiVae) -> Self {
        Self {
            version,
            model,
            columns: None,
        }
    }

    /// The model's column of a store item, if it knows the item.
    pub(crate) fn column(&self, item: u32) -> Option<u32> {
        match &self.columns {
            None => ((item as usize) < self.model.n_items()).then_some(item),
            Some(c) => c
                .from_store
                .get(item as usize)
                .copied()
                .filter(|&x| x != NONE),
        }
    }

    /// The store item of a column.
    pub(crate) fn store_item(&self, column: u32) -> u32 {
        match &self.columns {
            None => column,
            Some(c) => c.to_store.get(column as usize).copied().unwrap_or(NONE),
        }
    }

    /// The model's own popularity ranking (a shipped model's, global over the fleet), best
    /// first, without `seen` (sorted store items); `None` for a model trained on this store,
    /// whose popularity is the store's.
    pub(crate) fn popular(&self, k: usize, seen: &[u32]) -> Option<Vec<(u32, f32)>> {
        let c = self.columns.as_ref()?;
        Some(crate::model::top_k_unseen(&c.popularity, None, seen, k))
    }

    /// The newest version in `checkpoints` that loads, ready for inference on `store` (versions
    /// that fail go to `on_skip`); `None` when there is none. A fleet trainer's version carries
    /// its item table, mapped onto the store's items.
    pub fn load_latest(
        checkpoints: &Checkpoints,
        store: &Store,
        device: &Device,
        on_skip: impl FnMut(u64, &CheckpointError),
    ) -> anyhow::Result<Option<LiveModel>> {
        let Some((trainer, manifest)) = checkpoints.load_latest(device, on_skip)? else {
            return Ok(None);
        };
        let items = Checkpoints::items(&checkpoints.path_of(manifest.model_version), &manifest)?;
        Ok(Some(LiveModel {
            version: manifest.model_version,
            model: trainer.model().for_serving()?,
            columns: items.map(|t| ColumnMap::new(store, &t)).transpose()?,
        }))
    }
}

/// A canary version and the share of the users it scores.
pub struct CanaryModel {
    pub(crate) model: Arc<LiveModel>,
    pub(crate) fraction: f64,
}

/// What scores now: the live model and, while one runs, the canary.
#[derive(Clone, Default)]
pub(crate) struct Models {
    pub live: Option<Arc<LiveModel>>,
    pub canary: Option<Arc<CanaryModel>>,
}

impl Models {
    /// The side of the running canary that `user` (external id) is on; `None` without a
    /// canary (or without a live model to compare it with).
    pub fn side(&self, user: &str) -> Option<Side> {
        let c = self.canary.as_ref()?;
        self.live.as_ref()?;
        Some(if in_slice(user, c.model.version, c.fraction) {
            Side::Canary
        } else {
            Side::Live
        })
    }

    /// The model that scores a user on `side`.
    pub fn for_side(&self, side: Option<Side>) -> Option<&Arc<LiveModel>> {
        match (side, &self.canary) {
            (Some(Side::Canary), Some(c)) => Some(&c.model),
            _ => self.live.as_ref(),
        }
    }

    /// The running canary's version.
    pub fn canary_version(&self) -> Option<u64> {
        self.canary.as_ref().map(|c| c.model.version)
    }
}

/// Holds the live model (and a canary) and announces swaps.
pub(crate) struct LiveModelSlot {
    live: ArcSwapOption<LiveModel>,
    canary: ArcSwapOption<CanaryModel>,
    version_tx: watch::Sender<u64>,
}

impl Default for LiveModelSlot {
    fn default() -> Self {
        Self::new()
    }
}

impl LiveModelSlot {
    pub fn new() -> Self {
        Self {
            live: ArcSwapOption::from(None),
            canary: ArcSwapOption::from(None),
            version_tx: watch::channel(0).0,
        }
    }

    /// The live model, if any (a cheap, lock-free snapshot).
    pub fn current(&self) -> Option<Arc<LiveModel>> {
        self.live.load_full()
    }

    /// Swaps in a new model and announces its version.
    pub fn publish(&self, model: LiveModel) {
        let version = model.version;
        crate::fault::crash_point("registry.before_swap");
        self.live.store(Some(Arc::new(model)));
        crate::fault::crash_point("registry.swapped");
        self.version_tx.send_replace(version);
    }

    /// The live model and the canary (snapshots).
    pub fn models(&self) -> Models {
        Models {
            live: self.live.load_full(),
            canary: self.canary.load_full(),
        }
    }

    /// Starts a canary: `model` scores `fraction` of the users (its slice) from now on.
    pub fn publish_canary(&self, model: LiveModel, fraction: f64) {
        let version = model.version;
        self.canary.store(Some(Arc::new(CanaryModel {
            model: Arc::new(model),
            fraction: fraction.clamp(0.0, 1.0),
        })));
        self.version_tx.send_replace(version);
    }

    /// Ends the running canary (its slice goes back to the live model); whether one ran.
    pub fn clear_canary(&self) -> bool {
        let had = self.canary.swap(None).is_some();
        if had {
            let live = self.live.load().as_ref().map_or(0, |l| l.version);
            self.version_tx.send_replace(live);
        }
        had
    }

    /// Makes the running canary the live model if it is `version`; whether it was.
    pub fn promote_canary(&self, version: u64) -> bool {
        let Some(c) = self.canary.load_full() else {
            return false;
        };
        if c.model.version != version {
            return false;
        }
        self.live.store(Some(c.model.clone()));
        self.canary.store(None);
        self.version_tx.send_replace(version);
        true
    }

    /// A receiver that sees every newly published version.
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.version_tx.subscribe()
    }
}
