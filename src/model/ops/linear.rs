//! Linear layer (no bias): forward `y = x·wᵀ`, backward `dx = dy·w`, `dw += dyᵀ·x`.

use crate::backend::cpu::{matmul, Mat, Par};
use crate::real::Real;
use rayon::prelude::*;

/// `y[n×out] = x[n×in] · wᵀ` for a weight stored row-major as `[out, in]` (nn.Linear convention).
pub fn linear_fwd<T: Real>(x: &[T], w: &[T], n: usize, din: usize, dout: usize, y: &mut [T]) {
    linear_fwd_par(x, w, n, din, dout, y, Par::Threads)
}

/// `linear_fwd` with a choice of threading (`Serial` inside tasks that already run in parallel,
/// such as one MoE expert each).
pub fn linear_fwd_par<T: Real>(x: &[T], w: &[T], n: usize, din: usize, dout: usize, y: &mut [T], par: Par) {
    assert_eq!(x.len(), n * din);
    assert_eq!(w.len(), dout * din);
    assert_eq!(y.len(), n * dout);
    matmul(
        n,
        dout,
        din,
        y,
        0,
        dout,
        Mat::rows(x, 0, din),
        Mat::t(w, 0, din),
        T::ONE,
        false,
        par,
    );
}

/// Backward of `linear_fwd`: `dx (+)= dy · w` and `dw += dyᵀ · x`.
#[allow(clippy::too_many_arguments)]
pub fn linear_bwd<T: Real>(
    x: &[T],
    w: &[T],
    dy: &[T],
    n: usize,
    din: usize,
    dout: usize,
    dx: Option<(&mut [T], bool)>,
    dw: &mut [T],
) {
    linear_bwd_par(x, w, dy, n, din, dout, dx, dw, Par::Threads)
}

/// `linear_bwd` with a choice of threading (see `linear_fwd_par`).
#[allow(clippy::too_many_arguments)]
pub fn linear_bwd_par<T: Real>(
    x: &[T],
    w: &[T],
    dy: &[T],
    n: usize,
    din: usize,
    dout: usize,
    dx: Option<(&mut [T], bool)>,
    dw: &mut [T],
    par: Par,
) {
    assert_eq!(dy.len(), n * dout);
    assert_eq!(dw.len(), dout * din);
    if let Some((dx, acc)) = dx {
        assert_eq!(dx.len(), n * din);
        matmul(
            n,
            din,
            dout,
            dx,
            0,
            din,
            Mat::rows(dy, 0, dout),
            Mat::rows(w, 0, din),
            T::ONE,
            acc,
            par,
        );
    }
    weight_grad(x, dy, n, din, dout, dw, par);
}

/// `dw += dyᵀ · x`. gemm parallelises over the output only, which is small for weight gradients
/// (e.g. 256×256 with k = 2048 tokens ran at half speed), so the token dimension is split into a
/// fixed number of partial products (a function of the shape only: results stay deterministic)
/// that run in parallel and are added in order.
fn weight_grad<T: Real>(x: &[T], dy: &[T], n: usize, din: usize, dout: usize, dw: &mut [T], par: Par) {
    let parts = if matches!(par, Par::Serial) {
        1
    } else if dout * din <= 1 << 20 {
        (n / 512).clamp(1, 4)
    } else {
        1
    };
    if parts == 1 || rayon::current_num_threads() == 1 {
        matmul(
            dout,
            din,
            n,
            dw,
            0,
            din,
            Mat::t(dy, 0, dout),
            Mat::rows(x, 0, din),
            T::ONE,
            true,
            par,
        );
        return;
    }
    let per = n.div_ceil(parts);
    let partials: Vec<Vec<T>> = (0..parts)
        .into_par_iter()
        .map(|p| {
            let (r0, r1) = (p * per, ((p + 1) * per).min(n));
            let mut acc = vec![T::ZERO; dout * din];
            matmul(
                dout,
                din,
                r1 - r0,
                &mut acc,
                0,
                din,
                Mat::t(dy, r0 * dout, dout),
                Mat::rows(x, r0 * din, din),
                T::ONE,
                false,
                Par::Serial,
            );
            acc
        })
        .collect();
    for part in partials {
        crate::backend::cpu::add_assign(dw, &part);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn naive(m: usize, n: usize, k: usize, a: &[f64], b: &[f64]) -> Vec<f64> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
            }
        }
        c
    }

    #[test]
    fn linear_matches_naive_and_backward_is_its_adjoint() {
        let (n, din, dout) = (37, 19, 23);
        let mut rng = Rng::new(3);
        let x: Vec<f64> = (0..n * din).map(|_| rng.normal()).collect();
        let w: Vec<f64> = (0..dout * din).map(|_| rng.normal()).collect();
        let mut y = vec![0.0; n * dout];
        linear_fwd(&x, &w, n, din, dout, &mut y);
        let mut wt = vec![0.0; din * dout];
        for o in 0..dout {
            for i in 0..din {
                wt[i * dout + o] = w[o * din + i];
            }
        }
        let r = naive(n, dout, din, &x, &wt);
        for (a, b) in y.iter().zip(&r) {
            assert!((a - b).abs() < 1e-12);
        }
        // <dy, W x> = <Wᵀ dy, x> and <dy, W x> = <dW, W> with dW = dyᵀ x
        let dy: Vec<f64> = (0..n * dout).map(|_| rng.normal()).collect();
        let mut dx = vec![0.0; n * din];
        let mut dw = vec![0.0; dout * din];
        linear_bwd(&x, &w, &dy, n, din, dout, Some((&mut dx, false)), &mut dw);
        let lhs: f64 = dy.iter().zip(&y).map(|(a, b)| a * b).sum();
        let via_x: f64 = dx.iter().zip(&x).map(|(a, b)| a * b).sum();
        let via_w: f64 = dw.iter().zip(&w).map(|(a, b)| a * b).sum();
        assert!((lhs - via_x).abs() < 1e-9 * lhs.abs().max(1.0));
        assert!((lhs - via_w).abs() < 1e-9 * lhs.abs().max(1.0));
    }
}
