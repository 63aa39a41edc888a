//! The wire contract: every message multivaed reads or writes on Kafka (and answers over HTTP),
//! in one place. In: a click event on the clicks topic ([`ClickEvent`], read by
//! [`parse_event`] into a [`Click`]). Out: one [`Recommendation`] per user on the
//! recommendations topic, keyed by user id, with a [`MODEL_VERSION_HEADER`] header.

mod click;

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

pub use click::Click;
pub use click::EventTypes;
pub(crate) use click::{checked_id, parse_event, Event, FORGET_TYPE, MAX_ID_BYTES};

/// A click event as producers write it (`multivaed produce`, the demo, the benchmarks). Ids may
/// also be non-negative JSON integers; `timestamp` (ms) and `event_type` may be left out; other
/// fields are ignored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClickEvent {
    pub user_id: String,
    pub item_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_type: Option<String>,
}

impl ClickEvent {
    /// A click of `user` on `item` at `timestamp` (ms), typed "click".
    pub fn click(user: impl Into<String>, item: impl Into<String>, timestamp: Option<u64>) -> Self {
        Self {
            user_id: user.into(),
            item_id: item.into(),
            timestamp,
            event_type: Some("click".into()),
        }
    }

    /// The message payload.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// Who ranked a recommendation's items.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The live model.
    Model,
    /// The popularity ranking (no model yet, or none that knows the user's items); scores are
    /// the items' click counts.
    Popular,
}

impl Source {
    /// The JSON value, also the `source` metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Model => "model",
            Self::Popular => "popular",
        }
    }
}

/// One recommended item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoredItem {
    pub item_id: String,
    pub score: f32,
}

/// The message published per user (and the HTTP API's answer).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Recommendation {
    pub user_id: String,
    pub items: Vec<ScoredItem>,
    /// The model version that scored it; `null` when the popularity ranking did.
    pub model_version: Option<u64>,
    /// Milliseconds since the epoch.
    pub generated_at: u64,
    pub source: Source,
    /// Fewer items than asked for qualified (the user has, or excluded, nearly every item): an
    /// answer is never padded with excluded or unavailable items. Left out when false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fewer_than_k: bool,
    /// A canary version made it (the user is in its slice). Left out when false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub canary: bool,
    /// Role `serve`: who wrote it, sent as headers (not in the payload).
    #[serde(skip)]
    pub owner: Option<OwnerStamp>,
}

/// The owner's stamp on a recommendation (role `serve`), as the headers [`OWNER_HEADERS`]: a
/// consumer keeps, per user, the message with the highest (epoch, offset) and discards the rest
/// (a late message of a previous owner has a lower epoch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnerStamp {
    pub partition: i32,
    pub epoch: u64,
    /// The next clicks offset of the partition the user's history reflected.
    pub offset: i64,
    pub owner: String,
}

/// Header names: partition, epoch, offset, owner instance id.
pub const OWNER_HEADERS: [&str; 4] = [
    "multivaed-partition",
    "multivaed-epoch",
    "multivaed-offset",
    "multivaed-owner",
];

impl Recommendation {
    /// The message payload.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The value of the [`MODEL_VERSION_HEADER`] header: the version, or empty.
    pub(crate) fn model_version_header(&self) -> String {
        self.model_version
            .map(|v| v.to_string())
            .unwrap_or_default()
    }
}

/// Header of every recommendation message naming the model version (empty for popularity).
pub(crate) const MODEL_VERSION_HEADER: &str = "model_version";

/// Milliseconds since the epoch, now.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_click_event_written_here_is_read_back_by_the_parser() {
        let e = ClickEvent::click("u-42", "1234", Some(1_700_000_000_000));
        let json = e.to_json();
        assert_eq!(
            String::from_utf8_lossy(&json),
            r#"{"user_id":"u-42","item_id":"1234","timestamp":1700000000000,"event_type":"click"}"#
        );
        let parsed = parse_event(None, Some(&json), 65536, &EventTypes::clicks()).unwrap();
        assert_eq!(
            parsed,
            Event::Click(Click {
                user: "u-42".into(),
                item: "1234".into(),
                timestamp_ms: Some(1_700_000_000_000),
                weight: 1.0,
            })
        );
    }

    #[test]
    fn a_recommendation_keeps_its_json_shape() {
        let r = Recommendation {
            user_id: "u".into(),
            items: vec![ScoredItem {
                item_id: "i".into(),
                score: 2.5,
            }],
            model_version: None,
            generated_at: 1,
            source: Source::Popular,
            fewer_than_k: false,
            canary: false,
            owner: None,
        };
        let json = String::from_utf8(r.to_json()).unwrap();
        assert_eq!(
            json,
            r#"{"user_id":"u","items":[{"item_id":"i","score":2.5}],"model_version":null,"generated_at":1,"source":"popular"}"#
        );
        assert_eq!(serde_json::from_str::<Recommendation>(&json).unwrap(), r);
        let short = Recommendation {
            fewer_than_k: true,
            canary: false,
            ..r.clone()
        };
        assert!(String::from_utf8(short.to_json())
            .unwrap()
            .ends_with(r#""source":"popular","fewer_than_k":true}"#));
        assert_eq!(r.model_version_header(), "");
        assert_eq!(Source::Model.as_str(), "model");
    }
}
