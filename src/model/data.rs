//! `Interactions`: a user × item matrix in CSR layout (sorted, de-duplicated rows), binary or
//! with a weight per stored item, the input every training, scoring and evaluation routine reads.

/// A user × item matrix: row `u` holds the sorted, distinct item indices of user `u`, and, in a
/// weighted matrix, the weight of each.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Interactions {
    indptr: Vec<usize>,
    indices: Vec<u32>,
    values: Option<Vec<f32>>,
    n_items: usize,
}

impl Interactions {
    /// An empty matrix with no rows over a catalogue of `n_items`.
    pub fn new(n_items: usize) -> Self {
        Self {
            indptr: vec![0],
            indices: Vec::new(),
            values: None,
            n_items,
        }
    }

    /// An empty weighted matrix.
    pub fn new_weighted(n_items: usize) -> Self {
        Self {
            values: Some(Vec::new()),
            ..Self::new(n_items)
        }
    }

    /// A weighted matrix from one (items, weights) pair per user; an item given twice keeps its
    /// largest weight.
    pub fn from_weighted_rows<R>(rows: R, n_items: usize) -> Result<Self, String>
    where
        R: IntoIterator<Item = (Vec<u32>, Vec<f32>)>,
    {
        let mut m = Self::new_weighted(n_items);
        for (items, weights) in rows {
            m.push_weighted_row(&items, &weights)?;
        }
        Ok(m)
    }

    /// Appends one user's weighted items (sorted and de-duplicated here). On a binary matrix
    /// the weights are dropped.
    pub(crate) fn push_weighted_row(
        &mut self,
        items: &[u32],
        weights: &[f32],
    ) -> Result<(), String> {
        if items.len() != weights.len() {
            return Err(format!(
                "{} items with {} weights",
                items.len(),
                weights.len()
            ));
        }
        let Some(values) = self.values.as_mut() else {
            return self.push_row(items.iter().copied());
        };
        let mut pairs: Vec<(u32, f32)> =
            items.iter().copied().zip(weights.iter().copied()).collect();
        pairs.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(b.1.total_cmp(&a.1)));
        pairs.dedup_by_key(|p| p.0);
        if let Some(&(last, _)) = pairs.last() {
            if last as usize >= self.n_items {
                return Err(format!(
                    "item index {last} out of range for {} items",
                    self.n_items
                ));
            }
        }
        self.indices.extend(pairs.iter().map(|p| p.0));
        values.extend(pairs.iter().map(|p| p.1));
        self.indptr.push(self.indices.len());
        Ok(())
    }

    /// An empty matrix of `n_items`, weighted when this one is.
    pub fn like(&self, n_items: usize) -> Self {
        Self {
            values: self.values.as_ref().map(|_| Vec::new()),
            ..Self::new(n_items)
        }
    }

    /// User `u`'s (item, weight) pairs (weight 1 in a binary matrix).
    pub fn pairs(&self, u: usize) -> impl Iterator<Item = (u32, f32)> + '_ {
        let w = self.weights(u);
        self.row(u)
            .iter()
            .enumerate()
            .map(move |(j, &i)| (i, w.map_or(1.0, |w| w[j])))
    }

    /// Appends one user's (item, weight) pairs.
    pub fn push_pairs(
        &mut self,
        pairs: impl IntoIterator<Item = (u32, f32)>,
    ) -> Result<(), String> {
        let (items, weights): (Vec<u32>, Vec<f32>) = pairs.into_iter().unzip();
        self.push_weighted_row(&items, &weights)
    }

    /// This matrix over `n_items` columns, each item moved to `column(item)` (left out where
    /// that is `None`), weights kept.
    pub fn map_items(
        &self,
        n_items: usize,
        column: impl Fn(u32) -> Option<u32>,
    ) -> Result<Self, String> {
        let mut m = self.like(n_items);
        for u in 0..self.n_users() {
            m.push_pairs(self.pairs(u).filter_map(|(i, w)| column(i).map(|c| (c, w))))?;
        }
        Ok(m)
    }

    /// The weights of every row, for a model that reads them (`None`: binary rows).
    pub fn all_weights(&self) -> Option<Vec<&[f32]>> {
        self.values.as_ref()?;
        (0..self.n_users()).map(|u| self.weights(u)).collect()
    }

    /// The weights of user `u`'s items (in [`Interactions::row`]'s order); `None` for a binary
    /// matrix.
    pub fn weights(&self, u: usize) -> Option<&[f32]> {
        self.values
            .as_ref()
            .map(|v| &v[self.indptr[u]..self.indptr[u + 1]])
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
        if let Some(values) = self.values.as_mut() {
            values.resize(self.indices.len(), 1.0);
        }
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
    fn weighted_rows_keep_their_weights_sorted_with_the_items() {
        let m = Interactions::from_weighted_rows(
            vec![(vec![3, 1, 3], vec![0.5, 2.0, 3.0]), (vec![], vec![])],
            4,
        )
        .unwrap();
        assert_eq!(m.row(0), &[1, 3]);
        assert_eq!(m.weights(0), Some(&[2.0, 3.0][..]));
        assert_eq!(m.weights(1), Some(&[][..]));
        assert_eq!(
            Interactions::from_rows(vec![vec![1]], 2)
                .unwrap()
                .weights(0),
            None
        );
    }

    #[test]
    fn out_of_range_item_is_an_error() {
        assert!(Interactions::from_rows(vec![vec![5]], 4).is_err());
        assert!(Interactions::from_pairs(&[(3, 0)], 2, 4).is_err());
    }
}
