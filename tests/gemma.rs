//! Gemma 2 and Gemma 3 text models (issue 16): transformers' `Gemma2ForCausalLM` and
//! `Gemma3ForCausalLM` (Gemma3TextConfig), GGUF `gemma2` / `gemma3`. What they add: √d embedding
//! scale, `x̂·(1+w)` norms (also Gemma 3's QK-norm), norms of the attention and MLP outputs
//! before their residual adds, GELU-tanh MLP, `query_pre_attn_scalar^-½` score scale, attention
//! (Gemma 2) and final logit soft-capping, sliding-window layers alternating with global ones,
//! Gemma 3's local RoPE θ.

mod archutil;
mod common;
use archutil::*;
use gated_lm::config::{MlpActivation, NormStyle};
use gated_lm::io::gguf::{load_gguf_model, GgmlType, Value};
use gated_lm::io::hf::{convert, load_model, parse_config, save_model, Layout};
use gated_lm::model::Model;

type Edit = Box<dyn Fn(&mut gated_lm::config::ModelConfig)>;

fn fixture(dir: &str) -> Model<f32> {
    let (m, layout) = load_model(&fx(dir)).unwrap();
    assert_eq!(
        layout,
        if dir == "gemma2-tiny" {
            Layout::Gemma2
        } else {
            Layout::Gemma3
        }
    );
    m
}

#[test]
fn gemma2_forward_matches_transformers() {
    let m = fixture("gemma2-tiny");
    let c = &m.cfg;
    assert_eq!(c.norm_style, NormStyle::ZeroCentered);
    assert_eq!(c.mlp_activation, MlpActivation::GeluTanh);
    assert!(c.sandwich_norms && c.embed_scale && c.tie_word_embeddings && !c.qk_norm);
    assert_eq!((c.sliding_window, c.global_layers.clone()), (Some(5), vec![1]));
    assert_eq!((c.attn_logit_softcap, c.final_logit_softcap), (Some(2.5), Some(3.0)));
    assert_eq!((c.query_pre_attn_scalar, c.rope_local_theta), (Some(24.0), None));
    check_parity("gemma2-tiny");
}

#[test]
fn gemma3_forward_matches_transformers() {
    let m = fixture("gemma3-tiny");
    let c = &m.cfg;
    assert!(c.qk_norm && c.sandwich_norms && c.embed_scale && c.attn_logit_softcap.is_none());
    assert_eq!((c.rope_theta, c.rope_local_theta), (1e6, Some(1e4)));
    assert_eq!((c.sliding_window, c.global_layers.clone()), (Some(5), vec![1]));
    assert_eq!(
        (c.query_pre_attn_scalar, c.final_logit_softcap),
        (Some(20.0), Some(4.0))
    );
    check_parity("gemma3-tiny");
}

#[test]
fn every_gemma_feature_changes_the_logits() {
    let x = ids(16, 512, 1);
    for dir in ["gemma2-tiny", "gemma3-tiny"] {
        let m = fixture(dir);
        let base = logits(&m, &x);
        let variants: Vec<(&str, Edit)> = vec![
            ("no window", Box::new(|c| c.sliding_window = None)),
            ("no final cap", Box::new(|c| c.final_logit_softcap = None)),
            ("no attention cap", Box::new(|c| c.attn_logit_softcap = None)),
            ("head_dim scale", Box::new(|c| c.query_pre_attn_scalar = None)),
            ("no embed scale", Box::new(|c| c.embed_scale = false)),
            ("silu", Box::new(|c| c.mlp_activation = MlpActivation::Silu)),
            ("one theta", Box::new(|c| c.rope_local_theta = None)),
        ];
        for (what, f) in variants {
            let mut c = m.cfg.clone();
            f(&mut c);
            if c == m.cfg {
                continue; // not a feature of this model (Gemma 3 has no attention cap, …)
            }
            let v = Model::from_params(c, m.params.clone()).unwrap();
            let d = logits(&v, &x)
                .iter()
                .zip(&base)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(d > 1e-3, "{dir}: {what} changed the logits by only {d}");
        }
    }
}

#[test]
fn gemma_decode_with_cache_equals_forward_beyond_w() {
    for dir in ["gemma2-tiny", "gemma3-tiny"] {
        let m = fixture(dir);
        for step in [1, 4] {
            decode_vs_forward(&m, 23, step);
        }
    }
}

/// The GGUF llama.cpp's converter writes: norms stored as 1 + w, llama.cpp's score scale
/// (head_dim^-½ unless 27B), so the reference is the HF model with query_pre_attn_scalar = head_dim.
#[test]
fn gemma_gguf_loads_to_the_same_model() {
    let dir = tempfile::tempdir().unwrap();
    for (fxd, arch) in [("gemma2-tiny", "gemma2"), ("gemma3-tiny", "gemma3")] {
        let m = fixture(fxd);
        let k = |s: &str| format!("{arch}.{s}");
        let mut extra = vec![
            (k("attention.sliding_window"), Value::U32(5)),
            (
                k("final_logit_softcapping"),
                Value::F32(m.cfg.final_logit_softcap.unwrap() as f32),
            ),
        ];
        if arch == "gemma2" {
            extra.push((k("attn_logit_softcapping"), Value::F32(2.5)));
        } else {
            // two layers: llama.cpp's default period 6 would window both; the list says which
            extra.push((
                k("attention.sliding_window_pattern"),
                Value::Arr(vec![Value::Bool(true), Value::Bool(false)]),
            ));
            extra.push((k("rope.freq_base_swa"), Value::F32(1e4)));
        }
        let p = dir.path().join(format!("{arch}.gguf"));
        write_gguf(&m, arch, GgmlType::F32, &p, extra, 1.0);
        let (g, _) = load_gguf_model(&p).unwrap();
        let mut want = m.cfg.clone();
        want.norm_style = NormStyle::Standard;
        want.query_pre_attn_scalar = Some(16.0);
        want.max_position_embeddings = 256;
        want.rms_norm_eps = want.rms_norm_eps as f32 as f64;
        want.init_std = g.cfg.init_std;
        assert_eq!(g.cfg, want, "{arch}");
        let mut hf = m.cfg.clone();
        hf.query_pre_attn_scalar = Some(16.0);
        let hf = Model::from_params(hf, m.params.clone()).unwrap();
        let x = ids(21, 512, 2);
        let (a, b) = (logits(&g, &x), logits(&hf, &x));
        let d = a.iter().zip(&b).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
        assert!(d < 1e-5, "{arch}: GGUF vs HF logits differ by {d}");
        // a missing post-norm names its tensor
        let mut short = m.params.clone();
        let i = short
            .names
            .iter()
            .position(|n| n.ends_with("1.post_feedforward_layernorm.weight"))
            .unwrap();
        short.names.remove(i);
        short.tensors.remove(i);
        let mut specs = m.specs.clone();
        specs.remove(i);
        let mut broken = Model::new(gated_lm::config::ModelConfig::preset("micro", None).unwrap(), 0).unwrap();
        broken.cfg = m.cfg.clone();
        broken.params = short;
        broken.specs = specs;
        let pb = dir.path().join(format!("{arch}-broken.gguf"));
        write_gguf(&broken, arch, GgmlType::F32, &pb, vec![], 1.0);
        let e = format!("{:#}", load_gguf_model(&pb).err().unwrap());
        assert!(e.contains("blk.1.post_ffw_norm.weight"), "{e}");
    }
}

#[test]
fn gemma_model_gradients_match_finite_differences() {
    for (window, local) in [(Some(2), Some(100.0)), (Some(1), None), (None, None)] {
        let mut c = common::tiny_cfg(None);
        c.norm_style = NormStyle::ZeroCentered;
        c.sandwich_norms = true;
        c.embed_scale = true;
        c.mlp_activation = MlpActivation::GeluTanh;
        c.attn_logit_softcap = Some(1.5);
        c.final_logit_softcap = Some(2.0);
        c.query_pre_attn_scalar = Some(6.0);
        c.tie_word_embeddings = true;
        c.sliding_window = window;
        c.global_layers = if window.is_some() { vec![1] } else { vec![] };
        c.rope_local_theta = local;
        let mut m: Model<f64> = Model::new(c, 9).unwrap();
        common::jitter_norms(&mut m, 10);
        common::fd_check(&mut m, 12, &format!("gemma features, window {window:?}"));
    }
}

#[test]
fn gemma_configs_refused_or_saved_as_gated_lm() {
    let text = std::fs::read_to_string(fx("gemma3-tiny/config.json")).unwrap();
    let base: serde_json::Value = serde_json::from_str(&text).unwrap();
    for (key, val, want) in [
        (
            "attn_logit_softcapping",
            serde_json::json!(50.0),
            "attn_logit_softcapping",
        ),
        (
            "hidden_activation",
            serde_json::json!("gelu"),
            "hidden_activation 'gelu'",
        ),
        (
            "layer_types",
            serde_json::json!(["sliding_attention"]),
            "layer_types has 1 entries",
        ),
        ("model_type", serde_json::json!("gemma3"), "Gemma3ForCausalLM"),
        (
            "use_bidirectional_attention",
            serde_json::json!(true),
            "use_bidirectional_attention",
        ),
        (
            "model_type",
            serde_json::json!("gemma"),
            "(llama, mistral, phi3, gemma2, gemma3_text",
        ),
    ] {
        let mut v = base.clone();
        v[key] = val;
        let e = format!("{:#}", parse_config(&v.to_string(), "g.json").unwrap_err());
        assert!(e.contains(want) && e.contains("g.json"), "{key}: {e}");
    }
    // old flat Gemma 3 configs: rope_theta + rope_local_base_freq + sliding_window_pattern
    let mut v = base.clone();
    let o = v.as_object_mut().unwrap();
    o.remove("rope_parameters");
    o.remove("layer_types");
    o.insert("rope_theta".into(), serde_json::json!(1e6));
    o.insert("rope_local_base_freq".into(), serde_json::json!(1e4));
    o.insert("sliding_window_pattern".into(), serde_json::json!(2));
    let (c, _) = parse_config(&v.to_string(), "g.json").unwrap();
    assert_eq!(c, fixture("gemma3-tiny").cfg);

    // no stock layout holds them: the default save is gated-lm, bit for bit
    let dir = tempfile::tempdir().unwrap();
    for d in ["gemma2-tiny", "gemma3-tiny"] {
        let m = fixture(d);
        assert!(save_model(dir.path(), &m, Some(Layout::Gemma2)).is_err());
        assert!(convert(&m, Layout::Qwen3).is_err());
        assert_eq!(save_model(dir.path(), &m, None).unwrap(), Layout::GatedLm);
        let (back, _) = load_model(dir.path()).unwrap();
        assert_eq!((back.cfg, back.params), (m.cfg.clone(), m.params.clone()));
        let why = m.cfg.cpu_only_feature().unwrap();
        assert!(
            why.contains("soft-capping") && why.contains("GELU") && why.contains("post-feedforward"),
            "{why}"
        );
    }
}
