//! File formats: safetensors tensors, HF checkpoint layouts (config.json + model.safetensors),
//! GGUF, tokenizers, and loading a saved model from any of them.
pub mod gguf;
pub mod hf;
pub mod load;
pub mod pretok;
pub mod quants;
pub mod st;
pub mod tokenizer;

use anyhow::{Context, Result};
use std::io::Write;
use std::path::Path;

/// Write a file atomically: temp file in the same directory, fsync, rename, fsync the directory.
/// A crash leaves either the old file or the new one, never a torn one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .with_context(|| format!("{}: not a file path", path.display()))?;
    let tmp = dir.join(format!(".{}.tmp{}", name.to_string_lossy(), std::process::id()));
    let res = (|| -> Result<()> {
        let mut f = std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        f.write_all(bytes)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        f.sync_all().with_context(|| format!("cannot sync {}", tmp.display()))?;
        std::fs::rename(&tmp, path)
            .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

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
