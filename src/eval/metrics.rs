//! Ranking metrics as the paper's code computes them: NDCG@k with binary relevance and
//! Recall@k = hits / min(k, |held-out|); users with no held-out items are skipped.

use serde::Serialize;

/// NDCG@k of a ranking against the sorted held-out items; `None` when there are none.
pub(crate) fn ndcg_at_k(ranked: &[u32], heldout: &[u32], k: usize) -> Option<f64> {
    if heldout.is_empty() {
        return None;
    }
    let dcg: f64 = ranked
        .iter()
        .take(k)
        .enumerate()
        .filter(|(_, i)| heldout.binary_search(i).is_ok())
        .map(|(r, _)| 1.0 / ((r + 2) as f64).log2())
        .sum();
    let idcg: f64 = (0..heldout.len().min(k))
        .map(|r| 1.0 / ((r + 2) as f64).log2())
        .sum();
    Some(dcg / idcg)
}

/// Recall@k = hits in the top k / min(k, |held-out|); `None` when there are no held-out items.
pub(crate) fn recall_at_k(ranked: &[u32], heldout: &[u32], k: usize) -> Option<f64> {
    if heldout.is_empty() {
        return None;
    }
    let hits = ranked
        .iter()
        .take(k)
        .filter(|i| heldout.binary_search(i).is_ok())
        .count();
    Some(hits as f64 / k.min(heldout.len()) as f64)
}

/// Mean and standard error (population std / √n, as vae_cf reports) over users.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub(crate) struct Summary {
    pub mean: f64,
    pub se: f64,
    pub n: usize,
}

impl Summary {
    pub fn of(values: &[f64]) -> Self {
        let n = values.len();
        if n == 0 {
            return Self::default();
        }
        let mean = values.iter().sum::<f64>() / n as f64;
        let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n as f64;
        Self {
            mean,
            se: var.sqrt() / (n as f64).sqrt(),
            n,
        }
    }
}

/// The paper's three figures over a set of users.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub(crate) struct RankingScores {
    pub ndcg100: Summary,
    pub recall20: Summary,
    pub recall50: Summary,
}

/// Scores rankings (top 100 or more, fold-in items already excluded) against held-out items.
pub(crate) fn score_rankings<'a>(
    rankings: impl IntoIterator<Item = (&'a [u32], &'a [u32])>,
) -> RankingScores {
    let (mut n, mut r20, mut r50) = (Vec::new(), Vec::new(), Vec::new());
    for (ranked, heldout) in rankings {
        if let Some(v) = ndcg_at_k(ranked, heldout, 100) {
            n.push(v);
            r20.push(recall_at_k(ranked, heldout, 20).unwrap_or(0.0));
            r50.push(recall_at_k(ranked, heldout, 50).unwrap_or(0.0));
        }
    }
    RankingScores {
        ndcg100: Summary::of(&n),
        recall20: Summary::of(&r20),
        recall50: Summary::of(&r50),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ndcg_by_hand() {
        // hits at ranks 1 and 3 of 3 held-out items
        let got = ndcg_at_k(&[5, 9, 7, 2], &[1, 5, 7], 100).unwrap();
        let dcg = 1.0 + 1.0 / 4f64.log2();
        let idcg = 1.0 + 1.0 / 3f64.log2() + 1.0 / 4f64.log2();
        assert!((got - dcg / idcg).abs() < 1e-12);
        // k cuts both the ranking and the ideal
        let got = ndcg_at_k(&[9, 5], &[1, 5, 7], 2).unwrap();
        assert!((got - (1.0 / 3f64.log2()) / (1.0 + 1.0 / 3f64.log2())).abs() < 1e-12);
        assert_eq!(ndcg_at_k(&[1, 2], &[1, 2], 100), Some(1.0));
        assert_eq!(ndcg_at_k(&[3], &[1], 100), Some(0.0));
    }

    #[test]
    fn recall_divides_by_min_of_k_and_heldout() {
        // 2 hits of 3 held-out in the top 20: 2/3
        assert_eq!(recall_at_k(&[1, 2, 9], &[1, 2, 3], 20), Some(2.0 / 3.0));
        // 50 held-out items, top 20 all hits: 20/min(20,50) = 1
        let heldout: Vec<u32> = (0..50).collect();
        let ranked: Vec<u32> = (0..20).collect();
        assert_eq!(recall_at_k(&ranked, &heldout, 20), Some(1.0));
        // only the first k count
        assert_eq!(recall_at_k(&[9, 1], &[1], 1), Some(0.0));
    }

    #[test]
    fn users_without_heldout_items_are_skipped() {
        assert_eq!(ndcg_at_k(&[1], &[], 100), None);
        let ranked: [&[u32]; 3] = [&[1, 2], &[3], &[4]];
        let heldout: [&[u32]; 3] = [&[1], &[], &[5]];
        let s = score_rankings(ranked.iter().copied().zip(heldout.iter().copied()));
        assert_eq!(s.ndcg100.n, 2);
        assert_eq!(s.ndcg100.mean, 0.5);
        assert_eq!(s.recall20.mean, 0.5);
        assert!((s.ndcg100.se - 0.5 / 2f64.sqrt()).abs() < 1e-12);
    }
}
