//! The Multi-VAE of Liang et al. (WWW 2018) on candle: hyper-parameters, weights and inference
//! (`MultiVae`), training with lifelong KL annealing (`Trainer`), top-K, atomic checkpoints, the item table of a model's columns and the bundle a
//! fleet ships.

mod adam;
pub mod bundle;
mod checkpoint;
mod config;
mod data;
mod items;
pub(crate) mod kernels;
mod quant;
mod threads;
mod topk;
mod trainer;
mod vae;

pub use checkpoint::{CheckpointError, Checkpoints, Manifest};
pub use config::{number, Input, ModelConfig};
pub use data::Interactions;
pub use items::{fingerprint, ItemTable};
pub use quant::{
    int8_kernel, int8_supported, scoring, set_scoring, Kernel, Scoring, INT8_MIN_ITEMS,
};
pub use threads::set_threads;
pub use trainer::{FirstLayer, StepStats, Trainer};
pub use vae::MultiVae;

pub(crate) use topk::top_k_unseen;
pub(crate) use trainer::{splitmix, EpochStats};

#[cfg(test)]
mod tests;
