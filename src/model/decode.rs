//! Incremental decoding with a KV cache, optionally a sliding window that keeps the first
//! `sinks` tokens (StreamingLLM). Gates need no cache: they come from the current token's X.
//!
//! The cache keeps keys after QK-norm but before RoPE, plus their rotated copies. RoPE positions
//! are cache slots: without eviction a slot is the absolute position; after an eviction the kept
//! tokens are re-indexed 0..len and their keys re-rotated, as StreamingLLM does.

use super::graph;
use super::kv::LayerKv;
use super::observer::NoObserver;
use super::ops::cross_entropy::IGNORE;
use super::ops::linear::linear_fwd;
use super::ops::rope::{rope_apply, RopeTable};
use super::step::CpuStep;
use super::step::Ctx;
use super::{Batch, Model};
use crate::real::Real;
use anyhow::{bail, Result};

#[derive(Clone, Debug)]
pub struct KvCache<T> {
    pub layers: Vec<LayerKv<T>>,
    /// Tokens currently cached.
    pub len: usize,
    /// Tokens fed so far (including evicted ones).
    pub seen: usize,
    /// Keep at most this many tokens (`None`: unbounded).
    pub window: Option<usize>,
    /// Tokens at the start that are never evicted.
    pub sinks: usize,
    rope: RopeTable<T>,
    /// The windowed layers' table when they have their own θ (Gemma 3).
    rope_local: Option<RopeTable<T>>,
    /// Per layer: whether it rotates with `rope_local`.
    local: Vec<bool>,
}

impl<T: Real> KvCache<T> {
    pub fn new(model: &Model<T>, window: Option<usize>, sinks: usize) -> Result<Self> {
        if let Some(w) = window {
            if w <= sinks {
                bail!("the KV window ({w}) must be larger than the number of sink tokens ({sinks})");
            }
        }
        let max_len = model.cfg.max_position_embeddings.clamp(16, 1 << 16);
        Ok(KvCache {
            layers: vec![LayerKv::default(); model.cfg.num_layers],
            len: 0,
            seen: 0,
            window,
            sinks,
            rope: RopeTable::for_config(&model.cfg, max_len),
            rope_local: RopeTable::local_for_config(&model.cfg, max_len),
            local: (0..model.cfg.num_layers).map(|l| model.cfg.local_rope_at(l)).collect(),
        })
    }

    /// Evict so that `m` more tokens fit in the window.
    fn make_room(&mut self, m: usize, kvd: usize, heads: usize, head_dim: usize) {
        let Some(w) = self.window else { return };
        if self.len + m <= w {
            return;
        }
        let keep_tail = w.saturating_sub(m).saturating_sub(self.sinks);
        let sinks = self.sinks.min(self.len);
        let cut = (sinks..self.len - keep_tail.min(self.len - sinks)).len();
        for l in &mut self.layers {
            for buf in [&mut l.k_raw, &mut l.v] {
                buf.drain(sinks * kvd..(sinks + cut) * kvd);
            }
            l.k_rot = l.k_raw.clone();
        }
        self.len -= cut;
        let n = self.len;
        for (l, &local) in self.layers.iter_mut().zip(&self.local) {
            let table = match &self.rope_local {
                Some(t) if local => t,
                _ => &self.rope,
            };
            rope_apply(table, &mut l.k_rot, heads, head_dim, n.max(1), 0, false);
        }
    }

    fn ensure_rope(&mut self, cfg: &crate::config::ModelConfig, upto: usize) {
        if upto > self.rope.max_len {
            self.rope = RopeTable::for_config(cfg, (upto * 2).min(1 << 20));
            self.rope_local = RopeTable::local_for_config(cfg, self.rope.max_len);
        }
    }
}

impl<T: Real> Model<T> {
    /// Feed `ids` (one sequence) through the cache; returns their logits `[ids.len(), vocab]`.
    pub fn decode(&self, cache: &mut KvCache<T>, ids: &[u32]) -> Result<Vec<T>> {
        let cfg = &self.cfg;
        let m = ids.len();
        if m == 0 {
            return Ok(vec![]);
        }
        if let Some(w) = cache.window {
            if m + cache.sinks >= w {
                bail!(
                    "feed at most {} tokens at a time with a window of {w} and {} sinks",
                    w - cache.sinks - 1,
                    cache.sinks
                );
            }
        }
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= cfg.vocab_size) {
            bail!("token id {bad} is outside the vocabulary (size {})", cfg.vocab_size);
        }
        cache.make_room(m, cfg.kv_dim(), cfg.num_kv_heads, cfg.head_dim);
        cache.ensure_rope(cfg, cache.len + m);
        let (dm, vocab) = (cfg.hidden_size, cfg.vocab_size);
        let ctx = Ctx {
            cfg,
            rope: &cache.rope,
            rope_local: cache.rope_local.as_ref(),
            batch: 1,
            seq: m,
            pos0: cache.len,
            check_finite: false,
            first_bad: Default::default(),
        };
        let targets = vec![IGNORE; m];
        let b = Batch {
            ids,
            targets: &targets,
            batch: 1,
            seq: m,
        };
        let mut layers = std::mem::take(&mut cache.layers);
        let mut obs = NoObserver;
        let mut step = CpuStep::new(ctx, self, &b, &mut obs);
        step.kv = Some(&mut layers);
        let run = graph::forward(&mut step, cfg.num_layers);
        let hf = std::mem::take(&mut step.hf);
        drop(step);
        cache.layers = layers;
        run?;
        cache.len += m;
        cache.seen += m;
        let mut logits = vec![T::ZERO; m * vocab];
        let head = self.index.lm_head.unwrap_or(self.index.embed);
        linear_fwd(&hf, &self.params.tensors[head].data, m, dm, vocab, &mut logits);
        if let Some(c) = cfg.final_logit_softcap {
            super::ops::softcap::softcap_fwd(&mut logits, c);
        }
        Ok(logits)
    }
}
