//! The test broker is Apache Kafka and behaves as the fleet relies on: its log cleaner really
//! compacts (a superseded value is gone, a tombstone is gone after `delete.retention.ms`) with
//! the kit's fast-compaction topic settings.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::common::*;
use rdkafka::producer::{BaseRecord, Producer};

/// Every (key, value) of partition 0 of `topic` from the beginning, filler records left out
/// (`None`: a tombstone).
fn read_back(topic: &str) -> Vec<(String, Option<String>)> {
    read_all(topic, 1, Duration::from_secs(2))
        .into_iter()
        .map(|m| {
            let key = String::from_utf8_lossy(m.key.as_deref().unwrap_or_default()).into_owned();
            let value =
                (!m.payload.is_empty()).then(|| String::from_utf8_lossy(&m.payload).into_owned());
            (key, value)
        })
        .filter(|(k, _)| k != ROLL_KEY)
        .collect()
}

#[test]
fn the_log_cleaner_removes_a_superseded_value_and_then_a_tombstone() {
    let _machine = share_the_machine();
    let topic = unique("compacted");
    try_create_topics_with(&brokers(), &[(&topic, 1, FAST_COMPACTION)]).unwrap();
    let p = producer();
    for (k, v) in [
        ("a", Some("a1")),
        ("b", Some("b1")),
        ("a", Some("a2")),
        ("b", None),
    ] {
        let rec = BaseRecord::to(&topic).partition(0).key(k.as_bytes());
        send(
            &p,
            match v {
                Some(v) => rec.payload(v.as_bytes()),
                None => rec,
            },
        );
    }
    p.flush(Duration::from_secs(10)).unwrap();
    let before = read_back(&topic);
    assert_eq!(
        before.len(),
        4,
        "all four records are there at first: {before:?}"
    );
    // the cleaner runs within seconds once the segment holding them rolls
    let start = Instant::now();
    let (mut superseded_gone, mut tombstone_gone) = (None, None);
    while start.elapsed() < Duration::from_secs(90) && tombstone_gone.is_none() {
        std::thread::sleep(Duration::from_millis(500));
        roll_segments(&brokers(), &topic, 1).unwrap();
        let now = read_back(&topic);
        let values: HashMap<&str, Vec<&Option<String>>> =
            now.iter().fold(HashMap::new(), |mut m, (k, v)| {
                m.entry(k.as_str()).or_default().push(v);
                m
            });
        if superseded_gone.is_none() && values.get("a").is_some_and(|v| v.len() == 1) {
            superseded_gone = Some(start.elapsed());
            assert_eq!(
                values["a"],
                vec![&Some("a2".to_string())],
                "the last value stays"
            );
        }
        if superseded_gone.is_some() && !values.contains_key("b") {
            tombstone_gone = Some(start.elapsed());
        }
    }
    let after = read_back(&topic);
    assert!(
        superseded_gone.is_some(),
        "a1 was never compacted away in 90 s: {after:?}"
    );
    assert!(
        tombstone_gone.is_some(),
        "b's tombstone was never removed in 90 s: {after:?}"
    );
    assert_eq!(after, vec![("a".to_string(), Some("a2".to_string()))]);
    eprintln!(
        "superseded value gone after {:?}, tombstone after {:?}",
        superseded_gone.unwrap(),
        tombstone_gone.unwrap()
    );
}
