//! `LiveModelSlot`: the live model behind an atomic pointer, between training (which publishes)
//! and scoring and the HTTP API (which read); a swap never blocks a reader and a reader never
//! sees half a model. The versions on disk are `model::Checkpoints`.

use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwapOption;
use tokio::sync::watch;

use crate::model::MultiVae;

/// A published model version (host memory, inference only).
pub struct LiveModel {
    pub version: u64,
    pub model: MultiVae,
    pub swapped_at: SystemTime,
    /// Validation NDCG@100 measured when it was accepted.
    pub validation_ndcg: f64,
}

/// Holds the live model and announces swaps.
pub struct LiveModelSlot {
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
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version_tx.subscribe()
    }
}
