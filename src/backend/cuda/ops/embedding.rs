//! Token embedding: the table's rows gathered, and the backward summed per id in row order
//! (embedding.cu).

use super::{elems, f32s, need, KernelSource};
use crate::backend::cuda::runtime::{Arg, DBuf, Device, Launch};
use anyhow::Result;

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
    dev.launch("embed_fwd", elems(rows * d), &args)
}

/// `dtable[ids[r]] += dout[r]`, summed per id in row order (deterministic): the rows are
/// grouped by id here on the host, one block per distinct id on the device.
pub fn embed_bwd(dev: &dyn Device, ids: &[u32], dout: &DBuf, dtable: &DBuf, d: usize) -> Result<()> {
    let mut idx = dev.zeros(embed_bwd_index_len(ids.len()) * 4)?;
    embed_bwd_with(dev, ids, dout, dtable, d, &mut idx)
}

/// i32 elements of [`embed_bwd_with`]'s index buffer for `rows` ids.
pub fn embed_bwd_index_len(rows: usize) -> usize {
    3 * rows + 1
}

/// [`embed_bwd`] with its index buffer (distinct ids, their first rows, the rows by id) given:
/// written by one host-to-device copy, nothing allocated.
pub fn embed_bwd_with(
    dev: &dyn Device,
    ids: &[u32],
    dout: &DBuf,
    dtable: &DBuf,
    d: usize,
    idx: &mut DBuf,
) -> Result<()> {
    let rows = ids.len();
    f32s("embed_bwd", &[dout], rows * d)?;
    need("embed_bwd (index)", idx, embed_bwd_index_len(rows), 4)?;
    let mut order: Vec<i32> = (0..rows as i32).collect();
    order.sort_by_key(|&r| ids[r as usize]); // stable: rows of one id stay in order
    let (mut uniq, mut start) = (Vec::new(), Vec::new());
    for (i, &r) in order.iter().enumerate() {
        let id = ids[r as usize] as i32;
        if uniq.last() != Some(&id) {
            uniq.push(id);
            start.push(i as i32);
        }
    }
    start.push(rows as i32);
    if let Some(&max) = uniq.last() {
        f32s("embed_bwd (table)", &[dtable], (max as usize + 1) * d)?;
    }
    // one copy: order (rows), then start (distinct ids + 1), then uniq (distinct ids)
    let bytes: Vec<u8> = order
        .iter()
        .chain(&start)
        .chain(&uniq)
        .flat_map(|v| v.to_ne_bytes())
        .collect();
    dev.write(idx, &bytes)?;
    let at = |i: usize| Arg::Ptr(idx.ptr + 4 * i as u64);
    let args = [
        at(rows + start.len()),
        at(rows),
        at(0),
        dout.arg(),
        dtable.arg(),
        Arg::I32(d as i32),
    ];
    dev.launch("embed_bwd", Launch::linear(uniq.len(), 128), &args)
}
