//! `multivaed demo` and `multivaed produce`: a synthetic click stream with latent structure, an
//! embedded Kafka-protocol broker (librdkafka's mock cluster), and replay of dataset files.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rand::{Rng, SeedableRng};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use crate::eval::{read_raw, RawFormat};
use crate::wire::{now_ms, ClickEvent};

/// A synthetic stream: users belong to one of `clusters` taste groups, each with its own slice
/// of the catalogue; 85% of a user's clicks fall in their group's slice (skewed towards its head),
/// the rest anywhere. A model that learns the groups beats popularity by far.
pub struct SyntheticStream {
    rng: rand::rngs::StdRng,
    pub n_users: usize,
    pub n_items: usize,
    pub clusters: usize,
}

impl SyntheticStream {
    pub fn new(n_users: usize, n_items: usize, clusters: usize, seed: u64) -> Self {
        Self {
            rng: rand::rngs::StdRng::seed_from_u64(seed),
            n_users,
            n_items,
            clusters: clusters.max(1),
        }
    }

    /// The taste group of a user.
    pub(crate) fn cluster_of(&self, user: usize) -> usize {
        user % self.clusters
    }

    /// The next (user, item) click.
    pub fn next_click(&mut self) -> (usize, usize) {
        let user = self.rng.gen_range(0..self.n_users);
        let item = self.item_for(user);
        (user, item)
    }

    /// A click of `user`.
    pub fn item_for(&mut self, user: usize) -> usize {
        let slice = (self.n_items / self.clusters).max(1);
        if self.rng.gen_bool(0.85) {
            let c = self.cluster_of(user);
            let r: f64 = self.rng.gen();
            (c * slice + (r * r * slice as f64) as usize).min(self.n_items - 1)
        } else {
            self.rng.gen_range(0..self.n_items)
        }
    }
}

/// Produces `messages` to `topic` at about `rate` per second (0: as fast as possible), keyed by
/// user id; `on_progress` sees the count sent so far.
pub(crate) async fn produce_at_rate(
    producer: &FutureProducer,
    topic: &str,
    messages: impl Iterator<Item = ClickEvent>,
    rate: f64,
    mut on_progress: impl FnMut(u64),
) -> Result<u64> {
    let start = Instant::now();
    let mut sent = 0u64;
    let mut pending = futures::stream::FuturesUnordered::new();
    use futures::StreamExt;
    for m in messages {
        if rate > 0.0 {
            let due = start + Duration::from_secs_f64(sent as f64 / rate);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                tokio::time::sleep(wait).await;
            }
        }
        let payload = m.to_json();
        let key = m.user_id.clone();
        let producer = producer.clone();
        let topic = topic.to_string();
        pending.push(async move {
            producer
                .send(
                    FutureRecord::to(&topic).key(&key).payload(&payload),
                    Duration::from_secs(30),
                )
                .await
                .map_err(|(e, _)| e)
        });
        sent += 1;
        while pending.len() >= 10_000 {
            if let Some(r) = pending.next().await {
                r.context("cannot produce a click")?;
            }
        }
        if sent.is_multiple_of(1000) {
            on_progress(sent);
        }
    }
    while let Some(r) = pending.next().await {
        r.context("cannot produce a click")?;
    }
    on_progress(sent);
    Ok(sent)
}

/// Click messages from a dataset file, in timestamp order (ratings below `min_rating` skipped).
pub fn dataset_messages(
    path: &std::path::Path,
    format: Option<RawFormat>,
    min_rating: Option<f64>,
) -> Result<Vec<ClickEvent>> {
    let format = format.unwrap_or_else(|| RawFormat::from_path(path));
    let mut raw = read_raw(path, format)?;
    if let Some(t) = min_rating {
        raw.retain(|r| r.rating.is_none_or(|x| x >= t));
    }
    raw.sort_by(|a, b| {
        a.timestamp
            .unwrap_or(0.0)
            .total_cmp(&b.timestamp.unwrap_or(0.0))
    });
    Ok(raw
        .into_iter()
        .map(|r| {
            // seconds (MovieLens) become milliseconds
            let ts = r
                .timestamp
                .map(|t| if t < 1e11 { t * 1000.0 } else { t })
                .unwrap_or(0.0) as u64;
            ClickEvent::click(r.user, r.item, Some(if ts == 0 { now_ms() } else { ts }))
        })
        .collect())
}

/// The events that replay an export (`multivaed export`'s JSON lines) into a deployment whose
/// event types are `events`: each user's items in order, as positive events of the type whose
/// weight is the item's, then their excluded items as events of the first negative type. A
/// replay is idempotent: a repeated (user, item, type) changes nothing.
pub fn export_messages(
    path: &std::path::Path,
    events: &crate::config::EventsConfig,
) -> Result<Vec<ClickEvent>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let type_of = |w: f32| -> Option<String> {
        events
            .types
            .iter()
            .find(|(_, &tw)| tw as f32 == w)
            .map(|(t, _)| t.clone())
    };
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{}", path.display(), n + 1);
        let e: crate::store::ExportedHistory = serde_json::from_str(line)
            .with_context(|| format!("{}: not an exported history", at()))?;
        let h = e.history;
        if !h.weights.is_empty() && h.weights.len() != h.items.len() {
            bail!(
                "{}: {} weights for {} items",
                at(),
                h.weights.len(),
                h.items.len()
            );
        }
        for (j, item) in h.items.into_iter().enumerate() {
            let w = h.weights.get(j).copied().unwrap_or(1.0);
            let t = type_of(w).with_context(|| {
                format!("{}: no event type has weight {w} (events.types; give --config of the deployment)", at())
            })?;
            let mut event = ClickEvent::click(&e.user_id, item, Some(now_ms()));
            event.event_type = Some(t);
            out.push(event);
        }
        for item in h.excluded {
            let t = events.negative.first().with_context(|| {
                format!(
                    "{}: excluded items, and no negative type (events.negative)",
                    at()
                )
            })?;
            let mut event = ClickEvent::click(&e.user_id, item, Some(now_ms()));
            event.event_type = Some(t.clone());
            out.push(event);
        }
    }
    Ok(out)
}

/// Options of `multivaed demo`.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub duration: Option<Duration>,
    pub data: Option<std::path::PathBuf>,
    pub rate: f64,
    pub data_dir: Option<std::path::PathBuf>,
    pub listen: std::net::SocketAddr,
}

/// Runs the whole data path against an embedded broker and prints what happens: the daemon
/// on it, a click stream into it, a sample of the recommendations out of it, a summary line
/// every 5 s, until `--duration` (and a first model) or Ctrl-C.
pub async fn run_demo(opts: DemoOptions) -> Result<()> {
    let mock =
        rdkafka::mocking::MockCluster::new(1).context("cannot start the embedded Kafka broker")?;
    let brokers = mock.bootstrap_servers();
    let config = demo_config(&opts, &brokers)?;
    for t in [
        &config.kafka.clicks_topic,
        &config.kafka.recommendations_topic,
        &config.kafka.dead_letter_topic,
    ] {
        mock.create_topic(t, 1, 1)
            .with_context(|| format!("cannot create topic {t}"))?;
    }
    println!(
        "multivaed demo: embedded Kafka broker at {brokers}, data in {}",
        config.data_dir.display()
    );
    println!(
        "HTTP on {0}: curl -H \"Authorization: Bearer $(cat {1})\" http://{0}/v1/users/u1/recommendations",
        config.http.listen,
        config.data_dir.join("api-token").display()
    );
    let shared = crate::daemon::Daemon::open(config.clone())?;
    let daemon = tokio::spawn(shared.clone().run());
    let feeder = spawn_feeder(&brokers, &config.kafka.clicks_topic, &opts)?;
    let printer = spawn_printer(&brokers, &config.kafka.recommendations_topic)?;
    let started = Instant::now();
    report_until_done(&shared, &opts, started).await;
    shared.shutdown.trigger();
    feeder.abort();
    printer.abort();
    let result = daemon.await.context("daemon task failed")?;
    println!("summary: {}", summary_line(&shared, started.elapsed()));
    result
}

/// The demo's configuration: the embedded broker, a data directory, quick training rounds.
fn demo_config(opts: &DemoOptions, brokers: &str) -> Result<crate::config::Config> {
    let mut config = crate::config::Config::default();
    config.kafka.brokers = brokers.to_string();
    config.data_dir = match &opts.data_dir {
        Some(d) => d.clone(),
        None => tempfile_dir()?,
    };
    config.device = crate::config::DeviceChoice::Cpu;
    config.http.listen = opts.listen;
    config.train.interval = Duration::from_secs(10);
    config.train.min_new_events = 5000;
    config.train.min_users = 200;
    config.train.max_epochs_per_round = 30;
    config.train.validation_users = 100;
    config.serve.k = 10;
    Ok(config)
}

/// Produces the click stream (`--data`, or the synthetic one) at `--rate`.
fn spawn_feeder(
    brokers: &str,
    topic: &str,
    opts: &DemoOptions,
) -> Result<tokio::task::JoinHandle<Result<u64>>> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "5")
        .create()
        .context("cannot create the demo producer")?;
    let (topic, rate, data) = (topic.to_string(), opts.rate, opts.data.clone());
    Ok(tokio::spawn(async move {
        let msgs: Box<dyn Iterator<Item = ClickEvent> + Send> = match data {
            Some(path) => Box::new(dataset_messages(&path, None, Some(4.0))?.into_iter()),
            None => {
                let mut s = SyntheticStream::new(2000, 1000, 20, 7);
                Box::new(std::iter::from_fn(move || {
                    let (u, i) = s.next_click();
                    Some(ClickEvent::click(
                        format!("user-{u}"),
                        format!("item-{i}"),
                        Some(now_ms()),
                    ))
                }))
            }
        };
        produce_at_rate(&producer, &topic, msgs, rate, |_| {}).await
    }))
}

/// Consumes the recommendations and prints one every 2 s.
fn spawn_printer(brokers: &str, topic: &str) -> Result<tokio::task::JoinHandle<()>> {
    let recs: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "multivaed-demo-viewer")
        .set("auto.offset.reset", "earliest")
        .create()
        .context("cannot create the demo consumer")?;
    recs.subscribe(&[topic])?;
    Ok(tokio::spawn(async move {
        let mut last = Instant::now() - Duration::from_secs(10);
        loop {
            let Ok(m) = recs.recv().await else { continue };
            if last.elapsed() < Duration::from_secs(2) {
                continue;
            }
            last = Instant::now();
            if let Some(Ok(r)) = m
                .payload()
                .map(serde_json::from_slice::<crate::wire::Recommendation>)
            {
                let items: Vec<&str> = r.items.iter().take(5).map(|i| i.item_id.as_str()).collect();
                println!(
                    "recommendation for {}: {} … (source {}, model v{})",
                    r.user_id,
                    items.join(", "),
                    r.source.as_str(),
                    r.model_version
                        .map(|v| v.to_string())
                        .unwrap_or_else(|| "-".into())
                );
            }
        }
    }))
}

/// Prints a summary line every 5 s until Ctrl-C, a shutdown, or `--duration` — past which it
/// waits (bounded) for the first model, so the demo shows the whole path.
async fn report_until_done(shared: &crate::daemon::Daemon, opts: &DemoOptions, started: Instant) {
    let mut waiting_said = false;
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::signal::ctrl_c() => return,
        }
        println!("{}", summary_line(shared, started.elapsed()));
        if shared.shutdown.is_set() {
            return;
        }
        let Some(d) = opts.duration else { continue };
        if started.elapsed() < d {
            continue;
        }
        if shared.metrics.model_version.get() >= 1 || started.elapsed() >= d + MAX_WAIT_FOR_MODEL {
            return;
        }
        if !waiting_said {
            waiting_said = true;
            println!(
                "--duration reached without a model yet: waiting for the first one (at most {} s more)",
                MAX_WAIT_FOR_MODEL.as_secs()
            );
        }
    }
}

/// How long the demo waits past `--duration` for its first model.
const MAX_WAIT_FOR_MODEL: Duration = Duration::from_secs(300);

fn tempfile_dir() -> Result<std::path::PathBuf> {
    let d = std::env::temp_dir().join(format!("multivaed-demo-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

fn summary_line(shared: &crate::daemon::Daemon, elapsed: Duration) -> String {
    let m = &shared.metrics;
    let ms = |q: f64| {
        shared
            .latencies
            .quantile(q)
            .map(|s| format!("{:.1} ms", s * 1000.0))
            .unwrap_or_else(|| "-".into())
    };
    format!(
        "after {:.0} s: events ingested {}, users {}, items {}, users scored {}, model version {}, training rounds {}, click-to-recommendation p50 {} p99 {}",
        elapsed.as_secs_f64(),
        m.events_consumed.get(),
        shared.store.counts().users,
        shared.store.counts().items,
        shared.latencies.count(),
        m.model_version.get(),
        m.training_rounds.with_label_values(&["accepted"]).get(),
        ms(0.5),
        ms(0.99),
    )
}

/// `multivaed produce`: replays a dataset file into a topic as click events.
pub async fn run_produce(
    brokers: &str,
    topic: &str,
    messages: Vec<ClickEvent>,
    rate: f64,
    properties: &[(String, String)],
) -> Result<u64> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers).set("linger.ms", "5");
    for (k, v) in properties {
        c.set(k, v);
    }
    let producer: FutureProducer = c.create().context("cannot create the producer")?;
    let bar = indicatif::ProgressBar::new(messages.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} clicks [{elapsed_precise}<{eta_precise}] {per_sec}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let sent = produce_at_rate(&producer, topic, messages.into_iter(), rate, |n| {
        bar.set_position(n)
    })
    .await?;
    producer
        .flush(Duration::from_secs(30))
        .context("cannot flush the producer")?;
    bar.finish();
    Ok(sent)
}
