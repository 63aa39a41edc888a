//! `MultiVae`: the network's weights and its inference path (encode to μ, decode, top-K), plus
//! growing the catalogue. Weights are stored input-major (`x · W`), so the first layer's rows and
//! the output layer's columns are items.

use candle_core::{DType, Device, Result, Tensor};
use rand::Rng;
use rand_distr::{Distribution, StandardNormal};
use rayon::prelude::*;

use std::sync::Arc;

use super::kernels::{bag_forward, tanh, with_slice, Bag};
use super::quant::{int8_kernel, scoring, Int8Output, Scoring, INT8_MIN_ITEMS};
use super::topk::{best_k, top_k_unseen};
use super::ModelConfig;

/// One affine layer, `y = x · weight + bias`, `weight` stored input-major [in × out] (so the
/// first layer's rows and the output layer's columns are items), `bias` [out]. Not
/// `candle_nn::Linear`, which stores its weight [out × in].
#[derive(Debug, Clone)]
pub(crate) struct Affine {
    pub(crate) weight: Tensor,
    pub(crate) bias: Tensor,
}

/// A Multi-VAE: encoder items → hidden… → 2·latent (μ, log σ²); decoder latent → …hidden → items.
#[derive(Debug, Clone)]
pub struct MultiVae {
    config: ModelConfig,
    n_items: usize,
    pub(crate) encoder: Vec<Affine>,
    pub(crate) decoder: Vec<Affine>,
    /// Serving copies only (`for_serving`): the output layer's weight transposed to
    /// [items × hidden] (contiguous), which makes scoring a few users about twice as fast.
    output_t: Option<Tensor>,
    /// Serving copies only, where `serve.scoring` is int8 and the CPU runs it: the output layer
    /// in int8 for the candidate pass.
    int8: Option<Arc<Int8Output>>,
}

/// Glorot/Xavier uniform values for a [fan_in × fan_out] matrix (vae_cf's weight init).
pub(crate) fn xavier(
    rng: &mut impl Rng,
    rows: usize,
    cols: usize,
    fan_in: usize,
    fan_out: usize,
) -> Vec<f32> {
    let limit = (6.0 / (fan_in + fan_out) as f64).sqrt() as f32;
    (0..rows * cols)
        .map(|_| rng.gen_range(-limit..limit))
        .collect()
}

/// Truncated normal values with std 0.001 cut at ±2 std (vae_cf's bias init).
pub(crate) fn bias_init(rng: &mut impl Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| loop {
            let v: f64 = StandardNormal.sample(rng);
            if v.abs() <= 2.0 {
                break (v * 0.001) as f32;
            }
        })
        .collect()
}

fn layer_dims(config: &ModelConfig, n_items: usize) -> (Vec<usize>, Vec<usize>) {
    let mut enc = vec![n_items];
    enc.extend(&config.mlp_hidden_size);
    enc.push(2 * config.latent_dimension);
    let mut dec = vec![config.latent_dimension];
    dec.extend(config.mlp_hidden_size.iter().rev());
    dec.push(n_items);
    (enc, dec)
}

impl MultiVae {
    /// A freshly initialised model (Xavier weights, truncated-normal biases) on `device`.
    pub fn new(
        config: &ModelConfig,
        n_items: usize,
        rng: &mut impl Rng,
        device: &Device,
    ) -> Result<Self> {
        config.validate().map_err(candle_core::Error::Msg)?;
        let (enc, dec) = layer_dims(config, n_items);
        let mut make = |dims: &[usize]| -> Result<Vec<Affine>> {
            dims.windows(2)
                .map(|d| {
                    let w = xavier(rng, d[0], d[1], d[0], d[1]);
                    let b = bias_init(rng, d[1]);
                    Ok(Affine {
                        weight: Tensor::from_vec(w, (d[0], d[1]), device)?,
                        bias: Tensor::from_vec(b, d[1], device)?,
                    })
                })
                .collect()
        };
        let encoder = make(&enc)?;
        let decoder = make(&dec)?;
        Ok(Self {
            config: config.clone(),
            n_items,
            encoder,
            decoder,
            output_t: None,
            int8: None,
        })
    }

    /// Rebuilds a model from named tensors (as produced by [`MultiVae::named_tensors`]),
    /// checking every shape.
    pub(crate) fn from_named(
        config: &ModelConfig,
        n_items: usize,
        mut get: impl FnMut(&str) -> Option<Tensor>,
    ) -> std::result::Result<Self, String> {
        config.validate()?;
        let (enc, dec) = layer_dims(config, n_items);
        let mut load = |prefix: &str, dims: &[usize]| -> std::result::Result<Vec<Affine>, String> {
            dims.windows(2)
                .enumerate()
                .map(|(k, d)| {
                    let wname = format!("{prefix}.{k}.weight");
                    let bname = format!("{prefix}.{k}.bias");
                    let weight = get(&wname).ok_or_else(|| format!("tensor {wname} is missing"))?;
                    let bias = get(&bname).ok_or_else(|| format!("tensor {bname} is missing"))?;
                    if weight.dims() != [d[0], d[1]] || weight.dtype() != DType::F32 {
                        return Err(format!(
                            "tensor {wname} has shape {:?} {:?}, expected [{}, {}] f32",
                            weight.dims(),
                            weight.dtype(),
                            d[0],
                            d[1]
                        ));
                    }
                    if bias.dims() != [d[1]] || bias.dtype() != DType::F32 {
                        return Err(format!(
                            "tensor {bname} has shape {:?}, expected [{}] f32",
                            bias.dims(),
                            d[1]
                        ));
                    }
                    Ok(Affine { weight, bias })
                })
                .collect()
        };
        let encoder = load("encoder", &enc)?;
        let decoder = load("decoder", &dec)?;
        Ok(Self {
            config: config.clone(),
            n_items,
            encoder,
            decoder,
            output_t: None,
            int8: None,
        })
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Catalogue size (the model's input and output width).
    pub fn n_items(&self) -> usize {
        self.n_items
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        self.encoder[0].weight.device()
    }

    /// Every parameter with its checkpoint name, in a fixed order.
    pub(crate) fn named_tensors(&self) -> Vec<(String, &Tensor)> {
        let mut out = Vec::new();
        for (prefix, layers) in [("encoder", &self.encoder), ("decoder", &self.decoder)] {
            for (k, l) in layers.iter().enumerate() {
                out.push((format!("{prefix}.{k}.weight"), &l.weight));
                out.push((format!("{prefix}.{k}.bias"), &l.bias));
            }
        }
        out
    }

    pub(crate) fn params_mut(&mut self) -> Vec<&mut Tensor> {
        self.encoder
            .iter_mut()
            .chain(self.decoder.iter_mut())
            .flat_map(|l| [&mut l.weight, &mut l.bias])
            .collect()
    }

    /// A copy that shares no storage with `self` (training updates weights in place).
    pub(crate) fn deep_copy(&self) -> Result<Self> {
        self.map_tensors(|t| t.copy())
    }

    /// The same weights on another device.
    pub(crate) fn to_device(&self, device: &Device) -> Result<Self> {
        self.map_tensors(|t| t.to_device(device))
    }

    /// The same model with `f` applied to every tensor.
    fn map_tensors(&self, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Self> {
        let map = |ls: &[Affine]| -> Result<Vec<Affine>> {
            ls.iter()
                .map(|l| {
                    Ok(Affine {
                        weight: f(&l.weight)?,
                        bias: f(&l.bias)?,
                    })
                })
                .collect()
        };
        Ok(Self {
            config: self.config.clone(),
            n_items: self.n_items,
            encoder: map(&self.encoder)?,
            decoder: map(&self.decoder)?,
            output_t: self.output_t.as_ref().map(&f).transpose()?,
            int8: self.int8.clone(),
        })
    }

    /// True when every weight is finite.
    pub fn is_finite(&self) -> Result<bool> {
        for (_, t) in self.named_tensors() {
            let s = t
                .abs()?
                .sum_all()?
                .to_dtype(DType::F32)?
                .to_scalar::<f32>()?;
            if !s.is_finite() {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Encoder forward pass without dropout: returns (μ, log σ²), each [B × latent].
    pub(crate) fn encode(&self, bag: &Bag) -> Result<(Tensor, Tensor)> {
        let mut h = bag_forward(&self.encoder[0].weight, &self.encoder[0].bias, bag)?;
        for l in &self.encoder[1..] {
            h = tanh(&h)?.matmul(&l.weight)?.broadcast_add(&l.bias)?;
        }
        let d = self.config.latent_dimension;
        Ok((h.narrow(1, 0, d)?, h.narrow(1, d, d)?))
    }

    /// Decoder forward pass up to the output layer's matmul; the output bias is *not* added
    /// (callers fuse it into the softmax or the top-K pass). Returns [B × items].
    pub(crate) fn decode_without_output_bias(&self, z: &Tensor) -> Result<Tensor> {
        self.decode_hidden(z)?
            .matmul(&self.decoder[self.decoder.len() - 1].weight)
    }

    /// The decoder's last hidden activation (the output layer's input).
    fn decode_hidden(&self, z: &Tensor) -> Result<Tensor> {
        let mut h = z.clone();
        let last = self.decoder.len() - 1;
        for l in &self.decoder[..last] {
            h = tanh(&h.matmul(&l.weight)?.broadcast_add(&l.bias)?)?;
        }
        Ok(h)
    }

    /// An inference-only copy in host memory for the scorer, with the output layer also kept
    /// transposed for fast scoring of small batches. Never train it.
    pub(crate) fn for_serving(&self) -> Result<Self> {
        self.for_serving_with(scoring())
    }

    /// As [`MultiVae::for_serving`], scoring as `how` says (int8 only where the CPU runs it).
    pub fn for_serving_with(&self, how: Scoring) -> Result<Self> {
        let mut m = self.to_device(&Device::Cpu)?.deep_copy()?;
        let w = &m.decoder[m.decoder.len() - 1].weight;
        m.output_t = Some(w.t()?.contiguous()?);
        let (hidden, items) = w.dims2()?;
        let kernel = int8_kernel().filter(|_| how == Scoring::Int8 && items >= INT8_MIN_ITEMS);
        if let Some(kernel) = kernel {
            let bias = &m.decoder[m.decoder.len() - 1].bias;
            let q = with_slice(w, |w| {
                with_slice(bias, |b| Ok(Int8Output::new(w, b, hidden, items, kernel)))
            })?;
            m.int8 = Some(Arc::new(q));
        }
        Ok(m)
    }

    /// Whether this serving copy finds its candidates with the int8 pass.
    pub fn int8_enabled(&self) -> bool {
        self.int8.is_some()
    }

    /// Full scores (logits, bias included) for users given by their items, z = μ.
    pub fn scores(&self, rows: &[&[u32]]) -> Result<Tensor> {
        self.scores_weighted(rows, None)
    }

    /// As [`MultiVae::scores`], with each item's weight (`None`: binary rows).
    fn scores_weighted(&self, rows: &[&[u32]], weights: Option<&[&[f32]]>) -> Result<Tensor> {
        let (mu, _) = self.encode(&Bag::normalised_weighted(rows, weights))?;
        self.decode_without_output_bias(&mu)?
            .broadcast_add(&self.decoder[self.decoder.len() - 1].bias)
    }

    /// The multinomial negative log-likelihood of the users' own items, `−Σ_{i∈x} x_i·log
    /// softmax_i` (x binary, or the rows' `weights`) with z = μ and no dropout, averaged over the
    /// rows (each non-empty): how well the model explains the clicks it was trained on, free of
    /// the training step's noise. Rows are scored in chunks of about 8M logits to bound memory.
    pub(crate) fn mean_nll(&self, rows: &[&[u32]], weights: Option<&[&[f32]]>) -> Result<f64> {
        if rows.is_empty() {
            return Ok(0.0);
        }
        let chunk = (8_000_000 / self.n_items.max(1)).clamp(1, 1024);
        let mut total = 0f64;
        for (c, part) in rows.chunks(chunk).enumerate() {
            let part_weights = weights.map(|w| &w[c * chunk..c * chunk + part.len()]);
            let logits = self
                .scores_weighted(part, part_weights)?
                .to_device(&Device::Cpu)?;
            let n = self.n_items;
            total += with_slice(&logits, |l| {
                Ok(l.par_chunks(n)
                    .zip(part.par_iter())
                    .enumerate()
                    .map(|(u, (row, items))| {
                        let w = |j: usize| part_weights.map_or(1.0, |w| f64::from(w[u][j]));
                        let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
                        let lse = max
                            + row
                                .iter()
                                .map(|&x| (x as f64 - max).exp())
                                .sum::<f64>()
                                .ln();
                        items
                            .iter()
                            .enumerate()
                            .map(|(j, &i)| w(j) * (lse - row[i as usize] as f64))
                            .sum::<f64>()
                    })
                    .sum::<f64>())
            })?;
        }
        Ok(total / rows.len() as f64)
    }

    /// Top-`k` items for each user (given by their current items), best first, never an item
    /// the user already has. Users are scored in chunks to bound memory.
    pub fn recommend(&self, rows: &[&[u32]], k: usize) -> Result<Vec<Vec<(u32, f32)>>> {
        self.recommend_weighted(rows, None, &[], k)
    }

    /// As [`MultiVae::recommend`], with the weight of each item of `rows` (`None`: binary, as a
    /// weighted model's input), never recommending the columns of `hidden` either (ascending;
    /// rows are ascending too).
    pub fn recommend_weighted(
        &self,
        rows: &[&[u32]],
        weights: Option<&[&[f32]]>,
        hidden: &[u32],
        k: usize,
    ) -> Result<Vec<Vec<(u32, f32)>>> {
        const CHUNK: usize = 1024;
        let mut out = Vec::with_capacity(rows.len());
        let out_bias = &self.decoder[self.decoder.len() - 1].bias;
        let host_bias;
        let bias_ref = if out_bias.device().is_cpu() {
            out_bias.clone()
        } else {
            host_bias = out_bias.to_device(&Device::Cpu)?;
            host_bias
        };
        for (c, chunk) in rows.chunks(CHUNK).enumerate() {
            let chunk_weights = weights.map(|w| &w[c * CHUNK..c * CHUNK + chunk.len()]);
            let (mu, _) = self.encode(&Bag::normalised_weighted(chunk, chunk_weights))?;
            if let (Some(q), Some(wt)) = (&self.int8, &self.output_t) {
                let activations = self.decode_hidden(&mu)?.contiguous()?;
                out.extend(with_slice(&activations, |h| {
                    with_slice(wt, |wt| {
                        with_slice(&bias_ref, |bias| {
                            let exact = Exact { wt, bias };
                            Ok(candidates_reranked(q, exact, h, chunk, hidden, k))
                        })
                    })
                })?);
                continue;
            }
            let logits = match &self.output_t {
                // [items × hidden]·[hidden × B], then transposed by hand (candle's strided copy
                // is slow): at 20k items 9.6 ms instead of 13.1 for 20 users, 17.7 instead of
                // 20.5 for 50; slower than the GEMM below from ~100 users on
                Some(wt) if chunk.len() <= 64 => {
                    let b = chunk.len();
                    let h = self.decode_hidden(&mu)?.t()?.contiguous()?;
                    let lt = wt.matmul(&h)?;
                    let n = self.n_items;
                    let mut rows = vec![0f32; b * n];
                    with_slice(&lt, |lt| {
                        rows.par_chunks_mut(n).enumerate().for_each(|(u, row)| {
                            for (i, x) in row.iter_mut().enumerate() {
                                *x = lt[i * b + u];
                            }
                        });
                        Ok(())
                    })?;
                    Tensor::from_vec(rows, (b, n), &Device::Cpu)?
                }
                _ => self
                    .decode_without_output_bias(&mu)?
                    .to_device(&Device::Cpu)?,
            };
            let n = self.n_items;
            let recs = with_slice(&logits, |l| {
                with_slice(&bias_ref, |bias| {
                    Ok(l.par_chunks(n)
                        .zip(chunk.par_iter())
                        .map(|(row, seen)| {
                            if hidden.is_empty() {
                                top_k_unseen(row, Some(bias), seen, k)
                            } else {
                                top_k_unseen(row, Some(bias), &merged(seen, hidden), k)
                            }
                        })
                        .collect::<Vec<_>>())
                })
            })?;
            out.extend(recs);
        }
        Ok(out)
    }

    /// Widens the catalogue to `new_n_items`: new rows of the first layer, new columns and bias
    /// entries of the output layer, initialised as the paper's init would for the new sizes.
    /// Every existing weight is kept, so the old items' logits are unchanged for any input.
    pub(crate) fn grow(&mut self, new_n_items: usize, rng: &mut impl Rng) -> Result<()> {
        if new_n_items < self.n_items {
            candle_core::bail!(
                "cannot shrink the catalogue from {} to {new_n_items}",
                self.n_items
            );
        }
        let extra = new_n_items - self.n_items;
        if extra == 0 {
            return Ok(());
        }
        let dev = self.device().clone();
        let first = &mut self.encoder[0];
        let h = first.weight.dim(1)?;
        let rows = Tensor::from_vec(xavier(rng, extra, h, new_n_items, h), (extra, h), &dev)?;
        first.weight = Tensor::cat(&[&first.weight, &rows], 0)?;
        let last = self.decoder.len() - 1;
        let out = &mut self.decoder[last];
        let h = out.weight.dim(0)?;
        let cols = Tensor::from_vec(xavier(rng, h, extra, h, new_n_items), (h, extra), &dev)?;
        out.weight = Tensor::cat(&[&out.weight, &cols], 1)?;
        let b = Tensor::from_vec(bias_init(rng, extra), extra, &dev)?;
        out.bias = Tensor::cat(&[&out.bias, &b], 0)?;
        self.n_items = new_n_items;
        self.output_t = None;
        self.int8 = None;
        Ok(())
    }
}

/// The output layer in fp32, item-major ([items × hidden]), and its bias: exact scores of a few
/// items.
#[derive(Clone, Copy)]
struct Exact<'a> {
    wt: &'a [f32],
    bias: &'a [f32],
}

impl Exact<'_> {
    fn score(&self, h: &[f32], item: u32) -> f32 {
        let n = h.len();
        let i = item as usize;
        dot(h, &self.wt[i * n..(i + 1) * n]) + self.bias[i]
    }

    /// Each user's candidates (`h`: the users' activations, `width` each) scored exactly, item
    /// by item across the users: an item many users share is read from memory once.
    fn rescore(
        &self,
        candidates: &[Vec<(u32, f32)>],
        h: &[f32],
        width: usize,
    ) -> Vec<Vec<(u32, f32)>> {
        let mut pairs: Vec<u64> = candidates
            .iter()
            .enumerate()
            .flat_map(|(u, c)| c.iter().map(move |(i, _)| (u64::from(*i) << 32) | u as u64))
            .collect();
        pairs.sort_unstable();
        let mut out: Vec<Vec<(u32, f32)>> = candidates
            .iter()
            .map(|c| Vec::with_capacity(c.len()))
            .collect();
        // a row is fetched from memory well before it is needed: rows are far apart in a
        // catalogue-sized matrix, so the hardware's prefetcher only follows one once it is read
        const AHEAD: usize = 4;
        for (at, &p) in pairs.iter().enumerate() {
            if let Some(&next) = pairs.get(at + AHEAD) {
                self.prefetch_row((next >> 32) as usize, width);
            }
            let (item, u) = ((p >> 32) as u32, (p & 0xffff_ffff) as usize);
            out[u].push((item, self.score(&h[u * width..(u + 1) * width], item)));
        }
        out
    }

    /// Asks the CPU to bring item `i`'s row (`width` floats) into its caches.
    fn prefetch_row(&self, i: usize, width: usize) {
        #[cfg(target_arch = "x86_64")]
        if let Some(row) = self.wt.get(i * width..(i + 1) * width) {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            for line in row.chunks(16) {
                // SAFETY: a prefetch only hints the cache and never faults; the address is
                // within the slice
                unsafe { _mm_prefetch::<_MM_HINT_T0>(line.as_ptr().cast()) };
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (i, width);
    }
}

/// `a · b` in 16 independent partial sums (which the compiler keeps in one vector register;
/// a single running sum would wait on each addition).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (a16, b16) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = a16
        .remainder()
        .iter()
        .zip(b16.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a16.zip(b16) {
        for j in 0..16 {
            acc[j] += x[j] * y[j];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Items per candidate list of the int8 pass for a top-`k`: enough that the exact top-k almost
/// always lies within (measured in BENCHMARKS.md, "Scoring precision").
pub(crate) fn candidates_for(k: usize) -> usize {
    k + k / 2 + 16
}

/// The int8 candidate pass for users whose last hidden activations are `h` ([users × hidden]),
/// then each user's candidates re-scored exactly and the best `k` kept: never one of the user's
/// items (`rows`) nor of `hidden_items`. Each thread takes a part of the users, unless that
/// part would be smaller than an int8 kernel's 16 users: such a batch is split by catalogue
/// instead, so that each thread streams its share of the weights for all the users, not all of
/// the weights for a few (from 16 users a thread the split's second pass costs more than the
/// weights it spares: at 5k clicks/s, ~55 users a batch, scoring took 10.9 ms at p50 against
/// 7.5 split by user).
fn candidates_reranked(
    q: &Int8Output,
    exact: Exact<'_>,
    h: &[f32],
    rows: &[&[u32]],
    hidden_items: &[u32],
    k: usize,
) -> Vec<Vec<(u32, f32)>> {
    // users per part: each part reads the packed weights once (~94 KB a user at 20k items)
    const PART: usize = 128;
    // users a thread below which the batch is split by catalogue
    const SPLIT_BELOW: usize = 16;
    let width = h.len() / rows.len().max(1);
    let threads = rayon::current_num_threads();
    if threads > 1 && rows.len() < SPLIT_BELOW * threads {
        return split_by_catalogue(q, exact, h, rows, hidden_items, k, threads);
    }
    let part = PART.min(rows.len().div_ceil(threads).max(1));
    let parts: Vec<(&[f32], &[&[u32]])> = h.chunks(part * width).zip(rows.chunks(part)).collect();
    parts
        .into_par_iter()
        .flat_map_iter(|(h, rows)| {
            let seen = seen_lists(rows, hidden_items);
            let seen: Vec<&[u32]> = seen.iter().map(|s| s.as_ref()).collect();
            let candidates = q.candidates(h, &seen, candidates_for(k));
            rerank(exact, &candidates, h, width, k)
        })
        .collect()
}

/// [`candidates_reranked`] for a batch too small to split by user: each of `slices` threads
/// finds every user's candidates in its slice of the catalogue, the best of their union are the
/// candidates of the whole (the same as one pass finds), and the users are then re-ranked in
/// parts.
fn split_by_catalogue(
    q: &Int8Output,
    exact: Exact<'_>,
    h: &[f32],
    rows: &[&[u32]],
    hidden_items: &[u32],
    k: usize,
    slices: usize,
) -> Vec<Vec<(u32, f32)>> {
    let width = h.len() / rows.len().max(1);
    let count = candidates_for(k);
    let seen = seen_lists(rows, hidden_items);
    let seen: Vec<&[u32]> = seen.iter().map(|s| s.as_ref()).collect();
    let blocks = q.blocks();
    let per_slice = blocks.div_ceil(slices);
    let found: Vec<Vec<Vec<(u32, f32)>>> = (0..slices)
        .into_par_iter()
        .map(|s| {
            let range = (s * per_slice).min(blocks)..((s + 1) * per_slice).min(blocks);
            q.candidates_in(h, &seen, count, range)
        })
        .collect();
    let candidates: Vec<Vec<(u32, f32)>> = (0..rows.len())
        .map(|u| {
            let union: Vec<(u32, f32)> = found.iter().flat_map(|f| f[u].iter().copied()).collect();
            best_k(union, count)
        })
        .collect();
    let part = rows.len().div_ceil(slices).max(1);
    candidates
        .par_chunks(part)
        .zip(h.par_chunks(part * width))
        .flat_map_iter(|(candidates, h)| rerank(exact, candidates, h, width, k))
        .collect()
}

/// Each user's items (`rows`) with `hidden_items` among them, ascending.
fn seen_lists<'a>(rows: &[&'a [u32]], hidden_items: &[u32]) -> Vec<std::borrow::Cow<'a, [u32]>> {
    rows.iter()
        .map(|seen| {
            if hidden_items.is_empty() {
                std::borrow::Cow::Borrowed(*seen)
            } else {
                std::borrow::Cow::Owned(merged(seen, hidden_items))
            }
        })
        .collect()
}

/// The users' candidates scored exactly, the best `k` of each, best first.
fn rerank(
    exact: Exact<'_>,
    candidates: &[Vec<(u32, f32)>],
    h: &[f32],
    width: usize,
    k: usize,
) -> Vec<Vec<(u32, f32)>> {
    exact
        .rescore(candidates, h, width)
        .into_iter()
        .map(|best| best_k(best, k))
        .collect()
}

/// The union of two ascending lists, ascending (duplicates kept: the top-k skips them alike).
fn merged(a: &[u32], b: &[u32]) -> Vec<u32> {
    let mut out = Vec::with_capacity(a.len() + b.len());
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        if a[i] <= b[j] {
            out.push(a[i]);
            i += 1;
        } else {
            out.push(b[j]);
            j += 1;
        }
    }
    out.extend_from_slice(&a[i..]);
    out.extend_from_slice(&b[j..]);
    out
}
