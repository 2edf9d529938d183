//! The CUDA ops on device buffers, one function per kernel launch, through
//! [`Device`](super::runtime::Device) so the tests run them on the CPU emulator as well as on a
//! GPU. Shapes are checked against buffer sizes before every launch: a kernel given a short
//! buffer would write out of bounds.
//!
//! One module per op, its CUDA C++ source beside it (`rmsnorm.rs` launches the kernels of
//! `rmsnorm.cu`) and listing that source's entry points in its `SOURCE`; [`SOURCES`] collects
//! them. Every source is compiled with [`COMMON`] (common.cuh) in front: by NVRTC one module per
//! source, by the emulator all in one translation unit (so a source `#undef`s its own macros).

pub mod attention;
pub mod cross_entropy;
pub mod embedding;
pub mod gemm;
pub mod optim;
pub mod probe;
pub mod reduce;
pub mod rmsnorm;
pub mod rope;
pub mod swiglu;

pub use attention::{
    attention_backward_tc, attention_backward_tc_planted, attention_backward_tc_to, attention_bwd, attention_bwd_to,
    attention_forward_tc, attention_forward_tc_to, attention_fwd, attention_fwd_to, attention_tc_kernels,
    attn_head_dims_text, AttnDims, AttnScratch, FusedGate, ATTN_HEAD_DIMS, ATTN_TC_HEAD_DIMS,
};
pub use cross_entropy::{cross_entropy, cross_entropy_to};
pub use embedding::{embed_bwd, embed_bwd_index, embed_bwd_index_len, embed_bwd_with, embed_fwd};
pub use gemm::{
    cast_to_bf16, gemm, gemm_to, linear_bwd_dw, linear_bwd_dx, linear_bwd_dx_to, linear_fwd, linear_fwd_residual,
    linear_fwd_to, DType, Operand, Strided,
};
pub use optim::{AdamStep, TableEntry, TensorTable};
pub use probe::{probe_gate, probe_key0, probe_max_abs, probe_small, GateSums, PROBE_GATE_BINS};
pub use reduce::{fill, norm_bwd_scratch_len, sum_rows};
pub use rmsnorm::{rmsnorm_bwd, rmsnorm_bwd_to, rmsnorm_bwd_with, rmsnorm_fwd, rmsnorm_fwd_to};
pub use rope::{
    qknorm_rope_bwd, qknorm_rope_bwd_to, qknorm_rope_bwd_with, qknorm_rope_fwd, qknorm_rope_fwd_to, DeviceRope,
    HeadRows,
};
pub use swiglu::{swiglu_bwd, swiglu_fwd};

use super::runtime::{DBuf, Launch};
use anyhow::{bail, Result};

/// One CUDA C++ source: its name (`{name}.cu`, the module NVRTC builds from it), its text, and
/// the entry points it must define (a device whose module lacks one fails to open).
#[derive(Clone, Copy, Debug)]
pub struct KernelSource {
    pub name: &'static str,
    pub text: &'static str,
    pub entries: &'static [&'static str],
}

/// Prepended to every source: bf16 bits, block reductions, tensor-core collectives, the
/// shared-memory macro.
pub const COMMON: &str = include_str!("common.cuh");

/// Every kernel source, each op's own.
pub const SOURCES: &[KernelSource] = &[
    rmsnorm::SOURCE,
    rope::SOURCE,
    swiglu::SOURCE,
    cross_entropy::SOURCE,
    embedding::SOURCE,
    gemm::SOURCE,
    optim::SOURCE,
    reduce::SOURCE,
    probe::SOURCE,
    attention::SOURCE,
    attention::tc::SOURCE,
    attention::tc::PROBE_SOURCE,
];

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

/// An output `[rows, width]` written either densely or as a band of columns of a wider
/// row-major matrix (`ld`: elements from one row's start to the next; `out` a view from the
/// band's first column) — e.g. one projection's slice of the stacked `[dq | dk | dv | dz]`
/// gradient that one GEMM reads.
#[derive(Clone, Copy)]
pub struct Cols<'a> {
    pub out: Operand<'a>,
    pub ld: Option<usize>,
}

impl<'a> From<Operand<'a>> for Cols<'a> {
    fn from(out: Operand<'a>) -> Self {
        Cols { out, ld: None }
    }
}

impl<'a> From<&'a DBuf> for Cols<'a> {
    fn from(buf: &'a DBuf) -> Self {
        Operand::from(buf).into()
    }
}

impl Cols<'_> {
    /// The row stride for rows of `width` elements, checked against the buffer's size.
    pub(crate) fn ld(&self, what: &str, rows: usize, width: usize) -> Result<usize> {
        let ld = self.ld.unwrap_or(width);
        if ld < width {
            bail!("{what}: a row stride of {ld} for rows of {width}");
        }
        sized(
            what,
            self.out,
            rows.saturating_sub(1) * ld + width * usize::from(rows > 0),
        )?;
        Ok(ld)
    }
}

/// An output of `n` elements of its own type (f32 or bf16).
pub(crate) fn sized(what: &str, out: Operand, n: usize) -> Result<()> {
    need(what, out.buf, n, out.dtype.size())
}
