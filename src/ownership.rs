//! `Ownership`: which clicks partitions this replica owns now, and under which epoch. Written
//! only by the replica's partition life cycle (`fleet::Replica`: a partition is owned once it is
//! restored and claimed, and stops being owned the moment it is revoked); read by the scorer (only the owner publishes for a
//! user) and by HTTP (only the owner answers a pull). A user belongs to the partition the
//! producers' partitioner puts their key on. The `all` role owns every user.

use std::collections::BTreeMap;
use std::sync::RwLock;

use crate::partition::Partitioner;

/// A partition owned, and its epoch (one more than the last owner's, read from the changelog,
/// so a later owner's messages always carry a higher one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owned {
    pub partition: i32,
    pub epoch: u64,
}

pub struct Ownership {
    /// `None`: the `all` role, which owns every user.
    partitioned: Option<Partitioned>,
}

struct Partitioned {
    partitioner: Partitioner,
    /// The clicks topic's partition count (known once the topics are checked).
    partitions: std::sync::atomic::AtomicI32,
    owned: RwLock<BTreeMap<i32, u64>>,
}

impl Ownership {
    /// Every user, always (one process for the whole topic).
    pub fn everything() -> Self {
        Self { partitioned: None }
    }

    /// The users of the partitions assigned and restored, among `partitions`.
    pub fn by_partition(partitioner: Partitioner, partitions: i32) -> Self {
        Self {
            partitioned: Some(Partitioned {
                partitioner,
                partitions: std::sync::atomic::AtomicI32::new(partitions.max(1)),
                owned: RwLock::new(BTreeMap::new()),
            }),
        }
    }

    pub fn is_partitioned(&self) -> bool {
        self.partitioned.is_some()
    }

    /// The partition a user's clicks arrive on (0 for the `all` role).
    pub fn partition_of(&self, user: &str) -> i32 {
        self.partitioned
            .as_ref()
            .map_or(0, |p| p.partition_of(user))
    }

    /// The user's partition and its epoch, when this replica owns it now.
    pub fn owner_of(&self, user: &str) -> Option<Owned> {
        let Some(p) = &self.partitioned else {
            return Some(Owned {
                partition: 0,
                epoch: 0,
            });
        };
        let partition = p.partition_of(user);
        self.epoch(partition)
            .map(|epoch| Owned { partition, epoch })
    }

    /// The epoch of a partition, when owned.
    pub fn epoch(&self, partition: i32) -> Option<u64> {
        match &self.partitioned {
            None => Some(0),
            Some(p) => p.read().get(&partition).copied(),
        }
    }

    pub fn owns(&self, partition: i32) -> bool {
        self.epoch(partition).is_some()
    }

    /// The partitions owned, with their epochs.
    pub fn owned(&self) -> Vec<Owned> {
        self.partitioned.as_ref().map_or_else(Vec::new, |p| {
            p.read()
                .iter()
                .map(|(&partition, &epoch)| Owned { partition, epoch })
                .collect()
        })
    }

    /// The clicks topic's partition count, once known.
    /// The clicks topic's partition count (1 for role `all`).
    pub fn partition_count(&self) -> i32 {
        self.partitioned.as_ref().map_or(1, |p| {
            p.partitions.load(std::sync::atomic::Ordering::Acquire)
        })
    }

    pub(crate) fn set_partitions(&self, n: i32) {
        if let Some(p) = &self.partitioned {
            p.partitions
                .store(n.max(1), std::sync::atomic::Ordering::Release);
        }
    }

    /// A partition restored and owned from now on, under `epoch`.
    pub(crate) fn gain(&self, partition: i32, epoch: u64) {
        if let Some(p) = &self.partitioned {
            p.write().insert(partition, epoch);
        }
    }

    /// A partition revoked (or lost): not owned from now on.
    pub(crate) fn lose(&self, partition: i32) {
        if let Some(p) = &self.partitioned {
            p.write().remove(&partition);
        }
    }
}

impl Partitioned {
    fn partition_of(&self, user: &str) -> i32 {
        let n = self.partitions.load(std::sync::atomic::Ordering::Acquire);
        self.partitioner.partition(user.as_bytes(), n)
    }

    // a poisoned lock means a writer panicked mid-change: the map itself is whole (one insert
    // or remove), so it is read as it is
    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<i32, u64>> {
        self.owned.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<i32, u64>> {
        self.owned.write().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_is_owned_while_their_partition_is() {
        let o = Ownership::by_partition(Partitioner::Murmur2Random, 4);
        let p = o.partition_of("alice");
        assert!(o.owner_of("alice").is_none());
        o.gain(p, 7);
        assert_eq!(
            o.owner_of("alice"),
            Some(Owned {
                partition: p,
                epoch: 7
            })
        );
        o.lose(p);
        assert!(o.owner_of("alice").is_none());
        assert!(Ownership::everything().owner_of("alice").is_some());
    }
}
