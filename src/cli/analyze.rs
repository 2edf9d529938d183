//! `gated-lm analyze` and `gated-lm report`.

use crate::analysis::analyze::{analyze, attention_maps, input_ids, load_any};
use crate::analysis::compare::write_report;
use crate::analysis::plots::{expert_load, gate_histogram, heatmap, per_layer};
use anyhow::{Context, Result};
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct AnalyzeArgs {
    /// Run directory, HF model directory, or llama/qwen3 .gguf file
    #[arg(long)]
    pub model: PathBuf,
    /// Text file to analyse
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// Text to analyse
    #[arg(long)]
    pub prompt: Option<String>,
    /// safetensors file with `input_ids` (first row is used)
    #[arg(long)]
    pub tokens: Option<PathBuf>,
    /// Analyse at most this many tokens (default input: the embedded books)
    #[arg(long, default_value_t = 1024)]
    pub max_tokens: usize,
    /// Write all metrics as JSON here
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write pictures (attention maps, per-layer bars, gate histogram) and analysis.json here
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Layers to draw attention maps for (comma-separated; default all)
    #[arg(long)]
    pub layers: Option<String>,
    /// Heads to draw (comma-separated; default the first 4)
    #[arg(long)]
    pub heads: Option<String>,
    /// Tokens shown in attention maps
    #[arg(long, default_value_t = 64)]
    pub map_tokens: usize,
    /// Logarithmic colour scale for attention maps
    #[arg(long)]
    pub log_color: bool,
    /// Sink-rate threshold ε
    #[arg(long, default_value_t = 0.3)]
    pub epsilon: f64,
}

fn list(s: &Option<String>, default: Vec<usize>, what: &str) -> Result<Vec<usize>> {
    match s {
        None => Ok(default),
        Some(s) => s
            .split(',')
            .map(|x| {
                x.trim()
                    .parse::<usize>()
                    .with_context(|| format!("--{what}: '{x}' is not a number"))
            })
            .collect(),
    }
}

pub fn run_analyze(a: AnalyzeArgs) -> Result<()> {
    let loaded = load_any(&a.model)?;
    let ids = input_ids(
        &loaded,
        a.tokens.as_deref(),
        a.text.as_deref(),
        a.prompt.as_deref(),
        a.max_tokens,
    )?;
    let res = analyze(&loaded, &ids, a.epsilon)?;
    let json = serde_json::to_string_pretty(&res)?;
    println!(
        "{}: {} tokens, perplexity {:.3}, first_token_attn {:.4}, sink_rate {:.3}, m_act {:.2}{}{}",
        res.model,
        res.tokens,
        res.perplexity,
        res.stats.first_token_attn,
        res.stats.sink_rate,
        res.stats.m_act,
        res.stats
            .gate_mean
            .map(|g| format!(", gate_mean {g:.3}"))
            .unwrap_or_default(),
        res.stats
            .moe
            .as_ref()
            .map(|m| format!(
                ", expert imbalance {:.2} (1 = balanced), lb {:.3}, z {:.2}, dropped {:.3}",
                m.expert_imbalance, m.lb_loss, m.z_loss, m.dropped_frac
            ))
            .unwrap_or_default()
    );
    if let Some(j) = &a.json {
        crate::io::write_atomic(j, json.as_bytes())?;
    }
    if let Some(out) = &a.out {
        std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
        crate::io::write_atomic(&out.join("analysis.json"), json.as_bytes())?;
        let cfg = &loaded.model.cfg;
        let layers = list(&a.layers, (0..cfg.num_layers).collect(), "layers")?;
        let heads = list(&a.heads, (0..cfg.num_heads.min(4)).collect(), "heads")?;
        let want: Vec<(usize, usize)> = layers
            .iter()
            .flat_map(|&l| heads.iter().map(move |&h| (l, h)))
            .collect();
        let t = a.map_tokens.min(ids.len());
        for (l, h, map) in attention_maps(&loaded.model, &ids, t, want)? {
            heatmap(
                &out.join(format!("attn_l{l}_h{h}.png")),
                &format!("layer {l}, head {h} (first {t} tokens)"),
                &map,
                t,
                a.log_color,
            )?;
        }
        per_layer(
            &out.join("first_token_attn_per_layer.png"),
            "F-Attn per layer",
            &res.stats.first_token_attn_per_layer,
        )?;
        per_layer(
            &out.join("m_act_per_layer.png"),
            "M-Act per layer",
            &res.stats.m_act_per_layer,
        )?;
        if !res.stats.gate_histogram.is_empty() {
            gate_histogram(&out.join("gate_hist.png"), "Gate scores", &res.stats.gate_histogram)?;
        }
        if let Some(m) = &res.stats.moe {
            for (l, load) in m.moe_layers.iter().zip(&m.expert_load) {
                expert_load(
                    &out.join(format!("expert_load_l{l}.png")),
                    &format!("Expert load, layer {l}"),
                    load,
                )?;
            }
        }
        println!("pictures: {}", out.display());
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct ReportArgs {
    /// Run directories and/or `analyze --json` files
    #[arg(required = true)]
    pub runs: Vec<PathBuf>,
    #[arg(long, default_value = "report")]
    pub out: PathBuf,
}

pub fn run_report(a: ReportArgs) -> Result<()> {
    let entries = write_report(&a.runs, &a.out)?;
    println!("compared {} models: {}/report.md", entries.len(), a.out.display());
    Ok(())
}
