//! One pre-norm decoder layer's forward ops on the CPU (attention with GQA, QK-norm, RoPE,
//! causal SDPA and a gate at G1–G5; a SwiGLU/GeGLU or MoE MLP), each saving what its backward
//! (`layer_bwd`) needs. The order they run in is `graph::layer_forward`.

use super::ffn::{ffn_fwd, router_stats, FfnCache};
use super::kv::attention_cached;
use super::ops::attention::{attention_fwd, AttnProbes, AttnShape};
use super::ops::gate::{gate_fwd, gate_scores};
use super::ops::linear::linear_fwd;
use super::ops::rmsnorm::rmsnorm_fwd;
use super::ops::rope::{rope_apply, RopeTable};
use super::step::CpuStep;
use crate::backend::cpu::add_assign;
use crate::backend::profile::scope;
use crate::config::{GateConfig, GateGeometry, GatePosition, ModelConfig};
use crate::real::Real;

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

/// Gemma's post-norm `y ← norm(y)` when the layer has it, keeping the input and rstd for backward.
fn post_norm_here<T: Real>(cfg: &ModelConfig, w: Option<&[T]>, y: &mut Vec<T>) -> Option<(Vec<T>, Vec<T>)> {
    let w = w?;
    let mut rstd = zeros(y.len() / w.len());
    let mut out = zeros(y.len());
    rmsnorm_fwd(y, w, cfg.norm_style, cfg.rms_norm_eps, &mut out, &mut rstd);
    Some((std::mem::replace(y, out), rstd))
}

pub(super) fn zeros<T: Real>(n: usize) -> Vec<T> {
    vec![T::ZERO; n]
}

/// `y[r, :] += b` for every row of `y`.
fn add_bias<T: Real>(y: &mut [T], b: &[T]) {
    for row in y.chunks_mut(b.len()) {
        row.iter_mut().zip(b).for_each(|(a, &x)| *a += x);
    }
}

/// Apply the gate if it sits at `pos`, keeping the ungated tensor for backward.
fn gate_here<T: Real>(ctx: &Ctx<T>, pos: GatePosition, y: &mut [T], z: &[T]) -> Option<Vec<T>> {
    let (g, geo) = ctx.gate_at(pos)?;
    let keep = y.to_vec();
    gate_fwd(g, &geo, y, z);
    Some(keep)
}

/// The forward ops of `graph::DecoderOps` (each documented there), on `self.cur`.
impl<T: Real> CpuStep<'_, T> {
    pub(super) fn input_norm_fwd(&mut self, l: usize) {
        let _t = scope("fwd.norm");
        let (cfg, n) = (self.ctx.cfg, self.ctx.rows());
        let w = &self.model.params_for_layer(&self.scratch).tensors[self.model.index.layers[l].input_norm].data;
        let c = &mut self.cur;
        *c = LayerCache::default();
        c.h1 = zeros(n * cfg.hidden_size);
        c.rstd1 = zeros(n);
        rmsnorm_fwd(&self.x, w, cfg.norm_style, cfg.rms_norm_eps, &mut c.h1, &mut c.rstd1);
    }

    pub(super) fn qkv_fwd(&mut self, l: usize) {
        let _t = scope("fwd.qkv");
        let (ctx, li, p) = (
            &self.ctx,
            &self.model.index.layers[l],
            self.model.params_for_layer(&self.scratch),
        );
        let (cfg, n) = (ctx.cfg, ctx.rows());
        let (dm, qd, kvd) = (cfg.hidden_size, cfg.q_dim(), cfg.kv_dim());
        let w = |i: usize| &p.tensors[i].data[..];
        let c = &mut self.cur;
        let (mut q, mut k, mut v) = (zeros(n * qd), zeros(n * kvd), zeros(n * kvd));
        linear_fwd(&c.h1, w(li.q_proj), n, dm, qd, &mut q);
        linear_fwd(&c.h1, w(li.k_proj), n, dm, kvd, &mut k);
        linear_fwd(&c.h1, w(li.v_proj), n, dm, kvd, &mut v);
        if let Some([bq, bk, bv]) = li.qkv_bias {
            add_bias(&mut q, w(bq));
            add_bias(&mut k, w(bk));
            add_bias(&mut v, w(bv));
        }
        // Gate logits come from X (the normed block input) and never pass through q_norm/RoPE.
        if let (Some((g, geo)), Some(gi)) = (ctx.gate(), li.gate) {
            let s = geo.scores();
            if g.input_independent {
                c.z = w(gi).repeat(n);
            } else {
                c.z = zeros(n * s);
                linear_fwd(&c.h1, w(gi), n, dm, s, &mut c.z);
            }
            if self.obs.wants_gate_scores() {
                self.obs.gate_scores(l, &gate_scores(g.activation, &c.z), &geo);
            }
        }
        c.q_ungated = gate_here(ctx, GatePosition::G4, &mut q, &c.z);
        c.k_ungated = gate_here(ctx, GatePosition::G3, &mut k, &c.z);
        c.v_ungated = gate_here(ctx, GatePosition::G2, &mut v, &c.z);
        ctx.check(l, "q_proj", &q);
        ctx.check(l, "k_proj", &k);
        ctx.check(l, "v_proj", &v);
        ctx.check(l, "gate_proj", &c.z);
        (c.q, c.k, c.v) = (q, k, v);
    }

    pub(super) fn qk_norm_rope_fwd(&mut self, l: usize) {
        let _t = scope("fwd.qknorm_rope");
        let (ctx, li, p) = (
            &self.ctx,
            &self.model.index.layers[l],
            self.model.params_for_layer(&self.scratch),
        );
        let (cfg, n) = (ctx.cfg, ctx.rows());
        let w = |i: usize| &p.tensors[i].data[..];
        let c = &mut self.cur;
        c.rstd_q = zeros(n * cfg.num_heads);
        c.rstd_k = zeros(n * cfg.num_kv_heads);
        (c.qr, c.kr) = match (li.q_norm, li.k_norm) {
            (Some(qn), Some(kn)) => {
                let (mut qr, mut kr) = (zeros(c.q.len()), zeros(c.k.len()));
                rmsnorm_fwd(&c.q, w(qn), cfg.norm_style, cfg.rms_norm_eps, &mut qr, &mut c.rstd_q);
                rmsnorm_fwd(&c.k, w(kn), cfg.norm_style, cfg.rms_norm_eps, &mut kr, &mut c.rstd_k);
                (qr, kr)
            }
            _ => (c.q.clone(), c.k.clone()),
        };
        if let Some(kv) = self.kv.as_deref_mut() {
            // the cache keeps un-rotated keys so a sliding window can re-index positions
            kv[l].k_raw.extend_from_slice(&c.kr);
        }
        let rope = ctx.rope_at(l);
        rope_apply(rope, &mut c.qr, cfg.num_heads, cfg.head_dim, ctx.seq, ctx.pos0, false);
        rope_apply(
            rope,
            &mut c.kr,
            cfg.num_kv_heads,
            cfg.head_dim,
            ctx.seq,
            ctx.pos0,
            false,
        );
    }

    pub(super) fn attention_fwd(&mut self, l: usize) {
        let _t = scope("fwd.attention");
        let (ctx, obs, c) = (&self.ctx, &mut *self.obs, &mut self.cur);
        let cfg = ctx.cfg;
        let sh = ctx.attn_shape(l);
        let heads_rows = ctx.batch * cfg.num_heads * ctx.seq;
        c.o = zeros(ctx.rows() * cfg.q_dim());
        c.lse = zeros(heads_rows);
        let mut probs = obs.wants_attn_probs(l).then(|| zeros(heads_rows * ctx.seq));
        let mut key0 = obs.wants_key0(l).then(|| zeros(heads_rows));
        if let Some(kv) = self.kv.as_deref_mut() {
            let kv = &mut kv[l];
            kv.k_rot.extend_from_slice(&c.kr);
            kv.v.extend_from_slice(&c.v);
            attention_cached(&c.qr, kv, ctx.pos0, sh, &mut c.o);
        } else {
            let probes = AttnProbes {
                probs: probs.as_deref_mut(),
                key0: key0.as_deref_mut(),
            };
            attention_fwd(sh, &c.qr, &c.kr, &c.v, &mut c.o, &mut c.lse, probes);
        }
        if let Some(p) = probs {
            obs.attn_probs(l, &p);
        }
        if let Some(k) = key0 {
            obs.key0(l, &k);
        }
        ctx.check(l, "attention (SDPA)", &c.o);
        // G1: keep the SDPA output for attention backward and gate a copy for o_proj
        c.y = ctx.gate_at(GatePosition::G1).map(|(g, geo)| {
            let mut y = c.o.clone();
            gate_fwd(g, &geo, &mut y, &c.z);
            y
        });
        if obs.wants_attn_output() {
            obs.attn_output(l, c.o_proj_input());
        }
    }

    pub(super) fn out_proj_fwd(&mut self, l: usize) {
        let _t = scope("fwd.o_proj");
        let (ctx, li, p) = (
            &self.ctx,
            &self.model.index.layers[l],
            self.model.params_for_layer(&self.scratch),
        );
        let (cfg, n) = (ctx.cfg, ctx.rows());
        let w = |i: usize| &p.tensors[i].data[..];
        let c = &mut self.cur;
        let mut a = zeros(n * cfg.hidden_size);
        linear_fwd(c.o_proj_input(), w(li.o_proj), n, cfg.q_dim(), cfg.hidden_size, &mut a);
        c.a_ungated = gate_here(ctx, GatePosition::G5, &mut a, &c.z);
        ctx.check(l, "o_proj (after any gate)", &a);
        c.a_pre = post_norm_here(cfg, li.attn_out_norm.map(w), &mut a);
        self.a = a;
    }

    pub(super) fn residual_norm_fwd(&mut self, l: usize) {
        let _t = scope("fwd.norm");
        let (cfg, n) = (self.ctx.cfg, self.ctx.rows());
        let w = &self.model.params_for_layer(&self.scratch).tensors[self.model.index.layers[l].post_norm].data;
        let c = &mut self.cur;
        c.x1 = self.x.clone();
        add_assign(&mut c.x1, &std::mem::take(&mut self.a));
        c.h2 = zeros(n * cfg.hidden_size);
        c.rstd2 = zeros(n);
        rmsnorm_fwd(&c.x1, w, cfg.norm_style, cfg.rms_norm_eps, &mut c.h2, &mut c.rstd2);
    }

    pub(super) fn mlp_fwd(&mut self, l: usize) {
        let _t = scope("fwd.mlp");
        let (ctx, li, p) = (
            &self.ctx,
            &self.model.index.layers[l],
            self.model.params_for_layer(&self.scratch),
        );
        let (cfg, n) = (ctx.cfg, ctx.rows());
        let c = &mut self.cur;
        let (mut f, ffn) = ffn_fwd(
            p,
            &li.ffn,
            cfg.moe.as_ref(),
            &c.h2,
            n,
            cfg.hidden_size,
            cfg.mlp_activation,
        );
        if let Some(st) = router_stats(&ffn) {
            self.obs.router(l, st);
        }
        c.ffn = Some(ffn);
        c.f_pre = post_norm_here(cfg, li.ffn_out_norm.map(|i| &p.tensors[i].data[..]), &mut f);
        ctx.check(l, "mlp (ffn output)", &f);
        self.f = f;
    }

    pub(super) fn residual_fwd(&mut self) {
        let mut out = std::mem::take(&mut self.f);
        add_assign(&mut out, &self.cur.x1);
        self.out = out;
    }
}
