//! Hugging Face checkpoint layouts. Three real-world layouts plus our own:
//!
//! * `Qwen3`: transformers `Qwen3ForCausalLM`, no gate.
//! * `Qwen2`: transformers `Qwen2ForCausalLM` (Qwen2 / Qwen2.5): no gate, no QK-norm, biases on
//!   q_proj, k_proj, v_proj (`attention_bias`; transformers' Qwen2 always has them).
//! * `Official`: the paper's released code (`model_type: qwen3` + `headwise_attn_output_gate` /
//!   `elementwise_attn_output_gate`); `q_proj` rows per KV group g are
//!   `[q of the group's G heads (G·d) ; their gates (G or G·d)]`.
//! * `Qwen3Next`: transformers `Qwen3NextForCausalLM` with every layer full attention and a dense
//!   MLP; `q_proj` rows per head are `[q_h (d) ; g_h (d)]`, norms are `x̂·(1+w)`, partial RoPE.
//! * `GatedLm`: any other gate variant: our `ModelConfig` in config.json, internal tensor names.
//! * `Llama` (llama / Mistral, sliding window), `Phi3` (fused qkv / gate_up), `Gemma2`, `Gemma3`
//!   (text): see `arch`. Llama also saves; Phi-3 and Gemma load only (save them as gated-lm).
//!
//! All gate permutations live here and nowhere else.

use super::st::{F32Tensor, StFile, TensorMap};
use crate::config::{GateConfig, GateGranularity, ModelConfig, MoeConfig, NormStyle};
use crate::model::params::{param_specs, ParamKind, ParamStore, Tensor};
use crate::model::Model;
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::Path;

mod arch;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    Qwen3,
    Qwen2,
    Official,
    Qwen3Next,
    GatedLm,
    Llama,
    Phi3,
    Gemma2,
    Gemma3,
}

impl Layout {
    pub fn parse(s: &str) -> Result<Layout> {
        Ok(match s {
            "qwen3" => Layout::Qwen3,
            "qwen2" => Layout::Qwen2,
            "official" => Layout::Official,
            "qwen3-next" | "qwen3_next" => Layout::Qwen3Next,
            "gated-lm" | "gated_lm" => Layout::GatedLm,
            "llama" | "mistral" => Layout::Llama,
            o => bail!("unknown layout '{o}' (qwen3, qwen2, official, qwen3-next, gated-lm, llama)"),
        })
    }
    /// The name the CLI takes (`--to`).
    pub fn name(self) -> &'static str {
        match self {
            Layout::Qwen3 => "qwen3",
            Layout::Qwen2 => "qwen2",
            Layout::Official => "official",
            Layout::Qwen3Next => "qwen3-next",
            Layout::GatedLm => "gated-lm",
            Layout::Llama => "llama",
            Layout::Phi3 => "phi3",
            Layout::Gemma2 => "gemma2",
            Layout::Gemma3 => "gemma3",
        }
    }
    fn norm_style(self, cfg: &ModelConfig) -> NormStyle {
        match self {
            Layout::Qwen3 | Layout::Qwen2 | Layout::Official | Layout::Llama | Layout::Phi3 => NormStyle::Standard,
            Layout::Qwen3Next | Layout::Gemma2 | Layout::Gemma3 => NormStyle::ZeroCentered,
            Layout::GatedLm => cfg.norm_style,
        }
    }

    /// Whether `cfg` can be stored in this layout.
    pub fn check(self, cfg: &ModelConfig) -> Result<()> {
        let g = cfg.gate.as_ref();
        if matches!(self, Layout::Phi3 | Layout::Gemma2 | Layout::Gemma3) {
            bail!("saving in the {self:?} layout is not supported (it loads only); save such a model in the gated-lm layout");
        }
        if self != Layout::GatedLm {
            // Mistral's window is the one extra a stock layout (llama) can hold
            let mut plain = cfg.clone();
            if self == Layout::Llama && plain.global_layers.is_empty() {
                plain.sliding_window = None;
            }
            if let Some(why) = plain.cpu_only_feature() {
                bail!("the {self:?} layout cannot hold this model ({why}); use the gated-lm layout");
            }
        }
        // Qwen3-MoE has no shared expert; Qwen3-Next's MoE block always has one; transformers
        // routes dropless, so a capacity-limited model would compute something else there
        let shared = cfg.moe.as_ref().map(|m| m.shared_expert_intermediate_size > 0);
        if self != Layout::GatedLm && cfg.moe.as_ref().is_some_and(|m| m.capacity_factor.is_some()) {
            bail!("a MoE model with an expert capacity can only be stored in the gated-lm layout (transformers routes dropless)");
        }
        // transformers' Qwen2 always has q/k/v biases and never QK-norm; in the Qwen3 classes
        // `attention_bias` would also put a bias on o_proj, which our models lack
        match self {
            Layout::Qwen2 if !cfg.attention_bias || cfg.qk_norm => bail!(
                "the Qwen2 layout needs q/k/v biases (attention_bias) and no QK-norm; this model has attention_bias {} and qk_norm {}",
                cfg.attention_bias,
                cfg.qk_norm
            ),
            Layout::Qwen3 | Layout::Official | Layout::Qwen3Next if cfg.attention_bias => bail!(
                "a model with q/k/v biases (attention_bias) can only be stored in the qwen2 layout (no gate, no QK-norm, dense) or the gated-lm layout, not {self:?}"
            ),
            _ => {}
        }
        // the Qwen3 classes always have QK-norm, llama never
        match self {
            Layout::Qwen3 | Layout::Official | Layout::Qwen3Next if !cfg.qk_norm => {
                bail!("the {self:?} layout needs QK-norm; this model has none (the llama layout holds such models)")
            }
            Layout::Llama if cfg.qk_norm || cfg.attention_bias || cfg.moe.is_some() => bail!(
                "the llama layout holds dense models without QK-norm and without biases; this model has qk_norm {}, attention_bias {}, moe {}",
                cfg.qk_norm,
                cfg.attention_bias,
                cfg.moe.is_some()
            ),
            _ => {}
        }
        let ok = match self {
            Layout::GatedLm => true,
            Layout::Llama => g.is_none() && cfg.partial_rotary_factor == 1.0,
            Layout::Phi3 | Layout::Gemma2 | Layout::Gemma3 => false,
            Layout::Qwen2 => g.is_none() && cfg.partial_rotary_factor == 1.0 && shared.is_none(),
            Layout::Qwen3 => g.is_none() && cfg.partial_rotary_factor == 1.0 && shared != Some(true),
            Layout::Official => {
                g.is_some_and(|g| g.is_standard_g1()) && cfg.partial_rotary_factor == 1.0 && shared.is_none()
            }
            Layout::Qwen3Next => {
                g.is_some_and(|g| g.is_standard_g1() && g.granularity == GateGranularity::Elementwise)
                    && shared != Some(false)
            }
        };
        if !ok {
            bail!(
                "a model with gate '{}', partial_rotary_factor {} and {} cannot be stored in the {self:?} layout",
                g.map(|g| g.spec()).unwrap_or("none".into()),
                cfg.partial_rotary_factor,
                match shared {
                    None => "a dense MLP",
                    Some(true) => "MoE with a shared expert",
                    Some(false) => "MoE without a shared expert",
                }
            );
        }
        Ok(())
    }

    /// The layout our saved models use: stock transformers classes wherever one fits.
    pub fn default_for(cfg: &ModelConfig) -> Layout {
        [
            Layout::Qwen3,
            Layout::Qwen2,
            Layout::Qwen3Next,
            Layout::Official,
            Layout::Llama,
        ]
        .into_iter()
        .find(|l| l.check(cfg).is_ok())
        .unwrap_or(Layout::GatedLm)
    }
}

fn get_usize(v: &Value, key: &str, file: &str) -> Result<usize> {
    v.get(key)
        .with_context(|| format!("{file}: missing '{key}'"))?
        .as_u64()
        .filter(|&x| x > 0 && x < (1 << 32))
        .map(|x| x as usize)
        .with_context(|| format!("{file}: '{key}' must be a positive integer"))
}

fn opt_f64(v: &Value, key: &str, file: &str) -> Result<Option<f64>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_f64()
            .map(Some)
            .with_context(|| format!("{file}: '{key}' must be a number")),
    }
}

/// Parse config.json into our config and its layout.
pub fn parse_config(text: &str, file: &str) -> Result<(ModelConfig, Layout)> {
    let v: Value = serde_json::from_str(text).with_context(|| format!("{file}: not valid JSON"))?;
    if !v.is_object() {
        bail!("{file}: expected a JSON object");
    }
    let model_type = v.get("model_type").and_then(Value::as_str).unwrap_or("");
    if model_type == "gated_lm" {
        let cfg: ModelConfig = serde_json::from_value(v.get("gated_lm").cloned().unwrap_or(Value::Null))
            .with_context(|| format!("{file}: bad 'gated_lm' section"))?;
        cfg.validate().with_context(|| file.to_string())?;
        return Ok((cfg, Layout::GatedLm));
    }
    let layout = match model_type {
        "qwen3" => {
            let flag = |k: &str| v.get(k).and_then(Value::as_bool).unwrap_or(false);
            if flag("headwise_attn_output_gate") || flag("elementwise_attn_output_gate") {
                Layout::Official
            } else {
                Layout::Qwen3
            }
        }
        "qwen3_moe" => Layout::Qwen3,
        "qwen3_next" => Layout::Qwen3Next,
        "qwen2" => Layout::Qwen2,
        "" => bail!("{file}: missing 'model_type'"),
        other => match arch::layout_of(other, file)? {
            Some(l) => l,
            None => bail!("{file}: model_type '{other}' is not supported (llama, mistral, phi3, gemma2, gemma3_text, qwen2, qwen3, qwen3_moe, qwen3_next, gated_lm)"),
        },
    };
    arch::precheck(&v, file, layout)?;
    let gemma = matches!(layout, Layout::Gemma2 | Layout::Gemma3);
    let heads = get_usize(&v, "num_attention_heads", file)?;
    let hidden = get_usize(&v, "hidden_size", file)?;
    let layers = get_usize(&v, "num_hidden_layers", file)?;
    let kv = if v.get("num_key_value_heads").is_some_and(|x| !x.is_null()) {
        get_usize(&v, "num_key_value_heads", file)?
    } else {
        heads
    };
    let head_dim = if v.get("head_dim").is_some_and(|x| !x.is_null()) {
        get_usize(&v, "head_dim", file)?
    } else {
        hidden / heads
    };
    if let Some(act) = v.get("hidden_act").and_then(Value::as_str).filter(|_| !gemma) {
        if act != "silu" {
            bail!("{file}: hidden_act '{act}' is not supported (silu only)");
        }
    }
    // Qwen2 has q/k/v biases whatever its config says; in the Qwen3 classes attention_bias
    // would also bias o_proj, which we do not implement
    let attention_bias = layout == Layout::Qwen2;
    if !attention_bias && v.get("attention_bias").and_then(Value::as_bool).unwrap_or(false) {
        bail!("{file}: attention_bias = true is not supported for model_type '{model_type}' (it biases o_proj too); Qwen2 checkpoints (model_type qwen2) carry q/k/v biases");
    }
    if layout == Layout::Qwen2 && v.get("use_sliding_window").and_then(Value::as_bool).unwrap_or(false) {
        bail!("{file}: use_sliding_window = true is not supported (full attention in every layer only)");
    }
    // rope: new-style rope_parameters or old top-level fields
    let rp = v.get("rope_parameters").cloned().unwrap_or(Value::Null);
    let old = v.get("rope_scaling").cloned().unwrap_or(Value::Null);
    let scaling_src = if old.is_object() { &old } else { &rp };
    let rope_type = scaling_src
        .get("rope_type")
        .or(scaling_src.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let rope_scaling = match rope_type {
        "default" => None,
        "yarn" | "linear" => {
            let factor = opt_f64(scaling_src, "factor", file)?
                .with_context(|| format!("{file}: rope scaling needs 'factor'"))?;
            let orig = scaling_src
                .get("original_max_position_embeddings")
                .and_then(Value::as_u64)
                .or(v.get("max_position_embeddings").and_then(Value::as_u64))
                .unwrap_or(4096) as usize;
            Some(crate::config::RopeScaling {
                kind: rope_type.to_string(),
                factor,
                original_max_position_embeddings: orig,
                beta_fast: opt_f64(scaling_src, "beta_fast", file)?.unwrap_or(32.0),
                beta_slow: opt_f64(scaling_src, "beta_slow", file)?.unwrap_or(1.0),
                attention_factor: opt_f64(scaling_src, "attention_factor", file)?,
            })
        }
        t => bail!("{file}: rope_type '{t}' is not supported (default, yarn, linear)"),
    };
    let theta = opt_f64(&rp, "rope_theta", file)?
        .or(opt_f64(&v, "rope_theta", file)?)
        .unwrap_or(10000.0);
    let default_partial = if layout == Layout::Qwen3Next { 0.25 } else { 1.0 };
    let partial = opt_f64(&rp, "partial_rotary_factor", file)?
        .or(opt_f64(&v, "partial_rotary_factor", file)?)
        .unwrap_or(default_partial);
    if layout == Layout::Qwen3Next {
        if let Some(lt) = v.get("layer_types").and_then(Value::as_array) {
            if lt.len() != layers {
                bail!(
                    "{file}: layer_types has {} entries but num_hidden_layers is {layers}",
                    lt.len()
                );
            }
            if let Some((i, t)) = lt
                .iter()
                .enumerate()
                .find(|(_, t)| t.as_str() != Some("full_attention"))
            {
                bail!("{file}: layer_types[{i}] is {t}; only Qwen3-Next models whose every layer is full_attention are supported");
            }
        } else {
            bail!("{file}: Qwen3-Next config lacks 'layer_types' (its default mixes in linear attention, unsupported)");
        }
    }
    let moe = parse_moe(&v, file, layers, model_type)?;
    let gate = match layout {
        Layout::Qwen3 | Layout::Qwen2 | Layout::Llama | Layout::Phi3 | Layout::Gemma2 | Layout::Gemma3 => None,
        Layout::Qwen3Next => Some(GateConfig::g1(GateGranularity::Elementwise)),
        Layout::Official => {
            let hw = v
                .get("headwise_attn_output_gate")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            let ew = v
                .get("elementwise_attn_output_gate")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            if hw && ew {
                bail!("{file}: both headwise_attn_output_gate and elementwise_attn_output_gate are set");
            }
            Some(GateConfig::g1(if hw {
                GateGranularity::Headwise
            } else {
                GateGranularity::Elementwise
            }))
        }
        Layout::GatedLm => unreachable!(),
    };
    let mut cfg = ModelConfig {
        vocab_size: get_usize(&v, "vocab_size", file)?,
        hidden_size: hidden,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: kv,
        head_dim,
        intermediate_size: get_usize(&v, "intermediate_size", file)?,
        rms_norm_eps: opt_f64(&v, "rms_norm_eps", file)?.unwrap_or(1e-6),
        rope_theta: theta,
        partial_rotary_factor: partial,
        norm_style: layout.norm_style_for_load(),
        tie_word_embeddings: v.get("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(false),
        max_position_embeddings: v
            .get("max_position_embeddings")
            .and_then(Value::as_u64)
            .unwrap_or(32768) as usize,
        init_std: opt_f64(&v, "initializer_range", file)?.unwrap_or(0.02),
        rope_scaling,
        qk_norm: matches!(layout, Layout::Qwen3 | Layout::Official | Layout::Qwen3Next),
        attention_bias,
        gate,
        moe,
        ..ModelConfig::dense(1, 1, 1, 1, 1, 1, 1, None)
    };
    arch::apply(&v, file, layout, &mut cfg)?;
    cfg.validate().with_context(|| file.to_string())?;
    Ok((cfg, layout))
}

/// The MoE fields of a qwen3_moe / qwen3_next config; `None` when every layer is dense.
fn parse_moe(v: &Value, file: &str, layers: usize, model_type: &str) -> Result<Option<MoeConfig>> {
    // transformers 5 calls Qwen3-MoE's expert count num_local_experts
    let experts_key = if v.get("num_experts").is_some() {
        "num_experts"
    } else {
        "num_local_experts"
    };
    let experts = v.get(experts_key).and_then(Value::as_u64).unwrap_or(0);
    if !model_type.starts_with("qwen3_") || experts == 0 {
        if model_type == "qwen3_moe" {
            bail!("{file}: a qwen3_moe config needs 'num_experts' > 0");
        }
        return Ok(None);
    }
    let mlp_only: Vec<usize> = match v.get("mlp_only_layers") {
        None | Some(Value::Null) => vec![],
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| x.as_u64().map(|x| x as usize))
            .collect::<Option<_>>()
            .with_context(|| format!("{file}: 'mlp_only_layers' must list layer indices"))?,
        Some(_) => bail!("{file}: 'mlp_only_layers' must be a list"),
    };
    let step = match v.get("decoder_sparse_step") {
        None | Some(Value::Null) => 1,
        Some(_) => get_usize(v, "decoder_sparse_step", file)?,
    };
    let mut m = MoeConfig::new(
        get_usize(v, experts_key, file)?,
        get_usize(v, "num_experts_per_tok", file)?,
        get_usize(v, "moe_intermediate_size", file)?,
    );
    m.norm_topk_prob = v
        .get("norm_topk_prob")
        .and_then(Value::as_bool)
        .unwrap_or(model_type == "qwen3_next");
    m.router_aux_loss_coef = opt_f64(v, "router_aux_loss_coef", file)?.unwrap_or(0.001);
    m.router_z_loss_coef = opt_f64(v, "router_z_loss_coef", file)?.unwrap_or(0.0);
    m.capacity_factor = opt_f64(v, "capacity_factor", file)?;
    m.decoder_sparse_step = step;
    m.mlp_only_layers = mlp_only.into_iter().filter(|&l| l < layers).collect();
    if model_type == "qwen3_next" {
        m.shared_expert_intermediate_size = get_usize(v, "shared_expert_intermediate_size", file)?;
    }
    let any_moe = (0..layers).any(|l| !m.mlp_only_layers.contains(&l) && (l + 1) % step == 0);
    Ok(any_moe.then_some(m))
}

/// transformers' MoE fields for `cfg.moe` (dense everywhere when there is none).
fn moe_json(cfg: &ModelConfig, o: &mut serde_json::Map<String, Value>) {
    match &cfg.moe {
        None => {
            o.insert("num_experts".into(), json!(0));
            o.insert("mlp_only_layers".into(), json!((0..cfg.num_layers).collect::<Vec<_>>()));
            o.insert("decoder_sparse_step".into(), json!(1));
        }
        Some(m) => {
            o.insert("num_experts".into(), json!(m.num_experts));
            o.insert("num_experts_per_tok".into(), json!(m.num_experts_per_tok));
            o.insert("moe_intermediate_size".into(), json!(m.moe_intermediate_size));
            o.insert("norm_topk_prob".into(), json!(m.norm_topk_prob));
            o.insert("router_aux_loss_coef".into(), json!(m.router_aux_loss_coef));
            o.insert("mlp_only_layers".into(), json!(m.mlp_only_layers));
            o.insert("decoder_sparse_step".into(), json!(m.decoder_sparse_step));
            o.insert("output_router_logits".into(), json!(false));
            if m.shared_expert_intermediate_size > 0 {
                o.insert(
                    "shared_expert_intermediate_size".into(),
                    json!(m.shared_expert_intermediate_size),
                );
            }
            // ours (transformers ignores them)
            o.insert("router_z_loss_coef".into(), json!(m.router_z_loss_coef));
            if let Some(c) = m.capacity_factor {
                o.insert("capacity_factor".into(), json!(c));
            }
        }
    }
}

impl Layout {
    fn norm_style_for_load(self) -> NormStyle {
        match self {
            Layout::Qwen3Next | Layout::Gemma2 | Layout::Gemma3 => NormStyle::ZeroCentered,
            _ => NormStyle::Standard,
        }
    }
}

/// config.json for `cfg` in `layout`.
pub fn config_json(cfg: &ModelConfig, layout: Layout) -> Result<Value> {
    layout.check(cfg)?;
    let mut v = json!({
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "initializer_range": cfg.init_std,
        "attention_bias": cfg.attention_bias,
        "attention_dropout": 0.0,
        "use_cache": true,
        "dtype": "float32",
        "layer_types": vec!["full_attention"; cfg.num_layers],
    });
    let mut rope = json!({"rope_type": "default", "rope_theta": cfg.rope_theta});
    if let Some(r) = &cfg.rope_scaling {
        rope = json!({"rope_type": r.kind, "rope_theta": cfg.rope_theta, "factor": r.factor,
            "original_max_position_embeddings": r.original_max_position_embeddings,
            "beta_fast": r.beta_fast, "beta_slow": r.beta_slow});
        if let Some(a) = r.attention_factor {
            rope["attention_factor"] = json!(a);
        }
    }
    let o = v.as_object_mut().unwrap();
    match layout {
        Layout::Qwen3 if cfg.moe.is_some() => {
            o.insert("architectures".into(), json!(["Qwen3MoeForCausalLM"]));
            o.insert("model_type".into(), json!("qwen3_moe"));
            o.insert("rope_parameters".into(), rope.clone());
            moe_json(cfg, o);
        }
        Layout::Qwen3 => {
            o.insert("architectures".into(), json!(["Qwen3ForCausalLM"]));
            o.insert("model_type".into(), json!("qwen3"));
            o.insert("rope_parameters".into(), rope.clone());
        }
        Layout::Qwen2 => {
            o.insert("architectures".into(), json!(["Qwen2ForCausalLM"]));
            o.insert("model_type".into(), json!("qwen2"));
            // top-level rope_theta too: transformers before rope_parameters read only that
            o.insert("rope_theta".into(), json!(cfg.rope_theta));
            o.insert("rope_parameters".into(), rope.clone());
            o.insert("use_sliding_window".into(), json!(false));
            o.insert("sliding_window".into(), Value::Null);
            o.insert("max_window_layers".into(), json!(cfg.num_layers));
        }
        Layout::Official => {
            let hw = cfg
                .gate
                .as_ref()
                .is_some_and(|g| g.granularity == GateGranularity::Headwise);
            o.insert("architectures".into(), json!(["Qwen3ForCausalLM"]));
            o.insert("model_type".into(), json!("qwen3"));
            o.insert("headwise_attn_output_gate".into(), json!(hw));
            o.insert("elementwise_attn_output_gate".into(), json!(!hw));
            o.insert("use_qk_norm".into(), json!(true));
            o.insert("qkv_bias".into(), json!(false));
            o.insert("rope_theta".into(), json!(cfg.rope_theta));
            if cfg.rope_scaling.is_some() {
                let mut sc = rope.clone();
                sc.as_object_mut().unwrap().remove("rope_theta");
                o.insert("rope_scaling".into(), sc);
            }
        }
        Layout::Qwen3Next => {
            o.insert("architectures".into(), json!(["Qwen3NextForCausalLM"]));
            o.insert("model_type".into(), json!("qwen3_next"));
            rope["partial_rotary_factor"] = json!(cfg.partial_rotary_factor);
            o.insert("rope_parameters".into(), rope.clone());
            moe_json(cfg, o);
        }
        Layout::Llama if cfg.sliding_window.is_some() => {
            o.insert("architectures".into(), json!(["MistralForCausalLM"]));
            o.insert("model_type".into(), json!("mistral"));
            o.insert("rope_theta".into(), json!(cfg.rope_theta));
            o.insert("rope_parameters".into(), rope.clone());
            o.insert("sliding_window".into(), json!(cfg.sliding_window));
            o.insert("mlp_bias".into(), json!(false));
        }
        Layout::Llama => {
            o.insert("architectures".into(), json!(["LlamaForCausalLM"]));
            o.insert("model_type".into(), json!("llama"));
            o.insert("rope_theta".into(), json!(cfg.rope_theta));
            o.insert("rope_parameters".into(), rope.clone());
            o.insert("mlp_bias".into(), json!(false));
        }
        Layout::Phi3 | Layout::Gemma2 | Layout::Gemma3 => unreachable!("check refuses saving these"),
        Layout::GatedLm => {
            o.insert("architectures".into(), json!(["GatedLmForCausalLM"]));
            o.insert("model_type".into(), json!("gated_lm"));
            o.insert("gated_lm".into(), serde_json::to_value(cfg)?);
        }
    }
    Ok(v)
}

/// Row blocks of the merged `q_proj` in `layout`, as (take from q?, start row, rows) runs.
fn q_runs(cfg: &ModelConfig, layout: Layout) -> Vec<(bool, usize, usize)> {
    let d = cfg.head_dim;
    let Some(geo) = cfg.gate_geometry() else {
        return vec![(true, 0, cfg.q_dim())];
    };
    let pw = geo.per_head;
    match layout {
        Layout::Official => {
            let g = cfg.num_heads / cfg.num_kv_heads;
            (0..cfg.num_kv_heads)
                .flat_map(|k| [(true, k * g * d, g * d), (false, k * g * pw, g * pw)])
                .collect()
        }
        Layout::Qwen3Next => (0..cfg.num_heads)
            .flat_map(|h| [(true, h * d, d), (false, h * pw, pw)])
            .collect(),
        _ => vec![(true, 0, cfg.q_dim())],
    }
}

fn norm_shift(cfg: &ModelConfig, layout: Layout) -> f32 {
    match (cfg.norm_style, layout.norm_style(cfg)) {
        (NormStyle::Standard, NormStyle::ZeroCentered) => -1.0,
        (NormStyle::ZeroCentered, NormStyle::Standard) => 1.0,
        _ => 0.0,
    }
}

/// Map internal tensors (weights, or with `is_grad` gradients) to `layout`'s names and rows.
pub fn to_layout(cfg: &ModelConfig, layout: Layout, store: &ParamStore<f32>, is_grad: bool) -> Result<TensorMap> {
    layout.check(cfg)?;
    let (specs, index) = param_specs(cfg);
    let shift = if is_grad { 0.0 } else { norm_shift(cfg, layout) };
    let merge = layout == Layout::Official || layout == Layout::Qwen3Next;
    let mut out = TensorMap::new();
    let gate_ids: Vec<usize> = index.layers.iter().filter_map(|l| l.gate).collect();
    for (i, (spec, t)) in specs.iter().zip(&store.tensors).enumerate() {
        if merge && gate_ids.contains(&i) {
            continue;
        }
        let mut data = t.data.clone();
        if spec.kind == ParamKind::Norm && shift != 0.0 {
            data.iter_mut().for_each(|x| *x += shift);
        }
        out.insert(spec.name.clone(), (t.shape.clone(), data));
    }
    if merge {
        let dm = cfg.hidden_size;
        for li in &index.layers {
            let (q, g) = (&store.tensors[li.q_proj].data, &store.tensors[li.gate.unwrap()].data);
            let mut merged = Vec::with_capacity(q.len() + g.len());
            for (from_q, r0, rows) in q_runs(cfg, layout) {
                let src = if from_q { q } else { g };
                merged.extend_from_slice(&src[r0 * dm..(r0 + rows) * dm]);
            }
            let rows = merged.len() / dm;
            out.insert(specs[li.q_proj].name.clone(), (vec![rows, dm], merged));
        }
    }
    Ok(out)
}

/// Inverse of `to_layout` for weights read from a file (any lookup by HF name).
pub fn from_layout(
    cfg: &ModelConfig,
    layout: Layout,
    get: &dyn Fn(&str) -> Result<F32Tensor>,
) -> Result<ParamStore<f32>> {
    let (specs, index) = param_specs(cfg);
    let shift = -norm_shift(cfg, layout);
    let mut store = ParamStore::<f32>::zeros_like(&specs);
    let merge = layout == Layout::Official || layout == Layout::Qwen3Next;
    let gate_ids: Vec<usize> = index.layers.iter().filter_map(|l| l.gate).collect();
    let expect = |name: &str, t: &F32Tensor, shape: &[usize]| -> Result<()> {
        if t.shape != shape {
            bail!(
                "tensor '{name}' has shape {:?}, the config implies {:?}",
                t.shape,
                shape
            );
        }
        Ok(())
    };
    for (i, spec) in specs.iter().enumerate() {
        if merge && (gate_ids.contains(&i) || index.layers.iter().any(|l| l.q_proj == i)) {
            continue;
        }
        let t = get(&spec.name)?;
        expect(&spec.name, &t, &spec.shape)?;
        let mut data = t.data;
        if spec.kind == ParamKind::Norm && shift != 0.0 {
            data.iter_mut().for_each(|x| *x += shift);
        }
        store.tensors[i] = Tensor { shape: t.shape, data };
    }
    if merge {
        let dm = cfg.hidden_size;
        for li in &index.layers {
            let gi = li.gate.expect("merged layouts are gated");
            let name = &specs[li.q_proj].name;
            let t = get(name)?;
            let rows = cfg.q_dim() + specs[gi].shape[0];
            expect(name, &t, &[rows, dm])?;
            let mut at = 0;
            for (to_q, r0, n) in q_runs(cfg, layout) {
                let dst = if to_q { li.q_proj } else { gi };
                store.tensors[dst].data[r0 * dm..(r0 + n) * dm].copy_from_slice(&t.data[at * dm..(at + n) * dm]);
                at += n;
            }
        }
    }
    Ok(store)
}

/// Load a model directory (config.json + model.safetensors).
pub fn load_model(dir: &Path) -> Result<(Model<f32>, Layout)> {
    let cpath = dir.join("config.json");
    let text = std::fs::read_to_string(&cpath).with_context(|| format!("cannot read {}", cpath.display()))?;
    let (cfg, layout) = parse_config(&text, &cpath.display().to_string())?;
    let wpath = dir.join("model.safetensors");
    let st = StFile::open(&wpath)?;
    let wname = wpath.display().to_string();
    let fused = std::cell::RefCell::new(std::collections::HashMap::new());
    let used = std::cell::RefCell::new(std::collections::HashSet::new());
    let phi3 = |n: &str| arch::phi3_source(&cfg, n).filter(|_| layout == Layout::Phi3);
    let get = |n: &str| match fused_expert_source(n) {
        _ if st.has(n) => {
            used.borrow_mut().insert(n.to_string());
            st.f32(n)
        }
        _ if phi3(n).is_some() => {
            // Phi-3: q/k/v rows of qkv_proj, gate/up rows of gate_up_proj
            let (fused_name, r0, rows, total) = phi3(n).unwrap();
            used.borrow_mut().insert(fused_name.clone());
            let mut cache = fused.borrow_mut();
            if !cache.contains_key(&fused_name) {
                cache.insert(fused_name.clone(), st.f32(&fused_name)?);
            }
            arch::phi3_block(&cfg, &wname, &fused_name, &cache[&fused_name], (r0, rows, total))
        }
        Some((fused_name, e, part)) if st.has(&fused_name) => {
            used.borrow_mut().insert(fused_name.clone());
            let mut cache = fused.borrow_mut();
            if !cache.contains_key(&fused_name) {
                cache.insert(fused_name.clone(), st.f32(&fused_name)?);
            }
            let t = &cache[&fused_name];
            super::expert_block(&fused_name, &t.shape, &t.data, e, (part < 2).then_some(part))
        }
        _ => st.f32(n),
    };
    let store = from_layout(&cfg, layout, &get)
        .with_context(|| format!("{wname}: weights do not match {}", cpath.display()))?;
    // a config with fewer layers (or no gate, no MoE) than the weights would silently run a
    // different model: every tensor in the file must be used
    let used = used.into_inner();
    let surplus: Vec<String> = st
        .names()?
        .into_iter()
        .filter(|n| !used.contains(n) && !ignorable_tensor(n, &cfg))
        .collect();
    if !surplus.is_empty() {
        bail!(
            "{wname}: {} tensor(s) that {} does not describe, e.g. '{}' (does num_hidden_layers or the gate/MoE setting match the weights?)",
            surplus.len(),
            cpath.display(),
            surplus[..surplus.len().min(3)].join("', '")
        );
    }
    if let Some(bad) = store
        .tensors
        .iter()
        .zip(&store.names)
        .find(|(t, _)| t.data.iter().any(|x| !x.is_finite()))
    {
        bail!("{wname}: tensor '{}' contains NaN or Inf", bad.1);
    }
    Ok((Model::from_params(cfg, store)?, layout))
}

/// Tensors a checkpoint may carry that the model does not need: RoPE's precomputed frequencies,
/// and a tied model's copy of the embeddings as lm_head.
fn ignorable_tensor(name: &str, cfg: &ModelConfig) -> bool {
    name.ends_with("rotary_emb.inv_freq") || (cfg.tie_word_embeddings && name == "lm_head.weight")
}

/// transformers ≥ 5 may hold a MoE layer's experts fused: `mlp.experts.gate_up_proj` `[E, 2F, d]`
/// (gate rows, then up rows) and `mlp.experts.down_proj` `[E, d, F]`. For a per-expert name,
/// the fused tensor that holds it, the expert and which part (0 gate, 1 up, 2 down).
fn fused_expert_source(name: &str) -> Option<(String, usize, usize)> {
    let (prefix, rest) = name.split_once("mlp.experts.")?;
    let (e, proj) = rest.split_once('.')?;
    let e: usize = e.parse().ok()?;
    let (fused, part) = match proj {
        "gate_proj.weight" => ("gate_up_proj", 0),
        "up_proj.weight" => ("gate_up_proj", 1),
        "down_proj.weight" => ("down_proj", 2),
        _ => return None,
    };
    Some((format!("{prefix}mlp.experts.{fused}"), e, part))
}

/// Save a model directory in `layout` (default: the stock class that fits, see `Layout::default_for`).
pub fn save_model(dir: &Path, model: &Model<f32>, layout: Option<Layout>) -> Result<Layout> {
    let layout = layout.unwrap_or_else(|| Layout::default_for(&model.cfg));
    let cfg_json = config_json(&model.cfg, layout)?;
    let tensors = to_layout(&model.cfg, layout, &model.params, false)?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    super::st::write_f32(&dir.join("model.safetensors"), &tensors)?;
    super::write_atomic(
        &dir.join("config.json"),
        serde_json::to_string_pretty(&cfg_json)?.as_bytes(),
    )?;
    Ok(layout)
}

/// The config a model takes on when re-stored in `layout` (norm convention of that layout).
pub fn config_for_layout(cfg: &ModelConfig, layout: Layout) -> ModelConfig {
    let mut c = cfg.clone();
    c.norm_style = layout.norm_style(cfg);
    c
}

/// Convert a model to `layout` in memory: same function, the layout's norm convention.
pub fn convert(model: &Model<f32>, layout: Layout) -> Result<Model<f32>> {
    layout.check(&model.cfg)?;
    let tensors = to_layout(&model.cfg, layout, &model.params, false)?;
    let cfg = config_for_layout(&model.cfg, layout);
    let store = from_layout(&cfg, layout, &|n| {
        let (s, d) = tensors.get(n).with_context(|| format!("missing {n}"))?;
        Ok(F32Tensor {
            shape: s.clone(),
            data: d.clone(),
        })
    })?;
    Model::from_params(cfg, store)
}
