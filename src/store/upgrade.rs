//! Converting a store written by an earlier version (format 1 or 2) to the current format, in
//! place and resumably; a store from a newer version is refused. Kept apart so it can be deleted
//! once no older store is left.

use std::collections::BTreeMap;

use anyhow::Result;

use super::codec::*;

/// Brings a store written by an earlier version to the current format, in place. Each chunk
/// is one atomic batch and each format is written once its step is done, so a conversion
/// interrupted at any moment resumes where it stopped at the next open.
pub(super) fn upgrade(db: &sled::Db, tree: &sled::Tree) -> Result<()> {
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
    if format < 2 {
        to_format_2(tree)?;
        tree.insert(FORMAT, &2u64.to_be_bytes())?;
    }
    let users = to_format_3(tree)?;
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

/// Format 2 → 3: every user record gets a weight of 1 per item and no excluded items. Chunks
/// follow a cursor written with each (records of both layouts can be the same length, so a
/// record cannot say which it is).
fn to_format_3(tree: &sled::Tree) -> Result<usize> {
    const CHUNK: usize = 10_000;
    let after = |k: &[u8]| {
        let mut k = k.to_vec();
        k.push(0);
        k
    };
    let mut from = match tree.get(UPGRADE_CURSOR)? {
        Some(last) => after(&last),
        None => vec![b'U'],
    };
    let mut total = 0;
    loop {
        let mut batch = sled::Batch::default();
        let mut last = None;
        for kv in tree.range(from.clone()..).take(CHUNK) {
            let (k, v) = kv?;
            if k.first() != Some(&b'U') {
                break;
            }
            if let Some((idx, items)) = decode_user_v2(&v) {
                batch.insert(&k, encode_user(idx, &History::binary(items)));
                total += 1;
            }
            last = Some(k);
        }
        let Some(last) = last else {
            break;
        };
        batch.insert(UPGRADE_CURSOR, &last);
        tree.apply_batch(batch)?;
        from = after(&last);
    }
    tree.remove(UPGRADE_CURSOR)?;
    Ok(total)
}

/// Format 1 → 2: histories move into the user records; counts into blocks.
fn to_format_2(tree: &sled::Tree) -> Result<()> {
    drain_prefix(tree, b'h', |k, v, batch| {
        if let Ok(idx) = <[u8; 4]>::try_from(&k[1..]) {
            let idx = u32::from_be_bytes(idx);
            if let Some(id) = tree.get(idx_key(b'u', idx))? {
                let mut record = idx.to_be_bytes().to_vec();
                record.extend_from_slice(v);
                batch.insert(key(b'U', &id), record);
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::store::tests::{click, off};
    use crate::store::{History, Store, StoreCounts};

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
            assert_eq!(s.user(0).unwrap().unwrap().1, History::binary(vec![2, 0]));
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
        assert_eq!(
            s.user(2).unwrap(),
            Some(("carol".into(), History::binary(vec![1])))
        );
        assert_eq!(s.popular(3, &[]), vec![(0, 2.0), (2, 2.0), (1, 1.0)]);
        assert_eq!(s.counts().interactions, 5);
    }

    /// A store as the format-2 code wrote it: `users` with the items of each.
    fn write_format_2(dir: &Path, users: &[(&str, &[u32])]) -> sled::Db {
        let db = sled::Config::new().path(dir.join("store")).open().unwrap();
        let t = db.open_tree("interactions").unwrap();
        for (idx, (id, items)) in users.iter().enumerate() {
            let mut record = (idx as u32).to_be_bytes().to_vec();
            record.extend(encode_items(items));
            t.insert(key(b'U', id.as_bytes()), record).unwrap();
            t.insert(idx_key(b'u', idx as u32), id.as_bytes()).unwrap();
        }
        for (idx, id) in ["x", "y", "z"].iter().enumerate() {
            t.insert(idx_key(b'i', idx as u32), id.as_bytes()).unwrap();
        }
        t.insert(NEXT_USER, &(users.len() as u64).to_be_bytes())
            .unwrap();
        t.insert(NEXT_ITEM, &3u64.to_be_bytes()).unwrap();
        t.insert(FORMAT, &2u64.to_be_bytes()).unwrap();
        db.flush().unwrap();
        db
    }

    #[test]
    fn a_format_2_store_gets_weights_and_exclusions_even_when_interrupted() {
        let users: &[(&str, &[u32])] = &[("ann", &[0, 1]), ("ben", &[2]), ("cy", &[1, 2, 0])];
        let dir = tempfile::tempdir().unwrap();
        {
            // a conversion that stopped after its first chunk (ann): ann is in format 3 with
            // the cursor on her; ben and cy are still in format 2
            let db = write_format_2(dir.path(), users);
            let t = db.open_tree("interactions").unwrap();
            t.insert(
                key(b'U', b"ann"),
                encode_user(0, &History::binary(vec![0, 1])),
            )
            .unwrap();
            t.insert(UPGRADE_CURSOR, key(b'U', b"ann")).unwrap();
            db.flush().unwrap();
        }
        let s = Store::open(dir.path(), 10).unwrap();
        for (idx, (_, items)) in users.iter().enumerate() {
            let (_, h) = s.user(idx as u32).unwrap().unwrap();
            assert_eq!(h, History::binary(items.to_vec()), "user {idx}");
        }
        assert_eq!(read_u64(s.tree.get(FORMAT).unwrap()), CURRENT_FORMAT);
        assert!(s.tree.get(UPGRADE_CURSOR).unwrap().is_none());
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
}
