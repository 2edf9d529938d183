//! `--recompute` (`DeviceModel::set_recompute`): the backward writes the norms' outputs h1, h2
//! and the rotated q, k again, into buffers all layers share, instead of every layer keeping its
//! own. The recomputed values are the forward's bit for bit (same kernels, same inputs), so a
//! training run is bit-identical with and without it; what changes is the memory plan (by an
//! exact amount) and four launches more per layer. On the CPU emulator always, and on a GPU when
//! there is one.
#![cfg(feature = "cuda")]

mod common;

use common::cuda_devices as devices;
use gated_lm::config::{preset_shape, preset_with_gate, GateConfig, ModelConfig};
use gated_lm::engine::device::{planned_step_bytes, DeviceModel, Precision};
use gated_lm::model::{shifted_targets, Model};
use gated_lm::optim::AdamWConfig;
use gated_lm::rng::Rng;

/// Bytes a step's plan saves by recomputing: each layer's h1 and h2 (the GEMMs' operand type)
/// and qr, kr (the attention's), less the one shared set. Shapes here keep every buffer a
/// multiple of the plan's 256-byte alignment.
fn saved_bytes(cfg: &ModelConfig, tokens: usize, precision: Precision, tensor_cores: bool) -> usize {
    let gemm = if precision == Precision::Bf16 { 2 } else { 4 };
    let attn = if tensor_cores { 2 } else { 4 };
    let per_set = tokens * (2 * cfg.hidden_size * gemm + (cfg.q_dim() + cfg.kv_dim()) * attn);
    // the shared buffer holds one of h1/h2, not both
    let shared = tokens * (cfg.hidden_size * gemm + (cfg.q_dim() + cfg.kv_dim()) * attn);
    cfg.num_layers * per_set - shared
}

/// Three training steps (forward and backward, then AdamW; the second captured into a graph
/// and the third replayed from it) and a forward-only loss give the same loss, gradients and
/// parameters bit for bit with and without recomputation, in f32 (the f32 attention), mixed
/// precision on the f32 attention (head_dim 32), and on the tensor cores (head_dim 64 with
/// GQA, 128 headwise), with and without QK-norm.
#[test]
fn recomputed_activations_train_bit_for_bit_as_kept_ones() {
    let gate = |s: &str| GateConfig::parse_spec(s).unwrap();
    let mut hd64_no_qk_norm = ModelConfig::dense(256, 128, 2, 2, 2, 64, 128, None);
    hd64_no_qk_norm.qk_norm = false;
    let cases = [
        (
            "hd32 G1 elementwise, f32",
            ModelConfig::dense(256, 64, 3, 2, 1, 32, 128, gate("elementwise")),
            Precision::F32,
        ),
        (
            "hd32 G1 headwise, bf16",
            ModelConfig::dense(256, 64, 2, 2, 2, 32, 128, gate("headwise")),
            Precision::Bf16,
        ),
        (
            "hd64 G1 elementwise GQA, bf16 (tensor cores)",
            ModelConfig::dense(256, 128, 3, 2, 1, 64, 128, gate("elementwise")),
            Precision::Bf16,
        ),
        (
            "hd128 G1 headwise, bf16 (tensor cores)",
            ModelConfig::dense(256, 128, 2, 1, 1, 128, 128, gate("headwise")),
            Precision::Bf16,
        ),
        ("hd64 ungated, no QK-norm, bf16", hd64_no_qk_norm, Precision::Bf16),
    ];
    let (batch, seq) = (2, 64);
    let opt = AdamWConfig::default();
    for dev in devices() {
        let dev = dev.as_ref();
        for (name, cfg, precision) in cases.clone() {
            let what = format!("{name} on {}", dev.describe());
            let layers = cfg.num_layers;
            let model: Model<f32> = Model::new(cfg.clone(), 9).unwrap();
            let mut kept = DeviceModel::new(dev, &model, precision).unwrap();
            let mut again = DeviceModel::new(dev, &model, precision).unwrap();
            again.set_recompute(true);
            let tc = again.tc_attention();
            assert_eq!(
                kept.planned_step_bytes(batch, seq).unwrap() - again.planned_step_bytes(batch, seq).unwrap(),
                saved_bytes(&cfg, batch * seq, precision, tc),
                "{what}: the plan"
            );
            let mut r = Rng::new(3);
            for step in 0..3 {
                let ids: Vec<u32> = (0..batch * seq).map(|_| r.below(256) as u32).collect();
                let tg = shifted_targets(&ids, seq);
                kept.zero_grads().unwrap();
                again.zero_grads().unwrap();
                let want = kept.forward_backward(&ids, &tg, batch, seq).unwrap();
                let got = again.forward_backward(&ids, &tg, batch, seq).unwrap();
                assert_eq!(
                    got.to_bits(),
                    want.to_bits(),
                    "{what}: step {step}: loss {got} vs {want}"
                );
                assert!(
                    again.grads().unwrap() == kept.grads().unwrap(),
                    "{what}: step {step}: gradients"
                );
                // captured from the second step on: h1, h2, the rotated q and k once more per
                // layer, and nothing else
                let launches = [&again, &kept].map(|m| m.step_graph_launches());
                assert_eq!(launches[0].is_some(), step > 0, "{what}: step {step}: captured");
                if let [Some(a), Some(k)] = launches {
                    assert_eq!(a, k + 4 * layers, "{what}: step {step}: launches");
                } else {
                    assert_eq!(launches, [None, None], "{what}: step {step}: captured");
                }
                let (e, g) = (
                    kept.loss(&ids, &tg, batch, seq).unwrap(),
                    again.loss(&ids, &tg, batch, seq).unwrap(),
                );
                assert_eq!(g.to_bits(), e.to_bits(), "{what}: step {step}: forward-only loss");
                kept.step(&opt, 3e-3, 1.0).unwrap();
                again.step(&opt, 3e-3, 1.0).unwrap();
            }
            assert!(again.params().unwrap() == kept.params().unwrap(), "{what}: parameters");
            assert!(again.step_memory_bytes() < kept.step_memory_bytes(), "{what}");
        }
    }
}

/// What the plan saves at the presets' own shapes, elementwise gate, bf16 (no device needed):
/// 2·d + q + kv bf16 elements per token and layer, less the shared d + q + kv (14 KB per token
/// and layer at 1p7b: 5.97 GiB of its 35.39 GiB arena; 5 KB at small: 1.77 GiB of 11.63 GiB).
#[test]
fn recomputation_saves_the_planned_bytes_at_the_presets() {
    for (preset, want_gib) in [("small", 1.766), ("1p7b", 5.969)] {
        let cfg = preset_with_gate(preset, "elementwise").unwrap();
        let shape = preset_shape(preset);
        let bytes = |recompute| planned_step_bytes(&cfg, shape, Precision::Bf16, None, recompute).unwrap();
        let saved = bytes(false) - bytes(true);
        assert_eq!(
            saved,
            saved_bytes(&cfg, shape.0 * shape.1, Precision::Bf16, true),
            "{preset}"
        );
        let gib = saved as f64 / (1u64 << 30) as f64;
        assert!((gib - want_gib).abs() < 0.005, "{preset}: saves {gib:.3} GiB");
    }
}
