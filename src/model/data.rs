//! `Interactions`: a binary user × item matrix in CSR layout (sorted, de-duplicated rows), the
//! input every training, scoring and evaluation routine reads.

/// A binary user × item matrix: row `u` holds the sorted, distinct item indices of user `u`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Interactions {
    indptr: Vec<usize>,
    indices: Vec<u32>,
    n_items: usize,
}

impl Interactions {
    /// An empty matrix with no rows over a catalogue of `n_items`.
    pub fn new(n_items: usize) -> Self {
        Self {
            indptr: vec![0],
            indices: Vec::new(),
            n_items,
        }
    }

    /// Builds a matrix from one item list per user; items are sorted and de-duplicated.
    /// Items `>= n_items` are an error (they would index past the catalogue).
    pub fn from_rows<R, I>(rows: R, n_items: usize) -> Result<Self, String>
    where
        R: IntoIterator<Item = I>,
        I: IntoIterator<Item = u32>,
    {
        let mut m = Self::new(n_items);
        for row in rows {
            m.push_row(row)?;
        }
        Ok(m)
    }

    /// Appends one user's items (sorted and de-duplicated here).
    pub(crate) fn push_row<I: IntoIterator<Item = u32>>(&mut self, items: I) -> Result<(), String> {
        let start = self.indices.len();
        self.indices.extend(items);
        let row = &mut self.indices[start..];
        row.sort_unstable();
        if let Some(&last) = row.last() {
            if last as usize >= self.n_items {
                let n = self.n_items;
                self.indices.truncate(start);
                return Err(format!("item index {last} out of range for {n} items"));
            }
        }
        let mut w = start;
        for r in start..self.indices.len() {
            if r == start || self.indices[r] != self.indices[w - 1] {
                self.indices[w] = self.indices[r];
                w += 1;
            }
        }
        self.indices.truncate(w);
        self.indptr.push(self.indices.len());
        Ok(())
    }

    #[cfg(test)]
    /// Builds a matrix of `n_users` rows from (user, item) pairs.
    pub(crate) fn from_pairs(
        pairs: &[(u32, u32)],
        n_users: usize,
        n_items: usize,
    ) -> Result<Self, String> {
        let mut rows: Vec<Vec<u32>> = vec![Vec::new(); n_users];
        for &(u, i) in pairs {
            let row = rows
                .get_mut(u as usize)
                .ok_or_else(|| format!("user index {u} out of range for {n_users} users"))?;
            row.push(i);
        }
        Self::from_rows(rows, n_items)
    }

    /// Number of rows (users).
    pub fn n_users(&self) -> usize {
        self.indptr.len() - 1
    }

    /// Number of columns (catalogue size).
    pub fn n_items(&self) -> usize {
        self.n_items
    }

    /// Number of stored interactions.
    pub fn nnz(&self) -> usize {
        self.indices.len()
    }

    /// The sorted items of user `u`.
    pub fn row(&self, u: usize) -> &[u32] {
        &self.indices[self.indptr[u]..self.indptr[u + 1]]
    }

    /// Iterates over all rows in order.
    pub fn rows(&self) -> impl ExactSizeIterator<Item = &[u32]> + '_ {
        (0..self.n_users()).map(move |u| self.row(u))
    }

    /// Widens the catalogue (rows are unchanged); shrinking is not allowed.
    #[cfg(test)]
    pub(crate) fn set_n_items(&mut self, n_items: usize) {
        self.n_items = self.n_items.max(n_items);
    }

    /// How many users hold each item (the popularity baseline's score).
    pub(crate) fn item_counts(&self) -> Vec<u32> {
        let mut counts = vec![0u32; self.n_items];
        for &i in &self.indices {
            counts[i as usize] += 1;
        }
        counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_sorted_and_deduplicated() {
        let m = Interactions::from_rows(vec![vec![3, 1, 3, 2], vec![], vec![0]], 4).unwrap();
        assert_eq!(m.n_users(), 3);
        assert_eq!(m.row(0), &[1, 2, 3]);
        assert!(m.row(1).is_empty());
        assert_eq!(m.row(2), &[0]);
        assert_eq!(m.nnz(), 4);
        assert_eq!(m.item_counts(), vec![1, 1, 1, 1]);
    }

    #[test]
    fn out_of_range_item_is_an_error() {
        assert!(Interactions::from_rows(vec![vec![5]], 4).is_err());
        assert!(Interactions::from_pairs(&[(3, 0)], 2, 4).is_err());
    }
}
