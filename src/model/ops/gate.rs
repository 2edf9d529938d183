//! The attention gate as an op: `Y ← Y ⊙ act(Z)` (multiplicative) or `Y + act(Z)` (additive), where
//! `Y` holds `groups` heads of `width` elements per token and `Z` holds `heads × per_head` logits per
//! token, broadcast over heads (head-shared) and over the head's elements (headwise).
//! The attention block decides *where* it is applied (G1–G5); this file only does the math.

use super::swiglu::sigmoid;
use crate::config::{GateActivation, GateCombine, GateConfig, GateGeometry};
use crate::real::Real;
use rayon::prelude::*;

/// `act(z)` and `act'(z)`.
#[inline(always)]
pub fn activation<T: Real>(act: GateActivation, z: T) -> (T, T) {
    let s = sigmoid(z);
    let ds = s * (T::ONE - s);
    match act {
        GateActivation::Sigmoid => (s, ds),
        GateActivation::Silu => (z * s, s + z * ds),
        GateActivation::NsSigmoid => {
            let half = T::from_f64(0.5);
            (half + half * s, half * ds)
        }
    }
}

/// Scores `act(z)` for every logit (what analysis calls the gate score).
pub fn gate_scores<T: Real>(act: GateActivation, z: &[T]) -> Vec<T> {
    z.par_iter().map(|&v| activation(act, v).0).collect()
}

#[inline(always)]
fn score_index(geo: &GateGeometry, group: usize, elem: usize) -> usize {
    let h = if geo.heads == 1 { 0 } else { group };
    let e = if geo.per_head == 1 { 0 } else { elem };
    h * geo.per_head + e
}

/// Apply the gate in place to `y` (`[rows, groups·width]`) with logits `z` (`[rows, scores]`).
pub fn gate_fwd<T: Real>(g: &GateConfig, geo: &GateGeometry, y: &mut [T], z: &[T]) {
    let (yw, zw) = (geo.groups * geo.width, geo.scores());
    y.par_chunks_mut(yw).zip(z.par_chunks(zw)).for_each(|(yr, zr)| {
        for grp in 0..geo.groups {
            for e in 0..geo.width {
                let (a, _) = activation(g.activation, zr[score_index(geo, grp, e)]);
                let v = &mut yr[grp * geo.width + e];
                *v = match g.combine {
                    GateCombine::Multiplicative => *v * a,
                    GateCombine::Additive => *v + a,
                };
            }
        }
    });
}

/// Backward. `y_pre` is the ungated input; `dy` holds d/d(output) on entry and d/d(y_pre) on exit;
/// `dz` (`[rows, scores]`) is overwritten with d/d(logits).
pub fn gate_bwd<T: Real>(g: &GateConfig, geo: &GateGeometry, y_pre: &[T], z: &[T], dy: &mut [T], dz: &mut [T]) {
    let (yw, zw) = (geo.groups * geo.width, geo.scores());
    dy.par_chunks_mut(yw)
        .zip(dz.par_chunks_mut(zw))
        .zip(y_pre.par_chunks(yw).zip(z.par_chunks(zw)))
        .for_each(|((dyr, dzr), (yr, zr))| {
            dzr.fill(T::ZERO);
            for grp in 0..geo.groups {
                for e in 0..geo.width {
                    let si = score_index(geo, grp, e);
                    let (a, da) = activation(g.activation, zr[si]);
                    let i = grp * geo.width + e;
                    let d = dyr[i];
                    match g.combine {
                        GateCombine::Multiplicative => {
                            dzr[si] += d * yr[i] * da;
                            dyr[i] = d * a;
                        }
                        GateCombine::Additive => dzr[si] += d * da,
                    }
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{GateGranularity, GatePosition};
    use crate::model::ops::testutil::{check_grad, randn};

    #[test]
    fn gate_gradients_for_every_combination() {
        let rows = 3;
        for act in [GateActivation::Sigmoid, GateActivation::Silu, GateActivation::NsSigmoid] {
            for combine in [GateCombine::Multiplicative, GateCombine::Additive] {
                for (heads, per_head) in [(2, 4), (2, 1), (1, 4), (1, 1)] {
                    let mut g = GateConfig::g1(GateGranularity::Elementwise);
                    g.position = GatePosition::G1;
                    g.activation = act;
                    g.combine = combine;
                    let geo = GateGeometry {
                        groups: 2,
                        width: 4,
                        heads,
                        per_head,
                    };
                    let y = randn(rows * 8, 1, 1.0);
                    let z = randn(rows * geo.scores(), 2, 1.5);
                    let w = randn(rows * 8, 3, 1.0);
                    let f = |y: &[f64], z: &[f64]| {
                        let mut o = y.to_vec();
                        gate_fwd(&g, &geo, &mut o, z);
                        o.iter().zip(&w).map(|(a, b)| a * b).sum::<f64>()
                    };
                    let mut dy = w.clone();
                    let mut dz = vec![0.0; z.len()];
                    gate_bwd(&g, &geo, &y, &z, &mut dy, &mut dz);
                    check_grad(&y, &dy, |x| f(x, &z), 1e-7);
                    check_grad(&z, &dz, |x| f(&y, x), 1e-7);
                }
            }
        }
    }

    #[test]
    fn activation_values() {
        let (s, _) = activation(GateActivation::Sigmoid, 0.0f64);
        assert_eq!(s, 0.5);
        let (n, _) = activation(GateActivation::NsSigmoid, 0.0f64);
        assert_eq!(n, 0.75);
        let (l, dl) = activation(GateActivation::Silu, 0.0f64);
        assert_eq!((l, dl), (0.0, 0.5));
    }
}
