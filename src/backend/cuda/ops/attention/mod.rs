//! Fused causal attention with the G1 gate, f32 on CUDA cores (attention.cu); the tensor-core
//! (bf16) forward and backward are [`tc`] (attention_tc.cu).

pub mod tc;

use super::{f32s, sized, Cols, DType, KernelSource, Operand};
use crate::backend::cuda::runtime::{Arg, DBuf, Device, Launch};
use anyhow::{bail, Result};
pub use tc::{
    attention_backward_tc, attention_backward_tc_planted, attention_backward_tc_to, attention_forward_tc,
    attention_forward_tc_to, attention_tc_kernels, ATTN_TC_HEAD_DIMS,
};

/// The head dims the f32 attention kernels exist for: attention.cu instantiates
/// `ATTN_KERNELS(HD)` for each. Written once here; the entry points in [`SOURCE`] and
/// [`ATTN_HEAD_DIMS`] are generated from it, and a device whose module lacks one of those entry
/// points fails to open, so the .cu file cannot silently disagree.
macro_rules! attn_head_dims {
    ($then:ident) => {
        $then!(16, 32, 64, 128)
    };
}
macro_rules! as_array {
    ($($hd:literal),*) => {
        [$($hd),*]
    };
}
macro_rules! attention_entries {
    ($($hd:literal),*) => {
        &["attn_bwd_pre", "attn_bwd_pre_bf16", "attn_bwd_pre_tc", "attn_bwd_pre_tc_bf16", "attn_bwd_pre_tc_bf16oz", $(
            concat!("attn_fwd_hd", $hd),
            concat!("attn_fwd_hd", $hd, "_bf16"),
            concat!("attn_bwd_dkdv_hd", $hd),
            concat!("attn_bwd_dkdv_hd", $hd, "_bf16"),
            concat!("attn_bwd_dq_hd", $hd)
        ),*]
    };
}

pub const SOURCE: KernelSource = KernelSource {
    name: "attention",
    text: include_str!("attention.cu"),
    entries: attn_head_dims!(attention_entries),
};

/// Head dims with attention kernels (the only ones the device path runs).
pub const ATTN_HEAD_DIMS: &[usize] = &attn_head_dims!(as_array);

/// [`ATTN_HEAD_DIMS`] for messages: "16, 32, 64, 128".
pub fn attn_head_dims_text() -> String {
    ATTN_HEAD_DIMS
        .iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Shapes of a causal attention call (layouts as the CPU op's).
#[derive(Clone, Copy, Debug)]
pub struct AttnDims {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// The G1 gate fused into attention: multiplicative sigmoid, head-specific, on the SDPA output.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum FusedGate {
    None = 0,
    Elementwise = 1,
    Headwise = 2,
}

/// The kernel-name suffix of an output written in bf16 for the GEMMs that read it.
fn suffix(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "",
        DType::Bf16 => "_bf16",
    }
}

/// Rows per attention block (attention.cu `BR`).
const ATTN_ROWS: usize = 64;

impl AttnDims {
    fn check(&self) -> Result<()> {
        if !ATTN_HEAD_DIMS.contains(&self.head_dim) {
            bail!(
                "CUDA attention: head_dim {} (kernels exist for {})",
                self.head_dim,
                attn_head_dims_text()
            );
        }
        if self.kv_heads == 0 || !self.heads.is_multiple_of(self.kv_heads) {
            bail!(
                "CUDA attention: {} query heads are not a multiple of {} kv heads",
                self.heads,
                self.kv_heads
            );
        }
        Ok(())
    }
    fn rows(&self) -> usize {
        self.batch * self.seq
    }
    fn q_elems(&self) -> usize {
        self.rows() * self.heads * self.head_dim
    }
    fn kv_elems(&self) -> usize {
        self.rows() * self.kv_heads * self.head_dim
    }
    fn z_elems(&self, gate: FusedGate) -> usize {
        match gate {
            FusedGate::None => 0,
            FusedGate::Elementwise => self.q_elems(),
            FusedGate::Headwise => self.rows() * self.heads,
        }
    }
    fn grid(&self, heads: usize) -> Launch {
        Launch {
            grid: [self.seq.div_ceil(ATTN_ROWS) as u32, heads as u32, self.batch as u32],
            block: [ATTN_ROWS as u32, 1, 1],
            smem: 0,
        }
    }
    fn common(&self) -> [Arg; 4] {
        [
            Arg::I32(self.seq as i32),
            Arg::I32(self.heads as i32),
            Arg::I32(self.kv_heads as i32),
            Arg::F32(1.0 / (self.head_dim as f32).sqrt()),
        ]
    }
}

/// The gate logits `z` or their gradient `dz` (each f32 or bf16) as a kernel argument: null
/// without a gate, else checked for size in its own type.
fn gate_arg(what: &str, z: Option<Operand>, d: &AttnDims, gate: FusedGate) -> Result<Arg> {
    match (gate, z) {
        (FusedGate::None, _) => Ok(Arg::Ptr(0)),
        (_, Some(z)) => {
            sized(what, z, d.z_elems(gate))?;
            Ok(z.buf.arg())
        }
        (_, None) => bail!("{what}: a gated attention needs the gate logits"),
    }
}

/// The type the attention's saved output `o` and the gate logits `z` share (f32, or bf16 for
/// the tensor-core kernels in mixed precision: their `_bf16oz` entries), checking `o`'s size.
/// `out` is the output that goes with them, `y` in the forward and `dz` in the backward (a GEMM
/// operand): with bf16 `o` and `z` it must be bf16 too, the one combination those kernels
/// exist for (`None`: no such output, as `dz` without a gate).
fn saved_type(what: &str, d: &AttnDims, o: Operand, z: Option<Operand>, out: Option<Operand>) -> Result<DType> {
    sized(what, o, d.q_elems())?;
    if let Some(z) = z.filter(|z| z.dtype != o.dtype) {
        bail!(
            "{what}: o is {:?} and z {:?}: the attention reads its output and the gate logits in one type",
            o.dtype,
            z.dtype
        );
    }
    if let (DType::Bf16, Some(out)) = (o.dtype, out) {
        if out.dtype != DType::Bf16 {
            bail!(
                "{what}: o and z in bf16 go with bf16 GEMM operands (y, dz) only, got {:?} (no kernel for the mix)",
                out.dtype
            );
        }
    }
    Ok(o.dtype)
}

/// The backward's pre-pass `kernel` (`attn_bwd_pre`, or `attn_bwd_pre_tc` writing dO in bf16;
/// its `_bf16` variant when `dz` is bf16, `_bf16oz` when `o` and `z` are bf16 as well, which
/// only the tensor-core backward has): from `dy` the ungated output's gradient into
/// `scratch.dout`, the gate logits' gradient `dz`, and `scratch.delta` = rowsum(dO ⊙ O). `what`
/// names the caller in errors.
pub(super) fn backward_pre(
    dev: &dyn Device,
    kernel: &str,
    what: &str,
    d: &AttnDims,
    gate: FusedGate,
    (o, z, dy, dz): (Operand, Option<Operand>, &DBuf, Option<Cols>),
    scratch: &AttnScratch,
) -> Result<()> {
    let zarg = gate_arg(what, z, d, gate)?;
    // dz densely or as a band of the stacked projections' gradient (rows ldz apart)
    let (dzarg, ldz) = match (gate, dz) {
        (FusedGate::None, _) => (Arg::Ptr(0), 0),
        (_, Some(dz)) => {
            let ld = dz.ld(&format!("{what} (dz)"), d.rows(), d.z_elems(gate) / d.rows().max(1))?;
            (dz.out.buf.arg(), ld)
        }
        (_, None) => bail!("{what} (dz): a gated attention needs the gate logits' gradient"),
    };
    let dz = dz.map(|c| c.out);
    let dz_used = dz.filter(|_| gate != FusedGate::None);
    let kernel = match saved_type(what, d, o, z.filter(|_| gate != FusedGate::None), dz_used)? {
        DType::Bf16 if kernel == "attn_bwd_pre_tc" => format!("{kernel}_bf16oz"),
        DType::Bf16 => bail!("{what}: o and z in bf16 are read by the tensor-core backward only"),
        DType::F32 => format!("{kernel}{}", suffix(dz.map_or(DType::F32, |z| z.dtype))),
    };
    let pre = [
        o.buf.arg(),
        zarg,
        dy.arg(),
        scratch.dout.arg(),
        dzarg,
        Arg::I64(ldz as i64),
        scratch.delta.arg(),
        Arg::I32(d.rows() as i32),
        Arg::I32(d.seq as i32),
        Arg::I32(d.heads as i32),
        Arg::I32(d.head_dim as i32),
        Arg::I32(gate as i32),
    ];
    // one warp per (row, head), 4 warps per block
    let pairs = d.rows() * d.heads;
    dev.launch(&kernel, Launch::linear(pairs.div_ceil(4), 128), &pre)
}

/// Forward: `o` the attention output, `y = o ⊙ sigmoid(z)` (or `o` without gate), `lse` per
/// (batch, head, row) for the backward.
#[allow(clippy::too_many_arguments)]
pub fn attention_fwd(
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
    attention_fwd_to(dev, d, gate, q, k, v, z, o, y.into(), lse)
}

/// [`attention_fwd`] with `y` in f32 or bf16 (rounded from the same f32 value): the output
/// projection's input, in the type its GEMMs read.
#[allow(clippy::too_many_arguments)]
pub fn attention_fwd_to(
    dev: &dyn Device,
    d: &AttnDims,
    gate: FusedGate,
    q: &DBuf,
    k: &DBuf,
    v: &DBuf,
    z: Option<&DBuf>,
    o: &DBuf,
    y: Operand,
    lse: &DBuf,
) -> Result<()> {
    d.check()?;
    f32s("attention_fwd", &[q, o], d.q_elems())?;
    sized("attention_fwd", y, d.q_elems())?;
    f32s("attention_fwd", &[k, v], d.kv_elems())?;
    f32s("attention_fwd", &[lse], d.rows() * d.heads)?;
    let zarg = gate_arg("attention_fwd", z.map(Operand::from), d, gate)?;
    let mut args = vec![q.arg(), k.arg(), v.arg(), zarg, o.arg(), y.buf.arg(), lse.arg()];
    args.extend(d.common());
    args.push(Arg::I32(gate as i32));
    let kernel = format!("attn_fwd_hd{}{}", d.head_dim, suffix(y.dtype));
    dev.launch(&kernel, d.grid(d.heads), &args)
}

/// Scratch of the backward: the ungated output's gradient and the per-row `rowsum(dO ⊙ O)`.
pub struct AttnScratch {
    pub dout: DBuf,
    pub delta: DBuf,
}

impl AttnScratch {
    pub fn new(dev: &dyn Device, d: &AttnDims) -> Result<AttnScratch> {
        Ok(AttnScratch {
            dout: dev.zeros(d.q_elems() * 4)?,
            delta: dev.zeros(d.rows() * d.heads * 4)?,
        })
    }
}

/// Backward from `dy` (the gated output's gradient): overwrites `dq`, `dk`, `dv` and, gated,
/// `dz`. `o` and `lse` are the forward's.
#[allow(clippy::too_many_arguments)]
pub fn attention_bwd(
    dev: &dyn Device,
    d: &AttnDims,
    gate: FusedGate,
    (q, k, v, z): (&DBuf, &DBuf, &DBuf, Option<&DBuf>),
    (o, lse, dy): (&DBuf, &DBuf, &DBuf),
    scratch: &AttnScratch,
    (dq, dk, dv, dz): (&DBuf, &DBuf, &DBuf, Option<&DBuf>),
) -> Result<()> {
    let grads = (dq, dk, dv.into(), dz.map(Cols::from));
    attention_bwd_to(dev, d, gate, (q, k, v, z), (o, lse, dy), scratch, grads)
}

/// [`attention_bwd`] with `dv` and `dz` each in f32 or bf16 (rounded from the same f32 values):
/// the v and gate projections' output gradients, in the type their GEMMs read, each dense or a
/// band of the stacked projections' gradient ([`Cols`]). `dq` and `dk` stay f32 (QK-norm +
/// RoPE's backward reads them).
#[allow(clippy::too_many_arguments)]
pub fn attention_bwd_to(
    dev: &dyn Device,
    d: &AttnDims,
    gate: FusedGate,
    (q, k, v, z): (&DBuf, &DBuf, &DBuf, Option<&DBuf>),
    (o, lse, dy): (&DBuf, &DBuf, &DBuf),
    scratch: &AttnScratch,
    (dq, dk, dv, dz): (&DBuf, &DBuf, Cols, Option<Cols>),
) -> Result<()> {
    d.check()?;
    f32s("attention_bwd", &[q, o, dy, dq, &scratch.dout], d.q_elems())?;
    f32s("attention_bwd", &[k, v, dk], d.kv_elems())?;
    let ldv = dv.ld("attention_bwd (dv)", d.rows(), d.kv_heads * d.head_dim)?;
    let dv = dv.out;
    f32s("attention_bwd", &[lse, &scratch.delta], d.rows() * d.heads)?;
    let bwd = (o.into(), z.map(Operand::from), dy, dz);
    backward_pre(dev, "attn_bwd_pre", "attention_bwd", d, gate, bwd, scratch)?;
    let ins = [
        q.arg(),
        k.arg(),
        v.arg(),
        scratch.dout.arg(),
        lse.arg(),
        scratch.delta.arg(),
    ];
    let mut args = ins.to_vec();
    args.extend([dk.arg(), dv.buf.arg(), Arg::I64(ldv as i64)]);
    args.extend(d.common());
    let hd = d.head_dim;
    let dkdv = format!("attn_bwd_dkdv_hd{hd}{}", suffix(dv.dtype));
    dev.launch(&dkdv, d.grid(d.kv_heads), &args)?;
    let mut args = ins.to_vec();
    args.push(dq.arg());
    args.extend(d.common());
    dev.launch(&format!("attn_bwd_dq_hd{hd}"), d.grid(d.heads), &args)
}
