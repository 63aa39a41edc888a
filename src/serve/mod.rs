//! Scoring and publishing. Users whose history changed wait in a bounded queue; the scorer wakes
//! as soon as one is waiting (batches start at least `serve.interval_ms` apart, so users arriving
//! meanwhile share a batch), takes up to `serve.batch_size` of them, scores them with the
//! live model (never an item the user has) and publishes one message per user to the
//! recommendations topic. Users the model cannot score yet get the most popular items, marked as
//! such. After a swap, users active within `serve.rescore_window` are re-scored.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
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
    /// Wakes the scorer when users start waiting.
    waiting: tokio::sync::Notify,
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
            waiting: tokio::sync::Notify::new(),
        }
    }

    /// Resolves once users are waiting (at once if some were marked since the last call).
    pub async fn wait(&self) {
        if self.is_empty() {
            self.waiting.notified().await;
        }
    }

    /// Marks users as changed at `received`; returns how many waiting users were dropped.
    pub fn mark(&self, users: &[u32], received: Instant) -> u64 {
        let Ok(mut g) = self.inner.lock() else {
            return 0;
        };
        let (mut dropped, mut queued) = (0, false);
        for &u in users {
            g.recent.insert(u, received);
            if g.pending.contains_key(&u) {
                continue;
            }
            g.pending.insert(u, received);
            g.queue.push_back(u);
            queued = true;
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
        drop(g);
        if queued {
            // one scorer waits; a permit is kept if it is busy, so no wake-up is lost
            self.waiting.notify_one();
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

/// A user's ranked items before publishing (store indices).
#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    pub user: u32,
    /// The user's external id (the store index when the store has none).
    pub user_id: String,
    pub items: Vec<(u32, f32)>,
    /// "model" or "popular".
    pub source: &'static str,
}

/// Ranks the top `depth` items for `users` (store indices) with the live model, or the popular
/// items for users the model cannot score (no model yet, or only items newer than the model).
/// Never an item the user has.
pub fn score_users(
    store: &Store,
    live: Option<&LiveModel>,
    users: &[u32],
    depth: usize,
) -> Result<Vec<Scored>> {
    let mut histories = Vec::with_capacity(users.len());
    let mut ids = Vec::with_capacity(users.len());
    for &u in users {
        let (id, mut h) = store
            .user(u)?
            .unwrap_or_else(|| (u.to_string(), Vec::new()));
        h.sort_unstable();
        histories.push(h);
        ids.push(id);
    }
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
            let recs = live.model.recommend(&rows, depth)?;
            for (j, r) in idx.into_iter().zip(recs) {
                scored[j] = Some(r);
            }
        }
    }
    // the popular ranking once for the batch: deep enough that every user keeps `depth` items
    // after dropping the ones they have (the same result as ranking per user)
    let longest = (0..users.len())
        .filter(|&j| scored[j].is_none())
        .map(|j| histories[j].len())
        .max();
    let popular = longest
        .map(|n| store.popular(depth.saturating_add(n), &[]))
        .unwrap_or_default();
    Ok(users
        .iter()
        .zip(ids)
        .zip(&histories)
        .zip(scored)
        .map(|(((&user, user_id), h), s)| match s {
            Some(items) => Scored {
                user,
                user_id,
                items,
                source: "model",
            },
            None => Scored {
                user,
                user_id,
                items: popular
                    .iter()
                    .filter(|(i, _)| h.binary_search(i).is_err())
                    .take(depth)
                    .copied()
                    .collect(),
                source: "popular",
            },
        })
        .collect())
}

/// The first `k` of ranked store items, by external id (items unknown to the store are skipped).
pub fn scored_items(store: &Store, items: &[(u32, f32)], k: usize) -> Vec<ScoredItem> {
    items
        .iter()
        .take(k)
        .filter_map(|&(i, score)| {
            store
                .item_id(i)
                .map(|item_id| ScoredItem { item_id, score })
        })
        .collect()
}

/// The published message of a scored user: its top `k` items by external id.
pub fn to_recommendation(
    store: &Store,
    s: &Scored,
    k: usize,
    model_version: Option<u64>,
) -> Recommendation {
    Recommendation {
        user_id: s.user_id.clone(),
        items: scored_items(store, &s.items, k),
        model_version: model_version.filter(|_| s.source == "model"),
        generated_at: now_ms(),
        source: s.source.into(),
    }
}

/// Top-`k` recommendations for `users` (store indices); see [`score_users`].
pub fn recommend_users(
    store: &Store,
    live: Option<&LiveModel>,
    users: &[u32],
    k: usize,
) -> Result<Vec<Recommendation>> {
    let version = live.map(|l| l.version);
    Ok(score_users(store, live, users, k)?
        .iter()
        .map(|s| to_recommendation(store, s, k, version))
        .collect())
}

/// Rank cut-offs of the online (prequential) hit rate.
pub const ONLINE_CUTOFFS: [usize; 2] = [10, 100];

/// The last recommendation published per user (top 100, bounded number of users), so each new
/// click can be checked against it: the live, prequential hit rate of the model.
/// Per user: the version label and the items shown; plus insertion order for the bound.
type Shown = (HashMap<u32, (String, Vec<u32>)>, VecDeque<u32>);

pub struct LastRecommendations {
    inner: Mutex<Shown>,
    cap: usize,
}

impl LastRecommendations {
    pub fn new(cap: usize) -> Self {
        Self {
            inner: Mutex::new((HashMap::new(), VecDeque::new())),
            cap: cap.max(1),
        }
    }

    /// Remembers what was published to `user` (`label`: the model version, or "popular").
    pub fn record(&self, user: u32, label: String, items: Vec<u32>) {
        let Ok(mut g) = self.inner.lock() else { return };
        if g.0.insert(user, (label, items)).is_none() {
            g.1.push_back(user);
        }
        while g.0.len() > self.cap {
            match g.1.pop_front() {
                Some(old) => {
                    g.0.remove(&old);
                }
                None => break,
            }
        }
    }

    /// Counts, for each new (user, item) click, whether the item was in the top k of the user's
    /// last published recommendation.
    pub fn observe(&self, clicks: &[(u32, u32)], metrics: &crate::metrics::Metrics) {
        // counted per (label, cut-off) first: one metric update per label and batch
        let mut counts: HashMap<&str, [(u64, u64); ONLINE_CUTOFFS.len()]> = HashMap::new();
        let Ok(g) = self.inner.lock() else { return };
        for (u, i) in clicks {
            let Some((label, items)) = g.0.get(u) else {
                continue;
            };
            let rank = items.iter().position(|x| x == i);
            let c = counts.entry(label.as_str()).or_default();
            for (slot, k) in c.iter_mut().zip(ONLINE_CUTOFFS) {
                slot.1 += 1;
                if rank.is_some_and(|r| r < k) {
                    slot.0 += 1;
                }
            }
        }
        for (label, c) in counts {
            for ((hits, scored), k) in c.into_iter().zip(ONLINE_CUTOFFS) {
                let k = k.to_string();
                metrics
                    .online_events_scored
                    .with_label_values(&[&k, label])
                    .inc_by(scored);
                metrics
                    .online_hits
                    .with_label_values(&[&k, label])
                    .inc_by(hits);
            }
        }
    }
}

/// The scoring loop; returns at shutdown.
pub async fn run(shared: Arc<Shared>, producer: FutureProducer) {
    let cfg = shared.config.serve.clone();
    let topic = shared.config.kafka.recommendations_topic.clone();
    let min_gap = Duration::from_millis(cfg.interval_ms);
    let mut versions = shared.registry.subscribe();
    let mut shutdown = shared.shutdown.subscribe();
    let mut in_flight: VecDeque<tokio::task::JoinHandle<()>> = VecDeque::new();
    let mut last_batch: Option<tokio::time::Instant> = None;
    loop {
        // wait for waiting users (woken by ingest), a swap, or shutdown
        tokio::select! {
            _ = shared.dirty.wait() => {}
            _ = shutdown.changed() => break,
            Ok(()) = versions.changed() => {
                let n = shared.dirty.requeue_recent(cfg.rescore_window);
                debug!(users = n, "model swapped: re-scoring recently active users");
                continue;
            }
        }
        if let Some(at) = last_batch {
            tokio::select! {
                _ = tokio::time::sleep_until(at + min_gap) => {}
                _ = shutdown.changed() => break,
            }
        }
        last_batch = Some(tokio::time::Instant::now());
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
            let version = live.as_ref().map(|l| l.version);
            let depth = k.max(ONLINE_CUTOFFS[ONLINE_CUTOFFS.len() - 1]);
            anyhow::Ok(
                score_users(&s.store, live.as_deref(), &users, depth)?
                    .into_iter()
                    .map(|sc| (to_recommendation(&s.store, &sc, k, version), sc))
                    .collect::<Vec<_>>(),
            )
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
        // enqueue every message now; their deliveries are awaited off the scoring loop (the next
        // tick scores while the broker acknowledges), at most MAX_IN_FLIGHT batches at a time
        let mut deliveries = Vec::with_capacity(recs.len());
        for (r, _) in &recs {
            deliveries.push(enqueue(&producer, &topic, r).await);
        }
        let deliveries = futures::future::join_all(deliveries.into_iter().map(|d| async move {
            match d {
                Ok(f) => match f.await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err((e, _))) => Err(e),
                    Err(_) => Err(KafkaError::Canceled),
                },
                Err(e) => Err(e),
            }
        }));
        let s = shared.clone();
        in_flight.push_back(tokio::spawn(async move {
            let results = deliveries.await;
            crate::fault::crash_point("serve.published");
            record_deliveries(&s, recs, &batch, results);
        }));
        while in_flight.len() > MAX_IN_FLIGHT {
            if let Some(oldest) = in_flight.pop_front() {
                let _ = oldest.await;
            }
        }
        in_flight.retain(|h| !h.is_finished());
    }
    for h in in_flight {
        let _ = h.await;
    }
}

/// Enqueues one recommendation, waiting (up to 10 s) while the producer's queue is full.
async fn enqueue(
    producer: &FutureProducer,
    topic: &str,
    r: &Recommendation,
) -> std::result::Result<DeliveryFuture, KafkaError> {
    let payload = serde_json::to_vec(r).unwrap_or_default();
    let version = r.model_version.map(|v| v.to_string()).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let headers = OwnedHeaders::new().insert(Header {
            key: "model_version",
            value: Some(version.as_bytes()),
        });
        let record = FutureRecord::to(topic)
            .key(r.user_id.as_bytes())
            .payload(&payload)
            .headers(headers);
        match producer.send_result(record) {
            Ok(f) => return Ok(f),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _))
                if Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err((e, _)) => return Err(e),
        }
    }
}

/// Scored batches whose deliveries are awaited at once, at most.
const MAX_IN_FLIGHT: usize = 8;

/// Metrics and the online-evaluation record of a delivered batch.
fn record_deliveries(
    shared: &Shared,
    recs: Vec<(Recommendation, Scored)>,
    batch: &[(u32, Instant)],
    results: Vec<std::result::Result<(), KafkaError>>,
) {
    for (((r, sc), (_, received)), res) in recs.into_iter().zip(batch).zip(results) {
        match res {
            Ok(_) => {
                let label = match r.model_version {
                    Some(v) if sc.source == "model" => v.to_string(),
                    _ => "popular".to_string(),
                };
                shared
                    .last_recs
                    .record(sc.user, label, sc.items.iter().map(|(i, _)| *i).collect());
                shared
                    .metrics
                    .recommendations_published
                    .with_label_values(&[r.source.as_str()])
                    .inc();
                let latency = received.elapsed().as_secs_f64();
                shared.metrics.click_to_recommendation.observe(latency);
                shared.latencies.record(latency);
            }
            Err(e) => {
                shared.metrics.publish_errors.inc();
                warn!(error = %e, "cannot publish a recommendation");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::IntCounterVec;

    #[test]
    fn online_hits_count_clicks_on_recommended_items_by_cutoff() {
        let m = crate::metrics::Metrics::new().unwrap();
        let last = LastRecommendations::new(2);
        let top: Vec<u32> = (0..100).collect();
        last.record(1, "3".into(), top.clone());
        last.observe(&[(1, 5), (1, 50), (1, 500), (9, 5)], &m);
        let get = |c: &IntCounterVec, k: &str| c.with_label_values(&[k, "3"]).get();
        assert_eq!(get(&m.online_events_scored, "10"), 3);
        assert_eq!(get(&m.online_hits, "10"), 1);
        assert_eq!(get(&m.online_events_scored, "100"), 3);
        assert_eq!(get(&m.online_hits, "100"), 2);
        // bounded: the oldest user is forgotten
        last.record(2, "popular".into(), top.clone());
        last.record(3, "popular".into(), top);
        last.observe(&[(1, 5)], &m);
        assert_eq!(get(&m.online_events_scored, "10"), 3);
    }

    #[test]
    fn without_a_model_each_user_gets_the_popular_items_they_do_not_have() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 100).unwrap();
        let click = |u: &str, i: usize| crate::store::Click {
            user: u.into(),
            item: format!("i{i}"),
            timestamp_ms: None,
        };
        // item i is held by 40 - i fillers; "heavy" holds the 30 most popular, "light" one
        let mut clicks: Vec<_> = (0..40)
            .flat_map(|i| (0..40 - i).map(move |f| click(&format!("f{f}"), i)))
            .collect();
        clicks.extend((0..30).map(|i| click("heavy", i)));
        clicks.push(click("light", 3));
        store
            .apply(
                &clicks,
                &[crate::store::PartitionOffset {
                    topic: "clicks".into(),
                    partition: 0,
                    next_offset: 1,
                }],
            )
            .unwrap();
        let heavy = store.user_index("heavy").unwrap().unwrap();
        let light = store.user_index("light").unwrap().unwrap();
        let scored = score_users(&store, None, &[heavy, light], 5).unwrap();
        for (s, u) in scored.iter().zip([heavy, light]) {
            let mut h = store.history(u).unwrap();
            h.sort_unstable();
            assert_eq!(s.items, store.popular(5, &h), "user {u}");
            assert_eq!(s.items.len(), 5);
            assert!(s.items.iter().all(|(i, _)| !h.contains(i)));
            assert_eq!(s.source, "popular");
        }
        assert_eq!(scored[0].user_id, "heavy");
        assert_eq!(store.item_id(scored[0].items[0].0).unwrap(), "i30");
        assert_eq!(store.item_id(scored[1].items[0].0).unwrap(), "i0");
    }

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
