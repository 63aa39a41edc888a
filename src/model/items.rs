//! `ItemTable`: what a model's columns are — the external item id of each column, and how many
//! users held it when the model was trained (the popularity ranking for users the model cannot
//! score). A fleet's trainer assigns the columns and ships the table with every model version,
//! so a serving replica, whose own store numbers items in the order it met them, maps its users'
//! items through it. Written as one `id<TAB>count` line per column (ids hold no control
//! characters).

use std::collections::HashMap;
use std::sync::Arc;

/// The item ids of a model's columns, in column order, with their popularity.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ItemTable {
    ids: Vec<Arc<str>>,
    index: HashMap<Arc<str>, u32>,
    counts: Vec<u32>,
}

/// A fingerprint of an ordered list of item ids (FNV-1a, 64 bits, hex): equal lists, equal
/// fingerprints; a model is never used with a catalogue of another fingerprint.
pub fn fingerprint<'a>(ids: impl IntoIterator<Item = &'a str>) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for id in ids {
        for &b in id.as_bytes().iter().chain(&[0xff]) {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

impl ItemTable {
    /// Columns.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The item id of a column.
    pub fn id(&self, column: u32) -> Option<&Arc<str>> {
        self.ids.get(column as usize)
    }

    /// The column of an item id.
    pub fn column(&self, id: &str) -> Option<u32> {
        self.index.get(id).copied()
    }

    /// The same items with every id (and its count) moved half the table along: each column
    /// names another item. Only fault injection wants this (a bad version that passes every
    /// offline gate).
    pub fn rotated(&self) -> ItemTable {
        let half = self.ids.len() / 2;
        let mut t = ItemTable::default();
        let mut counts = Vec::with_capacity(self.counts.len());
        for c in 0..self.ids.len() {
            let from = (c + half) % self.ids.len();
            t.column_or_push(self.ids[from].clone());
            counts.push(self.counts.get(from).copied().unwrap_or(0));
        }
        t.set_counts(counts);
        t
    }

    /// The column of `id`, appended as a new one (count 0) when the table has none.
    pub fn column_or_push(&mut self, id: Arc<str>) -> u32 {
        if let Some(&c) = self.index.get(&id) {
            return c;
        }
        let c = self.ids.len() as u32;
        self.index.insert(id.clone(), c);
        self.ids.push(id);
        self.counts.push(0);
        c
    }

    /// How many users held each column's item (by column).
    pub fn counts(&self) -> &[u32] {
        &self.counts
    }

    /// Sets the popularity counts (by column; missing ones are 0, extra ones dropped).
    pub fn set_counts(&mut self, mut counts: Vec<u32>) {
        counts.resize(self.ids.len(), 0);
        self.counts = counts;
    }

    /// The ids, in column order.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.ids.iter().map(|s| &**s)
    }

    /// The fingerprint of the ids (see [`fingerprint`]).
    pub fn fingerprint(&self) -> String {
        fingerprint(self.ids())
    }

    /// One `id<TAB>count` line per column.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.ids.len() * 16);
        for (id, count) in self.ids.iter().zip(&self.counts) {
            out.extend_from_slice(id.as_bytes());
            out.push(b'\t');
            out.extend_from_slice(count.to_string().as_bytes());
            out.push(b'\n');
        }
        out
    }

    /// Reads what [`ItemTable::encode`] wrote; an error names the first bad line.
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let text = std::str::from_utf8(bytes).map_err(|e| format!("item table: not UTF-8: {e}"))?;
        let mut table = Self::default();
        for (n, line) in text.lines().enumerate() {
            let (id, count) = line
                .rsplit_once('\t')
                .ok_or_else(|| format!("item table line {}: no tab", n + 1))?;
            let count: u32 = count
                .parse()
                .map_err(|_| format!("item table line {}: count {count:?}", n + 1))?;
            if id.is_empty() || table.index.contains_key(id) {
                return Err(format!(
                    "item table line {}: empty or repeated id {id:?}",
                    n + 1
                ));
            }
            table.column_or_push(Arc::from(id));
            if let Some(c) = table.counts.last_mut() {
                *c = count;
            }
        }
        Ok(table)
    }

    /// A table of `ids` (in column order) with zero counts.
    pub fn from_ids<S: AsRef<str>>(ids: impl IntoIterator<Item = S>) -> Self {
        let mut t = Self::default();
        for id in ids {
            t.column_or_push(Arc::from(id.as_ref()));
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_round_trips_and_refuses_damage() {
        let mut t = ItemTable::from_ids(["a", "b b", "ç"]);
        t.set_counts(vec![3, 0, 7]);
        assert_eq!(t.column_or_push(Arc::from("b b")), 1);
        let back = ItemTable::decode(&t.encode()).unwrap();
        assert_eq!(back, t);
        assert_eq!(back.column("ç"), Some(2));
        assert_eq!(back.counts(), &[3, 0, 7]);
        assert_eq!(back.fingerprint(), fingerprint(["a", "b b", "ç"]));
        assert!(ItemTable::decode(b"a\t1\na\t2\n")
            .unwrap_err()
            .contains("repeated"));
        assert!(ItemTable::decode(b"a 1\n").unwrap_err().contains("no tab"));
        assert!(ItemTable::decode(b"a\tx\n").unwrap_err().contains("count"));
    }
}
