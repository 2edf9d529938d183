//! `gated-lm bench --device cuda|emu`: the same timed training steps (forward, backward, clip,
//! AdamW) on the device-resident model. `bench` owns the arguments, the batches and the
//! `RESULT {json}` line; this file only runs and times the steps, so it imports nothing of it.

use crate::backend::cuda::model::{DeviceModel, Precision};
use crate::backend::cuda::runtime::Device;
use crate::config::ModelConfig;
use crate::model::Model;
use crate::optim::AdamWConfig;
use anyhow::Result;
use std::time::Instant;

/// What the timed device steps measured.
pub struct Timed {
    /// Median seconds per step over the timed steps.
    pub step_s: f64,
    /// The last step's loss.
    pub loss: f64,
    pub params: usize,
}

/// `warmup` untimed then `steps` timed training steps on the batches `next_batch` gives (inputs,
/// targets; `[batch, seq]` each).
pub fn time_steps(
    dev: &dyn Device,
    precision: Precision,
    cfg: &ModelConfig,
    (batch, seq): (usize, usize),
    (warmup, steps): (usize, usize),
    next_batch: &mut dyn FnMut() -> (Vec<u32>, Vec<u32>),
) -> Result<Timed> {
    let model: Model<f32> = Model::new(cfg.clone(), 0)?;
    let params = model.params.numel();
    let mut dm = DeviceModel::new(dev, &model, precision)?;
    drop(model);
    let opt = AdamWConfig {
        lr: 3e-4,
        weight_decay: 0.1,
        ..Default::default()
    };
    let (mut times, mut loss) = (Vec::new(), 0.0);
    for step in 0..warmup + steps {
        let (ids, tg) = next_batch();
        let t0 = Instant::now();
        dm.zero_grads()?;
        // both calls read results back, so the step's device work is finished when they return
        loss = dm.forward_backward(&ids, &tg, batch, seq)?;
        dm.step(&opt, opt.lr, 1.0)?;
        if step >= warmup {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    times.sort_by(|x, y| x.total_cmp(y));
    Ok(Timed {
        step_s: times[times.len() / 2],
        loss,
        params,
    })
}
