//! CPU kernels: strided matrix multiply through the `gemm` crate and rayon helpers.

use crate::real::Real;
use rayon::prelude::*;

/// A read-only strided matrix view: element (r, c) lives at `ptr[r*rs + c*cs]`.
#[derive(Clone, Copy)]
pub struct Mat<T> {
    pub ptr: *const T,
    pub rs: isize,
    pub cs: isize,
}

impl<T> Mat<T> {
    /// Row-major view of `s` starting at `off` with row stride `ld`.
    pub fn rows(s: &[T], off: usize, ld: usize) -> Self {
        debug_assert!(off <= s.len());
        Mat {
            ptr: s[off..].as_ptr(),
            rs: ld as isize,
            cs: 1,
        }
    }
    /// Transposed view of a row-major matrix: (r, c) reads element (c, r).
    pub fn t(s: &[T], off: usize, ld: usize) -> Self {
        debug_assert!(off <= s.len());
        Mat {
            ptr: s[off..].as_ptr(),
            rs: 1,
            cs: ld as isize,
        }
    }
}

/// How a kernel may use threads. Inner kernels already running on a rayon worker use `Serial`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Par {
    Serial,
    Threads,
}

/// `dst[m×n] (row-major, leading dim ldd) = (accumulate ? dst : 0) + alpha · a[m×k] · b[k×n]`.
///
/// # Safety contract (checked by the callers' shapes)
/// The views must stay within their slices; `dst` must not alias `a` or `b`.
#[allow(clippy::too_many_arguments)]
pub fn matmul<T: Real>(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [T],
    dst_off: usize,
    ldd: usize,
    a: Mat<T>,
    b: Mat<T>,
    alpha: T,
    accumulate: bool,
    par: Par,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(dst.len() >= dst_off + (m - 1) * ldd + n, "matmul dst out of range");
    // SAFETY: bounds of dst checked above; a and b are the caller's validated views.
    unsafe { matmul_raw(m, n, k, dst[dst_off..].as_mut_ptr(), ldd, a, b, alpha, accumulate, par) }
}

/// `matmul` on a raw destination, for parallel tasks writing disjoint strided blocks of one buffer.
///
/// # Safety
/// `dst` must be valid for an m×n block with row stride `ldd`, not written by anyone else
/// meanwhile, and must not alias `a` or `b`; `a` and `b` must be valid views.
#[allow(clippy::too_many_arguments)]
pub unsafe fn matmul_raw<T: Real>(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut T,
    ldd: usize,
    a: Mat<T>,
    b: Mat<T>,
    alpha: T,
    accumulate: bool,
    par: Par,
) {
    if m == 0 || n == 0 || k == 0 {
        if k == 0 && !accumulate {
            for r in 0..m {
                for c in 0..n {
                    *dst.add(r * ldd + c) = T::ZERO;
                }
            }
        }
        return;
    }
    let parallelism = match par {
        Par::Threads if rayon::current_num_threads() > 1 && m * n * k > 32 * 32 * 32 => {
            gemm::Parallelism::Rayon(rayon::current_num_threads())
        }
        _ => gemm::Parallelism::None,
    };
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        ldd as isize,
        accumulate,
        a.ptr,
        a.cs,
        a.rs,
        b.ptr,
        b.cs,
        b.rs,
        T::ONE,
        alpha,
        false,
        false,
        false,
        parallelism,
    );
}

/// A raw pointer that may cross threads: used where parallel tasks write provably disjoint,
/// strided regions of one buffer (e.g. per-(batch, kv-head) attention outputs).
#[derive(Clone, Copy)]
pub struct SyncPtr<T>(pub *mut T);
unsafe impl<T> Send for SyncPtr<T> {}
unsafe impl<T> Sync for SyncPtr<T> {}

impl<T> SyncPtr<T> {
    /// The pointer (a method, so closures capture the whole `Sync` wrapper, not the raw field).
    #[inline(always)]
    pub fn get(self) -> *mut T {
        self.0
    }
}

/// Apply `f(row_index, row)` to every `width`-wide row of `buf` in parallel.
pub fn par_rows<T: Send, F>(buf: &mut [T], width: usize, f: F)
where
    F: Fn(usize, &mut [T]) + Sync + Send,
{
    if width == 0 {
        return;
    }
    buf.par_chunks_mut(width).enumerate().for_each(|(i, r)| f(i, r));
}

/// Elementwise `a += b`.
pub fn add_assign<T: Real>(a: &mut [T], b: &[T]) {
    assert_eq!(a.len(), b.len());
    a.par_chunks_mut(4096)
        .zip(b.par_chunks(4096))
        .for_each(|(x, y)| x.iter_mut().zip(y).for_each(|(p, q)| *p += *q));
}

/// Sum of squares in f64 (deterministic: fixed chunking, ordered reduction).
pub fn sum_sq<T: Real>(a: &[T]) -> f64 {
    let parts: Vec<f64> = a
        .par_chunks(1 << 14)
        .map(|c| c.iter().map(|x| x.to_f64() * x.to_f64()).sum::<f64>())
        .collect();
    parts.iter().sum()
}

/// Lanes of the split reductions below: fixed, so results are deterministic, and wide enough for
/// LLVM to keep them in vector registers.
const LANES: usize = 16;

/// Sum with `LANES` independent accumulators (vectorises; a plain fold cannot be reordered).
#[inline]
pub fn sum_lanes<T: Real>(x: &[T]) -> T {
    let mut acc = [T::ZERO; LANES];
    let chunks = x.chunks_exact(LANES);
    let rem = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            acc[i] += c[i];
        }
    }
    rem.iter().fold(acc.iter().fold(T::ZERO, |a, &b| a + b), |a, &b| a + b)
}

/// Dot product with split accumulators.
#[inline]
pub fn dot_lanes<T: Real>(x: &[T], y: &[T]) -> T {
    let mut acc = [T::ZERO; LANES];
    let (cx, cy) = (x.chunks_exact(LANES), y.chunks_exact(LANES));
    let (rx, ry) = (cx.remainder(), cy.remainder());
    for (a, b) in cx.zip(cy) {
        for i in 0..LANES {
            acc[i] += a[i] * b[i];
        }
    }
    rx.iter()
        .zip(ry)
        .fold(acc.iter().fold(T::ZERO, |a, &b| a + b), |a, (&p, &q)| a + p * q)
}

/// Maximum with split accumulators (`-inf` for an empty slice).
#[inline]
pub fn max_lanes<T: Real>(x: &[T]) -> T {
    let mut acc = [T::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let rem = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
        }
    }
    rem.iter()
        .fold(acc.iter().fold(T::NEG_INFINITY, |a, &b| a.max(b)), |a, &b| a.max(b))
}

/// `row ← exp(row − max)` in place; returns (max, Σ exp). The caller normalises.
#[inline]
pub fn exp_shifted<T: Real>(row: &mut [T]) -> (T, T) {
    let m = max_lanes(row);
    for v in row.iter_mut() {
        *v = (*v - m).exp();
    }
    (m, sum_lanes(row))
}

/// Keep freed activation buffers in the heap instead of returning them to the OS after every
/// step: glibc otherwise mmaps each large Vec afresh and the page faults cost more than the
/// elementwise work. Call once at start-up.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        // M_TRIM_THRESHOLD = -1, M_MMAP_THRESHOLD = -3 (glibc malloc.h)
        libc::mallopt(-1, 1 << 30);
        libc::mallopt(-3, 32 << 20);
    }
}
