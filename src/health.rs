//! Health: what the stages report about the outside world (partitions owned, brokers answering)
//! and the readiness rules built on it, decided here and nowhere else: `/readyz` and the
//! metric `multivaed_ready` use [`Readiness::serving`], systemd's `READY=1` [`Readiness::started`].

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Facts written by ingest (its rebalance callback and the broker probe), read by readiness.
pub struct Health {
    partitions: AtomicUsize,
    broker_up: AtomicBool,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            partitions: AtomicUsize::new(0),
            broker_up: AtomicBool::new(true),
        }
    }
}

impl Health {
    pub fn set_partitions(&self, n: usize) {
        self.partitions.store(n, Ordering::Release);
    }

    pub fn partitions(&self) -> usize {
        self.partitions.load(Ordering::Acquire)
    }

    pub fn set_broker_up(&self, up: bool) {
        self.broker_up.store(up, Ordering::Release);
    }

    pub fn broker_up(&self) -> bool {
        self.broker_up.load(Ordering::Acquire)
    }
}

impl Readiness {
    /// Reads the inputs now.
    pub fn read(
        health: &Health,
        live: &crate::live::LiveModelSlot,
        store: &crate::store::Store,
    ) -> Self {
        Self {
            model_loaded: live.current().is_some(),
            partitions: health.partitions(),
            broker_up: health.broker_up(),
            has_data: store.counts().interactions > 0,
        }
    }
}

/// The inputs of a readiness decision, read at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Readiness {
    pub model_loaded: bool,
    pub partitions: usize,
    pub broker_up: bool,
    pub has_data: bool,
}

impl Readiness {
    /// Ready to serve (`/readyz`): a model loaded, partitions assigned, brokers answering;
    /// otherwise why not.
    pub fn serving(&self) -> Result<(), &'static str> {
        if !self.model_loaded {
            return Err("no model loaded yet");
        }
        if self.partitions == 0 {
            return Err("no partitions assigned");
        }
        if !self.broker_up {
            return Err("kafka brokers unreachable");
        }
        Ok(())
    }

    /// Started, for systemd's `READY=1`: partitions assigned and a model loaded or data for the
    /// first training present.
    pub fn started(&self) -> bool {
        self.partitions > 0 && (self.model_loaded || self.has_data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(model_loaded: bool, partitions: usize, broker_up: bool, has_data: bool) -> Readiness {
        Readiness {
            model_loaded,
            partitions,
            broker_up,
            has_data,
        }
    }

    #[test]
    fn serving_needs_a_model_partitions_and_brokers() {
        assert_eq!(r(true, 2, true, true).serving(), Ok(()));
        assert_eq!(
            r(false, 2, true, true).serving(),
            Err("no model loaded yet")
        );
        assert_eq!(
            r(true, 0, true, true).serving(),
            Err("no partitions assigned")
        );
        assert_eq!(
            r(true, 1, false, true).serving(),
            Err("kafka brokers unreachable")
        );
    }

    #[test]
    fn started_needs_partitions_and_a_model_or_data() {
        assert!(r(true, 1, false, false).started());
        assert!(r(false, 1, true, true).started());
        assert!(!r(false, 1, true, false).started());
        assert!(!r(true, 0, true, true).started());
    }

    #[test]
    fn health_starts_with_brokers_presumed_up_and_no_partitions() {
        let h = Health::default();
        assert!(h.broker_up());
        assert_eq!(h.partitions(), 0);
        h.set_partitions(3);
        h.set_broker_up(false);
        assert_eq!((h.partitions(), h.broker_up()), (3, false));
    }
}
