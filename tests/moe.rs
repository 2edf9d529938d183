//! Mixture-of-Experts blocks: float64 finite differences of the whole objective (cross-entropy
//! plus load-balancing and z-loss) with every gate position, and the E = 1, top-1 identity with
//! the dense SwiGLU model.

mod common;
use common::{fd_check, ids, jitter_norms, logits, tiny_cfg, B, T};
use gated_lm::config::{GateConfig, ModelConfig, MoeConfig};
use gated_lm::model::observer::{NoObserver, RouterLog};
use gated_lm::model::{shifted_targets, Batch, Model};

fn moe_cfg(gate: &str, f: impl Fn(&mut MoeConfig)) -> ModelConfig {
    let mut c = tiny_cfg(GateConfig::parse_spec(gate).unwrap());
    let mut m = MoeConfig::new(4, 2, 6);
    m.shared_expert_intermediate_size = 5;
    m.router_aux_loss_coef = 0.1;
    m.router_z_loss_coef = 0.05;
    f(&mut m);
    c.moe = Some(m);
    c
}

fn batch_run(m: &Model<f64>, obs: &mut RouterLog) -> (f64, gated_lm::model::params::ParamStore<f64>) {
    let ids = ids();
    let tg = shifted_targets(&ids, T);
    let mut g = m.zero_grads();
    let b = Batch {
        ids: &ids,
        targets: &tg,
        batch: B,
        seq: T,
    };
    let l = m.forward_backward(&b, &mut g, obs).unwrap();
    (l, g)
}

#[test]
fn moe_gradients_match_finite_differences_with_every_gate_position() {
    let cases: Vec<(&str, ModelConfig)> = vec![
        ("ungated, shared expert", moe_cfg("none", |_| {})),
        (
            "g1 elementwise, no renormalisation, no shared expert",
            moe_cfg("elementwise", |m| {
                m.norm_topk_prob = false;
                m.shared_expert_intermediate_size = 0;
            }),
        ),
        (
            "g2 headwise shared additive silu static, capacity 0.75",
            moe_cfg("g2:headwise:shared:add:silu:static", |m| m.capacity_factor = Some(0.75)),
        ),
        (
            "g3 ns-sigmoid, layer 0 dense",
            moe_cfg("g3:ns-sigmoid", |m| m.mlp_only_layers = vec![0]),
        ),
        (
            "g4 headwise, top-1 of 3",
            moe_cfg("g4:headwise", |m| {
                m.num_experts = 3;
                m.num_experts_per_tok = 1;
            }),
        ),
        (
            "g5 elementwise, sparse step 2",
            moe_cfg("g5", |m| m.decoder_sparse_step = 2),
        ),
    ];
    for (k, (what, cfg)) in cases.into_iter().enumerate() {
        // the first seed whose routing gives every expert a token: every tensor then has a
        // gradient to check (fd_check insists on it)
        let (mut m, log) = (0..50u64)
            .map(|s| {
                let mut m: Model<f64> = Model::new(cfg.clone(), 40 + 100 * k as u64 + s).unwrap();
                jitter_norms(&mut m, s);
                let mut log = RouterLog::default();
                batch_run(&m, &mut log);
                (m, log)
            })
            .find(|(_, log)| log.stats.iter().all(|st| st.load.iter().all(|&c| c > 0)))
            .expect("a seed that uses every expert");
        let moe_layers = (0..m.cfg.num_layers).filter(|&l| m.cfg.moe_at(l).is_some()).count();
        assert_eq!(log.stats.len(), moe_layers, "{what}");
        if what.contains("capacity") {
            assert!(
                log.stats.iter().any(|s| s.dropped > 0),
                "{what}: the capacity must bind"
            );
        }
        fd_check(&mut m, 4, what);
    }
}

#[test]
fn one_expert_top_one_is_the_dense_mlp_bit_for_bit() {
    for gate in ["none", "elementwise", "g2:headwise"] {
        let dense_cfg = tiny_cfg(GateConfig::parse_spec(gate).unwrap());
        let dense: Model<f64> = Model::new(dense_cfg.clone(), 7).unwrap();
        let mut cfg = dense_cfg.clone();
        let mut mc = MoeConfig::new(1, 1, dense_cfg.intermediate_size);
        mc.router_aux_loss_coef = 0.5; // constant (= 1) for a single expert: no gradient
        cfg.moe = Some(mc);
        let mut moe: Model<f64> = Model::new(cfg, 8).unwrap();
        for (i, name) in moe.params.names.clone().iter().enumerate() {
            let dense_name = name.replace("mlp.experts.0.", "mlp.");
            if let Some(t) = dense.params.get(&dense_name) {
                moe.params.tensors[i] = t.clone();
            }
        }
        let (ld, gd) = batch_run(&dense, &mut RouterLog::default());
        let mut log = RouterLog::default();
        let (lm, gm) = batch_run(&moe, &mut log);
        assert_eq!(ld.to_bits(), lm.to_bits(), "{gate}");
        assert!(log.stats.iter().all(|s| s.lb_loss == 1.0 && s.dropped == 0));
        for (i, name) in moe.params.names.iter().enumerate() {
            match dense
                .params
                .names
                .iter()
                .position(|n| *n == name.replace("mlp.experts.0.", "mlp."))
            {
                Some(j) => assert_eq!(gm.tensors[i], gd.tensors[j], "{gate}: {name}"),
                None => {
                    assert!(name.ends_with("mlp.gate.weight"), "{name}");
                    assert!(
                        gm.tensors[i].data.iter().all(|&x| x == 0.0),
                        "{gate}: router gradient must be 0"
                    );
                }
            }
        }
        assert_eq!(logits(&dense), logits(&moe), "{gate}");
    }
}

fn logits32(m: &Model<f32>) -> Vec<f32> {
    let ids: Vec<u32> = (0..32).map(|i| (i * 37 % m.cfg.vocab_size) as u32).collect();
    let tg = shifted_targets(&ids, 16);
    let b = Batch {
        ids: &ids,
        targets: &tg,
        batch: 2,
        seq: 16,
    };
    m.forward(&b, &mut NoObserver).unwrap().logits
}

fn read_json(dir: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap()
}

#[test]
fn moe_checkpoints_use_qwen3_moe_and_qwen3_next_layouts_and_load_back() {
    use gated_lm::io::hf::{load_model, save_model, Layout};
    let cases = [
        ("none", 0, Layout::Qwen3, "Qwen3MoeForCausalLM", "qwen3_moe"),
        (
            "elementwise",
            24,
            Layout::Qwen3Next,
            "Qwen3NextForCausalLM",
            "qwen3_next",
        ),
        ("headwise", 0, Layout::GatedLm, "GatedLmForCausalLM", "gated_lm"),
        ("none", 24, Layout::GatedLm, "GatedLmForCausalLM", "gated_lm"),
    ];
    for (gate, shared, layout, arch, model_type) in cases {
        let mut cfg = ModelConfig::preset("moe-micro", GateConfig::parse_spec(gate).unwrap()).unwrap();
        let moe = cfg.moe.as_mut().unwrap();
        moe.shared_expert_intermediate_size = shared;
        moe.router_z_loss_coef = 0.01;
        moe.mlp_only_layers = vec![1];
        let m: Model<f32> = Model::new(cfg, 3).unwrap();
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(save_model(dir.path(), &m, None).unwrap(), layout, "{gate} {shared}");
        let j = read_json(dir.path());
        assert_eq!(
            (j["architectures"][0].as_str(), j["model_type"].as_str()),
            (Some(arch), Some(model_type))
        );
        if layout != Layout::GatedLm {
            assert_eq!(j["num_experts"], 8);
            assert_eq!(j["num_experts_per_tok"], 2);
            assert_eq!(j["moe_intermediate_size"], 32);
            assert_eq!(j["mlp_only_layers"], serde_json::json!([1]));
        }
        let names = gated_lm::io::st::StFile::open(&dir.path().join("model.safetensors"))
            .unwrap()
            .names()
            .unwrap();
        for want in [
            "model.layers.0.mlp.gate.weight",
            "model.layers.0.mlp.experts.7.down_proj.weight",
            "model.layers.1.mlp.up_proj.weight",
        ] {
            assert!(names.iter().any(|n| n == want), "{gate}: {want} missing");
        }
        let (back, _) = load_model(dir.path()).unwrap();
        assert_eq!(back.cfg.moe, m.cfg.moe, "{gate} {shared}");
        let (a, b) = (logits32(&m), logits32(&back));
        assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() < 1e-5), "{gate} {shared}");
    }
}

/// transformers ≥ 5 fuses each layer's experts into `gate_up_proj` / `down_proj`; such files load
/// into the same weights as the per-expert names.
#[test]
fn fused_expert_tensors_load_like_per_expert_ones() {
    use gated_lm::io::hf::{load_model, save_model};
    use gated_lm::io::st::{write_f32, StFile, TensorMap};
    let cfg = ModelConfig::preset("moe-micro", None).unwrap();
    let m: Model<f32> = Model::new(cfg, 4).unwrap();
    let dir = tempfile::tempdir().unwrap();
    save_model(dir.path(), &m, None).unwrap();
    let path = dir.path().join("model.safetensors");
    let st = StFile::open(&path).unwrap();
    let mut out = TensorMap::new();
    for n in st.names().unwrap() {
        if !n.contains("mlp.experts.") {
            let t = st.f32(&n).unwrap();
            out.insert(n, (t.shape, t.data));
        }
    }
    let (e, f, d) = (8, 32, 64);
    for l in 0..2 {
        let (mut gu, mut down) = (Vec::new(), Vec::new());
        for x in 0..e {
            for part in ["gate_proj", "up_proj"] {
                gu.extend(
                    st.f32(&format!("model.layers.{l}.mlp.experts.{x}.{part}.weight"))
                        .unwrap()
                        .data,
                );
            }
            down.extend(
                st.f32(&format!("model.layers.{l}.mlp.experts.{x}.down_proj.weight"))
                    .unwrap()
                    .data,
            );
        }
        out.insert(
            format!("model.layers.{l}.mlp.experts.gate_up_proj"),
            (vec![e, 2 * f, d], gu),
        );
        out.insert(format!("model.layers.{l}.mlp.experts.down_proj"), (vec![e, d, f], down));
    }
    drop(st);
    write_f32(&path, &out).unwrap();
    let (back, _) = load_model(dir.path()).unwrap();
    assert_eq!(back.params, m.params);
    // a fused tensor of the wrong rank is named in the error
    let (s, dta) = out.remove("model.layers.1.mlp.experts.down_proj").unwrap();
    out.insert(
        "model.layers.1.mlp.experts.down_proj".into(),
        (vec![s[0] * s[1], s[2]], dta),
    );
    write_f32(&path, &out).unwrap();
    let e = format!("{:#}", load_model(dir.path()).err().unwrap());
    assert!(
        e.contains("model.layers.1.mlp.experts.down_proj") && e.contains("3-D"),
        "{e}"
    );
}

#[test]
fn malformed_moe_configs_are_rejected_with_the_key() {
    use gated_lm::io::hf::parse_config;
    let base = r#"{"model_type": "qwen3_moe", "vocab_size": 64, "hidden_size": 16, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8, "intermediate_size": 32,
        "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 8}"#;
    let (c, _) = parse_config(base, "c.json").unwrap();
    assert_eq!(
        c.moe.as_ref().map(|m| (m.num_experts, m.num_experts_per_tok)),
        Some((4, 2))
    );
    for (from, to, want) in [
        (
            "\"num_experts_per_tok\": 2",
            "\"num_experts_per_tok\": 5",
            "num_experts_per_tok (5) ≤ num_experts (4)",
        ),
        (
            "\"moe_intermediate_size\": 8",
            "\"moe_intermediate_size\": -1",
            "'moe_intermediate_size' must be a positive integer",
        ),
        ("\"num_experts\": 4", "\"num_experts\": 0", "needs 'num_experts' > 0"),
        (
            "\"intermediate_size\": 32",
            "\"intermediate_size\": 32, \"mlp_only_layers\": \"x\"",
            "'mlp_only_layers' must be a list",
        ),
    ] {
        let e = format!("{:#}", parse_config(&base.replace(from, to), "c.json").unwrap_err());
        assert!(e.contains("c.json") && e.contains(want), "{e}");
    }
}

/// Our per-expert tensors of `m` fused the way transformers ≥ 5 holds them.
fn fuse_experts(m: gated_lm::io::st::TensorMap, layers: usize, experts: usize) -> gated_lm::io::st::TensorMap {
    let mut out = gated_lm::io::st::TensorMap::new();
    let mut fused: std::collections::BTreeMap<String, (Vec<usize>, Vec<f32>)> = Default::default();
    for l in 0..layers {
        let p = format!("model.layers.{l}.mlp.experts.");
        if !m.contains_key(&format!("{p}0.gate_proj.weight")) {
            continue;
        }
        let (mut gu, mut down) = (Vec::new(), Vec::new());
        let (f, d) = (
            m[&format!("{p}0.gate_proj.weight")].0[0],
            m[&format!("{p}0.gate_proj.weight")].0[1],
        );
        for e in 0..experts {
            gu.extend_from_slice(&m[&format!("{p}{e}.gate_proj.weight")].1);
            gu.extend_from_slice(&m[&format!("{p}{e}.up_proj.weight")].1);
            down.extend_from_slice(&m[&format!("{p}{e}.down_proj.weight")].1);
        }
        fused.insert(format!("{p}gate_up_proj"), (vec![experts, 2 * f, d], gu));
        fused.insert(format!("{p}down_proj"), (vec![experts, d, f], down));
    }
    for (k, v) in m {
        if !k.contains("mlp.experts.") {
            out.insert(k, v);
        }
    }
    out.extend(fused);
    out
}

/// Forward (logits, loss, every layer's output) and the loss gradient of every parameter against
/// transformers' own Qwen3-MoE / Qwen3-Next MoE models (tests/fixtures/gen_moe.py), loading the
/// fused expert tensors transformers 5 writes.
fn check_transformers_parity(dir: &str) {
    use gated_lm::io::hf::{load_model, to_layout};
    use gated_lm::io::st::StFile;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(dir);
    let (mut m, layout) = load_model(&root).unwrap();
    let g = StFile::open(&root.join("golden.safetensors")).unwrap();
    let (shape, ids) = g.ids("input_ids").unwrap();
    let (b, t) = (shape[0], shape[1]);
    let tg = shifted_targets(&ids, t);
    let batch = Batch {
        ids: &ids,
        targets: &tg,
        batch: b,
        seq: t,
    };
    let mut rec = gated_lm::model::observer::Recorder::default();
    let fwd = m.forward(&batch, &mut rec).unwrap();
    let close = |what: &str, ours: &[f32], want: &[f32]| {
        assert_eq!(ours.len(), want.len(), "{dir}: {what}");
        let scale = want.iter().fold(1.0f32, |a, x| a.max(x.abs()));
        let err = ours.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        assert!(err <= 1e-4 * scale, "{dir}: {what} max err {err} (scale {scale})");
    };
    close("logits", &fwd.logits, &g.f32("logits").unwrap().data);
    assert!(
        (fwd.loss - g.f32("loss").unwrap().data[0] as f64).abs() < 1e-5,
        "{dir}: loss"
    );
    for (i, x) in rec.layer_out.iter().enumerate() {
        close(
            &format!("layer_out.{i}"),
            x,
            &g.f32(&format!("layer_out.{i}")).unwrap().data,
        );
    }
    assert_eq!(
        rec.routers.len(),
        (0..m.cfg.num_layers).filter(|&l| m.cfg.moe_at(l).is_some()).count()
    );

    // transformers adds no router loss unless output_router_logits: neither do we here
    let moe = m.cfg.moe.as_mut().unwrap();
    (moe.router_aux_loss_coef, moe.router_z_loss_coef) = (0.0, 0.0);
    let mut grads = m.zero_grads();
    m.forward_backward(&batch, &mut grads, &mut NoObserver).unwrap();
    let experts = m.cfg.moe.as_ref().unwrap().num_experts;
    let ours = fuse_experts(
        to_layout(&m.cfg, layout, &grads, true).unwrap(),
        m.cfg.num_layers,
        experts,
    );
    let mut checked = 0;
    for key in g.names().unwrap().iter().filter(|k| k.starts_with("grad.")) {
        let want = g.f32(key).unwrap().data;
        let name = &key["grad.".len()..];
        let (_, d) = ours
            .get(name)
            .unwrap_or_else(|| panic!("{dir}: no gradient for {name}"));
        let diff = d.iter().zip(&want).map(|(a, b)| (a - b) * (a - b)).sum::<f32>().sqrt();
        let norm = want.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!(diff <= 1e-4 * norm.max(1e-12), "{dir}: {key} rel err {}", diff / norm);
        checked += 1;
    }
    assert_eq!(checked, ours.len(), "{dir}: every parameter compared");
}

#[test]
fn qwen3_moe_matches_transformers_forward_and_gradients() {
    check_transformers_parity("qwen3-moe-tiny");
}

#[test]
fn qwen3_next_moe_matches_transformers_forward_and_gradients() {
    check_transformers_parity("qwen3-next-moe-tiny");
}

#[test]
fn moe_runs_train_analyze_and_generate_end_to_end() {
    use gated_lm::train::metrics::read_rows;
    use std::process::Command;
    let bin = env!("CARGO_BIN_EXE_gated-lm");
    let tmp = tempfile::tempdir().unwrap();
    let text = &gated_lm::train::data::embedded_corpus().unwrap()[0];
    let corpus = tmp.path().join("c.txt");
    std::fs::write(&corpus, &text[..text.char_indices().nth(100_000).unwrap().0]).unwrap();
    let run = tmp.path().join("run");
    let ok = |c: &mut Command| {
        let o = c.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    // capacity 0.5: at most half of the assignments fit, the rest are dropped
    ok(Command::new(bin)
        .args([
            "train",
            "--preset",
            "cpu-moe-micro",
            "--moe",
            "8:2:32:cap=0.5:aux=0.01",
            "--max-steps",
            "6",
        ])
        .args(["--quiet", "--data"])
        .arg(&corpus)
        .arg("--out")
        .arg(&run));
    let rows = read_rows(&run.join("metrics.jsonl")).unwrap();
    let train: Vec<_> = rows.iter().filter(|r| r.get("loss").is_some()).collect();
    assert_eq!(train.len(), 6);
    for r in &train {
        let (lb, aux, drop) = (
            r["lb_loss"].as_f64().unwrap(),
            r["aux_loss"].as_f64().unwrap(),
            r["dropped_frac"].as_f64().unwrap(),
        );
        assert!((aux - 0.01 * lb).abs() < 1e-12, "aux = coef · lb (no z-loss): {r}");
        assert!(
            drop >= 0.5 - 1e-9 && r["expert_imbalance"].as_f64().unwrap() >= 1.0,
            "{r}"
        );
    }
    let eval = rows.iter().rev().find(|r| r.get("val_loss").is_some()).unwrap();
    for load in eval["moe"]["expert_load"].as_array().unwrap() {
        let s: f64 = load.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).sum();
        assert!((s - 1.0).abs() < 1e-9);
    }
    let cfg = read_json(&run.join("model"));
    // a capacity-limited model: transformers would route it dropless, so only our layout holds it
    assert_eq!(cfg["architectures"][0], "GatedLmForCausalLM");
    let e = Command::new(bin)
        .args(["convert", "--model"])
        .arg(run.join("model"))
        .args(["--to", "qwen3", "--out"])
        .arg(tmp.path().join("conv"))
        .output()
        .unwrap();
    assert!(!e.status.success());
    assert!(String::from_utf8_lossy(&e.stderr).contains("capacity"));
    let json = tmp.path().join("a.json");
    let out = ok(Command::new(bin)
        .args(["analyze", "--model"])
        .arg(&run)
        .arg("--json")
        .arg(&json)
        .args(["--max-tokens", "200"]));
    assert!(out.contains("expert imbalance"), "{out}");
    let a: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert!(a["moe"]["dropped_frac"].as_f64().unwrap() >= 0.5 - 1e-9, "{}", a["moe"]);
    let out = ok(Command::new(bin).args(["generate", "--model"]).arg(&run).args([
        "--prompt",
        "The ",
        "--max-new-tokens",
        "8",
    ]));
    assert!(!out.is_empty());
}

#[test]
fn moe_checkpoints_with_missing_or_misshapen_experts_are_rejected() {
    use gated_lm::io::hf::{load_model, save_model};
    use gated_lm::io::st::{write_f32, StFile, TensorMap};
    let m: Model<f32> = Model::new(ModelConfig::preset("moe-micro", None).unwrap(), 5).unwrap();
    let dir = tempfile::tempdir().unwrap();
    save_model(dir.path(), &m, None).unwrap();
    let path = dir.path().join("model.safetensors");
    let st = StFile::open(&path).unwrap();
    let all: TensorMap = st
        .names()
        .unwrap()
        .into_iter()
        .map(|n| {
            let t = st.f32(&n).unwrap();
            (n, (t.shape, t.data))
        })
        .collect();
    drop(st);
    let victim = "model.layers.1.mlp.experts.5.up_proj.weight";
    let mut missing = all.clone();
    missing.remove(victim);
    write_f32(&path, &missing).unwrap();
    let e = format!("{:#}", load_model(dir.path()).err().unwrap());
    assert!(e.contains(victim) && e.contains("model.safetensors"), "{e}");
    let mut wrong = all.clone();
    wrong.insert(victim.into(), (vec![16, 64], vec![0.0; 16 * 64]));
    write_f32(&path, &wrong).unwrap();
    let e = format!("{:#}", load_model(dir.path()).err().unwrap());
    assert!(
        e.contains(victim) && e.contains("[16, 64]") && e.contains("[32, 64]"),
        "{e}"
    );
}

/// A llama.cpp `qwen3moe` GGUF of `m` (experts stacked into `blk.N.ffn_*_exps` 3-D tensors,
/// matrices in `ty`, norms F32), with a byte-level vocabulary.
fn write_qwen3moe(m: &Model<f32>, ty: gated_lm::io::gguf::GgmlType, path: &std::path::Path) {
    use gated_lm::io::gguf::{write, GgmlType, Value};
    let c = &m.cfg;
    let moe = c.moe.as_ref().unwrap();
    let map = gated_lm::io::tokenizer::bytes_to_unicode();
    let mut tokens: Vec<Value> = (0..256).map(|b| Value::Str(map[b].to_string())).collect();
    while tokens.len() < c.vocab_size {
        tokens.push(Value::Str(format!("<pad{}>", tokens.len())));
    }
    let a = |k: &str| format!("qwen3moe.{k}");
    let meta = vec![
        ("general.architecture".to_string(), Value::Str("qwen3moe".into())),
        (a("block_count"), Value::U32(c.num_layers as u32)),
        (a("embedding_length"), Value::U32(c.hidden_size as u32)),
        (a("feed_forward_length"), Value::U32(c.intermediate_size as u32)),
        (
            a("expert_feed_forward_length"),
            Value::U32(moe.moe_intermediate_size as u32),
        ),
        (a("expert_count"), Value::U32(moe.num_experts as u32)),
        (a("expert_used_count"), Value::U32(moe.num_experts_per_tok as u32)),
        (a("attention.head_count"), Value::U32(c.num_heads as u32)),
        (a("attention.head_count_kv"), Value::U32(c.num_kv_heads as u32)),
        (a("attention.key_length"), Value::U32(c.head_dim as u32)),
        (a("attention.layer_norm_rms_epsilon"), Value::F32(c.rms_norm_eps as f32)),
        (a("rope.freq_base"), Value::F32(c.rope_theta as f32)),
        (a("context_length"), Value::U32(c.max_position_embeddings as u32)),
        ("tokenizer.ggml.model".into(), Value::Str("gpt2".into())),
        ("tokenizer.ggml.tokens".into(), Value::Arr(tokens)),
        ("tokenizer.ggml.merges".into(), Value::Arr(vec![])),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(0)),
    ];
    let meta: Vec<(&str, Value)> = meta.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    let short = |tail: &str| match tail {
        "input_layernorm.weight" => "attn_norm",
        "self_attn.q_proj.weight" => "attn_q",
        "self_attn.k_proj.weight" => "attn_k",
        "self_attn.v_proj.weight" => "attn_v",
        "self_attn.o_proj.weight" => "attn_output",
        "self_attn.q_norm.weight" => "attn_q_norm",
        "self_attn.k_norm.weight" => "attn_k_norm",
        "post_attention_layernorm.weight" => "ffn_norm",
        "mlp.gate.weight" => "ffn_gate_inp",
        o => panic!("{o}"),
    };
    let p = |n: &str| m.params.get(n).unwrap().clone();
    let mut tensors = vec![];
    let kind = |sh: &[usize]| if sh.len() == 1 { GgmlType::F32 } else { ty };
    for n in ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"] {
        let t = p(n);
        let g = n
            .replace("model.embed_tokens", "token_embd")
            .replace("model.norm", "output_norm")
            .replace("lm_head", "output");
        tensors.push((g, t.shape.clone(), kind(&t.shape), t.data));
    }
    for l in 0..c.num_layers {
        let pre = format!("model.layers.{l}.");
        for (n, t) in m.params.names.iter().zip(&m.params.tensors) {
            if let Some(tail) = n.strip_prefix(&pre).filter(|t| !t.starts_with("mlp.experts.")) {
                tensors.push((
                    format!("blk.{l}.{}.weight", short(tail)),
                    t.shape.clone(),
                    kind(&t.shape),
                    t.data.clone(),
                ));
            }
        }
        for proj in ["gate", "up", "down"] {
            let mut data = vec![];
            let mut shape = vec![moe.num_experts];
            for e in 0..moe.num_experts {
                let t = p(&format!("{pre}mlp.experts.{e}.{proj}_proj.weight"));
                if e == 0 {
                    shape.extend(&t.shape);
                }
                data.extend(t.data);
            }
            tensors.push((
                format!("blk.{l}.ffn_{proj}_exps.weight"),
                shape.clone(),
                kind(&shape),
                data,
            ));
        }
    }
    write(path, &meta, &tensors).unwrap();
}

/// llama.cpp's MoE GGUF layout (qwen3moe) loads into the same model, exactly in F32 and within
/// Q8_0 precision otherwise; `analyze` runs on it and reports the router.
#[test]
fn qwen3moe_gguf_files_load_and_analyze() {
    use gated_lm::io::gguf::{load_gguf_model, GgmlType};
    let mut cfg = ModelConfig::preset("moe-micro", None).unwrap();
    cfg.max_position_embeddings = 256;
    cfg.init_std = 0.2;
    let m: Model<f32> = Model::new(cfg, 12).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let want = logits32(&m);
    let scale = want.iter().fold(0f32, |a, x| a.max(x.abs()));
    for (ty, tol) in [(GgmlType::F32, 0.0), (GgmlType::Q8_0, 0.05)] {
        let path = dir.path().join(format!("m-{ty:?}.gguf"));
        write_qwen3moe(&m, ty, &path);
        let (back, _) = load_gguf_model(&path).unwrap();
        assert_eq!(back.cfg.moe, m.cfg.moe);
        if tol == 0.0 {
            assert_eq!(back.params, m.params);
            assert_eq!(logits32(&back), want);
            continue;
        }
        // Q8_0: every weight within its block's quantisation step (Q8_0 rounds to 1/127 of the
        // block's largest magnitude)...
        for ((n, a), b) in m.params.names.iter().zip(&m.params.tensors).zip(&back.params.tensors) {
            let top = a.data.iter().fold(0f32, |x, v| x.max(v.abs()));
            let err = a
                .data
                .iter()
                .zip(&b.data)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(err <= top / 127.0 * 0.51 + 1e-6, "{n}: off by {err} (max {top})");
        }
        // ...and the logits close wherever quantisation did not flip a top-k choice: most tokens
        let rows: Vec<f32> = want
            .chunks(m.cfg.vocab_size)
            .zip(logits32(&back).chunks(m.cfg.vocab_size))
            .map(|(a, b)| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max))
            .collect();
        let close = rows.iter().filter(|&&e| e <= tol * scale).count();
        assert!(
            close * 4 >= rows.len() * 3,
            "{ty:?}: only {close} of {} token rows close: {rows:?}",
            rows.len()
        );
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gated-lm"))
        .args(["analyze", "--model"])
        .arg(dir.path().join("m-Q8_0.gguf"))
        .args(["--prompt", "a few words to route through the experts"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("expert imbalance"));
}
