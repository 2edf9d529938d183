//! `gated-lm reproduce` end to end at the micro scale (seconds): every arm trains and is
//! measured, the table has a row per claim and per arm with a verdict each, and a reproduction
//! killed midway continues without redoing the arms it had finished.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

const ARMS: [&str; 5] = [
    "baseline",
    "g1-elementwise",
    "g1-headwise",
    "baseline-high-lr",
    "g1-elementwise-high-lr",
];

fn reproduce(out: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_gated-lm"));
    c.args(["reproduce", "--scale", "micro", "--out"])
        .arg(out)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    c
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_default()
}

#[test]
fn micro_reproduction_measures_every_arm_and_continues_after_a_kill() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("rep");
    let mut child = reproduce(&out).spawn().unwrap();
    // kill once two arms are measured and the third has started training
    let third = out.join(ARMS[2]).join("metrics.jsonl");
    let t0 = std::time::Instant::now();
    while !(out.join(ARMS[1]).join("reproduce.json").exists() && third.exists())
        && t0.elapsed() < Duration::from_secs(120)
    {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let _ = child.kill();
    child.wait().unwrap();
    let finished: Vec<(String, Vec<u8>, Vec<u8>)> = ARMS
        .iter()
        .filter(|a| out.join(a).join("reproduce.json").exists())
        .map(|a| {
            let d = out.join(a);
            (
                a.to_string(),
                read(&d.join("metrics.jsonl")),
                read(&d.join("reproduce.json")),
            )
        })
        .collect();
    assert!(finished.len() >= 2, "the kill should come after two arms");
    assert!(reproduce(&out).status().unwrap().success());
    // finished arms were kept as they were: neither retrained nor re-measured
    for (a, metrics, measured) in &finished {
        assert_eq!(&read(&out.join(a).join("metrics.jsonl")), metrics, "{a} was retrained");
        assert_eq!(
            &read(&out.join(a).join("reproduce.json")),
            measured,
            "{a} was re-measured"
        );
    }
    let md = String::from_utf8(read(&out.join("reproduce.md"))).unwrap();
    for claim in [
        "lower loss",
        "fewer loss spikes",
        "first-token attention",
        "attention-sink rate",
        "massive activations",
        "sparse gate scores",
        "sink-free streaming",
        "long context after extension",
    ] {
        let row = md
            .lines()
            .find(|l| l.starts_with(&format!("| {claim}")))
            .unwrap_or_else(|| panic!("no row for '{claim}' in:\n{md}"));
        assert!(
            ["**reproduced**", "**not visible at this scale**", "**contradicted**"]
                .iter()
                .any(|v| row.ends_with(&format!("{v} |"))),
            "{row}"
        );
    }
    for a in ARMS {
        let row = md.lines().find(|l| l.starts_with(&format!("| {a} |"))).unwrap();
        assert!(row.ends_with("| ok |"), "{row}");
        // every arm trained the same budget, measured at its end
        let m: serde_json::Value = serde_json::from_slice(&read(&out.join(a).join("reproduce.json"))).unwrap();
        assert_eq!(m["steps"], 20, "{a}");
        assert!(m["metrics"]["stream_loss"].as_f64().is_some_and(f64::is_finite), "{a}");
    }
    for png in ["loss.png", "first_token_attn.png", "m_act.png"] {
        assert!(out.join(png).exists(), "{png}");
    }
}

#[test]
fn a_failed_arm_is_reported_and_the_others_finish() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("rep");
    // a file where the second arm's run directory would go makes that arm fail
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("g1-elementwise"), "not a directory").unwrap();
    let o = reproduce(&out).stderr(Stdio::piped()).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    let md = String::from_utf8(read(&out.join("reproduce.md"))).unwrap();
    let row = md.lines().find(|l| l.starts_with("| g1-elementwise |")).unwrap();
    assert!(row.contains("failed:"), "{row}");
    for a in ["baseline", "g1-headwise", "baseline-high-lr", "g1-elementwise-high-lr"] {
        let row = md.lines().find(|l| l.starts_with(&format!("| {a} |"))).unwrap();
        assert!(row.ends_with("| ok |"), "{row}");
    }
}
