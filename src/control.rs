//! The fleet's control plane, checked (roles `serve` and `train`): every models- and
//! members-topic record is signed with the fleet's key (HMAC-SHA-256 over the topic's kind, the
//! record's key and its value, in the record's [`SIGNATURE_HEADER`]), so a writer without the key
//! can neither announce, roll back, claim the trainer's epoch nor redirect pulls; and every
//! epoch and version read from those records stays below [`MAX_SEQUENCE`], so `+ 1` never wraps.
//! Kafka ACLs keep strangers off the topics; the key makes what a stranger writes anyway inert.

use std::path::Path;

use anyhow::{bail, Context, Result};
use ring::hmac;

/// The header carrying a record's signature (hex).
pub const SIGNATURE_HEADER: &str = "multivaed-signature";

/// The largest epoch or version a record may carry: a fleet claiming an epoch a second for a
/// million years stays below it, and its successor never overflows.
pub const MAX_SEQUENCE: u64 = 1 << 48;

/// Shortest key accepted (bytes).
pub const MIN_KEY_BYTES: usize = 32;

/// Which control topic a record belongs to: part of what is signed, so a record of one is
/// never valid on the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topic {
    Models,
    Members,
}

impl Topic {
    pub fn name(self) -> &'static str {
        match self {
            Topic::Models => "models",
            Topic::Members => "members",
        }
    }
}

/// The fleet's key.
pub struct ControlKey {
    key: hmac::Key,
}

impl std::fmt::Debug for ControlKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ControlKey(<redacted>)")
    }
}

impl ControlKey {
    /// Reads the key file (`models.signing_key_file`): its bytes, trailing whitespace trimmed,
    /// at least [`MIN_KEY_BYTES`] of them.
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path)
            .with_context(|| format!("models.signing_key_file: cannot read {}", path.display()))?;
        let end = bytes
            .iter()
            .rposition(|b| !b.is_ascii_whitespace())
            .map_or(0, |i| i + 1);
        if end < MIN_KEY_BYTES {
            bail!(
                "models.signing_key_file: {} holds {end} bytes; the fleet's key needs at least {MIN_KEY_BYTES} (e.g. `openssl rand -hex 32`)",
                path.display()
            );
        }
        Ok(Self::new(&bytes[..end]))
    }

    pub fn new(secret: &[u8]) -> Self {
        Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
        }
    }

    /// The signature of a record (`value` `None`: a tombstone), hex.
    pub fn sign(&self, topic: Topic, key: &[u8], value: Option<&[u8]>) -> String {
        let tag = hmac::sign(&self.key, &signed_bytes(topic, key, value));
        tag.as_ref().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The record's headers: its signature under [`SIGNATURE_HEADER`].
    pub fn headers(
        &self,
        topic: Topic,
        key: &[u8],
        value: Option<&[u8]>,
    ) -> rdkafka::message::OwnedHeaders {
        let signature = self.sign(topic, key, value);
        rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header {
            key: SIGNATURE_HEADER,
            value: Some(signature.as_str()),
        })
    }

    /// Whether `signature` (the header's value, hex) is this key's for the record; checked in
    /// constant time.
    pub fn verify(
        &self,
        topic: Topic,
        key: &[u8],
        value: Option<&[u8]>,
        signature: Option<&[u8]>,
    ) -> bool {
        let Some(tag) = signature.and_then(unhex) else {
            return false;
        };
        hmac::verify(&self.key, &signed_bytes(topic, key, value), &tag).is_ok()
    }
}

/// What is signed: the topic's kind, the key's length and bytes, and whether a value follows
/// and its bytes — no two records share it.
fn signed_bytes(topic: Topic, key: &[u8], value: Option<&[u8]>) -> Vec<u8> {
    let mut out = Vec::with_capacity(32 + key.len() + value.map_or(0, <[u8]>::len));
    out.extend_from_slice(b"multivaed-control-v1\0");
    out.extend_from_slice(topic.name().as_bytes());
    out.push(0);
    out.extend_from_slice(&(key.len() as u64).to_be_bytes());
    out.extend_from_slice(key);
    match value {
        None => out.push(0),
        Some(v) => {
            out.push(1);
            out.extend_from_slice(v);
        }
    }
    out
}

fn unhex(s: &[u8]) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || s.len() > 128 {
        return None;
    }
    s.chunks(2)
        .map(|c| {
            let hi = (c[0] as char).to_digit(16)?;
            let lo = (c[1] as char).to_digit(16)?;
            Some((hi * 16 + lo) as u8)
        })
        .collect()
}

/// Whether an epoch or version read from a control record is within bounds.
pub fn in_bounds(n: u64) -> bool {
    n <= MAX_SEQUENCE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_keys_holder_signs_and_nothing_signed_moves_between_records() {
        let k = ControlKey::new(&[7u8; 32]);
        let other = ControlKey::new(&[8u8; 32]);
        let s = k.sign(Topic::Models, b"claim-1", Some(b"{}"));
        let ok =
            |t, key: &[u8], v: Option<&[u8]>, sig: &str| k.verify(t, key, v, Some(sig.as_bytes()));
        assert!(ok(Topic::Models, b"claim-1", Some(b"{}"), &s));
        assert!(!other.verify(Topic::Models, b"claim-1", Some(b"{}"), Some(s.as_bytes())));
        assert!(
            !ok(Topic::Members, b"claim-1", Some(b"{}"), &s),
            "another topic"
        );
        assert!(
            !ok(Topic::Models, b"claim-2", Some(b"{}"), &s),
            "another key"
        );
        assert!(
            !ok(Topic::Models, b"claim-1", Some(b"{ }"), &s),
            "another value"
        );
        assert!(!ok(Topic::Models, b"claim-1", None, &s), "a tombstone");
        assert!(
            !k.verify(Topic::Models, b"claim-1", Some(b"{}"), None),
            "unsigned"
        );
        assert!(!ok(Topic::Models, b"claim-1", Some(b"{}"), "zz"), "not hex");
        let t = k.sign(Topic::Models, b"model-1", None);
        assert!(ok(Topic::Models, b"model-1", None, &t));
        // the key's length is signed: moving a byte from key to value changes the bytes
        assert_ne!(
            signed_bytes(Topic::Models, b"ab", Some(b"c")),
            signed_bytes(Topic::Models, b"a", Some(b"bc"))
        );
    }

    #[test]
    fn a_short_key_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("key");
        std::fs::write(&p, "too short\n").unwrap();
        assert!(format!("{:#}", ControlKey::read(&p).unwrap_err()).contains("at least 32"));
        std::fs::write(&p, format!("{}\n", "a".repeat(64))).unwrap();
        assert!(ControlKey::read(&p).is_ok());
        assert!(in_bounds(MAX_SEQUENCE) && !in_bounds(u64::MAX));
    }
}
