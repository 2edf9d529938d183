//! Helpers of the architecture tests (phi3.rs, mistral.rs, gemma.rs): golden parity, a GGUF
//! writer laid out as llama.cpp's converter writes each architecture, and cached decoding
//! against the full forward.
#![allow(dead_code)]

use gated_lm::cli::dump::dump_tensors;
use gated_lm::io::gguf::{arch, write, GgmlType, Value};
use gated_lm::io::st::StFile;
use gated_lm::model::decode::KvCache;
use gated_lm::model::observer::NoObserver;
use gated_lm::model::params::ParamKind;
use gated_lm::model::{shifted_targets, Batch, Model};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub fn fx(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(p)
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Our forward of fixture `dir` against its golden outputs (tolerances of fixtures/README.md);
/// returns (max logit error, loss error).
pub fn check_parity(dir: &str) -> (f32, f32) {
    let out = dump_tensors(&fx(dir), &fx(dir).join("golden.safetensors"), None).unwrap();
    let g = StFile::open(&fx(dir).join("golden.safetensors")).unwrap();
    let (mut logit_err, mut loss_err, mut checked) = (0.0, 0.0, 0);
    for key in g.names().unwrap().iter().filter(|k| *k != "input_ids") {
        let gt = g.f32(key).unwrap();
        let (shape, data) = out.get(key).unwrap_or_else(|| panic!("{dir}: dump lacks {key}"));
        assert_eq!(shape, &gt.shape, "{dir}: {key} shape");
        let err = max_abs(data, &gt.data);
        if key == "loss" {
            assert!(err <= 1e-5, "{dir}: loss off by {err}");
            loss_err = err;
        } else {
            let scale = gt.data.iter().fold(1.0f32, |m, x| m.max(x.abs()));
            assert!(err <= 1e-4 * scale, "{dir}: {key} max err {err} (scale {scale})");
            if key == "logits" {
                logit_err = err;
            }
        }
        checked += 1;
    }
    assert_eq!(checked, 6, "{dir}: logits, loss, 2 layer outputs, 2 attention maps");
    eprintln!("{dir}: max |logit error| {logit_err:e}, |loss error| {loss_err:e}");
    (logit_err, loss_err)
}

pub fn ids(n: usize, vocab: usize, seed: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 37 + seed * 11 + 5) % vocab) as u32).collect()
}

/// Logits of one sequence (`[ids.len(), vocab]`).
pub fn logits(m: &Model<f32>, ids: &[u32]) -> Vec<f32> {
    let tg = shifted_targets(ids, ids.len());
    m.forward(
        &Batch {
            ids,
            targets: &tg,
            batch: 1,
            seq: ids.len(),
        },
        &mut NoObserver,
    )
    .unwrap()
    .logits
}

/// Decoding `n` tokens through the KV cache (in steps of `step` tokens) gives the full forward's
/// logits; returns the max difference.
pub fn decode_vs_forward(m: &Model<f32>, n: usize, step: usize) -> f32 {
    let x = ids(n, m.cfg.vocab_size, 3);
    let full = logits(m, &x);
    let mut cache = KvCache::new(m, None, 0).unwrap();
    let mut got = Vec::new();
    for c in x.chunks(step) {
        got.extend(m.decode(&mut cache, c).unwrap());
    }
    let err = max_abs(&got, &full);
    assert!(err < 1e-4, "decode ({step} at a time) vs forward: {err}");
    err
}

/// A GGUF of `m` as llama.cpp's converter writes architecture `arch`: `{arch}.*` keys (plus
/// `extra`), HF row order (no q/k permutation: NeoX RoPE), fused tensors where the
/// architecture fuses, norms + `norm_shift` (1 for Gemma), 1-D tensors in F32.
pub fn write_gguf(
    m: &Model<f32>,
    arch_name: &str,
    ty: GgmlType,
    path: &Path,
    extra: Vec<(String, Value)>,
    norm_shift: f32,
) {
    let c = &m.cfg;
    let map = gated_lm::io::tokenizer::bytes_to_unicode();
    let mut tokens: Vec<Value> = (0..256).map(|b| Value::Str(map[b].to_string())).collect();
    tokens.push(Value::Str("<eos>".into()));
    while tokens.len() < c.vocab_size {
        tokens.push(Value::Str(format!("<pad{}>", tokens.len())));
    }
    let k = |s: &str| format!("{arch_name}.{s}");
    let mut meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::Str(arch_name.into())),
        ("general.alignment".into(), Value::U32(32)),
        (k("block_count"), Value::U32(c.num_layers as u32)),
        (k("embedding_length"), Value::U32(c.hidden_size as u32)),
        (k("feed_forward_length"), Value::U32(c.intermediate_size as u32)),
        (k("attention.head_count"), Value::U32(c.num_heads as u32)),
        (k("attention.head_count_kv"), Value::U32(c.num_kv_heads as u32)),
        (k("attention.key_length"), Value::U32(c.head_dim as u32)),
        (k("attention.layer_norm_rms_epsilon"), Value::F32(c.rms_norm_eps as f32)),
        (k("rope.freq_base"), Value::F32(c.rope_theta as f32)),
        (k("context_length"), Value::U32(256)),
        ("tokenizer.ggml.model".into(), Value::Str("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::Str("qwen2".into())),
        ("tokenizer.ggml.tokens".into(), Value::Arr(tokens)),
        ("tokenizer.ggml.merges".into(), Value::Arr(vec![])),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(256)),
    ];
    meta.extend(extra);
    let d = c.hidden_size;
    let mut order: Vec<String> = Vec::new();
    let mut out: BTreeMap<String, (Vec<usize>, Vec<f32>)> = BTreeMap::new();
    for ((n, t), spec) in m.params.names.iter().zip(&m.params.tensors).zip(&m.specs) {
        let mut data = t.data.clone();
        if spec.kind == ParamKind::Norm {
            data.iter_mut().for_each(|x| *x += norm_shift);
        }
        let (name, block) = arch::source(c, arch_name, n);
        if !order.contains(&name) {
            order.push(name.clone());
        }
        match block {
            None => {
                out.insert(name, (t.shape.clone(), data));
            }
            Some((r0, rows, total)) => {
                let e = out
                    .entry(name)
                    .or_insert_with(|| (vec![total, d], vec![0.0; total * d]));
                e.1[r0 * d..(r0 + rows) * d].copy_from_slice(&data);
            }
        }
    }
    let tensors: Vec<_> = order
        .into_iter()
        .map(|n| {
            let (shape, data) = out.remove(&n).unwrap();
            let tty = if shape.len() == 1 { GgmlType::F32 } else { ty };
            (n, shape, tty, data)
        })
        .collect();
    let meta: Vec<(&str, Value)> = meta.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    write(path, &meta, &tensors).unwrap();
}

/// Copy of fixture `dir` in a temp dir with its safetensors rewritten by `edit` (for malformed
/// checkpoints) and its config.json by `edit_cfg`.
pub fn edited_fixture(
    dir: &str,
    edit: impl Fn(&mut gated_lm::io::st::TensorMap),
    edit_cfg: impl Fn(&mut serde_json::Value),
) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let st = StFile::open(&fx(dir).join("model.safetensors")).unwrap();
    let mut map = gated_lm::io::st::TensorMap::new();
    for n in st.names().unwrap() {
        let t = st.f32(&n).unwrap();
        map.insert(n, (t.shape, t.data));
    }
    edit(&mut map);
    gated_lm::io::st::write_f32(&tmp.path().join("model.safetensors"), &map).unwrap();
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fx(dir).join("config.json")).unwrap()).unwrap();
    edit_cfg(&mut v);
    std::fs::write(tmp.path().join("config.json"), v.to_string()).unwrap();
    tmp
}
