//! One pre-norm decoder layer's forward ops on the CPU (attention with GQA, QK-norm, RoPE,
//! causal SDPA and a gate at G1–G5; a SwiGLU/GeGLU or MoE MLP), each saving what its backward
//! (`layer_bwd`) needs. The order they run in is `graph::layer_forward`.

use super::ffn::{ffn_fwd, router_stats};
use super::kv::{attention_cached, LayerKv};
use super::observer::Observer;
use super::ops::attention::{attention_fwd, AttnProbes};
use super::ops::gate::{gate_fwd, gate_scores};
use super::ops::linear::linear_fwd;
use super::ops::rope::rope_apply;
use super::params::{LayerIndex, ParamStore};
use super::step::{norm, zeros, CpuStep, Ctx, LayerCache};
use crate::backend::cpu::add_assign;
use crate::backend::profile::scope;
use crate::config::{GatePosition, ModelConfig};
use crate::real::Real;

/// Gemma's post-norm `y ← norm(y)` when the layer has it, keeping the input and rstd for backward.
fn post_norm_here<T: Real>(cfg: &ModelConfig, w: Option<&[T]>, y: &mut Vec<T>) -> Option<(Vec<T>, Vec<T>)> {
    let (out, rstd) = norm(cfg, y, w?);
    Some((std::mem::replace(y, out), rstd))
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

/// The parts of a step one layer's forward op reads and writes.
struct Fwd<'s, T> {
    ctx: &'s Ctx<'s, T>,
    li: &'s LayerIndex,
    /// the layer's weights (a quantised model's, dequantised)
    p: &'s ParamStore<T>,
    /// the layer's input, and what it saves for its backward
    x: &'s [T],
    c: &'s mut LayerCache<T>,
    obs: &'s mut dyn Observer<T>,
    kv: Option<&'s mut LayerKv<T>>,
    /// the attention block's output, the MLP's
    a: &'s mut Vec<T>,
    f: &'s mut Vec<T>,
}

impl<T> Fwd<'_, T> {
    fn w(&self, i: usize) -> &[T] {
        &self.p.tensors[i].data
    }
}

/// The forward ops of `graph::DecoderOps` (each documented there), on `self.cur`.
impl<T: Real> CpuStep<'_, T> {
    fn fwd(&mut self, l: usize) -> Fwd<'_, T> {
        Fwd {
            ctx: &self.ctx,
            li: &self.model.index.layers[l],
            p: self.model.params_for_layer(&self.scratch),
            x: &self.x,
            c: &mut self.cur,
            obs: &mut *self.obs,
            kv: self.kv.as_deref_mut().map(|kv| &mut kv[l]),
            a: &mut self.a,
            f: &mut self.f,
        }
    }

    pub(super) fn input_norm_fwd(&mut self, l: usize) {
        let _t = scope("fwd.norm");
        let o = self.fwd(l);
        *o.c = LayerCache::default();
        (o.c.h1, o.c.rstd1) = norm(o.ctx.cfg, o.x, o.w(o.li.input_norm));
    }

    pub(super) fn qkv_fwd(&mut self, l: usize) {
        let _t = scope("fwd.qkv");
        let Fwd { ctx, li, p, c, obs, .. } = self.fwd(l);
        let (cfg, n) = (ctx.cfg, ctx.rows());
        let (dm, qd, kvd) = (cfg.hidden_size, cfg.q_dim(), cfg.kv_dim());
        let w = |i: usize| &p.tensors[i].data[..];
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
            if obs.wants_gate_scores() {
                obs.gate_scores(l, &gate_scores(g.activation, &c.z), &geo);
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
        let o = self.fwd(l);
        let (ctx, c) = (o.ctx, &mut *o.c);
        let cfg = ctx.cfg;
        match (o.li.q_norm, o.li.k_norm) {
            (Some(qn), Some(kn)) => {
                (c.qr, c.rstd_q) = norm(cfg, &c.q, &o.p.tensors[qn].data);
                (c.kr, c.rstd_k) = norm(cfg, &c.k, &o.p.tensors[kn].data);
            }
            _ => (c.qr, c.kr) = (c.q.clone(), c.k.clone()),
        }
        if let Some(kv) = o.kv {
            // the cache keeps un-rotated keys so a sliding window can re-index positions
            kv.k_raw.extend_from_slice(&c.kr);
        }
        let (rope, hd, seq, p0) = (ctx.rope_at(l), cfg.head_dim, ctx.seq, ctx.pos0);
        rope_apply(rope, &mut c.qr, cfg.num_heads, hd, seq, p0, false);
        rope_apply(rope, &mut c.kr, cfg.num_kv_heads, hd, seq, p0, false);
    }

    pub(super) fn attention_fwd(&mut self, l: usize) {
        let _t = scope("fwd.attention");
        let Fwd { ctx, c, obs, kv, .. } = self.fwd(l);
        let cfg = ctx.cfg;
        let sh = ctx.attn_shape(l);
        let heads_rows = ctx.batch * cfg.num_heads * ctx.seq;
        c.o = zeros(ctx.rows() * cfg.q_dim());
        c.lse = zeros(heads_rows);
        let mut probs = obs.wants_attn_probs(l).then(|| zeros(heads_rows * ctx.seq));
        let mut key0 = obs.wants_key0(l).then(|| zeros(heads_rows));
        if let Some(kv) = kv {
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
        let o = self.fwd(l);
        let (ctx, c, cfg) = (o.ctx, &mut *o.c, o.ctx.cfg);
        let (n, qd, dm) = (ctx.rows(), cfg.q_dim(), cfg.hidden_size);
        let mut a = zeros(n * dm);
        linear_fwd(c.o_proj_input(), &o.p.tensors[o.li.o_proj].data, n, qd, dm, &mut a);
        c.a_ungated = gate_here(ctx, GatePosition::G5, &mut a, &c.z);
        ctx.check(l, "o_proj (after any gate)", &a);
        c.a_pre = post_norm_here(cfg, o.li.attn_out_norm.map(|i| &o.p.tensors[i].data[..]), &mut a);
        *o.a = a;
    }

    pub(super) fn residual_norm_fwd(&mut self, l: usize) {
        let _t = scope("fwd.norm");
        let o = self.fwd(l);
        let mut x1 = o.x.to_vec();
        add_assign(&mut x1, &std::mem::take(o.a));
        (o.c.h2, o.c.rstd2) = norm(o.ctx.cfg, &x1, o.w(o.li.post_norm));
        o.c.x1 = x1;
    }

    pub(super) fn mlp_fwd(&mut self, l: usize) {
        let _t = scope("fwd.mlp");
        let Fwd {
            ctx, li, p, c, obs, f, ..
        } = self.fwd(l);
        let (cfg, n, dm) = (ctx.cfg, ctx.rows(), ctx.cfg.hidden_size);
        let (mut y, ffn) = ffn_fwd(p, &li.ffn, cfg.moe.as_ref(), &c.h2, n, dm, cfg.mlp_activation);
        if let Some(st) = router_stats(&ffn) {
            obs.router(l, st);
        }
        c.ffn = Some(ffn);
        c.f_pre = post_norm_here(cfg, li.ffn_out_norm.map(|i| &p.tensors[i].data[..]), &mut y);
        ctx.check(l, "mlp (ffn output)", &y);
        *f = y;
    }

    pub(super) fn residual_fwd(&mut self) {
        let mut out = std::mem::take(&mut self.f);
        add_assign(&mut out, &self.cur.x1);
        self.out = out;
    }
}
