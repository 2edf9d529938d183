//! `gated-lm bench`: median time of full training steps on a preset, as one `RESULT {json}` line
//! comparable with `shared/bench/torch_ref.py`.

use crate::backend::profile;
use crate::config::{preset_with_gate, ModelConfig};
use crate::engine::{optimizer_step, Engine, StepPlan};
use crate::model::observer::RouterLog;
use crate::model::Model;
use crate::optim::{AdamW, AdamWConfig};
use crate::rng::Rng;
use anyhow::{Context, Result};
use clap::Args;
use std::time::Instant;

#[derive(Args, Debug)]
#[command(allow_negative_numbers = true)]
pub struct BenchArgs {
    /// Model preset: micro, tiny, small, 1p7b (tiny/small/1p7b as in torch_ref.py), moe-micro,
    /// moe-tiny; or a training preset (cpu-tiny, cpu-micro, …: its model, batch and sequence)
    #[arg(long, default_value = "tiny")]
    pub preset: String,
    #[arg(long, default_value = "elementwise", help = crate::cli::train::GATE_HELP)]
    pub gate: String,
    /// Timed steps (≥ 1); the median is reported
    #[arg(long, default_value_t = 10, value_parser = crate::cli::num::count)]
    pub steps: usize,
    /// Untimed steps first
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Worker threads (default: all cores)
    #[arg(long, value_parser = crate::cli::num::count)]
    pub threads: Option<usize>,
    /// Sequences per step (default: the preset's)
    #[arg(long, alias = "batch", value_parser = crate::cli::num::count)]
    pub batch_size: Option<usize>,
    /// Sequence length in tokens (default: the preset's)
    #[arg(long, alias = "seq", value_parser = crate::cli::num::count)]
    pub seq_len: Option<usize>,
    /// Print the time per section (forward/backward ops, optimizer) to stderr
    #[arg(long)]
    pub profile: bool,
    /// Instead of training steps: decode this many tokens with a KV cache, alternating the gated
    /// model with its ungated twin, and report ms/token and the gate's overhead
    #[arg(long)]
    pub decode: Option<usize>,
    /// MoE FFN spec (as `train --moe`); MoE presets (moe-micro, moe-tiny) have one. A MoE
    /// model is also timed against its dense counterpart with equal active parameters.
    #[arg(long)]
    pub moe: Option<String>,
    /// cpu; cuda (GPU 0; needs a build with `--features cuda`); emu (the CUDA kernels on the
    /// CPU emulator: a correctness check of the device path, far slower than either)
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// f32, or bf16 (mixed precision: bf16 GEMM operands, f32 accumulation, master weights,
    /// norms and loss; cuda and emu only)
    #[arg(long, default_value = "f32")]
    pub precision: String,
    /// On a device: recompute the norms' outputs and the rotated q and k in the backward
    /// instead of keeping them per layer (as `train --recompute`)
    #[arg(long)]
    pub recompute: bool,
}

/// Median ms/token of `n`-token greedy decodes, gated vs ungated twin, interleaved over rounds.
fn bench_decode(a: &BenchArgs, n: usize) -> Result<()> {
    use crate::model::decode::KvCache;
    let (gated_cfg, _, _) = bench_shape(a)?;
    let mut base_cfg = gated_cfg.clone();
    base_cfg.gate = None;
    let gated: Model<f32> = Model::new(gated_cfg, 0)?;
    let mut base: Model<f32> = Model::new(base_cfg, 0)?;
    // the twin shares every non-gate weight
    for (i, name) in base.params.names.clone().iter().enumerate() {
        base.params.tensors[i] = gated.params.get(name).unwrap().clone();
    }
    let run = |m: &Model<f32>| -> Result<f64> {
        let mut cache = KvCache::new(m, None, 0)?;
        let mut t = 1u32;
        let t0 = Instant::now();
        for _ in 0..n {
            let l = m.decode(&mut cache, &[t])?;
            t = crate::infer::sample(&l, &Default::default(), &mut Rng::new(0));
        }
        Ok(t0.elapsed().as_secs_f64() * 1e3 / n as f64)
    };
    let (mut tg, mut tb) = (vec![], vec![]);
    for r in 0..a.warmup + a.steps {
        let (g, b) = if r % 2 == 0 {
            (run(&gated)?, run(&base)?)
        } else {
            let b = run(&base)?;
            (run(&gated)?, b)
        };
        if r >= a.warmup {
            tg.push(g);
            tb.push(b);
        }
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (g, b) = (med(&mut tg), med(&mut tb));
    let res = serde_json::json!({"impl": "gated-lm-cpu-decode", "config": a.preset, "gate": a.gate, "tokens": n,
        "ms_per_token_gated": (g * 1e4).round() / 1e4, "ms_per_token_ungated": (b * 1e4).round() / 1e4,
        "gate_overhead_pct": ((g / b - 1.0) * 1e4).round() / 1e2, "threads": rayon::current_num_threads()});
    println!("RESULT {res}");
    Ok(())
}

/// The model and (batch, seq) of a model preset, or of a training preset.
fn bench_shape(a: &BenchArgs) -> Result<(ModelConfig, usize, usize)> {
    let (cfg, b, t) = match preset_with_gate(&a.preset, &a.gate) {
        Ok(cfg) => {
            let (b, t) = crate::config::preset_shape(&a.preset);
            (cfg, b, t)
        }
        Err(e) => match crate::train::config::TrainConfig::preset(&a.preset) {
            Ok(mut tc) => {
                tc.model.gate =
                    crate::config::GateConfig::parse_spec(&a.gate).with_context(|| format!("--gate {}", a.gate))?;
                (tc.model, tc.train.batch_size, tc.train.seq_len)
            }
            Err(_) => return Err(e),
        },
    };
    Ok((cfg, a.batch_size.unwrap_or(b), a.seq_len.unwrap_or(t)))
}

pub fn run(a: BenchArgs) -> Result<()> {
    if let Some(t) = a.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build_global()
            .context("cannot set thread count")?;
    }
    if let Some(n) = a.decode {
        return bench_decode(&a, n);
    }
    let (mut cfg, b, t) = bench_shape(&a)?;
    if let Some(m) = &a.moe {
        cfg.moe = crate::config::MoeConfig::parse_spec(m).with_context(|| format!("--moe {m}"))?;
    }
    if t > cfg.max_position_embeddings {
        anyhow::bail!(
            "--seq-len {t} exceeds the model's max_position_embeddings {}",
            cfg.max_position_embeddings
        );
    }
    let device = crate::engine::DeviceChoice {
        device: a.device.clone(),
        precision: a.precision.clone(),
        ordinal: 0,
        recompute: a.recompute,
    };
    // on a device the host holds only the model and the optimizer's copies
    let host = match device.device.as_str() {
        "cpu" => crate::model::memory::training(&cfg, b, t),
        _ => crate::model::memory::host_copies(&cfg),
    };
    crate::model::memory::ensure_fits("this benchmark", &host)?;
    device.check()?;
    #[cfg(feature = "cuda")]
    let dev = device.open()?;
    #[cfg(feature = "cuda")]
    let dev = dev.as_deref();
    #[cfg(not(feature = "cuda"))]
    let dev: Option<std::convert::Infallible> = None;
    if dev.is_some() && cfg.moe.is_some() {
        anyhow::bail!("--moe: Mixture-of-Experts layers are CPU-only");
    }
    let mut main = Stepper::new(&cfg, b, t, &device, dev)?;
    // a MoE model is timed against its dense counterpart (same attention, same active FFN
    // width), steps interleaved so both see the same machine conditions
    let mut dense = match cfg.moe {
        Some(_) => Some(Stepper::new(&cfg.dense_counterpart(), b, t, &device, dev)?),
        None => None,
    };
    for step in 0..a.warmup + a.steps {
        profile::enable(a.profile);
        main.step(step >= a.warmup)?;
        profile::enable(false);
        if let Some(d) = &mut dense {
            d.step(step >= a.warmup)?;
        }
        if step + 1 == a.warmup {
            profile::reset();
        }
    }
    #[allow(unused_mut)]
    let mut r = main.result(&a);
    #[cfg(feature = "cuda")]
    if let Some((_, peak)) = dev.and_then(|d| d.memory()) {
        // torch_ref.py's max_mem_gib counts the same way (allocations, not the context)
        r["device_peak_gib"] = serde_json::json!((peak as f64 / (1u64 << 30) as f64 * 100.0).round() / 100.0);
    }
    if a.profile {
        let total: f64 = main.times.iter().sum();
        for (name, secs, calls) in profile::snapshot() {
            eprintln!(
                "{name:>22} {:8.1} ms/step {:5.1}%  ({calls} calls)",
                secs * 1e3 / a.steps as f64,
                100.0 * secs / total
            );
        }
    }
    println!("RESULT {r}");
    if let Some(d) = &mut dense {
        let rd = d.result(&a);
        println!("RESULT {rd}");
        let cmp = serde_json::json!({"impl": "gated-lm-cpu-moe-vs-dense", "config": a.preset,
            "moe_tokens_per_s": r["tokens_per_s"], "dense_tokens_per_s": rd["tokens_per_s"],
            "moe_over_dense": ((r["tokens_per_s"].as_f64().unwrap_or(0.0) / rd["tokens_per_s"].as_f64().unwrap_or(1.0)) * 1e3).round() / 1e3,
            "moe_active_params": r["active_params"], "dense_params": rd["params"], "moe_total_params": r["params"]});
        println!("RESULT {cmp}");
    }
    Ok(())
}

/// Training FLOPs per token as torch_ref.py counts them: 6N (matmuls incl. the LM head, not
/// the embedding lookup) + causal attention scores and values. `active`: parameters a token uses.
fn flops_per_token(cfg: &ModelConfig, active: usize, seq: usize) -> f64 {
    let emb = cfg.vocab_size * cfg.hidden_size;
    let n_nonemb = active - emb - if cfg.tie_word_embeddings { 0 } else { emb };
    6.0 * (n_nonemb + emb) as f64 + 6.0 * (cfg.num_layers * cfg.num_heads * cfg.head_dim * seq) as f64
}

/// Random token rows `[batch, seq + 1]` split into inputs and next-token targets.
fn random_batch(rng: &mut Rng, vocab: usize, batch: usize, seq: usize) -> (Vec<u32>, Vec<u32>) {
    let data: Vec<u32> = (0..batch * (seq + 1)).map(|_| rng.below(vocab as u64) as u32).collect();
    let ids = data.chunks(seq + 1).flat_map(|r| r[..seq].to_vec()).collect();
    let tg = data.chunks(seq + 1).flat_map(|r| r[1..].to_vec()).collect();
    (ids, tg)
}

/// One model's training steps on random tokens (forward, backward, clip, AdamW), timed: the
/// same [`optimizer_step`] as `train`, on the CPU engine or a device's.
struct Stepper<'d> {
    cfg: ModelConfig,
    model: Model<f32>,
    engine: Box<dyn Engine + 'd>,
    opt: AdamW<f32>,
    rng: Rng,
    batch: usize,
    seq: usize,
    times: Vec<f64>,
    loss: f64,
    precision: String,
}

#[cfg(feature = "cuda")]
type DevRef<'d> = Option<&'d dyn crate::backend::cuda::runtime::Device>;
#[cfg(not(feature = "cuda"))]
type DevRef<'d> = Option<std::convert::Infallible>;

impl<'d> Stepper<'d> {
    fn new(
        cfg: &ModelConfig,
        batch: usize,
        seq: usize,
        device: &crate::engine::DeviceChoice,
        dev: DevRef<'d>,
    ) -> Result<Stepper<'d>> {
        let model: Model<f32> = Model::new(cfg.clone(), 0)?;
        let ocfg = AdamWConfig {
            lr: 3e-4,
            weight_decay: 0.1,
            ..Default::default()
        };
        let opt = AdamW::new(ocfg, &model.specs);
        #[cfg(feature = "cuda")]
        let engine = device.engine(dev, &model, &opt)?;
        #[cfg(not(feature = "cuda"))]
        let engine: Box<dyn Engine> = {
            let _ = (device, dev);
            Box::new(crate::engine::cpu::CpuEngine::new(&model))
        };
        Ok(Stepper {
            cfg: cfg.clone(),
            engine,
            opt,
            model,
            rng: Rng::new(0),
            batch,
            seq,
            times: vec![],
            loss: 0.0,
            precision: device.precision.clone(),
        })
    }

    fn step(&mut self, timed: bool) -> Result<()> {
        let (b, t, vocab) = (self.batch, self.seq, self.cfg.vocab_size);
        let (ids, tg) = random_batch(&mut self.rng, vocab, b, t);
        let plan = StepPlan {
            micro: 1,
            batch: b,
            seq: t,
            lr: 3e-4,
            clip: 1.0,
            rank: 0,
            world: 1,
            dist: None,
        };
        let mut fill = |_j: usize, i: &mut Vec<u32>, g: &mut Vec<u32>| {
            i.extend_from_slice(&ids);
            g.extend_from_slice(&tg);
        };
        let t0 = Instant::now();
        // the step reads the loss and the norm back, so a device's work is done when it returns
        let out = optimizer_step(
            self.engine.as_mut(),
            &mut self.model,
            &mut self.opt,
            &plan,
            &mut fill,
            &mut RouterLog::default(),
        )?;
        if let Some((why, _)) = out.skipped {
            anyhow::bail!("benchmark step skipped: {why}");
        }
        self.loss = out.loss;
        if timed {
            self.times.push(t0.elapsed().as_secs_f64());
        }
        Ok(())
    }

    /// Parameters a token passes through: experts count k/E of theirs.
    fn active_params(&self) -> usize {
        let total = self.model.params.numel();
        let Some(m) = &self.cfg.moe else { return total };
        let expert: usize = self
            .model
            .params
            .names
            .iter()
            .zip(&self.model.params.tensors)
            .filter(|(n, _)| n.contains("mlp.experts."))
            .map(|(_, t)| t.numel())
            .sum();
        total - expert + expert * m.num_experts_per_tok / m.num_experts
    }

    fn result(&mut self, a: &BenchArgs) -> serde_json::Value {
        let (cfg, t) = (&self.cfg, self.seq);
        self.times.sort_by(|x, y| x.total_cmp(y));
        let med = self.times[self.times.len() / 2];
        let n_all = self.model.params.numel();
        let active = self.active_params();
        let fpt = flops_per_token(cfg, active, t);
        let tok_s = (self.batch * t) as f64 / med;
        let moe = cfg.moe.as_ref().map(|m| {
            format!(
                "{}:{}:{}",
                m.num_experts, m.num_experts_per_tok, m.moe_intermediate_size
            )
        });
        let (imp, device) = match self.engine.describe().as_str() {
            "cpu" => ("gated-lm-cpu".to_string(), None),
            d => (format!("gated-lm-{}", a.device), Some(d.to_string())),
        };
        serde_json::json!({
            "impl": imp, "device": device, "precision": self.precision, "config": a.preset, "gate": a.gate, "moe": moe, "params": n_all,
            "active_params": active, "tokens_per_step": self.batch * t, "step_ms": (med * 1e5).round() / 100.0,
            "tokens_per_s": tok_s.round(), "gflops": (fpt * tok_s / 1e9 * 10.0).round() / 10.0,
            "loss": (self.loss * 1e4).round() / 1e4, "threads": rayon::current_num_threads(), "steps": a.steps,
        })
    }
}
