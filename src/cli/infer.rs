//! `gated-lm generate`, `gated-lm eval`, `gated-lm ruler`.

use crate::config::RopeScaling;
use crate::infer::{generate, perplexity_sliding, perplexity_streaming, ruler, SampleOptions};
use crate::io::load::{load_any, Loaded};
use crate::model::decode::KvCache;
use anyhow::{Context, Result};
use clap::Args;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

/// Model, RoPE scaling at load time, and the KV window.
#[derive(Args, Debug, Clone)]
#[command(allow_negative_numbers = true)]
pub struct ModelArgs {
    /// Run directory, HF model directory or .gguf file (llama, mistral, qwen2, qwen3, qwen3moe, phi3, gemma2, gemma3)
    #[arg(long)]
    pub model: PathBuf,
    /// Replace the RoPE base (the paper's context extension raises 10k → 1M)
    #[arg(long, value_parser = crate::cli::num::positive)]
    pub rope_theta: Option<f64>,
    /// YaRN scaling factor (e.g. 4 for 4× the trained context)
    #[arg(long, value_parser = crate::cli::num::positive)]
    pub yarn_factor: Option<f64>,
    /// The context length the model was trained at (YaRN); default: the config's max positions
    #[arg(long, value_parser = crate::cli::num::count)]
    pub yarn_original: Option<usize>,
    /// YaRN's high-frequency boundary β (rotations per context)
    #[arg(long, default_value_t = 32.0, value_parser = crate::cli::num::positive)]
    pub yarn_beta_fast: f64,
    /// YaRN's low-frequency boundary α (rotations per context)
    #[arg(long, default_value_t = 1.0, value_parser = crate::cli::num::positive)]
    pub yarn_beta_slow: f64,
    /// YaRN attention temperature (default 0.1·ln(factor) + 1)
    #[arg(long, value_parser = crate::cli::num::positive)]
    pub yarn_attention_factor: Option<f64>,
    /// Keep at most this many tokens in the KV cache (sliding window)
    #[arg(long, value_parser = crate::cli::num::count)]
    pub window: Option<usize>,
    /// With --window: tokens at the start that are never evicted (StreamingLLM "sinks")
    #[arg(long, default_value_t = 0, requires = "window")]
    pub sink_tokens: usize,
}

impl ModelArgs {
    pub fn load(&self) -> Result<Loaded> {
        let mut l = load_any(&self.model)?;
        let mut cfg = l.model.cfg.clone();
        if let Some(t) = self.rope_theta {
            cfg.rope_theta = t;
        }
        if let Some(f) = self.yarn_factor {
            cfg.rope_scaling = Some(RopeScaling {
                kind: "yarn".into(),
                factor: f,
                original_max_position_embeddings: self.yarn_original.unwrap_or(cfg.max_position_embeddings),
                beta_fast: self.yarn_beta_fast,
                beta_slow: self.yarn_beta_slow,
                attention_factor: self.yarn_attention_factor,
            });
            cfg.max_position_embeddings = (cfg.max_position_embeddings as f64 * f) as usize;
        }
        if cfg != l.model.cfg {
            l.model.reconfigure(cfg)?;
        }
        Ok(l)
    }
}

#[derive(Args, Debug)]
#[command(allow_negative_numbers = true)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub m: ModelArgs,
    /// Text to continue
    #[arg(long)]
    pub prompt: String,
    /// Tokens to generate at most (stops early at the end-of-text token)
    #[arg(long, default_value_t = 100)]
    pub max_new_tokens: usize,
    /// Sampling temperature ≥ 0; 0 = greedy
    #[arg(long, default_value_t = 0.8, value_parser = crate::cli::num::non_negative)]
    pub temperature: f64,
    /// Nucleus sampling: keep the most likely tokens up to this probability mass, in (0, 1]
    #[arg(long, default_value_t = 0.95, value_parser = crate::cli::num::fraction)]
    pub top_p: f64,
    /// Keep only the k most likely tokens; 0 = no limit
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Sampling seed
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn run_generate(a: GenerateArgs) -> Result<()> {
    let mut l = a.m.load()?;
    // a memory-mapped GGUF: decoding token by token is faster with every layer in f32
    l.model.materialize_if_small()?;
    let tok = l.tokenizer()?;
    let ids = tok.encode_for_model(&a.prompt)?;
    crate::model::memory::ensure_fits("this generation", &l.model.prefill_need(ids.len() + a.max_new_tokens))?;
    let mut cache = KvCache::new(&l.model, a.m.window, a.m.sink_tokens)?;
    let o = SampleOptions {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
    };
    print!("{}", a.prompt);
    let mut out_ids = Vec::new();
    let mut shown = String::new();
    let t0 = Instant::now();
    let mut t_first = None;
    let mut stdout = std::io::stdout();
    let gen = generate(
        &l.model,
        &mut cache,
        &ids,
        a.max_new_tokens,
        &o,
        a.seed,
        Some(tok.eos()),
        |t| {
            t_first.get_or_insert_with(Instant::now);
            out_ids.push(t);
            // print the newly decodable suffix (byte-level tokens may split UTF-8 characters)
            let text = tok.decode(&out_ids);
            if text.len() > shown.len() && text.is_char_boundary(shown.len()) && !text.ends_with('\u{FFFD}') {
                print!("{}", &text[shown.len()..]);
                let _ = stdout.flush();
                shown = text;
            }
        },
    )?;
    println!();
    let total = t0.elapsed().as_secs_f64();
    let decode_s = t_first.map(|t| t.elapsed().as_secs_f64()).unwrap_or(total);
    eprintln!(
        "{} prompt tokens, {} generated; decode {:.1} tok/s (prefill + first token {:.3}s)",
        ids.len(),
        gen.len(),
        (gen.len().saturating_sub(1)) as f64 / decode_s.max(1e-9),
        total - decode_s
    );
    Ok(())
}

#[derive(Args, Debug)]
#[command(allow_negative_numbers = true)]
pub struct EvalArgs {
    #[command(flatten)]
    pub m: ModelArgs,
    /// Text to score (default: the embedded books' validation split)
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// Tokens per scoring window (default: the model's training context for a run directory,
    /// else 256)
    #[arg(long, value_parser = crate::cli::num::count)]
    pub context: Option<usize>,
    /// Tokens the window advances by, ≥ 1 (default: half the context)
    #[arg(long, value_parser = crate::cli::num::count)]
    pub stride: Option<usize>,
    /// Score at most this many tokens
    #[arg(long, default_value_t = 4096, value_parser = crate::cli::num::count)]
    pub max_tokens: usize,
}

pub fn run_eval(a: EvalArgs) -> Result<()> {
    let l = a.m.load()?;
    let tok = l.tokenizer()?;
    let text = match &a.text {
        Some(p) => std::fs::read_to_string(p).with_context(|| format!("cannot read {} as UTF-8 text", p.display()))?,
        None => {
            let b = &crate::io::text::embedded_corpus()?[0];
            b[b.len() - b.len() / 20..].to_string()
        }
    };
    let mut ids = tok.encode_for_model(&text)?;
    ids.truncate(a.max_tokens);
    let context = a.context.or(l.train_seq_len).unwrap_or(256);
    if context < 2 {
        anyhow::bail!("--context must be ≥ 2 tokens");
    }
    crate::model::memory::ensure_fits(
        "this evaluation",
        &l.model
            .prefill_need(a.m.window.unwrap_or(context).min(ids.len().max(1))),
    )?;
    let (nll, n, how) = if let Some(w) = a.m.window {
        let (nll, n) = perplexity_streaming(&l.model, &ids, Some(w), a.m.sink_tokens)?;
        (
            nll,
            n,
            format!("streaming, window {w} with {} sink tokens", a.m.sink_tokens),
        )
    } else {
        let stride = a.stride.unwrap_or(context / 2).max(1);
        let (nll, n) = perplexity_sliding(&l.model, &ids, context, stride)?;
        (nll, n, format!("sliding window, context {context} stride {stride}"))
    };
    println!(
        "{}: {n} tokens, loss {nll:.4}, perplexity {:.3} ({how})",
        l.source,
        nll.exp()
    );
    Ok(())
}

#[derive(Args, Debug)]
#[command(allow_negative_numbers = true)]
pub struct RulerArgs {
    #[command(flatten)]
    pub m: ModelArgs,
    /// Comma-separated prompt lengths in tokens (each ≥ 64)
    #[arg(long, default_value = "256,512,1024,2048")]
    pub lengths: String,
    /// Samples per task and length (≥ 1)
    #[arg(long, default_value_t = 10, value_parser = crate::cli::num::count)]
    pub samples: usize,
    /// Comma-separated subset of tasks (default: all)
    #[arg(long)]
    pub tasks: Option<String>,
    /// Seed of the generated haystacks and needles
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Also write the results as JSON to this file
    #[arg(long)]
    pub json: Option<PathBuf>,
}

pub fn run_ruler(a: RulerArgs) -> Result<()> {
    let l = a.m.load()?;
    let tok = l.tokenizer()?;
    let lengths: Vec<usize> = a
        .lengths
        .split(',')
        .map(|x| match x.trim().parse::<usize>() {
            Ok(n) if n >= ruler::MIN_LENGTH => Ok(n),
            Ok(n) => anyhow::bail!(
                "--lengths: {n} is too short (each length must be ≥ {})",
                ruler::MIN_LENGTH
            ),
            Err(_) => anyhow::bail!("--lengths: '{x}' is not a whole number"),
        })
        .collect::<Result<_>>()?;
    if let Some(j) = &a.json {
        crate::cli::check_writable(j)?;
    }
    let longest = lengths.iter().copied().max().unwrap_or(0);
    crate::model::memory::ensure_fits(
        &format!("ruler at {longest} tokens"),
        &l.model.prefill_need(longest + 64),
    )?;
    let tasks: Vec<&str> = match &a.tasks {
        Some(t) => t.split(',').map(str::trim).collect(),
        None => ruler::TASKS.to_vec(),
    };
    let r = ruler::run(&l.model, tok, &lengths, a.samples, a.seed, &tasks)?;
    println!("{}", r.table());
    if let Some(j) = &a.json {
        crate::io::write_atomic(j, serde_json::to_string_pretty(&r)?.as_bytes())?;
    }
    Ok(())
}
