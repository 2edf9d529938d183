//! Issue 16: a GGUF loaded lazily (memory-mapped, each layer dequantised as it runs) analyses,
//! evaluates and generates bit for bit as the eager f32 load of the same file, with at most one
//! layer's f32 weights alive at once; training it refuses; a broken file names itself.

use gated_lm::analysis::analyze::analyze;
use gated_lm::io::gguf::lazy::load_gguf_lazy;
use gated_lm::io::gguf::load_gguf_model;
use gated_lm::io::load::{load_any, Loaded};
use gated_lm::model::decode::KvCache;
use gated_lm::model::observer::NoObserver;
use gated_lm::model::{shifted_targets, Batch, Model};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

fn fx(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/gguf-models")
        .join(name)
}

fn loaded(model: Model<f32>, source: &Path) -> Loaded {
    Loaded {
        model,
        tok: None,
        source: source.display().to_string(),
        train_seq_len: None,
        tok_problem: None,
    }
}

fn ids(vocab: usize, n: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7919 + 13) % vocab) as u32).collect()
}

/// The most bytes one layer's f32 weights take.
fn layer_bytes(m: &Model<f32>) -> usize {
    let lz = m.lazy.as_ref().unwrap();
    lz.layers
        .iter()
        .map(|l| {
            l.iter()
                .map(|&i| m.params.tensors[i].shape.iter().product::<usize>() * 4)
                .sum()
        })
        .max()
        .unwrap()
}

#[test]
fn lazy_load_analyses_evaluates_and_generates_as_the_eager_one() {
    let files = [
        "llama.gguf",
        "qwen2.gguf",
        "qwen3.gguf",
        "qwen3moe.gguf",
        "q/qwen3-256.Q4_K_M.gguf",
        "q/qwen3-256.Q2_K.gguf",
        "q/qwen3-256.IQ4_XS.gguf",
        "q/qwen3-256.Q8_0.gguf",
    ];
    for f in files {
        let p = fx(f);
        let (eager, _) = load_gguf_model(&p).unwrap();
        let (lazy, _) = load_gguf_lazy(&p).unwrap();
        assert!(lazy.is_lazy() && !eager.is_lazy());
        let layers = lazy.cfg.num_layers;
        // only the tensors outside the layers hold f32 data
        for (n, t) in lazy.params.names.iter().zip(&lazy.params.tensors) {
            assert_eq!(t.data.is_empty(), n.starts_with("model.layers."), "{f}: {n}");
        }
        let t = 40;
        let x = ids(lazy.cfg.vocab_size, t);
        // analysis: every metric and per-layer map identical
        let (el, ll) = (loaded(eager, &p), loaded(lazy, &p));
        let a = serde_json::to_string(&analyze(&el, &x, 0.3).unwrap()).unwrap();
        let b = serde_json::to_string(&analyze(&ll, &x, 0.3).unwrap()).unwrap();
        assert_eq!(a, b, "{f}: analysis differs");
        let (eager, lazy) = (el.model, ll.model);
        let lz = lazy.lazy.as_ref().unwrap();
        assert_eq!(lz.loads.load(Ordering::Relaxed), layers, "{f}: one load per layer");
        let peak = lz.peak_bytes.load(Ordering::Relaxed);
        assert!(
            peak > 0 && peak <= layer_bytes(&lazy),
            "{f}: {peak} bytes of layer weights alive, one layer is {}",
            layer_bytes(&lazy)
        );
        // evaluation: logits and loss bit for bit
        let tg = shifted_targets(&x, t);
        let b = Batch {
            ids: &x,
            targets: &tg,
            batch: 1,
            seq: t,
        };
        let fe = eager.forward(&b, &mut NoObserver).unwrap();
        let fl = lazy.forward(&b, &mut NoObserver).unwrap();
        assert_eq!(fe.loss.to_bits(), fl.loss.to_bits(), "{f}");
        assert!(
            fe.logits
                .iter()
                .zip(&fl.logits)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{f}"
        );
        // generation's KV-cache path: a prefill then single tokens
        let (mut ce, mut cl) = (
            KvCache::new(&eager, None, 0).unwrap(),
            KvCache::new(&lazy, None, 0).unwrap(),
        );
        for chunk in [&x[..8], &x[8..9], &x[9..10]] {
            let (le, ll) = (
                eager.decode(&mut ce, chunk).unwrap(),
                lazy.decode(&mut cl, chunk).unwrap(),
            );
            assert!(
                le.iter().zip(&ll).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{f}: decode"
            );
        }
        assert!(lz.peak_bytes.load(Ordering::Relaxed) <= layer_bytes(&lazy));
    }
}

#[test]
fn load_any_maps_a_gguf_lazily() {
    let l = load_any(&fx("qwen3.gguf")).unwrap();
    assert!(l.model.is_lazy());
    // the estimate counts one layer of f32 weights, not all of them
    let lazy_need = l.model.prefill_need(2048).total();
    let (eager, _) = load_gguf_model(&fx("qwen3.gguf")).unwrap();
    let eager_need = eager.prefill_need(2048).total();
    let params: u128 = eager.params.numel() as u128 * 4;
    assert!(lazy_need < eager_need + params, "{lazy_need} vs {eager_need}");
}

#[test]
fn a_7b_q4_k_m_analysis_is_estimated_to_fit_in_24_gib() {
    // Llama-2-7B: the quantised file ~3.9 GB, embedding and head 2 × 0.5 GB in f32
    let cfg = gated_lm::config::ModelConfig::dense(32000, 4096, 32, 32, 32, 128, 11008, None);
    let layer = 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096;
    let need = gated_lm::model::memory::prefill_lazy(&cfg, 2048, 3_900_000_000, 2 * 32000 * 4096 + 4096, layer);
    assert!(need.total() < 10 << 30, "{} bytes", need.total());
    assert!(gated_lm::model::memory::prefill(&cfg, 2048).total() > 24 << 30);
}

#[test]
fn training_a_lazy_model_refuses_until_materialised() {
    let p = fx("qwen3.gguf");
    let (mut lazy, _) = load_gguf_lazy(&p).unwrap();
    let (eager, _) = load_gguf_model(&p).unwrap();
    let x = ids(lazy.cfg.vocab_size, 16);
    let tg = shifted_targets(&x, 16);
    let b = Batch {
        ids: &x,
        targets: &tg,
        batch: 1,
        seq: 16,
    };
    let mut g = lazy.zero_grads();
    let e = format!("{:#}", lazy.forward_backward(&b, &mut g, &mut NoObserver).unwrap_err());
    assert!(e.contains("qwen3.gguf") && e.contains("materialize"), "{e}");
    lazy.materialize("training").unwrap();
    assert!(!lazy.is_lazy());
    assert_eq!(lazy.params, eager.params);
    let mut ge = eager.zero_grads();
    let (l1, l2) = (
        lazy.forward_backward(&b, &mut g, &mut NoObserver).unwrap(),
        eager.forward_backward(&b, &mut ge, &mut NoObserver).unwrap(),
    );
    assert_eq!(l1.to_bits(), l2.to_bits());
    assert_eq!(g, ge);
}

#[test]
fn a_truncated_or_broken_gguf_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(fx("llama.gguf")).unwrap();
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() - 1000]).unwrap();
    let e = format!("{:#}", load_gguf_lazy(&cut).err().unwrap());
    assert!(e.contains("cut.gguf") && e.contains("past the end"), "{e}");
    let e = format!("{:#}", load_any(&cut).err().unwrap());
    assert!(e.contains("cut.gguf"), "{e}");
    let head = dir.path().join("head.gguf");
    std::fs::write(&head, &bytes[..100]).unwrap();
    let e = format!("{:#}", load_gguf_lazy(&head).err().unwrap());
    assert!(e.contains("head.gguf"), "{e}");
}
