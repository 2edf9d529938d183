//! MoE router: softmax over expert logits → top-k (optionally renormalised) → optional capacity
//! limit, plus the auxiliary losses: load balancing `E·Σ_e f_e·P_e` (f_e: share of routed
//! assignments, P_e: mean router probability; 1 when balanced) and the z-loss
//! `mean_t logsumexp(logits_t)²`. Forward and backward.

use crate::backend::cpu::exp_shifted;
use crate::real::Real;
use rayon::prelude::*;

/// Router settings for one call.
#[derive(Clone, Copy, Debug)]
pub struct RouteSpec {
    pub experts: usize,
    pub top_k: usize,
    pub norm_topk: bool,
    pub capacity_factor: Option<f64>,
}

/// One layer's routing decisions, saved for backward.
pub struct Routing<T> {
    /// Softmax of the logits, `[N, E]`.
    pub probs: Vec<T>,
    /// logsumexp of each token's logits, `[N]`.
    pub lse: Vec<T>,
    /// Chosen experts by descending probability, `[N, k]`.
    pub experts: Vec<u32>,
    /// Combine weights, `[N, k]`; 0 where the assignment was dropped.
    pub weights: Vec<T>,
    /// Whether each assignment fit in its expert's capacity, `[N, k]`.
    pub kept: Vec<bool>,
    /// Sum of the selected probabilities (the renormaliser), `[N]`.
    pub sel_sum: Vec<T>,
    pub stats: RouterStats,
}

/// What a layer's router did, for metrics and analysis.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RouterStats {
    pub tokens: usize,
    /// Routed assignments per expert before any capacity drop (f_e = load_e / (tokens·k)).
    pub load: Vec<usize>,
    /// Assignments dropped by the capacity limit.
    pub dropped: usize,
    pub lb_loss: f64,
    pub z_loss: f64,
}

impl RouterStats {
    /// Busiest expert's load over the mean load (1 = perfectly balanced).
    pub fn imbalance(&self) -> f64 {
        let total: usize = self.load.iter().sum();
        if total == 0 {
            return f64::NAN;
        }
        let max = *self.load.iter().max().unwrap_or(&0) as f64;
        max * self.load.len() as f64 / total as f64
    }
    /// Share of assignments dropped by the capacity limit.
    pub fn dropped_fraction(&self) -> f64 {
        let total: usize = self.load.iter().sum();
        if total == 0 {
            0.0
        } else {
            self.dropped as f64 / total as f64
        }
    }
}

/// Route `n` tokens given their logits `[n, E]`.
pub fn route<T: Real>(logits: &[T], n: usize, spec: RouteSpec) -> Routing<T> {
    let (e, k) = (spec.experts, spec.top_k);
    assert_eq!(logits.len(), n * e);
    let mut probs = logits.to_vec();
    let mut lse = vec![T::ZERO; n];
    let mut experts = vec![0u32; n * k];
    let mut weights = vec![T::ZERO; n * k];
    let mut sel_sum = vec![T::ZERO; n];
    probs
        .par_chunks_mut(e)
        .zip(lse.par_iter_mut())
        .zip(experts.par_chunks_mut(k).zip(weights.par_chunks_mut(k)))
        .zip(sel_sum.par_iter_mut())
        .for_each(|(((p, l), (ex, w)), ss)| {
            let (max, sum) = exp_shifted(p);
            let inv = T::ONE / sum;
            p.iter_mut().for_each(|x| *x *= inv);
            *l = max + sum.ln();
            // top-k by repeated argmax (k is small, so the chosen ones are looked up in `ex`
            // rather than marked in a per-token buffer); ties go to the lower index
            for s in 0..k {
                let mut best = usize::MAX;
                for j in 0..e {
                    if !ex[..s].contains(&(j as u32)) && (best == usize::MAX || p[j] > p[best]) {
                        best = j;
                    }
                }
                ex[s] = best as u32;
                w[s] = p[best];
            }
            *ss = w.iter().fold(T::ZERO, |a, &b| a + b);
            if spec.norm_topk {
                let inv = T::ONE / *ss;
                w.iter_mut().for_each(|x| *x *= inv);
            }
        });
    let mut load = vec![0usize; e];
    for &x in &experts {
        load[x as usize] += 1;
    }
    // capacity: assignments are admitted slot by slot (every token's first choice before any
    // second choice), tokens in order, so the result depends only on the routing
    let mut kept = vec![true; n * k];
    let mut dropped = 0;
    if let Some(cf) = spec.capacity_factor {
        let cap = (cf * (n * k) as f64 / e as f64).ceil() as usize;
        let mut used = vec![0usize; e];
        for s in 0..k {
            for t in 0..n {
                let x = experts[t * k + s] as usize;
                if used[x] < cap {
                    used[x] += 1;
                } else {
                    kept[t * k + s] = false;
                    weights[t * k + s] = T::ZERO;
                    dropped += 1;
                }
            }
        }
    }
    let mut mean_p = vec![0.0f64; e];
    for row in probs.chunks(e) {
        mean_p.iter_mut().zip(row).for_each(|(m, &x)| *m += x.to_f64());
    }
    let lb_loss = e as f64
        * mean_p
            .iter()
            .zip(&load)
            .map(|(&p, &c)| (p / n as f64) * (c as f64 / (n * k) as f64))
            .sum::<f64>();
    let z_loss = lse.iter().map(|l| l.to_f64().powi(2)).sum::<f64>() / n as f64;
    Routing {
        probs,
        lse,
        experts,
        weights,
        kept,
        sel_sum,
        stats: RouterStats {
            tokens: n,
            load,
            dropped,
            lb_loss,
            z_loss,
        },
    }
}

/// Backward: d(objective)/d(logits) `[n, E]` from the combine-weight gradients `dweights [n, k]`
/// and the auxiliary losses' coefficients (each loss enters the objective as `coef · loss`).
pub fn route_bwd<T: Real>(r: &Routing<T>, spec: RouteSpec, dweights: &[T], lb_coef: f64, z_coef: f64) -> Vec<T> {
    let (e, k) = (spec.experts, spec.top_k);
    let n = r.lse.len();
    let mut dlogits = vec![T::ZERO; n * e];
    // d(lb)/d(p[t, j]) = E · f_j / n, the same for every token
    let dlb: Vec<T> = r
        .stats
        .load
        .iter()
        .map(|&c| T::from_f64(lb_coef * e as f64 * (c as f64 / (n * k) as f64) / n as f64))
        .collect();
    let dz_scale = T::from_f64(2.0 * z_coef / n as f64);
    dlogits.par_chunks_mut(e).enumerate().for_each(|(t, dl)| {
        let p = &r.probs[t * e..(t + 1) * e];
        let (ex, dw) = (&r.experts[t * k..(t + 1) * k], &dweights[t * k..(t + 1) * k]);
        // dp: the load-balancing term plus the routed weights'
        dl.copy_from_slice(&dlb);
        if spec.norm_topk {
            // w_s = p_s / S over the selected set: dp_i = (dw_i − Σ_s dw_s·w_s) / S; dropped
            // assignments keep their place in S and have dw = 0
            let s = r.sel_sum[t];
            let w_full = |s_i: usize| r.probs[t * e + ex[s_i] as usize] / s;
            let dot = (0..k).fold(T::ZERO, |a, i| a + dw[i] * w_full(i));
            for i in 0..k {
                dl[ex[i] as usize] += (dw[i] - dot) / s;
            }
        } else {
            for i in 0..k {
                dl[ex[i] as usize] += dw[i];
            }
        }
        // softmax backward, then the z-loss's 2·lse·p/n
        let dot = p.iter().zip(dl.iter()).fold(T::ZERO, |a, (&pi, &di)| a + pi * di);
        let zl = dz_scale * r.lse[t];
        for j in 0..e {
            dl[j] = p[j] * (dl[j] - dot) + zl * p[j];
        }
    });
    dlogits
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::testutil::{check_grad, randn};

    fn spec(norm: bool, cap: Option<f64>) -> RouteSpec {
        RouteSpec {
            experts: 6,
            top_k: 2,
            norm_topk: norm,
            capacity_factor: cap,
        }
    }

    /// Objective: Σ weights·c + lb_coef·lb + z_coef·z with the routing held fixed (as in the
    /// model: top-k selection and f_e are piecewise constant).
    fn objective(logits: &[f64], n: usize, sp: RouteSpec, c: &[f64]) -> f64 {
        let r = route(logits, n, sp);
        let wsum: f64 = r.weights.iter().zip(c).map(|(a, b)| a * b).sum();
        wsum + 0.3 * r.stats.lb_loss + 0.7 * r.stats.z_loss
    }

    #[test]
    fn router_gradients_match_finite_differences() {
        let n = 9;
        for (norm, cap) in [(true, None), (false, None), (true, Some(0.6)), (false, Some(0.6))] {
            let sp = spec(norm, cap);
            let logits = randn(n * 6, 5, 1.5);
            let c = randn(n * 2, 6, 1.0);
            let r = route(&logits, n, sp);
            if cap.is_some() {
                assert!(r.stats.dropped > 0, "capacity 0.6 must drop some assignments");
            }
            // dropped assignments contribute nothing, so their weight gradient is 0
            let dw: Vec<f64> = c.iter().zip(&r.kept).map(|(&x, &k)| if k { x } else { 0.0 }).collect();
            let g = route_bwd(&r, sp, &dw, 0.3, 0.7);
            check_grad(&logits, &g, |x| objective(x, n, sp, &c), 1e-6);
        }
    }

    #[test]
    fn top_k_picks_the_largest_and_capacity_drops_in_slot_order() {
        // token 0 prefers experts 2 then 0, token 1 prefers 2 then 1, token 2 prefers 2 then 3
        let logits = [1.0, 0.0, 3.0, -1.0, 0.0, 1.0, 3.0, -1.0, 0.0, -1.0, 3.0, 1.0f64];
        let sp = RouteSpec {
            experts: 4,
            top_k: 2,
            norm_topk: true,
            capacity_factor: Some(1.0), // cap = ceil(3·2/4) = 2
        };
        let r = route(&logits, 3, sp);
        assert_eq!(r.experts, [2, 0, 2, 1, 2, 3]);
        // expert 2 takes tokens 0 and 1's first choices; token 2's first choice is dropped
        assert_eq!(r.kept, [true, true, true, true, false, true]);
        assert_eq!(r.stats.dropped, 1);
        assert_eq!(r.stats.load, [1, 1, 3, 1]);
        let w0 = r.weights[0] + r.weights[1];
        assert!((w0 - 1.0).abs() < 1e-12, "renormalised top-k weights sum to 1");
        assert_eq!(r.weights[4], 0.0);
        assert!((r.stats.imbalance() - 2.0).abs() < 1e-12);
        // a uniform router is perfectly balanced: lb = 1
        let r = route(
            &[0.0f64; 8],
            2,
            RouteSpec {
                capacity_factor: None,
                ..sp
            },
        );
        assert!((r.stats.lb_loss - 1.0).abs() < 1e-12);
        assert!((r.stats.z_loss - 4f64.ln().powi(2)).abs() < 1e-12);
    }
}
