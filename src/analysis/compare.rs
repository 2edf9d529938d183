//! `gated-lm report RUN...`: runs (their final evaluation) and analysed models (`analyze --json`
//! files) side by side, with the paper's reference numbers.

use super::PAPER_REFERENCE;
use crate::io::metrics::{read_rows, series};
use crate::plot::{bar_chart, line_chart, XAxis};
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::Path;

/// One column of the comparison.
#[derive(Debug, Clone)]
pub struct Entry {
    pub name: String,
    pub loss: Option<f64>,
    pub first_token_attn: f64,
    pub sink_rate: Option<f64>,
    pub m_act: f64,
    pub gate_mean: Option<f64>,
    pub fa_per_layer: Vec<f64>,
    pub train_curve: Vec<(f64, f64)>,
    /// Tokens per sequence the metrics were measured over (F-Attn depends on it).
    pub length: Option<usize>,
}

fn f(v: &Value, k: &str) -> Option<f64> {
    v.get(k).and_then(Value::as_f64)
}

fn floats(v: &Value, k: &str) -> Vec<f64> {
    v.get(k)
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default()
}

pub fn read_entry(path: &Path) -> Result<Entry> {
    let what = path.display().to_string();
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or(what.clone());
    let metrics = path.join("metrics.jsonl");
    let (v, loss, curve) = if metrics.exists() {
        let rows = read_rows(&metrics)?;
        let last_eval = rows
            .iter()
            .rev()
            .find(|v| v.get("val_loss").is_some())
            .cloned()
            .with_context(|| format!("{}: no evaluation rows", metrics.display()))?;
        let vl = f(&last_eval, "val_loss");
        let mut v = last_eval;
        // a run's evaluations use its training seq_len
        let seq = std::fs::read_to_string(path.join("config.toml"))
            .ok()
            .and_then(|t| t.parse::<toml::Table>().ok())
            .and_then(|t| t.get("train")?.get("seq_len")?.as_integer());
        if let Some(n) = seq {
            v["tokens"] = serde_json::json!(n);
        }
        (v, vl, series(&rows, "loss"))
    } else if path.is_file() {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {what}"))?;
        let v: Value = serde_json::from_str(&text).with_context(|| format!("{what}: not valid JSON"))?;
        let l = f(&v, "loss");
        (v, l, vec![])
    } else {
        bail!("{what}: neither a run directory (metrics.jsonl) nor an analysis JSON file");
    };
    Ok(Entry {
        name,
        loss,
        first_token_attn: f(&v, "first_token_attn").with_context(|| format!("{what}: no first_token_attn"))?,
        sink_rate: f(&v, "sink_rate"),
        m_act: f(&v, "m_act").with_context(|| format!("{what}: no m_act"))?,
        gate_mean: f(&v, "gate_mean"),
        fa_per_layer: floats(&v, "first_token_attn_per_layer"),
        train_curve: curve,
        length: v.get("tokens").and_then(Value::as_u64).map(|n| n as usize),
    })
}

fn opt(x: Option<f64>, digits: usize) -> String {
    x.map(|v| format!("{v:.digits$}")).unwrap_or_else(|| "–".into())
}

pub fn write_report(inputs: &[std::path::PathBuf], out: &Path) -> Result<Vec<Entry>> {
    let entries = inputs.iter().map(|p| read_entry(p)).collect::<Result<Vec<_>>>()?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut md = String::from(
        "# Comparison\n\n| model | length | loss | F-Attn | sink rate | M-Act | mean gate |\n|---|---|---|---|---|---|---|\n",
    );
    for e in &entries {
        md += &format!(
            "| {} | {} | {} | {:.4} | {} | {} | {} |\n",
            e.name,
            e.length.map_or("–".into(), |n| n.to_string()),
            opt(e.loss, 4),
            e.first_token_attn,
            opt(e.sink_rate, 3),
            crate::analysis::fmt_magnitude(e.m_act),
            opt(e.gate_mean, 3)
        );
    }
    for (name, fa, ma, g) in PAPER_REFERENCE {
        md += &format!("| {name} (Tab. 4) | – | – | {fa} | – | {ma} | {} |\n", opt(g, 3));
    }
    md += "\nLoss: final validation loss for runs, loss on the analysed text for models. Length: tokens per sequence the metrics were measured over (a run's training seq_len; F-Attn falls as sequences grow, so compare like with like). Paper rows for orientation only.\n\n";
    let names: Vec<String> = entries.iter().map(|e| e.name.clone()).collect();
    bar_chart(
        &out.join("first_token_attn.png"),
        "First-token attention (F-Attn)",
        ("model", "mean A[i,0]"),
        &names,
        &entries.iter().map(|e| e.first_token_attn).collect::<Vec<_>>(),
    )?;
    bar_chart(
        &out.join("m_act.png"),
        "Massive activations (M-Act)",
        ("model", "mean over layers of max |h|"),
        &names,
        &entries.iter().map(|e| e.m_act).collect::<Vec<_>>(),
    )?;
    md += "![F-Attn](first_token_attn.png)\n\n![M-Act](m_act.png)\n";
    let layer_lines: Vec<(String, Vec<(f64, f64)>)> = entries
        .iter()
        .filter(|e| !e.fa_per_layer.is_empty())
        .map(|e| {
            (
                e.name.clone(),
                e.fa_per_layer.iter().enumerate().map(|(i, &v)| (i as f64, v)).collect(),
            )
        })
        .collect();
    if !layer_lines.is_empty() {
        let refs: Vec<(&str, &[(f64, f64)])> = layer_lines.iter().map(|(n, s)| (n.as_str(), s.as_slice())).collect();
        line_chart(
            &out.join("first_token_attn_per_layer.png"),
            "F-Attn per layer",
            (XAxis::Layer, "mean A[i,0]"),
            &refs,
            false,
        )?;
        md += "\n![F-Attn per layer](first_token_attn_per_layer.png)\n";
    }
    let curves: Vec<(&str, &[(f64, f64)])> = entries
        .iter()
        .filter(|e| !e.train_curve.is_empty())
        .map(|e| (e.name.as_str(), e.train_curve.as_slice()))
        .collect();
    if !curves.is_empty() {
        line_chart(
            &out.join("loss_curves.png"),
            "Training loss",
            (XAxis::Step, "cross-entropy"),
            &curves,
            false,
        )?;
        md += "\n![loss curves](loss_curves.png)\n";
    }
    crate::io::write_atomic(&out.join("report.md"), md.as_bytes())?;
    Ok(entries)
}
