//! Token embedding lookup and its scatter-add backward.

use crate::real::Real;
use rayon::prelude::*;

pub fn embedding_fwd<T: Real>(table: &[T], dim: usize, ids: &[u32], out: &mut [T]) {
    out.par_chunks_mut(dim).zip(ids.par_iter()).for_each(|(o, &id)| {
        let id = id as usize;
        o.copy_from_slice(&table[id * dim..(id + 1) * dim]);
    });
}

/// `dtable[id] += dout[row]`. Parallel over column blocks so every row is summed in token order
/// (deterministic) without locks.
pub fn embedding_bwd<T: Real>(dtable: &mut [T], dim: usize, ids: &[u32], dout: &[T]) {
    let vocab = dtable.len() / dim;
    const COLS: usize = 32;
    let ncb = dim.div_ceil(COLS);
    // Each task owns columns [c0, c1) of every row of the table.
    let ptr = crate::backend::cpu::SyncPtr(dtable.as_mut_ptr());
    (0..ncb).into_par_iter().for_each(|cb| {
        let (c0, c1) = (cb * COLS, ((cb + 1) * COLS).min(dim));
        for (r, &id) in ids.iter().enumerate() {
            let id = id as usize;
            debug_assert!(id < vocab);
            let src = &dout[r * dim + c0..r * dim + c1];
            for (j, &g) in src.iter().enumerate() {
                // SAFETY: id < vocab (checked at batch validation), column block owned by this task.
                unsafe { *ptr.get().add(id * dim + c0 + j) += g };
            }
        }
    });
}
