//! `gated-lm analyze` and `gated-lm report`.

use crate::analysis::analyze::{analyze, attention_maps, input_ids};
use crate::analysis::compare::write_report;
use crate::io::load::load_any;
use crate::plot::{expert_load, gate_histogram, heatmap, per_layer};
use anyhow::{Context, Result};
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
#[command(allow_negative_numbers = true)]
pub struct AnalyzeArgs {
    /// Run directory, HF model directory, or .gguf file (llama, mistral, qwen2, qwen3, qwen3moe, phi3, gemma2, gemma3)
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
    /// Analyse at most this many tokens (default: the model's training context for a run
    /// directory, else 1024; default input: the embedded books)
    #[arg(long, value_parser = crate::cli::num::count)]
    pub max_tokens: Option<usize>,
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
    #[arg(long, default_value_t = 64, value_parser = crate::cli::num::count)]
    pub map_tokens: usize,
    /// Logarithmic colour scale for attention maps
    #[arg(long)]
    pub log_color: bool,
    /// Sink-rate threshold ε, in (0, 1]
    #[arg(long, default_value_t = 0.3, value_parser = crate::cli::num::fraction)]
    pub epsilon: f64,
}

/// A comma-separated list of indices below `limit` (the model has that many layers or heads).
fn list(s: &Option<String>, default: Vec<usize>, what: &str, limit: usize) -> Result<Vec<usize>> {
    match s {
        None => Ok(default),
        Some(s) => s
            .split(',')
            .map(|x| match x.trim().parse::<usize>() {
                Ok(i) if i < limit => Ok(i),
                Ok(i) => anyhow::bail!(
                    "--{what}: {i} is out of range: the model has {limit} {what} (0..{})",
                    limit - 1
                ),
                Err(_) => anyhow::bail!("--{what}: '{x}' is not a number"),
            })
            .collect(),
    }
}

pub fn run_analyze(a: AnalyzeArgs) -> Result<()> {
    // output paths are checked before the analysis runs, not after
    if let Some(j) = &a.json {
        crate::cli::check_writable(j)?;
    }
    if let Some(out) = &a.out {
        std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    }
    let loaded = load_any(&a.model)?;
    let cfg = &loaded.model.cfg;
    let layers = list(&a.layers, (0..cfg.num_layers).collect(), "layers", cfg.num_layers)?;
    let heads = list(&a.heads, (0..cfg.num_heads.min(4)).collect(), "heads", cfg.num_heads)?;
    let max_tokens = a.max_tokens.or(loaded.train_seq_len).unwrap_or(1024);
    crate::model::memory::ensure_fits(
        &format!("analysing {max_tokens} tokens"),
        &loaded.model.prefill_need(max_tokens),
    )?;
    let ids = input_ids(
        &loaded,
        a.tokens.as_deref(),
        a.text.as_deref(),
        a.prompt.as_deref(),
        max_tokens,
    )?;
    let res = analyze(&loaded, &ids, a.epsilon)?;
    let json = serde_json::to_string_pretty(&res)?;
    println!(
        "{}: {} tokens (one sequence; F-Attn depends on its length), perplexity {:.3}, first_token_attn {:.4}, sink_rate {:.3}, m_act {}{}{}",
        res.model,
        res.tokens,
        res.perplexity,
        res.stats.first_token_attn,
        res.stats.sink_rate,
        crate::analysis::fmt_magnitude(res.stats.m_act),
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
        crate::io::write_atomic(&out.join("analysis.json"), json.as_bytes())?;
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
            "mean A[i,0]",
            &res.stats.first_token_attn_per_layer,
        )?;
        per_layer(
            &out.join("m_act_per_layer.png"),
            "M-Act per layer",
            "max |h|",
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
#[command(allow_negative_numbers = true)]
pub struct ReportArgs {
    /// Run directories and/or `analyze --json` files
    #[arg(required = true)]
    pub runs: Vec<PathBuf>,
    /// Directory for report.md and its PNGs
    #[arg(long, default_value = "report")]
    pub out: PathBuf,
}

pub fn run_report(a: ReportArgs) -> Result<()> {
    let entries = write_report(&a.runs, &a.out)?;
    println!("compared {} models: {}/report.md", entries.len(), a.out.display());
    Ok(())
}
