//! multivaed: a streaming Multi-VAE recommender (Liang et al., WWW 2018).
//!
//! Data flows one way: Kafka → [`ingest`] → [`store`] → [`train`] → [`registry`] → [`serve`] →
//! Kafka, with [`http`] and [`metrics`] as the outside surface. The learning core is [`model`];
//! [`eval`] is the paper's offline evaluation protocol.

pub mod bench;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod demo;
pub mod eval;
pub mod fault;
pub mod http;
pub mod ingest;
pub mod metrics;
pub mod model;
pub mod notify;
pub mod registry;
pub mod serve;
pub mod store;
pub mod train;
