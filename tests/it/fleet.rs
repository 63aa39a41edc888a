//! Serving replicas (`--role serve`) against the real broker: two replicas share a consumer
//! group over 4 partitions; the second's partitions are restored from the changelog topic, so
//! every user's history is complete on their owner after the move; only the owner publishes
//! (stamped with partition, epoch and owner) and answers pulls; each bad message is
//! dead-lettered once; the partitioner matches librdkafka's.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::common::*;
use multivaed::partition::Partitioner;
use rdkafka::producer::{BaseRecord, Producer};

const PARTITIONS: i32 = 4;
const USERS: usize = 200;

fn fleet(dir: &std::path::Path) -> Fleet {
    fleet_of(dir, PARTITIONS)
}

fn fleet_of(dir: &std::path::Path, partitions: i32) -> Fleet {
    Fleet::new(dir, partitions)
}

fn replica(f: &Fleet, dir: &std::path::Path, name: &str) -> Daemon {
    replica_with(f, dir, name, &[])
}

fn replica_env(f: &Fleet, dir: &std::path::Path, name: &str) -> Vec<(String, String)> {
    f.replica_env(dir, name)
}

fn replica_with(f: &Fleet, dir: &std::path::Path, name: &str, extra: &[(&str, &str)]) -> Daemon {
    let mut env = replica_env(f, dir, name);
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    Daemon::start(&env, free_port())
}

/// Click `k` of user `u` (a new item each time), and a bad message every 100th.
fn produce_round(f: &Fleet, round: usize) -> usize {
    let p = producer();
    let mut bad = 0;
    for u in 0..USERS {
        let user = format!("u{u}");
        let partition = Partitioner::ConsistentRandom.partition(user.as_bytes(), PARTITIONS);
        let payload = format!(
            r#"{{"user_id": "{user}", "item_id": "i{}"}}"#,
            (u + round * 7) % 97 + round * 100
        );
        send(
            &p,
            BaseRecord::to(&f.setup.clicks)
                .partition(partition)
                .key(user.as_bytes())
                .payload(payload.as_bytes()),
        );
        if u % 100 == 0 {
            bad += 1;
            send(
                &p,
                BaseRecord::to(&f.setup.clicks)
                    .partition(partition)
                    .key(user.as_bytes())
                    .payload(format!("not json {round} {u}").as_bytes()),
            );
        }
    }
    p.flush(Duration::from_secs(30)).unwrap();
    bad
}

/// Each user's history as a restore reads the changelog: the latest record in log order, except
/// records of an epoch older than one already seen in their partition (a late writer's).
fn changelog_histories(f: &Fleet) -> HashMap<String, Vec<String>> {
    let mut out = HashMap::new();
    let mut epoch: HashMap<i32, u64> = HashMap::new();
    for m in read_all_partitioned(&f.changelog, f.partitions) {
        let key = String::from_utf8_lossy(m.key.as_deref().unwrap_or_default()).into_owned();
        let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap_or_default();
        let e = v["epoch"].as_u64().unwrap_or(0);
        let seen = epoch.entry(m.partition).or_insert(0);
        if e < *seen {
            continue;
        }
        *seen = e;
        if v["kind"] == "history" {
            let items = v["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i.as_str().unwrap().to_string())
                .collect();
            out.insert(key, items);
        }
    }
    out
}

/// A changelog message and its partition.
struct Record {
    partition: i32,
    key: Option<Vec<u8>>,
    payload: Vec<u8>,
}

/// Every committed message of `topic`, partition by partition in log order (as restores read).
fn read_all_partitioned(topic: &str, partitions: i32) -> Vec<Record> {
    read_partitioned(topic, partitions, "read_committed")
}

/// Every message of `topic` at `isolation` (`read_uncommitted` shows aborted transactions').
fn read_partitioned(topic: &str, partitions: i32, isolation: &str) -> Vec<Record> {
    use rdkafka::config::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Message;
    use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
    let mut out = Vec::new();
    for p in 0..partitions {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers())
            .set("group.id", unique("reader"))
            .set("enable.partition.eof", "true")
            .set("isolation.level", isolation)
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
        c.assign(&tpl).unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            assert!(Instant::now() < deadline, "{topic}/{p}: no end in 60 s");
            match c.poll(Duration::from_millis(200)) {
                Some(Ok(m)) => out.push(Record {
                    partition: p,
                    key: m.key().map(|k| k.to_vec()),
                    payload: m.payload().unwrap_or_default().to_vec(),
                }),
                Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => break,
                _ => {}
            }
        }
    }
    out
}

/// A user's latest recommendation by the documented rule (highest (epoch, offset)), and the
/// highest epoch any of their messages carried.
struct Latest {
    stamp: (u64, i64),
    owner: String,
    rec: serde_json::Value,
    highest_epoch: u64,
}

fn latest_recommendations(f: &Fleet) -> HashMap<String, Latest> {
    let mut latest: HashMap<String, Latest> = HashMap::new();
    for m in read_all(&f.setup.recs, 1, Duration::from_secs(3)) {
        let key = String::from_utf8_lossy(m.key.as_deref().unwrap_or_default()).into_owned();
        let stamp = (
            m.headers["multivaed-epoch"].parse::<u64>().unwrap(),
            m.headers["multivaed-offset"].parse::<i64>().unwrap(),
        );
        let rec: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        let highest_epoch = latest
            .get(&key)
            .map_or(stamp.0, |l| l.highest_epoch.max(stamp.0));
        if latest.get(&key).is_none_or(|l| stamp >= l.stamp) {
            let owner = m.headers["multivaed-owner"].clone();
            latest.insert(
                key.clone(),
                Latest {
                    stamp,
                    owner,
                    rec,
                    highest_epoch,
                },
            );
        } else if let Some(l) = latest.get_mut(&key) {
            l.highest_epoch = highest_epoch;
        }
    }
    latest
}

/// Waits (up to 60 s) until every click in `sent` is in its user's changelog history; returns
/// the histories.
fn complete_histories(
    f: &Fleet,
    sent: &HashMap<String, HashSet<String>>,
) -> HashMap<String, Vec<String>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let h = changelog_histories(f);
        let missing: Vec<&String> = sent
            .iter()
            .filter(|(u, items)| {
                let got: HashSet<&String> =
                    h.get(*u).map(|v| v.iter().collect()).unwrap_or_default();
                !items.iter().all(|i| got.contains(i))
            })
            .map(|(u, _)| u)
            .collect();
        if missing.is_empty() {
            return h;
        }
        assert!(
            Instant::now() < deadline,
            "{} users miss clicks in the changelog, e.g. {:?}",
            missing.len(),
            &missing[..missing.len().min(3)]
        );
        std::thread::sleep(Duration::from_secs(2));
    }
}

fn owned(d: &Daemon) -> f64 {
    d.metric("multivaed_partitions_owned", "")
}

#[test]
fn a_moved_partition_is_restored_and_only_its_owner_publishes() {
    let _machine = share_the_machine();
    let dir = tempfile::tempdir().unwrap();
    let f = fleet(dir.path());
    let a = replica(&f, dir.path(), "a");
    a.wait_for(Duration::from_secs(60), "a owns every partition", |d| {
        owned(d) >= PARTITIONS as f64
    });
    let mut bad = produce_round(&f, 0);
    bad += produce_round(&f, 1);
    a.wait_for(Duration::from_secs(60), "a stored two rounds", |d| {
        d.metric("multivaed_store_interactions", "") >= (2 * USERS) as f64
    });
    // b joins: partitions move to it, restored from the changelog
    let b = replica(&f, dir.path(), "b");
    let deadline = Instant::now() + Duration::from_secs(90);
    while !(owned(&a) >= 1.0 && owned(&b) >= 1.0 && owned(&a) + owned(&b) == PARTITIONS as f64) {
        assert!(
            Instant::now() < deadline,
            "partitions never split: a {} b {}",
            owned(&a),
            owned(&b)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(
        b.metric("multivaed_restore_records_total", "") > 0.0,
        "b restored its partitions from the changelog"
    );
    bad += produce_round(&f, 2);
    let total = |d: &Daemon| d.metric("multivaed_events_consumed_total", "");
    let deadline = Instant::now() + Duration::from_secs(60);
    while total(&a) + total(&b) < (3 * USERS) as f64 {
        assert!(
            Instant::now() < deadline,
            "round 2 not consumed: {} + {}",
            total(&a),
            total(&b)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    std::thread::sleep(Duration::from_secs(3));

    // every user's history is complete in the changelog: all three clicks
    let histories = changelog_histories(&f);
    for u in 0..USERS {
        let user = format!("u{u}");
        let want: HashSet<String> = (0..3)
            .map(|r| format!("i{}", (u + r * 7) % 97 + r * 100))
            .collect();
        let got: HashSet<String> = histories
            .get(&user)
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .collect();
        assert_eq!(got, want, "{user}'s history in the changelog");
    }

    // exactly one replica answers each user's pull; the other redirects to it (never a stale
    // answer of its own), and following the redirect gives the owner's answer
    let mut owner_of: HashMap<String, &str> = HashMap::new();
    let no_follow = ureq::AgentBuilder::new().redirects(0).build();
    let ask = |d: &Daemon, path: &str| -> (u16, Option<String>) {
        let url = format!("http://127.0.0.1:{}{path}", d.port);
        match authorized(no_follow.get(&url)).call() {
            // ureq hands an unfollowed redirect back as a response
            Ok(r) => (r.status(), r.header("location").map(str::to_string)),
            Err(ureq::Error::Status(s, r)) => (s, r.header("location").map(str::to_string)),
            Err(e) => panic!("{url}: {e}"),
        }
    };
    for u in (0..USERS).step_by(7) {
        let user = format!("u{u}");
        let path = format!("/v1/users/{user}/recommendations?k=5");
        let ((sa, la), (sb, lb)) = (ask(&a, &path), ask(&b, &path));
        let owner = match (sa, sb) {
            (200, 307) => ("a", lb, &a),
            (307, 200) => ("b", la, &b),
            other => panic!("{user}: a, b answered {other:?}"),
        };
        assert_eq!(
            owner.1.as_deref(),
            Some(format!("http://127.0.0.1:{}{path}", owner.2.port).as_str()),
            "{user}: the redirect goes to the owner"
        );
        let items = |d: &Daemon| -> serde_json::Value {
            let (status, body) = d.get(&path).unwrap();
            assert_eq!(status, 200, "{user} (redirect followed)");
            serde_json::from_str::<serde_json::Value>(&body).unwrap()["items"].clone()
        };
        assert_eq!(
            items(&a),
            items(&b),
            "{user}: the same answer from either replica"
        );
        owner_of.insert(user, owner.0);
    }

    // the latest recommendation of each user (highest epoch, then offset) is the owner's, and
    // holds none of the user's items
    let latest = latest_recommendations(&f);
    for (user, owner) in &owner_of {
        let l = latest
            .get(user)
            .unwrap_or_else(|| panic!("no recommendation for {user}"));
        let (by, rec) = (&l.owner, &l.rec);
        assert_eq!(by, owner, "{user}'s latest recommendation");
        let held = &histories[user];
        for item in rec["items"].as_array().unwrap() {
            assert!(
                !held.contains(&item["item_id"].as_str().unwrap().to_string()),
                "{user}: {item}"
            );
        }
    }

    // each bad message dead-lettered once, across the move
    let letters = read_all(&f.setup.dlq, 1, Duration::from_secs(3));
    assert_eq!(letters.len(), bad, "dead letters");
    a.terminate();
    b.terminate();
}

#[test]
fn the_partitioner_matches_librdkafkas() {
    let _machine = share_the_machine();
    use rdkafka::config::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Message;
    use rdkafka::producer::{DefaultProducerContext, ThreadedProducer};
    let topic = unique("keys");
    create_topics(&[(&topic, 6)]);
    for (partitioner, name) in [
        (Partitioner::ConsistentRandom, "consistent_random"),
        (Partitioner::Murmur2Random, "murmur2_random"),
    ] {
        let p: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
            .set("bootstrap.servers", brokers())
            .set("partitioner", name)
            .create()
            .unwrap();
        let keys: HashSet<String> = (0..200).map(|i| format!("{name}-user-{i}")).collect();
        for k in &keys {
            send(
                &p,
                BaseRecord::to(&topic)
                    .key(k.as_bytes())
                    .payload(b"x".as_slice()),
            );
        }
        p.flush(Duration::from_secs(30)).unwrap();
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers())
            .set("group.id", unique("reader"))
            .set("auto.offset.reset", "earliest")
            .create()
            .unwrap();
        c.subscribe(&[&topic]).unwrap();
        let mut seen = 0;
        let deadline = Instant::now() + Duration::from_secs(60);
        while seen < keys.len() {
            assert!(
                Instant::now() < deadline,
                "{name}: {seen} of {} read",
                keys.len()
            );
            if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
                let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
                if keys.contains(&key) {
                    assert_eq!(
                        partitioner.partition(key.as_bytes(), 6),
                        m.partition(),
                        "{name}: {key}"
                    );
                    seen += 1;
                }
            }
        }
    }
}

/// Two plain consumers in one group on `PARTITIONS` partitions: the second joins once the first
/// owns them all; returns how the assignment counts went until both own some (`None`: they
/// never did within 60 s).
fn hand_over(strategy: &str, static_members: bool) -> Option<Vec<(usize, usize)>> {
    use rdkafka::config::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let topic = unique("coop");
    create_topics(&[(&topic, PARTITIONS)]);
    let group = unique("coop-group");
    let member = |id: &str| -> BaseConsumer {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", brokers())
            .set("group.id", &group)
            .set("partition.assignment.strategy", strategy)
            .set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "500");
        if static_members {
            config.set("group.instance.id", id);
        }
        let c: BaseConsumer = config.create().unwrap();
        c.subscribe(&[&topic]).unwrap();
        c
    };
    let count = |c: &BaseConsumer| c.assignment().map(|a| a.count()).unwrap_or(0);
    let a = member("a");
    let deadline = Instant::now() + Duration::from_secs(60);
    while count(&a) < PARTITIONS as usize {
        assert!(Instant::now() < deadline, "a alone: {}", count(&a));
        let _ = a.poll(Duration::from_millis(100));
    }
    let b = member("b");
    let joined = Instant::now();
    let deadline = joined + Duration::from_secs(60);
    let mut log = vec![(count(&a), count(&b))];
    // how long the first member owned nothing (its partitions all stopped)
    let (mut idle, mut idle_since): (Duration, Option<Instant>) = (Duration::ZERO, None);
    while !(count(&a) >= 1 && count(&b) >= 1 && count(&a) + count(&b) == PARTITIONS as usize) {
        if Instant::now() > deadline {
            eprintln!("{strategy}, static {static_members}: never shared: {log:?}");
            return None;
        }
        let _ = a.poll(Duration::from_millis(50));
        let _ = b.poll(Duration::from_millis(50));
        let now = (count(&a), count(&b));
        match (now.0, idle_since) {
            (0, None) => idle_since = Some(Instant::now()),
            (n, Some(t)) if n > 0 => {
                idle += t.elapsed();
                idle_since = None;
            }
            _ => {}
        }
        if log.last() != Some(&now) {
            log.push(now);
        }
    }
    eprintln!(
        "{strategy}, static {static_members}: {log:?}; shared {:.1} s after the join, the first member owned nothing for {:.1} s",
        joined.elapsed().as_secs_f64(),
        idle.as_secs_f64()
    );
    Some(log)
}

/// The broker's rebalancing, probed with plain consumers: incremental (cooperative-sticky)
/// hands partitions over without stopping the rest, with static members (the replicas'
/// production settings) and without; static members also rebalance eagerly.
#[test]
fn the_broker_hands_partitions_over_incrementally_and_to_static_members() {
    let _machine = share_the_machine();
    for static_members in [true, false] {
        let incremental =
            hand_over("cooperative-sticky", static_members).expect("cooperative hand-over");
        // the first member kept some partitions throughout: never down to none
        assert!(
            incremental.iter().all(|&(a, _)| a > 0),
            "static {static_members}: {incremental:?}"
        );
    }
    let eager = hand_over("range,roundrobin", true).expect("static members' hand-over");
    assert!(eager.last().is_some_and(|&(a, b)| a > 0 && b > 0));
}

/// Runs `multivaed` with `args` and the fleet's settings; its exit status and standard error.
fn run_cli(f: &Fleet, args: &[&str], extra: &[(&str, &str)]) -> (bool, String, String) {
    let mut env = f.setup.base_env(&brokers());
    env.extend(
        [
            ("MULTIVAED_ROLE", "serve"),
            ("MULTIVAED_KAFKA__INSTANCE_ID", "probe"),
            ("MULTIVAED_MODELS__TOPIC", f.models.as_str()),
            ("MULTIVAED_MODELS__STORE", f.store.as_str()),
        ]
        .into_iter()
        .chain(extra.iter().copied())
        .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    run_multivaed(&env, args)
}

#[test]
fn topics_are_created_and_checked_and_a_wrong_changelog_is_refused_at_start() {
    let _machine = share_the_machine();
    let dir = tempfile::tempdir().unwrap();
    let f = Fleet::named(dir.path(), 3);
    // nothing there: check fails and names every topic
    let (ok, out, _) = run_cli(&f, &["topics", "check"], &[]);
    assert!(!ok && out.matches("missing").count() == 6, "{out}");
    // create makes them, as the role needs them
    let (ok, out, err) = run_cli(&f, &["topics", "create", "--partitions", "3"], &[]);
    assert!(ok, "{out}{err}");
    assert!(out.contains(&format!("created {}", f.changelog)), "{out}");
    let changelog_row = out
        .lines()
        .find(|l| l.starts_with("kafka.changelog_topic"))
        .unwrap();
    assert!(
        changelog_row.contains(" 3 ") && changelog_row.contains("compact"),
        "{out}"
    );
    // a changelog with another partition count than the clicks topic: refused at start, named
    let g = Fleet::named(dir.path(), 3);
    g.create_with(&brokers(), 2, COMPACTED, COMPACTED).unwrap();
    let (ok, _, err) = run_cli(&g, &["run"], &[]);
    assert!(!ok, "{err}");
    assert!(
        err.contains("kafka.changelog_topic") && err.contains("2 partitions"),
        "{err}"
    );
    // a changelog that is not compacted (the broker describes its cleanup.policy): refused
    let h = Fleet::named(dir.path(), 3);
    create_topics(&[
        (&h.setup.clicks, 3),
        (&h.changelog, 3),
        (&h.members, 1),
        (&h.models, 1),
        (&h.setup.recs, 1),
        (&h.setup.dlq, 1),
    ]);
    let (ok, _, err) = run_cli(&h, &["run"], &[]);
    assert!(!ok, "{err}");
    assert!(
        err.contains("kafka.changelog_topic")
            && err.contains("cleanup.policy=delete, needs compact"),
        "{err}"
    );
    // compacted but also deleted by age (`compact,delete`): refused, the members topic too
    for which in ["changelog", "members"] {
        let k = Fleet::named(dir.path(), 3);
        let both: &[(&str, &str)] = &[("cleanup.policy", "compact,delete")];
        let policy = |name: &str| if name == which { both } else { COMPACTED };
        k.create_with(&brokers(), 3, policy("changelog"), policy("members"))
            .unwrap();
        let (ok, _, err) = run_cli(&k, &["run"], &[]);
        assert!(!ok, "{which}: {err}");
        assert!(
            err.contains(&format!("kafka.{which}_topic")) && err.contains("compact alone"),
            "{which}: {err}"
        );
    }
    // tombstones kept for less than kafka.expected_absence (the broker's default day): a
    // warning at start; the topics `topics create` made keep them that long: none
    let short = Fleet::new(&dir.path().join("short"), 3);
    let warned = replica(&short, dir.path(), "w");
    warned.wait_for(Duration::from_secs(30), "the retention warning", |d| {
        d.log_contains("less than kafka.expected_absence")
    });
    let created = replica(&f, dir.path(), "c");
    created.wait_for(Duration::from_secs(60), "ready", |d| {
        d.get("/readyz").is_some_and(|(s, _)| s == 200)
    });
    assert!(!created.log_contains("less than kafka.expected_absence"));
    warned.terminate();
    created.terminate();
}

/// The churn stream: user u's k-th click is item `k`·1000 + u mod 1000 (distinct per user);
/// every 47th message is bad (47 is prime to the user count: every user clicks). Sends at `rate` until `stop`; returns the clicks sent per user
/// and the bad messages sent.
fn stream(
    topic: String,
    partitions: i32,
    users: usize,
    rate: f64,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<(HashMap<String, HashSet<String>>, usize)> {
    std::thread::spawn(move || {
        let p = producer();
        let mut sent: HashMap<String, HashSet<String>> = HashMap::new();
        let mut bad = 0;
        let start = Instant::now();
        let mut n = 0usize;
        while !stop.load(std::sync::atomic::Ordering::Acquire) {
            let (u, k) = (n % users, n / users);
            let user = format!("u{u}");
            let partition = Partitioner::ConsistentRandom.partition(user.as_bytes(), partitions);
            let payload = if n % 47 == 46 {
                bad += 1;
                format!("bad message {n}")
            } else {
                let item = format!("i{}", k * 1000 + u % 1000);
                sent.entry(user.clone()).or_default().insert(item.clone());
                format!(r#"{{"user_id": "{user}", "item_id": "{item}"}}"#)
            };
            send(
                &p,
                BaseRecord::to(&topic)
                    .partition(partition)
                    .key(user.as_bytes())
                    .payload(payload.as_bytes()),
            );
            n += 1;
            let due = Duration::from_secs_f64(n as f64 / rate);
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        p.flush(Duration::from_secs(30)).unwrap();
        (sent, bad)
    })
}

/// Waits until the replicas own every partition between them, each at least one.
fn settled(replicas: &[&Daemon], partitions: i32, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let counts: Vec<f64> = replicas.iter().map(|d| owned(d)).collect();
        if counts.iter().all(|&c| c >= 1.0) && counts.iter().sum::<f64>() == partitions as f64 {
            eprintln!("{what}: partitions {counts:?}");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: never settled: {counts:?}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn ownership_holds_under_churn_a_kill_during_restore_and_a_restart() {
    let _machine = share_the_machine();
    const PARTS: i32 = 6;
    const USERS: usize = 300;
    let dir = tempfile::tempdir().unwrap();
    let f = fleet_of(dir.path(), PARTS);
    let r1 = replica(&f, dir.path(), "r1");
    settled(&[&r1], PARTS, "r1 alone");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let producer = stream(f.setup.clicks.clone(), PARTS, USERS, 150.0, stop.clone());
    std::thread::sleep(Duration::from_secs(4));
    // 1 → 3
    let r2 = replica(&f, dir.path(), "r2");
    let r3 = replica(&f, dir.path(), "r3");
    settled(&[&r1, &r2, &r3], PARTS, "three replicas");
    std::thread::sleep(Duration::from_secs(3));
    // 3 → 2
    r3.terminate();
    settled(&[&r1, &r2], PARTS, "r3 stopped");
    std::thread::sleep(Duration::from_secs(3));
    // r3 again, killed in the middle of restoring its partitions, then again for good
    let mut env = replica_env(&f, dir.path(), "r3");
    env.push(("MULTIVAED_CRASH_AT".into(), "restore.applied".into()));
    let (ok, _, _) = run_multivaed(&env, &["run"]);
    assert!(!ok, "r3 died in its restore (or never reached one in 60 s)");
    let r3 = replica(&f, dir.path(), "r3");
    settled(&[&r1, &r2, &r3], PARTS, "r3 back");
    // the stream goes on past the last move, so every user clicks after it
    std::thread::sleep(Duration::from_secs(8));
    stop.store(true, std::sync::atomic::Ordering::Release);
    let (sent, bad) = producer.join().unwrap();
    let replicas = [("r1", &r1), ("r2", &r2), ("r3", &r3)];

    // every click is in its user's history as a restore reads it
    let histories = complete_histories(&f, &sent);
    std::thread::sleep(Duration::from_secs(2));

    // one owner per user: it answers, the others redirect to it
    let no_follow = ureq::AgentBuilder::new().redirects(0).build();
    let mut owner_of: HashMap<String, &str> = HashMap::new();
    for u in (0..USERS).step_by(3) {
        let user = format!("u{u}");
        let path = format!("/v1/users/{user}/recommendations?k=10");
        let answers: Vec<(&str, u16)> = replicas
            .iter()
            .map(|(name, d)| {
                let url = format!("http://127.0.0.1:{}{path}", d.port);
                let status = match authorized(no_follow.get(&url)).call() {
                    Ok(r) => r.status(),
                    Err(ureq::Error::Status(s, _)) => s,
                    Err(e) => panic!("{url}: {e}"),
                };
                (*name, status)
            })
            .collect();
        let owners: Vec<&str> = answers.iter().filter(|a| a.1 == 200).map(|a| a.0).collect();
        assert_eq!(owners.len(), 1, "{user}: {answers:?}");
        assert!(
            answers.iter().all(|a| a.1 == 200 || a.1 == 307),
            "{user}: {answers:?}"
        );
        owner_of.insert(user, owners[0]);
    }

    // every click is in the history its owner holds, read from outside (through any replica)
    for (user, items) in &sent {
        let (status, body) = r1.get(&format!("/v1/users/{user}/history")).unwrap();
        assert_eq!(status, 200, "{user}'s history: {body}");
        let held: HashSet<String> = serde_json::from_str::<serde_json::Value>(&body).unwrap()
            ["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i.as_str().unwrap().to_string())
            .collect();
        assert!(
            items.is_subset(&held),
            "{user}: the owner holds {held:?}, sent {items:?}"
        );
    }

    // the latest recommendation (highest epoch, then offset) is the current owner's and holds
    // none of the user's items
    let latest = latest_recommendations(&f);
    for (user, owner) in &owner_of {
        let (by, rec) = (&latest[user].owner, &latest[user].rec);
        assert_eq!(by, owner, "{user}'s latest recommendation");
        for item in rec["items"].as_array().unwrap() {
            let id = item["item_id"].as_str().unwrap().to_string();
            assert!(
                !histories[user].contains(&id),
                "{user} was recommended {id}, which they hold"
            );
        }
    }

    // each bad message dead-lettered once, through every move
    let letters = read_all(&f.setup.dlq, 1, Duration::from_secs(3));
    let sources: HashSet<(String, String)> = letters
        .iter()
        .map(|l| {
            (
                l.headers["multivaed.source.partition"].clone(),
                l.headers["multivaed.source.offset"].clone(),
            )
        })
        .collect();
    assert_eq!(
        sources.len(),
        letters.len(),
        "a bad message was dead-lettered twice"
    );
    assert_eq!(letters.len(), bad, "dead letters");
    eprintln!(
        "churn: {} users, {} clicks, {bad} bad; restore records r1 {} r2 {} r3 {}",
        sent.len(),
        sent.values().map(|v| v.len()).sum::<usize>(),
        r1.metric("multivaed_restore_records_total", ""),
        r2.metric("multivaed_restore_records_total", ""),
        r3.metric("multivaed_restore_records_total", "")
    );
    r1.terminate();
    r2.terminate();
    r3.terminate();
}

/// The latest announcement of each member on the members topic: its partitions.
fn announced(f: &Fleet) -> HashMap<String, Vec<i32>> {
    let mut out = HashMap::new();
    for m in read_all_partitioned(&format!("{}.members", f.setup.clicks), 1) {
        let key = String::from_utf8_lossy(m.key.as_deref().unwrap_or_default()).into_owned();
        if m.payload.is_empty() {
            out.remove(&key);
            continue;
        }
        let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        let parts = v["partitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p[0].as_i64().unwrap() as i32)
            .collect();
        out.insert(key, parts);
    }
    out
}

#[test]
fn a_static_member_restarted_within_the_session_gets_its_partitions_back_cheaply() {
    let _machine = share_the_machine();
    let dir = tempfile::tempdir().unwrap();
    let f = fleet(dir.path());
    // the production settings (cooperative, static members), with room for a restart on a
    // busy machine: the member must be back within its session
    let production = [("MULTIVAED_KAFKA__PROPERTIES__SESSION_TIMEOUT_MS", "20000")];
    let s1 = replica_with(&f, dir.path(), "s1", &production);
    let s2 = replica_with(&f, dir.path(), "s2", &production);
    settled(&[&s1, &s2], PARTITIONS, "two static members");
    for round in 0..3 {
        produce_round(&f, round);
    }
    let consumed = |d: &Daemon| d.metric("multivaed_events_consumed_total", "");
    let deadline = Instant::now() + Duration::from_secs(60);
    while consumed(&s1) + consumed(&s2) < (3 * USERS) as f64 {
        assert!(Instant::now() < deadline, "not consumed");
        std::thread::sleep(Duration::from_millis(300));
    }
    std::thread::sleep(Duration::from_secs(2));
    let before = announced(&f);
    let total_records = read_all_partitioned(&f.changelog, PARTITIONS).len() as f64;
    // restarted within its session: no rebalance hands its partitions to s2
    s1.terminate();
    let s1 = replica_with(&f, dir.path(), "s1", &production);
    settled(&[&s1, &s2], PARTITIONS, "s1 restarted");
    std::thread::sleep(Duration::from_secs(2));
    let after = announced(&f);
    assert_eq!(after["s1"], before["s1"], "s1's partitions");
    assert_eq!(after["s2"], before["s2"], "s2's partitions");
    let restored = s1.metric("multivaed_restore_records_total", "");
    assert!(
        s1.log_contains("from_beginning=false") && !s1.log_contains("from_beginning=true"),
        "restored from its local position"
    );
    assert!(
        restored < total_records / 4.0,
        "restored {restored} of {total_records} changelog records"
    );
    eprintln!(
        "restart: s1 restored {restored} of {total_records} records; partitions {:?}",
        after["s1"]
    );
    s1.terminate();
    s2.terminate();
}

fn signal(d: &Daemon, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &d.child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig}");
}

/// Replica a freezes itself holding its 30th batch (stored, not yet in the changelog) while b
/// runs beside it and clicks stream in; frozen past its 6 s session, a's partitions go to b;
/// the stream stops before the thaw (so whatever a writes late is the last word on its users).
/// Returns a (still frozen), b and the clicks sent per user.
fn a_frozen_while_b_takes_over(
    f: &Fleet,
    dir: &std::path::Path,
) -> (Daemon, Daemon, HashMap<String, HashSet<String>>) {
    let a = replica_with(f, dir, "a", &[("MULTIVAED_STOP_AT", "ingest.flushed:30")]);
    let b = replica(f, dir, "b");
    settled(&[&a, &b], PARTITIONS, "two replicas");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clicking = stream(
        f.setup.clicks.clone(),
        PARTITIONS,
        USERS,
        150.0,
        stop.clone(),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while owned(&b) < PARTITIONS as f64 {
        assert!(Instant::now() < deadline, "b never took a's partitions");
        std::thread::sleep(Duration::from_millis(300));
    }
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, std::sync::atomic::Ordering::Release);
    let (sent, _) = clicking.join().unwrap();
    (a, b, sent)
}

#[test]
fn a_replica_frozen_past_its_session_writes_nothing_that_wins() {
    let _machine = share_the_machine();
    let dir = tempfile::tempdir().unwrap();
    let f = fleet(dir.path());
    let (a, b, sent) = a_frozen_while_b_takes_over(&f, dir.path());
    std::thread::sleep(Duration::from_secs(3));
    // thawed, a finishes what it held, then finds itself out of the group and rejoins
    signal(&a, "-CONT");
    settled(&[&a, &b], PARTITIONS, "a rejoined");
    std::thread::sleep(Duration::from_secs(3));

    // read as a restore reads it, the changelog holds every click: nothing late overwrote newer
    let histories = complete_histories(&f, &sent);
    // a wrote its held batch late, in a transaction the broker fenced: no reader sees it
    let late = late_records(&f, "read_uncommitted");
    eprintln!("late records (an epoch below one before them): {late}");
    assert!(late > 0, "the thawed replica wrote its held batch late");
    assert_eq!(
        late_records(&f, "read_committed"),
        0,
        "a late write was committed"
    );
    assert!(
        a.metric(
            "multivaed_changelog_transactions_total",
            "result=\"fenced\""
        ) >= 1.0
    );
    std::thread::sleep(Duration::from_secs(2));
    // the latest recommendation by (epoch, offset) of every user is the current owner's
    let latest = latest_recommendations(&f);
    // per user, no message of an older epoch than one already published wins: a's late
    // messages (its old epoch) never beat b's
    for (user, l) in &latest {
        assert_eq!(l.stamp.0, l.highest_epoch, "{user}");
        let rec = &l.rec;
        for item in rec["items"].as_array().unwrap() {
            let id = item["item_id"].as_str().unwrap().to_string();
            assert!(!histories[user].contains(&id), "{user} holds {id}");
        }
    }
    // and every pull, wherever asked, is answered by one owner from the complete history
    for u in 0..USERS {
        let path = format!("/v1/users/u{u}/recommendations?k=5");
        assert!(
            owner_is(&a, &path) != owner_is(&b, &path),
            "u{u}: one owner"
        );
        let body = a.get(&path).unwrap().1;
        let rec: serde_json::Value = serde_json::from_str(&body).unwrap();
        for item in rec["items"].as_array().unwrap() {
            let id = item["item_id"].as_str().unwrap().to_string();
            assert!(
                !histories[&format!("u{u}")].contains(&id),
                "u{u} was offered {id}"
            );
        }
    }
    a.terminate();
    b.terminate();
}

/// Revoked state: replica a owns every partition and stores every user; b joins and takes some
/// partitions, and forgets a user of one of them. After `serve.state_cleanup_delay` (3 s here) a's
/// store — its metrics and its export — holds exactly the users of the partitions it still owns,
/// so the forgotten user of a partition it once owned is not there either.
#[test]
fn a_revoked_partitions_local_copy_is_deleted_after_the_cleanup_delay() {
    let _machine = share_the_machine();
    let dir = tempfile::tempdir().unwrap();
    let f = fleet(dir.path());
    let delay = [("MULTIVAED_SERVE__STATE_CLEANUP_DELAY", "3s")];
    let a = replica_with(&f, dir.path(), "a", &delay);
    settled(&[&a], PARTITIONS, "a owns everything");
    produce_round(&f, 0);
    a.wait_for(Duration::from_secs(60), "every user stored", |d| {
        d.metric("multivaed_store_users", "") >= USERS as f64
    });
    let b = replica(&f, dir.path(), "b");
    settled(&[&a, &b], PARTITIONS, "b took some partitions");
    let owners = announced(&f);
    let of_a: HashSet<i32> = owners["a"].iter().copied().collect();
    let partition = |u: &str| Partitioner::ConsistentRandom.partition(u.as_bytes(), PARTITIONS);
    let forgotten = (0..USERS)
        .map(|u| format!("u{u}"))
        .find(|u| !of_a.contains(&partition(u)))
        .unwrap();
    let p = producer();
    send(
        &p,
        BaseRecord::to(&f.setup.clicks)
            .partition(partition(&forgotten))
            .key(forgotten.as_bytes()),
    );
    p.flush(Duration::from_secs(30)).unwrap();
    b.wait_for(Duration::from_secs(30), "the forget applied", |d| {
        d.metric("multivaed_users_forgotten_total", "") >= 1.0
    });
    let mine: HashSet<String> = (0..USERS)
        .map(|u| format!("u{u}"))
        .filter(|u| of_a.contains(&partition(u)))
        .collect();
    assert!(!mine.is_empty() && mine.len() < USERS, "{of_a:?}");
    a.wait_for(Duration::from_secs(60), "a's revoked copies deleted", |d| {
        d.metric("multivaed_store_users", "") == mine.len() as f64
    });
    assert!(a.log_contains("the local copy of a partition owned elsewhere was deleted"));
    let env = replica_env(&f, dir.path(), "a");
    a.terminate();
    b.terminate();
    let exported = exported_users(&env, &dir.path().join("a.jsonl"));
    assert_eq!(exported, mine, "a's export holds its own partitions' users");
    assert!(!exported.contains(&forgotten));
}

/// Creates the fleet's topics with a changelog the log cleaner compacts within seconds (and
/// whose tombstones live one second).
fn fast_compacting_fleet(dir: &std::path::Path) -> Fleet {
    let f = Fleet::named(dir, PARTITIONS);
    f.create_with(&brokers(), PARTITIONS, FAST_COMPACTION, COMPACTED)
        .unwrap();
    f
}

/// What `multivaed export` writes from the data directory of `env`'s process (through `file`):
/// each user's items.
fn exported(env: &[(String, String)], file: &std::path::Path) -> HashMap<String, HashSet<String>> {
    let (ok, _, err) = run_multivaed(env, &["export", "--output", file.to_str().unwrap()]);
    assert!(ok, "{err}");
    std::fs::read_to_string(file)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let items = v["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i.as_str().unwrap().to_string())
                .collect();
            (v["user_id"].as_str().unwrap().to_string(), items)
        })
        .collect()
}

/// The users of [`exported`].
fn exported_users(env: &[(String, String)], file: &std::path::Path) -> HashSet<String> {
    exported(env, file).into_keys().collect()
}

/// Away past the horizon: replica a and a trainer store every user and stop; replica b takes
/// over and a user is forgotten; the log cleaner removes the tombstone (`delete.retention.ms` of
/// one second); a and the trainer start again on their old volumes: their copies are older than
/// the changelog keeps tombstones, so each is dropped and read from the beginning — the user is
/// gone from a's pulls and export and from the trainer's store (so from its rounds).
#[test]
fn a_replica_and_a_trainer_away_past_the_tombstone_horizon_forget_what_was_forgotten() {
    let _machine = share_the_machine();
    let dir = tempfile::tempdir().unwrap();
    let f = fast_compacting_fleet(dir.path());
    let a = replica(&f, dir.path(), "a");
    settled(&[&a], PARTITIONS, "a owns everything");
    let t = Daemon::start(&f.trainer_env(dir.path(), "t"), free_port());
    produce_round(&f, 0);
    for d in [&a, &t] {
        d.wait_for(Duration::from_secs(60), "every user stored", |d| {
            d.metric("multivaed_store_users", "") >= USERS as f64
        });
    }
    a.terminate();
    t.terminate();
    // b takes over with an empty disk; u7 is forgotten, the others click again
    let b = replica(&f, dir.path(), "b");
    settled(&[&b], PARTITIONS, "b owns everything");
    let forgotten = "u7";
    let p = producer();
    let partition = Partitioner::ConsistentRandom.partition(forgotten.as_bytes(), PARTITIONS);
    send(
        &p,
        BaseRecord::to(&f.setup.clicks)
            .partition(partition)
            .key(forgotten.as_bytes()),
    );
    p.flush(Duration::from_secs(30)).unwrap();
    b.wait_for(Duration::from_secs(30), "the forget applied", |d| {
        d.metric("multivaed_users_forgotten_total", "") >= 1.0
    });
    b.terminate();
    // the cleaner removes the tombstone (a second after a pass first kept it)
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        roll_segments(&brokers(), &f.changelog, PARTITIONS).unwrap();
        std::thread::sleep(Duration::from_secs(2));
        let left = read_partitioned(&f.changelog, PARTITIONS, "read_uncommitted")
            .into_iter()
            .filter(|m| m.key.as_deref() == Some(forgotten.as_bytes()))
            .count();
        if left == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{forgotten}'s records were not compacted away in 120 s ({left} left)"
        );
    }
    // a, back on its old volume, owns everything again
    let a = replica(&f, dir.path(), "a");
    settled(&[&a], PARTITIONS, "a back");
    assert_eq!(
        a.get(&format!("/v1/users/{forgotten}/history")).unwrap().0,
        404,
        "a brought {forgotten} back"
    );
    assert_eq!(a.get("/v1/users/u8/history").unwrap().0, 200);
    assert!(a.log_contains("the local copy cannot resume"));
    let env = replica_env(&f, dir.path(), "a");
    a.terminate();
    let users = exported_users(&env, &dir.path().join("a.jsonl"));
    assert_eq!(users.len(), USERS - 1, "a's export");
    assert!(!users.contains(forgotten));
    // the trainer, back on its old volume, reads the changelog again from the beginning
    let t = Daemon::start(&f.trainer_env(dir.path(), "t"), free_port());
    t.wait_for(Duration::from_secs(60), "the changelog read", |d| {
        d.log_contains("the changelog is read to its end")
    });
    let env = f.trainer_env(dir.path(), "t");
    t.terminate();
    let users = exported_users(&env, &dir.path().join("t.jsonl"));
    assert_eq!(users.len(), USERS - 1, "the trainer's store");
    assert!(!users.contains(forgotten));
}

/// Waits until the log cleaner has compacted the changelog: no user key appears twice in it
/// (the filler records that roll segments, and the partitions' markers, aside).
fn wait_compacted(f: &Fleet) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        roll_segments(&brokers(), &f.changelog, f.partitions).unwrap();
        std::thread::sleep(Duration::from_secs(2));
        let mut seen: HashSet<(i32, Vec<u8>)> = HashSet::new();
        let mut repeated = 0;
        for m in read_partitioned(&f.changelog, f.partitions, "read_uncommitted") {
            let key = m.key.unwrap_or_default();
            if key.first() == Some(&1u8) {
                continue;
            }
            if !seen.insert((m.partition, key)) {
                repeated += 1;
            }
        }
        if repeated == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the changelog was not compacted in 120 s: {repeated} superseded records left"
        );
    }
}

/// A zombie after compaction: replica a freezes holding a stored batch past its session, b
/// takes its partitions, writes newer histories of the same users and forgets some of them; a,
/// thawed, finishes its write — in a transaction the broker fences (the group moved on since a
/// consumed the batch), so it is aborted. After the log cleaner compacted the changelog (keeping
/// one record per key: without the fencing, a's late records would be those), a fresh replica
/// restoring everything from the beginning and a trainer rebuilding its store from the
/// changelog hold every click of every user, and no forgotten user.
#[test]
fn a_zombies_late_write_never_wins_even_after_compaction() {
    let _machine = share_the_machine();
    let dir = tempfile::tempdir().unwrap();
    let f = fast_compacting_fleet(dir.path());
    let (a, b, mut sent) = a_frozen_while_b_takes_over(&f, dir.path());
    // b forgets every tenth user (a tombstone on the user's partition)
    let forgotten: Vec<String> = (0..USERS).step_by(10).map(|u| format!("u{u}")).collect();
    let p = producer();
    for user in &forgotten {
        let partition = Partitioner::ConsistentRandom.partition(user.as_bytes(), PARTITIONS);
        send(
            &p,
            BaseRecord::to(&f.setup.clicks)
                .partition(partition)
                .key(user.as_bytes()),
        );
        sent.remove(user);
    }
    p.flush(Duration::from_secs(30)).unwrap();
    b.wait_for(Duration::from_secs(30), "the forgets applied", |d| {
        d.metric("multivaed_users_forgotten_total", "") >= forgotten.len() as f64
    });
    std::thread::sleep(Duration::from_secs(2));
    // thawed, a finishes the write it held: fenced
    signal(&a, "-CONT");
    a.wait_for(Duration::from_secs(60), "a's late write fenced", |d| {
        d.metric(
            "multivaed_changelog_transactions_total",
            "result=\"fenced\"",
        ) >= 1.0
    });
    settled(&[&a, &b], PARTITIONS, "a rejoined");
    assert!(late_records(&f, "read_uncommitted") > 0, "a wrote late");
    a.terminate();
    b.terminate();
    wait_compacted(&f);

    // a fresh replica restores every partition from the beginning
    let c = replica(&f, dir.path(), "c");
    settled(&[&c], PARTITIONS, "the fresh replica owns everything");
    for u in 0..USERS {
        let user = format!("u{u}");
        let (status, body) = c.get(&format!("/v1/users/{user}/history")).unwrap();
        match sent.get(&user) {
            None => assert_eq!(status, 404, "{user} was forgotten: {body}"),
            Some(items) => {
                assert_eq!(status, 200, "{user}: {body}");
                let v: serde_json::Value = serde_json::from_str(&body).unwrap();
                let got: HashSet<String> = v["items"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|i| i.as_str().unwrap().to_string())
                    .collect();
                assert_eq!(&got, items, "{user}'s history on the fresh replica");
            }
        }
    }
    c.terminate();

    // a trainer rebuilds its store from the changelog: the same users, the same clicks
    let t = Daemon::start(&f.trainer_env(dir.path(), "t"), free_port());
    t.wait_for(Duration::from_secs(60), "the changelog read", |d| {
        d.metric("multivaed_store_users", "") >= sent.len() as f64
    });
    std::thread::sleep(Duration::from_secs(2));
    let env = f.trainer_env(dir.path(), "t");
    t.terminate();
    let exported = exported(&env, &dir.path().join("trainer.jsonl"));
    assert_eq!(exported, sent, "the trainer's store");
}

/// Changelog records written under an epoch lower than one earlier in their partition, read at
/// `isolation`.
fn late_records(f: &Fleet, isolation: &str) -> usize {
    let mut epoch: HashMap<i32, u64> = HashMap::new();
    let mut late = 0;
    for m in read_partitioned(&f.changelog, f.partitions, isolation) {
        let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap_or_default();
        let e = v["epoch"].as_u64().unwrap_or(0);
        let seen = epoch.entry(m.partition).or_insert(0);
        if e < *seen {
            late += 1;
        }
        *seen = (*seen).max(e);
    }
    late
}

/// Whether `d` answers `path` itself (not by a redirect).
fn owner_is(d: &Daemon, path: &str) -> bool {
    let url = format!("http://127.0.0.1:{}{path}", d.port);
    let agent = ureq::AgentBuilder::new().redirects(0).build();
    matches!(authorized(agent.get(&url)).call(), Ok(r) if r.status() == 200)
}

#[test]
fn a_replica_that_owns_no_partition_is_ready() {
    let _machine = share_the_machine();
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::new(&dir.path().join("a"), 1);
    let mut second = Setup::named(&dir.path().join("b"));
    second.clicks = setup.clicks.clone();
    second.recs = setup.recs.clone();
    second.dlq = setup.dlq.clone();
    second.group = setup.group.clone();
    let a = Daemon::start(&setup.env(), free_port());
    let b = Daemon::start(&second.env(), free_port());
    // no data at all: both join the group, one owns the partition, the other none
    for d in [&a, &b] {
        d.wait_for(Duration::from_secs(90), "ready", |d| {
            d.get("/readyz").map(|r| r.0) == Some(200)
        });
    }
    let owned = owned(&a) + owned(&b);
    assert_eq!(owned, 1.0);
    for d in [a, b] {
        let (code, _) = d.terminate();
        assert_eq!(code, Some(0));
    }
}

/// Within the cleanup delay a replica still has the copies of the partitions it gave up on disk,
/// but its export (the replica stopped) holds only the users of the partitions it held.
#[test]
fn a_replicas_export_leaves_out_the_partitions_it_gave_up() {
    let _machine = share_the_machine();
    let dir = tempfile::tempdir().unwrap();
    let f = fleet(dir.path());
    let a = replica(&f, dir.path(), "a");
    settled(&[&a], PARTITIONS, "a owns everything");
    produce_round(&f, 0);
    a.wait_for(Duration::from_secs(60), "every user stored", |d| {
        d.metric("multivaed_store_users", "") >= USERS as f64
    });
    let b = replica(&f, dir.path(), "b");
    settled(&[&a, &b], PARTITIONS, "b took some partitions");
    let of_a: HashSet<i32> = announced(&f)["a"].iter().copied().collect();
    assert_eq!(
        a.metric("multivaed_store_users", ""),
        USERS as f64,
        "a keeps the copies it gave up for serve.state_cleanup_delay"
    );
    let env = replica_env(&f, dir.path(), "a");
    a.terminate();
    let partition = |u: &str| Partitioner::ConsistentRandom.partition(u.as_bytes(), PARTITIONS);
    let mine: HashSet<String> = (0..USERS)
        .map(|u| format!("u{u}"))
        .filter(|u| of_a.contains(&partition(u)))
        .collect();
    assert!(!mine.is_empty() && mine.len() < USERS, "{of_a:?}");
    let exported = exported_users(&env, &dir.path().join("a.jsonl"));
    assert_eq!(
        exported, mine,
        "a's export holds the users of the partitions it held"
    );
    b.terminate();
}

/// Each partition's claims in the changelog (committed markers, log order): (epoch, owner).
fn claims(f: &Fleet) -> HashMap<i32, Vec<(u64, String)>> {
    let mut out: HashMap<i32, Vec<(u64, String)>> = HashMap::new();
    for m in read_all_partitioned(&f.changelog, f.partitions) {
        let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap_or_default();
        if v["kind"] == "marker" {
            let claim = (
                v["epoch"].as_u64().unwrap(),
                v["owner"].as_str().unwrap().to_string(),
            );
            let seen = out.entry(m.partition).or_default();
            if seen.last() != Some(&claim) {
                seen.push(claim);
            }
        }
    }
    out
}

/// A restore far longer than the group's session and poll interval (each restored chunk delayed
/// 8 s, `session.timeout.ms` 6 s, `max.poll.interval.ms` 7 s): the replica keeps polling while
/// it restores, so the group never drops it; it is not ready while it restores; it ends owning
/// its partitions with every history, and no epoch of any partition was claimed by two owners.
#[test]
fn a_restore_longer_than_the_session_completes_with_one_owner_per_epoch() {
    let _machine = share_the_machine();
    let dir = tempfile::tempdir().unwrap();
    let f = fleet(dir.path());
    let impatient = [
        ("MULTIVAED_KAFKA__PROPERTIES__SESSION_TIMEOUT_MS", "6000"),
        ("MULTIVAED_KAFKA__PROPERTIES__MAX_POLL_INTERVAL_MS", "7000"),
    ];
    let a = replica_with(&f, dir.path(), "a", &impatient);
    settled(&[&a], PARTITIONS, "a owns everything");
    produce_round(&f, 0);
    produce_round(&f, 1);
    a.wait_for(Duration::from_secs(60), "a stored two rounds", |d| {
        d.metric("multivaed_store_interactions", "") >= (2 * USERS) as f64
    });
    let mut slow = impatient.to_vec();
    slow.push(("MULTIVAED_DELAY_AT", "restore.applied:8000"));
    let b = replica_with(&f, dir.path(), "b", &slow);
    b.wait_for(Duration::from_secs(60), "b restoring", |d| {
        d.metric("multivaed_partitions_restoring", "") >= 1.0
    });
    let started = Instant::now();
    // restoring: never ready, and the partitions it restores are nobody's to serve from b
    while b.metric("multivaed_partitions_restoring", "") > 0.0 {
        assert_ne!(status(&b, "/readyz"), 200, "b ready while restoring");
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "b's restores never ended"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let took = started.elapsed();
    eprintln!("b restored for {:.1} s", took.as_secs_f64());
    assert!(took > Duration::from_secs(7), "the restore was not slow");
    settled(&[&a, &b], PARTITIONS, "a and b share the partitions");
    b.wait_for(Duration::from_secs(30), "b ready", |d| {
        d.get("/readyz").map(|r| r.0) == Some(200)
    });
    assert!(!b.log_contains("restore failed"), "b's restore failed");
    // every user's history whole at their owner, through either replica
    for u in 0..USERS {
        let user = format!("u{u}");
        let (code, body) = a.get(&format!("/v1/users/{user}/history")).unwrap();
        assert_eq!(code, 200, "{user}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["items"].as_array().unwrap().len(), 2, "{user}: {body}");
    }
    // one owner per epoch, epochs rising, in every partition's log
    for (p, claims) in claims(&f) {
        let mut owners: HashMap<u64, HashSet<String>> = HashMap::new();
        for (epoch, owner) in &claims {
            owners.entry(*epoch).or_default().insert(owner.clone());
        }
        for (epoch, who) in owners {
            assert_eq!(
                who.len(),
                1,
                "partition {p}: epoch {epoch} claimed by {who:?}"
            );
        }
        let epochs: Vec<u64> = claims.iter().map(|c| c.0).collect();
        assert!(
            epochs.windows(2).all(|w| w[0] <= w[1]),
            "partition {p}: epochs go back: {claims:?}"
        );
    }
    for d in [a, b] {
        let (code, _) = d.terminate();
        assert_eq!(code, Some(0));
    }
}

/// A replica that dies between storing a batch and writing its changelog (an abort at
/// `ingest.flushed`): restarted on its disk, it re-consumes from the last marker what its store
/// already holds and writes those users to the changelog again, so a fresh replica restoring
/// from the changelog has every history whole.
#[test]
fn a_crash_between_the_store_and_the_changelog_loses_nothing_from_the_changelog() {
    let _machine = share_the_machine();
    let dir = tempfile::tempdir().unwrap();
    let f = fleet(dir.path());
    let mut a = replica_with(
        &f,
        dir.path(),
        "a",
        &[("MULTIVAED_CRASH_AT", "ingest.flushed:1")],
    );
    settled(&[&a], PARTITIONS, "a owns everything");
    produce_round(&f, 0);
    let deadline = Instant::now() + Duration::from_secs(60);
    while a.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "a never reached its crash point");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(a.log_contains("aborting at ingest.flushed"));
    let a = replica(&f, dir.path(), "a");
    a.wait_for(Duration::from_secs(60), "every click stored", |d| {
        d.metric("multivaed_store_interactions", "") >= USERS as f64
    });
    settled(&[&a], PARTITIONS, "a owns everything again");
    std::thread::sleep(Duration::from_secs(2));
    let (code, _) = a.terminate();
    assert_eq!(code, Some(0));
    let c = replica(&f, dir.path(), "c");
    settled(&[&c], PARTITIONS, "c owns everything");
    for u in 0..USERS {
        let user = format!("u{u}");
        let (status, body) = c.get(&format!("/v1/users/{user}/history")).unwrap();
        assert_eq!(status, 200, "{user} is missing from the changelog: {body}");
    }
    c.terminate();
}
