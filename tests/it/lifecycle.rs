//! The data lifecycle against the real broker: forgetting a user (a tombstone on the clicks
//! topic, or a `forget` event) deletes their history from the store for good (across an abort
//! right after the store's flush, a SIGKILL and restarts), withdraws their recommendation with a
//! tombstone on the recommendations topic (after the restart when the abort came first),
//! answers 404 to pulls, and a later click starts a new history; a serving replica writes a
//! tombstone to the changelog, so a replica that restores the partition never sees the user.

use std::time::{Duration, Instant};

use crate::common::*;
use multivaed::partition::Partitioner;
use multivaed::wire::{Recommendation, Source};
use rdkafka::producer::{BaseRecord, Producer};

fn click(user: &str, item: &str) -> (String, Vec<u8>) {
    (user.to_string(), click_event(user, item))
}

/// 30 users of 4 clicks each (items i0..i11).
fn clicks() -> Vec<(String, Vec<u8>)> {
    (0..30)
        .flat_map(|u| (0..4).map(move |k| click(&format!("u{u}"), &format!("i{}", (u + k) % 12))))
        .collect()
}

/// Forgets `u3` with a tombstone and `u4` with a forget event, on the partition `partition`
/// gives each (`None`: the producer's partitioner).
fn forget_u3_and_u4(topic: &str, partition: impl Fn(&str) -> Option<i32>) {
    let p = producer();
    let mut tombstone = BaseRecord::to(topic).key(&b"u3"[..]);
    if let Some(n) = partition("u3") {
        tombstone = tombstone.partition(n);
    }
    send(&p, tombstone);
    let payload = br#"{"user_id": "u4", "event_type": "forget"}"#;
    let mut event = BaseRecord::to(topic).key(&b"u4"[..]).payload(&payload[..]);
    if let Some(n) = partition("u4") {
        event = event.partition(n);
    }
    send(&p, event);
    p.flush(Duration::from_secs(30)).expect("flush");
}

/// The messages of `topic` keyed by `user`, in log order (one partition).
fn messages_for(topic: &str, user: &str) -> Vec<Consumed> {
    read_all(topic, 1, Duration::from_secs(2))
        .into_iter()
        .filter(|m| m.key.as_deref() == Some(user.as_bytes()))
        .collect()
}

#[test]
fn a_forgotten_user_is_deleted_withdrawn_kept_forgotten_across_a_crash_and_starts_fresh() {
    let _machine = share_the_machine();
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::new(dir.path(), 2);
    let env = setup.env();
    let daemon = Daemon::start(&env, free_port());
    daemon.wait_for(Duration::from_secs(60), "partitions assigned", |d| {
        d.metric("multivaed_partitions_assigned", "") >= 1.0
    });
    produce(&setup.clicks, &clicks());
    daemon.wait_for(Duration::from_secs(60), "every user published", |d| {
        d.metric("multivaed_recommendations_published_total", "") >= 30.0
            && d.metric("multivaed_dirty_users", "") == 0.0
    });
    assert_eq!(status(&daemon, "/v1/users/u3/history"), 200);

    // the forgets are stored, then the daemon aborts before it withdraws anything
    drop(daemon);
    let mut crash_env = env.clone();
    crash_env.push(("MULTIVAED_CRASH_AT".into(), "ingest.flushed:1".into()));
    let mut crashing = Daemon::start(&crash_env, free_port());
    crashing.wait_for(Duration::from_secs(60), "partitions assigned", |d| {
        d.metric("multivaed_partitions_assigned", "") >= 1.0
    });
    forget_u3_and_u4(&setup.clicks, |_| None);
    let deadline = Instant::now() + Duration::from_secs(60);
    while crashing.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the daemon never aborted");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(crashing.log_contains("aborting at ingest.flushed"));
    for u in ["u3", "u4"] {
        let last = messages_for(&setup.recs, u).pop().unwrap();
        assert!(!last.payload.is_empty(), "{u}: withdrawn before the crash");
    }

    // the restart withdraws what the crash left pending
    let daemon = Daemon::start(&env, free_port());
    daemon.wait_for(Duration::from_secs(60), "both withdrawn", |d| {
        d.metric("multivaed_recommendations_withdrawn_total", "") >= 2.0
    });
    // (forgotten before the crash, or after it by this process when the two came in two
    // batches)
    assert!(daemon.metric("multivaed_users_forgotten_total", "") <= 1.0);
    assert_eq!(daemon.metric("multivaed_events_rejected_total", ""), 0.0);
    for u in ["u3", "u4"] {
        assert_eq!(
            status(&daemon, &format!("/v1/users/{u}/recommendations")),
            404
        );
        assert_eq!(status(&daemon, &format!("/v1/users/{u}/history")), 404);
        // their last recommendation message is a tombstone, after a recommendation
        let mine = messages_for(&setup.recs, u);
        assert!(mine.len() >= 2, "{u}: {} messages", mine.len());
        assert!(!mine[0].payload.is_empty());
        assert!(
            mine.last().unwrap().payload.is_empty(),
            "{u}: no tombstone last"
        );
    }
    assert_eq!(status(&daemon, "/v1/users/u5/history"), 200);
    assert_eq!(daemon.metric("multivaed_store_users", ""), 28.0);
    assert_eq!(daemon.metric("multivaed_store_interactions", ""), 112.0);

    // a crash and a restart: still forgotten, nothing replayed
    drop(daemon);
    let daemon = Daemon::start(&env, free_port());
    daemon.wait_for(Duration::from_secs(60), "partitions assigned", |d| {
        d.metric("multivaed_partitions_assigned", "") >= 1.0
    });
    assert_eq!(status(&daemon, "/v1/users/u3/history"), 404);
    assert_eq!(status(&daemon, "/v1/users/u4/recommendations"), 404);

    // u3 clicks again: a history of that click alone, and a recommendation after the tombstone
    produce(&setup.clicks, &[click("u3", "i99")]);
    daemon.wait_for(Duration::from_secs(60), "u3 back", |d| {
        status(d, "/v1/users/u3/history") == 200
    });
    let (_, body) = daemon.get("/v1/users/u3/history").unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["items"], serde_json::json!(["i99"]));
    daemon.wait_for(Duration::from_secs(60), "u3 published", |d| {
        d.metric("multivaed_recommendations_published_total", "") >= 1.0
    });
    let mine = messages_for(&setup.recs, "u3");
    let last: Recommendation = serde_json::from_slice(&mine.last().unwrap().payload)
        .expect("a recommendation after the tombstone");
    assert!(last.items.iter().all(|i| i.item_id != "i99"));
    assert_eq!(daemon.metric("multivaed_store_users", ""), 29.0);
}

#[test]
fn a_replica_restoring_a_partition_never_sees_a_forgotten_user() {
    let _machine = share_the_machine();
    const PARTITIONS: i32 = 2;
    let dir = tempfile::tempdir().unwrap();
    let f = Fleet::new(dir.path(), PARTITIONS);
    let partition =
        |u: &str| Some(Partitioner::ConsistentRandom.partition(u.as_bytes(), PARTITIONS));
    // a user of each partition, neither forgotten
    let witnesses: Vec<String> = (0..PARTITIONS)
        .map(|n| {
            (5..30)
                .map(|u| format!("u{u}"))
                .find(|u| partition(u) == Some(n))
                .unwrap()
        })
        .collect();
    let owns_everything = |d: &Daemon| {
        witnesses
            .iter()
            .all(|u| status(d, &format!("/v1/users/{u}/history")) == 200)
    };
    let a = Daemon::start(&f.replica_env(dir.path(), "a"), free_port());
    a.wait_for(Duration::from_secs(60), "a assigned every partition", |d| {
        d.metric("multivaed_partitions_owned", "") >= PARTITIONS as f64
    });
    let p = producer();
    for (user, payload) in clicks() {
        let n = partition(&user).unwrap();
        send(
            &p,
            BaseRecord::to(&f.setup.clicks)
                .partition(n)
                .key(user.as_bytes())
                .payload(&payload[..]),
        );
    }
    p.flush(Duration::from_secs(30)).unwrap();
    a.wait_for(Duration::from_secs(60), "every click stored", |d| {
        d.metric("multivaed_store_interactions", "") >= 120.0 && owns_everything(d)
    });
    forget_u3_and_u4(&f.setup.clicks, partition);
    // a witness declines the first item they hold (of their four: i(u)..i(u+3))
    let declines = &witnesses[0];
    let first_item = format!("i{}", declines[1..].parse::<usize>().unwrap() % 12);
    let p = producer();
    let payload = format!(
        r#"{{"user_id": "{declines}", "item_id": "{first_item}", "event_type": "dislike"}}"#
    );
    send(
        &p,
        BaseRecord::to(&f.setup.clicks)
            .partition(partition(declines).unwrap())
            .key(declines.as_bytes())
            .payload(payload.as_bytes()),
    );
    p.flush(Duration::from_secs(30)).unwrap();
    a.wait_for(Duration::from_secs(60), "both withdrawn", |d| {
        d.metric("multivaed_recommendations_withdrawn_total", "") >= 2.0
            && d.metric("multivaed_items_excluded_total", "") >= 1.0
    });
    assert_eq!(a.metric("multivaed_users_forgotten_total", ""), 2.0);
    assert_eq!(a.metric("multivaed_forget_seconds_count", ""), 2.0);
    // the withdrawal is stamped by the owner
    let tombstone = messages_for(&f.setup.recs, "u3").pop().unwrap();
    assert!(tombstone.payload.is_empty());
    assert_eq!(
        tombstone.headers.get("multivaed-owner").map(String::as_str),
        Some("a")
    );

    // a dies; b, with an empty data directory, restores every partition from the changelog
    drop(a);
    let b = Daemon::start(&f.replica_env(dir.path(), "b"), free_port());
    b.wait_for(
        Duration::from_secs(90),
        "b owns every partition",
        owns_everything,
    );
    for u in ["u3", "u4"] {
        assert_eq!(status(&b, &format!("/v1/users/{u}/history")), 404, "{u}");
        assert_eq!(
            status(&b, &format!("/v1/users/{u}/recommendations")),
            404,
            "{u}"
        );
    }
    assert_eq!(b.metric("multivaed_store_users", ""), 28.0);
    assert_eq!(b.metric("multivaed_store_interactions", ""), 111.0);
    // the declined item came with the changelog: out of the history, never offered
    let (_, body) = b.get(&format!("/v1/users/{declines}/history")).unwrap();
    assert!(!body.contains(&format!("\"{first_item}\"")), "{body}");
    let (_, body) = b
        .get(&format!("/v1/users/{declines}/recommendations?k=20"))
        .unwrap();
    let r: Recommendation = serde_json::from_str(&body).unwrap();
    assert_eq!(r.items.len(), 8, "12 items, 3 held, 1 declined: {body}");
    assert!(r.items.iter().all(|i| i.item_id != first_item), "{body}");
}

#[test]
fn a_pull_leaves_out_excluded_items_and_is_never_padded() {
    let _machine = share_the_machine();
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::new(dir.path(), 1);
    let daemon = Daemon::start(&setup.env(), free_port());
    produce(&setup.clicks, &clicks());
    daemon.wait_for(Duration::from_secs(60), "every click stored", |d| {
        d.metric("multivaed_store_interactions", "") >= 120.0
    });
    let pull = |query: &str| -> (u16, String) {
        daemon
            .get(&format!("/v1/users/u5/recommendations?{query}"))
            .unwrap()
    };
    let answer = |query: &str| -> Recommendation {
        let (status, body) = pull(query);
        assert_eq!(status, 200, "{query}: {body}");
        serde_json::from_str(&body).unwrap()
    };
    let ids =
        |r: &Recommendation| -> Vec<String> { r.items.iter().map(|i| i.item_id.clone()).collect() };
    // 12 items, u5 holds 4: 8 qualify
    let all = answer("k=20");
    assert_eq!(all.items.len(), 8);
    assert!(all.fewer_than_k);
    let top = ids(&all);
    let query = format!("k=20&exclude={},{},no-such-item", top[0], top[3]);
    let r = answer(&query);
    assert_eq!(ids(&r).len(), 6);
    assert!(r.fewer_than_k);
    assert!(!ids(&r).contains(&top[0]) && !ids(&r).contains(&top[3]));
    let r = answer(&format!("k=5&exclude={}", top[0]));
    assert_eq!(ids(&r), top[1..6].to_vec(), "the next ones move up");
    assert!(!r.fewer_than_k);
    // bad exclusions are refused
    let long = "x".repeat(300);
    assert_eq!(pull(&format!("k=5&exclude={long}")).0, 400);
    let many: Vec<String> = (0..1001).map(|i| format!("i{i}")).collect();
    assert_eq!(pull(&format!("k=5&exclude={}", many.join(","))).0, 400);
}

/// Produces `value` (`None`: a tombstone) for `item` on the items topic.
fn item_message(topic: &str, item: &str, value: Option<&str>) {
    let p = producer();
    let mut record = BaseRecord::to(topic).key(item.as_bytes());
    if let Some(v) = value {
        record = record.payload(v.as_bytes());
    }
    send(&p, record);
    p.flush(Duration::from_secs(30)).expect("flush");
}

/// Clicks of `users` users (ids from `first`) with taste groups over 60 items, and "hot" clicked
/// by every one of them (the most popular item, and one every model ranks high).
fn taste_clicks(first: usize, users: usize, seed: u64) -> Vec<(String, Vec<u8>)> {
    let mut stream = multivaed::demo::SyntheticStream::new(users, 60, 6, seed);
    let mut out = Vec::new();
    for u in 0..users {
        let user = format!("t{}", first + u);
        out.push(click(&user, "hot"));
        for _ in 0..6 {
            out.push(click(&user, &format!("i{}", stream.item_for(u))));
        }
    }
    out
}

#[test]
fn an_unavailable_item_is_never_recommended_after_its_message_even_across_swaps_and_restarts() {
    let _machine = share_the_machine();
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::new(dir.path(), 1);
    let items = format!("{}.items", setup.clicks);
    create_topics(&[(&items, 1)]);
    let mut env = setup.env();
    // every round validated on the few users this test has
    env.push(("MULTIVAED_TRAIN__MIN_VALIDATION_USERS".into(), "5".into()));
    let daemon = Daemon::start(&env, free_port());
    produce(&setup.clicks, &taste_clicks(0, 250, 3));
    daemon.wait_for(Duration::from_secs(120), "a model", |d| {
        d.metric("multivaed_model_version", "") >= 1.0
    });
    let hot_in = |r: &Recommendation| r.items.iter().any(|i| i.item_id == "hot");
    let recs_of = |topic: &str| -> Vec<Recommendation> {
        read_all(topic, 1, Duration::from_secs(2))
            .iter()
            .filter(|m| !m.payload.is_empty())
            .map(|m| serde_json::from_slice(&m.payload).unwrap())
            .collect()
    };
    // a new user who clicked one item gets "hot" first (popularity, or the model)
    produce(&setup.clicks, &[click("cold0", "i1")]);
    daemon.wait_for(Duration::from_secs(30), "cold0 answered", |d| {
        status(d, "/v1/users/cold0/recommendations") == 200
    });
    let (_, body) = daemon.get("/v1/users/cold0/recommendations").unwrap();
    assert!(hot_in(&serde_json::from_str(&body).unwrap()), "{body}");

    // "hot" is withdrawn from sale, then categories arrive for two items
    item_message(
        &items,
        "hot",
        Some(r#"{"item": "hot", "available": false}"#),
    );
    item_message(&items, "i1", Some(r#"{"category": "shoes"}"#));
    item_message(&items, "i2", Some(r#"{"category": "shoes"}"#));
    daemon.wait_for(Duration::from_secs(30), "the message applied", |d| {
        d.metric("multivaed_items_unavailable", "") == 1.0
            && d.metric("multivaed_item_updates_total", "result=\"applied\"") == 3.0
    });
    // a batch being scored when it arrived is published within moments
    std::thread::sleep(Duration::from_secs(1));
    let before = recs_of(&setup.recs).len();
    let v1 = daemon.metric("multivaed_model_version", "");

    // more clicks (known users and cold ones, answered by popularity), and a model swap
    let mut more = taste_clicks(0, 250, 4);
    more.extend((1..40).map(|u| click(&format!("cold{u}"), &format!("new{u}"))));
    produce(&setup.clicks, &more);
    daemon.wait_for(Duration::from_secs(180), "a new model swapped in", |d| {
        d.metric("multivaed_model_version", "") > v1
    });
    daemon.wait_for(Duration::from_secs(60), "everyone scored", |d| {
        d.metric("multivaed_dirty_users", "") == 0.0
    });
    let after: Vec<Recommendation> = recs_of(&setup.recs).split_off(before);
    let v2 = daemon.metric("multivaed_model_version", "") as u64;
    let by_new_model = after
        .iter()
        .filter(|r| r.model_version.is_some_and(|v| v >= v2))
        .count();
    let by_popularity = after.iter().filter(|r| r.source == Source::Popular).count();
    eprintln!(
        "items: {} recommendations after the message ({by_new_model} by the new model v{v2}, {by_popularity} by popularity)",
        after.len()
    );
    assert!(by_new_model > 0 && by_popularity > 0);
    assert!(
        !after.iter().any(hot_in),
        "\"hot\" recommended after its message"
    );
    let (_, body) = daemon.get("/v1/users/cold0/recommendations?k=50").unwrap();
    assert!(!hot_in(&serde_json::from_str(&body).unwrap()), "{body}");
    // a category pull holds only that category's available items
    let (_, body) = daemon
        .get("/v1/users/t7/recommendations?k=20&category=shoes")
        .unwrap();
    let r: Recommendation = serde_json::from_str(&body).unwrap();
    assert!(
        r.items
            .iter()
            .all(|i| i.item_id == "i1" || i.item_id == "i2")
            && r.fewer_than_k,
        "{body}"
    );

    // a restart: still hidden (nothing is ranked before the items topic is read)
    drop(daemon);
    let daemon = Daemon::start(&env, free_port());
    daemon.wait_for(Duration::from_secs(60), "pulls answered", |d| {
        status(d, "/v1/users/cold0/recommendations") == 200
    });
    let (_, body) = daemon.get("/v1/users/cold0/recommendations?k=50").unwrap();
    assert!(!hot_in(&serde_json::from_str(&body).unwrap()), "{body}");

    // back on sale: recommended again
    item_message(&items, "hot", None);
    daemon.wait_for(Duration::from_secs(30), "hot available again", |d| {
        d.metric("multivaed_items_unavailable", "") == 0.0
    });
    let (_, body) = daemon.get("/v1/users/cold0/recommendations").unwrap();
    assert!(hot_in(&serde_json::from_str(&body).unwrap()), "{body}");
}

/// Runs the multivaed binary with `env` and `args`; its standard output, or the failure.
fn cli(env: &[(String, String)], args: &[&str]) -> String {
    let (ok, out, err) = run_multivaed(env, args);
    assert!(ok, "multivaed {args:?}: {err}");
    out
}

#[test]
fn an_export_imported_twice_into_a_fresh_deployment_counts_each_click_once() {
    let _machine = share_the_machine();
    let dir = tempfile::tempdir().unwrap();
    let old = Setup::new(&dir.path().join("old"), 1);
    let daemon = Daemon::start(&old.env(), free_port());
    produce(&old.clicks, &clicks());
    daemon.wait_for(Duration::from_secs(60), "every click stored", |d| {
        d.metric("multivaed_store_interactions", "") >= 120.0
    });
    daemon.terminate();

    // the export: one line per user, items oldest first
    let file = dir.path().join("histories.jsonl");
    cli(&old.env(), &["export", "--output", file.to_str().unwrap()]);
    let text = std::fs::read_to_string(&file).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 30);
    let u5 = lines.iter().find(|l| l["user_id"] == "u5").unwrap();
    assert_eq!(u5["items"], serde_json::json!(["i5", "i6", "i7", "i8"]));

    // imported into a fresh deployment twice (a retried migration): each click counts once
    let new = Setup::new(&dir.path().join("new"), 2);
    let daemon = Daemon::start(&new.env(), free_port());
    for _ in 0..2 {
        let args = ["produce", "--brokers", &brokers(), "--topic", &new.clicks];
        let data = ["--data", file.to_str().unwrap(), "--rate", "0"];
        cli(&[], &[&args[..], &data[..]].concat());
    }
    daemon.wait_for(Duration::from_secs(60), "both imports consumed", |d| {
        d.metric("multivaed_events_consumed_total", "") >= 240.0
    });
    assert_eq!(daemon.metric("multivaed_store_users", ""), 30.0);
    assert_eq!(daemon.metric("multivaed_store_interactions", ""), 120.0);
    assert_eq!(daemon.metric("multivaed_events_duplicate_total", ""), 120.0);
    let (_, body) = daemon.get("/v1/users/u5/history").unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["items"], u5["items"]);
}

fn typed(user: &str, item: &str, event_type: &str) -> (String, Vec<u8>) {
    (
        user.to_string(),
        format!(r#"{{"user_id": "{user}", "item_id": "{item}", "event_type": "{event_type}"}}"#)
            .into_bytes(),
    )
}

#[test]
fn a_disliked_item_never_comes_back_to_its_user_even_when_most_popular_and_weights_are_kept() {
    let _machine = share_the_machine();
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::new(dir.path(), 1);
    let mut env = setup.env();
    env.push(("MULTIVAED_TRAIN__MIN_VALIDATION_USERS".into(), "5".into()));
    env.push(("MULTIVAED_MODEL__INPUT".into(), "weighted".into()));
    let types = "{click=1.0,view=0.5,purchase=3.0}";
    env.push(("MULTIVAED_EVENTS__TYPES".into(), types.into()));
    let daemon = Daemon::start(&env, free_port());
    // "d0" dislikes "hot" (the item every other user holds) before holding anything else, then
    // clicks; "d1" clicks "hot", then dislikes it (out of the history, excluded)
    let mut first = vec![typed("d0", "hot", "dislike"), click("d0", "i1")];
    first.extend(taste_clicks(0, 250, 3));
    first.extend([
        click("d1", "hot"),
        typed("d1", "i2", "purchase"),
        typed("d1", "i3", "view"),
        typed("d1", "hot", "not_interested"),
        typed("d1", "i4", "wishlist"),
    ]);
    produce(&setup.clicks, &first);
    daemon.wait_for(Duration::from_secs(120), "a model", |d| {
        d.metric("multivaed_model_version", "") >= 1.0
    });
    assert_eq!(
        daemon.metric("multivaed_events_rejected_total", "reason=\"unknown_type\""),
        1.0,
        "an unconfigured type is dead-lettered"
    );
    assert_eq!(daemon.metric("multivaed_items_excluded_total", ""), 2.0);
    let hot_in = |body: &str| {
        let r: Recommendation = serde_json::from_str(body).unwrap();
        r.items.iter().any(|i| i.item_id == "hot")
    };
    let pull = |user: &str| -> String {
        let (status, body) = daemon
            .get(&format!("/v1/users/{user}/recommendations?k=50"))
            .unwrap();
        assert_eq!(status, 200, "{body}");
        body
    };
    // another user who holds "hot"'s neighbours gets it first; the two who declined never
    let (_, body) = daemon.get("/v1/users/t0/history").unwrap();
    assert!(body.contains("hot"), "{body}");
    produce(&setup.clicks, &[click("c0", "i1")]);
    daemon.wait_for(Duration::from_secs(30), "c0 answered", |d| {
        status(d, "/v1/users/c0/recommendations") == 200
    });
    assert!(hot_in(&pull("c0")), "a new user gets the most popular item");
    for user in ["d0", "d1"] {
        assert!(!hot_in(&pull(user)), "{user} declined hot");
    }
    let (_, body) = daemon.get("/v1/users/d1/history").unwrap();
    assert!(!body.contains("hot") && body.contains("i2"), "{body}");

    // more clicks and a model swap: still never published for them
    let v1 = daemon.metric("multivaed_model_version", "");
    let mut more = taste_clicks(0, 250, 4);
    more.extend([click("d0", "i5"), click("d1", "i6")]);
    produce(&setup.clicks, &more);
    daemon.wait_for(Duration::from_secs(180), "a new model swapped in", |d| {
        d.metric("multivaed_model_version", "") > v1
    });
    daemon.wait_for(Duration::from_secs(60), "everyone scored", |d| {
        d.metric("multivaed_dirty_users", "") == 0.0
    });
    for user in ["d0", "d1"] {
        let published = messages_for(&setup.recs, user);
        assert!(published.len() >= 2, "{user}: {}", published.len());
        for m in &published {
            assert!(
                !hot_in(&String::from_utf8_lossy(&m.payload)),
                "{user}: hot published"
            );
        }
        assert!(!hot_in(&pull(user)), "{user} declined hot");
    }

    // a later positive event lifts the exclusion: "hot" is back in d0's history
    produce(&setup.clicks, &[typed("d0", "hot", "view")]);
    daemon.wait_for(Duration::from_secs(30), "d0 holds hot", |d| {
        d.get("/v1/users/d0/history")
            .is_some_and(|(_, b)| b.contains("hot"))
    });
    daemon.terminate();

    // the weights and the exclusion are in the store (and its export)
    let file = dir.path().join("histories.jsonl");
    cli(
        &setup.env(),
        &["export", "--output", file.to_str().unwrap()],
    );
    let text = std::fs::read_to_string(&file).unwrap();
    let d1: serde_json::Value = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|l| l["user_id"] == "d1")
        .unwrap();
    assert_eq!(d1["items"], serde_json::json!(["i2", "i3", "i6"]), "{d1}");
    assert_eq!(d1["weights"], serde_json::json!([3.0, 0.5, 1.0]), "{d1}");
    assert_eq!(d1["excluded"], serde_json::json!(["hot"]), "{d1}");

    // replayed twice into a fresh deployment with the same event types: the same export
    let types = ("MULTIVAED_EVENTS__TYPES".to_string(), types.to_string());
    let new = Setup::new(&dir.path().join("new"), 1);
    let mut new_env = new.env();
    new_env.push(types.clone());
    let daemon = Daemon::start(&new_env, free_port());
    let events: usize = text
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let n = |k: &str| v[k].as_array().map_or(0, Vec::len);
            n("items") + n("excluded")
        })
        .sum();
    for _ in 0..2 {
        let args = ["produce", "--brokers", &brokers(), "--topic", &new.clicks];
        let data = ["--data", file.to_str().unwrap(), "--rate", "0"];
        cli(
            std::slice::from_ref(&types),
            &[&args[..], &data[..]].concat(),
        );
    }
    daemon.wait_for(Duration::from_secs(60), "both replays consumed", |d| {
        d.metric("multivaed_events_consumed_total", "") >= 2.0 * events as f64
    });
    assert_eq!(daemon.metric("multivaed_events_rejected_total", ""), 0.0);
    daemon.terminate();
    let again = dir.path().join("again.jsonl");
    cli(&new.env(), &["export", "--output", again.to_str().unwrap()]);
    assert_eq!(std::fs::read_to_string(&again).unwrap(), text);
}

#[test]
fn a_forgotten_user_is_in_no_later_training_round() {
    let _machine = share_the_machine();
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::new(dir.path(), 1);
    let mut env = setup.env();
    env.extend(
        [
            // the rounds' users, by the pseudonymous key of their id (a debug log line)
            (
                "RUST_LOG",
                "info,rdkafka=warn,multivaed::train::round_users=debug",
            ),
            ("MULTIVAED_TRAIN__MIN_NEW_EVENTS", "100"),
            ("MULTIVAED_TRAIN__MIN_USERS", "50"),
            ("MULTIVAED_TRAIN__INTERVAL", "1s"),
            ("MULTIVAED_TRAIN__MAX_EPOCHS_PER_ROUND", "1"),
            ("MULTIVAED_TRAIN__CATCH_UP", "false"),
            ("MULTIVAED_TRAIN__MIN_NEW_FRACTION", "1000"),
            ("MULTIVAED_TRAIN__MIN_VALIDATION_USERS", "5"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    let daemon = Daemon::start(&env, free_port());
    let key = |u: &str| format!("{:016x}", multivaed::store::user_key(u.as_bytes()));
    let rounds = |d: &Daemon| -> Vec<String> {
        let log = d.log.lock().unwrap();
        log.iter()
            .filter(|l| l.contains("training round users"))
            .cloned()
            .collect()
    };
    produce(&setup.clicks, &taste_clicks(0, 250, 3));
    daemon.wait_for(Duration::from_secs(120), "a round that read t7", |d| {
        rounds(d).iter().any(|l| l.contains(&key("t7")))
    });

    // t7 is forgotten; the next rounds (each after new clicks) never read them again
    let p = producer();
    send(&p, BaseRecord::to(&setup.clicks).key(&b"t7"[..]));
    p.flush(Duration::from_secs(30)).expect("flush");
    daemon.wait_for(Duration::from_secs(30), "t7 forgotten", |d| {
        d.metric("multivaed_users_forgotten_total", "") >= 1.0
    });
    let before = rounds(&daemon).len();
    for (n, seed) in [4, 5].into_iter().enumerate() {
        // (a click of t7's would start a new history: none)
        let mut more = taste_clicks(0, 250, seed);
        more.retain(|(user, _)| user != "t7");
        produce(&setup.clicks, &more);
        daemon.wait_for(Duration::from_secs(120), "another round", |d| {
            rounds(d).len() > before + n
        });
    }
    // (the first line after the forget may come from a round that read the store before it)
    let all = rounds(&daemon);
    let later = &all[before + 1..];
    assert!(!later.is_empty());
    for line in later {
        assert!(line.contains(&key("t9")), "a round reads the other users");
        assert!(
            !line.contains(&key("t7")),
            "t7 read by a round after the forget"
        );
    }
    eprintln!(
        "rounds: {before} up to the forget, {} after it without t7",
        later.len()
    );
}
