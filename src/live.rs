//! `LiveModelSlot`: the live model behind an atomic pointer, between training (which publishes)
//! and scoring and the HTTP API (which read); a swap never blocks a reader and a reader never
//! sees half a model. The versions on disk are `model::Checkpoints`.

use std::sync::Arc;

use arc_swap::ArcSwapOption;
use tokio::sync::watch;

use candle_core::Device;

use crate::model::{CheckpointError, Checkpoints, MultiVae};

/// A published model version (host memory, inference only).
pub struct LiveModel {
    pub(crate) version: u64,
    pub(crate) model: MultiVae,
}

impl LiveModel {
    /// The newest version in `checkpoints` that loads, ready for inference (versions that fail
    /// go to `on_skip`); `None` when there is none.
    pub fn load_latest(
        checkpoints: &Checkpoints,
        device: &Device,
        on_skip: impl FnMut(u64, &CheckpointError),
    ) -> anyhow::Result<Option<LiveModel>> {
        let Some((trainer, manifest)) = checkpoints.load_latest(device, on_skip)? else {
            return Ok(None);
        };
        Ok(Some(LiveModel {
            version: manifest.model_version,
            model: trainer.model().for_serving()?,
        }))
    }
}

/// Holds the live model and announces swaps.
pub(crate) struct LiveModelSlot {
    live: ArcSwapOption<LiveModel>,
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

    /// A receiver that sees every newly published version.
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.version_tx.subscribe()
    }
}
