//! multivaed: a streaming Multi-VAE recommender (Liang et al., WWW 2018).
//!
//! Data flows one way, each stage a module that gets a context holding only what it uses:
//!
//! ```text
//! Kafka ─▶ ingest ─▶ store ─▶ train (own thread) ─▶ live ─▶ serve ─▶ Kafka
//!            │ (wire: the messages in and out)        ▲        │
//!            └────▶ activity (who waits, who is new) ─┴────────┘
//! ```
//!
//! - [`ingest`] consumes click events ([`wire`]), dead-letters bad ones, writes good ones to the
//!   [`store`] with their offsets, and reports each stored batch to [`activity`] and [`online`].
//! - [`train`] reads histories from the store when [`activity`] says enough is new, fine-tunes the
//!   [`model`], checkpoints it and publishes it to the [`live`] slot.
//! - [`serve`] takes waiting users from [`activity`], ranks them with the live model and publishes
//!   recommendations ([`wire`]); [`http`] answers pulls with the same ranking.
//! - A fleet (roles `serve` and `train`): [`shipping`] carries the trainer's versions to the
//!   serving replicas — files in an object store, announcements on a Kafka topic, the trainer
//!   elected and fenced through Kafka — and loads them into their [`live`] slots; [`fleet`] is
//!   the user state they share: a serving replica's partition life cycle (restore, claim, the
//!   changelog written with each batch) and the trainer's reader of the changelog.
//!
//! Below the stages, shared by them: [`shutdown`], [`health`] (and readiness), [`activity`],
//! [`items`] (which items may be recommended: written by ingest from the items topic, read by
//! every ranking),
//! [`online`] (the prequential hit rate), [`promotion`] (the canary slice, its evidence and the
//! sequential test that promotes or rolls it back), [`live`], [`metrics`], [`kafka`] (client settings),
//! [`config`], [`ownership`] (which users a serving replica owns, through [`partition`]).
//! [`daemon`] wires the stages together and supervises them; [`notify`] speaks
//! systemd's protocol. [`eval`] is the paper's offline protocol; [`demo`] the embedded demo. The test
//! harness and the benchmarks live outside the library, in the `kit/` workspace member.

mod activity;
pub mod config;
pub mod control;
pub mod daemon;
pub mod demo;
pub mod eval;
mod fault;
mod fleet;
mod health;
mod http;
mod ingest;
mod items;
mod kafka;
pub mod live;
mod members;
pub mod metrics;
pub mod model;
mod notify;
mod online;
mod ownership;
pub mod partition;
pub mod promotion;
mod retry;
pub mod serve;
pub mod shipping;
mod shutdown;
pub mod store;
pub mod topics;
mod train;
pub mod wire;
