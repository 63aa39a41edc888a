//! `Store`: what multivaed keeps, in sled on disk. External user and item ids are interned to
//! dense u32 indices (an item's index is its model column); each user's items are a set bounded
//! to the `max_history` most recent; the next offset of every partition is written in the same
//! atomic batch as the events it covers, so replaying from the stored offsets never loses or
//! double-counts a click.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use anyhow::{Context, Result};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use crate::model::Interactions;

pub use crate::wire::Click;

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
/// The layout of the records (absent: format 1, the original layout).
const FORMAT: &[u8] = b"mformat";
/// Format 2: a user's index and history in one record under its external id (one read and one
/// write per click); items are found through the in-memory catalogue.
const CURRENT_FORMAT: u64 = 2;
/// Items per popularity record.
const POPULARITY_BLOCK: usize = 256;

// Records, by first byte of the key:
//   'U' + user id   → user index (u32 BE), then the history, oldest first (u32 LE each)
//   'u' + index BE  → user id
//   'i' + index BE  → item id (the catalogue, loaded into memory at open)
//   'p' + block BE  → how many users hold each of items 256·block.. (u32 LE each)
//   'o' + topic + 0 + partition BE → next offset (i64 BE)
//   'm' + name      → counters and the format
// Format 1 had 'h' + user index → history, 'I' + item id → item index and 'c' + item index →
// count instead.

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

/// A user record: its index, then its history.
fn encode_user(idx: u32, items: &[u32]) -> Vec<u8> {
    let mut v = idx.to_be_bytes().to_vec();
    v.extend(encode_items(items));
    v
}

/// The index and history of a user record (`None` when it is not one).
fn decode_user(v: &[u8]) -> Option<(u32, Vec<u32>)> {
    let idx = u32::from_be_bytes(<[u8; 4]>::try_from(v.get(..4)?).ok()?);
    Some((idx, decode_items(&v[4..])))
}

/// The item catalogue: index → external id and back.
#[derive(Default)]
struct Catalogue {
    ids: Vec<Arc<str>>,
    index: HashMap<Arc<str>, u32>,
}

impl Catalogue {
    fn push(&mut self, id: Arc<str>) {
        self.index.insert(id.clone(), self.ids.len() as u32);
        self.ids.push(id);
    }
}

/// A user touched by the batch being applied.
struct Touched<'a> {
    id: &'a str,
    idx: u32,
    items: Vec<u32>,
    new: bool,
    changed: bool,
}

/// The interaction store (one writer: the ingest loop; any number of readers).
pub struct Store {
    db: sled::Db,
    tree: sled::Tree,
    max_history: usize,
    /// The whole catalogue is kept in memory (for interning and publishing).
    items: RwLock<Catalogue>,
    /// How many users hold each item (popularity fallback).
    popularity: RwLock<Vec<u32>>,
    n_users: AtomicU64,
    interactions: AtomicU64,
    write_lock: Mutex<()>,
}

impl Store {
    /// The item catalogue, read. A poisoned lock means a writer panicked mid-change: a bug, so
    /// this panics too (the stage dies and the daemon stops) rather than answer with nothing.
    fn catalogue(&self) -> std::sync::RwLockReadGuard<'_, Catalogue> {
        self.items
            .read()
            .expect("store catalogue poisoned by a panic")
    }

    /// Opens (or creates) the store under `dir`, with the default page cache (`store.cache_mb`).
    pub fn open(dir: &Path, max_history: usize) -> Result<Self> {
        let cache_mb = crate::config::StoreConfig::default().cache_mb;
        Self::open_with_cache(dir, max_history, cache_mb << 20)
    }

    /// Opens (or creates) the store under `dir`; sled caches up to `cache_bytes` of pages. A
    /// store written by an earlier version is converted in place first.
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
        upgrade(&db, &tree).with_context(|| {
            format!(
                "cannot convert the store in {} to this version",
                dir.display()
            )
        })?;
        let n_users = read_u64(tree.get(NEXT_USER)?);
        let n_items = read_u64(tree.get(NEXT_ITEM)?);
        let interactions = read_u64(tree.get(INTERACTIONS)?);
        let mut ids: Vec<Arc<str>> = vec![Arc::from(""); n_items as usize];
        for kv in tree.scan_prefix([b'i']) {
            let (k, v) = kv?;
            if k.len() == 5 {
                let idx = u32::from_be_bytes([k[1], k[2], k[3], k[4]]) as usize;
                if let Some(slot) = ids.get_mut(idx) {
                    *slot = Arc::from(String::from_utf8_lossy(&v).as_ref());
                }
            }
        }
        let mut catalogue = Catalogue::default();
        for id in ids {
            catalogue.push(id);
        }
        let mut popularity = vec![0u32; n_items as usize];
        for kv in tree.scan_prefix([b'p']) {
            let (k, v) = kv?;
            if let Ok(block) = <[u8; 4]>::try_from(&k[1..]) {
                let first = u32::from_be_bytes(block) as usize * POPULARITY_BLOCK;
                for (j, count) in decode_items(&v).into_iter().enumerate() {
                    if let Some(slot) = popularity.get_mut(first + j) {
                        *slot = count;
                    }
                }
            }
        }
        Ok(Self {
            db,
            tree,
            max_history: max_history.max(1),
            items: RwLock::new(catalogue),
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
        let mut next_user = next_user0;
        let mut touched: Vec<Touched<'_>> = Vec::new();
        let mut by_user: HashMap<&str, usize> = HashMap::with_capacity(clicks.len());
        let mut new_items: Vec<&str> = Vec::new();
        let mut new_item_index: HashMap<&str, u32> = HashMap::new();
        let mut pop_delta: HashMap<u32, i64> = HashMap::new();
        let mut interactions = self.interactions.load(Ordering::Acquire) as i64;
        let catalogue = self
            .items
            .read()
            .map_err(|_| anyhow::anyhow!("store poisoned"))?;
        let next_item0 = catalogue.ids.len() as u32;
        for c in clicks {
            let t = match by_user.get(c.user.as_str()) {
                Some(&t) => t,
                None => {
                    let (idx, items, new) = match self.tree.get(key(b'U', c.user.as_bytes()))? {
                        Some(v) => match decode_user(&v) {
                            Some((idx, items)) => (idx, items, false),
                            None => anyhow::bail!("the record of user {:?} is damaged", c.user),
                        },
                        None => {
                            next_user += 1;
                            (next_user - 1, Vec::new(), true)
                        }
                    };
                    touched.push(Touched {
                        id: &c.user,
                        idx,
                        items,
                        new,
                        changed: false,
                    });
                    by_user.insert(&c.user, touched.len() - 1);
                    touched.len() - 1
                }
            };
            let i = match catalogue.index.get(c.item.as_str()) {
                Some(&i) => i,
                None => *new_item_index.entry(&c.item).or_insert_with(|| {
                    new_items.push(&c.item);
                    next_item0 + new_items.len() as u32 - 1
                }),
            };
            let user = &mut touched[t];
            if user.items.contains(&i) {
                applied.duplicates += 1;
                continue;
            }
            user.items.push(i);
            applied.new_pairs.push((user.idx, i));
            *pop_delta.entry(i).or_default() += 1;
            applied.new_interactions += 1;
            interactions += 1;
            if user.items.len() > self.max_history {
                let evicted = user.items.len() - self.max_history;
                for old in user.items.drain(..evicted) {
                    *pop_delta.entry(old).or_default() -= 1;
                    interactions -= 1;
                }
            }
            if !user.changed {
                user.changed = true;
                applied.changed_users.push(user.idx);
            }
        }
        drop(catalogue);
        for user in touched.iter().filter(|u| u.changed) {
            batch.insert(
                key(b'U', user.id.as_bytes()),
                encode_user(user.idx, &user.items),
            );
            if user.new {
                batch.insert(&idx_key(b'u', user.idx), user.id.as_bytes());
            }
        }
        let next_item = next_item0 + new_items.len() as u32;
        for (n, id) in new_items.iter().enumerate() {
            batch.insert(&idx_key(b'i', next_item0 + n as u32), id.as_bytes());
        }
        let mut pop = self
            .popularity
            .write()
            .map_err(|_| anyhow::anyhow!("store poisoned"))?;
        let mut new_pop: Vec<(u32, u32)> = Vec::new();
        for (&i, &d) in &pop_delta {
            let cur = pop.get(i as usize).copied().unwrap_or(0) as i64;
            new_pop.push((i, (cur + d).max(0) as u32));
        }
        // each block of counts touched is written whole, as it will read after the batch
        let mut blocks: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
        for &(i, v) in &new_pop {
            let b = i / POPULARITY_BLOCK as u32;
            let block = blocks.entry(b).or_insert_with(|| {
                let first = b as usize * POPULARITY_BLOCK;
                let end = (first + POPULARITY_BLOCK).min(next_item as usize);
                (first..end)
                    .map(|j| pop.get(j).copied().unwrap_or(0))
                    .collect()
            });
            if let Some(slot) = block.get_mut(i as usize % POPULARITY_BLOCK) {
                *slot = v;
            }
        }
        for (b, block) in blocks {
            batch.insert(&idx_key(b'p', b), encode_items(&block));
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
        {
            let mut catalogue = self
                .items
                .write()
                .map_err(|_| anyhow::anyhow!("store poisoned"))?;
            for id in new_items {
                catalogue.push(Arc::from(id));
            }
        }
        pop.resize(next_item as usize, 0);
        for (i, v) in new_pop {
            pop[i as usize] = v;
        }
        self.n_users.store(next_user as u64, Ordering::Release);
        self.interactions
            .store(interactions.max(0) as u64, Ordering::Release);
        Ok(applied)
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
            .and_then(|v| decode_user(&v))
            .map(|(idx, _)| idx))
    }

    /// The index of an external item id.
    pub fn item_index(&self, item: &str) -> Result<Option<u32>> {
        let catalogue = self
            .items
            .read()
            .map_err(|_| anyhow::anyhow!("store poisoned"))?;
        Ok(catalogue.index.get(item).copied())
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
        Some(self.catalogue().ids.get(item as usize)?.to_string())
    }

    /// A user's external id and items, oldest first (`None` for an unknown index).
    pub fn user(&self, user: u32) -> Result<Option<(String, Vec<u32>)>> {
        let Some(id) = self.user_id(user)? else {
            return Ok(None);
        };
        let items = self
            .tree
            .get(key(b'U', id.as_bytes()))?
            .and_then(|v| decode_user(&v))
            .map(|(_, items)| items)
            .unwrap_or_default();
        Ok(Some((id, items)))
    }

    /// A user's items, oldest first.
    pub fn history(&self, user: u32) -> Result<Vec<u32>> {
        Ok(self.user(user)?.map(|(_, items)| items).unwrap_or_default())
    }

    /// The most popular items (by users holding them), best first, excluding `seen` (sorted).
    pub fn popular(&self, k: usize, seen: &[u32]) -> Vec<(u32, f32)> {
        let pop = self
            .popularity
            .read()
            .expect("store popularity poisoned by a panic");
        let scores: Vec<f32> = pop.iter().map(|&c| c as f32).collect();
        crate::model::top_k_unseen(&scores, None, seen, k)
    }

    /// Counts of users, items and stored interactions.
    pub fn counts(&self) -> StoreCounts {
        StoreCounts {
            users: self.n_users.load(Ordering::Acquire),
            items: self.catalogue().ids.len() as u64,
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
        for kv in self.tree.scan_prefix([b'U']) {
            let (_, v) = kv?;
            let Some((u, items)) = decode_user(&v) else {
                continue;
            };
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

/// Brings a store written by an earlier version to the current format, in place. Each chunk
/// is one atomic batch and the format is written last, so a conversion interrupted at any
/// moment resumes where it stopped at the next open.
fn upgrade(db: &sled::Db, tree: &sled::Tree) -> Result<()> {
    let format = read_u64(tree.get(FORMAT)?);
    if format == CURRENT_FORMAT {
        return Ok(());
    }
    if format > CURRENT_FORMAT {
        anyhow::bail!(
            "it was written by a newer multivaed (store format {format}; this version reads \
             format {CURRENT_FORMAT} and earlier)"
        );
    }
    let users = drain_prefix(tree, b'h', |k, v, batch| {
        if let Ok(idx) = <[u8; 4]>::try_from(&k[1..]) {
            let idx = u32::from_be_bytes(idx);
            if let Some(id) = tree.get(idx_key(b'u', idx))? {
                batch.insert(key(b'U', &id), encode_user(idx, &decode_items(v)));
            }
        }
        Ok(())
    })?;
    // per-item counts → blocks of counts (the catalogue's counts fit in memory)
    let mut counts: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    let mut old_counts = Vec::new();
    for kv in tree.scan_prefix([b'c']) {
        let (k, v) = kv?;
        if let (Ok(i), Ok(c)) = (
            <[u8; 4]>::try_from(&k[1..]),
            <[u8; 4]>::try_from(v.as_ref()),
        ) {
            let i = u32::from_be_bytes(i) as usize;
            let block = counts
                .entry((i / POPULARITY_BLOCK) as u32)
                .or_insert_with(|| vec![0; POPULARITY_BLOCK]);
            block[i % POPULARITY_BLOCK] = u32::from_be_bytes(c);
        }
        old_counts.push(k);
    }
    let mut batch = sled::Batch::default();
    for (b, block) in counts {
        batch.insert(&idx_key(b'p', b), encode_items(&block));
    }
    for k in old_counts {
        batch.remove(k);
    }
    tree.apply_batch(batch)?;
    // item id → index lives in memory now
    drain_prefix(tree, b'I', |_, _, _| Ok(()))?;
    tree.insert(FORMAT, &CURRENT_FORMAT.to_be_bytes())?;
    db.flush()?;
    if users > 0 {
        tracing::info!(
            users,
            format = CURRENT_FORMAT,
            "the store's user histories were converted to the current format"
        );
    }
    Ok(())
}

/// Removes every record under `prefix`, in atomic chunks of 10,000, after `convert` has added
/// what replaces each to the same chunk; returns how many there were.
fn drain_prefix(
    tree: &sled::Tree,
    prefix: u8,
    mut convert: impl FnMut(&[u8], &[u8], &mut sled::Batch) -> Result<()>,
) -> Result<usize> {
    const CHUNK: usize = 10_000;
    let mut total = 0;
    loop {
        let mut batch = sled::Batch::default();
        let mut n = 0;
        for kv in tree.scan_prefix([prefix]).take(CHUNK) {
            let (k, v) = kv?;
            convert(&k, &v, &mut batch)?;
            batch.remove(k);
            n += 1;
        }
        if n == 0 {
            return Ok(total);
        }
        total += n;
        tree.apply_batch(batch)?;
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

    /// A store as the format-1 code wrote it (per-item counts, 'h' histories, 'I' item index).
    fn write_format_1(dir: &Path) {
        let db = sled::Config::new().path(dir.join("store")).open().unwrap();
        let t = db.open_tree("interactions").unwrap();
        let put = |k: &[u8], v: &[u8]| {
            t.insert(k, v).unwrap();
        };
        for (idx, id) in ["alice", "bob"].iter().enumerate() {
            put(&key(b'U', id.as_bytes()), &(idx as u32).to_be_bytes());
            put(&idx_key(b'u', idx as u32), id.as_bytes());
        }
        for (idx, id) in ["x", "y", "z"].iter().enumerate() {
            put(&key(b'I', id.as_bytes()), &(idx as u32).to_be_bytes());
            put(&idx_key(b'i', idx as u32), id.as_bytes());
        }
        put(&idx_key(b'h', 0), &encode_items(&[2, 0]));
        put(&idx_key(b'h', 1), &encode_items(&[0]));
        for (i, c) in [(0u32, 2u32), (2, 1)] {
            put(&idx_key(b'c', i), &c.to_be_bytes());
        }
        put(NEXT_USER, &2u64.to_be_bytes());
        put(NEXT_ITEM, &3u64.to_be_bytes());
        put(INTERACTIONS, &3u64.to_be_bytes());
        put(&offset_key("clicks", 0), &3i64.to_be_bytes());
        db.flush().unwrap();
    }

    #[test]
    fn a_format_1_store_is_converted_in_place_and_keeps_everything() {
        let dir = tempfile::tempdir().unwrap();
        write_format_1(dir.path());
        {
            let s = Store::open(dir.path(), 10).unwrap();
            assert_eq!(
                s.counts(),
                StoreCounts {
                    users: 2,
                    items: 3,
                    interactions: 3
                }
            );
            assert_eq!(s.user_index("alice").unwrap(), Some(0));
            assert_eq!(s.user(0).unwrap().unwrap().1, vec![2, 0]);
            assert_eq!(s.history(1).unwrap(), vec![0]);
            assert_eq!(s.item_index("z").unwrap(), Some(2));
            assert_eq!(s.stored_offset("clicks", 0).unwrap(), Some(3));
            assert_eq!(s.popular(3, &[]), vec![(0, 2.0), (2, 1.0), (1, 0.0)]);
            let snap = s.snapshot().unwrap();
            assert_eq!(snap.users, vec![0, 1]);
            assert_eq!(snap.rows.row(0), &[0, 2]);
            // old records are gone; new clicks land on the converted users and items
            assert_eq!(s.tree.scan_prefix([b'h']).count(), 0);
            assert_eq!(s.tree.scan_prefix([b'I']).count(), 0);
            assert_eq!(s.tree.scan_prefix([b'c']).count(), 0);
            let a = s
                .apply(&[click("bob", "z"), click("carol", "y")], &[off(0, 5)])
                .unwrap();
            assert_eq!((a.new_users, a.new_items, a.new_interactions), (1, 0, 2));
            assert_eq!(s.history(1).unwrap(), vec![0, 2]);
            s.flush().unwrap();
        }
        let s = Store::open(dir.path(), 10).unwrap();
        assert_eq!(s.user(2).unwrap(), Some(("carol".into(), vec![1])));
        assert_eq!(s.popular(3, &[]), vec![(0, 2.0), (2, 2.0), (1, 1.0)]);
        assert_eq!(s.counts().interactions, 5);
    }

    #[test]
    fn a_store_from_a_newer_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path(), 3).unwrap();
            s.tree.insert(FORMAT, &99u64.to_be_bytes()).unwrap();
            s.flush().unwrap();
        }
        let err = Store::open(dir.path(), 3).err().expect("refused");
        let msg = format!("{err:#}");
        assert!(msg.contains("newer multivaed"), "{msg}");
    }

    #[test]
    fn popularity_spans_blocks_and_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let n = POPULARITY_BLOCK * 2 + 10;
        {
            let s = Store::open(dir.path(), 1000).unwrap();
            // item i is held by (i % 7) + 1 users
            let clicks: Vec<Click> = (0..n)
                .flat_map(|i| (0..=(i % 7)).map(move |u| click(&format!("u{u}"), &format!("i{i}"))))
                .collect();
            s.apply(&clicks, &[off(0, clicks.len() as i64)]).unwrap();
            // one more holder for the last item, in a later batch
            s.apply(&[click("u99", &format!("i{}", n - 1))], &[off(0, 1 << 20)])
                .unwrap();
            s.flush().unwrap();
        }
        let s = Store::open(dir.path(), 1000).unwrap();
        let all = s.popular(n, &[]);
        assert_eq!(all.len(), n);
        for (i, count) in all {
            let expected = (i as usize % 7) + 1 + usize::from(i as usize == n - 1);
            assert_eq!(count as usize, expected, "item {i}");
        }
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
