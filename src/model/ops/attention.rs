//! Causal scaled-dot-product attention with grouped KV heads, blocked over queries.
//!
//! Forward saves only the per-row log-sum-exp; backward recomputes the probabilities block by
//! block (flash-attention style), so saved memory is O(T·d) per head, and transient memory is one
//! `QBLK × T` score block per worker. Work is parallel over (batch, kv head): each task owns its
//! kv head's dK/dV rows, so no reductions cross threads and results are deterministic.

use super::softcap::tanh;
use crate::backend::cpu::{dot_lanes, exp_shifted, matmul_raw, Mat, Par, SyncPtr};
use crate::real::Real;
use rayon::prelude::*;

/// Query rows per block.
const QBLK: usize = 64;

#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Sliding window W: query i sees keys i−W+1..=i. `None`: all earlier keys.
    pub window: Option<usize>,
    /// Scores soft-capped to `c·tanh(s/c)` after scaling, before the mask.
    pub softcap: Option<f64>,
    /// Score scale `scalar^-½` (Gemma's query_pre_attn_scalar); `None`: `head_dim^-½`.
    pub scalar: Option<f64>,
}

/// The score scale: `head_dim^-½`, or `scalar^-½` (computed in f64 and rounded, as transformers
/// multiplies by the Python float `query_pre_attn_scalar**-0.5`).
pub fn score_scale<T: Real>(head_dim: usize, scalar: Option<f64>) -> T {
    match scalar {
        None => T::ONE / T::from_usize(head_dim).sqrt(),
        Some(s) => T::from_f64(s.powf(-0.5)),
    }
}

/// First key query `i` may see under window `w`.
#[inline]
pub fn window_start(i: usize, w: Option<usize>) -> usize {
    match w {
        Some(w) => (i + 1).saturating_sub(w),
        None => 0,
    }
}

/// `c·tanh(s/c)` in place; `None` leaves `s` as it is.
#[inline]
pub fn softcap_scores<T: Real>(s: &mut [T], cap: Option<f64>) {
    if let Some(c) = cap {
        let (c, inv) = (T::from_f64(c), T::from_f64(1.0 / c));
        s.iter_mut().for_each(|x| *x = tanh(*x * inv) * c);
    }
}

impl AttnShape {
    /// Plain causal attention (no window, no soft-cap, `head_dim^-½`).
    pub fn new(batch: usize, seq: usize, heads: usize, kv_heads: usize, head_dim: usize) -> Self {
        AttnShape {
            batch,
            seq,
            heads,
            kv_heads,
            head_dim,
            window: None,
            softcap: None,
            scalar: None,
        }
    }
    fn scale<T: Real>(&self) -> T {
        score_scale(self.head_dim, self.scalar)
    }
    fn check<T>(&self, q: &[T], k: &[T], v: &[T]) {
        let n = self.batch * self.seq;
        assert_eq!(q.len(), n * self.heads * self.head_dim);
        assert_eq!(k.len(), n * self.kv_heads * self.head_dim);
        assert_eq!(v.len(), k.len());
        assert_eq!(self.heads % self.kv_heads, 0);
    }
}

/// Per-task views of (batch b, query head h, kv head kh) in the `[rows, heads·d]` buffers.
struct Views<T> {
    q: *const T,
    k: *const T,
    v: *const T,
    ldq: usize,
    ldk: usize,
}

impl<T> Views<T> {
    fn q_at(&self, row: usize, h: usize, d: usize) -> Mat<T> {
        Mat {
            ptr: unsafe { self.q.add(row * self.ldq + h * d) },
            rs: self.ldq as isize,
            cs: 1,
        }
    }
    fn kt_at(&self, row: usize, kh: usize, d: usize) -> Mat<T> {
        // Kᵀ: element (e, j) = K[row + j, e]
        Mat {
            ptr: unsafe { self.k.add(row * self.ldk + kh * d) },
            rs: 1,
            cs: self.ldk as isize,
        }
    }
    fn k_at(&self, row: usize, kh: usize, d: usize) -> Mat<T> {
        Mat {
            ptr: unsafe { self.k.add(row * self.ldk + kh * d) },
            rs: self.ldk as isize,
            cs: 1,
        }
    }
    fn v_at(&self, row: usize, kh: usize, d: usize) -> Mat<T> {
        Mat {
            ptr: unsafe { self.v.add(row * self.ldk + kh * d) },
            rs: self.ldk as isize,
            cs: 1,
        }
    }
    fn vt_at(&self, row: usize, kh: usize, d: usize) -> Mat<T> {
        Mat {
            ptr: unsafe { self.v.add(row * self.ldk + kh * d) },
            rs: 1,
            cs: self.ldk as isize,
        }
    }
}

#[allow(clippy::too_many_arguments)]
/// Scores of query rows `i0..i0+bq` against keys `0..nk` into `s` (`bq × nk`), scaled.
fn scores<T: Real>(
    vw: &Views<T>,
    s: &mut [T],
    base: usize,
    i0: usize,
    bq: usize,
    nk: usize,
    h: usize,
    kh: usize,
    d: usize,
    scale: T,
) {
    // SAFETY: s holds bq·nk elements; q/k views are in range for rows base..base+seq.
    unsafe {
        matmul_raw(
            bq,
            nk,
            d,
            s.as_mut_ptr(),
            nk,
            vw.q_at(base + i0, h, d),
            vw.kt_at(base, kh, d),
            scale,
            false,
            Par::Serial,
        )
    };
}

/// What the forward may report besides its output.
#[derive(Default)]
pub struct AttnProbes<'a, T> {
    /// Full probabilities `[batch, heads, seq, seq]` (zeros above the diagonal).
    pub probs: Option<&'a mut [T]>,
    /// Attention on key 0, `[batch, heads, seq]`.
    pub key0: Option<&'a mut [T]>,
}

/// Forward. Writes `out` (`[rows, heads·d]`), `lse` (`[batch, heads, seq]`) and the requested probes.
#[allow(clippy::too_many_arguments)]
pub fn attention_fwd<T: Real>(
    sh: AttnShape,
    q: &[T],
    k: &[T],
    v: &[T],
    out: &mut [T],
    lse: &mut [T],
    probes: AttnProbes<T>,
) {
    sh.check(q, k, v);
    assert_eq!(out.len(), q.len());
    assert_eq!(lse.len(), sh.batch * sh.heads * sh.seq);
    let (t, d, hq, kv) = (sh.seq, sh.head_dim, sh.heads, sh.kv_heads);
    let g = hq / kv;
    let scale: T = sh.scale();
    let vw = Views {
        q: q.as_ptr(),
        k: k.as_ptr(),
        v: v.as_ptr(),
        ldq: hq * d,
        ldk: kv * d,
    };
    let vw = &SyncViews(vw);
    let outp = SyncPtr(out.as_mut_ptr());
    let lsep = SyncPtr(lse.as_mut_ptr());
    let probp = probes.probs.map(|p| {
        assert_eq!(p.len(), sh.batch * hq * t * t);
        SyncPtr(p.as_mut_ptr())
    });
    let key0p = probes.key0.map(|p| {
        assert_eq!(p.len(), sh.batch * hq * t);
        SyncPtr(p.as_mut_ptr())
    });
    (0..sh.batch * kv).into_par_iter().for_each(|task| {
        let (b, kh) = (task / kv, task % kv);
        let base = b * t;
        let mut s = vec![T::ZERO; QBLK.min(t) * t];
        for h in kh * g..(kh + 1) * g {
            for i0 in (0..t).step_by(QBLK) {
                let bq = QBLK.min(t - i0);
                let nk = i0 + bq;
                scores(&vw.0, &mut s, base, i0, bq, nk, h, kh, d, scale);
                for r in 0..bq {
                    let row = &mut s[r * nk..(r + 1) * nk];
                    let lim = i0 + r + 1;
                    let lo = window_start(i0 + r, sh.window);
                    softcap_scores(&mut row[lo..lim], sh.softcap);
                    let (m, sum) = exp_shifted(&mut row[lo..lim]);
                    let inv = T::ONE / sum;
                    row[lo..lim].iter_mut().for_each(|x| *x *= inv);
                    row[..lo].fill(T::ZERO);
                    row[lim..].fill(T::ZERO);
                    // SAFETY: (b, h, i0 + r) is owned by this task.
                    unsafe { *lsep.get().add((b * hq + h) * t + i0 + r) = m + sum.ln() };
                    if let Some(kp) = key0p {
                        // SAFETY: (b, h, i0 + r) is owned by this task.
                        unsafe { *kp.get().add((b * hq + h) * t + i0 + r) = row[0] };
                    }
                    if let Some(pp) = probp {
                        let dst =
                            unsafe { std::slice::from_raw_parts_mut(pp.get().add(((b * hq + h) * t + i0 + r) * t), t) };
                        dst[..nk].copy_from_slice(row);
                        dst[nk..].fill(T::ZERO);
                    }
                }
                // SAFETY: rows base+i0.., columns of head h are owned by this task.
                unsafe {
                    matmul_raw(
                        bq,
                        d,
                        nk,
                        outp.get().add((base + i0) * hq * d + h * d),
                        hq * d,
                        Mat {
                            ptr: s.as_ptr(),
                            rs: nk as isize,
                            cs: 1,
                        },
                        vw.0.v_at(base, kh, d),
                        T::ONE,
                        false,
                        Par::Serial,
                    )
                };
            }
        }
    });
}

/// Backward. `out` and `lse` are the forward's; `dout` the incoming gradient. Overwrites dq, dk, dv.
#[allow(clippy::too_many_arguments)]
pub fn attention_bwd<T: Real>(
    sh: AttnShape,
    q: &[T],
    k: &[T],
    v: &[T],
    out: &[T],
    lse: &[T],
    dout: &[T],
    dq: &mut [T],
    dk: &mut [T],
    dv: &mut [T],
) {
    sh.check(q, k, v);
    assert_eq!(dq.len(), q.len());
    assert_eq!(dk.len(), k.len());
    assert_eq!(dv.len(), v.len());
    assert_eq!(dout.len(), out.len());
    let (t, d, hq, kv) = (sh.seq, sh.head_dim, sh.heads, sh.kv_heads);
    let g = hq / kv;
    let scale: T = sh.scale();
    let vw = &SyncViews(Views {
        q: q.as_ptr(),
        k: k.as_ptr(),
        v: v.as_ptr(),
        ldq: hq * d,
        ldk: kv * d,
    });
    let dov = &SyncViews(Views {
        q: dout.as_ptr(),
        k: std::ptr::null(),
        v: std::ptr::null(),
        ldq: hq * d,
        ldk: 0,
    });
    let (dqp, dkp, dvp) = (
        SyncPtr(dq.as_mut_ptr()),
        SyncPtr(dk.as_mut_ptr()),
        SyncPtr(dv.as_mut_ptr()),
    );
    (0..sh.batch * kv).into_par_iter().for_each(|task| {
        let (b, kh) = (task / kv, task % kv);
        let base = b * t;
        let blk = QBLK.min(t);
        let mut p = vec![T::ZERO; blk * t];
        let mut dp = vec![T::ZERO; blk * t];
        // SAFETY (all raw writes below): this task owns rows base..base+t of kv head kh in dk/dv
        // and of query heads kh*g..(kh+1)*g in dq.
        for r in 0..t {
            unsafe {
                std::slice::from_raw_parts_mut(dkp.get().add((base + r) * kv * d + kh * d), d).fill(T::ZERO);
                std::slice::from_raw_parts_mut(dvp.get().add((base + r) * kv * d + kh * d), d).fill(T::ZERO);
            }
        }
        for h in kh * g..(kh + 1) * g {
            for i0 in (0..t).step_by(QBLK) {
                let bq = QBLK.min(t - i0);
                let nk = i0 + bq;
                scores(&vw.0, &mut p, base, i0, bq, nk, h, kh, d, scale);
                // dP = dO · Vᵀ
                unsafe {
                    matmul_raw(
                        bq,
                        nk,
                        d,
                        dp.as_mut_ptr(),
                        nk,
                        dov.0.q_at(base + i0, h, d),
                        vw.0.vt_at(base, kh, d),
                        T::ONE,
                        false,
                        Par::Serial,
                    )
                };
                for r in 0..bq {
                    let i = i0 + r;
                    let l = lse[(b * hq + h) * t + i];
                    let orow = &out[(base + i) * hq * d + h * d..][..d];
                    let dorow = &dout[(base + i) * hq * d + h * d..][..d];
                    let di = dot_lanes(orow, dorow);
                    let (pr, dpr) = (&mut p[r * nk..(r + 1) * nk], &mut dp[r * nk..(r + 1) * nk]);
                    let lo = window_start(i, sh.window);
                    match sh.softcap {
                        None => {
                            for (pj, dpj) in pr[lo..=i].iter_mut().zip(&mut dpr[lo..=i]) {
                                *pj = (*pj - l).exp();
                                *dpj = *pj * (*dpj - di);
                            }
                        }
                        Some(c) => {
                            // s' = c·tanh(s/c): ds'/ds = 1 − tanh²
                            let (c, inv) = (T::from_f64(c), T::from_f64(1.0 / c));
                            for (pj, dpj) in pr[lo..=i].iter_mut().zip(&mut dpr[lo..=i]) {
                                let th = tanh(*pj * inv);
                                *pj = (th * c - l).exp();
                                *dpj = *pj * (*dpj - di) * (T::ONE - th * th);
                            }
                        }
                    }
                    pr[..lo].fill(T::ZERO);
                    dpr[..lo].fill(T::ZERO);
                    pr[i + 1..].fill(T::ZERO);
                    dpr[i + 1..].fill(T::ZERO);
                }
                let dsm = Mat {
                    ptr: dp.as_ptr(),
                    rs: nk as isize,
                    cs: 1,
                };
                let dsmt = Mat {
                    ptr: dp.as_ptr(),
                    rs: 1,
                    cs: nk as isize,
                };
                let pmt = Mat {
                    ptr: p.as_ptr(),
                    rs: 1,
                    cs: nk as isize,
                };
                unsafe {
                    // dQ = scale · dS · K
                    matmul_raw(
                        bq,
                        d,
                        nk,
                        dqp.get().add((base + i0) * hq * d + h * d),
                        hq * d,
                        dsm,
                        vw.0.k_at(base, kh, d),
                        scale,
                        false,
                        Par::Serial,
                    );
                    // dK += scale · dSᵀ · Q
                    matmul_raw(
                        nk,
                        d,
                        bq,
                        dkp.get().add(base * kv * d + kh * d),
                        kv * d,
                        dsmt,
                        vw.0.q_at(base + i0, h, d),
                        scale,
                        true,
                        Par::Serial,
                    );
                    // dV += Pᵀ · dO
                    matmul_raw(
                        nk,
                        d,
                        bq,
                        dvp.get().add(base * kv * d + kh * d),
                        kv * d,
                        pmt,
                        dov.0.q_at(base + i0, h, d),
                        T::ONE,
                        true,
                        Par::Serial,
                    );
                }
            }
        }
    });
}

/// Views hold raw pointers into buffers that are only read while the tasks run.
struct SyncViews<T>(Views<T>);
unsafe impl<T> Sync for SyncViews<T> {}
unsafe impl<T> Send for SyncViews<T> {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::testutil::{check_grad, randn};

    fn naive(sh: AttnShape, q: &[f64], k: &[f64], v: &[f64]) -> (Vec<f64>, Vec<f64>) {
        let scale = 1.0 / sh.scalar.unwrap_or(sh.head_dim as f64).sqrt();
        let cap = |x: f64| sh.softcap.map_or(x, |c| c * (x / c).tanh());
        let (t, d, hq, kv) = (sh.seq, sh.head_dim, sh.heads, sh.kv_heads);
        let mut o = vec![0.0; q.len()];
        let mut probs = vec![0.0; sh.batch * hq * t * t];
        for b in 0..sh.batch {
            for h in 0..hq {
                let kh = h / (hq / kv);
                for i in 0..t {
                    let qi = &q[(b * t + i) * hq * d + h * d..][..d];
                    let lo = window_start(i, sh.window);
                    let s: Vec<f64> = (0..=i)
                        .map(|j| {
                            cap(qi
                                .iter()
                                .zip(&k[(b * t + j) * kv * d + kh * d..][..d])
                                .map(|(a, c)| a * c)
                                .sum::<f64>()
                                * scale)
                        })
                        .collect();
                    let m = s[lo..].iter().cloned().fold(f64::MIN, f64::max);
                    let z: f64 = s[lo..].iter().map(|x| (x - m).exp()).sum();
                    for j in lo..=i {
                        let pj = (s[j] - m).exp() / z;
                        probs[((b * hq + h) * t + i) * t + j] = pj;
                        for e in 0..d {
                            o[(b * t + i) * hq * d + h * d + e] += pj * v[(b * t + j) * kv * d + kh * d + e];
                        }
                    }
                }
            }
        }
        (o, probs)
    }

    #[test]
    fn matches_naive_attention_across_query_blocks() {
        // seq 150 spans three query blocks, including a partial one
        let sh = AttnShape::new(2, 150, 4, 2, 8);
        let n = sh.batch * sh.seq;
        let (q, k, v) = (randn(n * 32, 1, 1.0), randn(n * 16, 2, 1.0), randn(n * 16, 3, 1.0));
        let mut o = vec![0.0; n * 32];
        let mut lse = vec![0.0; 2 * 4 * 150];
        let mut p = vec![0.0; 2 * 4 * 150 * 150];
        let mut k0 = vec![0.0; 2 * 4 * 150];
        attention_fwd(
            sh,
            &q,
            &k,
            &v,
            &mut o,
            &mut lse,
            AttnProbes {
                probs: Some(&mut p),
                key0: Some(&mut k0),
            },
        );
        let (ro, rp) = naive(sh, &q, &k, &v);
        assert!(o.iter().zip(&ro).all(|(a, b)| (a - b).abs() < 1e-12));
        assert!(p.iter().zip(&rp).all(|(a, b)| (a - b).abs() < 1e-12));
        assert!(
            k0.iter().enumerate().all(|(i, &x)| x == p[i * 150]),
            "key-0 column equals the maps' column 0"
        );
    }

    #[test]
    fn gradients_match_finite_differences() {
        let sh = AttnShape::new(2, 70, 4, 2, 4);
        let n = sh.batch * sh.seq;
        let (q, k, v) = (randn(n * 16, 1, 1.0), randn(n * 8, 2, 1.0), randn(n * 8, 3, 1.0));
        let w = randn(n * 16, 4, 1.0);
        let f = |q: &[f64], k: &[f64], v: &[f64]| {
            let mut o = vec![0.0; n * 16];
            let mut lse = vec![0.0; 2 * 4 * 70];
            attention_fwd(sh, q, k, v, &mut o, &mut lse, AttnProbes::default());
            o.iter().zip(&w).map(|(a, b)| a * b).sum::<f64>()
        };
        let mut o = vec![0.0; n * 16];
        let mut lse = vec![0.0; 2 * 4 * 70];
        attention_fwd(sh, &q, &k, &v, &mut o, &mut lse, AttnProbes::default());
        let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
        attention_bwd(sh, &q, &k, &v, &o, &lse, &w, &mut dq, &mut dk, &mut dv);
        check_grad(&q, &dq, |x| f(x, &k, &v), 1e-7);
        check_grad(&k, &dk, |x| f(&q, x, &v), 1e-7);
        check_grad(&v, &dv, |x| f(&q, &k, x), 1e-7);
    }

    #[test]
    fn window_softcap_and_scalar_match_naive_and_finite_differences() {
        for (window, softcap, scalar) in [
            (Some(1), None, None),
            (Some(5), Some(2.0), Some(24.0)),
            (Some(100), Some(0.7), None),
            (None, Some(1.5), Some(3.0)),
        ] {
            let sh = AttnShape {
                window,
                softcap,
                scalar,
                ..AttnShape::new(2, 70, 4, 2, 4)
            };
            let n = sh.batch * sh.seq;
            let (q, k, v) = (randn(n * 16, 5, 1.5), randn(n * 8, 6, 1.5), randn(n * 8, 7, 1.0));
            let mut o = vec![0.0; n * 16];
            let mut lse = vec![0.0; 2 * 4 * 70];
            let mut p = vec![0.0; 2 * 4 * 70 * 70];
            let probes = AttnProbes {
                probs: Some(&mut p),
                key0: None,
            };
            attention_fwd(sh, &q, &k, &v, &mut o, &mut lse, probes);
            let (ro, rp) = naive(sh, &q, &k, &v);
            assert!(
                o.iter().zip(&ro).all(|(a, b)| (a - b).abs() < 1e-12),
                "{window:?} {softcap:?}"
            );
            assert!(
                p.iter().zip(&rp).all(|(a, b)| (a - b).abs() < 1e-12),
                "{window:?} {softcap:?}"
            );
            let w = randn(n * 16, 8, 1.0);
            let f = |q: &[f64], k: &[f64], v: &[f64]| {
                let mut o = vec![0.0; n * 16];
                let mut lse = vec![0.0; 2 * 4 * 70];
                attention_fwd(sh, q, k, v, &mut o, &mut lse, AttnProbes::default());
                o.iter().zip(&w).map(|(a, b)| a * b).sum::<f64>()
            };
            let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
            attention_bwd(sh, &q, &k, &v, &o, &lse, &w, &mut dq, &mut dk, &mut dv);
            check_grad(&q, &dq, |x| f(x, &k, &v), 1e-7);
            check_grad(&k, &dk, |x| f(&q, x, &v), 1e-7);
            check_grad(&v, &dv, |x| f(&q, &k, x), 1e-7);
        }
    }
}
