//! Crash safety: SIGKILL a training run at random moments (including during checkpoint writes),
//! resume each time; every checkpoint on disk must load and the final losses must equal an
//! uninterrupted run bit for bit.

use gated_lm::model::Model;
use gated_lm::rng::Rng;
use gated_lm::train::config::TrainConfig;
use std::path::Path;
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

#[test]
fn killed_twenty_times_and_resumed_equals_an_uninterrupted_run() {
    let bin = env!("CARGO_BIN_EXE_gated-lm");
    let tmp = tempfile::tempdir().unwrap();
    let text = &gated_lm::train::data::embedded_corpus().unwrap()[0];
    let corpus = tmp.path().join("c.txt");
    std::fs::write(&corpus, &text[..text.char_indices().nth(200_000).unwrap().0]).unwrap();
    // a checkpoint every step, so kills often land inside checkpoint writes
    let cfg = tmp.path().join("k.toml");
    std::fs::write(
        &cfg,
        "[train]\ncheckpoint_every = 1\neval_every = 25\neval_batches = 1\n",
    )
    .unwrap();
    let args = |out: &Path| {
        let mut c = Command::new(bin);
        c.args([
            "train",
            "--preset",
            "cpu-micro",
            "--max-steps",
            "80",
            "--quiet",
            "--config",
        ])
        .arg(&cfg)
        .arg("--data")
        .arg(&corpus)
        .arg("--out")
        .arg(out)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        c
    };
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
        let mut child = c.spawn().unwrap();
        std::thread::sleep(Duration::from_millis(20 + rng.below(250)));
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
