//! The CUDA ops on device buffers, one function per kernel launch, through [`Device`] so the
//! tests run them on the CPU emulator as well as on a GPU. Shapes are checked against buffer
//! sizes before every launch: a kernel given a short buffer would write out of bounds.

mod attention;
mod dense;
pub use attention::*;
pub use dense::*;

use super::runtime::{Arg, DBuf, Device, Launch};
use anyhow::{bail, Result};

pub(crate) const THREADS: u32 = 256;

/// Grid-stride elementwise kernels: enough blocks to cover `n`, capped (the loop does the rest).
pub(crate) fn elems(n: usize) -> Launch {
    Launch::linear(n.div_ceil(THREADS as usize).min(4096), THREADS)
}

pub(crate) fn need(what: &str, buf: &DBuf, elems: usize, width: usize) -> Result<()> {
    if buf.bytes < elems * width {
        bail!(
            "{what}: buffer of {} bytes, the op needs {} elements of {width} bytes",
            buf.bytes,
            elems
        );
    }
    Ok(())
}

pub(crate) fn f32s(what: &str, bufs: &[&DBuf], n: usize) -> Result<()> {
    bufs.iter().try_for_each(|b| need(what, b, n, 4))
}

/// `m = silu(g) ⊙ u`
pub fn swiglu_fwd(dev: &dyn Device, g: &DBuf, u: &DBuf, m: &DBuf, n: usize) -> Result<()> {
    f32s("swiglu_fwd", &[g, u, m], n)?;
    dev.launch("swiglu_fwd", elems(n), &[g.arg(), u.arg(), m.arg(), Arg::I64(n as i64)])
}

/// `(dg, du)` of [`swiglu_fwd`]
pub fn swiglu_bwd(dev: &dyn Device, g: &DBuf, u: &DBuf, dm: &DBuf, dg: &DBuf, du: &DBuf, n: usize) -> Result<()> {
    f32s("swiglu_bwd", &[g, u, dm, dg, du], n)?;
    let args = [g.arg(), u.arg(), dm.arg(), dg.arg(), du.arg(), Arg::I64(n as i64)];
    dev.launch("swiglu_bwd", elems(n), &args)
}

/// One AdamW step's scalars (torch semantics); `scale` multiplies the gradient (clipping).
#[derive(Clone, Copy, Debug)]
pub struct AdamStep {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// Adam's bias corrections `1 − β₁ᵗ`, `1 − β₂ᵗ` of this step (`crate::optim::bias_correction`,
    /// the one place that formula lives: the kernels take it precomputed)
    pub bias_correction1: f32,
    pub bias_correction2: f32,
    pub scale: f32,
}

impl AdamStep {
    pub(crate) fn args(&self) -> [Arg; 8] {
        [
            Arg::F32(self.lr),
            Arg::F32(self.beta1),
            Arg::F32(self.beta2),
            Arg::F32(self.eps),
            Arg::F32(self.weight_decay),
            Arg::F32(self.bias_correction1),
            Arg::F32(self.bias_correction2),
            Arg::F32(self.scale),
        ]
    }
}

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

/// Cross-entropy of `rows` rows of `vocab` logits against i32 `targets` (< 0: ignored): per-row
/// `loss`, and the logits replaced by their gradient times `scale`.
pub fn cross_entropy(
    dev: &dyn Device,
    logits: &DBuf,
    targets: &DBuf,
    loss: &DBuf,
    rows: usize,
    vocab: usize,
    scale: f32,
) -> Result<()> {
    f32s("cross_entropy", &[logits], rows * vocab)?;
    need("cross_entropy", targets, rows, 4)?;
    f32s("cross_entropy", &[loss], rows)?;
    let args = [
        logits.arg(),
        targets.arg(),
        loss.arg(),
        Arg::I32(vocab as i32),
        Arg::F32(scale),
    ];
    dev.launch("cross_entropy_fwd_bwd", Launch::linear(rows, THREADS), &args)
}
