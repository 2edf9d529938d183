//! `gated-lm dump`: golden-comparable outputs of a model on given ids.

use crate::io::hf::{load_model, to_layout};
use crate::io::st::{write_f32, StFile, TensorMap};
use crate::model::observer::Recorder;
use crate::model::{shifted_targets, Batch};
use crate::optim::{clip_grad_norm, AdamW, AdamWConfig};
use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::Value;
use std::path::{Path, PathBuf};

#[derive(Args, Debug)]
#[command(allow_negative_numbers = true)]
pub struct DumpArgs {
    /// Run directory or model directory (config.json + model.safetensors)
    #[arg(long)]
    pub model: PathBuf,
    /// safetensors file holding `input_ids` [batch, seq]
    #[arg(long)]
    pub input: PathBuf,
    /// safetensors file to write the outputs to
    #[arg(long)]
    pub out: PathBuf,
    /// hyperparams.json (lr, betas, eps, weight_decay; max clip norm from `clip`/`max_grad_norm`
    /// when numeric, else 0.5 as in the fixtures): also perform one optimisation step
    #[arg(long)]
    pub train_step: Option<PathBuf>,
}

/// AdamW settings and the clip norm from a fixture-style hyperparams.json.
pub fn read_hyperparams(path: &Path) -> Result<(AdamWConfig, f64)> {
    let f = path.display().to_string();
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {f}"))?;
    let v: Value = serde_json::from_str(&text).with_context(|| format!("{f}: not valid JSON"))?;
    let num = |k: &str| -> Result<f64> {
        v.get(k)
            .and_then(Value::as_f64)
            .with_context(|| format!("{f}: '{k}' must be a number"))
    };
    let betas = v
        .get("betas")
        .and_then(Value::as_array)
        .filter(|a| a.len() == 2)
        .with_context(|| format!("{f}: 'betas' must be [b1, b2]"))?;
    let beta = |i: usize| {
        betas[i]
            .as_f64()
            .with_context(|| format!("{f}: betas[{i}] must be a number"))
    };
    let clip = v
        .get("max_grad_norm")
        .or(v.get("clip"))
        .and_then(Value::as_f64)
        .unwrap_or(0.5);
    let cfg = AdamWConfig {
        lr: num("lr")?,
        beta1: beta(0)?,
        beta2: beta(1)?,
        eps: num("eps")?,
        weight_decay: num("weight_decay")?,
        no_decay_norms_embeddings: false,
    };
    Ok((cfg, clip))
}

pub fn run(a: DumpArgs) -> Result<()> {
    crate::cli::check_writable(&a.out)?;
    let out = dump_tensors(&crate::cli::model_dir(&a.model), &a.input, a.train_step.as_deref())?;
    write_f32(&a.out, &out)?;
    eprintln!("wrote {} tensors to {}", out.len(), a.out.display());
    Ok(())
}

/// Everything `dump` writes, in memory.
pub fn dump_tensors(model_dir: &Path, input_path: &Path, train_step: Option<&Path>) -> Result<TensorMap> {
    let (mut model, layout) = load_model(model_dir)?;
    let input = StFile::open(input_path)?;
    let (shape, ids) = input.ids("input_ids")?;
    if shape.len() != 2 || shape[0] == 0 || shape[1] < 2 {
        bail!(
            "{}: input_ids must be [batch, seq] with seq ≥ 2, got {shape:?}",
            input_path.display()
        );
    }
    let (b, t) = (shape[0], shape[1]);
    let targets = shifted_targets(&ids, t);
    let batch = Batch {
        ids: &ids,
        targets: &targets,
        batch: b,
        seq: t,
    };
    let cfg = model.cfg.clone();
    let mut rec = Recorder::default();
    let fwd = model
        .forward(&batch, &mut rec)
        .with_context(|| format!("{}", input_path.display()))?;
    let mut out = TensorMap::new();
    out.insert("logits".into(), (vec![b, t, cfg.vocab_size], fwd.logits));
    out.insert("loss".into(), (vec![], vec![fwd.loss as f32]));
    for (i, x) in rec.layer_out.into_iter().enumerate() {
        out.insert(format!("layer_out.{i}"), (vec![b, t, cfg.hidden_size], x));
    }
    for (i, p) in rec.attn_probs.into_iter().enumerate() {
        out.insert(format!("attn_probs.{i}"), (vec![b, cfg.num_heads, t, t], p));
    }
    if let Some(geo) = cfg.gate_geometry() {
        for (i, g) in rec.gates.into_iter().enumerate() {
            out.insert(format!("gate.{i}"), (vec![b, t, geo.heads, geo.per_head], g));
        }
    }
    if let Some(hp) = train_step {
        let (ocfg, clip) = read_hyperparams(hp)?;
        let mut grads = model.zero_grads();
        let loss = model.forward_backward(&batch, &mut grads, &mut crate::model::observer::NoObserver)?;
        let norm = clip_grad_norm(&mut grads, clip);
        let mut opt = AdamW::new(ocfg.clone(), &model.specs);
        opt.update(&mut model.params, &grads, &model.specs, ocfg.lr);
        out.insert("loss".into(), (vec![], vec![loss as f32]));
        out.insert("grad_norm".into(), (vec![], vec![norm as f32]));
        for (n, (s, d)) in to_layout(&cfg, layout, &grads, true)? {
            out.insert(format!("grad.{n}"), (s, d));
        }
        for (n, (s, d)) in to_layout(&cfg, layout, &model.params, false)? {
            out.insert(format!("updated.{n}"), (s, d));
        }
    }
    Ok(out)
}
