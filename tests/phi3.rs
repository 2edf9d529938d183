//! Phi-3 / Phi-3.5-mini (issue 16): transformers' `Phi3ForCausalLM` with its fused `qkv_proj`
//! ([q; k; v] rows) and `gate_up_proj` ([gate; up] rows), split at load; llama.cpp's `phi3`
//! GGUF (`blk.N.attn_qkv`, `blk.N.ffn_up` holding gate and up, NeoX RoPE: no permutation).
//! What we cannot reproduce (LongRoPE, partial rotary) is refused naming the key.

mod archutil;
use archutil::*;
use gated_lm::io::gguf::{load_gguf_model, GgmlType, Value};
use gated_lm::io::hf::{load_model, save_model, Layout};
use gated_lm::io::st::StFile;
use gated_lm::model::Model;

fn fixture() -> Model<f32> {
    let (m, layout) = load_model(&fx("phi3-tiny")).unwrap();
    assert_eq!(layout, Layout::Phi3);
    assert!(!m.cfg.qk_norm && !m.cfg.attention_bias && m.cfg.sliding_window.is_none());
    m
}

#[test]
fn phi3_forward_matches_transformers() {
    check_parity("phi3-tiny");
}

#[test]
fn fused_tensors_split_into_our_projections() {
    let m = fixture();
    let st = StFile::open(&fx("phi3-tiny/model.safetensors")).unwrap();
    let d = m.cfg.hidden_size;
    for l in 0..m.cfg.num_layers {
        let qkv = st.f32(&format!("model.layers.{l}.self_attn.qkv_proj.weight")).unwrap();
        let gu = st.f32(&format!("model.layers.{l}.mlp.gate_up_proj.weight")).unwrap();
        let (q, kv, f) = (m.cfg.q_dim(), m.cfg.kv_dim(), m.cfg.intermediate_size);
        let get = |s: &str| &m.params.get(&format!("model.layers.{l}.{s}")).unwrap().data;
        assert_eq!(get("self_attn.q_proj.weight")[..], qkv.data[..q * d]);
        assert_eq!(get("self_attn.k_proj.weight")[..], qkv.data[q * d..(q + kv) * d]);
        assert_eq!(get("self_attn.v_proj.weight")[..], qkv.data[(q + kv) * d..]);
        assert_eq!(get("mlp.gate_proj.weight")[..], gu.data[..f * d]);
        assert_eq!(get("mlp.up_proj.weight")[..], gu.data[f * d..]);
    }
}

#[test]
fn phi3_gguf_loads_to_the_same_model() {
    let m = fixture();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("phi3.gguf");
    let extra = vec![
        ("phi3.rope.dimension_count".to_string(), Value::U32(16)),
        ("phi3.attention.sliding_window".to_string(), Value::U32(0)),
    ];
    write_gguf(&m, "phi3", GgmlType::F32, &p, extra.clone(), 0.0);
    let (g, _) = load_gguf_model(&p).unwrap();
    assert_eq!(g.cfg, m.cfg_for_gguf());
    assert_eq!(g.params, m.params, "F32 GGUF tensors are the checkpoint's, bit for bit");
    let x = ids(16, 512, 1);
    assert_eq!(logits(&g, &x), logits(&m, &x));

    // a fused tensor of the wrong height names the file and the tensor
    let bad = dir.path().join("bad.gguf");
    let mut short = fixture();
    // the writer fuses 2·96 rows of gate/up; the metadata says 128
    short.cfg.intermediate_size = 96;
    let mut store = Vec::new();
    for (n, t) in short.params.names.iter().zip(&short.params.tensors) {
        let mut t = t.clone();
        if n.contains("gate_proj") || n.contains("up_proj") {
            t.shape[0] = 96;
            t.data.truncate(96 * 64);
        }
        store.push(t);
    }
    short.params.tensors = store;
    let mut meta = extra.clone();
    meta.push(("phi3.feed_forward_length".into(), Value::U32(128)));
    write_gguf(&short, "phi3", GgmlType::F32, &bad, meta, 0.0);
    let e = format!("{:#}", load_gguf_model(&bad).err().unwrap());
    assert!(
        e.contains("bad.gguf") && e.contains("blk.0.ffn_up.weight") && e.contains("gate 128 + up 128"),
        "{e}"
    );

    // separate attn_q/attn_k/attn_v (which llama.cpp also accepts for phi3) load the same
    let sep = dir.path().join("sep.gguf");
    write_gguf(&m, "llama-unfused", GgmlType::F32, &sep, vec![], 0.0);
    // rename the architecture and its keys by rewriting the file through our reader/writer
    let gg = gated_lm::io::gguf::Gguf::open(&sep).unwrap();
    let meta: Vec<(String, Value)> = gg
        .meta
        .iter()
        .map(|(k, v)| (k.replace("llama-unfused", "phi3"), v.clone()))
        .map(|(k, v)| {
            if k == "general.architecture" {
                (k, Value::Str("phi3".into()))
            } else {
                (k, v)
            }
        })
        .collect();
    let mut tensors: Vec<_> = gg
        .tensors
        .iter()
        .map(|t| {
            let (shape, data) = gg.f32(&t.name).unwrap();
            (t.name.clone(), shape, GgmlType::F32, data)
        })
        .collect();
    // gate/up stay fused in phi3 (llama.cpp requires it): fuse them back
    let d = m.cfg.hidden_size;
    for l in 0..m.cfg.num_layers {
        let gate = tensors
            .iter()
            .position(|t| t.0 == format!("blk.{l}.ffn_gate.weight"))
            .unwrap();
        let g = tensors.remove(gate);
        let up = tensors
            .iter_mut()
            .find(|t| t.0 == format!("blk.{l}.ffn_up.weight"))
            .unwrap();
        let mut fused = g.3.clone();
        fused.extend_from_slice(&up.3);
        up.1 = vec![fused.len() / d, d];
        up.3 = fused;
    }
    assert!(tensors.iter().any(|t| t.0 == "blk.0.attn_q.weight"));
    let meta: Vec<(&str, Value)> = meta.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    let sep2 = dir.path().join("sep2.gguf");
    gated_lm::io::gguf::write(&sep2, &meta, &tensors).unwrap();
    assert_eq!(load_gguf_model(&sep2).unwrap().0.params, m.params);

    // partial rotary and LongRoPE factors are refused
    let pr = dir.path().join("partial.gguf");
    write_gguf(
        &m,
        "phi3",
        GgmlType::F32,
        &pr,
        vec![("phi3.rope.dimension_count".into(), Value::U32(8))],
        0.0,
    );
    let e = format!("{:#}", load_gguf_model(&pr).err().unwrap());
    assert!(e.contains("phi3.rope.dimension_count"), "{e}");
}

#[test]
fn phi3_decode_with_cache_equals_forward() {
    let m = fixture();
    decode_vs_forward(&m, 24, 1);
    decode_vs_forward(&m, 24, 5);
}

#[test]
fn malformed_phi3_checkpoints_are_refused() {
    // qkv_proj one row short
    let t = edited_fixture(
        "phi3-tiny",
        |map| {
            let (s, d) = map.get_mut("model.layers.1.self_attn.qkv_proj.weight").unwrap();
            s[0] -= 1;
            d.truncate(s[0] * s[1]);
        },
        |_| {},
    );
    let e = format!("{:#}", load_model(t.path()).err().unwrap());
    assert!(
        e.contains("model.safetensors")
            && e.contains("model.layers.1.self_attn.qkv_proj.weight")
            && e.contains("[128, 64]"),
        "{e}"
    );
    // LongRoPE (Phi-3.5-mini, Phi-3-*-128k) and partial rotary are refused naming the key
    for (key, val, want) in [
        (
            "rope_scaling",
            serde_json::json!({"type": "longrope", "long_factor": [1.0], "short_factor": [1.0]}),
            "rope_scaling.rope_type 'longrope'",
        ),
        (
            "rope_parameters",
            serde_json::json!({"rope_type": "su", "rope_theta": 10000.0}),
            "rope_parameters.rope_type 'su'",
        ),
        (
            "partial_rotary_factor",
            serde_json::json!(0.5),
            "partial_rotary_factor 0.5",
        ),
    ] {
        let t = edited_fixture("phi3-tiny", |_| {}, |v| v[key] = val.clone());
        let e = format!("{:#}", load_model(t.path()).err().unwrap());
        assert!(e.contains(want) && e.contains("config.json"), "{key}: {e}");
    }
}

#[test]
fn phi3_saves_unfused_in_the_llama_layout() {
    let m = fixture();
    let dir = tempfile::tempdir().unwrap();
    // the Phi-3 layout loads only; the model is a plain llama one once split
    assert!(save_model(dir.path(), &m, Some(Layout::Phi3)).is_err());
    assert_eq!(save_model(dir.path(), &m, None).unwrap(), Layout::Llama);
    let (back, layout) = load_model(dir.path()).unwrap();
    assert_eq!(layout, Layout::Llama);
    assert_eq!(back.params, m.params);
    let x = ids(16, 512, 2);
    assert_eq!(logits(&back, &x), logits(&m, &x));
}

trait GgufCfg {
    fn cfg_for_gguf(&self) -> gated_lm::config::ModelConfig;
}

impl GgufCfg for Model<f32> {
    /// What a GGUF carries of the config (no init std; context length as written).
    fn cfg_for_gguf(&self) -> gated_lm::config::ModelConfig {
        let mut c = self.cfg.clone();
        c.max_position_embeddings = 256;
        c.rms_norm_eps = c.rms_norm_eps as f32 as f64;
        c
    }
}

#[test]
fn phi3_sliding_window_is_read() {
    // Phi-3-mini-4k's config carries sliding_window 2047: transformers applies it (llama.cpp
    // does not), and so do we
    let text = std::fs::read_to_string(fx("phi3-tiny/config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["sliding_window"] = serde_json::json!(2047);
    let (c, layout) = gated_lm::io::hf::parse_config(&v.to_string(), "phi3.json").unwrap();
    assert_eq!((layout, c.sliding_window), (Layout::Phi3, Some(2047)));
}
