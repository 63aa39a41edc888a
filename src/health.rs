//! Health: what the stages report about the outside world (the group joined, partitions owned
//! and caught up, brokers answering, dead letters writable) and the readiness rules built on
//! it, decided here and nowhere else: `/readyz` and the metric `multivaed_ready` use
//! [`Readiness::serving`], systemd's `READY=1` [`Readiness::started`]. Owning no partition (a
//! replica beyond the partition count) is a valid, ready state; so is having no model yet
//! (popularity answers until the first one).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Facts written by ingest (its rebalance callback, the broker probe, the dead-letter writer),
/// read by readiness.
pub struct Health {
    /// The consumer group assigned this member its partitions (possibly none).
    joined: AtomicBool,
    partitions: AtomicUsize,
    /// Every assigned partition has been consumed up to (near) its end since assignment.
    caught_up: AtomicBool,
    broker_up: AtomicBool,
    /// Why dead letters cannot be written now (ingestion waits), if they cannot.
    dead_letters_blocked: Mutex<Option<&'static str>>,
    /// Assigned partitions consumed to their end since the assignment.
    at_end: Mutex<std::collections::HashSet<i32>>,
    /// Partitions being restored from the changelog (role `serve`).
    restoring: AtomicUsize,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            joined: AtomicBool::new(false),
            partitions: AtomicUsize::new(0),
            caught_up: AtomicBool::new(false),
            broker_up: AtomicBool::new(true),
            dead_letters_blocked: Mutex::new(None),
            at_end: Mutex::new(std::collections::HashSet::new()),
            restoring: AtomicUsize::new(0),
        }
    }
}

impl Health {
    /// The group assigned `n` partitions to this member (caught up at once when `n` is 0).
    pub fn assigned(&self, n: usize) {
        self.at_end
            .lock()
            .expect("health poisoned by a panic")
            .clear();
        self.partitions.store(n, Ordering::Release);
        self.caught_up.store(n == 0, Ordering::Release);
        self.joined.store(true, Ordering::Release);
    }

    /// The partitions were taken away (a rebalance starts, or the member left the group).
    pub fn revoked(&self) {
        self.joined.store(false, Ordering::Release);
        self.partitions.store(0, Ordering::Release);
        self.caught_up.store(false, Ordering::Release);
    }

    /// The assigned partitions were consumed up to their end (it stays so until the next
    /// assignment: lag under load later is not unreadiness).
    pub fn set_caught_up(&self) {
        self.caught_up.store(true, Ordering::Release);
    }

    /// Partition `p` was consumed to its end; once every assigned one was, caught up.
    pub fn partition_at_end(&self, p: i32) {
        if self.caught_up() {
            return;
        }
        let mut at_end = self.at_end.lock().expect("health poisoned by a panic");
        at_end.insert(p);
        if at_end.len() >= self.partitions() {
            self.set_caught_up();
        }
    }

    pub fn joined(&self) -> bool {
        self.joined.load(Ordering::Acquire)
    }

    pub fn caught_up(&self) -> bool {
        self.caught_up.load(Ordering::Acquire)
    }

    pub fn partitions(&self) -> usize {
        self.partitions.load(Ordering::Acquire)
    }

    /// A partition's restore from the changelog starts (`true`) or ends.
    pub fn restoring(&self, started: bool) {
        if started {
            self.restoring.fetch_add(1, Ordering::AcqRel);
        } else {
            let _ = self
                .restoring
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        }
    }

    pub fn set_broker_up(&self, up: bool) {
        self.broker_up.store(up, Ordering::Release);
    }

    pub fn broker_up(&self) -> bool {
        self.broker_up.load(Ordering::Acquire)
    }

    /// Sets why dead letters cannot be written (`None`: they can); returns the previous cause.
    pub fn set_dead_letters_blocked(&self, cause: Option<&'static str>) -> Option<&'static str> {
        let mut g = self
            .dead_letters_blocked
            .lock()
            .expect("health poisoned by a panic");
        std::mem::replace(&mut *g, cause)
    }

    pub fn dead_letters_blocked(&self) -> Option<&'static str> {
        *self
            .dead_letters_blocked
            .lock()
            .expect("health poisoned by a panic")
    }
}

impl Readiness {
    /// Reads the inputs now.
    pub fn read(health: &Health) -> Self {
        Self {
            joined: health.joined(),
            caught_up: health.caught_up(),
            broker_up: health.broker_up(),
            dead_letters_writable: health.dead_letters_blocked().is_none(),
            restoring: health.restoring.load(Ordering::Acquire) > 0,
        }
    }
}

/// The inputs of a readiness decision, read at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Readiness {
    pub joined: bool,
    pub caught_up: bool,
    pub broker_up: bool,
    pub dead_letters_writable: bool,
    /// A partition is being restored from the changelog.
    pub restoring: bool,
}

impl Readiness {
    /// Ready to serve (`/readyz`): brokers answering, the group joined (owning no partition is
    /// fine), the assigned partitions caught up, dead letters writable; otherwise why not.
    pub fn serving(&self) -> Result<(), &'static str> {
        if !self.broker_up {
            return Err("kafka brokers unreachable");
        }
        if !self.joined {
            return Err("not (yet) a member of the consumer group");
        }
        if self.restoring {
            return Err("restoring assigned partitions from the changelog");
        }
        if !self.caught_up {
            return Err("catching up on the assigned partitions");
        }
        if !self.dead_letters_writable {
            return Err("the dead-letter topic cannot be written (multivaed_dead_letters_blocked)");
        }
        Ok(())
    }

    /// Started, for systemd's `READY=1` (sent once; HTTP is up before any stage reports):
    /// the group joined. Neither data nor a model is needed.
    pub fn started(&self) -> bool {
        self.joined
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_well() -> Readiness {
        Readiness {
            joined: true,
            caught_up: true,
            broker_up: true,
            dead_letters_writable: true,
            restoring: false,
        }
    }

    #[test]
    fn serving_needs_brokers_the_group_caught_up_partitions_and_dead_letters() {
        assert_eq!(all_well().serving(), Ok(()));
        let not = |r: Readiness| r.serving().unwrap_err();
        assert!(not(Readiness {
            broker_up: false,
            ..all_well()
        })
        .contains("brokers"));
        assert!(not(Readiness {
            joined: false,
            ..all_well()
        })
        .contains("consumer group"));
        assert!(not(Readiness {
            caught_up: false,
            ..all_well()
        })
        .contains("catching up"));
        assert!(not(Readiness {
            restoring: true,
            ..all_well()
        })
        .contains("restoring"));
        assert!(not(Readiness {
            dead_letters_writable: false,
            ..all_well()
        })
        .contains("dead-letter"));
    }

    #[test]
    fn owning_no_partition_is_ready_and_started() {
        let h = Health::default();
        assert!(!Readiness::read(&h).started());
        h.assigned(0);
        assert_eq!(Readiness::read(&h).serving(), Ok(()));
        assert!(Readiness::read(&h).started());
    }

    #[test]
    fn an_assignment_is_ready_once_caught_up_and_a_revocation_is_not() {
        let h = Health::default();
        h.assigned(3);
        assert_eq!(h.partitions(), 3);
        assert!(Readiness::read(&h).started());
        assert!(Readiness::read(&h).serving().is_err());
        h.partition_at_end(0);
        h.partition_at_end(2);
        h.partition_at_end(0);
        assert!(
            Readiness::read(&h).serving().is_err(),
            "partition 1 not at its end yet"
        );
        h.partition_at_end(1);
        assert_eq!(Readiness::read(&h).serving(), Ok(()));
        h.revoked();
        assert!(Readiness::read(&h).serving().is_err());
        h.set_broker_up(false);
        assert!(!h.broker_up());
    }
}
