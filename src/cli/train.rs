//! `gated-lm train` and `gated-lm sweep`.

use crate::config::GateConfig;
use crate::train::config::TrainConfig;
use crate::train::{run, RunOptions, RunSummary, STOP};
use anyhow::{Context, Result};
use clap::Args;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

#[derive(Args, Debug, Clone, Default)]
pub struct TrainArgs {
    /// Gate: none | elementwise | headwise (the paper's G1 variants), or a spec such as
    /// `g2:headwise:shared:add:silu:static` (see README, "Gate specs")
    #[arg(long)]
    pub gate: Option<String>,
    /// cpu-tiny (default), cpu-micro, dense28, dense48, dense28-hilr, dense48-hilr, cpu-moe,
    /// cpu-moe-micro
    #[arg(long)]
    pub preset: Option<String>,
    /// MoE FFN `EXPERTS:TOP_K:EXPERT_FFN[:shared=F][:cap=C][:aux=A][:z=Z][:no-norm]`, or
    /// `none` for a dense MLP (see README, "Mixture of Experts")
    #[arg(long)]
    pub moe: Option<String>,
    /// TOML file overlaid on the preset (only the keys it names change)
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Training text: files, directories, .jsonl (field `text`), .gz (default: embedded books)
    #[arg(long, num_args = 1..)]
    pub data: Vec<PathBuf>,
    /// byte | bpe | path to tokenizer.json or a vocab.json+merges.txt directory
    #[arg(long)]
    pub tokenizer: Option<String>,
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// Stop cleanly (eval, checkpoint, model, report) after this many seconds
    #[arg(long)]
    pub max_seconds: Option<f64>,
    /// Peak learning rate
    #[arg(long)]
    pub lr: Option<f64>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Run directory (default: runs/<preset>-<gate>-s<seed>)
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Continue the run in --out from its checkpoint
    #[arg(long)]
    pub resume: bool,
    /// Stop cleanly after this many steps of this invocation (the schedule still spans
    /// --max-steps; continue with --resume), e.g. for preemptible jobs
    #[arg(long)]
    pub stop_after: Option<u64>,
    /// Start from this model's weights and architecture (a run or model directory): continued
    /// training, e.g. at a longer --seq-len with --yarn-factor or --rope-theta
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// Sequence length
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// RoPE base (a base change for context extension)
    #[arg(long)]
    pub rope_theta: Option<f64>,
    /// YaRN factor over the current max_position_embeddings (context extension)
    #[arg(long)]
    pub yarn_factor: Option<f64>,
    /// Worker threads (default: all cores)
    #[arg(long)]
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
}

fn device_choice(a: &TrainArgs) -> crate::train::engine::DeviceChoice {
    crate::train::engine::DeviceChoice {
        device: a.device.clone(),
        precision: a.precision.clone(),
        ordinal: 0,
    }
}

/// Preset → config file → flags.
pub fn resolve_config(a: &TrainArgs) -> Result<TrainConfig> {
    let mut cfg = TrainConfig::preset(a.preset.as_deref().unwrap_or("cpu-tiny"))?;
    if let Some(init) = &a.init {
        let dir = if init.join("model").join("config.json").exists() {
            init.join("model")
        } else {
            init.clone()
        };
        let (m, _) = crate::io::hf::load_model(&dir)?;
        cfg.model = m.cfg;
        cfg.train.init = Some(dir.display().to_string());
        // keep the model's tokenizer
        if dir.join("tokenizer.json").exists() {
            cfg.data.tokenizer = dir.join("tokenizer.json").display().to_string();
        }
    }
    if let Some(p) = &a.config {
        let text = std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
        cfg = cfg.merge_toml(&text, &p.display().to_string())?;
    }
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
        cfg.train.eval_every = cfg.train.eval_every.min(n.max(1));
        cfg.train.checkpoint_every = cfg.train.checkpoint_every.min(n.max(1));
        cfg.schedule.warmup_steps = cfg.schedule.warmup_steps.min(n / 5);
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
    if let Some(t) = a.rope_theta {
        cfg.model.rope_theta = t;
    }
    if let Some(f) = a.yarn_factor {
        let orig = cfg.model.max_position_embeddings;
        cfg.model.rope_scaling = Some(crate::config::RopeScaling::yarn(f, orig));
        cfg.model.max_position_embeddings = (orig as f64 * f) as usize;
    }
    cfg.validate()?;
    Ok(cfg)
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
        "run {}: {} steps, train loss {:.4}, val loss {:.4}, first_token_attn {:.4}, m_act {:.1}{}{}, spikes {}, skipped {}{}",
        out.display(),
        s.steps,
        s.final_train_loss,
        s.final_val_loss,
        s.stats.first_token_attn,
        s.stats.m_act,
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
    let cfg = resolve_config(&a)?;
    let out = match (&a.out, a.resume) {
        (Some(o), _) => o.clone(),
        (None, true) => anyhow::bail!("--resume needs --out RUN_DIR"),
        (None, false) => {
            fresh_dir(PathBuf::from("runs").join(format!("{}-{}-s{}", cfg.preset, gate_name(&cfg), cfg.train.seed)))
        }
    };
    install_ctrlc();
    #[cfg_attr(not(feature = "cuda"), allow(unused_mut))]
    let mut device = device_choice(&a);
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
            (out, Some(crate::train::engine::Dist(std::sync::Arc::new(comm))))
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
            #[cfg(feature = "cuda")]
            dist,
        },
    )?;
    print_summary(&out, &s);
    if s.diverged {
        anyhow::bail!(
            "training diverged (non-finite loss); the last good checkpoint is in {}/checkpoint",
            out.display()
        );
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct SweepArgs {
    /// Comma-separated gates to compare (each as --gate)
    #[arg(long, default_value = "none,elementwise")]
    pub gates: String,
    /// Comma-separated peak learning rates
    #[arg(long)]
    pub lrs: Option<String>,
    /// Config files to run as they are (instead of gates × lrs)
    #[arg(long, num_args = 1..)]
    pub configs: Vec<PathBuf>,
    #[arg(long, default_value = "runs/sweep")]
    pub out: PathBuf,
    #[command(flatten)]
    pub common: TrainArgs,
}

pub fn sweep(a: SweepArgs) -> Result<()> {
    set_threads(a.common.threads)?;
    install_ctrlc();
    let mut plans: Vec<(String, TrainConfig)> = Vec::new();
    if a.configs.is_empty() {
        let lrs: Vec<Option<f64>> = match &a.lrs {
            Some(s) => s
                .split(',')
                .map(|x| {
                    x.trim()
                        .parse()
                        .map(Some)
                        .with_context(|| format!("--lrs: '{x}' is not a number"))
                })
                .collect::<Result<_>>()?,
            None => vec![None],
        };
        for g in a.gates.split(',').map(str::trim) {
            for lr in &lrs {
                let args = TrainArgs {
                    gate: Some(g.to_string()),
                    lr: *lr,
                    ..a.common.clone()
                };
                let cfg = resolve_config(&args)?;
                plans.push((format!("{}-lr{}", gate_name(&cfg), cfg.optim.adamw.lr), cfg));
            }
        }
    } else {
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
    }
    std::fs::create_dir_all(&a.out).with_context(|| format!("cannot create {}", a.out.display()))?;
    let mut rows = Vec::new();
    for (name, cfg) in plans {
        if STOP.load(Ordering::Relaxed) {
            break;
        }
        let dir = a.out.join(&name);
        eprintln!("sweep: {name}");
        let resume = dir.join("checkpoint").exists();
        let s = run(
            cfg,
            &dir,
            &RunOptions {
                resume,
                stop_after: None,
                progress: !a.common.quiet,
                device: device_choice(&a.common),
                #[cfg(feature = "cuda")]
                dist: None,
            },
        )?;
        print_summary(&dir, &s);
        rows.push((name, s));
    }
    let mut md = String::from("| run | val loss | train loss | spikes | skipped | diverged | F-Attn | sink rate | M-Act | mean gate |\n|---|---|---|---|---|---|---|---|---|---|\n");
    for (n, s) in &rows {
        md += &format!(
            "| {n} | {:.4} | {:.4} | {} | {} | {} | {:.4} | {:.3} | {:.1} | {} |\n",
            s.final_val_loss,
            s.final_train_loss,
            s.spikes,
            s.skipped,
            if s.diverged { "yes" } else { "no" },
            s.stats.first_token_attn,
            s.stats.sink_rate,
            s.stats.m_act,
            s.stats.gate_mean.map(|g| format!("{g:.3}")).unwrap_or("–".into())
        );
    }
    crate::io::write_atomic(&a.out.join("sweep.md"), md.as_bytes())?;
    println!("{md}\ncomparison: {}/sweep.md", a.out.display());
    Ok(())
}
