//! `Store`: what multivaed keeps, in sled on disk. External user and item ids are interned to
//! dense u32 indices (an item's index is its model column); each user's items are a set bounded
//! to the `max_history` most recent; the next offset of every partition is written in the same
//! atomic batch as the events it covers, so replaying from the stored offsets never loses or
//! double-counts a click.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};

use anyhow::{Context, Result};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use crate::model::Interactions;

/// One positive interaction, as ingested.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Click {
    pub user: String,
    pub item: String,
    /// Event time (ms since the epoch), when the producer gave one.
    pub timestamp_ms: Option<u64>,
}

/// The next offset to read of one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionOffset {
    pub topic: String,
    pub partition: i32,
    pub next_offset: i64,
}

/// What a batch changed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Applied {
    /// Users whose history changed (each once), with the index of each.
    pub changed_users: Vec<u32>,
    /// (user, item) pairs newly stored.
    pub new_interactions: u64,
    /// Those pairs, in arrival order (for online evaluation).
    pub new_pairs: Vec<(u32, u32)>,
    /// Clicks that were already stored (replays, repeats).
    pub duplicates: u64,
    pub new_users: u32,
    pub new_items: u32,
}

/// Counts of what is stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreCounts {
    pub users: u64,
    pub items: u64,
    pub interactions: u64,
}

const NEXT_USER: &[u8] = b"mnext_user";
const NEXT_ITEM: &[u8] = b"mnext_item";
const INTERACTIONS: &[u8] = b"minteractions";

fn key(prefix: u8, rest: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + rest.len());
    k.push(prefix);
    k.extend_from_slice(rest);
    k
}

fn idx_key(prefix: u8, idx: u32) -> [u8; 5] {
    let b = idx.to_be_bytes();
    [prefix, b[0], b[1], b[2], b[3]]
}

fn offset_key(topic: &str, partition: i32) -> Vec<u8> {
    let mut k = key(b'o', topic.as_bytes());
    k.push(0);
    k.extend_from_slice(&partition.to_be_bytes());
    k
}

fn read_u64(v: Option<sled::IVec>) -> u64 {
    v.and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0)
}

fn decode_items(v: &[u8]) -> Vec<u32> {
    v.chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn encode_items(items: &[u32]) -> Vec<u8> {
    items.iter().flat_map(|i| i.to_le_bytes()).collect()
}

/// The interaction store (one writer: the ingest loop; any number of readers).
pub struct Store {
    db: sled::Db,
    tree: sled::Tree,
    max_history: usize,
    /// Item index → external id (the whole catalogue is kept in memory for publishing).
    item_ids: RwLock<Vec<String>>,
    /// How many users hold each item (popularity fallback).
    popularity: RwLock<Vec<u32>>,
    n_users: AtomicU64,
    interactions: AtomicU64,
    write_lock: Mutex<()>,
}

impl Store {
    /// Opens (or creates) the store under `dir`, with the default page cache (`store.cache_mb`).
    pub fn open(dir: &Path, max_history: usize) -> Result<Self> {
        let cache_mb = crate::config::StoreConfig::default().cache_mb;
        Self::open_with_cache(dir, max_history, cache_mb << 20)
    }

    /// Opens (or creates) the store under `dir`; sled caches up to `cache_bytes` of pages.
    pub fn open_with_cache(dir: &Path, max_history: usize, cache_bytes: u64) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        // the file lock of a store just closed (this process's previous handle, whose flusher
        // thread is finishing, or a previous process still exiting) is released within moments
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let db = loop {
            match sled::Config::new()
                .path(dir.join("store"))
                .cache_capacity(cache_bytes)
                .open()
            {
                Err(sled::Error::Io(e))
                    if e.to_string().starts_with("could not acquire lock")
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                r => break r,
            }
        }
        .with_context(|| format!("cannot open the store in {}", dir.display()))?;
        let tree = db.open_tree("interactions")?;
        let n_users = read_u64(tree.get(NEXT_USER)?);
        let n_items = read_u64(tree.get(NEXT_ITEM)?);
        let interactions = read_u64(tree.get(INTERACTIONS)?);
        let mut item_ids = vec![String::new(); n_items as usize];
        for kv in tree.scan_prefix([b'i']) {
            let (k, v) = kv?;
            if k.len() == 5 {
                let idx = u32::from_be_bytes([k[1], k[2], k[3], k[4]]) as usize;
                if let Some(slot) = item_ids.get_mut(idx) {
                    *slot = String::from_utf8_lossy(&v).into_owned();
                }
            }
        }
        let mut popularity = vec![0u32; n_items as usize];
        for kv in tree.scan_prefix([b'c']) {
            let (k, v) = kv?;
            if k.len() == 5 && v.len() == 4 {
                let idx = u32::from_be_bytes([k[1], k[2], k[3], k[4]]) as usize;
                if let Some(slot) = popularity.get_mut(idx) {
                    *slot = u32::from_be_bytes([v[0], v[1], v[2], v[3]]);
                }
            }
        }
        Ok(Self {
            db,
            tree,
            max_history: max_history.max(1),
            item_ids: RwLock::new(item_ids),
            popularity: RwLock::new(popularity),
            n_users: AtomicU64::new(n_users),
            interactions: AtomicU64::new(interactions),
            write_lock: Mutex::new(()),
        })
    }

    /// Stores `clicks` and the partitions' next offsets in one atomic batch. A click already
    /// stored changes nothing; a history over `max_history` drops its oldest items.
    pub fn apply(&self, clicks: &[Click], offsets: &[PartitionOffset]) -> Result<Applied> {
        let _w = self
            .write_lock
            .lock()
            .map_err(|_| anyhow::anyhow!("store writer poisoned"))?;
        let mut batch = sled::Batch::default();
        let mut applied = Applied::default();
        let next_user0 = self.n_users.load(Ordering::Acquire) as u32;
        let next_item0 = self.item_ids.read().map(|v| v.len()).unwrap_or(0) as u32;
        let (mut next_user, mut next_item) = (next_user0, next_item0);
        let mut users: HashMap<&str, u32> = HashMap::new();
        let mut items: HashMap<&str, u32> = HashMap::new();
        let mut new_item_ids: Vec<String> = Vec::new();
        let mut histories: HashMap<u32, Vec<u32>> = HashMap::new();
        let mut pop_delta: HashMap<u32, i64> = HashMap::new();
        let mut interactions = self.interactions.load(Ordering::Acquire) as i64;
        for c in clicks {
            let (u, _) = self.intern(
                &mut users,
                &c.user,
                [b'U', b'u'],
                &mut next_user,
                &mut batch,
            )?;
            let (i, new_item) = self.intern(
                &mut items,
                &c.item,
                [b'I', b'i'],
                &mut next_item,
                &mut batch,
            )?;
            if new_item {
                new_item_ids.push(c.item.clone());
            }
            if let std::collections::hash_map::Entry::Vacant(e) = histories.entry(u) {
                let h = self
                    .tree
                    .get(idx_key(b'h', u))?
                    .map(|v| decode_items(&v))
                    .unwrap_or_default();
                e.insert(h);
            }
            let h = histories.get_mut(&u).expect("inserted above");
            if h.contains(&i) {
                applied.duplicates += 1;
                continue;
            }
            h.push(i);
            applied.new_pairs.push((u, i));
            *pop_delta.entry(i).or_default() += 1;
            applied.new_interactions += 1;
            interactions += 1;
            if h.len() > self.max_history {
                let evicted = h.len() - self.max_history;
                for old in h.drain(..evicted) {
                    *pop_delta.entry(old).or_default() -= 1;
                    interactions -= 1;
                }
            }
            if !applied.changed_users.contains(&u) {
                applied.changed_users.push(u);
            }
        }
        for &u in &applied.changed_users {
            batch.insert(&idx_key(b'h', u), encode_items(&histories[&u]));
        }
        let mut pop = self
            .popularity
            .write()
            .map_err(|_| anyhow::anyhow!("store poisoned"))?;
        let mut new_pop: Vec<(u32, u32)> = Vec::new();
        for (&i, &d) in &pop_delta {
            let cur = pop.get(i as usize).copied().unwrap_or(0) as i64;
            let v = (cur + d).max(0) as u32;
            batch.insert(&idx_key(b'c', i), &v.to_be_bytes());
            new_pop.push((i, v));
        }
        for o in offsets {
            batch.insert(
                offset_key(&o.topic, o.partition),
                &o.next_offset.to_be_bytes(),
            );
        }
        batch.insert(NEXT_USER, &(next_user as u64).to_be_bytes());
        batch.insert(NEXT_ITEM, &(next_item as u64).to_be_bytes());
        batch.insert(INTERACTIONS, &(interactions.max(0) as u64).to_be_bytes());
        self.tree.apply_batch(batch)?;
        // the batch is in: publish the new state to readers
        applied.new_users = next_user - next_user0;
        applied.new_items = next_item - next_item0;
        self.item_ids
            .write()
            .map_err(|_| anyhow::anyhow!("store poisoned"))?
            .extend(new_item_ids);
        pop.resize(next_item as usize, 0);
        for (i, v) in new_pop {
            pop[i as usize] = v;
        }
        self.n_users.store(next_user as u64, Ordering::Release);
        self.interactions
            .store(interactions.max(0) as u64, Ordering::Release);
        Ok(applied)
    }

    /// The index of an external id (`prefixes`: id → index, index → id), assigning the next free
    /// one (written to `batch`) for a new id; also says whether it was new.
    fn intern<'a>(
        &self,
        seen: &mut HashMap<&'a str, u32>,
        id: &'a str,
        prefixes: [u8; 2],
        next: &mut u32,
        batch: &mut sled::Batch,
    ) -> Result<(u32, bool)> {
        if let Some(&idx) = seen.get(id) {
            return Ok((idx, false));
        }
        let (idx, new) = match self.tree.get(key(prefixes[0], id.as_bytes()))? {
            Some(v) if v.len() == 4 => (u32::from_be_bytes([v[0], v[1], v[2], v[3]]), false),
            _ => {
                let idx = *next;
                *next += 1;
                batch.insert(key(prefixes[0], id.as_bytes()), &idx.to_be_bytes());
                batch.insert(&idx_key(prefixes[1], idx), id.as_bytes());
                (idx, true)
            }
        };
        seen.insert(id, idx);
        Ok((idx, new))
    }

    /// Makes everything applied so far durable (fsync).
    pub fn flush(&self) -> Result<()> {
        self.db.flush().context("cannot flush the store")?;
        Ok(())
    }

    /// The next offset to read of a partition, if any event of it was stored.
    pub fn stored_offset(&self, topic: &str, partition: i32) -> Result<Option<i64>> {
        Ok(self
            .tree
            .get(offset_key(topic, partition))?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map(i64::from_be_bytes))
    }

    /// Every stored partition offset.
    pub fn stored_offsets(&self) -> Result<Vec<PartitionOffset>> {
        let mut out = Vec::new();
        for kv in self.tree.scan_prefix([b'o']) {
            let (k, v) = kv?;
            let rest = &k[1..];
            let Some(nul) = rest.iter().position(|&b| b == 0) else {
                continue;
            };
            let (topic, p) = (&rest[..nul], &rest[nul + 1..]);
            if let (Ok(p), Ok(v)) = (<[u8; 4]>::try_from(p), <[u8; 8]>::try_from(v.as_ref())) {
                out.push(PartitionOffset {
                    topic: String::from_utf8_lossy(topic).into_owned(),
                    partition: i32::from_be_bytes(p),
                    next_offset: i64::from_be_bytes(v),
                });
            }
        }
        Ok(out)
    }

    /// The index of an external user id.
    pub fn user_index(&self, user: &str) -> Result<Option<u32>> {
        Ok(self
            .tree
            .get(key(b'U', user.as_bytes()))?
            .and_then(|v| <[u8; 4]>::try_from(v.as_ref()).ok())
            .map(u32::from_be_bytes))
    }

    /// The index of an external item id.
    pub fn item_index(&self, item: &str) -> Result<Option<u32>> {
        Ok(self
            .tree
            .get(key(b'I', item.as_bytes()))?
            .and_then(|v| <[u8; 4]>::try_from(v.as_ref()).ok())
            .map(u32::from_be_bytes))
    }

    /// The external id of a user index.
    pub fn user_id(&self, user: u32) -> Result<Option<String>> {
        Ok(self
            .tree
            .get(idx_key(b'u', user))?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// The external id of an item index.
    pub fn item_id(&self, item: u32) -> Option<String> {
        self.item_ids.read().ok()?.get(item as usize).cloned()
    }

    /// A user's items, oldest first.
    pub fn history(&self, user: u32) -> Result<Vec<u32>> {
        Ok(self
            .tree
            .get(idx_key(b'h', user))?
            .map(|v| decode_items(&v))
            .unwrap_or_default())
    }

    /// The most popular items (by users holding them), best first, excluding `seen` (sorted).
    pub fn popular(&self, k: usize, seen: &[u32]) -> Vec<(u32, f32)> {
        let pop = match self.popularity.read() {
            Ok(p) => p,
            Err(_) => return Vec::new(),
        };
        let scores: Vec<f32> = pop.iter().map(|&c| c as f32).collect();
        crate::model::top_k_unseen(&scores, None, seen, k)
    }

    /// Counts of users, items and stored interactions.
    pub fn counts(&self) -> StoreCounts {
        StoreCounts {
            users: self.n_users.load(Ordering::Acquire),
            items: self.item_ids.read().map(|v| v.len()).unwrap_or(0) as u64,
            interactions: self.interactions.load(Ordering::Acquire),
        }
    }

    /// Every user with a history, as a sample (row r = user `users[r]`).
    #[cfg(test)]
    fn snapshot(&self) -> Result<Sample> {
        self.sample(usize::MAX, &HashSet::new(), |_, _| false, 0)
    }

    /// The histories of one training round's users, read while ingestion continues, in user
    /// order: every user `always` picks (called in user order), then up to `max_users` others —
    /// those in `preferred` first, the rest of the budget a uniform random sample (`seed`).
    /// Memory is bounded by the sample, not by the number of users stored.
    pub fn sample(
        &self,
        max_users: usize,
        preferred: &HashSet<u32>,
        mut always: impl FnMut(u32, &[u32]) -> bool,
        seed: u64,
    ) -> Result<Sample> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut kept: Vec<(u32, Vec<u32>)> = Vec::new();
        let mut chosen: Vec<(u32, Vec<u32>)> = Vec::new();
        let mut reservoir: Vec<(u32, Vec<u32>)> = Vec::new();
        let mut others_seen = 0usize;
        let mut max_item = 0usize;
        for kv in self.tree.scan_prefix([b'h']) {
            let (k, v) = kv?;
            if k.len() != 5 {
                continue;
            }
            let u = u32::from_be_bytes([k[1], k[2], k[3], k[4]]);
            let items = decode_items(&v);
            if items.is_empty() {
                continue;
            }
            max_item = max_item.max(items.iter().map(|&i| i as usize + 1).max().unwrap_or(0));
            if always(u, &items) {
                kept.push((u, items));
            } else if preferred.contains(&u) && chosen.len() < max_users {
                chosen.push((u, items));
            } else {
                // reservoir sampling (algorithm R) over the other users
                if reservoir.len() < max_users {
                    reservoir.push((u, items));
                } else {
                    let j = rng.gen_range(0..=others_seen);
                    if j < max_users {
                        reservoir[j] = (u, items);
                    }
                }
                others_seen += 1;
            }
        }
        let room = max_users.saturating_sub(chosen.len());
        if reservoir.len() > room {
            reservoir.shuffle(&mut rng);
            reservoir.truncate(room);
        }
        kept.extend(chosen);
        kept.extend(reservoir);
        kept.sort_unstable_by_key(|(u, _)| *u);
        let n_items = (self.counts().items as usize).max(max_item);
        let users = kept.iter().map(|(u, _)| *u).collect();
        let rows = Interactions::from_rows(kept.into_iter().map(|(_, r)| r), n_items)
            .map_err(anyhow::Error::msg)?;
        Ok(Sample { users, rows })
    }
}

/// Some users' histories: row r of `rows` is user `users[r]` (ascending).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sample {
    pub users: Vec<u32>,
    pub rows: Interactions,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn click(u: &str, i: &str) -> Click {
        Click {
            user: u.into(),
            item: i.into(),
            timestamp_ms: None,
        }
    }

    fn off(p: i32, o: i64) -> PartitionOffset {
        PartitionOffset {
            topic: "clicks".into(),
            partition: p,
            next_offset: o,
        }
    }

    #[test]
    fn a_store_closing_elsewhere_is_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let first = Store::open(dir.path(), 3).unwrap();
        let closer = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            drop(first);
        });
        let second = Store::open(dir.path(), 3);
        closer.join().unwrap();
        assert!(second.is_ok(), "{:?}", second.err());
    }

    #[test]
    fn interns_deduplicates_bounds_and_persists() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path(), 3).unwrap();
            let a = s
                .apply(
                    &[
                        click("alice", "x"),
                        click("bob", "x"),
                        click("alice", "y"),
                        click("alice", "x"),
                    ],
                    &[off(0, 4)],
                )
                .unwrap();
            assert_eq!(a.new_interactions, 3);
            assert_eq!(a.duplicates, 1);
            assert_eq!((a.new_users, a.new_items), (2, 2));
            assert_eq!(a.changed_users, vec![0, 1]);
            // replaying the same clicks changes nothing
            let b = s
                .apply(&[click("alice", "x"), click("bob", "x")], &[off(0, 6)])
                .unwrap();
            assert_eq!(b.new_interactions, 0);
            assert!(b.changed_users.is_empty());
            // history bounded to the 3 most recent items
            s.apply(&[click("alice", "z"), click("alice", "w")], &[off(1, 2)])
                .unwrap();
            let alice = s.user_index("alice").unwrap().unwrap();
            let h: Vec<String> = s
                .history(alice)
                .unwrap()
                .iter()
                .map(|&i| s.item_id(i).unwrap())
                .collect();
            assert_eq!(h, vec!["y", "z", "w"]);
            assert_eq!(
                s.counts(),
                StoreCounts {
                    users: 2,
                    items: 4,
                    interactions: 4
                }
            );
            s.flush().unwrap();
        }
        let s = Store::open(dir.path(), 3).unwrap();
        assert_eq!(
            s.counts(),
            StoreCounts {
                users: 2,
                items: 4,
                interactions: 4
            }
        );
        assert_eq!(s.stored_offset("clicks", 0).unwrap(), Some(6));
        assert_eq!(s.stored_offset("clicks", 1).unwrap(), Some(2));
        assert_eq!(s.stored_offset("clicks", 2).unwrap(), None);
        assert_eq!(s.stored_offsets().unwrap().len(), 2);
        assert_eq!(s.item_id(0).as_deref(), Some("x"));
        let snap = s.snapshot().unwrap();
        assert_eq!(snap.users, vec![0, 1]);
        assert_eq!(snap.rows.row(1), &[0]);
        // x was evicted from alice's history, so only bob holds it now
        let top = s.popular(1, &[]);
        assert_eq!(top.len(), 1);
        assert_eq!(s.user_id(1).unwrap().as_deref(), Some("bob"));
    }

    #[test]
    fn a_sample_is_bounded_keeps_the_chosen_and_varies_by_seed() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), 10).unwrap();
        let clicks: Vec<Click> = (0..2000)
            .map(|u| click(&format!("u{u}"), &format!("i{}", u % 37)))
            .collect();
        s.apply(&clicks, &[off(0, 2000)]).unwrap();
        let preferred: HashSet<u32> = [5, 6, 7, 1999].into_iter().collect();
        let take = |seed| {
            s.sample(
                100,
                &preferred,
                |u, items| u % 500 == 0 && !items.is_empty(),
                seed,
            )
            .unwrap()
        };
        let a = take(1);
        assert_eq!(a.users.len(), 104, "4 always + 100 others");
        assert_eq!(a.rows.n_users(), a.users.len());
        assert!(a.users.windows(2).all(|w| w[0] < w[1]), "in user order");
        for u in [0, 500, 1000, 1500, 5, 6, 7, 1999] {
            assert!(a.users.contains(&u), "user {u} missing");
        }
        // rows match their users
        for (r, &u) in a.users.iter().enumerate() {
            assert_eq!(a.rows.row(r), s.history(u).unwrap().as_slice());
        }
        let b = take(2);
        assert_ne!(a.users, b.users, "a new sample each seed");
        // the random part spreads over all users, not just the first ones read
        let late = a.users.iter().filter(|&&u| u >= 1000).count();
        assert!(late > 30, "only {late} of the sample from the second half");
        assert_eq!(s.snapshot().unwrap().users.len(), 2000);
    }
}
