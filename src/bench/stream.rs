//! `multivaed bench stream`: the daemon (this binary's `run`, as a child process) against a real
//! broker. Ingest: events/s from the topic into sled next to the raw rdkafka consume rate of the
//! same topic in the same run. Latency: click-to-recommendation as a producer sees it (the click
//! sent → the user's next recommendation generated after it consumed) under a steady load, with
//! a 20k-item model, with training paused and with training running continuously.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use rand::{Rng, SeedableRng};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaErrorCode;
use serde::Serialize;

use crate::wire::Recommendation;

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
    pub daemon_peak_rss_bytes: u64,
}

/// Everything `bench stream` measured.
#[derive(Debug, Clone, Serialize)]
pub struct StreamFigures {
    pub ingest: IngestFigures,
    pub latency: Vec<LatencyFigures>,
}

fn unique(prefix: &str) -> String {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("bench-{prefix}-{}-{t}", std::process::id())
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Creates topics (name, partitions) on the broker at `brokers` (replication 1).
pub fn create_topics(brokers: &str, topics: &[(&str, i32)]) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .context("cannot create an admin client")?;
    let new: Vec<NewTopic> = topics
        .iter()
        .map(|(t, p)| NewTopic::new(t, *p, TopicReplication::Fixed(1)))
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let res = rt
        .block_on(admin.create_topics(
            &new,
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        ))
        .context("cannot create topics")?;
    for r in res {
        if let Err((t, e)) = r {
            bail!("cannot create topic {t}: {e}");
        }
    }
    Ok(())
}

fn producer(brokers: &str, linger_ms: &str) -> Result<ThreadedProducer<DefaultProducerContext>> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", linger_ms)
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .context("cannot create a producer")
}

/// Enqueues one click, waiting while the producer's queue is full; any other error is returned.
fn send(
    p: &ThreadedProducer<DefaultProducerContext>,
    topic: &str,
    user: &str,
    item: &str,
) -> Result<()> {
    let payload = format!(r#"{{"user_id":"{user}","item_id":"{item}"}}"#);
    let mut rec = BaseRecord::to(topic)
        .key(user.as_bytes())
        .payload(payload.as_bytes());
    loop {
        match p.send(rec) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                // let the background thread deliver
                std::thread::sleep(Duration::from_millis(2));
                rec = r;
            }
            Err((e, _)) => bail!("cannot produce a benchmark click: {e}"),
        }
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

/// The daemon under test.
struct DaemonChild {
    child: Child,
    port: u16,
}

impl DaemonChild {
    fn start(exe: &Path, env: &[(String, String)], log: &Path) -> Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut cmd = Command::new(exe);
        cmd.arg("run")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log)?)
            // BENCH_DAEMON_RUST_LOG: the daemon's log filter (e.g. "info,rdkafka=debug" with
            // MULTIVAED_KAFKA__PROPERTIES__DEBUG=fetch to see librdkafka's fetch decisions)
            .env(
                "RUST_LOG",
                std::env::var("BENCH_DAEMON_RUST_LOG")
                    .unwrap_or_else(|_| "info,rdkafka=warn".into()),
            )
            .env("MULTIVAED_HTTP__LISTEN", format!("127.0.0.1:{port}"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", exe.display()))?;
        let mut d = Self { child, port };
        d.wait(Duration::from_secs(60), "its HTTP endpoint", |d| {
            Ok(d.metrics().is_ok())
        })?;
        Ok(d)
    }

    fn metrics(&self) -> Result<String> {
        Ok(
            ureq::get(&format!("http://127.0.0.1:{}/metrics", self.port))
                .timeout(Duration::from_secs(5))
                .call()?
                .into_string()?,
        )
    }

    /// A histogram's cumulative buckets: (upper bound, count), ascending, `+Inf` last.
    fn buckets(&self, name: &str) -> Result<Vec<(f64, f64)>> {
        let text = self.metrics()?;
        let prefix = format!("{name}_bucket{{le=\"");
        let mut out: Vec<(f64, f64)> = text
            .lines()
            .filter_map(|l| {
                let rest = l.strip_prefix(&prefix)?;
                let (le, count) = rest.split_once("\"} ")?;
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((le, count.trim().parse().ok()?))
            })
            .collect();
        out.sort_by(|a, b| a.0.total_cmp(&b.0));
        Ok(out)
    }

    /// Sum of a metric over its label sets.
    fn metric(&self, name: &str) -> Result<f64> {
        let text = self.metrics()?;
        Ok(text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| l.split(['{', ' ']).next() == Some(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum())
    }

    fn wait(
        &mut self,
        limit: Duration,
        what: &str,
        mut f: impl FnMut(&Self) -> Result<bool>,
    ) -> Result<()> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Some(status) = self.child.try_wait()? {
                bail!("the daemon exited ({status}) while waiting for {what}");
            }
            if f(self).unwrap_or(false) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("timed out after {limit:?} waiting for {what}")
    }

    fn peak_rss(&self) -> u64 {
        peak_rss_bytes(Some(self.child.id()))
    }

    fn stop(mut self) -> Result<()> {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        Ok(())
    }
}

impl Drop for DaemonChild {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

struct Topics {
    clicks: String,
    recs: String,
    dlq: String,
    group: String,
}

impl Topics {
    fn create(brokers: &str, partitions: i32) -> Result<Self> {
        let t = Self {
            clicks: unique("clicks"),
            recs: unique("recs"),
            dlq: unique("dlq"),
            group: unique("group"),
        };
        create_topics(
            brokers,
            &[(&t.clicks, partitions), (&t.recs, 1), (&t.dlq, 1)],
        )?;
        Ok(t)
    }

    fn env(
        &self,
        brokers: &str,
        data_dir: &Path,
        extra: &[(&str, String)],
    ) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = [
            ("MULTIVAED_KAFKA__BROKERS", brokers.to_string()),
            ("MULTIVAED_KAFKA__CLICKS_TOPIC", self.clicks.clone()),
            ("MULTIVAED_KAFKA__RECOMMENDATIONS_TOPIC", self.recs.clone()),
            ("MULTIVAED_KAFKA__DEAD_LETTER_TOPIC", self.dlq.clone()),
            ("MULTIVAED_KAFKA__GROUP_ID", self.group.clone()),
            ("MULTIVAED_DATA_DIR", data_dir.display().to_string()),
            ("MULTIVAED_DEVICE", "cpu".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.clone())));
        env
    }
}

/// Ingest: produce `n` clicks, time a raw consumer over them, then the daemon.
fn ingest(opts: &StreamBenchOptions) -> Result<IngestFigures> {
    let partitions = 2;
    let topics = Topics::create(&opts.brokers, partitions)?;
    let n = opts.ingest_events;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let p = producer(&opts.brokers, "20")?;
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
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &opts.brokers)
        .set("group.id", unique("raw"))
        .set("enable.auto.commit", "false")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for part in 0..partitions {
        tpl.add_partition_offset(&topics.clicks, part, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let (mut seen, mut first, deadline) = (0usize, None, Instant::now() + Duration::from_secs(300));
    while seen < n && Instant::now() < deadline {
        if let Some(m) = consumer.poll(Duration::from_millis(100)) {
            let m = m?;
            std::hint::black_box(m.payload());
            first.get_or_insert_with(Instant::now);
            seen += 1;
        }
    }
    if seen < n {
        bail!("the raw consumer read {seen} of {n} clicks");
    }
    let raw_seconds = first.map(|f| f.elapsed().as_secs_f64()).unwrap_or(0.0);
    let raw_rate = n as f64 / raw_seconds.max(1e-9);
    eprintln!("ingest: raw rdkafka consume {raw_rate:.0} events/s");
    drop(consumer);

    // the daemon (training off: this measures ingestion and the scoring it triggers)
    let dir = opts.work_dir.join(unique("ingest"));
    let env = topics.env(
        &opts.brokers,
        &dir,
        &[("MULTIVAED_TRAIN__MIN_USERS", "1000000000".into())],
    );
    let mut d = DaemonChild::start(&opts.exe, &env, &opts.work_dir.join("ingest-daemon.log"))?;
    let mut first = None;
    d.wait(Duration::from_secs(600), "every click consumed", |d| {
        let consumed = d.metric("multivaed_events_consumed_total")?;
        if consumed > 0.0 {
            first.get_or_insert_with(Instant::now);
        }
        Ok(consumed >= n as f64)
    })?;
    let daemon_seconds = first.map(|f| f.elapsed().as_secs_f64()).unwrap_or(0.0);
    let daemon_rate = n as f64 / daemon_seconds.max(1e-9);
    let rss = d.peak_rss();
    d.stop()?;
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

/// Steady load at `rate` for `seconds`; latencies (ms) of the answered clicks, and clicks sent.
fn measure(
    opts: &StreamBenchOptions,
    topics: &Topics,
    users: usize,
    rate: f64,
    seed: u64,
) -> Result<(Vec<f64>, usize, f64)> {
    let pending: Pending = Arc::default();
    let latencies: Arc<Mutex<Vec<f64>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &opts.brokers)
        .set("group.id", unique("latency"))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "5")
        .create()?;
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
    let p = producer(&opts.brokers, "0")?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
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
    p.flush(Duration::from_secs(30))?;
    // stragglers
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Release);
    let _ = reader.join();
    let l = latencies.lock().unwrap_or_else(|e| e.into_inner()).clone();
    Ok((l, sent, achieved))
}

/// Waits until the daemon consumed `expected` messages since it started and scored every
/// waiting user, so a measurement never starts behind an earlier backlog.
fn caught_up(d: &mut DaemonChild, expected: usize) -> Result<()> {
    d.wait(Duration::from_secs(600), "the daemon caught up", |d| {
        Ok(
            d.metric("multivaed_events_consumed_total")? >= expected as f64
                && d.metric("multivaed_dirty_users")? == 0.0,
        )
    })
}

/// What a histogram counted between two readings of its cumulative buckets.
fn bucket_delta(before: &[(f64, f64)], after: &[(f64, f64)]) -> Vec<(f64, f64)> {
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
fn bucket_quantile(buckets: &[(f64, f64)], q: f64) -> f64 {
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

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// Latency: a daemon with a model over `opts.items` items, then each load with training paused,
/// then the first load again with a daemon that trains as the defaults say.
fn latency(opts: &StreamBenchOptions) -> Result<Vec<LatencyFigures>> {
    let topics = Topics::create(&opts.brokers, 2)?;
    let users = opts.items;
    let dir = opts.work_dir.join(unique("latency"));
    let paused = [
        ("MULTIVAED_TRAIN__MIN_USERS", users.to_string()),
        ("MULTIVAED_TRAIN__MIN_NEW_EVENTS", "1000000000".into()),
        ("MULTIVAED_TRAIN__INTERVAL", "1000h".into()),
        ("MULTIVAED_TRAIN__EPOCHS_PER_ROUND", "1".into()),
        ("MULTIVAED_TRAIN__MAX_USERS_PER_ROUND", "2000".into()),
    ];
    let env = topics.env(&opts.brokers, &dir, &paused);
    let mut d = DaemonChild::start(&opts.exe, &env, &opts.work_dir.join("latency-daemon.log"))?;
    // the catalogue: user u clicks item u, then 5 more (skewed) items each
    let p = producer(&opts.brokers, "20")?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    for u in 0..users {
        send(
            &p,
            &topics.clicks,
            &format!("u{u}"),
            &format!("i{}", u % opts.items),
        )?;
    }
    for _ in 0..users * 5 {
        let u = rng.gen_range(0..users);
        let r: f64 = rng.gen();
        let i = ((r * r * opts.items as f64) as usize + u) % opts.items;
        send(&p, &topics.clicks, &format!("u{u}"), &format!("i{i}"))?;
    }
    p.flush(Duration::from_secs(120))?;
    let items = opts.items as f64;
    d.wait(
        Duration::from_secs(900),
        "a model over the catalogue",
        |d| Ok(d.metric("multivaed_model_items")? >= items),
    )?;
    d.wait(Duration::from_secs(600), "the scorer idle", |d| {
        Ok(d.metric("multivaed_dirty_users")? == 0.0)
    })?;
    eprintln!("latency: model over {} items live", opts.items);
    let mut out = Vec::new();
    // messages produced, and how many of them an earlier daemon consumed (stored offsets)
    let mut produced = users * 6;
    let mut consumed_before = 0usize;
    let mut run = |d: &mut DaemonChild,
                   consumed_before: usize,
                   rate: f64,
                   training: &'static str,
                   seed: u64|
     -> Result<()> {
        caught_up(d, produced - consumed_before)?;
        let rounds0 = d.metric("multivaed_training_rounds_total")?;
        let batches0 = d.metric("multivaed_scoring_duration_seconds_count")?;
        let busy0 = d.metric("multivaed_scoring_duration_seconds_sum")?;
        let recs0 = d.metric("multivaed_recommendations_published_total")?;
        let inside0 = d.buckets("multivaed_click_to_recommendation_seconds")?;
        let (mut l, clicks, achieved) = measure(opts, &topics, users, rate, seed)?;
        produced += clicks;
        l.sort_by(|a, b| a.total_cmp(b));
        let batches = d.metric("multivaed_scoring_duration_seconds_count")? - batches0;
        let busy = d.metric("multivaed_scoring_duration_seconds_sum")? - busy0;
        let recs = d.metric("multivaed_recommendations_published_total")? - recs0;
        let inside = bucket_delta(
            &inside0,
            &d.buckets("multivaed_click_to_recommendation_seconds")?,
        );
        let f = LatencyFigures {
            daemon_p50_ms: bucket_quantile(&inside, 0.5) * 1000.0,
            daemon_p99_ms: bucket_quantile(&inside, 0.99) * 1000.0,
            scoring_batches: batches,
            users_per_scoring_batch: recs / batches.max(1.0),
            seconds_per_scoring_batch: busy / batches.max(1.0),
            rate,
            achieved_rate: achieved,
            training,
            model_items: d.metric("multivaed_model_items")? as usize,
            clicks,
            answered: l.len(),
            p50_ms: quantile(&l, 0.5),
            p90_ms: quantile(&l, 0.9),
            p99_ms: quantile(&l, 0.99),
            max_ms: l.last().copied().unwrap_or(f64::NAN),
            training_rounds_during: d.metric("multivaed_training_rounds_total")? - rounds0,
            daemon_peak_rss_bytes: d.peak_rss(),
        };
        eprintln!(
            "latency at {rate} clicks/s ({training}): p50 {:.1} ms, p99 {:.1} ms (the daemon's own: p50 \
             {:.1} ms, p99 {:.1} ms), {} of {} answered; {} scoring batches of {:.1} users, {:.1} ms each",
            f.p50_ms,
            f.p99_ms,
            f.daemon_p50_ms,
            f.daemon_p99_ms,
            f.answered,
            f.clicks,
            f.scoring_batches,
            f.users_per_scoring_batch,
            f.seconds_per_scoring_batch * 1000.0
        );
        out.push(f);
        Ok(())
    };
    for (n, &rate) in opts.rates.iter().enumerate() {
        run(&mut d, 0, rate, "paused", 100 + n as u64)?;
    }
    d.stop()?;
    consumed_before += crate::store::Store::open(&dir, 500)?
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
    let env = topics.env(&opts.brokers, &dir, &training);
    let mut d = DaemonChild::start(&opts.exe, &env, &opts.work_dir.join("latency-daemon-2.log"))?;
    d.wait(Duration::from_secs(120), "the model loaded", |d| {
        Ok(d.metric("multivaed_model_items")? >= items
            && d.metric("multivaed_partitions_assigned")? > 0.0)
    })?;
    if let Some(&rate) = opts.rates.first() {
        run(&mut d, consumed_before, rate, "continuous", 200)?;
    }
    d.stop()?;
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
