//! Mean next-token cross-entropy over the positions that have a target, fused with its backward.

use crate::real::Real;
use rayon::prelude::*;

/// Target value marking "no target here" (the last position of a sequence).
pub const IGNORE: u32 = u32::MAX;

/// Returns the mean loss (in f64, summed deterministically). With `grad`, `logits` is overwritten by
/// d(loss)/d(logits) = (softmax − onehot) / count.
pub fn cross_entropy<T: Real>(logits: &mut [T], vocab: usize, targets: &[u32], grad: bool) -> f64 {
    let count = targets.iter().filter(|&&t| t != IGNORE).count();
    if count == 0 {
        return 0.0;
    }
    let inv = T::from_f64(1.0 / count as f64);
    let losses: Vec<f64> = logits
        .par_chunks_mut(vocab)
        .zip(targets.par_iter())
        .map(|(row, &t)| {
            if t == IGNORE {
                if grad {
                    row.fill(T::ZERO);
                }
                return 0.0;
            }
            let m = row.iter().fold(T::NEG_INFINITY, |a, &b| a.max(b));
            let sum: T = row.iter().map(|&v| (v - m).exp()).sum();
            let lse = m + sum.ln();
            let loss = (lse - row[t as usize]).to_f64();
            if grad {
                for v in row.iter_mut() {
                    *v = (*v - lse).exp() * inv;
                }
                row[t as usize] -= inv;
            }
            loss
        })
        .collect();
    losses.iter().sum::<f64>() / count as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::testutil::{check_grad, randn};

    #[test]
    fn loss_value_and_gradient() {
        // uniform logits: loss = ln(V)
        let mut l = vec![0.0f64; 3 * 10];
        let v = cross_entropy(&mut l, 10, &[1, 2, IGNORE], false);
        assert!((v - 10f64.ln()).abs() < 1e-12);
        let x = randn(4 * 6, 1, 2.0);
        let t = [0, 5, IGNORE, 3];
        let mut g = x.clone();
        cross_entropy(&mut g, 6, &t, true);
        check_grad(&x, &g, |xp| cross_entropy(&mut xp.to_vec(), 6, &t, false), 1e-7);
    }
}
