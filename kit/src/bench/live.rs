//! `multivaed bench live`: live quality on real clicks in real order. A rated data set's
//! interactions (rating ≥ `min_rating`, as clicks) sorted by time; the first `prefix` share is
//! produced at once to a fresh deployment with its shipped defaults (role `all`, or a trainer
//! and a serving replica), which gets at most `wait` to train; then, for each of the next
//! `clicks` clicks, the user's top 10 is pulled over HTTP (after their previous click was
//! stored) and the click sent. Hit@10 on those clicks, next to baselines computed on the same
//! clicks in the same order: popularity, an online item-kNN (cosine co-occurrence), and the
//! paper's Multi-VAE trained offline on the prefix for a fixed number of epochs (fold-in of the
//! same histories). Figures only: nothing here asserts a quality.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use candle_core::Device;
use multivaed::eval::{read_raw, RawFormat};
use multivaed::model::{Interactions, ModelConfig, Trainer};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rdkafka::producer::Producer;
use serde::{Deserialize, Serialize};

use crate::fleet::Fleet;
use crate::harness::{free_port, metric_value, producer_to, Daemon, Setup};

/// Which deployment the live protocol runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LiveRole {
    /// One `multivaed run` (role all).
    All,
    /// A trainer (role train) and one serving replica (role serve).
    Fleet,
}

impl LiveRole {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "all" => Ok(Self::All),
            "fleet" => Ok(Self::Fleet),
            _ => bail!("unknown role {s:?}: all or fleet"),
        }
    }
}

/// Options of `multivaed bench live`.
#[derive(Debug, Clone)]
pub struct LiveBenchOptions {
    /// The broker; `None`: the offline baselines only.
    pub brokers: Option<String>,
    /// A RecBole `.inter` file with ratings and timestamps (MovieLens-100K).
    pub data: PathBuf,
    pub min_rating: f64,
    /// Share of the time-ordered clicks produced before the measured ones.
    pub prefix: f64,
    /// Clicks measured after the prefix.
    pub clicks: usize,
    /// Longest wait between the prefix and the measured clicks.
    pub wait: Duration,
    pub roles: Vec<LiveRole>,
    pub runs: usize,
    /// Epochs of the offline reference model (each reported).
    pub reference_epochs: Vec<usize>,
    pub exe: PathBuf,
    pub work_dir: PathBuf,
}

/// One run of a deployment.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DaemonRun {
    pub role: LiveRole,
    pub run: usize,
    pub hit_at_10: f64,
    /// Pulls answered by a model (not popularity).
    pub model_answers: usize,
    pub clicks: usize,
    /// Clicks whose storing was not seen within 10 s (the next pull may have missed them).
    pub not_seen_stored: usize,
    /// Seconds from the prefix's last click stored to the first measured pull.
    pub waited_seconds: f64,
    /// The live model when measuring began, and when it ended.
    pub first_version: Option<u64>,
    pub last_version: Option<u64>,
    pub training_rounds: f64,
    pub training_epochs: f64,
}

/// Hit@10 of an offline reference.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReferenceHit {
    pub epochs: usize,
    pub hit_at_10: f64,
}

/// The whole benchmark's figures.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LiveFigures {
    pub data: String,
    pub prefix_clicks: usize,
    pub measured_clicks: usize,
    pub users: usize,
    pub items: usize,
    pub popularity: f64,
    pub item_knn: Option<f64>,
    pub reference: Vec<ReferenceHit>,
    pub runs: Vec<DaemonRun>,
}

/// A click of the data set, as ids.
#[derive(Debug, Clone)]
struct Click {
    user: String,
    item: String,
}

/// The data set's clicks in time order, split into the prefix and the measured clicks.
struct Stream {
    prefix: Vec<Click>,
    measured: Vec<Click>,
    /// Item index of every item id.
    items: HashMap<String, u32>,
}

fn read_stream(opts: &LiveBenchOptions) -> Result<Stream> {
    let raw = read_raw(&opts.data, RawFormat::Inter)?;
    let mut clicks: Vec<(f64, usize, Click)> = raw
        .into_iter()
        .enumerate()
        .filter(|(_, r)| r.rating.is_none_or(|x| x >= opts.min_rating))
        .map(|(n, r)| {
            let t = r.timestamp.unwrap_or(n as f64);
            (
                t,
                n,
                Click {
                    user: r.user,
                    item: r.item,
                },
            )
        })
        .collect();
    clicks.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let n_prefix = (clicks.len() as f64 * opts.prefix) as usize;
    let mut items = HashMap::new();
    for (_, _, c) in &clicks {
        let next = items.len() as u32;
        items.entry(c.item.clone()).or_insert(next);
    }
    let mut all = clicks.into_iter().map(|(_, _, c)| c);
    let prefix: Vec<Click> = all.by_ref().take(n_prefix).collect();
    let measured: Vec<Click> = all.take(opts.clicks).collect();
    if measured.is_empty() {
        bail!("no clicks after the prefix");
    }
    Ok(Stream {
        prefix,
        measured,
        items,
    })
}

/// Histories as they grow, for the offline baselines.
#[derive(Default)]
struct Histories {
    of: HashMap<String, Vec<u32>>,
}

impl Histories {
    fn add(&mut self, user: &str, item: u32) -> bool {
        let h = self.of.entry(user.to_string()).or_default();
        match h.binary_search(&item) {
            Ok(_) => false,
            Err(at) => {
                h.insert(at, item);
                true
            }
        }
    }

    fn get(&self, user: &str) -> &[u32] {
        self.of.get(user).map(|h| h.as_slice()).unwrap_or(&[])
    }
}

/// The top 10 of `scores` leaving out `seen` (ascending) and items scored `-inf`.
fn top10(scores: &[f32], seen: &[u32]) -> Vec<u32> {
    let mut order: Vec<u32> = (0..scores.len() as u32)
        .filter(|i| seen.binary_search(i).is_err() && scores[*i as usize] > f32::NEG_INFINITY)
        .collect();
    let k = order.len().min(10);
    if k == 0 {
        return order;
    }
    order.select_nth_unstable_by(k - 1, |a, b| {
        scores[*b as usize]
            .total_cmp(&scores[*a as usize])
            .then(a.cmp(b))
    });
    order.truncate(k);
    order
}

/// Popularity and the online item-kNN on the measured clicks, each updated by every click.
fn baselines(s: &Stream) -> (f64, Option<f64>) {
    let n = s.items.len();
    let knn = n <= 20_000;
    let mut counts = vec![0f32; n];
    let mut co = if knn { vec![0u32; n * n] } else { Vec::new() };
    let mut hist = Histories::default();
    let add = |c: &Click, counts: &mut Vec<f32>, co: &mut Vec<u32>, hist: &mut Histories| {
        let i = s.items[&c.item];
        if !hist.add(&c.user, i) {
            return;
        }
        counts[i as usize] += 1.0;
        if knn {
            for &j in hist.get(&c.user) {
                if j != i {
                    co[i as usize * n + j as usize] += 1;
                    co[j as usize * n + i as usize] += 1;
                }
            }
        }
    };
    for c in &s.prefix {
        add(c, &mut counts, &mut co, &mut hist);
    }
    let (mut pop_hits, mut knn_hits) = (0usize, 0usize);
    let mut scores = vec![0f32; n];
    for c in &s.measured {
        let target = s.items[&c.item];
        let seen = hist.get(&c.user).to_vec();
        pop_hits += usize::from(top10(&counts, &seen).contains(&target));
        if knn && !seen.is_empty() {
            scores.iter_mut().for_each(|x| *x = 0.0);
            for &k in &seen {
                let row = &co[k as usize * n..(k as usize + 1) * n];
                for (j, &c) in row.iter().enumerate() {
                    if c > 0 {
                        scores[j] += c as f32 / (counts[j] * counts[k as usize]).sqrt();
                    }
                }
            }
            // a user the neighbourhood says nothing about gets popularity, as a live kNN would
            let any = scores.iter().any(|&x| x > 0.0);
            let ranked = if any {
                top10(&scores, &seen)
            } else {
                top10(&counts, &seen)
            };
            knn_hits += usize::from(ranked.contains(&target));
        } else if knn {
            knn_hits += usize::from(top10(&counts, &seen).contains(&target));
        }
        add(c, &mut counts, &mut co, &mut hist);
    }
    let m = s.measured.len() as f64;
    (pop_hits as f64 / m, knn.then(|| knn_hits as f64 / m))
}

/// The paper's Multi-VAE trained offline on the prefix (every user), hit@10 on the measured
/// clicks after each of `epochs` (the model fixed, each user's history growing).
fn reference(s: &Stream, epochs: &[usize]) -> Result<Vec<ReferenceHit>> {
    let mut hist = Histories::default();
    for c in &s.prefix {
        hist.add(&c.user, s.items[&c.item]);
    }
    let n_items = s.items.len();
    let mut users: Vec<&String> = hist.of.keys().collect();
    users.sort();
    let train = Interactions::from_rows(users.iter().map(|u| hist.get(u).to_vec()), n_items)
        .map_err(anyhow::Error::msg)?;
    // the questions: each measured click's history before it, and its item
    let mut questions = Vec::with_capacity(s.measured.len());
    for c in &s.measured {
        let i = s.items[&c.item];
        questions.push((hist.get(&c.user).to_vec(), i));
        hist.add(&c.user, i);
    }
    let config = ModelConfig::default();
    let mut trainer = Trainer::new(&config, n_items, 1, &Device::Cpu)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let mut order: Vec<usize> = (0..train.n_users()).collect();
    let mut out = Vec::new();
    let last = epochs.iter().copied().max().unwrap_or(0);
    for epoch in 1..=last {
        order.shuffle(&mut rng);
        for batch in order.chunks(config.batch_size) {
            let rows: Vec<&[u32]> = batch.iter().map(|&u| train.row(u)).collect();
            trainer.train_step(&rows)?;
        }
        if epochs.contains(&epoch) {
            let model = trainer.model();
            let rows: Vec<&[u32]> = questions.iter().map(|(h, _)| h.as_slice()).collect();
            let recs = model.recommend(&rows, 10)?;
            let hits = recs
                .iter()
                .zip(&questions)
                .filter(|(r, (_, t))| r.iter().any(|(i, _)| i == t))
                .count();
            let hit = hits as f64 / questions.len() as f64;
            eprintln!("live: reference after {epoch} epochs: hit@10 {hit:.4}");
            out.push(ReferenceHit {
                epochs: epoch,
                hit_at_10: hit,
            });
        }
    }
    Ok(out)
}

/// A deployment under measurement: the process answering pulls, and all of its processes.
struct Deployment {
    front: Daemon,
    others: Vec<Daemon>,
    clicks_topic: String,
}

impl Deployment {
    fn start(opts: &LiveBenchOptions, brokers: &str, role: LiveRole, dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        match role {
            LiveRole::All => {
                let setup = Setup::try_new_on(brokers, dir, 1)?;
                let mut env = setup.base_env(brokers);
                env.retain(|(k, _)| k != "MULTIVAED_DATA_DIR");
                env.push((
                    "MULTIVAED_DATA_DIR".into(),
                    dir.join("data").display().to_string(),
                ));
                let front =
                    Daemon::try_start(&opts.exe, &env, free_port(), Some(&dir.join("all.log")))?;
                Ok(Self {
                    front,
                    others: Vec::new(),
                    clicks_topic: setup.clicks,
                })
            }
            LiveRole::Fleet => {
                let fleet = Fleet::named(dir, 1);
                fleet.create_on(brokers)?;
                let env = |name: &str, role: &str| {
                    let mut env = fleet.setup.base_env(brokers);
                    env.retain(|(k, _)| k != "MULTIVAED_DATA_DIR");
                    env.extend(
                        [
                            ("MULTIVAED_DATA_DIR", dir.join(name).display().to_string()),
                            ("MULTIVAED_ROLE", role.to_string()),
                            ("MULTIVAED_KAFKA__INSTANCE_ID", name.to_string()),
                            ("MULTIVAED_MODELS__TOPIC", fleet.models.clone()),
                            ("MULTIVAED_MODELS__STORE", fleet.store.clone()),
                        ]
                        .map(|(k, v)| (k.to_string(), v)),
                    );
                    env
                };
                let trainer = Daemon::try_start(
                    &opts.exe,
                    &env("trainer", "train"),
                    free_port(),
                    Some(&dir.join("trainer.log")),
                )?;
                let front = Daemon::try_start(
                    &opts.exe,
                    &env("replica", "serve"),
                    free_port(),
                    Some(&dir.join("replica.log")),
                )?;
                Ok(Self {
                    front,
                    others: vec![trainer],
                    clicks_topic: fleet.setup.clicks,
                })
            }
        }
    }

    /// The trainer: the process that trains (the front one for role all).
    fn trainer(&self) -> &Daemon {
        self.others.first().unwrap_or(&self.front)
    }
}

/// Sends one click keyed by its user.
fn send(
    p: &rdkafka::producer::ThreadedProducer<rdkafka::producer::DefaultProducerContext>,
    topic: &str,
    c: &Click,
) -> Result<()> {
    super::stream::send(p, topic, &c.user, &c.item)
}

fn metric(d: &Daemon, name: &str) -> f64 {
    d.metrics()
        .map(|t| metric_value(&t, name, ""))
        .unwrap_or(0.0)
}

/// The user's stored history over HTTP (empty when unknown).
fn history(d: &Daemon, user: &str) -> Vec<String> {
    match d.get(&format!("/v1/users/{user}/history")) {
        Some((200, body)) => serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| {
                v["items"].as_array().map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_str().map(String::from))
                        .collect()
                })
            })
            .unwrap_or_default(),
        _ => Vec::new(),
    }
}

/// Waits (bounded) until `user`'s history holds `item`.
fn wait_stored(d: &Daemon, user: &str, item: &str, limit: Duration) -> bool {
    let start = Instant::now();
    loop {
        if history(d, user).iter().any(|i| i == item) {
            return true;
        }
        if start.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// One run: the prefix, the wait, the measured clicks.
fn run_once(
    opts: &LiveBenchOptions,
    brokers: &str,
    s: &Stream,
    role: LiveRole,
    run: usize,
) -> Result<DaemonRun> {
    let dir = opts
        .work_dir
        .join(format!("live-{role:?}-{run}").to_lowercase());
    let _ = std::fs::remove_dir_all(&dir);
    let d = Deployment::start(opts, brokers, role, &dir)?;
    let p = producer_to(brokers, "5")?;
    for c in &s.prefix {
        send(&p, &d.clicks_topic, c)?;
    }
    p.flush(Duration::from_secs(60))
        .context("cannot flush the prefix")?;
    // the prefix stored: its last click is in its user's history
    let last = s.prefix.last().context("an empty prefix")?;
    if !wait_stored(&d.front, &last.user, &last.item, Duration::from_secs(300)) {
        bail!("the prefix was not stored within 300 s");
    }
    let stored_at = Instant::now();
    eprintln!(
        "live: {role:?} run {run}: prefix stored; waiting for a converged model (at most {:?})",
        opts.wait
    );
    let trainer = d.trainer();
    let stored = metric(trainer, "multivaed_store_interactions");
    while stored_at.elapsed() < opts.wait {
        let trained_on = metric(trainer, "multivaed_model_round_interactions");
        let converged = metric(trainer, "multivaed_training_converged") >= 1.0;
        let live = metric(&d.front, "multivaed_model_version") >= 1.0;
        if live && converged && trained_on >= 0.9 * stored {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let waited = stored_at.elapsed().as_secs_f64();
    let first_version = Some(metric(&d.front, "multivaed_model_version") as u64).filter(|&v| v > 0);
    eprintln!(
        "live: {role:?} run {run}: measuring after {waited:.0} s (model version {first_version:?})"
    );
    let (mut hits, mut model_answers, mut not_seen) = (0usize, 0usize, 0usize);
    for (n, c) in s.measured.iter().enumerate() {
        let rec = d
            .front
            .get(&format!("/v1/users/{}/recommendations?k=10", c.user))
            .filter(|(status, _)| *status == 200)
            .and_then(|(_, body)| {
                serde_json::from_str::<multivaed::wire::Recommendation>(&body).ok()
            });
        if let Some(r) = rec {
            hits += usize::from(r.items.iter().any(|i| i.item_id == c.item));
            model_answers += usize::from(r.model_version.is_some());
        }
        send(&p, &d.clicks_topic, c)?;
        p.flush(Duration::from_secs(10))?;
        if !wait_stored(&d.front, &c.user, &c.item, Duration::from_secs(10)) {
            not_seen += 1;
        }
        if (n + 1) % 500 == 0 {
            eprintln!(
                "live: {role:?} run {run}: {} clicks, hit@10 so far {:.4}",
                n + 1,
                hits as f64 / (n + 1) as f64
            );
        }
    }
    let last_version = Some(metric(&d.front, "multivaed_model_version") as u64).filter(|&v| v > 0);
    Ok(DaemonRun {
        role,
        run,
        hit_at_10: hits as f64 / s.measured.len() as f64,
        model_answers,
        clicks: s.measured.len(),
        not_seen_stored: not_seen,
        waited_seconds: waited,
        first_version,
        last_version,
        training_rounds: metric(trainer, "multivaed_training_rounds_total"),
        training_epochs: metric(trainer, "multivaed_training_epochs_total"),
    })
}

pub fn run_live_bench(opts: &LiveBenchOptions) -> Result<LiveFigures> {
    let s = read_stream(opts)?;
    let users: HashSet<&str> = s
        .prefix
        .iter()
        .chain(&s.measured)
        .map(|c| c.user.as_str())
        .collect();
    eprintln!(
        "live: {} prefix clicks, {} measured, {} users, {} items",
        s.prefix.len(),
        s.measured.len(),
        users.len(),
        s.items.len()
    );
    let (popularity, item_knn) = baselines(&s);
    eprintln!("live: popularity hit@10 {popularity:.4}, item-kNN {item_knn:?}");
    let reference = reference(&s, &opts.reference_epochs)?;
    let mut runs = Vec::new();
    if let Some(brokers) = &opts.brokers {
        for run in 1..=opts.runs {
            for &role in &opts.roles {
                let r = run_once(opts, brokers, &s, role, run)?;
                eprintln!("live: {role:?} run {run}: hit@10 {:.4}", r.hit_at_10);
                runs.push(r);
            }
        }
    }
    Ok(LiveFigures {
        data: opts.data.display().to_string(),
        prefix_clicks: s.prefix.len(),
        measured_clicks: s.measured.len(),
        users: users.len(),
        items: s.items.len(),
        popularity,
        item_knn,
        reference,
        runs,
    })
}

/// The figures as a markdown table.
pub fn live_table(f: &LiveFigures) -> String {
    let mut out = format!(
        "Live hit@10 on {} ({} prefix clicks, then {} measured; {} users, {} items)\n\n| ranking | hit@10 |\n|---|---|\n",
        f.data, f.prefix_clicks, f.measured_clicks, f.users, f.items
    );
    out += &format!("| popularity | {:.4} |\n", f.popularity);
    if let Some(k) = f.item_knn {
        out += &format!("| item-kNN (cosine, online) | {k:.4} |\n");
    }
    for r in &f.reference {
        out += &format!(
            "| Multi-VAE offline, {} epochs | {:.4} |\n",
            r.epochs, r.hit_at_10
        );
    }
    for r in &f.runs {
        out += &format!(
            "| multivaed {:?} run {} (defaults; v{:?}→v{:?}, waited {:.0} s) | {:.4} |\n",
            r.role, r.run, r.first_version, r.last_version, r.waited_seconds, r.hit_at_10
        );
    }
    out
}
