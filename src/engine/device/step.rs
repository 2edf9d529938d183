//! The device backend of the decoder graph (`model::graph::DecoderOps`): each op of one
//! training step as CUDA launches over the step memory (`memory`) — f32, or in mixed
//! precision with bf16 GEMM operands (the op that produces an activation writes its bf16
//! shadow for the GEMMs that read it) and the tensor-core attention.

use super::memory::{Band, GemmIn, LayerMem, StepMemory};
use super::DeviceModel;
use crate::backend::cuda::ops::{self, AttnDims, DType};
use crate::backend::cuda::runtime::DBuf;
use crate::model::graph::DecoderOps;
use crate::model::observer::{GateTotals, LayerTotals, Observer, GATE_BINS};
use crate::model::params::{FfnIndex, LayerIndex, SwigluIndex};
use anyhow::{bail, Result};

/// One step on the device: the model and its step memory, the batch's inputs already staged
/// there ([`StepMemory::stage`]). Its ops only launch kernels and GEMMs (no copy, allocation or
/// host value that depends on the batch), so the step can be captured into a graph — except
/// with `probes`, which read each layer's totals back as the forward leaves it (evaluation).
pub(super) struct DeviceStep<'s, 'd> {
    pub m: &'s DeviceModel<'d>,
    pub mem: &'s mut StepMemory,
    pub probes: Option<&'s mut dyn Observer<f32>>,
}

// the device's gate histogram is the observers'
const _: () = assert!(ops::PROBE_GATE_BINS == GATE_BINS);

impl DeviceStep<'_, '_> {
    fn rows(&self) -> usize {
        self.mem.batch * self.mem.seq
    }
    fn layer(&self, l: usize) -> (&LayerIndex, &LayerMem) {
        (&self.m.index.layers[l], &self.mem.layers[l])
    }
    fn mlp_index(li: &LayerIndex) -> Result<SwigluIndex> {
        match li.ffn {
            FfnIndex::Dense(mlp) => Ok(mlp),
            // refused when the device model is built (`unsupported`)
            FfnIndex::Moe(_) => bail!("MoE layer on the device"),
        }
    }
    fn attn_dims(&self) -> AttnDims {
        let cfg = &self.m.cfg;
        AttnDims {
            batch: self.mem.batch,
            seq: self.mem.seq,
            heads: cfg.num_heads,
            kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
        }
    }
    fn eps(&self) -> f32 {
        self.m.cfg.rms_norm_eps as f32
    }
    /// The post-attention norm: `h2` (in the GEMMs' operand type) and `rstd2` from `x1`.
    fn post_norm(&self, l: usize) -> Result<()> {
        let (m, n, eps) = (self.m, self.rows(), self.eps());
        let (li, c) = self.layer(l);
        let (w, dm) = (&m.params[li.post_norm], m.cfg.hidden_size);
        ops::rmsnorm_fwd_to(m.dev, &c.x1, w, c.h2.op(), &c.rstd2, n, dm, eps, m.zc())
    }
    /// Whether the attention runs on tensor cores: the memory plan made its inputs bf16 for
    /// them (from [`DeviceModel::tc_attention`]), else f32 for the f32 kernels.
    /// Layer `l`'s probe totals, reduced on the device from what its forward just wrote: the
    /// rotated q and k with the attention's lse (key 0), `y` (o_proj's input), the gate logits,
    /// the layer's output.
    fn layer_totals(&self, l: usize) -> Result<LayerTotals> {
        let (m, n, d) = (self.m, self.rows(), self.attn_dims());
        let (li, c) = self.layer(l);
        let dev = m.dev;
        let outputs = n * m.cfg.q_dim();
        let gate = match (&c.z, m.cfg.gate_geometry().filter(|_| li.gate.is_some())) {
            (Some(z), Some(geo)) => {
                let g = ops::probe_gate(dev, z.op().into(), n, geo.scores())?;
                let (sum, hist, low, high, count) = (g.sum, g.hist, g.low, g.high, g.count);
                Some(GateTotals {
                    sum,
                    hist,
                    low,
                    high,
                    count,
                })
            }
            _ => None,
        };
        Ok(LayerTotals {
            key0: ops::probe_key0(dev, &d, c.qr.op(), c.kr.op(), &c.lse)?,
            max_abs: ops::probe_max_abs(dev, self.mem.layer_io(l).1, n * m.cfg.hidden_size)?,
            small: ops::probe_small(dev, c.y.op(), outputs)?,
            outputs: outputs as u64,
            gate,
        })
    }

    fn tensor_cores(c: &LayerMem) -> Result<bool> {
        match (c.qr.dtype, c.kr.dtype, c.v.dtype) {
            (DType::Bf16, DType::Bf16, DType::Bf16) => Ok(true),
            (DType::F32, DType::F32, DType::F32) => Ok(false),
            t => bail!("attention inputs of mixed types {t:?}"),
        }
    }
}

/// The f32 buffer of an activation the f32 attention kernels read or write (`o`, `z`): the
/// memory plan keeps them f32 off the tensor-core path.
fn f32_buf(x: Option<&GemmIn>) -> Result<Option<&DBuf>> {
    match x {
        Some(g) if g.dtype != DType::F32 => bail!("the f32 attention kernels got a {:?} o or z", g.dtype),
        g => Ok(g.map(|g| &g.buf)),
    }
}

impl DecoderOps for DeviceStep<'_, '_> {
    fn embed(&mut self) -> Result<()> {
        let (m, mem) = (self.m, &*self.mem);
        let dm = m.cfg.hidden_size;
        ops::embed_fwd(
            m.dev,
            &mem.ids,
            &m.params[m.index.embed],
            mem.embed_out(),
            self.rows(),
            dm,
        )
    }

    /// With probes: the layer's totals to the observer.
    fn leave_layer(&mut self, l: usize) -> Result<()> {
        if self.probes.is_none() {
            return Ok(());
        }
        let totals = self.layer_totals(l)?;
        if let Some(obs) = self.probes.as_deref_mut() {
            obs.layer_totals(l, &totals);
        }
        Ok(())
    }

    fn input_norm(&mut self, l: usize) -> Result<()> {
        let (m, n, eps) = (self.m, self.rows(), self.eps());
        let (li, c) = self.layer(l);
        let (w, dm) = (&m.params[li.input_norm], m.cfg.hidden_size);
        ops::rmsnorm_fwd_to(m.dev, &c.x, w, c.h1.op(), &c.rstd1, n, dm, eps, m.zc())
    }

    fn qkv(&mut self, l: usize) -> Result<()> {
        let (m, n) = (self.m, self.rows());
        let cfg = &m.cfg;
        let (li, c) = self.layer(l);
        let (dm, qd, kvd) = (cfg.hidden_size, cfg.q_dim(), cfg.kv_dim());
        let h1 = c.h1.op();
        // q and k in the GEMMs' operand type: only QK-norm + RoPE reads them (both passes)
        m.lin_fwd_to(h1, li.q_proj, c.q.op(), n, dm, qd)?;
        m.lin_fwd_to(h1, li.k_proj, c.k.op(), n, dm, kvd)?;
        // v straight into the attention's input type (bf16 for the tensor-core kernels)
        m.lin_fwd_to(h1, li.v_proj, c.v.op(), n, dm, kvd)?;
        // z in the attention's type (bf16 for the tensor-core kernels)
        if let (Some(gi), Some(geo), Some(z)) = (li.gate, cfg.gate_geometry(), &c.z) {
            m.lin_fwd_to(h1, gi, z.op(), n, dm, geo.scores())?;
        }
        Ok(())
    }

    fn qk_norm_rope(&mut self, l: usize) -> Result<()> {
        let (m, n, seq, eps) = (self.m, self.rows(), self.mem.seq, self.eps());
        let (li, c) = self.layer(l);
        // qr and kr in the attention's input type (bf16 for the tensor-core kernels)
        let hq = m.heads(n, seq, m.cfg.num_heads, li.q_norm);
        ops::qknorm_rope_fwd_to(m.dev, &hq, &m.rope, c.q.op(), c.qr.op(), &c.rstd_q, eps)?;
        let hk = m.heads(n, seq, m.cfg.num_kv_heads, li.k_norm);
        ops::qknorm_rope_fwd_to(m.dev, &hk, &m.rope, c.k.op(), c.kr.op(), &c.rstd_k, eps)
    }

    /// On tensor cores when [`DeviceModel::tc_attention`], from q/k/v their producers wrote in
    /// bf16 (the backward reads the same values, so both passes differentiate one function of
    /// the rounded inputs), and z in bf16, writing o in bf16; else the f32 kernel; the G1 gate
    /// in the kernel's epilogue, which writes `y` in the o_proj GEMMs' operand type.
    fn attention(&mut self, l: usize) -> Result<()> {
        let (m, d) = (self.m, self.attn_dims());
        let (_, c) = self.layer(l);
        let (q, k, v) = (&c.qr.buf, &c.kr.buf, &c.v.buf);
        match Self::tensor_cores(c)? {
            true => {
                let z = c.z.as_ref().map(GemmIn::op);
                ops::attention_forward_tc_to(m.dev, &d, m.gate, q, k, v, z, c.o.op(), c.y.op(), &c.lse)
            }
            false => {
                let (z, o) = (f32_buf(c.z.as_ref())?, f32_buf(Some(&c.o))?.unwrap());
                ops::attention_fwd_to(m.dev, &d, m.gate, q, k, v, z, o, c.y.op(), &c.lse)
            }
        }
    }

    /// Writes `x1 = x + a`: the GEMM adds the residual `x` in its epilogue (`a` is never
    /// written on its own), so [`Self::residual_norm`] only normalises.
    fn out_proj(&mut self, l: usize) -> Result<()> {
        let (m, n) = (self.m, self.rows());
        let (li, c) = self.layer(l);
        let (qd, dm) = (m.cfg.q_dim(), m.cfg.hidden_size);
        m.lin_fwd_residual(c.y.op(), li.o_proj, (&c.x, &c.x1), [n, qd, dm])
    }

    /// `h2 = norm(x1)` in the GEMMs' operand type (`x1 = x + a` is already there: [`Self::out_proj`]).
    fn residual_norm(&mut self, l: usize) -> Result<()> {
        self.post_norm(l)
    }

    /// One GEMM of the stacked `[gate; up]` weight; the down projection's GEMM writes the
    /// layer's output `x1 + f`, adding the residual `x1` in its epilogue (so [`Self::residual`]
    /// has nothing left to do).
    fn mlp(&mut self, l: usize) -> Result<()> {
        let (m, n) = (self.m, self.rows());
        let (li, c) = self.layer(l);
        let mlp = Self::mlp_index(li)?;
        let (dm, ff) = (m.cfg.hidden_size, m.cfg.intermediate_size);
        let (w_gu, _) = m.gate_up(l);
        // gu in the GEMMs' operand type too: SwiGLU reads it twice (forward and backward)
        ops::linear_fwd_to(m.dev, c.h2.op(), w_gu, c.gu.op(), n, dm, 2 * ff)?;
        let act = &self.mem.m;
        ops::swiglu_fwd(m.dev, c.gu.op(), act.op(), n, ff)?;
        m.lin_fwd_residual(act.op(), mlp.down, (&c.x1, self.mem.layer_io(l).1), [n, ff, dm])
    }

    /// Done by [`Self::mlp`]'s down projection, in its GEMM's epilogue.
    fn residual(&mut self, _l: usize) -> Result<()> {
        Ok(())
    }

    fn final_norm(&mut self) -> Result<()> {
        let (m, mem, eps) = (self.m, &*self.mem, self.eps());
        let (w, dm, n) = (&m.params[m.index.norm], m.cfg.hidden_size, self.rows());
        ops::rmsnorm_fwd_to(m.dev, &mem.x_last, w, mem.hf.op(), &mem.rstd_f, n, dm, eps, m.zc())
    }

    /// Chunk by chunk of rows (`mem.head_chunks`), so only one chunk's `[rows, vocab]` logits
    /// ever exist: per-row losses into `mem.loss_rows` and, with `backward`, at once the
    /// head's part of the backward (`mem.dhf`, the head weight's gradient) while the chunk's
    /// logit gradient is at hand.
    fn head_loss(&mut self, backward: bool) -> Result<()> {
        let (m, mem) = (self.m, &*self.mem);
        let (dm, vocab, head) = (m.cfg.hidden_size, m.cfg.vocab_size, m.head());
        for ch in &mem.head_chunks {
            let (rows, hfa) = (ch.rows, ch.hf.op());
            m.lin_fwd(hfa, head, &mem.logits, rows, dm, vocab)?;
            // d(mean loss)/d(logits) in place over the logits, or in mixed precision into their
            // bf16 buffer (the type the head's backward GEMMs read)
            let (dl_b, loss_rows) = (mem.logits_b.as_ref(), &ch.loss_rows);
            ops::cross_entropy_to(
                m.dev,
                &mem.logits,
                dl_b,
                &ch.targets,
                loss_rows,
                rows,
                vocab,
                &mem.scale,
            )?;
            if backward {
                let dla = m.shadowed(&mem.logits, dl_b);
                m.lin_bwd_dx(dla, head, &ch.dhf, rows, dm, vocab, false)?;
                m.lin_bwd_dw(hfa, dla, head, rows, dm, vocab)?;
            }
        }
        Ok(())
    }

    fn final_norm_bwd(&mut self) -> Result<()> {
        let (m, mem) = (self.m, &*self.mem);
        let (b, norm) = (&mem.bwd, m.index.norm);
        let io = (
            &mem.x_last,
            &m.params[norm],
            &mem.rstd_f,
            &mem.dhf,
            &b.dx,
            &m.grads[norm],
        );
        let (rows, dm) = (self.rows(), m.cfg.hidden_size);
        ops::rmsnorm_bwd_to(m.dev, io, b.dx_b.as_ref(), rows, dm, m.zc(), false, &b.norm_part)
    }

    fn mlp_bwd(&mut self, l: usize) -> Result<()> {
        let (m, n) = (self.m, self.rows());
        let (li, c) = self.layer(l);
        let b = &self.mem.bwd;
        let mlp = Self::mlp_index(li)?;
        let (dm, ff) = (m.cfg.hidden_size, m.cfg.intermediate_size);
        // under recomputation h2 is not kept per layer: written again from x1
        if self.mem.plan.recompute {
            self.post_norm(l)?;
        }
        // the norms' backward wrote dx's bf16 copy beside it
        let dxa = m.shadowed(&b.dx, b.dx_b.as_ref());
        ops::linear_bwd_dx_to(m.dev, dxa, m.weight(mlp.down), b.dm.op(), n, ff, dm, false)?;
        // SwiGLU's backward writes this layer's m again, for the down weight's gradient
        let act = &self.mem.m;
        ops::swiglu_bwd(m.dev, c.gu.op(), b.dm.op(), (b.dgu.op(), act.op()), n, ff)?;
        m.lin_bwd_dw(act.op(), dxa, mlp.down, n, ff, dm)?;
        // the stacked gate/up GEMM's backward: dh2 = dgu·[Wg; Wu], d[Wg; Wu] += dguᵀ·h2
        let (w_gu, grad_gu) = m.gate_up(l);
        ops::linear_bwd_dx(m.dev, b.dgu.op(), w_gu, &b.dh2, n, dm, 2 * ff, false)?;
        ops::linear_bwd_dw(m.dev, c.h2.op(), b.dgu.op(), grad_gu, n, dm, 2 * ff)
    }

    fn residual_norm_bwd(&mut self, l: usize) -> Result<()> {
        let (m, n) = (self.m, self.rows());
        let (li, c) = self.layer(l);
        let (b, pn) = (&self.mem.bwd, li.post_norm);
        let io = (&c.x1, &m.params[pn], &c.rstd2, &b.dh2, &b.dx, &m.grads[pn]);
        let (dm, part) = (m.cfg.hidden_size, &b.norm_part);
        ops::rmsnorm_bwd_to(m.dev, io, b.dx_b.as_ref(), n, dm, m.zc(), true, part)
    }

    fn out_proj_bwd(&mut self, l: usize) -> Result<()> {
        let (m, n) = (self.m, self.rows());
        let (li, c) = self.layer(l);
        let b = &self.mem.bwd;
        let (qd, dm) = (m.cfg.q_dim(), m.cfg.hidden_size);
        let dxa = m.shadowed(&b.dx, b.dx_b.as_ref());
        m.lin_bwd_dx(dxa, li.o_proj, &b.dy, n, qd, dm, false)?;
        m.lin_bwd_dw(c.y.op(), dxa, li.o_proj, n, qd, dm)
    }

    /// On tensor cores from the bf16 q/k/v, z and o the forward ran on and wrote, else in
    /// f32; the G1 gate's gradient in the kernels' pre-pass.
    fn attention_bwd(&mut self, l: usize) -> Result<()> {
        if self.mem.plan.recompute {
            self.qk_norm_rope(l)?;
        }
        let (m, d) = (self.m, self.attn_dims());
        let (_, c) = self.layer(l);
        let b = &self.mem.bwd;
        // dv and dz into their bands of the stacked projections' gradient, in its GEMMs' type
        let grads = (&b.dqr, &b.dkr, b.dv.cols(), b.dz.as_ref().map(Band::cols));
        let (q, k, v) = (&c.qr.buf, &c.kr.buf, &c.v.buf);
        match Self::tensor_cores(c)? {
            true => {
                let (ins, fwd) = ((q, k, v, c.z.as_ref().map(GemmIn::op)), (c.o.op(), &c.lse, &b.dy));
                ops::attention_backward_tc_to(m.dev, &d, m.gate, ins, fwd, &b.attn, grads)
            }
            false => {
                let (z, o) = (f32_buf(c.z.as_ref())?, f32_buf(Some(&c.o))?.unwrap());
                let (ins, fwd) = ((q, k, v, z), (o, &c.lse, &b.dy));
                ops::attention_bwd_to(m.dev, &d, m.gate, ins, fwd, &b.attn, grads)
            }
        }
    }

    fn qk_norm_rope_bwd(&mut self, l: usize) -> Result<()> {
        let (m, n, seq) = (self.m, self.rows(), self.mem.seq);
        let (li, c) = self.layer(l);
        let b = &self.mem.bwd;
        let scratch = &b.norm_part;
        let hq = m.heads(n, seq, m.cfg.num_heads, li.q_norm);
        let gq = li.q_norm.map(|i| &m.grads[i]);
        let ins = (c.q.op(), &c.rstd_q, &b.dqr);
        ops::qknorm_rope_bwd_to(m.dev, &hq, &m.rope, ins, b.dq.cols(), scratch, gq)?;
        let hk = m.heads(n, seq, m.cfg.num_kv_heads, li.k_norm);
        let gk = li.k_norm.map(|i| &m.grads[i]);
        let ins = (c.k.op(), &c.rstd_k, &b.dkr);
        ops::qknorm_rope_bwd_to(m.dev, &hk, &m.rope, ins, b.dk.cols(), scratch, gk)
    }

    fn qkv_bwd(&mut self, l: usize) -> Result<()> {
        if self.mem.plan.recompute {
            self.input_norm(l)?;
        }
        let (m, n) = (self.m, self.rows());
        let cfg = &m.cfg;
        let (li, c) = self.layer(l);
        let b = &self.mem.bwd;
        let scores = cfg
            .gate_geometry()
            .filter(|_| li.gate.is_some())
            .map_or(0, |g| g.scores());
        let (dm, width) = (cfg.hidden_size, cfg.q_dim() + 2 * cfg.kv_dim() + scores);
        // [dq | dk | dv | dz] came side by side in the GEMMs' operand type from their producers
        // (dq and dk from the QK-norm + RoPE backward, dv and dz from the attention's): one GEMM
        // of the stacked [q; k; v; gate] weight writes dh1, one adds its weight gradient
        let (w, grad) = m.qkvz(l);
        ops::linear_bwd_dx(m.dev, b.dqkvz.op(), w, &b.dh1, n, dm, width, false)?;
        ops::linear_bwd_dw(m.dev, c.h1.op(), b.dqkvz.op(), grad, n, dm, width)
    }

    fn input_norm_bwd(&mut self, l: usize) -> Result<()> {
        let (m, n) = (self.m, self.rows());
        let (li, c) = self.layer(l);
        let (b, inorm) = (&self.mem.bwd, li.input_norm);
        let io = (&c.x, &m.params[inorm], &c.rstd1, &b.dh1, &b.dx, &m.grads[inorm]);
        let (dm, part) = (m.cfg.hidden_size, &b.norm_part);
        ops::rmsnorm_bwd_to(m.dev, io, b.dx_b.as_ref(), n, dm, m.zc(), true, part)
    }

    fn embed_bwd(&mut self) -> Result<()> {
        let (m, mem) = (self.m, &*self.mem);
        let (grad, dm) = (&m.grads[m.index.embed], m.cfg.hidden_size);
        ops::embed_bwd_with(m.dev, &mem.embed_index, self.rows(), &mem.bwd.dx, grad, dm)
    }
}
