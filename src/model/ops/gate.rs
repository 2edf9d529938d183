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
    let mut a = vec![T::ZERO; z.len()];
    a.par_chunks_mut(4096)
        .zip(z.par_chunks(4096))
        .for_each(|(ac, zc)| activate_row(act, zc, ac, None));
    a
}

/// `a = act(z)` (and `da = act'(z)` when given) for one row, one straight loop per activation
/// so the compiler vectorises it.
fn activate_row<T: Real>(act: GateActivation, z: &[T], a: &mut [T], da: Option<&mut [T]>) {
    let half = T::from_f64(0.5);
    match (act, da) {
        (GateActivation::Sigmoid, None) => a.iter_mut().zip(z).for_each(|(o, &v)| *o = sigmoid(v)),
        (GateActivation::Silu, None) => a.iter_mut().zip(z).for_each(|(o, &v)| *o = v * sigmoid(v)),
        (GateActivation::NsSigmoid, None) => a.iter_mut().zip(z).for_each(|(o, &v)| *o = half + half * sigmoid(v)),
        (GateActivation::Sigmoid, Some(d)) => a.iter_mut().zip(d.iter_mut()).zip(z).for_each(|((o, d), &v)| {
            let s = sigmoid(v);
            *o = s;
            *d = s * (T::ONE - s);
        }),
        (GateActivation::Silu, Some(d)) => a.iter_mut().zip(d.iter_mut()).zip(z).for_each(|((o, d), &v)| {
            let s = sigmoid(v);
            *o = v * s;
            *d = s + v * s * (T::ONE - s);
        }),
        (GateActivation::NsSigmoid, Some(d)) => a.iter_mut().zip(d.iter_mut()).zip(z).for_each(|((o, d), &v)| {
            let s = sigmoid(v);
            *o = half + half * s;
            *d = half * s * (T::ONE - s);
        }),
    }
}

/// Rows per parallel task (each task reuses one activation scratch row).
const ROWS: usize = 32;

/// Scores of gate head `grp` (its `per_head` entries) within a row of activations.
#[inline(always)]
fn head_scores<'a, T>(geo: &GateGeometry, a: &'a [T], grp: usize) -> &'a [T] {
    let h = if geo.heads == 1 { 0 } else { grp };
    &a[h * geo.per_head..(h + 1) * geo.per_head]
}

/// Apply the gate in place to `y` (`[rows, groups·width]`) with logits `z` (`[rows, scores]`).
pub fn gate_fwd<T: Real>(g: &GateConfig, geo: &GateGeometry, y: &mut [T], z: &[T]) {
    let (yw, zw) = (geo.groups * geo.width, geo.scores());
    y.par_chunks_mut(yw * ROWS)
        .zip(z.par_chunks(zw * ROWS))
        .for_each(|(yc, zc)| {
            let mut a = vec![T::ZERO; zw];
            for (yr, zr) in yc.chunks_mut(yw).zip(zc.chunks(zw)) {
                activate_row(g.activation, zr, &mut a, None);
                for (grp, yh) in yr.chunks_mut(geo.width).enumerate() {
                    let s = head_scores(geo, &a, grp);
                    match (g.combine, s.len()) {
                        (GateCombine::Multiplicative, 1) => yh.iter_mut().for_each(|v| *v *= s[0]),
                        (GateCombine::Additive, 1) => yh.iter_mut().for_each(|v| *v += s[0]),
                        (GateCombine::Multiplicative, _) => yh.iter_mut().zip(s).for_each(|(v, &k)| *v *= k),
                        (GateCombine::Additive, _) => yh.iter_mut().zip(s).for_each(|(v, &k)| *v += k),
                    }
                }
            }
        });
}

/// Backward. `y_pre` is the ungated input; `dy` holds d/d(output) on entry and d/d(y_pre) on exit;
/// `dz` (`[rows, scores]`) is overwritten with d/d(logits).
pub fn gate_bwd<T: Real>(g: &GateConfig, geo: &GateGeometry, y_pre: &[T], z: &[T], dy: &mut [T], dz: &mut [T]) {
    let (yw, zw) = (geo.groups * geo.width, geo.scores());
    let mul = g.combine == GateCombine::Multiplicative;
    dy.par_chunks_mut(yw * ROWS)
        .zip(dz.par_chunks_mut(zw * ROWS))
        .zip(y_pre.par_chunks(yw * ROWS).zip(z.par_chunks(zw * ROWS)))
        .for_each(|((dyc, dzc), (yc, zc))| {
            let (mut a, mut da) = (vec![T::ZERO; zw], vec![T::ZERO; zw]);
            for ((dyr, dzr), (yr, zr)) in dyc
                .chunks_mut(yw)
                .zip(dzc.chunks_mut(zw))
                .zip(yc.chunks(yw).zip(zc.chunks(zw)))
            {
                activate_row(g.activation, zr, &mut a, Some(&mut da));
                dzr.fill(T::ZERO);
                for (grp, (dyh, yh)) in dyr.chunks_mut(geo.width).zip(yr.chunks(geo.width)).enumerate() {
                    let h = if geo.heads == 1 { 0 } else { grp };
                    let (s, ds) = (head_scores(geo, &a, grp), head_scores(geo, &da, grp));
                    let dzh = &mut dzr[h * geo.per_head..(h + 1) * geo.per_head];
                    if s.len() == 1 {
                        // one score for the whole head: reduce over its elements
                        let inner = if mul {
                            crate::backend::cpu::dot_lanes(dyh, yh)
                        } else {
                            crate::backend::cpu::sum_lanes(dyh)
                        };
                        dzh[0] += inner * ds[0];
                        if mul {
                            dyh.iter_mut().for_each(|d| *d *= s[0]);
                        }
                    } else if mul {
                        for (((d, &yv), (&k, &dk)), o) in
                            dyh.iter_mut().zip(yh).zip(s.iter().zip(ds)).zip(dzh.iter_mut())
                        {
                            *o += *d * yv * dk;
                            *d *= k;
                        }
                    } else {
                        for ((d, &dk), o) in dyh.iter().zip(ds).zip(dzh.iter_mut()) {
                            *o += *d * dk;
                        }
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
