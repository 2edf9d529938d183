//! Fills and deterministic column sums (reduce.cu).

use super::{elems, f32s, KernelSource};
use crate::backend::cuda::runtime::{Arg, DBuf, Device, Launch};
use anyhow::Result;

pub const SOURCE: KernelSource = KernelSource {
    name: "reduce",
    text: include_str!("reduce.cu"),
    entries: &["fill_f32", "colsum_final"],
};

/// Every element of `x` (`n` f32) set to `v`.
pub fn fill(dev: &dyn Device, x: &DBuf, v: f32, n: usize) -> Result<()> {
    f32s("fill", &[x], n)?;
    dev.launch("fill_f32", elems(n), &[x.arg(), Arg::F32(v), Arg::I64(n as i64)])
}

/// `out[c] (+)= Σ_k part[k, c]` over the `chunks` rows of `part`, in a fixed order (reduce.cu
/// `colsum_final`): the sum of the norm backwards' per-block gain gradients.
pub fn sum_rows(dev: &dyn Device, part: &DBuf, out: &DBuf, chunks: usize, cols: usize, accumulate: bool) -> Result<()> {
    f32s("colsum (partials)", &[part], chunks * cols)?;
    f32s("colsum", &[out], cols)?;
    let cfg = Launch {
        grid: [cols.div_ceil(32).max(1) as u32, 1, 1],
        block: [32, 32, 1],
        smem: 0,
    };
    let args = [
        part.arg(),
        out.arg(),
        Arg::I32(chunks as i32),
        Arg::I32(cols as i32),
        Arg::I32(accumulate as i32),
    ];
    dev.launch("colsum_final", cfg, &args)
}

/// Most blocks of a norm backward (rmsnorm.cu, rope.cu), each writing one row of gain-gradient
/// partials: enough to fill a GPU (an H200 holds 132 SMs × 8 blocks of 256 threads), few
/// enough that the partials stay small ([1024, d] f32: 3 MB for d = 768) and a block runs many
/// rows.
const NORM_BWD_BLOCKS: usize = 1024;

/// Rows per block and blocks of a norm backward over `rows` rows (the last block may run
/// fewer): a function of `rows` alone, so its partials, and their sum, are the same on every
/// run and every GPU.
pub(crate) fn norm_bwd_blocks(rows: usize) -> (usize, usize) {
    let span = rows.div_ceil(NORM_BWD_BLOCKS).max(1);
    (span, rows.div_ceil(span).max(1))
}

/// f32 elements of the scratch of a norm backward over `rows` rows of width `d` (RMSNorm: the
/// model's rows and hidden size; QK-norm: rows·heads and head_dim): one row of `d` gain-gradient
/// partials per block.
pub fn norm_bwd_scratch_len(rows: usize, d: usize) -> usize {
    norm_bwd_blocks(rows).1 * d
}
