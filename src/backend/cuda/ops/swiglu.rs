//! SwiGLU's gating product and its backward (swiglu.cu), f32 in; the outputs, which GEMMs
//! read, in f32 or bf16 (rounded from the same f32 values).

use super::{elems, f32s, sized, DType, KernelSource, Operand};
use crate::backend::cuda::runtime::{Arg, DBuf, Device};
use anyhow::{bail, Result};

pub const SOURCE: KernelSource = KernelSource {
    name: "swiglu",
    text: include_str!("swiglu.cu"),
    entries: &["swiglu_fwd", "swiglu_fwd_bf16", "swiglu_bwd", "swiglu_bwd_bf16"],
};

/// `m = silu(g) ⊙ u`
pub fn swiglu_fwd(dev: &dyn Device, g: &DBuf, u: &DBuf, m: &DBuf, n: usize) -> Result<()> {
    swiglu_fwd_to(dev, g, u, m.into(), n)
}

/// [`swiglu_fwd`] with `m` in f32 or bf16 (the down projection's input).
pub fn swiglu_fwd_to(dev: &dyn Device, g: &DBuf, u: &DBuf, m: Operand, n: usize) -> Result<()> {
    f32s("swiglu_fwd", &[g, u], n)?;
    sized("swiglu_fwd", m, n)?;
    let kernel = match m.dtype {
        DType::F32 => "swiglu_fwd",
        DType::Bf16 => "swiglu_fwd_bf16",
    };
    dev.launch(kernel, elems(n), &[g.arg(), u.arg(), m.buf.arg(), Arg::I64(n as i64)])
}

/// `(dg, du)` of [`swiglu_fwd`]
pub fn swiglu_bwd(dev: &dyn Device, g: &DBuf, u: &DBuf, dm: &DBuf, dg: &DBuf, du: &DBuf, n: usize) -> Result<()> {
    swiglu_bwd_to(dev, g, u, dm, dg.into(), du.into(), n)
}

/// [`swiglu_bwd`] with `dg` and `du` both in f32 or both in bf16 (the gate and up
/// projections' output gradients).
pub fn swiglu_bwd_to(
    dev: &dyn Device,
    g: &DBuf,
    u: &DBuf,
    dm: &DBuf,
    dg: Operand,
    du: Operand,
    n: usize,
) -> Result<()> {
    f32s("swiglu_bwd", &[g, u, dm], n)?;
    sized("swiglu_bwd", dg, n)?;
    sized("swiglu_bwd", du, n)?;
    let kernel = match (dg.dtype, du.dtype) {
        (DType::F32, DType::F32) => "swiglu_bwd",
        (DType::Bf16, DType::Bf16) => "swiglu_bwd_bf16",
        (a, b) => bail!("swiglu_bwd: dg in {a:?}, du in {b:?} (one type for both)"),
    };
    let args = [
        g.arg(),
        u.arg(),
        dm.arg(),
        dg.buf.arg(),
        du.buf.arg(),
        Arg::I64(n as i64),
    ];
    dev.launch(kernel, elems(n), &args)
}
