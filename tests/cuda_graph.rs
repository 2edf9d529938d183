//! The training step captured into a graph and replayed (a CUDA graph on a GPU; on the
//! emulator the recorded launches, run again in order): a step's only batch-dependent inputs
//! are staged in device memory before its launches (ids, targets, the loss scale, the
//! embedding backward's index), so replaying one capture computes every later batch exactly as
//! launching the kernels one by one does.
#![cfg(feature = "cuda")]

mod common;

use common::cuda_devices as devices;
use common::recording::Recording;
use gated_lm::backend::cuda::ops;
use gated_lm::backend::cuda::runtime::{down_f32, zeros_f32};
use gated_lm::config::{GateConfig, ModelConfig};
use gated_lm::engine::device::{DeviceModel, Precision};
use gated_lm::model::ops::cross_entropy::IGNORE;
use gated_lm::model::{shifted_targets, Model};
use gated_lm::optim::AdamWConfig;
use gated_lm::rng::Rng;

/// Batches that differ in everything a step reads from its staged inputs: the ids (and so the
/// embedding backward's grouping and its number of distinct ids), the targets and how many are
/// ignored (the loss scale, 1 / their count).
fn batches(vocab: usize, batch: usize, seq: usize) -> Vec<(Vec<u32>, Vec<u32>)> {
    let mut r = Rng::new(17);
    let n = batch * seq;
    let mut out = Vec::new();
    for k in 0..5 {
        let ids: Vec<u32> = match k {
            // three distinct ids only
            2 => (0..n).map(|_| [7, 1, 200][r.below(3) as usize]).collect(),
            _ => (0..n).map(|_| r.below(vocab as u64) as u32).collect(),
        };
        let mut tg = shifted_targets(&ids, seq);
        match k {
            // half the targets ignored
            3 => tg.iter_mut().step_by(2).for_each(|t| *t = IGNORE),
            4 => tg[..n - 3].iter_mut().for_each(|t| *t = IGNORE),
            _ => {}
        }
        out.push((ids, tg));
    }
    out
}

/// Training steps (forward and backward, then AdamW) and forward-only losses give the same
/// loss, gradients and parameters bit for bit with the step replayed from a graph as with its
/// kernels launched one by one; the graph holds exactly the eager step's launches and GEMMs.
/// f32 on the f32 attention (head_dim 32) and mixed precision on the tensor cores (head_dim
/// 64, GQA), each with three LM-head chunks (the cross-entropy reads the staged loss scale).
#[test]
fn graph_replayed_steps_equal_eager_steps_bit_for_bit() {
    let gate = |s: &str| GateConfig::parse_spec(s).unwrap();
    let cases = [
        (
            "hd32 G1 elementwise, f32",
            ModelConfig::dense(256, 64, 2, 2, 1, 32, 128, gate("elementwise")),
            Precision::F32,
        ),
        (
            "hd64 G1 headwise GQA, bf16 (tensor cores)",
            ModelConfig::dense(256, 128, 2, 2, 1, 64, 128, gate("headwise")),
            Precision::Bf16,
        ),
    ];
    let (batch, seq) = (2, 40);
    let opt = AdamWConfig::default();
    for dev in devices() {
        let dev = dev.as_ref();
        for (name, cfg, precision) in cases.clone() {
            let what = format!("{name} on {}", dev.describe());
            let model: Model<f32> = Model::new(cfg, 5).unwrap();
            let rec = Recording::new(dev);
            let mut eager = DeviceModel::new(&rec, &model, precision).unwrap();
            eager.set_graphs(false);
            let mut graphed = DeviceModel::new(dev, &model, precision).unwrap();
            graphed.set_graphs(true);
            for m in [&mut eager, &mut graphed] {
                m.set_head_chunk_rows(Some(32));
            }
            for (step, (ids, tg)) in batches(256, batch, seq).iter().enumerate() {
                eager.zero_grads().unwrap();
                graphed.zero_grads().unwrap();
                rec.launches.take();
                rec.vendor_gemms.take();
                let want = eager.forward_backward(ids, tg, batch, seq).unwrap();
                let eager_launches = rec.launches.take().len() + rec.vendor_gemms.take();
                let got = graphed.forward_backward(ids, tg, batch, seq).unwrap();
                assert_eq!(
                    got.to_bits(),
                    want.to_bits(),
                    "{what}: step {step}: loss {got} vs {want}"
                );
                assert!(
                    graphed.grads().unwrap() == eager.grads().unwrap(),
                    "{what}: step {step}: gradients"
                );
                // eager the first time (lazy initialisation outside a capture), then captured
                // and replayed: every later step is that one graph
                let captured = (step > 0).then_some(eager_launches);
                assert_eq!(
                    graphed.step_graph_launches(),
                    captured,
                    "{what}: step {step}: the graph"
                );
                let (e, g) = (
                    eager.loss(ids, tg, batch, seq).unwrap(),
                    graphed.loss(ids, tg, batch, seq).unwrap(),
                );
                assert_eq!(g.to_bits(), e.to_bits(), "{what}: step {step}: forward-only loss");
                eager.step(&opt, 3e-3, 1.0).unwrap();
                graphed.step(&opt, 3e-3, 1.0).unwrap();
            }
            assert!(
                graphed.params().unwrap() == eager.params().unwrap(),
                "{what}: parameters"
            );
        }
    }
}

/// A capture only records: nothing runs until a replay, each replay runs the launches again on
/// the buffers' current contents, and a copy, allocation or download inside a capture fails it
/// (as it would break a CUDA stream capture) without leaving the device capturing.
#[test]
fn a_capture_records_launches_and_refuses_copies() {
    for dev in devices() {
        let dev = dev.as_ref();
        let what = dev.describe();
        let mut buf = zeros_f32(dev, 4).unwrap();
        let e = dev.capture(&mut || dev.write(&mut buf, &[0u8; 4])).err();
        let e = e.map(|e| format!("{e:#}")).unwrap_or_default();
        assert!(e.contains("while capturing"), "{what}: a write inside a capture: {e:?}");
        let e = dev.capture(&mut || dev.zeros(4).map(drop)).err();
        assert!(e.is_some(), "{what}: an allocation inside a capture");
        let x = zeros_f32(dev, 4).unwrap();
        let g = dev
            .capture(&mut || {
                ops::fill(dev, &x, 2.0, 4)?;
                ops::fill(dev, &x, 3.0, 2)
            })
            .unwrap()
            .unwrap();
        assert_eq!(g.launches, 2, "{what}");
        assert_eq!(
            down_f32(dev, &x).unwrap(),
            [0.0; 4],
            "{what}: a capture ran its launches"
        );
        dev.replay(&g).unwrap();
        assert_eq!(down_f32(dev, &x).unwrap(), [3.0, 3.0, 2.0, 2.0], "{what}: replayed");
        ops::fill(dev, &x, 5.0, 4).unwrap();
        dev.replay(&g).unwrap();
        assert_eq!(
            down_f32(dev, &x).unwrap(),
            [3.0, 3.0, 2.0, 2.0],
            "{what}: replayed again"
        );
    }
}
