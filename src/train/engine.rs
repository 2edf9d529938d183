//! Where a run's training steps execute: the CPU engine (gradients in host memory, updated in
//! place), or the device-resident model (feature `cuda`: a GPU, or the CPU emulator of one).
//! The loop keeps the CPU `Model` and `AdamW` as the run's state of record: the device copies
//! them back before every evaluation and checkpoint, so both engines share eval, checkpoints,
//! resume and the saved model.

use crate::model::observer::RouterLog;
use crate::model::params::ParamStore;
use crate::model::{Batch, Model};
use crate::optim::{grad_norm, AdamW};
use anyhow::Result;

/// A data-parallel group handle for [`crate::train::RunOptions`].
#[cfg(feature = "cuda")]
#[derive(Clone)]
pub struct Dist(pub std::sync::Arc<dyn crate::backend::cuda::dist::GradAllReduce>);

#[cfg(feature = "cuda")]
impl std::fmt::Debug for Dist {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "rank {} of {}", self.0.rank(), self.0.world())
    }
}

/// `--device` and `--precision` of a run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceChoice {
    /// cpu, cuda, or emu
    pub device: String,
    /// f32 or bf16 (devices only)
    pub precision: String,
    /// which GPU (cuda)
    pub ordinal: usize,
}

impl Default for DeviceChoice {
    fn default() -> Self {
        DeviceChoice {
            device: "cpu".into(),
            precision: "f32".into(),
            ordinal: 0,
        }
    }
}

impl DeviceChoice {
    pub fn check(&self) -> Result<()> {
        match (self.device.as_str(), self.precision.as_str()) {
            ("cpu", "f32") => Ok(()),
            ("cpu", p) => anyhow::bail!("--precision {p}: the CPU engine computes in f32"),
            #[cfg(feature = "cuda")]
            ("cuda" | "emu", "f32" | "bf16") => Ok(()),
            #[cfg(feature = "cuda")]
            ("cuda" | "emu", p) => anyhow::bail!("--precision {p}: expected f32 or bf16"),
            #[cfg(not(feature = "cuda"))]
            ("cuda" | "emu", _) => anyhow::bail!(
                "--device {}: this build has no CUDA backend (rebuild with `--features cuda`)",
                self.device
            ),
            (d, _) => anyhow::bail!("--device {d}: expected cpu, cuda or emu"),
        }
    }

    /// The device arithmetic (after `check`).
    #[cfg(feature = "cuda")]
    pub fn precision_kind(&self) -> crate::backend::cuda::model::Precision {
        use crate::backend::cuda::model::Precision;
        if self.precision == "bf16" {
            Precision::Bf16
        } else {
            Precision::F32
        }
    }

    /// The device to run on (`None`: the CPU engine).
    #[cfg(feature = "cuda")]
    pub fn open(&self) -> Result<Option<Box<dyn crate::backend::cuda::runtime::Device>>> {
        self.check()?;
        Ok(match self.device.as_str() {
            "emu" => Some(Box::new(crate::backend::cuda::emu::Emu::open()?)),
            "cuda" => Some(Box::new(crate::backend::cuda::device::Gpu::open(self.ordinal)?)),
            _ => None,
        })
    }
}

pub enum Engine<'d> {
    Cpu(ParamStore<f32>),
    #[cfg(feature = "cuda")]
    Device(Box<crate::backend::cuda::model::DeviceModel<'d>>),
    #[cfg(not(feature = "cuda"))]
    _Unused(std::marker::PhantomData<&'d ()>),
}

impl<'d> Engine<'d> {
    pub fn cpu(model: &Model<f32>) -> Engine<'d> {
        Engine::Cpu(model.zero_grads())
    }

    /// The device-resident model, with the optimizer state of `opt` (non-empty when resuming).
    #[cfg(feature = "cuda")]
    pub fn device(
        dev: &'d dyn crate::backend::cuda::runtime::Device,
        model: &Model<f32>,
        opt: &AdamW<f32>,
        precision: crate::backend::cuda::model::Precision,
    ) -> Result<Engine<'d>> {
        let mut dm = crate::backend::cuda::model::DeviceModel::new(dev, model, precision)?;
        dm.set_optimizer(opt)?;
        Ok(Engine::Device(Box::new(dm)))
    }

    pub fn zero_grads(&mut self) -> Result<()> {
        match self {
            Engine::Cpu(g) => g.fill_zero(),
            #[cfg(feature = "cuda")]
            Engine::Device(dm) => dm.zero_grads()?,
            #[cfg(not(feature = "cuda"))]
            Engine::_Unused(_) => unreachable!(),
        }
        Ok(())
    }

    /// Forward and backward of one micro-batch, gradients accumulated; returns its loss.
    pub fn micro_batch(&mut self, model: &Model<f32>, b: &Batch, routers: &mut RouterLog) -> Result<f64> {
        match self {
            Engine::Cpu(g) => model.forward_backward(b, g, routers),
            #[cfg(feature = "cuda")]
            Engine::Device(dm) => dm.forward_backward(b.ids, b.targets, b.batch, b.seq),
            #[cfg(not(feature = "cuda"))]
            Engine::_Unused(_) => unreachable!(),
        }
    }

    /// Forward-only loss of a batch (evaluation), on the engine's own copy of the weights.
    pub fn eval_loss(&mut self, model: &Model<f32>, b: &Batch) -> Result<f64> {
        match self {
            Engine::Cpu(_) => Ok(model.forward(b, &mut crate::model::observer::NoObserver)?.loss),
            #[cfg(feature = "cuda")]
            Engine::Device(dm) => dm.loss(b.ids, b.targets, b.batch, b.seq),
            #[cfg(not(feature = "cuda"))]
            Engine::_Unused(_) => unreachable!(),
        }
    }

    /// Multiply the accumulated gradients by `s` (the mean over micro-batches). The device
    /// folds it into the norm and the update instead; returns the factor still to apply there.
    pub fn scale_grads(&mut self, s: f32) -> f32 {
        match self {
            Engine::Cpu(g) => {
                if s != 1.0 {
                    g.tensors
                        .iter_mut()
                        .for_each(|t| t.data.iter_mut().for_each(|x| *x *= s));
                }
                1.0
            }
            #[cfg(feature = "cuda")]
            Engine::Device(_) => s,
            #[cfg(not(feature = "cuda"))]
            Engine::_Unused(_) => unreachable!(),
        }
    }

    /// Global gradient norm of `pending · grads`.
    pub fn grad_norm(&self, pending: f32) -> Result<f64> {
        match self {
            Engine::Cpu(g) => Ok(grad_norm(g) * pending as f64),
            #[cfg(feature = "cuda")]
            Engine::Device(dm) => Ok(dm.grad_norm()? * pending as f64),
            #[cfg(not(feature = "cuda"))]
            Engine::_Unused(_) => unreachable!(),
        }
    }

    /// Names of the tensors whose gradients hold NaN/Inf (at most 8).
    pub fn bad_tensors(&self, names: &[String]) -> Result<Vec<String>> {
        let bad = |g: &ParamStore<f32>| -> Vec<String> {
            names
                .iter()
                .zip(&g.tensors)
                .filter(|(_, t)| t.data.iter().any(|x| !x.is_finite()))
                .map(|(n, _)| n.clone())
                .take(8)
                .collect()
        };
        match self {
            Engine::Cpu(g) => Ok(bad(g)),
            #[cfg(feature = "cuda")]
            Engine::Device(dm) => Ok(bad(&dm.grads()?)),
            #[cfg(not(feature = "cuda"))]
            Engine::_Unused(_) => unreachable!(),
        }
    }

    /// One AdamW step on `scale · grads` at `lr`.
    pub fn update(&mut self, model: &mut Model<f32>, opt: &mut AdamW<f32>, lr: f64, scale: f64) -> Result<()> {
        match self {
            Engine::Cpu(g) => opt.update_scaled(&mut model.params, g, &model.specs, lr, scale),
            #[cfg(feature = "cuda")]
            Engine::Device(dm) => dm.update(&opt.cfg, lr, scale as f32)?,
            #[cfg(not(feature = "cuda"))]
            Engine::_Unused(_) => unreachable!(),
        }
        Ok(())
    }

    /// Data parallelism: sum the gradients and `loss` over the ranks; returns the summed loss.
    #[cfg(feature = "cuda")]
    pub fn all_reduce(&mut self, comm: &dyn crate::backend::cuda::dist::GradAllReduce, loss: f64) -> Result<f64> {
        match self {
            Engine::Device(dm) => {
                dm.all_reduce_grads(comm)?;
                let dev = dm.device();
                let mut l = vec![crate::backend::cuda::runtime::up_f32(dev, &[loss as f32])?];
                comm.all_reduce_sum(dev, &mut l)?;
                Ok(crate::backend::cuda::runtime::down_f32(dev, &l[0])?[0] as f64)
            }
            _ => anyhow::bail!("data-parallel training runs on devices (--device cuda or emu)"),
        }
    }

    /// Bring the host's model and optimizer up to date (before eval, checkpoints, saving).
    pub fn sync(&self, model: &mut Model<f32>, opt: &mut AdamW<f32>) -> Result<()> {
        #[cfg(feature = "cuda")]
        if let Engine::Device(dm) = self {
            model.params = dm.params()?;
            dm.optimizer_into(opt)?;
        }
        let _ = (model, opt);
        Ok(())
    }
}
