//! Training: data → model → AdamW, with evaluation probes, stability tooling, atomic checkpoints,
//! bit-identical resume, and a run directory with metrics, model, report and plots.

pub mod checkpoint;
pub mod config;
pub mod data;
pub mod engine;
pub mod metrics;
pub mod report;
pub mod schedule;
pub mod tokenizer;

use crate::analysis::probes::{SinkProbe, SinkStats};
use crate::io::hf::save_model;
use crate::model::observer::RouterLog;
use crate::model::{Batch, Model};
use crate::optim::{clip_coef, AdamW};
use crate::rng::Rng;
use anyhow::{bail, Context, Result};
use checkpoint::TrainState;
use config::TrainConfig;
use data::{build_shards, eval_starts, read_documents, Shard};
use engine::Engine;
use metrics::Metrics;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;
use tokenizer::Tok;

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
    pub device: engine::DeviceChoice,
    /// Data parallelism: this run is one rank of a group. Every rank is a complete run in its
    /// own directory (same config, same data sampling, identical weights after every step);
    /// rank r computes the micro-batches j with j mod world = r of each step.
    #[cfg(feature = "cuda")]
    pub dist: Option<engine::Dist>,
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

/// Validation loss and probes on fixed windows: the probes (and that batch's loss) from the
/// host model, the other batches' losses from the engine (the device's forward on a GPU run).
pub fn evaluate(model: &Model<f32>, engine: &mut Engine, shard: &Shard, cfg: &TrainConfig) -> Result<(f64, SinkStats)> {
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
        // probes on the first batch only: enough for the sink metrics, and cheap
        let loss = if k == 0 && chunk.len() == b {
            model.forward(&batch, &mut probe)?.loss
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
    if let Some(m) = &s.moe {
        v["moe"] = json!(m);
    }
    v
}

/// Train per `cfg` into `out`. The run directory gets config.toml, metrics.jsonl, model/,
/// checkpoint/, report.md and PNG plots.
pub fn run(mut cfg: TrainConfig, out: &Path, opts: &RunOptions) -> Result<RunSummary> {
    opts.device.check()?;
    let ckpt_dir = out.join("checkpoint");
    if opts.resume && out.join("config.toml").exists() {
        let text = std::fs::read_to_string(out.join("config.toml"))
            .with_context(|| format!("--resume: cannot read {}/config.toml", out.display()))?;
        // the run's own resolved config wins; --max-steps/--max-seconds may extend it
        let (steps, secs) = (cfg.train.max_steps, cfg.train.max_seconds);
        cfg = TrainConfig::preset("cpu-tiny")?.merge_toml(&text, "config.toml")?;
        cfg.train.max_steps = cfg.train.max_steps.max(steps);
        cfg.train.max_seconds = secs;
    } else if !opts.resume && (out.join("checkpoint").exists() || out.join("metrics.jsonl").exists()) {
        bail!(
            "{} already holds a run: pass --resume to continue it, or choose another --out",
            out.display()
        );
    }
    cfg.validate()?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let (_tok, data) = prepare_data(&mut cfg, out)?;
    crate::io::write_atomic(&out.join("config.toml"), cfg.to_toml()?.as_bytes())?;

    let mut model: Model<f32> = Model::new(cfg.model.clone(), cfg.train.seed)?;
    model.check_finite = cfg.stability.check_finite;
    let mut opt = AdamW::new(cfg.optim.adamw.clone(), &model.specs);
    let mut state = TrainState {
        step: 0,
        tokens: 0,
        sampler: Rng::new(cfg.train.seed ^ 0x5A17_DA7A),
        spikes: 0,
        skipped: 0,
        consecutive_bad: 0,
        loss_window: vec![],
        elapsed_s: 0.0,
    };
    // a run killed before its first checkpoint resumes from the start
    let resuming = opts.resume && ckpt_dir.join(checkpoint::FILE).exists();
    if let (Some(init), false) = (&cfg.train.init, resuming) {
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
    if resuming {
        let specs = model.specs.clone();
        state = checkpoint::load(&ckpt_dir, &specs, &mut model.params, &mut opt)?;
        eprintln!("resuming {} at step {}", out.display(), state.step);
    }
    #[cfg(feature = "cuda")]
    let dev = opts.device.open()?;
    #[cfg(feature = "cuda")]
    let mut engine = match &dev {
        Some(d) => Engine::device(d.as_ref(), &model, &opt, opts.device.precision_kind())?,
        None => Engine::cpu(&model),
    };
    #[cfg(not(feature = "cuda"))]
    let mut engine = Engine::cpu(&model);
    let metrics = Metrics::open(out.join("metrics.jsonl"), resuming.then_some(state.step))?;
    let (b, t, accum) = (cfg.train.batch_size, cfg.train.seq_len, cfg.train.grad_accum);
    #[cfg(feature = "cuda")]
    let (rank, world) = opts.dist.as_ref().map_or((0, 1), |d| (d.0.rank(), d.0.world()));
    #[cfg(not(feature = "cuda"))]
    let (rank, world) = (0, 1);
    // micro-batches and tokens per optimizer step, over all ranks
    let micro = accum * world;
    let step_tokens = (b * t * micro) as u64;
    let total = cfg.train.max_steps;
    let bar = progress_bar(opts.progress, total, state.step);
    let t0 = Instant::now();
    let elapsed0 = state.elapsed_s;
    let (mut last_loss, mut last_eval_step) = (f64::NAN, None);
    let mut last_val = (f64::NAN, None::<SinkStats>);
    let (mut ids, mut tg) = (Vec::with_capacity(b * t), Vec::with_capacity(b * t));
    let mut diverged = false;
    let start_step = state.step;
    while state.step < total {
        let limit_hit = cfg.train.max_seconds > 0.0 && t0.elapsed().as_secs_f64() >= cfg.train.max_seconds;
        if STOP.load(Ordering::Relaxed) || limit_hit || opts.stop_after.is_some_and(|n| state.step - start_step >= n) {
            break;
        }
        let step = state.step;
        let lr = cfg.schedule.lr_at(step, total, cfg.optim.adamw.lr);
        engine.zero_grads()?;
        let mut loss = 0.0;
        let mut bad_where: Option<String> = None;
        let mut routers = RouterLog::default();
        for j in 0..micro {
            ids.clear();
            tg.clear();
            // every rank draws every window (the sampler stays in step); it runs its own
            for _ in 0..b {
                let start = state.sampler.below((data.train.len() - t - 1) as u64) as usize;
                data.train.window(start, t, &mut ids, &mut tg);
            }
            if j % world != rank {
                continue;
            }
            let batch = Batch {
                ids: &ids,
                targets: &tg,
                batch: b,
                seq: t,
            };
            match engine.micro_batch(&model, &batch, &mut routers) {
                Ok(l) => loss += l,
                Err(e) => match e.downcast_ref::<crate::model::NonFinite>() {
                    Some(nf) => {
                        bad_where = Some(nf.to_string());
                        loss = f64::NAN;
                    }
                    None => return Err(e),
                },
            }
        }
        #[cfg(feature = "cuda")]
        if let Some(d) = &opts.dist {
            loss = engine.all_reduce(d.0.as_ref(), loss)?;
        }
        loss /= micro as f64;
        // the mean over micro-batches: applied to the CPU's gradients, folded into the
        // device's norm and update
        let pending = engine.scale_grads((1.0 / micro as f64) as f32);
        state.step += 1;
        state.tokens += step_tokens;
        let gnorm = engine.grad_norm(pending)?;
        if !loss.is_finite() || !gnorm.is_finite() {
            // skip: no update, report, stop after too many in a row (last checkpoint stays valid)
            state.skipped += 1;
            state.consecutive_bad += 1;
            let bad = engine.bad_tensors(&model.params.names)?;
            let why = bad_where.unwrap_or_else(|| {
                if loss.is_finite() {
                    format!("non-finite gradients in {}", bad.join(", "))
                } else {
                    "non-finite loss".into()
                }
            });
            eprintln!("step {} skipped: {why}", state.step);
            metrics.row(json!({"step": state.step, "skipped": true, "loss": loss.to_string(), "grad_norm": gnorm.to_string(), "lr": lr, "reason": why, "non_finite_grads": bad}))?;
            if state.consecutive_bad >= cfg.stability.max_bad_steps {
                diverged = true;
                eprintln!(
                    "stopping: {} consecutive steps with non-finite loss or gradients",
                    state.consecutive_bad
                );
                break;
            }
            continue;
        }
        state.consecutive_bad = 0;
        let scale = if cfg.optim.clip > 0.0 {
            clip_coef(gnorm, cfg.optim.clip)
        } else {
            1.0
        };
        engine.update(&mut model, &mut opt, lr, scale * pending as f64)?;
        let is_spike = spike(&mut state, loss, cfg.stability.spike_window, cfg.stability.spike_margin);
        state.spikes += is_spike as u64;
        last_loss = loss;
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
            bar.set_position(state.step);
            bar.set_message(format!("loss {loss:.4}  {tok_s:.0} tok/s"));
        }
        if state.step.is_multiple_of(cfg.train.eval_every) || state.step.is_multiple_of(cfg.train.checkpoint_every) {
            engine.sync(&mut model, &mut opt)?;
        }
        if state.step.is_multiple_of(cfg.train.eval_every) {
            let (vl, st) = evaluate(&model, &mut engine, &data.val, &cfg)?;
            metrics.row(eval_row(state.step, vl, &st))?;
            last_val = (vl, Some(st));
            last_eval_step = Some(state.step);
        }
        if state.step.is_multiple_of(cfg.train.checkpoint_every) {
            state.elapsed_s = elapsed0 + t0.elapsed().as_secs_f64();
            checkpoint::save(&ckpt_dir, &model.params, &opt, &state)?;
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    // Always end with an evaluation, a checkpoint, the model and the report.
    engine.sync(&mut model, &mut opt)?;
    if last_eval_step != Some(state.step) {
        let (vl, st) = evaluate(&model, &mut engine, &data.val, &cfg)?;
        metrics.row(eval_row(state.step, vl, &st))?;
        last_val = (vl, Some(st));
    }
    let run_secs = t0.elapsed().as_secs_f64();
    state.elapsed_s = elapsed0 + run_secs;
    if !diverged {
        checkpoint::save(&ckpt_dir, &model.params, &opt, &state)?;
        save_model(&out.join("model"), &model, None)?;
    }
    let done = state.step - start_step;
    let summary = RunSummary {
        steps: state.step,
        final_train_loss: last_loss,
        final_val_loss: last_val.0,
        spikes: state.spikes,
        skipped: state.skipped,
        diverged,
        stats: last_val.1.unwrap(),
        tokens_per_s: (done * step_tokens) as f64 / run_secs.max(1e-9),
    };
    report::write(out, &cfg, &summary)?;
    Ok(summary)
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
