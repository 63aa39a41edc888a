//! One trainer for the fleet (`--role train`) against the real broker, every process a child:
//! versions shipped through an object store (a directory, and S3 through a local S3-compatible
//! server) and announced on the models topic reach every serving replica, which verify what
//! they download; a standby takes over from a killed trainer and continues the anneal; a
//! deposed trainer's late announcement is ignored; a rollback while clicks flow is served by
//! every replica and training continues from it. The tests of this file run one at a time
//! (each starts up to five processes on a small machine), alone on the machine.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;
use multivaed::demo::SyntheticStream;
use multivaed::partition::Partitioner;
use multivaed::shipping::log::{model_key, Announcement, ModelLog, Record};
use rdkafka::producer::{BaseRecord, Producer};

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The models topic as every reader reads it (records the fleet's key did not sign passed
/// over).
fn models_log(f: &Fleet) -> ModelLog {
    use multivaed::control::{ControlKey, Topic, SIGNATURE_HEADER};
    let signer = ControlKey::new(SIGNING_KEY.as_bytes());
    let mut log = ModelLog::default();
    for (offset, m) in read_all(&f.models, 1, Duration::from_millis(700))
        .into_iter()
        .enumerate()
    {
        let key = String::from_utf8_lossy(m.key.as_deref().unwrap_or_default()).into_owned();
        let value = (!m.payload.is_empty()).then_some(m.payload.as_slice());
        let signature = m.headers.get(SIGNATURE_HEADER).map(String::as_bytes);
        if signer.verify(Topic::Models, key.as_bytes(), value, signature) {
            log.apply(offset as i64, &key, value);
        } else {
            log.skip(offset as i64);
        }
    }
    log
}

/// The accepted announcements, in log order.
fn accepted(log: &ModelLog) -> Vec<Announcement> {
    log.entries()
        .filter(|e| e.accepted)
        .map(|e| e.announcement.as_ref().clone())
        .collect()
}

/// `next` was trained from `base`: its base version, and its lifelong counters strictly above
/// (the anneal continues; it never restarts).
fn assert_continues(next: &Announcement, base: &Announcement) {
    assert_eq!(
        next.base_version,
        Some(base.version),
        "v{} is trained from v{}",
        next.version,
        base.version
    );
    assert!(
        next.state.update_count > base.state.update_count
            && next.state.epochs_done > base.state.epochs_done,
        "v{} continues the anneal of v{}: update_count {} after {}, epochs {} after {}",
        next.version,
        base.version,
        next.state.update_count,
        base.state.update_count,
        next.state.epochs_done,
        base.state.epochs_done
    );
}

fn version(d: &Daemon) -> u64 {
    d.metrics()
        .map(|t| metric_value(&t, "multivaed_model_version", "") as u64)
        .unwrap_or(0)
}

/// A click stream with taste structure (users in clusters of items), keyed by user to their
/// partition, at `rate` a second until stopped. Once `measuring` is set, each new click is
/// also scored as the popularity ranking would have (top 10 of every click so far, without the
/// user's items): (hits, clicks).
struct Clicks {
    stop: Arc<AtomicBool>,
    measuring: Arc<AtomicBool>,
    popularity: Arc<Mutex<(u64, u64)>>,
    thread: Option<std::thread::JoinHandle<usize>>,
}

impl Clicks {
    fn start(f: &Fleet, users: usize, items: usize, rate: f64) -> Self {
        let (topic, partitions) = (f.setup.clicks.clone(), f.partitions);
        let stop = Arc::new(AtomicBool::new(false));
        let measuring = Arc::new(AtomicBool::new(false));
        let popularity = Arc::new(Mutex::new((0, 0)));
        let (s, m, pop) = (stop.clone(), measuring.clone(), popularity.clone());
        let thread = std::thread::spawn(move || {
            let p = producer();
            let mut stream = SyntheticStream::new(users, items, 8, 5);
            let mut seen: HashMap<usize, HashSet<usize>> = HashMap::new();
            let mut holders: HashMap<usize, usize> = HashMap::new();
            let start = Instant::now();
            let mut n = 0usize;
            while !s.load(Ordering::Acquire) {
                // every user clicks first, then the stream draws users at random
                let (u, i) = if n < users {
                    (n, stream.item_for(n))
                } else {
                    stream.next_click()
                };
                let mine = seen.entry(u).or_default();
                if !mine.contains(&i) {
                    if m.load(Ordering::Acquire) {
                        let mut ranked: Vec<(&usize, &usize)> =
                            holders.iter().filter(|(x, _)| !mine.contains(x)).collect();
                        ranked.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
                        let hit = ranked.iter().take(10).any(|(x, _)| **x == i);
                        let mut g = pop.lock().unwrap();
                        g.0 += u64::from(hit);
                        g.1 += 1;
                    }
                    mine.insert(i);
                    *holders.entry(i).or_default() += 1;
                }
                let user = format!("u{u}");
                let payload = format!(r#"{{"user_id": "{user}", "item_id": "i{i}"}}"#);
                send(
                    &p,
                    BaseRecord::to(&topic)
                        .partition(
                            Partitioner::ConsistentRandom.partition(user.as_bytes(), partitions),
                        )
                        .key(user.as_bytes())
                        .payload(payload.as_bytes()),
                );
                n += 1;
                let due = start + Duration::from_secs_f64(n as f64 / rate);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
            p.flush(Duration::from_secs(30)).unwrap();
            n
        });
        Self {
            stop,
            measuring,
            popularity,
            thread: Some(thread),
        }
    }

    fn stop(&mut self) -> usize {
        self.stop.store(true, Ordering::Release);
        self.thread.take().map(|t| t.join().unwrap()).unwrap_or(0)
    }
}

impl Drop for Clicks {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// Online hits and clicks scored at k = 10 of every model version, summed over `replicas`.
fn model_hits(replicas: &[&Daemon]) -> (f64, f64) {
    let mut out = (0.0, 0.0);
    for d in replicas {
        let text = d.metrics().unwrap();
        for l in text
            .lines()
            .filter(|l| l.contains("k=\"10\"") && !l.contains("popular"))
        {
            let v: f64 = l
                .rsplit(' ')
                .next()
                .and_then(|x| x.parse().ok())
                .unwrap_or(0.0);
            if l.starts_with("multivaed_online_hits_total") {
                out.0 += v;
            } else if l.starts_with("multivaed_online_events_scored_total") {
                out.1 += v;
            }
        }
    }
    out
}

/// Waits until the replicas together own every partition.
fn wait_owned(f: &Fleet, replicas: &[&Daemon]) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let owned: f64 = replicas
            .iter()
            .map(|d| d.metric("multivaed_partitions_owned", ""))
            .sum();
        let each = replicas
            .iter()
            .all(|d| d.metric("multivaed_partitions_owned", "") >= 1.0);
        if owned == f.partitions as f64 && each {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "partitions never split among the replicas: {owned}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// When a replica swapped in each version it loaded (Unix ms), from its log's "swapped in"
/// lines (every swap is logged, however soon the next one follows): (version, path, when).
fn swaps(d: &Daemon) -> Vec<(u64, String, u64)> {
    let log = d.log.lock().unwrap().clone();
    log.iter()
        .filter(|l| l.contains("announced model version swapped in"))
        .filter_map(|l| {
            let when = humantime::parse_rfc3339(l.split_whitespace().next()?).ok()?;
            let field = |name: &str| {
                l.split(&format!(" {name}="))
                    .nth(1)?
                    .split_whitespace()
                    .next()
                    .map(String::from)
            };
            let ms = when.duration_since(std::time::UNIX_EPOCH).ok()?.as_millis() as u64;
            Some((field("model_version")?.parse().ok()?, field("path")?, ms))
        })
        .collect()
}

/// When each replica first swapped in each version (Unix ms), read every 2 s until `done` says
/// so (at most `limit`).
fn watch_versions(
    replicas: &[&Daemon],
    seen: &mut Vec<BTreeMap<u64, u64>>,
    limit: Duration,
    mut done: impl FnMut(&[BTreeMap<u64, u64>]) -> bool,
) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        *seen = replicas
            .iter()
            .map(|d| {
                let mut first = BTreeMap::new();
                for (v, _, t) in swaps(d) {
                    first.entry(v).or_insert(t);
                }
                first
            })
            .collect();
        if done(seen) {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

fn quantile(mut xs: Vec<f64>, q: f64) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs.get(((xs.len() as f64 - 1.0) * q).round() as usize)
        .copied()
        .unwrap_or(f64::NAN)
}

#[test]
fn every_replica_serves_each_announced_version_beats_popularity_and_follows_a_rollback() {
    let _machine = the_machine_alone();
    let dir = tempfile::tempdir().unwrap();
    let f = Fleet::new(dir.path(), 6);
    let mut env = f.trainer_env(dir.path(), "t0");
    env.push(("MULTIVAED_TRAIN__MAX_EPOCHS_PER_ROUND".into(), "10".into()));
    let trainer = Daemon::start(&env, free_port());
    let replicas: Vec<Daemon> = ["r1", "r2", "r3"]
        .iter()
        .map(|n| Daemon::start(&f.replica_env(dir.path(), n), free_port()))
        .collect();
    let rs: Vec<&Daemon> = replicas.iter().collect();
    wait_owned(&f, &rs);
    let mut clicks = Clicks::start(&f, 600, 200, 250.0);

    // every replica reports every version the trainer announces, soon after its announcement
    let mut seen = Vec::new();
    let mut versions: Vec<Announcement> = Vec::new();
    let mut measured_from: Option<(f64, f64)> = None;
    let ok = watch_versions(&rs, &mut seen, Duration::from_secs(240), |seen| {
        versions = accepted(&models_log(&f));
        // the measured clicks start once every replica serves a model trained on a few
        // thousand clicks (the first ones saw only the first hundreds)
        if measured_from.is_none() && seen.iter().all(|s| s.keys().any(|&v| v >= 3)) {
            measured_from = Some(model_hits(&rs));
            clicks.measuring.store(true, Ordering::Release);
        }
        let all_seen = versions
            .iter()
            .all(|a| seen.iter().all(|s| s.contains_key(&a.version)));
        versions.len() >= 5 && all_seen && clicks.popularity.lock().unwrap().1 >= 2000
    });
    let latencies: Vec<f64> = versions
        .iter()
        .filter_map(|a| {
            let last = seen
                .iter()
                .map(|s| s.get(&a.version).copied())
                .collect::<Option<Vec<_>>>()?;
            Some(last.into_iter().max()?.saturating_sub(a.announced_unix_ms) as f64 / 1000.0)
        })
        .collect();
    eprintln!(
        "fleet: {} versions; announcement → all 3 replicas serving: p50 {:.2} s, max {:.2} s (from the announcement's timestamp to each replica's logged swap)",
        versions.len(),
        quantile(latencies.clone(), 0.5),
        quantile(latencies.clone(), 1.0)
    );
    assert!(
        ok,
        "not every version reached every replica: announced {:?}, seen {seen:?}",
        versions.iter().map(|a| a.version).collect::<Vec<_>>()
    );
    for (a, l) in versions.iter().zip(&latencies) {
        assert!(
            *l < 30.0,
            "v{} reached every replica only after {l:.1} s",
            a.version
        );
    }
    // the anneal continues version to version, each trained from the one before
    for w in versions.windows(2) {
        assert!(w[1].version > w[0].version);
        assert_continues(&w[1], &w[0]);
    }

    // the fleet's live hit rate beats popularity's on the same clicks
    let (h0, n0) = measured_from.expect("a model on every replica");
    let (h1, n1) = model_hits(&rs);
    let (pop_hits, pop_clicks) = *clicks.popularity.lock().unwrap();
    let model_rate = (h1 - h0) / (n1 - n0).max(1.0);
    let pop_rate = pop_hits as f64 / pop_clicks.max(1) as f64;
    eprintln!(
        "fleet: online hit rate @10 of the shipped models {model_rate:.3} over {} clicks; popularity on the same clicks {pop_rate:.3} over {pop_clicks}",
        n1 - n0
    );
    assert!(n1 - n0 > 500.0, "too few clicks scored online: {}", n1 - n0);
    assert!(
        model_rate > pop_rate * 1.5,
        "model {model_rate:.3} vs popularity {pop_rate:.3}"
    );

    // a rollback while clicks flow: every replica serves the old version, then the trainer's
    // next version has a new number and continues from it
    let target = versions[1].clone();
    let mut env = f.trainer_env(dir.path(), "operator");
    env.push((
        "MULTIVAED_HTTP__LISTEN".into(),
        format!("127.0.0.1:{}", free_port()),
    ));
    let asked = Instant::now();
    let asked_ms = now_ms();
    let (ok, out, err) = run_multivaed(&env, &["models", "rollback", &target.version.to_string()]);
    let command = asked.elapsed().as_secs_f64();
    assert!(ok, "rollback failed: {out}{err}");
    // every replica swaps the old version in after the command (a newer one may follow soon)
    let swapped_back = |d: &Daemon| {
        swaps(d)
            .into_iter()
            .filter(|(v, p, t)| *v == target.version && *p == target.path && *t >= asked_ms)
            .map(|(_, _, t)| t)
            .min()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !rs.iter().all(|d| swapped_back(d).is_some()) {
        assert!(
            Instant::now() < deadline,
            "not every replica served the rollback to v{}: {:?}",
            target.version,
            rs.iter().map(|d| version(d)).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let last = rs.iter().filter_map(|d| swapped_back(d)).max().unwrap();
    eprintln!(
        "fleet: rollback to v{} served by every replica {:.2} s after the command started (the command itself took {:.2} s)",
        target.version,
        (last - asked_ms) as f64 / 1000.0,
        command
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    let (next, highest) = loop {
        // the first version accepted after the rollback record, in log order
        let log = accepted(&models_log(&f));
        let at = log
            .iter()
            .rposition(|a| a.rollback && a.version == target.version)
            .expect("the rollback is on the models topic");
        let highest = log[..at].iter().map(|a| a.version).max().unwrap();
        if let Some(n) = log[at + 1..].iter().find(|a| !a.rollback) {
            break (n.clone(), highest);
        }
        assert!(
            Instant::now() < deadline,
            "no version trained after the rollback"
        );
        std::thread::sleep(Duration::from_secs(1));
    };
    assert!(
        next.version > highest,
        "v{} is a new number (above v{highest})",
        next.version
    );
    assert_continues(&next, &target);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !rs.iter().all(|d| version(d) >= next.version) {
        assert!(
            Instant::now() < deadline,
            "v{} not served everywhere",
            next.version
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    clicks.stop();
    std::thread::sleep(Duration::from_secs(2));

    // every replica published recommendations tagged with every version it served
    let mut tagged: HashMap<String, HashSet<String>> = HashMap::new();
    for m in read_all(&f.setup.recs, 1, Duration::from_secs(3)) {
        if let (Some(owner), Some(v)) = (
            m.headers.get("multivaed-owner"),
            m.headers.get("model_version"),
        ) {
            tagged.entry(owner.clone()).or_default().insert(v.clone());
        }
    }
    for r in ["r1", "r2", "r3"] {
        for a in &versions {
            assert!(
                tagged
                    .get(r)
                    .is_some_and(|t| t.contains(&a.version.to_string())),
                "{r} published nothing tagged v{}: {:?}",
                a.version,
                tagged.get(r)
            );
        }
    }
    // no version number was announced twice (a rollback re-announces an old one on purpose)
    let numbers: Vec<u64> = accepted(&models_log(&f))
        .iter()
        .filter(|a| !a.rollback)
        .map(|a| a.version)
        .collect();
    let distinct: HashSet<&u64> = numbers.iter().collect();
    assert_eq!(distinct.len(), numbers.len(), "{numbers:?}");
    let (list_ok, listing, err) = run_multivaed(&env, &["models", "list"]);
    assert!(list_ok, "{listing}{err}");
    assert!(listing.contains("current"), "{listing}");
    for d in replicas {
        d.terminate();
    }
    trainer.terminate();
}

/// Whether a process is stopped (SIGSTOP), from /proc.
fn signal(pid: u32, sig: &str) {
    let _ = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status();
}

fn active(d: &Daemon) -> bool {
    d.metric("multivaed_trainer_active", "") == 1.0
}

/// The accepted announcements of `trainer`.
fn by(log: &ModelLog, trainer: &str) -> Vec<Announcement> {
    accepted(log)
        .into_iter()
        .filter(|a| a.trainer == trainer)
        .collect()
}

fn wait_until(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_standby_takes_over_from_a_killed_trainer_and_a_thawed_deposed_one_is_ignored() {
    let _machine = the_machine_alone();
    let dir = tempfile::tempdir().unwrap();
    let f = Fleet::new(dir.path(), 4);
    let mut t0 = Daemon::start(&f.trainer_env(dir.path(), "t0"), free_port());
    t0.wait_for(Duration::from_secs(60), "t0 elected", active);
    let t1 = Daemon::start(&f.trainer_env(dir.path(), "t1"), free_port());
    let replica = Daemon::start(&f.replica_env(dir.path(), "r1"), free_port());
    let mut clicks = Clicks::start(&f, 500, 150, 250.0);
    wait_until(Duration::from_secs(120), "two versions from t0", || {
        by(&models_log(&f), "t0").len() >= 2
    });
    assert!(
        !active(&t1),
        "the standby trains nothing while t0 is active"
    );

    // t0 dies in the middle of a round: the standby announces the next version
    let rounds = || {
        t0.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains("round started"))
            .count()
    };
    let before = rounds();
    t0.wait_for(Duration::from_secs(60), "t0 in a new round", |_| {
        rounds() > before
    });
    let last_t0 = accepted(&models_log(&f)).last().cloned().unwrap();
    t0.child.kill().unwrap();
    let _ = t0.child.wait();
    let killed = Instant::now();
    t1.wait_for(Duration::from_secs(60), "t1 elected", active);
    let elected = killed.elapsed().as_secs_f64();
    wait_until(Duration::from_secs(90), "a version from t1", || {
        !by(&models_log(&f), "t1").is_empty()
    });
    let announced = killed.elapsed().as_secs_f64();
    let first_t1 = by(&models_log(&f), "t1")[0].clone();
    eprintln!(
        "failover: t0 SIGKILLed mid-round; t1 elected {elected:.1} s later, its first version (v{}) announced {announced:.1} s later (session timeout 6 s)",
        first_t1.version
    );
    assert!(first_t1.version > last_t0.version);
    assert_continues(&first_t1, &last_t0);

    // t2 waits as the only standby, freezing itself just before it announces once it is active.
    // t1 dies: t2 takes over, trains, freezes; t3 joins, t2's session expires and t3 takes over;
    // thawed, t2 writes its announcement under the deposed epoch
    let mut env2 = f.trainer_env(dir.path(), "t2");
    env2.push(("MULTIVAED_STOP_AT".into(), "ship.before_announce".into()));
    let t2 = Daemon::start(&env2, free_port());
    t2.wait_for(
        Duration::from_secs(60),
        "t2 in the group, its store read",
        |d| d.get("/readyz").is_some_and(|(s, _)| s == 200),
    );
    let mut t1 = t1;
    t1.child.kill().unwrap();
    let _ = t1.child.wait();
    let pid2 = t2.child.id();
    wait_until(
        Duration::from_secs(120),
        "t2 frozen before its announcement",
        || process_stopped(pid2),
    );
    let t3 = Daemon::start(&f.trainer_env(dir.path(), "t3"), free_port());
    wait_until(Duration::from_secs(120), "a version from t3", || {
        !by(&models_log(&f), "t3").is_empty()
    });
    let served = by(&models_log(&f), "t3")[0].clone();
    replica.wait_for(
        Duration::from_secs(30),
        "the replica serves t3's version",
        |d| version(d) == served.version,
    );
    signal(pid2, "-CONT");
    // thawed, t2 writes its announcement: t3's taking over the transactional id fenced t2's
    // producer, so the broker refuses it and no reader ever sees it
    t2.wait_for(
        Duration::from_secs(60),
        "t2's late announcement refused by the broker",
        |d| d.log_contains("the announcement was refused by the broker"),
    );
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        models_log(&f)
            .entries()
            .all(|e| e.announcement.trainer != "t2"),
        "t2's late announcement reached the models topic"
    );
    assert!(
        version(&replica) >= served.version,
        "the replica moved off t3's version"
    );
    assert!(version(&replica) >= served.version);
    clicks.stop();

    // no version number was announced twice; every trainer's accepted versions continue the one
    // before
    let all = accepted(&models_log(&f));
    let numbers: Vec<u64> = all.iter().map(|a| a.version).collect();
    let distinct: HashSet<&u64> = numbers.iter().collect();
    assert_eq!(distinct.len(), numbers.len(), "{numbers:?}");
    for w in all.windows(2) {
        assert!(
            w[1].state.update_count > w[0].state.update_count,
            "{numbers:?}"
        );
    }
    for d in [replica, t2, t3] {
        d.terminate();
    }
}

/// The active trainer is killed while the standby's follower of the models topic is behind (each
/// record it reads takes 5 s, and a second trainer's claim of a newer epoch is far down the
/// topic): elected, the standby reads the topic to its end before claiming, so its epoch is
/// above every claim, and it announces a version above and continuing the last one within a
/// bound.
#[test]
fn a_standby_that_is_behind_when_the_active_trainer_dies_trains_within_a_bound() {
    let _machine = the_machine_alone();
    let dir = tempfile::tempdir().unwrap();
    let f = Fleet::new(dir.path(), 4);
    let replica = Daemon::start(&f.replica_env(dir.path(), "r1"), free_port());
    let mut clicks = Clicks::start(&f, 500, 150, 250.0);
    // t0 trains under epoch 1, dies; t0b takes over under epoch 2 and trains
    let mut t0 = Daemon::start(&f.trainer_env(dir.path(), "t0"), free_port());
    wait_until(Duration::from_secs(120), "a version from t0", || {
        !by(&models_log(&f), "t0").is_empty()
    });
    t0.child.kill().unwrap();
    let _ = t0.child.wait();
    let mut t0b = Daemon::start(&f.trainer_env(dir.path(), "t0b"), free_port());
    wait_until(Duration::from_secs(120), "a version from t0b", || {
        !by(&models_log(&f), "t0b").is_empty()
    });
    // t1 joins with a slow follower, and t0b dies at once
    let mut env1 = f.trainer_env(dir.path(), "t1");
    env1.push(("MULTIVAED_DELAY_AT".into(), "models-reader:5000".into()));
    let t1 = Daemon::start(&env1, free_port());
    let last_t0 = accepted(&models_log(&f)).last().cloned().unwrap();
    assert_eq!(last_t0.epoch, 2, "t0b trained under the second epoch");
    t0b.child.kill().unwrap();
    let _ = t0b.child.wait();
    let killed = Instant::now();
    t1.wait_for(Duration::from_secs(60), "t1 elected", active);
    let elected = killed.elapsed().as_secs_f64();
    wait_until(Duration::from_secs(120), "a version from t1", || {
        !by(&models_log(&f), "t1").is_empty()
    });
    let announced = killed.elapsed().as_secs_f64();
    let first_t1 = by(&models_log(&f), "t1")[0].clone();
    eprintln!(
        "failover from behind: t1 elected {elected:.1} s after t0b's death, its first version (v{}, epoch {}) announced after {announced:.1} s; t0b's last v{} (epoch {})",
        first_t1.version, first_t1.epoch, last_t0.version, last_t0.epoch
    );
    assert!(first_t1.epoch > last_t0.epoch, "t1 claimed no newer epoch");
    assert!(
        first_t1.version > last_t0.version,
        "t1 announced an old version number"
    );
    assert_continues(&first_t1, &last_t0);
    replica.wait_for(
        Duration::from_secs(30),
        "the replica serves t1's version",
        |d| version(d) >= first_t1.version,
    );
    clicks.stop();
    for d in [replica, t1] {
        d.terminate();
    }
}

/// Writes an operator's announcement (a rollback record) pointing at `path` with `a`'s files.
fn announce_at(f: &Fleet, a: &Announcement, epoch: u64, path: &str) {
    let mut r = a.clone();
    r.path = path.to_string();
    r.epoch = epoch;
    r.rollback = true;
    r.trainer = "test".into();
    r.announced_unix_ms = now_ms();
    let value = serde_json::to_vec(&Record::Model(Box::new(r.clone()))).unwrap();
    produce_keyed(&f.models, &model_key(&r), &value);
}

/// Writes a models-topic record as an operator holding the fleet's key.
fn produce_keyed(topic: &str, key: &str, value: &[u8]) {
    write_control_record(
        topic,
        multivaed::control::Topic::Models,
        key,
        Some(value),
        Some(SIGNING_KEY),
    );
}

fn copy_folder(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn a_truncated_or_altered_version_is_refused_and_the_previous_keeps_serving() {
    let _machine = the_machine_alone();
    let dir = tempfile::tempdir().unwrap();
    let f = Fleet::new(dir.path(), 2);
    let trainer = Daemon::start(&f.trainer_env(dir.path(), "t0"), free_port());
    let replica = Daemon::start(&f.replica_env(dir.path(), "r1"), free_port());
    let mut clicks = Clicks::start(&f, 400, 120, 250.0);
    replica.wait_for(Duration::from_secs(120), "a model served", |d| {
        version(d) > 0
    });
    clicks.stop();
    // no more versions: what is served now stays unless the test announces something
    trainer.terminate();
    let log = models_log(&f);
    let good = log.current().unwrap().as_ref().clone();
    let epoch = log.epoch().0;
    replica.wait_for(Duration::from_secs(30), "the current version served", |d| {
        version(d) == good.version
    });
    let store = std::path::Path::new(&f.store);
    let refused = |d: &Daemon| d.metric("multivaed_model_loads_total", "result=\"refused\"");
    let published = |d: &Daemon| {
        d.metric(
            "multivaed_recommendations_published_total",
            "source=\"model\"",
        )
    };

    // a truncated weights file
    copy_folder(&store.join(&good.path), &store.join("damaged-truncated"));
    let weights = store.join("damaged-truncated").join(&good.model.name);
    let len = std::fs::metadata(&weights).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&weights)
        .unwrap()
        .set_len(len - 100)
        .unwrap();
    announce_at(&f, &good, epoch, "damaged-truncated");
    replica.wait_for(Duration::from_secs(30), "the truncated file refused", |d| {
        refused(d) >= 1.0
    });
    assert!(
        replica.log_contains("truncated"),
        "the refusal names the cause"
    );
    // a file of the right size with one byte changed
    copy_folder(&store.join(&good.path), &store.join("damaged-altered"));
    let weights = store.join("damaged-altered").join(&good.model.name);
    let mut bytes = std::fs::read(&weights).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&weights, bytes).unwrap();
    announce_at(&f, &good, epoch, "damaged-altered");
    replica.wait_for(Duration::from_secs(30), "the altered file refused", |d| {
        refused(d) >= 2.0
    });
    assert!(
        replica.log_contains("sha256"),
        "the refusal names the digest"
    );

    // the previous version keeps serving: new clicks (on items it does not know) of users it
    // has scored (their history holds an item it knows) get its recommendations
    assert_eq!(version(&replica), good.version);
    let scored: Vec<String> = {
        let mut by_model = std::collections::BTreeSet::new();
        for m in read_all(&f.setup.recs, 1, Duration::from_secs(2)) {
            let rec: serde_json::Value = serde_json::from_slice(&m.payload).unwrap_or_default();
            if rec["source"] == "model" {
                by_model.insert(
                    String::from_utf8_lossy(m.key.as_deref().unwrap_or_default()).into_owned(),
                );
            }
        }
        by_model.into_iter().take(20).collect()
    };
    assert_eq!(scored.len(), 20, "users the served model scored");
    let before = published(&replica);
    let p = producer();
    for (u, user) in scored.iter().enumerate() {
        send(
            &p,
            BaseRecord::to(&f.setup.clicks)
                .partition(Partitioner::ConsistentRandom.partition(user.as_bytes(), f.partitions))
                .key(user.as_bytes())
                .payload(format!(r#"{{"user_id": "{user}", "item_id": "fresh-{u}"}}"#).as_bytes()),
        );
    }
    p.flush(Duration::from_secs(30)).unwrap();
    replica.wait_for(
        Duration::from_secs(30),
        "recommendations from the served model",
        |d| published(d) >= before + 20.0,
    );
    assert_eq!(version(&replica), good.version);
    assert_eq!(
        replica.metric("multivaed_model_announced_version", "") as u64,
        good.version
    );
    replica.terminate();
}

#[test]
fn versions_travel_through_s3() {
    let _machine = the_machine_alone();
    let port = free_port();
    let mut moto = std::process::Command::new("moto_server")
        .args(["-p", &port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("moto_server (installed by scripts/tools.sh, which scripts/test.sh runs)");
    let endpoint = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while ureq::put(&format!("{endpoint}/fleet-models"))
        .call()
        .is_err()
    {
        assert!(Instant::now() < deadline, "moto_server did not answer");
        std::thread::sleep(Duration::from_millis(200));
    }
    let dir = tempfile::tempdir().unwrap();
    let mut f = Fleet::new(dir.path(), 2);
    f.store = "s3://fleet-models/multivaed".into();
    let s3 = [
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_REGION", "us-east-1"),
        ("AWS_ENDPOINT", endpoint.as_str()),
        ("AWS_ALLOW_HTTP", "true"),
    ];
    let with_s3 = |mut env: Vec<(String, String)>| {
        env.extend(s3.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        env
    };
    // old versions are pruned at once: two kept
    let mut env = with_s3(f.trainer_env(dir.path(), "t0"));
    env.push(("MULTIVAED_TRAIN__KEEP_VERSIONS".into(), "2".into()));
    env.push(("MULTIVAED_MODELS__KEEP_ANNOUNCED_FOR".into(), "0s".into()));
    let trainer = Daemon::start(&env, free_port());
    let replica = Daemon::start(&with_s3(f.replica_env(dir.path(), "r1")), free_port());
    let mut clicks = Clicks::start(&f, 400, 120, 250.0);
    replica.wait_for(
        Duration::from_secs(180),
        "four versions loaded from S3",
        |d| d.metric("multivaed_model_loads_total", "result=\"ok\"") >= 4.0,
    );
    clicks.stop();
    // no round after this one: what is pruned stays pruned
    trainer.terminate();
    let log = models_log(&f);
    let current = log.current().unwrap().as_ref().clone();
    assert!(
        current.uri.starts_with("s3://fleet-models/multivaed/"),
        "{}",
        current.uri
    );
    // the files are in the bucket, as announced; the pruned versions' are gone, and their
    // announcements too
    let bucket = object_store::aws::AmazonS3Builder::new()
        .with_bucket_name("fleet-models")
        .with_endpoint(&endpoint)
        .with_allow_http(true)
        .with_region("us-east-1")
        .with_access_key_id("testing")
        .with_secret_access_key("testing")
        .build()
        .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (items, folders) = rt
        .block_on(async {
            use futures::TryStreamExt;
            use object_store::ObjectStore;
            let path = object_store::path::Path::from(format!(
                "multivaed/{}/{}",
                current.path, current.items.name
            ));
            let items = bucket.get(&path).await?.bytes().await?;
            let all: Vec<object_store::ObjectMeta> = bucket
                .list(Some(&object_store::path::Path::from("multivaed")))
                .try_collect()
                .await?;
            let folders: HashSet<String> = all
                .iter()
                .filter_map(|m| m.location.as_ref().split('/').nth(1).map(String::from))
                .collect();
            Ok::<_, object_store::Error>((items, folders))
        })
        .expect("the bucket answers");
    current.items.verify(&items).unwrap();
    let present: HashSet<String> = log.entries().map(|e| e.announcement.path.clone()).collect();
    assert!(log.highest_version() >= 4);
    assert!(present.len() <= 2, "announcements left: {present:?}");
    assert_eq!(
        folders, present,
        "the bucket holds the announced versions' folders only"
    );
    let mut env = with_s3(f.trainer_env(dir.path(), "operator"));
    env.push((
        "MULTIVAED_HTTP__LISTEN".into(),
        format!("127.0.0.1:{}", free_port()),
    ));
    let (ok, listing, err) = run_multivaed(&env, &["models", "list"]);
    assert!(ok, "{listing}{err}");
    assert_eq!(
        listing.lines().filter(|l| l.ends_with("| ok |")).count(),
        present.len(),
        "every version listed has its files in the bucket: {listing}"
    );
    replica.terminate();
    let _ = moto.kill();
    let _ = moto.wait();
}

/// A user's latest recommendation by the documented rule (the highest (epoch, offset) stamp).
struct LatestRec {
    stamp: (u64, i64),
    owner: String,
    version: Option<u64>,
}

/// Each user's latest recommendation, and each partition's owner (the highest epoch seen on it).
fn latest_by_rule(f: &Fleet) -> (HashMap<String, LatestRec>, HashMap<i32, String>) {
    let mut latest: HashMap<String, LatestRec> = HashMap::new();
    let mut owners: HashMap<i32, (u64, String)> = HashMap::new();
    for m in read_all(&f.setup.recs, 1, Duration::from_secs(3)) {
        let header = |k: &str| m.headers.get(k).cloned().unwrap_or_default();
        let (Ok(p), Ok(e), Ok(o)) = (
            header("multivaed-partition").parse::<i32>(),
            header("multivaed-epoch").parse::<u64>(),
            header("multivaed-offset").parse::<i64>(),
        ) else {
            continue;
        };
        let owner = header("multivaed-owner");
        let user = String::from_utf8_lossy(m.key.as_deref().unwrap_or_default()).into_owned();
        let rec: serde_json::Value = serde_json::from_slice(&m.payload).unwrap_or_default();
        if latest.get(&user).is_none_or(|l| (e, o) >= l.stamp) {
            let version = rec["model_version"].as_u64();
            latest.insert(
                user,
                LatestRec {
                    stamp: (e, o),
                    owner: owner.clone(),
                    version,
                },
            );
        }
        if owners.get(&p).is_none_or(|(high, _)| e > *high) {
            owners.insert(p, (e, owner));
        }
    }
    let owners = owners.into_iter().map(|(p, (_, o))| (p, o)).collect();
    (latest, owners)
}

#[test]
fn idle_users_of_a_moved_partition_get_the_new_owners_recommendation_from_the_next_version() {
    let _machine = the_machine_alone();
    let dir = tempfile::tempdir().unwrap();
    let f = Fleet::new(dir.path(), 2);
    let _trainer = Daemon::start(&f.trainer_env(dir.path(), "t0"), free_port());
    let a = Daemon::start(&f.replica_env(dir.path(), "ra"), free_port());
    // 300 users click (taste structure) until a model serves them, then stay idle for good
    let mut clicks = Clicks::start(&f, 300, 200, 400.0);
    a.wait_for(Duration::from_secs(120), "a model version", |d| {
        version(d) >= 1
    });
    std::thread::sleep(Duration::from_secs(3));
    clicks.stop();
    a.wait_for(Duration::from_secs(30), "the last clicks answered", |d| {
        d.metric("multivaed_dirty_users", "") == 0.0
    });
    // a second replica takes one partition over (restored from the changelog)
    let b = Daemon::start(&f.replica_env(dir.path(), "rb"), free_port());
    wait_owned(&f, &[&a, &b]);
    let at_move = version(&a).max(version(&b));
    // other users' clicks make the next version; the first 300 users stay idle
    let p = producer();
    let mut stream = SyntheticStream::new(300, 200, 8, 9);
    for n in 0..3000 {
        let (u, i) = stream.next_click();
        let user = format!("new{u}");
        let payload = format!(r#"{{"user_id": "{user}", "item_id": "i{i}"}}"#);
        let part = Partitioner::ConsistentRandom.partition(user.as_bytes(), f.partitions);
        send(
            &p,
            BaseRecord::to(&f.setup.clicks)
                .partition(part)
                .key(user.as_bytes())
                .payload(payload.as_bytes()),
        );
        if n % 500 == 0 {
            p.flush(Duration::from_secs(10)).unwrap();
        }
    }
    p.flush(Duration::from_secs(30)).unwrap();
    b.wait_for(Duration::from_secs(120), "a version after the move", |d| {
        version(d) > at_move
    });
    let next = version(&b);
    // the re-scorings of the swap published (500 a second at most: well under 2 s here)
    std::thread::sleep(Duration::from_secs(4));
    let (latest, owners) = latest_by_rule(&f);
    let moved: Vec<i32> = owners
        .iter()
        .filter(|(_, o)| o.as_str() == "rb")
        .map(|(p, _)| *p)
        .collect();
    assert_eq!(moved.len(), 1, "rb owns one partition: {owners:?}");
    let idle: Vec<String> = (0..300)
        .map(|u| format!("u{u}"))
        .filter(|u| {
            moved.contains(&Partitioner::ConsistentRandom.partition(u.as_bytes(), f.partitions))
        })
        .collect();
    assert!(idle.len() > 50, "{} idle users moved", idle.len());
    let current = |u: &String| {
        latest
            .get(u)
            .is_some_and(|l| l.owner == "rb" && l.version.is_some_and(|v| v >= next))
    };
    let stale: Vec<String> = idle
        .iter()
        .filter(|u| !current(u))
        .map(|u| match latest.get(u) {
            Some(l) => format!("{u}: {} v{:?}", l.owner, l.version),
            None => format!("{u}: none"),
        })
        .collect();
    assert!(
        stale.is_empty(),
        "{} of {} idle users of the moved partition lack rb's recommendation from v{next} or later (moved at v{at_move}), e.g. {:?}",
        stale.len(),
        idle.len(),
        &stale[..stale.len().min(3)]
    );
}

/// Records any writer to the control topics can produce, without the fleet's key or out of
/// bounds, steer nothing: a forged rollback and a forged trainer claim are ignored by both
/// replicas and the trainer (which keeps training and shipping), a `u64::MAX` epoch wraps
/// nothing, forged member records change no redirect, and an announcement of a 10 GB file is
/// refused before any byte is read.
#[test]
fn forged_control_records_steer_nothing() {
    use multivaed::control::Topic;
    let _machine = the_machine_alone();
    let dir = tempfile::tempdir().unwrap();
    let f = Fleet::new(dir.path(), 2);
    let trainer = Daemon::start(&f.trainer_env(dir.path(), "t0"), free_port());
    let r1 = Daemon::start(&f.replica_env(dir.path(), "r1"), free_port());
    let r2 = Daemon::start(&f.replica_env(dir.path(), "r2"), free_port());
    let mut clicks = Clicks::start(&f, 400, 120, 250.0);
    r1.wait_for(Duration::from_secs(180), "a second version served", |d| {
        version(d) >= 2
    });
    clicks.stop();
    let settled = |what: &str| {
        wait_until(Duration::from_secs(30), what, || {
            let log = models_log(&f);
            let current = log.current().map_or(0, |a| a.version);
            version(&r1) == current && version(&r2) == current
        })
    };
    settled("both replicas serve the current version");
    let log = models_log(&f);
    let (served, (epoch, _)) = (log.current().unwrap().as_ref().clone(), log.epoch());
    let first = accepted(&log)[0].clone();
    assert!(first.version < served.version);
    let everyone = [&trainer, &r1, &r2];
    let refused = |d: &Daemon, topic: &str, reason: &str| {
        d.metric(
            "multivaed_control_records_refused_total",
            &format!("reason=\"{reason}\",topic=\"{topic}\""),
        )
    };

    // a stranger's rollback to the first version and claim of the next epoch: unsigned
    let mut rollback = first.clone();
    rollback.epoch = epoch;
    rollback.rollback = true;
    rollback.trainer = "rollback".into();
    rollback.announced_unix_ms = now_ms();
    let value = serde_json::to_vec(&Record::Model(Box::new(rollback.clone()))).unwrap();
    write_control_record(
        &f.models,
        Topic::Models,
        &model_key(&rollback),
        Some(&value),
        None,
    );
    let claim = |e: u64| {
        serde_json::to_vec(&Record::Claim {
            epoch: e,
            trainer: "forger".into(),
            at_unix_ms: now_ms(),
        })
        .unwrap()
    };
    let next = claim(epoch + 1);
    write_control_record(
        &f.models,
        Topic::Models,
        &format!("claim-{:020}-forger", epoch + 1),
        Some(&next),
        None,
    );
    // a claim of u64::MAX, even signed with the fleet's key (a bug, a leaked key): out of bounds
    let max = claim(u64::MAX);
    write_control_record(
        &f.models,
        Topic::Models,
        "claim-max-forger",
        Some(&max),
        Some(SIGNING_KEY),
    );
    for d in everyone {
        d.wait_for(Duration::from_secs(30), "the forged records read", |d| {
            refused(d, "models", "signature") >= 2.0 && refused(d, "models", "bound") >= 1.0
        });
    }
    // (the trainer may ship one more version from the clicks still in flight: never the first)
    for d in [&r1, &r2] {
        assert!(
            version(d) >= served.version,
            "a replica followed the forged rollback"
        );
        let swaps_of_first = d
            .log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains("swapped in") && l.contains(&format!("path={} ", first.path)))
            .count();
        assert!(swaps_of_first <= 1, "a replica loaded the forged rollback");
    }
    assert!(active(&trainer), "the trainer stays active");
    assert_eq!(trainer.metric("multivaed_trainer_epoch", "") as u64, epoch);

    // the trainer keeps training and shipping under its epoch; the replicas serve what it ships
    let mut clicks = Clicks::start(&f, 400, 120, 250.0);
    r1.wait_for(Duration::from_secs(120), "a newer version served", |d| {
        version(d) > served.version
    });
    clicks.stop();
    settled("both replicas serve the newest version");
    let log = models_log(&f);
    let newest = log.current().unwrap().as_ref().clone();
    assert_eq!((newest.trainer.as_str(), newest.epoch), ("t0", epoch));

    // forged member records: unsigned; signed but elsewhere; signed, local, epoch u64::MAX
    let owner_of = |d: &Daemon, user: &str| -> (u16, Option<String>) {
        let agent = ureq::AgentBuilder::new().redirects(0).build();
        let url = format!("http://127.0.0.1:{}/v1/users/{user}/history", d.port);
        match authorized(agent.get(&url)).call() {
            Ok(r) => (r.status(), r.header("location").map(str::to_string)),
            Err(ureq::Error::Status(s, r)) => (s, r.header("location").map(str::to_string)),
            Err(e) => panic!("{url}: {e}"),
        }
    };
    let users: Vec<String> = (0..400).map(|u| format!("u{u}")).collect();
    let redirected = |d: &Daemon| -> Vec<(String, Option<String>)> {
        users
            .iter()
            .step_by(13)
            .map(|u| (u.clone(), owner_of(d, u)))
            .filter(|(_, (s, _))| *s == 307)
            .map(|(u, (_, l))| (u, l))
            .collect()
    };
    // a replica's API answers no one without a token, on either route
    for path in ["/v1/users/u1/history", "/v1/users/u1/recommendations"] {
        let url = format!("http://127.0.0.1:{}{path}", r1.port);
        match ureq::get(&url).call() {
            Err(ureq::Error::Status(401, r)) => {
                assert!(r.header("www-authenticate").is_some(), "{path}");
                assert!(
                    !r.into_string().unwrap_or_default().contains("\"i"),
                    "{path}"
                );
            }
            other => panic!("{path} without a token: {other:?}"),
        }
    }
    let before = (redirected(&r1), redirected(&r2));
    assert!(!before.0.is_empty() && !before.1.is_empty(), "{before:?}");
    let member = |http: &str, epoch: u64| {
        serde_json::to_vec(&serde_json::json!({
            "http": http,
            "partitions": [[0, epoch], [1, epoch]],
        }))
        .unwrap()
    };
    let evil = member("http://evil.example:80", 1 << 40);
    write_control_record(&f.members, Topic::Members, "r2", Some(&evil), None);
    write_control_record(
        &f.members,
        Topic::Members,
        "forger",
        Some(&evil),
        Some(SIGNING_KEY),
    );
    let local = member("http://127.0.0.1:1", u64::MAX);
    write_control_record(
        &f.members,
        Topic::Members,
        "forger2",
        Some(&local),
        Some(SIGNING_KEY),
    );
    for d in [&r1, &r2] {
        d.wait_for(Duration::from_secs(30), "the forged members read", |d| {
            refused(d, "members", "signature") >= 1.0
                && refused(d, "members", "address") >= 1.0
                && refused(d, "members", "bound") >= 1.0
        });
    }
    assert_eq!(
        (redirected(&r1), redirected(&r2)),
        before,
        "no redirect changed"
    );

    // an operator's (signed) announcement of a 10 GB file: refused before any byte is read (the
    // file does not even exist), and the served version stays
    let mut huge = newest.clone();
    huge.path = "v9999999999-e1-huge".into();
    huge.model.bytes = 10_000_000_000;
    huge.rollback = true;
    huge.trainer = "test".into();
    huge.announced_unix_ms = now_ms();
    let value = serde_json::to_vec(&Record::Model(Box::new(huge.clone()))).unwrap();
    write_control_record(
        &f.models,
        Topic::Models,
        &model_key(&huge),
        Some(&value),
        Some(SIGNING_KEY),
    );
    for d in [&r1, &r2] {
        d.wait_for(Duration::from_secs(30), "the huge version refused", |d| {
            d.metric("multivaed_model_loads_total", "result=\"refused\"") >= 1.0
        });
        assert!(d.log_contains("more than models.max_file_bytes"));
        let swapped_huge = d
            .log
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("swapped in") && l.contains(&format!("path={} ", huge.path)));
        assert!(!swapped_huge, "a replica swapped in the huge version");
    }
    // (clicks still in flight may have given the trainer one more round: the replicas serve the
    // newest version it shipped, whichever that is)
    let shipped = accepted(&models_log(&f))
        .iter()
        .filter(|a| a.trainer == "t0" && !a.rollback)
        .map(|a| a.version)
        .max()
        .unwrap();
    assert!(shipped >= newest.version);
    for d in [&r1, &r2] {
        d.wait_for(
            Duration::from_secs(30),
            "the trainer's newest version served",
            |d| version(d) == shipped,
        );
    }
    for d in [r1, r2, trainer] {
        d.terminate();
    }
}

/// Live-gated promotion's settings for a quick test: a quarter of the users in a canary's
/// slice, a wide margin (the mechanism is under test here; the test's statistics are the unit
/// tests'), reports every 3 s (the test reads the models topic until it is idle for 0.7 s).
const PROMOTION: [(&str, &str); 6] = [
    ("MULTIVAED_PROMOTION__ENABLED", "true"),
    ("MULTIVAED_PROMOTION__CANARY_FRACTION", "0.25"),
    ("MULTIVAED_PROMOTION__REPORT_INTERVAL", "3s"),
    ("MULTIVAED_PROMOTION__MIN_TRIALS", "100"),
    ("MULTIVAED_PROMOTION__MARGIN", "0.25"),
    ("MULTIVAED_PROMOTION__MAX_DURATION", "10m"),
];

/// Each published recommendation (not a withdrawal): user, model version, canary flag.
fn recommendations(f: &Fleet) -> Vec<(String, Option<u64>, bool)> {
    read_all(&f.setup.recs, 1, Duration::from_millis(700))
        .into_iter()
        .filter(|m| !m.payload.is_empty())
        .map(|m| {
            let r: multivaed::wire::Recommendation = serde_json::from_slice(&m.payload).unwrap();
            (r.user_id, r.model_version, r.canary)
        })
        .collect()
}

#[test]
fn a_bad_canary_serves_only_its_slice_is_rolled_back_and_a_good_one_is_promoted() {
    use multivaed::promotion::{in_slice, Decided};
    let _machine = the_machine_alone();
    let dir = tempfile::tempdir().unwrap();
    let f = Fleet::new(dir.path(), 4);
    let promotion = PROMOTION.map(|(k, v)| (k.to_string(), v.to_string()));
    let replicas: Vec<Daemon> = ["r1", "r2"]
        .iter()
        .map(|n| {
            let mut env = f.replica_env(dir.path(), n);
            env.extend(promotion.iter().cloned());
            Daemon::start(&env, free_port())
        })
        .collect();
    let rs: Vec<&Daemon> = replicas.iter().collect();
    wait_owned(&f, &rs);
    let mut clicks = Clicks::start(&f, 600, 200, 250.0);
    // a live model worth protecting first: the trainer trains without promotion until its
    // version clearly beats popularity
    let first = Daemon::start(&f.trainer_env(dir.path(), "t0"), free_port());
    wait_until(
        Duration::from_secs(300),
        "a version well above popularity",
        || {
            accepted(&models_log(&f))
                .last()
                .is_some_and(|a| a.validated && a.validation_ndcg.unwrap_or(0.0) > 0.3)
        },
    );
    first.terminate();
    let live = accepted(&models_log(&f)).last().cloned().unwrap();
    let (bad_v, good_v) = (live.version + 1, live.version + 2);

    // restarted with promotion on, its next version ships with its item table shuffled: every
    // offline gate passes (the trainer judges its own, correct, model), live it recommends the
    // wrong items
    let mut env = f.trainer_env(dir.path(), "t0");
    env.extend(promotion.iter().cloned());
    env.push(("MULTIVAED_SCRAMBLE_AT".into(), "train.ship:1".into()));
    let trainer = Daemon::start(&env, free_port());

    // the bad version is announced as a canary and rolled back by the test
    wait_until(Duration::from_secs(300), "the bad canary decided", || {
        models_log(&f).decision(bad_v).is_some()
    });
    let log = models_log(&f);
    let bad = log.decision(bad_v).unwrap().clone();
    assert_eq!(bad.decision, Decided::Reject, "{bad:?}");
    assert_eq!(bad.by, "test", "{bad:?}");
    assert_eq!(log.accepted_version(bad_v).unwrap().canary, Some(0.25));
    eprintln!("bad canary v{bad_v} rolled back: {}", bad.reason);

    // the next version continues from the live one, is a canary too, and is promoted
    wait_until(Duration::from_secs(300), "the next canary decided", || {
        models_log(&f).decision(good_v).is_some()
    });
    let log = models_log(&f);
    let good = log.decision(good_v).unwrap().clone();
    assert_eq!(good.decision, Decided::Promote, "{good:?}");
    let next = log.accepted_version(good_v).unwrap().clone();
    assert_eq!(
        next.base_version,
        Some(live.version),
        "trained from the live version, not the rejected one"
    );
    assert_continues(&next, &live);
    eprintln!("good canary v{good_v} promoted: {}", good.reason);
    for d in &rs {
        d.wait_for(
            Duration::from_secs(60),
            "the promoted version serves",
            |d| version(d) >= good_v,
        );
    }
    // an operator rejects the canary after it by hand; the listing shows canaries and evidence
    wait_until(Duration::from_secs(300), "a third canary", || {
        models_log(&f).canary().is_some_and(|c| c.version > good_v)
    });
    clicks.stop();
    let third = models_log(&f).canary().unwrap().version;
    let env = f.trainer_env(dir.path(), "operator");
    let (ok, listing, err) = run_multivaed(&env, &["models", "list"]);
    assert!(ok, "{listing}{err}");
    assert!(listing.contains("canary (running)"), "{listing}");
    assert!(listing.contains("canary reject by test"), "{listing}");
    assert!(listing.contains("canary promote by test"), "{listing}");
    let (ok, out, err) = run_multivaed(&env, &["models", "reject", &third.to_string()]);
    assert!(ok, "{out}{err}");
    let by_hand = models_log(&f).decision(third).cloned().unwrap();
    assert_eq!(
        (by_hand.decision, by_hand.by.as_str()),
        (Decided::Reject, "operator")
    );
    let (ok, out, _) = run_multivaed(&env, &["models", "promote", &third.to_string()]);
    assert!(!ok, "a decided canary cannot be decided again: {out}");

    // (read once the clicks stopped: the topic then falls idle)
    let recs = recommendations(&f);
    // users active at the promotion were re-scored by the promoted version, in its slice or not
    assert!(
        recs.iter()
            .any(|(u, v, c)| *v == Some(good_v) && !c && !in_slice(u, good_v, 0.25)),
        "the promoted version served nobody outside its slice"
    );
    // the bad version never served a user outside its slice, nor anyone unmarked
    let by_bad: HashSet<&str> = recs
        .iter()
        .filter(|(_, v, _)| *v == Some(bad_v))
        .map(|(u, _, _)| u.as_str())
        .collect();
    assert!(!by_bad.is_empty(), "the bad canary served nobody");
    for (u, v, canary) in &recs {
        if *v == Some(bad_v) {
            assert!(
                *canary,
                "{u}: the bad version's recommendation is not marked a canary's"
            );
            assert!(
                in_slice(u, bad_v, 0.25),
                "{u} is outside the bad version's slice"
            );
        }
    }
    let users: HashSet<&str> = recs.iter().map(|(u, _, _)| u.as_str()).collect();
    eprintln!(
        "the bad canary served {} of {} users ({:.3}); its evidence: {:?}",
        by_bad.len(),
        users.len(),
        by_bad.len() as f64 / users.len() as f64,
        bad.evidence
    );
    assert!(
        metric_value(
            &trainer.metrics().unwrap(),
            "multivaed_canary_decisions_total",
            "by=\"test\",decision=\"reject\""
        ) >= 1.0
    );
    trainer.terminate();
    for d in replicas {
        d.terminate();
    }
}
