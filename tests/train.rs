//! The trainer end to end: loss falls, the run directory is complete, resume is bit-identical,
//! and divergence is detected without losing the last checkpoint.

use gated_lm::io::hf::{load_model, Layout};
use gated_lm::train::config::TrainConfig;
use gated_lm::train::{run, RunOptions};
use std::path::Path;

/// A few hundred KB of the embedded books as a corpus file.
fn corpus(dir: &Path) -> String {
    let text = &gated_lm::train::data::embedded_corpus().unwrap()[0];
    let start = text.char_indices().nth(100_000).unwrap().0;
    let end = text.char_indices().nth(400_000).unwrap().0;
    let p = dir.join("corpus.txt");
    std::fs::write(&p, &text[start..end]).unwrap();
    p.display().to_string()
}

fn micro(dir: &Path, steps: u64) -> TrainConfig {
    let mut c = TrainConfig::preset("cpu-micro").unwrap();
    c.data.paths = vec![corpus(dir)];
    c.train.max_steps = steps;
    c.train.eval_every = 10;
    c.train.checkpoint_every = 7;
    c.train.eval_batches = 1;
    c.schedule.warmup_steps = 5;
    c
}

fn rows(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn train_losses(run: &Path) -> Vec<(u64, u64)> {
    rows(run)
        .iter()
        .filter_map(|r| Some((r["step"].as_u64()?, r.get("loss")?.as_f64()?.to_bits())))
        .collect()
}

#[test]
fn short_run_learns_and_leaves_a_complete_run_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let s = run(micro(tmp.path(), 40), &out, &RunOptions::default()).unwrap();
    let r = rows(&out);
    let first = r.iter().find_map(|x| x.get("loss")?.as_f64()).unwrap();
    assert!(first > 5.0, "byte-level loss starts near ln(257) = 5.55, got {first}");
    assert!(
        s.final_train_loss < first - 1.5,
        "loss must fall clearly: {first} -> {}",
        s.final_train_loss
    );
    assert!(s.final_val_loss < 4.0, "val loss {}", s.final_val_loss);
    for key in ["step", "loss", "lr", "tokens", "grad_norm"] {
        assert!(r[0].get(key).is_some(), "train rows need '{key}'");
    }
    let evals: Vec<_> = r.iter().filter(|x| x.get("val_loss").is_some()).collect();
    assert_eq!(evals.len(), 4, "eval at 10, 20, 30, 40");
    for key in ["first_token_attn", "m_act", "gate_mean", "sink_rate"] {
        assert!(
            evals[0][key].as_f64().is_some_and(f64::is_finite),
            "eval rows need '{key}'"
        );
    }
    let g = evals[3]["gate_mean"].as_f64().unwrap();
    assert!(g > 0.0 && g < 1.0);
    for f in [
        "config.toml",
        "report.md",
        "loss.png",
        "first_token_attn.png",
        "m_act.png",
        "gate_hist.png",
        "checkpoint/state.safetensors",
        "model/tokenizer.json",
    ] {
        assert!(out.join(f).exists(), "missing {f}");
    }
    // the model is saved for stock transformers: G1 elementwise → Qwen3NextForCausalLM
    let (m, layout) = load_model(&out.join("model")).unwrap();
    assert_eq!(layout, Layout::Qwen3Next);
    assert_eq!(m.cfg.vocab_size, 257);
    // the resolved config round-trips
    let text = std::fs::read_to_string(out.join("config.toml")).unwrap();
    let back = TrainConfig::preset("cpu-tiny")
        .unwrap()
        .merge_toml(&text, "config.toml")
        .unwrap();
    assert_eq!(back.train.max_steps, 40);
    // a second run into the same directory must not clobber it
    let e = run(micro(tmp.path(), 40), &out, &RunOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("--resume"), "{e}");
}

#[test]
fn stop_and_resume_is_bit_identical_to_an_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    run(micro(tmp.path(), 25), &a, &RunOptions::default()).unwrap();
    // stop after 11 steps (between checkpoints: the stop itself must checkpoint), then twice more
    run(
        micro(tmp.path(), 25),
        &b,
        &RunOptions {
            stop_after: Some(11),
            ..Default::default()
        },
    )
    .unwrap();
    run(
        micro(tmp.path(), 25),
        &b,
        &RunOptions {
            resume: true,
            stop_after: Some(6),
            ..Default::default()
        },
    )
    .unwrap();
    run(
        micro(tmp.path(), 25),
        &b,
        &RunOptions {
            resume: true,
            ..Default::default()
        },
    )
    .unwrap();
    let (la, lb) = (train_losses(&a), train_losses(&b));
    assert_eq!(la.len(), 25);
    assert_eq!(la, lb, "losses must be bit-identical");
    let (ma, _) = load_model(&a.join("model")).unwrap();
    let (mb, _) = load_model(&b.join("model")).unwrap();
    assert_eq!(ma.params, mb.params);
}

#[test]
fn divergence_is_detected_and_the_last_checkpoint_survives() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let mut c = micro(tmp.path(), 30);
    c.optim.adamw.lr = 1e35;
    c.optim.clip = 0.0;
    c.schedule.warmup_steps = 0;
    c.train.checkpoint_every = 1;
    let s = run(c, &out, &RunOptions::default()).unwrap();
    assert!(s.diverged && s.skipped >= 5, "{s:?}");
    let skipped: Vec<_> = rows(&out).into_iter().filter(|r| r.get("skipped").is_some()).collect();
    assert_eq!(skipped.len() as u64, s.skipped);
    for r in &skipped {
        assert!(r["reason"].as_str().is_some_and(|w| w.contains("non-finite")), "{r}");
    }
    // the checkpoint on disk is the last finite state and loads
    let m: gated_lm::model::Model<f32> =
        gated_lm::model::Model::new(TrainConfig::preset("cpu-micro").unwrap().model, 0).unwrap();
    let mut params = m.params.clone();
    let mut opt = gated_lm::optim::AdamW::new(Default::default(), &m.specs);
    let st = gated_lm::train::checkpoint::load(&out.join("checkpoint"), &m.specs, &mut params, &mut opt).unwrap();
    assert!(st.step < 30);
    assert!(params.tensors.iter().all(|t| t.data.iter().all(|x| x.is_finite())));
}

#[test]
fn gradient_accumulation_equals_the_full_batch() {
    use gated_lm::model::observer::NoObserver;
    use gated_lm::model::{Batch, Model};
    let cfg = TrainConfig::preset("cpu-micro").unwrap().model;
    let m: Model<f64> = Model::new(cfg, 3).unwrap();
    let ids: Vec<u32> = (0..4 * 16).map(|i| (i * 31 % 250) as u32).collect();
    let tg: Vec<u32> = ids.iter().map(|&x| (x + 1) % 257).collect();
    let mut full = m.zero_grads();
    let l_full = m
        .forward_backward(
            &Batch {
                ids: &ids,
                targets: &tg,
                batch: 4,
                seq: 16,
            },
            &mut full,
            &mut NoObserver,
        )
        .unwrap();
    let mut acc = m.zero_grads();
    let mut l_acc = 0.0;
    for h in 0..2 {
        let r = h * 32..(h + 1) * 32;
        l_acc += m
            .forward_backward(
                &Batch {
                    ids: &ids[r.clone()],
                    targets: &tg[r],
                    batch: 2,
                    seq: 16,
                },
                &mut acc,
                &mut NoObserver,
            )
            .unwrap()
            / 2.0;
    }
    assert!((l_full - l_acc).abs() < 1e-12);
    for (a, f) in acc.tensors.iter().zip(&full.tensors) {
        for (x, y) in a.data.iter().zip(&f.data) {
            assert!((x / 2.0 - y).abs() < 1e-12, "accumulated/2 {x} vs full {y}");
        }
    }
}

#[test]
fn sweep_compares_gates_in_one_table() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = corpus(tmp.path());
    let out = tmp.path().join("sweep");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_gated-lm"))
        .args([
            "sweep",
            "--gates",
            "none,headwise",
            "--preset",
            "cpu-micro",
            "--max-steps",
            "12",
            "--quiet",
            "--data",
            &corpus,
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let md = std::fs::read_to_string(out.join("sweep.md")).unwrap();
    let lines: Vec<&str> = md
        .lines()
        .filter(|l| l.starts_with("| none") || l.starts_with("| headwise"))
        .collect();
    assert_eq!(lines.len(), 2, "{md}");
    assert!(lines[0].contains("| no |") && lines[1].ends_with('|'));
    // the baseline has no gate mean, the gated run has one
    assert!(lines[0].trim_end_matches('|').trim_end().ends_with('–'), "{}", lines[0]);
    assert!(
        !lines[1].trim_end_matches('|').trim_end().ends_with('–'),
        "{}",
        lines[1]
    );
    // headwise G1 runs are stored in the official layout
    assert_eq!(
        load_model(&out.join("headwise-lr0.003/model")).unwrap().1,
        Layout::Official
    );
}

#[test]
fn debug_mode_reports_where_nan_first_appears() {
    use gated_lm::model::observer::NoObserver;
    use gated_lm::model::{Batch, Model, NonFinite};
    let cfg = TrainConfig::preset("cpu-micro").unwrap().model;
    let ids: Vec<u32> = (0..32).map(|i| (i * 7 % 250) as u32).collect();
    let tg: Vec<u32> = ids.iter().map(|&x| (x + 1) % 257).collect();
    for (param, layer, op) in [
        ("model.layers.0.self_attn.v_proj.weight", 0, "v_proj"),
        ("model.layers.1.mlp.up_proj.weight", 1, "mlp (ffn output)"),
        ("model.layers.1.self_attn.o_proj.weight", 1, "o_proj (after any gate)"),
    ] {
        let mut m: Model<f32> = Model::new(cfg.clone(), 1).unwrap();
        let i = m.params.names.iter().position(|n| n == param).unwrap();
        m.params.tensors[i].data[3] = f32::NAN;
        let b = Batch {
            ids: &ids,
            targets: &tg,
            batch: 2,
            seq: 16,
        };
        // without the check: silently NaN
        assert!(m.forward(&b, &mut NoObserver).unwrap().loss.is_nan());
        m.check_finite = true;
        let e = m.forward(&b, &mut NoObserver).err().unwrap();
        assert_eq!(
            e.downcast_ref::<NonFinite>(),
            Some(&NonFinite { layer, op }),
            "{param}: {e}"
        );
    }
}

/// A build without the `cuda` feature says how to get the GPU path instead of failing obscurely.
#[cfg(not(feature = "cuda"))]
#[test]
fn bench_on_cuda_without_the_feature_says_how_to_build() {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_gated-lm"))
        .args(["bench", "--device", "cuda", "--preset", "micro"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("rebuild with `--features cuda`"), "{err}");
}

/// Device and precision flags are checked before any work (no run directory is made), with
/// what is expected.
#[test]
fn bad_device_or_precision_flags_are_refused_clearly() {
    for (args, want) in [
        (&["bench", "--precision", "bf16"][..], "the CPU engine computes in f32"),
        (&["bench", "--device", "tpu"][..], "expected cpu, cuda or emu"),
        (
            &["train", "--device", "tpu", "--max-steps", "1"][..],
            "expected cpu, cuda or emu",
        ),
        (&["bench", "--recompute"][..], "only device runs"),
        (&["train", "--recompute", "--max-steps", "1"][..], "only device runs"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_gated-lm"))
            .args(args)
            .args(["--preset", "micro"].iter().filter(|_| args[0] == "bench"))
            .args(
                ["--out".as_ref(), tmp.path().join("run").as_os_str()]
                    .iter()
                    .filter(|_| args[0] == "train"),
            )
            .output()
            .unwrap();
        assert!(!o.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(
            !tmp.path().join("run").exists(),
            "{args:?}: a refused run left a directory"
        );
    }
}
