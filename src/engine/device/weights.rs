//! The device model's weights and gradients. Each dense MLP's gate and up projections — their
//! f32 weights, gradients and bf16 copies — live in one `[gate; up]` = `[2·ff, d]` buffer, so one
//! GEMM computes both projections (forward, input gradient and weight gradient), as the CPU's
//! stacked GEMM does; views keep every tensor addressable on its own (optimizer, checkpoints).

use super::Precision;
use crate::backend::cuda::ops;
use crate::backend::cuda::runtime::{up_f32, DBuf, Device};
use crate::model::params::{FfnIndex, ParamKind};
use crate::model::Model;
use anyhow::Result;
use std::rc::Rc;

/// One layer's stacked gate and up projections.
pub(super) struct GateUp {
    pub w: DBuf,
    pub grad: DBuf,
    /// the bf16 copy (mixed precision)
    pub w_b: Option<DBuf>,
}

pub(super) struct Weights {
    pub params: Vec<DBuf>,
    pub grads: Vec<DBuf>,
    /// every gradient: one buffer (zeroed and all-reduced in one call each), `grads` its views
    pub grad_all: DBuf,
    /// bf16 copies of the weights GEMMs read (mixed precision; the embedding only as a tied
    /// head), cast once here and then rewritten by AdamW with the f32 masters
    pub bf16: Vec<Option<DBuf>>,
    /// per layer
    pub gate_up: Vec<GateUp>,
}

/// Upload a model's weights, with zeroed gradients.
pub(super) fn upload(dev: &dyn Device, model: &Model<f32>, precision: Precision) -> Result<Weights> {
    let t = &model.params.tensors;
    let head = model.index.lm_head.unwrap_or(model.index.embed);
    let gemm_read = |i: usize| matches!(model.specs[i].kind, ParamKind::Matrix | ParamKind::Gate) || i == head;
    // every dense layer's [gate, up] together, every other tensor alone
    let mut groups = Vec::new();
    let mut stacked = vec![false; t.len()];
    for li in &model.index.layers {
        if let FfnIndex::Dense(mlp) = li.ffn {
            groups.push(vec![mlp.gate, mlp.up]);
            (stacked[mlp.gate], stacked[mlp.up]) = (true, true);
        }
    }
    groups.extend((0..t.len()).filter(|&i| !stacked[i]).map(|i| vec![i]));
    let none = || (0..t.len()).map(|_| None).collect::<Vec<Option<DBuf>>>();
    let (mut params, mut grads, mut bf16) = (none(), none(), none());
    // the gradients' arena: each group from a 256-byte boundary
    let group_len = |g: &Vec<usize>| g.iter().map(|&i| t[i].data.len()).sum::<usize>();
    let grad_elems: usize = groups.iter().map(|g| group_len(g).div_ceil(64) * 64).sum();
    let grad_arena = Rc::new(dev.zeros(4 * grad_elems.max(1))?);
    let mut grad_at = 0;
    let mut gate_up = Vec::new();
    for group in &groups {
        let data: Vec<f32> = group.iter().flat_map(|&i| t[i].data.iter().copied()).collect();
        let p = Rc::new(up_f32(dev, &data)?);
        let g_off = 4 * grad_at;
        grad_at += data.len().div_ceil(64) * 64;
        let b = match precision == Precision::Bf16 && group.iter().all(|&i| gemm_read(i)) {
            true => {
                let b = Rc::new(dev.zeros(2 * data.len())?);
                ops::cast_to_bf16(dev, &p, &b, data.len())?;
                Some(b)
            }
            false => None,
        };
        let mut at = 0;
        for &i in group {
            let len = t[i].data.len();
            params[i] = Some(DBuf::view(&p, 4 * at, 4 * len)?);
            grads[i] = Some(DBuf::view(&grad_arena, g_off + 4 * at, 4 * len)?);
            bf16[i] = b.as_ref().map(|b| DBuf::view(b, 2 * at, 2 * len)).transpose()?;
            at += len;
        }
        if group.len() == 2 {
            gate_up.push(GateUp {
                w: DBuf::view(&p, 0, p.bytes)?,
                grad: DBuf::view(&grad_arena, g_off, 4 * data.len())?,
                w_b: b.as_ref().map(|b| DBuf::view(b, 0, b.bytes)).transpose()?,
            });
        }
    }
    let all = |v: Vec<Option<DBuf>>| -> Result<Vec<DBuf>> {
        v.into_iter()
            .map(|b| b.ok_or_else(|| anyhow::anyhow!("a tensor of no weight group")))
            .collect()
    };
    Ok(Weights {
        params: all(params)?,
        grads: all(grads)?,
        grad_all: DBuf::view(&grad_arena, 0, grad_arena.bytes)?,
        bf16,
        gate_up,
    })
}
