//! Checkpoint layouts: save/load round trips, conversion between the official and Qwen3-Next
//! layouts, the layout our trained models are saved in, and clear errors on malformed files.

use gated_lm::config::{GateConfig, ModelConfig};
use gated_lm::io::hf::{convert, load_model, save_model, Layout};
use gated_lm::model::observer::NoObserver;
use gated_lm::model::{shifted_targets, Batch, Model};
use std::path::{Path, PathBuf};
use std::process::Command;

fn fx(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(p)
}

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

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn json(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap()
}

#[test]
fn every_fixture_round_trips_through_its_own_layout() {
    for name in [
        "qwen3-tiny",
        "qwen3-next-tiny",
        "official-headwise-tiny",
        "official-elementwise-tiny",
    ] {
        let (m, layout) = load_model(&fx(name)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let saved = save_model(dir.path(), &m, Some(layout)).unwrap();
        assert_eq!(saved, layout);
        let (back, layout2) = load_model(dir.path()).unwrap();
        assert_eq!(layout2, layout, "{name}");
        assert_eq!(back.params, m.params, "{name}: weights changed in a round trip");
        assert_eq!(logits(&back), logits(&m));
    }
}

#[test]
fn official_and_qwen3_next_convert_both_ways_with_the_same_function() {
    let (off, _) = load_model(&fx("official-elementwise-tiny")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let next = convert(&off, Layout::Qwen3Next).unwrap();
    save_model(dir.path(), &next, Some(Layout::Qwen3Next)).unwrap();
    let j = json(dir.path());
    assert_eq!(j["architectures"][0], "Qwen3NextForCausalLM");
    assert_eq!(j["rope_parameters"]["partial_rotary_factor"], 1.0);
    assert_eq!(j["layer_types"].as_array().unwrap().len(), 2);
    // norms stored as w - 1 for the (1 + w) form
    let w_off = off.params.get("model.norm.weight").unwrap().data[0];
    let (reloaded, layout) = load_model(dir.path()).unwrap();
    assert_eq!(layout, Layout::Qwen3Next);
    assert!((reloaded.params.get("model.norm.weight").unwrap().data[0] - (w_off - 1.0)).abs() < 1e-6);
    assert!(max_diff(&logits(&reloaded), &logits(&off)) < 1e-5);
    // and back: the q_proj rows return to the per-KV-group order
    let back = convert(&reloaded, Layout::Official).unwrap();
    let d = max_diff(
        &back
            .params
            .tensors
            .iter()
            .flat_map(|t| t.data.clone())
            .collect::<Vec<_>>(),
        &off.params
            .tensors
            .iter()
            .flat_map(|t| t.data.clone())
            .collect::<Vec<_>>(),
    );
    assert!(d < 1e-6, "round trip changed weights by {d}");
    // partial RoPE cannot be expressed in the official layout
    let (next_fx, _) = load_model(&fx("qwen3-next-tiny")).unwrap();
    let err = convert(&next_fx, Layout::Official)
        .err()
        .expect("must fail")
        .to_string();
    assert!(err.contains("partial_rotary_factor"), "{err}");
}

#[test]
fn trained_models_are_saved_in_stock_layouts_where_one_exists() {
    let cases = [
        ("none", Layout::Qwen3, "Qwen3ForCausalLM"),
        ("elementwise", Layout::Qwen3Next, "Qwen3NextForCausalLM"),
        ("headwise", Layout::Official, "Qwen3ForCausalLM"),
        ("g2:headwise:silu", Layout::GatedLm, "GatedLmForCausalLM"),
        ("g1:static", Layout::GatedLm, "GatedLmForCausalLM"),
    ];
    for (spec, layout, arch) in cases {
        let mut cfg = ModelConfig::preset("micro", GateConfig::parse_spec(spec).unwrap()).unwrap();
        cfg.max_position_embeddings = 64;
        let m: Model<f32> = Model::new(cfg, 1).unwrap();
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(save_model(dir.path(), &m, None).unwrap(), layout, "{spec}");
        assert_eq!(json(dir.path())["architectures"][0], arch);
        let (back, _) = load_model(dir.path()).unwrap();
        assert_eq!(back.cfg.gate, m.cfg.gate, "{spec}");
        assert!(max_diff(&logits(&back), &logits(&m)) < 1e-5, "{spec}");
    }
}

fn copy_fixture(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fx(name).join(f), dir.path().join(f)).unwrap();
    }
    dir
}

fn load_err(dir: &Path) -> String {
    format!("{:#}", load_model(dir).err().expect("load should fail"))
}

#[test]
fn malformed_checkpoints_give_clear_errors() {
    let d = copy_fixture("qwen3-tiny");
    let cfg_path = d.path().join("config.json");
    let good = std::fs::read_to_string(&cfg_path).unwrap();
    let edit = |f: &dyn Fn(&mut serde_json::Value), want: &str| {
        let mut v: serde_json::Value = serde_json::from_str(&good).unwrap();
        f(&mut v);
        std::fs::write(&cfg_path, v.to_string()).unwrap();
        let e = load_err(d.path());
        assert!(e.contains(want) && e.contains("config.json"), "{e}");
    };
    edit(&|v| v["model_type"] = "llama4".into(), "model_type 'llama4'");
    edit(
        &|v| v["num_key_value_heads"] = 3.into(),
        "multiple of num_key_value_heads",
    );
    edit(
        &|v| drop(v.as_object_mut().unwrap().remove("hidden_size")),
        "missing 'hidden_size'",
    );
    edit(
        &|v| v["vocab_size"] = (-5).into(),
        "'vocab_size' must be a positive integer",
    );
    edit(&|v| v["hidden_size"] = 128.into(), "shape");
    std::fs::write(&cfg_path, "{not json").unwrap();
    assert!(load_err(d.path()).contains("not valid JSON"));
    std::fs::write(&cfg_path, &good).unwrap();

    // truncated weights, garbage weights, missing tensor
    let w = d.path().join("model.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_err(d.path());
    assert!(
        e.contains("model.safetensors") && e.contains("truncated or corrupt"),
        "{e}"
    );
    std::fs::write(&w, u64::MAX.to_le_bytes()).unwrap();
    assert!(load_err(d.path()).contains("not a valid safetensors file"));
    let official = copy_fixture("official-headwise-tiny");
    std::fs::copy(official.path().join("model.safetensors"), &w).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("q_proj") && e.contains("shape"), "{e}");
}

#[test]
fn cli_dump_and_convert_end_to_end() {
    let bin = env!("CARGO_BIN_EXE_gated-lm");
    let out = tempfile::tempdir().unwrap();
    let dump = out.path().join("dump.safetensors");
    let st = Command::new(bin)
        .args(["dump", "--model"])
        .arg(fx("official-headwise-tiny"))
        .arg("--input")
        .arg(fx("official-headwise-tiny/golden.safetensors"))
        .arg("--out")
        .arg(&dump)
        .status()
        .unwrap();
    assert!(st.success());
    let ours = gated_lm::io::st::StFile::open(&dump).unwrap();
    let gold = gated_lm::io::st::StFile::open(&fx("official-headwise-tiny/golden.safetensors")).unwrap();
    assert_eq!(ours.f32("gate.1").unwrap().shape, vec![2, 16, 4, 1]);
    assert!((ours.f32("loss").unwrap().data[0] - gold.f32("loss").unwrap().data[0]).abs() < 1e-5);

    let conv = out.path().join("next");
    let o = Command::new(bin)
        .args(["convert", "--to", "qwen3-next", "--model"])
        .arg(fx("official-elementwise-tiny"))
        .arg("--out")
        .arg(&conv)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(load_model(&conv).unwrap().1, Layout::Qwen3Next);

    // bad input: non-zero exit, message names the file, no panic
    let o = Command::new(bin)
        .args(["dump", "--model"])
        .arg(fx("qwen3-tiny"))
        .arg("--input")
        .arg(fx("qwen3-tiny/config.json"))
        .arg("--out")
        .arg(&dump)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1));
    assert!(err.contains("config.json") && !err.contains("panicked"), "{err}");
}
