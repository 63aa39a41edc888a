//! multivaed: a streaming Multi-VAE recommender (Liang et al., WWW 2018).
//!
//! Data flows one way: Kafka → `ingest` → `store` → `train` → model registry → `serve` → Kafka.
//! The learning core is [`model`]; [`eval`] is the paper's offline evaluation protocol.

pub mod eval;
pub mod model;
