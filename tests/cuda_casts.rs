//! Mixed precision end to end in bf16 (issue 15): every kernel that produces an activation a
//! GEMM or the tensor-core attention reads writes it in their operand type, so a training step
//! launches no cast kernel, on either attention path. Only `DeviceModel::new` casts (each GEMM
//! weight once; AdamW rewrites the copies after that).
#![cfg(feature = "cuda")]

mod common;

use common::recording::Recording;

use gated_lm::config::{GateConfig, ModelConfig};
use gated_lm::engine::device::{DeviceModel, Precision};
use gated_lm::model::{shifted_targets, Model};
use gated_lm::optim::AdamWConfig;
use gated_lm::rng::Rng;

/// Training steps (forward and backward, the update) and a forward-only loss in mixed
/// precision launch no `cast_f32_bf16`: head_dim 32 (the f32 attention; before, per layer y,
/// dv and, gated, dz were cast, and the logits' gradient per LM-head chunk), 64 and 128 (the
/// tensor-core attention, which also had q, k and v cast: 3 more per layer). On the tensor-core path the
/// rotated q and k come from QK-norm/RoPE in bf16, v from its GEMM in bf16 (the portable
/// GEMM's `gemm_bf16_bf16`; cuBLASLt where there is one); y, dv and dz from the attention's
/// `_bf16` kernels.
#[test]
fn mixed_precision_steps_launch_no_cast() {
    let dev = gated_lm::backend::cuda::emu::Emu::open().unwrap();
    let rec = Recording::new(&dev);
    let gate = |s: &str| GateConfig::parse_spec(s).unwrap();
    // (vocab, d, layers, heads, kv heads, head_dim, ffn)
    let mut hd64_llama = ModelConfig::dense(256, 128, 1, 2, 2, 64, 128, None);
    hd64_llama.qk_norm = false;
    let cases = [
        (
            "hd32 G1 elementwise",
            ModelConfig::dense(256, 64, 2, 2, 1, 32, 128, gate("elementwise")),
        ),
        (
            "hd64 G1 elementwise GQA",
            ModelConfig::dense(256, 128, 2, 2, 1, 64, 128, gate("elementwise")),
        ),
        (
            "hd128 G1 headwise",
            ModelConfig::dense(256, 128, 1, 1, 1, 128, 128, gate("headwise")),
        ),
        ("hd64 ungated, no QK-norm", hd64_llama),
    ];
    let mut r = Rng::new(21);
    let (batch, seq) = (2, 40);
    for (name, cfg) in cases {
        let (layers, hd) = (cfg.num_layers, cfg.head_dim);
        let model: Model<f32> = Model::new(cfg, 3).unwrap();
        let ids: Vec<u32> = (0..batch * seq).map(|_| r.below(256) as u32).collect();
        let tg = shifted_targets(&ids, seq);
        let mut dm = DeviceModel::new(&rec, &model, Precision::Bf16).unwrap();
        let tc = dm.tc_attention();
        assert_eq!(tc, hd >= 64, "{name}");
        // two head chunks: the cross-entropy runs twice per pass
        dm.set_head_chunk_rows(Some(48));
        rec.take_each([]);
        let opt = AdamWConfig::default();
        for step in 1..=2 {
            dm.zero_grads().unwrap();
            dm.forward_backward(&ids, &tg, batch, seq).unwrap();
            dm.step(&opt, 3e-3, 1.0).unwrap();
            // on tensor cores reading z and writing o in bf16 as well
            let fwd = if tc {
                format!("attn_fwd_tc_hd{hd}_bf16oz")
            } else {
                format!("attn_fwd_hd{hd}_bf16")
            };
            // reading the q and k projections' bf16 outputs
            let rope = ["qknorm_rope_fwd_from_bf16", "qknorm_rope_fwd_bf16_from_bf16"];
            let [casts, attn, rope_f32, rope_bf16] = rec.take_each(["cast_f32_bf16", &fwd, rope[0], rope[1]]);
            assert_eq!(casts, 0, "{name}: step {step} cast an activation");
            assert_eq!(attn, layers, "{name}: {fwd}");
            // the rotated q and k: bf16 for the tensor cores, f32 for the f32 attention
            let rope_launches = if tc { (0, 2 * layers) } else { (2 * layers, 0) };
            assert_eq!((rope_f32, rope_bf16), rope_launches, "{name}: QK-norm/RoPE forward");
            dm.loss(&ids, &tg, batch, seq).unwrap();
            assert_eq!(
                rec.take_each(["cast_f32_bf16"]),
                [0],
                "{name}: a forward-only pass cast"
            );
        }
    }
}
