//! One pre-norm decoder layer's forward ops on the CPU (attention with GQA, QK-norm, RoPE,
//! causal SDPA and a gate at G1–G5; a SwiGLU/GeGLU or MoE MLP), each saving what its backward
//! (`layer_bwd`) needs. The order they run in is `graph::layer_forward`.

use super::ffn::{ffn_fwd, router_stats};
use super::kv::attention_cached;
use super::ops::attention::{attention_fwd, AttnProbes};
use super::ops::gate::{gate_fwd, gate_scores};
use super::ops::linear::linear_fwd;
use super::ops::rmsnorm::rmsnorm_fwd;
use super::ops::rope::rope_apply;
use super::step::{zeros, CpuStep, Ctx, LayerCache};
use crate::backend::cpu::add_assign;
use crate::backend::profile::scope;
use crate::config::{GatePosition, ModelConfig};
use crate::real::Real;

/// Gemma's post-norm `y ← norm(y)` when the layer has it, keeping the input and rstd for backward.
fn post_norm_here<T: Real>(cfg: &ModelConfig, w: Option<&[T]>, y: &mut Vec<T>) -> Option<(Vec<T>, Vec<T>)> {
    let w = w?;
    let mut rstd = zeros(y.len() / w.len());
    let mut out = zeros(y.len());
    rmsnorm_fwd(y, w, cfg.norm_style, cfg.rms_norm_eps, &mut out, &mut rstd);
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
