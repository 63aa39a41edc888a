//! Helpers of the integration tests: a real broker (KAFKA_BROKERS), the daemon as a child
//! process, its HTTP surface.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

/// The broker the tests run against. Tests that need one fail loudly without it: CI always
/// provides it through scripts/test.sh.
pub fn brokers() -> String {
    std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| {
        panic!("KAFKA_BROKERS is not set: run the tests with scripts/test.sh, which starts a real broker")
    })
}

/// A name unique to this test run.
pub fn unique(prefix: &str) -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}-{}-{}", std::process::id(), t % 1_000_000_000)
}

pub fn create_topics(topics: &[(&str, i32)]) {
    create_topics_on(&brokers(), topics)
}

/// Creates topics (name, partitions) on the broker at `bootstrap`.
pub fn create_topics_on(bootstrap: &str, topics: &[(&str, i32)]) {
    if let Err(e) = multivaed::bench::create_topics(bootstrap, topics) {
        panic!("{e:#}");
    }
}

pub fn producer() -> ThreadedProducer<DefaultProducerContext> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .expect("producer")
}

/// Produces raw payloads keyed by `key`, then flushes.
pub fn produce(topic: &str, msgs: &[(String, Vec<u8>)]) {
    let p = producer();
    for (k, v) in msgs {
        send(&p, BaseRecord::to(topic).key(k.as_bytes()).payload(&v[..]));
    }
    p.flush(Duration::from_secs(30)).expect("flush");
}

/// Enqueues one record, waiting while the producer's queue is full; any other error fails.
pub fn send(p: &ThreadedProducer<DefaultProducerContext>, mut rec: BaseRecord<'_, [u8], [u8]>) {
    loop {
        match p.send(rec) {
            Ok(()) => return,
            Err((e, r)) => {
                assert!(
                    matches!(
                        e,
                        rdkafka::error::KafkaError::MessageProduction(
                            rdkafka::types::RDKafkaErrorCode::QueueFull
                        )
                    ),
                    "{e}"
                );
                std::thread::sleep(Duration::from_millis(5));
                rec = r;
            }
        }
    }
}

/// A consumed message.
#[derive(Debug, Clone)]
pub struct Consumed {
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: HashMap<String, String>,
}

/// Reads a topic from the beginning until nothing arrives for `idle`.
pub fn read_all(topic: &str, partitions: i32, idle: Duration) -> Vec<Consumed> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", unique("reader"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    c.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let mut last = Instant::now();
    while last.elapsed() < idle {
        match c.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                let mut headers = HashMap::new();
                if let Some(h) = m.headers() {
                    for hd in h.iter() {
                        headers.insert(
                            hd.key.to_string(),
                            String::from_utf8_lossy(hd.value.unwrap_or_default()).into_owned(),
                        );
                    }
                }
                out.push(Consumed {
                    key: m.key().map(|k| k.to_vec()),
                    payload: m.payload().unwrap_or_default().to_vec(),
                    headers,
                });
                last = Instant::now();
            }
            Some(Err(e)) => panic!("consume {topic}: {e}"),
            None => {}
        }
    }
    out
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The daemon as a child process.
pub struct Daemon {
    pub child: Child,
    pub port: u16,
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Daemon {
    pub fn start(env: &[(String, String)], port: u16) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_multivaed"));
        cmd.arg("run").stdout(Stdio::null()).stderr(Stdio::piped());
        cmd.env("RUST_LOG", "info,rdkafka=warn");
        cmd.env("MULTIVAED_HTTP__LISTEN", format!("127.0.0.1:{port}"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start multivaed run");
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let l = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if std::env::var("MULTIVAED_TEST_ECHO").is_ok() {
                    eprintln!("daemon: {line}");
                }
                l.lock().unwrap().push(line);
            }
        });
        let d = Self { child, port, log };
        d.wait_for(Duration::from_secs(60), "HTTP up", |d| {
            d.get("/healthz").map(|(s, _)| s == 200).unwrap_or(false)
        });
        d
    }

    pub fn get(&self, path: &str) -> Option<(u16, String)> {
        let url = format!("http://127.0.0.1:{}{path}", self.port);
        match ureq::get(&url).timeout(Duration::from_secs(10)).call() {
            Ok(r) => {
                let s = r.status();
                Some((s, r.into_string().unwrap_or_default()))
            }
            Err(ureq::Error::Status(s, r)) => Some((s, r.into_string().unwrap_or_default())),
            Err(_) => None,
        }
    }

    /// Sum of a metric over its label sets (`labels` filters on `key="value"` substrings).
    pub fn metric(&self, name: &str, labels: &str) -> f64 {
        let (_, text) = self.get("/metrics").expect("metrics");
        metric_value(&text, name, labels)
    }

    pub fn wait_for(&self, limit: Duration, what: &str, mut f: impl FnMut(&Self) -> bool) {
        let start = Instant::now();
        while start.elapsed() < limit {
            if f(self) {
                return;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        let log = self.log.lock().unwrap();
        let tail: Vec<&String> = log.iter().rev().take(40).collect();
        panic!("timed out after {limit:?} waiting for {what}; daemon log tail (newest first):\n{tail:#?}");
    }

    /// SIGTERM; returns the exit code and how long it took.
    pub fn terminate(mut self) -> (Option<i32>, Duration) {
        let start = Instant::now();
        Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return (s.code(), start.elapsed());
            }
            if start.elapsed() > Duration::from_secs(30) {
                let _ = self.child.kill();
                return (None, start.elapsed());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_contains(&self, s: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(s))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn metric_value(text: &str, name: &str, labels: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            let n = l.split(['{', ' ']).next().unwrap_or("");
            n == name && l.contains(labels)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Environment for a daemon on fresh topics and data dir.
pub struct Setup {
    pub clicks: String,
    pub recs: String,
    pub dlq: String,
    pub group: String,
    pub data_dir: PathBuf,
}

impl Setup {
    pub fn new(dir: &Path, partitions: i32) -> Self {
        let s = Self::named(dir);
        create_topics(&[(&s.clicks, partitions), (&s.recs, 1), (&s.dlq, 1)]);
        s
    }

    /// Fresh names, no topics created.
    pub fn named(dir: &Path) -> Self {
        Self {
            clicks: unique("clicks"),
            recs: unique("recs"),
            dlq: unique("dlq"),
            group: unique("group"),
            data_dir: dir.to_path_buf(),
        }
    }

    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("MULTIVAED_KAFKA__BROKERS", brokers()),
            ("MULTIVAED_KAFKA__CLICKS_TOPIC", self.clicks.clone()),
            ("MULTIVAED_KAFKA__RECOMMENDATIONS_TOPIC", self.recs.clone()),
            ("MULTIVAED_KAFKA__DEAD_LETTER_TOPIC", self.dlq.clone()),
            ("MULTIVAED_KAFKA__GROUP_ID", self.group.clone()),
            ("MULTIVAED_DATA_DIR", self.data_dir.display().to_string()),
            ("MULTIVAED_DEVICE", "cpu".into()),
            ("MULTIVAED_TRAIN__INTERVAL", "3s".into()),
            ("MULTIVAED_TRAIN__MIN_NEW_EVENTS", "4000".into()),
            ("MULTIVAED_TRAIN__MIN_USERS", "200".into()),
            ("MULTIVAED_TRAIN__EPOCHS_PER_ROUND", "3".into()),
            ("MULTIVAED_TRAIN__VALIDATION_USERS", "100".into()),
            ("MULTIVAED_TRAIN__MAX_NDCG_DROP", "1.0".into()),
            ("MULTIVAED_MODEL__MLP_HIDDEN_SIZE", "[200]".into()),
            ("MULTIVAED_MODEL__LATENT_DIMENSION", "50".into()),
            ("MULTIVAED_MODEL__TOTAL_ANNEAL_STEPS", "200".into()),
            ("MULTIVAED_SERVE__K", "10".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
}
