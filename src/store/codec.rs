//! The store's record layout on sled: keys, counters and the encodings of histories and user
//! records (one place, shared by the store and the format upgrade).

pub(super) const NEXT_USER: &[u8] = b"mnext_user";
pub(super) const NEXT_ITEM: &[u8] = b"mnext_item";
pub(super) const INTERACTIONS: &[u8] = b"minteractions";
/// Users forgotten over the store's life (their indices are not reused): the stored users are
/// the indices given less these.
pub(super) const FORGOTTEN: &[u8] = b"mforgotten";
/// Consumed messages applied over the store's life (clicks, ignored and dead-lettered ones):
/// equal to the sum of the partitions' next offsets when no message was ever applied twice.
pub(super) const MESSAGES: &[u8] = b"mmessages";
/// The layout of the records (absent: format 1, the original layout).
pub(super) const FORMAT: &[u8] = b"mformat";
/// Format 2: a user's index and history in one record under its external id (one read and one
/// write per click); items are found through the in-memory catalogue. Format 3: each item of
/// the history has a weight, and the record ends with the user's excluded items.
pub(super) const CURRENT_FORMAT: u64 = 3;
/// While a store is converted to format 3: the last user key converted (written with each
/// converted chunk, so an interrupted conversion resumes after it).
pub(super) const UPGRADE_CURSOR: &[u8] = b"mupgrade3";
/// Items per popularity record.
pub(super) const POPULARITY_BLOCK: usize = 256;

// Records, by first byte of the key:
//   'U' + user id   → user index (u32 BE), the history's length n (u32 LE), its n items,
//                     oldest first (u32 LE each), their n weights (f32 LE each), then the
//                     user's excluded items (u32 LE each; format 2 had the items only)
//   'Q' + user id   → a damaged 'U' record, kept aside
//   'W' + user id   → a forgotten user whose recommendation is not yet withdrawn (empty)
//   'u' + index BE  → user id
//   'i' + index BE  → item id (the catalogue, loaded into memory at open)
//   'p' + block BE  → how many users hold each of items 256·block.. (u32 LE each)
//   'o' + topic + 0 + partition BE → next offset (i64 BE)
//   'c' + partition BE → changelog position of the partition's local copy (role serve)
//   'm' + name      → counters and the format
// Format 1 had 'h' + user index → history, 'I' + item id → item index and 'c' + item index →
// count instead.

pub(super) fn key(prefix: u8, rest: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + rest.len());
    k.push(prefix);
    k.extend_from_slice(rest);
    k
}

pub(super) fn idx_key(prefix: u8, idx: u32) -> [u8; 5] {
    let b = idx.to_be_bytes();
    [prefix, b[0], b[1], b[2], b[3]]
}

pub(super) fn offset_key(topic: &str, partition: i32) -> Vec<u8> {
    let mut k = key(b'o', topic.as_bytes());
    k.push(0);
    k.extend_from_slice(&partition.to_be_bytes());
    k
}

pub(super) fn read_u64(v: Option<sled::IVec>) -> u64 {
    v.and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0)
}

pub(super) fn decode_items(v: &[u8]) -> Vec<u32> {
    v.chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

pub(super) fn encode_items(items: &[u32]) -> Vec<u8> {
    items.iter().flat_map(|i| i.to_le_bytes()).collect()
}

/// A user record: its index, then its history.
pub(super) fn encode_user(idx: u32, h: &History) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + 8 * h.items.len() + 4 * h.excluded.len());
    v.extend(idx.to_be_bytes());
    v.extend((h.items.len() as u32).to_le_bytes());
    v.extend(encode_items(&h.items));
    v.extend(h.weights.iter().flat_map(|w| w.to_le_bytes()));
    v.extend(encode_items(&h.excluded));
    v
}

/// The index and history of a user record (`None` when it is not one: a damaged record).
pub(super) fn decode_user(v: &[u8]) -> Option<(u32, History)> {
    let idx = u32::from_be_bytes(<[u8; 4]>::try_from(v.get(..4)?).ok()?);
    let n = u32::from_le_bytes(<[u8; 4]>::try_from(v.get(4..8)?).ok()?) as usize;
    let weights_at = 8usize.checked_add(n.checked_mul(4)?)?;
    let excluded_at = weights_at.checked_add(n.checked_mul(4)?)?;
    let rest = v.get(excluded_at..)?;
    if rest.len() % 4 != 0 || weights_at > v.len() {
        return None;
    }
    let weights: Vec<f32> = v[weights_at..excluded_at]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    if weights.iter().any(|w| !(w.is_finite() && *w > 0.0)) {
        return None;
    }
    Some((
        idx,
        History {
            items: decode_items(&v[8..weights_at]),
            weights,
            excluded: decode_items(rest),
        },
    ))
}

/// A format-2 user record: its index, then its items.
pub(super) fn decode_user_v2(v: &[u8]) -> Option<(u32, Vec<u32>)> {
    let idx = u32::from_be_bytes(<[u8; 4]>::try_from(v.get(..4)?).ok()?);
    Some((idx, decode_items(&v[4..])))
}

/// What the store holds of one user: their items, oldest first, with the weight of each (the
/// largest of its events' since it last entered the history), and the items they do not want
/// (negative events), oldest first.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct History {
    pub items: Vec<u32>,
    pub weights: Vec<f32>,
    pub excluded: Vec<u32>,
}

impl History {
    /// A history of weight-1 items and no exclusions.
    pub fn binary(items: Vec<u32>) -> Self {
        Self {
            weights: vec![1.0; items.len()],
            items,
            excluded: Vec::new(),
        }
    }

    /// Nothing stored: no item, no exclusion.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty() && self.excluded.is_empty()
    }
}

/// A user's history by external ids (the changelog's and the export's form): items oldest
/// first, their weights (empty: 1 each), the excluded items oldest first. Empty (no item, no
/// exclusion): the user is forgotten.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct HistoryIds {
    pub items: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub weights: Vec<f32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub excluded: Vec<String>,
}

/// One line of `multivaed export` (JSON lines): a user's id and history. Written by the export,
/// read back by `multivaed produce` and `multivaed eval`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ExportedHistory {
    pub user_id: String,
    #[serde(flatten)]
    pub history: HistoryIds,
}

impl HistoryIds {
    /// Items of weight 1, no exclusions.
    pub fn items(items: Vec<String>) -> Self {
        Self {
            items,
            ..Self::default()
        }
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty() && self.excluded.is_empty()
    }
}
