//! A run's life as a user drives it from the command line: resume keeps the run's own config
//! (every gate kind, MoE), flags may change only what is safe, nothing is written before the
//! checks pass, a finished run stays as it is, a killed sweep continues, divergence and Ctrl-C
//! end with their own exit statuses.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

/// A small corpus file (150k characters of the embedded books).
fn corpus(dir: &Path) -> PathBuf {
    let text = &gated_lm::train::data::embedded_corpus().unwrap()[0];
    let end = text.char_indices().nth(150_000).unwrap().0;
    let p = dir.join("corpus.txt");
    std::fs::write(&p, &text[..end]).unwrap();
    p
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_gated-lm"))
}

/// `gated-lm train --preset cpu-micro --quiet --data CORPUS --out OUT` plus `extra`.
fn train(corpus: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut c = bin();
    c.args(["train", "--preset", "cpu-micro", "--quiet", "--data"])
        .arg(corpus)
        .arg("--out")
        .arg(out)
        .args(extra);
    c.output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn ok(o: Output) -> Output {
    assert!(o.status.success(), "failed: {}", stderr(&o));
    o
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_default()
}

/// (step, loss bits) of every train row.
fn losses(run: &Path) -> Vec<(u64, u64)> {
    String::from_utf8(read(&run.join("metrics.jsonl")))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|r| Some((r["step"].as_u64()?, r.get("loss")?.as_f64()?.to_bits())))
        .collect()
}

#[test]
fn every_gate_kind_and_moe_resumes_bit_identically_keeping_its_config() {
    let tmp = tempfile::tempdir().unwrap();
    let c = corpus(tmp.path());
    for (name, args) in [
        ("none", vec!["--gate", "none"]),
        ("elementwise", vec!["--gate", "elementwise"]),
        ("headwise", vec!["--gate", "headwise"]),
        ("g2-static", vec!["--gate", "g2:headwise:shared:add:silu:static"]),
        ("moe", vec!["--gate", "none", "--moe", "4:2:16"]),
    ] {
        let (a, b) = (
            tmp.path().join(format!("{name}-a")),
            tmp.path().join(format!("{name}-b")),
        );
        let mut full = args.clone();
        full.extend(["--max-steps", "8"]);
        ok(train(&c, &a, &full));
        let mut first = full.clone();
        first.extend(["--stop-after", "3"]);
        ok(train(&c, &b, &first));
        let cfg_before = read(&b.join("config.toml"));
        // resumed with no flags at all, and again repeating the run's own flags
        ok(train(&c, &b, &["--resume", "--stop-after", "2"]));
        assert_eq!(read(&b.join("config.toml")), cfg_before, "{name}: config.toml changed");
        let mut again = args.clone();
        again.push("--resume");
        ok(train(&c, &b, &again));
        assert_eq!(read(&b.join("config.toml")), cfg_before, "{name}: config.toml changed");
        let (la, lb) = (losses(&a), losses(&b));
        assert_eq!(la.len(), 8, "{name}");
        assert_eq!(la, lb, "{name}: resumed losses differ from the uninterrupted run");
    }
}

#[test]
fn resume_keeps_the_runs_limits_and_refuses_unsafe_changes_without_writing() {
    let tmp = tempfile::tempdir().unwrap();
    let c = corpus(tmp.path());
    let r = tmp.path().join("r");
    ok(train(
        &c,
        &r,
        &["--max-steps", "12", "--max-seconds", "500", "--stop-after", "4"],
    ));
    let metrics_before = read(&r.join("metrics.jsonl"));
    let cfg_before = read(&r.join("config.toml"));
    let ckpt_before = read(&r.join("checkpoint/state.safetensors"));
    // a recipe change is refused, naming the keys, and nothing on disk changes
    for (flags, key) in [
        (vec!["--lr", "0.01"], "optim.lr"),
        (vec!["--gate", "headwise"], "model.gate"),
        (vec!["--seq-len", "32"], "train.seq_len"),
        (vec!["--max-steps", "12", "--batch-size", "3"], "train.batch_size"),
    ] {
        let mut a = flags.clone();
        a.push("--resume");
        let o = train(&c, &r, &a);
        assert_eq!(o.status.code(), Some(1), "{flags:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(key), "{flags:?}: {}", stderr(&o));
        assert_eq!(read(&r.join("metrics.jsonl")), metrics_before);
        assert_eq!(read(&r.join("config.toml")), cfg_before);
        assert_eq!(read(&r.join("checkpoint/state.safetensors")), ckpt_before);
    }
    let o = bin()
        .args(["train", "--preset", "cpu-tiny", "--resume", "--out"])
        .arg(&r)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("--preset cpu-tiny"), "{}", stderr(&o));
    assert_eq!(read(&r.join("config.toml")), cfg_before);
    // plain --resume runs to the run's own max_steps, its limits intact
    ok(train(&c, &r, &["--resume"]));
    let cfg: toml::Table = toml::from_str(&String::from_utf8(read(&r.join("config.toml"))).unwrap()).unwrap();
    assert_eq!(cfg["train"]["max_steps"].as_integer(), Some(12));
    assert_eq!(cfg["train"]["max_seconds"].as_float(), Some(500.0));
    assert_eq!(losses(&r).last().unwrap().0, 12);
    // the rows written before the resume are kept byte for byte
    let after = read(&r.join("metrics.jsonl"));
    assert!(
        after.starts_with(&metrics_before),
        "rows before the resume were rewritten"
    );
    // extending is safe, and said
    let o = ok(train(&c, &r, &["--resume", "--max-steps", "14"]));
    assert!(stderr(&o).contains("train.max_steps 12 → 14"), "{}", stderr(&o));
    assert_eq!(losses(&r).last().unwrap().0, 14);
}

#[test]
fn resuming_a_finished_run_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let c = corpus(tmp.path());
    let r = tmp.path().join("done");
    ok(train(&c, &r, &["--max-steps", "6"]));
    let files = [
        "metrics.jsonl",
        "config.toml",
        "checkpoint/state.safetensors",
        "report.md",
    ];
    let before: Vec<Vec<u8>> = files.iter().map(|f| read(&r.join(f))).collect();
    let o = ok(train(&c, &r, &["--resume"]));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(!out.contains("NaN"), "{out}");
    assert!(out.contains("already finished"), "{out}");
    let after: Vec<Vec<u8>> = files.iter().map(|f| read(&r.join(f))).collect();
    assert!(before == after, "a finished run's files changed on resume");
}

#[test]
fn a_diverged_run_says_what_it_left_and_skipped_rows_hold_numbers_or_null() {
    let tmp = tempfile::tempdir().unwrap();
    let c = corpus(tmp.path());
    let r = tmp.path().join("div");
    let o = train(&c, &r, &["--lr", "1e6", "--max-steps", "40"]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains("diverged"), "{e}");
    // it must not point at a checkpoint that does not exist
    assert!(
        r.join("checkpoint").exists() || e.contains("no checkpoint was written"),
        "{e}"
    );
    let rows: Vec<serde_json::Value> = String::from_utf8(read(&r.join("metrics.jsonl")))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let skipped: Vec<_> = rows.iter().filter(|r| r.get("skipped").is_some()).collect();
    assert!(skipped.len() >= 5);
    for s in skipped {
        for k in ["loss", "grad_norm"] {
            assert!(s[k].is_null() || s[k].is_f64(), "{k} must be a number or null: {s}");
        }
    }
    // eval on the run explains that it has no model, rather than "no model/"
    let o = bin().args(["eval", "--model"]).arg(&r).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("no trained model"), "{}", stderr(&o));
}

#[test]
fn a_killed_sweep_continues_where_it_stopped() {
    let tmp = tempfile::tempdir().unwrap();
    let c = corpus(tmp.path());
    let out = tmp.path().join("sweep");
    let sweep = || {
        let mut s = bin();
        s.args([
            "sweep",
            "--gates",
            "none,headwise",
            "--preset",
            "cpu-micro",
            "--quiet",
            "--max-steps",
            "30",
        ])
        .arg("--data")
        .arg(&c)
        .arg("--out")
        .arg(&out)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        s
    };
    let mut child = sweep().spawn().unwrap();
    let second = out.join("headwise-lr0.003").join("metrics.jsonl");
    let t0 = std::time::Instant::now();
    while losses(&out.join("headwise-lr0.003")).len() < 3 && t0.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(second.exists(), "the second arm had started");
    let first = out.join("none-lr0.003");
    let first_before = read(&first.join("metrics.jsonl"));
    assert_eq!(losses(&first).len(), 30, "the first arm had finished");
    let st = sweep().status().unwrap();
    assert!(st.success());
    // the finished baseline arm is not redone (its files are as they were), the second ends
    assert_eq!(read(&first.join("metrics.jsonl")), first_before);
    assert_eq!(losses(&out.join("headwise-lr0.003")).last().unwrap().0, 30);
    let md = String::from_utf8(read(&out.join("sweep.md"))).unwrap();
    assert!(
        md.contains("| none-lr0.003 |") && md.contains("| headwise-lr0.003 |"),
        "{md}"
    );
    // a gate given as --gate is not silently ignored
    let o = bin().args(["sweep", "--gate", "headwise"]).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("--gates"));
}

#[test]
fn ctrl_c_saves_the_run_and_exits_130() {
    let tmp = tempfile::tempdir().unwrap();
    let c = corpus(tmp.path());
    let r = tmp.path().join("int");
    let child = bin()
        .args([
            "train",
            "--preset",
            "cpu-micro",
            "--quiet",
            "--max-steps",
            "100000",
            "--data",
        ])
        .arg(&c)
        .arg("--out")
        .arg(&r)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while losses(&r).len() < 3 && t0.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(5));
    }
    // SAFETY: signalling our own child process
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(130), "{}", stderr(&o));
    assert!(stderr(&o).contains("--resume"), "{}", stderr(&o));
    assert!(r.join("checkpoint/state.safetensors").exists());
    assert!(r.join("model/config.json").exists());
}
