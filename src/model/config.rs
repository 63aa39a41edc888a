//! `ModelConfig`: the Multi-VAE's hyper-parameters, named as users know them from vae_cf and RecBole.

use serde::{Deserialize, Serialize};

/// Hyper-parameters of a Multi-VAE. Defaults are the paper's (Liang et al., WWW 2018).
///
/// `latent_dimension` is the true size of z. RecBole's `latent_dimension = 128` splits its encoder
/// output into μ and log σ², so its latent is really 64; here the encoder outputs 2·d values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// Hidden layer sizes of the encoder, input side first; the decoder mirrors them.
    pub mlp_hidden_size: Vec<usize>,
    /// Size of the latent code z (μ and log σ² each have this many values).
    pub latent_dimension: usize,
    /// Dropout probability on the normalised input during training.
    #[serde(deserialize_with = "number")]
    pub dropout_prob: f64,
    /// Largest KL weight β.
    #[serde(deserialize_with = "number")]
    pub anneal_cap: f64,
    /// Mini-batches over which β grows linearly from 0 to `anneal_cap`.
    pub total_anneal_steps: u64,
    /// Adam learning rate.
    #[serde(deserialize_with = "number")]
    pub learning_rate: f64,
    /// Users per mini-batch.
    pub batch_size: usize,
    /// The model's input: `binary` (the paper's: 1 per item a user has) or `weighted` (each
    /// item's weight from `events.types`, in the input and the multinomial likelihood).
    pub input: Input,
}

/// What a user's row holds for each of their items.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Input {
    #[default]
    Binary,
    Weighted,
}

/// A float given as a number or as a string ("1e-4": environment variables arrive as text and
/// figment reads only plain decimals as numbers).
pub fn number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Num {
        F(f64),
        S(String),
    }
    match Num::deserialize(d)? {
        Num::F(f) => Ok(f),
        Num::S(s) => s
            .trim()
            .parse()
            .map_err(|_| serde::de::Error::custom(format!("expected a number, got {s:?}"))),
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            mlp_hidden_size: vec![600],
            latent_dimension: 200,
            dropout_prob: 0.5,
            anneal_cap: 0.2,
            total_anneal_steps: 200_000,
            learning_rate: 1e-3,
            batch_size: 500,
            input: Input::Binary,
        }
    }
}

impl ModelConfig {
    /// Checks every value, naming the offending key.
    pub fn validate(&self) -> Result<(), String> {
        if self.mlp_hidden_size.contains(&0) {
            return Err("mlp_hidden_size: every layer needs at least one unit".into());
        }
        if self.latent_dimension == 0 {
            return Err("latent_dimension: must be at least 1".into());
        }
        if !(0.0..1.0).contains(&self.dropout_prob) {
            return Err(format!(
                "dropout_prob: must be in [0, 1), got {}",
                self.dropout_prob
            ));
        }
        if !(self.anneal_cap >= 0.0 && self.anneal_cap.is_finite()) {
            return Err(format!(
                "anneal_cap: must be a finite number >= 0, got {}",
                self.anneal_cap
            ));
        }
        if !(self.learning_rate > 0.0 && self.learning_rate.is_finite()) {
            return Err(format!(
                "learning_rate: must be a finite number > 0, got {}",
                self.learning_rate
            ));
        }
        if self.batch_size == 0 {
            return Err("batch_size: must be at least 1".into());
        }
        Ok(())
    }

    /// β after `update_count` mini-batches: `min(anneal_cap, update_count / total_anneal_steps)`.
    pub fn beta(&self, update_count: u64) -> f64 {
        if self.total_anneal_steps == 0 {
            return self.anneal_cap;
        }
        self.anneal_cap
            .min(update_count as f64 / self.total_anneal_steps as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn beta_schedule() {
        let c = ModelConfig::default();
        assert_eq!(c.beta(0), 0.0);
        assert!((c.beta(20_000) - 0.1).abs() < 1e-12);
        assert_eq!(c.beta(40_000), 0.2);
        assert_eq!(c.beta(10_000_000), 0.2);
        let c = ModelConfig {
            total_anneal_steps: 0,
            ..c
        };
        assert_eq!(c.beta(0), 0.2);
    }

    #[test]
    fn validation_names_the_key() {
        let c = ModelConfig {
            dropout_prob: 1.5,
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().starts_with("dropout_prob"));
        assert!(ModelConfig::default().validate().is_ok());
    }
}
