//! Whole-model gradient checks in float64 by central finite differences, for every gate variant
//! (position × granularity × sharing × combine × activation × input dependence) and every
//! parameter tensor, plus the identities the paper relies on.

use gated_lm::config::{GateActivation, GateCombine, GateConfig, GateGranularity, GatePosition, NormStyle};
use gated_lm::model::observer::NoObserver;
use gated_lm::model::params::ParamStore;
use gated_lm::model::{shifted_targets, Batch, Model};

mod common;
use common::{fd_check, ids, jitter_norms, logits, tiny_cfg, B, T};

fn all_gates() -> Vec<GateConfig> {
    let mut v = Vec::new();
    for position in [
        GatePosition::G1,
        GatePosition::G2,
        GatePosition::G3,
        GatePosition::G4,
        GatePosition::G5,
    ] {
        for granularity in [GateGranularity::Elementwise, GateGranularity::Headwise] {
            for head_shared in [false, true] {
                for combine in [GateCombine::Multiplicative, GateCombine::Additive] {
                    for activation in [GateActivation::Sigmoid, GateActivation::Silu, GateActivation::NsSigmoid] {
                        for input_independent in [false, true] {
                            v.push(GateConfig {
                                position,
                                granularity,
                                head_shared,
                                combine,
                                activation,
                                input_independent,
                                init_std: Some(0.5),
                            });
                        }
                    }
                }
            }
        }
    }
    v
}

#[test]
fn every_gate_variant_every_parameter() {
    let gates = all_gates();
    assert_eq!(gates.len(), 240);
    for (k, g) in gates.into_iter().enumerate() {
        let spec = g.spec();
        let mut m: Model<f64> = Model::new(tiny_cfg(Some(g)), k as u64).unwrap();
        jitter_norms(&mut m, k as u64);
        fd_check(&mut m, 3, &spec);
    }
}

#[test]
fn model_options_zero_centred_partial_rope_tied() {
    for (style, partial, tied, gate) in [
        (NormStyle::Standard, 1.0, false, None),
        (
            NormStyle::ZeroCentered,
            0.5,
            false,
            Some(GateConfig::g1(GateGranularity::Elementwise)),
        ),
        (
            NormStyle::Standard,
            0.5,
            true,
            Some(GateConfig::g1(GateGranularity::Headwise)),
        ),
        (NormStyle::ZeroCentered, 1.0, true, None),
    ] {
        let mut c = tiny_cfg(gate);
        c.norm_style = style;
        c.partial_rotary_factor = partial;
        c.tie_word_embeddings = tied;
        let mut m: Model<f64> = Model::new(c, 5).unwrap();
        jitter_norms(&mut m, 6);
        fd_check(&mut m, 12, &format!("{style:?} partial {partial} tied {tied}"));
    }
}

/// Copy the tensors the gated model shares with the ungated one.
fn ungated_twin(gated: &Model<f64>) -> Model<f64> {
    let mut cfg = gated.cfg.clone();
    cfg.gate = None;
    let mut base: Model<f64> = Model::new(cfg, 0).unwrap();
    for (i, n) in base.params.names.clone().iter().enumerate() {
        base.params.tensors[i] = gated.params.get(n).unwrap().clone();
    }
    base
}

#[test]
fn gate_of_one_and_additive_zero_reproduce_the_ungated_model() {
    for g in all_gates() {
        let mut m: Model<f64> = Model::new(tiny_cfg(Some(g.clone())), 3).unwrap();
        jitter_norms(&mut m, 4);
        let gi: Vec<usize> = m.index.layers.iter().map(|l| l.gate.unwrap()).collect();
        let value = match (g.combine, g.activation, g.input_independent) {
            // sigmoid(40) == 1.0 exactly in f64; only the static gate can be forced for every X
            (GateCombine::Multiplicative, GateActivation::Sigmoid, true) => 40.0,
            // silu(0) == 0: adding it changes nothing
            (GateCombine::Additive, GateActivation::Silu, _) => 0.0,
            _ => continue,
        };
        for &i in &gi {
            m.params.tensors[i].data.fill(value);
        }
        assert_eq!(logits(&m), logits(&ungated_twin(&m)), "{}", g.spec());
    }
}

#[test]
fn zero_weight_sigmoid_g1_gate_halves_the_attention_output() {
    for gran in [GateGranularity::Elementwise, GateGranularity::Headwise] {
        let mut m: Model<f64> = Model::new(tiny_cfg(Some(GateConfig::g1(gran))), 8).unwrap();
        for l in m.index.layers.clone() {
            m.params.tensors[l.gate.unwrap()].data.fill(0.0);
        }
        let mut base = ungated_twin(&m);
        for l in base.index.layers.clone() {
            base.params.tensors[l.o_proj].data.iter_mut().for_each(|x| *x *= 0.5);
        }
        for (a, b) in logits(&m).iter().zip(logits(&base)) {
            assert!((a - b).abs() < 1e-12);
        }
    }
}

#[test]
fn f32_and_f64_engines_agree_and_runs_are_deterministic() {
    let mut m: Model<f64> = Model::new(tiny_cfg(Some(GateConfig::g1(GateGranularity::Elementwise))), 1).unwrap();
    jitter_norms(&mut m, 2);
    let m32: Model<f32> = Model::from_params(m.cfg.clone(), m.params.cast()).unwrap();
    let ids = ids();
    let tg = shifted_targets(&ids, T);
    let b = Batch {
        ids: &ids,
        targets: &tg,
        batch: B,
        seq: T,
    };
    let run = |m: &Model<f32>| {
        let mut g: ParamStore<f32> = m.zero_grads();
        let l = m.forward_backward(&b, &mut g, &mut NoObserver).unwrap();
        (l, g)
    };
    let (l1, g1) = run(&m32);
    let (l2, g2) = run(&m32);
    assert_eq!(l1.to_bits(), l2.to_bits());
    assert_eq!(g1, g2);
    let l64 = m.forward(&b, &mut NoObserver).unwrap().loss;
    assert!((l1 - l64).abs() < 1e-5, "{l1} vs {l64}");
}

/// Qwen2's q/k/v biases: with no QK-norm (Qwen2), with QK-norm, and under a gate at each of the
/// positions they feed (G2–G4 gate the biased projections themselves).
#[test]
fn attention_bias_qwen2_and_with_gates() {
    for (k, (spec, qk_norm)) in [
        ("none", false),
        ("none", true),
        ("elementwise", false),
        ("g2:headwise", false),
        ("g3:silu", true),
        ("g4:add", false),
    ]
    .into_iter()
    .enumerate()
    {
        let mut c = tiny_cfg(GateConfig::parse_spec(spec).unwrap());
        c.attention_bias = true;
        c.qk_norm = qk_norm;
        let mut m: Model<f64> = Model::new(c, 20 + k as u64).unwrap();
        jitter_norms(&mut m, 30 + k as u64);
        // non-zero biases (they start at zero)
        let mut r = gated_lm::rng::Rng::new(40 + k as u64);
        for (i, s) in m.specs.clone().iter().enumerate() {
            if s.name.ends_with(".bias") {
                m.params.tensors[i].data.iter_mut().for_each(|x| *x = 0.5 * r.normal());
            }
        }
        assert_eq!(m.specs.iter().filter(|s| s.name.ends_with("_proj.bias")).count(), 6);
        // every coordinate of every bias, a few of everything else
        let worst = fd_check(&mut m, 16, &format!("attention_bias {spec} qk_norm {qk_norm}"));
        eprintln!("attention_bias {spec} qk_norm {qk_norm}: worst relative error {worst:e}");
    }
}
