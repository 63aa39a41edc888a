//! Scoring and publishing, the last stage before Kafka. The scorer waits on the `activity`
//! record: as soon as a user's history changed (batches start at least `serve.interval_ms`
//! apart, so users arriving meanwhile share a batch) it takes up to `serve.batch_size` waiting
//! users, ranks them with the live model (`rank`: never an item the user has; popularity for
//! users the model cannot score yet) and publishes one message per user to the recommendations
//! topic. After a swap, users seen within `serve.rescore_window` are re-scored, at most
//! `serve.max_rescores_per_second` of them a second (`budget`). A forgotten user's
//! recommendation is withdrawn with a tombstone, published in order with the batches (so no
//! answer scored before the forget lands after it). It never waits for training: it reads
//! whatever model the live slot holds.

mod budget;
mod rank;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use tracing::{debug, warn};

pub(crate) use rank::{recommend_hiding, score_users_split, to_recommendation, Scored};
pub use rank::{recommend_offline, OfflineAnswer, OfflineQuery};

use crate::activity::{Activity, Waiting, Why};
use crate::config::ServeConfig;
use crate::items::ItemRules;
use crate::kafka::Producers;
use crate::live::LiveModelSlot;
use crate::metrics::{LatencySamples, Metrics};
use crate::online::{OnlineEval, ONLINE_CUTOFFS};
use crate::ownership::Ownership;
use crate::promotion::Side;
use crate::shutdown::Shutdown;
use crate::store::Store;
use crate::wire::{OwnerStamp, Recommendation, Source, MODEL_VERSION_HEADER, OWNER_HEADERS};
use budget::RescoreBudget;

/// What the scorer uses: its settings and topic, the store it reads histories from, the
/// activity record it takes waiting users from, the live model, and where it reports.
pub(crate) struct Scorer {
    pub serve: ServeConfig,
    pub topic: String,
    pub store: Arc<Store>,
    /// Only users this replica owns are published (role `serve`), stamped with the owner.
    pub ownership: Arc<Ownership>,
    pub owner_id: String,
    pub clicks_topic: String,
    pub activity: Arc<Activity>,
    /// Which items may be recommended: nothing is published before it is known.
    pub items: Arc<ItemRules>,
    pub live: Arc<LiveModelSlot>,
    pub online: Arc<OnlineEval>,
    pub metrics: Arc<Metrics>,
    pub latencies: Arc<LatencySamples>,
    pub shutdown: Arc<Shutdown>,
}

/// A scored user's recommendation, its ranking, and the side of a running canary it is a trial
/// of (the canary's version).
pub(crate) struct Ranked {
    rec: Recommendation,
    scored: Scored,
    trial: Option<(u64, Side)>,
}

/// Scored batches whose deliveries are awaited at once, at most.
const MAX_IN_FLIGHT: usize = 8;

impl Scorer {
    /// The scoring loop; returns at shutdown once every delivery in flight is settled.
    pub async fn run(self, producers: Arc<Producers>) -> anyhow::Result<()> {
        let me = Arc::new(self);
        let min_gap = Duration::from_millis(me.serve.interval_ms);
        let mut versions = me.live.subscribe();
        let mut shutdown = me.shutdown.subscribe();
        let mut in_flight: VecDeque<tokio::task::JoinHandle<()>> = VecDeque::new();
        let mut last_batch: Option<tokio::time::Instant> = None;
        let mut budget = RescoreBudget::new(me.serve.max_rescores_per_second, Instant::now());
        // an item made unavailable before a restart must stay hidden after it
        tokio::select! {
            _ = me.items.wait_loaded() => {}
            _ = shutdown.changed() => return Ok(()),
        }
        loop {
            // wait for waiting users (woken by ingest), a swap, or shutdown
            tokio::select! {
                _ = me.activity.wait() => {}
                _ = shutdown.changed() => break,
                Ok(()) = versions.changed() => {
                    let (n, dropped) = me.activity.requeue_seen_within(me.serve.rescore_window);
                    me.metrics.rescores_dropped.inc_by(dropped);
                    debug!(users = n, dropped, "model swapped: re-scoring recently active users");
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
            crate::fault::panic_point("serve.batch");
            let withdrawn = me.activity.take_withdrawn();
            let withdrew = !withdrawn.is_empty();
            if withdrew {
                let producer = producers.get();
                in_flight.push_back(
                    me.clone()
                        .withdraw(producer, withdrawn, producers.clone())
                        .await,
                );
            }
            me.metrics
                .dirty_users
                .set(me.activity.waiting_count() as i64);
            let allowed = budget.available(Instant::now(), me.activity.clicks_waiting());
            let batch = me.activity.take_waiting(me.serve.batch_size, allowed);
            budget.spend(batch.iter().filter(|w| w.why == Why::Rescore).count());
            if batch.is_empty() && withdrew {
                continue;
            }
            if batch.is_empty() {
                // only re-scorings wait and their budget is spent: until it refills, only a
                // click (or shutdown) starts a batch
                tokio::select! {
                    _ = tokio::time::sleep(budget.until_chunk(Instant::now())) => {}
                    _ = me.activity.wait_for_click() => {}
                    _ = shutdown.changed() => break,
                }
                continue;
            }
            let to_scoring = me.metrics.click_stage.with_label_values(&["to_scoring"]);
            for w in batch.iter().filter(|w| w.why == Why::Click) {
                to_scoring.observe(w.since.elapsed().as_secs_f64());
            }
            let Some(recs) = me.clone().score(&batch).await else {
                continue;
            };
            // the users scored (one the store has no id for is left out), in their order
            let waiting: std::collections::HashMap<u32, Waiting> =
                batch.into_iter().map(|w| (w.user, w)).collect();
            let batch: Vec<Waiting> = recs
                .iter()
                .filter_map(|r| waiting.get(&r.scored.user).copied())
                .collect();
            let producer = producers.get();
            in_flight.push_back(
                me.clone()
                    .publish(producer, recs, batch, producers.clone())
                    .await,
            );
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
        Ok(())
    }

    /// Ranks a batch on a blocking thread (deep enough for the online evaluation's largest
    /// cut-off; a running canary's slice by the canary); `None` when it failed (logged; the loop
    /// goes on).
    async fn score(self: Arc<Self>, batch: &[Waiting]) -> Option<Vec<Ranked>> {
        let started = Instant::now();
        let users: Vec<u32> = batch.iter().map(|w| w.user).collect();
        let me = self.clone();
        let scored = tokio::task::spawn_blocking(move || {
            let models = me.live.models();
            let k = me.serve.k;
            let depth = k.max(ONLINE_CUTOFFS[ONLINE_CUTOFFS.len() - 1]);
            let hidden = me.items.hidden(&me.store);
            let mut out = Vec::with_capacity(users.len());
            for (sc, side) in score_users_split(&me.store, &models, &users, depth, &hidden)? {
                let version = models.for_side(side).map(|l| l.version);
                let mut rec = to_recommendation(&me.store, &sc, k, version);
                let by_model = sc.source == Source::Model;
                rec.canary = by_model && side == Some(Side::Canary);
                let trial = side
                    .filter(|_| by_model)
                    .zip(models.canary_version())
                    .map(|(side, v)| (v, side));
                if me.ownership.is_partitioned() {
                    // a user whose partition moved leaves the queue unpublished: the new
                    // owner publishes for them
                    let Some(stamp) = me.stamp(&sc.user_id)? else {
                        continue;
                    };
                    rec.owner = Some(stamp);
                }
                out.push(Ranked {
                    rec,
                    scored: sc,
                    trial,
                });
            }
            anyhow::Ok(out)
        })
        .await;
        match scored {
            Ok(Ok(r)) => {
                let seconds = started.elapsed().as_secs_f64();
                self.metrics.scoring_latency.observe(seconds);
                self.metrics
                    .click_stage
                    .with_label_values(&["scoring"])
                    .observe(seconds);
                Some(r)
            }
            Ok(Err(e)) => {
                warn!(error = %format!("{e:#}"), "scoring failed");
                None
            }
            Err(e) => {
                warn!(error = %e, "scoring task failed");
                None
            }
        }
    }

    /// Enqueues every message of a scored batch now and awaits their deliveries off the
    /// scoring loop (the next batch scores while the broker acknowledges).
    async fn publish(
        self: Arc<Self>,
        producer: Arc<FutureProducer>,
        recs: Vec<Ranked>,
        batch: Vec<Waiting>,
        producers: Arc<Producers>,
    ) -> tokio::task::JoinHandle<()> {
        let scored_at = Instant::now();
        let mut deliveries = Vec::with_capacity(recs.len());
        for Ranked { rec: r, .. } in &recs {
            let payload = r.to_json();
            let headers = headers(&r.model_version_header(), r.owner.as_ref());
            deliveries
                .push(enqueue(&producer, &self.topic, &r.user_id, Some(&payload), headers).await);
        }
        let deliveries = settled(deliveries);
        tokio::spawn(async move {
            let results = deliveries.await;
            crate::fault::crash_point("serve.published");
            if let Some(Err(e)) = results.iter().find(|r| r.is_err()) {
                producers.recover(&producer, e);
            }
            if batch.iter().any(|w| w.why == Why::Click) {
                self.metrics
                    .click_stage
                    .with_label_values(&["delivery"])
                    .observe(scored_at.elapsed().as_secs_f64());
            }
            self.delivered(recs, &batch, results);
        })
    }

    /// Enqueues a tombstone for each forgotten user now (stamped as their owner's when this
    /// replica owns them) and awaits the deliveries off the scoring loop; those that failed
    /// wait to be withdrawn again.
    async fn withdraw(
        self: Arc<Self>,
        producer: Arc<FutureProducer>,
        users: Vec<String>,
        producers: Arc<Producers>,
    ) -> tokio::task::JoinHandle<()> {
        let mut deliveries = Vec::with_capacity(users.len());
        for user in &users {
            let stamp = self.stamp(user).ok().flatten();
            let headers = headers("", stamp.as_ref());
            deliveries.push(enqueue(&producer, &self.topic, user, None, headers).await);
        }
        let deliveries = settled(deliveries);
        tokio::spawn(async move {
            let results = deliveries.await;
            let (mut failed, mut done) = (Vec::new(), Vec::new());
            for (user, res) in users.into_iter().zip(results) {
                match res {
                    Ok(()) => {
                        self.metrics.recommendations_withdrawn.inc();
                        done.push(user);
                    }
                    Err(e) if crate::kafka::is_permanent(&e) => {
                        // the mark stays in the store: the next start tries again
                        self.metrics.publish_errors.inc();
                        warn!(error = %e, "cannot withdraw a forgotten user's recommendation (a permanent error: tried again at the next start)");
                    }
                    Err(e) => {
                        self.metrics.publish_errors.inc();
                        producers.recover(&producer, &e);
                        warn!(error = %e, "cannot withdraw a forgotten user's recommendation; retrying");
                        failed.push(user);
                    }
                }
            }
            if let Err(e) = self.store.withdrawn(&done) {
                // still pending: withdrawn again after a restart (a repeated tombstone)
                warn!(error = %format!("{e:#}"), "cannot note delivered withdrawals");
            }
            if !failed.is_empty() {
                self.activity.withdraw_failed(failed);
            }
        })
    }

    /// The owner's stamp for `user` (role `serve`; `None` when this replica does not own them,
    /// or every replica owns everything).
    fn stamp(&self, user: &str) -> anyhow::Result<Option<OwnerStamp>> {
        if !self.ownership.is_partitioned() {
            return Ok(None);
        }
        let Some(owned) = self.ownership.owner_of(user) else {
            return Ok(None);
        };
        let offset = self
            .store
            .stored_offset(&self.clicks_topic, owned.partition)?
            .unwrap_or(0);
        Ok(Some(OwnerStamp {
            partition: owned.partition,
            epoch: owned.epoch,
            offset,
            owner: self.owner_id.clone(),
        }))
    }

    /// Metrics and the online-evaluation record of a delivered batch; users whose delivery
    /// failed wait to be scored again.
    fn delivered(
        &self,
        recs: Vec<Ranked>,
        batch: &[Waiting],
        results: Vec<Result<(), KafkaError>>,
    ) {
        let mut failed = Vec::new();
        for ((ranked, w), res) in recs.into_iter().zip(batch).zip(results) {
            let Ranked {
                rec: r,
                scored: sc,
                trial,
            } = ranked;
            match res {
                Ok(_) => {
                    let label = match r.model_version {
                        Some(v) if sc.source == Source::Model => v.to_string(),
                        _ => Source::Popular.as_str().to_string(),
                    };
                    let items = sc.items.iter().map(|(i, _)| *i).collect();
                    self.online.shown(sc.user, label, items, trial);
                    if r.canary {
                        self.metrics.canary_recommendations.inc();
                    }
                    self.metrics
                        .recommendations_published
                        .with_label_values(&[r.source.as_str()])
                        .inc();
                    let latency = w.since.elapsed().as_secs_f64();
                    match w.why {
                        Why::Click => {
                            self.metrics.click_to_recommendation.observe(latency);
                            self.latencies.record(latency);
                        }
                        Why::Rescore => self.metrics.rescore_to_recommendation.observe(latency),
                    }
                }
                Err(e) if crate::kafka::is_permanent(&e) => {
                    self.metrics.publish_errors.inc();
                    warn!(error = %e, "cannot publish a recommendation (a permanent error: not retried)");
                }
                Err(e) => {
                    self.metrics.publish_errors.inc();
                    warn!(error = %e, "cannot publish a recommendation; its user waits to be scored again");
                    failed.push(*w);
                }
            }
        }
        if !failed.is_empty() {
            let dropped = self.activity.delivery_failed(&failed);
            self.metrics.publish_retries.inc_by(failed.len() as u64);
            self.metrics.dirty_users_dropped.inc_by(dropped.clicks);
            self.metrics.rescores_dropped.inc_by(dropped.rescores);
        }
    }
}

/// A recommendation's headers: the model version (empty for popularity) and, from an owner,
/// its stamp.
fn headers(version: &str, owner: Option<&OwnerStamp>) -> OwnedHeaders {
    let mut headers = OwnedHeaders::new().insert(Header {
        key: MODEL_VERSION_HEADER,
        value: Some(version.as_bytes()),
    });
    if let Some(o) = owner {
        let values = [
            o.partition.to_string(),
            o.epoch.to_string(),
            o.offset.to_string(),
            o.owner.clone(),
        ];
        for (key, value) in OWNER_HEADERS.iter().zip(&values) {
            headers = headers.insert(Header {
                key,
                value: Some(value.as_bytes()),
            });
        }
    }
    headers
}

/// Enqueues one message keyed by user id (a `None` payload: a tombstone), waiting (up to 10 s)
/// while the producer's queue is full.
async fn enqueue(
    producer: &FutureProducer,
    topic: &str,
    user: &str,
    payload: Option<&[u8]>,
    headers: OwnedHeaders,
) -> Result<DeliveryFuture, KafkaError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let record = FutureRecord::<str, [u8]>::to(topic)
            .key(user)
            .headers(headers.clone());
        let record = match payload {
            Some(p) => record.payload(p),
            None => record,
        };
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

/// Resolves once every enqueued message is delivered or failed, with each one's result.
fn settled(
    deliveries: Vec<Result<DeliveryFuture, KafkaError>>,
) -> impl std::future::Future<Output = Vec<Result<(), KafkaError>>> {
    futures::future::join_all(deliveries.into_iter().map(|d| async move {
        match d {
            Ok(f) => match f.await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err((e, _))) => Err(e),
                Err(_) => Err(KafkaError::Canceled),
            },
            Err(e) => Err(e),
        }
    }))
}

#[cfg(test)]
mod tests {
    use rdkafka::config::ClientConfig;
    use rdkafka::mocking::MockCluster;

    use super::*;
    use crate::live::LiveModel;
    use crate::model::{ModelConfig, Trainer};
    use crate::store::{Click, PartitionOffset};

    async fn published(m: &Metrics, source: &str, n: u64) {
        let c = m.recommendations_published.with_label_values(&[source]);
        tokio::time::timeout(Duration::from_secs(60), async {
            while c.get() < n {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{source}: {} of {n} published", c.get()));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn waiting_users_get_popularity_then_the_swapped_in_model() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), 100).unwrap());
        let clicks: Vec<Click> = (0..3)
            .flat_map(|u| {
                (0..4).map(move |i| Click {
                    user: format!("u{u}"),
                    item: format!("i{}", u + i),
                    timestamp_ms: None,
                    weight: 1.0,
                })
            })
            .collect();
        let applied = store
            .apply(
                &clicks,
                &[PartitionOffset {
                    topic: "clicks".into(),
                    partition: 0,
                    next_offset: 12,
                }],
            )
            .unwrap();
        let mock = MockCluster::new(1).unwrap();
        mock.create_topic("recs", 1, 1).unwrap();
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", mock.bootstrap_servers())
            .create()
            .unwrap();
        let scorer = Scorer {
            serve: ServeConfig::default(),
            topic: "recs".into(),
            store: store.clone(),
            ownership: Arc::new(Ownership::everything()),
            owner_id: "test".into(),
            clicks_topic: "clicks".into(),
            activity: Arc::new(Activity::new(100, 100)),
            items: Arc::new(ItemRules::open()),
            live: Arc::new(LiveModelSlot::new()),
            online: Arc::new(OnlineEval::new(100)),
            metrics: Arc::new(Metrics::new().unwrap()),
            latencies: Arc::new(LatencySamples::new(100)),
            shutdown: Arc::new(Shutdown::default()),
        };
        let (activity, live, metrics, latencies, shutdown) = (
            scorer.activity.clone(),
            scorer.live.clone(),
            scorer.metrics.clone(),
            scorer.latencies.clone(),
            scorer.shutdown.clone(),
        );
        let running = tokio::spawn(scorer.run(Arc::new(Producers::fixed(producer))));

        // no model yet: each waiting user gets the popular items they do not have
        activity.batch_stored(&applied.changed_users, 12, Instant::now());
        published(&metrics, "popular", 3).await;
        assert_eq!(latencies.count(), 3);
        assert_eq!(activity.waiting_count(), 0);

        // a swap: the users seen recently are scored again, by the model
        let cfg = ModelConfig {
            mlp_hidden_size: vec![8],
            latent_dimension: 4,
            ..ModelConfig::default()
        };
        let n_items = store.counts().items as usize;
        let trainer = Trainer::new(&cfg, n_items, 1, &candle_core::Device::Cpu).unwrap();
        live.publish(LiveModel::local(7, trainer.model().for_serving().unwrap()));
        published(&metrics, "model", 3).await;

        shutdown.trigger();
        tokio::time::timeout(Duration::from_secs(30), running)
            .await
            .expect("the scorer stops at shutdown")
            .unwrap()
            .unwrap();
        assert_eq!(metrics.publish_errors.get(), 0);
    }
}
