//! Operator scenarios from the hardening audit, each against the real broker and the daemon as
//! a process: an oversized bad message, a missing topic at start, re-scoring after swaps, a burst
//! of pulls, and replicas beyond the partition count.

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};

fn click(user: &str, item: &str) -> Vec<u8> {
    format!(r#"{{"user_id": "{user}", "item_id": "{item}"}}"#).into_bytes()
}

/// Users in 4 taste groups of 25 items each: quickly learnt, far better than popularity.
fn grouped_click(n: usize, users: usize) -> (String, Vec<u8>) {
    let u = n % users;
    let item = (u % 4) * 25 + (n / users * 7 + u * 3) % 25;
    let user = format!("u{u}");
    let payload = click(&user, &format!("i{item}"));
    (user, payload)
}

/// Produces grouped clicks at `per_second` until `stop`.
fn keep_clicking(
    topic: String,
    per_second: f64,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<usize> {
    std::thread::spawn(move || {
        let p = producer();
        let start = Instant::now();
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) {
            let due = Duration::from_secs_f64(n as f64 / per_second);
            if let Some(w) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(w);
            }
            let (k, v) = grouped_click(n, 200);
            send(&p, BaseRecord::to(&topic).key(k.as_bytes()).payload(&v[..]));
            n += 1;
        }
        p.flush(Duration::from_secs(30)).unwrap();
        n
    })
}

#[test]
fn an_oversized_bad_message_is_dead_lettered_truncated_and_ingestion_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::new(dir.path(), 1);
    let daemon = Daemon::start(&setup.env(), free_port());
    // ~1,000,000 bytes of non-JSON: more than the daemon's producer may send whole
    let big = vec![b'x'; 1_000_000];
    let p: ThreadedProducer<rdkafka::producer::DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("message.max.bytes", "1048576")
        .create()
        .unwrap();
    send(
        &p,
        BaseRecord::to(&setup.clicks)
            .key(&b"big"[..])
            .payload(&big[..]),
    );
    for n in 0..100 {
        let v = click(&format!("u{n}"), &format!("i{}", n % 7));
        send(
            &p,
            BaseRecord::to(&setup.clicks).key(&b"k"[..]).payload(&v[..]),
        );
    }
    p.flush(Duration::from_secs(30)).unwrap();
    daemon.wait_for(
        Duration::from_secs(60),
        "the 100 clicks after it stored",
        |d| d.metric("multivaed_store_interactions", "") >= 100.0,
    );
    assert_eq!(
        daemon.metric("multivaed_dead_letters_truncated_total", ""),
        1.0
    );
    let letters = read_all(&setup.dlq, 1, Duration::from_secs(3));
    assert_eq!(letters.len(), 1, "one dead letter");
    let l = &letters[0];
    assert_eq!(l.headers["multivaed.error"], "too_large");
    assert_eq!(l.headers["multivaed.truncated"], "true");
    assert_eq!(l.headers["multivaed.original.bytes"], "1000000");
    assert_eq!(l.headers["multivaed.source.topic"], setup.clicks);
    assert_eq!(l.headers["multivaed.source.offset"], "0");
    assert_eq!(l.payload.len(), 64 * 1024, "cut to kafka.max_message_bytes");
    daemon.wait_for(Duration::from_secs(30), "ready", |d| {
        d.get("/readyz").map(|r| r.0) == Some(200)
    });
    let (code, _) = daemon.terminate();
    assert_eq!(code, Some(0));
}

#[test]
fn a_missing_topic_is_a_named_error_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::named(dir.path());
    create_topics(&[(&setup.clicks, 1), (&setup.recs, 1)]);
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut child = Command::new(daemon_exe())
        .arg("run")
        .envs(setup.env())
        .env(
            "MULTIVAED_HTTP__LISTEN",
            format!("127.0.0.1:{}", free_port()),
        )
        .stdout(std::process::Stdio::null())
        .stderr(log.reopen().unwrap())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let stderr = std::fs::read_to_string(log.path()).unwrap();
    let status = status.unwrap_or_else(|| panic!("still running after 60 s: {stderr}"));
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("kafka.dead_letter_topic")
            && stderr.contains(&setup.dlq)
            && stderr.contains("does not exist"),
        "{stderr}"
    );
}

#[test]
fn after_model_swaps_a_user_is_rescored_only_within_the_window_after_their_click() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::new(dir.path(), 1);
    let mut env = setup.env();
    env.retain(|(k, _)| !k.starts_with("MULTIVAED_TRAIN__") && !k.starts_with("MULTIVAED_MODEL__"));
    env.extend(
        [
            ("MULTIVAED_SERVE__RESCORE_WINDOW", "5s"),
            ("MULTIVAED_TRAIN__INTERVAL", "2s"),
            ("MULTIVAED_TRAIN__MIN_NEW_EVENTS", "1000000"),
            ("MULTIVAED_TRAIN__MIN_USERS", "50"),
            ("MULTIVAED_TRAIN__MAX_EPOCHS_PER_ROUND", "3"),
            ("MULTIVAED_TRAIN__CATCH_UP", "false"),
            ("MULTIVAED_TRAIN__MIN_NEW_FRACTION", "1000"),
            ("MULTIVAED_TRAIN__VALIDATION_USERS", "20"),
            ("MULTIVAED_TRAIN__MIN_VALIDATION_USERS", "3"),
            ("MULTIVAED_TRAIN__MAX_NDCG_DROP", "1.0"),
            ("MULTIVAED_MODEL__MLP_HIDDEN_SIZE", "[32]"),
            ("MULTIVAED_MODEL__LATENT_DIMENSION", "8"),
            ("MULTIVAED_MODEL__BATCH_SIZE", "50"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    let daemon = Daemon::start(&env, free_port());
    let stop = Arc::new(AtomicBool::new(false));
    let others = keep_clicking(setup.clicks.clone(), 200.0, stop.clone());
    daemon.wait_for(Duration::from_secs(120), "a second model", |d| {
        d.metric("multivaed_model_version", "") >= 2.0
    });
    produce(&setup.clicks, &[("solo".into(), click("solo", "i3"))]);
    let at_click = daemon.metric("multivaed_model_version", "");
    std::thread::sleep(Duration::from_secs(30));
    let swaps = daemon.metric("multivaed_model_version", "") - at_click;
    stop.store(true, Ordering::Relaxed);
    others.join().unwrap();
    let solo: Vec<serde_json::Value> = read_all(&setup.recs, 1, Duration::from_secs(3))
        .into_iter()
        .filter(|m| m.key.as_deref() == Some(&b"solo"[..]))
        .map(|m| serde_json::from_slice(&m.payload).unwrap())
        .collect();
    eprintln!(
        "{swaps} swaps in the 30 s after the click; solo got {} recommendations",
        solo.len()
    );
    assert!(
        swaps >= 8.0,
        "only {swaps} swaps: too few to tell re-scoring apart"
    );
    assert!(
        (1..=4).contains(&solo.len()),
        "{} recommendations for one click with a 5 s window and swaps every ~2 s: {solo:?}",
        solo.len()
    );
    assert!(daemon.metric("multivaed_rescore_to_recommendation_seconds_count", "") >= 1.0);
    let (code, _) = daemon.terminate();
    assert_eq!(code, Some(0));
}

#[test]
fn a_burst_of_pulls_past_the_limit_gets_429_and_push_scoring_keeps_going() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::new(dir.path(), 1);
    let mut env = setup.env();
    env.push(("MULTIVAED_HTTP__MAX_CONCURRENT_PULLS".into(), "1".into()));
    let daemon = Daemon::start(&env, free_port());
    let stop = Arc::new(AtomicBool::new(false));
    let clicker = keep_clicking(setup.clicks.clone(), 200.0, stop.clone());
    daemon.wait_for(Duration::from_secs(60), "users scored", |d| {
        d.metric("multivaed_recommendations_published_total", "") >= 100.0
    });
    let pushed_before = daemon.metric("multivaed_recommendations_published_total", "");
    let latency_before = daemon
        .buckets("multivaed_click_to_recommendation_seconds")
        .unwrap();
    // 16 threads pull k = 1000 as fast as they can for 10 s
    let port = daemon.port;
    let statuses: Vec<HashMap<u16, usize>> = (0..16)
        .map(|t| {
            std::thread::spawn(move || {
                let mut seen = HashMap::new();
                let end = Instant::now() + Duration::from_secs(10);
                while Instant::now() < end {
                    let url =
                        format!("http://127.0.0.1:{port}/v1/users/u{t}/recommendations?k=1000");
                    let status = match ureq::get(&url).timeout(Duration::from_secs(10)).call() {
                        Ok(r) => r.status(),
                        Err(ureq::Error::Status(s, r)) => {
                            if s == 429 {
                                assert_eq!(r.header("retry-after"), Some("1"));
                            }
                            s
                        }
                        Err(e) => panic!("pull failed: {e}"),
                    };
                    *seen.entry(status).or_insert(0) += 1;
                }
                seen
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect();
    let mut total: HashMap<u16, usize> = HashMap::new();
    for s in statuses {
        for (k, v) in s {
            *total.entry(k).or_insert(0) += v;
        }
    }
    eprintln!("pull answers by status: {total:?}");
    assert!(
        total.get(&429).copied().unwrap_or(0) > 0,
        "no pull was refused: {total:?}"
    );
    assert!(
        total.get(&200).copied().unwrap_or(0) > 0,
        "no pull was answered: {total:?}"
    );
    assert_eq!(
        total.keys().filter(|s| ![200, 429].contains(s)).count(),
        0,
        "{total:?}"
    );
    assert!(daemon.metric("multivaed_pull_requests_refused_total", "") > 0.0);
    // push scoring went on through the burst (200 clicks/s over 200 users)
    let pushed = daemon.metric("multivaed_recommendations_published_total", "") - pushed_before;
    assert!(
        pushed >= 200.0,
        "only {pushed} recommendations pushed during the burst"
    );
    // and stayed prompt: (almost) every click answered within ~2 s (typically ~0.1 s)
    let latency = daemon
        .buckets("multivaed_click_to_recommendation_seconds")
        .unwrap();
    let delta = |le: f64| -> f64 {
        let at = |b: &[(f64, f64)]| b.iter().find(|x| x.0 >= le).map_or(0.0, |x| x.1);
        at(&latency) - at(&latency_before)
    };
    let (within, all) = (delta(2.0), delta(f64::INFINITY));
    eprintln!("clicks answered during the burst: {all}, within 2.05 s: {within}");
    assert!(
        within >= 0.99 * all,
        "{within} of {all} clicks answered within 2.05 s"
    );
    stop.store(true, Ordering::Relaxed);
    clicker.join().unwrap();
    let (code, _) = daemon.terminate();
    assert_eq!(code, Some(0));
}

#[test]
fn a_replica_that_owns_no_partition_is_ready() {
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
    let owned = a.metric("multivaed_partitions_assigned", "")
        + b.metric("multivaed_partitions_assigned", "");
    assert_eq!(owned, 1.0);
    for d in [a, b] {
        let (code, _) = d.terminate();
        assert_eq!(code, Some(0));
    }
}
