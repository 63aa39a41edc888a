//! Security: loopback by default, the `/v1/` API behind bearer tokens (rotated without a
//! restart), Kafka client secrets never logged or exported, no user or item id as a metric
//! label, malformed and oversized HTTP requests answered with 4xx, each role's ACLs.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::common::*;

#[test]
fn http_listens_on_loopback_by_default() {
    let _machine = share_the_machine();
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

/// A GET of the daemon at `port` with `token` (none: no `Authorization` header): status, the
/// `WWW-Authenticate` header, body.
fn get_with(port: u16, path: &str, token: Option<&str>) -> (u16, Option<String>, String) {
    let mut req =
        ureq::get(&format!("http://127.0.0.1:{port}{path}")).timeout(Duration::from_secs(10));
    if let Some(t) = token {
        req = req.set("Authorization", &format!("Bearer {t}"));
    }
    let r = match req.call() {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{path}: {e}"),
    };
    let status = r.status();
    let challenge = r.header("www-authenticate").map(str::to_string);
    (status, challenge, r.into_string().unwrap_or_default())
}

#[test]
fn the_api_needs_a_bearer_token_and_a_rotated_token_works_without_a_restart() {
    let _machine = share_the_machine();
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::new(dir.path(), 1);
    let tokens = dir.path().join("secret").join("tokens");
    std::fs::create_dir_all(tokens.parent().unwrap()).unwrap();
    let (first, second) = (
        "first-token-aaaaaaaaaaaaaaaa",
        "second-token-bbbbbbbbbbbbbbbb",
    );
    std::fs::write(&tokens, format!("{first}\n")).unwrap();
    let mut env = setup.env();
    env.push((
        "MULTIVAED_HTTP__TOKEN_FILE".into(),
        tokens.display().to_string(),
    ));
    let port = free_port();
    let daemon = Daemon::start(&env, port);
    let msgs: Vec<(String, Vec<u8>)> = (0..40)
        .map(|n| {
            (
                "alice".to_string(),
                click_event("alice", &format!("secret-item-{n}")),
            )
        })
        .collect();
    produce(&setup.clicks, &msgs);
    let history = "/v1/users/alice/history";
    let recs = "/v1/users/alice/recommendations?k=5";
    daemon.wait_for(Duration::from_secs(60), "alice's history stored", |_| {
        get_with(port, history, Some(first)).0 == 200
    });

    // no token, a wrong one, a token without its scheme: 401 with a challenge and no history
    for path in [history, recs] {
        for token in [None, Some("not-the-token-cccccccccccccc"), Some("")] {
            let (status, challenge, body) = get_with(port, path, token);
            assert_eq!(status, 401, "{path} with {token:?}");
            assert!(
                challenge
                    .as_deref()
                    .is_some_and(|c| c.starts_with("Bearer")),
                "{path}: {challenge:?}"
            );
            assert!(!body.contains("secret-item"), "{path}: {body}");
        }
        assert_eq!(get_with(port, path, Some(first)).0, 200, "{path}");
    }
    let raw = raw_status_plain(port, b"GET /v1/users/alice/history HTTP/1.1\r\nHost: x\r\nAuthorization: first-token-aaaaaaaaaaaaaaaa\r\n\r\n");
    assert_eq!(raw, 401, "a token without the Bearer scheme");
    // the operational routes stay open
    assert_eq!(get_with(port, "/healthz", None).0, 200);
    assert_eq!(get_with(port, "/metrics", None).0, 200);
    assert_ne!(get_with(port, "/readyz", None).0, 401);
    assert!(daemon.metric("multivaed_http_unauthorized_total", "") >= 7.0);

    // rotation as a Kubernetes Secret does it (a new file renamed into place): both tokens
    // during the overlap, then only the new one, with no restart
    let swap = |text: String| {
        let tmp = tokens.with_extension("new");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &tokens).unwrap();
    };
    swap(format!("{second}\n{first}\n"));
    daemon.wait_for(Duration::from_secs(10), "the second token accepted", |_| {
        get_with(port, history, Some(second)).0 == 200
    });
    assert_eq!(get_with(port, history, Some(first)).0, 200, "overlap");
    swap(format!("{second}\n"));
    daemon.wait_for(Duration::from_secs(10), "the first token retired", |_| {
        get_with(port, history, Some(first)).0 == 401
    });
    assert_eq!(get_with(port, recs, Some(second)).0, 200);
    let (code, _) = daemon.terminate();
    assert_eq!(code, Some(0));
}

#[test]
fn without_a_token_file_one_is_generated_and_auth_none_is_explicit() {
    let _machine = share_the_machine();
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::new(dir.path(), 1);
    // no token file named: a private one is generated in the data directory
    let mut env = setup.env();
    env.push(("MULTIVAED_HTTP__TOKEN_FILE".into(), String::new()));
    let port = free_port();
    let daemon = Daemon::start(&env, port);
    let token = std::fs::read_to_string(setup.data_dir.join("api-token")).unwrap();
    assert_eq!(get_with(port, "/v1/users/nobody/history", None).0, 401);
    assert_eq!(
        get_with(port, "/v1/users/nobody/history", Some(token.trim())).0,
        404
    );
    daemon.terminate();
    // off only when asked, with a warning
    let mut env = setup.env();
    env.push(("MULTIVAED_HTTP__AUTH".into(), "none".into()));
    let daemon = Daemon::start(&env, port);
    assert_eq!(get_with(port, "/v1/users/nobody/history", None).0, 404);
    assert!(daemon.log_contains("http.auth = \"none\""));
    daemon.terminate();
}

/// The raw status code of a hand-written HTTP/1.1 request, sent as it is.
fn raw_status_plain(port: u16, request: &[u8]) -> u16 {
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

/// The raw status code of a hand-written HTTP/1.1 request, sent with the tests' bearer token
/// (after its `Host: x` line).
fn raw_status(port: u16, request: &[u8]) -> u16 {
    let host = b"Host: x\r\n";
    let request = match request.windows(host.len()).position(|w| w == host) {
        Some(at) => [
            &request[..at + host.len()],
            format!(
                "Authorization: Bearer {}\r\n",
                multivaed_kit::harness::API_TOKEN
            )
            .as_bytes(),
            &request[at + host.len()..],
        ]
        .concat(),
        None => request.to_vec(),
    };
    raw_status_plain(port, &request)
}

#[test]
fn secrets_and_ids_stay_out_of_logs_and_metrics_and_bad_requests_get_4xx() {
    let _machine = share_the_machine();
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

/// The test broker's SASL_SSL listener and the CA certificate that signs it (scripts/test.sh
/// exports both; a test against another broker must name them).
fn sasl_listener() -> (String, String) {
    let get = |name: &str| {
        std::env::var(name).unwrap_or_else(|_| {
            panic!("{name} is not set: run the tests with scripts/test.sh, whose broker has a SASL_SSL listener")
        })
    };
    (get("KAFKA_SASL_BROKERS"), get("KAFKA_CA_FILE"))
}

/// Runs the test broker's admin program (scripts/kafka/Admin.java) against `KAFKA_BROKERS`:
/// `user NAME PASSWORD`, `acl PRINCIPAL OPERATION TYPE NAME [prefixed]`.
fn broker_admin(args: &[&str]) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let libs = std::process::Command::new("bash")
        .arg(root.join("scripts/kafka.sh"))
        .arg("libs")
        .output()
        .expect("scripts/kafka.sh libs");
    let libs = String::from_utf8_lossy(&libs.stdout).trim().to_string();
    let out = std::process::Command::new("java")
        .arg("-cp")
        .arg(format!("{libs}/*"))
        .arg(root.join("scripts/kafka/Admin.java"))
        .arg(args[0])
        .arg(brokers())
        .args(&args[1..])
        .output()
        .expect("run the broker's admin program");
    assert!(
        out.status.success(),
        "Admin {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Grants `user` an operation on each of `topics`.
fn allow_topics(user: &str, operation: &str, topics: &[&str]) {
    for t in topics {
        broker_admin(&["acl", &format!("User:{user}"), operation, "TOPIC", t]);
    }
}

/// A config file giving a process SCRAM-SHA-512 credentials over TLS (the password from the
/// environment, never from the file, as a Kubernetes Secret would give it).
fn sasl_config(dir: &std::path::Path, name: &str, user: &str) -> std::path::PathBuf {
    let (_, ca) = sasl_listener();
    let path = dir.join(format!("{name}-sasl.toml"));
    std::fs::write(
        &path,
        format!(
            "[kafka.properties]\n\"security.protocol\" = \"SASL_SSL\"\n\"sasl.mechanisms\" = \"SCRAM-SHA-512\"\n\"sasl.username\" = \"{user}\"\n\"ssl.ca.location\" = \"{ca}\"\n\"session.timeout.ms\" = \"6000\"\n\"heartbeat.interval.ms\" = \"500\"\n"
        ),
    )
    .unwrap();
    path
}

/// The environment of a fleet process on the SASL_SSL listener as `user` with `password`.
fn sasl_env(
    env: Vec<(String, String)>,
    dir: &std::path::Path,
    name: &str,
    user: &str,
    password: &str,
) -> Vec<(String, String)> {
    let (sasl, _) = sasl_listener();
    let mut env: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, _)| k != "MULTIVAED_KAFKA__BROKERS" && k != "MULTIVAED_CONFIG")
        .collect();
    env.extend([
        ("MULTIVAED_KAFKA__BROKERS".to_string(), sasl),
        (
            "MULTIVAED_CONFIG".to_string(),
            sasl_config(dir, name, user).display().to_string(),
        ),
        (
            "MULTIVAED_KAFKA__PROPERTIES__SASL_PASSWORD".to_string(),
            password.to_string(),
        ),
    ]);
    env
}

/// The ACLs of README "Security" for a fleet's two roles, each its own principal: a serving
/// replica and a trainer work with exactly those; the replica's principal may not write to the
/// models topic; a wrong password is refused with a clear error and readiness false.
#[test]
fn each_role_works_with_its_documented_acls_over_sasl_ssl_and_no_more() {
    let _machine = share_the_machine();
    let dir = tempfile::tempdir().unwrap();
    let f = Fleet::new(dir.path(), 2);
    let items = format!("{}.items", f.setup.clicks);
    create_topics(&[(&items, 1)]);
    let group = f.setup.group.clone();
    let (serve_user, train_user) = (unique("serve"), unique("train"));
    let password = format!("pw-{}", unique("x"));
    broker_admin(&["user", &serve_user, &password]);
    broker_admin(&["user", &train_user, &password]);
    // role serve: reads clicks, items, models, members and its changelog (restores); writes
    // recommendations, changelog, dead letters and members; its consumer groups
    allow_topics(
        &serve_user,
        "READ",
        &[&f.setup.clicks, &items, &f.models, &f.members, &f.changelog],
    );
    allow_topics(
        &serve_user,
        "WRITE",
        &[&f.setup.recs, &f.changelog, &f.setup.dlq, &f.members],
    );
    allow_topics(
        &serve_user,
        "DESCRIBE_CONFIGS",
        &[&f.changelog, &f.members, &f.models],
    );
    // role train: reads the changelog and the models topic, writes the models topic
    allow_topics(&train_user, "READ", &[&f.changelog, &f.models]);
    allow_topics(&train_user, "WRITE", &[&f.models]);
    allow_topics(&train_user, "DESCRIBE_CONFIGS", &[&f.changelog, &f.models]);
    allow_topics(&train_user, "DESCRIBE", &[&f.setup.clicks]);
    for user in [&serve_user, &train_user] {
        broker_admin(&[
            "acl",
            &format!("User:{user}"),
            "READ",
            "GROUP",
            &group,
            "prefixed",
        ]);
    }
    // transactions: a replica's changelog writer (`<group_id>.changelog.<instance>`), the
    // trainer's models-topic writer (`<trainer_group>.announcer`)
    for (user, id) in [
        (&serve_user, format!("{group}.changelog.")),
        (&train_user, format!("{group}.trainer.announcer")),
    ] {
        for operation in ["WRITE", "DESCRIBE"] {
            broker_admin(&[
                "acl",
                &format!("User:{user}"),
                operation,
                "TRANSACTIONAL_ID",
                &id,
                "prefixed",
            ]);
        }
    }
    let trainer = Daemon::start(
        &sasl_env(
            f.trainer_env(dir.path(), "t0"),
            dir.path(),
            "t0",
            &train_user,
            &password,
        ),
        free_port(),
    );
    let replica = Daemon::start(
        &sasl_env(
            f.replica_env(dir.path(), "r1"),
            dir.path(),
            "r1",
            &serve_user,
            &password,
        ),
        free_port(),
    );
    // clicks from a plaintext producer (the broker's anonymous super user)
    let msgs: Vec<(String, Vec<u8>)> = (0..3000)
        .map(|n| {
            let (u, i) = (n % 300, (n % 300) % 4 * 10 + n / 300);
            (
                format!("u{u}"),
                format!(r#"{{"user_id": "u{u}", "item_id": "i{i}"}}"#).into_bytes(),
            )
        })
        .collect();
    replica.wait_for(Duration::from_secs(90), "ready over SASL_SSL", |d| {
        d.get("/readyz").is_some_and(|(s, _)| s == 200)
    });
    produce(&f.setup.clicks, &msgs);
    replica.wait_for(Duration::from_secs(120), "every click stored", |d| {
        d.metric("multivaed_events_consumed_total", "") >= msgs.len() as f64
    });
    replica.wait_for(
        Duration::from_secs(120),
        "the trainer's version, announced and loaded",
        |d| d.metric("multivaed_model_version", "") >= 1.0,
    );
    assert!(trainer.metric("multivaed_trainer_active", "") >= 1.0);
    for d in [&trainer, &replica] {
        assert!(
            !d.log_contains("uthoriz"),
            "an authorization error with the documented ACLs"
        );
        assert!(!d.log_contains(&password), "the password was logged");
    }
    // the replica's principal may not write to the models topic (a forged announcement)
    let (sasl, ca) = sasl_listener();
    let forger: rdkafka::producer::FutureProducer = rdkafka::config::ClientConfig::new()
        .set("bootstrap.servers", &sasl)
        .set("security.protocol", "SASL_SSL")
        .set("sasl.mechanisms", "SCRAM-SHA-512")
        .set("sasl.username", &serve_user)
        .set("sasl.password", &password)
        .set("ssl.ca.location", &ca)
        .set("message.timeout.ms", "10000")
        .create()
        .unwrap();
    let sent = futures::executor::block_on(
        forger.send(
            rdkafka::producer::FutureRecord::<str, str>::to(&f.models)
                .key("forged")
                .payload("{}"),
            Duration::from_secs(10),
        ),
    );
    let err = sent.expect_err("the serving principal wrote to the models topic");
    assert!(
        format!("{:?}", err.0).contains("TopicAuthorizationFailed"),
        "{:?}",
        err.0
    );
    // a wrong password: refused at start with a clear error (never ready), not a hang
    let started = std::time::Instant::now();
    let (ok, _, err) = run_multivaed(
        &sasl_env(
            f.replica_env(dir.path(), "r2"),
            dir.path(),
            "r2",
            &serve_user,
            "wrong-password",
        ),
        &["run"],
    );
    assert!(!ok, "a wrong password was not refused");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "refused after {:?}",
        started.elapsed()
    );
    assert!(err.contains("Kafka authentication failed"), "{err}");
    assert!(!err.contains("wrong-password"), "the password was logged");
}
