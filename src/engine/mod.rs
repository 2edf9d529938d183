//! Where training steps execute. An [`Engine`] holds a model's gradients (and, on a device, its
//! weights and optimizer state) and runs forward/backward, the gradient norm and the update;
//! [`optimizer_step`] is the one step loop body that `train` and `bench` both run on it.
//!
//! - [`cpu::CpuEngine`]: gradients in host memory, the host model updated in place.
//! - `device::DeviceModel` (feature `cuda`): the model resident on a GPU or on the CPU emulator
//!   of one, through the CUDA ops of `backend::cuda`.
//!
//! The host `Model` and `AdamW` stay the run's state of record: a device engine copies them back
//! ([`Engine::sync`]) before every checkpoint, so both engines share checkpoints, resume and the
//! saved model. A device evaluates on its own weights, probes included
//! ([`Engine::eval_observed`]): an evaluation copies nothing back.
//!
//! Layering: `backend` (kernels, launchers, the device runtime) imports nothing of the model;
//! the engines sit above both and are the only place the two meet.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod device;

use crate::model::observer::{Observer, RouterLog};
use crate::model::{Batch, Model};
use crate::optim::{clip_coef, AdamW};
use anyhow::Result;

/// A data-parallel group handle for [`crate::train::RunOptions`].
#[cfg(feature = "cuda")]
#[derive(Clone)]
pub struct Dist(pub std::sync::Arc<dyn crate::backend::cuda::dist::GradAllReduce>);

/// Without the CUDA backend there is no data-parallel group: no value of this type exists.
#[cfg(not(feature = "cuda"))]
#[derive(Clone, Debug)]
pub enum Dist {}

#[cfg(feature = "cuda")]
impl std::fmt::Debug for Dist {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "rank {} of {}", self.0.rank(), self.0.world())
    }
}

/// What an engine does in a training step. Gradients accumulate over micro-batches until
/// [`Engine::zero_grads`]; the host model and optimizer are passed where the CPU engine works on
/// them directly (a device engine reads only the optimizer's settings there).
pub trait Engine {
    /// What runs the steps, for messages and benchmark rows ("cpu", a GPU's name, "emulator").
    fn describe(&self) -> String;
    fn zero_grads(&mut self) -> Result<()>;
    /// Forward and backward of one micro-batch, gradients accumulated; returns its mean loss.
    fn micro_batch(&mut self, model: &Model<f32>, b: &Batch, routers: &mut RouterLog) -> Result<f64>;
    /// Forward-only mean loss of a batch (evaluation), on the engine's own copy of the weights.
    fn eval_loss(&mut self, model: &Model<f32>, b: &Batch) -> Result<f64>;
    /// Forward-only mean loss of a batch, reporting what it observes to `obs`: the host model's
    /// forward by default. An engine that [`Self::evaluates_itself`] runs it on its own weights
    /// and reports each layer's totals ([`Observer::layer_totals`]; `obs` must take them).
    fn eval_observed(&mut self, model: &Model<f32>, b: &Batch, obs: &mut dyn Observer<f32>) -> Result<f64> {
        model.forward_loss(b, obs)
    }
    /// Whether an evaluation runs on the engine's own weights alone ([`Self::eval_loss`] and
    /// [`Self::eval_observed`]), so the host model need not be brought up to date before it.
    fn evaluates_itself(&self) -> bool {
        false
    }
    /// Multiply the accumulated gradients by `s` (the mean over micro-batches), or fold it into
    /// the norm and the update: returns the factor still to apply there.
    fn scale_grads(&mut self, s: f32) -> f32;
    /// Global gradient norm of `pending · grads`.
    fn grad_norm(&self, pending: f32) -> Result<f64>;
    /// Names of the tensors whose gradients hold NaN/Inf (at most 8).
    fn bad_tensors(&self, names: &[String]) -> Result<Vec<String>>;
    /// One AdamW step on `scale · grads` at `lr`.
    fn update(&mut self, model: &mut Model<f32>, opt: &mut AdamW<f32>, lr: f64, scale: f64) -> Result<()>;
    /// Bring the host's model and optimizer up to date (before eval, checkpoints, saving).
    fn sync(&self, model: &mut Model<f32>, opt: &mut AdamW<f32>) -> Result<()>;
    /// Data parallelism: sum the gradients and `loss` over the ranks; returns the summed loss.
    #[cfg(feature = "cuda")]
    fn all_reduce(&mut self, _comm: &dyn crate::backend::cuda::dist::GradAllReduce, _loss: f64) -> Result<f64> {
        anyhow::bail!("data-parallel training runs on devices (--device cuda or emu)")
    }
}

/// Writes micro-batch `j`'s inputs and targets (`[batch, seq]` each, appended to the empty
/// vectors given).
pub type FillMicroBatch<'f> = dyn FnMut(usize, &mut Vec<u32>, &mut Vec<u32>) + 'f;

/// One optimizer step's recipe.
pub struct StepPlan<'a> {
    /// Micro-batches per optimizer step over all ranks (gradient accumulation × world size).
    pub micro: usize,
    pub batch: usize,
    pub seq: usize,
    pub lr: f64,
    /// Global-norm clipping threshold (≤ 0: none).
    pub clip: f64,
    /// This rank and the data-parallel group (rank 0 of 1 without one).
    pub rank: usize,
    pub world: usize,
    pub dist: Option<&'a Dist>,
}

/// What one optimizer step did.
#[derive(Debug)]
pub struct StepOutcome {
    /// Mean loss over the micro-batches (NaN when one was not finite).
    pub loss: f64,
    pub grad_norm: f64,
    /// `Some` when the step was skipped (non-finite loss or gradients): why, and which gradient
    /// tensors were not finite. The weights are then untouched.
    pub skipped: Option<(String, Vec<String>)>,
}

/// One optimizer step: zero the gradients, forward/backward every micro-batch this rank runs
/// (`fill(j, ids, targets)` writes micro-batch `j`; every rank is called for every `j`, so data
/// samplers stay in step, and runs those with `j % world == rank`), sum over the ranks, average,
/// take the norm, and either skip (non-finite) or clip and update.
pub fn optimizer_step(
    engine: &mut dyn Engine,
    model: &mut Model<f32>,
    opt: &mut AdamW<f32>,
    plan: &StepPlan,
    fill: &mut FillMicroBatch,
    routers: &mut RouterLog,
) -> Result<StepOutcome> {
    let (b, t) = (plan.batch, plan.seq);
    let (mut ids, mut tg) = (Vec::with_capacity(b * t), Vec::with_capacity(b * t));
    engine.zero_grads()?;
    let mut loss = 0.0;
    let mut bad_where: Option<String> = None;
    for j in 0..plan.micro {
        ids.clear();
        tg.clear();
        fill(j, &mut ids, &mut tg);
        if j % plan.world != plan.rank {
            continue;
        }
        let batch = Batch {
            ids: &ids,
            targets: &tg,
            batch: b,
            seq: t,
        };
        match engine.micro_batch(model, &batch, routers) {
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
    if let Some(d) = plan.dist {
        loss = engine.all_reduce(d.0.as_ref(), loss)?;
    }
    #[cfg(not(feature = "cuda"))]
    if let Some(d) = plan.dist {
        match *d {}
    }
    loss /= plan.micro as f64;
    // the mean over micro-batches: applied to the CPU's gradients, folded into the device's
    // norm and update
    let pending = engine.scale_grads((1.0 / plan.micro as f64) as f32);
    let grad_norm = engine.grad_norm(pending)?;
    if !loss.is_finite() || !grad_norm.is_finite() {
        let bad = engine.bad_tensors(&model.params.names)?;
        let why = bad_where.unwrap_or_else(|| {
            if loss.is_finite() {
                format!("non-finite gradients in {}", bad.join(", "))
            } else {
                "non-finite loss".into()
            }
        });
        return Ok(StepOutcome {
            loss,
            grad_norm,
            skipped: Some((why, bad)),
        });
    }
    let scale = if plan.clip > 0.0 {
        clip_coef(grad_norm, plan.clip)
    } else {
        1.0
    };
    engine.update(model, opt, plan.lr, scale * pending as f64)?;
    Ok(StepOutcome {
        loss,
        grad_norm,
        skipped: None,
    })
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
    /// `--recompute`: the backward recomputes the norms' outputs and the rotated q and k
    /// (devices only; `DeviceModel::set_recompute`)
    pub recompute: bool,
}

impl Default for DeviceChoice {
    fn default() -> Self {
        DeviceChoice {
            device: "cpu".into(),
            precision: "f32".into(),
            ordinal: 0,
            recompute: false,
        }
    }
}

impl DeviceChoice {
    pub fn check(&self) -> Result<()> {
        if self.recompute && self.device == "cpu" {
            anyhow::bail!("--recompute: only device runs (--device cuda or emu) recompute activations");
        }
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
    pub fn precision_kind(&self) -> device::Precision {
        if self.precision == "bf16" {
            device::Precision::Bf16
        } else {
            device::Precision::F32
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

    /// The engine for `model` on `dev` (from [`Self::open`]; `None`: the CPU), with the
    /// optimizer state of `opt` (non-empty when resuming).
    #[cfg(feature = "cuda")]
    pub fn engine<'d>(
        &self,
        dev: Option<&'d dyn crate::backend::cuda::runtime::Device>,
        model: &Model<f32>,
        opt: &AdamW<f32>,
    ) -> Result<Box<dyn Engine + 'd>> {
        Ok(match dev {
            Some(d) => {
                let mut dm = device::DeviceModel::new(d, model, self.precision_kind())?;
                dm.set_recompute(self.recompute);
                dm.set_optimizer(opt)?;
                Box::new(dm)
            }
            None => Box::new(cpu::CpuEngine::new(model)),
        })
    }
}
