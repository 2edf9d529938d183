//! Command-line interface: thin wrappers over the library.
pub mod analyze;
pub mod bench;
pub mod dump;
pub mod infer;
pub mod reproduce;
pub mod train;

use crate::io::hf::{load_model, save_model, Layout};
use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "gated-lm",
    version,
    about = "Train, analyze and run gated-attention language models"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a model on `input_ids` and write logits, loss, per-layer outputs, attention
    /// probabilities and gate scores (f32, fixture key names); optionally one training step.
    Dump(dump::DumpArgs),
    /// Convert a checkpoint between layouts (official ⇄ qwen3-next, …).
    Convert {
        /// Run directory or model directory (config.json + model.safetensors) to convert
        #[arg(long)]
        model: PathBuf,
        /// Target layout: qwen3, qwen2, official, qwen3-next, gated-lm
        #[arg(long)]
        to: String,
        /// Directory to write the converted model (and the tokenizer) into
        #[arg(long)]
        out: PathBuf,
    },
    /// Train a model (default: the G1-elementwise cpu-tiny model on the embedded books)
    Train(train::TrainArgs),
    /// Train several configurations one after another and compare them in sweep.md
    Sweep(train::SweepArgs),
    /// Measure attention sinks, massive activations and gate statistics of a model
    Analyze(analyze::AnalyzeArgs),
    /// Compare runs and analysed models side by side (report.md + PNGs)
    Report(analyze::ReportArgs),
    /// Generate text with a KV cache, streaming tokens as they are produced
    Generate(infer::GenerateArgs),
    /// Perplexity of a text (sliding windows, or streaming with --window/--sink-tokens)
    Eval(infer::EvalArgs),
    /// RULER-style long-context tasks: accuracy by length
    Ruler(infer::RulerArgs),
    /// Time full training steps (forward, backward, clip, AdamW) on a preset model.
    Bench(bench::BenchArgs),
    /// Check the paper's claims on matched baseline / G1 arms: reproduce.md with a verdict each
    Reproduce(reproduce::ReproduceArgs),
}

/// An error that ends the process with a particular exit status (README, "Errors and exit
/// codes"); every other error exits with 1, a bad command line with clap's 2.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ExitStatus {
    pub code: i32,
    pub message: String,
}

/// Exit status of a training run stopped by Ctrl-C (cleanly: evaluated, checkpointed, saved):
/// 128 + SIGINT, as a shell reports an interrupted command, so `train && next` stops.
pub const EXIT_INTERRUPTED: i32 = 130;
/// Exit status of a training run that diverged (non-finite loss in too many steps in a row).
pub const EXIT_DIVERGED: i32 = 3;

/// clap value parsers for numbers with a valid range: the error names the range.
pub mod num {
    fn parse(s: &str) -> Result<f64, String> {
        let v: f64 = s.trim().parse().map_err(|_| format!("'{s}' is not a number"))?;
        if v.is_finite() {
            Ok(v)
        } else {
            Err(format!("'{s}' is not a finite number"))
        }
    }
    /// > 0 and finite.
    pub fn positive(s: &str) -> Result<f64, String> {
        parse(s).and_then(|v| {
            if v > 0.0 {
                Ok(v)
            } else {
                Err(format!("{v} must be > 0"))
            }
        })
    }
    /// ≥ 0 and finite.
    pub fn non_negative(s: &str) -> Result<f64, String> {
        parse(s).and_then(|v| {
            if v >= 0.0 {
                Ok(v)
            } else {
                Err(format!("{v} must be ≥ 0"))
            }
        })
    }
    /// In (0, 1].
    pub fn fraction(s: &str) -> Result<f64, String> {
        parse(s).and_then(|v| {
            if v > 0.0 && v <= 1.0 {
                Ok(v)
            } else {
                Err(format!("{v} must be in (0, 1]"))
            }
        })
    }
    /// A whole number ≥ 1.
    pub fn count(s: &str) -> Result<usize, String> {
        match s.trim().parse::<usize>() {
            Ok(0) => Err("must be ≥ 1".into()),
            Ok(v) => Ok(v),
            Err(_) => Err(format!("'{s}' is not a whole number")),
        }
    }
    /// A whole number ≥ 1 (u64).
    pub fn steps(s: &str) -> Result<u64, String> {
        count(s).map(|v| v as u64)
    }
}

/// Fail early, before any work, when an output file cannot be written there.
pub fn check_writable(path: &std::path::Path) -> Result<()> {
    if path.is_dir() {
        anyhow::bail!("{} is a directory; give a file path", path.display());
    }
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    if !dir.is_dir() {
        anyhow::bail!(
            "cannot write {}: directory {} does not exist",
            path.display(),
            dir.display()
        );
    }
    let probe = dir.join(format!(".gated-lm-probe-{}", std::process::id()));
    std::fs::write(&probe, b"").with_context(|| format!("cannot write into {}", dir.display()))?;
    let _ = std::fs::remove_file(probe);
    Ok(())
}

/// A run directory's model (`RUN/model`) or the directory itself.
pub fn model_dir(path: &std::path::Path) -> PathBuf {
    if path.join("model").join("config.json").exists() || path.join("config.toml").exists() {
        path.join("model")
    } else {
        path.to_path_buf()
    }
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Dump(a) => dump::run(a),
        Command::Convert { model, to, out } => {
            let layout = Layout::parse(&to)?;
            let dir = model_dir(&model);
            let (m, from) = load_model(&dir)?;
            let converted = crate::io::hf::convert(&m, layout)?;
            save_model(&out, &converted, Some(layout))?;
            // the converted model must stay usable on its own: eval, generate, analyze --text
            let tok = dir.join("tokenizer.json");
            if tok.exists() {
                let bytes = std::fs::read(&tok).with_context(|| format!("cannot read {}", tok.display()))?;
                crate::io::write_atomic(&out.join("tokenizer.json"), &bytes)?;
            }
            println!(
                "converted {} ({}) -> {} ({})",
                model.display(),
                from.name(),
                out.display(),
                layout.name()
            );
            Ok(())
        }
        Command::Bench(a) => bench::run(a),
        Command::Train(a) => train::train(a),
        Command::Analyze(a) => analyze::run_analyze(a),
        Command::Generate(a) => infer::run_generate(a),
        Command::Eval(a) => infer::run_eval(a),
        Command::Ruler(a) => infer::run_ruler(a),
        Command::Report(a) => analyze::run_report(a),
        Command::Sweep(a) => train::sweep(a),
        Command::Reproduce(a) => reproduce::reproduce(a),
    }
}
