//! The re-scoring budget: a token bucket filled at `serve.max_rescores_per_second`, so the
//! re-scorings after a model swap take a bounded share of the cores and never starve the
//! consumption of fresh clicks (which would delay them in the broker, out of the scorer's sight).

use std::time::{Duration, Instant};

pub(super) struct RescoreBudget {
    per_second: f64,
    tokens: f64,
    at: Instant,
}

impl RescoreBudget {
    pub fn new(per_second: u32, now: Instant) -> Self {
        let per_second = f64::from(per_second.max(1));
        Self {
            per_second,
            tokens: per_second,
            at: now,
        }
    }

    /// A batch of re-scorings alone is worth its overhead from this many users (a tenth of a
    /// second's budget), so batches without clicks come at most ~10 times a second.
    fn chunk(&self) -> f64 {
        (self.per_second / 10.0).max(1.0)
    }

    fn refill(&mut self, now: Instant) {
        let earned = now.duration_since(self.at).as_secs_f64() * self.per_second;
        // at most one second's worth saved up
        self.tokens = (self.tokens + earned).min(self.per_second);
        self.at = now;
    }

    /// Re-scorings the next batch may take: whatever is saved when it holds clicks too, and
    /// nothing below a chunk when it would hold re-scorings alone.
    pub fn available(&mut self, now: Instant, clicks_waiting: bool) -> usize {
        self.refill(now);
        if !clicks_waiting && self.tokens < self.chunk() {
            return 0;
        }
        self.tokens.max(0.0).floor() as usize
    }

    pub fn spend(&mut self, n: usize) {
        self.tokens -= n as f64;
    }

    /// How long until a batch of re-scorings alone may start.
    pub fn until_chunk(&mut self, now: Instant) -> Duration {
        self.refill(now);
        let short = (self.chunk() - self.tokens).max(0.0);
        Duration::from_secs_f64(short / self.per_second).max(Duration::from_millis(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn re_scorings_are_held_to_the_rate() {
        let t = Instant::now();
        let mut b = RescoreBudget::new(100, t);
        // a second's worth at the start, then nothing until it refills
        assert_eq!(b.available(t, true), 100);
        b.spend(100);
        assert_eq!(b.available(t, true), 0);
        assert_eq!(b.available(t, false), 0);
        assert_eq!(b.until_chunk(t), 100 * MS);
        // 12 earned in 120 ms: enough for a batch of re-scorings alone (a chunk is 10)
        assert_eq!(b.available(t + 120 * MS, false), 12);
        b.spend(12);
        // 3 earned: a batch with clicks may take them, one of re-scorings alone waits
        assert_eq!(b.available(t + 150 * MS, false), 0);
        assert_eq!(b.available(t + 150 * MS, true), 3);
        assert_eq!(b.until_chunk(t + 150 * MS), 70 * MS);
    }

    #[test]
    fn savings_are_capped_at_one_second() {
        let t = Instant::now();
        let mut b = RescoreBudget::new(10, t);
        assert_eq!(b.available(t + 30_000 * MS, true), 10);
    }
}
