//! The Multi-VAE of Liang et al. (WWW 2018) on candle: hyper-parameters, weights and inference
//! (`MultiVae`), training with lifelong KL annealing (`Trainer`), top-K, and atomic checkpoints.

mod adam;
mod checkpoint;
mod config;
mod data;
pub mod kernels;
mod topk;
mod trainer;
mod vae;

pub use adam::Adam;
pub use checkpoint::{
    CheckpointError, Checkpoints, Manifest, CHECKPOINT_FORMAT, CHECKPOINT_FORMAT_VERSION,
};
pub use config::{number, ModelConfig};
pub use data::Interactions;
pub use topk::top_k_unseen;
pub use trainer::{splitmix, EpochStats, FirstLayer, StepStats, Trainer};
pub use vae::MultiVae;

#[cfg(test)]
mod tests;
