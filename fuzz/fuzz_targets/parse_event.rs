//! Fuzzes the click-event parser with arbitrary bytes: it must never panic, every rejection has a
//! stable reason, accepted ids obey the documented limits, and the size limit applies before
//! parsing.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../src/wire/click.rs"]
#[allow(dead_code)]
mod event;

use event::{parse_event, Event, EventTypes, MAX_ID_BYTES};

fuzz_target!(|data: &[u8]| {
    let types = EventTypes {
        weights: vec![("click".into(), 1.0), ("view".into(), 0.5)],
        negative: vec!["dislike".into()],
        ignore_unknown: false,
    };
    for max in [65536usize, 64] {
        let key = data.get(..data.len().min(8));
        if let Ok(Event::Forget { user }) = parse_event(key, None, max, &types) {
            assert!(!user.is_empty() && user.len() <= MAX_ID_BYTES);
            assert!(!user.chars().any(char::is_control));
        }
        match parse_event(key, Some(data), max, &types) {
            Ok(Event::Click(c) | Event::Negative(c)) => {
                assert!(data.len() <= max);
                assert!(c.weight > 0.0);
                for id in [&c.user, &c.item] {
                    assert!(!id.is_empty() && id.len() <= MAX_ID_BYTES);
                    assert!(!id.chars().any(char::is_control));
                }
            }
            Ok(Event::Forget { user }) => {
                assert!(data.len() <= max);
                assert!(!user.is_empty() && user.len() <= MAX_ID_BYTES);
            }
            Ok(_) => assert!(data.len() <= max),
            Err(r) => {
                assert!(!r.reason().is_empty());
                let _ = r.to_string();
                if data.len() > max {
                    assert_eq!(r.reason(), "too_large");
                }
            }
        }
    }
});
