//! Top-K selection over one row of scores: a single pass with a bounded candidate buffer and
//! partial selection (never a full sort of the catalogue), skipping items the user already has.

/// Best first: higher score, then lower item index (a deterministic order for ties): the order
/// [`TopK`]'s keys keep, and the tests' reference.
#[cfg(test)]
pub(crate) fn better(a: &(u32, f32), b: &(u32, f32)) -> std::cmp::Ordering {
    b.1.partial_cmp(&a.1)
        .unwrap_or(std::cmp::Ordering::Equal)
        .then(a.0.cmp(&b.0))
}

/// The best `k` of `v`, best first.
pub(crate) fn best_k(v: Vec<(u32, f32)>, k: usize) -> Vec<(u32, f32)> {
    let mut top = TopK::new(k);
    for (item, score) in v {
        top.push(item, score);
    }
    top.finish()
}

/// The best `k` of a stream of (item, score): a bounded candidate buffer cut back to the best
/// `k` by partial selection whenever it fills (never a sort of the whole stream). A score below
/// [`TopK::bar`] can no longer enter, so callers skip it before pushing. Entries are kept as
/// integer keys ordered as `better` orders pairs, so the selection compares plain integers.
pub(crate) struct TopK {
    k: usize,
    buf: Vec<u64>,
    bar: f32,
}

/// A key that sorts ascending as `better` orders (item, score): the score's bits made
/// monotonic and inverted above, the item below (finite scores; the callers skip the others).
fn key(item: u32, score: f32) -> u64 {
    // −0 + 0 is +0: the two zeros are one score, as `better` has them
    let bits = (score + 0.0).to_bits();
    let monotonic = if bits >> 31 == 1 {
        !bits
    } else {
        bits | 1 << 31
    };
    (u64::from(!monotonic) << 32) | u64::from(item)
}

/// The (item, score) of a [`key`].
fn unkey(key: u64) -> (u32, f32) {
    let monotonic = !((key >> 32) as u32);
    let bits = if monotonic >> 31 == 1 {
        monotonic & !(1 << 31)
    } else {
        !monotonic
    };
    (key as u32, f32::from_bits(bits))
}

impl TopK {
    pub(crate) fn new(k: usize) -> Self {
        Self {
            k,
            buf: Vec::with_capacity(Self::cap(k) + 1),
            bar: f32::NEG_INFINITY,
        }
    }

    fn cap(k: usize) -> usize {
        2 * k + 64
    }

    /// The lowest score that may still enter.
    pub(crate) fn bar(&self) -> f32 {
        self.bar
    }

    pub(crate) fn push(&mut self, item: u32, score: f32) {
        if self.k == 0 {
            return;
        }
        self.buf.push(key(item, score));
        if self.buf.len() >= Self::cap(self.k) {
            self.cut();
            // an equal score arriving later has a higher index and loses the tie, but keeping
            // it is harmless: the final selection orders it correctly
            self.bar = unkey(self.buf[self.k - 1]).1;
        }
    }

    /// Cuts the buffer to its best `k`, the `k`-th best last.
    fn cut(&mut self) {
        let k = self.k;
        if self.buf.len() > k && k > 0 {
            self.buf.select_nth_unstable(k - 1);
        }
        self.buf.truncate(k);
    }

    /// The best `k` pushed, best first.
    pub(crate) fn finish(mut self) -> Vec<(u32, f32)> {
        self.cut();
        self.buf.sort_unstable();
        self.buf.into_iter().map(unkey).collect()
    }

    /// The best `k` pushed, in no particular order (for a caller that orders them again).
    pub(crate) fn finish_unordered(mut self) -> Vec<(u32, f32)> {
        self.cut();
        self.buf.into_iter().map(unkey).collect()
    }
}

/// The `k` best items of `scores` (plus `bias`, when given), best first, excluding the items in
/// `seen` (sorted ascending) and any non-finite score.
pub(crate) fn top_k_unseen(
    scores: &[f32],
    bias: Option<&[f32]>,
    seen: &[u32],
    k: usize,
) -> Vec<(u32, f32)> {
    let mut top = TopK::new(k.min(scores.len()));
    let mut seen_iter = seen.iter().copied().peekable();
    for (i, &s) in scores.iter().enumerate() {
        let s = match bias {
            Some(b) => s + b[i],
            None => s,
        };
        if s < top.bar() || !s.is_finite() {
            continue;
        }
        let i = i as u32;
        while seen_iter.peek().is_some_and(|&x| x < i) {
            seen_iter.next();
        }
        if seen_iter.peek() == Some(&i) {
            continue;
        }
        top.push(i, s);
    }
    top.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn brute(scores: &[f32], seen: &[u32], k: usize) -> Vec<(u32, f32)> {
        let mut all: Vec<(u32, f32)> = scores
            .iter()
            .enumerate()
            .filter(|(i, s)| !seen.contains(&(*i as u32)) && s.is_finite())
            .map(|(i, &s)| (i as u32, s))
            .collect();
        all.sort_by(better);
        all.truncate(k);
        all
    }

    #[test]
    fn matches_a_full_sort_and_never_returns_seen_items() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for trial in 0..200 {
            let n = rng.gen_range(1..3000);
            // few distinct values so ties are common
            let levels = if trial % 2 == 0 { 5 } else { 100_000 };
            let scores: Vec<f32> = (0..n).map(|_| rng.gen_range(0..levels) as f32).collect();
            let mut seen: Vec<u32> = (0..n as u32).filter(|_| rng.gen_bool(0.3)).collect();
            seen.dedup();
            let k = rng.gen_range(1..150);
            let got = top_k_unseen(&scores, None, &seen, k);
            assert_eq!(got, brute(&scores, &seen, k));
            assert!(got.iter().all(|(i, _)| seen.binary_search(i).is_err()));
        }
    }

    #[test]
    fn keys_order_as_better_does_and_give_back_their_pair() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let mut pairs: Vec<(u32, f32)> = (0..2000)
            .map(|_| (rng.gen_range(0..50), rng.gen_range(-3..3) as f32 * 0.5))
            .collect();
        pairs.extend([
            (1, 0.0),
            (2, -0.0),
            (3, f32::MAX),
            (4, -f32::MAX),
            (5, 1e-40),
        ]);
        for &(i, s) in &pairs {
            assert_eq!(unkey(key(i, s)), (i, s));
        }
        let mut by_pair = pairs.clone();
        by_pair.sort_by(better);
        let mut by_key = pairs;
        by_key.sort_by_key(|&(i, s)| key(i, s));
        assert_eq!(by_pair, by_key);
    }

    #[test]
    fn bias_is_added_and_nan_skipped() {
        let scores = [1.0, f32::NAN, 0.5, 3.0];
        let bias = [0.0, 0.0, 10.0, 0.0];
        let got = top_k_unseen(&scores, Some(&bias), &[3], 3);
        assert_eq!(got, vec![(2, 10.5), (0, 1.0)]);
    }
}
