//! What a user who gets something wrong sees: config keys and types named with their path,
//! numeric arguments checked, absurd sizes refused with an estimate instead of an allocation
//! abort, mismatched checkpoints and truncated files named — each a non-zero exit, no panic.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_gated-lm"))
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The command must fail with `code` and say `needle`.
fn fails_with(o: Output, code: i32, needle: &str) {
    let e = stderr(&o);
    assert_eq!(
        o.status.code(),
        Some(code),
        "expected exit {code} saying '{needle}', got: {e}"
    );
    assert!(e.contains(needle), "expected '{needle}' in: {e}");
    assert!(!e.contains("panicked"), "{e}");
}

/// A saved micro model (a trained run's layout) in `dir/model`, with a byte tokenizer.
fn saved_model(dir: &Path) -> PathBuf {
    let cfg = gated_lm::train::config::TrainConfig::preset("cpu-micro").unwrap().model;
    let m: gated_lm::model::Model<f32> = gated_lm::model::Model::new(cfg, 0).unwrap();
    let d = dir.join("model");
    gated_lm::io::hf::save_model(&d, &m, None).unwrap();
    gated_lm::io::tokenizer::Tok::Byte.save(&d).unwrap();
    d
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

#[test]
fn config_files_name_unknown_keys_type_errors_and_apply_their_preset() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("never");
    let o = out.to_str().unwrap();
    let f = write(tmp.path(), "a.toml", "[optim]\nlrr = 0.001\n");
    fails_with(
        run(&["train", "--config", &f, "--out", o]),
        1,
        "unknown key `optim.lrr` (did you mean `optim.lr`?)",
    );
    let f = write(tmp.path(), "b.toml", "[bogus]\nx = 1\n");
    fails_with(run(&["train", "--config", &f, "--out", o]), 1, "unknown key `bogus`");
    let f = write(tmp.path(), "c.toml", "[optim]\nlr = \"fast\"\n");
    fails_with(run(&["train", "--config", &f, "--out", o]), 1, "optim.lr");
    let f = write(tmp.path(), "d.toml", "[model.gate]\npositon = \"g2\"\n");
    fails_with(run(&["train", "--config", &f, "--out", o]), 1, "`model.gate.position`");
    let f = write(tmp.path(), "e.toml", "preset = \"cpu-micro\"\n");
    fails_with(
        run(&["train", "--config", &f, "--preset", "cpu-tiny", "--out", o]),
        1,
        "disagree",
    );
    assert!(!out.exists(), "a refused run must not leave a directory");
    // the preset a file names is the one it overlays, and `gate = "none"` is the baseline
    let corpus = tmp.path().join("c.txt");
    std::fs::write(&corpus, "the quick brown fox jumps over the lazy dog. ".repeat(400)).unwrap();
    let f = write(
        tmp.path(),
        "p.toml",
        "preset = \"cpu-micro\"\n[model]\ngate = \"none\"\n",
    );
    let done = run(&[
        "train",
        "--config",
        &f,
        "--max-steps",
        "1",
        "--quiet",
        "--data",
        corpus.to_str().unwrap(),
        "--out",
        o,
    ]);
    assert!(done.status.success(), "{}", stderr(&done));
    let cfg: toml::Table = toml::from_str(&std::fs::read_to_string(out.join("config.toml")).unwrap()).unwrap();
    assert_eq!(cfg["preset"].as_str(), Some("cpu-micro"));
    assert_eq!(cfg["model"]["num_layers"].as_integer(), Some(2), "cpu-micro's shape");
    assert_eq!(cfg["model"]["gate"].as_str(), Some("none"));
}

#[test]
fn numeric_arguments_are_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let model = saved_model(tmp.path());
    let m = model.to_str().unwrap();
    let out = tmp.path().join("x");
    let o = out.to_str().unwrap();
    for (args, needle) in [
        (vec!["bench", "--preset", "micro", "--steps", "0"], "--steps"),
        (
            vec!["generate", "--model", m, "--prompt", "a", "--temperature", "nan"],
            "finite",
        ),
        (
            vec!["generate", "--model", m, "--prompt", "a", "--temperature", "inf"],
            "finite",
        ),
        (
            vec!["generate", "--model", m, "--prompt", "a", "--temperature", "-1"],
            "must be ≥ 0",
        ),
        (
            vec!["generate", "--model", m, "--prompt", "a", "--top-p", "1.5"],
            "(0, 1]",
        ),
        (vec!["eval", "--model", m, "--stride", "0"], "--stride"),
        (vec!["eval", "--model", m, "--sink-tokens", "4"], "--window"),
        (vec!["ruler", "--model", m, "--samples", "0"], "--samples"),
        (vec!["train", "--max-steps", "0", "--out", o], "--max-steps"),
        (vec!["train", "--stop-after", "0", "--out", o], "--stop-after"),
        (vec!["train", "--max-seconds=-1", "--out", o], "must be ≥ 0"),
        (vec!["train", "--lr", "-0.001", "--out", o], "must be > 0"),
    ] {
        fails_with(run(&args), 2, needle);
    }
    for (args, needle) in [
        (vec!["ruler", "--model", m, "--lengths", "0"], "too short"),
        (
            vec!["analyze", "--model", m, "--layers", "9", "--prompt", "hello"],
            "out of range",
        ),
        (
            vec![
                "analyze",
                "--model",
                m,
                "--prompt",
                "hello",
                "--json",
                "/nonexistent/a.json",
            ],
            "does not exist",
        ),
        (vec!["sweep", "--gates", "", "--out", o], "empty entry"),
    ] {
        fails_with(run(&args), 1, needle);
    }
    assert!(!out.exists());
}

/// `args` under an address-space limit: the command must refuse with its estimate, not abort
/// in the allocator (exit 134) or take the machine's memory.
fn refused_under_limit(args: &[&str]) {
    let mut c = bin();
    c.args(args);
    // SAFETY: setrlimit in the child before exec touches only that process
    unsafe {
        c.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 8 << 30,
                rlim_max: 8 << 30,
            };
            libc::setrlimit(libc::RLIMIT_AS, &lim);
            Ok(())
        });
    }
    fails_with(c.output().unwrap(), 1, "would need about");
}

#[test]
fn absurd_sizes_are_refused_with_an_estimate() {
    let tmp = tempfile::tempdir().unwrap();
    let model = saved_model(tmp.path());
    let out = tmp.path().join("run");
    let o = out.to_str().unwrap();
    refused_under_limit(&["ruler", "--model", model.to_str().unwrap(), "--lengths", "100000"]);
    for toml in [
        "[train]\nbatch_size = 100000000\n",
        "[data]\ntokenizer = \"bpe\"\nbpe_vocab_size = 4000000000\n",
        "[model]\nhidden_size = 8192\nnum_layers = 64\nnum_heads = 64\nhead_dim = 128\nintermediate_size = 28672\n",
    ] {
        let f = write(tmp.path(), "big.toml", toml);
        refused_under_limit(&["train", "--preset", "cpu-micro", "--config", &f, "--out", o]);
        assert!(!out.exists(), "a refused run must not leave a directory");
    }
}

#[test]
fn mismatched_and_truncated_model_files_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let model = saved_model(tmp.path());
    // a config with fewer layers than the weights must not load silently
    let cpath = model.join("config.json");
    let text = std::fs::read_to_string(&cpath).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["num_hidden_layers"] = serde_json::json!(1);
    if let Some(lt) = v.get_mut("layer_types") {
        *lt = serde_json::json!(["full_attention"]);
    }
    std::fs::write(&cpath, serde_json::to_string(&v).unwrap()).unwrap();
    let e = gated_lm::io::hf::load_model(&model).err().unwrap().to_string();
    assert!(e.contains("does not describe") && e.contains("layers.1."), "{e}");
    // a Qwen3-Next layer_types list of the wrong length says so
    v["num_hidden_layers"] = serde_json::json!(2);
    v["layer_types"] = serde_json::json!(["full_attention"]);
    std::fs::write(&cpath, serde_json::to_string(&v).unwrap()).unwrap();
    let e = format!("{:#}", gated_lm::io::hf::load_model(&model).err().unwrap());
    assert!(
        e.contains("layer_types has 1 entries but num_hidden_layers is 2"),
        "{e}"
    );
    std::fs::write(&cpath, text).unwrap();
    // a truncated safetensors file
    let w = model.join("model.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() / 2]).unwrap();
    let e = format!("{:#}", gated_lm::io::hf::load_model(&model).err().unwrap());
    assert!(e.contains("truncated or corrupt"), "{e}");
    // a missing tensor is named once
    let st = gated_lm::io::st::StFile::from_bytes("x.safetensors", gated_lm::io::st::Bytes::Owned(bytes)).unwrap();
    let e = format!("{:#}", st.f32("nope").err().unwrap());
    assert_eq!(e, "x.safetensors: no tensor named 'nope'");
}

#[test]
fn convert_and_dump_take_run_directories_and_convert_keeps_the_tokenizer() {
    let tmp = tempfile::tempdir().unwrap();
    saved_model(tmp.path());
    std::fs::write(tmp.path().join("config.toml"), "").unwrap(); // a run directory
    let out = tmp.path().join("conv");
    let o = run(&[
        "convert",
        "--model",
        tmp.path().to_str().unwrap(),
        "--to",
        "gated-lm",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let said = String::from_utf8_lossy(&o.stdout);
    assert!(
        said.contains("(qwen3-next) ->") && said.contains("(gated-lm)"),
        "{said}"
    );
    assert!(out.join("tokenizer.json").exists());
    let o = run(&[
        "eval",
        "--model",
        out.to_str().unwrap(),
        "--max-tokens",
        "64",
        "--context",
        "32",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
}
