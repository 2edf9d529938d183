//! SwiGLU's gating product and its backward (swiglu.cu) on the output of one stacked
//! `[gate; up]` GEMM: `gu` `[rows, 2·ff]` holds each row's gate values, then its up values. f32
//! in; the outputs, which GEMMs read, in f32 or bf16 (rounded from the same f32 values).

use super::{elems, f32s, sized, DType, KernelSource, Operand};
use crate::backend::cuda::runtime::{Arg, DBuf, Device};
use anyhow::{bail, Result};

pub const SOURCE: KernelSource = KernelSource {
    name: "swiglu",
    text: include_str!("swiglu.cu"),
    entries: &["swiglu_fwd", "swiglu_fwd_bf16", "swiglu_bwd", "swiglu_bwd_bf16"],
};

fn ff_arg(what: &str, ff: usize) -> Result<Arg> {
    match i32::try_from(ff) {
        Ok(f) if f > 0 => Ok(Arg::I32(f)),
        _ => bail!("{what}: width {ff} (1 to {})", i32::MAX),
    }
}

/// `m = silu(g) ⊙ u` for `rows` rows of width `ff`, `g` and `u` side by side in `gu`; `m` in
/// f32 or bf16 (the down projection's input).
pub fn swiglu_fwd(dev: &dyn Device, gu: &DBuf, m: Operand, rows: usize, ff: usize) -> Result<()> {
    let n = rows * ff;
    f32s("swiglu_fwd", &[gu], 2 * n)?;
    sized("swiglu_fwd", m, n)?;
    let args = [gu.arg(), m.buf.arg(), Arg::I64(n as i64), ff_arg("swiglu_fwd", ff)?];
    let kernel = match m.dtype {
        DType::F32 => "swiglu_fwd",
        DType::Bf16 => "swiglu_fwd_bf16",
    };
    dev.launch(kernel, elems(n), &args)
}

/// Its backward: `dgu` (same stacked layout as `gu`, f32 or bf16: the stacked GEMM's output
/// gradient) from `dm`.
pub fn swiglu_bwd(dev: &dyn Device, gu: &DBuf, dm: &DBuf, dgu: Operand, rows: usize, ff: usize) -> Result<()> {
    let n = rows * ff;
    f32s("swiglu_bwd", &[gu], 2 * n)?;
    f32s("swiglu_bwd", &[dm], n)?;
    sized("swiglu_bwd", dgu, 2 * n)?;
    let args = [
        gu.arg(),
        dm.arg(),
        dgu.buf.arg(),
        Arg::I64(n as i64),
        ff_arg("swiglu_bwd", ff)?,
    ];
    let kernel = match dgu.dtype {
        DType::F32 => "swiglu_bwd",
        DType::Bf16 => "swiglu_bwd_bf16",
    };
    dev.launch(kernel, elems(n), &args)
}
