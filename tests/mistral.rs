//! Mistral-style sliding-window attention (issue 16): query i sees keys i−W+1..=i (transformers'
//! `kv_idx > q_idx − W`, llama.cpp's `p1 − p0 < n_swa`), in the analysis/training forward, its
//! backward and the KV-cache decode path. HF `MistralForCausalLM` (`sliding_window`) and GGUF
//! `llama.attention.sliding_window`.

mod archutil;
mod common;
use archutil::*;
use gated_lm::io::gguf::{load_gguf_model, GgmlType, Value};
use gated_lm::io::hf::{load_model, parse_config, save_model, Layout};
use gated_lm::model::Model;

fn fixture() -> Model<f32> {
    let (m, layout) = load_model(&fx("mistral-tiny")).unwrap();
    assert_eq!(layout, Layout::Llama);
    assert_eq!(m.cfg.sliding_window, Some(5));
    assert!(m.cfg.global_layers.is_empty() && !m.cfg.qk_norm);
    m
}

#[test]
fn mistral_forward_matches_transformers() {
    check_parity("mistral-tiny");
    // the window matters over the fixture's 16 tokens: without it the logits move
    let m = fixture();
    let mut full = fixture();
    full.cfg.sliding_window = None;
    let full = Model::from_params(full.cfg, full.params).unwrap();
    let x = ids(16, 512, 1);
    let (a, b) = (logits(&m, &x), logits(&full, &x));
    let diff = a.iter().zip(&b).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
    assert!(diff > 1e-2, "window changed the logits by only {diff}");
    // ... but not those of the first W tokens
    assert_eq!(a[..5 * 512], b[..5 * 512]);
}

#[test]
fn window_decode_with_cache_equals_forward_beyond_w() {
    let m = fixture();
    for step in [1, 3, 7] {
        decode_vs_forward(&m, 29, step);
    }
}

#[test]
fn window_gradients_match_finite_differences() {
    for w in [1, 2, 4] {
        let mut c = common::tiny_cfg(None);
        c.sliding_window = Some(w);
        let mut m: Model<f64> = Model::new(c, 40 + w as u64).unwrap();
        common::jitter_norms(&mut m, 7);
        common::fd_check(&mut m, 12, &format!("window {w}"));
    }
}

/// llama.cpp's q/k row permutation (HF rotate-half → interleaved), the inverse of the loader's.
fn permute_rows(w: &[f32], heads: usize, cols: usize) -> Vec<f32> {
    let d = w.len() / cols / heads;
    let mut out = vec![0.0; w.len()];
    for h in 0..heads {
        for j in 0..d / 2 {
            for t in 0..2 {
                let (dst, src) = (h * d + 2 * j + t, h * d + t * (d / 2) + j);
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

#[test]
fn llama_gguf_with_sliding_window() {
    let m = fixture();
    let mut perm = fixture();
    let c = m.cfg.clone();
    for (n, t) in perm.params.names.iter().zip(perm.params.tensors.iter_mut()) {
        if n.ends_with("q_proj.weight") {
            t.data = permute_rows(&t.data, c.num_heads, c.hidden_size);
        } else if n.ends_with("k_proj.weight") {
            t.data = permute_rows(&t.data, c.num_kv_heads, c.hidden_size);
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("mistral.gguf");
    let extra = vec![("llama.attention.sliding_window".to_string(), Value::U32(5))];
    write_gguf(&perm, "llama", GgmlType::F32, &p, extra, 0.0);
    let (g, _) = load_gguf_model(&p).unwrap();
    assert_eq!(g.cfg.sliding_window, Some(5));
    assert_eq!(g.params, m.params);
    let x = ids(20, 512, 4);
    assert_eq!(logits(&g, &x), logits(&m, &x));
    // without the key: full attention, as before
    let p0 = dir.path().join("llama.gguf");
    write_gguf(&perm, "llama", GgmlType::F32, &p0, vec![], 0.0);
    assert_eq!(load_gguf_model(&p0).unwrap().0.cfg.sliding_window, None);
}

#[test]
fn mistral_saves_loads_and_refuses_what_it_cannot_hold() {
    let m = fixture();
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(save_model(dir.path(), &m, None).unwrap(), Layout::Llama);
    let cj: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap()).unwrap();
    assert_eq!(cj["architectures"][0], "MistralForCausalLM");
    assert_eq!(cj["sliding_window"], 5);
    let (back, layout) = load_model(dir.path()).unwrap();
    assert_eq!(layout, Layout::Llama);
    assert_eq!((back.cfg, back.params), (m.cfg.clone(), m.params.clone()));
    // Qwen layouts cannot hold a window
    let e = format!("{:#}", save_model(dir.path(), &m, Some(Layout::Qwen3)).unwrap_err());
    assert!(e.contains("sliding-window"), "{e}");
    // config rules: a null window is full attention; a zero one is refused
    let text = std::fs::read_to_string(fx("mistral-tiny/config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["sliding_window"] = serde_json::Value::Null;
    assert_eq!(parse_config(&v.to_string(), "m").unwrap().0.sliding_window, None);
    v["sliding_window"] = serde_json::json!(0);
    let e = format!("{:#}", parse_config(&v.to_string(), "m").unwrap_err());
    assert!(e.contains("sliding_window"), "{e}");
    // the device model is told what it lacks
    assert!(m
        .cfg
        .cpu_only_feature()
        .unwrap()
        .contains("sliding-window attention (window 5)"));
    assert_eq!(
        gated_lm::config::ModelConfig::preset("micro", None)
            .unwrap()
            .cpu_only_feature(),
        None
    );
}
