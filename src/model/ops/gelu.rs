//! GeGLU with the tanh GELU (transformers' `gelu_pytorch_tanh`, Gemma 2 / 3):
//! `m = gelu(g) ⊙ u`, `gelu(x) = ½x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`, forward and backward on
//! the fused `[gate | up]` rows the MLP computes with one GEMM.

use super::softcap::tanh;
use crate::real::Real;
use rayon::prelude::*;

const K0: f64 = 0.797_884_560_802_865_4; // √(2/π)
const K1: f64 = 0.044715;

/// `(gelu(x), gelu'(x))`.
#[inline(always)]
fn gelu_and_grad<T: Real>(x: T) -> (T, T) {
    let (k0, k1, half) = (T::from_f64(K0), T::from_f64(K1), T::from_f64(0.5));
    let x2 = x * x;
    let inner = k0 * (x + k1 * x2 * x);
    let th = tanh(inner);
    let y = half * x * (T::ONE + th);
    let dinner = k0 * (T::ONE + T::from_f64(3.0 * K1) * x2);
    let dy = half * (T::ONE + th) + half * x * (T::ONE - th * th) * dinner;
    (y, dy)
}

#[inline(always)]
pub fn gelu_tanh<T: Real>(x: T) -> T {
    let (k0, k1, half) = (T::from_f64(K0), T::from_f64(K1), T::from_f64(0.5));
    half * x * (T::ONE + tanh(k0 * (x + k1 * x * x * x)))
}

/// `m[r] = gelu(g) ⊙ u` with `gu` `[rows, 2f]` (gate in the first `f` columns of each row).
pub fn geglu_fwd_fused<T: Real>(gu: &[T], f: usize, m: &mut [T]) {
    m.par_chunks_mut(f).zip(gu.par_chunks(2 * f)).for_each(|(mr, r)| {
        let (g, u) = r.split_at(f);
        for ((mv, &gv), &uv) in mr.iter_mut().zip(g).zip(u) {
            *mv = gelu_tanh(gv) * uv;
        }
    });
}

/// Backward of `geglu_fwd_fused`: `dgu` `[rows, 2f]` from `gu` and `dm` `[rows, f]`.
pub fn geglu_bwd_fused<T: Real>(gu: &[T], f: usize, dm: &[T], dgu: &mut [T]) {
    dgu.par_chunks_mut(2 * f)
        .zip(gu.par_chunks(2 * f).zip(dm.par_chunks(f)))
        .for_each(|(dr, (r, dmr))| {
            let (g, u) = r.split_at(f);
            let (dg, du) = dr.split_at_mut(f);
            for i in 0..f {
                let (y, dy) = gelu_and_grad(g[i]);
                du[i] = dmr[i] * y;
                dg[i] = dmr[i] * u[i] * dy;
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::testutil::{check_grad, randn};

    #[test]
    fn geglu_gradients_match_finite_differences() {
        let (rows, f) = (6, 7);
        let (gu, dm) = (randn(rows * 2 * f, 1, 2.0), randn(rows * f, 2, 1.0));
        let fun = |gu: &[f64]| {
            let mut m = vec![0.0; rows * f];
            geglu_fwd_fused(gu, f, &mut m);
            m.iter().zip(&dm).map(|(a, b)| a * b).sum::<f64>()
        };
        let mut dgu = vec![0.0; rows * 2 * f];
        geglu_bwd_fused(&gu, f, &dm, &mut dgu);
        check_grad(&gu, &dgu, fun, 1e-7);
    }

    #[test]
    fn gelu_tanh_known_values() {
        // torch.nn.functional.gelu(x, approximate="tanh") in float64
        for (x, y) in [
            (1.0, 0.8411919906082768),
            (-2.0, -0.04540230591222),
            (0.5, 0.34571400982514394),
        ] {
            assert!((gelu_tanh::<f64>(x) - y).abs() < 1e-12, "{x}: {}", gelu_tanh::<f64>(x));
        }
    }
}
