//! Cross-entropy over rows of logits, its gradient written in place or in bf16
//! (cross_entropy.cu).

use super::{f32s, need, KernelSource};
use crate::backend::cuda::runtime::{Arg, DBuf, Device, Launch};
use anyhow::Result;

pub const SOURCE: KernelSource = KernelSource {
    name: "cross_entropy",
    text: include_str!("cross_entropy.cu"),
    entries: &["cross_entropy_fwd_bwd", "cross_entropy_fwd_bwd_bf16"],
};

/// Cross-entropy of `rows` rows of `vocab` logits against i32 `targets` (< 0: ignored): per-row
/// `loss`, and the logits replaced by their gradient times `scale`. (Uploads `scale`: for tests
/// and one-off use; a step passes it in device memory to [`cross_entropy_to`].)
pub fn cross_entropy(
    dev: &dyn Device,
    logits: &DBuf,
    targets: &DBuf,
    loss: &DBuf,
    rows: usize,
    vocab: usize,
    scale: f32,
) -> Result<()> {
    let scale = dev.upload(&scale.to_ne_bytes())?;
    cross_entropy_to(dev, logits, None, targets, loss, rows, vocab, &scale)
}

/// Threads per block of the cross-entropy (one row per block).
const ROW_THREADS: u32 = 1024;

/// [`cross_entropy`] with the gradient written as bf16 into `grad_bf16` (the LM head's
/// backward GEMMs read it so; the logits are left as they are), or with `None` in place; the
/// f32 `scale` is read from device memory.
#[allow(clippy::too_many_arguments)]
pub fn cross_entropy_to(
    dev: &dyn Device,
    logits: &DBuf,
    grad_bf16: Option<&DBuf>,
    targets: &DBuf,
    loss: &DBuf,
    rows: usize,
    vocab: usize,
    scale: &DBuf,
) -> Result<()> {
    f32s("cross_entropy", &[logits], rows * vocab)?;
    f32s("cross_entropy (scale)", &[scale], 1)?;
    need("cross_entropy", targets, rows, 4)?;
    f32s("cross_entropy", &[loss], rows)?;
    let tail = [targets.arg(), loss.arg(), Arg::I32(vocab as i32), scale.arg()];
    // 1,024 threads per row: an SM then holds 2 rows (the bf16 kernel, held to 32 registers; 1
    // for the f32 one), not 8, so the rows in flight between a row's two passes (264 × 128 KB at
    // a vocabulary of 32,768) fit an H200's 50 MB L2, and the gradient pass can find its logits
    // there
    let cfg = Launch::linear(rows, ROW_THREADS);
    match grad_bf16 {
        None => {
            let args: Vec<Arg> = [logits.arg()].into_iter().chain(tail).collect();
            dev.launch("cross_entropy_fwd_bwd", cfg, &args)
        }
        Some(g) => {
            need("cross_entropy (bf16 gradient)", g, rows * vocab, 2)?;
            let args: Vec<Arg> = [logits.arg(), g.arg()].into_iter().chain(tail).collect();
            dev.launch("cross_entropy_fwd_bwd_bf16", cfg, &args)
        }
    }
}
