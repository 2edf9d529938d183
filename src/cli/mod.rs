//! Command-line interface: thin wrappers over the library.
pub mod analyze;
pub mod bench;
#[cfg(feature = "cuda")]
pub mod bench_cuda;
pub mod dump;
pub mod infer;
pub mod train;

use crate::io::hf::{load_model, save_model, Layout};
use anyhow::Result;
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
        #[arg(long)]
        model: PathBuf,
        /// Target layout: qwen3, official, qwen3-next, gated-lm
        #[arg(long)]
        to: String,
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
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Dump(a) => dump::run(a),
        Command::Convert { model, to, out } => {
            let layout = Layout::parse(&to)?;
            let (m, from) = load_model(&model)?;
            let converted = crate::io::hf::convert(&m, layout)?;
            save_model(&out, &converted, Some(layout))?;
            println!(
                "converted {} ({from:?}) -> {} ({layout:?})",
                model.display(),
                out.display()
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
    }
}
