//! AdamW with torch.optim.AdamW semantics (decoupled decay, bias correction) and global-norm
//! gradient clipping as in torch.nn.utils.clip_grad_norm_.

use crate::model::params::{ParamKind, ParamSpec, ParamStore};
use crate::real::Real;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Skip weight decay on norm gains and embeddings (torch's fixture decays everything).
    #[serde(default)]
    pub no_decay_norms_embeddings: bool,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            lr: 3e-4,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            no_decay_norms_embeddings: false,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct AdamW<T> {
    pub cfg: AdamWConfig,
    pub step: u64,
    pub m: ParamStore<T>,
    pub v: ParamStore<T>,
}

/// Global L2 norm of all gradients (accumulated in f64).
pub fn grad_norm<T: Real>(g: &ParamStore<T>) -> f64 {
    g.tensors
        .iter()
        .map(|t| crate::backend::cpu::sum_sq(&t.data))
        .sum::<f64>()
        .sqrt()
}

/// torch's clip coefficient: gradients are scaled by this to bring their norm to `max_norm`.
pub fn clip_coef(norm: f64, max_norm: f64) -> f64 {
    (max_norm / (norm + 1e-6)).min(1.0)
}

/// Scale gradients so their global norm is at most `max_norm`; returns the norm before clipping.
pub fn clip_grad_norm<T: Real>(g: &mut ParamStore<T>, max_norm: f64) -> f64 {
    let norm = grad_norm(g);
    let coef = clip_coef(norm, max_norm);
    if coef < 1.0 {
        let c = T::from_f64(coef);
        for t in &mut g.tensors {
            t.data.iter_mut().for_each(|x| *x *= c);
        }
    }
    norm
}

/// Adam's bias correction `1 − βᵗ` after `step` (1-based) steps. The CUDA kernel `adamw_multi`
/// takes it precomputed from here; its update itself is tested against
/// [`AdamW::update_scaled`] (tests/cuda_kernels.rs, tests/cuda_model.rs).
pub fn bias_correction(beta: f64, step: i32) -> f64 {
    1.0 - beta.powi(step)
}

impl<T: Real> AdamW<T> {
    pub fn new(cfg: AdamWConfig, specs: &[ParamSpec]) -> Self {
        AdamW {
            cfg,
            step: 0,
            m: ParamStore::zeros_like(specs),
            v: ParamStore::zeros_like(specs),
        }
    }

    /// One step at learning rate `lr` (the schedule's value).
    pub fn update(&mut self, params: &mut ParamStore<T>, grads: &ParamStore<T>, specs: &[ParamSpec], lr: f64) {
        self.update_scaled(params, grads, specs, lr, 1.0);
    }

    /// One step on `grad_scale · grads`: clipping folded into the update, saving a pass over the
    /// gradients.
    pub fn update_scaled(
        &mut self,
        params: &mut ParamStore<T>,
        grads: &ParamStore<T>,
        specs: &[ParamSpec],
        lr: f64,
        grad_scale: f64,
    ) {
        self.step += 1;
        let gs = T::from_f64(grad_scale);
        let c = &self.cfg;
        let (b1, b2) = (T::from_f64(c.beta1), T::from_f64(c.beta2));
        let bc1 = bias_correction(c.beta1, self.step as i32);
        let bc2_sqrt = T::from_f64(bias_correction(c.beta2, self.step as i32).sqrt());
        let step_size = T::from_f64(lr / bc1);
        let eps = T::from_f64(c.eps);
        for (i, spec) in specs.iter().enumerate() {
            let decay = if c.no_decay_norms_embeddings && matches!(spec.kind, ParamKind::Norm | ParamKind::Embedding) {
                0.0
            } else {
                c.weight_decay
            };
            let keep = T::from_f64(1.0 - lr * decay);
            let (p, g) = (&mut params.tensors[i].data, &grads.tensors[i].data);
            let (m, v) = (&mut self.m.tensors[i].data, &mut self.v.tensors[i].data);
            use rayon::prelude::*;
            p.par_chunks_mut(4096)
                .zip(g.par_chunks(4096))
                .zip(m.par_chunks_mut(4096).zip(v.par_chunks_mut(4096)))
                .for_each(|((pc, gc), (mc, vc))| {
                    for j in 0..pc.len() {
                        let gj = gc[j] * gs;
                        pc[j] *= keep;
                        mc[j] = b1 * mc[j] + (T::ONE - b1) * gj;
                        vc[j] = b2 * vc[j] + (T::ONE - b2) * gj * gj;
                        let denom = vc[j].sqrt() / bc2_sqrt + eps;
                        pc[j] -= step_size * mc[j] / denom;
                    }
                });
        }
    }
}
