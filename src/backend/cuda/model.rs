//! The dense decoder resident on a CUDA device (or the emulator): parameters, gradients and
//! AdamW state live there; forward and backward run through the CUDA ops in f32, or in mixed
//! precision (bf16 GEMM operands, and for head_dim 64/128 the tensor-core attention forward on
//! bf16 copies of Q/K/V; the attention backward stays f32). It covers what
//! the fused kernels do: dense SwiGLU MLPs, no gate or the paper's G1 gate (multiplicative
//! sigmoid, head-specific, elementwise or headwise), QK-norm or none, partial RoPE, both norm
//! styles, tied or untied head. Other configurations are refused with the reason.

use super::ops::{self, AdamStep, AttnDims, AttnScratch, DeviceRope, FusedGate, HeadRows, Operand, TensorTable};
use super::runtime::{down_f32, up_f32, up_i32, write_f32, DBuf, Device};
use crate::config::{GateGranularity, ModelConfig, NormStyle};
use crate::model::ops::cross_entropy::IGNORE;
use crate::model::ops::rope::RopeTable;
use crate::model::params::{FfnIndex, LayerIndex, ParamIndex, ParamKind, ParamSpec, ParamStore};
use crate::model::Model;
use crate::optim::{clip_coef, AdamW, AdamWConfig};
use anyhow::{bail, Result};

pub struct DeviceModel<'d> {
    dev: &'d dyn Device,
    pub cfg: ModelConfig,
    specs: Vec<ParamSpec>,
    index: ParamIndex,
    params: Vec<DBuf>,
    grads: Vec<DBuf>,
    /// AdamW moments, and every tensor's (param, grad, m, v) for the multi-tensor kernels
    moments: Vec<(DBuf, DBuf)>,
    table: TensorTable,
    rope: DeviceRope,
    gate: FusedGate,
    pub step: u64,
    precision: Precision,
    /// bf16 copies of the GEMM weights (mixed precision), made for the weights of step
    /// `bf16_of_step`.
    bf16_weights: Vec<Option<DBuf>>,
    bf16_of_step: Option<u64>,
}

/// Arithmetic of the device model: f32 throughout, or mixed precision (f32 master weights,
/// optimizer state, norms, softmax and loss; bf16 GEMM operands with f32 accumulation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    F32,
    Bf16,
}

enum Act<'a> {
    F32(&'a DBuf),
    Bf16(DBuf),
}

impl Act<'_> {
    fn op(&self) -> Operand<'_> {
        match self {
            Act::F32(b) => (*b).into(),
            Act::Bf16(b) => Operand::bf16(b),
        }
    }
}

/// What one layer's backward needs from its forward.
struct LayerCache {
    x: DBuf,
    h1: DBuf,
    rstd1: DBuf,
    q: DBuf,
    k: DBuf,
    rstd_q: DBuf,
    rstd_k: DBuf,
    qr: DBuf,
    kr: DBuf,
    v: DBuf,
    z: Option<DBuf>,
    o: DBuf,
    lse: DBuf,
    y: DBuf,
    x1: DBuf,
    h2: DBuf,
    rstd2: DBuf,
    g: DBuf,
    u: DBuf,
    m: DBuf,
}

/// Why a configuration cannot run on the device yet (`None`: it can).
pub fn unsupported(cfg: &ModelConfig) -> Option<String> {
    if cfg.moe.is_some() {
        return Some("Mixture-of-Experts layers are CPU-only".into());
    }
    if cfg.attention_bias {
        return Some("q/k/v projection biases (attention_bias, Qwen2) are CPU-only".into());
    }
    if !super::ATTN_HEAD_DIMS.contains(&cfg.head_dim) {
        return Some(format!(
            "head_dim {} (CUDA attention has {})",
            cfg.head_dim,
            super::attn_head_dims_text()
        ));
    }
    match &cfg.gate {
        Some(g) if !g.is_standard_g1() => {
            Some("only the G1 multiplicative sigmoid head-specific gate is fused on the device".into())
        }
        _ => None,
    }
}

impl<'d> DeviceModel<'d> {
    /// Upload a CPU model's parameters.
    pub fn new(dev: &'d dyn Device, model: &Model<f32>, precision: Precision) -> Result<Self> {
        let cfg = model.cfg.clone();
        if let Some(why) = unsupported(&cfg) {
            bail!("this model cannot run on {}: {why}", dev.describe());
        }
        let gate = match cfg.gate.as_ref().map(|g| g.granularity) {
            None => FusedGate::None,
            Some(GateGranularity::Elementwise) => FusedGate::Elementwise,
            Some(GateGranularity::Headwise) => FusedGate::Headwise,
        };
        let params = model
            .params
            .tensors
            .iter()
            .map(|t| up_f32(dev, &t.data))
            .collect::<Result<Vec<_>>>()?;
        let grads = model
            .params
            .tensors
            .iter()
            .map(|t| dev.zeros(t.data.len() * 4))
            .collect::<Result<Vec<_>>>()?;
        let moments = params
            .iter()
            .map(|p| Ok((dev.zeros(p.bytes)?, dev.zeros(p.bytes)?)))
            .collect::<Result<Vec<_>>>()?;
        let entries: Vec<_> = (0..params.len())
            .map(|i| {
                let exempt = matches!(model.specs[i].kind, ParamKind::Norm | ParamKind::Embedding);
                (&params[i], &grads[i], &moments[i].0, &moments[i].1, exempt)
            })
            .collect();
        let table = TensorTable::new(dev, &entries)?;
        let rope = RopeTable::<f32>::for_config(&cfg, cfg.max_position_embeddings.clamp(1, 1 << 16));
        Ok(DeviceModel {
            dev,
            rope: DeviceRope::upload(dev, &rope)?,
            cfg,
            specs: model.specs.clone(),
            index: model.index.clone(),
            params,
            grads,
            moments,
            table,
            gate,
            step: 0,
            precision,
            bf16_weights: (0..model.specs.len()).map(|_| None).collect(),
            bf16_of_step: None,
        })
    }

    pub fn device(&self) -> &'d dyn Device {
        self.dev
    }

    fn zc(&self) -> bool {
        self.cfg.norm_style == NormStyle::ZeroCentered
    }

    fn zeros(&self, n: usize) -> Result<DBuf> {
        self.dev.zeros(n * 4)
    }

    fn head(&self) -> usize {
        self.index.lm_head.unwrap_or(self.index.embed)
    }

    fn heads(&self, rows: usize, seq: usize, heads: usize, norm: Option<usize>) -> HeadRows<'_> {
        HeadRows {
            rows,
            heads,
            head_dim: self.cfg.head_dim,
            seq,
            norm: norm.map(|i| &self.params[i]),
            zero_centered: self.zc(),
        }
    }

    /// Forward and backward of one batch (`ids`, `targets` `[batch, seq]`, `IGNORE` = no
    /// target); gradients are added to the device's. Returns the mean loss.
    pub fn forward_backward(&mut self, ids: &[u32], targets: &[u32], batch: usize, seq: usize) -> Result<f64> {
        self.run(ids, targets, batch, seq, true)
    }

    /// The mean loss of a batch, forward only (gradients untouched).
    pub fn loss(&mut self, ids: &[u32], targets: &[u32], batch: usize, seq: usize) -> Result<f64> {
        self.run(ids, targets, batch, seq, false)
    }

    fn run(&mut self, ids: &[u32], targets: &[u32], batch: usize, seq: usize, backward: bool) -> Result<f64> {
        self.refresh_bf16()?;
        let (dev, cfg) = (self.dev, &self.cfg);
        let (n, dm, vocab) = (batch * seq, cfg.hidden_size, cfg.vocab_size);
        if n == 0 || ids.len() != n || targets.len() != n {
            bail!(
                "batch shape mismatch: {} ids, {} targets for {batch}×{seq}",
                ids.len(),
                targets.len()
            );
        }
        if seq > self.rope.max_len {
            bail!("sequence of {seq} beyond the model's {} positions", self.rope.max_len);
        }
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= vocab) {
            bail!("token id {bad} outside the vocabulary of {vocab}");
        }
        let ids_d = up_i32(dev, &ids.iter().map(|&i| i as i32).collect::<Vec<_>>())?;
        let t32: Vec<i32> = targets
            .iter()
            .map(|&t| if t == IGNORE { -1 } else { t as i32 })
            .collect();
        let count = t32.iter().filter(|&&t| t >= 0).count();
        let tgt = up_i32(dev, &t32)?;

        let mut x = self.zeros(n * dm)?;
        ops::embed_fwd(dev, &ids_d, &self.params[self.index.embed], &x, n, dm)?;
        let mut caches = Vec::with_capacity(self.index.layers.len());
        for li in &self.index.layers {
            let (out, c) = self.layer_fwd(li, x, batch, seq)?;
            caches.push(c);
            x = out;
        }
        let (eps, zc) = (cfg.rms_norm_eps as f32, self.zc());
        let (hf, rstd) = (self.zeros(n * dm)?, self.zeros(n)?);
        ops::rmsnorm_fwd(dev, &x, &self.params[self.index.norm], &hf, &rstd, n, dm, eps, zc)?;
        let head = self.head();
        let logits = self.zeros(n * vocab)?;
        let hfa = self.act(&hf)?;
        self.lin_fwd(&hfa, head, &logits, n, dm, vocab)?;
        let loss_rows = self.zeros(n)?;
        let scale = if count > 0 { 1.0 / count as f32 } else { 0.0 };
        ops::cross_entropy(dev, &logits, &tgt, &loss_rows, n, vocab, scale)?;
        let mean_loss = || -> Result<f64> {
            let losses = down_f32(dev, &loss_rows)?;
            Ok(if count > 0 {
                losses.iter().map(|&l| l as f64).sum::<f64>() / count as f64
            } else {
                0.0
            })
        };
        if !backward {
            return mean_loss();
        }
        // logits now hold d(mean loss)/d(logits)
        let dhf = self.zeros(n * dm)?;
        let dla = self.act(&logits)?;
        self.lin_bwd_dx(&dla, head, &dhf, n, dm, vocab, false)?;
        self.lin_bwd_dw(&hfa, &dla, head, n, dm, vocab)?;
        drop(dla);
        drop(logits);
        let mut dx = self.zeros(n * dm)?;
        let norm = self.index.norm;
        ops::rmsnorm_bwd(
            dev,
            &x,
            &self.params[norm],
            &rstd,
            &dhf,
            &dx,
            &self.grads[norm],
            n,
            dm,
            zc,
            false,
        )?;
        for (li, c) in self.index.layers.iter().zip(caches).rev() {
            dx = self.layer_bwd(li, c, dx, batch, seq)?;
        }
        ops::embed_bwd(dev, ids, &dx, &self.grads[self.index.embed], dm)?;
        mean_loss()
    }

    fn layer_fwd(&self, li: &LayerIndex, x: DBuf, batch: usize, seq: usize) -> Result<(DBuf, LayerCache)> {
        let (dev, cfg, p) = (self.dev, &self.cfg, &self.params);
        let FfnIndex::Dense(mlp) = li.ffn else {
            bail!("MoE layer on the device")
        };
        let n = batch * seq;
        let (dm, qd, kvd, ff) = (cfg.hidden_size, cfg.q_dim(), cfg.kv_dim(), cfg.intermediate_size);
        let (eps, zc) = (cfg.rms_norm_eps as f32, self.zc());
        let (h1, rstd1) = (self.zeros(n * dm)?, self.zeros(n)?);
        ops::rmsnorm_fwd(dev, &x, &p[li.input_norm], &h1, &rstd1, n, dm, eps, zc)?;
        let (q, k, v) = (self.zeros(n * qd)?, self.zeros(n * kvd)?, self.zeros(n * kvd)?);
        let h1a = self.act(&h1)?;
        self.lin_fwd(&h1a, li.q_proj, &q, n, dm, qd)?;
        self.lin_fwd(&h1a, li.k_proj, &k, n, dm, kvd)?;
        self.lin_fwd(&h1a, li.v_proj, &v, n, dm, kvd)?;
        let z = match (li.gate, cfg.gate_geometry()) {
            (Some(gi), Some(geo)) => {
                let z = self.zeros(n * geo.scores())?;
                self.lin_fwd(&h1a, gi, &z, n, dm, geo.scores())?;
                Some(z)
            }
            _ => None,
        };
        let (qr, kr) = (self.zeros(n * qd)?, self.zeros(n * kvd)?);
        let (rstd_q, rstd_k) = (self.zeros(n * cfg.num_heads)?, self.zeros(n * cfg.num_kv_heads)?);
        let hq = self.heads(n, seq, cfg.num_heads, li.q_norm);
        ops::qknorm_rope_fwd(dev, &hq, &self.rope, &q, &qr, &rstd_q, eps)?;
        let hk = self.heads(n, seq, cfg.num_kv_heads, li.k_norm);
        ops::qknorm_rope_fwd(dev, &hk, &self.rope, &k, &kr, &rstd_k, eps)?;
        let d = self.attn_dims(batch, seq);
        let (o, y, lse) = (self.zeros(n * qd)?, self.zeros(n * qd)?, self.zeros(n * cfg.num_heads)?);
        self.attention_forward(&d, (&qr, &kr, &v), z.as_ref(), (&o, &y, &lse))?;
        let a = self.zeros(n * dm)?;
        self.lin_fwd(&self.act(&y)?, li.o_proj, &a, n, qd, dm)?;
        let x1 = self.zeros(n * dm)?;
        ops::add(dev, &x, &a, &x1, n * dm)?;
        let (h2, rstd2) = (self.zeros(n * dm)?, self.zeros(n)?);
        ops::rmsnorm_fwd(dev, &x1, &p[li.post_norm], &h2, &rstd2, n, dm, eps, zc)?;
        let (g, u, m) = (self.zeros(n * ff)?, self.zeros(n * ff)?, self.zeros(n * ff)?);
        let h2a = self.act(&h2)?;
        self.lin_fwd(&h2a, mlp.gate, &g, n, dm, ff)?;
        self.lin_fwd(&h2a, mlp.up, &u, n, dm, ff)?;
        ops::swiglu_fwd(dev, &g, &u, &m, n * ff)?;
        let out = self.zeros(n * dm)?;
        self.lin_fwd(&self.act(&m)?, mlp.down, &out, n, ff, dm)?;
        ops::add(dev, &x1, &out, &out, n * dm)?;
        let c = LayerCache {
            x,
            h1,
            rstd1,
            q,
            k,
            rstd_q,
            rstd_k,
            qr,
            kr,
            v,
            z,
            o,
            lse,
            y,
            x1,
            h2,
            rstd2,
            g,
            u,
            m,
        };
        Ok((out, c))
    }

    /// Whether the attention forward runs on tensor cores ([`ops::attention_forward_tc`]): in
    /// mixed precision, for the head dims that kernel exists for ([`ops::ATTN_TC_HEAD_DIMS`]).
    /// Otherwise (f32 precision, other head dims) the f32 kernel ([`ops::attention_fwd`]).
    pub fn tc_attention(&self) -> bool {
        self.precision == Precision::Bf16 && ops::ATTN_TC_HEAD_DIMS.contains(&self.cfg.head_dim)
    }

    /// The attention forward on the (f32) rotated `q`, `k` and `v`: `o`, `y`, `lse` for the
    /// backward, from the tensor-core kernel on bf16 copies of q/k/v when [`Self::tc_attention`],
    /// else from the f32 kernel.
    ///
    /// Mixed-precision mismatch: the backward (f32 kernels) differentiates attention at the f32
    /// q/k/v, but consumes the tc forward's o and lse, which are those of the bf16-rounded
    /// inputs (and of P rounded to bf16 for P·V). The gradient is thus off by the order of bf16
    /// rounding (relative ~2⁻⁸), the same order the bf16 GEMM operands already introduce.
    fn attention_forward(
        &self,
        d: &AttnDims,
        (q, k, v): (&DBuf, &DBuf, &DBuf),
        z: Option<&DBuf>,
        (o, y, lse): (&DBuf, &DBuf, &DBuf),
    ) -> Result<()> {
        if !self.tc_attention() {
            return ops::attention_fwd(self.dev, d, self.gate, q, k, v, z, o, y, lse);
        }
        // transient bf16 copies, like the GEMM operands' (`act`)
        let (qb, kb, vb) = (self.bf16_copy(q)?, self.bf16_copy(k)?, self.bf16_copy(v)?);
        ops::attention_forward_tc(self.dev, d, self.gate, &qb, &kb, &vb, z, o, y, lse)
    }

    fn attn_dims(&self, batch: usize, seq: usize) -> AttnDims {
        AttnDims {
            batch,
            seq,
            heads: self.cfg.num_heads,
            kv_heads: self.cfg.num_kv_heads,
            head_dim: self.cfg.head_dim,
        }
    }

    /// `dx`: d(loss)/d(layer output) in, d(loss)/d(layer input) out.
    fn layer_bwd(&self, li: &LayerIndex, c: LayerCache, dx: DBuf, batch: usize, seq: usize) -> Result<DBuf> {
        let (dev, cfg, p, gr) = (self.dev, &self.cfg, &self.params, &self.grads);
        let FfnIndex::Dense(mlp) = li.ffn else {
            bail!("MoE layer on the device")
        };
        let n = batch * seq;
        let (dm, qd, kvd, ff) = (cfg.hidden_size, cfg.q_dim(), cfg.kv_dim(), cfg.intermediate_size);
        let zc = self.zc();

        // MLP: out = x1 + down(swiglu(gate·h2, up·h2))
        let dm_ = self.zeros(n * ff)?;
        let dxa = self.act(&dx)?;
        self.lin_bwd_dx(&dxa, mlp.down, &dm_, n, ff, dm, false)?;
        self.lin_bwd_dw(&self.act(&c.m)?, &dxa, mlp.down, n, ff, dm)?;
        drop(dxa); // dx changes below
        let (dg, du) = (self.zeros(n * ff)?, self.zeros(n * ff)?);
        ops::swiglu_bwd(dev, &c.g, &c.u, &dm_, &dg, &du, n * ff)?;
        let dh2 = self.zeros(n * dm)?;
        let (dga, dua, h2a) = (self.act(&dg)?, self.act(&du)?, self.act(&c.h2)?);
        self.lin_bwd_dx(&dga, mlp.gate, &dh2, n, dm, ff, false)?;
        self.lin_bwd_dx(&dua, mlp.up, &dh2, n, dm, ff, true)?;
        self.lin_bwd_dw(&h2a, &dga, mlp.gate, n, dm, ff)?;
        self.lin_bwd_dw(&h2a, &dua, mlp.up, n, dm, ff)?;
        drop((dga, dua, h2a));
        let pn = li.post_norm;
        // dx becomes d(x1): the residual plus the post-norm's input gradient
        ops::rmsnorm_bwd(dev, &c.x1, &p[pn], &c.rstd2, &dh2, &dx, &gr[pn], n, dm, zc, true)?;

        // attention: x1 = x + o_proj(gated SDPA)
        let dy = self.zeros(n * qd)?;
        let dxa = self.act(&dx)?;
        self.lin_bwd_dx(&dxa, li.o_proj, &dy, n, qd, dm, false)?;
        self.lin_bwd_dw(&self.act(&c.y)?, &dxa, li.o_proj, n, qd, dm)?;
        drop(dxa);
        let d = self.attn_dims(batch, seq);
        let scratch = AttnScratch::new(dev, &d)?;
        let (dqr, dkr, dv) = (self.zeros(n * qd)?, self.zeros(n * kvd)?, self.zeros(n * kvd)?);
        let dz = match &c.z {
            Some(z) => Some(self.dev.zeros(z.bytes)?),
            None => None,
        };
        ops::attention_bwd(
            dev,
            &d,
            self.gate,
            (&c.qr, &c.kr, &c.v, c.z.as_ref()),
            (&c.o, &c.lse, &dy),
            &scratch,
            (&dqr, &dkr, &dv, dz.as_ref()),
        )?;
        let (dq, dk) = (self.zeros(n * qd)?, self.zeros(n * kvd)?);
        let dwp = self.zeros(n * qd)?;
        let hq = self.heads(n, seq, cfg.num_heads, li.q_norm);
        let gq = li.q_norm.map(|i| &gr[i]);
        ops::qknorm_rope_bwd(dev, &hq, &self.rope, (&c.q, &c.rstd_q, &dqr), &dq, &dwp, gq)?;
        let hk = self.heads(n, seq, cfg.num_kv_heads, li.k_norm);
        let gk = li.k_norm.map(|i| &gr[i]);
        ops::qknorm_rope_bwd(dev, &hk, &self.rope, (&c.k, &c.rstd_k, &dkr), &dk, &dwp, gk)?;
        let dh1 = self.zeros(n * dm)?;
        let mut projections = vec![(li.q_proj, &dq, qd), (li.k_proj, &dk, kvd), (li.v_proj, &dv, kvd)];
        if let (Some(gi), Some(dz), Some(geo)) = (li.gate, dz.as_ref(), cfg.gate_geometry()) {
            projections.push((gi, dz, geo.scores()));
        }
        let h1a = self.act(&c.h1)?;
        for (i, (w, dout, width)) in projections.into_iter().enumerate() {
            let da = self.act(dout)?;
            self.lin_bwd_dx(&da, w, &dh1, n, dm, width, i > 0)?;
            self.lin_bwd_dw(&h1a, &da, w, n, dm, width)?;
        }
        let inorm = li.input_norm;
        ops::rmsnorm_bwd(dev, &c.x, &p[inorm], &c.rstd1, &dh1, &dx, &gr[inorm], n, dm, zc, true)?;
        Ok(dx)
    }

    /// An activation as a GEMM operand: itself, or in mixed precision a bf16 copy.
    fn act<'a>(&self, x: &'a DBuf) -> Result<Act<'a>> {
        match self.precision {
            Precision::F32 => Ok(Act::F32(x)),
            Precision::Bf16 => Ok(Act::Bf16(self.bf16_copy(x)?)),
        }
    }

    /// A new bf16 copy of an f32 buffer.
    fn bf16_copy(&self, x: &DBuf) -> Result<DBuf> {
        let n = x.bytes / 4;
        let b = self.dev.zeros(n * 2)?;
        ops::cast_to_bf16(self.dev, x, &b, n)?;
        Ok(b)
    }

    /// Weight `i` as a GEMM operand (its bf16 copy in mixed precision).
    fn weight(&self, i: usize) -> Operand<'_> {
        match &self.bf16_weights[i] {
            Some(b) if self.precision == Precision::Bf16 => Operand::bf16(b),
            _ => (&self.params[i]).into(),
        }
    }

    /// `y = x·W_iᵀ` (activations as `act` makes them, once per tensor however many GEMMs read it)
    fn lin_fwd(&self, x: &Act, w: usize, y: &DBuf, rows: usize, din: usize, dout: usize) -> Result<()> {
        ops::linear_fwd(self.dev, x.op(), self.weight(w), y, rows, din, dout)
    }

    /// `dx (+)= dy·W_i`
    #[allow(clippy::too_many_arguments)]
    fn lin_bwd_dx(&self, dy: &Act, w: usize, dx: &DBuf, rows: usize, din: usize, dout: usize, acc: bool) -> Result<()> {
        ops::linear_bwd_dx(self.dev, dy.op(), self.weight(w), dx, rows, din, dout, acc)
    }

    /// `dW_i += dyᵀ·x`
    fn lin_bwd_dw(&self, x: &Act, dy: &Act, w: usize, rows: usize, din: usize, dout: usize) -> Result<()> {
        ops::linear_bwd_dw(self.dev, x.op(), dy.op(), &self.grads[w], rows, din, dout)
    }

    /// Refresh the bf16 copies of the GEMM weights after the master weights changed.
    fn refresh_bf16(&mut self) -> Result<()> {
        if self.precision != Precision::Bf16 || self.bf16_of_step == Some(self.step) {
            return Ok(());
        }
        for (i, slot) in self.bf16_weights.iter_mut().enumerate() {
            if matches!(
                self.specs[i].kind,
                ParamKind::Matrix | ParamKind::Gate | ParamKind::Embedding
            ) {
                let n = self.params[i].bytes / 4;
                let b = match slot.take() {
                    Some(b) => b,
                    None => self.dev.zeros(n * 2)?,
                };
                ops::cast_to_bf16(self.dev, &self.params[i], &b, n)?;
                *slot = Some(b);
            }
        }
        self.bf16_of_step = Some(self.step);
        Ok(())
    }

    /// Set every gradient to zero (before accumulating a new step's micro-batches).
    pub fn zero_grads(&self) -> Result<()> {
        for g in &self.grads {
            ops::fill(self.dev, g, 0.0, g.bytes / 4)?;
        }
        Ok(())
    }

    /// Global L2 norm of the accumulated gradients (per-block partials summed in f64).
    pub fn grad_norm(&self) -> Result<f64> {
        Ok(self.table.grad_sumsq(self.dev)?.sqrt())
    }

    /// One AdamW step at `lr` on `scale · grads` (the clip coefficient and any averaging).
    pub fn update(&mut self, opt: &AdamWConfig, lr: f64, scale: f32) -> Result<()> {
        let step = (self.step + 1) as i32;
        let hp = AdamStep {
            lr: lr as f32,
            beta1: opt.beta1 as f32,
            beta2: opt.beta2 as f32,
            eps: opt.eps as f32,
            weight_decay: opt.weight_decay as f32,
            step,
            scale,
        };
        let exempt = if opt.no_decay_norms_embeddings {
            0.0
        } else {
            hp.weight_decay
        };
        self.table.adamw(self.dev, &hp, exempt)?;
        self.step += 1;
        Ok(())
    }

    /// Clip the gradients to global norm `max_norm` (folded into the update) and take one AdamW
    /// step at `lr`. Returns the norm before clipping.
    pub fn step(&mut self, opt: &AdamWConfig, lr: f64, max_norm: f64) -> Result<f64> {
        let norm = self.grad_norm()?;
        if !norm.is_finite() {
            bail!("gradient norm is {norm}: not stepping");
        }
        self.update(opt, lr, clip_coef(norm, max_norm) as f32)?;
        Ok(norm)
    }

    /// Continue from a host optimizer's state (its moments and step count).
    pub fn set_optimizer(&mut self, opt: &AdamW<f32>) -> Result<()> {
        if opt.step == 0 {
            return Ok(());
        }
        for (i, (m, v)) in self.moments.iter_mut().enumerate() {
            write_f32(self.dev, m, &opt.m.tensors[i].data)?;
            write_f32(self.dev, v, &opt.v.tensors[i].data)?;
        }
        self.step = opt.step;
        Ok(())
    }

    /// Copy the optimizer state back to a host optimizer.
    pub fn optimizer_into(&self, opt: &mut AdamW<f32>) -> Result<()> {
        opt.step = self.step;
        for (i, (m, v)) in self.moments.iter().enumerate() {
            opt.m.tensors[i].data = down_f32(self.dev, m)?;
            opt.v.tensors[i].data = down_f32(self.dev, v)?;
        }
        Ok(())
    }

    fn download(&self, bufs: &[DBuf]) -> Result<ParamStore<f32>> {
        let mut s = ParamStore::zeros_like(&self.specs);
        for (t, b) in s.tensors.iter_mut().zip(bufs) {
            t.data = down_f32(self.dev, b)?;
        }
        Ok(s)
    }

    /// Sum the gradients over the data-parallel ranks (each rank then takes the same step).
    pub fn all_reduce_grads(&mut self, comm: &dyn super::dist::GradAllReduce) -> Result<()> {
        comm.all_reduce_sum(self.dev, &mut self.grads)
    }

    /// Replace the device's gradients (e.g. to step on gradients computed elsewhere).
    pub fn set_grads(&mut self, g: &ParamStore<f32>) -> Result<()> {
        if g.tensors.len() != self.grads.len() {
            bail!(
                "{} gradient tensors for a model of {}",
                g.tensors.len(),
                self.grads.len()
            );
        }
        for (buf, t) in self.grads.iter_mut().zip(&g.tensors) {
            if t.data.len() * 4 != buf.bytes {
                bail!(
                    "gradient of {} elements for a tensor of {}",
                    t.data.len(),
                    buf.bytes / 4
                );
            }
            write_f32(self.dev, buf, &t.data)?;
        }
        Ok(())
    }

    pub fn params(&self) -> Result<ParamStore<f32>> {
        self.download(&self.params)
    }

    pub fn grads(&self) -> Result<ParamStore<f32>> {
        self.download(&self.grads)
    }
}
