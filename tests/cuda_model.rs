//! The dense decoder resident on a CUDA device against the CPU model: loss, every parameter's
//! gradient and the AdamW step, for the ungated, G1-elementwise and G1-headwise models and the
//! Qwen3-Next style (zero-centred norms, partial RoPE, tied head) and llama style (no QK-norm).
//! Runs on the CPU emulator always and on a GPU when there is one.
#![cfg(feature = "cuda")]

use gated_lm::backend::cuda::runtime::Device;
use gated_lm::config::{GateConfig, ModelConfig, NormStyle};
use gated_lm::engine::device::{DeviceModel, Precision};
use gated_lm::model::observer::NoObserver;
use gated_lm::model::{shifted_targets, Batch, Model};
use gated_lm::optim::{clip_coef, grad_norm, AdamW, AdamWConfig};
use gated_lm::rng::Rng;

mod common;
use common::cuda_devices as devices;
use common::recording::Recording;

/// max |a − b| ≤ rel · max |b| over one tensor
fn close(what: &str, got: &[f32], want: &[f32], rel: f32) {
    close_floor(what, got, want, rel, 0.0);
}

/// As `close`, with an absolute floor: a difference of values that were computed at a larger
/// magnitude (an update p₁ − p₀ of weights near 1) carries that magnitude's f32 rounding.
fn close_floor(what: &str, got: &[f32], want: &[f32], rel: f32, floor: f32) {
    assert_eq!(got.len(), want.len(), "{what}");
    let scale = want.iter().fold(1e-12f32, |a, x| a.max(x.abs()));
    let err = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(
        err <= (rel * scale).max(floor),
        "{what}: differs by {err} (scale {scale}, floor {floor})"
    );
}

fn variants() -> Vec<(&'static str, ModelConfig)> {
    let gate = |s: &str| GateConfig::parse_spec(s).unwrap();
    let micro = |g| ModelConfig::preset("micro", g).unwrap();
    let mut next = micro(gate("elementwise"));
    (next.norm_style, next.partial_rotary_factor, next.tie_word_embeddings) = (NormStyle::ZeroCentered, 0.5, true);
    let mut llama = micro(None);
    llama.qk_norm = false;
    vec![
        ("baseline", micro(None)),
        ("G1 elementwise", micro(gate("elementwise"))),
        ("G1 headwise", micro(gate("headwise"))),
        ("qwen3-next style", next),
        ("llama style", llama),
    ]
}

#[test]
fn device_training_step_matches_the_cpu_model() {
    let (batch, seq) = (2, 24);
    let mut r = Rng::new(5);
    for dev in devices() {
        let dev = dev.as_ref();
        for (name, cfg) in variants() {
            let what = format!("{name} on {}", dev.describe());
            let mut model: Model<f32> = Model::new(cfg.clone(), 7).unwrap();
            // gains away from their init so both norm styles' paths matter
            for (i, s) in model.specs.clone().iter().enumerate() {
                if s.name.contains("norm") {
                    model.params.tensors[i]
                        .data
                        .iter_mut()
                        .for_each(|x| *x += (0.3 * r.normal()) as f32);
                }
            }
            let (ids, mut targets) = common::random_tokens(&mut r, cfg.vocab_size, (batch, seq));
            targets[3] = gated_lm::model::ops::cross_entropy::IGNORE;
            let b = Batch {
                ids: &ids,
                targets: &targets,
                batch,
                seq,
            };
            let mut dm = DeviceModel::new(dev, &model, Precision::F32).unwrap();

            let mut grads = model.zero_grads();
            let loss = model.forward_backward(&b, &mut grads, &mut NoObserver).unwrap();
            // forward only: the same loss, gradients untouched
            let floss = dm.loss(&ids, &targets, batch, seq).unwrap();
            assert!((loss - floss).abs() < 1e-5 * loss, "{what}: loss {floss} vs CPU {loss}");
            assert!(dm
                .grads()
                .unwrap()
                .tensors
                .iter()
                .all(|t| t.data.iter().all(|&g| g == 0.0)));
            let dloss = dm.forward_backward(&ids, &targets, batch, seq).unwrap();
            assert_eq!(dloss, floss, "{what}");
            let dgrads = dm.grads().unwrap();
            for (i, n) in model.params.names.iter().enumerate() {
                let (g, c) = (&dgrads.tensors[i].data, &grads.tensors[i].data);
                close(&format!("{what}: grad {n}"), g, c, 1e-4);
            }

            // one clipped AdamW step (clipping active: max norm below the gradient norm) on the
            // same gradients: Adam's first step is sign-like, so tiny gradient differences would
            // move tiny-gradient weights by up to lr
            dm.set_grads(&grads).unwrap();
            let before = model.params.clone();
            // half the variants exempt norm gains and embeddings from weight decay
            let opt = AdamWConfig {
                no_decay_norms_embeddings: name.contains("headwise") || name.contains("llama"),
                ..Default::default()
            };
            let norm = grad_norm(&grads);
            let max_norm = norm * 0.5;
            let mut adam = AdamW::new(opt.clone(), &model.specs);
            adam.update_scaled(&mut model.params, &grads, &model.specs, 1e-3, clip_coef(norm, max_norm));
            let dnorm = dm.step(&opt, 1e-3, max_norm).unwrap();
            assert!(
                (norm - dnorm).abs() < 1e-6 * norm,
                "{what}: grad norm {dnorm} vs {norm}"
            );
            let dparams = dm.params().unwrap();
            for (i, n) in model.params.names.iter().enumerate() {
                let p0 = &before.tensors[i].data;
                let delta = |p: &[f32]| p.iter().zip(p0).map(|(a, b)| a - b).collect::<Vec<f32>>();
                let (p, c) = (&dparams.tensors[i].data, &model.params.tensors[i].data);
                // the update is a difference of weights: one f32 ulp of their magnitude (per
                // operand) is the floor of what two correct implementations can agree on (the
                // H200 run's llama-style norm update differed by exactly 2⁻²³ at scale 1e-3)
                let ulp = p0.iter().fold(0f32, |a, x| a.max(x.abs())) * f32::EPSILON;
                close_floor(&format!("{what}: update of {n}"), &delta(p), &delta(c), 1e-4, 2.0 * ulp);
            }

            // the next step starts from zeroed gradients and the updated weights
            dm.zero_grads().unwrap();
            let mut grads = model.zero_grads();
            let loss2 = model.forward_backward(&b, &mut grads, &mut NoObserver).unwrap();
            let dloss2 = dm.forward_backward(&ids, &targets, batch, seq).unwrap();
            assert!(
                (loss2 - dloss2).abs() < 1e-5 * loss2,
                "{what}: second loss {dloss2} vs {loss2}"
            );
            assert!(
                loss2 < loss,
                "{what}: a step on the batch lowers its loss ({loss} → {loss2})"
            );
        }
    }
}

/// Device memory is planned once per (batch, seq, precision): after the first step of a shape,
/// training steps (forward, backward, norm, update) allocate nothing on the device, in f32 and
/// in mixed precision; a new shape plans anew. Reused buffers carry no state between steps: the
/// same batch twice (no update between) gives bit-identical loss and gradients. (The arena
/// starts as NaN, so a kernel relying on a zeroed output fails every device-vs-CPU test.)
#[test]
fn steady_state_steps_allocate_no_device_memory() {
    let dev = gated_lm::backend::cuda::emu::Emu::open().unwrap();
    let rec = Recording::new(&dev);
    let gate = GateConfig::parse_spec("elementwise").unwrap();
    let cfg = ModelConfig::dense(256, 128, 2, 2, 1, 64, 128, gate);
    let model: Model<f32> = Model::new(cfg, 3).unwrap();
    let mut r = Rng::new(4);
    for precision in [Precision::F32, Precision::Bf16] {
        let mut dm = DeviceModel::new(&rec, &model, precision).unwrap();
        let opt = AdamWConfig::default();
        let batch_of = |r: &mut Rng, b: usize, t: usize| {
            let ids: Vec<u32> = (0..b * t).map(|_| r.below(256) as u32).collect();
            let tg = shifted_targets(&ids, t);
            (ids, tg)
        };
        let (ids, tg) = batch_of(&mut r, 2, 40);
        let before = rec.allocs.get();
        let first = dm.forward_backward(&ids, &tg, 2, 40).unwrap();
        assert!(
            rec.allocs.get() > before,
            "{precision:?}: the first step plans its memory"
        );
        assert!(dm.step_memory_bytes() > 0);
        let grads = dm.grads().unwrap();
        dm.zero_grads().unwrap();
        let steady = rec.allocs.get();
        let again = dm.forward_backward(&ids, &tg, 2, 40).unwrap();
        assert_eq!(again.to_bits(), first.to_bits(), "{precision:?}: same batch, same loss");
        assert_eq!(dm.grads().unwrap(), grads, "{precision:?}: same batch, same gradients");
        for _ in 0..2 {
            dm.step(&opt, 1e-3, 1.0).unwrap();
            dm.zero_grads().unwrap();
            let (ids, tg) = batch_of(&mut r, 2, 40);
            dm.forward_backward(&ids, &tg, 2, 40).unwrap();
            dm.loss(&ids, &tg, 2, 40).unwrap();
        }
        assert_eq!(rec.allocs.get(), steady, "{precision:?}: steady-state steps allocated");
        // another shape: planned anew, then steady again
        let (ids, tg) = batch_of(&mut r, 1, 24);
        dm.forward_backward(&ids, &tg, 1, 24).unwrap();
        let replanned = rec.allocs.get();
        assert!(replanned > steady, "{precision:?}: a new shape plans its memory");
        dm.forward_backward(&ids, &tg, 1, 24).unwrap();
        assert_eq!(rec.allocs.get(), replanned, "{precision:?}");
    }
}

/// Mixed precision casts each GEMM weight to bf16 once, when the device model is made; after
/// that AdamW writes the bf16 copies in the same kernel as the f32 masters, so no training step
/// (forward, backward, update) casts a parameter. The copies it writes are exact: a fresh
/// device model made from the updated weights (whose copies are cast anew) gives the same loss
/// bit for bit.
#[test]
fn the_optimizer_writes_the_bf16_weight_copies() {
    let dev = gated_lm::backend::cuda::emu::Emu::open().unwrap();
    let rec = Recording::new(&dev);
    let gate = GateConfig::parse_spec("elementwise").unwrap();
    // two layers, untied head: q, k, v, o, gate, MLP gate, up, down per layer and the head
    let cfg = ModelConfig::dense(256, 64, 2, 2, 1, 32, 128, gate);
    let mut model: Model<f32> = Model::new(cfg, 3).unwrap();
    // one bf16 buffer per GEMM weight, but each layer's q, k, v and gate projections share
    // one, and so do its MLP's gate and up projections: 4 per layer, and the head
    let gemm_weights = 2 * 4 + 1;
    let mut r = Rng::new(9);
    let ids: Vec<u32> = (0..2 * 24).map(|_| r.below(256) as u32).collect();
    let tg = shifted_targets(&ids, 24);
    rec.uploads.take();
    let mut dm = DeviceModel::new(&rec, &model, Precision::Bf16).unwrap();
    let params = rec.uploads.take();
    let weight_casts = |rec: &Recording| rec.cast_sources.take().iter().filter(|s| params.contains(s)).count();
    assert_eq!(
        weight_casts(&rec),
        gemm_weights,
        "one cast per GEMM weight buffer in `new`"
    );
    let opt = AdamWConfig::default();
    for step in 1..=3 {
        rec.take("");
        dm.zero_grads().unwrap();
        // the gradients are views of one arena: one launch zeroes them all
        assert_eq!(rec.take("fill_f32"), 1, "step {step}: zeroing the gradients");
        dm.forward_backward(&ids, &tg, 2, 24).unwrap();
        // forward q, k, v, gate logits, o, [gate; up], down (7 per layer); backward dx and dW
        // of each weight buffer: [q; k; v; gate], o, [gate; up], down (8 per layer); the
        // head's 3 (one chunk) (bf16 operands, f32 or bf16 output: gemm_bf16, gemm_bf16_bf16)
        let gemms = rec.take_where(|k| k.starts_with("gemm_bf16"));
        assert_eq!(gemms, 2 * (7 + 8) + 3, "step {step}: GEMMs");
        dm.step(&opt, 3e-3, 1.0).unwrap();
        let train = rec.cast_sources.borrow().len();
        let loss = dm.loss(&ids, &tg, 2, 24).unwrap();
        let eval = rec.cast_sources.borrow().len() - train;
        // None (head_dim 32: f32 attention): every norm, SwiGLU, QK-norm/RoPE, the attention
        // (y forward, dv and dz backward) and the cross-entropy (the logits' gradient) writes
        // the operand its GEMMs read in bf16 itself (before: 26 and 9).
        assert_eq!((train, eval), (0, 0), "step {step}: activation casts");
        assert_eq!(weight_casts(&rec), 0, "step {step}: a weight was cast");
        model.params = dm.params().unwrap();
        let fresh = DeviceModel::new(&dev, &model, Precision::Bf16)
            .unwrap()
            .loss(&ids, &tg, 2, 24);
        assert_eq!(
            fresh.unwrap().to_bits(),
            loss.to_bits(),
            "step {step}: bf16 copies differ"
        );
    }
}

/// The LM head and cross-entropy run in row chunks, so no `[tokens, vocab]` logits buffer
/// exists: with chunks of 16 rows (80 rows: 5 chunks, one cross-entropy launch each) the loss
/// equals the single-chunk loss bit for bit (per-row losses are summed on the host in row
/// order) and the gradients agree to f32 summation order (the head's weight gradient is summed
/// over chunks), in f32 and bf16; the step memory shrinks by the logits of 64 rows.
#[test]
fn lm_head_and_loss_run_in_row_chunks() {
    let dev = gated_lm::backend::cuda::emu::Emu::open().unwrap();
    let rec = Recording::new(&dev);
    let gate = GateConfig::parse_spec("headwise").unwrap();
    let cfg = ModelConfig::dense(256, 64, 1, 2, 1, 32, 128, gate);
    let model: Model<f32> = Model::new(cfg, 5).unwrap();
    let mut r = Rng::new(6);
    let (batch, seq) = (2, 40);
    let ids: Vec<u32> = (0..batch * seq).map(|_| r.below(256) as u32).collect();
    let mut tg = shifted_targets(&ids, seq);
    tg[17] = gated_lm::model::ops::cross_entropy::IGNORE;
    for precision in [Precision::F32, Precision::Bf16] {
        let mut dm = DeviceModel::new(&rec, &model, precision).unwrap();
        let whole = dm.forward_backward(&ids, &tg, batch, seq).unwrap();
        let (whole_grads, whole_bytes) = (dm.grads().unwrap(), dm.step_memory_bytes());
        rec.take("");
        dm.zero_grads().unwrap();
        dm.set_head_chunk_rows(Some(16));
        let chunked = dm.forward_backward(&ids, &tg, batch, seq).unwrap();
        // in mixed precision the variant that writes the gradient in bf16
        let ce = match precision {
            Precision::F32 => "cross_entropy_fwd_bwd",
            Precision::Bf16 => "cross_entropy_fwd_bwd_bf16",
        };
        assert_eq!(rec.take(ce), 5, "{precision:?}");
        assert_eq!(chunked.to_bits(), whole.to_bits(), "{precision:?}: loss");
        let grads = dm.grads().unwrap();
        for (i, n) in model.params.names.iter().enumerate() {
            close(
                &format!("{precision:?} chunked: grad {n}"),
                &grads.tensors[i].data,
                &whole_grads.tensors[i].data,
                1e-5,
            );
        }
        let saved = whole_bytes - dm.step_memory_bytes();
        let logits_64_rows = 64 * 256 * if precision == Precision::F32 { 4 } else { 6 };
        assert!(
            saved >= logits_64_rows,
            "{precision:?}: chunked step memory {} vs {whole_bytes}",
            dm.step_memory_bytes()
        );
    }
}

/// One bf16 device model against the f32 CPU model on a random batch: loss within 1e-3,
/// gradients within 5e-2 of each tensor's largest entry, bf16 really in effect, and three
/// training steps that each lower the loss. `attn`: the attention forward kernel every layer
/// must launch (and no other), as its `_bf16` variant (y written in bf16). Returns (|Δloss|/loss, worst gradient error / scale).
fn check_mixed_precision(
    dev: &dyn Device,
    name: &str,
    cfg: &ModelConfig,
    (batch, seq): (usize, usize),
    r: &mut Rng,
    attn: &str,
) -> (f64, f32) {
    let rec = Recording::new(dev);
    let what = format!("{name} bf16 on {}", dev.describe());
    let model: Model<f32> = Model::new(cfg.clone(), 3).unwrap();
    let (ids, targets) = common::random_tokens(r, cfg.vocab_size, (batch, seq));
    let b = Batch {
        ids: &ids,
        targets: &targets,
        batch,
        seq,
    };
    let mut grads = model.zero_grads();
    let loss = model.forward_backward(&b, &mut grads, &mut NoObserver).unwrap();
    let mut dm = DeviceModel::new(&rec, &model, Precision::Bf16).unwrap();
    assert_eq!(dm.tc_attention(), attn.contains("_tc_"), "{what}");
    let other = format!("attn_fwd_hd{}", cfg.head_dim);
    let other = if attn == other {
        format!("attn_fwd_tc_hd{}", cfg.head_dim)
    } else {
        other
    };
    // in mixed precision the forward writes y in bf16 for the o_proj GEMMs: the `_bf16` kernels
    // (on tensor cores `_bf16oz`: z read and o written in bf16 too)
    let oz = |k: &str| if k.contains("_tc_") { "oz" } else { "" };
    let (attn, other) = (
        &format!("{attn}_bf16{}", oz(attn)),
        format!("{other}_bf16{}", oz(&other)),
    );
    rec.take(attn);
    let dloss = dm.forward_backward(&ids, &targets, batch, seq).unwrap();
    let launches = rec.launches.borrow().clone();
    let count = |k: &str| launches.iter().filter(|l| *l == k).count();
    assert_eq!(
        (count(attn), count(&other)),
        (cfg.num_layers, 0),
        "{what}: attention forward launches ({attn}, {other})"
    );
    // the backward runs where the forward ran: tensor cores (dK/dV and dQ) or the f32 kernels
    let hd = cfg.head_dim;
    // (dK/dV writing dv in bf16 for the v projection's GEMMs)
    let (tc_bwd, f32_bwd) = (
        format!("attn_bwd_dkdv_tc_hd{hd}_bf16"),
        format!("attn_bwd_dkdv_hd{hd}_bf16"),
    );
    let tc = attn.contains("_tc_");
    let layers = cfg.num_layers;
    assert_eq!(
        (
            count(&tc_bwd),
            count(&format!("attn_bwd_dq_tc_hd{hd}")),
            count(&f32_bwd)
        ),
        if tc { (layers, layers, 0) } else { (0, 0, layers) },
        "{what}: attention backward launches"
    );
    // on tensor cores the pre-pass reads o and z in bf16
    let pre = count("attn_bwd_pre_tc_bf16oz");
    assert_eq!(pre, if tc { layers } else { 0 }, "{what}: attention backward pre-pass");
    // each norm's gain gradient (input, post-attention, QK and final norms): one sum of the
    // backward's per-block partial rows
    let norms = model.params.names.iter().filter(|n| n.contains("norm")).count();
    assert_eq!(count("colsum_final"), norms, "{what}: norm gain-gradient sums");
    rec.take(attn);
    let dl = (loss - dloss).abs() / loss;
    assert!(dl < 1e-3, "{what}: loss {dloss} vs CPU {loss}");
    let dgrads = dm.grads().unwrap();
    let mut worst = 0f32;
    for (i, n) in model.params.names.iter().enumerate() {
        let (g, c) = (&dgrads.tensors[i].data, &grads.tensors[i].data);
        close(&format!("{what}: grad {n}"), g, c, 5e-2);
        let scale = c.iter().fold(1e-12f32, |a, x| a.max(x.abs()));
        let err = g.iter().zip(c).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        worst = worst.max(err / scale);
    }
    eprintln!("{what}: loss {dloss:.6} vs {loss:.6} (rel {dl:.1e}), worst gradient error {worst:.2e} of scale");
    // and the GEMMs did run in bf16 (f32 ones agree to ~1e-6)
    assert!(
        worst > 1e-4,
        "{what}: gradients equal f32's to {worst:.1e}: no bf16 in effect"
    );
    let opt = AdamWConfig::default();
    let mut last = dloss;
    for _ in 0..3 {
        dm.step(&opt, 3e-3, 1.0).unwrap();
        dm.zero_grads().unwrap();
        let l = dm.forward_backward(&ids, &targets, batch, seq).unwrap();
        assert!(l < last, "{what}: loss went {last} → {l}");
        last = l;
    }
    assert_eq!(rec.take(attn), 3 * cfg.num_layers, "{what}");
    (dl, worst)
}

/// Mixed precision (bf16 GEMM operands, f32 accumulation and everything else) against the f32
/// CPU model, at bf16 tolerances: loss within 1e-3, gradients within 5e-2 of each tensor's
/// largest entry. Training steps lower the loss as in f32. head_dim 16: the f32 attention.
#[test]
fn mixed_precision_training_tracks_the_f32_model() {
    let mut r = Rng::new(8);
    for dev in devices() {
        for (name, cfg) in variants().into_iter().take(3) {
            check_mixed_precision(dev.as_ref(), name, &cfg, (2, 24), &mut r, "attn_fwd_hd16");
        }
    }
}

/// In mixed precision the attention runs on tensor cores for head_dim 64 and 128, forward and
/// backward (on bf16 copies of the rotated Q/K/V), and stays on the f32 kernels for other head
/// dims (32 here) and in f32 precision; the bf16 tolerances against the CPU model hold on both
/// paths.
#[test]
fn mixed_precision_attention_runs_on_tensor_cores_for_head_dims_64_and_128() {
    let gate = |s: &str| GateConfig::parse_spec(s).unwrap();
    // (vocab, d, layers, heads, kv heads, head_dim, ffn): tiny, for the emulator
    let hd64 = ModelConfig::dense(256, 128, 2, 2, 1, 64, 128, gate("elementwise"));
    let hd128 = ModelConfig::dense(256, 128, 1, 1, 1, 128, 128, gate("headwise"));
    let hd32 = ModelConfig::dense(256, 64, 1, 2, 2, 32, 128, None);
    let mut r = Rng::new(15);
    for dev in devices() {
        let dev = dev.as_ref();
        let shape = (2, 40);
        check_mixed_precision(dev, "hd64 G1 elementwise GQA", &hd64, shape, &mut r, "attn_fwd_tc_hd64");
        check_mixed_precision(dev, "hd128 G1 headwise", &hd128, shape, &mut r, "attn_fwd_tc_hd128");
        check_mixed_precision(dev, "hd32 ungated", &hd32, shape, &mut r, "attn_fwd_hd32");

        // f32 precision at head_dim 64: the f32 kernel, the f32 loss
        let rec = Recording::new(dev);
        let model: Model<f32> = Model::new(hd64.clone(), 3).unwrap();
        let (batch, seq) = shape;
        let ids: Vec<u32> = (0..batch * seq).map(|_| r.below(256) as u32).collect();
        let targets = shifted_targets(&ids, seq);
        let b = Batch {
            ids: &ids,
            targets: &targets,
            batch,
            seq,
        };
        let loss = model.forward_loss(&b, &mut NoObserver).unwrap();
        let mut dm = DeviceModel::new(&rec, &model, Precision::F32).unwrap();
        assert!(!dm.tc_attention());
        let dloss = dm.loss(&ids, &targets, batch, seq).unwrap();
        assert!(
            (loss - dloss).abs() < 1e-5 * loss,
            "f32 hd64: loss {dloss} vs CPU {loss}"
        );
        let launches = rec.launches.borrow().clone();
        assert_eq!(launches.iter().filter(|k| *k == "attn_fwd_hd64").count(), 2);
        assert!(!launches.iter().any(|k| k.starts_with("attn_fwd_tc")));
    }
}

#[test]
fn unsupported_models_are_refused_with_the_reason() {
    let emu = gated_lm::backend::cuda::emu::Emu::open().unwrap();
    let moe: Model<f32> = Model::new(ModelConfig::preset("moe-micro", None).unwrap(), 1).unwrap();
    let e = DeviceModel::new(&emu, &moe, Precision::F32).err().unwrap();
    assert!(format!("{e}").contains("Mixture-of-Experts"), "{e}");
    let g2 = ModelConfig::preset("micro", GateConfig::parse_spec("g2").unwrap()).unwrap();
    let e = DeviceModel::new(&emu, &Model::new(g2, 1).unwrap(), Precision::F32)
        .err()
        .unwrap();
    assert!(format!("{e}").contains("only the G1"), "{e}");
    // a Mistral-style sliding window is CPU-only (the device attention is plain causal)
    let mut swa = ModelConfig::preset("micro", None).unwrap();
    swa.sliding_window = Some(8);
    let e = DeviceModel::new(&emu, &Model::new(swa, 1).unwrap(), Precision::F32)
        .err()
        .unwrap();
    assert!(format!("{e}").contains("sliding-window attention (window 8)"), "{e}");
    let m: Model<f32> = Model::new(ModelConfig::preset("micro", None).unwrap(), 1).unwrap();
    let mut dm = DeviceModel::new(&emu, &m, Precision::F32).unwrap();
    let e = dm.forward_backward(&[600, 1], &[1, 2], 1, 2).unwrap_err();
    assert!(
        format!("{e}").contains("token id 600 is outside the vocabulary (size 512)"),
        "{e}"
    );
}

fn bench(args: &[&str]) -> serde_json::Value {
    // GATED_LM_EXE: the binary when the tests run away from their build tree (scripts/gpu-check.sh)
    let exe = std::env::var("GATED_LM_EXE").unwrap_or_else(|_| env!("CARGO_BIN_EXE_gated-lm").into());
    let out = std::process::Command::new(exe)
        .arg("bench")
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    let line = text.lines().find(|l| l.starts_with("RESULT ")).expect("a RESULT line");
    serde_json::from_str(&line[7..]).unwrap()
}

/// `bench --device emu` runs the device path end to end: same model, same batch, same first
/// loss as the CPU bench.
#[test]
fn device_bench_reports_the_cpu_loss() {
    let common = [
        "--preset", "micro", "--gate", "headwise", "--steps", "1", "--warmup", "0", "--batch", "1", "--seq", "16",
    ];
    let cpu = bench(&common);
    let emu = bench(&[&common[..], &["--device", "emu"]].concat());
    assert_eq!(emu["impl"], "gated-lm-emu");
    let (l1, l2) = (cpu["loss"].as_f64().unwrap(), emu["loss"].as_f64().unwrap());
    assert!((l1 - l2).abs() <= 2e-4, "cpu loss {l1}, device loss {l2}");
    assert!(emu["tokens_per_s"].as_f64().unwrap() > 0.0);
}

/// 200k characters of the embedded books as a corpus file in `dir`.
fn corpus_file(dir: &std::path::Path) -> std::path::PathBuf {
    let text = &gated_lm::train::data::embedded_corpus().unwrap()[0];
    let (s, e) = (
        text.char_indices().nth(100_000).unwrap().0,
        text.char_indices().nth(300_000).unwrap().0,
    );
    let p = dir.join("corpus.txt");
    std::fs::write(&p, &text[s..e]).unwrap();
    p
}

/// The cpu-micro recipe on `corpus`.
fn micro_run(corpus: &std::path::Path) -> gated_lm::train::config::TrainConfig {
    let mut c = gated_lm::train::config::TrainConfig::preset("cpu-micro").unwrap();
    c.data.paths = vec![corpus.display().to_string()];
    c
}

fn emu_choice() -> gated_lm::engine::DeviceChoice {
    gated_lm::engine::DeviceChoice {
        device: "emu".into(),
        precision: "f32".into(),
        ..Default::default()
    }
}

/// Training losses of a run directory, by step.
fn train_losses(dir: &std::path::Path) -> Vec<f64> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r.get("loss").is_some() && r.get("val_loss").is_none())
        .map(|r| r["loss"].as_f64().unwrap())
        .collect()
}

/// The evaluation rows of a run directory (validation loss and probes), by step.
fn eval_rows(dir: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r.get("val_loss").is_some())
        .collect()
}

/// `train --device emu`: the run's losses, and its evaluations' losses and probes (computed on
/// the device, from its own weights), follow the CPU run's (same data, same init), the run
/// directory is complete, and a stopped-and-resumed device run is bit-identical to an
/// uninterrupted one (the checkpoint carries the device's weights and moments exactly).
#[test]
fn device_training_run_follows_the_cpu_run_and_resumes_exactly() {
    use gated_lm::train::{run, RunOptions};
    let tmp = tempfile::tempdir().unwrap();
    let corpus = corpus_file(tmp.path());
    let cfg = || {
        let mut c = micro_run(&corpus);
        (
            c.train.max_steps,
            c.train.batch_size,
            c.train.seq_len,
            c.train.grad_accum,
        ) = (6, 2, 32, 2);
        // two eval batches: the first with the probes, both on the device
        (c.train.eval_every, c.train.checkpoint_every, c.train.eval_batches) = (3, 4, 2);
        c.schedule.warmup_steps = 2;
        c
    };
    let emu = emu_choice();
    let losses = train_losses;
    let (c, d, r) = (
        tmp.path().join("cpu"),
        tmp.path().join("dev"),
        tmp.path().join("resumed"),
    );
    let sc = run(cfg(), &c, &RunOptions::default()).unwrap();
    let opts = RunOptions {
        device: emu.clone(),
        ..Default::default()
    };
    let sd = run(cfg(), &d, &opts).unwrap();
    let (lc, ld) = (losses(&c), losses(&d));
    assert_eq!(lc.len(), 6);
    for (i, (a, b)) in lc.iter().zip(&ld).enumerate() {
        assert!((a - b).abs() < 1e-4 * a, "step {}: cpu {a}, device {b}", i + 1);
    }
    assert!((sc.final_val_loss - sd.final_val_loss).abs() < 1e-3 * sc.final_val_loss);
    let (ec, ed) = (eval_rows(&c), eval_rows(&d));
    assert_eq!(ec.len(), 2, "evaluations at steps 3 and 6");
    assert_eq!(ec.len(), ed.len());
    for (rc, rd) in ec.iter().zip(&ed) {
        assert_eq!(rc["step"], rd["step"]);
        for key in ["val_loss", "first_token_attn", "m_act", "gate_mean"] {
            let (a, b) = (rc[key].as_f64().unwrap(), rd[key].as_f64().unwrap());
            assert!(
                (a - b).abs() <= 1e-4 * a.abs().max(1e-2),
                "step {}: {key}: cpu {a}, device {b}",
                rc["step"]
            );
        }
    }
    assert!(d.join("model/model.safetensors").exists() && d.join("report.md").exists());

    let stop = RunOptions {
        device: emu.clone(),
        stop_after: Some(3),
        ..Default::default()
    };
    run(cfg(), &r, &stop).unwrap();
    let resume = RunOptions {
        device: emu,
        resume: true,
        ..Default::default()
    };
    run(cfg(), &r, &resume).unwrap();
    let lr = losses(&r);
    assert_eq!(
        lr.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        ld.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        "resumed device run {lr:?} vs uninterrupted {ld:?}"
    );
}

/// Data parallelism: two ranks (threads, each on its own emulator device, gradients summed
/// through host memory) with one micro-batch each train like one process with two micro-batches
/// per step, report the same global losses, and end with bit-identical weights.
#[test]
fn two_data_parallel_ranks_train_like_one_process_with_twice_the_micro_batches() {
    use gated_lm::backend::cuda::dist::{GradAllReduce, HostAllReduce};
    use gated_lm::engine::Dist;
    use gated_lm::train::{run, RunOptions};
    use std::sync::Arc;
    let tmp = tempfile::tempdir().unwrap();
    let corpus = corpus_file(tmp.path());
    let cfg = move |accum: usize| {
        let mut c = micro_run(&corpus);
        (c.train.max_steps, c.train.batch_size, c.train.seq_len) = (4, 2, 32);
        (c.train.grad_accum, c.train.eval_every, c.train.eval_batches) = (accum, 100, 1);
        c
    };
    let (emu, losses) = (emu_choice, train_losses);
    let single = tmp.path().join("single");
    let opts = RunOptions {
        device: emu(),
        ..Default::default()
    };
    run(cfg(2), &single, &opts).unwrap();
    let dp = tmp.path().join("dp");
    let handles: Vec<_> = HostAllReduce::group(2)
        .into_iter()
        .map(|comm| {
            let rank = comm.rank();
            let out = if rank == 0 { dp.clone() } else { dp.join("rank1") };
            let cfg = cfg.clone();
            std::thread::spawn(move || {
                let opts = RunOptions {
                    device: emu(),
                    dist: Some(Dist(Arc::new(comm))),
                    ..Default::default()
                };
                run(cfg(1), &out, &opts).unwrap();
                out
            })
        })
        .collect();
    let outs: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let (ls, l0, l1) = (losses(&single), losses(&outs[0]), losses(&outs[1]));
    assert_eq!(ls.len(), 4);
    assert_eq!(l0, l1, "both ranks report the global loss");
    for (i, (a, b)) in ls.iter().zip(&l0).enumerate() {
        assert!(
            (a - b).abs() < 1e-5 * a,
            "step {}: one process {a}, data-parallel {b}",
            i + 1
        );
    }
    let (m0, _) = gated_lm::io::hf::load_model(&outs[0].join("model")).unwrap();
    let (m1, _) = gated_lm::io::hf::load_model(&outs[1].join("model")).unwrap();
    assert!(m0.params == m1.params, "ranks' weights diverged");
}

/// NCCL on one GPU (the single-device case of the multi-GPU path): a world of one leaves the
/// gradients as they are. Skips without a GPU or libnccl.
#[test]
fn nccl_world_of_one_is_the_identity() {
    use gated_lm::backend::cuda::dist::{DistEnv, GradAllReduce, Nccl};
    use gated_lm::backend::cuda::runtime::{down_f32, up_f32};
    let gpu = match gated_lm::backend::cuda::device::Gpu::open(0) {
        Ok(g) => g,
        Err(e) => return eprintln!("SKIPPED: {e:#}"),
    };
    let tmp = tempfile::tempdir().unwrap();
    let env = DistEnv {
        rank: 0,
        world: 1,
        local_rank: 0,
        id_file: tmp.path().join("id"),
    };
    let comm = match Nccl::init(&env, std::time::Duration::from_secs(10)) {
        Ok(c) => c,
        Err(e) if format!("{e}").contains("was not found") => return eprintln!("SKIPPED: {e:#}"),
        Err(e) => panic!("{e:#}"),
    };
    let x: Vec<f32> = (0..1000).map(|i| (i as f32).sin()).collect();
    let mut bufs = vec![up_f32(&gpu, &x).unwrap(), up_f32(&gpu, &x[..10]).unwrap()];
    comm.all_reduce_sum(&gpu, &mut bufs).unwrap();
    assert_eq!(down_f32(&gpu, &bufs[0]).unwrap(), x);
    assert_eq!(down_f32(&gpu, &bufs[1]).unwrap(), &x[..10]);
    assert_eq!(
        std::fs::read(&env.id_file).unwrap().len(),
        128,
        "rank 0 publishes the NCCL id"
    );
}

#[test]
fn data_parallel_environment_is_read_like_torchrun() {
    use gated_lm::backend::cuda::dist::DistEnv;
    // one test owns these variables (tests of this binary do not read them otherwise)
    std::env::remove_var("WORLD_SIZE");
    assert_eq!(DistEnv::from_env().unwrap(), None);
    std::env::set_var("WORLD_SIZE", "4");
    std::env::set_var("RANK", "2");
    let e = DistEnv::from_env().unwrap_err();
    assert!(format!("{e}").contains("GATED_LM_NCCL_ID"), "{e}");
    std::env::set_var("GATED_LM_NCCL_ID", "/shared/id");
    let d = DistEnv::from_env().unwrap().unwrap();
    assert_eq!((d.rank, d.world, d.local_rank), (2, 4, 2));
    std::env::set_var("RANK", "4");
    assert!(format!("{}", DistEnv::from_env().unwrap_err()).contains("not below WORLD_SIZE"));
    for k in ["WORLD_SIZE", "RANK", "GATED_LM_NCCL_ID"] {
        std::env::remove_var(k);
    }
}

/// The device counts the bytes its buffers hold (what `bench` reports as `device_peak_gib`,
/// beside torch's `max_mem_gib`): a device model holds its f32 weights, gradients and AdamW
/// moments and the bf16 copies; its first step adds exactly one planned arena, a new shape
/// replaces it, and dropping the model frees everything.
#[test]
fn device_memory_is_counted_and_freed() {
    let dev = gated_lm::backend::cuda::emu::Emu::open().unwrap();
    let gate = GateConfig::parse_spec("elementwise").unwrap();
    let model: Model<f32> = Model::new(ModelConfig::dense(256, 128, 2, 2, 1, 64, 128, gate), 3).unwrap();
    let params: usize = model.params.tensors.iter().map(|t| t.data.len()).sum();
    let (before, _) = dev.memory().unwrap();
    let mut dm = DeviceModel::new(&dev, &model, Precision::Bf16).unwrap();
    let (held, _) = dev.memory().unwrap();
    let model_bytes = held - before;
    // 16 bytes per parameter in f32, at most 2 more for the bf16 copies, the RoPE table (cos
    // and sin, f32, for every position) and the optimizer's small tables
    let rope = 4 * model.cfg.max_position_embeddings.min(1 << 16) * model.cfg.head_dim;
    assert!(
        (16 * params + rope / 2..18 * params + rope + (64 << 10)).contains(&model_bytes),
        "{model_bytes} bytes for {params} parameters"
    );
    let mut r = Rng::new(8);
    for (batch, seq) in [(2, 40), (2, 40), (1, 24)] {
        let ids: Vec<u32> = (0..batch * seq).map(|_| r.below(256) as u32).collect();
        dm.forward_backward(&ids, &shifted_targets(&ids, seq), batch, seq)
            .unwrap();
        let (live, peak) = dev.memory().unwrap();
        assert_eq!(live - held, dm.step_memory_bytes(), "{batch}×{seq}: one step arena");
        assert!(peak >= live);
    }
    drop(dm);
    assert_eq!(dev.memory().unwrap().0, before, "dropping the model frees its memory");
}
