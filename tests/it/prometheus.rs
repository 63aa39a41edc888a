//! A real Prometheus server (Debian's `prometheus`, installed by scripts/tools.sh) scrapes a
//! running daemon fed by a real broker; its HTTP API must return what the test produced, and
//! every metric the Grafana dashboard and the alert rules read.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;
use multivaed::demo::SyntheticStream;

struct Prometheus {
    child: Child,
    port: u16,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn prometheus_bin() -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|p| p.join("prometheus"))
                .find(|p| p.exists())
        })
        .unwrap_or_else(|| {
            panic!("prometheus is not installed: run scripts/tools.sh (scripts/test.sh does)")
        })
}

impl Prometheus {
    fn start(dir: &Path, target_port: u16) -> Self {
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: multivaed\n    \
                 static_configs:\n      - targets: [\"127.0.0.1:{target_port}\"]\n"
            ),
        )
        .unwrap();
        let port = free_port();
        let child = Command::new(prometheus_bin())
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus");
        let p = Self { child, port };
        let start = Instant::now();
        while ureq::get(&format!("http://127.0.0.1:{port}/-/ready"))
            .call()
            .is_err()
        {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "prometheus did not become ready"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        p
    }

    /// Instant query: the (labels, value) of each series.
    fn query(&self, q: &str) -> Vec<(serde_json::Value, f64)> {
        let text = ureq::get(&format!("http://127.0.0.1:{}/api/v1/query", self.port))
            .query("query", q)
            .call()
            .unwrap_or_else(|e| panic!("query {q}: {e}"))
            .into_string()
            .unwrap();
        let body: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(body["status"], "success", "{q}: {body}");
        body["data"]["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let v = r["value"][1].as_str().unwrap().parse::<f64>().unwrap();
                (r["metric"].clone(), v)
            })
            .collect()
    }

    fn value(&self, q: &str) -> Option<f64> {
        self.query(q).first().map(|r| r.1)
    }
}

/// Every `multivaed_*` metric name in a file (dashboard expressions, alert rules).
fn metric_names(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut names: Vec<String> = text
        .match_indices("multivaed_")
        .filter(|(i, _)| {
            *i == 0
                || !text.as_bytes()[i - 1].is_ascii_alphanumeric() && text.as_bytes()[i - 1] != b'_'
        })
        .map(|(i, _)| {
            text[i..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect()
        })
        .collect();
    names.sort();
    names.dedup();
    names
}

#[test]
fn a_real_prometheus_scrapes_what_the_daemon_did() {
    let _machine = share_the_machine();
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::new(&dir.path().join("data"), 2);
    let port = free_port();
    let daemon = Daemon::start(&setup.env(), port);
    let prom = Prometheus::start(dir.path(), port);

    let mut stream = SyntheticStream::new(1000, 500, 10, 3);
    let click = |(u, i): (usize, usize)| {
        (
            u.to_string(),
            format!(r#"{{"user_id": "{u}", "item_id": "{i}"}}"#).into_bytes(),
        )
    };
    let mut msgs: Vec<(String, Vec<u8>)> =
        (0..1000).map(|u| click((u, stream.item_for(u)))).collect();
    msgs.extend((0..7000).map(|_| click(stream.next_click())));
    let poison = 5;
    for n in 0..poison {
        msgs.push(("bad".into(), format!("not json {n}").into_bytes()));
    }
    daemon.wait_for(Duration::from_secs(60), "partitions assigned", |d| {
        d.metric("multivaed_partitions_assigned", "") >= 2.0
    });
    produce(&setup.clicks, &msgs);
    daemon.wait_for(Duration::from_secs(240), "a first model", |d| {
        d.metric("multivaed_model_version", "") >= 1.0
    });
    daemon.wait_for(Duration::from_secs(60), "users re-scored", |d| {
        d.metric("multivaed_dirty_users", "") == 0.0
    });
    // clicks after the model's recommendations were published: online hit-rate series
    let more: Vec<_> = (0..2000).map(|_| click(stream.next_click())).collect();
    produce(&setup.clicks, &more);
    let produced = (msgs.len() + more.len()) as f64;
    daemon.wait_for(Duration::from_secs(120), "all clicks consumed", |d| {
        d.metric("multivaed_events_consumed_total", "") >= produced
    });

    // Prometheus's view equals what the test produced
    let start = Instant::now();
    loop {
        let v = prom.value("multivaed_events_consumed_total{job=\"multivaed\"}");
        if v == Some(produced) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "prometheus reports {v:?} consumed events, the test produced {produced}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(
        prom.value("multivaed_events_dead_lettered_total"),
        Some(poison as f64)
    );
    assert_eq!(
        prom.value("sum(multivaed_events_rejected_total)"),
        Some(poison as f64)
    );
    assert_eq!(prom.value("up{job=\"multivaed\"}"), Some(1.0));
    assert_eq!(prom.value("multivaed_ready"), Some(1.0));
    // training metrics: the same as the daemon's own exposition at the same moment (no round
    // runs now: wait until two scrapes agree with the daemon)
    let start = Instant::now();
    loop {
        let accepted = daemon.metric("multivaed_training_rounds_total", "result=\"accepted\"");
        let version = daemon.metric("multivaed_model_version", "");
        let updates = daemon.metric("multivaed_update_count", "");
        std::thread::sleep(Duration::from_millis(2500));
        let same = prom.value("multivaed_training_rounds_total{result=\"accepted\"}")
            == Some(accepted)
            && prom.value("multivaed_model_version") == Some(version)
            && prom.value("multivaed_update_count") == Some(updates);
        if same {
            assert!(accepted >= 1.0 && version >= 1.0 && updates >= 1.0);
            let beta = prom.value("multivaed_kl_beta").unwrap();
            assert!((beta - (updates / 200.0).min(0.2)).abs() < 1e-9, "β {beta}");
            let ndcg = prom.value("multivaed_validation_ndcg_at_100").unwrap();
            assert!(ndcg > 0.0 && ndcg <= 1.0, "validation NDCG {ndcg}");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "prometheus and the daemon disagree on the training metrics"
        );
    }
    // rounds that were not accepted (a first model needs rounds to clear its floors, and with
    // few validation users later rounds wait): the same count as the daemon's, none failed
    let start = Instant::now();
    loop {
        let not_accepted = daemon.metric("multivaed_training_rounds_total", "")
            - daemon.metric("multivaed_training_rounds_total", "result=\"accepted\"");
        let seen = prom.value(
            "sum(multivaed_training_rounds_total{result=~\"rejected_.*|failed|abandoned\"})",
        );
        if seen == Some(not_accepted) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "prometheus sees {seen:?} rounds not accepted, the daemon {not_accepted}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(
        prom.value("sum(multivaed_training_rounds_total{result=~\"failed|abandoned\"})"),
        Some(0.0)
    );

    // every metric the dashboard and the alerts read is exported and scraped
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut names = metric_names(&root.join("deploy/grafana/multivaed.json"));
    names.extend(metric_names(&root.join("deploy/prometheus/alerts.yml")));
    names.sort();
    names.dedup();
    assert!(names.len() >= 15, "{names:?}");
    let start = Instant::now();
    loop {
        // (the consumer lag comes from librdkafka's statistics, every 5 s)
        let missing: Vec<&String> = names
            .iter()
            .filter(|n| prom.query(&format!("{{__name__=\"{n}\"}}")).is_empty())
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "not in Prometheus: {missing:?}"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    let lag = prom.value("sum(multivaed_consumer_lag_messages)").unwrap();
    assert_eq!(
        lag, 0.0,
        "every produced click was consumed, yet the lag is {lag}"
    );
    let (code, _) = daemon.terminate();
    assert_eq!(code, Some(0));
}
