//! GEMMs for the linear layers (f32 or bf16 operands, f32 accumulation, f32 output or with
//! bf16 operands a bf16 one; cuBLASLt through [`Device::vendor_gemm`] where the device has it,
//! else gemm.cu) and the f32 → bf16 cast that makes bf16 operands of f32 tensors.

use super::{elems, f32s, need, KernelSource};
pub use crate::backend::cuda::runtime::DType;
pub use crate::backend::cuda::runtime::Strided;
use crate::backend::cuda::runtime::{Arg, DBuf, Device, Launch};
use anyhow::{bail, Result};

pub const SOURCE: KernelSource = KernelSource {
    name: "gemm",
    text: include_str!("gemm.cu"),
    entries: &["gemm_f32", "gemm_bf16", "gemm_bf16_bf16", "cast_f32_bf16"],
};

fn span(what: &str, s: Strided, rows: usize, cols: usize) -> Result<()> {
    if rows > 0 && cols > 0 {
        need(what, s.buf, (rows - 1) * s.rs + (cols - 1) * s.cs + 1, s.dtype.size())?;
    }
    Ok(())
}

/// A matrix of a linear layer (or the output of a kernel that makes one): its buffer and
/// element type.
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
    gemm_to(dev, (m, n, k), a, b, c.into(), ldc, alpha, beta)
}

/// [`gemm`] with `C` in f32 or, from bf16 operands, in bf16: the f32 result (accumulated as
/// for an f32 `C`) rounded to nearest even, as cuBLASLt writes a bf16 output; `beta` scales
/// the bf16 `C` widened. For an output only bf16 consumers read (no cast after it).
#[allow(clippy::too_many_arguments)]
pub fn gemm_to(
    dev: &dyn Device,
    (m, n, k): (usize, usize, usize),
    a: Strided,
    b: Strided,
    c: Operand,
    ldc: usize,
    alpha: f32,
    beta: f32,
) -> Result<()> {
    gemm_from(dev, (m, n, k), a, b, (None, c), ldc, alpha, beta)
}

/// [`gemm_to`] with the `C` that beta scales read from `c_in` (same type and layout as the
/// output) when given, else from the output itself.
#[allow(clippy::too_many_arguments)]
fn gemm_from(
    dev: &dyn Device,
    (m, n, k): (usize, usize, usize),
    a: Strided,
    b: Strided,
    (c_in, c): (Option<&DBuf>, Operand),
    ldc: usize,
    alpha: f32,
    beta: f32,
) -> Result<()> {
    span("gemm A", a, m, k)?;
    span("gemm B", b, k, n)?;
    if a.dtype != b.dtype {
        bail!("gemm: operands of mixed types {:?} and {:?}", a.dtype, b.dtype);
    }
    // cuBLASLt has no f32 × f32 → bf16 GEMM with f32 compute; nothing here needs one
    if c.dtype == DType::Bf16 && a.dtype != DType::Bf16 {
        bail!("gemm: a bf16 output needs bf16 operands, not {:?}", a.dtype);
    }
    let cs = c.at(ldc, 1);
    span("gemm C", cs, m, n)?;
    if let Some(cin) = c_in {
        span("gemm C input", Strided { buf: cin, ..cs }, m, n)?;
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if let Some(r) = dev.vendor_gemm((m, n, k), a, b, cs, c_in, alpha, beta) {
        return r;
    }
    let l = |x: usize| Arg::I64(x as i64);
    let args = [
        a.buf.arg(),
        b.buf.arg(),
        c_in.unwrap_or(c.buf).arg(),
        c.buf.arg(),
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
    let kernel = match (a.dtype, c.dtype) {
        (DType::F32, _) => "gemm_f32",
        (DType::Bf16, DType::F32) => "gemm_bf16",
        (DType::Bf16, DType::Bf16) => "gemm_bf16_bf16",
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
    linear_fwd_to(dev, x, w, y.into(), rows, din, dout)
}

/// [`linear_fwd`] with `y` in f32 or, from bf16 operands, in bf16 ([`gemm_to`]).
pub fn linear_fwd_to(
    dev: &dyn Device,
    x: Operand,
    w: Operand,
    y: Operand,
    rows: usize,
    din: usize,
    dout: usize,
) -> Result<()> {
    gemm_to(dev, (rows, dout, din), x.at(din, 1), w.at(1, din), y, dout, 1.0, 0.0)
}

/// `y = r + x·Wᵀ` (f32 `y` and `r`, which may not overlap): a residual branch's projection with
/// the residual added in the GEMM's epilogue, in the f32 of its accumulator (bit for bit
/// [`linear_fwd`] then the f32 add), so the branch's output is never written and read back.
#[allow(clippy::too_many_arguments)]
pub fn linear_fwd_residual(
    dev: &dyn Device,
    x: Operand,
    w: Operand,
    r: &DBuf,
    y: &DBuf,
    rows: usize,
    din: usize,
    dout: usize,
) -> Result<()> {
    let (ry, yy) = (r.ptr..r.ptr + r.bytes as u64, y.ptr..y.ptr + y.bytes as u64);
    if ry.start < yy.end && yy.start < ry.end {
        bail!("linear_fwd_residual: the residual and the output overlap");
    }
    let (xs, ws) = (x.at(din, 1), w.at(1, din));
    gemm_from(dev, (rows, dout, din), xs, ws, (Some(r), y.into()), dout, 1.0, 1.0)
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
    linear_bwd_dx_to(dev, dy, w, dx.into(), rows, din, dout, accumulate)
}

/// [`linear_bwd_dx`] with `dx` in f32 or, from bf16 operands, in bf16 ([`gemm_to`]).
#[allow(clippy::too_many_arguments)]
pub fn linear_bwd_dx_to(
    dev: &dyn Device,
    dy: Operand,
    w: Operand,
    dx: Operand,
    rows: usize,
    din: usize,
    dout: usize,
    accumulate: bool,
) -> Result<()> {
    let beta = if accumulate { 1.0 } else { 0.0 };
    gemm_to(dev, (rows, din, dout), dy.at(dout, 1), w.at(din, 1), dx, din, 1.0, beta)
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
