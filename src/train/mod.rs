//! Training: data → model → AdamW, with evaluation probes, stability tooling, atomic checkpoints,
//! bit-identical resume, and a run directory with metrics, model, report and plots.

pub mod checkpoint;
pub mod config;
pub mod data;
/// metrics.jsonl (written by the loop; read by reports and analysis) lives in `io`.
pub use crate::io::metrics;
pub mod report;
pub mod schedule;

use crate::analysis::probes::{SinkProbe, SinkStats};
use crate::engine::{optimizer_step, DeviceChoice, Dist, Engine, StepPlan};
use crate::io::hf::save_model;
use crate::io::tokenizer::Tok;
use crate::model::observer::RouterLog;
use crate::model::{Batch, Model};
use crate::optim::AdamW;
use crate::rng::Rng;
use anyhow::{bail, Context, Result};
use checkpoint::TrainState;
use config::TrainConfig;
use data::{build_shards, eval_starts, read_documents, Shard};
use metrics::Metrics;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// Set by Ctrl-C: the loop stops after the current step and finishes the run cleanly.
pub static STOP: AtomicBool = AtomicBool::new(false);

/// Run-time options that are not part of the model/training recipe.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    pub resume: bool,
    /// Stop after this many completed steps this session (as Ctrl-C would); used by tests.
    pub stop_after: Option<u64>,
    pub progress: bool,
    /// cpu (default), cuda or emu, and the precision there
    pub device: DeviceChoice,
    /// Data parallelism: this run is one rank of a group. Every rank is a complete run in its
    /// own directory (same config, same data sampling, identical weights after every step);
    /// rank r computes the micro-batches j with j mod world = r of each step.
    pub dist: Option<Dist>,
}

/// How a run ended.
#[derive(Clone, Debug, PartialEq)]
pub struct RunSummary {
    pub steps: u64,
    pub final_train_loss: f64,
    pub final_val_loss: f64,
    pub spikes: u64,
    pub skipped: u64,
    pub diverged: bool,
    /// Stopped by Ctrl-C (cleanly: evaluated, checkpointed, saved).
    pub interrupted: bool,
    /// `--resume` of a run that had already reached max_steps: nothing was run or written.
    pub already_finished: bool,
    /// A checkpoint exists in the run directory.
    pub checkpoint: bool,
    pub stats: SinkStats,
    pub tokens_per_s: f64,
}

fn load_tokenizer(cfg: &TrainConfig, docs: &[String], out: &Path) -> Result<Tok> {
    let saved = out.join("model").join("tokenizer.json");
    if saved.exists() {
        return Tok::load(&saved);
    }
    match cfg.data.tokenizer.as_str() {
        "byte" => Ok(Tok::Byte),
        "bpe" => Tok::train_bpe(docs, cfg.data.bpe_vocab_size),
        path => Tok::load(Path::new(path)),
    }
}

struct Data {
    train: Shard,
    val: Shard,
}

/// Tokenize the corpus once into `out/data/` (reused on resume).
fn prepare_data(cfg: &mut TrainConfig, out: &Path) -> Result<(Tok, Data)> {
    let dir = out.join("data");
    let have_shards = dir.join("train.tokens").exists() && dir.join("val.tokens").exists();
    let docs = if have_shards && out.join("model").join("tokenizer.json").exists() {
        vec![]
    } else if cfg.data.paths.is_empty() {
        data::embedded_corpus()?
    } else {
        read_documents(&cfg.data.paths.iter().map(PathBuf::from).collect::<Vec<_>>())?
    };
    let tok = load_tokenizer(cfg, &docs, out)?;
    if cfg.model.vocab_size != tok.vocab_size() {
        // the tokenizer decides the vocabulary
        cfg.model.vocab_size = tok.vocab_size();
    }
    std::fs::create_dir_all(out.join("model")).with_context(|| format!("cannot create {}/model", out.display()))?;
    tok.save(&out.join("model"))?;
    let min_len = cfg.train.seq_len + 2;
    if !have_shards {
        let (tr, va) = build_shards(&docs, &tok, cfg.data.val_fraction, min_len, &dir)?;
        eprintln!("tokenized corpus: {tr} train tokens, {va} validation tokens");
    }
    let v = tok.vocab_size();
    Ok((
        tok,
        Data {
            train: Shard::open(&dir.join("train.tokens"), v)?,
            val: Shard::open(&dir.join("val.tokens"), v)?,
        },
    ))
}

/// Validation loss and probes on fixed windows, all from the engine's forward (a device run's
/// on the device, its probes reduced there: `Engine::eval_observed`).
pub fn evaluate(
    model: &Model<f32>,
    engine: &mut dyn Engine,
    shard: &Shard,
    cfg: &TrainConfig,
) -> Result<(f64, SinkStats)> {
    let (b, t) = (cfg.train.batch_size, cfg.train.seq_len);
    let starts = eval_starts(shard.len(), t, cfg.train.eval_batches * b);
    let mut total = 0.0;
    let mut probe = SinkProbe::new(model.cfg.num_layers, model.cfg.num_heads, b, t, cfg.train.sink_epsilon);
    for (k, chunk) in starts.chunks(b).enumerate() {
        let (mut ids, mut tg) = (Vec::new(), Vec::new());
        for &s in chunk {
            shard.window(s, t, &mut ids, &mut tg);
        }
        let batch = Batch {
            ids: &ids,
            targets: &tg,
            batch: chunk.len(),
            seq: t,
        };
        // probes on the first batch only: enough for the sink metrics, and cheap (its loss
        // summed over logit chunks: no `[tokens, vocab]` logits)
        let loss = if k == 0 && chunk.len() == b {
            engine.eval_observed(model, &batch, &mut probe)?
        } else {
            engine.eval_loss(model, &batch)?
        };
        total += loss * chunk.len() as f64;
    }
    Ok((total / starts.len() as f64, probe.stats()))
}

/// Rolling-median spike test; returns true when `loss` is a spike. The window keeps the last
/// `window` losses, spikes included.
fn spike(state: &mut TrainState, loss: f64, window: usize, margin: f64) -> bool {
    let mut sorted = state.loss_window.clone();
    sorted.sort_by(f64::total_cmp);
    let is_spike = sorted.len() >= window.clamp(1, 10) && loss > sorted[sorted.len() / 2] * (1.0 + margin);
    state.loss_window.push(loss);
    if state.loss_window.len() > window {
        state.loss_window.remove(0);
    }
    is_spike
}

/// MoE training metrics of one step (its micro-batches together): the auxiliary objective
/// added to the cross-entropy, and the router statistics behind it.
fn moe_row(row: &mut serde_json::Value, cfg: &crate::config::ModelConfig, log: &RouterLog) {
    // the mean over micro-batches and layers, as the gradient sees it
    let aux = crate::model::ffn::aux_objective(cfg, &log.stats);
    let layers: Vec<(usize, &crate::model::ops::router::RouterStats)> = log.stats.iter().map(|s| (0, s)).collect();
    if let Some(m) = crate::analysis::probes::moe_stats(&layers) {
        row["aux_loss"] = json!(aux);
        row["lb_loss"] = json!(m.lb_loss);
        row["z_loss"] = json!(m.z_loss);
        row["expert_imbalance"] = json!(m.expert_imbalance);
        row["dropped_frac"] = json!(m.dropped_frac);
    }
}

fn eval_row(step: u64, val_loss: f64, s: &SinkStats) -> serde_json::Value {
    let mut v = json!({
        "step": step, "val_loss": val_loss, "first_token_attn": s.first_token_attn,
        "first_token_attn_per_layer": s.first_token_attn_per_layer, "sink_rate": s.sink_rate,
        "m_act": s.m_act, "m_act_per_layer": s.m_act_per_layer,
    });
    if let Some(g) = s.gate_mean {
        v["gate_mean"] = json!(g);
    }
    // the gate's sparsity, so a finished run's summary read back from here has it too
    if let (Some(lo), Some(hi)) = (s.gate_frac_below_0_1, s.gate_frac_above_0_9) {
        v["gate_frac_below_0_1"] = json!(lo);
        v["gate_frac_above_0_9"] = json!(hi);
    }
    if let Some(m) = &s.moe {
        v["moe"] = json!(m);
    }
    v
}

/// Refuse to start a fresh run over an existing one.
fn refuse_existing_run(out: &Path) -> Result<()> {
    if ["checkpoint", "metrics.jsonl", "config.toml"]
        .iter()
        .any(|f| out.join(f).exists())
    {
        bail!(
            "{} already holds a run: pass --resume to continue it, or choose another --out",
            out.display()
        );
    }
    Ok(())
}

/// The config a resumed run continues with: the run's own `config.toml`, with only the safe
/// changes `asked` makes (see [`TrainConfig::resume_with`]), each reported.
fn resumed_config(asked: &TrainConfig, out: &Path) -> Result<TrainConfig> {
    let path = out.join("config.toml");
    let file = path.display().to_string();
    if !path.exists() {
        bail!("--resume: {} holds no run to resume (no config.toml)", out.display());
    }
    let text = std::fs::read_to_string(&path).with_context(|| format!("--resume: cannot read {file}"))?;
    let run = TrainConfig::from_resolved_toml(&text, &file)?;
    let (cfg, changes) = run.resume_with(asked, &file)?;
    for c in changes {
        eprintln!("resume: {c}");
    }
    Ok(cfg)
}

/// A run's starting point: fresh (seeded weights, `train.init`) or its checkpoint.
struct Start {
    model: Model<f32>,
    opt: AdamW<f32>,
    state: TrainState,
    resumed: bool,
}

fn fresh_state(cfg: &TrainConfig) -> TrainState {
    TrainState {
        step: 0,
        tokens: 0,
        sampler: Rng::new(cfg.train.seed ^ 0x5A17_DA7A),
        spikes: 0,
        skipped: 0,
        consecutive_bad: 0,
        loss_window: vec![],
        elapsed_s: 0.0,
    }
}

/// Build the model and optimizer; load the checkpoint (resume) or `train.init` (fresh).
/// Reads only: a failure here leaves the run directory as it was.
fn restore(cfg: &TrainConfig, ckpt_dir: &Path, resume: bool) -> Result<Start> {
    let mut model: Model<f32> = Model::new(cfg.model.clone(), cfg.train.seed)?;
    model.check_finite = cfg.stability.check_finite;
    let mut opt = AdamW::new(cfg.optim.adamw.clone(), &model.specs);
    // a run killed before its first checkpoint resumes from the start
    if resume && ckpt_dir.join(checkpoint::FILE).exists() {
        let specs = model.specs.clone();
        let state = checkpoint::load(ckpt_dir, &specs, &mut model.params, &mut opt)?;
        return Ok(Start {
            model,
            opt,
            state,
            resumed: true,
        });
    }
    if let Some(init) = &cfg.train.init {
        let (src, _) = crate::io::hf::load_model(Path::new(init)).with_context(|| format!("train.init = {init}"))?;
        if src.params.names != model.params.names
            || src
                .params
                .tensors
                .iter()
                .zip(&model.params.tensors)
                .any(|(a, b)| a.shape != b.shape)
        {
            bail!("train.init = {init}: its architecture differs from the run's model config");
        }
        model.params = src.params;
    }
    Ok(Start {
        model,
        opt,
        state: fresh_state(cfg),
        resumed: false,
    })
}

/// The summary of a run that already reached its `max_steps`, from its files: resuming it
/// changes nothing on disk.
fn finished_summary(out: &Path, state: &TrainState) -> Result<RunSummary> {
    let rows = metrics::read_rows(&out.join("metrics.jsonl"))?;
    let last = |key: &str| rows.iter().rev().find(|r| r.get(key).is_some_and(|v| v.is_number()));
    let eval = last("val_loss").with_context(|| format!("{}/metrics.jsonl: no evaluation row", out.display()))?;
    let stats: SinkStats = serde_json::from_value(eval.clone())
        .with_context(|| format!("{}/metrics.jsonl: bad evaluation row", out.display()))?;
    let train = last("loss");
    Ok(RunSummary {
        steps: state.step,
        final_train_loss: train.and_then(|r| r["loss"].as_f64()).unwrap_or(f64::NAN),
        final_val_loss: eval["val_loss"].as_f64().unwrap_or(f64::NAN),
        spikes: state.spikes,
        skipped: state.skipped,
        diverged: false,
        interrupted: false,
        already_finished: true,
        checkpoint: true,
        stats,
        tokens_per_s: train.and_then(|r| r["tokens_per_s"].as_f64()).unwrap_or(f64::NAN),
    })
}

/// A finite number, or JSON null (NaN and ±inf have no JSON form).
fn num_or_null(x: f64) -> serde_json::Value {
    if x.is_finite() {
        json!(x)
    } else {
        serde_json::Value::Null
    }
}

/// Train per `cfg` into `out`. The run directory gets config.toml, metrics.jsonl, model/,
/// checkpoint/, report.md and PNG plots. With `opts.resume` the run's own config.toml is the
/// truth: `cfg` may change only what is safe to change (max_steps, max_seconds, eval and
/// checkpoint cadence). Nothing is written before every check has passed.
pub fn run(cfg: TrainConfig, out: &Path, opts: &RunOptions) -> Result<RunSummary> {
    opts.device.check()?;
    let mut cfg = if opts.resume {
        resumed_config(&cfg, out)?
    } else {
        refuse_existing_run(out)?;
        cfg
    };
    cfg.validate()?;
    // before anything is allocated: the tokenizer decides the vocabulary of a fresh BPE run
    let mut sizing = cfg.model.clone();
    if !opts.resume && cfg.data.tokenizer == "bpe" {
        sizing.vocab_size = sizing.vocab_size.max(cfg.data.bpe_vocab_size);
    }
    // a device run keeps its step's activations on the device
    let (b, t) = (cfg.train.batch_size, cfg.train.seq_len);
    let host_need = match opts.device.device.as_str() {
        "cpu" => crate::model::memory::training(&sizing, b, t),
        _ => crate::model::memory::device_training(&sizing, b, t),
    };
    crate::model::memory::ensure_fits("this training run", &host_need)?;
    let ckpt_dir = out.join("checkpoint");
    // on resume the config already carries the tokenizer's vocabulary: check the checkpoint
    // against it before touching the directory
    let early = if opts.resume {
        Some(restore(&cfg, &ckpt_dir, true)?)
    } else {
        None
    };
    if let Some(s) = early
        .as_ref()
        .filter(|s| s.resumed && s.state.step >= cfg.train.max_steps)
    {
        eprintln!(
            "{} already finished at step {} (max_steps {}): nothing to do; pass a larger --max-steps to extend it",
            out.display(),
            s.state.step,
            cfg.train.max_steps
        );
        return finished_summary(out, &s.state);
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let vocab_before = cfg.model.vocab_size;
    let (_tok, data) = prepare_data(&mut cfg, out)?;
    if opts.resume && cfg.model.vocab_size != vocab_before {
        bail!(
            "{}: the run's tokenizer has {} tokens but its config.toml says vocab_size = {vocab_before}",
            out.display(),
            cfg.model.vocab_size
        );
    }
    let Start {
        mut model,
        mut opt,
        mut state,
        resumed,
    } = match early {
        Some(s) => s,
        None => restore(&cfg, &ckpt_dir, false)?,
    };
    crate::io::write_atomic(&out.join("config.toml"), cfg.to_toml()?.as_bytes())?;
    if resumed {
        eprintln!("resuming {} at step {}", out.display(), state.step);
    }
    #[cfg(feature = "cuda")]
    let dev = opts.device.open()?;
    #[cfg(feature = "cuda")]
    let mut engine = opts.device.engine(dev.as_deref(), &model, &opt)?;
    #[cfg(not(feature = "cuda"))]
    let mut engine: Box<dyn Engine> = {
        opts.device.check()?;
        Box::new(crate::engine::cpu::CpuEngine::new(&model))
    };
    let engine = engine.as_mut();
    let metrics = Metrics::open(out.join("metrics.jsonl"), resumed.then_some(state.step))?;
    let (rank, world) = opts.dist.as_ref().map_or((0, 1), rank_world);
    let ctx = StepContext {
        cfg: &cfg,
        data: &data,
        metrics: &metrics,
        ckpt_dir: &ckpt_dir,
        rank,
        world,
        dist: opts.dist.as_ref(),
    };
    let start_step = state.step;
    let elapsed0 = state.elapsed_s;
    let t0 = Instant::now();
    let lp = train_loop(&ctx, engine, &mut model, &mut opt, &mut state, opts, t0)?;
    finish(
        &ctx,
        out,
        engine,
        &mut model,
        &mut opt,
        &mut state,
        lp,
        (start_step, elapsed0, t0),
    )
}

/// Always end with an evaluation (unless the last step had one), a checkpoint, the model and the
/// report. The last argument: the step, accumulated seconds and clock this invocation started at.
#[allow(clippy::too_many_arguments)]
fn finish(
    ctx: &StepContext,
    out: &Path,
    engine: &mut dyn Engine,
    model: &mut Model<f32>,
    opt: &mut AdamW<f32>,
    state: &mut TrainState,
    lp: LoopEnd,
    (start_step, elapsed0, t0): (u64, f64, Instant),
) -> Result<RunSummary> {
    let cfg = ctx.cfg;
    engine.sync(model, opt)?;
    let last_val = match lp.last_eval {
        Some((step, vl, st)) if step == state.step => (vl, st),
        _ => {
            let (vl, st) = evaluate(model, engine, &ctx.data.val, cfg)?;
            ctx.metrics.row(eval_row(state.step, vl, &st))?;
            (vl, st)
        }
    };
    let run_secs = t0.elapsed().as_secs_f64();
    state.elapsed_s = elapsed0 + run_secs;
    if !lp.diverged {
        checkpoint::save(ctx.ckpt_dir, &model.params, opt, state)?;
        save_model(&out.join("model"), model, None)?;
    }
    let done = state.step - start_step;
    let summary = RunSummary {
        steps: state.step,
        final_train_loss: lp.last_loss,
        final_val_loss: last_val.0,
        spikes: state.spikes,
        skipped: state.skipped,
        diverged: lp.diverged,
        interrupted: lp.interrupted,
        already_finished: false,
        checkpoint: ctx.ckpt_dir.join(checkpoint::FILE).exists(),
        stats: last_val.1,
        tokens_per_s: (done * lp.step_tokens) as f64 / run_secs.max(1e-9),
    };
    report::write(out, cfg, &summary)?;
    Ok(summary)
}

/// What the step loop needs besides the model and its optimizer.
struct StepContext<'a> {
    cfg: &'a TrainConfig,
    data: &'a Data,
    metrics: &'a Metrics,
    ckpt_dir: &'a Path,
    rank: usize,
    world: usize,
    dist: Option<&'a Dist>,
}

/// This rank and the group's size.
fn rank_world(d: &Dist) -> (usize, usize) {
    #[cfg(feature = "cuda")]
    return (d.0.rank(), d.0.world());
    #[cfg(not(feature = "cuda"))]
    match *d {}
}

/// How the step loop ended.
struct LoopEnd {
    last_loss: f64,
    last_eval: Option<(u64, f64, SinkStats)>,
    diverged: bool,
    interrupted: bool,
    step_tokens: u64,
}

/// Optimizer steps until max_steps, max_seconds, --stop-after, Ctrl-C or divergence, with the
/// periodic evaluations and checkpoints.
fn train_loop(
    ctx: &StepContext,
    engine: &mut dyn Engine,
    model: &mut Model<f32>,
    opt: &mut AdamW<f32>,
    state: &mut TrainState,
    opts: &RunOptions,
    t0: Instant,
) -> Result<LoopEnd> {
    let (cfg, data, metrics) = (ctx.cfg, ctx.data, ctx.metrics);
    let (b, t, accum) = (cfg.train.batch_size, cfg.train.seq_len, cfg.train.grad_accum);
    let (rank, world) = (ctx.rank, ctx.world);
    // micro-batches and tokens per optimizer step, over all ranks
    let micro = accum * world;
    let step_tokens = (b * t * micro) as u64;
    let total = cfg.train.max_steps;
    let bar = progress_bar(opts.progress, total, state.step);
    let mut end = LoopEnd {
        last_loss: f64::NAN,
        last_eval: None,
        diverged: false,
        interrupted: false,
        step_tokens,
    };
    let (start_step, elapsed0) = (state.step, state.elapsed_s);
    while state.step < total {
        let limit_hit = cfg.train.max_seconds > 0.0 && t0.elapsed().as_secs_f64() >= cfg.train.max_seconds;
        if STOP.load(Ordering::Relaxed) {
            end.interrupted = true;
            break;
        }
        if limit_hit || opts.stop_after.is_some_and(|n| state.step - start_step >= n) {
            break;
        }
        let lr = cfg.schedule.lr_at(state.step, total, cfg.optim.adamw.lr);
        let plan = StepPlan {
            micro,
            batch: b,
            seq: t,
            lr,
            clip: cfg.optim.clip,
            rank,
            world,
            dist: ctx.dist,
        };
        let mut routers = RouterLog::default();
        // every rank draws every window (the sampler stays in step); it runs its own
        let mut fill = |_j: usize, ids: &mut Vec<u32>, tg: &mut Vec<u32>| {
            for _ in 0..b {
                let start = state.sampler.below((data.train.len() - t - 1) as u64) as usize;
                data.train.window(start, t, ids, tg);
            }
        };
        let outcome = optimizer_step(engine, model, opt, &plan, &mut fill, &mut routers)?;
        let (loss, gnorm) = (outcome.loss, outcome.grad_norm);
        state.step += 1;
        state.tokens += step_tokens;
        if let Some((why, bad)) = outcome.skipped {
            // skipped: no update, report, stop after too many in a row (last checkpoint stays valid)
            state.skipped += 1;
            state.consecutive_bad += 1;
            eprintln!("step {} skipped: {why}", state.step);
            metrics.row(json!({"step": state.step, "skipped": true, "loss": num_or_null(loss), "grad_norm": num_or_null(gnorm), "lr": lr, "reason": why, "non_finite_grads": bad}))?;
            if state.consecutive_bad >= cfg.stability.max_bad_steps {
                end.diverged = true;
                eprintln!(
                    "stopping: {} consecutive steps with non-finite loss or gradients",
                    state.consecutive_bad
                );
                break;
            }
            continue;
        }
        state.consecutive_bad = 0;
        let is_spike = spike(state, loss, cfg.stability.spike_window, cfg.stability.spike_margin);
        state.spikes += is_spike as u64;
        end.last_loss = loss;
        let secs = t0.elapsed().as_secs_f64();
        let tok_s = ((state.step - start_step) * step_tokens) as f64 / secs.max(1e-9);
        let mut row = json!({"step": state.step, "loss": loss, "lr": lr, "tokens": state.tokens, "grad_norm": gnorm, "tokens_per_s": tok_s.round()});
        if is_spike {
            row["spike"] = json!(true);
        }
        if !routers.stats.is_empty() {
            moe_row(&mut row, &model.cfg, &routers);
        }
        metrics.row(row)?;
        if let Some(bar) = &bar {
            // the message first: the position update redraws the bar with this step's loss
            bar.set_message(format!("loss {loss:.4}  {tok_s:.0} tok/s"));
            bar.set_position(state.step);
        }
        if let Some(e) = eval_and_checkpoint(ctx, engine, model, opt, state, (elapsed0, t0))? {
            end.last_eval = Some(e);
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    Ok(end)
}

/// After a step: the evaluation and the checkpoint their intervals call for. Returns the
/// evaluation (step, validation loss, probes) if one ran.
fn eval_and_checkpoint(
    ctx: &StepContext,
    engine: &mut dyn Engine,
    model: &mut Model<f32>,
    opt: &mut AdamW<f32>,
    state: &mut TrainState,
    (elapsed0, t0): (f64, Instant),
) -> Result<Option<(u64, f64, SinkStats)>> {
    let cfg = ctx.cfg;
    let (eval_due, ckpt_due) = (
        state.step.is_multiple_of(cfg.train.eval_every),
        state.step.is_multiple_of(cfg.train.checkpoint_every),
    );
    // an engine that evaluates on its own weights copies them back for checkpoints only
    if ckpt_due || (eval_due && !engine.evaluates_itself()) {
        engine.sync(model, opt)?;
    }
    let mut eval = None;
    if eval_due {
        let (vl, st) = evaluate(model, engine, &ctx.data.val, cfg)?;
        ctx.metrics.row(eval_row(state.step, vl, &st))?;
        eval = Some((state.step, vl, st));
    }
    if ckpt_due {
        state.elapsed_s = elapsed0 + t0.elapsed().as_secs_f64();
        checkpoint::save(ctx.ckpt_dir, &model.params, opt, state)?;
    }
    Ok(eval)
}

fn progress_bar(show: bool, total: u64, pos: u64) -> Option<indicatif::ProgressBar> {
    if !show {
        return None;
    }
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} step {pos}/{len} [{bar:30}] {msg}  eta {eta}")
            .unwrap()
            .progress_chars("=> "),
    );
    bar.set_position(pos);
    Some(bar)
}
