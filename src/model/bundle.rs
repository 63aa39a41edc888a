//! A model version as a fleet ships it: three files, each with its size and SHA-256 — the
//! weights (all a serving replica downloads), the optimiser's moments (what a trainer taking
//! over needs to continue exactly) and the item table (the id of each column, with popularity) —
//! and the counters that make training continue where it stopped (the lifelong update_count
//! that drives β, Adam's step, the epoch count that drives shuffling).

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::checkpoint::{adam_from, host_tensors, serialize};
use super::{ItemTable, ModelConfig, MultiVae, Trainer};

pub const MODEL_FILE: &str = "model.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const ITEMS_FILE: &str = "items.tsv";

/// One file of a bundle: its name, size and SHA-256 (hex).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    pub name: String,
    pub bytes: u64,
    pub sha256: String,
}

impl FileDigest {
    /// The digest of `bytes` stored as `name`.
    pub fn of(name: &str, bytes: &[u8]) -> Self {
        Self {
            name: name.to_string(),
            bytes: bytes.len() as u64,
            sha256: sha256_hex(bytes),
        }
    }

    /// Whether `bytes` are this file: the size first (a truncated download), then the digest.
    pub fn verify(&self, bytes: &[u8]) -> Result<(), String> {
        self.matches(bytes.len() as u64, &sha256_hex(bytes))
    }

    /// Whether a file of `len` bytes and SHA-256 `got` (hex) is this one.
    pub fn matches(&self, len: u64, got: &str) -> Result<(), String> {
        if len != self.bytes {
            return Err(format!(
                "{}: {len} bytes, the announcement says {} (truncated?)",
                self.name, self.bytes
            ));
        }
        if got != self.sha256 {
            return Err(format!(
                "{}: sha256 {got}, the announcement says {}",
                self.name, self.sha256
            ));
        }
        Ok(())
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The counters a trainer continues from.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TrainingState {
    /// Mini-batches over the model's life (drives β).
    pub update_count: u64,
    pub adam_step: u64,
    pub epochs_done: u64,
    pub seed: u64,
    /// β of the next update.
    pub beta: f64,
}

impl TrainingState {
    pub fn of(trainer: &Trainer) -> Self {
        Self {
            update_count: trainer.update_count(),
            adam_step: trainer.adam().steps(),
            epochs_done: trainer.epochs_done(),
            seed: trainer.seed(),
            beta: trainer.beta(),
        }
    }
}

/// A bundle's three files, encoded.
pub struct Encoded {
    pub model: Vec<u8>,
    pub optimizer: Vec<u8>,
    pub items: Vec<u8>,
}

impl Encoded {
    /// The files as (name, bytes), in upload order.
    pub fn files(&self) -> [(&'static str, &[u8]); 3] {
        [
            (MODEL_FILE, &self.model),
            (OPTIMIZER_FILE, &self.optimizer),
            (ITEMS_FILE, &self.items),
        ]
    }
}

/// Encodes a trainer and its item table (one entry per column).
pub fn encode(trainer: &Trainer, items: &ItemTable) -> Result<Encoded, String> {
    if items.len() != trainer.model().n_items() {
        return Err(format!(
            "{} items for a model of {} columns",
            items.len(),
            trainer.model().n_items()
        ));
    }
    let all = host_tensors(trainer, true).map_err(|e| e.to_string())?;
    let n_weights = trainer.model().named_tensors().len();
    let (weights, moments) = all.split_at(n_weights);
    Ok(Encoded {
        model: serialize(weights)?,
        optimizer: serialize(moments)?,
        items: items.encode(),
    })
}

fn tensors(bytes: &[u8], what: &str) -> Result<HashMap<String, Tensor>, String> {
    candle_core::safetensors::load_buffer(bytes, &Device::Cpu)
        .map_err(|e| format!("{what}: unreadable safetensors: {e}"))
}

/// The weights of a bundle, for scoring (host memory).
pub fn decode_model(
    config: &ModelConfig,
    n_items: usize,
    model: &[u8],
) -> Result<MultiVae, String> {
    let t = tensors(model, MODEL_FILE)?;
    MultiVae::from_named(config, n_items, |n| t.get(n).cloned())
}

/// A trainer from a bundle's weights and moments, continuing from `state`, on `device`.
pub fn decode_trainer(
    config: &ModelConfig,
    n_items: usize,
    state: &TrainingState,
    model: &[u8],
    optimizer: &[u8],
    device: &Device,
) -> Result<Trainer, String> {
    let weights = decode_model(config, n_items, model)?;
    let mut moments = tensors(optimizer, OPTIMIZER_FILE)?;
    let adam = adam_from(
        &mut moments,
        &weights,
        config.learning_rate,
        state.adam_step,
    )?;
    let weights = weights.to_device(device).map_err(|e| e.to_string())?;
    let adam = adam.to_device(device).map_err(|e| e.to_string())?;
    Trainer::from_parts(
        weights,
        Some(adam),
        state.update_count,
        state.epochs_done,
        state.seed,
    )
    .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bundle_round_trips_and_a_damaged_file_is_named() {
        let cfg = ModelConfig {
            mlp_hidden_size: vec![8],
            latent_dimension: 4,
            ..ModelConfig::default()
        };
        let mut t = Trainer::new(&cfg, 5, 3, &Device::Cpu).unwrap();
        let rows =
            super::super::Interactions::from_rows(vec![vec![0, 1], vec![2, 3, 4]], 5).unwrap();
        t.train_epoch(&rows, |_| {}).unwrap();
        let items = ItemTable::from_ids(["a", "b", "c", "d", "e"]);
        let e = encode(&t, &items).unwrap();
        let d = FileDigest::of(MODEL_FILE, &e.model);
        d.verify(&e.model).unwrap();
        assert!(d
            .verify(&e.model[..e.model.len() - 1])
            .unwrap_err()
            .contains("truncated"));
        let mut flipped = e.model.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert!(d.verify(&flipped).unwrap_err().contains("sha256"));
        let state = TrainingState::of(&t);
        let back = decode_trainer(&cfg, 5, &state, &e.model, &e.optimizer, &Device::Cpu).unwrap();
        assert_eq!(back.update_count(), t.update_count());
        let (a, b) = (
            t.model()
                .scores(&[&[0, 1]])
                .unwrap()
                .to_vec2::<f32>()
                .unwrap(),
            back.model()
                .scores(&[&[0, 1]])
                .unwrap()
                .to_vec2::<f32>()
                .unwrap(),
        );
        assert_eq!(a, b);
        assert_eq!(ItemTable::decode(&e.items).unwrap(), items);
    }
}
