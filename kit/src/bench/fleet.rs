//! `multivaed bench fleet`: serving replicas (`--role serve`) against a real broker. Ingest with
//! the changelog written (events/s vs raw consume of the same topic), then a replica with an
//! empty volume restoring every partition from the changelog (records/s, time to ready), then
//! click → recommendation through a serving replica under a steady load with a model of the
//! paper's size over a large catalogue, end to end and stage by stage.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rand::{Rng, SeedableRng};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::Producer;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde::Serialize;

use crate::fleet::Fleet;
use crate::harness::{free_port, producer_to, unique, Daemon};

#[derive(Debug, Clone)]
pub struct FleetBenchOptions {
    pub brokers: String,
    /// Clicks produced (users: a quarter as many).
    pub events: usize,
    pub partitions: i32,
    pub exe: PathBuf,
    pub work_dir: PathBuf,
}

#[derive(Debug, Clone, Serialize)]
pub struct FleetFigures {
    pub events: usize,
    pub partitions: i32,
    pub raw_consume_events_per_second: f64,
    /// A serving replica's ingest rate with the changelog written after every batch.
    pub serve_events_per_second: f64,
    pub serve_ratio: f64,
    pub changelog_records: u64,
    /// A replica with an empty volume: changelog records read and applied per second.
    pub restore_records_per_second: f64,
    /// Its start → ready (every partition restored and caught up), seconds.
    pub seconds_to_ready: f64,
}

fn metric(d: &Daemon, name: &str) -> f64 {
    d.metric(name, "")
}

pub fn run_fleet_bench(opts: &FleetBenchOptions) -> Result<FleetFigures> {
    std::fs::create_dir_all(&opts.work_dir)?;
    let parts = opts.partitions;
    let fleet = Fleet::named(&opts.work_dir, parts);
    fleet.create_on(&opts.brokers)?;
    let (setup, changelog) = (&fleet.setup, &fleet.changelog);
    let n = opts.events;
    // clicks keyed by user (librdkafka's default partitioner: the daemon's default)
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let p = producer_to(&opts.brokers, "20")?;
    for _ in 0..n {
        let u: u32 = rng.gen_range(0..(n as u32 / 4).max(1));
        let r: f64 = rng.gen();
        let i = (r * r * 5000.0) as u32;
        super::stream::send(&p, &setup.clicks, &format!("u{u}"), &format!("i{i}"))?;
    }
    p.flush(Duration::from_secs(120))
        .context("cannot deliver the benchmark's clicks")?;
    let raw = raw_consume(&opts.brokers, &setup.clicks, parts, n)?;
    eprintln!("fleet: raw rdkafka consume {raw:.0} events/s");

    // a replica as deployed: the default batch size and session
    let env = |name: &str| {
        let mut env = fleet.replica_env_on(&opts.brokers, &opts.work_dir, &unique(name));
        env.retain(|(k, _)| k != "MULTIVAED_KAFKA__BATCH_SIZE" && k != "MULTIVAED_CONFIG");
        env
    };
    // one replica ingests everything, writing the changelog
    let a = Daemon::try_start(
        &opts.exe,
        &env("a"),
        free_port(),
        Some(&opts.work_dir.join("fleet-a.log")),
    )?;
    let mut first = None;
    a.try_wait_for(Duration::from_secs(900), "every click consumed", |d| {
        let consumed = metric(d, "multivaed_events_consumed_total");
        if consumed > 0.0 {
            first.get_or_insert_with(Instant::now);
        }
        consumed >= n as f64
    })?;
    let serve_rate = n as f64 / first.map(|f| f.elapsed().as_secs_f64()).unwrap_or(1e-9);
    eprintln!(
        "fleet: serve replica {serve_rate:.0} events/s ({:.2} of raw)",
        serve_rate / raw
    );
    std::thread::sleep(Duration::from_secs(3));
    a.terminate();
    let records = count(&opts.brokers, changelog, parts)?;

    // a replica with an empty volume restores it all
    let started = Instant::now();
    let b = Daemon::try_start(
        &opts.exe,
        &env("b"),
        free_port(),
        Some(&opts.work_dir.join("fleet-b.log")),
    )?;
    b.try_wait_for(Duration::from_secs(900), "ready", |d| {
        d.get("/readyz").is_some_and(|(s, _)| s == 200)
            && metric(d, "multivaed_partitions_owned") >= parts as f64
    })?;
    let ready = started.elapsed().as_secs_f64();
    let restored = metric(&b, "multivaed_restore_records_total");
    let restore_seconds: f64 = b
        .log
        .lock()
        .map(|l| {
            l.iter()
                .filter(|line| line.contains("partition restored from the changelog"))
                .filter_map(|line| {
                    let s = line.split("seconds=").nth(1)?;
                    s.split_whitespace().next()?.parse::<f64>().ok()
                })
                .sum()
        })
        .unwrap_or(0.0);
    b.terminate();
    if restored < records as f64 {
        bail!("the new replica restored {restored} of {records} records");
    }
    let rate = restored / restore_seconds.max(1e-9);
    eprintln!(
        "fleet: {records} changelog records; restore {rate:.0} records/s ({restored} in {restore_seconds:.1} s), ready {ready:.1} s after start"
    );
    Ok(FleetFigures {
        events: n,
        partitions: parts,
        raw_consume_events_per_second: raw,
        serve_events_per_second: serve_rate,
        serve_ratio: serve_rate / raw,
        changelog_records: records,
        restore_records_per_second: rate,
        seconds_to_ready: ready,
    })
}

/// A raw consumer's rate over the `n` messages of `topic` (first message to last).
pub(super) fn raw_consume(brokers: &str, topic: &str, partitions: i32, n: usize) -> Result<f64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique("raw"))
        .set("enable.auto.commit", "false")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for part in 0..partitions {
        tpl.add_partition_offset(topic, part, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let (mut seen, mut first, deadline) = (0usize, None, Instant::now() + Duration::from_secs(300));
    while seen < n && Instant::now() < deadline {
        if let Some(m) = consumer.poll(Duration::from_millis(100)) {
            std::hint::black_box(m?.payload());
            first.get_or_insert_with(Instant::now);
            seen += 1;
        }
    }
    if seen < n {
        bail!("the raw consumer read {seen} of {n} messages");
    }
    Ok(n as f64
        / first
            .map(|f: Instant| f.elapsed().as_secs_f64())
            .unwrap_or(1e-9))
}

/// Records in a transactional topic: its committed messages, read to the end (the watermarks
/// also count each transaction's commit marker).
fn count(brokers: &str, topic: &str, partitions: i32) -> Result<u64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique("count"))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    let mut ends = Vec::new();
    for p in 0..partitions {
        let (_, hi) = consumer.fetch_watermarks(topic, p, Duration::from_secs(10))?;
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
        ends.push(hi);
    }
    consumer.assign(&tpl)?;
    let (mut total, deadline) = (0u64, Instant::now() + Duration::from_secs(300));
    let at_end = |c: &BaseConsumer| -> Result<bool> {
        let position = c.position()?;
        Ok((0..partitions).all(|p| {
            matches!(
                position.find_partition(topic, p).map(|e| e.offset()),
                Some(Offset::Offset(o)) if o >= ends[p as usize]
            )
        }))
    };
    while !at_end(&consumer)? {
        if Instant::now() > deadline {
            bail!("cannot read {topic} to its end in 300 s");
        }
        if let Some(m) = consumer.poll(Duration::from_millis(100)) {
            m?;
            total += 1;
        }
    }
    Ok(total)
}

/// Click → recommendation through one serving replica (a trainer beside it) at one load.
#[derive(Debug, Clone, Serialize)]
pub struct ServeLatency {
    pub items: usize,
    pub rate: f64,
    pub achieved_rate: f64,
    pub clicks: usize,
    pub answered: usize,
    /// Producer → consumer of the recommendation, milliseconds.
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// The replica's own (receipt → delivered), from its histogram.
    pub daemon_p50_ms: f64,
    pub daemon_p99_ms: f64,
    /// A click's produce call → a plain consumer of the clicks topic (the producer and the
    /// broker alone, no daemon on the path), milliseconds.
    pub transit_p50_ms: f64,
    pub transit_p99_ms: f64,
    /// `multivaed_click_stage_seconds` during the load: (stage, p50 ms, p99 ms, count).
    pub stages: Vec<(String, f64, f64, f64)>,
    pub scoring: String,
    /// Where the machine's cores went during the load.
    pub cpu: LoadCpu,
}

/// Cores in use during the load, on average: the machine's (`/proc/stat`), each daemon's
/// (`multivaed_process_cpu_seconds_total`), the benchmark's own producer and consumer, and the rest (on a
/// machine running nothing else: the broker).
#[derive(Debug, Clone, Serialize)]
pub struct LoadCpu {
    pub machine: f64,
    pub replica: f64,
    pub trainer: f64,
    pub benchmark: f64,
    pub rest: f64,
}

/// CPU seconds so far: the machine's busy time, each daemon's, the benchmark's.
struct CpuSample {
    at: Instant,
    machine: f64,
    replica: f64,
    trainer: f64,
    benchmark: f64,
}

impl CpuSample {
    fn take(replica: &Daemon, trainer: &Daemon) -> Self {
        Self {
            at: Instant::now(),
            machine: machine_busy_seconds(),
            replica: metric(replica, "multivaed_process_cpu_seconds_total"),
            trainer: metric(trainer, "multivaed_process_cpu_seconds_total"),
            benchmark: own_cpu_seconds(),
        }
    }

    fn since(&self, before: &CpuSample) -> LoadCpu {
        let wall = self.at.duration_since(before.at).as_secs_f64().max(1e-9);
        let cores = |now: f64, then: f64| (now - then) / wall;
        let machine = cores(self.machine, before.machine);
        let replica = cores(self.replica, before.replica);
        let trainer = cores(self.trainer, before.trainer);
        let benchmark = cores(self.benchmark, before.benchmark);
        LoadCpu {
            machine,
            replica,
            trainer,
            benchmark,
            rest: machine - replica - trainer - benchmark,
        }
    }
}

/// Seconds every core of the machine has spent busy (not idle, not waiting for I/O; a guest's
/// time is already in `user`).
fn machine_busy_seconds() -> f64 {
    use procfs::CurrentSI;
    procfs::KernelStats::current().map_or(0.0, |stat| {
        let t = stat.total;
        let busy = t.user
            + t.nice
            + t.system
            + t.irq.unwrap_or(0)
            + t.softirq.unwrap_or(0)
            + t.steal.unwrap_or(0);
        busy as f64 / procfs::ticks_per_second() as f64
    })
}

/// This process's CPU seconds (user and system).
fn own_cpu_seconds() -> f64 {
    (procfs::process::Process::myself().and_then(|p| p.stat())).map_or(0.0, |s| {
        (s.utime + s.stime) as f64 / procfs::ticks_per_second() as f64
    })
}

/// A trainer and a serving replica; the trainer's first model over `items` items (the paper's
/// layer sizes) is served, then clicks arrive at `rate` a second for `seconds`.
pub fn serve_latency(
    opts: &FleetBenchOptions,
    items: usize,
    rate: f64,
    seconds: f64,
    scoring: &str,
) -> Result<ServeLatency> {
    let dir = opts.work_dir.join(unique("serve-latency"));
    std::fs::create_dir_all(&dir)?;
    let fleet = Fleet::named(&dir, 2);
    fleet.create_on(&opts.brokers)?;
    let users = items;
    let keep = |env: &mut Vec<(String, String)>| {
        env.retain(|(k, _)| {
            !k.starts_with("MULTIVAED_MODEL__") && k != "MULTIVAED_KAFKA__BATCH_SIZE"
        })
    };
    let mut trainer_env = fleet.trainer_env_on(&opts.brokers, &dir, "trainer");
    keep(&mut trainer_env);
    trainer_env.extend(
        [
            ("MULTIVAED_TRAIN__MIN_USERS", users.to_string()),
            ("MULTIVAED_TRAIN__MIN_NEW_EVENTS", "1000000000".into()),
            ("MULTIVAED_TRAIN__INTERVAL", "1000h".into()),
            ("MULTIVAED_TRAIN__MAX_USERS_PER_ROUND", users.to_string()),
            ("MULTIVAED_TRAIN__MAX_EPOCHS_PER_ROUND", "10".into()),
            // the model is there to be served, not judged: with fewer validation users than
            // this (~30 here) a tie with popularity passes, and only a loss to it (or the loss
            // floor) rejects the round, which would leave the benchmark waiting for a model
            ("MULTIVAED_TRAIN__MIN_VALIDATION_USERS", "100".into()),
        ]
        .map(|(k, v)| (k.to_string(), v)),
    );
    let mut replica_env = fleet.replica_env_on(&opts.brokers, &dir, "replica");
    keep(&mut replica_env);
    replica_env.push(("MULTIVAED_SERVE__SCORING".into(), scoring.into()));
    let trainer = Daemon::try_start(
        &opts.exe,
        &trainer_env,
        free_port(),
        Some(&dir.join("trainer.log")),
    )?;
    let replica = Daemon::try_start(
        &opts.exe,
        &replica_env,
        free_port(),
        Some(&dir.join("replica.log")),
    )?;
    super::stream::produce_catalogue(&opts.brokers, &fleet.setup.clicks, users, items)?;
    replica.try_wait_for(
        Duration::from_secs(1800),
        "a model over the catalogue served",
        |d| {
            metric(d, "multivaed_model_items") >= items as f64
                && metric(d, "multivaed_dirty_users") == 0.0
                && metric(d, "multivaed_events_consumed_total") >= (users * 6) as f64
        },
    )?;
    eprintln!("fleet latency: a model over {items} items served ({scoring})");
    let stages = ["store", "changelog", "to_scoring", "scoring", "delivery"];
    let stage_buckets = |d: &Daemon| -> Result<Vec<Vec<(f64, f64)>>> {
        stages
            .iter()
            .map(|s| d.buckets_of("multivaed_click_stage_seconds", &format!("stage=\"{s}\"")))
            .collect()
    };
    let inside0 = replica.buckets("multivaed_click_to_recommendation_seconds")?;
    let stages0 = stage_buckets(&replica)?;
    let stream_opts = super::stream::StreamBenchOptions {
        brokers: opts.brokers.clone(),
        ingest_events: 0,
        items,
        rates: vec![rate],
        seconds,
        exe: opts.exe.clone(),
        work_dir: dir.clone(),
    };
    let mut samples = Vec::new();
    let mut sample = || samples.push(CpuSample::take(&replica, &trainer));
    let super::stream::Measured {
        latencies: mut l,
        sent: clicks,
        achieved,
        transit,
    } = super::stream::measure(&stream_opts, &fleet.setup, users, rate, 300, &mut sample)?;
    let cpu = match samples.as_slice() {
        [start, end] => end.since(start),
        _ => bail!("the load was not sampled at its start and end"),
    };
    l.sort_by(|a, b| a.total_cmp(b));
    let inside = super::stream::bucket_delta(
        &inside0,
        &replica.buckets("multivaed_click_to_recommendation_seconds")?,
    );
    let stages = stages
        .iter()
        .zip(stages0.iter().zip(stage_buckets(&replica)?))
        .map(|(s, (before, after))| {
            let d = super::stream::bucket_delta(before, &after);
            (
                s.to_string(),
                super::stream::bucket_quantile(&d, 0.5) * 1000.0,
                super::stream::bucket_quantile(&d, 0.99) * 1000.0,
                d.last().map_or(0.0, |b| b.1),
            )
        })
        .collect();
    replica.terminate();
    trainer.terminate();
    let f = ServeLatency {
        items,
        rate,
        achieved_rate: achieved,
        clicks,
        answered: l.len(),
        p50_ms: super::stream::quantile(&l, 0.5),
        p99_ms: super::stream::quantile(&l, 0.99),
        daemon_p50_ms: super::stream::bucket_quantile(&inside, 0.5) * 1000.0,
        daemon_p99_ms: super::stream::bucket_quantile(&inside, 0.99) * 1000.0,
        transit_p50_ms: super::stream::quantile(&transit, 0.5),
        transit_p99_ms: super::stream::quantile(&transit, 0.99),
        stages,
        scoring: scoring.to_string(),
        cpu,
    };
    eprintln!(
        "fleet latency at {rate} clicks/s ({scoring}): end to end p50 {:.1} ms p99 {:.1} ms; in the replica p50 {:.1} ms p99 {:.1} ms; {} of {} answered",
        f.p50_ms, f.p99_ms, f.daemon_p50_ms, f.daemon_p99_ms, f.answered, f.clicks
    );
    eprintln!(
        "  clicks' transit (produce call → a plain consumer, no daemon): p50 {:.1} ms, p99 {:.1} ms",
        f.transit_p50_ms, f.transit_p99_ms
    );
    for (s, p50, p99, n) in &f.stages {
        eprintln!("  stage {s}: p50 {p50:.2} ms, p99 {p99:.2} ms ({n} observations)");
    }
    let c = &f.cpu;
    eprintln!(
        "  cores in use: the machine {:.2}: the replica {:.2}, the trainer {:.2}, the benchmark {:.2}, the rest (the broker) {:.2}",
        c.machine, c.replica, c.trainer, c.benchmark, c.rest
    );
    Ok(f)
}
