//! Which items may be recommended: what the items topic says of each item (unavailable,
//! available until a time, its category) and the operator's allow and deny lists. One record,
//! written by the items reader (`ingest::ItemsReader`) and read by every ranking (push and pull)
//! as the sorted store indices no answer may hold. Histories and training are not filtered: a
//! click on an item now gone still says something about the user.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use serde::Deserialize;

use crate::config::ItemsConfig;
use crate::store::Store;

/// What the items topic says of one item (each message replaces the item's previous one).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ItemState {
    /// Never recommended (until a later message says otherwise).
    pub unavailable: bool,
    /// Not recommended from this time on (ms since the epoch).
    pub until_ms: Option<u64>,
    pub category: Option<String>,
}

impl ItemState {
    fn visible_at(&self, now_ms: u64) -> bool {
        !self.unavailable && self.until_ms.is_none_or(|t| now_ms < t)
    }
}

/// A message of the items topic, as producers write it (unknown fields are ignored).
#[derive(Debug, Deserialize)]
struct ItemMessage {
    item: Option<String>,
    available: Option<bool>,
    available_until: Option<u64>,
    category: Option<String>,
}

/// Reads one message of the items topic: the item's new state (`None` for a tombstone: the
/// item is available again, with no category), or why it is refused.
pub fn parse_item(
    key: Option<&[u8]>,
    value: Option<&[u8]>,
) -> Result<(String, Option<ItemState>), String> {
    let key = key.ok_or("the message has no key (the item id)")?;
    let id = std::str::from_utf8(key).map_err(|_| "the key is not UTF-8")?;
    let id = crate::wire::checked_id(id.to_string(), "key").map_err(|e| e.to_string())?;
    let Some(value) = value else {
        return Ok((id, None));
    };
    let m: ItemMessage =
        serde_json::from_slice(value).map_err(|e| format!("not a valid item message: {e}"))?;
    if m.item.as_deref().is_some_and(|i| i != id) {
        return Err("its \"item\" is not its key".into());
    }
    Ok((
        id,
        Some(ItemState {
            unavailable: m.available == Some(false),
            until_ms: m.available_until,
            category: m.category,
        }),
    ))
}

/// The hidden store indices computed last, and what they depend on.
struct Hidden {
    generation: u64,
    catalogue: usize,
    /// The earliest `available_until` still ahead: the list changes then.
    next_expiry_ms: Option<u64>,
    indices: Arc<Vec<u32>>,
}

pub struct ItemRules {
    deny: HashSet<String>,
    allow: HashSet<String>,
    items: RwLock<(HashMap<String, ItemState>, u64)>,
    hidden: Mutex<Option<Hidden>>,
    /// The items topic was read to its end once (or there is none): rankings may start.
    loaded: AtomicBool,
    loaded_now: tokio::sync::Notify,
}

impl ItemRules {
    pub fn new(config: &ItemsConfig) -> Self {
        Self {
            deny: config.deny.iter().cloned().collect(),
            allow: config.allow.iter().cloned().collect(),
            items: RwLock::new((HashMap::new(), 0)),
            hidden: Mutex::new(None),
            loaded: AtomicBool::new(false),
            loaded_now: tokio::sync::Notify::new(),
        }
    }

    /// Every item may be recommended (no topic, no lists).
    #[cfg(test)]
    pub fn open() -> Self {
        let rules = Self::new(&ItemsConfig::default());
        rules.set_loaded();
        rules
    }

    /// What the items topic now says of `item` (`None`: nothing; it is available).
    pub fn set(&self, item: String, state: Option<ItemState>) {
        let mut g = self.items.write().expect("item rules poisoned by a panic");
        match state {
            Some(s) if s != ItemState::default() => {
                g.0.insert(item, s);
            }
            _ => {
                g.0.remove(&item);
            }
        }
        g.1 += 1;
    }

    /// The items topic was read to its end (or there is none).
    pub fn set_loaded(&self) {
        if !self.loaded.swap(true, Ordering::AcqRel) {
            self.loaded_now.notify_waiters();
        }
    }

    pub fn loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    /// Resolves once the items topic was read to its end.
    pub async fn wait_loaded(&self) {
        while !self.loaded() {
            let notified = self.loaded_now.notified();
            if self.loaded() {
                return;
            }
            notified.await;
        }
    }

    fn visible(&self, items: &HashMap<String, ItemState>, id: &str, now_ms: u64) -> bool {
        !self.deny.contains(id)
            && (self.allow.is_empty() || self.allow.contains(id))
            && items.get(id).is_none_or(|s| s.visible_at(now_ms))
    }

    /// The store indices no recommendation may hold now, ascending. Recomputed when a rule
    /// changes or expires; items the store gained since are checked alone.
    pub fn hidden(&self, store: &Store) -> Arc<Vec<u32>> {
        let now = crate::wire::now_ms();
        let items = self.items.read().expect("item rules poisoned by a panic");
        let catalogue = store.counts().items as usize;
        let mut cache = self.hidden.lock().expect("item rules poisoned by a panic");
        match cache.as_mut() {
            Some(h) if h.generation == items.1 && h.next_expiry_ms.is_none_or(|t| now < t) => {
                if h.catalogue < catalogue {
                    let mut more = (*h.indices).clone();
                    more.extend(self.scan(store, &items.0, h.catalogue..catalogue, now));
                    h.indices = Arc::new(more);
                    h.catalogue = catalogue;
                }
                h.indices.clone()
            }
            _ => {
                let indices = if self.allow.is_empty() {
                    self.named_by_rules(store, &items.0, now)
                } else {
                    self.scan(store, &items.0, 0..catalogue, now)
                };
                let next_expiry_ms = items
                    .0
                    .values()
                    .filter_map(|s| s.until_ms)
                    .filter(|&t| t > now)
                    .min();
                let indices = Arc::new(indices);
                *cache = Some(Hidden {
                    generation: items.1,
                    catalogue,
                    next_expiry_ms,
                    indices: indices.clone(),
                });
                indices
            }
        }
    }

    /// The hidden store indices of `range`, by checking each item.
    fn scan(
        &self,
        store: &Store,
        items: &HashMap<String, ItemState>,
        range: std::ops::Range<usize>,
        now_ms: u64,
    ) -> Vec<u32> {
        range
            .filter(|&i| {
                store
                    .item_id(i as u32)
                    .is_some_and(|id| !self.visible(items, &id, now_ms))
            })
            .map(|i| i as u32)
            .collect()
    }

    /// The hidden store indices when no allow list is set: the items a rule names.
    fn named_by_rules(
        &self,
        store: &Store,
        items: &HashMap<String, ItemState>,
        now_ms: u64,
    ) -> Vec<u32> {
        let named = self.deny.iter().chain(
            items
                .iter()
                .filter(|(_, s)| !s.visible_at(now_ms))
                .map(|(id, _)| id),
        );
        let mut out: Vec<u32> = named
            .filter_map(|id| store.item_index(id).ok().flatten())
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// The store indices a pull for `category` may not hold: the hidden ones and every item
    /// not of that category (ascending).
    pub fn hidden_outside(&self, store: &Store, category: &str) -> Vec<u32> {
        let now = crate::wire::now_ms();
        let items = self.items.read().expect("item rules poisoned by a panic");
        let n = store.counts().items as usize;
        (0..n as u32)
            .filter(|&i| {
                store.item_id(i).is_none_or(|id| {
                    !self.visible(&items.0, &id, now)
                        || items.0.get(&id).and_then(|s| s.category.as_deref()) != Some(category)
                })
            })
            .collect()
    }

    /// Items the topic or the lists make unavailable now (for the gauge): named ones only.
    pub fn unavailable(&self) -> usize {
        let now = crate::wire::now_ms();
        let items = self.items.read().expect("item rules poisoned by a panic");
        let named = items
            .0
            .iter()
            .filter(|(id, s)| !s.visible_at(now) && !self.deny.contains(*id));
        named.count() + self.deny.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Click, PartitionOffset};

    fn store_of(items: &[&str]) -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), 100).unwrap();
        let clicks: Vec<Click> = items
            .iter()
            .map(|i| Click {
                user: "u".into(),
                item: i.to_string(),
                timestamp_ms: None,
                weight: 1.0,
            })
            .collect();
        s.apply(
            &clicks,
            &[PartitionOffset {
                topic: "clicks".into(),
                partition: 0,
                next_offset: 1,
            }],
        )
        .unwrap();
        (dir, s)
    }

    fn ids(store: &Store, hidden: &[u32]) -> Vec<String> {
        hidden.iter().map(|&i| store.item_id(i).unwrap()).collect()
    }

    #[test]
    fn unavailable_expired_and_denied_items_are_hidden_until_said_otherwise() {
        let (_d, store) = store_of(&["a", "b", "c", "d"]);
        let rules = ItemRules::new(&ItemsConfig {
            deny: vec!["d".into(), "never-seen".into()],
            ..Default::default()
        });
        assert_eq!(ids(&store, &rules.hidden(&store)), ["d"]);
        let (id, state) =
            parse_item(Some(b"b"), Some(br#"{"item": "b", "available": false}"#)).unwrap();
        rules.set(id, state);
        let past = crate::wire::now_ms() - 1;
        let soon = crate::wire::now_ms() + 300;
        let (id, state) = parse_item(
            Some(b"a"),
            Some(format!(r#"{{"available_until": {past}}}"#).as_bytes()),
        )
        .unwrap();
        rules.set(id, state);
        let (id, state) = parse_item(
            Some(b"c"),
            Some(format!(r#"{{"available_until": {soon}}}"#).as_bytes()),
        )
        .unwrap();
        rules.set(id, state);
        assert_eq!(ids(&store, &rules.hidden(&store)), ["a", "b", "d"]);
        assert_eq!(rules.unavailable(), 4, "a, b and the two denied");
        // c expires on its own
        std::thread::sleep(std::time::Duration::from_millis(400));
        assert_eq!(ids(&store, &rules.hidden(&store)), ["a", "b", "c", "d"]);
        // a tombstone, or a message saying so, makes an item available again
        let (id, state) = parse_item(Some(b"b"), None).unwrap();
        rules.set(id, state);
        let (id, state) = parse_item(Some(b"a"), Some(br#"{"available": true}"#)).unwrap();
        rules.set(id, state);
        assert_eq!(ids(&store, &rules.hidden(&store)), ["c", "d"]);
    }

    #[test]
    fn an_allow_list_hides_every_other_item_new_ones_included() {
        let (_d, store) = store_of(&["a", "b", "c"]);
        let rules = ItemRules::new(&ItemsConfig {
            allow: vec!["a".into(), "z".into()],
            ..Default::default()
        });
        assert_eq!(ids(&store, &rules.hidden(&store)), ["b", "c"]);
        // items the store gains later are checked too
        store
            .apply(
                &[
                    Click {
                        user: "v".into(),
                        item: "y".into(),
                        timestamp_ms: None,
                        weight: 1.0,
                    },
                    Click {
                        user: "v".into(),
                        item: "z".into(),
                        timestamp_ms: None,
                        weight: 1.0,
                    },
                ],
                &[],
            )
            .unwrap();
        assert_eq!(ids(&store, &rules.hidden(&store)), ["b", "c", "y"]);
    }

    #[test]
    fn a_category_pull_hides_the_other_categories_and_bad_messages_are_refused() {
        let (_d, store) = store_of(&["a", "b", "c"]);
        let rules = ItemRules::open();
        for (key, value) in [
            ("a", r#"{"category": "shoes"}"#),
            ("b", r#"{"category": "hats"}"#),
            ("c", r#"{"category": "shoes", "available": false}"#),
        ] {
            let (id, state) = parse_item(Some(key.as_bytes()), Some(value.as_bytes())).unwrap();
            rules.set(id, state);
        }
        assert_eq!(
            ids(&store, &rules.hidden_outside(&store, "shoes")),
            ["b", "c"]
        );
        assert_eq!(
            ids(&store, &rules.hidden_outside(&store, "none")),
            ["a", "b", "c"]
        );
        for (key, value) in [
            (None, Some(&br#"{}"#[..])),
            (Some(&b""[..]), Some(&br#"{}"#[..])),
            (Some(&b"a"[..]), Some(&b"not json"[..])),
            (Some(&b"a"[..]), Some(&br#"{"item": "b"}"#[..])),
            (Some(&b"a"[..]), Some(&br#"{"available": "no"}"#[..])),
        ] {
            assert!(parse_item(key, value).is_err(), "{key:?} {value:?}");
        }
    }
}
