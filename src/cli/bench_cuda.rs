//! `gated-lm bench --device cuda|emu`: the same timed training steps (forward, backward, clip,
//! AdamW) on the device-resident model, one `RESULT {json}` line like the CPU bench's.

use super::bench::{flops_per_token, random_batch, BenchArgs};
use crate::backend::cuda::model::{DeviceModel, Precision};
use crate::backend::cuda::runtime::Device;
use crate::config::ModelConfig;
use crate::model::Model;
use crate::optim::AdamWConfig;
use crate::rng::Rng;
use anyhow::Result;
use std::time::Instant;

pub fn run(
    a: &BenchArgs,
    dev: &dyn Device,
    precision: Precision,
    cfg: &ModelConfig,
    batch: usize,
    seq: usize,
) -> Result<()> {
    let model: Model<f32> = Model::new(cfg.clone(), 0)?;
    let params = model.params.numel();
    let mut dm = DeviceModel::new(dev, &model, precision)?;
    drop(model);
    let opt = AdamWConfig {
        lr: 3e-4,
        weight_decay: 0.1,
        ..Default::default()
    };
    let mut rng = Rng::new(0);
    let (mut times, mut loss) = (Vec::new(), 0.0);
    for step in 0..a.warmup + a.steps {
        let (ids, tg) = random_batch(&mut rng, cfg.vocab_size, batch, seq);
        let t0 = Instant::now();
        dm.zero_grads()?;
        // both calls read results back, so the step's device work is finished when they return
        loss = dm.forward_backward(&ids, &tg, batch, seq)?;
        dm.step(&opt, opt.lr, 1.0)?;
        if step >= a.warmup {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    times.sort_by(|x, y| x.total_cmp(y));
    let med = times[times.len() / 2];
    let tok_s = (batch * seq) as f64 / med;
    let fpt = flops_per_token(cfg, params, seq);
    let r = serde_json::json!({
        "impl": format!("gated-lm-{}", a.device), "device": dev.describe(), "config": a.preset, "gate": a.gate,
        "params": params, "tokens_per_step": batch * seq, "step_ms": (med * 1e5).round() / 100.0,
        "tokens_per_s": tok_s.round(), "gflops": (fpt * tok_s / 1e9 * 10.0).round() / 10.0,
        "loss": (loss * 1e4).round() / 1e4, "steps": a.steps, "precision": a.precision,
    });
    println!("RESULT {r}");
    Ok(())
}
