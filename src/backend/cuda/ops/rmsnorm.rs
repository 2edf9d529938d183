//! RMSNorm over rows, forward (alone or fused with the residual add before it) and backward
//! (rmsnorm.cu; the gain's gradient as one partial row per block, which
//! [`sum_rows`](super::reduce::sum_rows) adds up). The outputs that GEMMs read
//! (the normed rows, the residual gradient) can be written in bf16, rounded from the same f32
//! values the f32 kernels write.

use super::reduce::{norm_bwd_blocks, norm_bwd_scratch_len, sum_rows};
use super::{f32s, need, sized, DType, KernelSource, Operand, THREADS};
use crate::backend::cuda::runtime::{Arg, DBuf, Device, Launch};
use anyhow::Result;

pub const SOURCE: KernelSource = KernelSource {
    name: "rmsnorm",
    text: include_str!("rmsnorm.cu"),
    entries: &["rmsnorm_fwd", "rmsnorm_fwd_bf16", "rmsnorm_bwd", "rmsnorm_bwd_bf16"],
};

/// RMSNorm of `rows` rows of width `d`: writes `y` and the per-row `rstd`.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_fwd(
    dev: &dyn Device,
    x: &DBuf,
    w: &DBuf,
    y: &DBuf,
    rstd: &DBuf,
    rows: usize,
    d: usize,
    eps: f32,
    zero_centered: bool,
) -> Result<()> {
    rmsnorm_fwd_to(dev, x, w, y.into(), rstd, rows, d, eps, zero_centered)
}

/// [`rmsnorm_fwd`] with `y` in f32 or bf16 (the f32 result rounded to nearest even): the input
/// of the GEMMs that follow, in the type they read.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_fwd_to(
    dev: &dyn Device,
    x: &DBuf,
    w: &DBuf,
    y: Operand,
    rstd: &DBuf,
    rows: usize,
    d: usize,
    eps: f32,
    zero_centered: bool,
) -> Result<()> {
    f32s("rmsnorm_fwd", &[x], rows * d)?;
    sized("rmsnorm_fwd", y, rows * d)?;
    f32s("rmsnorm_fwd", &[w], d)?;
    f32s("rmsnorm_fwd", &[rstd], rows)?;
    let args = [
        x.arg(),
        w.arg(),
        y.buf.arg(),
        rstd.arg(),
        Arg::I32(d as i32),
        Arg::F32(eps),
        Arg::I32(zero_centered as i32),
    ];
    let kernel = match y.dtype {
        DType::F32 => "rmsnorm_fwd",
        DType::Bf16 => "rmsnorm_fwd_bf16",
    };
    dev.launch(kernel, Launch::linear(rows, THREADS), &args)
}

/// Its backward: `dx` (overwritten, or added to with `accumulate`), `dw` accumulated (through
/// per-block partial sums and an in-order sum of them: deterministic).
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_bwd(
    dev: &dyn Device,
    x: &DBuf,
    w: &DBuf,
    rstd: &DBuf,
    dy: &DBuf,
    dx: &DBuf,
    dw: &DBuf,
    rows: usize,
    d: usize,
    zero_centered: bool,
    accumulate: bool,
) -> Result<()> {
    let part = dev.zeros(norm_bwd_scratch_len(rows, d) * 4)?;
    let io = (x, w, rstd, dy, dx, dw);
    rmsnorm_bwd_with(dev, io, rows, d, zero_centered, accumulate, &part)
}

/// [`rmsnorm_bwd`] with its scratch given (nothing allocated): `part`
/// ([`norm_bwd_scratch_len`]`(rows, d)` f32, overwritten) for the blocks' gain-gradient sums.
pub fn rmsnorm_bwd_with(
    dev: &dyn Device,
    io: (&DBuf, &DBuf, &DBuf, &DBuf, &DBuf, &DBuf),
    rows: usize,
    d: usize,
    zero_centered: bool,
    accumulate: bool,
    part: &DBuf,
) -> Result<()> {
    rmsnorm_bwd_to(dev, io, None, rows, d, zero_centered, accumulate, part)
}

/// Widest rows whose gain-gradient sums a backward block keeps in shared memory (wider ones
/// keep them in its row of the scratch instead: same sums, more L2 traffic): 32 KiB, within
/// the 48 KiB a launch may ask for without opting in, leaving room for several blocks per SM.
const SMEM_ACC_BYTES: usize = 32 << 10;

/// [`rmsnorm_bwd_with`] that also writes the bf16 rounding of the `dx` it leaves into `dx_b`
/// when given (the residual gradient, for the GEMMs that read it next), in the same launch.
/// Two launches: the backward over [`norm_bwd_blocks`] spans of rows, each block summing its
/// rows' gain gradients into its row of `part`, then `dw +=` the sum of those rows.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_bwd_to(
    dev: &dyn Device,
    (x, w, rstd, dy, dx, dw): (&DBuf, &DBuf, &DBuf, &DBuf, &DBuf, &DBuf),
    dx_b: Option<&DBuf>,
    rows: usize,
    d: usize,
    zero_centered: bool,
    accumulate: bool,
    part: &DBuf,
) -> Result<()> {
    f32s("rmsnorm_bwd", &[x, dy, dx], rows * d)?;
    f32s("rmsnorm_bwd", &[w, dw], d)?;
    f32s("rmsnorm_bwd", &[rstd], rows)?;
    f32s("rmsnorm_bwd (scratch)", &[part], norm_bwd_scratch_len(rows, d))?;
    let mut args = vec![x.arg(), w.arg(), rstd.arg(), dy.arg(), dx.arg()];
    if let Some(b) = dx_b {
        need("rmsnorm_bwd (bf16 dx)", b, rows * d, 2)?;
        args.push(b.arg());
    }
    let (span, blocks) = norm_bwd_blocks(rows);
    let smem_acc = 4 * d <= SMEM_ACC_BYTES;
    args.extend([
        part.arg(),
        Arg::I32(rows as i32),
        Arg::I32(span as i32),
        Arg::I32(d as i32),
        Arg::I32(zero_centered as i32),
        Arg::I32(accumulate as i32),
        Arg::I32(smem_acc as i32),
    ]);
    let kernel = if dx_b.is_some() {
        "rmsnorm_bwd_bf16"
    } else {
        "rmsnorm_bwd"
    };
    let cfg = Launch {
        grid: [blocks as u32, 1, 1],
        block: [THREADS, 1, 1],
        smem: if smem_acc { 4 * d as u32 } else { 0 },
    };
    dev.launch(kernel, cfg, &args)?;
    sum_rows(dev, part, dw, blocks, d, true)
}
