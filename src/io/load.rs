//! Load a trained model from wherever it was saved: a run directory (its `model/`), an HF
//! model directory, or a GGUF file, with the tokenizer found beside it. `analyze` and `infer`
//! start here.

use super::hf::load_model;
use super::tokenizer::Tok;
use crate::model::Model;
use anyhow::{bail, Result};
use std::path::Path;

/// A model with its tokenizer (if one was found beside it).
pub struct Loaded {
    pub model: Model<f32>,
    pub tok: Option<Tok>,
    pub source: String,
    /// The sequence length the model was trained at, when known (a run directory says).
    pub train_seq_len: Option<usize>,
    /// Why `tok` is missing, when a tokenizer exists but cannot be built.
    pub tok_problem: Option<String>,
}

impl Loaded {
    /// The tokenizer, or an error saying why there is none and that token ids still work.
    pub fn tokenizer(&self) -> Result<&Tok> {
        match (&self.tok, &self.tok_problem) {
            (Some(t), _) => Ok(t),
            (None, Some(why)) => bail!("{why}"),
            (None, None) => bail!(
                "{}: no tokenizer found (no tokenizer.json beside the model); pass token ids with --tokens FILE.safetensors",
                self.source
            ),
        }
    }
}

/// The training context of a run directory (`RUN` or `RUN/model`), from its config.toml.
fn run_seq_len(path: &Path) -> Option<usize> {
    let run = if path.join("config.toml").exists() {
        path.to_path_buf()
    } else {
        path.parent()?.to_path_buf()
    };
    let text = std::fs::read_to_string(run.join("config.toml")).ok()?;
    let t: toml::Table = toml::from_str(&text).ok()?;
    t.get("train")?.get("seq_len")?.as_integer().map(|n| n as usize)
}

/// Load a run directory (its `model/`), an HF model directory, or a GGUF file.
pub fn load_any(path: &Path) -> Result<Loaded> {
    let source = path.display().to_string();
    if path.extension().is_some_and(|e| e == "gguf") {
        // the weights stay quantised in the mapped file, each layer dequantised as it runs
        let (model, tok) = super::gguf::lazy::load_gguf_lazy(path)?;
        let tok_problem = tok.as_ref().err().map(|e| format!("{e:#}"));
        return Ok(Loaded {
            model,
            tok: tok.ok(),
            source,
            train_seq_len: None,
            tok_problem,
        });
    }
    let is_run = path.join("config.toml").exists();
    let dir = if is_run || path.join("model").join("config.json").exists() {
        path.join("model")
    } else {
        path.to_path_buf()
    };
    if !dir.join("config.json").exists() {
        if is_run {
            bail!(
                "{source}: this run has no trained model yet ({} has no config.json): it was stopped before its first \
                 save, or it diverged; `gated-lm train --resume --out {source}` continues it from its checkpoint if it has one",
                dir.display()
            );
        }
        bail!("{source}: not a model directory (no config.json), run directory (no model/) or .gguf file");
    }
    let (model, _) = load_model(&dir)?;
    let tj = dir.join("tokenizer.json");
    let tok = if tj.exists() { Some(Tok::load(&tj)?) } else { None };
    Ok(Loaded {
        model,
        tok,
        source,
        train_seq_len: run_seq_len(&dir),
        tok_problem: None,
    })
}
