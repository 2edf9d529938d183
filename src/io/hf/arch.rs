//! The llama-family architectures beyond Qwen (issue 16): llama / Mistral (sliding window),
//! Phi-3 (fused `qkv_proj` and `gate_up_proj`), Gemma 2 and Gemma 3 text models (GELU-tanh MLP,
//! four norms per block, `x̂·(1+w)` norms, embedding scale, soft-capping, local/global layers).
//! `parse_config` reads the common fields; `precheck` refuses what we cannot reproduce before
//! that, `apply` sets the architecture's own fields after.

use super::{opt_f64, F32Tensor, Layout};
use crate::config::{MlpActivation, ModelConfig};
use anyhow::{bail, Context, Result};
use serde_json::Value;

/// The `model_type`s this module reads and their layouts.
pub fn layout_of(model_type: &str, file: &str) -> Result<Option<Layout>> {
    Ok(Some(match model_type {
        "llama" | "mistral" => Layout::Llama,
        "phi3" => Layout::Phi3,
        "gemma2" => Layout::Gemma2,
        "gemma3_text" => Layout::Gemma3,
        "gemma3" => bail!(
            "{file}: model_type 'gemma3' is the multimodal Gemma3ForConditionalGeneration; only the text model (Gemma3ForCausalLM, model_type gemma3_text) is supported"
        ),
        _ => return Ok(None),
    }))
}

fn rope_kind(src: &Value) -> Option<&str> {
    src.get("rope_type").or(src.get("type")).and_then(Value::as_str)
}

/// Refusals that must come before the generic parsing (which would give a vaguer message).
pub fn precheck(v: &Value, file: &str, layout: Layout) -> Result<()> {
    match layout {
        Layout::Phi3 => {
            for key in ["rope_scaling", "rope_parameters"] {
                if let Some(t) = v.get(key).and_then(rope_kind) {
                    if t != "default" {
                        bail!("{file}: {key}.rope_type '{t}' is not supported for Phi-3 (LongRoPE / 'su' scaling with long_factor/short_factor cannot be reproduced; plain RoPE only)");
                    }
                }
            }
            let partial = v
                .get("partial_rotary_factor")
                .or(v.get("rope_parameters").and_then(|r| r.get("partial_rotary_factor")))
                .and_then(Value::as_f64);
            if partial.is_some_and(|p| p != 1.0) {
                bail!(
                    "{file}: partial_rotary_factor {} is not supported for Phi-3 (full rotary only)",
                    partial.unwrap()
                );
            }
        }
        Layout::Gemma3 => {
            // transformers 5 nests RoPE per layer type; older configs are flat
            if let Some(rp) = v.get("rope_parameters").filter(|r| r.get("full_attention").is_some()) {
                for (k, sub) in rp.as_object().into_iter().flatten() {
                    let t = rope_kind(sub).unwrap_or("default");
                    if !["default", "linear"].contains(&t) || (k == "sliding_attention" && t != "default") {
                        bail!("{file}: rope_parameters.{k}.rope_type '{t}' is not supported (default, linear on full_attention)");
                    }
                }
            }
        }
        _ => {}
    }
    if matches!(layout, Layout::Llama | Layout::Phi3) {
        if v.get("mlp_bias").and_then(Value::as_bool).unwrap_or(false) {
            bail!("{file}: mlp_bias = true is not supported");
        }
        if let Some(t) = v.get("rope_scaling").and_then(rope_kind) {
            if t == "llama3" {
                bail!("{file}: rope_scaling.rope_type 'llama3' is not supported (default, yarn, linear)");
            }
        }
    }
    Ok(())
}

fn positive(v: &Value, key: &str, file: &str) -> Result<Option<usize>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_u64()
            .filter(|&w| w > 0 && w < 1 << 32)
            .map(|w| Some(w as usize))
            .with_context(|| format!("{file}: '{key}' must be a positive integer or null")),
    }
}

/// Gemma's `layer_types`, or its default pattern (`sliding_window_pattern`, every `pattern`-th
/// layer global): the global layers.
fn global_layers(v: &Value, file: &str, layers: usize, default_pattern: usize) -> Result<Vec<usize>> {
    if let Some(lt) = v.get("layer_types").filter(|x| !x.is_null()) {
        let lt = lt
            .as_array()
            .with_context(|| format!("{file}: 'layer_types' must be a list"))?;
        if lt.len() != layers {
            bail!(
                "{file}: layer_types has {} entries but num_hidden_layers is {layers}",
                lt.len()
            );
        }
        let mut g = Vec::new();
        for (i, t) in lt.iter().enumerate() {
            match t.as_str() {
                Some("full_attention") => g.push(i),
                Some("sliding_attention") => {}
                _ => bail!("{file}: layer_types[{i}] is {t} (full_attention or sliding_attention)"),
            }
        }
        return Ok(g);
    }
    let p = positive(v, "sliding_window_pattern", file)?.unwrap_or(default_pattern);
    Ok((0..layers).filter(|i| (i + 1) % p == 0).collect())
}

/// Set the architecture's own fields on the generically parsed `cfg`.
pub fn apply(v: &Value, file: &str, layout: Layout, cfg: &mut ModelConfig) -> Result<()> {
    let n = cfg.num_layers;
    match layout {
        Layout::Llama | Layout::Phi3 => {
            cfg.qk_norm = false;
            // Mistral / Phi-3: `sliding_window` (null: none); llama has no such key
            let use_sw = v.get("use_sliding_window").and_then(Value::as_bool).unwrap_or(true);
            cfg.sliding_window = if use_sw {
                positive(v, "sliding_window", file)?
            } else {
                None
            };
        }
        Layout::Gemma2 | Layout::Gemma3 => {
            let act = v
                .get("hidden_activation")
                .or(v.get("hidden_act"))
                .and_then(Value::as_str)
                .unwrap_or("gelu_pytorch_tanh");
            if act != "gelu_pytorch_tanh" {
                bail!("{file}: hidden_activation '{act}' is not supported for Gemma (gelu_pytorch_tanh)");
            }
            cfg.mlp_activation = MlpActivation::GeluTanh;
            cfg.qk_norm = layout == Layout::Gemma3;
            cfg.sandwich_norms = true;
            cfg.embed_scale = true;
            cfg.tie_word_embeddings = v.get("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(true);
            cfg.query_pre_attn_scalar = Some(opt_f64(v, "query_pre_attn_scalar", file)?.unwrap_or(256.0));
            cfg.final_logit_softcap = opt_f64(v, "final_logit_softcapping", file)?;
            cfg.attn_logit_softcap = opt_f64(v, "attn_logit_softcapping", file)?;
            if layout == Layout::Gemma3 && cfg.attn_logit_softcap.is_some() {
                // transformers' Gemma3 attention ignores it and llama.cpp refuses it: so do we
                bail!(
                    "{file}: attn_logit_softcapping is not used by Gemma 3 (transformers ignores it); set it to null"
                );
            }
            if v.get("use_bidirectional_attention")
                .and_then(Value::as_bool)
                .unwrap_or(false)
            {
                bail!("{file}: use_bidirectional_attention = true is not supported (causal models only)");
            }
            cfg.sliding_window = Some(positive(v, "sliding_window", file)?.unwrap_or(4096));
            let pattern = if layout == Layout::Gemma2 { 2 } else { 6 };
            cfg.global_layers = global_layers(v, file, n, pattern)?;
            if layout == Layout::Gemma3 {
                gemma3_rope(v, file, cfg)?;
            }
        }
        _ => {}
    }
    if cfg.sliding_window.is_some() && cfg.global_layers.len() == n {
        // every layer global: no window anywhere
        cfg.sliding_window = None;
        cfg.global_layers.clear();
    }
    Ok(())
}

/// Gemma 3's two RoPE settings: global layers θ (default 1e6, optionally linear scaling), local
/// layers plain RoPE at `rope_local_base_freq` (default 1e4).
fn gemma3_rope(v: &Value, file: &str, cfg: &mut ModelConfig) -> Result<()> {
    let nested = v.get("rope_parameters").filter(|r| r.get("full_attention").is_some());
    let (global, local) = match nested {
        Some(rp) => (rp.get("full_attention"), rp.get("sliding_attention")),
        None => (None, None),
    };
    if let Some(g) = global {
        cfg.rope_theta = opt_f64(g, "rope_theta", file)?.unwrap_or(1e6);
        cfg.rope_scaling = match rope_kind(g).unwrap_or("default") {
            "linear" => Some(crate::config::RopeScaling {
                kind: "linear".into(),
                factor: opt_f64(g, "factor", file)?.with_context(|| format!("{file}: linear rope needs 'factor'"))?,
                original_max_position_embeddings: cfg.max_position_embeddings,
                beta_fast: 32.0,
                beta_slow: 1.0,
                attention_factor: None,
            }),
            _ => None,
        };
    } else if opt_f64(v, "rope_theta", file)?.is_none() {
        cfg.rope_theta = 1e6;
    }
    let local_theta = match local {
        Some(l) => opt_f64(l, "rope_theta", file)?,
        None => opt_f64(v, "rope_local_base_freq", file)?,
    };
    cfg.rope_local_theta = Some(local_theta.unwrap_or(1e4));
    Ok(())
}

/// Phi-3's fused tensors: for one of our per-projection names, the fused HF tensor that holds
/// it, the first row and row count of its block, and the fused tensor's expected row count.
pub fn phi3_source(cfg: &ModelConfig, name: &str) -> Option<(String, usize, usize, usize)> {
    let prefix = name.strip_suffix(".weight")?;
    let (layer, proj) = prefix.rsplit_once('.')?;
    let (q, kv, f) = (cfg.q_dim(), cfg.kv_dim(), cfg.intermediate_size);
    let (fused, r0, rows, total) = match (layer.rsplit('.').next()?, proj) {
        ("self_attn", "q_proj") => ("qkv_proj", 0, q, q + 2 * kv),
        ("self_attn", "k_proj") => ("qkv_proj", q, kv, q + 2 * kv),
        ("self_attn", "v_proj") => ("qkv_proj", q + kv, kv, q + 2 * kv),
        ("mlp", "gate_proj") => ("gate_up_proj", 0, f, 2 * f),
        ("mlp", "up_proj") => ("gate_up_proj", f, f, 2 * f),
        _ => return None,
    };
    Some((format!("{layer}.{fused}.weight"), r0, rows, total))
}

/// Rows `r0..r0+rows` of Phi-3's fused tensor `t` (`name` in file `file`), after checking that it
/// has the `total` rows the config implies.
pub fn phi3_block(
    cfg: &ModelConfig,
    file: &str,
    name: &str,
    t: &F32Tensor,
    (r0, rows, total): (usize, usize, usize),
) -> Result<F32Tensor> {
    let d = cfg.hidden_size;
    if t.shape != [total, d] {
        bail!(
            "{file}: fused tensor '{name}' has shape {:?}; the config implies [{total}, {d}] ({})",
            t.shape,
            if name.ends_with("qkv_proj.weight") {
                format!("q {} + k {} + v {} rows", cfg.q_dim(), cfg.kv_dim(), cfg.kv_dim())
            } else {
                format!("gate {0} + up {0} rows", cfg.intermediate_size)
            }
        );
    }
    Ok(F32Tensor {
        shape: vec![rows, d],
        data: t.data[r0 * d..(r0 + rows) * d].to_vec(),
    })
}
