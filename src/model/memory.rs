//! Memory a command will need, estimated from the config and the arguments before anything is
//! allocated, and checked against what the machine can give. An allocation that fails aborts the
//! process (no error, no cleanup); a refusal up front names the estimate and the limit instead.

use crate::config::ModelConfig;
use anyhow::{bail, Result};

/// Bytes per element of the CPU engine's f32 tensors.
const F32: u128 = 4;

/// An estimate as named parts, in bytes (u128: absurd configs must not wrap).
#[derive(Clone, Debug, Default)]
pub struct Need {
    pub parts: Vec<(&'static str, u128)>,
}

impl Need {
    pub fn add(mut self, what: &'static str, bytes: u128) -> Self {
        self.parts.push((what, bytes));
        self
    }

    pub fn total(&self) -> u128 {
        self.parts.iter().map(|p| p.1).sum()
    }

    fn describe(&self) -> String {
        self.parts
            .iter()
            .filter(|p| p.1 > 0)
            .map(|(w, b)| format!("{w} {}", gib(*b)))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

pub fn gib(bytes: u128) -> String {
    let g = bytes as f64 / (1u64 << 30) as f64;
    if g >= 1e4 {
        format!("{g:.2e} GiB")
    } else {
        format!("{g:.2} GiB")
    }
}

/// Parameters of a model, counted from its config without allocating.
pub fn param_count(cfg: &ModelConfig) -> u128 {
    let d = cfg.hidden_size as u128;
    let (q, kv) = (cfg.q_dim() as u128, cfg.kv_dim() as u128);
    let ffn = |l: usize| -> u128 {
        match cfg.moe_at(l) {
            Some(m) => {
                let e = m.num_experts as u128;
                e * d
                    + e * 3 * d * m.moe_intermediate_size as u128
                    + 3 * d * m.shared_expert_intermediate_size as u128
                    + d
            }
            None => 3 * d * cfg.intermediate_size as u128,
        }
    };
    // the gate's projection is at most another q (elementwise, per head)
    let gate = if cfg.gate.is_some() { d * q } else { 0 };
    let per_layer: u128 = (0..cfg.num_layers.min(1 << 16))
        .map(|l| d * (q + 2 * kv) + q * d + gate + ffn(l) + 2 * d + 2 * cfg.head_dim as u128)
        .sum();
    let head = if cfg.tie_word_embeddings {
        0
    } else {
        cfg.vocab_size as u128 * d
    };
    cfg.vocab_size as u128 * d + head + per_layer + d
}

/// Activations one forward keeps per token and layer for the backward (`LayerCache`), in f32
/// elements: normed inputs, q/k/v before and after norm and RoPE, gate logits, SDPA outputs,
/// the MLP's gate/up/activation (the routed experts' for MoE).
fn cached_per_token_layer(cfg: &ModelConfig) -> u128 {
    let d = cfg.hidden_size as u128;
    let (q, kv) = (cfg.q_dim() as u128, cfg.kv_dim() as u128);
    let ffn = match &cfg.moe {
        Some(m) => {
            (m.num_experts_per_tok as u128 * m.moe_intermediate_size as u128
                + m.shared_expert_intermediate_size as u128)
                * 4
                + m.num_experts as u128
        }
        None => 4 * cfg.intermediate_size as u128,
    };
    4 * d + 6 * q + 4 * kv + ffn
}

/// Training on the CPU: weights, gradients and AdamW's two moments; every layer's cached
/// activations for `batch × seq` tokens; the evaluation's `[tokens, vocab]` logits and the
/// sink probe's per-head attention rows.
pub fn training(cfg: &ModelConfig, batch: usize, seq: usize) -> Need {
    let tokens = batch as u128 * seq as u128;
    host_copies(cfg)
        .add(
            "activations",
            tokens * cfg.num_layers as u128 * cached_per_token_layer(cfg) * F32,
        )
        .add("logits", tokens * cfg.vocab_size as u128 * F32)
        .add("attention probe", attention_probe(cfg, batch, seq))
}

/// The sink probe's per-head attention rows over one evaluation batch.
fn attention_probe(cfg: &ModelConfig, batch: usize, seq: usize) -> u128 {
    batch as u128 * seq as u128 * seq as u128 * cfg.num_heads as u128 * F32
}

/// Training on a device, on the host: the model and the optimizer's copies, and the
/// evaluation's probe batch through the host model (`train::evaluate`: a forward keeps one layer's
/// activations at a time and sums the loss over logit chunks) with the sink probe's attention
/// rows. The activations of the step live on the device.
pub fn device_training(cfg: &ModelConfig, batch: usize, seq: usize) -> Need {
    let tokens = batch as u128 * seq as u128;
    host_copies(cfg)
        .add(
            "evaluation: one layer's activations",
            tokens * cached_per_token_layer(cfg) * F32,
        )
        .add("attention probe", attention_probe(cfg, batch, seq))
}

/// Benchmarking on a device, on the host: the model and the optimizer's copies (weights, AdamW
/// moments, room for gradients), no activations.
pub fn host_copies(cfg: &ModelConfig) -> Need {
    Need::default().add("weights, gradients and AdamW moments", 4 * param_count(cfg) * F32)
}

/// A forward over `tokens` positions at once with a KV cache (generation's prefill, RULER,
/// streaming evaluation): the weights, the cache, one layer's activations, one head's `T × T`
/// scores and the `[tokens, vocab]` logits.
pub fn prefill(cfg: &ModelConfig, tokens: usize) -> Need {
    let t = tokens as u128;
    Need::default()
        .add("weights", param_count(cfg) * F32)
        .add("KV cache", 2 * t * cfg.num_layers as u128 * cfg.kv_dim() as u128 * F32)
        .add("activations", t * cached_per_token_layer(cfg) * F32)
        .add("attention scores", t * t * F32)
        .add("logits", t * cfg.vocab_size as u128 * F32)
}

/// `prefill` on a lazily loaded model (a memory-mapped GGUF): the quantised file (mapped, shared
/// with the page cache), the tensors kept in f32 (embedding, norms, LM head), one layer's f32
/// weights plus the MLP's stacked gate/up copy, and the same activations, scores and logits.
pub fn prefill_lazy(cfg: &ModelConfig, tokens: usize, quantised: u128, eager: u128, layer: u128) -> Need {
    let t = tokens as u128;
    let (d, f) = (cfg.hidden_size as u128, cfg.intermediate_size as u128);
    Need::default()
        .add("quantised weights (mapped)", quantised)
        .add("embedding, norms and LM head", eager * F32)
        .add("one layer's weights", (layer + 2 * d * f) * F32)
        .add("KV cache", 2 * t * cfg.num_layers as u128 * cfg.kv_dim() as u128 * F32)
        .add("activations", t * cached_per_token_layer(cfg) * F32)
        .add("attention scores", t * t * F32)
        .add("logits", t * cfg.vocab_size as u128 * F32)
}

/// Bytes this process may still allocate: the least of the memory the kernel reports
/// available, the cgroup's limit less its usage, and the address-space limit (`ulimit -v`) less
/// what is mapped now. `None` where none of these can be read.
pub fn available() -> Option<u128> {
    let mut best: Option<u128> = None;
    let mut take = |v: u128| best = Some(best.map_or(v, |b| b.min(v)));
    if let Ok(m) = std::fs::read_to_string("/proc/meminfo") {
        if let Some(kb) = m
            .lines()
            .find_map(|l| l.strip_prefix("MemAvailable:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u128>().ok())
        {
            take(kb * 1024);
        }
    }
    let read = |p: &str| std::fs::read_to_string(p).ok()?.trim().parse::<u128>().ok();
    if let (Some(max), Some(cur)) = (read("/sys/fs/cgroup/memory.max"), read("/sys/fs/cgroup/memory.current")) {
        take(max.saturating_sub(cur));
    }
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct we pass and nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut lim) } == 0 && lim.rlim_cur != libc::RLIM_INFINITY {
        let mapped = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmSize:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u128>().ok())
            })
            .unwrap_or(0)
            * 1024;
        take((lim.rlim_cur as u128).saturating_sub(mapped));
    }
    best
}

/// Refuse `what` when the estimate exceeds what the machine can give.
pub fn ensure_fits(what: &str, need: &Need) -> Result<()> {
    let total = need.total();
    if let Some(avail) = available() {
        if total > avail {
            bail!(
                "{what} would need about {} ({}), but only {} is available on this machine; \
                 make it smaller (batch, sequence length, model size, vocabulary or lengths)",
                gib(total),
                need.describe(),
                gib(avail)
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::params::param_specs;

    #[test]
    fn param_count_matches_the_allocated_specs() {
        for (preset, gate) in [
            ("tiny", None),
            ("micro", Some("elementwise")),
            ("moe-micro", Some("headwise")),
        ] {
            let mut cfg = crate::config::preset_with_gate(preset, gate.unwrap_or("none")).unwrap();
            let exact: usize = param_specs(&cfg)
                .0
                .iter()
                .map(|s| s.shape.iter().product::<usize>())
                .sum();
            let est = param_count(&cfg);
            // the gate's width is bounded above by q (headwise is narrower), so the estimate
            // never undercounts and stays within a few percent
            assert!(est >= exact as u128, "{preset}: {est} < {exact}");
            assert!((est as f64) < exact as f64 * 1.2, "{preset}: {est} vs {exact}");
            cfg.gate = None;
            let exact: usize = param_specs(&cfg)
                .0
                .iter()
                .map(|s| s.shape.iter().product::<usize>())
                .sum();
            assert!(param_count(&cfg) >= exact as u128);
        }
    }

    /// The 1p7b preset trained on a GPU needs ≈ 37 GiB of host memory (its f32 copies and the
    /// evaluation's probe forward), not the ≈ 127 GiB of training it on the CPU (every layer's
    /// activations and the logits), which would refuse it on a 128 GiB GPU machine.
    #[test]
    fn a_device_run_needs_no_host_activations() {
        let cfg = crate::config::preset_with_gate("1p7b", "elementwise").unwrap();
        let (b, t) = crate::config::preset_shape("1p7b");
        let gib = |n: &Need| n.total() as f64 / (1u64 << 30) as f64;
        let (cpu, dev) = (gib(&training(&cfg, b, t)), gib(&device_training(&cfg, b, t)));
        assert!((120.0..135.0).contains(&cpu), "CPU training {cpu:.1} GiB");
        assert!((34.0..40.0).contains(&dev), "device training {dev:.1} GiB");
        assert!(dev > gib(&host_copies(&cfg)) + 4.0, "the probe batch is counted");
    }

    #[test]
    fn absurd_requests_exceed_any_machine() {
        let cfg = crate::config::ModelConfig::dense(257, 8192, 64, 64, 8, 128, 28672, None);
        assert!(training(&cfg, 1, 128).total() > 700 << 30, "~55B parameters × 16 bytes");
        let small = crate::config::preset_with_gate("micro", "none").unwrap();
        assert!(prefill(&small, 100_000).total() > 30 << 30, "T×T scores dominate");
        assert!(training(&small, 100_000_000, 64).total() > 1 << 40);
    }
}
