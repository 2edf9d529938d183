//! Helpers shared by the whole-model gradient tests (gradcheck.rs, moe.rs).
#![allow(dead_code)]

use gated_lm::config::{GateConfig, ModelConfig, NormStyle};
use gated_lm::model::ffn::aux_objective;
use gated_lm::model::observer::RouterLog;
use gated_lm::model::{shifted_targets, Batch, Model};
use gated_lm::rng::Rng;

#[cfg(feature = "cuda")]
pub mod bufs;
#[cfg(feature = "cuda")]
pub mod recording;

pub const B: usize = 2;
pub const T: usize = 6;

pub fn tiny_cfg(gate: Option<GateConfig>) -> ModelConfig {
    ModelConfig {
        vocab_size: 11,
        hidden_size: 8,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 4,
        intermediate_size: 12,
        rms_norm_eps: 1e-6,
        rope_theta: 10000.0,
        partial_rotary_factor: 1.0,
        norm_style: NormStyle::Standard,
        tie_word_embeddings: false,
        max_position_embeddings: 64,
        init_std: 0.4,
        rope_scaling: None,
        qk_norm: true,
        attention_bias: false,
        gate,
        moe: None,
        ..ModelConfig::dense(1, 1, 1, 1, 1, 1, 1, None)
    }
}

/// `batch × seq` uniform token ids below `vocab`, and their next-token targets.
pub fn random_tokens(r: &mut Rng, vocab: usize, (batch, seq): (usize, usize)) -> (Vec<u32>, Vec<u32>) {
    let ids: Vec<u32> = (0..batch * seq).map(|_| r.below(vocab as u64) as u32).collect();
    let targets = shifted_targets(&ids, seq);
    (ids, targets)
}

pub fn ids() -> Vec<u32> {
    let mut r = Rng::new(99);
    (0..B * T).map(|_| r.below(11) as u32).collect()
}

/// Perturb norm gains so they are not all 1 (or 0) and the (1+w) path is exercised.
pub fn jitter_norms(m: &mut Model<f64>, seed: u64) {
    let mut r = Rng::new(seed);
    for (i, s) in m.specs.clone().iter().enumerate() {
        if s.name.contains("norm") {
            m.params.tensors[i].data.iter_mut().for_each(|x| *x += 0.3 * r.normal());
        }
    }
}

/// The training objective: cross-entropy plus any MoE auxiliary losses.
pub fn loss(m: &Model<f64>, ids: &[u32]) -> f64 {
    let tg = shifted_targets(ids, T);
    let mut log = RouterLog::default();
    let ce = m
        .forward(
            &Batch {
                ids,
                targets: &tg,
                batch: B,
                seq: T,
            },
            &mut log,
        )
        .unwrap()
        .loss;
    ce + aux_objective(&m.cfg, &log.stats)
}

/// Check `coords` coordinates of every parameter tensor; returns the worst relative error.
pub fn fd_check(m: &mut Model<f64>, coords: usize, what: &str) -> f64 {
    let ids = ids();
    let tg = shifted_targets(&ids, T);
    let mut g = m.zero_grads();
    m.forward_backward(
        &Batch {
            ids: &ids,
            targets: &tg,
            batch: B,
            seq: T,
        },
        &mut g,
        &mut gated_lm::model::observer::NoObserver,
    )
    .unwrap();
    let h = 1e-5;
    let mut worst: f64 = 0.0;
    for ti in 0..m.params.tensors.len() {
        let n = m.params.tensors[ti].data.len();
        let gnorm = g.tensors[ti].data.iter().map(|x| x * x).sum::<f64>().sqrt();
        assert!(gnorm > 0.0, "{what}: {} has an all-zero gradient", m.params.names[ti]);
        for c in 0..coords.min(n) {
            let j = (c * 7919 + ti * 31) % n;
            let orig = m.params.tensors[ti].data[j];
            m.params.tensors[ti].data[j] = orig + h;
            let lp = loss(m, &ids);
            m.params.tensors[ti].data[j] = orig - h;
            let lm = loss(m, &ids);
            m.params.tensors[ti].data[j] = orig;
            let num = (lp - lm) / (2.0 * h);
            let err = (num - g.tensors[ti].data[j]).abs() / (1e-3 * gnorm / (n as f64).sqrt()).max(num.abs()).max(1e-6);
            assert!(
                err < 1e-4,
                "{what}: {}[{j}] numeric {num:e} analytic {:e}",
                m.params.names[ti],
                g.tensors[ti].data[j]
            );
            worst = worst.max(err);
        }
    }
    worst
}

/// Logits of `m` on the shared batch.
pub fn logits(m: &Model<f64>) -> Vec<f64> {
    let ids = ids();
    let tg = shifted_targets(&ids, T);
    let b = Batch {
        ids: &ids,
        targets: &tg,
        batch: B,
        seq: T,
    };
    m.forward(&b, &mut gated_lm::model::observer::NoObserver)
        .unwrap()
        .logits
}

/// Devices for the CUDA tests: the CPU emulator (needs g++; required where there is no GPU,
/// so CI cannot silently test nothing), and a GPU when present, once per GEMM path (the
/// portable kernel, and cuBLASLt where its library is found).
#[cfg(feature = "cuda")]
pub fn cuda_devices() -> Vec<Box<dyn gated_lm::backend::cuda::runtime::Device>> {
    use gated_lm::backend::cuda::{device::Gpu, emu::Emu, runtime::Device};
    let mut v: Vec<Box<dyn Device>> = Vec::new();
    let gpu = Gpu::open(0);
    // GATED_LM_SKIP_EMU: on a GPU machine, spend the (scarce) time on the GPU only
    let skip_emu = gpu.is_ok() && std::env::var_os("GATED_LM_SKIP_EMU").is_some();
    match if skip_emu {
        Err(anyhow::anyhow!("GATED_LM_SKIP_EMU is set"))
    } else {
        Emu::open()
    } {
        Ok(e) => v.push(Box::new(e)),
        Err(e) if gpu.is_ok() => eprintln!("SKIPPED (emulator runs; the GPU still runs): {e:#}"),
        Err(e) => panic!("the CUDA emulator needs a C++20 compiler (g++): {e:#}"),
    }
    match gpu {
        Ok(mut g) => {
            if g.use_blas {
                v.push(Box::new(Gpu::open(0).unwrap()));
            }
            g.use_blas = false;
            v.push(Box::new(g));
        }
        Err(e) => eprintln!("SKIPPED (GPU runs; the emulator still runs): {e:#}"),
    }
    v
}
