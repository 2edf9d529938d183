//! Crash safety: SIGKILL a training run at random moments (including during checkpoint writes),
//! resume each time; every checkpoint on disk must load and the final losses must equal an
//! uninterrupted run bit for bit.

use gated_lm::model::Model;
use gated_lm::rng::Rng;
use gated_lm::train::config::TrainConfig;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

fn losses(run: &Path) -> Vec<(u64, u64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|r| Some((r["step"].as_u64()?, r.get("loss")?.as_f64()?.to_bits())))
        .collect()
}

/// `gated-lm train` on the micro preset, output silenced.
fn train_cmd(cfg: &Path, corpus: &Path, out: &Path, steps: u32) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_gated-lm"));
    c.args([
        "train",
        "--preset",
        "cpu-micro",
        "--quiet",
        "--max-steps",
        &steps.to_string(),
        "--config",
    ])
    .arg(cfg)
    .arg("--data")
    .arg(corpus)
    .arg("--out")
    .arg(out)
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    c
}

/// A temp dir with a small corpus and a run config.
fn setup(toml: &str) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let text = &gated_lm::train::data::embedded_corpus().unwrap()[0];
    let corpus = tmp.path().join("c.txt");
    std::fs::write(&corpus, &text[..text.char_indices().nth(200_000).unwrap().0]).unwrap();
    let cfg = tmp.path().join("k.toml");
    std::fs::write(&cfg, toml).unwrap();
    (tmp, corpus, cfg)
}

/// The newest step in a run's metrics (0 before any).
fn latest_step(run: &Path) -> u64 {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["step"].as_u64())
        .max()
        .unwrap_or(0)
}

#[test]
fn killed_twenty_times_and_resumed_equals_an_uninterrupted_run() {
    // a checkpoint every step, so kills often land inside checkpoint writes
    let (tmp, corpus, cfg) = setup("[train]\ncheckpoint_every = 1\neval_every = 25\neval_batches = 1\n");
    let args = |out: &Path| train_cmd(&cfg, &corpus, out, 80);
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    assert!(args(&a).status().unwrap().success());

    let model_cfg = TrainConfig::preset("cpu-micro").unwrap().model;
    let m: Model<f32> = Model::new(model_cfg, 0).unwrap();
    let mut rng = Rng::new(2024);
    let (mut kills, mut mid_run, mut last_step) = (0, 0, 0);
    while kills < 20 {
        let mut c = args(&b);
        if b.join("config.toml").exists() {
            c.arg("--resume");
        }
        // kills are placed by progress, not by the clock, so a fast or slow machine sees the
        // same mix: most land 1–8 steps past the last checkpoint (a few ms later: inside a step
        // or a checkpoint write), one in five during start-up or resume
        let target = (rng.below(5) != 0).then(|| last_step + 1 + rng.below(8));
        let startup_ms = rng.below(40);
        let mut child = c.spawn().unwrap();
        let t0 = std::time::Instant::now();
        loop {
            let due = match target {
                Some(step) => latest_step(&b) >= step,
                None => t0.elapsed() >= Duration::from_millis(startup_ms),
            };
            if due || child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        std::thread::sleep(Duration::from_micros(rng.below(3000)));
        if child.try_wait().unwrap().is_some() {
            break; // finished before we could kill it
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills += 1;
        // whatever is on disk must load
        let ck = b.join("checkpoint");
        if ck.join(gated_lm::train::checkpoint::FILE).exists() {
            let mut params = m.params.clone();
            let mut opt = gated_lm::optim::AdamW::new(Default::default(), &m.specs);
            let st = gated_lm::train::checkpoint::load(&ck, &m.specs, &mut params, &mut opt)
                .unwrap_or_else(|e| panic!("checkpoint unreadable after kill {kills}: {e:#}"));
            assert!(st.step >= last_step, "checkpoints never go backwards");
            last_step = st.step;
            mid_run += (st.step > 0 && st.step < 80) as usize;
        }
    }
    eprintln!("{kills} kills, {mid_run} with a mid-run checkpoint, last at step {last_step}");
    assert!(
        kills >= 15 && mid_run >= 5,
        "the kills must land mid-run ({kills} kills, {mid_run} mid-run)"
    );
    let st = args(&b).arg("--resume").status().unwrap();
    assert!(st.success());
    let (la, lb) = (losses(&a), losses(&b));
    assert_eq!(la.len(), 80);
    assert_eq!(la, lb, "losses after {kills} kills must equal the uninterrupted run");
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn chmod_tree(p: &Path, mode: u32) {
    chmod(p, mode);
    if p.is_dir() {
        for e in std::fs::read_dir(p).unwrap() {
            chmod_tree(&e.unwrap().path(), mode);
        }
    }
}

/// Run `c` and return its stderr; it must fail.
fn fails(mut c: Command) -> String {
    let out = c.stderr(Stdio::piped()).output().unwrap();
    assert!(!out.status.success(), "the run should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The checkpoint's bytes, which a failed write must leave untouched, and no temp files beside it.
fn checkpoint_bytes(run: &Path) -> Vec<u8> {
    let dir = run.join("checkpoint");
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        [gated_lm::train::checkpoint::FILE],
        "stray files in {}",
        dir.display()
    );
    std::fs::read(dir.join(gated_lm::train::checkpoint::FILE)).unwrap()
}

/// An uninterrupted 8-step run `a` and a run `b` stopped after 4 of its 8 steps; `b`'s
/// checkpoint bytes.
fn reference_and_half_run(tmp: &Path, cfg: &Path, corpus: &Path) -> (PathBuf, PathBuf, Vec<u8>) {
    let (a, b) = (tmp.join("a"), tmp.join("b"));
    assert!(train_cmd(cfg, corpus, &a, 8).status().unwrap().success());
    assert!(train_cmd(cfg, corpus, &b, 8)
        .args(["--stop-after", "4"])
        .status()
        .unwrap()
        .success());
    let before = checkpoint_bytes(&b);
    (a, b, before)
}

/// Resuming `b` to the end gives the uninterrupted run `a`'s losses bit for bit.
fn resume_matches_reference(cfg: &Path, corpus: &Path, a: &Path, b: &Path) {
    assert!(train_cmd(cfg, corpus, b, 8).arg("--resume").status().unwrap().success());
    assert_eq!(losses(a), losses(b));
}

const CK2: &str = "[train]\ncheckpoint_every = 2\neval_every = 100\neval_batches = 1\n";

#[test]
fn read_only_directories_give_clear_errors_and_keep_the_last_checkpoint() {
    let (tmp, corpus, cfg) = setup(CK2);
    // root ignores permission bits: the failing runs lose the capabilities that let it (dropped
    // from the bounding set, so they stay dropped across exec); the files stay reachable as
    // their owner wherever the checkout lives
    let as_user = |mut c: Command| {
        if unsafe { libc::geteuid() } == 0 {
            const CAP_DAC_OVERRIDE: libc::c_ulong = 1;
            const CAP_DAC_READ_SEARCH: libc::c_ulong = 2;
            // SAFETY: prctl in the forked child before exec, no allocation
            unsafe {
                c.pre_exec(|| {
                    for cap in [CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH] {
                        if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
        }
        c
    };
    chmod(tmp.path(), 0o777);
    let ro = tmp.path().join("ro");
    std::fs::create_dir(&ro).unwrap();
    chmod(&ro, 0o555);
    let e = fails(as_user(train_cmd(&cfg, &corpus, &ro.join("run"), 8)));
    assert!(
        e.contains("cannot create") && e.contains("ro/run") && e.contains("ermission denied"),
        "{e}"
    );

    let (a, b, before) = reference_and_half_run(tmp.path(), &cfg, &corpus);
    chmod_tree(&b, 0o777);
    chmod(&b.join("checkpoint"), 0o555);
    let mut c = as_user(train_cmd(&cfg, &corpus, &b, 8));
    c.arg("--resume");
    let e = fails(c);
    assert!(e.contains("checkpoint/") && e.contains("ermission denied"), "{e}");
    assert_eq!(checkpoint_bytes(&b), before, "the last checkpoint must survive");
    // once writable again the run resumes from that checkpoint as if nothing happened
    chmod(&b.join("checkpoint"), 0o755);
    resume_matches_reference(&cfg, &corpus, &a, &b);
}

#[test]
fn a_full_disk_fails_clearly_and_keeps_the_last_checkpoint() {
    let (tmp, corpus, cfg) = setup(CK2);
    let (a, b, before) = reference_and_half_run(tmp.path(), &cfg, &corpus);
    // a file-size limit makes the next checkpoint write fail part-way, as a full disk would
    let limit = before.len() as u64 / 2;
    let mut c = train_cmd(&cfg, &corpus, &b, 8);
    c.arg("--resume");
    unsafe {
        c.pre_exec(move || {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let r = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &r) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let e = fails(c);
    assert!(
        e.contains("cannot write") && e.contains("state.safetensors") && e.contains("too large"),
        "{e}"
    );
    assert_eq!(checkpoint_bytes(&b), before, "the last checkpoint must survive");
    resume_matches_reference(&cfg, &corpus, &a, &b);
}
