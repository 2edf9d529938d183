//! One layer's KV cache and the attention of new queries over it: what the decoder block needs
//! to decode incrementally. The cache's eviction and re-rotation live in `decode`, which drives
//! the block; the block itself only appends to and reads from `LayerKv`.

use crate::backend::cpu::{exp_shifted, matmul, Mat, Par};
use crate::real::Real;

/// One layer's cached keys and values, `[slots, kv_heads·head_dim]`.
#[derive(Clone, Debug, Default)]
pub struct LayerKv<T> {
    pub k_raw: Vec<T>,
    pub k_rot: Vec<T>,
    pub v: Vec<T>,
}

/// Causal attention of `m` new queries (slots `p0..p0+m`, already rotated) over the cache.
pub fn attention_cached<T: Real>(
    q: &[T],
    kv: &LayerKv<T>,
    p0: usize,
    heads: usize,
    kv_heads: usize,
    d: usize,
    out: &mut [T],
) {
    let m = q.len() / (heads * d);
    let (ldq, ldk) = (heads * d, kv_heads * d);
    let slots = kv.k_rot.len() / ldk;
    let scale = T::ONE / T::from_usize(d).sqrt();
    let mut s = vec![T::ZERO; m * slots];
    for h in 0..heads {
        let kh = h / (heads / kv_heads);
        matmul(
            m,
            slots,
            d,
            &mut s,
            0,
            slots,
            Mat::rows(q, h * d, ldq),
            Mat::t(&kv.k_rot, kh * d, ldk),
            scale,
            false,
            Par::Serial,
        );
        for (i, row) in s.chunks_mut(slots).enumerate() {
            let lim = (p0 + i + 1).min(slots);
            let (_, sum) = exp_shifted(&mut row[..lim]);
            let inv = T::ONE / sum;
            row[..lim].iter_mut().for_each(|x| *x *= inv);
            row[lim..].fill(T::ZERO);
        }
        matmul(
            m,
            d,
            slots,
            out,
            h * d,
            ldq,
            Mat::rows(&s, 0, slots),
            Mat::rows(&kv.v, kh * d, ldk),
            T::ONE,
            false,
            Par::Serial,
        );
    }
}
