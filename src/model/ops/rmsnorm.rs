//! RMSNorm over the last dim: `y = x̂·w` (standard) or `x̂·(1+w)` (zero-centred),
//! `x̂ = x / sqrt(mean(x²) + eps)`. Used for the block norms and (per head) for QK-norm.

use crate::backend::cpu::dot_lanes;
use crate::config::NormStyle;
use crate::real::Real;
use rayon::prelude::*;

#[inline(always)]
fn gain<T: Real>(w: T, style: NormStyle) -> T {
    match style {
        NormStyle::Standard => w,
        NormStyle::ZeroCentered => T::ONE + w,
    }
}

/// Normalise each `w.len()`-wide row of `x` into `y`; saves `rstd` per row for backward.
pub fn rmsnorm_fwd<T: Real>(x: &[T], w: &[T], style: NormStyle, eps: f64, y: &mut [T], rstd: &mut [T]) {
    let d = w.len();
    assert_eq!(x.len(), y.len());
    assert_eq!(x.len(), rstd.len() * d);
    let eps = T::from_f64(eps);
    let inv_d = T::ONE / T::from_usize(d);
    y.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .zip(rstd.par_iter_mut())
        .for_each(|((yr, xr), r)| {
            let ms = dot_lanes(xr, xr) * inv_d;
            let s = T::ONE / (ms + eps).sqrt();
            *r = s;
            match style {
                NormStyle::Standard => yr.iter_mut().zip(xr).zip(w).for_each(|((y, &x), &w)| *y = x * s * w),
                NormStyle::ZeroCentered => yr
                    .iter_mut()
                    .zip(xr)
                    .zip(w)
                    .for_each(|((y, &x), &w)| *y = x * s * (T::ONE + w)),
            }
        });
}

/// Rows per partial weight-gradient sum: fixed, so results do not depend on the thread count.
const DW_CHUNK: usize = 64;

/// Backward: `dx (+)= r·(g·dy − x̂·mean(g·dy·x̂))`, `dw += Σ_rows dy·x̂`.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_bwd<T: Real>(
    x: &[T],
    w: &[T],
    style: NormStyle,
    rstd: &[T],
    dy: &[T],
    dx: &mut [T],
    accumulate: bool,
    dw: &mut [T],
) {
    let d = w.len();
    assert_eq!(x.len(), dy.len());
    assert_eq!(x.len(), dx.len());
    let inv_d = T::ONE / T::from_usize(d);
    let gw: Vec<T> = w.iter().map(|&v| gain(v, style)).collect();
    let partials: Vec<Vec<T>> = dx
        .par_chunks_mut(d * DW_CHUNK)
        .zip(x.par_chunks(d * DW_CHUNK))
        .zip(dy.par_chunks(d * DW_CHUNK))
        .zip(rstd.par_chunks(DW_CHUNK))
        .map(|(((dxc, xc), dyc), rc)| {
            let mut pdw = vec![T::ZERO; d];
            let mut gdy = vec![T::ZERO; d];
            for (((dxr, xr), dyr), &r) in dxc.chunks_mut(d).zip(xc.chunks(d)).zip(dyc.chunks(d)).zip(rc) {
                gdy.iter_mut().zip(dyr).zip(&gw).for_each(|((o, &dv), &g)| *o = dv * g);
                let mean = dot_lanes(&gdy, xr) * r * inv_d;
                let rr_mean = r * r * mean;
                if accumulate {
                    dxr.iter_mut()
                        .zip(&gdy)
                        .zip(xr)
                        .for_each(|((o, &g), &xv)| *o += r * g - xv * rr_mean);
                } else {
                    dxr.iter_mut()
                        .zip(&gdy)
                        .zip(xr)
                        .for_each(|((o, &g), &xv)| *o = r * g - xv * rr_mean);
                }
                pdw.iter_mut()
                    .zip(dyr)
                    .zip(xr)
                    .for_each(|((o, &dv), &xv)| *o += dv * xv * r);
            }
            pdw
        })
        .collect();
    for p in partials {
        for (a, b) in dw.iter_mut().zip(p) {
            *a += b;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::testutil::{check_grad, randn};

    #[test]
    fn rmsnorm_gradients_match_finite_differences() {
        for style in [NormStyle::Standard, NormStyle::ZeroCentered] {
            let (n, d) = (5, 7);
            let x = randn(n * d, 1, 1.0);
            let w = randn(d, 2, 0.5);
            let dy = randn(n * d, 3, 1.0);
            let f = |x: &[f64], w: &[f64]| {
                let mut y = vec![0.0; n * d];
                let mut r = vec![0.0; n];
                rmsnorm_fwd(x, w, style, 1e-6, &mut y, &mut r);
                y.iter().zip(&dy).map(|(a, b)| a * b).sum::<f64>()
            };
            let mut y = vec![0.0; n * d];
            let mut r = vec![0.0; n];
            rmsnorm_fwd(&x, &w, style, 1e-6, &mut y, &mut r);
            let mut dx = vec![0.0; n * d];
            let mut dw = vec![0.0; d];
            rmsnorm_bwd(&x, &w, style, &r, &dy, &mut dx, false, &mut dw);
            check_grad(&x, &dx, |xp| f(xp, &w), 1e-7);
            check_grad(&w, &dw, |wp| f(&x, wp), 1e-7);
        }
    }
}
