//! One layer's KV cache and the attention of new queries over it: what the decoder block needs
//! to decode incrementally. The cache's eviction and re-rotation live in `decode`, which drives
//! the block; the block itself only appends to and reads from `LayerKv`.

use super::ops::attention::{score_scale, softcap_scores, window_start, AttnShape};
use crate::backend::cpu::{exp_shifted, matmul, Mat, Par};
use crate::real::Real;

/// One layer's cached keys and values, `[slots, kv_heads·head_dim]`.
#[derive(Clone, Debug, Default)]
pub struct LayerKv<T> {
    pub k_raw: Vec<T>,
    pub k_rot: Vec<T>,
    pub v: Vec<T>,
}

/// Causal attention of `m` new queries (slots `p0..p0+m`, already rotated) over the cache, with
/// the shape's window (over slots), soft-cap and score scale (`batch` and `seq` are unused).
pub fn attention_cached<T: Real>(q: &[T], kv: &LayerKv<T>, p0: usize, sh: AttnShape, out: &mut [T]) {
    let (heads, kv_heads, d) = (sh.heads, sh.kv_heads, sh.head_dim);
    let m = q.len() / (heads * d);
    let (ldq, ldk) = (heads * d, kv_heads * d);
    let slots = kv.k_rot.len() / ldk;
    let scale: T = score_scale(d, sh.scalar);
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
            let lo = window_start(p0 + i, sh.window).min(lim - 1);
            softcap_scores(&mut row[lo..lim], sh.softcap);
            let (_, sum) = exp_shifted(&mut row[lo..lim]);
            let inv = T::ONE / sum;
            row[lo..lim].iter_mut().for_each(|x| *x *= inv);
            row[..lo].fill(T::ZERO);
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
