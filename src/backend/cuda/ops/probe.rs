//! Evaluation probes reduced on the device (probe.cu): attention on key 0, small attention
//! outputs, gate-score statistics, the largest activation. Each kernel writes one record of f64
//! partials per block, summed here in block order, so the totals are bit-identical run to run.
//! A forward downloads a few numbers per layer instead of its activations.

use super::{attention::AttnDims, need, sized, Cols, DType, KernelSource, Operand};
use crate::backend::cuda::runtime::{Arg, DBuf, Device, Launch};
use anyhow::{bail, Result};

pub const SOURCE: KernelSource = KernelSource {
    name: "probe",
    text: include_str!("probe.cu"),
    entries: &[
        "probe_key0",
        "probe_key0_bf16",
        "probe_small",
        "probe_small_bf16",
        "probe_gate",
        "probe_gate_bf16",
        "probe_max_abs",
    ],
};

/// Histogram bins of the gate scores over [0, 1] (probe.cu `PROBE_GATE_BINS`).
pub const PROBE_GATE_BINS: usize = 20;

/// Threads per probe block (probe.cu `PROBE_THREADS`).
const THREADS: u32 = 256;

/// Blocks of a grid-stride probe over `n` values: a function of `n` alone, so the records and
/// their sum are the same on every run and GPU.
fn blocks(n: usize) -> usize {
    n.div_ceil(THREADS as usize).clamp(1, 1024)
}

fn name(base: &str, dtype: DType) -> String {
    match dtype {
        DType::F32 => base.to_string(),
        DType::Bf16 => format!("{base}_bf16"),
    }
}

/// A zeroed record buffer for a launch of `cfg`: one record of `width` f64 per block.
fn record_buf(dev: &dyn Device, cfg: &Launch, width: usize) -> Result<DBuf> {
    let blocks = cfg.grid.iter().map(|&g| g as usize).product::<usize>();
    dev.zeros(blocks * width * 8)
}

/// The records a launch wrote, block by block.
fn records(dev: &dyn Device, rec: &DBuf, width: usize) -> Result<Vec<Vec<f64>>> {
    let vals: Vec<f64> = dev
        .download(rec)?
        .chunks_exact(8)
        .map(|c| f64::from_ne_bytes(c.try_into().expect("8 bytes")))
        .collect();
    Ok(vals.chunks_exact(width).map(<[f64]>::to_vec).collect())
}

/// Per query head: Σ over the batch and the queries i ≥ 1 of the attention on key 0,
/// `A[i, 0] = exp(scale·q_i·k_0 − lse_i)`, from the rotated `q` `[rows, heads·hd]` and `k`
/// `[rows, kv_heads·hd]` (one type, f32 or bf16) and the forward's `lse` `[batch, heads, seq]`.
pub fn probe_key0(dev: &dyn Device, d: &AttnDims, q: Operand, k: Operand, lse: &DBuf) -> Result<Vec<f64>> {
    let what = "probe_key0";
    if q.dtype != k.dtype {
        bail!("{what}: q is {:?} and k {:?}", q.dtype, k.dtype);
    }
    if d.kv_heads == 0 || !d.heads.is_multiple_of(d.kv_heads) {
        bail!("{what}: {} query heads over {} kv heads", d.heads, d.kv_heads);
    }
    let rows = d.batch * d.seq;
    sized(what, q, rows * d.heads * d.head_dim)?;
    sized(what, k, rows * d.kv_heads * d.head_dim)?;
    need(what, lse, rows * d.heads, 4)?;
    let cfg = Launch {
        grid: [d.heads as u32, d.batch as u32, 1],
        block: [THREADS, 1, 1],
        smem: 0,
    };
    let rec = record_buf(dev, &cfg, 1)?;
    let args = [
        q.buf.arg(),
        k.buf.arg(),
        lse.arg(),
        rec.arg(),
        Arg::I32(d.seq as i32),
        Arg::I32(d.heads as i32),
        Arg::I32(d.kv_heads as i32),
        Arg::I32(d.head_dim as i32),
        Arg::F32(1.0 / (d.head_dim as f32).sqrt()),
    ];
    // record b·heads + h: summed over the batch in order
    dev.launch(&name(what, q.dtype), cfg, &args)?;
    let rec = records(dev, &rec, 1)?;
    Ok((0..d.heads)
        .map(|h| (0..d.batch).map(|b| rec[b * d.heads + h][0]).sum())
        .collect())
}

/// How many of the `n` values of `y` have |y| < 1e-2 and < 1e-3.
pub fn probe_small(dev: &dyn Device, y: Operand, n: usize) -> Result<[u64; 2]> {
    sized("probe_small", y, n)?;
    let cfg = Launch::linear(blocks(n), THREADS);
    let rec = record_buf(dev, &cfg, 2)?;
    dev.launch(
        &name("probe_small", y.dtype),
        cfg,
        &[y.buf.arg(), rec.arg(), Arg::I64(n as i64)],
    )?;
    let rec = records(dev, &rec, 2)?;
    let count = |j: usize| rec.iter().map(|r| r[j]).sum::<f64>() as u64;
    Ok([count(0), count(1)])
}

/// The gate scores `sigmoid(z)` of `z` `[rows, width]` (densely or at a row stride): their sum,
/// their histogram over [`PROBE_GATE_BINS`] bins of [0, 1], how many are < 0.1 and > 0.9.
pub fn probe_gate(dev: &dyn Device, z: Cols, rows: usize, width: usize) -> Result<GateSums> {
    let ld = z.ld("probe_gate", rows, width)?;
    let n = rows * width;
    let (cfg, width_rec) = (Launch::linear(blocks(n), THREADS), PROBE_GATE_BINS + 3);
    let rec = record_buf(dev, &cfg, width_rec)?;
    let args = [
        z.out.buf.arg(),
        rec.arg(),
        Arg::I64(rows as i64),
        Arg::I32(width as i32),
        Arg::I64(ld as i64),
    ];
    dev.launch(&name("probe_gate", z.out.dtype), cfg, &args)?;
    let rec = records(dev, &rec, width_rec)?;
    let col = |j: usize| rec.iter().map(|r| r[j]).sum::<f64>();
    Ok(GateSums {
        sum: col(0),
        hist: (0..PROBE_GATE_BINS).map(|i| col(1 + i) as u64).collect(),
        low: col(PROBE_GATE_BINS + 1) as u64,
        high: col(PROBE_GATE_BINS + 2) as u64,
        count: n as u64,
    })
}

/// What [`probe_gate`] found.
#[derive(Clone, Debug, PartialEq)]
pub struct GateSums {
    pub sum: f64,
    pub hist: Vec<u64>,
    pub low: u64,
    pub high: u64,
    pub count: u64,
}

/// max |x| over the `n` f32 values of `x` (NaN if one is NaN).
pub fn probe_max_abs(dev: &dyn Device, x: &DBuf, n: usize) -> Result<f64> {
    need("probe_max_abs", x, n, 4)?;
    let cfg = Launch::linear(blocks(n), THREADS);
    let rec = record_buf(dev, &cfg, 1)?;
    dev.launch("probe_max_abs", cfg, &[x.arg(), rec.arg(), Arg::I64(n as i64)])?;
    let rec = records(dev, &rec, 1)?;
    Ok(rec
        .iter()
        .map(|r| r[0])
        .fold(0.0, |m: f64, v| if v > m || v.is_nan() { v } else { m }))
}
