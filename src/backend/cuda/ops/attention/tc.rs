//! Causal attention with the G1 gate on tensor cores (attention_tc.cu): FlashAttention-2
//! forward and backward on bf16 Q/K/V, everything else f32 in the layouts of the f32 kernels
//! ([`super`]), or in mixed precision the saved output `o`, the gate logits `z` and the GEMM
//! operands (`y`, `dv`, `dz`) bf16 too. Also the hd64 backward with planted bugs, a reference
//! for the tests only.

use super::{gate_arg, saved_type, suffix, AttnDims, AttnScratch, FusedGate};
use crate::backend::cuda::ops::{f32s, need, sized, Cols, DType, KernelSource, Operand};
use crate::backend::cuda::runtime::{Arg, DBuf, Device, Launch};
use anyhow::{bail, Result};

pub const SOURCE: KernelSource = KernelSource {
    name: "attention_tc",
    text: include_str!("attention_tc.cu"),
    entries: &[
        "attn_fwd_tc_hd64",
        "attn_fwd_tc_hd128",
        "attn_fwd_tc_hd64_bf16",
        "attn_fwd_tc_hd128_bf16",
        "attn_fwd_tc_hd64_bf16oz",
        "attn_fwd_tc_hd128_bf16oz",
        "attn_bwd_dkdv_tc_hd64",
        "attn_bwd_dq_tc_hd64",
        "attn_bwd_dkdv_tc_hd128",
        "attn_bwd_dkdv_tc_hd64_bf16",
        "attn_bwd_dkdv_tc_hd128_bf16",
        "attn_bwd_dq_tc_hd128",
        // references for the tests only (tests/cuda_tensor_core), never launched by the model
        "attn_bwd_dkdv_tc_planted",
        "attn_bwd_dq_tc_planted",
    ],
};

/// Probes of the tensor-core primitives (mma, ldmatrix, cp.async) for the tests
/// (tests/cuda_tensor_core), never launched by the model.
pub const PROBE_SOURCE: KernelSource = KernelSource {
    name: "tc_probe",
    text: include_str!("tc_probe.cu"),
    entries: &["tc_mma_probe", "cp_async_probe"],
};

/// Head dims of the tensor-core forward (attention_tc.cu `ATTN_TC_KERNEL`).
pub const ATTN_TC_HEAD_DIMS: &[usize] = &[64, 128];

/// Keys per staged tile and per dK/dV block (attention_tc.cu `TC_KEYS`: 4 warps of 16), and the
/// threads of every tensor-core attention block.
const ATTN_TC_KEYS: usize = 64;
const ATTN_TC_THREADS: u32 = 128;

/// Query rows per forward and dQ block (attention_tc.cu `attn_tc_query_mtiles`): 4 warps of 2 m
/// tiles of 16 rows at hd64 (FlashAttention-2's 128-row blocks), of 1 at hd128.
fn query_rows(head_dim: usize) -> usize {
    if head_dim <= 64 {
        128
    } else {
        64
    }
}

/// Dynamic shared memory of the forward and dQ kernels, bytes (attention_tc.cu
/// `attn_tc_smem_fwd`): two K and two V tiles of 64 keys, rows padded by 8 bf16. 36 KB at hd64,
/// 68 KB at hd128 (past 48 KB: the device opts the kernel in at launch).
fn smem_fwd(head_dim: usize) -> u32 {
    (4 * ATTN_TC_KEYS * (head_dim + 8) * 2) as u32
}

/// Dynamic shared memory of the dK/dV kernel, bytes (attention_tc.cu `attn_tc_smem_dkdv`): two
/// Q and two dO tiles (64 queries; 16 at hd128) with their lse and D, and at hd128 the block's
/// 64 K and V rows. 37 KB at hd64, 51 KB at hd128. The emulator refuses a launch that gives a
/// kernel less than it uses.
fn smem_dkdv(head_dim: usize) -> u32 {
    let queries = if head_dim <= 64 { 64 } else { 16 };
    let kv = if head_dim <= 64 {
        0
    } else {
        2 * ATTN_TC_KEYS * (head_dim + 8) * 2
    };
    (4 * queries * (head_dim + 8) * 2 + kv + 4 * queries * 4) as u32
}

/// The tensor-core kernels mixed precision launches at `head_dim` (forward, dK/dV, dQ), each
/// with its block size and dynamic shared memory (a one-block grid: the grid is the problem's),
/// for [`Device::kernel_resources`]: what the GPU's compiler made of them.
pub fn attention_tc_kernels(head_dim: usize) -> Vec<(String, Launch)> {
    let cfg = |smem| Launch {
        grid: [1, 1, 1],
        block: [ATTN_TC_THREADS, 1, 1],
        smem,
    };
    vec![
        (format!("attn_fwd_tc_hd{head_dim}_bf16oz"), cfg(smem_fwd(head_dim))),
        (format!("attn_bwd_dkdv_tc_hd{head_dim}_bf16"), cfg(smem_dkdv(head_dim))),
        (format!("attn_bwd_dq_tc_hd{head_dim}"), cfg(smem_fwd(head_dim))),
    ]
}

/// [`attention_fwd`](super::attention_fwd) on tensor cores (FlashAttention-2 forward): `q`, `k`, `v` bf16 in the same
/// layouts, `z` and the outputs `o`, `y`, `lse` f32 exactly as there, so the f32 backward
/// consumes them. Products and sums are f32 from bf16 inputs; the probabilities are rounded to
/// bf16 for P·V (the one rounding beyond the inputs').
#[allow(clippy::too_many_arguments)]
pub fn attention_forward_tc(
    dev: &dyn Device,
    d: &AttnDims,
    gate: FusedGate,
    q: &DBuf,
    k: &DBuf,
    v: &DBuf,
    z: Option<&DBuf>,
    o: &DBuf,
    y: &DBuf,
    lse: &DBuf,
) -> Result<()> {
    attention_forward_tc_to(dev, d, gate, q, k, v, z.map(Operand::from), o.into(), y.into(), lse)
}

/// [`attention_forward_tc`] with `y` in f32 or bf16 (rounded from the same f32 value): the
/// output projection's input, in the type its GEMMs read; and `z` and `o` both f32 or, with a
/// bf16 `y` (mixed precision), both bf16 (the `_bf16oz` kernels: `z` read in bf16, `o` stored
/// rounded from the f32 value `y` is computed from). Other mixes are refused.
#[allow(clippy::too_many_arguments)]
pub fn attention_forward_tc_to(
    dev: &dyn Device,
    d: &AttnDims,
    gate: FusedGate,
    q: &DBuf,
    k: &DBuf,
    v: &DBuf,
    z: Option<Operand>,
    o: Operand,
    y: Operand,
    lse: &DBuf,
) -> Result<()> {
    let what = "attention_forward_tc";
    if !ATTN_TC_HEAD_DIMS.contains(&d.head_dim) {
        bail!(
            "{what}: head_dim {} (tensor-core kernels exist for {ATTN_TC_HEAD_DIMS:?})",
            d.head_dim
        );
    }
    d.check()?;
    need(what, q, d.q_elems(), 2)?;
    need(what, k, d.kv_elems(), 2)?;
    need(what, v, d.kv_elems(), 2)?;
    // K/V rows are staged as 16-byte vectors (head_dim·2 bytes is a multiple of 16)
    if !(k.ptr.is_multiple_of(16) && v.ptr.is_multiple_of(16) && q.ptr.is_multiple_of(4)) {
        bail!("{what}: k and v must be 16-byte aligned, q 4-byte aligned");
    }
    sized(what, y, d.q_elems())?;
    f32s(what, &[lse], d.rows() * d.heads)?;
    let zarg = gate_arg(what, z, d, gate)?;
    let oz = match saved_type(what, d, o, z.filter(|_| gate != FusedGate::None), Some(y))? {
        DType::F32 => "",
        DType::Bf16 => "oz",
    };
    let mut args = vec![q.arg(), k.arg(), v.arg(), zarg, o.buf.arg(), y.buf.arg(), lse.arg()];
    args.extend(d.common());
    args.push(Arg::I32(gate as i32));
    let cfg = Launch {
        grid: [
            d.seq.div_ceil(query_rows(d.head_dim)) as u32,
            d.heads as u32,
            d.batch as u32,
        ],
        block: [ATTN_TC_THREADS, 1, 1],
        smem: smem_fwd(d.head_dim),
    };
    dev.launch(
        &format!("attn_fwd_tc_hd{}{}{oz}", d.head_dim, suffix(y.dtype)),
        cfg,
        &args,
    )
}

/// [`attention_bwd`](super::attention_bwd) on tensor cores (FlashAttention-2 backward, attention_tc.cu): `q`,
/// `k`, `v` bf16 (those the tensor-core forward read), everything else f32 in the same
/// layouts as there: `o` and `lse` the forward's, `dy` the gated output's gradient; overwrites
/// `dq`, `dk`, `dv` and, gated, `dz`. `scratch.dout` holds dO as bf16 here (its first half),
/// `scratch.delta` as there. Three launches: the pre-pass (gate gradient, D = rowsum(dO ⊙ O) in
/// f32, dO to bf16), dK/dV per 64 keys (the query heads of a kv head summed in one block), dQ
/// per 64 query rows. Deterministic (no atomics); products and sums f32 from bf16 operands,
/// with P (for dV) and dS (for dK, dQ) rounded to bf16 as mma operands.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_tc(
    dev: &dyn Device,
    d: &AttnDims,
    gate: FusedGate,
    inputs: (&DBuf, &DBuf, &DBuf, Option<&DBuf>),
    fwd: (&DBuf, &DBuf, &DBuf),
    scratch: &AttnScratch,
    (dq, dk, dv, dz): (&DBuf, &DBuf, &DBuf, Option<&DBuf>),
) -> Result<()> {
    let grads = (dq, dk, dv.into(), dz.map(Cols::from));
    let (q, k, v, z) = inputs;
    let (o, lse, dy) = fwd;
    let (inputs, fwd) = ((q, k, v, z.map(Operand::from)), (o.into(), lse, dy));
    backward_tc(dev, d, gate, inputs, fwd, scratch, grads, None)
}

/// [`attention_backward_tc`] with `dv` and `dz` each in f32 or bf16 (rounded from the same f32
/// values): the v and gate projections' output gradients, in the type their GEMMs read; and
/// the forward's `o` and the gate logits `z` both f32 or, with a bf16 `dz` (mixed precision),
/// both bf16 (the pre-pass's `_bf16oz` kernel: D and dz from the one bf16 `o`). Other mixes
/// are refused.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_tc_to(
    dev: &dyn Device,
    d: &AttnDims,
    gate: FusedGate,
    inputs: (&DBuf, &DBuf, &DBuf, Option<Operand>),
    fwd: (Operand, &DBuf, &DBuf),
    scratch: &AttnScratch,
    grads: (&DBuf, &DBuf, Cols, Option<Cols>),
) -> Result<()> {
    backward_tc(dev, d, gate, inputs, fwd, scratch, grads, None)
}

/// [`attention_backward_tc`] through the hd64 kernels with planted bug `plant` (1: the causal
/// mask of the diagonal tiles dropped, 2: −D dropped from dS, 3: two registers of an A fragment
/// swapped): for the tests that show such bugs fail.
#[doc(hidden)]
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_tc_planted(
    dev: &dyn Device,
    d: &AttnDims,
    gate: FusedGate,
    inputs: (&DBuf, &DBuf, &DBuf, Option<&DBuf>),
    fwd: (&DBuf, &DBuf, &DBuf),
    scratch: &AttnScratch,
    (dq, dk, dv, dz): (&DBuf, &DBuf, &DBuf, Option<&DBuf>),
    plant: i32,
) -> Result<()> {
    if d.head_dim != 64 {
        bail!("attention_backward_tc_planted: the planted kernels are hd64");
    }
    let grads = (dq, dk, dv.into(), dz.map(Cols::from));
    let (q, k, v, z) = inputs;
    let (o, lse, dy) = fwd;
    let (inputs, fwd) = ((q, k, v, z.map(Operand::from)), (o.into(), lse, dy));
    backward_tc(dev, d, gate, inputs, fwd, scratch, grads, Some(plant))
}

#[allow(clippy::too_many_arguments)]
fn backward_tc(
    dev: &dyn Device,
    d: &AttnDims,
    gate: FusedGate,
    (q, k, v, z): (&DBuf, &DBuf, &DBuf, Option<Operand>),
    (o, lse, dy): (Operand, &DBuf, &DBuf),
    scratch: &AttnScratch,
    (dq, dk, dv, dz): (&DBuf, &DBuf, Cols, Option<Cols>),
    plant: Option<i32>,
) -> Result<()> {
    let what = "attention_backward_tc";
    if plant.is_some() && dv.out.dtype != DType::F32 {
        bail!("{what}: the planted kernels write dv in f32");
    }
    if !ATTN_TC_HEAD_DIMS.contains(&d.head_dim) {
        bail!(
            "{what}: head_dim {} (tensor-core kernels exist for {ATTN_TC_HEAD_DIMS:?})",
            d.head_dim
        );
    }
    d.check()?;
    need(what, q, d.q_elems(), 2)?;
    need(what, k, d.kv_elems(), 2)?;
    need(what, v, d.kv_elems(), 2)?;
    need(what, &scratch.dout, d.q_elems(), 2)?;
    // Q, dO (and at hd128 K, V) rows are staged as 16-byte vectors (head_dim·2 bytes is a
    // multiple of 16); K, V fragments are read as bf16 pairs otherwise
    if ![q, k, v, &scratch.dout].iter().all(|b| b.ptr.is_multiple_of(16)) {
        bail!("{what}: q, k, v and scratch.dout must be 16-byte aligned");
    }
    f32s(what, &[dy, dq], d.q_elems())?;
    f32s(what, &[dk], d.kv_elems())?;
    let ldv = dv.ld(&format!("{what} (dv)"), d.rows(), d.kv_heads * d.head_dim)?;
    let dv = dv.out;
    f32s(what, &[lse, &scratch.delta], d.rows() * d.heads)?;
    super::backward_pre(dev, "attn_bwd_pre_tc", what, d, gate, (o, z, dy, dz), scratch)?;
    let ins = [
        q.arg(),
        k.arg(),
        v.arg(),
        scratch.dout.arg(),
        lse.arg(),
        scratch.delta.arg(),
    ];
    let cfg = |rows: usize, heads: usize, smem: u32| Launch {
        grid: [d.seq.div_ceil(rows) as u32, heads as u32, d.batch as u32],
        block: [ATTN_TC_THREADS, 1, 1],
        smem,
    };
    let name = |kernel: &str, out: DType| match plant {
        None => format!("attn_bwd_{kernel}_tc_hd{}{}", d.head_dim, suffix(out)),
        Some(_) => format!("attn_bwd_{kernel}_tc_planted"),
    };
    // dK/dV: a block per 64 keys (attention_tc.cu `TC_KEYS`, = ATTN_TC_KEYS) of a kv head; dQ a
    // block per 128 query rows at hd64, 64 at hd128
    let mut args = ins.to_vec();
    args.extend([dk.arg(), dv.buf.arg(), Arg::I64(ldv as i64)]);
    args.extend(d.common());
    args.extend(plant.map(Arg::I32));
    let dkdv = cfg(ATTN_TC_KEYS, d.kv_heads, smem_dkdv(d.head_dim));
    dev.launch(&name("dkdv", dv.dtype), dkdv, &args)?;
    let mut args = ins.to_vec();
    args.push(dq.arg());
    args.extend(d.common());
    args.extend(plant.map(Arg::I32));
    let dq_cfg = cfg(query_rows(d.head_dim), d.heads, smem_fwd(d.head_dim));
    dev.launch(&name("dq", DType::F32), dq_cfg, &args)
}
