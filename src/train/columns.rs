//! Which model column an item of the store is. A model trained where it serves (role `all`)
//! uses the store's own item indices. A fleet's trainer (role `train`) owns the fleet's item
//! table instead: its store numbers items in the order the changelog brought them, which differs
//! between an active trainer and its standby, so the columns are the table's — carried over from
//! the version it continues, a new item appended as a new column — and the table ships with
//! every version.

use std::sync::Arc;

use anyhow::Result;

use crate::model::ItemTable;
use crate::store::{Sample, Store};

pub(crate) enum Columns {
    /// Column i is store item i.
    Store,
    /// The fleet's item table, and the column of each store item mapped so far.
    Table {
        table: ItemTable,
        from_store: Vec<u32>,
    },
}

impl Columns {
    /// A fleet trainer's columns, continuing `table`.
    pub fn table(table: ItemTable) -> Self {
        Self::Table {
            table,
            from_store: Vec::new(),
        }
    }

    /// Maps a sample's rows (store items) to columns, giving the store's items met since the
    /// last call columns of their own; returns the column count.
    pub fn map_sample(&mut self, store: &Store, sample: &mut Sample) -> Result<usize> {
        let Self::Table { table, from_store } = self else {
            return Ok(sample.rows.n_items());
        };
        let n_store = store.counts().items as usize;
        for i in from_store.len()..n_store {
            let id = store.item_id(i as u32).unwrap_or_default();
            from_store.push(table.column_or_push(Arc::from(id)));
        }
        let n = table.len();
        sample.rows = sample
            .rows
            .map_items(n, |i| from_store.get(i as usize).copied())
            .map_err(anyhow::Error::msg)?;
        Ok(n)
    }

    /// The hash of each of the first `n_items` columns' item id ([`crate::store::user_key`] of
    /// its bytes): a validation user's held-out items are chosen by it, so they are the same
    /// whatever index a store gave the item.
    pub fn item_keys(&self, store: &Store, n_items: usize) -> Vec<u64> {
        let key = |id: &str| crate::store::user_key(id.as_bytes());
        match self {
            Self::Store => (0..n_items as u32)
                .map(|i| key(&store.item_id(i).unwrap_or_default()))
                .collect(),
            Self::Table { table, .. } => table.ids().take(n_items).map(key).collect(),
        }
    }

    /// The item table to ship with a model of `n_items` columns, each with how many users
    /// hold it in the store now; `None` for role `all` (the columns are the store's).
    pub fn shipped(&self, store: &Store, n_items: usize) -> Option<ItemTable> {
        let Self::Table { table, from_store } = self else {
            return None;
        };
        let mut counts = vec![0u32; table.len()];
        for (i, c) in store.popularity_counts().into_iter().enumerate() {
            if let Some(&col) = from_store.get(i) {
                counts[col as usize] = c;
            }
        }
        let mut t = table.clone();
        t.set_counts(counts);
        debug_assert_eq!(t.len(), n_items);
        Some(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Click, PartitionOffset};

    #[test]
    fn a_fleet_trainer_keeps_the_shipped_columns_and_appends_new_items() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 10).unwrap();
        // this store met "c" first; the shipped table says a, b, c
        let click = |u: &str, i: &str| Click {
            user: u.into(),
            item: i.into(),
            timestamp_ms: None,
            weight: 1.0,
        };
        let offset = [PartitionOffset {
            topic: "t".into(),
            partition: 0,
            next_offset: 1,
        }];
        store
            .apply(
                &[click("u1", "c"), click("u1", "a"), click("u2", "d")],
                &offset,
            )
            .unwrap();
        let mut cols = Columns::table(ItemTable::from_ids(["a", "b", "c"]));
        let mut sample = store
            .sample(
                10,
                &Default::default(),
                |_, _, _| crate::store::Pick::Maybe,
                1,
                false,
            )
            .unwrap();
        assert_eq!(cols.map_sample(&store, &mut sample).unwrap(), 4);
        let u1 = sample
            .users
            .iter()
            .position(|&u| u == store.user_index("u1").unwrap().unwrap())
            .unwrap();
        let mut row = sample.rows.row(u1).to_vec();
        row.sort_unstable();
        assert_eq!(row, vec![0, 2], "a and c keep their columns");
        let shipped = cols.shipped(&store, 4).unwrap();
        assert_eq!(shipped.ids().collect::<Vec<_>>(), ["a", "b", "c", "d"]);
        assert_eq!(shipped.counts(), &[1, 0, 1, 1]);
    }
}
