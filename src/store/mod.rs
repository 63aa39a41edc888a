//! `Store`: what multivaed keeps, in sled on disk. External user and item ids are interned to
//! dense u32 indices (an item's index is its model column); each user's items are a set bounded
//! to the `max_history` most recent; the next offset of every partition is written in the same
//! atomic batch as the events it covers, so replaying from the stored offsets never loses or
//! double-counts a click. Forgetting a user deletes every record that names them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use anyhow::{Context, Result};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use crate::model::Interactions;

mod codec;
mod restore;
mod upgrade;

use codec::*;
pub use codec::{ExportedHistory, History, HistoryIds};
pub(crate) use restore::ChangelogPosition;
use upgrade::upgrade;

pub use crate::wire::Click;

/// The next offset to read of one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionOffset {
    pub topic: String,
    pub partition: i32,
    pub next_offset: i64,
}

/// One consumed change to the histories, applied in consumption order.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Click(Click),
    /// The item leaves the user's history and is excluded for them (until a later click on it).
    Negative(Click),
    /// The user's whole history is deleted (a later click starts a new one).
    Forget(String),
}

/// A change, borrowed (what a batch is merged from).
#[derive(Clone, Copy)]
enum ChangeRef<'c> {
    Click(&'c Click),
    Negative(&'c Click),
    Forget(&'c str),
}

/// A user a batch forgot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forgotten {
    pub user: String,
    /// The index the store knew them by (`None`: it held nothing of them).
    pub index: Option<u32>,
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
    /// Clicks that were already stored (replays, repeats) with at least their weight.
    pub duplicates: u64,
    /// Items newly excluded by negative events.
    pub excluded: u64,
    pub new_users: u32,
    pub new_items: u32,
    /// Damaged user records met: each was moved aside (kept under a quarantine key) and its
    /// user started again with this batch's clicks.
    pub quarantined: u64,
    /// Users forgotten, in order (one forgotten and clicking again in the same batch is in
    /// both this and `changed_users`).
    pub forgotten: Vec<Forgotten>,
    /// Each user the batch wrote or deleted, as stored after it: what a changelog records
    /// without reading the store back.
    pub written: Vec<Written>,
}

/// A user's stored state after a batch: its history, or `None` once its record is deleted.
#[derive(Debug, Clone, PartialEq)]
pub struct Written {
    pub user: String,
    pub history: Option<History>,
}

/// Counts of what is stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreCounts {
    pub users: u64,
    pub items: u64,
    pub interactions: u64,
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
    history: History,
    new: bool,
    changed: bool,
    /// Forgotten in this batch: its stored records go (a later click of the batch starts a
    /// new history under the same index).
    forgotten: bool,
}

/// A batch of clicks merged into the users they touch, before it is written.
struct Merge<'c> {
    touched: Vec<Touched<'c>>,
    /// Damaged user records (id, raw bytes), to be moved aside.
    damaged: Vec<(&'c str, sled::IVec)>,
    /// Users forgotten whose only record was damaged: it is deleted.
    erased: Vec<&'c str>,
    /// Users whose records the batch deletes (forgotten, with no click after).
    deleted: u64,
    new_items: Vec<&'c str>,
    /// Change of each touched item's count (new clicks, minus evictions).
    pop_delta: HashMap<u32, i64>,
    applied: Applied,
    next_user0: u32,
    next_user: u32,
    next_item0: u32,
    interactions: i64,
}

impl<'c> Merge<'c> {
    /// Adds item `i` of `weight` to touched user `t` (a larger weight when they have it),
    /// evicting the oldest past `max_history`; a positive event lifts the item's exclusion.
    fn add(&mut self, t: usize, i: u32, weight: f32, max_history: usize) {
        let user = &mut self.touched[t];
        let h = &mut user.history;
        if let Some(at) = h.items.iter().position(|&x| x == i) {
            if weight <= h.weights[at] {
                self.applied.duplicates += 1;
                return;
            }
            h.weights[at] = weight;
        } else {
            h.excluded.retain(|&x| x != i);
            h.items.push(i);
            h.weights.push(weight);
            self.applied.new_pairs.push((user.idx, i));
            *self.pop_delta.entry(i).or_default() += 1;
            self.applied.new_interactions += 1;
            self.interactions += 1;
            if h.items.len() > max_history {
                let evicted = h.items.len() - max_history;
                h.weights.drain(..evicted);
                for old in h.items.drain(..evicted) {
                    *self.pop_delta.entry(old).or_default() -= 1;
                    self.interactions -= 1;
                }
            }
        }
        self.changed(t);
    }

    /// A negative event of touched user `t` on item `i`: out of the history, into the excluded
    /// items (the `max_history` most recent are kept).
    fn exclude(&mut self, t: usize, i: u32, max_history: usize) {
        let h = &mut self.touched[t].history;
        if let Some(at) = h.items.iter().position(|&x| x == i) {
            h.items.remove(at);
            h.weights.remove(at);
            *self.pop_delta.entry(i).or_default() -= 1;
            self.interactions -= 1;
        }
        if h.excluded.contains(&i) {
            self.applied.duplicates += 1;
            return;
        }
        h.excluded.push(i);
        if h.excluded.len() > max_history {
            let evicted = h.excluded.len() - max_history;
            h.excluded.drain(..evicted);
        }
        self.applied.excluded += 1;
        self.changed(t);
    }

    /// Adds a user to the batch (read from the store, or `new`); returns their place.
    fn touch(
        &mut self,
        by_user: &mut HashMap<&'c str, usize>,
        id: &'c str,
        idx: u32,
        history: History,
        new: bool,
    ) -> usize {
        self.touched.push(Touched {
            id,
            idx,
            history,
            new,
            changed: false,
            forgotten: false,
        });
        by_user.insert(id, self.touched.len() - 1);
        self.touched.len() - 1
    }

    fn changed(&mut self, t: usize) {
        let user = &mut self.touched[t];
        if !user.changed {
            user.changed = true;
            self.applied.changed_users.push(user.idx);
        }
    }

    /// Empties touched user `t`'s history and exclusions: they are forgotten.
    fn forget(&mut self, t: usize) {
        let user = &mut self.touched[t];
        for old in user.history.items.drain(..) {
            *self.pop_delta.entry(old).or_default() -= 1;
            self.interactions -= 1;
        }
        user.history = History::default();
        user.forgotten = true;
        if user.changed {
            user.changed = false;
            let idx = user.idx;
            self.applied.changed_users.retain(|&u| u != idx);
        }
        self.applied.forgotten.push(Forgotten {
            user: user.id.to_string(),
            index: (!user.new).then_some(user.idx),
        });
    }
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
    forgotten: AtomicU64,
    interactions: AtomicU64,
    messages: AtomicU64,
    write_lock: Mutex<()>,
    /// Users and items get indices below this (u32 model columns); a batch that would pass it
    /// is refused, long before indices could wrap.
    index_limit: u32,
}

/// The default `index_limit`: 2^32 less a million of headroom.
const INDEX_LIMIT: u32 = u32::MAX - (1 << 20);

/// A batch refused because the store has as many users or items as indices allow.
#[derive(Debug, thiserror::Error)]
#[error("the store is full: {what} would pass {limit} (indices are u32); no click of this batch was stored")]
pub struct StoreFull {
    pub what: &'static str,
    pub limit: u32,
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
    pub(crate) fn open_with_cache(
        dir: &Path,
        max_history: usize,
        cache_bytes: u64,
    ) -> Result<Self> {
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
        let forgotten = read_u64(tree.get(FORGOTTEN)?);
        let messages = read_u64(tree.get(MESSAGES)?);
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
            forgotten: AtomicU64::new(forgotten),
            interactions: AtomicU64::new(interactions),
            messages: AtomicU64::new(messages),
            write_lock: Mutex::new(()),
            index_limit: INDEX_LIMIT,
        })
    }

    /// A fingerprint of the ids of items 0..n (see [`crate::model::fingerprint`]); `None`
    /// when the store holds fewer than `n` items.
    pub(crate) fn catalogue_fingerprint(&self, n: usize) -> Option<String> {
        let catalogue = self.catalogue();
        let ids = catalogue.ids.get(..n)?;
        Some(crate::model::fingerprint(ids.iter().map(|s| &**s)))
    }

    /// The store indices of item ids, interning the ones it does not hold yet (no user
    /// changes): a serving replica holds every item of the model it serves, so a model's
    /// columns map onto store items one to one.
    pub(crate) fn intern_items<'a>(
        &self,
        ids: impl IntoIterator<Item = &'a str>,
    ) -> Result<Vec<u32>> {
        let _w = self
            .write_lock
            .lock()
            .map_err(|_| anyhow::anyhow!("store writer poisoned"))?;
        let mut out = Vec::new();
        let mut new_items: Vec<&str> = Vec::new();
        let mut batch = sled::Batch::default();
        let first_new = {
            let catalogue = self.catalogue();
            let first_new = catalogue.ids.len() as u32;
            let mut new_index: HashMap<&str, u32> = HashMap::new();
            for id in ids {
                let i = match catalogue.index.get(id) {
                    Some(&i) => i,
                    None => *new_index.entry(id).or_insert_with(|| {
                        new_items.push(id);
                        first_new + new_items.len() as u32 - 1
                    }),
                };
                out.push(i);
            }
            first_new
        };
        if new_items.is_empty() {
            return Ok(out);
        }
        let next_item = first_new as u64 + new_items.len() as u64;
        if next_item > u64::from(self.index_limit) {
            return Err(StoreFull {
                what: "items",
                limit: self.index_limit,
            }
            .into());
        }
        for (n, id) in new_items.iter().enumerate() {
            batch.insert(&idx_key(b'i', first_new + n as u32), id.as_bytes());
        }
        batch.insert(NEXT_ITEM, &next_item.to_be_bytes());
        self.tree.apply_batch(batch)?;
        self.catalogue_extend(new_items)?;
        self.popularity
            .write()
            .map_err(|_| anyhow::anyhow!("store poisoned"))?
            .resize(next_item as usize, 0);
        Ok(out)
    }

    /// Shows readers the items a batch just stored (their ids in index order).
    fn catalogue_extend<S: Into<Arc<str>>>(&self, ids: impl IntoIterator<Item = S>) -> Result<()> {
        let mut catalogue = self
            .items
            .write()
            .map_err(|_| anyhow::anyhow!("store poisoned"))?;
        for id in ids {
            catalogue.push(id.into());
        }
        Ok(())
    }

    /// How many users hold each item, by store index.
    pub(crate) fn popularity_counts(&self) -> Vec<u32> {
        self.popularity
            .read()
            .expect("store popularity poisoned by a panic")
            .clone()
    }

    /// Whether a model of `n_items` columns whose manifest gives `fingerprint` was trained on
    /// this store's items (a manifest without one cannot be checked, and passes).
    pub fn matches_catalogue(&self, n_items: usize, fingerprint: Option<&str>) -> bool {
        fingerprint.is_none_or(|f| self.catalogue_fingerprint(n_items).as_deref() == Some(f))
    }

    /// Consumed messages applied over the store's life (see [`Store::apply_consumed`]).
    pub fn messages_applied(&self) -> u64 {
        self.messages.load(Ordering::Acquire)
    }

    /// How full the index space is: the larger of users and items over the limit (0..1).
    pub(crate) fn index_capacity_used(&self) -> f64 {
        let c = self.counts();
        c.users.max(c.items) as f64 / f64::from(self.index_limit)
    }

    /// Stores `clicks` and the partitions' next offsets in one atomic batch. A click already
    /// stored changes nothing; a history over `max_history` drops its oldest items.
    pub fn apply(&self, clicks: &[Click], offsets: &[PartitionOffset]) -> Result<Applied> {
        self.apply_consumed(clicks, offsets, clicks.len() as u64)
    }

    /// As [`Store::apply`], for a batch of `messages` consumed messages (its clicks and the
    /// others: ignored or dead-lettered), added to the lifelong count in the same batch.
    pub fn apply_consumed(
        &self,
        clicks: &[Click],
        offsets: &[PartitionOffset],
        messages: u64,
    ) -> Result<Applied> {
        self.apply_batch(clicks.iter().map(ChangeRef::Click), offsets, messages)
    }

    /// As [`Store::apply_consumed`], for clicks and forgotten users in consumption order.
    pub fn apply_changes(
        &self,
        changes: &[Change],
        offsets: &[PartitionOffset],
        messages: u64,
    ) -> Result<Applied> {
        let changes = changes.iter().map(|c| match c {
            Change::Click(c) => ChangeRef::Click(c),
            Change::Negative(c) => ChangeRef::Negative(c),
            Change::Forget(u) => ChangeRef::Forget(u),
        });
        self.apply_batch(changes, offsets, messages)
    }

    fn apply_batch<'c>(
        &self,
        changes: impl Iterator<Item = ChangeRef<'c>>,
        offsets: &[PartitionOffset],
        messages: u64,
    ) -> Result<Applied> {
        let _w = self
            .write_lock
            .lock()
            .map_err(|_| anyhow::anyhow!("store writer poisoned"))?;
        let mut m = self.merge(changes)?;
        let mut batch = sled::Batch::default();
        for (id, raw) in &m.damaged {
            batch.insert(key(b'Q', id.as_bytes()), raw.clone());
        }
        for user in &m.touched {
            if user.forgotten {
                batch.remove(key(b'Q', user.id.as_bytes()));
            }
            if user.forgotten && user.history.is_empty() {
                batch.remove(key(b'U', user.id.as_bytes()));
                batch.remove(&idx_key(b'u', user.idx));
                m.deleted += 1;
                continue;
            }
            if !user.changed && !user.forgotten {
                continue;
            }
            batch.insert(
                key(b'U', user.id.as_bytes()),
                encode_user(user.idx, &user.history),
            );
            if user.new {
                batch.insert(&idx_key(b'u', user.idx), user.id.as_bytes());
            }
        }
        for id in &m.erased {
            batch.remove(key(b'U', id.as_bytes()));
            batch.remove(key(b'Q', id.as_bytes()));
        }
        for f in &m.applied.forgotten {
            batch.insert(key(b'W', f.user.as_bytes()), &[][..]);
        }
        let forgotten = self.forgotten.load(Ordering::Acquire) + m.deleted;
        batch.insert(FORGOTTEN, &forgotten.to_be_bytes());
        let next_item = m.next_item0 + m.new_items.len() as u32;
        for (n, id) in m.new_items.iter().enumerate() {
            batch.insert(&idx_key(b'i', m.next_item0 + n as u32), id.as_bytes());
        }
        let mut pop = self
            .popularity
            .write()
            .map_err(|_| anyhow::anyhow!("store poisoned"))?;
        let new_pop = Self::recount(&pop, &m.pop_delta, next_item, &mut batch);
        for o in offsets {
            batch.insert(
                offset_key(&o.topic, o.partition),
                &o.next_offset.to_be_bytes(),
            );
        }
        let interactions = m.interactions.max(0) as u64;
        batch.insert(NEXT_USER, &(m.next_user as u64).to_be_bytes());
        batch.insert(NEXT_ITEM, &(next_item as u64).to_be_bytes());
        batch.insert(INTERACTIONS, &interactions.to_be_bytes());
        let messages = self.messages.load(Ordering::Acquire) + messages;
        batch.insert(MESSAGES, &messages.to_be_bytes());
        self.tree.apply_batch(batch)?;
        // the batch is in: publish the new state to readers
        m.applied.written = m
            .touched
            .drain(..)
            .filter(|u| u.changed || u.forgotten)
            .map(|u| Written {
                user: u.id.to_string(),
                history: (!(u.forgotten && u.history.is_empty())).then_some(u.history),
            })
            .collect();
        m.applied.new_users = m.next_user - m.next_user0;
        m.applied.new_items = next_item - m.next_item0;
        m.applied.quarantined = m.damaged.len() as u64;
        self.catalogue_extend(m.new_items)?;
        pop.resize(next_item as usize, 0);
        for (i, v) in new_pop {
            pop[i as usize] = v;
        }
        self.n_users.store(m.next_user as u64, Ordering::Release);
        self.forgotten.store(forgotten, Ordering::Release);
        self.interactions.store(interactions, Ordering::Release);
        self.messages.store(messages, Ordering::Release);
        Ok(m.applied)
    }

    /// Merges `changes` into the histories of the users they touch (read once each), interning
    /// new users and items: what the batch will write, nothing written yet.
    fn merge<'c>(&self, changes: impl Iterator<Item = ChangeRef<'c>>) -> Result<Merge<'c>> {
        let next_user0 = self.n_users.load(Ordering::Acquire) as u32;
        let catalogue = self
            .items
            .read()
            .map_err(|_| anyhow::anyhow!("store poisoned"))?;
        let mut m = Merge {
            touched: Vec::new(),
            damaged: Vec::new(),
            erased: Vec::new(),
            deleted: 0,
            new_items: Vec::new(),
            pop_delta: HashMap::new(),
            applied: Applied::default(),
            next_user0,
            next_user: next_user0,
            next_item0: catalogue.ids.len() as u32,
            interactions: self.interactions.load(Ordering::Acquire) as i64,
        };
        let mut by_user: HashMap<&str, usize> = HashMap::new();
        let mut new_item_index: HashMap<&str, u32> = HashMap::new();
        for change in changes {
            let (c, negative) = match change {
                ChangeRef::Click(c) => (c, false),
                ChangeRef::Negative(c) => (c, true),
                ChangeRef::Forget(user) => {
                    self.merge_forget(&mut m, &mut by_user, user)?;
                    continue;
                }
            };
            let t = match by_user.get(c.user.as_str()) {
                Some(&t) => t,
                None => self.load_or_create(&mut m, &mut by_user, &c.user)?,
            };
            let i = match catalogue.index.get(c.item.as_str()) {
                Some(&i) => i,
                None => self.intern_new_item(&mut m, &mut new_item_index, &c.item)?,
            };
            if negative {
                m.exclude(t, i, self.max_history);
            } else {
                m.add(t, i, c.weight, self.max_history);
            }
        }
        Ok(m)
    }

    /// Brings `user` into the batch from their stored record, or as a new user (a damaged
    /// record is kept aside and the user starts again); returns their place in `m.touched`.
    fn load_or_create<'c>(
        &self,
        m: &mut Merge<'c>,
        by_user: &mut HashMap<&'c str, usize>,
        user: &'c str,
    ) -> Result<usize> {
        let record = self.tree.get(key(b'U', user.as_bytes()))?;
        let (idx, history, new) = match record.as_ref().map(|v| decode_user(v)) {
            Some(Some((idx, history))) => (idx, history, false),
            found => {
                if let (Some(None), Some(raw)) = (found, record.clone()) {
                    m.damaged.push((user, raw));
                }
                if m.next_user >= self.index_limit {
                    return Err(StoreFull {
                        what: "users",
                        limit: self.index_limit,
                    }
                    .into());
                }
                m.next_user += 1;
                (m.next_user - 1, History::default(), true)
            }
        };
        Ok(m.touch(by_user, user, idx, history, new))
    }

    /// The index a batch gives an item the catalogue does not have yet (one per id).
    fn intern_new_item<'c>(
        &self,
        m: &mut Merge<'c>,
        new_item_index: &mut HashMap<&'c str, u32>,
        item: &'c str,
    ) -> Result<u32> {
        if let Some(&i) = new_item_index.get(item) {
            return Ok(i);
        }
        let i = m.next_item0 as u64 + m.new_items.len() as u64;
        if i >= u64::from(self.index_limit) {
            return Err(StoreFull {
                what: "items",
                limit: self.index_limit,
            }
            .into());
        }
        m.new_items.push(item);
        new_item_index.insert(item, i as u32);
        Ok(i as u32)
    }

    /// Merges a request to forget `user`: a user touched by the batch or stored is emptied
    /// (and deleted when the batch has no later click of theirs); a damaged record is erased.
    fn merge_forget<'c>(
        &self,
        m: &mut Merge<'c>,
        by_user: &mut HashMap<&'c str, usize>,
        user: &'c str,
    ) -> Result<()> {
        if let Some(&t) = by_user.get(user) {
            m.forget(t);
            return Ok(());
        }
        match self.tree.get(key(b'U', user.as_bytes()))? {
            None => m.applied.forgotten.push(Forgotten {
                user: user.to_string(),
                index: None,
            }),
            Some(raw) => match decode_user(&raw) {
                Some((idx, history)) => {
                    let t = m.touch(by_user, user, idx, history, false);
                    m.forget(t);
                }
                None => {
                    m.erased.push(user);
                    m.applied.forgotten.push(Forgotten {
                        user: user.to_string(),
                        index: None,
                    });
                }
            },
        }
        Ok(())
    }

    /// The new counts of the items `delta` touches, with each block of counts they fall in
    /// added to `batch` whole, as it will read after the batch.
    fn recount(
        pop: &[u32],
        delta: &HashMap<u32, i64>,
        n_items: u32,
        batch: &mut sled::Batch,
    ) -> Vec<(u32, u32)> {
        let new_pop: Vec<(u32, u32)> = delta
            .iter()
            .map(|(&i, &d)| {
                let cur = pop.get(i as usize).copied().unwrap_or(0) as i64;
                (i, (cur + d).max(0) as u32)
            })
            .collect();
        let mut blocks: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
        for &(i, v) in &new_pop {
            let b = i / POPULARITY_BLOCK as u32;
            let block = blocks.entry(b).or_insert_with(|| {
                let first = b as usize * POPULARITY_BLOCK;
                let end = (first + POPULARITY_BLOCK).min(n_items as usize);
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
        new_pop
    }

    /// Forgotten users whose recommendation is not withdrawn yet (written with their delete, so
    /// a crash before the withdrawal does not skip it). One who has clicked again since is no
    /// longer pending: their new recommendation replaces the old.
    pub(crate) fn withdrawals_pending(&self) -> Result<Vec<Forgotten>> {
        let mut pending = Vec::new();
        let mut back = Vec::new();
        for k in self.tree.scan_prefix([b'W']).keys() {
            let user = String::from_utf8_lossy(&k?[1..]).into_owned();
            if self.record(&user)?.is_some() {
                back.push(user);
            } else {
                pending.push(Forgotten { user, index: None });
            }
        }
        self.withdrawn(&back)?;
        Ok(pending)
    }

    /// Forgotten users whose recommendation was withdrawn: nothing names them any more.
    pub(crate) fn withdrawn(&self, users: &[String]) -> Result<()> {
        let mut batch = sled::Batch::default();
        for u in users {
            batch.remove(key(b'W', u.as_bytes()));
        }
        self.tree.apply_batch(batch)?;
        Ok(())
    }

    /// Makes everything applied so far durable (fsync).
    pub fn flush(&self) -> Result<()> {
        self.db.flush().context("cannot flush the store")?;
        Ok(())
    }

    /// The next offset to read of a partition, if any event of it was stored.
    pub(crate) fn stored_offset(&self, topic: &str, partition: i32) -> Result<Option<i64>> {
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
        Ok(self.record(user)?.map(|(idx, _)| idx))
    }

    /// A user's record: their index and history (`None` for an unknown user or a damaged
    /// record).
    fn record(&self, user: &str) -> Result<Option<(u32, History)>> {
        Ok(self
            .tree
            .get(key(b'U', user.as_bytes()))?
            .and_then(|v| decode_user(&v)))
    }

    /// The index of an external item id.
    pub(crate) fn item_index(&self, item: &str) -> Result<Option<u32>> {
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

    /// A user's external id and history (`None` for an unknown index).
    pub fn user(&self, user: u32) -> Result<Option<(String, History)>> {
        let Some(id) = self.user_id(user)? else {
            return Ok(None);
        };
        let history = self.record(&id)?.map(|(_, h)| h).unwrap_or_default();
        Ok(Some((id, history)))
    }

    /// A user's items, oldest first.
    pub fn history(&self, user: u32) -> Result<Vec<u32>> {
        Ok(self.user(user)?.map(|(_, h)| h.items).unwrap_or_default())
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
            users: self
                .n_users
                .load(Ordering::Acquire)
                .saturating_sub(self.forgotten.load(Ordering::Acquire)),
            items: self.catalogue().ids.len() as u64,
            interactions: self.interactions.load(Ordering::Acquire),
        }
    }

    /// Every user with a history, as a sample (row r = user `users[r]`).
    #[cfg(test)]
    fn snapshot(&self) -> Result<Sample> {
        self.sample(usize::MAX, &HashSet::new(), |_, _, _| Pick::Maybe, 0, false)
    }

    /// The histories of one training round's users, read while ingestion continues, in user
    /// order: every user `pick` (called in user order) says to take always, none it says to
    /// leave out, then up to `max_users` others — those in `preferred` first, the rest of the
    /// budget a uniform random sample (`seed`). `pick` gets each user's index, [`user_key`] and
    /// items. The rows carry the items' weights when `weighted`. Memory is bounded by the
    /// sample, not by the number of users stored.
    pub fn sample(
        &self,
        max_users: usize,
        preferred: &HashSet<u32>,
        mut pick: impl FnMut(u32, u64, &[u32]) -> Pick,
        seed: u64,
        weighted: bool,
    ) -> Result<Sample> {
        type Row = (u32, u64, Vec<u32>, Vec<f32>);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut kept: Vec<Row> = Vec::new();
        let mut chosen: Vec<Row> = Vec::new();
        let mut reservoir: Vec<Row> = Vec::new();
        let mut others_seen = 0usize;
        let mut max_item = 0usize;
        for kv in self.tree.scan_prefix([b'U']) {
            let (k, v) = kv?;
            let Some((u, history)) = decode_user(&v) else {
                continue;
            };
            if history.items.is_empty() {
                continue;
            }
            let (items, weights) = (history.items, history.weights);
            let weights = if weighted { weights } else { Vec::new() };
            max_item = max_item.max(items.iter().map(|&i| i as usize + 1).max().unwrap_or(0));
            let key = user_key(&k[1..]);
            let how = pick(u, key, &items);
            if how == Pick::Always {
                kept.push((u, key, items, weights));
            } else if how == Pick::Never {
                continue;
            } else if preferred.contains(&u) && chosen.len() < max_users {
                chosen.push((u, key, items, weights));
            } else {
                // reservoir sampling (algorithm R) over the other users
                if reservoir.len() < max_users {
                    reservoir.push((u, key, items, weights));
                } else {
                    let j = rng.gen_range(0..=others_seen);
                    if j < max_users {
                        reservoir[j] = (u, key, items, weights);
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
        kept.sort_unstable_by_key(|(u, _, _, _)| *u);
        let n_items = (self.counts().items as usize).max(max_item);
        let users = kept.iter().map(|(u, _, _, _)| *u).collect();
        let keys = kept.iter().map(|(_, k, _, _)| *k).collect();
        let rows = if weighted {
            Interactions::from_weighted_rows(kept.into_iter().map(|(_, _, r, w)| (r, w)), n_items)
        } else {
            Interactions::from_rows(kept.into_iter().map(|(_, _, r, _)| r), n_items)
        }
        .map_err(anyhow::Error::msg)?;
        Ok(Sample { users, keys, rows })
    }
}

/// How a training sample treats a user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pick {
    /// Always in the sample (outside the `max_users` budget).
    Always,
    /// Never in it.
    Never,
    /// In it if the budget and the draw allow.
    Maybe,
}

/// Some users' histories: row r of `rows` is user `users[r]` (ascending), whose
/// [`user_key`] is `keys[r]`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sample {
    pub users: Vec<u32>,
    pub keys: Vec<u64>,
    pub rows: Interactions,
}

/// A user's key for life: a hash of their external id (the same in every store, whatever index
/// the store gave them), for choices that must not change with scan or arrival order, such as
/// who is a validation user.
pub fn user_key(id: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in id {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    crate::model::splitmix(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn click(u: &str, i: &str) -> Click {
        Click {
            user: u.into(),
            item: i.into(),
            timestamp_ms: None,
            weight: 1.0,
        }
    }

    /// `user_key` chooses validation users (and their held-out items) for life, in every
    /// store: changing it moves users between training and validation, so it is pinned.
    #[test]
    fn user_key_is_pinned() {
        for (id, key) in [
            ("alice", 0x1a04_6f57_3e1e_5475_u64),
            ("u1", 0xb85a_5b3a_387e_549f),
            ("user-42", 0xe28b_a372_823d_e243),
            ("", 0xc381_7c01_6ba4_ff30),
        ] {
            assert_eq!(user_key(id.as_bytes()), key, "{id:?}");
        }
    }

    #[test]
    fn a_damaged_user_record_is_moved_aside_and_its_user_starts_again() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), 10).unwrap();
        s.apply(&[click("a", "i1"), click("b", "i2")], &[off(0, 2)])
            .unwrap();
        s.tree.insert(key(b'U', b"a"), &b"\xff\xfe"[..]).unwrap();
        let applied = s
            .apply(&[click("a", "i3"), click("b", "i1")], &[off(0, 4)])
            .unwrap();
        assert_eq!(applied.quarantined, 1);
        assert!(s.tree.get(key(b'Q', b"a")).unwrap().is_some(), "kept aside");
        let a = s.user_index("a").unwrap().expect("a stored again");
        let i3 = s.item_index("i3").unwrap().unwrap();
        assert_eq!(s.history(a).unwrap(), vec![i3]);
        assert_eq!(s.stored_offset("clicks", 0).unwrap(), Some(4));
    }

    #[test]
    fn a_batch_past_the_index_limit_is_refused_whole() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path(), 10).unwrap();
        s.index_limit = 3;
        s.apply(
            &[click("a", "i1"), click("b", "i2"), click("c", "i3")],
            &[off(0, 3)],
        )
        .unwrap();
        let e = s
            .apply(&[click("a", "i2"), click("d", "i1")], &[off(0, 5)])
            .unwrap_err();
        assert!(
            e.downcast_ref::<StoreFull>()
                .is_some_and(|f| f.what == "users"),
            "{e:#}"
        );
        let e = s.apply(&[click("a", "i9")], &[off(0, 6)]).unwrap_err();
        assert!(
            e.downcast_ref::<StoreFull>()
                .is_some_and(|f| f.what == "items"),
            "{e:#}"
        );
        assert_eq!(
            s.stored_offset("clicks", 0).unwrap(),
            Some(3),
            "nothing of them stored"
        );
        assert!((s.index_capacity_used() - 1.0).abs() < 1e-9);
    }

    pub(super) fn off(p: i32, o: i64) -> PartitionOffset {
        PartitionOffset {
            topic: "clicks".into(),
            partition: p,
            next_offset: o,
        }
    }

    fn forget(u: &str) -> Change {
        Change::Forget(u.into())
    }

    /// Every key of the store that names `user` (by id or by index).
    fn records_naming(s: &Store, user: &str, idx: u32) -> Vec<Vec<u8>> {
        s.tree
            .iter()
            .keys()
            .map(|k| k.unwrap().to_vec())
            .filter(|k| {
                k.windows(user.len()).any(|w| w == user.as_bytes())
                    || (k[0] == b'u' && k[1..] == idx.to_be_bytes())
            })
            .collect()
    }

    #[test]
    fn a_forgotten_user_leaves_no_record_and_starts_fresh_when_clicking_again() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), 10).unwrap();
        s.apply(
            &[
                click("alice", "i1"),
                click("alice", "i2"),
                click("bob", "i1"),
            ],
            &[off(0, 3)],
        )
        .unwrap();
        let alice = s.user_index("alice").unwrap().unwrap();
        let i1 = s.item_index("i1").unwrap().unwrap();
        let a = s
            .apply_changes(&[forget("alice"), forget("nobody")], &[off(0, 5)], 2)
            .unwrap();
        assert_eq!(
            a.forgotten,
            vec![
                Forgotten {
                    user: "alice".into(),
                    index: Some(alice)
                },
                Forgotten {
                    user: "nobody".into(),
                    index: None
                }
            ]
        );
        assert!(a.changed_users.is_empty());
        assert_eq!(s.user_index("alice").unwrap(), None);
        assert_eq!(s.history_ids("alice").unwrap(), None);
        assert_eq!(s.user_id(alice).unwrap(), None);
        // her recommendation waits to be withdrawn (across a reopen), then nothing names her
        drop(s);
        let s = Store::open(dir.path(), 10).unwrap();
        let pending = s.withdrawals_pending().unwrap();
        assert_eq!(
            pending.iter().map(|f| f.user.as_str()).collect::<Vec<_>>(),
            ["alice", "nobody"]
        );
        assert_eq!(records_naming(&s, "alice", alice).len(), 1);
        s.withdrawn(&["alice".into(), "nobody".into()]).unwrap();
        assert!(records_naming(&s, "alice", alice).is_empty());
        assert_eq!(
            s.counts(),
            StoreCounts {
                users: 1,
                items: 2,
                interactions: 1
            }
        );
        // popularity no longer counts her: i1 held by bob alone, i2 by nobody
        assert_eq!(s.popularity_counts(), vec![1, 0]);
        assert_eq!(s.popular(1, &[])[0].0, i1);
        // a training round never sees her
        let snap = s.snapshot().unwrap();
        assert_eq!(snap.users, vec![s.user_index("bob").unwrap().unwrap()]);
        assert_eq!(s.stored_offset("clicks", 0).unwrap(), Some(5));
        // she clicks again: a new history, from nothing
        s.apply(&[click("alice", "i3")], &[off(0, 6)]).unwrap();
        assert_eq!(s.history_ids("alice").unwrap().unwrap(), vec!["i3"]);
        // and all of it survives a reopen
        drop(s);
        let s = Store::open(dir.path(), 10).unwrap();
        assert_eq!(s.history_ids("alice").unwrap().unwrap(), vec!["i3"]);
        assert_eq!(s.counts().users, 2);
        assert_eq!(s.counts().interactions, 2);
    }

    fn weighted(u: &str, i: &str, w: f32) -> Change {
        Change::Click(Click {
            weight: w,
            ..click(u, i)
        })
    }

    #[test]
    fn weights_keep_their_largest_and_a_negative_excludes_until_a_later_positive() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), 10).unwrap();
        let neg = |u: &str, i: &str| Change::Negative(click(u, i));
        let a = s
            .apply_changes(
                &[
                    weighted("ann", "x", 0.5),
                    weighted("ann", "x", 3.0),
                    weighted("ann", "x", 1.0),
                    weighted("ann", "y", 2.0),
                    weighted("bob", "y", 1.0),
                    neg("ann", "y"),
                    neg("ann", "y"),
                    neg("ann", "z"),
                ],
                &[off(0, 8)],
                8,
            )
            .unwrap();
        assert_eq!((a.excluded, a.duplicates), (2, 2), "{a:?}");
        let ann = s.user_index("ann").unwrap().unwrap();
        let index: HashMap<&str, u32> = ["x", "y", "z"]
            .into_iter()
            .map(|i| (i, s.item_index(i).unwrap().unwrap()))
            .collect();
        let idx = |i: &str| index[i];
        let h = s.user(ann).unwrap().unwrap().1;
        assert_eq!(h.items, vec![idx("x")]);
        assert_eq!(h.weights, vec![3.0]);
        assert_eq!(h.excluded, vec![idx("y"), idx("z")]);
        // y's count lost ann; x, y held once each
        assert_eq!(s.counts().interactions, 2);
        assert_eq!(s.popular(1, &[]), vec![(idx("x"), 1.0)]);
        // a later positive event lifts the exclusion; all of it survives a reopen
        s.apply_changes(&[weighted("ann", "z", 2.0)], &[off(0, 9)], 1)
            .unwrap();
        s.flush().unwrap();
        drop(s);
        let s = Store::open(dir.path(), 10).unwrap();
        let h = s.user(ann).unwrap().unwrap().1;
        assert_eq!(h.items, vec![idx("x"), idx("z")]);
        assert_eq!(h.weights, vec![3.0, 2.0]);
        assert_eq!(h.excluded, vec![idx("y")]);
        // a user with only an exclusion is kept; forgetting deletes exclusions too
        s.apply_changes(&[neg("cy", "x")], &[off(0, 10)], 1)
            .unwrap();
        let cy = s.user_index("cy").unwrap().unwrap();
        assert_eq!(s.user(cy).unwrap().unwrap().1.excluded, vec![idx("x")]);
        s.apply_changes(&[forget("cy")], &[off(0, 11)], 1).unwrap();
        assert_eq!(s.user_index("cy").unwrap(), None);
    }

    #[test]
    fn a_batch_applies_clicks_and_forgets_in_consumption_order() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), 10).unwrap();
        s.apply(&[click("a", "i1")], &[off(0, 1)]).unwrap();
        let a_idx = s.user_index("a").unwrap().unwrap();
        let changes = [
            Change::Click(click("a", "i2")),
            forget("a"),
            Change::Click(click("a", "i3")),
            Change::Click(click("b", "i1")),
            forget("b"),
        ];
        let applied = s.apply_changes(&changes, &[off(0, 6)], 5).unwrap();
        assert_eq!(s.history_ids("a").unwrap().unwrap(), vec!["i3"]);
        assert_eq!(applied.changed_users, vec![a_idx], "b is gone");
        // what the batch says it wrote is what a read gives back
        let mut written: Vec<_> = applied
            .written
            .iter()
            .map(|w| {
                (
                    w.user.clone(),
                    w.history.as_ref().map(|h| s.history_by_id(h)),
                )
            })
            .collect();
        written.sort_by(|x, y| x.0.cmp(&y.0));
        let read: Vec<_> = ["a", "b"]
            .iter()
            .map(|u| (u.to_string(), s.history_record(u).unwrap()))
            .collect();
        assert_eq!(written, read);
        assert!(written[1].1.is_none() && written[0].1.is_some());
        assert_eq!(s.user_index("b").unwrap(), None);
        assert_eq!(s.counts().users, 1);
        assert_eq!(s.counts().interactions, 1);
        assert_eq!(s.popularity_counts(), vec![0, 0, 1]);
        // one who clicked again is no longer waiting for a withdrawal
        let pending = s.withdrawals_pending().unwrap();
        assert_eq!(
            pending,
            vec![Forgotten {
                user: "b".into(),
                index: None
            }]
        );
        s.withdrawn(&["b".into()]).unwrap();
        // a damaged record is erased too
        s.tree.insert(key(b'U', b"carol"), &b"\xff"[..]).unwrap();
        s.apply_changes(&[forget("carol")], &[off(0, 7)], 1)
            .unwrap();
        s.withdrawn(&["carol".into()]).unwrap();
        assert!(records_naming(&s, "carol", u32::MAX).is_empty());
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
                |u, _, items| match u {
                    _ if u % 500 == 0 && !items.is_empty() => Pick::Always,
                    3 | 1998 => Pick::Never,
                    _ => Pick::Maybe,
                },
                seed,
                false,
            )
            .unwrap()
        };
        let a = take(1);
        assert_eq!(a.users.len(), 104, "4 always + 100 others");
        assert!(
            !a.users.contains(&3) && !a.users.contains(&1998),
            "never picked"
        );
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
