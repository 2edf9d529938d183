//! The CPU engine: the host model's forward/backward (`model`, on the CPU kernels of
//! `backend::cpu`), gradients in host memory, AdamW applied to the host model in place.

use super::Engine;
use crate::backend::profile::scope;
use crate::model::observer::{NoObserver, RouterLog};
use crate::model::params::ParamStore;
use crate::model::{Batch, Model};
use crate::optim::{grad_norm, AdamW};
use anyhow::Result;

pub struct CpuEngine {
    grads: ParamStore<f32>,
}

impl CpuEngine {
    pub fn new(model: &Model<f32>) -> CpuEngine {
        CpuEngine {
            grads: model.zero_grads(),
        }
    }

    /// The accumulated gradients.
    pub fn grads(&self) -> &ParamStore<f32> {
        &self.grads
    }
}

impl Engine for CpuEngine {
    fn describe(&self) -> String {
        "cpu".into()
    }

    fn zero_grads(&mut self) -> Result<()> {
        self.grads.fill_zero();
        Ok(())
    }

    fn micro_batch(&mut self, model: &Model<f32>, b: &Batch, routers: &mut RouterLog) -> Result<f64> {
        model.forward_backward(b, &mut self.grads, routers)
    }

    fn eval_loss(&mut self, model: &Model<f32>, b: &Batch) -> Result<f64> {
        Ok(model.forward(b, &mut NoObserver)?.loss)
    }

    fn scale_grads(&mut self, s: f32) -> f32 {
        if s != 1.0 {
            self.grads
                .tensors
                .iter_mut()
                .for_each(|t| t.data.iter_mut().for_each(|x| *x *= s));
        }
        1.0
    }

    fn grad_norm(&self, pending: f32) -> Result<f64> {
        let _t = scope("optimizer");
        Ok(grad_norm(&self.grads) * pending as f64)
    }

    fn bad_tensors(&self, names: &[String]) -> Result<Vec<String>> {
        Ok(non_finite(names, &self.grads))
    }

    fn update(&mut self, model: &mut Model<f32>, opt: &mut AdamW<f32>, lr: f64, scale: f64) -> Result<()> {
        let _t = scope("optimizer");
        opt.update_scaled(&mut model.params, &self.grads, &model.specs, lr, scale);
        Ok(())
    }

    fn sync(&self, _model: &mut Model<f32>, _opt: &mut AdamW<f32>) -> Result<()> {
        Ok(())
    }
}

/// The names of the first 8 tensors of `g` holding NaN or Inf.
pub(crate) fn non_finite(names: &[String], g: &ParamStore<f32>) -> Vec<String> {
    names
        .iter()
        .zip(&g.tensors)
        .filter(|(_, t)| t.data.iter().any(|x| !x.is_finite()))
        .map(|(n, _)| n.clone())
        .take(8)
        .collect()
}
