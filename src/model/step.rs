//! The CPU backend of the decoder graph (`graph::DecoderOps`): one forward (training,
//! evaluation, analysis with observers, or decoding through a KV cache) and its backward, over
//! host vectors. The layer ops live in `layer` (forward) and `layer_bwd`; this file holds the
//! step's state and the ops around the layers (embedding, final norm, LM head and loss).

use super::graph::DecoderOps;
use super::kv::LayerKv;
use super::layer::{zeros, Ctx, LayerCache};
use super::layer_bwd::LayerGrads;
use super::lazy::Scratch;
use super::observer::Observer;
use super::ops::cross_entropy::{cross_entropy, cross_entropy_sum, target_count};
use super::ops::embedding::{embedding_bwd, embedding_fwd};
use super::ops::linear::{linear_bwd, linear_fwd};
use super::ops::rmsnorm::{rmsnorm_bwd, rmsnorm_fwd};
use super::ops::softcap::{softcap_bwd, softcap_fwd};
use super::params::ParamStore;
use super::{scale_embeddings, Batch, Model, NonFinite};
use crate::backend::profile::scope;
use crate::real::Real;
use anyhow::{Context, Result};

/// Logit elements per chunk of the fused LM-head/loss backward (16 MB of f32: fits in L3).
const HEAD_CHUNK_ELEMS: usize = 4 << 20;

/// One CPU step's inputs and state.
pub(crate) struct CpuStep<'a, T> {
    pub ctx: Ctx<'a, T>,
    pub model: &'a Model<T>,
    pub batch: &'a Batch<'a>,
    pub obs: &'a mut dyn Observer<T>,
    /// Decoding: each layer's KV cache, which the forward extends.
    pub kv: Option<&'a mut [LayerKv<T>]>,
    /// Training: the gradients the backward adds to (and the activations are kept for it).
    pub grads: Option<&'a mut ParamStore<T>>,
    /// Evaluation: keep the `[rows, vocab]` logits (else the loss is summed chunk by chunk).
    pub keep_logits: bool,
    /// A quantised model's current layer, dequantised.
    pub(super) scratch: Scratch<T>,
    /// The residual stream: the current layer's input.
    pub(super) x: Vec<T>,
    /// The current layer's forward activations, and its `a`, `f` and `out`.
    pub(super) cur: LayerCache<T>,
    pub(super) a: Vec<T>,
    pub(super) f: Vec<T>,
    pub(super) out: Vec<T>,
    /// Training: each layer's input and activations, for the backward.
    pub(super) saved: Vec<(Vec<T>, LayerCache<T>)>,
    pub(super) hf: Vec<T>,
    rstd_f: Vec<T>,
    pub logits: Vec<T>,
    pub loss: f64,
    dhf: Vec<T>,
    /// d(loss)/d(residual stream), from the head down to the embedding
    pub(super) dx: Vec<T>,
    pub(super) back: LayerGrads<T>,
}

impl<'a, T: Real> CpuStep<'a, T> {
    pub fn new(ctx: Ctx<'a, T>, model: &'a Model<T>, batch: &'a Batch<'a>, obs: &'a mut dyn Observer<T>) -> Self {
        CpuStep {
            ctx,
            model,
            batch,
            obs,
            kv: None,
            grads: None,
            keep_logits: false,
            scratch: Scratch::default(),
            x: Vec::new(),
            cur: LayerCache::default(),
            a: Vec::new(),
            f: Vec::new(),
            out: Vec::new(),
            saved: Vec::new(),
            hf: Vec::new(),
            rstd_f: Vec::new(),
            logits: Vec::new(),
            loss: 0.0,
            dhf: Vec::new(),
            dx: Vec::new(),
            back: LayerGrads::default(),
        }
    }

    fn lm_head(&self) -> &'a [T] {
        let m = self.model;
        &m.params.tensors[m.index.lm_head.unwrap_or(m.index.embed)].data
    }

    /// Logits and loss without a backward: all logits kept, or the loss summed chunk by chunk.
    fn head_loss_only(&mut self) {
        let (cfg, n) = (self.ctx.cfg, self.ctx.rows());
        let (dm, vocab, targets) = (cfg.hidden_size, cfg.vocab_size, self.batch.targets);
        if self.keep_logits {
            let mut logits = zeros(n * vocab);
            linear_fwd(&self.hf, self.lm_head(), n, dm, vocab, &mut logits);
            if let Some(c) = cfg.final_logit_softcap {
                softcap_fwd(&mut logits, c);
            }
            self.loss = cross_entropy(&mut logits, vocab, targets, false);
            self.logits = logits;
            return;
        }
        let count = target_count(targets);
        let rows = (HEAD_CHUNK_ELEMS / vocab).clamp(1, n);
        let mut chunk = zeros(rows * vocab);
        let mut sum = 0.0;
        for r0 in (0..n).step_by(rows) {
            let r = rows.min(n - r0);
            let lg = &mut chunk[..r * vocab];
            linear_fwd(&self.hf[r0 * dm..(r0 + r) * dm], self.lm_head(), r, dm, vocab, lg);
            if let Some(c) = cfg.final_logit_softcap {
                softcap_fwd(lg, c);
            }
            sum += cross_entropy_sum(lg, vocab, &targets[r0..r0 + r], false, count.max(1));
        }
        self.loss = sum / count.max(1) as f64;
    }

    /// Training: LM head, loss and their backward fused over row chunks, so each chunk of
    /// logits stays in cache instead of making four trips through memory.
    fn head_loss_backward(&mut self) -> Result<()> {
        let (cfg, n) = (self.ctx.cfg, self.ctx.rows());
        let (dm, vocab, targets) = (cfg.hidden_size, cfg.vocab_size, self.batch.targets);
        let head = self.model.index.lm_head.unwrap_or(self.model.index.embed);
        let lm_head = self.lm_head();
        let grads = self.grads.as_deref_mut().context("a backward without gradients")?;
        let count = target_count(targets);
        let rows = (HEAD_CHUNK_ELEMS / vocab).clamp(1, n);
        let mut chunk = zeros(rows * vocab);
        self.dhf = zeros(n * dm);
        let mut loss_sum = 0.0;
        for r0 in (0..n).step_by(rows) {
            let r = rows.min(n - r0);
            let (h, lg) = (&self.hf[r0 * dm..(r0 + r) * dm], &mut chunk[..r * vocab]);
            linear_fwd(h, lm_head, r, dm, vocab, lg);
            // soft-capped logits: keep them, the cap's derivative needs them after the loss
            let capped = cfg.final_logit_softcap.map(|c| {
                softcap_fwd(lg, c);
                (c, lg.to_vec())
            });
            if count > 0 {
                loss_sum += cross_entropy_sum(lg, vocab, &targets[r0..r0 + r], true, count);
            } else {
                lg.fill(T::ZERO);
            }
            if let Some((c, y)) = capped {
                softcap_bwd(&y, lg, c);
            }
            let dh = &mut self.dhf[r0 * dm..(r0 + r) * dm];
            linear_bwd(
                h,
                lm_head,
                lg,
                r,
                dm,
                vocab,
                Some((dh, false)),
                &mut grads.tensors[head].data,
            );
        }
        self.loss = if count > 0 { loss_sum / count as f64 } else { 0.0 };
        Ok(())
    }
}

impl<T: Real> DecoderOps for CpuStep<'_, T> {
    fn embed(&mut self) -> Result<()> {
        let _t = scope("embedding");
        let (m, dm) = (self.model, self.ctx.cfg.hidden_size);
        self.x = zeros(self.ctx.rows() * dm);
        embedding_fwd(&m.params.tensors[m.index.embed].data, dm, self.batch.ids, &mut self.x);
        scale_embeddings(self.ctx.cfg, &mut self.x);
        Ok(())
    }

    fn enter_layer(&mut self, l: usize) -> Result<()> {
        self.model.layer_params(l, &mut self.scratch)?;
        Ok(())
    }

    fn leave_layer(&mut self, l: usize) -> Result<()> {
        if let Some((layer, op)) = self.ctx.first_bad.get() {
            return Err(NonFinite { layer, op }.into());
        }
        self.obs.layer_output(l, &self.out);
        let input = std::mem::replace(&mut self.x, std::mem::take(&mut self.out));
        let cache = std::mem::take(&mut self.cur);
        if self.grads.is_some() {
            self.saved.push((input, cache));
        }
        Ok(())
    }

    fn input_norm(&mut self, l: usize) -> Result<()> {
        self.input_norm_fwd(l);
        Ok(())
    }
    fn qkv(&mut self, l: usize) -> Result<()> {
        self.qkv_fwd(l);
        Ok(())
    }
    fn qk_norm_rope(&mut self, l: usize) -> Result<()> {
        self.qk_norm_rope_fwd(l);
        Ok(())
    }
    fn attention(&mut self, l: usize) -> Result<()> {
        self.attention_fwd(l);
        Ok(())
    }
    fn out_proj(&mut self, l: usize) -> Result<()> {
        self.out_proj_fwd(l);
        Ok(())
    }
    fn residual_norm(&mut self, l: usize) -> Result<()> {
        self.residual_norm_fwd(l);
        Ok(())
    }
    fn mlp(&mut self, l: usize) -> Result<()> {
        self.mlp_fwd(l);
        Ok(())
    }
    fn residual(&mut self, _l: usize) -> Result<()> {
        self.residual_fwd();
        Ok(())
    }

    fn final_norm(&mut self) -> Result<()> {
        let _t = scope("head.fwd");
        let (cfg, n) = (self.ctx.cfg, self.ctx.rows());
        let wn = &self.model.params.tensors[self.model.index.norm].data;
        self.hf = zeros(n * cfg.hidden_size);
        self.rstd_f = zeros(n);
        rmsnorm_fwd(
            &self.x,
            wn,
            cfg.norm_style,
            cfg.rms_norm_eps,
            &mut self.hf,
            &mut self.rstd_f,
        );
        Ok(())
    }

    fn head_loss(&mut self, backward: bool) -> Result<()> {
        let _t = scope("head");
        if backward {
            self.head_loss_backward()
        } else {
            self.head_loss_only();
            Ok(())
        }
    }

    fn final_norm_bwd(&mut self) -> Result<()> {
        let _t = scope("head");
        let (cfg, m) = (self.ctx.cfg, self.model);
        let grads = self.grads.as_deref_mut().context("a backward without gradients")?;
        let (w, g) = (
            &m.params.tensors[m.index.norm].data,
            &mut grads.tensors[m.index.norm].data,
        );
        self.dx = zeros(self.x.len());
        rmsnorm_bwd(
            &self.x,
            w,
            cfg.norm_style,
            &self.rstd_f,
            &self.dhf,
            &mut self.dx,
            false,
            g,
        );
        self.dhf = Vec::new();
        Ok(())
    }

    fn mlp_bwd(&mut self, l: usize) -> Result<()> {
        self.mlp_bwd_op(l)
    }
    fn residual_norm_bwd(&mut self, l: usize) -> Result<()> {
        self.residual_norm_bwd_op(l)
    }
    fn out_proj_bwd(&mut self, l: usize) -> Result<()> {
        self.out_proj_bwd_op(l)
    }
    fn attention_bwd(&mut self, l: usize) -> Result<()> {
        self.attention_bwd_op(l)
    }
    fn qk_norm_rope_bwd(&mut self, l: usize) -> Result<()> {
        self.qk_norm_rope_bwd_op(l)
    }
    fn qkv_bwd(&mut self, l: usize) -> Result<()> {
        self.qkv_bwd_op(l)
    }
    fn input_norm_bwd(&mut self, l: usize) -> Result<()> {
        self.input_norm_bwd_op(l)
    }

    fn embed_bwd(&mut self) -> Result<()> {
        let _t = scope("embedding");
        let (cfg, m) = (self.ctx.cfg, self.model);
        let grads = self.grads.as_deref_mut().context("a backward without gradients")?;
        scale_embeddings(cfg, &mut self.dx);
        let dm = cfg.hidden_size;
        embedding_bwd(&mut grads.tensors[m.index.embed].data, dm, self.batch.ids, &self.dx);
        Ok(())
    }
}
