//! The dense decoder resident on a CUDA device (or the emulator): parameters, gradients and
//! AdamW state live there; forward and backward run through the CUDA ops in f32, or in mixed
//! precision (bf16 GEMM operands, and for head_dim 64/128 the tensor-core attention, forward
//! and backward, on bf16 Q/K/V). Every activation a GEMM or the tensor-core attention reads is
//! written in their operand type by the kernel that produces it: no step casts an activation.
//! Its memory is planned once per step shape (`memory`). It covers what the fused kernels do:
//! dense SwiGLU MLPs, no gate or the paper's G1 gate (multiplicative sigmoid, head-specific,
//! elementwise or headwise), QK-norm or none, partial RoPE, both norm styles, tied or untied
//! head. Other configurations are refused with the reason.

use super::Engine;
use crate::backend::cuda::ops::{
    self, attn_head_dims_text, AdamStep, DeviceRope, FusedGate, HeadRows, Operand, TensorTable, ATTN_HEAD_DIMS,
};
use crate::backend::cuda::runtime::{down_f32, up_f32, write_f32, DBuf, Device};
use crate::config::{GateGranularity, ModelConfig, NormStyle};
use crate::model::graph;
use crate::model::observer::{Observer, RouterLog};
use crate::model::ops::rope::RopeTable;
use crate::model::params::{ParamIndex, ParamKind, ParamSpec, ParamStore};
use crate::model::{Batch, Model};
use crate::optim::{bias_correction, clip_coef, AdamW, AdamWConfig};
use anyhow::{bail, Result};
use memory::{head_chunk_rows, Plan, StepMemory};
use std::cell::Cell;

mod memory;
mod step;
mod weights;

pub struct DeviceModel<'d> {
    dev: &'d dyn Device,
    pub cfg: ModelConfig,
    specs: Vec<ParamSpec>,
    index: ParamIndex,
    params: Vec<DBuf>,
    grads: Vec<DBuf>,
    /// all of `grads` (their arena: zeroed and all-reduced in one call each)
    grad_all: DBuf,
    /// AdamW moments, and every tensor's (param, grad, m, v) for the multi-tensor kernels
    moments: Vec<(DBuf, DBuf)>,
    table: TensorTable,
    rope: DeviceRope,
    gate: FusedGate,
    pub step: u64,
    precision: Precision,
    /// bf16 copies of the GEMM weights (mixed precision): cast once in `new`, then rewritten by
    /// AdamW in the same kernel as the f32 masters (`table`).
    bf16_weights: Vec<Option<DBuf>>,
    /// Each layer's gate and up projections stacked, and its q, k, v and gate projections
    /// (views of the same memory as their entries in `params`, `grads`, `bf16_weights`).
    gate_up: Vec<weights::Stacked>,
    qkvz: Vec<weights::Stacked>,
    /// Activations, activation gradients and scratch of the last step's shape.
    mem: Option<StepMemory>,
    /// Rows per LM-head chunk when set (tests); else from the chunk's memory budget.
    head_rows: Option<usize>,
    /// [`Self::set_recompute`]
    recompute: bool,
    /// Whether steps are captured into graphs and replayed ([`Self::set_graphs`]; off with
    /// `GATED_LM_CUDA_GRAPH=0`, and after a capture failed).
    graphs: Cell<bool>,
}

/// Arithmetic of the device model: f32 throughout, or mixed precision (f32 master weights,
/// optimizer state, norms, softmax and loss; bf16 GEMM operands with f32 accumulation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    F32,
    Bf16,
}

/// Why a configuration cannot run on the device yet (`None`: it can).
pub fn unsupported(cfg: &ModelConfig) -> Option<String> {
    if cfg.moe.is_some() {
        return Some("Mixture-of-Experts layers are CPU-only".into());
    }
    if cfg.attention_bias {
        return Some("q/k/v projection biases (attention_bias, Qwen2) are CPU-only".into());
    }
    if !ATTN_HEAD_DIMS.contains(&cfg.head_dim) {
        return Some(format!(
            "head_dim {} (CUDA attention has {})",
            cfg.head_dim,
            attn_head_dims_text()
        ));
    }
    if let Some(why) = cfg.cpu_only_feature() {
        return Some(why);
    }
    match &cfg.gate {
        Some(g) if !g.is_standard_g1() => {
            Some("only the G1 multiplicative sigmoid head-specific gate is fused on the device".into())
        }
        _ => None,
    }
}

/// Whether a device model of `cfg` runs its attention on tensor cores ([`DeviceModel::tc_attention`]).
fn tc_attention(cfg: &ModelConfig, precision: Precision) -> bool {
    precision == Precision::Bf16 && ops::ATTN_TC_HEAD_DIMS.contains(&cfg.head_dim)
}

/// Bytes of the step memory a device model of `cfg` plans for `batch × seq` steps (LM-head
/// chunks of `head_rows` rows, or by their memory budget; with `recompute` as
/// [`DeviceModel::set_recompute`]), without a device.
pub fn planned_step_bytes(
    cfg: &ModelConfig,
    (batch, seq): (usize, usize),
    precision: Precision,
    head_rows: Option<usize>,
    recompute: bool,
) -> Result<usize> {
    let plan = step_plan(cfg, batch * seq, precision, head_rows, recompute);
    StepMemory::planned_bytes(cfg, (batch, seq), precision, plan)
}

fn step_plan(cfg: &ModelConfig, rows: usize, precision: Precision, head_rows: Option<usize>, recompute: bool) -> Plan {
    Plan {
        tc_attention: tc_attention(cfg, precision),
        head_rows: head_chunk_rows(rows, cfg.vocab_size, head_rows),
        recompute,
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
        let weights::Weights {
            params,
            grads,
            grad_all,
            bf16: bf16_weights,
            gate_up,
            qkvz,
        } = weights::upload(dev, model, precision)?;
        let moments = params
            .iter()
            .map(|p| Ok((dev.zeros(p.bytes)?, dev.zeros(p.bytes)?)))
            .collect::<Result<Vec<_>>>()?;
        let entries: Vec<_> = (0..params.len())
            .map(|i| {
                let exempt = matches!(model.specs[i].kind, ParamKind::Norm | ParamKind::Embedding);
                let bf16 = bf16_weights[i].as_ref();
                (&params[i], &grads[i], &moments[i].0, &moments[i].1, exempt, bf16)
            })
            .collect();
        let table = TensorTable::new(dev, &entries)?;
        let rope = RopeTable::<f32>::for_config(&cfg, cfg.max_position_embeddings.clamp(1, 1 << 16));
        Ok(DeviceModel {
            dev,
            rope: DeviceRope::upload(dev, &rope.cos, &rope.sin, rope.rotary_dim, rope.max_len)?,
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
            bf16_weights,
            gate_up,
            qkvz,
            grad_all,
            mem: None,
            head_rows: None,
            recompute: false,
            graphs: Cell::new(std::env::var("GATED_LM_CUDA_GRAPH").map_or(true, |v| v != "0")),
        })
    }

    pub fn device(&self) -> &'d dyn Device {
        self.dev
    }

    fn zc(&self) -> bool {
        self.cfg.norm_style == NormStyle::ZeroCentered
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

    /// The step memory for `batch × seq`, planned when the shape changes (the old plan is
    /// freed first) and taken out of `self` for the step.
    fn step_memory(&mut self, batch: usize, seq: usize) -> Result<StepMemory> {
        let plan = step_plan(&self.cfg, batch * seq, self.precision, self.head_rows, self.recompute);
        let key = (batch, seq, self.precision, plan);
        match self.mem.take() {
            Some(m) if (m.batch, m.seq, m.precision, m.plan) == key => Ok(m),
            old => {
                drop(old);
                StepMemory::new(self.dev, &self.cfg, (batch, seq), self.precision, plan)
            }
        }
    }

    /// Run the LM head and loss over chunks of `rows` rows (`None`: as many as keep a chunk's
    /// f32 logits within 256 MiB, but at least 1,024: `memory::head_chunk_rows`). For tests:
    /// the result does not depend on it beyond the summation order of the head's weight
    /// gradient.
    pub fn set_head_chunk_rows(&mut self, rows: Option<usize>) {
        self.head_rows = rows;
    }

    /// Bytes of the step memory a `batch × seq` step of this model will plan (activations,
    /// their gradients, scratch), without allocating it.
    pub fn planned_step_bytes(&self, batch: usize, seq: usize) -> Result<usize> {
        planned_step_bytes(&self.cfg, (batch, seq), self.precision, self.head_rows, self.recompute)
    }

    /// Recompute cheap activations in the backward instead of keeping them per layer: the
    /// norms' outputs h1 and h2 (one norm launch each) and the rotated q and k (one QK-norm +
    /// RoPE launch each). Bit-identical results; less memory (per token and layer 2·d + q + kv
    /// elements of the GEMMs' and the attention's operand types: 14 KB at 1p7b in bf16) for a
    /// few launches more, so for when memory, not speed, is short.
    pub fn set_recompute(&mut self, on: bool) {
        self.recompute = on;
    }

    /// Bytes of the current step memory (0 before the first step).
    pub fn step_memory_bytes(&self) -> usize {
        self.mem.as_ref().map_or(0, |m| m.bytes)
    }

    /// [`Self::loss`], reporting each layer's probe totals to `obs`
    /// ([`Observer::layer_totals`]: attention on key 0, small attention outputs, gate scores,
    /// the largest activation), reduced on the device as the forward passes each layer: an
    /// evaluation downloads a few numbers per layer, and runs eagerly (not from a graph).
    pub fn probe_loss(&mut self, b: &Batch, obs: &mut dyn Observer<f32>) -> Result<f64> {
        if !obs.takes_totals() {
            bail!(
                "{} reports per-layer totals of its forward, and this observer takes tensors",
                self.dev.describe()
            );
        }
        self.run_observed(b.ids, b.targets, (b.batch, b.seq), false, Some(obs))
    }

    fn run(&mut self, ids: &[u32], targets: &[u32], batch: usize, seq: usize, backward: bool) -> Result<f64> {
        self.run_observed(ids, targets, (batch, seq), backward, None)
    }

    fn run_observed(
        &mut self,
        ids: &[u32],
        targets: &[u32],
        (batch, seq): (usize, usize),
        backward: bool,
        probes: Option<&mut dyn Observer<f32>>,
    ) -> Result<f64> {
        Batch {
            ids,
            targets,
            batch,
            seq,
        }
        .check(self.cfg.vocab_size)?;
        if seq > self.rope.max_len {
            bail!("sequence of {seq} beyond the model's {} positions", self.rope.max_len);
        }
        let mut mem = self.step_memory(batch, seq)?;
        let loss = self.run_in(&mut mem, (ids, targets), backward, probes);
        self.mem = Some(mem);
        loss
    }

    fn run_in(
        &self,
        mem: &mut StepMemory,
        (ids, targets): (&[u32], &[u32]),
        backward: bool,
        probes: Option<&mut dyn Observer<f32>>,
    ) -> Result<f64> {
        let count = mem.stage(self.dev, ids, targets, backward, self.cfg.vocab_size)?;
        match probes {
            // the probes download between layers: never captured
            Some(obs) => {
                let layers = self.index.layers.len();
                let mut st = step::DeviceStep {
                    m: self,
                    mem,
                    probes: Some(obs),
                };
                graph::step(&mut st, layers, backward)?;
            }
            None => self.launch_step(mem, backward)?,
        }
        let losses = down_f32(self.dev, &mem.loss_rows)?;
        Ok(if count > 0 {
            losses.iter().map(|&l| l as f64).sum::<f64>() / count as f64
        } else {
            0.0
        })
    }

    /// The step's launches: eager the first time a shape runs (so that lazy initialisation,
    /// such as module loading or cuBLASLt's heuristics, happens outside a capture), captured
    /// into a graph the second time and replayed from then on (one launch per step instead of
    /// hundreds). Eager throughout on a device that does not capture, with graphs off, or
    /// after a capture failed (said once on stderr).
    fn launch_step(&self, mem: &mut StepMemory, backward: bool) -> Result<()> {
        let (layers, pass) = (self.index.layers.len(), backward as usize);
        if let Some(g) = &mem.graphs[pass] {
            return self.dev.replay(g);
        }
        let eager = |mem: &mut StepMemory| {
            let mut st = step::DeviceStep {
                m: self,
                mem,
                probes: None,
            };
            graph::step(&mut st, layers, backward)
        };
        if !self.graphs.get() || !mem.ran_eagerly[pass] {
            mem.ran_eagerly[pass] = true;
            return eager(mem);
        }
        match self.dev.capture(&mut || eager(mem)) {
            Ok(Some(g)) => {
                self.dev.replay(&g)?;
                mem.graphs[pass] = Some(g);
                Ok(())
            }
            Ok(None) => {
                self.graphs.set(false);
                eager(mem)
            }
            Err(e) => {
                eprintln!(
                    "warning: capturing the step into a graph failed on {}: {e:#}; steps launch their kernels one by one",
                    self.dev.describe()
                );
                self.graphs.set(false);
                eager(mem)
            }
        }
    }

    /// Capture each step shape's launches into a graph and replay it (default, unless
    /// `GATED_LM_CUDA_GRAPH=0`), or launch them one by one.
    pub fn set_graphs(&mut self, on: bool) {
        self.graphs.set(on);
    }

    /// Launches in the captured graph of the current shape's training step (forward and
    /// backward), if one was captured.
    pub fn step_graph_launches(&self) -> Option<usize> {
        self.mem.as_ref()?.graphs[1].as_ref().map(|g| g.launches)
    }

    /// Whether the attention runs on tensor cores ([`ops::attention_forward_tc`],
    /// [`ops::attention_backward_tc`]): in mixed precision, for the head dims those kernels
    /// exist for ([`ops::ATTN_TC_HEAD_DIMS`]). Otherwise (f32 precision, other head dims) the
    /// f32 kernels ([`ops::attention_fwd`], [`ops::attention_bwd`]).
    pub fn tc_attention(&self) -> bool {
        tc_attention(&self.cfg, self.precision)
    }

    /// A GEMM operand that is `x` in f32 precision and `shadow`, which its producer wrote in
    /// bf16, in mixed precision (the residual gradient's copy, the logits' gradient).
    fn shadowed<'a>(&self, x: &'a DBuf, shadow: Option<&'a DBuf>) -> Operand<'a> {
        match shadow {
            Some(b) if self.precision == Precision::Bf16 => Operand::bf16(b),
            _ => x.into(),
        }
    }

    /// Layer `l`'s stacked `[gate; up]` weight as a GEMM operand (its bf16 copy in mixed
    /// precision), and its gradient.
    fn gate_up(&self, l: usize) -> (Operand<'_>, &DBuf) {
        self.stacked(&self.gate_up[l])
    }

    /// Layer `l`'s stacked `[q; k; v; gate]` weight as a GEMM operand, and its gradient.
    fn qkvz(&self, l: usize) -> (Operand<'_>, &DBuf) {
        self.stacked(&self.qkvz[l])
    }

    fn stacked<'a>(&'a self, s: &'a weights::Stacked) -> (Operand<'a>, &'a DBuf) {
        (self.shadowed(&s.w, s.w_b.as_ref()), &s.grad)
    }

    /// Weight `i` as a GEMM operand (its bf16 copy in mixed precision).
    fn weight(&self, i: usize) -> Operand<'_> {
        self.shadowed(&self.params[i], self.bf16_weights[i].as_ref())
    }

    /// `y = x·W_iᵀ`
    fn lin_fwd(&self, x: Operand, w: usize, y: &DBuf, rows: usize, din: usize, dout: usize) -> Result<()> {
        self.lin_fwd_to(x, w, y.into(), rows, din, dout)
    }

    /// `y = r + x·W_iᵀ`, the residual added in the GEMM's epilogue ([`ops::linear_fwd_residual`]).
    fn lin_fwd_residual(&self, x: Operand, w: usize, (r, y): (&DBuf, &DBuf), shape: [usize; 3]) -> Result<()> {
        let [rows, din, dout] = shape;
        ops::linear_fwd_residual(self.dev, x, self.weight(w), r, y, rows, din, dout)
    }

    /// [`Self::lin_fwd`] with `y` in f32 or (from bf16 operands) bf16.
    fn lin_fwd_to(&self, x: Operand, w: usize, y: Operand, rows: usize, din: usize, dout: usize) -> Result<()> {
        ops::linear_fwd_to(self.dev, x, self.weight(w), y, rows, din, dout)
    }

    /// `dx (+)= dy·W_i`
    #[allow(clippy::too_many_arguments)]
    fn lin_bwd_dx(
        &self,
        dy: Operand,
        w: usize,
        dx: &DBuf,
        rows: usize,
        din: usize,
        dout: usize,
        acc: bool,
    ) -> Result<()> {
        ops::linear_bwd_dx(self.dev, dy, self.weight(w), dx, rows, din, dout, acc)
    }

    /// `dW_i += dyᵀ·x`
    fn lin_bwd_dw(&self, x: Operand, dy: Operand, w: usize, rows: usize, din: usize, dout: usize) -> Result<()> {
        ops::linear_bwd_dw(self.dev, x, dy, &self.grads[w], rows, din, dout)
    }

    /// Set every gradient to zero (before accumulating a new step's micro-batches).
    pub fn zero_grads(&self) -> Result<()> {
        ops::fill(self.dev, &self.grad_all, 0.0, self.grad_all.bytes / 4)
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
            bias_correction1: bias_correction(opt.beta1, step) as f32,
            bias_correction2: bias_correction(opt.beta2, step) as f32,
            scale,
        };
        let exempt = if opt.no_decay_norms_embeddings {
            0.0
        } else {
            hp.weight_decay
        };
        // the bf16 weight copies are rewritten in the same launch
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
    pub fn all_reduce_grads(&mut self, comm: &dyn crate::backend::cuda::dist::GradAllReduce) -> Result<()> {
        comm.all_reduce_sum(self.dev, std::slice::from_mut(&mut self.grad_all))
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

impl Engine for DeviceModel<'_> {
    fn describe(&self) -> String {
        self.dev.describe()
    }

    fn zero_grads(&mut self) -> Result<()> {
        DeviceModel::zero_grads(self)
    }

    fn micro_batch(&mut self, _model: &Model<f32>, b: &Batch, _routers: &mut RouterLog) -> Result<f64> {
        self.forward_backward(b.ids, b.targets, b.batch, b.seq)
    }

    fn eval_loss(&mut self, _model: &Model<f32>, b: &Batch) -> Result<f64> {
        self.loss(b.ids, b.targets, b.batch, b.seq)
    }

    fn eval_observed(&mut self, _model: &Model<f32>, b: &Batch, obs: &mut dyn Observer<f32>) -> Result<f64> {
        self.probe_loss(b, obs)
    }

    fn evaluates_itself(&self) -> bool {
        true
    }

    /// Folded into the norm and the update (no pass over the gradients).
    fn scale_grads(&mut self, s: f32) -> f32 {
        s
    }

    fn grad_norm(&self, pending: f32) -> Result<f64> {
        Ok(DeviceModel::grad_norm(self)? * pending as f64)
    }

    fn bad_tensors(&self, names: &[String]) -> Result<Vec<String>> {
        Ok(super::cpu::non_finite(names, &self.grads()?))
    }

    fn update(&mut self, _model: &mut Model<f32>, opt: &mut AdamW<f32>, lr: f64, scale: f64) -> Result<()> {
        DeviceModel::update(self, &opt.cfg, lr, scale as f32)
    }

    fn sync(&self, model: &mut Model<f32>, opt: &mut AdamW<f32>) -> Result<()> {
        model.params = self.params()?;
        self.optimizer_into(opt)
    }

    fn all_reduce(&mut self, comm: &dyn crate::backend::cuda::dist::GradAllReduce, loss: f64) -> Result<f64> {
        self.all_reduce_grads(comm)?;
        let mut l = vec![up_f32(self.dev, &[loss as f32])?];
        comm.all_reduce_sum(self.dev, &mut l)?;
        Ok(down_f32(self.dev, &l[0])?[0] as f64)
    }
}
