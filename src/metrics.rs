//! `Metrics`: every Prometheus metric multivaed exports (`multivaed_*`, base units, `_total` only
//! on counters, never a user or item id in a label).

use prometheus::{
    exponential_buckets, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter,
    IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

/// The daemon's metrics, registered in their own registry.
pub(crate) struct Metrics {
    pub registry: Registry,
    pub events_consumed: IntCounter,
    pub events_rejected: IntCounterVec,
    pub events_dead_lettered: IntCounter,
    pub events_ignored: IntCounter,
    pub events_duplicate: IntCounter,
    pub items_excluded: IntCounter,
    pub users_forgotten: IntCounter,
    pub forget_seconds: Histogram,
    pub recommendations_withdrawn: IntCounter,
    pub items_unavailable: IntGauge,
    pub item_updates: IntCounterVec,
    pub ingest_batches: IntCounter,
    pub consumer_lag: IntGaugeVec,
    pub partitions_assigned: IntGauge,
    pub partitions_owned: IntGauge,
    pub partitions_restoring: IntGauge,
    pub restore_records: IntCounter,
    pub store_users: IntGauge,
    pub store_items: IntGauge,
    pub store_interactions: IntGauge,
    pub training_rounds: IntCounterVec,
    pub training_duration: Histogram,
    pub train_loss: Gauge,
    pub kl_beta: Gauge,
    pub update_count: IntGauge,
    pub validation_ndcg: Gauge,
    pub validation_popularity_ndcg: Gauge,
    pub training_next_round: Gauge,
    pub training_epochs: IntCounter,
    pub training_stops: IntCounterVec,
    pub training_converged: IntGauge,
    pub model_round_interactions: IntGauge,
    pub model_version: IntGauge,
    pub model_validated: IntGauge,
    pub model_swap_time: Gauge,
    pub model_items: IntGauge,
    pub scoring_latency: Histogram,
    pub recommendations_published: IntCounterVec,
    pub publish_errors: IntCounter,
    pub click_to_recommendation: Histogram,
    /// Where a click's time goes, stage by stage (`stage` label): see the help text.
    pub click_stage: HistogramVec,
    pub rescore_to_recommendation: Histogram,
    pub rescores_dropped: IntCounter,
    pub dead_letters_truncated: IntCounter,
    pub dead_letters_blocked: IntGaugeVec,
    pub publish_retries: IntCounter,
    pub pulls_refused: IntCounter,
    pub http_unauthorized: IntCounter,
    pub changelog_transactions: IntCounterVec,
    pub control_records_refused: IntCounterVec,
    pub store_quarantined: IntCounter,
    pub store_index_capacity: Gauge,
    pub dirty_users: IntGauge,
    pub dirty_users_dropped: IntCounter,
    pub device_info: GaugeVec,
    pub online_hits: IntCounterVec,
    pub canary_version: IntGauge,
    pub canary_recommendations: IntCounter,
    pub canary_trials: IntGaugeVec,
    pub canary_hits: IntGaugeVec,
    pub canary_bound: GaugeVec,
    pub canary_decisions: IntCounterVec,
    pub online_events_scored: IntCounterVec,
    pub model_announced_version: IntGauge,
    pub model_loads: IntCounterVec,
    pub model_load_seconds: Histogram,
    pub trainer_active: IntGauge,
    pub trainer_epoch: IntGauge,
    pub role_info: IntGaugeVec,
    pub ready: IntGauge,
    pub up: IntGauge,
}

impl Metrics {
    /// Creates and registers every metric (plus process metrics: RSS, CPU, open fds).
    pub fn new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        let r = &registry;
        fn reg<T: prometheus::core::Collector + Clone + 'static>(
            r: &Registry,
            m: T,
        ) -> prometheus::Result<T> {
            r.register(Box::new(m.clone()))?;
            Ok(m)
        }
        // latency buckets: 0.5 ms to ~65 s, each twice the last
        let lat_opts = |name: &str, help: &str| {
            HistogramOpts::new(name, help)
                .buckets(exponential_buckets(0.0005, 2.0, 18).expect("valid buckets"))
        };
        let lat = |name: &str, help: &str| Histogram::with_opts(lat_opts(name, help));
        let m = Self {
            events_consumed: reg(r, IntCounter::new("multivaed_events_consumed_total", "Click-topic messages consumed")?)?,
            events_rejected: reg(
                r,
                IntCounterVec::new(
                    Opts::new("multivaed_events_rejected_total", "Messages rejected, by reason"),
                    &["reason"],
                )?,
            )?,
            events_dead_lettered: reg(
                r,
                IntCounter::new("multivaed_events_dead_lettered_total", "Messages written to the dead-letter topic")?,
            )?,
            events_ignored: reg(
                r,
                IntCounter::new(
                    "multivaed_events_ignored_total",
                    "Valid events skipped because their event_type is not positive",
                )?,
            )?,
            events_duplicate: reg(
                r,
                IntCounter::new(
                    "multivaed_events_duplicate_total",
                    "Events already stored (replays, repeats, a weaker type)",
                )?,
            )?,
            items_excluded: reg(
                r,
                IntCounter::new(
                    "multivaed_items_excluded_total",
                    "Items newly excluded for a user by a negative event",
                )?,
            )?,
            users_forgotten: reg(
                r,
                IntCounter::new(
                    "multivaed_users_forgotten_total",
                    "Requests to forget a user (tombstones, forget events) applied to the store",
                )?,
            )?,
            forget_seconds: reg(
                r,
                lat(
                    "multivaed_forget_seconds",
                    "From a request to forget a user (its message timestamp) to the store having deleted their history",
                )?,
            )?,
            recommendations_withdrawn: reg(
                r,
                IntCounter::new(
                    "multivaed_recommendations_withdrawn_total",
                    "Tombstones published on the recommendations topic for forgotten users",
                )?,
            )?,
            items_unavailable: reg(
                r,
                IntGauge::new(
                    "multivaed_items_unavailable",
                    "Items never recommended now: unavailable or expired by the items topic, or on the deny list",
                )?,
            )?,
            item_updates: reg(
                r,
                IntCounterVec::new(
                    Opts::new("multivaed_item_updates_total", "Items-topic messages read, by result (applied, rejected)"),
                    &["result"],
                )?,
            )?,
            ingest_batches: reg(r, IntCounter::new("multivaed_ingest_batches_total", "Ingest batches stored")?)?,
            consumer_lag: reg(
                r,
                IntGaugeVec::new(
                    Opts::new("multivaed_consumer_lag_messages", "Messages behind the high watermark, per partition"),
                    &["partition"],
                )?,
            )?,
            partitions_assigned: reg(
                r,
                IntGauge::new("multivaed_partitions_assigned", "Click-topic partitions assigned to this instance")?,
            )?,
            partitions_owned: reg(
                r,
                IntGauge::new("multivaed_partitions_owned", "Click-topic partitions this instance consumes: assigned and, in role serve, restored and claimed")?,
            )?,
            partitions_restoring: reg(
                r,
                IntGauge::new("multivaed_partitions_restoring", "Partitions being restored from the changelog before their clicks are consumed (role serve)")?,
            )?,
            restore_records: reg(
                r,
                IntCounter::new("multivaed_restore_records_total", "Changelog records read to restore partitions (role serve)")?,
            )?,
            store_users: reg(r, IntGauge::new("multivaed_store_users", "Users in the store")?)?,
            store_items: reg(r, IntGauge::new("multivaed_store_items", "Items in the store")?)?,
            store_interactions: reg(
                r,
                IntGauge::new("multivaed_store_interactions", "User-item interactions in the store")?,
            )?,
            training_rounds: reg(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "multivaed_training_rounds_total",
                        "Fine-tuning rounds, by result (accepted, rejected_nonfinite, rejected_floor, rejected_ndcg, abandoned, superseded, failed)",
                    ),
                    &["result"],
                )?,
            )?,
            training_duration: reg(
                r,
                Histogram::with_opts(
                    HistogramOpts::new("multivaed_training_duration_seconds", "Duration of a fine-tuning round")
                        .buckets(exponential_buckets(0.1, 2.0, 16).expect("valid buckets")),
                )?,
            )?,
            train_loss: reg(r, Gauge::new("multivaed_train_loss", "Negative ELBO of the last training epoch")?)?,
            kl_beta: reg(r, Gauge::new("multivaed_kl_beta", "KL weight β of the live training state")?)?,
            update_count: reg(
                r,
                IntGauge::new("multivaed_update_count", "Mini-batch updates over the model's life (drives β)")?,
            )?,
            validation_ndcg: reg(
                r,
                Gauge::new("multivaed_validation_ndcg_at_100", "Validation NDCG@100 of the last trained model")?,
            )?,
            validation_popularity_ndcg: reg(
                r,
                Gauge::new(
                    "multivaed_validation_popularity_ndcg_at_100",
                    "Validation NDCG@100 of the popularity ranking on the last round's validation users (a model must beat it)",
                )?,
            )?,
            training_next_round: reg(
                r,
                Gauge::new(
                    "multivaed_training_next_round_timestamp_seconds",
                    "Earliest start of the next training round after one that was not accepted (0: no wait)",
                )?,
            )?,
            training_epochs: reg(
                r,
                IntCounter::new("multivaed_training_epochs_total", "Training epochs run, over every round")?,
            )?,
            training_stops: reg(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "multivaed_training_stops_total",
                        "Rounds' training, by why it stopped (converged, max_epochs, max_duration, diverged)",
                    ),
                    &["reason"],
                )?,
            )?,
            training_converged: reg(
                r,
                IntGauge::new(
                    "multivaed_training_converged",
                    "1 when the last round's training stopped because it no longer improved (the next waits for new data), 0 otherwise",
                )?,
            )?,
            model_round_interactions: reg(
                r,
                IntGauge::new(
                    "multivaed_model_round_interactions",
                    "Interactions (training and validation users) read by the round that produced the live model",
                )?,
            )?,
            model_version: reg(r, IntGauge::new("multivaed_model_version", "Version of the live model")?)?,
            model_validated: reg(
                r,
                IntGauge::new(
                    "multivaed_model_validated",
                    "1 when the live model passed the validation gates, 0 when it is a first model published with too few validation users",
                )?,
            )?,
            model_swap_time: reg(
                r,
                Gauge::new("multivaed_model_swap_timestamp_seconds", "When the live model was swapped in")?,
            )?,
            model_items: reg(r, IntGauge::new("multivaed_model_items", "Catalogue size of the live model")?)?,
            scoring_latency: reg(
                r,
                lat("multivaed_scoring_duration_seconds", "Time to score one batch of users")?,
            )?,
            recommendations_published: reg(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "multivaed_recommendations_published_total",
                        "Recommendation messages published, by source (model, popular)",
                    ),
                    &["source"],
                )?,
            )?,
            publish_errors: reg(
                r,
                IntCounter::new("multivaed_publish_errors_total", "Recommendation messages that failed to publish")?,
            )?,
            click_to_recommendation: reg(
                r,
                lat(
                    "multivaed_click_to_recommendation_seconds",
                    "From a click's receipt to its user's new recommendation being delivered",
                )?,
            )?,
            click_stage: reg(
                r,
                HistogramVec::new(
                    lat_opts(
                        "multivaed_click_stage_seconds",
                        "A click's path by stage: store (a batch's store write and fsync), changelog (role serve: the batch's changelog transaction), to_scoring (a click's receipt to its user's scoring batch starting), scoring (a scoring batch), delivery (a scoring batch with clicks in it: its end to every recommendation delivered)",
                    ),
                    &["stage"],
                )?,
            )?,
            rescore_to_recommendation: reg(
                r,
                lat(
                    "multivaed_rescore_to_recommendation_seconds",
                    "From a model swap to a recently active user's re-scored recommendation being delivered",
                )?,
            )?,
            dead_letters_truncated: reg(
                r,
                IntCounter::new(
                    "multivaed_dead_letters_truncated_total",
                    "Dead letters written with their payload cut to kafka.max_message_bytes (the original stays at its offset)",
                )?,
            )?,
            dead_letters_blocked: reg(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        "multivaed_dead_letters_blocked",
                        "1 while dead letters cannot be written (ingestion waits, not ready), by cause: unknown_topic, not_authorized, rejected_by_broker, too_large",
                    ),
                    &["cause"],
                )?,
            )?,
            rescores_dropped: reg(
                r,
                IntCounter::new(
                    "multivaed_rescores_dropped_total",
                    "Re-scorings after a model swap not queued because the re-scoring queue was full",
                )?,
            )?,
            store_quarantined: reg(
                r,
                IntCounter::new(
                    "multivaed_store_records_quarantined_total",
                    "Damaged user records moved aside (their user starts again from the next click)",
                )?,
            )?,
            store_index_capacity: reg(
                r,
                Gauge::new(
                    "multivaed_store_index_capacity_ratio",
                    "The larger of users and items over the store's index limit (2^32 less 2^20): at 1 no batch with a new user or item is stored",
                )?,
            )?,
            pulls_refused: reg(
                r,
                IntCounter::new(
                    "multivaed_pull_requests_refused_total",
                    "Pull requests answered 429 because http.max_concurrent_pulls were being scored",
                )?,
            )?,
            changelog_transactions: reg(
                r,
                IntCounterVec::new(
                    Opts::new("multivaed_changelog_transactions_total", "Role serve: changelog transactions of stored batches, by result (committed; fenced: the consumer group had moved on since the batch was consumed, so the broker refused it and it was aborted)"),
                    &["result"],
                )?,
            )?,
            http_unauthorized: reg(
                r,
                IntCounter::new(
                    "multivaed_http_unauthorized_total",
                    "Requests to the /v1/ API answered 401: no bearer token, or none of http.token_file's",
                )?,
            )?,
            control_records_refused: reg(
                r,
                IntCounterVec::new(
                    Opts::new("multivaed_control_records_refused_total", "Roles serve and train: models- and members-topic records ignored, by topic and reason (signature: not signed with the fleet's key; bound: an epoch or version out of bounds; address: an advertised address outside http.advertise_pattern; unreadable)"),
                    &["topic", "reason"],
                )?,
            )?,
            publish_retries: reg(
                r,
                IntCounter::new(
                    "multivaed_publish_retries_total",
                    "Users queued to be scored again because their recommendation's delivery failed",
                )?,
            )?,
            dirty_users: reg(r, IntGauge::new("multivaed_dirty_users", "Users waiting to be scored (for a click or a re-scoring)")?)?,
            dirty_users_dropped: reg(
                r,
                IntCounter::new(
                    "multivaed_dirty_users_dropped_total",
                    "Users dropped from the scoring queue because it was full",
                )?,
            )?,
            device_info: reg(
                r,
                GaugeVec::new(
                    Opts::new("multivaed_device_info", "Training device (1 for the one in use)"),
                    &["device"],
                )?,
            )?,
            canary_version: reg(
                r,
                IntGauge::new(
                    "multivaed_canary_version",
                    "The canary version running now (0: none)",
                )?,
            )?,
            canary_recommendations: reg(
                r,
                IntCounter::new(
                    "multivaed_canary_recommendations_total",
                    "Recommendations published by a canary version (to users in its slice)",
                )?,
            )?,
            canary_trials: reg(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        "multivaed_canary_trials",
                        "The running canary's evidence as the decider sees it (this process's own on a serving replica): clicks of users shown each side's recommendation, by side (canary, live)",
                    ),
                    &["side"],
                )?,
            )?,
            canary_hits: reg(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        "multivaed_canary_hits",
                        "The running canary's evidence: clicks in the top 10 of each side's recommendation, by side (canary, live)",
                    ),
                    &["side"],
                )?,
            )?,
            canary_bound: reg(
                r,
                GaugeVec::new(
                    Opts::new(
                        "multivaed_canary_statistic",
                        "The canary test's contrast (canary hit rate - (1 - margin) x live hit rate) and its always-valid interval, by bound (estimate, lower, upper): promoted when lower > 0, rolled back when upper < 0",
                    ),
                    &["bound"],
                )?,
            )?,
            canary_decisions: reg(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "multivaed_canary_decisions_total",
                        "Canary decisions, by decision (promote, reject) and by whom (test, timeout, operator)",
                    ),
                    &["decision", "by"],
                )?,
            )?,
            online_hits: reg(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "multivaed_online_hits_total",
                        "Clicks on an item that was in the top k of the user's last published recommendation, by k and model version",
                    ),
                    &["k", "model_version"],
                )?,
            )?,
            online_events_scored: reg(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "multivaed_online_events_scored_total",
                        "New clicks of users who had a published recommendation, by k and model version",
                    ),
                    &["k", "model_version"],
                )?,
            )?,
            model_announced_version: reg(
                r,
                IntGauge::new("multivaed_model_announced_version", "Roles serve and train: the model version the fleet's models topic announces as current (0: none yet)")?,
            )?,
            model_loads: reg(
                r,
                IntCounterVec::new(
                    Opts::new("multivaed_model_loads_total", "Role serve: announced model versions downloaded, by result (ok; refused: a file's size or digest differs from the announcement, or it does not decode; failed: the object store did not answer)"),
                    &["result"],
                )?,
            )?,
            model_load_seconds: reg(
                r,
                Histogram::with_opts(
                    HistogramOpts::new("multivaed_model_load_seconds", "Role serve: an announced version's download, verification and load, until it is swapped in")
                        .buckets(exponential_buckets(0.01, 2.0, 16).expect("valid buckets")),
                )?,
            )?,
            trainer_active: reg(
                r,
                IntGauge::new("multivaed_trainer_active", "Role train: 1 while this trainer is the fleet's active one (elected, its claim read back), 0 on standby")?,
            )?,
            trainer_epoch: reg(
                r,
                IntGauge::new("multivaed_trainer_epoch", "Role train: the fencing epoch of this trainer's last claim (0: none)")?,
            )?,
            role_info: reg(
                r,
                IntGaugeVec::new(
                    Opts::new("multivaed_role_info", "1 for this process's role (all, serve, train)"),
                    &["role"],
                )?,
            )?,
            ready: reg(r, IntGauge::new("multivaed_ready", "1 when /readyz answers ready")?)?,
            up: reg(r, IntGauge::new("multivaed_up", "1 while the daemon runs")?)?,
            registry,
        };
        // Series that alerts and dashboards read exist from the start, at 0.
        for result in [
            "accepted",
            "rejected_nonfinite",
            "rejected_floor",
            "rejected_ndcg",
            "abandoned",
            "superseded",
            "failed",
        ] {
            m.training_rounds.with_label_values(&[result]);
        }
        for reason in ["converged", "max_epochs", "max_duration", "diverged"] {
            m.training_stops.with_label_values(&[reason]);
        }
        for result in ["ok", "refused", "failed"] {
            m.model_loads.with_label_values(&[result]);
        }
        for result in ["committed", "fenced"] {
            m.changelog_transactions.with_label_values(&[result]);
        }
        for (topic, reason) in [
            ("models", "signature"),
            ("models", "bound"),
            ("members", "signature"),
            ("members", "bound"),
            ("members", "address"),
            ("members", "unreadable"),
        ] {
            m.control_records_refused
                .with_label_values(&[topic, reason]);
        }
        for source in ["model", "popular"] {
            m.recommendations_published.with_label_values(&[source]);
        }
        for decision in ["promote", "reject"] {
            for by in ["test", "timeout", "operator"] {
                m.canary_decisions.with_label_values(&[decision, by]);
            }
        }
        for side in ["canary", "live"] {
            m.canary_trials.with_label_values(&[side]);
            m.canary_hits.with_label_values(&[side]);
        }
        for bound in ["estimate", "lower", "upper"] {
            m.canary_bound.with_label_values(&[bound]);
        }
        m.set_dead_letters_blocked(None);
        #[cfg(target_os = "linux")]
        m.registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::new(
                std::process::id() as i32,
                "multivaed",
            ),
        ))?;
        Ok(m)
    }

    /// The store's size gauges.
    /// Why dead letters cannot be written (`None`: they can): the cause's series is 1, the
    /// others 0.
    pub(crate) fn set_dead_letters_blocked(&self, cause: Option<&str>) {
        for c in [
            "unknown_topic",
            "not_authorized",
            "rejected_by_broker",
            "too_large",
        ] {
            self.dead_letters_blocked
                .with_label_values(&[c])
                .set(i64::from(cause == Some(c)));
        }
    }

    /// Partitions owned: those assigned less those still restoring.
    pub(crate) fn note_owned(&self) {
        let restoring = self.partitions_restoring.get();
        self.partitions_owned
            .set((self.partitions_assigned.get() - restoring).max(0));
    }

    pub(crate) fn set_store_counts(&self, counts: crate::store::StoreCounts) {
        self.store_users.set(counts.users as i64);
        self.store_items.set(counts.items as i64);
        self.store_interactions.set(counts.interactions as i64);
    }

    /// The Prometheus text exposition of every metric.
    pub(crate) fn render(&self) -> String {
        use prometheus::Encoder;
        let mut buf = Vec::new();
        let enc = prometheus::TextEncoder::new();
        if enc.encode(&self.registry.gather(), &mut buf).is_err() {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// A memory figure of a process's /proc status in bytes (`field`: "VmHWM" for the peak
/// resident set, "VmRSS" for the current one; `pid` None: this process); 0 where unavailable.
pub fn proc_status_bytes(pid: Option<u32>, field: &str) -> u64 {
    let path = match pid {
        Some(p) => format!("/proc/{p}/status"),
        None => "/proc/self/status".into(),
    };
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.split(':').next() == Some(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// A process's peak resident set (VmHWM) in bytes; see [`proc_status_bytes`].
pub fn peak_rss_bytes(pid: Option<u32>) -> u64 {
    proc_status_bytes(pid, "VmHWM")
}

/// The most recent click-to-recommendation latencies (seconds), bounded, for exact quantiles in
/// summaries (the histogram metric has bucket resolution only).
pub(crate) struct LatencySamples {
    samples: std::sync::Mutex<std::collections::VecDeque<f64>>,
    cap: usize,
    count: std::sync::atomic::AtomicU64,
}

impl LatencySamples {
    pub fn new(cap: usize) -> Self {
        Self {
            samples: std::sync::Mutex::new(std::collections::VecDeque::new()),
            cap: cap.max(1),
            count: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn samples(&self) -> std::sync::MutexGuard<'_, std::collections::VecDeque<f64>> {
        self.samples
            .lock()
            .expect("latency samples poisoned by a panic")
    }

    pub fn record(&self, seconds: f64) {
        self.count
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut s = self.samples();
        if s.len() == self.cap {
            s.pop_front();
        }
        s.push_back(seconds);
    }

    /// Recommendations delivered so far.
    pub fn count(&self) -> u64 {
        self.count.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The q-quantile (0..=1) of the kept samples, if any.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let mut v: Vec<f64> = self.samples().iter().copied().collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(|a, b| a.total_cmp(b));
        let idx = ((v.len() - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize;
        Some(v[idx])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_conventions() {
        let m = Metrics::new().unwrap();
        m.events_rejected.with_label_values(&["invalid_json"]).inc();
        m.training_rounds.with_label_values(&["accepted"]).inc();
        m.recommendations_published
            .with_label_values(&["model"])
            .inc();
        m.consumer_lag.with_label_values(&["0"]).set(1);
        m.device_info.with_label_values(&["cpu"]).set(1.0);
        for fam in m.registry.gather() {
            let name = fam.name();
            assert!(name.starts_with("multivaed_"), "{name}");
            let is_counter = fam.get_field_type() == prometheus::proto::MetricType::COUNTER;
            assert_eq!(name.ends_with("_total"), is_counter, "{name}");
            for metric in fam.get_metric() {
                for l in metric.get_label() {
                    assert!(
                        [
                            "reason",
                            "result",
                            "source",
                            "partition",
                            "device",
                            "k",
                            "model_version",
                            "cause",
                            "topic",
                            "decision",
                            "by",
                            "side",
                            "bound"
                        ]
                        .contains(&l.name()),
                        "{name} has label {}",
                        l.name()
                    );
                }
            }
        }
        assert!(m
            .render()
            .contains("multivaed_process_resident_memory_bytes"));
    }
}
