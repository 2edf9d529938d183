//! RMSNorm over rows, forward and backward (rmsnorm.cu; the gain's gradient summed by
//! [`colsum_with`]).

use super::{colsum_scratch_len, colsum_with, f32s, KernelSource, THREADS};
use crate::backend::cuda::runtime::{Arg, DBuf, Device, Launch};
use anyhow::Result;

pub const SOURCE: KernelSource = KernelSource {
    name: "rmsnorm",
    text: include_str!("rmsnorm.cu"),
    entries: &["rmsnorm_fwd", "rmsnorm_bwd"],
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
    f32s("rmsnorm_fwd", &[x, y], rows * d)?;
    f32s("rmsnorm_fwd", &[w], d)?;
    f32s("rmsnorm_fwd", &[rstd], rows)?;
    let args = [
        x.arg(),
        w.arg(),
        y.arg(),
        rstd.arg(),
        Arg::I32(d as i32),
        Arg::F32(eps),
        Arg::I32(zero_centered as i32),
    ];
    dev.launch("rmsnorm_fwd", Launch::linear(rows, THREADS), &args)
}

/// Its backward: `dx` (overwritten, or added to with `accumulate`), `dw` accumulated (through
/// per-row contributions and an in-order column sum: deterministic).
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
    let dwp = dev.zeros(rows * d * 4)?;
    let part = dev.zeros(colsum_scratch_len(rows, d) * 4)?;
    let io = (x, w, rstd, dy, dx, dw);
    rmsnorm_bwd_with(dev, io, rows, d, zero_centered, accumulate, (&dwp, &part))
}

/// [`rmsnorm_bwd`] with its scratch given (nothing allocated): `dwp` `[rows, d]` for the
/// per-row gain contributions, `part` ([`colsum_scratch_len`]) for their column sum.
pub fn rmsnorm_bwd_with(
    dev: &dyn Device,
    (x, w, rstd, dy, dx, dw): (&DBuf, &DBuf, &DBuf, &DBuf, &DBuf, &DBuf),
    rows: usize,
    d: usize,
    zero_centered: bool,
    accumulate: bool,
    (dwp, part): (&DBuf, &DBuf),
) -> Result<()> {
    f32s("rmsnorm_bwd", &[x, dy, dx, dwp], rows * d)?;
    f32s("rmsnorm_bwd", &[w, dw], d)?;
    f32s("rmsnorm_bwd", &[rstd], rows)?;
    let args = [
        x.arg(),
        w.arg(),
        rstd.arg(),
        dy.arg(),
        dx.arg(),
        dwp.arg(),
        Arg::I32(d as i32),
        Arg::I32(zero_centered as i32),
        Arg::I32(accumulate as i32),
    ];
    dev.launch("rmsnorm_bwd", Launch::linear(rows, THREADS), &args)?;
    colsum_with(dev, dwp, dw, rows, d, true, part)
}
