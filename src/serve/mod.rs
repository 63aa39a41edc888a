//! Scoring and publishing. Users whose history changed wait in a bounded queue; every
//! `serve.interval_ms` the scorer takes up to `serve.batch_size` of them, scores them with the
//! live model (never an item the user has) and publishes one message per user to the
//! recommendations topic. Users the model cannot score yet get the most popular items, marked as
//! such. After a swap, users active within `serve.rescore_window` are re-scored.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use crate::daemon::Shared;
use crate::registry::LiveModel;
use crate::store::Store;

/// One recommended item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoredItem {
    pub item_id: String,
    pub score: f32,
}

/// The message published per user (and the HTTP API's answer).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Recommendation {
    pub user_id: String,
    pub items: Vec<ScoredItem>,
    /// The model version that scored it; `null` when no model is loaded yet.
    pub model_version: Option<u64>,
    /// Milliseconds since the epoch.
    pub generated_at: u64,
    /// "model", or "popular" when the model could not score this user.
    pub source: String,
}

struct DirtyInner {
    queue: VecDeque<u32>,
    pending: HashMap<u32, Instant>,
    recent: HashMap<u32, Instant>,
}

/// Users waiting to be scored (bounded; the oldest are dropped past `cap`), with the receipt
/// time of their earliest unscored click, and recently active users for re-scoring after a swap.
pub struct DirtyUsers {
    inner: Mutex<DirtyInner>,
    cap: usize,
}

impl DirtyUsers {
    pub fn new(cap: usize) -> Self {
        Self {
            inner: Mutex::new(DirtyInner {
                queue: VecDeque::new(),
                pending: HashMap::new(),
                recent: HashMap::new(),
            }),
            cap: cap.max(1),
        }
    }

    /// Marks users as changed at `received`; returns how many waiting users were dropped.
    pub fn mark(&self, users: &[u32], received: Instant) -> u64 {
        let Ok(mut g) = self.inner.lock() else {
            return 0;
        };
        let mut dropped = 0;
        for &u in users {
            g.recent.insert(u, received);
            if g.pending.contains_key(&u) {
                continue;
            }
            g.pending.insert(u, received);
            g.queue.push_back(u);
            while g.queue.len() > self.cap {
                if let Some(old) = g.queue.pop_front() {
                    g.pending.remove(&old);
                    dropped += 1;
                }
            }
        }
        if g.recent.len() > self.cap {
            // forget the least recently active, down to 3/4 of the bound (amortised)
            let keep = (self.cap * 3 / 4).max(1);
            let mut v: Vec<(Instant, u32)> = g.recent.iter().map(|(u, t)| (*t, *u)).collect();
            v.sort_unstable_by(|a, b| b.cmp(a));
            v.truncate(keep);
            g.recent = v.into_iter().map(|(t, u)| (u, t)).collect();
        }
        dropped
    }

    /// Takes up to `n` waiting users, oldest first.
    pub fn take(&self, n: usize) -> Vec<(u32, Instant)> {
        let Ok(mut g) = self.inner.lock() else {
            return Vec::new();
        };
        let n = n.min(g.queue.len());
        let users: Vec<u32> = g.queue.drain(..n).collect();
        users
            .into_iter()
            .filter_map(|u| g.pending.remove(&u).map(|t| (u, t)))
            .collect()
    }

    /// Queues every user active within `window` again (after a model swap); returns how many.
    pub fn requeue_recent(&self, window: Duration) -> usize {
        let now = Instant::now();
        let recent: Vec<u32> = match self.inner.lock() {
            Ok(mut g) => {
                g.recent.retain(|_, t| now.duration_since(*t) <= window);
                g.recent.keys().copied().collect()
            }
            Err(_) => return 0,
        };
        self.mark(&recent, now);
        recent.len()
    }

    /// Users waiting.
    pub fn len(&self) -> usize {
        self.inner.lock().map(|g| g.queue.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The most recent click-to-recommendation latencies (seconds), bounded, for exact quantiles in
/// summaries (the histogram metric has bucket resolution only).
pub struct LatencySamples {
    samples: Mutex<VecDeque<f64>>,
    cap: usize,
    count: std::sync::atomic::AtomicU64,
}

impl LatencySamples {
    pub fn new(cap: usize) -> Self {
        Self {
            samples: Mutex::new(VecDeque::new()),
            cap: cap.max(1),
            count: std::sync::atomic::AtomicU64::new(0),
        }
    }

    pub fn record(&self, seconds: f64) {
        self.count
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Ok(mut s) = self.samples.lock() {
            if s.len() == self.cap {
                s.pop_front();
            }
            s.push_back(seconds);
        }
    }

    /// Recommendations delivered so far.
    pub fn count(&self) -> u64 {
        self.count.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The q-quantile (0..=1) of the kept samples, if any.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let mut v: Vec<f64> = self.samples.lock().ok()?.iter().copied().collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(|a, b| a.total_cmp(b));
        let idx = ((v.len() - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize;
        Some(v[idx])
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Top-`k` recommendations for `users` (store indices) with the live model, or popular items for
/// users the model cannot score (no model yet, or only items newer than the model).
pub fn recommend_users(
    store: &Store,
    live: Option<&LiveModel>,
    users: &[u32],
    k: usize,
) -> Result<Vec<Recommendation>> {
    let mut histories = Vec::with_capacity(users.len());
    for &u in users {
        let mut h = store.history(u)?;
        h.sort_unstable();
        histories.push(h);
    }
    let generated_at = now_ms();
    let mut scored: Vec<Option<Vec<(u32, f32)>>> = vec![None; users.len()];
    if let Some(live) = live {
        let n = live.model.n_items() as u32;
        let inputs: Vec<Vec<u32>> = histories
            .iter()
            .map(|h| h.iter().copied().filter(|&i| i < n).collect())
            .collect();
        let idx: Vec<usize> = (0..users.len())
            .filter(|&j| !inputs[j].is_empty())
            .collect();
        let rows: Vec<&[u32]> = idx.iter().map(|&j| inputs[j].as_slice()).collect();
        if !rows.is_empty() {
            let recs = live.model.recommend(&rows, k)?;
            for (j, r) in idx.into_iter().zip(recs) {
                scored[j] = Some(r);
            }
        }
    }
    let mut out = Vec::with_capacity(users.len());
    for ((&u, h), s) in users.iter().zip(&histories).zip(scored) {
        let (items, source) = match s {
            Some(r) => (r, "model"),
            None => (store.popular(k, h), "popular"),
        };
        let user_id = store.user_id(u)?.unwrap_or_else(|| u.to_string());
        out.push(Recommendation {
            user_id,
            items: items
                .into_iter()
                .filter_map(|(i, score)| {
                    store
                        .item_id(i)
                        .map(|item_id| ScoredItem { item_id, score })
                })
                .collect(),
            model_version: live.map(|l| l.version),
            generated_at,
            source: source.into(),
        });
    }
    Ok(out)
}

/// The scoring loop; returns at shutdown.
pub async fn run(shared: Arc<Shared>, producer: FutureProducer) {
    let cfg = shared.config.serve.clone();
    let topic = shared.config.kafka.recommendations_topic.clone();
    let mut tick = tokio::time::interval(Duration::from_millis(cfg.interval_ms.max(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut versions = shared.registry.subscribe();
    let mut shutdown = shared.shutdown.subscribe();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => break,
            Ok(()) = versions.changed() => {
                let n = shared.dirty.requeue_recent(cfg.rescore_window);
                debug!(users = n, "model swapped: re-scoring recently active users");
                continue;
            }
        }
        shared.metrics.dirty_users.set(shared.dirty.len() as i64);
        let batch = shared.dirty.take(cfg.batch_size);
        if batch.is_empty() {
            continue;
        }
        let started = Instant::now();
        let users: Vec<u32> = batch.iter().map(|(u, _)| *u).collect();
        let s = shared.clone();
        let k = cfg.k;
        let recs = match tokio::task::spawn_blocking(move || {
            let live = s.registry.current();
            recommend_users(&s.store, live.as_deref(), &users, k)
        })
        .await
        {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                warn!(error = %format!("{e:#}"), "scoring failed");
                continue;
            }
            Err(e) => {
                warn!(error = %e, "scoring task failed");
                continue;
            }
        };
        shared
            .metrics
            .scoring_latency
            .observe(started.elapsed().as_secs_f64());
        let sends = recs.iter().map(|r| {
            let payload = serde_json::to_vec(r).unwrap_or_default();
            let version = r.model_version.map(|v| v.to_string()).unwrap_or_default();
            let producer = &producer;
            let topic = &topic;
            async move {
                let headers = OwnedHeaders::new().insert(Header {
                    key: "model_version",
                    value: Some(version.as_bytes()),
                });
                let record = FutureRecord::to(topic)
                    .key(r.user_id.as_bytes())
                    .payload(&payload)
                    .headers(headers);
                producer.send(record, Duration::from_secs(10)).await
            }
        });
        let results = futures::future::join_all(sends).await;
        for ((r, (_, received)), res) in recs.iter().zip(&batch).zip(results) {
            match res {
                Ok(_) => {
                    shared
                        .metrics
                        .recommendations_published
                        .with_label_values(&[r.source.as_str()])
                        .inc();
                    let latency = received.elapsed().as_secs_f64();
                    shared.metrics.click_to_recommendation.observe(latency);
                    shared.latencies.record(latency);
                }
                Err((e, _)) => {
                    shared.metrics.publish_errors.inc();
                    warn!(error = %e, "cannot publish a recommendation");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirty_queue_is_bounded_and_deduplicated() {
        let d = DirtyUsers::new(3);
        let t = Instant::now();
        assert_eq!(d.mark(&[1, 2, 1, 3], t), 0);
        assert_eq!(d.len(), 3);
        let later = t + Duration::from_millis(1);
        assert_eq!(d.mark(&[4], later), 1); // 1 dropped
        let got: Vec<(u32, Instant)> = d.take(10);
        assert_eq!(got, vec![(2, t), (3, t), (4, later)]);
        assert!(d.is_empty());
        // the activity record is bounded too: the least recent were forgotten
        assert_eq!(d.requeue_recent(Duration::from_secs(60)), 2);
        let again: Vec<u32> = d.take(10).into_iter().map(|(u, _)| u).collect();
        assert!(again.contains(&4), "{again:?}");
        assert_eq!(d.requeue_recent(Duration::ZERO), 0);
    }
}
