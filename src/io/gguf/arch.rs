//! GGUF architectures beyond llama/Qwen (issue 16): `phi3` (fused `attn_qkv`, `ffn_up` holding
//! [gate; up]), `gemma2` / `gemma3` (four norms per block stored as 1+w by llama.cpp's
//! converter, GELU-tanh MLP, embedding scale, soft-capping, local/global layers) and the
//! sliding window of `llama` (Mistral). Key and tensor names are llama.cpp's (llama-arch.cpp,
//! conversion/{phi,gemma}.py); where llama.cpp deviates from transformers, we follow
//! transformers and say so.

use super::{Gguf, Value};
use crate::config::{MlpActivation, ModelConfig, RopeScaling};
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;

/// Set the architecture's own fields on the generically read `cfg`.
pub fn apply(g: &Gguf, arch: &str, cfg: &mut ModelConfig) -> Result<()> {
    let key = |k: &str| format!("{arch}.{k}");
    let num = |k: &str| g.meta.get(&key(k)).and_then(Value::as_f64);
    let window = g
        .meta
        .get(&key("attention.sliding_window"))
        .and_then(Value::as_u64)
        .filter(|&w| w > 0 && w < 1 << 32)
        .map(|w| w as usize);
    match arch {
        // llama.cpp's llama graph ignores the key (and its converter does not write it for
        // Mistral); transformers' MistralForCausalLM applies it, so we do when it is there
        "llama" => cfg.sliding_window = window,
        "phi3" => {
            cfg.qk_norm = false;
            if let Some(r) = g.meta.get(&key("rope.dimension_count")).and_then(Value::as_u64) {
                if r as usize != cfg.head_dim {
                    bail!(
                        "{}: '{}' is {r} but head_dim is {} (partial rotary is not supported for phi3)",
                        g.path,
                        key("rope.dimension_count"),
                        cfg.head_dim
                    );
                }
            }
            if g.info("rope_factors_long.weight").is_some() || g.info("rope_factors_short.weight").is_some() {
                bail!(
                    "{}: rope_factors_long/short tensors (Phi-3 LongRoPE) are not supported",
                    g.path
                );
            }
            // llama.cpp disables Phi-3's window (its PR 13676); transformers applies it
            cfg.sliding_window = window;
        }
        "gemma2" | "gemma3" => {
            let gemma3 = arch == "gemma3";
            cfg.mlp_activation = MlpActivation::GeluTanh;
            cfg.sandwich_norms = true;
            cfg.embed_scale = true;
            cfg.qk_norm = gemma3;
            // llama.cpp's converter stores every norm as 1 + w: the standard style reads them
            cfg.norm_style = crate::config::NormStyle::Standard;
            cfg.final_logit_softcap = num("final_logit_softcapping").filter(|&c| c > 0.0);
            cfg.attn_logit_softcap = if gemma3 {
                None
            } else {
                num("attn_logit_softcapping").filter(|&c| c > 0.0)
            };
            // llama.cpp: the score scale is head_dim^-½, hidden/heads for the 27B models
            let n27b = if gemma3 { 62 } else { 46 };
            cfg.query_pre_attn_scalar = Some(if cfg.num_layers == n27b {
                (cfg.hidden_size / cfg.num_heads) as f64
            } else {
                cfg.head_dim as f64
            });
            cfg.sliding_window = match (gemma3, window) {
                (false, w) => Some(w.unwrap_or(4096)),
                (true, w) => w,
            };
            if cfg.sliding_window.is_some() {
                cfg.global_layers = global_layers(
                    g,
                    &key("attention.sliding_window_pattern"),
                    cfg.num_layers,
                    if gemma3 { 6 } else { 2 },
                )?;
            }
            if gemma3 {
                cfg.rope_theta = num("rope.freq_base").unwrap_or(1e6);
                cfg.rope_local_theta = Some(num("rope.freq_base_swa").unwrap_or(1e4));
                let kind = g.meta.get(&key("rope.scaling.type")).and_then(Value::as_str);
                match (kind, num("rope.scaling.factor")) {
                    (None | Some("none"), _) => {}
                    (Some("linear"), Some(f)) if f > 1.0 => {
                        cfg.rope_scaling = Some(RopeScaling {
                            kind: "linear".into(),
                            factor: f,
                            original_max_position_embeddings: cfg.max_position_embeddings,
                            beta_fast: 32.0,
                            beta_slow: 1.0,
                            attention_factor: None,
                        })
                    }
                    (Some("linear"), _) => {}
                    (Some(k), _) => bail!("{}: rope scaling '{k}' is not supported for gemma3 (linear)", g.path),
                }
            } else if g.meta.contains_key(&key("rope.freq_base_swa")) {
                bail!("{}: a separate local RoPE base is not supported for gemma2", g.path);
            }
            if cfg.sliding_window.is_some() && cfg.global_layers.len() == cfg.num_layers {
                cfg.sliding_window = None;
                cfg.global_layers.clear();
            }
            if cfg.sliding_window.is_none() {
                cfg.rope_local_theta = None;
            }
        }
        _ => {}
    }
    Ok(())
}

/// llama.cpp's `sliding_window_pattern`: an array of per-layer bools (true = windowed), or a
/// period n (layer l windowed unless l % n == n − 1), or absent (`default`).
fn global_layers(g: &Gguf, k: &str, layers: usize, default: usize) -> Result<Vec<usize>> {
    match g.meta.get(k) {
        Some(Value::Arr(a)) => {
            if a.len() != layers {
                bail!("{}: '{k}' has {} entries for {layers} layers", g.path, a.len());
            }
            Ok(a.iter()
                .enumerate()
                .filter(|(_, v)| !matches!(v, Value::Bool(true)))
                .map(|(i, _)| i)
                .collect())
        }
        Some(v) => {
            let n = v
                .as_u64()
                .filter(|&n| n > 0)
                .with_context(|| format!("{}: '{k}' must be a positive integer or a list", g.path))?
                as usize;
            Ok((0..layers).filter(|l| l % n == n - 1).collect())
        }
        None => Ok((0..layers).filter(|l| l % default == default - 1).collect()),
    }
}

/// Our tensor `hf` (HF name) in the GGUF of `arch`: its GGUF name and the rows to take (first
/// row, rows) when it is a block of a fused tensor (Phi-3's attn_qkv and ffn_up), with the
/// fused tensor's expected row count.
pub fn source(cfg: &ModelConfig, arch: &str, hf: &str) -> (String, Option<(usize, usize, usize)>) {
    let name = super::gguf_name(hf);
    if cfg.sandwich_norms {
        // Gemma: post_attention_layernorm norms the attention output there
        for (ours, theirs) in [
            ("post_attention_layernorm.weight", "post_attention_norm.weight"),
            ("pre_feedforward_layernorm.weight", "ffn_norm.weight"),
            ("post_feedforward_layernorm.weight", "post_ffw_norm.weight"),
        ] {
            if let Some(p) = hf.strip_suffix(ours) {
                let i = p.trim_start_matches("model.layers.").trim_end_matches('.');
                return (format!("blk.{i}.{theirs}"), None);
            }
        }
    }
    if arch == "phi3" {
        let (q, kv, f) = (cfg.q_dim(), cfg.kv_dim(), cfg.intermediate_size);
        let fused = |n: &str, from: &str, to: &str| n.replace(from, to);
        for (suffix, fused_name, r0, rows, total) in [
            ("attn_q.weight", "attn_qkv.weight", 0, q, q + 2 * kv),
            ("attn_k.weight", "attn_qkv.weight", q, kv, q + 2 * kv),
            ("attn_v.weight", "attn_qkv.weight", q + kv, kv, q + 2 * kv),
            ("ffn_gate.weight", "ffn_up.weight", 0, f, 2 * f),
            ("ffn_up.weight", "ffn_up.weight", f, f, 2 * f),
        ] {
            if name.ends_with(suffix) {
                return (fused(&name, suffix, fused_name), Some((r0, rows, total)));
            }
        }
    }
    (name, None)
}

/// A tensor's GGUF name with its (PyTorch shape, data).
type Named = (String, (Vec<usize>, Vec<f32>));

/// Read tensor `hf` of `cfg` from `g`, splitting fused tensors (dequantised once, kept in `cache`).
pub fn read(
    g: &Gguf,
    cfg: &ModelConfig,
    arch: &str,
    hf: &str,
    cache: &mut BTreeMap<String, (Vec<usize>, Vec<f32>)>,
) -> Result<Named> {
    let (mut name, mut block) = source(cfg, arch, hf);
    let plain = super::gguf_name(hf);
    if block.is_some() && g.info(&name).is_none() && g.info(&plain).is_some() {
        // llama.cpp also accepts phi3 files with separate attn_q/attn_k/attn_v
        (name, block) = (plain, None);
    }
    let Some((r0, rows, total)) = block else {
        let t = g.f32(&name)?;
        return Ok((name, t));
    };
    if !cache.contains_key(&name) {
        cache.retain(|k, _| k.split('.').nth(1) == name.split('.').nth(1));
        cache.insert(name.clone(), g.f32(&name)?);
    }
    let (shape, data) = &cache[&name];
    let d = cfg.hidden_size;
    if shape[..] != [total, d] {
        bail!(
            "{}: fused tensor '{name}' has shape {shape:?}; the metadata implies [{total}, {d}] ({})",
            g.path,
            if name.ends_with("attn_qkv.weight") {
                format!("q {} + k {} + v {} rows", cfg.q_dim(), cfg.kv_dim(), cfg.kv_dim())
            } else {
                format!("gate {0} + up {0} rows", cfg.intermediate_size)
            }
        );
    }
    Ok((name, (vec![rows, d], data[r0 * d..(r0 + rows) * d].to_vec())))
}
