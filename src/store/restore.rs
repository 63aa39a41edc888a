//! Writing histories restored from the changelog topic (role `serve`): whole histories replace
//! what the store holds for their users, and each partition's changelog position (how far the
//! local copy reflects the changelog, and under which epoch) is kept with them in one atomic
//! batch, so a restore resumes where the last one ended.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::Result;

use super::codec::*;
use super::{PartitionOffset, Store, StoreFull};

/// How far the local copy of one partition reflects the changelog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChangelogPosition {
    /// The changelog offset to read next.
    pub next_offset: i64,
    /// The highest owner epoch seen in the changelog so far.
    pub epoch: u64,
    /// The clicks offset the changelog reflects up to there (its last marker's).
    pub clicks_next: i64,
}

/// What [`Store::restore_histories`] wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HistoriesWritten {
    /// The users written, by index.
    pub users: Vec<u32>,
    /// (user, item) pairs that were not in the users' previous histories.
    pub added: u64,
    /// Users forgotten (an empty history: their records were deleted).
    pub forgotten: u64,
}

fn encode_position(p: ChangelogPosition) -> Vec<u8> {
    let mut v = p.next_offset.to_be_bytes().to_vec();
    v.extend_from_slice(&p.epoch.to_be_bytes());
    v.extend_from_slice(&p.clicks_next.to_be_bytes());
    v
}

fn position_key(partition: i32) -> [u8; 5] {
    let b = partition.to_be_bytes();
    [b'c', b[0], b[1], b[2], b[3]]
}

/// The key marking a partition's local copy as given up (revoked, kept until the cleanup).
fn given_up_key(partition: i32) -> [u8; 5] {
    let b = partition.to_be_bytes();
    [b'g', b[0], b[1], b[2], b[3]]
}

/// The key of the clicks topic's partition count, as the replica last learned it.
const PARTITIONS_KEY: &[u8] = b"mpartitions";

/// The key of when a partition's local copy was last in sync with the changelog.
fn synced_key(partition: i32) -> [u8; 5] {
    let b = partition.to_be_bytes();
    [b'y', b[0], b[1], b[2], b[3]]
}

impl Store {
    /// The changelog position of a partition's local copy, if it was ever restored or written.
    pub(crate) fn changelog_position(&self, partition: i32) -> Result<Option<ChangelogPosition>> {
        Ok(self.tree.get(position_key(partition))?.and_then(|v| {
            let next = <[u8; 8]>::try_from(v.get(..8)?).ok()?;
            let epoch = <[u8; 8]>::try_from(v.get(8..16)?).ok()?;
            let clicks = <[u8; 8]>::try_from(v.get(16..24)?).ok()?;
            Some(ChangelogPosition {
                next_offset: i64::from_be_bytes(next),
                epoch: u64::from_be_bytes(epoch),
                clicks_next: i64::from_be_bytes(clicks),
            })
        }))
    }

    /// Replaces the histories of `users` (external item ids, oldest first; empty: the user is
    /// forgotten, and every record naming them deleted) and records the partition's changelog `position` and, when given, its clicks
    /// offset, in one atomic batch. Returns the users written and the (user, item) pairs added.
    pub(crate) fn restore_histories(
        &self,
        users: &[(String, HistoryIds)],
        partition: i32,
        position: ChangelogPosition,
        clicks: Option<&PartitionOffset>,
    ) -> Result<HistoriesWritten> {
        let _w = self
            .write_lock
            .lock()
            .map_err(|_| anyhow::anyhow!("store writer poisoned"))?;
        let mut batch = sled::Batch::default();
        let mut next_user = self.n_users.load(Ordering::Acquire) as u32;
        let mut interactions = self.interactions.load(Ordering::Acquire) as i64;
        let mut pop_delta: HashMap<u32, i64> = HashMap::new();
        let mut new_items: Vec<Arc<str>> = Vec::new();
        let mut written = HistoriesWritten::default();
        {
            let catalogue = self.catalogue();
            let first_new = catalogue.ids.len() as u32;
            let mut new_index: HashMap<String, u32> = HashMap::new();
            // the log before compaction holds several records of a user: the last is theirs
            let last: HashMap<&str, usize> = users
                .iter()
                .enumerate()
                .map(|(n, (u, _))| (u.as_str(), n))
                .collect();
            let latest = users
                .iter()
                .enumerate()
                .filter(|(n, (u, _))| last.get(u.as_str()) == Some(n))
                .map(|(_, r)| r);
            for (user, restored) in latest {
                if restored.is_empty() {
                    // forgotten: every record that names them goes
                    if let Some((idx, old)) = self.record(user)? {
                        for &i in &old.items {
                            *pop_delta.entry(i).or_default() -= 1;
                        }
                        interactions -= old.items.len() as i64;
                        batch.remove(&idx_key(b'u', idx));
                        written.forgotten += 1;
                    }
                    batch.remove(key(b'U', user.as_bytes()));
                    batch.remove(key(b'Q', user.as_bytes()));
                    continue;
                }
                let (idx, old) = match self.record(user)? {
                    Some(found) => found,
                    None => {
                        if next_user >= self.index_limit {
                            return Err(StoreFull {
                                what: "users",
                                limit: self.index_limit,
                            }
                            .into());
                        }
                        batch.insert(&idx_key(b'u', next_user), user.as_bytes());
                        next_user += 1;
                        (next_user - 1, History::default())
                    }
                };
                let mut intern = |item: &str| -> Result<u32> {
                    Ok(match catalogue.index.get(item) {
                        Some(&i) => i,
                        None => match new_index.get(item) {
                            Some(&i) => i,
                            None => {
                                let i = first_new + new_items.len() as u32;
                                if i >= self.index_limit {
                                    return Err(StoreFull {
                                        what: "items",
                                        limit: self.index_limit,
                                    }
                                    .into());
                                }
                                batch.insert(&idx_key(b'i', i), item.as_bytes());
                                new_items.push(Arc::from(item));
                                new_index.insert(item.to_string(), i);
                                i
                            }
                        },
                    })
                };
                // the newest `max_history` of each list, oldest first, each item once
                let mut history = History::default();
                let weight = |j: usize| {
                    restored
                        .weights
                        .get(j)
                        .copied()
                        .filter(|w| w.is_finite() && *w > 0.0)
                };
                for (j, item) in restored
                    .items
                    .iter()
                    .enumerate()
                    .rev()
                    .take(self.max_history)
                {
                    let i = intern(item)?;
                    if !history.items.contains(&i) {
                        history.items.push(i);
                        history.weights.push(weight(j).unwrap_or(1.0));
                    }
                }
                for item in restored.excluded.iter().rev().take(self.max_history) {
                    let i = intern(item)?;
                    if !history.excluded.contains(&i) {
                        history.excluded.push(i);
                    }
                }
                history.items.reverse();
                history.weights.reverse();
                history.excluded.reverse();
                for &i in &old.items {
                    *pop_delta.entry(i).or_default() -= 1;
                }
                for &i in &history.items {
                    *pop_delta.entry(i).or_default() += 1;
                }
                interactions += history.items.len() as i64 - old.items.len() as i64;
                written.added += history
                    .items
                    .iter()
                    .filter(|i| !old.items.contains(i))
                    .count() as u64;
                batch.insert(key(b'U', user.as_bytes()), encode_user(idx, &history));
                written.users.push(idx);
            }
        }
        let n_items = self.catalogue().ids.len() as u32 + new_items.len() as u32;
        let mut pop = self
            .popularity
            .write()
            .map_err(|_| anyhow::anyhow!("store poisoned"))?;
        let new_pop = Self::recount(&pop, &pop_delta, n_items, &mut batch);
        batch.insert(&position_key(partition), encode_position(position));
        if let Some(o) = clicks {
            batch.insert(
                offset_key(&o.topic, o.partition),
                &o.next_offset.to_be_bytes(),
            );
        }
        let interactions = interactions.max(0) as u64;
        let forgotten = self.forgotten.load(Ordering::Acquire) + written.forgotten;
        batch.insert(FORGOTTEN, &forgotten.to_be_bytes());
        batch.insert(NEXT_USER, &(next_user as u64).to_be_bytes());
        batch.insert(NEXT_ITEM, &(n_items as u64).to_be_bytes());
        batch.insert(INTERACTIONS, &interactions.to_be_bytes());
        self.tree.apply_batch(batch)?;
        // in: publish to readers
        self.catalogue_extend(new_items)?;
        pop.resize(n_items as usize, 0);
        for (i, v) in new_pop {
            pop[i as usize] = v;
        }
        self.n_users.store(next_user as u64, Ordering::Release);
        self.forgotten.store(forgotten, Ordering::Release);
        self.interactions.store(interactions, Ordering::Release);
        Ok(written)
    }

    /// Records how far the local copy of a partition reflects the changelog (after this
    /// replica's own writes to it). Not flushed: a position lost in a crash is an earlier one,
    /// from which a restore re-reads records that change nothing.
    pub(crate) fn set_changelog_position(
        &self,
        partition: i32,
        position: ChangelogPosition,
    ) -> Result<()> {
        self.tree
            .insert(position_key(partition), encode_position(position))?;
        Ok(())
    }

    /// Notes that the local copy of `partition` was in sync with the changelog at `unix_ms` (read
    /// to its end, or written by its owner). Not flushed: a time lost in a crash is an earlier
    /// one, which errs on the side of restoring from the beginning.
    pub(crate) fn set_synced(&self, partition: i32, unix_ms: u64) -> Result<()> {
        self.tree
            .insert(synced_key(partition), &unix_ms.to_be_bytes())?;
        Ok(())
    }

    /// Marks the local copy of `partition` as given up (revoked: kept only until the cleanup)
    /// or held again.
    pub(crate) fn set_given_up(&self, partition: i32, given_up: bool) -> Result<()> {
        if given_up {
            self.tree.insert(given_up_key(partition), &[])?;
        } else {
            self.tree.remove(given_up_key(partition))?;
        }
        Ok(())
    }

    /// Records the clicks topic's partition count (which partition holds a user).
    pub(crate) fn set_partition_count(&self, partitions: i32) -> Result<()> {
        self.tree
            .insert(PARTITIONS_KEY, &partitions.to_be_bytes())?;
        Ok(())
    }

    /// The partitions whose local copy was given up, and the clicks topic's partition count, if
    /// a serving replica recorded them: what `multivaed export` leaves out.
    pub fn given_up(&self) -> Result<(Vec<i32>, Option<i32>)> {
        let mut given_up = Vec::new();
        for kv in self.tree.scan_prefix([b'g']) {
            let (k, _) = kv?;
            if let Ok(b) = <[u8; 4]>::try_from(&k[1..]) {
                given_up.push(i32::from_be_bytes(b));
            }
        }
        let count = self
            .tree
            .get(PARTITIONS_KEY)?
            .and_then(|v| <[u8; 4]>::try_from(v.as_ref()).ok())
            .map(i32::from_be_bytes);
        Ok((given_up, count))
    }

    /// When the local copy of `partition` was last in sync with the changelog (Unix ms).
    pub(crate) fn synced_at(&self, partition: i32) -> Result<Option<u64>> {
        Ok(self
            .tree
            .get(synced_key(partition))?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map(u64::from_be_bytes))
    }

    /// Whether this store holds anything of `partition`: a changelog position or a clicks
    /// offset on `topic`.
    pub(crate) fn has_copy_of(&self, partition: i32, topic: &str) -> Result<bool> {
        Ok(self.tree.contains_key(position_key(partition))?
            || self.tree.contains_key(offset_key(topic, partition))?)
    }

    /// The partitions with a local copy (a changelog position).
    pub(crate) fn changelog_partitions(&self) -> Result<Vec<i32>> {
        let mut out = Vec::new();
        for kv in self.tree.scan_prefix([b'c']) {
            let (k, _) = kv?;
            if let Ok(p) = <[u8; 4]>::try_from(&k[1..]) {
                out.push(i32::from_be_bytes(p));
            }
        }
        Ok(out)
    }

    /// Deletes every user `belongs` places in `partition` (their records, counts and popularity,
    /// as a forget does) and the partition's changelog position and clicks offset on `topic`:
    /// nothing of a partition this replica gave up stays on its disk, and a later assignment
    /// restores it from the changelog's beginning. Returns the users deleted.
    pub(crate) fn drop_partition(
        &self,
        partition: i32,
        topic: &str,
        belongs: impl Fn(&str) -> bool,
    ) -> Result<u64> {
        let mut users = Vec::new();
        for kv in self.tree.scan_prefix([b'U']) {
            let (k, _) = kv?;
            let user = String::from_utf8_lossy(&k[1..]).into_owned();
            if belongs(&user) {
                users.push(user);
            }
        }
        let position = self
            .changelog_position(partition)?
            .unwrap_or(ChangelogPosition {
                next_offset: 0,
                epoch: 0,
                clicks_next: 0,
            });
        let mut dropped = 0;
        for chunk in users.chunks(2000) {
            let gone: Vec<(String, HistoryIds)> = chunk
                .iter()
                .map(|u| (u.clone(), HistoryIds::default()))
                .collect();
            dropped += self
                .restore_histories(&gone, partition, position, None)?
                .forgotten;
        }
        let mut batch = sled::Batch::default();
        batch.remove(&position_key(partition));
        batch.remove(&synced_key(partition));
        batch.remove(&given_up_key(partition));
        batch.remove(offset_key(topic, partition));
        self.tree.apply_batch(batch)?;
        Ok(dropped)
    }

    /// Every user's id and history (external item ids, oldest first), in id order: what
    /// `multivaed export` writes. Stops at the first error `each` returns.
    pub fn export(&self, mut each: impl FnMut(&str, HistoryIds) -> Result<()>) -> Result<u64> {
        let mut n = 0;
        for kv in self.tree.scan_prefix([b'U']) {
            let (k, v) = kv?;
            let Some((_, h)) = decode_user(&v) else {
                continue;
            };
            let user = String::from_utf8_lossy(&k[1..]);
            each(&user, self.history_by_id(&h))?;
            n += 1;
        }
        Ok(n)
    }

    /// The external item ids of a user's history, oldest first (`None` for an unknown user).
    pub(crate) fn history_ids(&self, user: &str) -> Result<Option<Vec<String>>> {
        Ok(self.record(user)?.map(|(_, h)| self.item_ids(&h.items)))
    }

    /// A user's whole record by external ids: history, weights, excluded items (`None` for an
    /// unknown user).
    pub(crate) fn history_record(&self, user: &str) -> Result<Option<HistoryIds>> {
        Ok(self.record(user)?.map(|(_, h)| self.history_by_id(&h)))
    }

    /// A history in external ids, as the changelog and the export write it.
    pub(crate) fn history_by_id(&self, h: &History) -> HistoryIds {
        HistoryIds {
            items: self.item_ids(&h.items),
            weights: if h.weights.iter().all(|&w| w == 1.0) {
                Vec::new()
            } else {
                h.weights.clone()
            },
            excluded: self.item_ids(&h.excluded),
        }
    }

    /// The external ids of store items, in their order.
    fn item_ids(&self, items: &[u32]) -> Vec<String> {
        let catalogue = self.catalogue();
        items
            .iter()
            .filter_map(|&i| catalogue.ids.get(i as usize).map(|s| s.to_string()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::click;
    use super::*;

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn restored_histories_replace_what_is_stored_with_their_position() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), 3).unwrap();
        let o = |n| PartitionOffset {
            topic: "clicks".into(),
            partition: 2,
            next_offset: n,
        };
        s.apply(
            &[click("a", "i1"), click("a", "i2"), click("b", "i1")],
            &[o(3)],
        )
        .unwrap();
        let pos = ChangelogPosition {
            next_offset: 40,
            epoch: 3,
            clicks_next: 10,
        };
        s.restore_histories(
            &[
                ("a".into(), HistoryIds::items(ids(&["i2", "i9"]))),
                (
                    "c".into(),
                    HistoryIds::items(ids(&["i1", "i2", "i3", "i4"])),
                ),
                ("b".into(), HistoryIds::default()),
            ],
            2,
            pos,
            Some(&o(10)),
        )
        .unwrap();
        assert_eq!(s.history_ids("a").unwrap().unwrap(), ids(&["i2", "i9"]));
        // bounded to max_history, the newest kept
        assert_eq!(
            s.history_ids("c").unwrap().unwrap(),
            ids(&["i2", "i3", "i4"])
        );
        assert_eq!(s.history_ids("b").unwrap(), None, "b is forgotten");
        assert_eq!(s.user_index("b").unwrap(), None);
        assert_eq!(s.counts().users, 2, "a and c");
        assert_eq!(s.changelog_position(2).unwrap(), Some(pos));
        assert_eq!(s.changelog_position(1).unwrap(), None);
        assert_eq!(s.stored_offset("clicks", 2).unwrap(), Some(10));
        assert_eq!(s.counts().interactions, 5);
        // popularity follows: i2 held by a and c
        let i2 = s.item_index("i2").unwrap().unwrap();
        assert_eq!(s.popular(1, &[])[0].0, i2);
        // it survives a reopen
        drop(s);
        let s = Store::open(dir.path(), 3).unwrap();
        assert_eq!(s.history_ids("a").unwrap().unwrap(), ids(&["i2", "i9"]));
        assert_eq!(s.changelog_position(2).unwrap(), Some(pos));
    }

    #[test]
    fn only_the_kept_part_of_a_restored_history_enters_the_catalogue() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), 2).unwrap();
        let pos = ChangelogPosition {
            next_offset: 1,
            epoch: 1,
            clicks_next: 1,
        };
        let restored = HistoryIds {
            items: ids(&["old", "x", "y"]),
            weights: Vec::new(),
            excluded: ids(&["gone", "p", "q"]),
        };
        s.restore_histories(&[("e".into(), restored)], 0, pos, None)
            .unwrap();
        assert_eq!(s.history_ids("e").unwrap().unwrap(), ids(&["x", "y"]));
        for dropped in ["old", "gone"] {
            assert_eq!(s.item_index(dropped).unwrap(), None, "{dropped}");
        }
        assert_eq!(s.counts().items, 4, "x, y, p, q");
    }

    #[test]
    fn of_several_records_of_a_user_in_one_chunk_the_last_counts() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), 10).unwrap();
        let pos = ChangelogPosition {
            next_offset: 4,
            epoch: 1,
            clicks_next: 4,
        };
        s.restore_histories(
            &[
                ("a".into(), HistoryIds::items(ids(&["i1"]))),
                ("d".into(), HistoryIds::items(ids(&["i3"]))),
                ("a".into(), HistoryIds::items(ids(&["i1", "i2"]))),
                ("d".into(), HistoryIds::default()),
            ],
            0,
            pos,
            None,
        )
        .unwrap();
        assert_eq!(s.history_ids("a").unwrap().unwrap(), ids(&["i1", "i2"]));
        assert_eq!(s.history_ids("d").unwrap(), None);
        assert_eq!(s.counts().users, 1);
        assert_eq!(s.counts().interactions, 2);
        // one user index given, one id record
        let a = s.user_index("a").unwrap().unwrap();
        assert_eq!(a, 0);
        assert_eq!(s.tree.scan_prefix([b'u']).count(), 1);
    }
}
