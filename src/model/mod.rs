//! The decoder-only model: embedding → layers → final norm → LM head → cross-entropy, with an
//! explicit backward through the same ops.

pub mod decode;
pub mod ffn;
pub mod graph;
pub mod kv;
mod layer;
mod layer_bwd;
pub mod lazy;
pub mod memory;
pub mod observer;
pub mod ops;
pub mod params;
mod step;

use crate::config::ModelConfig;
use crate::real::Real;
use anyhow::{bail, Result};
use observer::Observer;
use ops::cross_entropy::IGNORE;
use ops::rope::RopeTable;
use params::{init_params, param_specs, ParamIndex, ParamSpec, ParamStore};

/// Debug-mode report of where NaN/Inf first appeared in a forward.
#[derive(thiserror::Error, Debug, Clone, PartialEq)]
#[error("non-finite values (NaN/Inf) first appeared in layer {layer}, op {op}")]
pub struct NonFinite {
    pub layer: usize,
    pub op: &'static str,
}

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

impl Batch<'_> {
    /// Shapes agree and every id and target is in the vocabulary (`IGNORE` aside): the one
    /// check of a batch, whichever backend runs it.
    pub fn check(&self, vocab: usize) -> Result<()> {
        let n = self.batch * self.seq;
        if n == 0 || self.ids.len() != n || self.targets.len() != n {
            bail!(
                "batch shape mismatch: {} ids, {} targets for {}×{}",
                self.ids.len(),
                self.targets.len(),
                self.batch,
                self.seq
            );
        }
        let v = vocab as u32;
        if let Some(&bad) = self.ids.iter().find(|&&i| i >= v) {
            bail!("token id {bad} is outside the vocabulary (size {v})");
        }
        if let Some(&bad) = self.targets.iter().find(|&&i| i >= v && i != IGNORE) {
            bail!("target id {bad} is outside the vocabulary (size {v})");
        }
        Ok(())
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

    fn run(&self, b: &Batch, obs: &mut dyn Observer<T>, grads: Option<&mut ParamStore<T>>) -> Result<Forward<T>> {
        self.run_inner(b, obs, grads, true)
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
