//! Resumable checkpoints: one safetensors file with weights, AdamW moments and (in its metadata)
//! the training state: step, sampler RNG, spike window, counters. Written atomically, so a crash
//! leaves the previous checkpoint intact.

use crate::io::st::{serialize_f32, StFile, TensorMap};
use crate::model::params::{ParamSpec, ParamStore, Tensor};
use crate::optim::AdamW;
use crate::rng::Rng;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

pub const FILE: &str = "state.safetensors";

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrainState {
    /// Optimizer steps completed (including skipped ones).
    pub step: u64,
    pub tokens: u64,
    pub sampler: Rng,
    pub spikes: u64,
    pub skipped: u64,
    pub consecutive_bad: u64,
    /// Recent losses for spike detection.
    pub loss_window: Vec<f64>,
    pub elapsed_s: f64,
}

pub fn save(dir: &Path, params: &ParamStore<f32>, opt: &AdamW<f32>, state: &TrainState) -> Result<()> {
    let mut t = TensorMap::new();
    for (prefix, store) in [("param.", params), ("adam_m.", &opt.m), ("adam_v.", &opt.v)] {
        for (n, x) in store.names.iter().zip(&store.tensors) {
            t.insert(format!("{prefix}{n}"), (x.shape.clone(), x.data.clone()));
        }
    }
    let meta = [
        ("state".to_string(), serde_json::to_string(state)?),
        ("adam_step".to_string(), opt.step.to_string()),
        ("format".to_string(), "gated-lm-checkpoint-1".to_string()),
    ];
    let bytes = serialize_f32(&t, Some(meta.into_iter().collect()))?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    crate::io::write_atomic(&dir.join(FILE), &bytes)
}

/// Load into freshly built `params` / `opt` (their specs define what must be present).
pub fn load(dir: &Path, specs: &[ParamSpec], params: &mut ParamStore<f32>, opt: &mut AdamW<f32>) -> Result<TrainState> {
    let path = dir.join(FILE);
    let what = path.display().to_string();
    let st = StFile::open(&path)?;
    let bytes = std::fs::read(&path).with_context(|| format!("cannot read {what}"))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).with_context(|| format!("{what}: bad header"))?;
    let meta = meta
        .metadata()
        .clone()
        .with_context(|| format!("{what}: no training state in metadata"))?;
    let state: TrainState = serde_json::from_str(meta.get("state").with_context(|| format!("{what}: no 'state'"))?)
        .with_context(|| format!("{what}: bad training state"))?;
    opt.step = meta
        .get("adam_step")
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("{what}: bad adam_step"))?;
    let expected: std::collections::HashSet<String> = ["param.", "adam_m.", "adam_v."]
        .iter()
        .flat_map(|p| specs.iter().map(move |s| format!("{p}{}", s.name)))
        .collect();
    if let Some(extra) = st.names()?.into_iter().find(|n| !expected.contains(n)) {
        bail!("{what}: checkpoint does not match the run's model config: it holds '{extra}', which the config does not describe");
    }
    for (prefix, store) in [("param.", params), ("adam_m.", &mut opt.m), ("adam_v.", &mut opt.v)] {
        for (i, s) in specs.iter().enumerate() {
            let x = st
                .f32(&format!("{prefix}{}", s.name))
                .with_context(|| format!("{what}: checkpoint does not match the run's model config"))?;
            if x.shape != s.shape {
                bail!(
                    "{what}: {prefix}{} has shape {:?}, the config implies {:?}",
                    s.name,
                    x.shape,
                    s.shape
                );
            }
            store.tensors[i] = Tensor {
                shape: x.shape,
                data: x.data,
            };
        }
    }
    Ok(state)
}
