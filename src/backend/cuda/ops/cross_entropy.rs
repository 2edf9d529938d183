//! Cross-entropy over rows of logits, its gradient written in place (cross_entropy.cu).

use super::{f32s, need, KernelSource, THREADS};
use crate::backend::cuda::runtime::{Arg, DBuf, Device, Launch};
use anyhow::Result;

pub const SOURCE: KernelSource = KernelSource {
    name: "cross_entropy",
    text: include_str!("cross_entropy.cu"),
    entries: &["cross_entropy_fwd_bwd"],
};

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
