//! Security basics: loopback by default, Kafka client secrets never logged or exported, no user
//! or item id as a metric label, malformed and oversized HTTP requests answered with 4xx.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;

#[test]
fn http_listens_on_loopback_by_default() {
    let c = multivaed::config::Config::default();
    assert!(c.http.listen.ip().is_loopback(), "{}", c.http.listen);
    let shipped = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/configs/multivaed.toml"
    ))
    .unwrap();
    assert!(shipped.contains("listen = \"127.0.0.1:"));
    // SASL/SSL through librdkafka properties is documented with an example
    for key in [
        "security.protocol",
        "sasl.mechanisms",
        "sasl.username",
        "sasl.password",
        "ssl.ca.location",
    ] {
        assert!(
            shipped.contains(key),
            "configs/multivaed.toml does not show {key}"
        );
    }
}

/// The raw status code of a hand-written HTTP/1.1 request.
fn raw_status(port: u16, request: &[u8]) -> u16 {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(request);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(2).any(|w| w == b"\r\n") {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let line = String::from_utf8_lossy(&buf);
    line.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {line:?}"))
}

#[test]
fn secrets_and_ids_stay_out_of_logs_and_metrics_and_bad_requests_get_4xx() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::new(&dir.path().join("data"), 1);
    let secret = "s3cr3t-Hunter2-do-not-log";
    let config = dir.path().join("secure.toml");
    // a client secret set (unused by the PLAINTEXT broker, but parsed and held by librdkafka),
    // and librdkafka's own debug logging of its configuration on (the daemon passes it on)
    std::fs::write(
        &config,
        format!(
            "[kafka.properties]\n\"security.protocol\" = \"plaintext\"\n\"sasl.username\" = \"multivaed\"\n\"sasl.password\" = \"{secret}\"\n\"ssl.key.password\" = \"{secret}\"\n\"debug\" = \"conf,security,broker\"\n"
        ),
    )
    .unwrap();
    let mut env = setup.env();
    env.push(("MULTIVAED_CONFIG".into(), config.display().to_string()));
    env.push(("RUST_LOG".into(), "debug".into()));
    let port = free_port();
    let daemon = Daemon::start(&env, port);
    let msgs: Vec<(String, Vec<u8>)> = (0..3000)
        .map(|n| {
            let (u, i) = (n % 300, n / 300 + (n % 300) % 7);
            (
                format!("user-zz-{u}"),
                format!(r#"{{"user_id": "user-zz-{u}", "item_id": "item-qq-{i}"}}"#).into_bytes(),
            )
        })
        .chain(std::iter::once(("bad".to_string(), b"{oops".to_vec())))
        .collect();
    daemon.wait_for(Duration::from_secs(60), "partitions assigned", |d| {
        d.metric("multivaed_partitions_assigned", "") >= 1.0
    });
    produce(&setup.clicks, &msgs);
    daemon.wait_for(Duration::from_secs(120), "a model and every click", |d| {
        d.metric("multivaed_model_version", "") >= 1.0
            && d.metric("multivaed_events_consumed_total", "") >= msgs.len() as f64
    });
    daemon.wait_for(Duration::from_secs(60), "users scored", |d| {
        d.metric("multivaed_dirty_users", "") == 0.0
    });

    // metrics: no secret, no user or item id as a label value
    let (_, metrics) = daemon.get("/metrics").unwrap();
    assert!(!metrics.contains(secret));
    for line in metrics
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains('{'))
    {
        assert!(
            !line.contains("user-zz-") && !line.contains("item-qq-"),
            "an id in a metric label: {line}"
        );
    }

    // HTTP: malformed and oversized requests get 4xx, the daemon keeps serving
    let long_id = "x".repeat(300);
    let cases: Vec<(String, Vec<u8>, u16)> = vec![
        (
            "id over 256 bytes".into(),
            format!("GET /v1/users/{long_id}/recommendations HTTP/1.1\r\nHost: x\r\n\r\n")
                .into_bytes(),
            400,
        ),
        (
            "bad percent-encoding".into(),
            b"GET /v1/users/%ZZ%/recommendations HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            0, // axum: 404 unknown user or 400
        ),
        (
            "k not a number".into(),
            b"GET /v1/users/user-zz-1/recommendations?k=lots HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            400,
        ),
        (
            "k zero".into(),
            b"GET /v1/users/user-zz-1/recommendations?k=0 HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            400,
        ),
        (
            "k huge".into(),
            b"GET /v1/users/user-zz-1/recommendations?k=99999999999 HTTP/1.1\r\nHost: x\r\n\r\n"
                .to_vec(),
            400,
        ),
        (
            "unknown path".into(),
            b"GET /v1/nothing HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            404,
        ),
        (
            "wrong method".into(),
            b"DELETE /metrics HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            405,
        ),
        (
            "garbage request line".into(),
            b"\x00\x01\x02 nonsense\r\n\r\n".to_vec(),
            400,
        ),
        (
            "1 MB URI".into(),
            format!(
                "GET /v1/users/{}/recommendations HTTP/1.1\r\nHost: x\r\n\r\n",
                "y".repeat(1 << 20)
            )
            .into_bytes(),
            0,
        ),
        (
            "1 MB header".into(),
            format!(
                "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
                "z".repeat(1 << 20)
            )
            .into_bytes(),
            431,
        ),
    ];
    for (what, req, want) in &cases {
        let got = raw_status(port, req);
        if *want == 0 {
            assert!((400..500).contains(&got), "{what}: {got}");
        } else {
            assert_eq!(got, *want, "{what}");
        }
    }
    let (status, body) = daemon
        .get("/v1/users/user-zz-1/recommendations?k=5")
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(!body.contains(secret));

    // logs (debug level, the whole run, librdkafka's included): no secret
    let log = daemon.log.clone();
    let (code, _) = daemon.terminate();
    assert_eq!(code, Some(0));
    let log = log.lock().unwrap();
    assert!(log.len() > 20, "too few log lines to judge: {}", log.len());
    let librdkafka = log.iter().filter(|l| l.contains("librdkafka")).count();
    assert!(
        librdkafka > 0,
        "librdkafka's debug log did not reach the daemon's log"
    );
    if let Some(line) = log.iter().find(|l| l.contains(secret)) {
        panic!("a secret in the log: {line}");
    }
}
