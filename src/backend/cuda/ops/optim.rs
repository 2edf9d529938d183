//! AdamW over every tensor in one launch, and the gradients' sum of squares for clipping
//! (optim.cu).

use super::{f32s, need, KernelSource, THREADS};
use crate::backend::cuda::runtime::{Arg, DBuf, Device, Launch};
use anyhow::{bail, Result};

pub const SOURCE: KernelSource = KernelSource {
    name: "optim",
    text: include_str!("optim.cu"),
    entries: &["sumsq_multi", "adamw_multi"],
};

/// One AdamW step's scalars (torch semantics); `scale` multiplies the gradient (clipping).
#[derive(Clone, Copy, Debug)]
pub struct AdamStep {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// Adam's bias corrections `1 − β₁ᵗ`, `1 − β₂ᵗ` of this step (`crate::optim::bias_correction`,
    /// the one place that formula lives: the kernels take it precomputed)
    pub bias_correction1: f32,
    pub bias_correction2: f32,
    pub scale: f32,
}

impl AdamStep {
    pub(crate) fn args(&self) -> [Arg; 8] {
        [
            Arg::F32(self.lr),
            Arg::F32(self.beta1),
            Arg::F32(self.beta2),
            Arg::F32(self.eps),
            Arg::F32(self.weight_decay),
            Arg::F32(self.bias_correction1),
            Arg::F32(self.bias_correction2),
            Arg::F32(self.scale),
        ]
    }
}

/// One tensor of a [`TensorTable`]: (param, grad, m, v, exempt from weight decay when the run
/// says so, a bf16 copy of the param that AdamW keeps equal to its rounding).
pub type TableEntry<'a> = (&'a DBuf, &'a DBuf, &'a DBuf, &'a DBuf, bool, Option<&'a DBuf>);

/// The optimizer's view of every tensor ([`TableEntry`]), uploaded once.
pub struct TensorTable {
    buf: DBuf,
    count: usize,
    max_len: usize,
    /// `sumsq_multi`'s per-block partial sums, allocated once
    partials: DBuf,
}

/// Longs per tensor in the table (optim.cu `TSTRIDE`).
const TSTRIDE: usize = 7;

impl TensorTable {
    pub fn new(dev: &dyn Device, entries: &[TableEntry]) -> Result<TensorTable> {
        let mut t: Vec<u8> = Vec::with_capacity(entries.len() * TSTRIDE * 8);
        let mut max_len = 0;
        for &(p, g, m, v, exempt, bf16) in entries {
            let n = p.bytes / 4;
            f32s("tensor table", &[g, m, v], n)?;
            if let Some(b) = bf16 {
                need("tensor table (bf16 copy)", b, n, 2)?;
            }
            max_len = max_len.max(n);
            for x in [
                p.ptr,
                g.ptr,
                m.ptr,
                v.ptr,
                n as u64,
                exempt as u64,
                bf16.map_or(0, |b| b.ptr),
            ] {
                t.extend(x.to_ne_bytes());
            }
        }
        if entries.is_empty() || entries.len() > 65535 {
            bail!("tensor table: {} tensors (1 to 65535)", entries.len());
        }
        let mut table = TensorTable {
            buf: dev.upload(&t)?,
            count: entries.len(),
            max_len,
            partials: dev.zeros(4)?,
        };
        table.partials = dev.zeros(table.launch().grid[0] as usize * table.count * 4)?;
        Ok(table)
    }

    fn launch(&self) -> Launch {
        // the grid is sized by the largest tensor; 64 blocks of it keep every SM busy once
        // there are a few dozen tensors
        let blocks = self.max_len.div_ceil(THREADS as usize).clamp(1, 64);
        Launch {
            grid: [blocks as u32, self.count as u32, 1],
            block: [THREADS, 1, 1],
            smem: 0,
        }
    }

    /// Σ grad² over every tensor (partials per block on the device, summed here in f64).
    pub fn grad_sumsq(&self, dev: &dyn Device) -> Result<f64> {
        dev.launch("sumsq_multi", self.launch(), &[self.buf.arg(), self.partials.arg()])?;
        let p = crate::backend::cuda::runtime::down_f32(dev, &self.partials)?;
        Ok(p.iter().map(|&x| x as f64).sum())
    }

    /// AdamW on every tensor: `hp.weight_decay`, or `exempt_decay` for the exempt tensors; the
    /// tensors with a bf16 copy get it rewritten from the new param in the same pass.
    pub fn adamw(&self, dev: &dyn Device, hp: &AdamStep, exempt_decay: f32) -> Result<()> {
        let mut args = vec![self.buf.arg()];
        args.extend(hp.args());
        args.push(Arg::F32(exempt_decay));
        dev.launch("adamw_multi", self.launch(), &args)
    }
}
