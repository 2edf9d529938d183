//! Evaluation probes reduced on the device (`DeviceModel::probe_loss`): the sink /
//! massive-activation / gate metrics equal the host observers' on the CPU model's forward of
//! the same weights and batch — to f32 rounding in f32, to bf16 rounding on the tensor-core
//! path — and the probed forward's loss is the plain forward's, bit for bit.
#![cfg(feature = "cuda")]

use gated_lm::analysis::probes::{SinkProbe, SinkStats};
use gated_lm::backend::cuda::runtime::Device;
use gated_lm::config::{GateConfig, ModelConfig};
use gated_lm::engine::device::{DeviceModel, Precision};
use gated_lm::model::observer::GATE_BINS;
use gated_lm::model::{Batch, Model};
use gated_lm::rng::Rng;

mod common;
use common::cuda_devices as devices;

/// A model whose metrics are not all alike: sharper attention (q and k scaled up) and gate
/// logits spread over the sigmoid's range (scores from near 0 to near 1, in every bin).
fn spread_model(cfg: &ModelConfig, seed: u64) -> Model<f32> {
    let mut m: Model<f32> = Model::new(cfg.clone(), seed).unwrap();
    for li in m.index.layers.clone() {
        for (i, s) in [(Some(li.q_proj), 3.0), (Some(li.k_proj), 3.0), (li.gate, 40.0)] {
            if let Some(i) = i {
                m.params.tensors[i].data.iter_mut().for_each(|x| *x *= s);
            }
        }
    }
    m
}

/// Tolerances of one comparison: relative on the attention and activation metrics, absolute
/// on the gate mean, and on the counts (histogram bins, small outputs) the share of the
/// values allowed to fall on the other side of a bin edge or threshold.
struct Tol {
    attn: f64,
    act: f64,
    gate_mean: f64,
    counts: f64,
}

fn compare(what: &str, got: &SinkStats, want: &SinkStats, tol: &Tol) {
    let rel = |a: f64, b: f64, t: f64, m: &str| {
        assert!(
            (a - b).abs() <= t * b.abs().max(1e-3),
            "{what}: {m}: device {a}, host {b}"
        );
    };
    for (l, (g, w)) in got
        .first_token_attn_per_head
        .iter()
        .zip(&want.first_token_attn_per_head)
        .enumerate()
    {
        assert_eq!(g.len(), w.len(), "{what}: heads of layer {l}");
        for (h, (a, b)) in g.iter().zip(w).enumerate() {
            rel(*a, *b, tol.attn, &format!("key-0 attention, layer {l} head {h}"));
        }
    }
    assert_eq!(
        got.first_token_attn_per_head.len(),
        want.first_token_attn_per_head.len()
    );
    assert_eq!(got.sink_rate, want.sink_rate, "{what}: sink rate");
    for (l, (a, b)) in got.m_act_per_layer.iter().zip(&want.m_act_per_layer).enumerate() {
        rel(*a, *b, tol.act, &format!("max |h| of layer {l}"));
    }
    assert_eq!(got.gate_mean.is_some(), want.gate_mean.is_some(), "{what}: gated");
    for (l, (a, b)) in got
        .gate_mean_per_layer
        .iter()
        .zip(&want.gate_mean_per_layer)
        .enumerate()
    {
        assert!(
            (a - b).abs() <= tol.gate_mean,
            "{what}: gate mean of layer {l}: {a} vs {b}"
        );
    }
    let total: u64 = want.gate_histogram.iter().sum();
    let moved: u64 = got
        .gate_histogram
        .iter()
        .zip(&want.gate_histogram)
        .map(|(a, b)| a.abs_diff(*b))
        .sum();
    assert!(
        moved as f64 <= tol.counts * total as f64,
        "{what}: gate histogram {:?} vs {:?}",
        got.gate_histogram,
        want.gate_histogram
    );
    for (a, b, m) in [
        (got.gate_frac_below_0_1, want.gate_frac_below_0_1, "gate scores < 0.1"),
        (got.gate_frac_above_0_9, want.gate_frac_above_0_9, "gate scores > 0.9"),
        (
            Some(got.attn_output_frac_below_1e_2),
            Some(want.attn_output_frac_below_1e_2),
            "outputs < 1e-2",
        ),
        (
            Some(got.attn_output_frac_below_1e_3),
            Some(want.attn_output_frac_below_1e_3),
            "outputs < 1e-3",
        ),
    ] {
        let (a, b) = (a.unwrap_or(0.0), b.unwrap_or(0.0));
        assert!((a - b).abs() <= tol.counts, "{what}: {m}: device {a}, host {b}");
    }
}

/// The host's probes and the device's of one forward; asserts the probed loss is the plain one.
fn probe_both(
    dev: &dyn Device,
    cfg: &ModelConfig,
    precision: Precision,
    (batch, seq): (usize, usize),
) -> [SinkStats; 2] {
    let model = spread_model(cfg, 5);
    let mut r = Rng::new(21);
    let (ids, targets) = common::random_tokens(&mut r, cfg.vocab_size, (batch, seq));
    let b = Batch {
        ids: &ids,
        targets: &targets,
        batch,
        seq,
    };
    let (layers, heads) = (cfg.num_layers, cfg.num_heads);
    let mut host = SinkProbe::new(layers, heads, batch, seq, 0.3);
    model.forward_loss(&b, &mut host).unwrap();
    let mut dm = DeviceModel::new(dev, &model, precision).unwrap();
    let plain = dm.loss(&ids, &targets, batch, seq).unwrap();
    let mut probe = SinkProbe::new(layers, heads, batch, seq, 0.3);
    let probed = dm.probe_loss(&b, &mut probe).unwrap();
    assert_eq!(
        probed.to_bits(),
        plain.to_bits(),
        "the probes change the loss: {probed} vs {plain}"
    );
    // the same again: the totals are summed in a fixed order
    let mut again = SinkProbe::new(layers, heads, batch, seq, 0.3);
    dm.probe_loss(&b, &mut again).unwrap();
    let (s, s2) = (probe.stats(), again.stats());
    assert_eq!(
        serde_json::to_string(&s).unwrap(),
        serde_json::to_string(&s2).unwrap(),
        "two probed forwards differ"
    );
    [s, host.stats()]
}

/// [`probe_both`] on every device for each case, compared within `tol`; each case's host
/// statistics (of the last device) for further checks.
fn probe_all<'c>(
    cases: &'c [(&'c str, ModelConfig)],
    precision: Precision,
    shape: (usize, usize),
    tol: &Tol,
) -> Vec<(&'c str, &'c ModelConfig, SinkStats)> {
    let mut wants = Vec::new();
    for dev in devices() {
        wants.clear();
        for (name, cfg) in cases {
            let [got, want] = probe_both(dev.as_ref(), cfg, precision, shape);
            compare(&format!("{} {name}", dev.describe()), &got, &want, tol);
            wants.push((*name, cfg, want));
        }
    }
    wants
}

fn gate(s: &str) -> Option<GateConfig> {
    GateConfig::parse_spec(s).unwrap()
}

/// f32 precision (the f32 attention kernels): every metric as the host's, to f32 rounding.
#[test]
fn f32_device_probes_equal_the_host_observers() {
    let micro = |g| ModelConfig::preset("micro", g).unwrap();
    let tol = Tol {
        attn: 1e-5,
        act: 1e-5,
        gate_mean: 1e-6,
        counts: 1e-3,
    };
    let cases = [
        ("ungated", micro(None)),
        ("G1 elementwise, GQA", micro(gate("elementwise"))),
        ("G1 headwise, GQA", micro(gate("headwise"))),
    ];
    for (name, cfg, want) in probe_all(&cases, Precision::F32, (2, 24), &tol) {
        if cfg.gate.is_some() {
            // the spread gate fills the histogram's ends, so its bins are really compared
            let h = &want.gate_histogram;
            assert_eq!(h.len(), GATE_BINS);
            assert!(h[0] > 0 && h[GATE_BINS - 1] > 0, "{name}: gate histogram {h:?}");
        }
        assert!(
            want.first_token_attn > 0.0 && want.attn_output_frac_below_1e_2 > 0.0,
            "{name}: {want:?}"
        );
    }
}

/// Mixed precision on the tensor-core attention (head_dim 64 and 128): the device's metrics
/// come from the bf16 q, k, y and z the forward ran on, so they match the f32 host model's to
/// bf16 rounding.
#[test]
fn tensor_core_device_probes_track_the_f32_host_observers() {
    let hd64 = ModelConfig::dense(256, 128, 2, 2, 1, 64, 128, gate("elementwise"));
    let hd128 = ModelConfig::dense(256, 128, 1, 1, 1, 128, 128, gate("headwise"));
    let tol = Tol {
        attn: 2e-2,
        act: 3e-2,
        gate_mean: 5e-3,
        counts: 3e-2,
    };
    let cases = [("hd64 G1 elementwise GQA", hd64), ("hd128 G1 headwise", hd128)];
    probe_all(&cases, Precision::Bf16, (2, 40), &tol);
}
