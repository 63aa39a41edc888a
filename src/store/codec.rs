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
/// write per click); items are found through the in-memory catalogue.
pub(super) const CURRENT_FORMAT: u64 = 2;
/// Items per popularity record.
pub(super) const POPULARITY_BLOCK: usize = 256;

// Records, by first byte of the key:
//   'U' + user id   → user index (u32 BE), then the history, oldest first (u32 LE each)
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
pub(super) fn encode_user(idx: u32, items: &[u32]) -> Vec<u8> {
    let mut v = idx.to_be_bytes().to_vec();
    v.extend(encode_items(items));
    v
}

/// The index and history of a user record (`None` when it is not one).
pub(super) fn decode_user(v: &[u8]) -> Option<(u32, Vec<u32>)> {
    let idx = u32::from_be_bytes(<[u8; 4]>::try_from(v.get(..4)?).ok()?);
    Some((idx, decode_items(&v[4..])))
}
