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

/// `swiglu_fwd` on the fused projection `gu` `[rows, 2f]` (gate in the first `f` columns of each
/// row, up in the last): `m` `[rows, f]`.
pub fn swiglu_fwd_fused<T: Real>(gu: &[T], f: usize, m: &mut [T]) {
    m.par_chunks_mut(f).zip(gu.par_chunks(2 * f)).for_each(|(mr, r)| {
        let (g, u) = r.split_at(f);
        for ((mv, &gv), &uv) in mr.iter_mut().zip(g).zip(u) {
            *mv = gv * sigmoid(gv) * uv;
        }
    });
}

/// `swiglu_bwd` on the fused layout: `dgu` `[rows, 2f]` from `gu` and `dm` `[rows, f]`.
pub fn swiglu_bwd_fused<T: Real>(gu: &[T], f: usize, dm: &[T], dgu: &mut [T]) {
    dgu.par_chunks_mut(2 * f)
        .zip(gu.par_chunks(2 * f).zip(dm.par_chunks(f)))
        .for_each(|(dr, (r, dmr))| {
            let (g, u) = r.split_at(f);
            let (dg, du) = dr.split_at_mut(f);
            for i in 0..f {
                let s = sigmoid(g[i]);
                du[i] = dmr[i] * g[i] * s;
                dg[i] = dmr[i] * u[i] * s * (T::ONE + g[i] * (T::ONE - s));
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

    #[test]
    fn fused_layout_equals_separate_gate_and_up() {
        let (rows, f) = (5, 7);
        let (g, u, dm) = (
            randn(rows * f, 4, 2.0),
            randn(rows * f, 5, 1.0),
            randn(rows * f, 6, 1.0),
        );
        let gu: Vec<f64> = (0..rows)
            .flat_map(|r| {
                g[r * f..(r + 1) * f]
                    .iter()
                    .chain(&u[r * f..(r + 1) * f])
                    .copied()
                    .collect::<Vec<_>>()
            })
            .collect();
        let (mut m, mut mf) = (vec![0.0; rows * f], vec![0.0; rows * f]);
        swiglu_fwd(&g, &u, &mut m);
        swiglu_fwd_fused(&gu, f, &mut mf);
        assert_eq!(m, mf);
        let (mut dg, mut du, mut dgu) = (vec![0.0; rows * f], vec![0.0; rows * f], vec![0.0; rows * 2 * f]);
        swiglu_bwd(&g, &u, &dm, &mut dg, &mut du);
        swiglu_bwd_fused(&gu, f, &dm, &mut dgu);
        for r in 0..rows {
            assert_eq!(&dgu[r * 2 * f..r * 2 * f + f], &dg[r * f..(r + 1) * f]);
            assert_eq!(&dgu[r * 2 * f + f..(r + 1) * 2 * f], &du[r * f..(r + 1) * f]);
        }
    }
}
