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
        Self::from_inv_freq(&inv_freq, rotary_dim, max_len, 1.0)
    }

    /// The table a config implies: plain, YaRN or linear scaling.
    pub fn for_config(cfg: &crate::config::ModelConfig, max_len: usize) -> Self {
        let rd = cfg.rotary_dim();
        match &cfg.rope_scaling {
            None => Self::new(cfg.rope_theta, rd, max_len),
            Some(r) if r.kind == "linear" => {
                let f: Vec<f64> = default_inv_freq(cfg.rope_theta, rd)
                    .iter()
                    .map(|x| x / r.factor)
                    .collect();
                Self::from_inv_freq(&f, rd, max_len, 1.0)
            }
            Some(r) => {
                let (f, m) = yarn_inv_freq(cfg.rope_theta, rd, r);
                Self::from_inv_freq(&f, rd, max_len, m)
            }
        }
    }

    /// The windowed layers' own table when the config gives them a θ (Gemma 3: plain RoPE at
    /// `rope_local_theta`, no scaling).
    pub fn local_for_config(cfg: &crate::config::ModelConfig, max_len: usize) -> Option<Self> {
        cfg.rope_local_theta
            .map(|theta| Self::new(theta, cfg.rotary_dim(), max_len))
    }

    /// `attention_scaling` multiplies cos and sin (YaRN's temperature, as transformers applies it).
    pub fn from_inv_freq(inv_freq: &[f64], rotary_dim: usize, max_len: usize, attention_scaling: f64) -> Self {
        let half = rotary_dim / 2;
        assert_eq!(inv_freq.len(), half);
        let mut cos = Vec::with_capacity(max_len * half);
        let mut sin = Vec::with_capacity(max_len * half);
        for p in 0..max_len {
            for &f in inv_freq {
                // transformers forms the angle in f32: match it so long positions agree too.
                let ang = (p as f32 * f as f32) as f64;
                cos.push(T::from_f64(ang.cos() * attention_scaling));
                sin.push(T::from_f64(ang.sin() * attention_scaling));
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

/// YaRN (Peng et al. 2023) frequencies and attention factor, as transformers computes them:
/// dims rotating fewer than `beta_slow` times over the original context are interpolated by
/// `factor`, those rotating more than `beta_fast` times are kept, with a linear ramp between.
pub fn yarn_inv_freq(theta: f64, dim: usize, r: &crate::config::RopeScaling) -> (Vec<f64>, f64) {
    let orig = r.original_max_position_embeddings as f64;
    let corr = |rot: f64| (dim as f64 * (orig / (rot * 2.0 * std::f64::consts::PI)).ln()) / (2.0 * theta.ln());
    let low = corr(r.beta_fast).floor().max(0.0);
    let mut high = corr(r.beta_slow).ceil().min(dim as f64 - 1.0);
    if low == high {
        high += 0.001;
    }
    let freqs = (0..dim / 2)
        .map(|j| {
            let pos = theta.powf((2 * j) as f64 / dim as f64);
            let ramp = ((j as f64 - low) / (high - low)).clamp(0.0, 1.0);
            let extrapolate = 1.0 - ramp;
            (1.0 / (r.factor * pos)) * (1.0 - extrapolate) + (1.0 / pos) * extrapolate
        })
        .collect();
    let attn = r.attention_factor.unwrap_or(if r.factor <= 1.0 {
        1.0
    } else {
        0.1 * r.factor.ln() + 1.0
    });
    (freqs, attn)
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
    fn yarn_matches_the_reference_formula() {
        // values from transformers' _compute_yarn_parameters (base 1e4, dim 32, factor 4, original 256)
        let r = crate::config::RopeScaling::yarn(4.0, 256);
        let (f, m) = yarn_inv_freq(10000.0, 32, &r);
        let want = [
            1.0,
            5.0209046892e-01,
            2.4846467330e-01,
            1.2066895997e-01,
            5.7142857143e-02,
            2.6108704384e-02,
            1.1293848786e-02,
            4.4456985251e-03,
            2.5e-03,
            1.4058533130e-03,
            7.9056941504e-04,
            4.4456985251e-04,
            2.5e-04,
            1.4058533130e-04,
            7.9056941504e-05,
            4.4456985251e-05,
        ];
        for (a, b) in f.iter().zip(want) {
            assert!((a - b).abs() <= 1e-9 * b, "{a} vs {b}");
        }
        assert!((m - 1.138629436111989).abs() < 1e-12);
        // the table scales cos/sin by the attention factor
        let mut cfg = crate::config::ModelConfig::preset("micro", None).unwrap();
        cfg.head_dim = 32;
        cfg.rope_theta = 10000.0;
        cfg.rope_scaling = Some(r);
        let t: RopeTable<f64> = RopeTable::for_config(&cfg, 8);
        assert!((t.cos[0] - m).abs() < 1e-12);
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
