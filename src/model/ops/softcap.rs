//! Soft-capping `y = c·tanh(x/c)` (Gemma 2's attention and final logits), forward and backward.
//! The attention op applies it to its scores itself (`attention::softcap_scores`); this module
//! holds the elementwise op and its derivative.

use crate::real::Real;

/// tanh, evaluated in f64 and rounded (correctly rounded for f32, as PyTorch's f32 tanh is to
/// within an ulp).
#[inline(always)]
pub fn tanh<T: Real>(x: T) -> T {
    T::from_f64(x.to_f64().tanh())
}

/// `x ← c·tanh(x/c)` in place.
pub fn softcap_fwd<T: Real>(x: &mut [T], c: f64) {
    let (ct, inv) = (T::from_f64(c), T::from_f64(1.0 / c));
    x.iter_mut().for_each(|v| *v = tanh(*v * inv) * ct);
}

/// Backward from the *capped* output `y`: `dx = dy·(1 − (y/c)²)`, in place on `dy`.
pub fn softcap_bwd<T: Real>(y: &[T], dy: &mut [T], c: f64) {
    let inv = T::from_f64(1.0 / c);
    dy.iter_mut().zip(y).for_each(|(d, &v)| {
        let th = v * inv;
        *d *= T::ONE - th * th;
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::testutil::{check_grad, randn};

    #[test]
    fn softcap_gradients_match_finite_differences() {
        let n = 50;
        let (x, dy) = (randn(n, 1, 20.0), randn(n, 2, 1.0));
        let c = 7.5;
        let f = |x: &[f64]| {
            let mut y = x.to_vec();
            softcap_fwd(&mut y, c);
            y.iter().zip(&dy).map(|(a, b)| a * b).sum::<f64>()
        };
        let mut y = x.clone();
        softcap_fwd(&mut y, c);
        assert!(y.iter().all(|v| v.abs() < c));
        let mut dx = dy.clone();
        softcap_bwd(&y, &mut dx, c);
        check_grad(&x, &dx, f, 1e-7);
    }
}
