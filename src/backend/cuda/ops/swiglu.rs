//! SwiGLU's gating product and its backward (swiglu.cu) on the output of one stacked
//! `[gate; up]` GEMM: `gu` `[rows, 2·ff]` holds each row's gate values, then its up values. Its
//! tensors are all f32, or all bf16 in mixed precision (GEMMs write `gu` and `dm` and read `m`
//! and `dgu` in bf16); the arithmetic is f32. The backward recomputes `m` for the down
//! projection's weight gradient, so the step keeps one `m` for all layers.

use super::{elems, sized, DType, KernelSource, Operand};
use crate::backend::cuda::runtime::{Arg, Device};
use anyhow::{bail, Result};

pub const SOURCE: KernelSource = KernelSource {
    name: "swiglu",
    text: include_str!("swiglu.cu"),
    entries: &["swiglu_fwd", "swiglu_fwd_bf16", "swiglu_bwd", "swiglu_bwd_bf16"],
};

/// The entry point for tensors all of one type (`f32` or `bf16` of `names`), and the width.
fn kernel(names: [&'static str; 2], ops: &[Operand], ff: usize) -> Result<(&'static str, Arg)> {
    let ff = match i32::try_from(ff) {
        Ok(f) if f > 0 => Arg::I32(f),
        _ => bail!("{}: width {ff} (1 to {})", names[0], i32::MAX),
    };
    let all = |t: DType| ops.iter().all(|o| o.dtype == t);
    match (all(DType::F32), all(DType::Bf16)) {
        (true, _) => Ok((names[0], ff)),
        (_, true) => Ok((names[1], ff)),
        _ => bail!("{}: tensors of mixed types (all f32 or all bf16)", names[0]),
    }
}

/// `m = silu(g) ⊙ u` for `rows` rows of width `ff`, `g` and `u` side by side in `gu`.
pub fn swiglu_fwd(dev: &dyn Device, gu: Operand, m: Operand, rows: usize, ff: usize) -> Result<()> {
    let n = rows * ff;
    let (name, ff) = kernel(["swiglu_fwd", "swiglu_fwd_bf16"], &[gu, m], ff)?;
    sized("swiglu_fwd", gu, 2 * n)?;
    sized("swiglu_fwd", m, n)?;
    dev.launch(name, elems(n), &[gu.buf.arg(), m.buf.arg(), Arg::I64(n as i64), ff])
}

/// Its backward: `dgu` (the stacked GEMM's output gradient, `gu`'s layout) from `dm`, and `m`
/// again, bit for bit [`swiglu_fwd`]'s (the down projection's weight gradient reads it, so the
/// forward's `m` need not be kept: `[rows, ff]` per layer less memory for one more write).
pub fn swiglu_bwd(
    dev: &dyn Device,
    gu: Operand,
    dm: Operand,
    (dgu, m): (Operand, Operand),
    rows: usize,
    ff: usize,
) -> Result<()> {
    let n = rows * ff;
    let (name, ff) = kernel(["swiglu_bwd", "swiglu_bwd_bf16"], &[gu, dm, dgu, m], ff)?;
    sized("swiglu_bwd", gu, 2 * n)?;
    sized("swiglu_bwd", dm, n)?;
    sized("swiglu_bwd", dgu, 2 * n)?;
    sized("swiglu_bwd", m, n)?;
    let args = [
        gu.buf.arg(),
        dm.buf.arg(),
        dgu.buf.arg(),
        m.buf.arg(),
        Arg::I64(n as i64),
        ff,
    ];
    dev.launch(name, elems(n), &args)
}
