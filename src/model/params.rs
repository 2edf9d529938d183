//! Flat, named parameter store. Names follow the HF Qwen3 names; the gate is its own tensor
//! (`self_attn.gate_proj.weight`, or `self_attn.gate_logits` for the input-independent gate) and
//! `io` folds it into `q_proj` for the layouts that store it there.

use crate::config::{ModelConfig, NormStyle};
use crate::real::Real;
use crate::rng::Rng;

#[derive(Clone, Debug, PartialEq)]
pub struct Tensor<T> {
    pub shape: Vec<usize>,
    pub data: Vec<T>,
}

impl<T: Real> Tensor<T> {
    pub fn zeros(shape: &[usize]) -> Self {
        Tensor {
            shape: shape.to_vec(),
            data: vec![T::ZERO; shape.iter().product()],
        }
    }
    pub fn numel(&self) -> usize {
        self.data.len()
    }
}

/// Indices of one decoder layer's tensors in the store.
#[derive(Clone, Debug)]
pub struct LayerIndex {
    pub input_norm: usize,
    pub q_proj: usize,
    pub k_proj: usize,
    pub v_proj: usize,
    pub o_proj: usize,
    /// Biases of q_proj, k_proj, v_proj (`attention_bias`, Qwen2).
    pub qkv_bias: Option<[usize; 3]>,
    /// `None` without QK-norm (llama).
    pub q_norm: Option<usize>,
    pub k_norm: Option<usize>,
    pub gate: Option<usize>,
    /// The MLP's input norm (`post_attention_layernorm`; Gemma: `pre_feedforward_layernorm`).
    pub post_norm: usize,
    /// Gemma's norm of the attention output before its residual add (`post_attention_layernorm`).
    pub attn_out_norm: Option<usize>,
    /// Gemma's norm of the MLP output before its residual add (`post_feedforward_layernorm`).
    pub ffn_out_norm: Option<usize>,
    pub ffn: FfnIndex,
}

/// The three matrices of a SwiGLU MLP.
#[derive(Clone, Copy, Debug)]
pub struct SwigluIndex {
    pub gate: usize,
    pub up: usize,
    pub down: usize,
}

#[derive(Clone, Debug)]
pub enum FfnIndex {
    Dense(SwigluIndex),
    Moe(MoeIndex),
}

#[derive(Clone, Debug)]
pub struct MoeIndex {
    /// `mlp.gate.weight` `[E, d]`
    pub router: usize,
    pub experts: Vec<SwigluIndex>,
    /// The shared expert and its `[1, d]` sigmoid gate.
    pub shared: Option<(SwigluIndex, usize)>,
}

#[derive(Clone, Debug)]
pub struct ParamIndex {
    pub embed: usize,
    pub layers: Vec<LayerIndex>,
    pub norm: usize,
    /// `None` when the LM head is tied to the embedding.
    pub lm_head: Option<usize>,
}

/// How a tensor is initialised.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    Normal(f64),
    Const(f64),
}

/// Whether a parameter is a norm gain, an embedding, or a matrix (used by weight-decay masks).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamKind {
    Norm,
    Embedding,
    Matrix,
    Gate,
    /// A projection's bias (q/k/v with `attention_bias`).
    Bias,
}

#[derive(Clone, Debug)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
    pub kind: ParamKind,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ParamStore<T> {
    pub names: Vec<String>,
    pub tensors: Vec<Tensor<T>>,
}

impl<T: Real> ParamStore<T> {
    pub fn zeros_like(specs: &[ParamSpec]) -> Self {
        ParamStore {
            names: specs.iter().map(|s| s.name.clone()).collect(),
            tensors: specs.iter().map(|s| Tensor::zeros(&s.shape)).collect(),
        }
    }
    pub fn get(&self, name: &str) -> Option<&Tensor<T>> {
        self.names.iter().position(|n| n == name).map(|i| &self.tensors[i])
    }
    pub fn numel(&self) -> usize {
        self.tensors.iter().map(|t| t.numel()).sum()
    }
    pub fn fill_zero(&mut self) {
        for t in &mut self.tensors {
            t.data.fill(T::ZERO);
        }
    }
    pub fn cast<U: Real>(&self) -> ParamStore<U> {
        ParamStore {
            names: self.names.clone(),
            tensors: self
                .tensors
                .iter()
                .map(|t| Tensor {
                    shape: t.shape.clone(),
                    data: t.data.iter().map(|x| U::from_f64(x.to_f64())).collect(),
                })
                .collect(),
        }
    }
}

/// The parameter list of a config, in a fixed order, and the index into it.
pub fn param_specs(cfg: &ModelConfig) -> (Vec<ParamSpec>, ParamIndex) {
    let mut specs = Vec::new();
    let mut push = |name: String, shape: Vec<usize>, init: Init, kind: ParamKind| {
        specs.push(ParamSpec {
            name,
            shape,
            init,
            kind,
        });
        specs.len() - 1
    };
    let std = cfg.init_std;
    let norm_init = match cfg.norm_style {
        NormStyle::Standard => Init::Const(1.0),
        NormStyle::ZeroCentered => Init::Const(0.0),
    };
    let (d, f) = (cfg.hidden_size, cfg.intermediate_size);
    let embed = push(
        "model.embed_tokens.weight".into(),
        vec![cfg.vocab_size, d],
        Init::Normal(std),
        ParamKind::Embedding,
    );
    let mut layers = Vec::new();
    for i in 0..cfg.num_layers {
        let p = format!("model.layers.{i}.");
        let input_norm = push(
            format!("{p}input_layernorm.weight"),
            vec![d],
            norm_init,
            ParamKind::Norm,
        );
        let q_proj = push(
            format!("{p}self_attn.q_proj.weight"),
            vec![cfg.q_dim(), d],
            Init::Normal(std),
            ParamKind::Matrix,
        );
        let k_proj = push(
            format!("{p}self_attn.k_proj.weight"),
            vec![cfg.kv_dim(), d],
            Init::Normal(std),
            ParamKind::Matrix,
        );
        let v_proj = push(
            format!("{p}self_attn.v_proj.weight"),
            vec![cfg.kv_dim(), d],
            Init::Normal(std),
            ParamKind::Matrix,
        );
        let o_proj = push(
            format!("{p}self_attn.o_proj.weight"),
            vec![d, cfg.q_dim()],
            Init::Normal(std),
            ParamKind::Matrix,
        );
        // zero-initialised, as transformers' Qwen2 does
        let qkv_bias = cfg.attention_bias.then(|| {
            [("q", cfg.q_dim()), ("k", cfg.kv_dim()), ("v", cfg.kv_dim())].map(|(x, rows)| {
                push(
                    format!("{p}self_attn.{x}_proj.bias"),
                    vec![rows],
                    Init::Const(0.0),
                    ParamKind::Bias,
                )
            })
        });
        let (q_norm, k_norm) = if cfg.qk_norm {
            let hd = vec![cfg.head_dim];
            (
                Some(push(
                    format!("{p}self_attn.q_norm.weight"),
                    hd.clone(),
                    norm_init,
                    ParamKind::Norm,
                )),
                Some(push(
                    format!("{p}self_attn.k_norm.weight"),
                    hd,
                    norm_init,
                    ParamKind::Norm,
                )),
            )
        } else {
            (None, None)
        };
        let gate = match (&cfg.gate, cfg.gate_geometry()) {
            (Some(g), Some(geo)) => {
                let gstd = g.init_std.unwrap_or(std);
                Some(if g.input_independent {
                    push(
                        format!("{p}self_attn.gate_logits"),
                        vec![geo.scores()],
                        Init::Normal(gstd),
                        ParamKind::Gate,
                    )
                } else {
                    push(
                        format!("{p}self_attn.gate_proj.weight"),
                        vec![geo.scores(), d],
                        Init::Normal(gstd),
                        ParamKind::Gate,
                    )
                })
            }
            _ => None,
        };
        // Gemma names its four block norms after where they sit; the MLP's input norm is then
        // `pre_feedforward_layernorm` and `post_attention_layernorm` norms the attention output
        let attn_out_norm = cfg.sandwich_norms.then(|| {
            push(
                format!("{p}post_attention_layernorm.weight"),
                vec![d],
                norm_init,
                ParamKind::Norm,
            )
        });
        let post_norm = push(
            format!(
                "{p}{}.weight",
                if cfg.sandwich_norms {
                    "pre_feedforward_layernorm"
                } else {
                    "post_attention_layernorm"
                }
            ),
            vec![d],
            norm_init,
            ParamKind::Norm,
        );
        let ffn = match cfg.moe_at(i) {
            None => FfnIndex::Dense(swiglu_specs(&mut push, &format!("{p}mlp."), f, d, std)),
            Some(m) => {
                let router = push(
                    format!("{p}mlp.gate.weight"),
                    vec![m.num_experts, d],
                    Init::Normal(std),
                    ParamKind::Matrix,
                );
                let experts = (0..m.num_experts)
                    .map(|e| {
                        swiglu_specs(
                            &mut push,
                            &format!("{p}mlp.experts.{e}."),
                            m.moe_intermediate_size,
                            d,
                            std,
                        )
                    })
                    .collect();
                let shared = (m.shared_expert_intermediate_size > 0).then(|| {
                    let sw = swiglu_specs(
                        &mut push,
                        &format!("{p}mlp.shared_expert."),
                        m.shared_expert_intermediate_size,
                        d,
                        std,
                    );
                    let g = push(
                        format!("{p}mlp.shared_expert_gate.weight"),
                        vec![1, d],
                        Init::Normal(std),
                        ParamKind::Matrix,
                    );
                    (sw, g)
                });
                FfnIndex::Moe(MoeIndex {
                    router,
                    experts,
                    shared,
                })
            }
        };
        let ffn_out_norm = cfg.sandwich_norms.then(|| {
            push(
                format!("{p}post_feedforward_layernorm.weight"),
                vec![d],
                norm_init,
                ParamKind::Norm,
            )
        });
        layers.push(LayerIndex {
            input_norm,
            q_proj,
            k_proj,
            v_proj,
            o_proj,
            qkv_bias,
            q_norm,
            k_norm,
            gate,
            post_norm,
            attn_out_norm,
            ffn_out_norm,
            ffn,
        });
    }
    let norm = push("model.norm.weight".into(), vec![d], norm_init, ParamKind::Norm);
    let lm_head = if cfg.tie_word_embeddings {
        None
    } else {
        Some(push(
            "lm_head.weight".into(),
            vec![cfg.vocab_size, d],
            Init::Normal(std),
            ParamKind::Matrix,
        ))
    };
    (
        specs,
        ParamIndex {
            embed,
            layers,
            norm,
            lm_head,
        },
    )
}

/// gate/up/down of a SwiGLU MLP of width `f` named `{prefix}gate_proj.weight` etc.
fn swiglu_specs(
    push: &mut impl FnMut(String, Vec<usize>, Init, ParamKind) -> usize,
    prefix: &str,
    f: usize,
    d: usize,
    std: f64,
) -> SwigluIndex {
    SwigluIndex {
        gate: push(
            format!("{prefix}gate_proj.weight"),
            vec![f, d],
            Init::Normal(std),
            ParamKind::Matrix,
        ),
        up: push(
            format!("{prefix}up_proj.weight"),
            vec![f, d],
            Init::Normal(std),
            ParamKind::Matrix,
        ),
        down: push(
            format!("{prefix}down_proj.weight"),
            vec![d, f],
            Init::Normal(std),
            ParamKind::Matrix,
        ),
    }
}

/// Fresh parameters drawn from `seed` (tensor by tensor, in spec order).
pub fn init_params<T: Real>(specs: &[ParamSpec], seed: u64) -> ParamStore<T> {
    let mut rng = Rng::new(seed);
    let mut store = ParamStore::zeros_like(specs);
    for (t, s) in store.tensors.iter_mut().zip(specs) {
        match s.init {
            Init::Normal(std) => t.data.iter_mut().for_each(|x| *x = T::from_f64(rng.normal() * std)),
            Init::Const(c) => t.data.fill(T::from_f64(c)),
        }
    }
    store
}
