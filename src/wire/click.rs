//! Reading one message of the clicks topic: parsing and validation into a weighted `Click`, a
//! negative event (the user does not want the item), or a request to forget a user (a tombstone,
//! or an event of type `forget`). Never panics: every bad message becomes a `Rejection` with a
//! stable reason (the metric label and dead-letter header).
//! Self-contained (serde_json and thiserror only), so the fuzzer compiles it alone.

use serde_json::Value;

/// One interaction, as read from the clicks topic (positive: a click, a view, a purchase…; or
/// negative, by the event kind that carries it).
#[derive(Debug, Clone, PartialEq)]
pub struct Click {
    pub user: String,
    pub item: String,
    /// Event time (ms since the epoch), when the producer gave one.
    pub timestamp_ms: Option<u64>,
    /// The weight of its type (`events.types`; 1 for a click).
    pub weight: f32,
}

impl Click {
    /// A click of weight 1.
    pub fn new(user: impl Into<String>, item: impl Into<String>) -> Self {
        Self {
            user: user.into(),
            item: item.into(),
            timestamp_ms: None,
            weight: 1.0,
        }
    }
}

/// What each event type means: its weight (positive types), negative types, and what becomes of
/// a type that is neither.
#[derive(Debug, Clone, PartialEq)]
pub struct EventTypes {
    /// Positive types and their weights (> 0); an event without a type is a `click`.
    pub weights: Vec<(String, f32)>,
    /// Types that say the user does not want the item.
    pub negative: Vec<String>,
    /// A type in neither list: dead-lettered (`false`) or skipped and counted (`true`).
    pub ignore_unknown: bool,
}

impl EventTypes {
    /// Clicks only (weight 1), the paper's protocol; other types dead-lettered.
    pub fn clicks() -> Self {
        Self {
            weights: vec![("click".into(), 1.0)],
            negative: Vec::new(),
            ignore_unknown: false,
        }
    }

    fn weight(&self, t: &str) -> Option<f32> {
        self.weights.iter().find(|(n, _)| n == t).map(|&(_, w)| w)
    }
}

/// Longest accepted id, in bytes.
pub(crate) const MAX_ID_BYTES: usize = 256;

/// Why a message was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Rejection {
    #[error("message of {size} bytes exceeds the maximum of {max}")]
    TooLarge { size: usize, max: usize },
    #[error("message has no payload")]
    Empty,
    #[error("payload is not valid UTF-8")]
    NotUtf8,
    #[error("payload is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("payload is not a JSON object")]
    NotAnObject,
    #[error("field {0} is missing")]
    MissingField(&'static str),
    #[error("field {field} must be {expected}")]
    WrongType {
        field: &'static str,
        expected: &'static str,
    },
    #[error("field {field} is empty")]
    EmptyId { field: &'static str },
    #[error("field {field} is {len} bytes long, more than {MAX_ID_BYTES}")]
    IdTooLong { field: &'static str, len: usize },
    #[error("field {field} contains a NUL or control character")]
    ControlCharacter { field: &'static str },
    #[error("field {field} is a number outside 0..2^64")]
    OutOfRange { field: &'static str },
    #[error("event_type {0:?} is not configured (events.types, events.negative)")]
    UnknownType(String),
}

impl Rejection {
    /// A short, stable reason (metric label, dead-letter header).
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            Self::TooLarge { .. } => "too_large",
            Self::Empty => "empty",
            Self::NotUtf8 => "not_utf8",
            Self::InvalidJson(_) => "invalid_json",
            Self::NotAnObject => "not_an_object",
            Self::MissingField(_) => "missing_field",
            Self::WrongType { .. } => "wrong_type",
            Self::EmptyId { .. } => "empty_id",
            Self::IdTooLong { .. } => "id_too_long",
            Self::ControlCharacter { .. } => "control_character",
            Self::OutOfRange { .. } => "out_of_range",
            Self::UnknownType(_) => "unknown_type",
        }
    }
}

/// The event type that asks to forget a user (as a tombstone does).
pub(crate) const FORGET_TYPE: &str = "forget";

/// A valid message: a positive interaction (weighted), a negative one (the item leaves the
/// user's history and is never recommended to them until a later positive event), a request to
/// forget a user (their whole history), or an event of a type that does not count.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Event {
    Click(Click),
    Negative(Click),
    Forget { user: String },
    Ignored { event_type: String },
}

/// An id's limits: not empty, at most [`MAX_ID_BYTES`], no control character.
pub(crate) fn checked_id(s: String, field: &'static str) -> Result<String, Rejection> {
    if s.is_empty() {
        return Err(Rejection::EmptyId { field });
    }
    if s.len() > MAX_ID_BYTES {
        return Err(Rejection::IdTooLong {
            field,
            len: s.len(),
        });
    }
    if s.chars().any(char::is_control) {
        return Err(Rejection::ControlCharacter { field });
    }
    Ok(s)
}

fn id(obj: &serde_json::Map<String, Value>, field: &'static str) -> Result<String, Rejection> {
    let s = match obj.get(field) {
        None | Some(Value::Null) => return Err(Rejection::MissingField(field)),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(v) => v.to_string(),
            None if n.is_i64() || n.as_f64().is_some_and(|f| f.fract() == 0.0) => {
                return Err(Rejection::OutOfRange { field })
            }
            None => {
                return Err(Rejection::WrongType {
                    field,
                    expected: "a string or a non-negative integer",
                })
            }
        },
        Some(_) => {
            return Err(Rejection::WrongType {
                field,
                expected: "a string or a non-negative integer",
            })
        }
    };
    checked_id(s, field)
}

/// Parses one message: its `key` and payload. A tombstone (a null payload under a key, the
/// user's id) forgets that user; size is checked before any parsing.
pub(crate) fn parse_event(
    key: Option<&[u8]>,
    payload: Option<&[u8]>,
    max_bytes: usize,
    types: &EventTypes,
) -> Result<Event, Rejection> {
    let Some(bytes) = payload else {
        let key = key.filter(|k| !k.is_empty()).ok_or(Rejection::Empty)?;
        let user = std::str::from_utf8(key).map_err(|_| Rejection::NotUtf8)?;
        return Ok(Event::Forget {
            user: checked_id(user.to_string(), "key")?,
        });
    };
    if bytes.len() > max_bytes {
        return Err(Rejection::TooLarge {
            size: bytes.len(),
            max: max_bytes,
        });
    }
    if bytes.is_empty() {
        return Err(Rejection::Empty);
    }
    let text = std::str::from_utf8(bytes).map_err(|_| Rejection::NotUtf8)?;
    let value: Value =
        serde_json::from_str(text).map_err(|e| Rejection::InvalidJson(e.to_string()))?;
    let Value::Object(obj) = value else {
        return Err(Rejection::NotAnObject);
    };
    let user = id(&obj, "user_id")?;
    if obj.get("event_type").and_then(Value::as_str) == Some(FORGET_TYPE) {
        return Ok(Event::Forget { user });
    }
    let item = id(&obj, "item_id")?;
    let timestamp_ms = match obj.get("timestamp") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => match n.as_u64() {
            Some(t) => Some(t),
            None => {
                return Err(Rejection::WrongType {
                    field: "timestamp",
                    expected: "a non-negative integer (milliseconds since the epoch)",
                })
            }
        },
        Some(_) => {
            return Err(Rejection::WrongType {
                field: "timestamp",
                expected: "a non-negative integer (milliseconds since the epoch)",
            })
        }
    };
    let event_type = match obj.get("event_type") {
        None | Some(Value::Null) => "click",
        Some(Value::String(t)) => t.as_str(),
        Some(_) => {
            return Err(Rejection::WrongType {
                field: "event_type",
                expected: "a string",
            })
        }
    };
    let mut click = Click {
        user,
        item,
        timestamp_ms,
        weight: 1.0,
    };
    if let Some(w) = types.weight(event_type) {
        click.weight = w;
        return Ok(Event::Click(click));
    }
    if types.negative.iter().any(|n| n == event_type) {
        return Ok(Event::Negative(click));
    }
    if event_type == "click" && obj.get("event_type").is_none_or(Value::is_null) {
        // an event without a type is a click, even where clicks are not listed
        return Ok(Event::Click(click));
    }
    if types.ignore_unknown {
        return Ok(Event::Ignored {
            event_type: event_type.to_string(),
        });
    }
    Err(Rejection::UnknownType(event_type.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse(s: &[u8]) -> Result<Event, Rejection> {
        parse_event(Some(b"key"), Some(s), 1024, &EventTypes::clicks())
    }

    #[test]
    fn a_tombstone_or_a_forget_event_forgets_a_user() {
        let forget = |u: &str| Event::Forget { user: u.into() };
        assert_eq!(
            parse_event(Some(b"u7"), None, 64, &EventTypes::clicks()),
            Ok(forget("u7"))
        );
        assert_eq!(
            parse(br#"{"user_id": "u7", "event_type": "forget"}"#),
            Ok(forget("u7"))
        );
        // an item may be given, and is not needed
        assert_eq!(
            parse(br#"{"user_id": 7, "item_id": "x", "event_type": "forget"}"#),
            Ok(forget("7"))
        );
        for (key, reason) in [
            (None, "empty"),
            (Some(&b""[..]), "empty"),
            (Some(&b"\xff"[..]), "not_utf8"),
            (Some(&b"a\x01"[..]), "control_character"),
        ] {
            assert_eq!(
                parse_event(key, None, 64, &EventTypes::clicks())
                    .unwrap_err()
                    .reason(),
                reason
            );
        }
        let long = vec![b'a'; MAX_ID_BYTES + 1];
        assert_eq!(
            parse_event(Some(&long), None, 64, &EventTypes::clicks())
                .unwrap_err()
                .reason(),
            "id_too_long"
        );
        assert_eq!(
            parse(br#"{"event_type": "forget"}"#).unwrap_err().reason(),
            "missing_field"
        );
    }

    #[test]
    fn accepts_strings_and_integers() {
        let e = parse(br#"{"user_id": "u1", "item_id": 42, "timestamp": 1700000000000, "event_type": "click"}"#).unwrap();
        assert_eq!(
            e,
            Event::Click(Click {
                user: "u1".into(),
                item: "42".into(),
                timestamp_ms: Some(1_700_000_000_000),
                weight: 1.0,
            })
        );
        assert!(matches!(
            parse(br#"{"user_id": 1, "item_id": "x"}"#),
            Ok(Event::Click(_))
        ));
        assert_eq!(
            parse(br#"{"user_id": 1, "item_id": "x", "event_type": "view"}"#)
                .unwrap_err()
                .reason(),
            "unknown_type"
        );
    }

    #[test]
    fn types_give_weights_negatives_and_unknowns_a_fate() {
        let mut types = EventTypes {
            weights: vec![("view".into(), 0.5), ("purchase".into(), 3.0)],
            negative: vec!["dislike".into()],
            ignore_unknown: false,
        };
        let ev = |t: &str, types: &EventTypes| {
            let p = format!(r#"{{"user_id": "u", "item_id": "i", "event_type": "{t}"}}"#);
            parse_event(None, Some(p.as_bytes()), 1024, types)
        };
        let weight = |e: Result<Event, Rejection>| match e {
            Ok(Event::Click(c)) => c.weight,
            other => panic!("{other:?}"),
        };
        assert_eq!(weight(ev("view", &types)), 0.5);
        assert_eq!(weight(ev("purchase", &types)), 3.0);
        let typeless = br#"{"user_id": "u", "item_id": "i"}"#;
        assert_eq!(weight(parse_event(None, Some(typeless), 1024, &types)), 1.0);
        assert!(matches!(ev("dislike", &types), Ok(Event::Negative(c)) if c.item == "i"));
        assert_eq!(ev("click", &types).unwrap_err().reason(), "unknown_type");
        types.ignore_unknown = true;
        assert!(
            matches!(ev("click", &types), Ok(Event::Ignored { event_type }) if event_type == "click")
        );
    }

    #[test]
    fn rejects_with_reasons() {
        let cases: &[(&[u8], &str)] = &[
            (b"", "empty"),
            (b"\xff\xfe", "not_utf8"),
            (b"{\"user_id\": ", "invalid_json"),
            (b"[1,2]", "not_an_object"),
            (br#"{"item_id": "x"}"#, "missing_field"),
            (br#"{"user_id": "u"}"#, "missing_field"),
            (br#"{"user_id": true, "item_id": "x"}"#, "wrong_type"),
            (br#"{"user_id": 1.5, "item_id": "x"}"#, "wrong_type"),
            (br#"{"user_id": -3, "item_id": "x"}"#, "out_of_range"),
            (
                br#"{"user_id": 184467440737095516150, "item_id": "x"}"#,
                "out_of_range",
            ),
            (br#"{"user_id": "", "item_id": "x"}"#, "empty_id"),
            (
                br#"{"user_id": "a\u0000b", "item_id": "x"}"#,
                "control_character",
            ),
            (
                br#"{"user_id": "u", "item_id": "x", "timestamp": "yesterday"}"#,
                "wrong_type",
            ),
            (
                br#"{"user_id": "u", "item_id": "x", "event_type": 7}"#,
                "wrong_type",
            ),
        ];
        for (payload, reason) in cases {
            let got = parse(payload).unwrap_err();
            assert_eq!(
                got.reason(),
                *reason,
                "{:?}: {got}",
                String::from_utf8_lossy(payload)
            );
        }
        let long = format!(r#"{{"user_id": "{}", "item_id": "x"}}"#, "a".repeat(300));
        assert_eq!(parse(long.as_bytes()).unwrap_err().reason(), "id_too_long");
        let big = vec![b' '; 2000];
        assert_eq!(parse(&big).unwrap_err().reason(), "too_large");
        assert_eq!(
            parse_event(None, None, 10, &EventTypes::clicks())
                .unwrap_err()
                .reason(),
            "empty"
        );
        let deep = "[".repeat(100_000);
        assert_eq!(
            parse_event(None, Some(deep.as_bytes()), 1 << 20, &EventTypes::clicks())
                .unwrap_err()
                .reason(),
            "invalid_json"
        );
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse(&bytes);
        }

        #[test]
        fn accepted_ids_are_valid(user in any::<String>(), item in any::<u64>()) {
            let payload = serde_json::json!({"user_id": user, "item_id": item}).to_string();
            match parse_event(None, Some(payload.as_bytes()), 1 << 20, &EventTypes::clicks()) {
                Ok(Event::Click(c)) => {
                    prop_assert_eq!(c.weight, 1.0);
                    prop_assert!(!c.user.is_empty() && c.user.len() <= MAX_ID_BYTES);
                    prop_assert!(!c.user.chars().any(char::is_control));
                    prop_assert_eq!(c.item, item.to_string());
                }
                Ok(other) => prop_assert!(false, "unexpected {:?}", other),
                Err(r) => prop_assert!(["empty_id", "id_too_long", "control_character"].contains(&r.reason())),
            }
        }
    }
}
