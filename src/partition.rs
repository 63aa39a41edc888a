//! Which partition a user's key lands on: the same function as the producers' client, so the
//! daemon knows which replica owns a user (clicks of a user all arrive on one partition, and
//! the pull API finds that partition's owner). librdkafka's default `consistent_random` is
//! CRC-32 of the key; the Java client's default is murmur2 (`murmur2_random` in librdkafka).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Partitioner {
    /// librdkafka's default: CRC-32 of the key, modulo the partition count.
    #[default]
    ConsistentRandom,
    /// The Java client's default: murmur2 of the key, made positive, modulo the count.
    Murmur2Random,
}

impl Partitioner {
    /// The librdkafka `partitioner` property value.
    pub fn librdkafka_name(self) -> &'static str {
        match self {
            Partitioner::ConsistentRandom => "consistent_random",
            Partitioner::Murmur2Random => "murmur2_random",
        }
    }

    /// The partition of a (non-empty) key among `partitions` (at least 1).
    pub fn partition(self, key: &[u8], partitions: i32) -> i32 {
        let n = partitions.max(1) as u32;
        let h = match self {
            Partitioner::ConsistentRandom => crc32fast::hash(key),
            Partitioner::Murmur2Random => murmur2(key) & 0x7fff_ffff,
        };
        (h % n) as i32
    }
}

/// Kafka's murmur2 (the Java client's `Utils.murmur2`).
fn murmur2(data: &[u8]) -> u32 {
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h: u32 = 0x9747_b28c ^ data.len() as u32;
    let chunks = data.chunks_exact(4);
    let tail = chunks.remainder();
    for c in chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M) ^ k;
    }
    if !tail.is_empty() {
        for (i, &b) in tail.iter().enumerate().rev() {
            h ^= u32::from(b) << (8 * i);
        }
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^ (h >> 15)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_matches_the_java_client() {
        // values of org.apache.kafka.common.utils.Utils.murmur2 (its unit test's vectors)
        for (key, want) in [
            ("21", -973_932_308_i32),
            ("foobar", -790_332_482),
            ("a-little-bit-long-string", -985_981_536),
            ("a-little-bit-longer-string", -1_486_304_829),
            (
                "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
        ] {
            assert_eq!(murmur2(key.as_bytes()) as i32, want, "{key}");
        }
    }

    #[test]
    fn crc32_matches_librdkafka_and_keys_spread_over_every_partition() {
        // librdkafka's consistent_random is CRC-32 (zlib's) of the key modulo the count
        for (key, crc) in [
            ("user-0", 153_187_970u32),
            ("user-1", 2_116_437_524),
            ("alice", 663_665_735),
        ] {
            let want = (crc % 6) as i32;
            assert_eq!(
                Partitioner::ConsistentRandom.partition(key.as_bytes(), 6),
                want,
                "{key}"
            );
        }
        for p in [Partitioner::ConsistentRandom, Partitioner::Murmur2Random] {
            let mut counts = [0usize; 6];
            for i in 0..6000 {
                counts[p.partition(format!("user-{i}").as_bytes(), 6) as usize] += 1;
            }
            // each partition gets its share (1,000), give or take a quarter
            assert!(
                counts.iter().all(|&c| (750..1250).contains(&c)),
                "{p:?}: {counts:?}"
            );
        }
    }
}
