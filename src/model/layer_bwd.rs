//! One decoder layer's backward ops on the CPU, the reverse of `layer` (the order is
//! `graph::layer_backward`): each turns the gradient the op after it left into its inputs'
//! gradients, accumulating the parameters' gradients.

use super::ffn::ffn_bwd;
use super::ops::gate::gate_bwd;
use super::ops::linear::linear_bwd;
use super::ops::rope::rope_apply;
use super::params::ParamStore;
use super::step::{norm_back, zeros, CpuStep, Ctx, LayerCache, LayerGrads};
use crate::backend::profile::scope;
use crate::config::{GatePosition, ModelConfig};
use crate::real::Real;
use anyhow::{Context, Result};

/// Backward of Gemma's post-norm (if the layer has one): `dy`, the gradient of the normed
/// output, becomes that of its input.
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
        norm_back(cfg, p, wi, (pre, rstd), dy, &mut d, false, grads);
        *dy = d;
    }
}

/// `db += Σ_r dy[r, :]` (the gradient of a bias added to every row).
fn bias_grad<T: Real>(dy: &[T], db: &mut [T]) {
    for row in dy.chunks(db.len()) {
        db.iter_mut().zip(row).for_each(|(a, &x)| *a += x);
    }
}

/// Backward through the gate at `pos` (if any): `dy` becomes the ungated gradient and `dz` the
/// logit gradient (a model has exactly one gate position, so nothing needs accumulating).
fn gate_back<T: Real>(ctx: &Ctx<T>, pos: GatePosition, ungated: Option<&[T]>, z: &[T], dy: &mut [T], dz: &mut [T]) {
    if let (Some((g, geo)), Some(y_pre)) = (ctx.gate_at(pos), ungated) {
        gate_bwd(g, &geo, y_pre, z, dy, dz);
    }
}

/// The parts of a step a layer's backward reads and writes.
struct Back<'s, T> {
    ctx: &'s Ctx<'s, T>,
    p: &'s ParamStore<T>,
    /// the layer's input and saved activations
    x: &'s [T],
    c: &'s LayerCache<T>,
    dx: &'s mut Vec<T>,
    b: &'s mut LayerGrads<T>,
    grads: &'s mut ParamStore<T>,
}

/// The backward ops of `graph::DecoderOps` (each documented there).
impl<T: Real> CpuStep<'_, T> {
    fn back(&mut self, l: usize) -> Result<Back<'_, T>> {
        let (x, c) = self.saved.get(l).context("a layer's backward without its forward")?;
        Ok(Back {
            ctx: &self.ctx,
            p: &self.model.params,
            x,
            c,
            dx: &mut self.dx,
            b: &mut self.back,
            grads: self.grads.as_deref_mut().context("a backward without gradients")?,
        })
    }

    pub(super) fn mlp_bwd_op(&mut self, l: usize) -> Result<()> {
        let _t = scope("bwd.mlp");
        let li = &self.model.index.layers[l];
        let Back {
            ctx,
            p,
            c,
            dx,
            b,
            grads,
            ..
        } = self.back(l)?;
        let (cfg, n, dm) = (ctx.cfg, ctx.rows(), ctx.cfg.hidden_size);
        b.dh2 = zeros(n * dm);
        let mut df = None;
        if c.f_pre.is_some() {
            let mut d = dx.clone();
            post_norm_back(cfg, li.ffn_out_norm, p, c.f_pre.as_ref(), &mut d, grads);
            df = Some(d);
        }
        let ffn = c.ffn.as_ref().context("an MLP backward without its forward")?;
        let df = df.as_deref().unwrap_or(&dx[..]);
        let moe = cfg.moe.as_ref();
        ffn_bwd(
            p,
            &li.ffn,
            moe,
            ffn,
            &c.h2,
            df,
            n,
            dm,
            &mut b.dh2,
            grads,
            ctx.aux_scale(),
        );
        Ok(())
    }

    pub(super) fn residual_norm_bwd_op(&mut self, l: usize) -> Result<()> {
        let _t = scope("bwd.norm");
        let wi = self.model.index.layers[l].post_norm;
        let Back {
            ctx,
            p,
            c,
            dx,
            b,
            grads,
            ..
        } = self.back(l)?;
        norm_back(ctx.cfg, p, wi, (&c.x1, &c.rstd2), &b.dh2, dx, true, grads);
        b.dh2 = Vec::new();
        Ok(())
    }

    pub(super) fn out_proj_bwd_op(&mut self, l: usize) -> Result<()> {
        let _t = scope("bwd.o_proj_gate");
        let li = &self.model.index.layers[l];
        let Back {
            ctx,
            p,
            c,
            dx,
            b,
            grads,
            ..
        } = self.back(l)?;
        let (cfg, n) = (ctx.cfg, ctx.rows());
        b.dz = zeros(c.z.len());
        let mut da = dx.clone();
        post_norm_back(cfg, li.attn_out_norm, p, c.a_pre.as_ref(), &mut da, grads);
        gate_back(ctx, GatePosition::G5, c.a_ungated.as_deref(), &c.z, &mut da, &mut b.dz);
        b.dy = zeros(n * cfg.q_dim());
        let (w, g) = (&p.tensors[li.o_proj].data, &mut grads.tensors[li.o_proj].data);
        let dy = Some((&mut b.dy[..], false));
        linear_bwd(c.o_proj_input(), w, &da, n, cfg.q_dim(), cfg.hidden_size, dy, g);
        Ok(())
    }

    pub(super) fn attention_bwd_op(&mut self, l: usize) -> Result<()> {
        let Back { ctx, c, b, .. } = self.back(l)?;
        let _t = scope("bwd.o_proj_gate");
        let g1_ungated = c.y.as_ref().map(|_| &c.o[..]);
        gate_back(ctx, GatePosition::G1, g1_ungated, &c.z, &mut b.dy, &mut b.dz);
        let _t = scope("bwd.attention");
        let (cfg, n) = (ctx.cfg, ctx.rows());
        b.dqr = zeros(n * cfg.q_dim());
        b.dkr = zeros(n * cfg.kv_dim());
        b.dv = zeros(n * cfg.kv_dim());
        let (sh, o) = (ctx.attn_shape(l), (&c.o[..], &c.lse[..]));
        let grads = (&mut b.dqr[..], &mut b.dkr[..], &mut b.dv[..]);
        super::ops::attention::attention_bwd(sh, &c.qr, &c.kr, &c.v, o.0, o.1, &b.dy, grads.0, grads.1, grads.2);
        b.dy = Vec::new();
        Ok(())
    }

    pub(super) fn qk_norm_rope_bwd_op(&mut self, l: usize) -> Result<()> {
        let _t = scope("bwd.qknorm_rope");
        let li = &self.model.index.layers[l];
        let Back {
            ctx, p, c, b, grads, ..
        } = self.back(l)?;
        let cfg = ctx.cfg;
        let rope = ctx.rope_at(l);
        let (mut dqr, mut dkr) = (std::mem::take(&mut b.dqr), std::mem::take(&mut b.dkr));
        rope_apply(rope, &mut dqr, cfg.num_heads, cfg.head_dim, ctx.seq, ctx.pos0, true);
        rope_apply(rope, &mut dkr, cfg.num_kv_heads, cfg.head_dim, ctx.seq, ctx.pos0, true);
        (b.dq, b.dk) = match (li.q_norm, li.k_norm) {
            (Some(qn), Some(kn)) => {
                let (mut dq, mut dk) = (zeros(dqr.len()), zeros(dkr.len()));
                norm_back(cfg, p, qn, (&c.q, &c.rstd_q), &dqr, &mut dq, false, grads);
                norm_back(cfg, p, kn, (&c.k, &c.rstd_k), &dkr, &mut dk, false, grads);
                (dq, dk)
            }
            _ => (dqr, dkr),
        };
        Ok(())
    }

    pub(super) fn qkv_bwd_op(&mut self, l: usize) -> Result<()> {
        let li = &self.model.index.layers[l];
        let Back {
            ctx, p, c, b, grads, ..
        } = self.back(l)?;
        let _t = scope("bwd.gate");
        gate_back(
            ctx,
            GatePosition::G4,
            c.q_ungated.as_deref(),
            &c.z,
            &mut b.dq,
            &mut b.dz,
        );
        gate_back(
            ctx,
            GatePosition::G3,
            c.k_ungated.as_deref(),
            &c.z,
            &mut b.dk,
            &mut b.dz,
        );
        gate_back(
            ctx,
            GatePosition::G2,
            c.v_ungated.as_deref(),
            &c.z,
            &mut b.dv,
            &mut b.dz,
        );
        let _t = scope("bwd.qkv");
        let (cfg, n, dm) = (ctx.cfg, ctx.rows(), ctx.cfg.hidden_size);
        if let Some([bq, bk, bv]) = li.qkv_bias {
            bias_grad(&b.dq, &mut grads.tensors[bq].data);
            bias_grad(&b.dk, &mut grads.tensors[bk].data);
            bias_grad(&b.dv, &mut grads.tensors[bv].data);
        }
        b.dh1 = zeros(n * dm);
        let projections = [
            (li.q_proj, &b.dq, cfg.q_dim()),
            (li.k_proj, &b.dk, cfg.kv_dim()),
            (li.v_proj, &b.dv, cfg.kv_dim()),
        ];
        for (i, (wi, dout, width)) in projections.into_iter().enumerate() {
            let (w, g) = (&p.tensors[wi].data, &mut grads.tensors[wi].data);
            linear_bwd(&c.h1, w, dout, n, dm, width, Some((&mut b.dh1[..], i > 0)), g);
        }
        if let (Some((g, geo)), Some(gi)) = (ctx.gate(), li.gate) {
            let gd = &mut grads.tensors[gi].data;
            if g.input_independent {
                for row in b.dz.chunks(geo.scores()) {
                    gd.iter_mut().zip(row).for_each(|(a, &x)| *a += x);
                }
            } else {
                let w = &p.tensors[gi].data;
                linear_bwd(&c.h1, w, &b.dz, n, dm, geo.scores(), Some((&mut b.dh1[..], true)), gd);
            }
        }
        (b.dq, b.dk, b.dv, b.dz) = Default::default();
        Ok(())
    }

    pub(super) fn input_norm_bwd_op(&mut self, l: usize) -> Result<()> {
        let _t = scope("bwd.norm");
        let wi = self.model.index.layers[l].input_norm;
        let Back {
            ctx,
            p,
            x,
            c,
            dx,
            b,
            grads,
        } = self.back(l)?;
        norm_back(ctx.cfg, p, wi, (x, &c.rstd1), &b.dh1, dx, true, grads);
        b.dh1 = Vec::new();
        // this layer's activations are no longer needed
        self.saved.truncate(l);
        Ok(())
    }
}
