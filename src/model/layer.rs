//! One pre-norm decoder block: attention (GQA, QK-norm, RoPE, causal SDPA, gate at G1–G5) and a
//! SwiGLU MLP, as an explicit forward that saves what its backward needs.

use super::ffn::{ffn_bwd, ffn_fwd, router_stats, FfnCache};
use super::kv::{attention_cached, LayerKv};
use super::observer::Observer;
use super::ops::attention::{attention_bwd, attention_fwd, AttnProbes, AttnShape};
use super::ops::gate::{gate_bwd, gate_fwd, gate_scores};
use super::ops::linear::{linear_bwd, linear_fwd};
use super::ops::rmsnorm::{rmsnorm_bwd, rmsnorm_fwd};
use super::ops::rope::{rope_apply, RopeTable};
use super::params::{LayerIndex, ParamStore};
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
    fn check(&self, layer: usize, op: &'static str, buf: &[T]) {
        if self.check_finite && self.first_bad.get().is_none() && buf.iter().any(|x| !x.is_finite()) {
            self.first_bad.set(Some((layer, op)));
        }
    }
}

impl<T> Ctx<'_, T> {
    fn rows(&self) -> usize {
        self.batch * self.seq
    }
    fn attn_shape(&self, layer: usize) -> AttnShape {
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
    fn rope_at(&self, layer: usize) -> &RopeTable<T> {
        match self.rope_local {
            Some(t) if self.cfg.local_rope_at(layer) => t,
            _ => self.rope,
        }
    }
    fn gate(&self) -> Option<(&GateConfig, GateGeometry)> {
        Some((self.cfg.gate.as_ref()?, self.cfg.gate_geometry()?))
    }
    /// Weight of one layer's auxiliary MoE losses: they are averaged over the MoE layers.
    fn aux_scale(&self) -> f64 {
        let moe_layers = (0..self.cfg.num_layers)
            .filter(|&l| self.cfg.moe_at(l).is_some())
            .count();
        1.0 / moe_layers.max(1) as f64
    }
    fn gate_at(&self, pos: GatePosition) -> Option<(&GateConfig, GateGeometry)> {
        self.gate().filter(|(g, _)| g.position == pos)
    }
}

/// Activations saved by the forward. `*_ungated` are kept only where a gate follows them.
pub struct LayerCache<T> {
    layer: usize,
    h1: Vec<T>,
    rstd1: Vec<T>,
    /// Gate logits `[rows, scores]` (broadcast rows for the input-independent gate).
    z: Vec<T>,
    q_ungated: Option<Vec<T>>,
    k_ungated: Option<Vec<T>>,
    v_ungated: Option<Vec<T>>,
    /// q and k after any gate, before QK-norm.
    q_pre: Vec<T>,
    k_pre: Vec<T>,
    rstd_q: Vec<T>,
    rstd_k: Vec<T>,
    /// q and k after QK-norm and RoPE; v after any gate.
    qr: Vec<T>,
    kr: Vec<T>,
    v: Vec<T>,
    o_sdpa: Vec<T>,
    lse: Vec<T>,
    /// SDPA output after the G1 gate (the o_proj input), if gated there.
    o_gated: Option<Vec<T>>,
    a_ungated: Option<Vec<T>>,
    /// Attention output before / MLP output before Gemma's post-norms, with their rstd.
    a_pre: Option<(Vec<T>, Vec<T>)>,
    y_pre: Option<(Vec<T>, Vec<T>)>,
    x1: Vec<T>,
    rstd2: Vec<T>,
    h2: Vec<T>,
    ffn: FfnCache<T>,
}

/// Gemma's post-norm `y ← norm(y)` when the layer has it, keeping the input and rstd for backward.
fn post_norm_here<T: Real>(cfg: &ModelConfig, w: Option<&[T]>, y: &mut Vec<T>) -> Option<(Vec<T>, Vec<T>)> {
    let w = w?;
    let mut rstd = zeros(y.len() / w.len());
    let mut out = zeros(y.len());
    rmsnorm_fwd(y, w, cfg.norm_style, cfg.rms_norm_eps, &mut out, &mut rstd);
    Some((std::mem::replace(y, out), rstd))
}

/// Backward of `post_norm_here`: `dy` (gradient of the normed output) becomes that of its input.
fn post_norm_back<T: Real>(
    cfg: &ModelConfig,
    wi: Option<usize>,
    p: &ParamStore<T>,
    saved: Option<&(Vec<T>, Vec<T>)>,
    dy: &mut Vec<T>,
    grads: &mut ParamStore<T>,
) {
    if let (Some(wi), Some((pre, rstd))) = (wi, saved) {
        let mut d = zeros(dy.len());
        rmsnorm_bwd(
            pre,
            &p.tensors[wi].data,
            cfg.norm_style,
            rstd,
            dy,
            &mut d,
            false,
            &mut grads.tensors[wi].data,
        );
        *dy = d;
    }
}

fn zeros<T: Real>(n: usize) -> Vec<T> {
    vec![T::ZERO; n]
}

/// `y[r, :] += b` for every row of `y`.
fn add_bias<T: Real>(y: &mut [T], b: &[T]) {
    for row in y.chunks_mut(b.len()) {
        row.iter_mut().zip(b).for_each(|(a, &x)| *a += x);
    }
}

/// `db += Σ_r dy[r, :]` (the gradient of a bias added to every row).
fn bias_grad<T: Real>(dy: &[T], db: &mut [T]) {
    for row in dy.chunks(db.len()) {
        db.iter_mut().zip(row).for_each(|(a, &x)| *a += x);
    }
}

/// Apply the gate if it sits at `pos`, keeping the ungated tensor for backward.
fn gate_here<T: Real>(ctx: &Ctx<T>, pos: GatePosition, y: &mut [T], z: &[T]) -> Option<Vec<T>> {
    let (g, geo) = ctx.gate_at(pos)?;
    let keep = y.to_vec();
    gate_fwd(g, &geo, y, z);
    Some(keep)
}

pub fn layer_fwd<T: Real>(
    ctx: &Ctx<T>,
    p: &ParamStore<T>,
    li: &LayerIndex,
    x: &[T],
    layer: usize,
    obs: &mut dyn Observer<T>,
    mut kv: Option<&mut LayerKv<T>>,
) -> (Vec<T>, LayerCache<T>) {
    let cfg = ctx.cfg;
    let (n, dm, hd) = (ctx.rows(), cfg.hidden_size, cfg.head_dim);
    let (qd, kvd) = (cfg.q_dim(), cfg.kv_dim());
    let w = |i: usize| &p.tensors[i].data[..];

    let mut h1 = zeros(n * dm);
    let mut rstd1 = zeros(n);
    let mut _t = scope("fwd.norm");
    rmsnorm_fwd(
        x,
        w(li.input_norm),
        cfg.norm_style,
        cfg.rms_norm_eps,
        &mut h1,
        &mut rstd1,
    );

    let mut q = zeros(n * qd);
    let mut k = zeros(n * kvd);
    let mut v = zeros(n * kvd);
    _t = scope("fwd.qkv");
    linear_fwd(&h1, w(li.q_proj), n, dm, qd, &mut q);
    linear_fwd(&h1, w(li.k_proj), n, dm, kvd, &mut k);
    linear_fwd(&h1, w(li.v_proj), n, dm, kvd, &mut v);
    if let Some([bq, bk, bv]) = li.qkv_bias {
        add_bias(&mut q, w(bq));
        add_bias(&mut k, w(bk));
        add_bias(&mut v, w(bv));
    }

    // Gate logits come from X (the normed block input) and never pass through q_norm/RoPE.
    let mut z = Vec::new();
    if let (Some((g, geo)), Some(gi)) = (ctx.gate(), li.gate) {
        let s = geo.scores();
        if g.input_independent {
            z = w(gi).repeat(n);
        } else {
            z = zeros(n * s);
            linear_fwd(&h1, w(gi), n, dm, s, &mut z);
        }
        if obs.wants_gate_scores() {
            obs.gate_scores(layer, &gate_scores(g.activation, &z), &geo);
        }
    }
    _t = scope("fwd.gate");
    let q_ungated = gate_here(ctx, GatePosition::G4, &mut q, &z);
    let k_ungated = gate_here(ctx, GatePosition::G3, &mut k, &z);
    let v_ungated = gate_here(ctx, GatePosition::G2, &mut v, &z);
    ctx.check(layer, "q_proj", &q);
    ctx.check(layer, "k_proj", &k);
    ctx.check(layer, "v_proj", &v);
    ctx.check(layer, "gate_proj", &z);

    let mut rstd_q = zeros(n * cfg.num_heads);
    let mut rstd_k = zeros(n * cfg.num_kv_heads);
    _t = scope("fwd.qknorm_rope");
    let (mut qr, mut kr) = match (li.q_norm, li.k_norm) {
        (Some(qn), Some(kn)) => {
            let (mut qr, mut kr) = (zeros(n * qd), zeros(n * kvd));
            rmsnorm_fwd(&q, w(qn), cfg.norm_style, cfg.rms_norm_eps, &mut qr, &mut rstd_q);
            rmsnorm_fwd(&k, w(kn), cfg.norm_style, cfg.rms_norm_eps, &mut kr, &mut rstd_k);
            (qr, kr)
        }
        _ => (q.clone(), k.clone()),
    };
    if let Some(c) = kv.as_deref_mut() {
        // the cache keeps un-rotated keys so a sliding window can re-index positions
        c.k_raw.extend_from_slice(&kr);
    }
    let rope = ctx.rope_at(layer);
    rope_apply(rope, &mut qr, cfg.num_heads, hd, ctx.seq, ctx.pos0, false);
    rope_apply(rope, &mut kr, cfg.num_kv_heads, hd, ctx.seq, ctx.pos0, false);

    _t = scope("fwd.attention");
    let sh = ctx.attn_shape(layer);
    let mut o = zeros(n * qd);
    let mut lse = zeros(ctx.batch * cfg.num_heads * ctx.seq);
    let mut probs = obs
        .wants_attn_probs(layer)
        .then(|| zeros(ctx.batch * cfg.num_heads * ctx.seq * ctx.seq));
    let mut key0 = obs
        .wants_key0(layer)
        .then(|| zeros(ctx.batch * cfg.num_heads * ctx.seq));
    if let Some(c) = kv {
        c.k_rot.extend_from_slice(&kr);
        c.v.extend_from_slice(&v);
        attention_cached(&qr, c, ctx.pos0, sh, &mut o);
    } else {
        let probes = AttnProbes {
            probs: probs.as_deref_mut(),
            key0: key0.as_deref_mut(),
        };
        attention_fwd(sh, &qr, &kr, &v, &mut o, &mut lse, probes);
    }
    if let Some(p) = probs {
        obs.attn_probs(layer, &p);
    }
    if let Some(k) = key0 {
        obs.key0(layer, &k);
    }

    _t = scope("fwd.o_proj");
    let o_sdpa = o;
    ctx.check(layer, "attention (SDPA)", &o_sdpa);
    // G1: keep the SDPA output for attention backward and gate a copy for o_proj
    let o_gated = ctx.gate_at(GatePosition::G1).map(|(g, geo)| {
        let mut og = o_sdpa.clone();
        gate_fwd(g, &geo, &mut og, &z);
        og
    });
    let o_in = o_gated.as_ref().unwrap_or(&o_sdpa);
    if obs.wants_attn_output() {
        obs.attn_output(layer, o_in);
    }
    let mut a = zeros(n * dm);
    linear_fwd(o_in, w(li.o_proj), n, qd, dm, &mut a);
    let a_ungated = gate_here(ctx, GatePosition::G5, &mut a, &z);
    ctx.check(layer, "o_proj (after any gate)", &a);
    let a_pre = post_norm_here(cfg, li.attn_out_norm.map(w), &mut a);

    _t = scope("fwd.norm");
    let mut x1 = x.to_vec();
    add_assign(&mut x1, &a);
    let mut h2 = zeros(n * dm);
    let mut rstd2 = zeros(n);
    rmsnorm_fwd(
        &x1,
        w(li.post_norm),
        cfg.norm_style,
        cfg.rms_norm_eps,
        &mut h2,
        &mut rstd2,
    );
    _t = scope("fwd.mlp");
    let (mut y, ffn) = ffn_fwd(p, &li.ffn, cfg.moe.as_ref(), &h2, n, dm, cfg.mlp_activation);
    if let Some(st) = router_stats(&ffn) {
        obs.router(layer, st);
    }
    let y_pre = post_norm_here(cfg, li.ffn_out_norm.map(w), &mut y);
    ctx.check(layer, "mlp (ffn output)", &y);
    let mut out = x1.clone();
    add_assign(&mut out, &y);

    let cache = LayerCache {
        layer,
        h1,
        rstd1,
        z,
        q_ungated,
        k_ungated,
        v_ungated,
        q_pre: q,
        k_pre: k,
        rstd_q,
        rstd_k,
        qr,
        kr,
        v,
        o_sdpa,
        lse,
        o_gated,
        a_ungated,
        a_pre,
        y_pre,
        x1,
        rstd2,
        h2,
        ffn,
    };
    (out, cache)
}

/// Backward through the gate at `pos` (if any): `dy` becomes the ungated gradient and `dz` the
/// logit gradient (a model has exactly one gate position, so nothing needs accumulating).
fn gate_back<T: Real>(ctx: &Ctx<T>, pos: GatePosition, ungated: Option<&[T]>, z: &[T], dy: &mut [T], dz: &mut [T]) {
    if let (Some((g, geo)), Some(y_pre)) = (ctx.gate_at(pos), ungated) {
        gate_bwd(g, &geo, y_pre, z, dy, dz);
    }
}

/// Backward of one layer. `dx` holds d(loss)/d(output) on entry and d(loss)/d(input) on exit.
/// Parameter gradients are accumulated into `grads`.
pub fn layer_bwd<T: Real>(
    ctx: &Ctx<T>,
    p: &ParamStore<T>,
    li: &LayerIndex,
    x: &[T],
    c: &LayerCache<T>,
    dx: &mut [T],
    grads: &mut ParamStore<T>,
) {
    let cfg = ctx.cfg;
    let (n, dm, hd) = (ctx.rows(), cfg.hidden_size, cfg.head_dim);
    let (qd, kvd) = (cfg.q_dim(), cfg.kv_dim());
    let style = cfg.norm_style;
    let w = |i: usize| &p.tensors[i].data[..];

    // FFN: out = x1 + ffn(h2)
    let mut _t = scope("bwd.mlp");
    let mut dh2 = zeros(n * dm);
    let mut dy_post = None;
    if c.y_pre.is_some() {
        let mut d = dx.to_vec();
        post_norm_back(cfg, li.ffn_out_norm, p, c.y_pre.as_ref(), &mut d, grads);
        dy_post = Some(d);
    }
    ffn_bwd(
        p,
        &li.ffn,
        cfg.moe.as_ref(),
        &c.ffn,
        &c.h2,
        dy_post.as_deref().unwrap_or(&*dx),
        n,
        dm,
        &mut dh2,
        grads,
        ctx.aux_scale(),
    );
    // dx now plays the role of d(x1): residual path plus the norm's contribution.
    _t = scope("bwd.norm");
    rmsnorm_bwd(
        &c.x1,
        w(li.post_norm),
        style,
        &c.rstd2,
        &dh2,
        dx,
        true,
        &mut grads.tensors[li.post_norm].data,
    );

    // Attention: x1 = x + gate5(o_proj(gate1(sdpa(...))))
    _t = scope("bwd.o_proj_gate");
    let mut dz = zeros(c.z.len());
    let mut da = dx.to_vec();
    post_norm_back(cfg, li.attn_out_norm, p, c.a_pre.as_ref(), &mut da, grads);
    gate_back(ctx, GatePosition::G5, c.a_ungated.as_deref(), &c.z, &mut da, &mut dz);
    let o_in = c.o_gated.as_ref().unwrap_or(&c.o_sdpa);
    let mut d_o = zeros(n * qd);
    linear_bwd(
        o_in,
        w(li.o_proj),
        &da,
        n,
        qd,
        dm,
        Some((&mut d_o, false)),
        &mut grads.tensors[li.o_proj].data,
    );
    drop(da);
    let g1_pre = c.o_gated.as_ref().map(|_| &c.o_sdpa[..]);
    gate_back(ctx, GatePosition::G1, g1_pre, &c.z, &mut d_o, &mut dz);

    _t = scope("bwd.attention");
    let mut dq = zeros(n * qd);
    let mut dk = zeros(n * kvd);
    let mut dv = zeros(n * kvd);
    attention_bwd(
        ctx.attn_shape(c.layer),
        &c.qr,
        &c.kr,
        &c.v,
        &c.o_sdpa,
        &c.lse,
        &d_o,
        &mut dq,
        &mut dk,
        &mut dv,
    );
    drop(d_o);
    _t = scope("bwd.qknorm_rope");
    let rope = ctx.rope_at(c.layer);
    rope_apply(rope, &mut dq, cfg.num_heads, hd, ctx.seq, ctx.pos0, true);
    rope_apply(rope, &mut dk, cfg.num_kv_heads, hd, ctx.seq, ctx.pos0, true);
    let (mut dq_pre, mut dk_pre) = match (li.q_norm, li.k_norm) {
        (Some(qn), Some(kn)) => {
            let (mut dq_pre, mut dk_pre) = (zeros(n * qd), zeros(n * kvd));
            rmsnorm_bwd(
                &c.q_pre,
                w(qn),
                style,
                &c.rstd_q,
                &dq,
                &mut dq_pre,
                false,
                &mut grads.tensors[qn].data,
            );
            rmsnorm_bwd(
                &c.k_pre,
                w(kn),
                style,
                &c.rstd_k,
                &dk,
                &mut dk_pre,
                false,
                &mut grads.tensors[kn].data,
            );
            (dq_pre, dk_pre)
        }
        _ => (dq, dk),
    };
    _t = scope("bwd.gate");
    gate_back(
        ctx,
        GatePosition::G4,
        c.q_ungated.as_deref(),
        &c.z,
        &mut dq_pre,
        &mut dz,
    );
    gate_back(
        ctx,
        GatePosition::G3,
        c.k_ungated.as_deref(),
        &c.z,
        &mut dk_pre,
        &mut dz,
    );
    gate_back(ctx, GatePosition::G2, c.v_ungated.as_deref(), &c.z, &mut dv, &mut dz);

    _t = scope("bwd.qkv");
    if let Some([bq, bk, bv]) = li.qkv_bias {
        bias_grad(&dq_pre, &mut grads.tensors[bq].data);
        bias_grad(&dk_pre, &mut grads.tensors[bk].data);
        bias_grad(&dv, &mut grads.tensors[bv].data);
    }
    let mut dh1 = zeros(n * dm);
    linear_bwd(
        &c.h1,
        w(li.q_proj),
        &dq_pre,
        n,
        dm,
        qd,
        Some((&mut dh1, false)),
        &mut grads.tensors[li.q_proj].data,
    );
    linear_bwd(
        &c.h1,
        w(li.k_proj),
        &dk_pre,
        n,
        dm,
        kvd,
        Some((&mut dh1, true)),
        &mut grads.tensors[li.k_proj].data,
    );
    linear_bwd(
        &c.h1,
        w(li.v_proj),
        &dv,
        n,
        dm,
        kvd,
        Some((&mut dh1, true)),
        &mut grads.tensors[li.v_proj].data,
    );
    if let (Some((g, geo)), Some(gi)) = (ctx.gate(), li.gate) {
        if g.input_independent {
            let gd = &mut grads.tensors[gi].data;
            for row in dz.chunks(geo.scores()) {
                gd.iter_mut().zip(row).for_each(|(a, &b)| *a += b);
            }
        } else {
            linear_bwd(
                &c.h1,
                w(gi),
                &dz,
                n,
                dm,
                geo.scores(),
                Some((&mut dh1, true)),
                &mut grads.tensors[gi].data,
            );
        }
    }
    _t = scope("bwd.norm");
    rmsnorm_bwd(
        x,
        w(li.input_norm),
        style,
        &c.rstd1,
        &dh1,
        dx,
        true,
        &mut grads.tensors[li.input_norm].data,
    );
}
