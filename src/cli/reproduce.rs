//! `gated-lm reproduce`: trains matched arms (same data order, seed and token budget), measures
//! each the way the paper does, and writes `reproduce.md` with a verdict per claim. Every arm is
//! an ordinary run directory, so a killed reproduce continues where it stopped: finished arms are
//! kept (their measurements cached in `reproduce.json`), a half-trained arm resumes.

use super::train::{device_choice, install_ctrlc, resolve_config, set_threads, TrainArgs};
use super::{ExitStatus, EXIT_INTERRUPTED};
use crate::analysis::reproduce::{claims, claims_table, ArmMetrics};
use crate::train::config::TrainConfig;
use crate::train::{run, RunOptions, RunSummary, STOP};
use anyhow::{bail, Context, Result};
use clap::Args;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Instant;

#[derive(Args, Debug)]
#[command(
    allow_negative_numbers = true,
    // train's flags override what the scale fixes; these the arms decide themselves
    mut_arg("gate", |a| a.hide(true)),
    mut_arg("resume", |a| a.hide(true)),
    mut_arg("stop_after", |a| a.hide(true)),
    mut_arg("moe", |a| a.hide(true)),
    mut_arg("out", |a| a.help("Directory of the reproduction: one run directory per arm, reproduce.md and its PNGs (default: runs/reproduce-SCALE)"))
)]
pub struct ReproduceArgs {
    /// quick (≤ 10 min on 2 CPU cores), cpu (≤ 60 min), gpu (about an hour on one H200, BPE on
    /// the larger English corpus: pass it with --data), micro (seconds: a smoke test)
    #[arg(long, default_value = "quick")]
    pub scale: String,
    /// The raised learning rate of the stability pair, as a multiple of the arms' peak LR (≥ 4)
    #[arg(long, default_value_t = 4.0, value_parser = crate::cli::num::positive)]
    pub high_lr_factor: f64,
    #[command(flatten)]
    pub common: TrainArgs,
}

/// What a scale fixes: the training recipe (as train flags) and how the models are measured.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Scale {
    pub name: String,
    pub preset: String,
    pub max_steps: u64,
    /// Steps of the high-LR pair (the claim is about early-training instability).
    pub high_lr_steps: u64,
    pub tokenizer: Option<String>,
    pub needs_data: bool,
    pub probe: Probe,
}

/// How each trained model is measured beyond its training evaluation.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Probe {
    /// Streaming evaluation over this many multiples of the training context…
    pub stream_contexts: usize,
    /// … with a KV window of half the training context, with and without these sink tokens.
    pub sink_tokens: usize,
    /// RULER after raising the RoPE base by this factor (the paper: 10k → 1M) …
    pub rope_factor: f64,
    /// … at these multiples of the training context, with these samples and tasks.
    pub ruler_multiples: Vec<usize>,
    pub ruler_samples: usize,
    pub ruler_tasks: Vec<String>,
}

impl Scale {
    pub fn named(name: &str) -> Result<Scale> {
        let tasks = |t: &[&str]| t.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let probe = |samples: usize, t: Vec<String>| Probe {
            stream_contexts: 4,
            sink_tokens: 4,
            rope_factor: 100.0,
            ruler_multiples: vec![2, 4],
            ruler_samples: samples,
            ruler_tasks: t,
        };
        let (preset, steps, hi_steps, tok, needs_data, p) = match name {
            "micro" => ("cpu-micro", 20, 20, None, false, probe(1, tasks(&["niah_single"]))),
            "quick" => (
                "cpu-tiny",
                300,
                300,
                None,
                false,
                probe(4, tasks(&["niah_single", "variable_tracking"])),
            ),
            "cpu" => (
                "cpu-tiny",
                2000,
                2000,
                None,
                false,
                probe(10, tasks(&crate::infer::ruler::TASKS)),
            ),
            // 3 main arms × 10k steps × 32 × 1024 tokens ≈ 1B tokens, the high-LR pair 3k steps
            "gpu" => (
                "small",
                10_000,
                3_000,
                Some("bpe"),
                true,
                probe(10, tasks(&crate::infer::ruler::TASKS)),
            ),
            other => bail!("unknown scale '{other}' (quick, cpu, gpu, micro)"),
        };
        Ok(Scale {
            name: name.into(),
            preset: preset.into(),
            max_steps: steps,
            high_lr_steps: hi_steps,
            tokenizer: tok.map(String::from),
            needs_data,
            probe: p,
        })
    }
}

/// One arm: a gate at a learning-rate multiple.
struct Arm {
    name: &'static str,
    gate: &'static str,
    high_lr: bool,
}

const ARMS: [Arm; 5] = [
    Arm {
        name: "baseline",
        gate: "none",
        high_lr: false,
    },
    Arm {
        name: "g1-elementwise",
        gate: "elementwise",
        high_lr: false,
    },
    Arm {
        name: "g1-headwise",
        gate: "headwise",
        high_lr: false,
    },
    Arm {
        name: "baseline-high-lr",
        gate: "none",
        high_lr: true,
    },
    Arm {
        name: "g1-elementwise-high-lr",
        gate: "elementwise",
        high_lr: true,
    },
];

/// An arm's outcome: its measurements, or why it failed.
struct ArmOutcome {
    name: &'static str,
    cfg: Option<TrainConfig>,
    result: Result<ArmMetrics>,
}

/// The arm's config: the scale's recipe, the user's train flags over it, the arm's gate and LR.
fn arm_config(a: &ReproduceArgs, scale: &Scale, arm: &Arm) -> Result<TrainConfig> {
    let mut t = a.common.clone();
    t.preset.get_or_insert(scale.preset.clone());
    if t.tokenizer.is_none() {
        t.tokenizer = scale.tokenizer.clone();
    }
    let steps = if arm.high_lr {
        scale.high_lr_steps
    } else {
        scale.max_steps
    };
    t.max_steps.get_or_insert(steps);
    t.gate = Some(arm.gate.into());
    t.out = None;
    let mut cfg = resolve_config(&t)?;
    // ten evaluations per arm, so the overlaid curves have a shape (evaluation reads fixed
    // windows and draws nothing from the sampler: the training is the same at any cadence)
    if a.common.config.is_none() {
        cfg.train.eval_every = (cfg.train.max_steps / 10).max(1);
    }
    if arm.high_lr {
        cfg.optim.adamw.lr *= a.high_lr_factor;
    }
    Ok(cfg)
}

#[derive(Serialize, Deserialize)]
struct Cached {
    probe: Probe,
    steps: u64,
    metrics: ArmMetrics,
}

/// Measure a trained arm (cached in `reproduce.json` beside its run).
fn measure(dir: &Path, cfg: &TrainConfig, s: &RunSummary, probe: &Probe) -> Result<ArmMetrics> {
    let cache = dir.join("reproduce.json");
    if let Ok(text) = std::fs::read_to_string(&cache) {
        if let Ok(c) = serde_json::from_str::<Cached>(&text) {
            if c.probe == *probe && c.steps == s.steps {
                return Ok(c.metrics);
            }
        }
    }
    let mut m = ArmMetrics {
        spikes: s.spikes,
        diverged: s.diverged,
        ..Default::default()
    };
    if !s.diverged {
        m.val_loss = Some(s.final_val_loss);
        m.first_token_attn = Some(s.stats.first_token_attn);
        m.sink_rate = Some(s.stats.sink_rate);
        m.m_act = Some(s.stats.m_act);
        m.gate_mean = s.stats.gate_mean;
        m.gate_frac_below_0_1 = s.stats.gate_frac_below_0_1;
        m.gate_frac_above_0_9 = s.stats.gate_frac_above_0_9;
        let loaded = crate::io::load::load_any(dir)?;
        let t = cfg.train.seq_len;
        let val = crate::train::data::Shard::open(&dir.join("data").join("val.tokens"), cfg.model.vocab_size)?;
        let n = (probe.stream_contexts * t).min(val.len());
        let (mut ids, mut tg) = (Vec::new(), Vec::new());
        val.window(0, n - 1, &mut ids, &mut tg);
        ids.push(*tg.last().context("empty validation split")?);
        let window = Some((t / 2).max(probe.sink_tokens + 2));
        m.stream_loss = Some(crate::infer::perplexity_streaming(&loaded.model, &ids, window, 0)?.0);
        m.stream_loss_sinks =
            Some(crate::infer::perplexity_streaming(&loaded.model, &ids, window, probe.sink_tokens)?.0);
        let tok = loaded.tokenizer()?;
        let mut rcfg = loaded.model.cfg.clone();
        rcfg.rope_theta *= probe.rope_factor;
        let longest = probe.ruler_multiples.iter().max().copied().unwrap_or(1) * t;
        rcfg.max_position_embeddings = rcfg.max_position_embeddings.max(longest * 2);
        let extended = crate::model::Model::from_params(rcfg, loaded.model.params.clone())?;
        let lengths: Vec<usize> = probe.ruler_multiples.iter().map(|k| k * t).collect();
        let tasks: Vec<&str> = probe.ruler_tasks.iter().map(String::as_str).collect();
        let r = crate::infer::ruler::run(&extended, tok, &lengths, probe.ruler_samples, 0, &tasks)?;
        m.ruler_extended = Some(r.average.iter().sum::<f64>() / r.average.len().max(1) as f64);
    }
    let c = Cached {
        probe: probe.clone(),
        steps: s.steps,
        metrics: m.clone(),
    };
    crate::io::write_atomic(&cache, serde_json::to_string_pretty(&c)?.as_bytes())?;
    Ok(m)
}

fn hms(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    format!("{}m{:02}s", s / 60, s % 60)
}

pub fn reproduce(a: ReproduceArgs) -> Result<()> {
    set_threads(a.common.threads)?;
    if a.common.gate.is_some() || a.common.moe.is_some() {
        bail!("reproduce trains its own arms (baseline, G1 elementwise, G1 headwise, and a high-LR pair); drop --gate/--moe");
    }
    if a.common.resume || a.common.stop_after.is_some() {
        bail!("reproduce continues the arms it finds in --out by itself; drop --resume/--stop-after");
    }
    if a.high_lr_factor < 4.0 {
        bail!("--high-lr-factor must be ≥ 4 (the paper's stability claim is about a much larger LR)");
    }
    let scale = Scale::named(&a.scale)?;
    if scale.needs_data && a.common.data.is_empty() {
        bail!(
            "--scale {} trains on the larger English corpus, which the binary does not download: run \
             `bash scripts/corpora/fetch_corpora.sh corpora large` once, then pass `--data corpora/txt`",
            scale.name
        );
    }
    let out = a
        .common
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("runs/reproduce-{}", scale.name)));
    // every arm's config is resolved (and so checked) before anything trains
    let mut plans: Vec<(&Arm, TrainConfig)> = ARMS
        .iter()
        .map(|arm| {
            Ok((
                arm,
                arm_config(&a, &scale, arm).with_context(|| format!("arm {}", arm.name))?,
            ))
        })
        .collect::<Result<_>>()?;
    // a BPE vocabulary is learned once, by the first arm, and read by the others: the arms
    // then see the same tokens in the same order (and the corpus is not learned five times)
    if plans[0].1.data.tokenizer == "bpe" {
        let learned = out.join(ARMS[0].name).join("model").join("tokenizer.json");
        for (_, cfg) in plans.iter_mut().skip(1) {
            cfg.data.tokenizer = learned.display().to_string();
        }
    }
    install_ctrlc();
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let t0 = Instant::now();
    let (mut trained, n) = (0usize, plans.len());
    let mut outcomes = Vec::new();
    for (i, (arm, cfg)) in plans.into_iter().enumerate() {
        if STOP.load(Ordering::Relaxed) {
            break;
        }
        let dir = out.join(arm.name);
        let eta = if trained > 0 {
            format!(
                ", ETA {}",
                hms(t0.elapsed().as_secs_f64() / trained as f64 * (n - i) as f64)
            )
        } else {
            String::new()
        };
        eprintln!(
            "reproduce ({}): arm {}/{n} {}, elapsed {}{eta}",
            scale.name,
            i + 1,
            arm.name,
            hms(t0.elapsed().as_secs_f64())
        );
        let result = (|| -> Result<ArmMetrics> {
            let resume = dir.join("config.toml").exists();
            let s = run(
                cfg.clone(),
                &dir,
                &RunOptions {
                    resume,
                    stop_after: None,
                    progress: false,
                    device: device_choice(&a.common),
                    dist: None,
                },
            )?;
            if s.interrupted {
                bail!("interrupted");
            }
            if !s.already_finished {
                trained += 1;
            }
            measure(&dir, &cfg, &s, &scale.probe)
        })();
        if let Err(e) = &result {
            if !STOP.load(Ordering::Relaxed) {
                eprintln!("reproduce: arm {} failed: {e:#}", arm.name);
            }
        }
        outcomes.push(ArmOutcome {
            name: arm.name,
            cfg: Some(cfg),
            result,
        });
    }
    if STOP.load(Ordering::Relaxed) {
        return Err(ExitStatus {
            code: EXIT_INTERRUPTED,
            message: format!(
                "reproduce interrupted; rerun the same command to continue it in {}",
                out.display()
            ),
        }
        .into());
    }
    let md = write_report(&out, &scale, &a, &outcomes)?;
    println!("{md}\nreproduction: {}/reproduce.md", out.display());
    let failed = outcomes.iter().filter(|o| o.result.is_err()).count();
    if failed > 0 {
        bail!(
            "{failed} of {n} arms failed (see {}/reproduce.md); the others are reported",
            out.display()
        );
    }
    Ok(())
}

/// reproduce.md (claims, arms, the recipe) and the overlaid curves of every arm.
fn write_report(out: &Path, scale: &Scale, a: &ReproduceArgs, arms: &[ArmOutcome]) -> Result<String> {
    let get = |name: &str| {
        arms.iter()
            .find(|o| o.name == name)
            .and_then(|o| o.result.as_ref().ok().cloned())
            .unwrap_or_default()
    };
    let c = claims(
        &get("baseline"),
        &get("g1-elementwise"),
        &get("baseline-high-lr"),
        &get("g1-elementwise-high-lr"),
        arms.iter().find_map(|o| o.cfg.as_ref()).map_or(2, |c| c.train.seq_len),
    );
    let base_cfg = arms.iter().find_map(|o| o.cfg.clone());
    let mut md = format!("# Reproduction of Qiu et al. (2025), scale `{}`\n\n", scale.name);
    if let Some(cfg) = &base_cfg {
        let tokens = cfg.train.max_steps * (cfg.train.batch_size * cfg.train.seq_len * cfg.train.grad_accum) as u64;
        md += &format!(
            "Matched arms: preset `{}`, seed {}, the same data order, {} steps × {} tokens = {tokens} training tokens each \
             (the high-LR pair: {} steps at {}× the peak LR {}). Measured at the training context of {} tokens.\n\n",
            cfg.preset,
            cfg.train.seed,
            cfg.train.max_steps,
            cfg.train.batch_size * cfg.train.seq_len * cfg.train.grad_accum,
            a.common.max_steps.unwrap_or(scale.high_lr_steps),
            a.high_lr_factor,
            cfg.optim.adamw.lr,
            cfg.train.seq_len
        );
    }
    md += &claims_table(&c);
    md += "\n## Arms\n\n| arm | val loss | spikes | diverged | F-Attn | sink rate | M-Act | mean gate | streaming loss (no sinks / sinks) | RULER beyond context | status |\n|---|---|---|---|---|---|---|---|---|---|---|\n";
    let f = |x: Option<f64>, d: usize| x.map_or("–".into(), |v| format!("{v:.d$}"));
    for o in arms {
        md += &match &o.result {
            Ok(m) => format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} / {} | {} | ok |\n",
                o.name,
                f(m.val_loss, 4),
                m.spikes,
                if m.diverged { "yes" } else { "no" },
                f(m.first_token_attn, 4),
                f(m.sink_rate, 3),
                m.m_act.map_or("–".into(), crate::analysis::fmt_magnitude),
                f(m.gate_mean, 3),
                f(m.stream_loss, 4),
                f(m.stream_loss_sinks, 4),
                f(m.ruler_extended, 3)
            ),
            Err(e) => format!(
                "| {} | | | | | | | | | | failed: {} |\n",
                o.name,
                format!("{e:#}").replace('|', "/").replace('\n', " ")
            ),
        };
    }
    md += &format!(
        "\nEach arm is a run directory in `{}` (`gated-lm train --preset {} --gate G --max-steps N [--lr X] --out DIR` reproduces it by hand).\n\n",
        out.display(),
        base_cfg.as_ref().map_or(scale.preset.as_str(), |c| c.preset.as_str())
    );
    md += "![loss](loss.png)\n\n![F-Attn](first_token_attn.png)\n\n![M-Act](m_act.png)\n";
    overlay_curves(out, arms)?;
    crate::io::write_atomic(&out.join("reproduce.md"), md.as_bytes())?;
    Ok(md)
}

/// Loss, F-Attn and M-Act of every arm over its steps, overlaid.
fn overlay_curves(out: &Path, arms: &[ArmOutcome]) -> Result<()> {
    use crate::io::metrics::{read_rows, series};
    use crate::plot::{line_chart, XAxis};
    let rows: Vec<(&str, Vec<serde_json::Value>)> = arms
        .iter()
        .filter_map(|o| Some((o.name, read_rows(&out.join(o.name).join("metrics.jsonl")).ok()?)))
        .collect();
    for (key, file, title, y) in [
        ("loss", "loss.png", "Training loss", "cross-entropy (nats)"),
        (
            "first_token_attn",
            "first_token_attn.png",
            "Attention on the first token (F-Attn)",
            "F-Attn",
        ),
        ("m_act", "m_act.png", "Massive activations (M-Act)", "max |hidden|"),
    ] {
        let curves: Vec<(&str, Vec<(f64, f64)>)> = rows.iter().map(|(n, r)| (*n, series(r, key))).collect();
        let lines: Vec<(&str, &[(f64, f64)])> = curves.iter().map(|(n, c)| (*n, c.as_slice())).collect();
        line_chart(&out.join(file), title, (XAxis::Step, y), &lines, key == "m_act")?;
    }
    Ok(())
}
