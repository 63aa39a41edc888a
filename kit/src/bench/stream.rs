//! `multivaed bench stream`: the daemon (`multivaed run`, as a child process) against a real
//! broker. Ingest: events/s from the topic into sled next to the raw rdkafka consume rate of the
//! same topic in the same run. Latency: click-to-recommendation as a producer sees it (the click
//! sent → the user's next recommendation generated after it consumed) under a steady load, with
//! a 20k-item model, with training paused and with training running continuously.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use multivaed::wire::{ClickEvent, Recommendation};
use rand::{Rng, SeedableRng};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde::Serialize;

use crate::harness::{free_port, metric_value, producer_to, try_send, unique, Daemon, Setup};

/// Options of `multivaed bench stream`.
#[derive(Debug, Clone)]
pub struct StreamBenchOptions {
    pub brokers: String,
    /// Clicks in the ingest benchmark.
    pub ingest_events: usize,
    /// Catalogue size of the latency benchmark's model.
    pub items: usize,
    /// Loads (clicks/s) of the latency benchmark.
    pub rates: Vec<f64>,
    /// Seconds of load per rate.
    pub seconds: f64,
    /// The multivaed binary to run as the daemon.
    pub exe: PathBuf,
    /// Where the daemons keep their data (a fresh subdirectory each).
    pub work_dir: PathBuf,
}

/// Ingest figures.
#[derive(Debug, Clone, Serialize)]
pub struct IngestFigures {
    pub events: usize,
    pub partitions: i32,
    pub produce_events_per_second: f64,
    pub raw_consume_events_per_second: f64,
    pub daemon_events_per_second: f64,
    /// daemon / raw consume: the figure.
    pub ratio: f64,
    pub daemon_peak_rss_bytes: u64,
}

/// Latency figures at one load.
#[derive(Debug, Clone, Serialize)]
pub struct LatencyFigures {
    pub rate: f64,
    pub achieved_rate: f64,
    pub training: &'static str,
    pub model_items: usize,
    pub clicks: usize,
    pub answered: usize,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// A click's produce call → a plain consumer of the clicks topic (the producer and the
    /// broker alone), p50 and p99 ms.
    pub transit_p50_ms: f64,
    pub transit_p99_ms: f64,
    pub training_rounds_during: f64,
    /// The daemon's scoring batches during the load: how many, mean users and mean seconds each.
    pub scoring_batches: f64,
    pub users_per_scoring_batch: f64,
    pub seconds_per_scoring_batch: f64,
    /// The daemon's own click → recommendation during the load (the click's receipt by the
    /// consumer to the recommendation's delivery), p50 and p99 interpolated in its histogram's
    /// buckets (each twice the last); the rest of the end-to-end figures is the broker hops.
    pub daemon_p50_ms: f64,
    pub daemon_p99_ms: f64,
    /// Re-scorings after model swaps during the load (swap → delivery), counted apart from
    /// clicks: how many, and their p99.
    pub rescorings: f64,
    pub rescore_p99_ms: f64,
    pub daemon_peak_rss_bytes: u64,
}

/// Everything `bench stream` measured.
#[derive(Debug, Clone, Serialize)]
pub struct StreamFigures {
    pub ingest: IngestFigures,
    pub latency: Vec<LatencyFigures>,
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Enqueues one benchmark click (the daemon's JSON event), keyed by user.
pub(super) fn send(
    p: &ThreadedProducer<DefaultProducerContext>,
    topic: &str,
    user: &str,
    item: &str,
) -> Result<()> {
    let payload = ClickEvent {
        user_id: user.into(),
        item_id: item.into(),
        timestamp: None,
        event_type: None,
    }
    .to_json();
    try_send(
        p,
        BaseRecord::to(topic)
            .key(user.as_bytes())
            .payload(&payload[..]),
    )
    .context("cannot produce a benchmark click")
}

/// Sum of a metric of the daemon over its label sets.
pub(super) fn metric(d: &Daemon, name: &str) -> Result<f64> {
    Ok(metric_value(&d.metrics()?, name, ""))
}

/// Waits until `f` holds (its errors count as not yet).
pub(super) fn wait(
    d: &Daemon,
    limit: Duration,
    what: &str,
    mut f: impl FnMut(&Daemon) -> Result<bool>,
) -> Result<()> {
    d.try_wait_for(limit, what, |d| f(d).unwrap_or(false))
}

/// Fresh topics for one benchmark daemon.
fn topics(brokers: &str, partitions: i32) -> Result<Setup> {
    Setup::try_new_on(brokers, Path::new(""), partitions)
}

/// The daemon's environment: `topics` on `brokers`, data in `dir`, plus `extra`.
fn daemon_env(
    topics: &Setup,
    brokers: &str,
    dir: &Path,
    extra: &[(&str, String)],
) -> Vec<(String, String)> {
    let mut env = topics.base_env(brokers);
    env.retain(|(k, _)| k != "MULTIVAED_DATA_DIR");
    env.push(("MULTIVAED_DATA_DIR".into(), dir.display().to_string()));
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.clone())));
    env
}

/// Starts the benchmark daemon, its log written to `log`.
fn start(exe: &Path, env: &[(String, String)], log: &Path) -> Result<Daemon> {
    Daemon::try_start(exe, env, free_port(), Some(log))
}

/// Ingest: produce `n` clicks, time a raw consumer over them, then the daemon.
fn ingest(opts: &StreamBenchOptions) -> Result<IngestFigures> {
    let partitions = 2;
    let topics = topics(&opts.brokers, partitions)?;
    let n = opts.ingest_events;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let p = producer_to(&opts.brokers, "20")?;
    let t0 = Instant::now();
    for _ in 0..n {
        let u: u32 = rng.gen_range(0..(n as u32 / 4).max(1));
        let r: f64 = rng.gen();
        let i = (r * r * 5000.0) as u32;
        send(&p, &topics.clicks, &format!("u{u}"), &format!("i{i}"))?;
    }
    p.flush(Duration::from_secs(120))
        .context("cannot deliver the benchmark's clicks")?;
    let produce_seconds = t0.elapsed().as_secs_f64();
    eprintln!("ingest: {n} clicks produced in {produce_seconds:.1} s");

    // raw rdkafka consume of the same topic: first message to last
    let raw_rate = super::fleet::raw_consume(&opts.brokers, &topics.clicks, partitions, n)?;
    eprintln!("ingest: raw rdkafka consume {raw_rate:.0} events/s");

    // the daemon (training off: this measures ingestion and the scoring it triggers)
    let dir = opts.work_dir.join(unique("ingest"));
    let env = daemon_env(
        &topics,
        &opts.brokers,
        &dir,
        &[("MULTIVAED_TRAIN__MIN_USERS", "1000000000".into())],
    );
    let d = start(&opts.exe, &env, &opts.work_dir.join("ingest-daemon.log"))?;
    let mut first = None;
    wait(&d, Duration::from_secs(600), "every click consumed", |d| {
        let consumed = metric(d, "multivaed_events_consumed_total")?;
        if consumed > 0.0 {
            first.get_or_insert_with(Instant::now);
        }
        Ok(consumed >= n as f64)
    })?;
    let daemon_seconds = first.map(|f| f.elapsed().as_secs_f64()).unwrap_or(0.0);
    let daemon_rate = n as f64 / daemon_seconds.max(1e-9);
    let rss = d.peak_rss();
    d.terminate();
    eprintln!(
        "ingest: daemon {daemon_rate:.0} events/s ({:.2} of raw)",
        daemon_rate / raw_rate
    );
    Ok(IngestFigures {
        events: n,
        partitions,
        produce_events_per_second: n as f64 / produce_seconds,
        raw_consume_events_per_second: raw_rate,
        daemon_events_per_second: daemon_rate,
        ratio: daemon_rate / raw_rate,
        daemon_peak_rss_bytes: rss,
    })
}

/// Clicks sent and not yet answered, per user: send times (µs since the epoch).
type Pending = Arc<Mutex<HashMap<String, VecDeque<u64>>>>;

/// What a load measured: each answered click's end-to-end milliseconds, the clicks sent, the
/// rate achieved, and each click's transit (its produce call → a plain consumer of the clicks
/// topic), milliseconds: the part of end to end that is the producer and the broker alone.
pub(super) struct Measured {
    pub latencies: Vec<f64>,
    pub sent: usize,
    pub achieved: f64,
    pub transit: Vec<f64>,
}

/// Steady load at `rate` for `seconds`: see [`Measured`].
/// `at_load` is called as the first click is sent and after the last.
pub(super) fn measure(
    opts: &StreamBenchOptions,
    topics: &Setup,
    users: usize,
    rate: f64,
    seed: u64,
    at_load: &mut dyn FnMut(),
) -> Result<Measured> {
    let pending: Pending = Arc::default();
    let latencies: Arc<Mutex<Vec<f64>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let consumer = watcher(&opts.brokers, "latency")?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&topics.recs, 0, Offset::End)?;
    consumer.assign(&tpl)?;
    // let the assignment settle before the first click
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_secs(2) {
        consumer.poll(Duration::from_millis(50));
    }
    let reader = {
        let (pending, latencies, stop) = (pending.clone(), latencies.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Acquire) {
                let Some(Ok(m)) = consumer.poll(Duration::from_millis(20)) else {
                    continue;
                };
                let now = now_us();
                let Some(rec) = m
                    .payload()
                    .and_then(|p| serde_json::from_slice::<Recommendation>(p).ok())
                else {
                    continue;
                };
                let generated_us = rec.generated_at * 1000;
                let mut p = pending.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(q) = p.get_mut(&rec.user_id) {
                    let mut l = latencies.lock().unwrap_or_else(|e| e.into_inner());
                    while q.front().is_some_and(|&sent| sent < generated_us) {
                        let sent = q.pop_front().unwrap_or(now);
                        l.push(now.saturating_sub(sent) as f64 / 1000.0);
                    }
                }
            }
        })
    };
    let transit = transit_reader(&opts.brokers, &topics.clicks, stop.clone())?;
    // batched as a click producer's client does by default (librdkafka's 5 ms): unbatched, the
    // broker answers one request per click and, with this load's share of 2 cores, falls
    // behind by seconds before the daemon sees a click
    let p = producer_to(&opts.brokers, "5")?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    at_load();
    let start = Instant::now();
    let mut sent = 0usize;
    while start.elapsed().as_secs_f64() < opts.seconds {
        let due = (start.elapsed().as_secs_f64() * rate) as usize;
        if sent >= due {
            std::thread::sleep(Duration::from_micros(200));
            continue;
        }
        let user = format!("u{}", rng.gen_range(0..users));
        let item = format!("i{}", rng.gen_range(0..opts.items));
        pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(user.clone())
            .or_default()
            .push_back(now_us());
        send(&p, &topics.clicks, &user, &item)?;
        sent += 1;
    }
    let achieved = sent as f64 / start.elapsed().as_secs_f64();
    at_load();
    p.flush(Duration::from_secs(30))?;
    // stragglers
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Release);
    let _ = reader.join();
    let mut transit = transit.join().unwrap_or_default();
    transit.sort_by(|a, b| a.total_cmp(b));
    let l = latencies.lock().unwrap_or_else(|e| e.into_inner()).clone();
    Ok(Measured {
        latencies: l,
        sent,
        achieved,
        transit,
    })
}

/// A consumer that watches a topic as messages arrive (assigned by the caller, nothing
/// committed), answered within 5 ms of one.
fn watcher(brokers: &str, group: &str) -> Result<BaseConsumer> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique(group))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "5")
        .create()?)
}

/// A plain consumer of every partition of the clicks topic from its end, until `stop`: each
/// click's milliseconds from its produce call (the message's create time) to its receipt here.
fn transit_reader(
    brokers: &str,
    topic: &str,
    stop: Arc<AtomicBool>,
) -> Result<std::thread::JoinHandle<Vec<f64>>> {
    let consumer = watcher(brokers, "transit")?;
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let mut tpl = TopicPartitionList::new();
    for t in metadata.topics() {
        for p in t.partitions() {
            tpl.add_partition_offset(topic, p.id(), Offset::End)?;
        }
    }
    consumer.assign(&tpl)?;
    Ok(std::thread::spawn(move || {
        let mut transit = Vec::new();
        while !stop.load(Ordering::Acquire) {
            let Some(Ok(m)) = consumer.poll(Duration::from_millis(20)) else {
                continue;
            };
            if let Some(created) = m.timestamp().to_millis() {
                let now = (now_us() / 1000) as i64;
                transit.push(now.saturating_sub(created).max(0) as f64);
            }
        }
        transit
    }))
}

/// Waits until the daemon consumed `expected` messages since it started and scored every
/// waiting user, so a measurement never starts behind an earlier backlog.
fn caught_up(d: &Daemon, expected: usize) -> Result<()> {
    wait(d, Duration::from_secs(600), "the daemon caught up", |d| {
        Ok(
            metric(d, "multivaed_events_consumed_total")? >= expected as f64
                && metric(d, "multivaed_dirty_users")? == 0.0,
        )
    })
}

/// What a histogram counted between two readings of its cumulative buckets.
pub(super) fn bucket_delta(before: &[(f64, f64)], after: &[(f64, f64)]) -> Vec<(f64, f64)> {
    after
        .iter()
        .map(|&(le, n)| {
            let was = before.iter().find(|b| b.0 == le).map_or(0.0, |b| b.1);
            (le, n - was)
        })
        .collect()
}

/// The `q` quantile of cumulative buckets, interpolated linearly inside its bucket (NaN when
/// empty; the last finite bound when it falls in `+Inf`).
pub(super) fn bucket_quantile(buckets: &[(f64, f64)], q: f64) -> f64 {
    let total = buckets.last().map_or(0.0, |b| b.1);
    if total <= 0.0 {
        return f64::NAN;
    }
    let target = q * total;
    let (mut lo, mut below) = (0.0, 0.0);
    for &(le, n) in buckets {
        if n >= target {
            if !le.is_finite() {
                return lo;
            }
            let inside = n - below;
            let frac = if inside > 0.0 {
                (target - below) / inside
            } else {
                1.0
            };
            return lo + (le - lo) * frac;
        }
        (lo, below) = (le, n);
    }
    lo
}

pub(super) fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// The latency benchmarks' catalogue, 6 clicks a user: user u clicks item u, then 5 more items
/// of its taste group (200 groups, skewed inside each), so the first model learns what
/// popularity does not know and clears the validation floors.
pub(super) fn produce_catalogue(
    brokers: &str,
    topic: &str,
    users: usize,
    items: usize,
) -> Result<()> {
    let p = producer_to(brokers, "20")?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    // the users' tastes first, each user's guaranteed click last: a trainer waiting for every
    // user (`train.min_users`) then trains on the tastes, not on one click a user (a model of
    // those lost to popularity on validation and was rejected)
    let group = (items / 200).max(1);
    for _ in 0..users * 5 {
        let u = rng.gen_range(0..users);
        let r: f64 = rng.gen();
        let i = ((u % 200) * group + (r * r * group as f64) as usize) % items;
        send(&p, topic, &format!("u{u}"), &format!("i{i}"))?;
    }
    for u in 0..users {
        send(&p, topic, &format!("u{u}"), &format!("i{}", u % items))?;
    }
    p.flush(Duration::from_secs(120))?;
    Ok(())
}

/// Latency: a daemon with a model over `opts.items` items, then each load with training paused,
/// then the first load again with a daemon that trains as the defaults say.
fn latency(opts: &StreamBenchOptions) -> Result<Vec<LatencyFigures>> {
    let topics = topics(&opts.brokers, 2)?;
    let users = opts.items;
    let dir = opts.work_dir.join(unique("latency"));
    let paused = [
        ("MULTIVAED_TRAIN__MIN_USERS", users.to_string()),
        ("MULTIVAED_TRAIN__MIN_NEW_EVENTS", "1000000000".into()),
        ("MULTIVAED_TRAIN__INTERVAL", "1000h".into()),
        ("MULTIVAED_TRAIN__MAX_EPOCHS_PER_ROUND", "3".into()),
        ("MULTIVAED_TRAIN__CATCH_UP", "false".into()),
        ("MULTIVAED_TRAIN__MIN_NEW_FRACTION", "1000".into()),
        ("MULTIVAED_TRAIN__MAX_USERS_PER_ROUND", users.to_string()),
    ];
    let env = daemon_env(&topics, &opts.brokers, &dir, &paused);
    let d = start(&opts.exe, &env, &opts.work_dir.join("latency-daemon.log"))?;
    produce_catalogue(&opts.brokers, &topics.clicks, users, opts.items)?;
    let items = opts.items as f64;
    wait(
        &d,
        Duration::from_secs(900),
        "a model over the catalogue",
        |d| Ok(metric(d, "multivaed_model_items")? >= items),
    )?;
    wait(&d, Duration::from_secs(600), "the scorer idle", |d| {
        Ok(metric(d, "multivaed_dirty_users")? == 0.0)
    })?;
    eprintln!("latency: model over {} items live", opts.items);
    let mut out = Vec::new();
    // messages produced, and how many of them an earlier daemon consumed (stored offsets)
    let mut produced = users * 6;
    let mut consumed_before = 0usize;
    let mut run = |d: &Daemon,
                   consumed_before: usize,
                   rate: f64,
                   training: &'static str,
                   seed: u64|
     -> Result<()> {
        caught_up(d, produced - consumed_before)?;
        let rounds0 = metric(d, "multivaed_training_rounds_total")?;
        let batches0 = metric(d, "multivaed_scoring_duration_seconds_count")?;
        let busy0 = metric(d, "multivaed_scoring_duration_seconds_sum")?;
        let recs0 = metric(d, "multivaed_recommendations_published_total")?;
        let inside0 = d.buckets("multivaed_click_to_recommendation_seconds")?;
        let rescore0 = d.buckets("multivaed_rescore_to_recommendation_seconds")?;
        let Measured {
            latencies: mut l,
            sent: clicks,
            achieved,
            transit,
        } = measure(opts, &topics, users, rate, seed, &mut || {})?;
        produced += clicks;
        l.sort_by(|a, b| a.total_cmp(b));
        let batches = metric(d, "multivaed_scoring_duration_seconds_count")? - batches0;
        let busy = metric(d, "multivaed_scoring_duration_seconds_sum")? - busy0;
        let recs = metric(d, "multivaed_recommendations_published_total")? - recs0;
        let inside = bucket_delta(
            &inside0,
            &d.buckets("multivaed_click_to_recommendation_seconds")?,
        );
        let rescore = bucket_delta(
            &rescore0,
            &d.buckets("multivaed_rescore_to_recommendation_seconds")?,
        );
        let f = LatencyFigures {
            daemon_p50_ms: bucket_quantile(&inside, 0.5) * 1000.0,
            daemon_p99_ms: bucket_quantile(&inside, 0.99) * 1000.0,
            rescorings: rescore.last().map(|b| b.1).unwrap_or(0.0),
            rescore_p99_ms: bucket_quantile(&rescore, 0.99) * 1000.0,
            scoring_batches: batches,
            users_per_scoring_batch: recs / batches.max(1.0),
            seconds_per_scoring_batch: busy / batches.max(1.0),
            rate,
            achieved_rate: achieved,
            training,
            model_items: metric(d, "multivaed_model_items")? as usize,
            clicks,
            answered: l.len(),
            p50_ms: quantile(&l, 0.5),
            p90_ms: quantile(&l, 0.9),
            p99_ms: quantile(&l, 0.99),
            max_ms: l.last().copied().unwrap_or(f64::NAN),
            transit_p50_ms: quantile(&transit, 0.5),
            transit_p99_ms: quantile(&transit, 0.99),
            training_rounds_during: metric(d, "multivaed_training_rounds_total")? - rounds0,
            daemon_peak_rss_bytes: d.peak_rss(),
        };
        eprintln!(
            "latency at {rate} clicks/s ({training}): p50 {:.1} ms, p99 {:.1} ms (the daemon's own: p50 \
             {:.1} ms, p99 {:.1} ms; {} re-scorings after swaps, p99 {:.1} ms), {} of {} answered; \
             {} scoring batches of {:.1} users, {:.1} ms each; the clicks' transit without the \
             daemon: p50 {:.1} ms, p99 {:.1} ms",
            f.p50_ms,
            f.p99_ms,
            f.daemon_p50_ms,
            f.daemon_p99_ms,
            f.rescorings,
            f.rescore_p99_ms,
            f.answered,
            f.clicks,
            f.scoring_batches,
            f.users_per_scoring_batch,
            f.seconds_per_scoring_batch * 1000.0,
            f.transit_p50_ms,
            f.transit_p99_ms
        );
        out.push(f);
        Ok(())
    };
    for (n, &rate) in opts.rates.iter().enumerate() {
        run(&d, 0, rate, "paused", 100 + n as u64)?;
    }
    d.terminate();
    consumed_before += multivaed::store::Store::open(&dir, 500)?
        .stored_offsets()?
        .iter()
        .map(|o| o.next_offset as usize)
        .sum::<usize>();
    // the same model and store, now training all the time (a round as soon as 1000 new clicks
    // arrived and the previous round ended, over every user, the default 2 epochs)
    let training = [
        ("MULTIVAED_TRAIN__MIN_NEW_EVENTS", "1000".into()),
        ("MULTIVAED_TRAIN__INTERVAL", "1s".into()),
    ];
    let env = daemon_env(&topics, &opts.brokers, &dir, &training);
    let d = start(&opts.exe, &env, &opts.work_dir.join("latency-daemon-2.log"))?;
    wait(&d, Duration::from_secs(120), "the model loaded", |d| {
        Ok(metric(d, "multivaed_model_items")? >= items
            && metric(d, "multivaed_partitions_assigned")? > 0.0)
    })?;
    if let Some(&rate) = opts.rates.first() {
        run(&d, consumed_before, rate, "continuous", 200)?;
    }
    d.terminate();
    Ok(out)
}

/// Runs the stream benchmarks.
pub fn run_stream_bench(opts: &StreamBenchOptions) -> Result<StreamFigures> {
    std::fs::create_dir_all(&opts.work_dir)?;
    let ingest = ingest(opts)?;
    let latency = if opts.rates.is_empty() {
        Vec::new()
    } else {
        latency(opts)?
    };
    Ok(StreamFigures { ingest, latency })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles_come_from_the_buckets_counted_between_readings() {
        let before = [
            (0.001, 10.0),
            (0.002, 10.0),
            (0.004, 10.0),
            (f64::INFINITY, 10.0),
        ];
        // 100 more: 50 at or below 2 ms (above 1 ms), 49 in (2, 4] ms, 1 beyond 4 ms
        let after = [
            (0.001, 10.0),
            (0.002, 60.0),
            (0.004, 109.0),
            (f64::INFINITY, 110.0),
        ];
        let d = bucket_delta(&before, &after);
        assert_eq!(d.last(), Some(&(f64::INFINITY, 100.0)));
        assert!((bucket_quantile(&d, 0.5) - 0.002).abs() < 1e-12);
        assert!((bucket_quantile(&d, 0.25) - 0.0015).abs() < 1e-12);
        assert!((bucket_quantile(&d, 0.99) - 0.004).abs() < 1e-12);
        assert_eq!(
            bucket_quantile(&d, 1.0),
            0.004,
            "in +Inf: the last finite bound"
        );
        assert!(bucket_quantile(&bucket_delta(&after, &after), 0.5).is_nan());
    }
}
