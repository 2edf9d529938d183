//! The decoder's other device ops: GEMMs for the linear layers, embedding, residual adds,
//! QK-norm fused with RoPE, column sums, and the optimizer over all tensors in one launch
//! (kernels/{gemm,model}.cu).

use super::{elems, f32s, need, AdamStep, THREADS};
pub use crate::backend::cuda::runtime::DType;
pub use crate::backend::cuda::runtime::Strided;
use crate::backend::cuda::runtime::{up_f32, Arg, DBuf, Device, Launch};
use anyhow::{bail, Result};

fn span(what: &str, s: Strided, rows: usize, cols: usize) -> Result<()> {
    if rows > 0 && cols > 0 {
        need(what, s.buf, (rows - 1) * s.rs + (cols - 1) * s.cs + 1, s.dtype.size())?;
    }
    Ok(())
}

/// A matrix of a linear layer: its buffer and element type.
#[derive(Clone, Copy)]
pub struct Operand<'a> {
    pub buf: &'a DBuf,
    pub dtype: DType,
}

impl<'a> From<&'a DBuf> for Operand<'a> {
    fn from(buf: &'a DBuf) -> Self {
        Operand { buf, dtype: DType::F32 }
    }
}

impl<'a> Operand<'a> {
    pub fn bf16(buf: &'a DBuf) -> Self {
        Operand {
            buf,
            dtype: DType::Bf16,
        }
    }
    fn at(self, rs: usize, cs: usize) -> Strided<'a> {
        Strided {
            buf: self.buf,
            dtype: self.dtype,
            rs,
            cs,
        }
    }
}

/// `C[m, n] = alpha·A·B + beta·C` with `A` m×k and `B` k×n strided, `C` row-major (`ldc`).
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    dev: &dyn Device,
    (m, n, k): (usize, usize, usize),
    a: Strided,
    b: Strided,
    c: &DBuf,
    ldc: usize,
    alpha: f32,
    beta: f32,
) -> Result<()> {
    span("gemm A", a, m, k)?;
    span("gemm B", b, k, n)?;
    if a.dtype != b.dtype {
        bail!("gemm: operands of mixed types {:?} and {:?}", a.dtype, b.dtype);
    }
    span("gemm C", Operand::from(c).at(ldc, 1), m, n)?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    if let Some(r) = dev.vendor_gemm((m, n, k), a, b, c, ldc, alpha, beta) {
        return r;
    }
    let l = |x: usize| Arg::I64(x as i64);
    let args = [
        a.buf.arg(),
        b.buf.arg(),
        c.arg(),
        Arg::I32(m as i32),
        Arg::I32(n as i32),
        Arg::I32(k as i32),
        l(a.rs),
        l(a.cs),
        l(b.rs),
        l(b.cs),
        l(ldc),
        Arg::F32(alpha),
        Arg::F32(beta),
    ];
    let cfg = Launch {
        grid: [n.div_ceil(64) as u32, m.div_ceil(64) as u32, 1],
        block: [256, 1, 1],
        smem: 0,
    };
    let kernel = match a.dtype {
        DType::F32 => "gemm_f32",
        DType::Bf16 => "gemm_bf16",
    };
    dev.launch(kernel, cfg, &args)
}

/// `y = x·Wᵀ`, `x` `[rows, din]`, `W` `[dout, din]` (the CPU layout).
pub fn linear_fwd(
    dev: &dyn Device,
    x: Operand,
    w: Operand,
    y: &DBuf,
    rows: usize,
    din: usize,
    dout: usize,
) -> Result<()> {
    gemm(dev, (rows, dout, din), x.at(din, 1), w.at(1, din), y, dout, 1.0, 0.0)
}

/// `dx (+)= dy·W`
#[allow(clippy::too_many_arguments)]
pub fn linear_bwd_dx(
    dev: &dyn Device,
    dy: Operand,
    w: Operand,
    dx: &DBuf,
    rows: usize,
    din: usize,
    dout: usize,
    accumulate: bool,
) -> Result<()> {
    let beta = if accumulate { 1.0 } else { 0.0 };
    gemm(dev, (rows, din, dout), dy.at(dout, 1), w.at(din, 1), dx, din, 1.0, beta)
}

/// `dW += dyᵀ·x`
pub fn linear_bwd_dw(
    dev: &dyn Device,
    x: Operand,
    dy: Operand,
    dw: &DBuf,
    rows: usize,
    din: usize,
    dout: usize,
) -> Result<()> {
    gemm(dev, (dout, din, rows), dy.at(1, dout), x.at(din, 1), dw, din, 1.0, 1.0)
}

/// bf16 copy of `n` f32 values (round to nearest even).
pub fn cast_to_bf16(dev: &dyn Device, x: &DBuf, y: &DBuf, n: usize) -> Result<()> {
    f32s("cast_to_bf16", &[x], n)?;
    need("cast_to_bf16", y, n, 2)?;
    dev.launch("cast_f32_bf16", elems(n), &[x.arg(), y.arg(), Arg::I64(n as i64)])
}

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

/// Every element of `x` (`n` f32) set to `v`.
pub fn fill(dev: &dyn Device, x: &DBuf, v: f32, n: usize) -> Result<()> {
    f32s("fill", &[x], n)?;
    dev.launch("fill_f32", elems(n), &[x.arg(), Arg::F32(v), Arg::I64(n as i64)])
}

/// `out = a + b` (`out` may be `a`)
pub fn add(dev: &dyn Device, a: &DBuf, b: &DBuf, out: &DBuf, n: usize) -> Result<()> {
    f32s("add", &[a, b, out], n)?;
    dev.launch("add_f32", elems(n), &[a.arg(), b.arg(), out.arg(), Arg::I64(n as i64)])
}

/// Rows of one `colsum_partial` block (kernels/model.cu `CHUNK`).
const COLSUM_CHUNK: usize = 256;

/// f32 elements of [`colsum_with`]'s scratch for a `[rows, cols]` input.
pub fn colsum_scratch_len(rows: usize, cols: usize) -> usize {
    rows.div_ceil(COLSUM_CHUNK).max(1) * cols
}

/// `out[c] (+)= Σ_r x[r, c]`, in two deterministic stages (chunks of rows, then the chunks).
pub fn colsum(dev: &dyn Device, x: &DBuf, out: &DBuf, rows: usize, cols: usize, accumulate: bool) -> Result<()> {
    let part = dev.zeros(colsum_scratch_len(rows, cols) * 4)?;
    colsum_with(dev, x, out, rows, cols, accumulate, &part)
}

/// [`colsum`] with its per-chunk partial sums in `part` (overwritten; nothing allocated).
pub fn colsum_with(
    dev: &dyn Device,
    x: &DBuf,
    out: &DBuf,
    rows: usize,
    cols: usize,
    accumulate: bool,
    part: &DBuf,
) -> Result<()> {
    f32s("colsum", &[x], rows * cols)?;
    f32s("colsum", &[out], cols)?;
    f32s("colsum (scratch)", &[part], colsum_scratch_len(rows, cols))?;
    let chunks = rows.div_ceil(COLSUM_CHUNK).max(1);
    if chunks > 65535 {
        bail!("colsum: {rows} rows (at most {} per call)", 65535 * COLSUM_CHUNK);
    }
    let cfg = Launch {
        grid: [cols.div_ceil(128) as u32, chunks as u32, 1],
        block: [128, 1, 1],
        smem: 0,
    };
    let (r, c) = (Arg::I32(rows as i32), Arg::I32(cols as i32));
    dev.launch("colsum_partial", cfg, &[x.arg(), part.arg(), r, c])?;
    let args = [
        part.arg(),
        out.arg(),
        Arg::I32(chunks as i32),
        c,
        Arg::I32(accumulate as i32),
    ];
    dev.launch("colsum_final", Launch::linear(cols.div_ceil(128), 128), &args)
}

/// A RoPE table on the device: `cos`/`sin` `[max_len, half]`.
pub struct DeviceRope {
    pub cos: DBuf,
    pub sin: DBuf,
    pub half: usize,
    pub max_len: usize,
}

impl DeviceRope {
    /// From a host table's `cos`/`sin` (`[max_len, rotary_dim / 2]` each).
    pub fn upload(dev: &dyn Device, cos: &[f32], sin: &[f32], rotary_dim: usize, max_len: usize) -> Result<DeviceRope> {
        let half = rotary_dim / 2;
        if cos.len() != max_len * half || sin.len() != max_len * half {
            bail!(
                "RoPE table of {}/{} values for {max_len} positions × {half}",
                cos.len(),
                sin.len()
            );
        }
        Ok(DeviceRope {
            cos: up_f32(dev, cos)?,
            sin: up_f32(dev, sin)?,
            half,
            max_len,
        })
    }
}

/// Shapes of one QK-norm + RoPE call: `x` is `[rows, heads·head_dim]`, row r at position
/// `r % seq`; `norm` the gain (`None`: no QK-norm) and whether it is zero-centred.
#[derive(Clone, Copy)]
pub struct HeadRows<'a> {
    pub rows: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub seq: usize,
    pub norm: Option<&'a DBuf>,
    pub zero_centered: bool,
}

impl HeadRows<'_> {
    fn check(&self, what: &str, rope: &DeviceRope, bufs: &[&DBuf]) -> Result<()> {
        if self.seq > rope.max_len || 2 * rope.half > self.head_dim {
            bail!(
                "{what}: sequence {} / head_dim {} beyond the RoPE table ({} positions, {} dims)",
                self.seq,
                self.head_dim,
                rope.max_len,
                2 * rope.half
            );
        }
        f32s(what, bufs, self.rows * self.heads * self.head_dim)?;
        if let Some(w) = self.norm {
            f32s(what, &[w], self.head_dim)?;
        }
        Ok(())
    }
    fn launch(&self) -> Launch {
        // one warp per (row, head), 4 warps per block
        Launch::linear((self.rows * self.heads).div_ceil(4), 128)
    }
    fn dims(&self, rope: &DeviceRope) -> [Arg; 6] {
        [
            Arg::I32(self.rows as i32),
            Arg::I32(self.heads as i32),
            Arg::I32(self.head_dim as i32),
            Arg::I32(rope.half as i32),
            Arg::I32(self.seq as i32),
            Arg::I32(0),
        ]
    }
}

/// `y = rope(rmsnorm_head(x))`, `rstd` `[rows, heads]`.
pub fn qknorm_rope_fwd(
    dev: &dyn Device,
    h: &HeadRows,
    rope: &DeviceRope,
    x: &DBuf,
    y: &DBuf,
    rstd: &DBuf,
    eps: f32,
) -> Result<()> {
    h.check("qknorm_rope_fwd", rope, &[x, y])?;
    f32s("qknorm_rope_fwd", &[rstd], h.rows * h.heads)?;
    let mut args = vec![
        x.arg(),
        h.norm.map_or(Arg::Ptr(0), |w| w.arg()),
        rope.cos.arg(),
        rope.sin.arg(),
        y.arg(),
        rstd.arg(),
    ];
    args.extend(h.dims(rope));
    args.extend([
        Arg::F32(eps),
        Arg::I32(h.zero_centered as i32),
        Arg::I32(h.norm.is_some() as i32),
    ]);
    dev.launch("qknorm_rope_fwd", h.launch(), &args)
}

/// Its backward: `dx` overwritten; with a norm, its gain's gradient is added to `dw` (through
/// the `[rows·heads, head_dim]` scratch `dwp`).
#[allow(clippy::too_many_arguments)]
pub fn qknorm_rope_bwd(
    dev: &dyn Device,
    h: &HeadRows,
    rope: &DeviceRope,
    (x, rstd, dy): (&DBuf, &DBuf, &DBuf),
    dx: &DBuf,
    dwp: &DBuf,
    dw: Option<&DBuf>,
) -> Result<()> {
    let part = dev.zeros(colsum_scratch_len(h.rows * h.heads, h.head_dim) * 4)?;
    qknorm_rope_bwd_with(dev, h, rope, (x, rstd, dy), dx, (dwp, &part), dw)
}

/// [`qknorm_rope_bwd`] with the column sum's scratch given too (nothing allocated).
pub fn qknorm_rope_bwd_with(
    dev: &dyn Device,
    h: &HeadRows,
    rope: &DeviceRope,
    (x, rstd, dy): (&DBuf, &DBuf, &DBuf),
    dx: &DBuf,
    (dwp, part): (&DBuf, &DBuf),
    dw: Option<&DBuf>,
) -> Result<()> {
    h.check("qknorm_rope_bwd", rope, &[x, dy, dx, dwp])?;
    let mut args = vec![
        x.arg(),
        h.norm.map_or(Arg::Ptr(0), |w| w.arg()),
        rstd.arg(),
        rope.cos.arg(),
        rope.sin.arg(),
        dy.arg(),
        dx.arg(),
        dwp.arg(),
    ];
    args.extend(h.dims(rope));
    args.extend([Arg::I32(h.zero_centered as i32), Arg::I32(h.norm.is_some() as i32)]);
    dev.launch("qknorm_rope_bwd", h.launch(), &args)?;
    match (h.norm, dw) {
        (Some(_), Some(dw)) => colsum_with(dev, dwp, dw, h.rows * h.heads, h.head_dim, true, part),
        (Some(_), None) => bail!("qknorm_rope_bwd: a normed call needs the gain's gradient buffer"),
        _ => Ok(()),
    }
}

/// The optimizer's view of every tensor: (param, grad, m, v, exempt from weight decay when
/// the run says so), uploaded once.
pub struct TensorTable {
    buf: DBuf,
    count: usize,
    max_len: usize,
    /// `sumsq_multi`'s per-block partial sums, allocated once
    partials: DBuf,
}

/// Longs per tensor in the table (kernels/model.cu `TSTRIDE`).
const TSTRIDE: usize = 6;

impl TensorTable {
    pub fn new(dev: &dyn Device, entries: &[(&DBuf, &DBuf, &DBuf, &DBuf, bool)]) -> Result<TensorTable> {
        let mut t: Vec<u8> = Vec::with_capacity(entries.len() * TSTRIDE * 8);
        let mut max_len = 0;
        for &(p, g, m, v, exempt) in entries {
            let n = p.bytes / 4;
            f32s("tensor table", &[g, m, v], n)?;
            max_len = max_len.max(n);
            for x in [p.ptr, g.ptr, m.ptr, v.ptr, n as u64, exempt as u64] {
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

    /// AdamW on every tensor: `hp.weight_decay`, or `exempt_decay` for the exempt tensors.
    pub fn adamw(&self, dev: &dyn Device, hp: &AdamStep, exempt_decay: f32) -> Result<()> {
        let mut args = vec![self.buf.arg()];
        args.extend(hp.args());
        args.push(Arg::F32(exempt_decay));
        dev.launch("adamw_multi", self.launch(), &args)
    }
}
