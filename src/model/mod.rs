//! The decoder-only model: embedding → layers → final norm → LM head → cross-entropy, with an
//! explicit backward through the same ops.

pub mod decode;
pub mod ffn;
pub mod kv;
pub mod layer;
pub mod lazy;
pub mod memory;
pub mod observer;
pub mod ops;
pub mod params;

use crate::backend::profile::scope;
use crate::config::ModelConfig;
use crate::real::Real;
use anyhow::{bail, Result};
use layer::{layer_bwd, layer_fwd, Ctx};
use observer::Observer;
use ops::cross_entropy::{cross_entropy, cross_entropy_sum, target_count, IGNORE};
use ops::embedding::{embedding_bwd, embedding_fwd};
use ops::linear::{linear_bwd, linear_fwd};
use ops::rmsnorm::{rmsnorm_bwd, rmsnorm_fwd};
use ops::rope::RopeTable;
use ops::softcap::{softcap_bwd, softcap_fwd};
use params::{init_params, param_specs, ParamIndex, ParamSpec, ParamStore};

/// Debug-mode report of where NaN/Inf first appeared in a forward.
#[derive(thiserror::Error, Debug, Clone, PartialEq)]
#[error("non-finite values (NaN/Inf) first appeared in layer {layer}, op {op}")]
pub struct NonFinite {
    pub layer: usize,
    pub op: &'static str,
}

/// Logit elements per chunk of the fused LM-head/loss backward (16 MB of f32: fits in L3).
const HEAD_CHUNK_ELEMS: usize = 4 << 20;

/// Token ids `[batch, seq]` and next-token targets (same shape; `IGNORE` where there is none).
pub struct Batch<'a> {
    pub ids: &'a [u32],
    pub targets: &'a [u32],
    pub batch: usize,
    pub seq: usize,
}

/// Gemma: embeddings times √hidden_size, the factor rounded to the model's float type (as
/// transformers does: `torch.tensor(hidden**0.5).to(dtype)`). Also the backward (same factor).
pub(crate) fn scale_embeddings<T: Real>(cfg: &ModelConfig, x: &mut [T]) {
    if cfg.embed_scale {
        let s = T::from_f64((cfg.hidden_size as f64).sqrt());
        x.iter_mut().for_each(|v| *v *= s);
    }
}

/// Targets for "predict the next token of the same sequence": ids shifted left, last = IGNORE.
pub fn shifted_targets(ids: &[u32], seq: usize) -> Vec<u32> {
    let mut t = vec![IGNORE; ids.len()];
    for (row, trow) in ids.chunks(seq).zip(t.chunks_mut(seq)) {
        trow[..seq - 1].copy_from_slice(&row[1..]);
    }
    t
}

pub struct Model<T> {
    pub cfg: ModelConfig,
    pub specs: Vec<ParamSpec>,
    pub index: ParamIndex,
    pub params: ParamStore<T>,
    rope: RopeTable<T>,
    /// Gemma 3's local-layer table (`rope_local_theta`).
    rope_local: Option<RopeTable<T>>,
    /// Debug mode: check every op's output for NaN/Inf and report where it first appears.
    pub check_finite: bool,
    /// Layer weights kept quantised and dequantised per layer (a memory-mapped GGUF).
    pub lazy: Option<lazy::LazyWeights>,
}

/// What a forward returns.
pub struct Forward<T> {
    /// `[batch·seq, vocab]`
    pub logits: Vec<T>,
    /// Mean cross-entropy over positions with a target.
    pub loss: f64,
}

impl<T: Real> Model<T> {
    /// A freshly initialised model.
    pub fn new(cfg: ModelConfig, seed: u64) -> Result<Self> {
        cfg.validate()?;
        let (specs, _) = param_specs(&cfg);
        let params = init_params(&specs, seed);
        Self::from_params(cfg, params)
    }

    /// Wrap existing parameters; names and shapes must be exactly those the config implies.
    pub fn from_params(cfg: ModelConfig, params: ParamStore<T>) -> Result<Self> {
        Self::from_params_except(cfg, params, &Default::default())
    }

    /// `from_params`, the tensors `lazy` standing empty (their data comes per layer).
    fn from_params_except(
        cfg: ModelConfig,
        params: ParamStore<T>,
        lazy: &std::collections::BTreeSet<usize>,
    ) -> Result<Self> {
        cfg.validate()?;
        let (specs, index) = param_specs(&cfg);
        if specs.len() != params.tensors.len() {
            bail!(
                "expected {} parameter tensors for this config, got {}",
                specs.len(),
                params.tensors.len()
            );
        }
        for (i, (s, (n, t))) in specs.iter().zip(params.names.iter().zip(&params.tensors)).enumerate() {
            let len = if lazy.contains(&i) {
                0
            } else {
                t.shape.iter().product::<usize>()
            };
            if &s.name != n || s.shape != t.shape || t.data.len() != len {
                bail!(
                    "parameter {n} {:?} does not match the config's {} {:?}",
                    t.shape,
                    s.name,
                    s.shape
                );
            }
        }
        let rope = RopeTable::for_config(&cfg, cfg.max_position_embeddings.clamp(1, 1 << 16));
        let rope_local = RopeTable::local_for_config(&cfg, rope.max_len);
        Ok(Model {
            cfg,
            specs,
            index,
            params,
            rope,
            rope_local,
            check_finite: false,
            lazy: None,
        })
    }

    pub fn zero_grads(&self) -> ParamStore<T> {
        ParamStore::zeros_like(&self.specs)
    }

    fn check_batch(&self, b: &Batch) -> Result<()> {
        let n = b.batch * b.seq;
        if n == 0 || b.ids.len() != n || b.targets.len() != n {
            bail!(
                "batch shape mismatch: {} ids, {} targets for {}×{}",
                b.ids.len(),
                b.targets.len(),
                b.batch,
                b.seq
            );
        }
        let v = self.cfg.vocab_size as u32;
        if let Some(&bad) = b.ids.iter().find(|&&i| i >= v) {
            bail!("token id {bad} is outside the vocabulary (size {v})");
        }
        if let Some(&bad) = b.targets.iter().find(|&&i| i >= v && i != IGNORE) {
            bail!("target id {bad} is outside the vocabulary (size {v})");
        }
        Ok(())
    }

    fn lm_head(&self) -> &[T] {
        &self.params.tensors[self.index.lm_head.unwrap_or(self.index.embed)].data
    }

    fn run(&self, b: &Batch, obs: &mut dyn Observer<T>, grads: Option<&mut ParamStore<T>>) -> Result<Forward<T>> {
        self.run_inner(b, obs, grads, true)
    }

    fn run_inner(
        &self,
        b: &Batch,
        obs: &mut dyn Observer<T>,
        grads: Option<&mut ParamStore<T>>,
        keep_logits: bool,
    ) -> Result<Forward<T>> {
        self.check_batch(b)?;
        let cfg = &self.cfg;
        let (n, dm, vocab) = (b.batch * b.seq, cfg.hidden_size, cfg.vocab_size);
        let (long_rope, long_local);
        let (rope, rope_local) = if b.seq <= self.rope.max_len {
            (&self.rope, self.rope_local.as_ref())
        } else {
            long_rope = RopeTable::for_config(cfg, b.seq);
            long_local = RopeTable::local_for_config(cfg, b.seq);
            (&long_rope, long_local.as_ref())
        };
        let ctx = Ctx {
            cfg,
            rope,
            rope_local,
            batch: b.batch,
            seq: b.seq,
            pos0: 0,
            check_finite: self.check_finite,
            first_bad: Default::default(),
        };
        let p = &self.params;
        let train = grads.is_some();
        if train {
            self.refuse_lazy_training()?;
        }
        let mut scratch = lazy::Scratch::default();

        let mut _t = scope("embedding");
        let mut x = vec![T::ZERO; n * dm];
        embedding_fwd(&p.tensors[self.index.embed].data, dm, b.ids, &mut x);
        scale_embeddings(cfg, &mut x);
        drop(_t);
        let mut inputs = Vec::new();
        let mut caches = Vec::new();
        for (l, li) in self.index.layers.iter().enumerate() {
            let lp = self.layer_params(l, &mut scratch)?;
            let (out, cache) = layer_fwd(&ctx, lp, li, &x, l, obs, None);
            if let Some((layer, op)) = ctx.first_bad.get() {
                return Err(NonFinite { layer, op }.into());
            }
            obs.layer_output(l, &out);
            let prev = std::mem::replace(&mut x, out);
            if train {
                inputs.push(prev);
                caches.push(cache);
            }
        }
        drop(scratch);
        _t = scope("head.fwd");
        let mut hf = vec![T::ZERO; n * dm];
        let mut rstd = vec![T::ZERO; n];
        let wn = &p.tensors[self.index.norm].data;
        rmsnorm_fwd(&x, wn, cfg.norm_style, cfg.rms_norm_eps, &mut hf, &mut rstd);
        let count = target_count(b.targets);
        let rows = (HEAD_CHUNK_ELEMS / vocab).clamp(1, n);
        let Some(grads) = grads else {
            if keep_logits {
                let mut logits = vec![T::ZERO; n * vocab];
                linear_fwd(&hf, self.lm_head(), n, dm, vocab, &mut logits);
                if let Some(c) = cfg.final_logit_softcap {
                    softcap_fwd(&mut logits, c);
                }
                let loss = cross_entropy(&mut logits, vocab, b.targets, false);
                return Ok(Forward { logits, loss });
            }
            let mut chunk = vec![T::ZERO; rows * vocab];
            let mut sum = 0.0;
            for r0 in (0..n).step_by(rows) {
                let r = rows.min(n - r0);
                linear_fwd(
                    &hf[r0 * dm..(r0 + r) * dm],
                    self.lm_head(),
                    r,
                    dm,
                    vocab,
                    &mut chunk[..r * vocab],
                );
                if let Some(c) = cfg.final_logit_softcap {
                    softcap_fwd(&mut chunk[..r * vocab], c);
                }
                sum += cross_entropy_sum(
                    &mut chunk[..r * vocab],
                    vocab,
                    &b.targets[r0..r0 + r],
                    false,
                    count.max(1),
                );
            }
            return Ok(Forward {
                logits: Vec::new(),
                loss: sum / count.max(1) as f64,
            });
        };
        // Training: LM head, loss and their backward fused over row chunks, so each chunk of
        // logits stays in cache instead of making four trips through memory.
        _t = scope("head");
        let head = self.index.lm_head.unwrap_or(self.index.embed);
        let mut chunk = vec![T::ZERO; rows * vocab];
        let mut dhf = vec![T::ZERO; n * dm];
        let mut loss_sum = 0.0;
        for r0 in (0..n).step_by(rows) {
            let r = rows.min(n - r0);
            let (h, lg) = (&hf[r0 * dm..(r0 + r) * dm], &mut chunk[..r * vocab]);
            linear_fwd(h, self.lm_head(), r, dm, vocab, lg);
            // soft-capped logits: keep them, the cap's derivative needs them after the loss
            let capped = cfg.final_logit_softcap.map(|c| {
                softcap_fwd(lg, c);
                (c, lg.to_vec())
            });
            if count > 0 {
                loss_sum += cross_entropy_sum(lg, vocab, &b.targets[r0..r0 + r], true, count);
            } else {
                lg.fill(T::ZERO);
            }
            if let Some((c, y)) = capped {
                softcap_bwd(&y, lg, c);
            }
            let dh = &mut dhf[r0 * dm..(r0 + r) * dm];
            linear_bwd(
                h,
                self.lm_head(),
                lg,
                r,
                dm,
                vocab,
                Some((dh, false)),
                &mut grads.tensors[head].data,
            );
        }
        drop(chunk);
        let loss = if count > 0 { loss_sum / count as f64 } else { 0.0 };
        let mut dx = vec![T::ZERO; n * dm];
        rmsnorm_bwd(
            &x,
            wn,
            cfg.norm_style,
            &rstd,
            &dhf,
            &mut dx,
            false,
            &mut grads.tensors[self.index.norm].data,
        );
        drop(_t);
        for (l, li) in self.index.layers.iter().enumerate().rev() {
            let cache = caches.pop().expect("one cache per layer");
            layer_bwd(&ctx, p, li, &inputs[l], &cache, &mut dx, grads);
        }
        _t = scope("embedding");
        scale_embeddings(cfg, &mut dx);
        embedding_bwd(&mut grads.tensors[self.index.embed].data, dm, b.ids, &dx);
        Ok(Forward {
            logits: Vec::new(),
            loss,
        })
    }

    /// Inference forward: logits and loss, with observers.
    pub fn forward(&self, b: &Batch, obs: &mut dyn Observer<T>) -> Result<Forward<T>> {
        self.run(b, obs, None)
    }

    /// Inference loss without materialising `[tokens, vocab]` logits (long inputs, big vocabularies).
    pub fn forward_loss(&self, b: &Batch, obs: &mut dyn Observer<T>) -> Result<f64> {
        Ok(self.run_inner(b, obs, None, false)?.loss)
    }

    /// Forward + backward; gradients are *added* to `grads` (so micro-batches accumulate).
    /// Returns the loss.
    pub fn forward_backward(&self, b: &Batch, grads: &mut ParamStore<T>, obs: &mut dyn Observer<T>) -> Result<f64> {
        Ok(self.run(b, obs, Some(grads))?.loss)
    }
}
