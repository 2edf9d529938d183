//! Mean next-token cross-entropy over the positions that have a target, fused with its backward.

use crate::backend::cpu::{exp_shifted, max_lanes, sum_lanes};
use crate::real::Real;
use rayon::prelude::*;

/// Target value marking "no target here" (the last position of a sequence).
pub const IGNORE: u32 = u32::MAX;

/// Returns the mean loss (in f64, summed deterministically). With `grad`, `logits` is overwritten by
/// d(loss)/d(logits) = (softmax − onehot) / count.
pub fn cross_entropy<T: Real>(logits: &mut [T], vocab: usize, targets: &[u32], grad: bool) -> f64 {
    let count = target_count(targets);
    if count == 0 {
        return 0.0;
    }
    cross_entropy_sum(logits, vocab, targets, grad, count) / count as f64
}

/// Positions that have a target.
pub fn target_count(targets: &[u32]) -> usize {
    targets.iter().filter(|&&t| t != IGNORE).count()
}

/// Summed (not averaged) loss over these rows; with `grad`, rows become the gradient of the mean
/// over `count` positions (so chunks of one batch can be processed separately).
pub fn cross_entropy_sum<T: Real>(logits: &mut [T], vocab: usize, targets: &[u32], grad: bool, count: usize) -> f64 {
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
            let target_logit = row[t as usize];
            if !grad {
                // read-only: exponentiate through a small stack buffer
                let m = max_lanes(row);
                let mut buf = [T::ZERO; 64];
                let mut sum = T::ZERO;
                for c in row.chunks(64) {
                    for (b, &v) in buf.iter_mut().zip(c) {
                        *b = (v - m).exp();
                    }
                    sum += sum_lanes(&buf[..c.len()]);
                }
                return (m + sum.ln() - target_logit).to_f64();
            }
            // one exp per element: softmax in place, then scale
            let (m, sum) = exp_shifted(row);
            let scale = inv / sum;
            row.iter_mut().for_each(|v| *v *= scale);
            row[t as usize] -= inv;
            (m + sum.ln() - target_logit).to_f64()
        })
        .collect();
    losses.iter().sum::<f64>()
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
