//! `Trainer`: a model with its optimiser and lifelong counters. One step is the paper's update:
//! sparse first layer, reparameterised z, multinomial likelihood, β-weighted KL, hand-written
//! backward pass, Adam. β = min(anneal_cap, update_count / total_anneal_steps), where
//! update_count counts every mini-batch the model has ever seen (it is saved in checkpoints).
//! Randomness (shuffling, dropout, ε) is a pure function of (seed, counters), so training that
//! is saved, loaded and continued equals training straight through.

use candle_core::{Device, Result, Tensor};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;

use super::adam::Adam;
use super::kernels::{
    bag_backward, bag_dense, bag_forward, col_sum, softmax_nll, tanh, tanh_backward, Bag,
};
use super::{Interactions, ModelConfig, MultiVae};

/// Figures of one mini-batch update.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepStats {
    /// Negative ELBO: `nll + beta * kl`.
    pub loss: f64,
    /// Multinomial negative log-likelihood, mean over the batch.
    pub nll: f64,
    /// KL(q(z|x) ‖ N(0, I)), mean over the batch.
    pub kl: f64,
    /// The KL weight used for this step.
    pub beta: f64,
}

/// Figures of one pass over the training users.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct EpochStats {
    pub loss: f64,
    pub nll: f64,
    pub kl: f64,
    /// β of the epoch's last step.
    pub beta: f64,
    pub steps: u64,
}

/// A model being trained, with its Adam state and lifelong counters.
#[derive(Debug, Clone)]
pub struct Trainer {
    pub(crate) model: MultiVae,
    pub(crate) adam: Adam,
    pub(crate) update_count: u64,
    pub(crate) epochs_done: u64,
    pub(crate) seed: u64,
    pub(crate) first_layer: FirstLayer,
}

/// How the first layer is computed. `Sparse` (the default) gathers the rows of W₁ of the
/// clicked items; `Dense` multiplies the I-wide input, as PyTorch ports do: it exists as the
/// reference the sparse path is measured against.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum FirstLayer {
    #[default]
    Sparse,
    Dense,
}

/// Independent random streams derived from the seed.
#[derive(Clone, Copy)]
enum Stream {
    Init = 1,
    Shuffle = 2,
    Step = 3,
    Grow = 4,
}

/// A 64-bit mixer (splitmix64's finaliser): seeds and hash-based sampling.
pub(crate) fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn rng_for(seed: u64, stream: Stream, counter: u64) -> rand::rngs::StdRng {
    let s = splitmix(splitmix(seed ^ ((stream as u64) << 56)) ^ counter);
    rand::rngs::StdRng::seed_from_u64(s)
}

/// What the forward pass keeps for the backward pass.
struct Forward {
    bag: Bag,
    /// The dense input x̃ ([B × items]) when the first layer is dense.
    dense_input: Option<Tensor>,
    /// Input of each encoder layer after the first (tanh outputs).
    enc_inputs: Vec<Tensor>,
    mu: Tensor,
    logvar: Tensor,
    eps: Tensor,
    std: Tensor,
    /// Input of each decoder layer (z, then tanh outputs).
    dec_inputs: Vec<Tensor>,
    /// Output-layer matmul, bias not yet added.
    logits: Tensor,
}

impl Trainer {
    /// A freshly initialised model for `n_items` on `device`.
    pub fn new(config: &ModelConfig, n_items: usize, seed: u64, device: &Device) -> Result<Self> {
        let mut rng = rng_for(seed, Stream::Init, 0);
        let model = MultiVae::new(config, n_items, &mut rng, device)?;
        Self::from_parts(model, None, 0, 0, seed)
    }

    /// Reassembles a trainer (as loaded from a checkpoint). `adam` None starts fresh moments.
    pub(crate) fn from_parts(
        mut model: MultiVae,
        adam: Option<Adam>,
        update_count: u64,
        epochs_done: u64,
        seed: u64,
    ) -> Result<Self> {
        let adam = match adam {
            Some(a) => a,
            None => {
                let lr = model.config().learning_rate;
                let params = model.params_mut();
                let refs: Vec<&Tensor> = params.iter().map(|p| &**p).collect();
                Adam::new(&refs, lr)?
            }
        };
        Ok(Self {
            model,
            adam,
            update_count,
            epochs_done,
            seed,
            first_layer: FirstLayer::Sparse,
        })
    }

    /// Chooses the first layer's computation (see [`FirstLayer`]); the results are equal.
    pub fn set_first_layer(&mut self, first_layer: FirstLayer) {
        self.first_layer = first_layer;
    }

    /// An independent copy: its weights and Adam moments are copied (the parameters change in
    /// place as they train), so training one never moves the other.
    pub(crate) fn snapshot(&self) -> Result<Self> {
        let copy_all =
            |ts: &[Tensor]| -> Result<Vec<Tensor>> { ts.iter().map(|t| t.copy()).collect() };
        let mut t = self.clone();
        t.model = self.model.deep_copy()?;
        t.adam.m = copy_all(&self.adam.m)?;
        t.adam.v = copy_all(&self.adam.v)?;
        Ok(t)
    }

    /// The model being trained (its weights change in place: `deep_copy` it to publish).
    pub fn model(&self) -> &MultiVae {
        &self.model
    }

    /// The optimiser state.
    pub(crate) fn adam(&self) -> &Adam {
        &self.adam
    }

    /// Mini-batches seen over the model's whole life.
    pub fn update_count(&self) -> u64 {
        self.update_count
    }

    /// Epochs run over the model's whole life.
    pub(crate) fn epochs_done(&self) -> u64 {
        self.epochs_done
    }

    /// The seed of every random stream.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The KL weight of the next step.
    pub fn beta(&self) -> f64 {
        self.model.config().beta(self.update_count)
    }

    /// Changes the learning rate of the following updates.
    pub(crate) fn set_learning_rate(&mut self, lr: f64) {
        self.adam.learning_rate = lr;
    }

    /// Widens the catalogue (model and Adam moments); see [`MultiVae::grow`].
    pub(crate) fn grow(&mut self, new_n_items: usize) -> Result<()> {
        let old = self.model.n_items();
        if new_n_items <= old {
            return Ok(());
        }
        let mut rng = rng_for(self.seed, Stream::Grow, new_n_items as u64);
        self.model.grow(new_n_items, &mut rng)?;
        let n_params = self.adam.m.len();
        self.adam
            .grow(0, n_params - 2, n_params - 1, new_n_items - old)
    }

    /// One pass over the users of `data` (empty rows skipped) in a shuffled order, in
    /// mini-batches of `batch_size`. `on_step` sees each step's figures.
    pub(crate) fn train_epoch(
        &mut self,
        data: &Interactions,
        mut on_step: impl FnMut(&StepStats),
    ) -> Result<EpochStats> {
        let stats = self.train_epoch_while(data, |s| {
            on_step(s);
            true
        })?;
        Ok(stats.expect("never stopped early"))
    }

    /// As [`Trainer::train_epoch`], but stops after a step for which `keep_going` returns false:
    /// then it returns `None` and the trainer is mid-epoch (callers discard it).
    pub(crate) fn train_epoch_while(
        &mut self,
        data: &Interactions,
        mut keep_going: impl FnMut(&StepStats) -> bool,
    ) -> Result<Option<EpochStats>> {
        if data.n_items() > self.model.n_items() {
            candle_core::bail!(
                "training data has {} items, the model {}: grow the model first",
                data.n_items(),
                self.model.n_items()
            );
        }
        let mut users: Vec<usize> = (0..data.n_users())
            .filter(|&u| !data.row(u).is_empty())
            .collect();
        users.shuffle(&mut rng_for(self.seed, Stream::Shuffle, self.epochs_done));
        let mut total = EpochStats::default();
        let weighted = self.model.config().input == super::Input::Weighted;
        for batch in users.chunks(self.model.config().batch_size) {
            let rows: Vec<&[u32]> = batch.iter().map(|&u| data.row(u)).collect();
            let weights: Option<Vec<&[f32]>> = weighted
                .then(|| batch.iter().map(|&u| data.weights(u)).collect())
                .flatten();
            let s = self.train_step_weighted(&rows, weights.as_deref())?;
            total.loss += s.loss;
            total.nll += s.nll;
            total.kl += s.kl;
            total.beta = s.beta;
            total.steps += 1;
            if !keep_going(&s) {
                return Ok(None);
            }
        }
        if total.steps > 0 {
            let n = total.steps as f64;
            total.loss /= n;
            total.nll /= n;
            total.kl /= n;
        }
        self.epochs_done += 1;
        Ok(Some(total))
    }

    /// One Adam update on the users `rows` (each a non-empty, sorted item list).
    pub fn train_step(&mut self, rows: &[&[u32]]) -> Result<StepStats> {
        self.train_step_weighted(rows, None)
    }

    /// As [`Trainer::train_step`], with each item's weight (`None`: binary rows).
    pub fn train_step_weighted(
        &mut self,
        rows: &[&[u32]],
        weights: Option<&[&[f32]]>,
    ) -> Result<StepStats> {
        let beta = self.beta();
        let mut rng = rng_for(self.seed, Stream::Step, self.update_count);
        let bag = dropout_bag(rows, weights, self.model.config().dropout_prob, &mut rng);
        let eps: Vec<f32> = (0..rows.len() * self.model.config().latent_dimension)
            .map(|_| rng.sample::<f32, _>(StandardNormal))
            .collect();
        let (stats, grads) = self.loss_and_grads(rows, weights, bag, eps, beta)?;
        let mut params = self.model.params_mut();
        self.adam.update(&mut params, &grads)?;
        self.update_count += 1;
        Ok(stats)
    }

    fn forward(&self, bag: Bag, eps: Vec<f32>) -> Result<Forward> {
        let m = &self.model;
        let dev = m.device();
        let d = m.config().latent_dimension;
        let b = bag.len();
        let (mut h, dense_input) = match self.first_layer {
            FirstLayer::Sparse => (
                bag_forward(&m.encoder[0].weight, &m.encoder[0].bias, &bag)?,
                None,
            ),
            FirstLayer::Dense => {
                let x = bag_dense(&bag, m.n_items(), dev)?;
                let h = x
                    .matmul(&m.encoder[0].weight)?
                    .broadcast_add(&m.encoder[0].bias)?;
                (h, Some(x))
            }
        };
        let mut enc_inputs = Vec::new();
        for l in &m.encoder[1..] {
            let a = tanh(&h)?;
            h = a.matmul(&l.weight)?.broadcast_add(&l.bias)?;
            enc_inputs.push(a);
        }
        let mu = h.narrow(1, 0, d)?;
        let logvar = h.narrow(1, d, d)?;
        let eps = Tensor::from_vec(eps, (b, d), dev)?;
        let std = (&logvar * 0.5)?.exp()?;
        let z = (&mu + eps.mul(&std)?)?;
        let mut dec_inputs = vec![z];
        let last = m.decoder.len() - 1;
        for l in &m.decoder[..last] {
            let x = dec_inputs.last().expect("z is always present");
            let a = tanh(&x.matmul(&l.weight)?.broadcast_add(&l.bias)?)?;
            dec_inputs.push(a);
        }
        let x = dec_inputs.last().expect("z is always present");
        let logits = x.matmul(&m.decoder[last].weight)?;
        Ok(Forward {
            bag,
            dense_input,
            enc_inputs,
            mu,
            logvar,
            eps,
            std,
            dec_inputs,
            logits,
        })
    }

    /// Loss figures and the gradient of `nll + beta·kl` for every parameter (in
    /// `MultiVae::named_tensors` order), for a given dropout bag and ε.
    pub(crate) fn loss_and_grads(
        &self,
        rows: &[&[u32]],
        weights: Option<&[&[f32]]>,
        bag: Bag,
        eps: Vec<f32>,
        beta: f64,
    ) -> Result<(StepStats, Vec<Tensor>)> {
        let m = &self.model;
        let n_items = m.n_items();
        let b = rows.len();
        let f = self.forward(bag, eps)?;
        let inv_b = 1.0 / b as f64;

        // KL(q ‖ N(0,I)) per user: ½ Σ (−log σ² + σ² + μ² − 1)
        let var = f.logvar.exp()?;
        let kl_sum = ((&var - &f.logvar)? + f.mu.sqr()?)?
            .affine(0.5, -0.5)?
            .sum_all()?
            .to_scalar::<f32>()? as f64;
        let kl = kl_sum * inv_b;

        let last = m.decoder.len() - 1;
        let (dlogits, nll_sum) = softmax_nll(f.logits, &m.decoder[last].bias, rows, weights)?;
        let nll = nll_sum * inv_b;

        let mut dec_grads: Vec<(Tensor, Tensor)> = Vec::with_capacity(m.decoder.len());
        let mut dh = dlogits;
        let mut dz = None;
        for k in (0..m.decoder.len()).rev() {
            let input = &f.dec_inputs[k];
            let gw = input.t()?.matmul(&dh)?;
            let gb = col_sum(&dh)?;
            let dinput = dh.matmul(&m.decoder[k].weight.t()?)?;
            dec_grads.push((gw, gb));
            if k > 0 {
                dh = tanh_backward(&dinput, input)?;
            } else {
                dz = Some(dinput);
            }
        }
        dec_grads.reverse();
        let dz = dz.expect("the decoder has at least one layer");

        // z = μ + ε·σ, σ = exp(½ log σ²); plus β·∂KL/∂(μ, log σ²) of the batch mean
        let dmu = (&dz + (&f.mu * (beta * inv_b))?)?;
        let dlogvar = ((dz.mul(&f.eps)?.mul(&f.std)? * 0.5)?
            + (var.affine(0.5 * beta * inv_b, -0.5 * beta * inv_b))?)?;
        let mut dh = Tensor::cat(&[&dmu, &dlogvar], 1)?;

        let mut enc_grads: Vec<(Tensor, Tensor)> = Vec::with_capacity(m.encoder.len());
        for k in (1..m.encoder.len()).rev() {
            let input = &f.enc_inputs[k - 1];
            let gw = input.t()?.matmul(&dh)?;
            let gb = col_sum(&dh)?;
            let dinput = dh.matmul(&m.encoder[k].weight.t()?)?;
            enc_grads.push((gw, gb));
            dh = tanh_backward(&dinput, input)?;
        }
        let gw = match &f.dense_input {
            None => bag_backward(&dh, &f.bag, n_items)?,
            Some(x) => x.t()?.matmul(&dh)?,
        };
        let gb = col_sum(&dh)?;
        enc_grads.push((gw, gb));
        enc_grads.reverse();

        let grads = enc_grads
            .into_iter()
            .chain(dec_grads)
            .flat_map(|(w, b)| [w, b])
            .collect();
        let stats = StepStats {
            loss: nll + beta * kl,
            nll,
            kl,
            beta,
        };
        Ok((stats, grads))
    }
}

/// The training input of a batch: each item of a user kept with probability 1 − p, weighted
/// 1/√n (L2 normalisation over all n items; w/‖w‖ for weighted rows) × 1/(1 − p) (inverted
/// dropout).
pub(crate) fn dropout_bag(
    rows: &[&[u32]],
    weights: Option<&[&[f32]]>,
    p: f64,
    rng: &mut impl Rng,
) -> Bag {
    Bag::build(rows, weights, 1.0 / (1.0 - p) as f32, || {
        p == 0.0 || rng.gen::<f64>() >= p
    })
}
