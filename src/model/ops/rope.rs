//! Rotary position embedding, rotate-half convention (transformers' Qwen3/Qwen3-Next), applied to
//! the first `rotary_dim` dims of each head (partial RoPE); the rest pass through.

use crate::real::Real;
use rayon::prelude::*;

/// Precomputed cos/sin for positions `0..max_len`, `rotary_dim/2` frequencies each.
#[derive(Clone, Debug)]
pub struct RopeTable<T> {
    pub rotary_dim: usize,
    pub cos: Vec<T>,
    pub sin: Vec<T>,
    pub max_len: usize,
}

impl<T: Real> RopeTable<T> {
    /// `inv_freq[i] = theta^(-2i/rotary_dim)`; angles are formed in f64 then rounded.
    pub fn new(theta: f64, rotary_dim: usize, max_len: usize) -> Self {
        let inv_freq = default_inv_freq(theta, rotary_dim);
        Self::from_inv_freq(&inv_freq, rotary_dim, max_len)
    }

    pub fn from_inv_freq(inv_freq: &[f64], rotary_dim: usize, max_len: usize) -> Self {
        let half = rotary_dim / 2;
        assert_eq!(inv_freq.len(), half);
        let mut cos = Vec::with_capacity(max_len * half);
        let mut sin = Vec::with_capacity(max_len * half);
        for p in 0..max_len {
            for &f in inv_freq {
                // transformers forms the angle in f32: match it so long positions agree too.
                let ang = (p as f32 * f as f32) as f64;
                cos.push(T::from_f64(ang.cos()));
                sin.push(T::from_f64(ang.sin()));
            }
        }
        RopeTable {
            rotary_dim,
            cos,
            sin,
            max_len,
        }
    }
}

pub fn default_inv_freq(theta: f64, rotary_dim: usize) -> Vec<f64> {
    (0..rotary_dim / 2)
        .map(|i| {
            // transformers: 1 / theta ** (arange(0, dim, 2).float() / dim), in f32
            let e = (2 * i) as f32 / rotary_dim as f32;
            (1.0f32 / (theta as f32).powf(e)) as f64
        })
        .collect()
}

/// Rotate in place. `x` is `[rows, heads·head_dim]`; the position of row r is `pos0 + r % seq`.
/// `inverse` applies the transposed rotation (the backward pass).
pub fn rope_apply<T: Real>(
    table: &RopeTable<T>,
    x: &mut [T],
    heads: usize,
    head_dim: usize,
    seq: usize,
    pos0: usize,
    inverse: bool,
) {
    let half = table.rotary_dim / 2;
    if half == 0 {
        return;
    }
    assert!(pos0 + seq <= table.max_len, "sequence longer than the RoPE table");
    x.par_chunks_mut(heads * head_dim).enumerate().for_each(|(r, row)| {
        let p = pos0 + r % seq;
        let cs = &table.cos[p * half..(p + 1) * half];
        let sn = &table.sin[p * half..(p + 1) * half];
        for h in row.chunks_mut(head_dim) {
            for i in 0..half {
                let (a, b) = (h[i], h[i + half]);
                let (c, s) = (cs[i], if inverse { -sn[i] } else { sn[i] });
                h[i] = a * c - b * s;
                h[i + half] = b * c + a * s;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::testutil::randn;

    #[test]
    fn inverse_undoes_forward_and_preserves_norm_and_passthrough() {
        let t: RopeTable<f64> = RopeTable::new(10000.0, 4, 32);
        let x0 = randn(2 * 8 * 3 * 8, 1, 1.0);
        let mut x = x0.clone();
        rope_apply(&t, &mut x, 3, 8, 8, 0, false);
        // dims 4..8 of each head are untouched by a 4-dim partial rotary
        for (a, b) in x.chunks(8).zip(x0.chunks(8)) {
            assert_eq!(&a[4..], &b[4..]);
            let n1: f64 = a.iter().map(|v| v * v).sum();
            let n2: f64 = b.iter().map(|v| v * v).sum();
            assert!((n1 - n2).abs() < 1e-12);
        }
        rope_apply(&t, &mut x, 3, 8, 8, 0, true);
        for (a, b) in x.iter().zip(&x0) {
            assert!((a - b).abs() < 1e-12);
        }
    }

    #[test]
    fn frequencies_follow_the_reference_formula() {
        let f = default_inv_freq(10000.0, 16);
        assert_eq!(f.len(), 8);
        assert!((f[0] - 1.0).abs() < 1e-12);
        assert!((f[1] - 10000f64.powf(-2.0 / 16.0)).abs() < 1e-7);
        // relative positions: <R(p)q, R(p+k)k> depends only on k
        let t: RopeTable<f64> = RopeTable::new(100.0, 4, 64);
        let q = randn(4, 2, 1.0);
        let k = randn(4, 3, 1.0);
        let dot = |pq: usize, pk: usize| {
            let (mut a, mut b) = (q.clone(), k.clone());
            rope_apply(&t, &mut a, 1, 4, 1, pq, false);
            rope_apply(&t, &mut b, 1, 4, 1, pk, false);
            a.iter().zip(&b).map(|(x, y)| x * y).sum::<f64>()
        };
        assert!((dot(3, 10) - dot(20, 27)).abs() < 1e-5);
    }
}
