//! File formats: safetensors tensors, HF checkpoint layouts (config.json + model.safetensors),
//! GGUF, tokenizers, and loading a saved model from any of them.
pub mod gguf;
pub mod hf;
pub mod load;
pub mod metrics;
pub mod pretok;
pub mod quants;
pub mod st;
pub mod text;
pub mod tokenizer;

use anyhow::Result;

pub use crate::files::write_atomic;

/// Expert `e`'s matrix from a stacked `[experts, rows, cols]` tensor (`name` for errors), as
/// transformers 5 (fused experts) and llama.cpp (`ffn_*_exps`) store MoE layers. `half`:
/// `Some(0 | 1)` takes the first or second half of its rows (transformers' `gate_up_proj`).
pub(crate) fn expert_block(
    name: &str,
    shape: &[usize],
    data: &[f32],
    e: usize,
    half: Option<usize>,
) -> Result<st::F32Tensor> {
    let &[experts, rows, cols] = shape else {
        anyhow::bail!("stacked expert tensor '{name}' must be 3-D [experts, rows, cols], has shape {shape:?}");
    };
    if e >= experts || (half.is_some() && rows % 2 != 0) {
        anyhow::bail!("stacked expert tensor '{name}' {shape:?} has no expert {e}");
    }
    let block = &data[e * rows * cols..(e + 1) * rows * cols];
    Ok(match half {
        Some(h) => {
            let n = rows / 2 * cols;
            st::F32Tensor {
                shape: vec![rows / 2, cols],
                data: block[h * n..(h + 1) * n].to_vec(),
            }
        }
        None => st::F32Tensor {
            shape: vec![rows, cols],
            data: block.to_vec(),
        },
    })
}
