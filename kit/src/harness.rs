//! The daemon under test, for the integration tests and the benchmarks alike: a real broker
//! (`KAFKA_BROKERS`), fresh topics, producers that wait out a full queue, the daemon as a child
//! process (its log kept, its HTTP surface and metrics read), topic readers.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaErrorCode;

/// The broker the tests run against. Tests that need one fail loudly without it: CI always
/// provides it through scripts/test.sh.
pub fn brokers() -> String {
    std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| {
        panic!("KAFKA_BROKERS is not set: run the tests with scripts/test.sh, which starts a real broker")
    })
}

/// The `/v1/` API token every daemon under test accepts (see [`token_file`]).
pub const API_TOKEN: &str = "multivaed-test-token-0123456789abcdef";

/// The fleet's control-plane key the processes under test share (see [`signing_key_file`]).
pub const SIGNING_KEY: &str = "multivaed-test-fleet-key-0123456789abcdef0123456789";

/// A file holding `text`, written once per process in the temporary directory.
fn process_file(name: &str, text: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
    if std::fs::read_to_string(&path).ok().as_deref() != Some(text) {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).expect("write a test credential");
        std::fs::rename(&tmp, &path).expect("write a test credential");
    }
    path
}

/// The token file of the daemons under test (holding [`API_TOKEN`]).
pub fn token_file() -> PathBuf {
    process_file("multivaed-kit-api-token", &format!("{API_TOKEN}\n"))
}

/// The key file of the fleets under test (holding [`SIGNING_KEY`]).
pub fn signing_key_file() -> PathBuf {
    process_file("multivaed-kit-fleet-key", &format!("{SIGNING_KEY}\n"))
}

/// Writes a record to partition 0 of a control topic (models or members) of the test broker:
/// signed with `key` (the fleet's: [`SIGNING_KEY`]) when one is given, unsigned otherwise —
/// a stranger's record.
pub fn write_control_record(
    topic: &str,
    kind: multivaed::control::Topic,
    record_key: &str,
    value: Option<&[u8]>,
    key: Option<&str>,
) {
    let p = producer();
    let mut rec: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic)
        .partition(0)
        .key(record_key.as_bytes());
    if let Some(v) = value {
        rec = rec.payload(v);
    }
    if let Some(k) = key {
        let signer = multivaed::control::ControlKey::new(k.as_bytes());
        rec = rec.headers(signer.headers(kind, record_key.as_bytes(), value));
    }
    send(&p, rec);
    p.flush(Duration::from_secs(30))
        .expect("flush a control record");
}

/// `request` with the tests' bearer token.
pub fn authorized(request: ureq::Request) -> ureq::Request {
    request.set("Authorization", &format!("Bearer {API_TOKEN}"))
}

/// A name unique to this process and moment.
pub fn unique(prefix: &str) -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{prefix}-{}-{}", std::process::id(), t % 1_000_000_000)
}

/// Creates topics (name, partitions) on the broker at `bootstrap` (replication 1).
pub fn try_create_topics(bootstrap: &str, topics: &[(&str, i32)]) -> Result<()> {
    let plain: Vec<NewTopicSpec> = topics.iter().map(|&(t, p)| (t, p, &[][..])).collect();
    try_create_topics_with(bootstrap, &plain)
}

/// A topic to create: its name, partitions and topic configs.
pub type NewTopicSpec<'a> = (&'a str, i32, &'a [(&'a str, &'a str)]);

/// Topic settings of a compacted topic (changelog, members, models), as `topics create` makes
/// them.
pub const COMPACTED: &[(&str, &str)] = &[("cleanup.policy", "compact")];

/// Topic settings that make Apache Kafka's log cleaner compact within seconds (with the test
/// broker's `log.cleaner.backoff.ms` = 500): segments roll after 200 ms (the active segment is
/// never cleaned), any dirt is worth a pass, records may be compacted at once, and tombstones
/// are removed one second after a pass first kept them. A segment only rolls when a record
/// arrives after `segment.ms`: [`roll_segments`] sends one.
pub const FAST_COMPACTION: &[(&str, &str)] = &[
    ("cleanup.policy", "compact"),
    ("segment.ms", "200"),
    ("min.cleanable.dirty.ratio", "0.001"),
    ("min.compaction.lag.ms", "0"),
    ("delete.retention.ms", "1000"),
    ("max.compaction.lag.ms", "1000"),
];

/// The key of the filler records [`roll_segments`] writes (user and item ids never hold
/// control characters).
pub const ROLL_KEY: &str = "\u{1}roll";

/// Writes one filler record (key [`ROLL_KEY`]) to every partition of `topic`, so segments older
/// than `segment.ms` roll and become cleanable.
pub fn roll_segments(bootstrap: &str, topic: &str, partitions: i32) -> Result<()> {
    let p = producer_to(bootstrap, "0")?;
    for partition in 0..partitions {
        try_send(
            &p,
            BaseRecord::to(topic)
                .partition(partition)
                .key(ROLL_KEY.as_bytes())
                .payload(&b"roll"[..]),
        )?;
    }
    p.flush(Duration::from_secs(10))
        .context("cannot flush the filler records")
}

/// Creates topics (name, partitions, topic configs) on the broker at `bootstrap` (replication 1).
pub fn try_create_topics_with(bootstrap: &str, topics: &[NewTopicSpec<'_>]) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .context("cannot create an admin client")?;
    let new: Vec<NewTopic> = topics
        .iter()
        .map(|(t, p, configs)| {
            configs.iter().fold(
                NewTopic::new(t, *p, TopicReplication::Fixed(1)),
                |n, (k, v)| n.set(k, v),
            )
        })
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

/// Creates topics on the test broker.
pub fn create_topics(topics: &[(&str, i32)]) {
    create_topics_on(&brokers(), topics)
}

/// Creates topics on the broker at `bootstrap`, failing the test if it cannot.
pub fn create_topics_on(bootstrap: &str, topics: &[(&str, i32)]) {
    if let Err(e) = try_create_topics(bootstrap, topics) {
        panic!("{e:#}");
    }
}

/// A producer to `bootstrap` for test and benchmark traffic.
pub fn producer_to(
    bootstrap: &str,
    linger_ms: &str,
) -> Result<ThreadedProducer<DefaultProducerContext>> {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", linger_ms)
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .context("cannot create a producer")
}

/// A producer to the test broker.
pub fn producer() -> ThreadedProducer<DefaultProducerContext> {
    producer_to(&brokers(), "5").expect("producer")
}

/// Enqueues one record, waiting while the producer's queue is full; any other error is returned.
pub fn try_send(
    p: &ThreadedProducer<DefaultProducerContext>,
    mut rec: BaseRecord<'_, [u8], [u8]>,
) -> Result<()> {
    loop {
        match p.send(rec) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                // let the background thread deliver
                std::thread::sleep(Duration::from_millis(2));
                rec = r;
            }
            Err((e, _)) => bail!("cannot produce: {e}"),
        }
    }
}

/// As [`try_send`], failing the test on an error.
pub fn send(p: &ThreadedProducer<DefaultProducerContext>, rec: BaseRecord<'_, [u8], [u8]>) {
    if let Err(e) = try_send(p, rec) {
        panic!("{e:#}");
    }
}

/// Produces raw payloads keyed by `key`, then flushes.
pub fn produce(topic: &str, msgs: &[(String, Vec<u8>)]) {
    let p = producer();
    for (k, v) in msgs {
        send(&p, BaseRecord::to(topic).key(k.as_bytes()).payload(&v[..]));
    }
    p.flush(Duration::from_secs(30)).expect("flush");
}

/// A click event as the daemon reads it (JSON, string ids).
pub fn click_event(user: &str, item: &str) -> Vec<u8> {
    format!(r#"{{"user_id": "{user}", "item_id": "{item}"}}"#).into_bytes()
}

/// Click `n` of `users` users in 4 taste groups of 25 items each (quickly learnt, far better
/// than popularity): (user, event).
pub fn grouped_click(n: usize, users: usize) -> (String, Vec<u8>) {
    let u = n % users;
    let item = (u % 4) * 25 + (n / users * 7 + u * 3) % 25;
    let user = format!("u{u}");
    let payload = click_event(&user, &format!("i{item}"));
    (user, payload)
}

/// Produces grouped clicks of 200 users to `topic` at `per_second` until `stop`; the thread
/// returns how many it sent.
pub fn keep_clicking(
    topic: String,
    per_second: f64,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<usize> {
    std::thread::spawn(move || {
        let p = producer();
        let start = Instant::now();
        let mut n = 0;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let due = Duration::from_secs_f64(n as f64 / per_second);
            if let Some(w) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(w);
            }
            let (k, v) = grouped_click(n, 200);
            send(&p, BaseRecord::to(&topic).key(k.as_bytes()).payload(&v[..]));
            n += 1;
        }
        let _ = p.flush(Duration::from_secs(30));
        n
    })
}

/// Runs `multivaed` with `args` in the environment `env` (this process's own switches such as
/// MULTIVAED_TEST_ECHO left out; HTTP on a free loopback port) until it ends, killed after 60
/// s: (success, standard output, standard error). A command still running then fails.
pub fn run_multivaed(env: &[(String, String)], args: &[&str]) -> (bool, String, String) {
    let out_file = tempfile::NamedTempFile::new().expect("a temporary file");
    let err_file = tempfile::NamedTempFile::new().expect("a temporary file");
    let mut child = Command::new(daemon_exe())
        .args(args)
        .env(
            "MULTIVAED_HTTP__LISTEN",
            format!("127.0.0.1:{}", free_port()),
        )
        .envs(env.iter().cloned())
        .env_remove("MULTIVAED_TEST_ECHO")
        .stdout(out_file.reopen().expect("reopen"))
        .stderr(err_file.reopen().expect("reopen"))
        .spawn()
        .expect("run multivaed");
    let deadline = Instant::now() + Duration::from_secs(60);
    let success = loop {
        if let Ok(Some(s)) = child.try_wait() {
            break s.success();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break false;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    (
        success,
        std::fs::read_to_string(out_file.path()).unwrap_or_default(),
        std::fs::read_to_string(err_file.path()).unwrap_or_default(),
    )
}

/// A consumed message.
#[derive(Debug, Clone)]
pub struct Consumed {
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: HashMap<String, String>,
}

/// Reads a topic of the test broker from the beginning until nothing arrives for `idle`.
pub fn read_all(topic: &str, partitions: i32, idle: Duration) -> Vec<Consumed> {
    read_all_on(&brokers(), topic, partitions, idle)
}

/// As [`read_all`], on the broker at `bootstrap`.
pub fn read_all_on(bootstrap: &str, topic: &str, partitions: i32, idle: Duration) -> Vec<Consumed> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
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

/// Whether the process `pid` is stopped (SIGSTOP, or frozen by `MULTIVAED_STOP_AT`).
pub fn process_stopped(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| Some(s.rsplit_once(')')?.1.split_whitespace().next()? == "T"))
        .unwrap_or(false)
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The `multivaed` executable: `MULTIVAED_BIN`, else next to this executable or one folder up
/// (a test binary lives in `target/<profile>/deps/`, a benchmark binary beside `multivaed`).
pub fn daemon_exe() -> PathBuf {
    if let Ok(p) = std::env::var("MULTIVAED_BIN") {
        return PathBuf::from(p);
    }
    let here = std::env::current_exe().unwrap_or_default();
    let dir = here.parent().unwrap_or(Path::new("."));
    [dir.join("multivaed"), dir.join("..").join("multivaed")]
        .into_iter()
        .find(|p| p.is_file())
        .unwrap_or_else(|| dir.join("multivaed"))
}

/// The daemon as a child process (`multivaed run`), its standard error kept line by line (and
/// copied to a file when one is given).
pub struct Daemon {
    pub child: Child,
    pub port: u16,
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Daemon {
    /// Starts the daemon with `env` on HTTP `port` and waits for its HTTP surface; fails the
    /// test if it does not come up.
    pub fn start(env: &[(String, String)], port: u16) -> Self {
        Self::try_start(&daemon_exe(), env, port, None).unwrap_or_else(|e| panic!("{e:#}"))
    }

    pub fn try_start(
        exe: &Path,
        env: &[(String, String)],
        port: u16,
        log_file: Option<&Path>,
    ) -> Result<Self> {
        let mut cmd = Command::new(exe);
        cmd.arg("run").stdout(Stdio::null()).stderr(Stdio::piped());
        // BENCH_DAEMON_RUST_LOG: the daemon's log filter (e.g. "info,rdkafka=debug" with
        // MULTIVAED_KAFKA__PROPERTIES__DEBUG=fetch to see librdkafka's fetch decisions)
        cmd.env(
            "RUST_LOG",
            std::env::var("BENCH_DAEMON_RUST_LOG").unwrap_or_else(|_| "info,rdkafka=warn".into()),
        );
        // the harness's own switch, not the daemon's configuration (MULTIVAED_* is)
        cmd.env_remove("MULTIVAED_TEST_ECHO");
        cmd.env("MULTIVAED_HTTP__LISTEN", format!("127.0.0.1:{port}"));
        // the tests' token, unless the test chooses how the API is protected
        if !env
            .iter()
            .any(|(k, _)| k == "MULTIVAED_HTTP__TOKEN_FILE" || k == "MULTIVAED_HTTP__AUTH")
        {
            cmd.env("MULTIVAED_HTTP__TOKEN_FILE", token_file());
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", exe.display()))?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().context("no stderr")?;
        let mut file = match log_file {
            Some(p) => Some(std::fs::File::create(p)?),
            None => None,
        };
        let l = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if std::env::var("MULTIVAED_TEST_ECHO").is_ok() {
                    eprintln!("daemon: {line}");
                }
                if let Some(f) = file.as_mut() {
                    let _ = writeln!(f, "{line}");
                }
                if let Ok(mut l) = l.lock() {
                    l.push(line);
                }
            }
        });
        let d = Self { child, port, log };
        d.try_wait_for(Duration::from_secs(60), "HTTP up", |d| {
            d.get("/healthz").map(|(s, _)| s == 200).unwrap_or(false)
        })?;
        Ok(d)
    }

    /// GETs `path` with the tests' token, following up to 3 redirects (to the replica owning a
    /// user) and sending the token again to each, as a client of the API must.
    pub fn get(&self, path: &str) -> Option<(u16, String)> {
        let agent = ureq::AgentBuilder::new()
            .redirects(0)
            .timeout(Duration::from_secs(10))
            .build();
        let mut url = format!("http://127.0.0.1:{}{path}", self.port);
        for _ in 0..4 {
            let r = match authorized(agent.get(&url)).call() {
                Ok(r) => r,
                Err(ureq::Error::Status(_, r)) => r,
                Err(_) => return None,
            };
            match (r.status(), r.header("location")) {
                (301 | 302 | 303 | 307 | 308, Some(to)) => url = to.to_string(),
                (s, _) => return Some((s, r.into_string().unwrap_or_default())),
            }
        }
        None
    }

    /// The `/metrics` text.
    pub fn metrics(&self) -> Result<String> {
        match self.get("/metrics") {
            Some((200, text)) => Ok(text),
            Some((s, _)) => bail!("/metrics answered {s}"),
            None => bail!("/metrics did not answer"),
        }
    }

    /// Sum of a metric over its label sets (`labels` filters on `key="value"` substrings).
    pub fn metric(&self, name: &str, labels: &str) -> f64 {
        metric_value(&self.metrics().expect("metrics"), name, labels)
    }

    /// A histogram's cumulative buckets: (upper bound, count), ascending, `+Inf` last.
    pub fn buckets(&self, name: &str) -> Result<Vec<(f64, f64)>> {
        self.buckets_of(name, "")
    }

    /// As [`Daemon::buckets`], for the series with `labels` (as exported, e.g.
    /// `stage="store"`; empty: none).
    pub fn buckets_of(&self, name: &str, labels: &str) -> Result<Vec<(f64, f64)>> {
        let text = self.metrics()?;
        let labels = if labels.is_empty() {
            String::new()
        } else {
            format!("{labels},")
        };
        let prefix = format!("{name}_bucket{{{labels}le=\"");
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

    /// Waits until `f` holds, failing the test (with the daemon's log tail) after `limit`.
    pub fn wait_for(&self, limit: Duration, what: &str, f: impl FnMut(&Self) -> bool) {
        if let Err(e) = self.try_wait_for(limit, what, f) {
            panic!("{e:#}");
        }
    }

    /// Waits until `f` holds; an error after `limit`, or at once if the daemon exited.
    pub fn try_wait_for(
        &self,
        limit: Duration,
        what: &str,
        mut f: impl FnMut(&Self) -> bool,
    ) -> Result<()> {
        let start = Instant::now();
        let why = loop {
            if f(self) {
                return Ok(());
            }
            if self.has_exited() {
                break format!("the daemon exited while waiting for {what}");
            }
            if start.elapsed() >= limit {
                break format!("timed out after {limit:?} waiting for {what}");
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let log = self.log.lock().map(|l| l.clone()).unwrap_or_default();
        let tail: Vec<&String> = log.iter().rev().take(40).collect();
        bail!("{why}; daemon log tail (newest first):\n{tail:#?}")
    }

    /// Whether the child has exited (gone, or a zombie not yet reaped), read from /proc so the
    /// child stays the caller's to wait for.
    fn has_exited(&self) -> bool {
        std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))
            .ok()
            .and_then(|s| {
                let state = s.rsplit_once(')')?.1.split_whitespace().next()?.to_string();
                Some(state == "Z" || state == "X")
            })
            .unwrap_or(true)
    }

    /// The daemon's peak resident set (VmHWM), bytes.
    pub fn peak_rss(&self) -> u64 {
        multivaed::metrics::peak_rss_bytes(Some(self.child.id()))
    }

    /// Prints the last 80 lines of the daemon's log (and the whole log into `KIT_LOG_DIR`, when
    /// set, for a failure the tail does not explain).
    fn show_log_tail(&self, why: &str) {
        let Ok(l) = self.log.lock() else {
            return;
        };
        let pid = self.child.id();
        if let Ok(dir) = std::env::var("KIT_LOG_DIR") {
            let path = format!("{dir}/daemon-{pid}.log");
            let _ = std::fs::write(&path, l.join("\n"));
            eprintln!("--- daemon pid {pid}: whole log in {path} ---");
        }
        let from = l.len().saturating_sub(80);
        eprintln!(
            "--- daemon pid {pid} ({why}): last {} log lines ---",
            l.len() - from
        );
        for line in &l[from..] {
            eprintln!("{line}");
        }
    }

    /// SIGTERM; returns the exit code and how long it took (SIGKILL after 30 s).
    pub fn terminate(mut self) -> (Option<i32>, Duration) {
        let start = Instant::now();
        match sigterm_and_wait(&mut self.child, Duration::from_secs(30)) {
            Some(s) => (s.code(), start.elapsed()),
            None => {
                // the log says where the shutdown hung: this daemon is gone before any panic
                // that follows could show it
                self.show_log_tail("did not stop within 30 s of SIGTERM (killed)");
                let _ = self.child.kill();
                (None, start.elapsed())
            }
        }
    }

    pub fn log_contains(&self, s: &str) -> bool {
        self.log
            .lock()
            .map(|l| l.iter().any(|l| l.contains(s)))
            .unwrap_or(false)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // a failing test shows the end of each daemon's log
            self.show_log_tail("the test failed");
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends SIGTERM to `child` and waits up to `within` for it to exit: its status, or `None`
/// when it still runs (left running: the caller decides).
pub fn sigterm_and_wait(child: &mut Child, within: Duration) -> Option<ExitStatus> {
    let start = Instant::now();
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    while start.elapsed() <= within {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
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

/// Fresh topic names, a consumer group and a data directory for one daemon.
pub struct Setup {
    pub clicks: String,
    pub recs: String,
    pub dlq: String,
    pub group: String,
    pub data_dir: PathBuf,
}

impl Setup {
    /// Fresh names with the topics created on the test broker.
    pub fn new(dir: &Path, partitions: i32) -> Self {
        let s = Self::named(dir);
        create_topics(&[(&s.clicks, partitions), (&s.recs, 1), (&s.dlq, 1)]);
        s
    }

    /// Fresh names with the topics created on the broker at `bootstrap`.
    pub fn try_new_on(bootstrap: &str, dir: &Path, partitions: i32) -> Result<Self> {
        let s = Self::named(dir);
        try_create_topics(
            bootstrap,
            &[(&s.clicks, partitions), (&s.recs, 1), (&s.dlq, 1)],
        )?;
        Ok(s)
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

    /// The daemon's environment for these topics on the broker at `bootstrap`: only what
    /// names them, no tuning.
    pub fn base_env(&self, bootstrap: &str) -> Vec<(String, String)> {
        [
            ("MULTIVAED_KAFKA__BROKERS", bootstrap.to_string()),
            ("MULTIVAED_KAFKA__CLICKS_TOPIC", self.clicks.clone()),
            ("MULTIVAED_KAFKA__RECOMMENDATIONS_TOPIC", self.recs.clone()),
            ("MULTIVAED_KAFKA__DEAD_LETTER_TOPIC", self.dlq.clone()),
            ("MULTIVAED_KAFKA__GROUP_ID", self.group.clone()),
            ("MULTIVAED_DATA_DIR", self.data_dir.display().to_string()),
            ("MULTIVAED_DEVICE", "cpu".into()),
            (
                "MULTIVAED_MODELS__SIGNING_KEY_FILE",
                signing_key_file().display().to_string(),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// The tests' environment: the test broker, a small and fast-training model.
    pub fn env(&self) -> Vec<(String, String)> {
        let mut env = self.base_env(&brokers());
        env.extend(
            [
                ("MULTIVAED_TRAIN__INTERVAL", "3s"),
                ("MULTIVAED_TRAIN__MIN_NEW_EVENTS", "4000"),
                ("MULTIVAED_TRAIN__MIN_USERS", "200"),
                ("MULTIVAED_TRAIN__MAX_EPOCHS_PER_ROUND", "3"),
                ("MULTIVAED_TRAIN__CATCH_UP", "false"),
                ("MULTIVAED_TRAIN__MIN_NEW_FRACTION", "1000"),
                ("MULTIVAED_TRAIN__VALIDATION_USERS", "100"),
                ("MULTIVAED_TRAIN__MAX_NDCG_DROP", "1.0"),
                ("MULTIVAED_MODEL__MLP_HIDDEN_SIZE", "[200]"),
                ("MULTIVAED_MODEL__LATENT_DIMENSION", "50"),
                ("MULTIVAED_MODEL__TOTAL_ANNEAL_STEPS", "200"),
                ("MULTIVAED_SERVE__K", "10"),
            ]
            .map(|(k, v)| (k.to_string(), v.to_string())),
        );
        env
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wait_ends_at_once_when_the_daemon_has_exited() {
        let d = Daemon {
            child: Command::new("true").spawn().unwrap(),
            port: free_port(),
            log: Arc::new(Mutex::new(vec!["last words".into()])),
        };
        let start = Instant::now();
        let err = d
            .try_wait_for(Duration::from_secs(60), "a condition", |_| false)
            .unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("the daemon exited") && msg.contains("last words"),
            "{msg}"
        );
        assert!(start.elapsed() < Duration::from_secs(30));
    }
}
