//! `Adam`: the optimiser, owned here (not candle-nn's `AdamW`) so its moments can be saved,
//! restored and grown with the catalogue. PyTorch's update rule, β₁ 0.9, β₂ 0.999, ε 1e-8,
//! no weight decay; in place and parallel on CPU.

use candle_core::{DType, Result, Tensor};
use rayon::prelude::*;

use multiversion::multiversion;

use super::kernels::{on_host, with_slice, with_slice_mut};

const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const EPS: f64 = 1e-8;

/// Adam state: first and second moments per parameter and the step count.
#[derive(Debug, Clone)]
pub(crate) struct Adam {
    pub(crate) learning_rate: f64,
    pub(crate) step: u64,
    pub(crate) m: Vec<Tensor>,
    pub(crate) v: Vec<Tensor>,
}

impl Adam {
    /// Zero moments shaped like `params`.
    pub fn new(params: &[&Tensor], learning_rate: f64) -> Result<Self> {
        let zeros = |t: &&Tensor| t.zeros_like();
        Ok(Self {
            learning_rate,
            step: 0,
            m: params.iter().map(zeros).collect::<Result<_>>()?,
            v: params.iter().map(zeros).collect::<Result<_>>()?,
        })
    }

    /// The same state on another device.
    pub(crate) fn to_device(&self, device: &candle_core::Device) -> Result<Self> {
        let move_all = |ts: &[Tensor]| -> Result<Vec<Tensor>> {
            ts.iter().map(|t| t.to_device(device)).collect()
        };
        Ok(Self {
            learning_rate: self.learning_rate,
            step: self.step,
            m: move_all(&self.m)?,
            v: move_all(&self.v)?,
        })
    }

    /// Number of updates applied so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// Applies one update. `params[i]` is changed in place on CPU and replaced elsewhere.
    pub(crate) fn update(&mut self, params: &mut [&mut Tensor], grads: &[Tensor]) -> Result<()> {
        if params.len() != grads.len() || params.len() != self.m.len() {
            candle_core::bail!(
                "adam: {} params, {} grads, {} moments",
                params.len(),
                grads.len(),
                self.m.len()
            );
        }
        self.step += 1;
        let t = self.step as i32;
        let bc1 = 1.0 - BETA1.powi(t);
        let bc2 = 1.0 - BETA2.powi(t);
        let step_size = (self.learning_rate / bc1) as f32;
        let inv_sqrt_bc2 = (1.0 / bc2.sqrt()) as f32;
        for (i, (p, g)) in params.iter_mut().zip(grads).enumerate() {
            if p.dims() != g.dims() {
                candle_core::bail!("adam: gradient {:?} for parameter {:?}", g.dims(), p.dims());
            }
            let (m, v) = (&self.m[i], &self.v[i]);
            if on_host(p.device()) {
                with_slice_mut(p, |p| {
                    with_slice_mut(m, |m| {
                        with_slice_mut(v, |v| {
                            with_slice(g, |g| {
                                const C: usize = 4096;
                                p.par_chunks_mut(C)
                                    .zip(m.par_chunks_mut(C))
                                    .zip(v.par_chunks_mut(C))
                                    .zip(g.par_chunks(C))
                                    .for_each(|(((p, m), v), g)| {
                                        update_chunk(p, m, v, g, step_size, inv_sqrt_bc2)
                                    });
                                Ok(())
                            })
                        })
                    })
                })?;
            } else {
                let m2 = ((m * BETA1)? + (g * (1.0 - BETA1))?)?;
                let v2 = ((v * BETA2)? + (g.sqr()? * (1.0 - BETA2))?)?;
                let denom = ((v2.sqrt()? * inv_sqrt_bc2 as f64)? + EPS)?;
                **p = (&**p - (m2.div(&denom)? * step_size as f64)?)?;
                self.m[i] = m2;
                self.v[i] = v2;
            }
        }
        Ok(())
    }

    /// Appends zero moments for `extra` new items to the first layer's weight (rows) and the
    /// output layer's weight (columns) and bias; `first`, `out_w`, `out_b` index the parameters.
    pub(crate) fn grow(
        &mut self,
        first: usize,
        out_w: usize,
        out_b: usize,
        extra: usize,
    ) -> Result<()> {
        for moments in [&mut self.m, &mut self.v] {
            let t = &moments[first];
            let z = Tensor::zeros((extra, t.dim(1)?), DType::F32, t.device())?;
            moments[first] = Tensor::cat(&[t, &z], 0)?;
            let t = &moments[out_w];
            let z = Tensor::zeros((t.dim(0)?, extra), DType::F32, t.device())?;
            moments[out_w] = Tensor::cat(&[t, &z], 1)?;
            let t = &moments[out_b];
            let z = Tensor::zeros(extra, DType::F32, t.device())?;
            moments[out_b] = Tensor::cat(&[t, &z], 0)?;
        }
        Ok(())
    }
}

/// Adam's update of one chunk of a parameter, its moments and its gradient (compiled for each
/// SIMD level, chosen at run time).
#[multiversion(targets = "simd")]
fn update_chunk(
    p: &mut [f32],
    m: &mut [f32],
    v: &mut [f32],
    g: &[f32],
    step_size: f32,
    inv_sqrt_bc2: f32,
) {
    let (b1, b2) = (BETA1 as f32, BETA2 as f32);
    for (((p, m), v), &g) in p.iter_mut().zip(m).zip(v).zip(g) {
        *m = b1 * *m + (1.0 - b1) * g;
        *v = b2 * *v + (1.0 - b2) * g * g;
        let denom = v.sqrt() * inv_sqrt_bc2 + EPS as f32;
        *p -= step_size * *m / denom;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The in-place host update equals the composed formula (PyTorch's Adam) over several steps.
    #[test]
    fn host_update_matches_the_formula() {
        let p0 = Tensor::new(&[0.5f32, -1.0, 2.0], &Device::Cpu).unwrap();
        let mut p = p0.copy().unwrap();
        let mut adam = Adam::new(&[&p], 0.01).unwrap();
        let (mut m, mut v, mut want) = ([0f64; 3], [0f64; 3], [0.5f64, -1.0, 2.0]);
        for step in 1..=5 {
            let g = [0.1f64 * step as f64, -0.3, 0.0];
            let gt = Tensor::new(&[g[0] as f32, g[1] as f32, g[2] as f32], &Device::Cpu).unwrap();
            adam.update(&mut [&mut p], &[gt]).unwrap();
            for j in 0..3 {
                m[j] = 0.9 * m[j] + 0.1 * g[j];
                v[j] = 0.999 * v[j] + 0.001 * g[j] * g[j];
                let bc1 = 1.0 - 0.9f64.powi(step);
                let bc2 = 1.0 - 0.999f64.powi(step);
                want[j] -= 0.01 / bc1 * m[j] / (v[j].sqrt() / bc2.sqrt() + 1e-8);
            }
        }
        let got = p.to_vec1::<f32>().unwrap();
        for j in 0..3 {
            assert!(
                (got[j] as f64 - want[j]).abs() < 1e-6,
                "{got:?} vs {want:?}"
            );
        }
        assert_eq!(p0.to_vec1::<f32>().unwrap(), vec![0.5, -1.0, 2.0]);
    }
}
