//! SwiGLU activation: `m = silu(g) ⊙ u`.

use crate::real::Real;
use rayon::prelude::*;

#[inline(always)]
pub fn sigmoid<T: Real>(x: T) -> T {
    T::ONE / (T::ONE + (-x).exp())
}

pub fn swiglu_fwd<T: Real>(g: &[T], u: &[T], m: &mut [T]) {
    m.par_chunks_mut(4096)
        .zip(g.par_chunks(4096).zip(u.par_chunks(4096)))
        .for_each(|(mc, (gc, uc))| {
            for ((mv, &gv), &uv) in mc.iter_mut().zip(gc).zip(uc) {
                *mv = gv * sigmoid(gv) * uv;
            }
        });
}

/// `dg = dm·u·silu'(g)`, `du = dm·silu(g)`; `silu'(g) = s·(1 + g·(1 − s))`.
pub fn swiglu_bwd<T: Real>(g: &[T], u: &[T], dm: &[T], dg: &mut [T], du: &mut [T]) {
    dg.par_chunks_mut(4096)
        .zip(du.par_chunks_mut(4096))
        .zip(g.par_chunks(4096).zip(u.par_chunks(4096)).zip(dm.par_chunks(4096)))
        .for_each(|((dgc, duc), ((gc, uc), dmc))| {
            for i in 0..dgc.len() {
                let (gv, uv, d) = (gc[i], uc[i], dmc[i]);
                let s = sigmoid(gv);
                duc[i] = d * gv * s;
                dgc[i] = d * uv * s * (T::ONE + gv * (T::ONE - s));
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::testutil::{check_grad, randn};

    #[test]
    fn swiglu_gradients_match_finite_differences() {
        let n = 40;
        let (g, u, dm) = (randn(n, 1, 2.0), randn(n, 2, 1.0), randn(n, 3, 1.0));
        let f = |g: &[f64], u: &[f64]| {
            let mut m = vec![0.0; n];
            swiglu_fwd(g, u, &mut m);
            m.iter().zip(&dm).map(|(a, b)| a * b).sum::<f64>()
        };
        let (mut dg, mut du) = (vec![0.0; n], vec![0.0; n]);
        swiglu_bwd(&g, &u, &dm, &mut dg, &mut du);
        check_grad(&g, &dg, |x| f(x, &u), 1e-7);
        check_grad(&u, &du, |x| f(&g, x), 1e-7);
    }
}
