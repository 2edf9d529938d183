//! The CPU backend of the decoder graph (`graph::DecoderOps`): one forward (training,
//! evaluation, analysis with observers, or decoding through a KV cache) and its backward, over
//! host vectors. This file holds the step's state (what the layers save, named as in `graph`)
//! and the ops around the layers (embedding, final norm, LM head and loss); the layer ops are
//! `CpuStep` methods in `layer` (forward) and `layer_bwd`.

use super::ffn::FfnCache;
use super::graph::DecoderOps;
use super::kv::LayerKv;
use super::lazy::Scratch;
use super::observer::Observer;
use super::ops::attention::AttnShape;
use super::ops::cross_entropy::{cross_entropy, cross_entropy_sum, target_count};
use super::ops::embedding::{embedding_bwd, embedding_fwd};
use super::ops::linear::{linear_bwd, linear_fwd};
use super::ops::rmsnorm::{rmsnorm_bwd, rmsnorm_fwd};
use super::ops::rope::RopeTable;
use super::ops::softcap::{softcap_bwd, softcap_fwd};
use super::params::ParamStore;
use super::{graph, scale_embeddings, Batch, Forward, Model, NonFinite};
use crate::backend::profile::scope;
use crate::config::{GateConfig, GateGeometry, GatePosition, ModelConfig};
use crate::real::Real;
use anyhow::{Context, Result};

/// Logit elements per chunk of the fused LM-head/loss backward (16 MB of f32: fits in L3).
const HEAD_CHUNK_ELEMS: usize = 4 << 20;

/// Shapes shared by every layer of one forward call.
pub struct Ctx<'a, T> {
    pub cfg: &'a ModelConfig,
    pub rope: &'a RopeTable<T>,
    /// The windowed layers' table when they have their own θ (Gemma 3's local layers).
    pub rope_local: Option<&'a RopeTable<T>>,
    pub batch: usize,
    pub seq: usize,
    /// RoPE position of the first token (non-zero when decoding after a KV cache).
    pub pos0: usize,
    /// Debug mode: record the first (layer, op) whose output holds NaN or Inf.
    pub check_finite: bool,
    pub first_bad: std::cell::Cell<Option<(usize, &'static str)>>,
}

impl<T: Real> Ctx<'_, T> {
    /// In debug mode, remember the first op whose output is not finite.
    pub(super) fn check(&self, layer: usize, op: &'static str, buf: &[T]) {
        if self.check_finite && self.first_bad.get().is_none() && buf.iter().any(|x| !x.is_finite()) {
            self.first_bad.set(Some((layer, op)));
        }
    }
}

impl<T> Ctx<'_, T> {
    pub(super) fn rows(&self) -> usize {
        self.batch * self.seq
    }
    pub(super) fn attn_shape(&self, layer: usize) -> AttnShape {
        AttnShape {
            batch: self.batch,
            seq: self.seq,
            heads: self.cfg.num_heads,
            kv_heads: self.cfg.num_kv_heads,
            head_dim: self.cfg.head_dim,
            window: self.cfg.window_at(layer),
            softcap: self.cfg.attn_logit_softcap,
            scalar: self.cfg.query_pre_attn_scalar,
        }
    }
    /// The RoPE table of layer `layer`.
    pub(super) fn rope_at(&self, layer: usize) -> &RopeTable<T> {
        match self.rope_local {
            Some(t) if self.cfg.local_rope_at(layer) => t,
            _ => self.rope,
        }
    }
    pub(super) fn gate(&self) -> Option<(&GateConfig, GateGeometry)> {
        Some((self.cfg.gate.as_ref()?, self.cfg.gate_geometry()?))
    }
    /// Weight of one layer's auxiliary MoE losses: they are averaged over the MoE layers.
    pub(super) fn aux_scale(&self) -> f64 {
        let moe_layers = (0..self.cfg.num_layers)
            .filter(|&l| self.cfg.moe_at(l).is_some())
            .count();
        1.0 / moe_layers.max(1) as f64
    }
    pub(super) fn gate_at(&self, pos: GatePosition) -> Option<(&GateConfig, GateGeometry)> {
        self.gate().filter(|(g, _)| g.position == pos)
    }
}

/// Activations one layer's forward saves for its backward (named as in `graph`). `*_ungated`
/// are kept only where a gate follows them.
#[derive(Default)]
pub struct LayerCache<T> {
    pub(super) h1: Vec<T>,
    pub(super) rstd1: Vec<T>,
    /// Gate logits `[rows, scores]` (broadcast rows for the input-independent gate).
    pub(super) z: Vec<T>,
    pub(super) q_ungated: Option<Vec<T>>,
    pub(super) k_ungated: Option<Vec<T>>,
    pub(super) v_ungated: Option<Vec<T>>,
    /// q and k after any gate, before QK-norm; v after any gate.
    pub(super) q: Vec<T>,
    pub(super) k: Vec<T>,
    pub(super) v: Vec<T>,
    pub(super) rstd_q: Vec<T>,
    pub(super) rstd_k: Vec<T>,
    /// q and k after QK-norm and RoPE.
    pub(super) qr: Vec<T>,
    pub(super) kr: Vec<T>,
    /// SDPA output.
    pub(super) o: Vec<T>,
    pub(super) lse: Vec<T>,
    /// `o` after the G1 gate (the o_proj input), if gated there.
    pub(super) y: Option<Vec<T>>,
    pub(super) a_ungated: Option<Vec<T>>,
    /// Attention output before / MLP output before Gemma's post-norms, with their rstd.
    pub(super) a_pre: Option<(Vec<T>, Vec<T>)>,
    pub(super) f_pre: Option<(Vec<T>, Vec<T>)>,
    pub(super) x1: Vec<T>,
    pub(super) rstd2: Vec<T>,
    pub(super) h2: Vec<T>,
    pub(super) ffn: Option<FfnCache<T>>,
}

impl<T> LayerCache<T> {
    /// The o_proj input: the gated SDPA output, or the SDPA output itself.
    pub(super) fn o_proj_input(&self) -> &[T] {
        self.y.as_ref().unwrap_or(&self.o)
    }
}

/// Gradients inside one layer's backward (named as in `graph`).
#[derive(Default)]
pub struct LayerGrads<T> {
    pub(super) dh2: Vec<T>,
    pub(super) dy: Vec<T>,
    pub(super) dqr: Vec<T>,
    pub(super) dkr: Vec<T>,
    pub(super) dv: Vec<T>,
    pub(super) dz: Vec<T>,
    pub(super) dq: Vec<T>,
    pub(super) dk: Vec<T>,
    pub(super) dh1: Vec<T>,
}

pub(super) fn zeros<T: Real>(n: usize) -> Vec<T> {
    vec![T::ZERO; n]
}

/// RMSNorm of the rows of `x` (width `w.len()`): the output and each row's rstd.
pub(super) fn norm<T: Real>(cfg: &ModelConfig, x: &[T], w: &[T]) -> (Vec<T>, Vec<T>) {
    let (mut y, mut rstd) = (zeros(x.len()), zeros(x.len() / w.len()));
    rmsnorm_fwd(x, w, cfg.norm_style, cfg.rms_norm_eps, &mut y, &mut rstd);
    (y, rstd)
}

/// RMSNorm's backward for the gain `wi`: `dx` (added to with `acc`) from `dy`, the gain's
/// gradient accumulated.
#[allow(clippy::too_many_arguments)]
pub(super) fn norm_back<T: Real>(
    cfg: &ModelConfig,
    p: &ParamStore<T>,
    wi: usize,
    (x, rstd): (&[T], &[T]),
    dy: &[T],
    dx: &mut [T],
    acc: bool,
    grads: &mut ParamStore<T>,
) {
    let (w, g) = (&p.tensors[wi].data, &mut grads.tensors[wi].data);
    rmsnorm_bwd(x, w, cfg.norm_style, rstd, dy, dx, acc, g);
}

impl<T: Real> Model<T> {
    /// One step on the CPU: the loss, and with `grads` the gradients added to them; with
    /// `keep_logits` all logits (else the loss is summed chunk by chunk).
    pub(super) fn run_inner(
        &self,
        b: &Batch,
        obs: &mut dyn Observer<T>,
        grads: Option<&mut ParamStore<T>>,
        keep_logits: bool,
    ) -> Result<Forward<T>> {
        b.check(self.cfg.vocab_size)?;
        let cfg = &self.cfg;
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
        let train = grads.is_some();
        if train {
            self.refuse_lazy_training()?;
        }
        let mut step = CpuStep::new(ctx, self, b, obs);
        step.grads = grads;
        step.keep_logits = keep_logits;
        graph::step(&mut step, cfg.num_layers, train)?;
        Ok(Forward {
            logits: std::mem::take(&mut step.logits),
            loss: step.loss,
        })
    }
}

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
        let wn = &self.model.params.tensors[self.model.index.norm].data;
        (self.hf, self.rstd_f) = norm(self.ctx.cfg, &self.x, wn);
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
        self.dx = zeros(self.x.len());
        let saved = (&self.x[..], &self.rstd_f[..]);
        norm_back(
            cfg,
            &m.params,
            m.index.norm,
            saved,
            &self.dhf,
            &mut self.dx,
            false,
            grads,
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
