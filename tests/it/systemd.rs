//! The systemd notify protocol, observed on our own NOTIFY_SOCKET: READY=1 once serving (HTTP
//! up, the group joined; an empty clicks topic and no model are fine), WATCHDOG=1 at under half
//! of WatchdogSec, STATUS= lines, STOPPING=1 at SIGTERM, in that order.

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use crate::common::*;

#[test]
fn notify_protocol_messages_and_order() {
    let _machine = share_the_machine();
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let setup = Setup::new(&dir.path().join("data"), 1);
    let mut env = setup.env();
    env.push(("NOTIFY_SOCKET".into(), sock_path.display().to_string()));
    env.push(("WATCHDOG_USEC".into(), "2000000".into()));
    let daemon = Daemon::start(&env, free_port());

    let mut got: Vec<(Instant, String)> = Vec::new();
    let recv_for = |d: Duration, got: &mut Vec<(Instant, String)>| {
        let end = Instant::now() + d;
        let mut buf = [0u8; 4096];
        while Instant::now() < end {
            if let Ok(n) = sock.recv(&mut buf) {
                for line in String::from_utf8_lossy(&buf[..n]).lines() {
                    got.push((Instant::now(), line.to_string()));
                }
            }
        }
    };
    // no data at all: READY=1 once the group is joined
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(60) && !got.iter().any(|(_, m)| m == "READY=1") {
        recv_for(Duration::from_millis(500), &mut got);
    }
    assert!(
        got.iter().any(|(_, m)| m == "READY=1"),
        "never READY on an empty clicks topic: {got:?}"
    );
    recv_for(Duration::from_secs(6), &mut got);
    assert!(
        got.iter()
            .any(|(_, m)| m.starts_with("STATUS=model none yet")),
        "{got:?}"
    );
    let msgs: Vec<(String, Vec<u8>)> = (0..50)
        .map(|n| {
            (
                n.to_string(),
                format!(r#"{{"user_id": {}, "item_id": {}}}"#, n % 10, n).into_bytes(),
            )
        })
        .collect();
    produce(&setup.clicks, &msgs);
    recv_for(Duration::from_secs(3), &mut got);
    let (code, _) = daemon.terminate();
    assert_eq!(code, Some(0));
    recv_for(Duration::from_millis(500), &mut got);

    let pos = |m: &str| got.iter().position(|(_, x)| x == m);
    let ready = pos("READY=1").unwrap();
    let stopping = pos("STOPPING=1").expect("STOPPING=1 at shutdown");
    assert!(ready < stopping);
    assert_eq!(got.iter().filter(|(_, m)| m == "READY=1").count(), 1);
    // watchdog pings (sent every third of WatchdogSec) never leave a gap of WatchdogSec (2 s),
    // after which systemd would kill the service; a tighter bound would measure this machine
    let pings: Vec<Instant> = got
        .iter()
        .filter(|(_, m)| m == "WATCHDOG=1")
        .map(|(t, _)| *t)
        .collect();
    assert!(pings.len() >= 5, "{} watchdog pings", pings.len());
    for w in pings.windows(2) {
        assert!(
            w[1] - w[0] < Duration::from_millis(2000),
            "watchdog gap {:?}",
            w[1] - w[0]
        );
    }
    assert!(got
        .iter()
        .any(|(_, m)| m.starts_with("STATUS=") && m.contains("events/s")));
}
