//! The device model's weights and gradients. Each dense MLP's gate and up projections — their
//! f32 weights, gradients and bf16 copies — live in one `[gate; up]` = `[2·ff, d]` buffer, so one
//! GEMM computes both projections (forward, input gradient and weight gradient), as the CPU's
//! stacked GEMM does. Likewise each layer's q, k, v and G1 gate projections are one
//! `[q; k; v; gate]` buffer: the backward's input gradient of all four is one GEMM (into `dh1`,
//! once, instead of four accumulating passes over it) and their weight gradients another. Views
//! keep every tensor addressable on its own (optimizer, checkpoints, the forward's GEMMs).

use super::Precision;
use crate::backend::cuda::ops;
use crate::backend::cuda::runtime::{up_f32, DBuf, Device};
use crate::model::params::{FfnIndex, ParamKind};
use crate::model::Model;
use anyhow::Result;
use std::rc::Rc;

/// Projections of one input stacked by rows (`[gate; up]`, `[q; k; v; gate]`): one GEMM operand.
pub(super) struct Stacked {
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
    /// per layer: `[gate; up]` (dense MLPs)
    pub gate_up: Vec<Stacked>,
    /// per layer: `[q; k; v]` and the G1 gate's projection, if any
    pub qkvz: Vec<Stacked>,
}

/// Upload a model's weights, with zeroed gradients.
pub(super) fn upload(dev: &dyn Device, model: &Model<f32>, precision: Precision) -> Result<Weights> {
    let t = &model.params.tensors;
    let head = model.index.lm_head.unwrap_or(model.index.embed);
    let gemm_read = |i: usize| matches!(model.specs[i].kind, ParamKind::Matrix | ParamKind::Gate) || i == head;
    // every layer's [q, k, v, gate] and dense [gate, up] together, every other tensor alone
    let (mut groups, mut kinds) = (Vec::new(), Vec::new());
    let mut stacked = vec![false; t.len()];
    for li in &model.index.layers {
        let mut qkvz = vec![li.q_proj, li.k_proj, li.v_proj];
        qkvz.extend(li.gate);
        groups.push(qkvz);
        kinds.push(Group::Qkvz);
        if let FfnIndex::Dense(mlp) = li.ffn {
            groups.push(vec![mlp.gate, mlp.up]);
            kinds.push(Group::GateUp);
        }
    }
    for g in &groups {
        for &i in g {
            stacked[i] = true;
        }
    }
    kinds.extend((0..t.len()).filter(|&i| !stacked[i]).map(|_| Group::Single));
    groups.extend((0..t.len()).filter(|&i| !stacked[i]).map(|i| vec![i]));
    let none = || (0..t.len()).map(|_| None).collect::<Vec<Option<DBuf>>>();
    let (mut params, mut grads, mut bf16) = (none(), none(), none());
    // the gradients' arena: each group from a 256-byte boundary
    let group_len = |g: &Vec<usize>| g.iter().map(|&i| t[i].data.len()).sum::<usize>();
    let grad_elems: usize = groups.iter().map(|g| group_len(g).div_ceil(64) * 64).sum();
    let grad_arena = Rc::new(dev.zeros(4 * grad_elems.max(1))?);
    let mut grad_at = 0;
    let (mut gate_up, mut qkvz) = (Vec::new(), Vec::new());
    for (group, kind) in groups.iter().zip(kinds) {
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
        let whole = || -> Result<Stacked> {
            Ok(Stacked {
                w: DBuf::view(&p, 0, p.bytes)?,
                grad: DBuf::view(&grad_arena, g_off, 4 * data.len())?,
                w_b: b.as_ref().map(|b| DBuf::view(b, 0, b.bytes)).transpose()?,
            })
        };
        match kind {
            Group::GateUp => gate_up.push(whole()?),
            Group::Qkvz => qkvz.push(whole()?),
            Group::Single => {}
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
        qkvz,
    })
}

/// What a weight group is.
#[derive(Clone, Copy)]
enum Group {
    GateUp,
    Qkvz,
    Single,
}
