//! Qwen2 / Qwen2.5 (issue 16): q/k/v projection biases, no QK-norm. transformers'
//! `Qwen2ForCausalLM` checkpoints load, save back in that layout and convert; a qwen2 GGUF
//! (NeoX RoPE: no row permutation, `blk.N.attn_{q,k,v}.bias`) loads to the same logits.
//! Golden parity with transformers is in parity.rs (`forward_qwen2`), the bias gradients in
//! gradcheck.rs, cached decoding in inference.rs.

use gated_lm::config::GateConfig;
mod archutil;

use archutil::fx;
use gated_lm::io::gguf::{load_gguf_model, GgmlType};
use gated_lm::io::hf::{convert, load_model, save_model, Layout};
use gated_lm::model::observer::NoObserver;
use gated_lm::model::{shifted_targets, Batch, Model};
use std::path::Path;
use std::process::Command;

fn logits(m: &Model<f32>) -> Vec<f32> {
    let ids: Vec<u32> = (0..32).map(|i| (i * 37 % m.cfg.vocab_size) as u32).collect();
    let tg = shifted_targets(&ids, 16);
    m.forward(
        &Batch {
            ids: &ids,
            targets: &tg,
            batch: 2,
            seq: 16,
        },
        &mut NoObserver,
    )
    .unwrap()
    .logits
}

fn fixture() -> Model<f32> {
    let (m, layout) = load_model(&fx("qwen2-tiny")).unwrap();
    assert_eq!(layout, Layout::Qwen2);
    assert!(m.cfg.attention_bias && !m.cfg.qk_norm && m.cfg.gate.is_none());
    m
}

#[test]
fn qwen2_checkpoint_reads_with_its_biases() {
    let m = fixture();
    let biases: Vec<&String> = m.params.names.iter().filter(|n| n.ends_with(".bias")).collect();
    assert_eq!(biases.len(), 6, "{biases:?}");
    for l in &m.index.layers {
        let [q, k, v] = l.qkv_bias.unwrap();
        assert_eq!(m.params.tensors[q].shape, vec![64]);
        assert_eq!(m.params.tensors[k].shape, vec![32]);
        assert_eq!(m.params.tensors[v].shape, vec![32]);
        assert!(m.params.tensors[q].data.iter().any(|&x| x != 0.0));
        assert!(l.q_norm.is_none());
    }
    // the biases matter: zeroing them changes the logits
    let mut z = fixture();
    for l in z.index.layers.clone() {
        for b in l.qkv_bias.unwrap() {
            z.params.tensors[b].data.fill(0.0);
        }
    }
    assert_ne!(logits(&m), logits(&z));
}

#[test]
fn save_load_and_convert_round_trip() {
    let m = fixture();
    let dir = tempfile::tempdir().unwrap();
    // the default layout of a model with q/k/v biases and no QK-norm is Qwen2's
    assert_eq!(save_model(dir.path(), &m, None).unwrap(), Layout::Qwen2);
    let cj: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap()).unwrap();
    assert_eq!(cj["model_type"], "qwen2");
    assert_eq!(cj["architectures"][0], "Qwen2ForCausalLM");
    let (back, layout) = load_model(dir.path()).unwrap();
    assert_eq!(layout, Layout::Qwen2);
    assert_eq!(back.cfg, m.cfg);
    assert_eq!(back.params, m.params);

    // our own layout keeps attention_bias in its config section
    let g = dir.path().join("gated");
    save_model(&g, &m, Some(Layout::GatedLm)).unwrap();
    let (back, layout) = load_model(&g).unwrap();
    assert_eq!(layout, Layout::GatedLm);
    assert_eq!((back.cfg, back.params), (m.cfg.clone(), m.params.clone()));
    assert_eq!(convert(&m, Layout::GatedLm).unwrap().params, m.params);

    // layouts that cannot hold the biases say so
    for l in [Layout::Qwen3, Layout::Official, Layout::Qwen3Next] {
        let e = format!("{:#}", convert(&m, l).err().unwrap());
        assert!(e.contains("attention_bias"), "{l:?}: {e}");
    }
    let mut gated = m.cfg.clone();
    gated.gate = GateConfig::parse_spec("elementwise").unwrap();
    assert!(Layout::Qwen2.check(&gated).is_err());
    assert_eq!(Layout::default_for(&gated), Layout::GatedLm);
    // a Qwen3 model is not a Qwen2 one
    let q3 = load_model(&fx("qwen3-tiny")).unwrap().0;
    assert!(convert(&q3, Layout::Qwen2).is_err());
}

#[test]
fn cli_convert_keeps_the_biases() {
    let bin = env!("CARGO_BIN_EXE_gated-lm");
    let out = tempfile::tempdir().unwrap();
    for (to, layout) in [("gated-lm", Layout::GatedLm), ("qwen2", Layout::Qwen2)] {
        let dst = out.path().join(to);
        let o = Command::new(bin)
            .args(["convert", "--to", to, "--model"])
            .arg(fx("qwen2-tiny"))
            .arg("--out")
            .arg(&dst)
            .output()
            .unwrap();
        assert!(o.status.success(), "{to}: {}", String::from_utf8_lossy(&o.stderr));
        let (m, l) = load_model(&dst).unwrap();
        assert_eq!(l, layout);
        assert_eq!(m.params, fixture().params);
    }
}

#[test]
fn hf_config_rules() {
    use gated_lm::io::hf::parse_config;
    let text = std::fs::read_to_string(fx("qwen2-tiny/config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    // transformers' Qwen2 has biases whatever attention_bias says (it has no such field)
    v["attention_bias"] = serde_json::json!(false);
    let (c, _) = parse_config(&v.to_string(), "q2").unwrap();
    assert!(c.attention_bias);
    v["use_sliding_window"] = serde_json::json!(true);
    let e = format!("{:#}", parse_config(&v.to_string(), "q2").unwrap_err());
    assert!(e.contains("use_sliding_window"), "{e}");
    // Qwen3's attention_bias also biases o_proj: refused, not silently dropped
    let q3 = std::fs::read_to_string(fx("qwen3-tiny/config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&q3).unwrap();
    v["attention_bias"] = serde_json::json!(true);
    let e = format!("{:#}", parse_config(&v.to_string(), "q3").unwrap_err());
    assert!(e.contains("attention_bias") && e.contains("o_proj"), "{e}");
}

/// A qwen2 GGUF of `m` as llama.cpp's converter writes it (`archutil::write_gguf`: `{arch}.*`
/// keys, HF row order for NeoX RoPE, 1-D tensors such as the biases in F32).
fn write_qwen2(m: &Model<f32>, ty: GgmlType, path: &Path, arch: &str) {
    archutil::write_gguf(m, arch, ty, path, vec![], 0.0);
    let g = gated_lm::io::gguf::Gguf::open(path).unwrap();
    assert!(g.tensors.iter().any(|t| t.name == "blk.1.attn_v.bias"));
}

#[test]
fn qwen2_gguf_loads_to_the_same_model() {
    let m = fixture();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("q2.gguf");
    write_qwen2(&m, GgmlType::F32, &p, "qwen2");
    let (g, _tok) = load_gguf_model(&p).unwrap();
    assert!(g.cfg.attention_bias && !g.cfg.qk_norm);
    assert_eq!(g.params, m.params, "F32 GGUF tensors are the checkpoint's, bit for bit");
    assert_eq!(logits(&g), logits(&m), "F32: identical logits");

    // F16 matrices: close, not equal
    let p16 = dir.path().join("q2-f16.gguf");
    write_qwen2(&m, GgmlType::F16, &p16, "qwen2");
    let (g16, _) = load_gguf_model(&p16).unwrap();
    let err = logits(&g16)
        .iter()
        .zip(logits(&m))
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(err > 0.0 && err < 1e-2, "F16 logits differ by {err}");

    // another architecture is refused with the list of those supported
    let pg = dir.path().join("gemma.gguf");
    write_qwen2(&m, GgmlType::F32, &pg, "gemma");
    let e = format!("{:#}", load_gguf_model(&pg).err().unwrap());
    assert!(
        e.contains("'gemma' is not supported (llama, qwen2, qwen3, qwen3moe, phi3, gemma2, gemma3)"),
        "{e}"
    );
}
