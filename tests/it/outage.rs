//! Broker outages against an Apache Kafka broker of the test's own (the shared one keeps serving the
//! other tests): frozen for 30 s mid-stream (SIGSTOP/SIGCONT), and absent when the daemon starts.
//! The daemon stays up, /healthz stays OK, /readyz turns not-ready and back, nothing is lost,
//! consumption resumes by itself, and recommendations whose delivery failed during the freeze
//! are delivered after it.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};

/// An Apache Kafka broker of the test's own (`scripts/kafka.sh` on another port), stopped when
/// dropped.
struct Broker {
    port: u16,
    pid: u32,
    addr: String,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-CONT", &self.pid.to_string()])
            .status();
        let _ = Self::script(self.port, "stop").status();
    }
}

impl Broker {
    fn script(port: u16, what: &str) -> Command {
        let mut cmd = Command::new("bash");
        cmd.arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/kafka.sh"))
            .arg(what)
            .env("KAFKA_PORT", port.to_string())
            .stdout(Stdio::null());
        cmd
    }

    fn start(port: u16) -> Self {
        let ok = Self::script(port, "start")
            .status()
            .expect("run scripts/kafka.sh")
            .success();
        assert!(ok, "scripts/kafka.sh start on port {port} failed");
        let home = std::env::var("MULTIVAED_TOOLS")
            .map(PathBuf::from)
            .unwrap_or_else(|_| PathBuf::from("/var/tmp/multivaed-tools"));
        let pid = std::fs::read_to_string(home.join(format!("kafka-{port}/broker.pid")))
            .expect("the broker's pid file")
            .trim()
            .parse()
            .expect("a pid");
        Self {
            port,
            pid,
            addr: format!("127.0.0.1:{port}"),
        }
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig}");
    }

    fn create_topics(&self, setup: &Setup) {
        create_topics_on(
            &self.addr,
            &[(&setup.clicks, 2), (&setup.recs, 1), (&setup.dlq, 1)],
        );
    }

    fn producer(&self) -> ThreadedProducer<rdkafka::producer::DefaultProducerContext> {
        ClientConfig::new()
            .set("bootstrap.servers", &self.addr)
            .set("linger.ms", "5")
            .create()
            .unwrap()
    }
}

fn click(n: usize) -> (String, Vec<u8>) {
    let u = n % 700;
    (
        format!("u{u}"),
        click_event(&format!("u{u}"), &format!("i{}", (n / 700) * 3 + u % 40)),
    )
}

fn produce_range(
    p: &ThreadedProducer<rdkafka::producer::DefaultProducerContext>,
    topic: &str,
    range: std::ops::Range<usize>,
    per_second: f64,
) {
    let start = Instant::now();
    let first = range.start;
    for n in range {
        let due = Duration::from_secs_f64((n - first) as f64 / per_second);
        if let Some(w) = due.checked_sub(start.elapsed()) {
            std::thread::sleep(w);
        }
        let (k, v) = click(n);
        send(p, BaseRecord::to(topic).key(k.as_bytes()).payload(&v[..]));
    }
}

fn env_for(setup: &Setup, broker: &str) -> Vec<(String, String)> {
    let mut env = setup.env();
    env.retain(|(k, _)| k != "MULTIVAED_KAFKA__BROKERS" && k != "MULTIVAED_TRAIN__MIN_USERS");
    env.push(("MULTIVAED_KAFKA__BROKERS".into(), broker.into()));
    env.push(("MULTIVAED_TRAIN__MIN_USERS".into(), "100".into()));
    env
}

#[test]
fn a_frozen_broker_makes_the_daemon_not_ready_then_it_resumes_and_loses_nothing() {
    let _machine = share_the_machine();
    let broker = Broker::start(free_port());
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::named(dir.path());
    broker.create_topics(&setup);
    // deliveries give up after 5 s (well inside the freeze), and scoring batches are 8 s
    // apart, so the recommendations of clicks consumed just after a batch and just before the
    // freeze are published into it and fail
    let config = dir.path().join("multivaed.toml");
    std::fs::write(
        &config,
        "[kafka.properties]\n\"message.timeout.ms\" = \"5000\"\n",
    )
    .unwrap();
    let mut env = env_for(&setup, &broker.addr);
    env.push(("MULTIVAED_CONFIG".into(), config.display().to_string()));
    env.push(("MULTIVAED_SERVE__INTERVAL_MS".into(), "8000".into()));
    let mut daemon = Daemon::start(&env, free_port());
    let p = broker.producer();
    produce_range(&p, &setup.clicks, 0..2800, 1e9);
    p.flush(Duration::from_secs(30)).unwrap();
    daemon.wait_for(Duration::from_secs(120), "ready with a model", |d| {
        status(d, "/readyz") == 200
    });

    // clicks keep coming during the outage (the producer buffers and retries)
    let total = 2800 + 6000;
    let topic = setup.clicks.clone();
    let addr = broker.addr.clone();
    let feeder = std::thread::spawn(move || {
        let p: ThreadedProducer<rdkafka::producer::DefaultProducerContext> = ClientConfig::new()
            .set("bootstrap.servers", &addr)
            .set("linger.ms", "5")
            .set("message.timeout.ms", "300000")
            .create()
            .unwrap();
        produce_range(&p, &topic, 2800..total, 300.0);
        p.flush(Duration::from_secs(120)).unwrap();
    });
    std::thread::sleep(Duration::from_secs(3));
    // 40 users who click once, just after a scoring batch; consumed, then the freeze: their
    // only recommendation is published into it, at the next batch
    let batches = daemon.metric("multivaed_scoring_duration_seconds_count", "");
    daemon.wait_for(Duration::from_secs(30), "a scoring batch", |d| {
        d.metric("multivaed_scoring_duration_seconds_count", "") > batches
    });
    let consumed = daemon.metric("multivaed_events_consumed_total", "");
    let once: Vec<(String, Vec<u8>)> = (0..40)
        .map(|i| {
            let user = format!("once{i}");
            let payload =
                format!(r#"{{"user_id": "{user}", "item_id": "i{}"}}"#, i % 40).into_bytes();
            (user, payload)
        })
        .collect();
    for (k, v) in &once {
        send(
            &p,
            BaseRecord::to(&setup.clicks)
                .key(k.as_bytes())
                .payload(&v[..]),
        );
    }
    p.flush(Duration::from_secs(30)).unwrap();
    daemon.wait_for(Duration::from_secs(30), "the once-users consumed", |d| {
        d.metric("multivaed_events_consumed_total", "") >= consumed + 40.0
    });
    broker.signal("-STOP");
    let frozen = Instant::now();
    let mut saw_not_ready = None;
    while frozen.elapsed() < Duration::from_secs(30) {
        assert_eq!(
            status(&daemon, "/healthz"),
            200,
            "/healthz failed during the outage"
        );
        if saw_not_ready.is_none() && status(&daemon, "/readyz") == 503 {
            saw_not_ready = Some(frozen.elapsed());
        }
        assert!(
            daemon.child.try_wait().unwrap().is_none(),
            "the daemon exited"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let not_ready_after =
        saw_not_ready.expect("/readyz never turned not-ready while the broker was frozen");
    broker.signal("-CONT");
    let thawed = Instant::now();
    daemon.wait_for(Duration::from_secs(90), "ready again", |d| {
        status(d, "/readyz") == 200
    });
    let ready_after = thawed.elapsed();
    feeder.join().unwrap();
    daemon.wait_for(Duration::from_secs(120), "every click stored", |d| {
        d.metric("multivaed_store_interactions", "") >= (total + 40) as f64
    });
    assert_eq!(
        daemon.metric("multivaed_store_interactions", ""),
        (total + 40) as f64
    );
    assert!(daemon.child.try_wait().unwrap().is_none());
    eprintln!(
        "not ready {not_ready_after:?} after the freeze, ready {ready_after:?} after the thaw"
    );
    // every once-user has a recommendation, though its first delivery failed
    let (failed, retries) = (
        daemon.metric("multivaed_publish_errors_total", ""),
        daemon.metric("multivaed_publish_retries_total", ""),
    );
    assert!(
        failed >= 1.0,
        "no delivery failed during the freeze: the scenario did not happen"
    );
    eprintln!("{failed} deliveries failed during the freeze, {retries} users queued again");
    let start = Instant::now();
    let missing = loop {
        let recs = read_all_on(&broker.addr, &setup.recs, 1, Duration::from_secs(3));
        let missing: Vec<&String> = once
            .iter()
            .map(|(u, _)| u)
            .filter(|u| !recs.iter().any(|m| m.key.as_deref() == Some(u.as_bytes())))
            .collect();
        if missing.is_empty() || start.elapsed() > Duration::from_secs(60) {
            break missing.into_iter().cloned().collect::<Vec<_>>();
        }
    };
    assert!(
        missing.is_empty(),
        "no recommendation after the outage for {missing:?} ({retries} retries)"
    );
    let (code, _) = daemon.terminate();
    assert_eq!(code, Some(0));
}

#[test]
fn a_daemon_started_without_a_broker_waits_for_it() {
    let _machine = share_the_machine();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::named(dir.path());
    let daemon = Daemon::start(&env_for(&setup, &addr), free_port());
    for _ in 0..10 {
        assert_eq!(status(&daemon, "/healthz"), 200);
        assert_eq!(status(&daemon, "/readyz"), 503);
        std::thread::sleep(Duration::from_millis(500));
    }
    let broker = Broker::start(port);
    broker.create_topics(&setup);
    let p = broker.producer();
    produce_range(&p, &setup.clicks, 0..2800, 1e9);
    p.flush(Duration::from_secs(30)).unwrap();
    daemon.wait_for(
        Duration::from_secs(120),
        "ready once the broker is there",
        |d| status(d, "/readyz") == 200,
    );
    daemon.wait_for(Duration::from_secs(60), "every click stored", |d| {
        d.metric("multivaed_store_interactions", "") >= 2800.0
    });
    let (code, _) = daemon.terminate();
    assert_eq!(code, Some(0));
}

/// A serving replica's restore is bounded and never lies about readiness. One that outlasts
/// `serve.restore_timeout` (its first chunk delayed past it) fails with an error naming the
/// partition: the replica is never ready and stops, to be restarted. One whose broker stops in
/// its middle ends within a bound: the group's assignment is lost with the broker, so the
/// restore stops and claims nothing; the replica stays up, not ready, owning nothing, as one
/// started without a broker.
#[test]
fn a_restore_past_its_timeout_fails_and_one_whose_broker_stops_ends_never_ready() {
    let _machine = share_the_machine();
    let port = free_port();
    let broker = Broker::start(port);
    let dir = tempfile::tempdir().unwrap();
    let f = Fleet::named(dir.path(), 1);
    f.create_on(&broker.addr).unwrap();
    // a stores 3,000 users; their records fill the changelog
    let a = Daemon::start(
        &f.replica_env_on(&broker.addr, dir.path(), "a"),
        free_port(),
    );
    let p = broker.producer();
    for u in 0..3000 {
        let user = format!("u{u}");
        let event = click_event(&user, &format!("i{}", u % 50));
        send(
            &p,
            BaseRecord::to(&f.setup.clicks)
                .key(user.as_bytes())
                .payload(&event[..]),
        );
    }
    p.flush(Duration::from_secs(30)).unwrap();
    a.wait_for(Duration::from_secs(90), "every user stored", |d| {
        d.metric("multivaed_store_users", "") >= 3000.0
    });
    a.terminate();

    // c restores slower than its serve.restore_timeout allows
    let mut env = f.replica_env_on(&broker.addr, dir.path(), "c");
    env.push(("MULTIVAED_SERVE__RESTORE_TIMEOUT".into(), "2s".into()));
    env.push(("MULTIVAED_DELAY_AT".into(), "restore.applied:3000".into()));
    let mut c = Daemon::start(&env, free_port());
    let code = exit_while_never_ready(
        &mut c,
        Duration::from_secs(60),
        "c's restore past its timeout",
    );
    assert_ne!(code, Some(0), "c stops with an error");
    assert!(
        c.log_contains("cannot restore partition 0")
            && c.log_contains("longer than serve.restore_timeout"),
        "the error names the partition and the bound"
    );

    // b, with an empty disk, freezes itself after the first chunk it restores
    let mut env = f.replica_env_on(&broker.addr, dir.path(), "b");
    env.push(("MULTIVAED_STOP_AT".into(), "restore.applied:1".into()));
    let b = Daemon::start(&env, free_port());
    let pid = b.child.id();
    let deadline = Instant::now() + Duration::from_secs(90);
    while !process_stopped(pid) {
        assert!(Instant::now() < deadline, "b never reached its restore");
        std::thread::sleep(Duration::from_millis(100));
    }
    // the broker goes away for good, then b goes on restoring
    let stopped = Broker::script(port, "stop").status().unwrap().success();
    assert!(stopped, "scripts/kafka.sh stop");
    let thawed = Instant::now();
    let ok = Command::new("kill")
        .args(["-CONT", &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    while !b.log_contains("revoked during its restore") {
        assert!(
            thawed.elapsed() < Duration::from_secs(60),
            "the restore did not end within 60 s of the broker's going"
        );
        assert_ne!(
            status(&b, "/readyz"),
            200,
            "ready while a partition is not restored"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!(
        "restore ended {:.1} s after the broker stopped",
        thawed.elapsed().as_secs_f64()
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_ne!(status(&b, "/readyz"), 200, "ready without a broker");
    assert_eq!(
        b.metric("multivaed_partitions_owned", ""),
        0.0,
        "b owns what it never restored"
    );
    assert_eq!(b.metric("multivaed_partitions_restoring", ""), 0.0);
    assert!(!b.log_contains("partition restored from the changelog"));
    drop(broker);
}

/// Waits for `d` to exit, asserting it is never ready meanwhile; its exit code.
fn exit_while_never_ready(d: &mut Daemon, limit: Duration, what: &str) -> Option<i32> {
    let started = Instant::now();
    loop {
        if let Ok(Some(s)) = d.child.try_wait() {
            return s.code();
        }
        assert!(
            started.elapsed() < limit,
            "{what}: still running after {limit:?}"
        );
        assert_ne!(
            status(d, "/readyz"),
            200,
            "{what}: ready while not restored"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}
