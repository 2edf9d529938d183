//! Analysis: metrics equal those computed from the golden attention maps; GGUF reading and
//! dequantisation on files the tests write; analyze/report end to end.

use gated_lm::analysis::probes::SinkProbe;
use gated_lm::io::gguf::{dequantize, quantize, unpermute_rows, write, GgmlType, Gguf, Value};
use gated_lm::io::hf::load_model;
use gated_lm::model::{shifted_targets, Batch, Model};
use std::path::{Path, PathBuf};

fn fx(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(p)
}

#[test]
fn sink_metrics_equal_those_from_the_golden_attention_maps() {
    for name in [
        "qwen3-tiny",
        "qwen3-next-tiny",
        "official-headwise-tiny",
        "official-elementwise-tiny",
    ] {
        let (m, _) = load_model(&fx(name)).unwrap();
        let g = gated_lm::io::st::StFile::open(&fx(name).join("golden.safetensors")).unwrap();
        let (shape, ids) = g.ids("input_ids").unwrap();
        let (b, t, h) = (shape[0], shape[1], m.cfg.num_heads);
        let tg = shifted_targets(&ids, t);
        let mut probe = SinkProbe::new(m.cfg.num_layers, h, b, t, 0.3);
        m.forward_loss(
            &Batch {
                ids: &ids,
                targets: &tg,
                batch: b,
                seq: t,
            },
            &mut probe,
        )
        .unwrap();
        let ours = probe.stats();
        // reference straight from the golden maps: A[b, h, i, 0] for i ≥ 1
        let mut imp = vec![];
        for l in 0..m.cfg.num_layers {
            let p = g.f32(&format!("attn_probs.{l}")).unwrap().data;
            for hh in 0..h {
                let s: f64 = (0..b)
                    .flat_map(|bb| (1..t).map(move |i| (bb, i)))
                    .map(|(bb, i)| p[((bb * h + hh) * t + i) * t] as f64)
                    .sum();
                imp.push(s / (b * (t - 1)) as f64);
            }
        }
        let fa = imp.iter().sum::<f64>() / imp.len() as f64;
        assert!(
            (ours.first_token_attn - fa).abs() < 1e-5,
            "{name}: {} vs {fa}",
            ours.first_token_attn
        );
        for eps in [0.05, 0.1, 0.3] {
            let mut p2 = SinkProbe::new(m.cfg.num_layers, h, b, t, eps);
            m.forward_loss(
                &Batch {
                    ids: &ids,
                    targets: &tg,
                    batch: b,
                    seq: t,
                },
                &mut p2,
            )
            .unwrap();
            let rate = imp.iter().filter(|&&x| x > eps).count() as f64 / imp.len() as f64;
            assert_eq!(p2.stats().sink_rate, rate, "{name} ε={eps}");
        }
        // M-Act from the golden layer outputs
        for l in 0..m.cfg.num_layers {
            let lo = g.f32(&format!("layer_out.{l}")).unwrap().data;
            let mx = lo.iter().fold(0f32, |a, v| a.max(v.abs())) as f64;
            assert!(
                (ours.m_act_per_layer[l] - mx).abs() < 1e-4 * mx.max(1.0),
                "{name} layer {l}"
            );
        }
        if let Ok(gt) = g.f32("gate.0") {
            let g1 = g.f32("gate.1").unwrap().data;
            let mean = (gt.data.iter().chain(&g1).map(|&x| x as f64).sum::<f64>()) / (gt.data.len() + g1.len()) as f64;
            assert!((ours.gate_mean.unwrap() - mean).abs() < 1e-5, "{name} gate mean");
        }
    }
}

#[test]
fn dequantisation_of_known_blocks() {
    let f16 = |x: f32| half::f16::from_f32(x).to_le_bytes();
    // Q8_0: d = 0.5, q = -128..-97 → q/2
    let mut b = f16(0.5).to_vec();
    b.extend((0..32).map(|i| (-128i32 + i) as i8 as u8));
    let v = dequantize(GgmlType::Q8_0, &b);
    assert_eq!(v[0], -64.0);
    assert_eq!(v[31], -48.5);
    // Q4_0: d = 2, low nibbles 0..15 (elements 0..15), high nibbles 15-j (elements 16..31): (q-8)·2
    let mut b = f16(2.0).to_vec();
    b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let v = dequantize(GgmlType::Q4_0, &b);
    assert_eq!((v[0], v[15], v[16], v[31]), (-16.0, 14.0, 14.0, -16.0));
    // Q4_1: d = 1, m = -3: q - 3
    let mut b = f16(1.0).to_vec();
    b.extend(f16(-3.0));
    b.extend((0..16u8).map(|j| j | (j << 4)));
    let v = dequantize(GgmlType::Q4_1, &b);
    assert_eq!((v[0], v[5], v[21]), (-3.0, 2.0, 2.0));
    // round trips within each format's resolution (Q4_0 is asymmetric: d = max/-8 leaves the
    // opposite extreme one step short, as in llama.cpp)
    let x: Vec<f32> = (0..64).map(|i| ((i * 37 % 17) as f32 - 8.0) * 0.1).collect();
    for (ty, tol) in [
        (GgmlType::F32, 0.0),
        (GgmlType::F16, 1e-3),
        (GgmlType::BF16, 4e-3),
        (GgmlType::Q8_0, 0.004),
        (GgmlType::Q4_0, 0.101),
        (GgmlType::Q4_1, 0.055),
    ] {
        let y = dequantize(ty, &quantize(ty, &x));
        let err = x.iter().zip(&y).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(err <= tol, "{ty:?}: max error {err}");
    }
}

fn permute_rows(w: &[f32], heads: usize, cols: usize) -> Vec<f32> {
    // llama.cpp's convert permutation (the inverse of unpermute_rows)
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

/// A llama GGUF of `m` (no QK-norm), weights in `ty`, with a tiny byte-level BPE vocabulary.
fn write_llama(m: &Model<f32>, ty: GgmlType, path: &Path) {
    write_llama_with(m, ty, path, &[]);
}

/// `write_llama` with more metadata (e.g. a `tokenizer.ggml.pre`).
fn write_llama_with(m: &Model<f32>, ty: GgmlType, path: &Path, extra: &[(&'static str, Value)]) {
    let c = &m.cfg;
    let map = gated_lm::io::tokenizer::bytes_to_unicode();
    let mut tokens: Vec<Value> = (0..256).map(|b| Value::Str(map[b].to_string())).collect();
    tokens.push(Value::Str("<|endoftext|>".into()));
    tokens.push(Value::Str("Ġt".into()));
    while tokens.len() < c.vocab_size {
        tokens.push(Value::Str(format!("<pad{}>", tokens.len())));
    }
    let meta = vec![
        ("general.architecture", Value::Str("llama".into())),
        ("general.alignment", Value::U32(32)),
        ("llama.block_count", Value::U32(c.num_layers as u32)),
        ("llama.embedding_length", Value::U32(c.hidden_size as u32)),
        ("llama.feed_forward_length", Value::U32(c.intermediate_size as u32)),
        ("llama.attention.head_count", Value::U32(c.num_heads as u32)),
        ("llama.attention.head_count_kv", Value::U32(c.num_kv_heads as u32)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-6)),
        ("llama.rope.freq_base", Value::F32(c.rope_theta as f32)),
        ("llama.context_length", Value::U32(256)),
        ("tokenizer.ggml.model", Value::Str("gpt2".into())),
        ("tokenizer.ggml.tokens", Value::Arr(tokens)),
        ("tokenizer.ggml.merges", Value::Arr(vec![Value::Str("Ġ t".into())])),
        ("tokenizer.ggml.eos_token_id", Value::U32(256)),
    ];
    let meta: Vec<(&str, Value)> = meta.into_iter().chain(extra.iter().cloned()).collect();
    let rename = |n: &str| {
        n.replace("model.embed_tokens.weight", "token_embd.weight")
            .replace("model.norm.weight", "output_norm.weight")
            .replace("lm_head.weight", "output.weight")
    };
    let mut tensors = vec![];
    for (n, t) in m.params.names.iter().zip(&m.params.tensors) {
        let mut name = rename(n);
        if let Some(rest) = n.strip_prefix("model.layers.") {
            let (i, tail) = rest.split_once('.').unwrap();
            let short = match tail {
                "input_layernorm.weight" => "attn_norm",
                "self_attn.q_proj.weight" => "attn_q",
                "self_attn.k_proj.weight" => "attn_k",
                "self_attn.v_proj.weight" => "attn_v",
                "self_attn.o_proj.weight" => "attn_output",
                "post_attention_layernorm.weight" => "ffn_norm",
                "mlp.gate_proj.weight" => "ffn_gate",
                "mlp.up_proj.weight" => "ffn_up",
                "mlp.down_proj.weight" => "ffn_down",
                o => panic!("{o}"),
            };
            name = format!("blk.{i}.{short}.weight");
        }
        let mut data = t.data.clone();
        if name.ends_with("attn_q.weight") {
            data = permute_rows(&data, c.num_heads, c.hidden_size);
        } else if name.ends_with("attn_k.weight") {
            data = permute_rows(&data, c.num_kv_heads, c.hidden_size);
        }
        // norms stay F32, as llama.cpp stores them
        let tty = if t.shape.len() == 1 { GgmlType::F32 } else { ty };
        tensors.push((name, t.shape.clone(), tty, data));
    }
    write(path, &meta, &tensors).unwrap();
}

fn llama_model() -> Model<f32> {
    let mut cfg = gated_lm::config::ModelConfig::preset("micro", None).unwrap();
    cfg.vocab_size = 320;
    cfg.qk_norm = false;
    cfg.max_position_embeddings = 256;
    cfg.init_std = 0.2;
    Model::new(cfg, 11).unwrap()
}

#[test]
fn gguf_llama_models_load_in_every_tensor_type() {
    let m = llama_model();
    let ids: Vec<u32> = (0..40).map(|i| (i * 13 % 300) as u32).collect();
    let tg = shifted_targets(&ids, 40);
    let b = Batch {
        ids: &ids,
        targets: &tg,
        batch: 1,
        seq: 40,
    };
    let ref_logits = m
        .forward(&b, &mut gated_lm::model::observer::NoObserver)
        .unwrap()
        .logits;
    let dir = tempfile::tempdir().unwrap();
    let scale = ref_logits.iter().fold(0f32, |a, v| a.max(v.abs()));
    // relative to the largest logit: exact for F32, within each format's precision otherwise
    for (ty, tol) in [
        (GgmlType::F32, 1e-6),
        (GgmlType::F16, 5e-3),
        (GgmlType::BF16, 3e-2),
        (GgmlType::Q8_0, 8e-2),
        (GgmlType::Q4_1, f32::INFINITY),
        (GgmlType::Q4_0, f32::INFINITY),
    ] {
        let p = dir.path().join(format!("m-{ty:?}.gguf"));
        write_llama(&m, ty, &p);
        let (g, tok) = gated_lm::io::gguf::load_gguf_model(&p).unwrap();
        assert!(!g.cfg.qk_norm && g.cfg.gate.is_none());
        let l = g
            .forward(&b, &mut gated_lm::model::observer::NoObserver)
            .unwrap()
            .logits;
        let err = l
            .iter()
            .zip(&ref_logits)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max)
            / scale;
        eprintln!("{ty:?}: relative logit error {err:.2e}");
        assert!(err <= tol, "{ty:?}: logits off by {err} of their scale {scale}");
        // every tensor is exactly what quantising the (permuted) original and reading it back gives
        for (n, t) in m.params.names.iter().zip(&m.params.tensors) {
            let (c, loaded) = (&m.cfg, &g.params.get(n).unwrap().data);
            let expect = if t.shape.len() == 1 {
                t.data.clone()
            } else if n.ends_with("q_proj.weight") {
                unpermute_rows(
                    &dequantize(ty, &quantize(ty, &permute_rows(&t.data, c.num_heads, c.hidden_size))),
                    c.num_heads,
                    c.hidden_size,
                )
            } else if n.ends_with("k_proj.weight") {
                unpermute_rows(
                    &dequantize(ty, &quantize(ty, &permute_rows(&t.data, c.num_kv_heads, c.hidden_size))),
                    c.num_kv_heads,
                    c.hidden_size,
                )
            } else {
                dequantize(ty, &quantize(ty, &t.data))
            };
            assert!(loaded == &expect, "{ty:?}: {n} differs from its quantised original");
        }
        if ty == GgmlType::F32 {
            assert_eq!(
                g.params.get("model.layers.1.self_attn.q_proj.weight"),
                m.params.get("model.layers.1.self_attn.q_proj.weight"),
                "q/k permutation must be undone"
            );
            assert_eq!(
                tok.encode("a t").unwrap(),
                vec![b'a' as u32, 257],
                "the embedded merge 'Ġ t' applies"
            );
            assert_eq!(tok.eos(), 256);
        }
    }
    let w: Vec<f32> = (0..8 * 3).map(|x| x as f32).collect();
    assert_eq!(unpermute_rows(&permute_rows(&w, 2, 3), 2, 3), w);
}

#[test]
fn malformed_gguf_files_are_rejected_with_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.gguf");
    write_llama(&llama_model(), GgmlType::Q8_0, &p);
    let good = std::fs::read(&p).unwrap();
    let err = |bytes: &[u8]| {
        std::fs::write(&p, bytes).unwrap();
        format!("{:#}", Gguf::open(&p).err().expect("must fail"))
    };
    assert!(err(b"GGML\x03\0\0\0").contains("bad magic"));
    assert!(err(&good[..good.len() / 2]).contains("past the end"));
    assert!(err(&good[..100]).contains("m.gguf"));
    let mut absurd = good.clone();
    absurd[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(err(&absurd).contains("more than the file can hold"));
    let mut v = good.clone();
    v[4] = 9;
    assert!(err(&v).contains("version 9"));
    // a string length pointing past the end
    let mut s = good.clone();
    s[24..32].copy_from_slice(&(1u64 << 40).to_le_bytes());
    assert!(err(&s).contains("truncated"));
    std::fs::write(&p, &good).unwrap();
    assert!(Gguf::open(&p).is_ok());
}

#[test]
fn a_gguf_whose_pre_tokenizer_we_lack_still_analyses_from_token_ids() {
    let bin = env!("CARGO_BIN_EXE_gated-lm");
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("smol.gguf");
    write_llama_with(
        &llama_model(),
        GgmlType::Q8_0,
        &p,
        &[("tokenizer.ggml.pre", Value::Str("some-new-pre".into()))],
    );
    let analyze = |extra: &[&str]| {
        std::process::Command::new(bin)
            .args(["analyze", "--model"])
            .arg(&p)
            .args(extra)
            .output()
            .unwrap()
    };
    // with text: the error names the pre-tokenizer and the way out
    let o = analyze(&["--prompt", "hello there"]);
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("'some-new-pre'") && e.contains("--tokens"), "{e}");
    // and the way out works: token ids never touch the tokenizer
    let ids = dir.path().join("ids.safetensors");
    let t: Vec<i64> = (0..48).map(|i| (i * 7 % 300) as i64).collect();
    let bytes: Vec<u8> = t.iter().flat_map(|x| x.to_le_bytes()).collect();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![1, 48], &bytes).unwrap();
    safetensors::serialize_to_file([("input_ids", view)], None, &ids).unwrap();
    let o = analyze(&["--tokens", ids.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("48 tokens"));
}

#[test]
fn analyze_and_report_end_to_end() {
    let bin = env!("CARGO_BIN_EXE_gated-lm");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pics");
    let json = dir.path().join("a.json");
    let o = std::process::Command::new(bin)
        .args(["analyze", "--model"])
        .arg(fx("official-headwise-tiny"))
        .arg("--tokens")
        .arg(fx("official-headwise-tiny/golden.safetensors"))
        .args(["--layers", "1", "--heads", "0,3", "--log-color", "--json"])
        .arg(&json)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    for k in [
        "first_token_attn",
        "first_token_attn_per_layer",
        "first_token_attn_per_head",
        "sink_rate",
        "m_act",
        "m_act_per_layer",
        "gate_mean",
        "gate_mean_per_layer",
        "gate_histogram",
        "gate_frac_below_0_1",
        "gate_frac_above_0_9",
        "attn_output_frac_below_1e_2",
        "attn_output_frac_below_1e_3",
        "tokens",
        "perplexity",
    ] {
        assert!(v.get(k).is_some(), "analysis JSON lacks {k}");
    }
    assert_eq!(v["tokens"], 16);
    for f in [
        "attn_l1_h0.png",
        "attn_l1_h3.png",
        "first_token_attn_per_layer.png",
        "m_act_per_layer.png",
        "gate_hist.png",
    ] {
        assert!(out.join(f).exists(), "{f}");
    }
    assert!(!out.join("attn_l0_h0.png").exists());
    let rep = dir.path().join("rep");
    let o = std::process::Command::new(bin)
        .arg("report")
        .arg(&json)
        .arg(&json)
        .arg("--out")
        .arg(&rep)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let md = std::fs::read_to_string(rep.join("report.md")).unwrap();
    assert!(
        md.contains("| a.json |") && md.contains("0.467") && md.contains("1053"),
        "{md}"
    );
    // no tokenizer beside the fixture: --prompt must fail clearly
    let o = std::process::Command::new(bin)
        .args(["analyze", "--prompt", "hi", "--model"])
        .arg(fx("qwen3-tiny"))
        .output()
        .unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("no tokenizer"));
}
