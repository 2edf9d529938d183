//! Token embedding: the table's rows gathered, and the backward summed per id in row order
//! (embedding.cu).

use super::{f32s, need, KernelSource, THREADS};
use crate::backend::cuda::runtime::{Arg, DBuf, Device, Launch};
use anyhow::{bail, Result};

pub const SOURCE: KernelSource = KernelSource {
    name: "embedding",
    text: include_str!("embedding.cu"),
    entries: &["embed_fwd", "embed_bwd"],
};

/// Rows of `table` (`[vocab, d]`) for i32 `ids`.
pub fn embed_fwd(dev: &dyn Device, ids: &DBuf, table: &DBuf, out: &DBuf, rows: usize, d: usize) -> Result<()> {
    need("embed_fwd", ids, rows, 4)?;
    f32s("embed_fwd", &[out], rows * d)?;
    let args = [
        ids.arg(),
        table.arg(),
        out.arg(),
        Arg::I32(rows as i32),
        Arg::I32(d as i32),
    ];
    // a block per row (as many as 4,096 at once; they walk the rest)
    dev.launch("embed_fwd", Launch::linear(rows.clamp(1, 4096), THREADS), &args)
}

/// `dtable[ids[r]] += dout[r]`, summed per id in row order (deterministic): the rows are
/// grouped by id here on the host ([`embed_bwd_index`]), one block per distinct id on the device.
pub fn embed_bwd(dev: &dyn Device, ids: &[u32], dout: &DBuf, dtable: &DBuf, d: usize) -> Result<()> {
    let index = embed_bwd_index(ids, dtable.bytes / (4 * d.max(1)))?;
    let bytes: Vec<u8> = index.iter().flat_map(|v| v.to_ne_bytes()).collect();
    embed_bwd_with(dev, &dev.upload(&bytes)?, ids.len(), dout, dtable, d)
}

/// i32 elements of [`embed_bwd_index`]'s index for `rows` ids.
pub fn embed_bwd_index_len(rows: usize) -> usize {
    3 * rows + 2
}

/// The embedding backward's index of `ids`, at offsets that depend only on `rows` (so a
/// captured launch reads any batch's index): the number of distinct ids; the rows ordered by
/// id (stable: rows of one id stay in order) (`rows` slots); each distinct id's first position
/// in that order, then the end (`rows + 1` slots); the distinct ids (`rows` slots). Unused
/// slots are zero. An id beyond the table's `table_rows` rows is an error.
pub fn embed_bwd_index(ids: &[u32], table_rows: usize) -> Result<Vec<i32>> {
    let rows = ids.len();
    if let Some(&bad) = ids.iter().find(|&&id| id as usize >= table_rows) {
        bail!("embed_bwd: id {bad} beyond the table's {table_rows} rows");
    }
    let mut index = vec![0i32; embed_bwd_index_len(rows)];
    let (count, rest) = index.split_at_mut(1);
    let (order, rest) = rest.split_at_mut(rows);
    let (start, uniq) = rest.split_at_mut(rows + 1);
    for (r, o) in order.iter_mut().enumerate() {
        *o = r as i32;
    }
    order.sort_by_key(|&r| ids[r as usize]);
    let mut distinct = 0;
    for (i, &r) in order.iter().enumerate() {
        let id = ids[r as usize] as i32;
        if distinct == 0 || uniq[distinct - 1] != id {
            uniq[distinct] = id;
            start[distinct] = i as i32;
            distinct += 1;
        }
    }
    start[distinct] = rows as i32;
    count[0] = distinct as i32;
    Ok(index)
}

/// [`embed_bwd`] from an index already on the device ([`embed_bwd_index`] of `rows` ids),
/// nothing allocated or copied: the grid is fixed by `rows` and the table (blocks past the
/// index's count of distinct ids return at once), so the launch does not depend on the batch.
pub fn embed_bwd_with(dev: &dyn Device, index: &DBuf, rows: usize, dout: &DBuf, dtable: &DBuf, d: usize) -> Result<()> {
    f32s("embed_bwd", &[dout], rows * d)?;
    need("embed_bwd (index)", index, embed_bwd_index_len(rows), 4)?;
    let table_rows = dtable.bytes / (4 * d.max(1));
    let args = [
        index.arg(),
        dout.arg(),
        dtable.arg(),
        Arg::I32(rows as i32),
        Arg::I32(d as i32),
    ];
    dev.launch("embed_bwd", Launch::linear(rows.min(table_rows), 128), &args)
}
