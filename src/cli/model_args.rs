//! The model hyper-parameters as command-line flags, shared by `multivaed eval` and
//! `multivaed-bench model` (the bench binary includes this file by path: it is CLI, not library).

use anyhow::Result;
use clap::Args;
use multivaed::model::ModelConfig;

/// Model hyper-parameters, named as in vae_cf / RecBole.
#[derive(Debug, Args, Clone)]
pub struct ModelArgs {
    /// Hidden layer sizes, comma-separated (e.g. 600 or 600,600).
    #[arg(long, value_delimiter = ',', default_value = "600")]
    pub mlp_hidden_size: Vec<usize>,
    /// Size of z (the paper's 200; RecBole's 128 is really 64).
    #[arg(long, default_value_t = 200)]
    pub latent_dimension: usize,
    #[arg(long, default_value_t = 0.5)]
    pub dropout_prob: f64,
    #[arg(long, default_value_t = 0.2)]
    pub anneal_cap: f64,
    #[arg(long, default_value_t = 200_000)]
    pub total_anneal_steps: u64,
    #[arg(long, default_value_t = 1e-3)]
    pub learning_rate: f64,
    #[arg(long, default_value_t = 500)]
    pub batch_size: usize,
    /// The model's input: binary (the paper's) or weighted (with --data: each interaction
    /// weighs its rating).
    #[arg(long, value_enum, default_value = "binary")]
    pub input: multivaed::model::Input,
}

impl ModelArgs {
    pub fn config(&self) -> Result<ModelConfig> {
        let c = ModelConfig {
            mlp_hidden_size: self.mlp_hidden_size.clone(),
            latent_dimension: self.latent_dimension,
            dropout_prob: self.dropout_prob,
            anneal_cap: self.anneal_cap,
            total_anneal_steps: self.total_anneal_steps,
            learning_rate: self.learning_rate,
            batch_size: self.batch_size,
            input: self.input,
        };
        c.validate()
            .map_err(|e| anyhow::anyhow!("--{}", e.replace('_', "-")))?;
        Ok(c)
    }
}
