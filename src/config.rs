//! Model configuration: the single source of truth. HF config.json and our TOML/JSON map onto it
//! in `io`.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// Where the gate acts (the paper's Fig. 1 positions).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GatePosition {
    /// SDPA output of each query head (the paper's best).
    G1,
    /// Value projection output, per KV head.
    G2,
    /// Key projection output, per KV head.
    G3,
    /// Query projection output, per query head.
    G4,
    /// Output of o_proj (the whole hidden vector).
    G5,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GateGranularity {
    /// One score per element of each head.
    Elementwise,
    /// One score per head, broadcast over head_dim.
    Headwise,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GateCombine {
    /// `Y · act(XWθ)`
    Multiplicative,
    /// `Y + act(XWθ)`
    Additive,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GateActivation {
    Sigmoid,
    Silu,
    /// `0.5 + 0.5·sigmoid(x)`: scores in (0.5, 1), i.e. no sparsity.
    NsSigmoid,
}

/// In config files every field may be left out: it then takes the paper's G1 elementwise value.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GateConfig {
    pub position: GatePosition,
    pub granularity: GateGranularity,
    /// One gate shared by all heads at the position instead of one per head.
    pub head_shared: bool,
    pub combine: GateCombine,
    pub activation: GateActivation,
    /// A learned per-head vector used for every token (no dependence on X).
    pub input_independent: bool,
    /// Std of the normal init of the gate parameters; `None` uses the model's `init_std`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub init_std: Option<f64>,
}

impl Default for GateConfig {
    fn default() -> Self {
        GateConfig::g1(GateGranularity::Elementwise)
    }
}

/// `model.gate` in TOML/JSON: a table of [`GateConfig`] fields, or a spec string (`"none"`,
/// `"headwise"`, `"g2:shared"`, …). The baseline is written as `"none"`, so a resolved config
/// says what it trains even to a reader who overlays it on a gated preset.
mod gate_field {
    use super::GateConfig;
    use serde::de::{self, Deserializer, MapAccess, Visitor};
    use serde::{Deserialize, Serialize, Serializer};

    pub fn serialize<S: Serializer>(g: &Option<GateConfig>, s: S) -> Result<S::Ok, S::Error> {
        match g {
            None => s.serialize_str("none"),
            Some(g) => g.serialize(s),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<GateConfig>, D::Error> {
        struct GateVisitor;
        impl<'de> Visitor<'de> for GateVisitor {
            type Value = Option<GateConfig>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(
                    "a gate spec string (\"none\", \"elementwise\", \"g2:headwise\", …) or a table of gate fields",
                )
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                GateConfig::parse_spec(v).map_err(|e| E::custom(format!("{e:#}")))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
                d.deserialize_any(GateVisitor)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                GateConfig::deserialize(de::value::MapAccessDeserializer::new(map)).map(Some)
            }
        }
        d.deserialize_any(GateVisitor)
    }
}

impl GateConfig {
    /// The paper's recommended gate: G1, elementwise, head-specific, multiplicative sigmoid.
    pub fn g1(granularity: GateGranularity) -> Self {
        GateConfig {
            position: GatePosition::G1,
            granularity,
            head_shared: false,
            combine: GateCombine::Multiplicative,
            activation: GateActivation::Sigmoid,
            input_independent: false,
            init_std: None,
        }
    }

    /// Parse a gate spec: `none`, `elementwise`, `headwise`, or colon-separated options in any
    /// order, e.g. `g2:headwise:shared:additive:silu`. Options: position `g1`..`g5`; `elementwise` |
    /// `headwise`; `specific` | `shared`; `mul` | `add` (also `multiplicative` / `additive`);
    /// `sigmoid` | `silu` | `ns-sigmoid`; `dynamic` | `static` (`input-independent`). Unspecified
    /// options default to the paper's G1 elementwise multiplicative sigmoid gate.
    pub fn parse_spec(spec: &str) -> Result<Option<GateConfig>> {
        let s = spec.trim().to_ascii_lowercase();
        if s == "none" || s == "baseline" {
            return Ok(None);
        }
        let mut g = GateConfig::g1(GateGranularity::Elementwise);
        for tok in s.split(':').filter(|t| !t.is_empty()) {
            match tok {
                "g1" => g.position = GatePosition::G1,
                "g2" => g.position = GatePosition::G2,
                "g3" => g.position = GatePosition::G3,
                "g4" => g.position = GatePosition::G4,
                "g5" => g.position = GatePosition::G5,
                "elementwise" => g.granularity = GateGranularity::Elementwise,
                "headwise" => g.granularity = GateGranularity::Headwise,
                "specific" => g.head_shared = false,
                "shared" => g.head_shared = true,
                "mul" | "multiplicative" => g.combine = GateCombine::Multiplicative,
                "add" | "additive" => g.combine = GateCombine::Additive,
                "sigmoid" => g.activation = GateActivation::Sigmoid,
                "silu" => g.activation = GateActivation::Silu,
                "ns-sigmoid" | "nssigmoid" => g.activation = GateActivation::NsSigmoid,
                "dynamic" => g.input_independent = false,
                "static" | "input-independent" => g.input_independent = true,
                other => bail!(
                    "unknown gate option '{other}' in spec '{spec}' (see `gated-lm train --help` for the grammar)"
                ),
            }
        }
        Ok(Some(g))
    }

    /// Canonical spec string (round-trips through `parse_spec`).
    pub fn spec(&self) -> String {
        let pos = format!("{:?}", self.position).to_lowercase();
        let gran = match self.granularity {
            GateGranularity::Elementwise => "elementwise",
            GateGranularity::Headwise => "headwise",
        };
        let share = if self.head_shared { "shared" } else { "specific" };
        let comb = match self.combine {
            GateCombine::Multiplicative => "mul",
            GateCombine::Additive => "add",
        };
        let act = match self.activation {
            GateActivation::Sigmoid => "sigmoid",
            GateActivation::Silu => "silu",
            GateActivation::NsSigmoid => "ns-sigmoid",
        };
        let dep = if self.input_independent { "static" } else { "dynamic" };
        format!("{pos}:{gran}:{share}:{comb}:{act}:{dep}")
    }

    /// True for the gates that stock checkpoints can hold (G1, head-specific, multiplicative
    /// sigmoid, input-dependent).
    pub fn is_standard_g1(&self) -> bool {
        self.position == GatePosition::G1
            && !self.head_shared
            && self.combine == GateCombine::Multiplicative
            && self.activation == GateActivation::Sigmoid
            && !self.input_independent
    }
}

/// The activation of the dense MLP's gate branch: `down(act(gate(x)) ⊙ up(x))`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MlpActivation {
    /// SiLU: SwiGLU (Qwen, llama, Phi-3).
    #[default]
    Silu,
    /// GELU, tanh approximation (transformers' `gelu_pytorch_tanh`: Gemma 2 / 3).
    GeluTanh,
}

fn is_silu(a: &MlpActivation) -> bool {
    *a == MlpActivation::Silu
}

/// RMSNorm weight convention.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NormStyle {
    /// `x̂ · w`, w initialised to 1 (Qwen3).
    Standard,
    /// `x̂ · (1 + w)`, w initialised to 0 (Qwen3-Next).
    ZeroCentered,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub intermediate_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// Fraction of each head's dims that RoPE rotates (Qwen3-Next uses 0.25).
    pub partial_rotary_factor: f64,
    pub norm_style: NormStyle,
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: usize,
    pub init_std: f64,
    /// Context extension: `None` = plain RoPE at `rope_theta` (raise the theta for a base change).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeScaling>,
    /// RMSNorm of q and k over head_dim before RoPE (Qwen3 has it; llama does not).
    #[serde(default = "default_true")]
    pub qk_norm: bool,
    /// Biases on q_proj, k_proj and v_proj (Qwen2 / Qwen2.5; o_proj stays bias-free), added right
    /// after the projections, before any gate, QK-norm and RoPE.
    #[serde(default, skip_serializing_if = "is_false")]
    pub attention_bias: bool,
    /// `None`: the ungated baseline (written `gate = "none"`).
    #[serde(default, with = "gate_field")]
    pub gate: Option<GateConfig>,
    /// Mixture-of-Experts FFN (`None`: a dense SwiGLU MLP in every layer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moe: Option<MoeConfig>,
    /// Sliding-window attention (Mistral, Phi-3, Gemma): query i sees keys j with i − j < W,
    /// i.e. i−W+1..=i (transformers' and llama.cpp's convention). `None`: full causal attention.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
    /// Layers exempt from the window (Gemma's global layers); empty: every layer is windowed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub global_layers: Vec<usize>,
    /// RoPE θ of the windowed layers (Gemma 3's `rope_local_base_freq`, no scaling there);
    /// `None`: every layer uses `rope_theta` (and `rope_scaling`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_local_theta: Option<f64>,
    /// Attention scores `c·tanh(s/c)` after scaling, before the mask (Gemma 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attn_logit_softcap: Option<f64>,
    /// Final logits `c·tanh(z/c)` (Gemma 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_logit_softcap: Option<f64>,
    /// Score scale `query_pre_attn_scalar^-½` instead of `head_dim^-½` (Gemma).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_pre_attn_scalar: Option<f64>,
    /// Embeddings multiplied by √hidden_size (rounded to the model's float type, as transformers'
    /// Gemma does).
    #[serde(default, skip_serializing_if = "is_false")]
    pub embed_scale: bool,
    /// Gemma's four norms per block: the attention output and the MLP output are normed before
    /// their residual adds (`post_attention_layernorm`, `post_feedforward_layernorm`); the MLP
    /// input norm is then named `pre_feedforward_layernorm`.
    #[serde(default, skip_serializing_if = "is_false")]
    pub sandwich_norms: bool,
    /// Activation of the dense MLP.
    #[serde(default, skip_serializing_if = "is_silu")]
    pub mlp_activation: MlpActivation,
}

/// Mixture-of-Experts FFN, transformers' Qwen3-MoE / Qwen3-Next field names and semantics: a
/// linear router → softmax over experts → top-k (optionally renormalised), SwiGLU experts, an
/// optional always-on shared expert scaled by `sigmoid(x·w)`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MoeConfig {
    pub num_experts: usize,
    pub num_experts_per_tok: usize,
    pub moe_intermediate_size: usize,
    /// Renormalise the top-k routing weights to sum to 1.
    #[serde(default = "default_true")]
    pub norm_topk_prob: bool,
    /// Width of the shared expert; 0 = none.
    #[serde(default)]
    pub shared_expert_intermediate_size: usize,
    /// Coefficient of the load-balancing loss `E·Σ_e f_e·P_e` (1 when perfectly balanced).
    #[serde(default = "default_aux_coef")]
    pub router_aux_loss_coef: f64,
    /// Coefficient of the router z-loss `mean_t logsumexp(router logits)²`.
    #[serde(default)]
    pub router_z_loss_coef: f64,
    /// Expert capacity = ceil(factor · tokens · k / E); assignments beyond it are dropped, in
    /// token order. `None`: dropless.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity_factor: Option<f64>,
    /// Layers that keep a dense MLP (transformers' `mlp_only_layers`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mlp_only_layers: Vec<usize>,
    /// Every `decoder_sparse_step`-th layer is MoE (transformers semantics: layer l is MoE when
    /// (l + 1) % step == 0).
    #[serde(default = "default_one")]
    pub decoder_sparse_step: usize,
}

fn default_aux_coef() -> f64 {
    0.001
}
fn default_one() -> usize {
    1
}

impl MoeConfig {
    /// E experts, top-k, expert width `ff`; dropless, renormalised, no shared expert.
    pub fn new(experts: usize, top_k: usize, ff: usize) -> Self {
        MoeConfig {
            num_experts: experts,
            num_experts_per_tok: top_k,
            moe_intermediate_size: ff,
            norm_topk_prob: true,
            shared_expert_intermediate_size: 0,
            router_aux_loss_coef: default_aux_coef(),
            router_z_loss_coef: 0.0,
            capacity_factor: None,
            mlp_only_layers: vec![],
            decoder_sparse_step: 1,
        }
    }

    /// Parse `E:k:ff` with optional `:shared=F`, `:cap=C`, `:aux=A`, `:z=Z`, `:no-norm`
    /// (`none` for a dense MLP).
    pub fn parse_spec(spec: &str) -> Result<Option<MoeConfig>> {
        let s = spec.trim().to_ascii_lowercase();
        if s == "none" || s == "dense" {
            return Ok(None);
        }
        let parts: Vec<&str> = s.split(':').collect();
        let num = |t: &str, what: &str| -> Result<usize> {
            t.parse::<usize>()
                .ok()
                .filter(|&x| x > 0)
                .with_context(|| format!("moe spec '{spec}': {what} must be a positive integer, got '{t}'"))
        };
        if parts.len() < 3 {
            bail!("moe spec '{spec}': expected EXPERTS:TOP_K:EXPERT_FFN[:shared=F][:cap=C][:aux=A][:z=Z][:no-norm]");
        }
        let mut m = MoeConfig::new(
            num(parts[0], "experts")?,
            num(parts[1], "top_k")?,
            num(parts[2], "expert ffn")?,
        );
        for opt in &parts[3..] {
            let f = |v: &str| -> Result<f64> {
                v.parse::<f64>()
                    .with_context(|| format!("moe spec '{spec}': '{opt}' needs a number"))
            };
            match opt.split_once('=') {
                Some(("shared", v)) => m.shared_expert_intermediate_size = num(v, "shared")?,
                Some(("cap", v)) => m.capacity_factor = Some(f(v)?),
                Some(("aux", v)) => m.router_aux_loss_coef = f(v)?,
                Some(("z", v)) => m.router_z_loss_coef = f(v)?,
                None if *opt == "no-norm" => m.norm_topk_prob = false,
                _ => bail!("moe spec '{spec}': unknown option '{opt}'"),
            }
        }
        Ok(Some(m))
    }

    pub fn validate(&self) -> Result<()> {
        let (e, k) = (self.num_experts, self.num_experts_per_tok);
        if e == 0 || k == 0 || k > e {
            bail!("moe config: need 1 ≤ num_experts_per_tok ({k}) ≤ num_experts ({e})");
        }
        if e > 1 << 16 {
            bail!("moe config: implausible num_experts {e}");
        }
        if self.moe_intermediate_size == 0 {
            bail!("moe config: moe_intermediate_size must be > 0");
        }
        if self.decoder_sparse_step == 0 {
            bail!("moe config: decoder_sparse_step must be > 0");
        }
        for (c, what) in [
            (self.router_aux_loss_coef, "router_aux_loss_coef"),
            (self.router_z_loss_coef, "router_z_loss_coef"),
        ] {
            if !(c.is_finite() && c >= 0.0) {
                bail!("moe config: {what} must be a finite number ≥ 0, got {c}");
            }
        }
        if let Some(cf) = self.capacity_factor {
            if !(cf.is_finite() && cf > 0.0) {
                bail!("moe config: capacity_factor must be > 0, got {cf}");
            }
        }
        Ok(())
    }
}

/// RoPE scaling for context extension (transformers' `rope_parameters` semantics).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    /// "yarn" or "linear" (position interpolation)
    pub kind: String,
    pub factor: f64,
    /// The context length the model was trained at.
    pub original_max_position_embeddings: usize,
    #[serde(default = "default_beta_fast")]
    pub beta_fast: f64,
    #[serde(default = "default_beta_slow")]
    pub beta_slow: f64,
    /// YaRN attention temperature; `None` = 0.1·ln(factor) + 1.
    #[serde(default)]
    pub attention_factor: Option<f64>,
}

fn default_beta_fast() -> f64 {
    32.0
}
fn default_beta_slow() -> f64 {
    1.0
}

impl RopeScaling {
    pub fn yarn(factor: f64, original: usize) -> Self {
        RopeScaling {
            kind: "yarn".into(),
            factor,
            original_max_position_embeddings: original,
            beta_fast: 32.0,
            beta_slow: 1.0,
            attention_factor: None,
        }
    }
    pub fn validate(&self) -> Result<()> {
        if !["yarn", "linear"].contains(&self.kind.as_str()) {
            bail!("rope_scaling: kind must be yarn or linear, got '{}'", self.kind);
        }
        if !(self.factor.is_finite() && self.factor >= 1.0) || self.original_max_position_embeddings == 0 {
            bail!("rope_scaling: factor must be ≥ 1 and original_max_position_embeddings > 0");
        }
        Ok(())
    }
}

fn default_true() -> bool {
    true
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// Shape of the gate at its position: `groups` heads of `width` elements are gated by
/// `heads × per_head` scores per token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GateGeometry {
    /// Number of heads at the position (H for G1/G4, K for G2/G3, 1 for G5).
    pub groups: usize,
    /// Elements per head at the position (head_dim, or hidden_size for G5).
    pub width: usize,
    /// Distinct gate heads (1 when head-shared).
    pub heads: usize,
    /// Scores per gate head (1 when headwise).
    pub per_head: usize,
}

impl GateGeometry {
    /// Scores per token = rows of the gate projection.
    pub fn scores(&self) -> usize {
        self.heads * self.per_head
    }
}

impl ModelConfig {
    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
    /// Rotated dims per head (even).
    pub fn rotary_dim(&self) -> usize {
        let r = (self.head_dim as f64 * self.partial_rotary_factor) as usize;
        r - r % 2
    }

    /// The attention window of layer `l` (`None`: full causal attention).
    pub fn window_at(&self, l: usize) -> Option<usize> {
        self.sliding_window.filter(|_| !self.global_layers.contains(&l))
    }

    /// Whether layer `l` uses the local RoPE table (`rope_local_theta`, windowed layers only).
    pub fn local_rope_at(&self, l: usize) -> bool {
        self.rope_local_theta.is_some() && self.window_at(l).is_some()
    }

    /// Why the device (CUDA) model cannot run this config, if it uses a feature only the CPU
    /// model implements: sliding-window attention, soft-capping, Gemma's extra norms, GELU MLP,
    /// embedding scale, a query_pre_attn_scalar score scale, a local RoPE θ.
    pub fn cpu_only_feature(&self) -> Option<String> {
        let mut f = Vec::new();
        if let Some(w) = self.sliding_window {
            f.push(format!("sliding-window attention (window {w})"));
        }
        if self.rope_local_theta.is_some() {
            f.push("a separate RoPE theta for local layers".into());
        }
        if self.attn_logit_softcap.is_some() {
            f.push("attention logit soft-capping".into());
        }
        if self.final_logit_softcap.is_some() {
            f.push("final logit soft-capping".into());
        }
        if self.query_pre_attn_scalar.is_some() {
            f.push("a query_pre_attn_scalar score scale".into());
        }
        if self.embed_scale {
            f.push("embedding scaling by sqrt(hidden_size)".into());
        }
        if self.sandwich_norms {
            f.push("post-attention / post-feedforward norms".into());
        }
        if self.mlp_activation != MlpActivation::Silu {
            f.push("a GELU-tanh MLP".into());
        }
        (!f.is_empty()).then(|| format!("the device model does not implement {} (CPU only)", f.join(", ")))
    }

    /// The dense model with the same attention and the same active FFN width (k · expert width
    /// + shared width), for MoE-vs-dense comparisons at equal active parameters.
    pub fn dense_counterpart(&self) -> ModelConfig {
        let mut c = self.clone();
        if let Some(m) = c.moe.take() {
            c.intermediate_size = m.num_experts_per_tok * m.moe_intermediate_size + m.shared_expert_intermediate_size;
        }
        c
    }

    /// The MoE config if layer `l` has a MoE FFN (transformers' placement rule).
    pub fn moe_at(&self, l: usize) -> Option<&MoeConfig> {
        self.moe
            .as_ref()
            .filter(|m| !m.mlp_only_layers.contains(&l) && (l + 1).is_multiple_of(m.decoder_sparse_step))
    }

    pub fn gate_geometry(&self) -> Option<GateGeometry> {
        let g = self.gate.as_ref()?;
        let (groups, width) = match g.position {
            GatePosition::G1 | GatePosition::G4 => (self.num_heads, self.head_dim),
            GatePosition::G2 | GatePosition::G3 => (self.num_kv_heads, self.head_dim),
            GatePosition::G5 => (1, self.hidden_size),
        };
        let heads = if g.head_shared { 1 } else { groups };
        let per_head = match g.granularity {
            GateGranularity::Elementwise => width,
            GateGranularity::Headwise => 1,
        };
        Some(GateGeometry {
            groups,
            width,
            heads,
            per_head,
        })
    }

    pub fn validate(&self) -> Result<()> {
        let nz = |v: usize, what: &str| -> Result<()> {
            if v == 0 {
                bail!("model config: {what} must be > 0");
            }
            Ok(())
        };
        nz(self.vocab_size, "vocab_size")?;
        nz(self.hidden_size, "hidden_size")?;
        nz(self.num_layers, "num_hidden_layers")?;
        nz(self.num_heads, "num_attention_heads")?;
        nz(self.num_kv_heads, "num_key_value_heads")?;
        nz(self.head_dim, "head_dim")?;
        nz(self.intermediate_size, "intermediate_size")?;
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            bail!(
                "model config: num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.num_heads,
                self.num_kv_heads
            );
        }
        if !(self.partial_rotary_factor > 0.0 && self.partial_rotary_factor <= 1.0) {
            bail!(
                "model config: partial_rotary_factor must be in (0, 1], got {}",
                self.partial_rotary_factor
            );
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            bail!(
                "model config: rope_theta must be a finite number > 1, got {}",
                self.rope_theta
            );
        }
        if let Some(r) = &self.rope_scaling {
            r.validate()?;
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            bail!("model config: rms_norm_eps must be > 0, got {}", self.rms_norm_eps);
        }
        if let Some(m) = &self.moe {
            m.validate()?;
            if self.mlp_activation != MlpActivation::Silu {
                bail!("model config: MoE experts are SwiGLU; mlp_activation must be silu with moe");
            }
        }
        if self.sliding_window == Some(0) {
            bail!("model config: sliding_window must be > 0");
        }
        if let Some(&l) = self.global_layers.iter().find(|&&l| l >= self.num_layers) {
            bail!(
                "model config: global_layers lists layer {l}, the model has {}",
                self.num_layers
            );
        }
        for (v, what) in [
            (self.rope_local_theta, "rope_local_theta"),
            (self.query_pre_attn_scalar, "query_pre_attn_scalar"),
        ] {
            if v.is_some_and(|x| !(x.is_finite() && x > 0.0)) {
                bail!("model config: {what} must be a finite number > 0, got {}", v.unwrap());
            }
        }
        for (v, what) in [
            (self.attn_logit_softcap, "attn_logit_softcapping"),
            (self.final_logit_softcap, "final_logit_softcapping"),
        ] {
            if v.is_some_and(|x| !(x.is_finite() && x > 0.0)) {
                bail!("model config: {what} must be a finite number > 0, got {}", v.unwrap());
            }
        }
        // Guard against absurd sizes from untrusted files before anything is allocated.
        let ffn = match &self.moe {
            Some(m) => {
                m.num_experts as u128 * (m.moe_intermediate_size as u128 + 1)
                    + m.shared_expert_intermediate_size as u128
            }
            None => self.intermediate_size as u128,
        };
        let params = self.vocab_size as u128 * self.hidden_size as u128 * 2
            + self.num_layers as u128
                * (self.hidden_size as u128 * (4 * self.q_dim() + 2 * self.kv_dim()) as u128
                    + 3 * self.hidden_size as u128 * ffn);
        if params > (1u128 << 36) {
            bail!("model config: implausible size (~{params} parameters)");
        }
        Ok(())
    }

    /// A named preset. `tiny` and `small` match `shared/bench/torch_ref.py`.
    pub fn preset(name: &str, gate: Option<GateConfig>) -> Result<Self> {
        // (vocab, d_model, layers, heads, kv_heads, head_dim, ffn)
        let (v, d, l, h, k, hd, f) = match name {
            "tiny" => (8192, 256, 4, 4, 4, 64, 704),
            "small" => (32768, 768, 12, 12, 4, 64, 2048),
            "1p7b" => (151936, 2048, 28, 16, 8, 128, 6144),
            "micro" => (512, 64, 2, 4, 2, 16, 128),
            // MoE presets with the paper's 15B-A2.5B ratios scaled down: top-8 of many
            // fine-grained experts → here 1/16 of the experts active, GQA 8:1
            "moe-micro" => (512, 64, 2, 4, 2, 16, 128),
            "moe-tiny" => (8192, 256, 4, 8, 1, 32, 704),
            other => bail!("unknown preset '{other}' (known: micro, tiny, small, 1p7b, moe-micro, moe-tiny)"),
        };
        let mut c = ModelConfig::dense(v, d, l, h, k, hd, f, gate);
        c.moe = match name {
            "moe-micro" => Some(MoeConfig::new(8, 2, 32)),
            "moe-tiny" => Some(MoeConfig::new(64, 4, 176)),
            _ => None,
        };
        Ok(c)
    }

    /// A dense Qwen3-style decoder with the engine's defaults (RMSNorm eps 1e-6, RoPE θ 1e6, full
    /// rotary, standard norms, untied head, QK-norm, init std 0.02).
    #[allow(clippy::too_many_arguments)]
    pub fn dense(
        vocab: usize,
        d: usize,
        layers: usize,
        heads: usize,
        kv: usize,
        head_dim: usize,
        ffn: usize,
        gate: Option<GateConfig>,
    ) -> Self {
        ModelConfig {
            vocab_size: vocab,
            hidden_size: d,
            num_layers: layers,
            num_heads: heads,
            num_kv_heads: kv,
            head_dim,
            intermediate_size: ffn,
            rms_norm_eps: 1e-6,
            rope_theta: 1e6,
            partial_rotary_factor: 1.0,
            norm_style: NormStyle::Standard,
            tie_word_embeddings: false,
            max_position_embeddings: 4096,
            init_std: 0.02,
            rope_scaling: None,
            qk_norm: true,
            attention_bias: false,
            gate,
            moe: None,
            sliding_window: None,
            global_layers: vec![],
            rope_local_theta: None,
            attn_logit_softcap: None,
            final_logit_softcap: None,
            query_pre_attn_scalar: None,
            embed_scale: false,
            sandwich_norms: false,
            mlp_activation: MlpActivation::Silu,
        }
    }
}

/// (batch, seq) a model preset is benchmarked and trained at, as in torch_ref.py.
pub fn preset_shape(preset: &str) -> (usize, usize) {
    match preset {
        "small" => (32, 1024),
        "1p7b" => (8, 2048),
        "micro" | "moe-micro" => (4, 64),
        _ => (8, 256),
    }
}

/// Parse a preset name + gate spec into a config (used by the CLI).
pub fn preset_with_gate(preset: &str, gate: &str) -> Result<ModelConfig> {
    let g = GateConfig::parse_spec(gate).with_context(|| format!("--gate {gate}"))?;
    ModelConfig::preset(preset, g)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gate_specs_round_trip_and_reject_garbage() {
        assert_eq!(GateConfig::parse_spec("none").unwrap(), None);
        let e = GateConfig::parse_spec("elementwise").unwrap().unwrap();
        assert!(e.is_standard_g1() && e.granularity == GateGranularity::Elementwise);
        let g = GateConfig::parse_spec("g3:headwise:shared:add:ns-sigmoid:static")
            .unwrap()
            .unwrap();
        assert_eq!(g.position, GatePosition::G3);
        assert!(g.head_shared && g.input_independent);
        assert_eq!(g.combine, GateCombine::Additive);
        assert_eq!(g.activation, GateActivation::NsSigmoid);
        assert_eq!(GateConfig::parse_spec(&g.spec()).unwrap().unwrap(), g);
        assert!(GateConfig::parse_spec("g7").is_err());
    }

    #[test]
    fn geometry_per_position() {
        let mut c = ModelConfig::preset("micro", GateConfig::parse_spec("g2:headwise").unwrap()).unwrap();
        let g = c.gate_geometry().unwrap();
        assert_eq!((g.groups, g.width, g.heads, g.per_head), (2, 16, 2, 1));
        c.gate = GateConfig::parse_spec("g5").unwrap();
        assert_eq!(c.gate_geometry().unwrap().scores(), 64);
        c.gate = GateConfig::parse_spec("g1:shared").unwrap();
        assert_eq!(c.gate_geometry().unwrap().scores(), 16);
        c.validate().unwrap();
        c.num_kv_heads = 3;
        assert!(c.validate().is_err());
    }
}
