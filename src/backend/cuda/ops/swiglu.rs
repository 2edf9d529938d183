//! SwiGLU's gating product and its backward (swiglu.cu).

use super::{elems, f32s, KernelSource};
use crate::backend::cuda::runtime::{Arg, DBuf, Device};
use anyhow::Result;

pub const SOURCE: KernelSource = KernelSource {
    name: "swiglu",
    text: include_str!("swiglu.cu"),
    entries: &["swiglu_fwd", "swiglu_bwd"],
};

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
