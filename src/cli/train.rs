//! `gated-lm train` and `gated-lm sweep`.

use crate::cli::{ExitStatus, EXIT_DIVERGED, EXIT_INTERRUPTED};
use crate::config::GateConfig;
use crate::train::config::TrainConfig;
use crate::train::{run, RunOptions, RunSummary, STOP};
use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

/// The `--gate` grammar, shown by `--help` and named by `--gate` errors.
pub const GATE_HELP: &str = "Gate: none | elementwise | headwise (the paper's G1 variants), or \
colon-separated options in any order, the rest defaulting to G1 elementwise: position g1..g5; \
elementwise | headwise; specific | shared; mul | add; sigmoid | silu | ns-sigmoid; dynamic | \
static. Example: g2:headwise:shared:add:silu. Default: the preset's gate (elementwise)";

#[derive(Args, Debug, Clone, Default)]
#[command(allow_negative_numbers = true)]
pub struct TrainArgs {
    #[arg(long, help = GATE_HELP)]
    pub gate: Option<String>,
    /// Training preset: cpu-tiny (default), cpu-micro, dense28, dense48, dense28-hilr,
    /// dense48-hilr, cpu-moe, cpu-moe-micro; or a model preset (micro, tiny, small, 1p7b,
    /// moe-micro, moe-tiny) with cpu-tiny's schedule and bench's batch shape
    #[arg(long)]
    pub preset: Option<String>,
    /// MoE FFN `EXPERTS:TOP_K:EXPERT_FFN[:shared=F][:cap=C][:aux=A][:z=Z][:no-norm]`, or
    /// `none` for a dense MLP (see README, "Mixture of Experts")
    #[arg(long)]
    pub moe: Option<String>,
    /// TOML file overlaid on the preset (only the keys it names change; `preset = "…"` in it
    /// picks the preset)
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Training text: files, directories, .jsonl (field `text`), .gz (default: embedded books)
    #[arg(long, num_args = 1..)]
    pub data: Vec<PathBuf>,
    /// byte | bpe | path to tokenizer.json or a vocab.json+merges.txt directory
    #[arg(long)]
    pub tokenizer: Option<String>,
    /// Optimizer steps of the whole run (the schedule spans them); ≥ 1. With --resume it may
    /// extend a run
    #[arg(long, value_parser = crate::cli::num::steps)]
    pub max_steps: Option<u64>,
    /// Stop cleanly (eval, checkpoint, model, report) after this many seconds of this
    /// invocation; 0 = no limit
    #[arg(long, value_parser = crate::cli::num::non_negative)]
    pub max_seconds: Option<f64>,
    /// Peak learning rate (> 0)
    #[arg(long, value_parser = crate::cli::num::positive)]
    pub lr: Option<f64>,
    /// Seed of the weights' init and the data sampler (default 0)
    #[arg(long)]
    pub seed: Option<u64>,
    /// Run directory (default: runs/<preset>-<gate>-s<seed>)
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Continue the run in --out from its checkpoint
    #[arg(long)]
    pub resume: bool,
    /// Stop cleanly after this many steps of this invocation (the schedule still spans
    /// --max-steps; continue with --resume), e.g. for preemptible jobs; ≥ 1
    #[arg(long, value_parser = crate::cli::num::steps)]
    pub stop_after: Option<u64>,
    /// Start from this model's weights and architecture (a run or model directory): continued
    /// training, e.g. at a longer --seq-len with --yarn-factor or --rope-theta
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// Sequence length in tokens (≥ 2)
    #[arg(long, alias = "seq", value_parser = crate::cli::num::count)]
    pub seq_len: Option<usize>,
    /// Sequences per micro-batch
    #[arg(long, alias = "batch", value_parser = crate::cli::num::count)]
    pub batch_size: Option<usize>,
    /// RoPE base (a base change for context extension)
    #[arg(long, value_parser = crate::cli::num::positive)]
    pub rope_theta: Option<f64>,
    /// YaRN factor over the current max_position_embeddings (context extension)
    #[arg(long, value_parser = crate::cli::num::positive)]
    pub yarn_factor: Option<f64>,
    /// Worker threads (default: all cores)
    #[arg(long, value_parser = crate::cli::num::count)]
    pub threads: Option<usize>,
    /// No progress bar
    #[arg(long)]
    pub quiet: bool,
    /// cpu; cuda (GPU 0; a build with `--features cuda`); emu (the CUDA kernels on the CPU
    /// emulator: checks the device path, slowly). Dense models with no gate or the G1 gate.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// f32, or bf16 mixed precision on a device (bf16 GEMM operands, f32 everything else)
    #[arg(long, default_value = "f32")]
    pub precision: String,
    /// On a device: recompute the norms' outputs and the rotated q and k in the backward
    /// instead of keeping them per layer (14 KB less per token and layer at 1p7b in bf16;
    /// bit-identical results, a few launches more per layer)
    #[arg(long)]
    pub recompute: bool,
}

pub(crate) fn device_choice(a: &TrainArgs) -> crate::engine::DeviceChoice {
    crate::engine::DeviceChoice {
        device: a.device.clone(),
        precision: a.precision.clone(),
        ordinal: 0,
        recompute: a.recompute,
    }
}

/// Preset → config file → flags. A `preset = "…"` in the config file picks the preset (it must
/// agree with --preset when both are given).
pub fn resolve_config(a: &TrainArgs) -> Result<TrainConfig> {
    let file = match &a.config {
        Some(p) => Some((
            p.display().to_string(),
            std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?,
        )),
        None => None,
    };
    let named = match &file {
        Some((name, text)) => TrainConfig::preset_named_in(text, name)?,
        None => None,
    };
    let preset = match (&a.preset, named) {
        (Some(flag), Some(inner)) if *flag != inner => bail!(
            "--preset {flag} and `preset = \"{inner}\"` in {} disagree: give one of them",
            file.as_ref().map_or("", |f| f.0.as_str())
        ),
        (Some(flag), _) => flag.clone(),
        (None, Some(inner)) => inner,
        (None, None) => "cpu-tiny".into(),
    };
    let mut cfg = TrainConfig::preset(&preset)?;
    if let Some(init) = &a.init {
        let dir = crate::cli::model_dir(init);
        let (m, _) = crate::io::hf::load_model(&dir)?;
        cfg.model = m.cfg;
        cfg.train.init = Some(dir.display().to_string());
        // keep the model's tokenizer
        if dir.join("tokenizer.json").exists() {
            cfg.data.tokenizer = dir.join("tokenizer.json").display().to_string();
        }
    }
    if let Some((name, text)) = &file {
        cfg = cfg.merge_toml(text, name)?;
    }
    apply_flags(&mut cfg, a, false)?;
    cfg.validate()?;
    Ok(cfg)
}

/// The config `train --resume` asks for: the run's own config.toml with the flags applied (the
/// trainer then accepts only safe changes; see `TrainConfig::resume_with`).
pub fn resolve_resume(a: &TrainArgs, out: &Path) -> Result<TrainConfig> {
    let path = out.join("config.toml");
    if !path.exists() {
        bail!("--resume: {} holds no run to resume (no config.toml)", out.display());
    }
    if a.init.is_some() {
        bail!("--init starts a new run from a model; it cannot be combined with --resume");
    }
    let file = path.display().to_string();
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {file}"))?;
    let mut cfg = TrainConfig::from_resolved_toml(&text, &file)?;
    if let Some(p) = &a.preset {
        if *p != cfg.preset {
            bail!(
                "--preset {p}: the run in {} was made from preset {}; a resumed run keeps its config",
                out.display(),
                cfg.preset
            );
        }
    }
    if let Some(c) = &a.config {
        let t = std::fs::read_to_string(c).with_context(|| format!("cannot read {}", c.display()))?;
        cfg = cfg.merge_toml(&t, &c.display().to_string())?;
    }
    apply_flags(&mut cfg, a, true)?;
    Ok(cfg)
}

/// The flags' part of the config. On resume --max-steps sets only max_steps: the cadence and
/// warm-up it would otherwise clamp belong to the run.
fn apply_flags(cfg: &mut TrainConfig, a: &TrainArgs, resuming: bool) -> Result<()> {
    if let Some(g) = &a.gate {
        cfg.model.gate = GateConfig::parse_spec(g).with_context(|| format!("--gate {g}"))?;
    }
    if let Some(m) = &a.moe {
        cfg.model.moe = crate::config::MoeConfig::parse_spec(m).with_context(|| format!("--moe {m}"))?;
    }
    if !a.data.is_empty() {
        cfg.data.paths = a.data.iter().map(|p| p.display().to_string()).collect();
    }
    if let Some(t) = &a.tokenizer {
        cfg.data.tokenizer = t.clone();
    }
    if let Some(n) = a.max_steps {
        cfg.train.max_steps = n;
        if !resuming {
            cfg.train.eval_every = cfg.train.eval_every.min(n);
            cfg.train.checkpoint_every = cfg.train.checkpoint_every.min(n);
            cfg.schedule.warmup_steps = cfg.schedule.warmup_steps.min(n / 5);
        }
    }
    if let Some(s) = a.max_seconds {
        cfg.train.max_seconds = s;
    }
    if let Some(lr) = a.lr {
        cfg.optim.adamw.lr = lr;
    }
    if let Some(s) = a.seed {
        cfg.train.seed = s;
    }
    if let Some(t) = a.seq_len {
        cfg.train.seq_len = t;
    }
    if let Some(b) = a.batch_size {
        cfg.train.batch_size = b;
    }
    if let Some(t) = a.rope_theta {
        cfg.model.rope_theta = t;
    }
    if let Some(f) = a.yarn_factor {
        let orig = cfg.model.max_position_embeddings;
        cfg.model.rope_scaling = Some(crate::config::RopeScaling::yarn(f, orig));
        cfg.model.max_position_embeddings = (orig as f64 * f) as usize;
    }
    Ok(())
}

fn gate_name(cfg: &TrainConfig) -> String {
    match &cfg.model.gate {
        None => "none".into(),
        Some(g) if g.is_standard_g1() => format!("{:?}", g.granularity).to_lowercase(),
        Some(g) => g.spec().replace(':', "-"),
    }
}

/// A directory name not yet taken.
fn fresh_dir(base: PathBuf) -> PathBuf {
    if !base.exists() {
        return base;
    }
    (2..)
        .map(|i| PathBuf::from(format!("{}-{i}", base.display())))
        .find(|p| !p.exists())
        .unwrap()
}

pub fn install_ctrlc() {
    let _ = ctrlc::set_handler(|| {
        if STOP.swap(true, Ordering::SeqCst) {
            eprintln!("\nsecond interrupt: exiting now (the last checkpoint on disk is intact)");
            std::process::exit(130);
        }
        eprintln!("\ninterrupt: finishing the current step, then evaluating and saving (Ctrl-C again to abort)");
    });
}

fn print_summary(out: &Path, s: &RunSummary) {
    println!(
        "run {}{}: {} steps, train loss {:.4}, val loss {:.4}, first_token_attn {:.4}, m_act {}{}{}, spikes {}, skipped {}{}",
        out.display(),
        if s.already_finished { " (already finished)" } else { "" },
        s.steps,
        s.final_train_loss,
        s.final_val_loss,
        s.stats.first_token_attn,
        crate::analysis::fmt_magnitude(s.stats.m_act),
        s.stats.gate_mean.map(|g| format!(", gate_mean {g:.3}")).unwrap_or_default(),
        s.stats
            .moe
            .as_ref()
            .map(|m| format!(
                ", expert imbalance {:.2}, lb {:.3}, dropped {:.3}",
                m.expert_imbalance, m.lb_loss, m.dropped_frac
            ))
            .unwrap_or_default(),
        s.spikes,
        s.skipped,
        if s.diverged { ", DIVERGED" } else { "" }
    );
    println!("report: {}/report.md", out.display());
}

pub fn set_threads(t: Option<usize>) -> Result<()> {
    if let Some(t) = t {
        rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build_global()
            .context("cannot set the thread count")?;
    }
    Ok(())
}

pub fn train(a: TrainArgs) -> Result<()> {
    set_threads(a.threads)?;
    let out = match (&a.out, a.resume) {
        (Some(o), _) => o.clone(),
        (None, true) => bail!("--resume needs --out RUN_DIR"),
        (None, false) => PathBuf::new(),
    };
    let cfg = if a.resume {
        resolve_resume(&a, &out)?
    } else {
        resolve_config(&a)?
    };
    let out = if a.out.is_none() {
        fresh_dir(PathBuf::from("runs").join(format!("{}-{}-s{}", cfg.preset, gate_name(&cfg), cfg.train.seed)))
    } else {
        out
    };
    install_ctrlc();
    #[cfg_attr(not(feature = "cuda"), allow(unused_mut))]
    let mut device = device_choice(&a);
    #[cfg(not(feature = "cuda"))]
    let dist = None;
    #[cfg(feature = "cuda")]
    let (out, dist) = match crate::backend::cuda::dist::DistEnv::from_env()? {
        None => (out, None),
        Some(env) => {
            if a.device != "cuda" {
                anyhow::bail!("WORLD_SIZE={} asks for data parallelism: use --device cuda", env.world);
            }
            device.ordinal = env.local_rank;
            let comm = crate::backend::cuda::dist::Nccl::init(&env, std::time::Duration::from_secs(600))?;
            // every rank is a complete run; rank 0 owns --out, the others live beside it
            let out = if env.rank == 0 {
                out
            } else {
                out.join(format!("rank{}", env.rank))
            };
            (out, Some(crate::engine::Dist(std::sync::Arc::new(comm))))
        }
    };
    eprintln!("training into {}", out.display());
    let s = run(
        cfg,
        &out,
        &RunOptions {
            resume: a.resume,
            stop_after: a.stop_after,
            progress: !a.quiet,
            device,
            dist,
        },
    )?;
    print_summary(&out, &s);
    run_outcome(&out, &s)
}

/// The exit status a run's end deserves: divergence and Ctrl-C are not success.
fn run_outcome(out: &Path, s: &RunSummary) -> Result<()> {
    if s.diverged {
        let where_ = if s.checkpoint {
            format!(
                "the last good checkpoint is in {}/checkpoint (resume it with a lower --lr in a new run, or --resume to retry)",
                out.display()
            )
        } else {
            "no checkpoint was written before it diverged, so there is nothing to resume; start again with a lower --lr"
                .into()
        };
        return Err(ExitStatus {
            code: EXIT_DIVERGED,
            message: format!("training diverged (non-finite loss) at step {}; {where_}", s.steps),
        }
        .into());
    }
    if s.interrupted {
        return Err(ExitStatus {
            code: EXIT_INTERRUPTED,
            message: format!(
                "interrupted at step {}: the run is saved; continue it with `gated-lm train --resume --out {}`",
                s.steps,
                out.display()
            ),
        }
        .into());
    }
    Ok(())
}

#[derive(Args, Debug)]
#[command(
    allow_negative_numbers = true,
    // train's flags, less those a sweep decides itself (it refuses them if given)
    mut_arg("gate", |a| a.hide(true)),
    mut_arg("resume", |a| a.hide(true)),
    mut_arg("stop_after", |a| a.hide(true)),
    mut_arg("out", |a| a.help("Directory of the sweep: one run directory per arm, and sweep.md (default: runs/sweep)"))
)]
pub struct SweepArgs {
    /// Comma-separated gates to compare, each as `train --gate` takes it
    #[arg(long, default_value = "none,elementwise")]
    pub gates: String,
    /// Comma-separated peak learning rates (each > 0)
    #[arg(long)]
    pub lrs: Option<String>,
    /// Config files to run as they are (instead of gates × lrs)
    #[arg(long, num_args = 1..)]
    pub configs: Vec<PathBuf>,
    #[command(flatten)]
    pub common: TrainArgs,
}

/// The sweep's arms: (name, config), gates × lrs or one per config file.
fn sweep_plans(a: &SweepArgs) -> Result<Vec<(String, TrainConfig)>> {
    if a.common.gate.is_some() {
        bail!("sweep takes --gates (a comma-separated list), not --gate");
    }
    if a.common.resume {
        bail!("sweep resumes the arms it finds in --out by itself; drop --resume");
    }
    if a.common.stop_after.is_some() {
        bail!("sweep runs every arm to its --max-steps; --stop-after is for train");
    }
    let mut plans: Vec<(String, TrainConfig)> = Vec::new();
    if !a.configs.is_empty() {
        for c in &a.configs {
            let args = TrainArgs {
                config: Some(c.clone()),
                ..a.common.clone()
            };
            let name = c
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            plans.push((name, resolve_config(&args)?));
        }
        return Ok(plans);
    }
    let lrs: Vec<Option<f64>> = match &a.lrs {
        Some(s) => s
            .split(',')
            .map(|x| {
                crate::cli::num::positive(x)
                    .map(Some)
                    .map_err(|e| anyhow::anyhow!("--lrs: {e}"))
            })
            .collect::<Result<_>>()?,
        None => vec![None],
    };
    let gates: Vec<&str> = a.gates.split(',').map(str::trim).collect();
    if gates.iter().any(|g| g.is_empty()) {
        bail!(
            "--gates '{}': an empty entry (give e.g. --gates none,elementwise)",
            a.gates
        );
    }
    for g in gates {
        for lr in &lrs {
            let args = TrainArgs {
                gate: Some(g.to_string()),
                lr: *lr,
                ..a.common.clone()
            };
            let cfg = resolve_config(&args).with_context(|| format!("--gates: '{g}'"))?;
            plans.push((format!("{}-lr{}", gate_name(&cfg), cfg.optim.adamw.lr), cfg));
        }
    }
    Ok(plans)
}

pub fn sweep(a: SweepArgs) -> Result<()> {
    set_threads(a.common.threads)?;
    let plans = sweep_plans(&a)?;
    let out = a.common.out.clone().unwrap_or_else(|| PathBuf::from("runs/sweep"));
    install_ctrlc();
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut rows: Vec<(String, Result<RunSummary>)> = Vec::new();
    let n = plans.len();
    for (i, (name, cfg)) in plans.into_iter().enumerate() {
        if STOP.load(Ordering::Relaxed) {
            break;
        }
        let dir = out.join(&name);
        // an arm that has started before continues where it stopped; a finished one is kept
        let resume = dir.join("config.toml").exists();
        eprintln!(
            "sweep: arm {}/{n}: {name}{}",
            i + 1,
            if resume {
                " (continuing the run in its directory)"
            } else {
                ""
            }
        );
        let r = run(
            cfg,
            &dir,
            &RunOptions {
                resume,
                stop_after: None,
                progress: !a.common.quiet,
                device: device_choice(&a.common),
                dist: None,
            },
        );
        match &r {
            Ok(s) => print_summary(&dir, s),
            Err(e) => eprintln!("sweep: arm {name} failed: {e:#}"),
        }
        rows.push((name, r));
    }
    let mut md = String::from("| run | val loss | train loss | spikes | skipped | diverged | F-Attn | sink rate | M-Act | mean gate |\n|---|---|---|---|---|---|---|---|---|---|\n");
    for (n, r) in &rows {
        md += &match r {
            Ok(s) => format!(
                "| {n} | {:.4} | {:.4} | {} | {} | {} | {:.4} | {:.3} | {} | {} |\n",
                s.final_val_loss,
                s.final_train_loss,
                s.spikes,
                s.skipped,
                if s.diverged { "yes" } else { "no" },
                s.stats.first_token_attn,
                s.stats.sink_rate,
                crate::analysis::fmt_magnitude(s.stats.m_act),
                s.stats.gate_mean.map(|g| format!("{g:.3}")).unwrap_or("–".into())
            ),
            Err(e) => format!(
                "| {n} | failed: {} | | | | | | | | |\n",
                format!("{e:#}").replace('|', "/").replace('\n', " ")
            ),
        };
    }
    crate::io::write_atomic(&out.join("sweep.md"), md.as_bytes())?;
    println!("{md}\ncomparison: {}/sweep.md", out.display());
    let failed = rows.iter().filter(|r| r.1.is_err()).count();
    if STOP.load(Ordering::Relaxed) || rows.iter().any(|r| r.1.as_ref().is_ok_and(|s| s.interrupted)) {
        return Err(ExitStatus {
            code: EXIT_INTERRUPTED,
            message: format!(
                "sweep interrupted; rerun the same command to continue it in {}",
                out.display()
            ),
        }
        .into());
    }
    if failed > 0 {
        bail!(
            "{failed} of {} sweep arms failed (see {}/sweep.md)",
            rows.len(),
            out.display()
        );
    }
    Ok(())
}
