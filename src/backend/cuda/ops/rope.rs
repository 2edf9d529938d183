//! QK-norm fused with RoPE, forward and backward (rope.cu; the gain's gradient as one partial
//! row per block, which [`sum_rows`] adds up); the forward's output (which the tensor-core attention reads) and the
//! backward's (which the projections' GEMMs read) in f32 or bf16, and the pre-norm input (the
//! q/k projections' GEMM output, which both passes read) in f32 or bf16.

use super::reduce::{norm_bwd_blocks, norm_bwd_scratch_len, sum_rows};
use super::{f32s, sized, Cols, DType, KernelSource, Operand};
use crate::backend::cuda::runtime::{up_f32, Arg, DBuf, Device, Launch};
use anyhow::{bail, Result};

pub const SOURCE: KernelSource = KernelSource {
    name: "rope",
    text: include_str!("rope.cu"),
    entries: &[
        "qknorm_rope_fwd",
        "qknorm_rope_fwd_bf16",
        "qknorm_rope_fwd_from_bf16",
        "qknorm_rope_fwd_bf16_from_bf16",
        "qknorm_rope_bwd",
        "qknorm_rope_bwd_bf16",
        "qknorm_rope_bwd_from_bf16",
        "qknorm_rope_bwd_bf16_from_bf16",
    ],
};

/// A RoPE table on the device: `cos`/`sin` `[max_len, half]`.
pub struct DeviceRope {
    pub cos: DBuf,
    pub sin: DBuf,
    pub half: usize,
    pub max_len: usize,
}

impl DeviceRope {
    /// From a host table's `cos`/`sin` (`[max_len, rotary_dim / 2]` each).
    pub fn upload(dev: &dyn Device, cos: &[f32], sin: &[f32], rotary_dim: usize, max_len: usize) -> Result<DeviceRope> {
        let half = rotary_dim / 2;
        if cos.len() != max_len * half || sin.len() != max_len * half {
            bail!(
                "RoPE table of {}/{} values for {max_len} positions × {half}",
                cos.len(),
                sin.len()
            );
        }
        Ok(DeviceRope {
            cos: up_f32(dev, cos)?,
            sin: up_f32(dev, sin)?,
            half,
            max_len,
        })
    }
}

/// Shapes of one QK-norm + RoPE call: `x` is `[rows, heads·head_dim]`, row r at position
/// `r % seq`; `norm` the gain (`None`: no QK-norm) and whether it is zero-centred.
#[derive(Clone, Copy)]
pub struct HeadRows<'a> {
    pub rows: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub seq: usize,
    pub norm: Option<&'a DBuf>,
    pub zero_centered: bool,
}

impl HeadRows<'_> {
    /// The table covers the shape; `x` (either type) and the f32 `bufs` hold a value per element.
    fn check(&self, what: &str, rope: &DeviceRope, x: Operand, bufs: &[&DBuf]) -> Result<()> {
        if self.seq > rope.max_len || 2 * rope.half > self.head_dim {
            bail!(
                "{what}: sequence {} / head_dim {} beyond the RoPE table ({} positions, {} dims)",
                self.seq,
                self.head_dim,
                rope.max_len,
                2 * rope.half
            );
        }
        let n = self.rows * self.heads * self.head_dim;
        sized(what, x, n)?;
        f32s(what, bufs, n)?;
        if let Some(w) = self.norm {
            f32s(what, &[w], self.head_dim)?;
        }
        Ok(())
    }
    fn launch(&self) -> Launch {
        // one warp per (row, head), 4 warps per block
        Launch::linear((self.rows * self.heads).div_ceil(4), 128)
    }
    fn dims(&self, rope: &DeviceRope) -> [Arg; 6] {
        [
            Arg::I32(self.rows as i32),
            Arg::I32(self.heads as i32),
            Arg::I32(self.head_dim as i32),
            Arg::I32(rope.half as i32),
            Arg::I32(self.seq as i32),
            Arg::I32(0),
        ]
    }
}

/// `y = rope(rmsnorm_head(x))`, `rstd` `[rows, heads]`.
pub fn qknorm_rope_fwd(
    dev: &dyn Device,
    h: &HeadRows,
    rope: &DeviceRope,
    x: &DBuf,
    y: &DBuf,
    rstd: &DBuf,
    eps: f32,
) -> Result<()> {
    qknorm_rope_fwd_to(dev, h, rope, x.into(), y.into(), rstd, eps)
}

/// [`qknorm_rope_fwd`] with `x` in f32 or bf16 (the projection GEMM's output type) and `y` in
/// f32 or bf16 (rounded from the same f32 value): the rotated q or k in the type the attention
/// reads (bf16 for the tensor-core kernels).
pub fn qknorm_rope_fwd_to(
    dev: &dyn Device,
    h: &HeadRows,
    rope: &DeviceRope,
    x: Operand,
    y: Operand,
    rstd: &DBuf,
    eps: f32,
) -> Result<()> {
    h.check("qknorm_rope_fwd", rope, x, &[])?;
    sized("qknorm_rope_fwd", y, h.rows * h.heads * h.head_dim)?;
    f32s("qknorm_rope_fwd", &[rstd], h.rows * h.heads)?;
    let mut args = vec![
        x.buf.arg(),
        h.norm.map_or(Arg::Ptr(0), |w| w.arg()),
        rope.cos.arg(),
        rope.sin.arg(),
        y.buf.arg(),
        rstd.arg(),
    ];
    args.extend(h.dims(rope));
    args.extend([
        Arg::F32(eps),
        Arg::I32(h.zero_centered as i32),
        Arg::I32(h.norm.is_some() as i32),
    ]);
    let kernel = match (x.dtype, y.dtype) {
        (DType::F32, DType::F32) => "qknorm_rope_fwd",
        (DType::F32, DType::Bf16) => "qknorm_rope_fwd_bf16",
        (DType::Bf16, DType::F32) => "qknorm_rope_fwd_from_bf16",
        (DType::Bf16, DType::Bf16) => "qknorm_rope_fwd_bf16_from_bf16",
    };
    dev.launch(kernel, h.launch(), &args)
}

/// Its backward: `dx` overwritten; with a norm, its gain's gradient is added to `dw` (through
/// the scratch `part`, [`norm_bwd_scratch_len`]`(rows·heads, head_dim)` f32).
pub fn qknorm_rope_bwd(
    dev: &dyn Device,
    h: &HeadRows,
    rope: &DeviceRope,
    ins: (&DBuf, &DBuf, &DBuf),
    dx: &DBuf,
    dw: Option<&DBuf>,
) -> Result<()> {
    let part = dev.zeros(norm_bwd_scratch_len(h.rows * h.heads, h.head_dim) * 4)?;
    qknorm_rope_bwd_with(dev, h, rope, ins, dx, &part, dw)
}

/// [`qknorm_rope_bwd`] with its scratch given (nothing allocated).
pub fn qknorm_rope_bwd_with(
    dev: &dyn Device,
    h: &HeadRows,
    rope: &DeviceRope,
    ins: (&DBuf, &DBuf, &DBuf),
    dx: &DBuf,
    part: &DBuf,
    dw: Option<&DBuf>,
) -> Result<()> {
    qknorm_rope_bwd_to(dev, h, rope, (ins.0.into(), ins.1, ins.2), dx, part, dw)
}

/// Warps per block of the backward, each running its own head rows.
const BWD_WARPS: usize = 8;

/// [`qknorm_rope_bwd_with`] with `x` (the forward's pre-norm input) in f32 or bf16 and `dx` in
/// f32 or bf16 (the q/k projections' output gradient, in the type their GEMMs read), densely or
/// as a band of columns ([`Cols`]: the stacked projections' gradient). With a norm, two launches: the backward over
/// [`norm_bwd_blocks`] spans of head rows, each block summing its rows' gain gradients into
/// its row of `part`, then `dw +=` the sum of those rows; without one, the backward alone.
pub fn qknorm_rope_bwd_to<'a>(
    dev: &dyn Device,
    h: &HeadRows,
    rope: &DeviceRope,
    (x, rstd, dy): (Operand, &DBuf, &DBuf),
    dx: impl Into<Cols<'a>>,
    part: &DBuf,
    dw: Option<&DBuf>,
) -> Result<()> {
    let what = "qknorm_rope_bwd";
    h.check(what, rope, x, &[dy])?;
    let dx: Cols = dx.into();
    let ldx = dx.ld(what, h.rows, h.heads * h.head_dim)?;
    let dx = dx.out;
    let head_rows = h.rows * h.heads;
    let (span, blocks) = norm_bwd_blocks(head_rows);
    // each warp's gain-gradient sums in shared memory
    let smem = 4 * BWD_WARPS * h.head_dim;
    let dw = match (h.norm, dw) {
        (Some(_), Some(dw)) => {
            f32s(what, &[rstd], head_rows)?;
            f32s(
                "qknorm_rope_bwd (scratch)",
                &[part],
                norm_bwd_scratch_len(head_rows, h.head_dim),
            )?;
            if smem > 48 << 10 {
                bail!(
                    "{what}: head_dim {} (at most {})",
                    h.head_dim,
                    (48 << 10) / (4 * BWD_WARPS)
                );
            }
            Some(dw)
        }
        (Some(_), None) => bail!("{what}: a normed call needs the gain's gradient buffer"),
        (None, _) => None,
    };
    let mut args = vec![
        x.buf.arg(),
        h.norm.map_or(Arg::Ptr(0), |w| w.arg()),
        rstd.arg(),
        rope.cos.arg(),
        rope.sin.arg(),
        dy.arg(),
        dx.buf.arg(),
        Arg::I64(ldx as i64),
        part.arg(),
    ];
    args.extend(h.dims(rope));
    args.extend([
        Arg::I32(h.zero_centered as i32),
        Arg::I32(h.norm.is_some() as i32),
        Arg::I32(span as i32),
    ]);
    let kernel = match (x.dtype, dx.dtype) {
        (DType::F32, DType::F32) => "qknorm_rope_bwd",
        (DType::F32, DType::Bf16) => "qknorm_rope_bwd_bf16",
        (DType::Bf16, DType::F32) => "qknorm_rope_bwd_from_bf16",
        (DType::Bf16, DType::Bf16) => "qknorm_rope_bwd_bf16_from_bf16",
    };
    let cfg = Launch {
        grid: [blocks as u32, 1, 1],
        block: [32 * BWD_WARPS as u32, 1, 1],
        smem: if dw.is_some() { smem as u32 } else { 0 },
    };
    dev.launch(kernel, cfg, &args)?;
    match dw {
        Some(dw) => sum_rows(dev, part, dw, blocks, h.head_dim, true),
        None => Ok(()),
    }
}
