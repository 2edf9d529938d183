//! The norm backwards' gain gradients (RMSNorm; QK-norm + RoPE), which each block of the
//! backward sums over its span of rows into one partial row and a second launch adds into `dw`:
//! against an f64 sum over all rows, to a tolerance that one row too many or too few exceeds
//! many times over, on a `dw` that already holds a gradient. Row counts around the split: one
//! row, fewer rows than blocks, spans that divide the rows and spans that leave a short last
//! block, thousands of rows; rows too wide for the sums in shared memory. The scratch starts as
//! NaN (a partial row left unwritten poisons `dw`); a rerun is bit-identical; two launches.
#![cfg(feature = "cuda")]

use gated_lm::backend::cuda::ops::{self, DeviceRope, HeadRows, Operand};
use gated_lm::backend::cuda::runtime::{down_f32, up_f32, DBuf, Device};

mod common;
use common::cuda_devices as devices;
use common::recording::Recording;

fn randn(n: usize, seed: u64, std: f64) -> Vec<f32> {
    let mut r = gated_lm::rng::Rng::new(seed);
    (0..n).map(|_| (r.normal() * std) as f32).collect()
}

fn bits(dev: &dyn Device, b: &DBuf) -> Vec<u32> {
    down_f32(dev, b).unwrap().iter().map(|x| x.to_bits()).collect()
}

/// Each column of `got` against `dw0 + Σ_rows term` (`sum`, in f64) within 4e-6 of
/// `|dw0| + Σ_rows |term|` (`mag`): a bound on f32 sums a few dozen additions deep, where a row
/// missed or counted twice moves a column by about `mag / rows` (over 1e-4 of it here).
fn sums_close(what: &str, got: &[f32], sum: &[f64], mag: &[f64]) {
    assert_eq!(got.len(), sum.len(), "{what}");
    for (c, ((&g, &s), &m)) in got.iter().zip(sum).zip(mag).enumerate() {
        let err = (g as f64 - s).abs();
        assert!(
            err <= 4e-6 * m,
            "{what}: column {c}: {g} vs {s} (error {err:.3e}, Σ|terms| {m:.3e})"
        );
    }
}

/// `got` within `1e-5` of `want`'s largest entry, element for element (NaN fails).
fn close(what: &str, got: &[f32], want: &[f64]) {
    let scale = want.iter().fold(1e-6f64, |a, v| a.max(v.abs()));
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g as f64 - w).abs() <= 1e-5 * scale,
            "{what}: element {i}: {g} vs {w} (scale {scale})"
        );
    }
}

#[test]
fn rmsnorm_gain_gradient_sums_every_row_once() {
    // (rows, d): one row; fewer rows than blocks (a row per block); 1025 rows in spans of 2 (the
    // last block one row); 5000 in spans of 5 (even); 5003 in spans of 5 (the last 3 rows);
    // rows wider than the shared-memory sums (8200 floats > 32 KiB)
    let cases = [(1, 96), (37, 300), (1025, 96), (5000, 96), (5003, 768), (3, 8200)];
    for dev in devices() {
        let dev = dev.as_ref();
        for (i, &(rows, d)) in cases.iter().enumerate() {
            let (zc, acc) = (i % 2 == 1, i % 3 == 2);
            let what = format!(
                "rmsnorm_bwd {rows}×{d} (zero-centred {zc}, accumulate {acc}) on {}",
                dev.describe()
            );
            let n = rows * d;
            let s = 100 + 10 * i as u64;
            let (x, w, dy) = (randn(n, s, 3.0), randn(d, s + 1, 0.5), randn(n, s + 2, 1.0));
            let (dx0, dw0) = (randn(n, s + 3, 1.0), randn(d, s + 4, 1.0));
            let up = |v: &[f32]| up_f32(dev, v).unwrap();
            let (xb, wb, dyb, rb) = (up(&x), up(&w), up(&dy), up(&vec![f32::NAN; rows]));
            ops::rmsnorm_fwd(dev, &xb, &wb, &up(&vec![0.0; n]), &rb, rows, d, 1e-6, zc).unwrap();
            let r = down_f32(dev, &rb).unwrap();
            // the reference from the forward's rstd, in f64
            let gain: Vec<f64> = w.iter().map(|&v| v as f64 + if zc { 1.0 } else { 0.0 }).collect();
            let (mut want_dx, mut sum, mut mag) = (vec![0f64; n], vec![0f64; d], vec![0f64; d]);
            for c in 0..d {
                sum[c] = dw0[c] as f64;
                mag[c] = sum[c].abs();
            }
            for row in 0..rows {
                let (o, r) = (row * d, r[row] as f64);
                let xh = |j: usize| x[o + j] as f64 * r;
                let mean = (0..d).map(|j| dy[o + j] as f64 * gain[j] * xh(j)).sum::<f64>() / d as f64;
                for j in 0..d {
                    let g = r * (dy[o + j] as f64 * gain[j] - xh(j) * mean);
                    want_dx[o + j] = if acc { dx0[o + j] as f64 + g } else { g };
                    let t = dy[o + j] as f64 * xh(j);
                    sum[j] += t;
                    mag[j] += t.abs();
                }
            }
            let mut runs = Vec::new();
            for _ in 0..2 {
                let rec = Recording::new(dev);
                let dx = if acc { up(&dx0) } else { up(&vec![f32::NAN; n]) };
                let (dw, part) = (up(&dw0), up(&vec![f32::NAN; ops::norm_bwd_scratch_len(rows, d)]));
                let io = (&xb, &wb, &rb, &dyb, &dx, &dw);
                ops::rmsnorm_bwd_with(&rec, io, rows, d, zc, acc, &part).unwrap();
                assert_eq!(*rec.launches.borrow(), ["rmsnorm_bwd", "colsum_final"], "{what}");
                runs.push((bits(dev, &dx), bits(dev, &dw)));
            }
            assert_eq!(runs[0], runs[1], "{what}: a rerun differs");
            let f = |b: &[u32]| -> Vec<f32> { b.iter().map(|&u| f32::from_bits(u)).collect() };
            close(&format!("{what}: dx"), &f(&runs[0].0), &want_dx);
            sums_close(&format!("{what}: dw"), &f(&runs[0].1), &sum, &mag);
        }
    }
}

/// Rᵀ·dy of one head row (`dy` its hd values, `cos`/`sin` its position's `half` values): the
/// gradient at the normed, unrotated values.
fn unrotate(dy: &[f32], cos: &[f32], sin: &[f32]) -> Vec<f64> {
    let half = cos.len();
    let v = |e: usize| dy[e] as f64;
    (0..dy.len())
        .map(|e| match e {
            e if e < half => v(e) * cos[e] as f64 + v(e + half) * sin[e] as f64,
            e if e < 2 * half => v(e) * cos[e - half] as f64 - v(e - half) * sin[e - half] as f64,
            e => v(e),
        })
        .collect()
}

#[test]
fn qknorm_gain_gradient_sums_every_head_row_once() {
    // (rows, heads, head_dim, rotary half, seq, norm): one head row; 15 head rows (a block each,
    // 7 of its 8 warps idle) of a width that is no multiple of the warp; 1024 (a block each);
    // 1025 in spans of 2 (the last block one); 8400 in spans of 9 (the last 3); no norm (one
    // launch, no gradient)
    let cases = [
        (1, 1, 64, 32, 1, true),
        (5, 3, 48, 16, 5, true),
        (256, 4, 128, 64, 64, true),
        (1025, 1, 32, 16, 25, true),
        (700, 12, 64, 32, 50, true),
        (30, 2, 32, 16, 10, false),
    ];
    for dev in devices() {
        let dev = dev.as_ref();
        for (i, &(rows, heads, hd, half, seq, normed)) in cases.iter().enumerate() {
            let zc = i % 2 == 0;
            let what = format!("qknorm_rope_bwd {rows}×{heads}×{hd} (case {i}) on {}", dev.describe());
            let (hr, n) = (rows * heads, rows * heads * hd);
            let s = 200 + 10 * i as u64;
            let angles = randn(seq * half, s, 2.0);
            let cos: Vec<f32> = angles.iter().map(|a| a.cos()).collect();
            let sin: Vec<f32> = angles.iter().map(|a| a.sin()).collect();
            let rope = DeviceRope::upload(dev, &cos, &sin, 2 * half, seq).unwrap();
            let (x, dy, w, dw0) = (
                randn(n, s + 1, 2.0),
                randn(n, s + 2, 1.0),
                randn(hd, s + 3, 0.5),
                randn(hd, s + 4, 1.0),
            );
            let up = |v: &[f32]| up_f32(dev, v).unwrap();
            let (xb, dyb, wb) = (up(&x), up(&dy), up(&w));
            let h = HeadRows {
                rows,
                heads,
                head_dim: hd,
                seq,
                norm: normed.then_some(&wb),
                zero_centered: zc,
            };
            let rstd = up(&vec![f32::NAN; hr]);
            ops::qknorm_rope_fwd(dev, &h, &rope, &xb, &up(&vec![0.0; n]), &rstd, 1e-6).unwrap();
            let r = down_f32(dev, &rstd).unwrap();
            let gain: Vec<f64> = w.iter().map(|&v| v as f64 + if zc { 1.0 } else { 0.0 }).collect();
            let (mut want_dx, mut sum, mut mag) = (vec![0f64; n], vec![0f64; hd], vec![0f64; hd]);
            for e in 0..hd {
                sum[e] = dw0[e] as f64;
                mag[e] = sum[e].abs();
            }
            for wi in 0..hr {
                let (o, p) = (wi * hd, (wi / heads % seq) * half);
                let dn = unrotate(&dy[o..o + hd], &cos[p..p + half], &sin[p..p + half]);
                if !normed {
                    (0..hd).for_each(|e| want_dx[o + e] = dn[e]);
                    continue;
                }
                let r = r[wi] as f64;
                let xh = |e: usize| x[o + e] as f64 * r;
                let mean = (0..hd).map(|e| dn[e] * gain[e] * xh(e)).sum::<f64>() / hd as f64;
                for e in 0..hd {
                    want_dx[o + e] = r * (dn[e] * gain[e] - xh(e) * mean);
                    sum[e] += dn[e] * xh(e);
                    mag[e] += (dn[e] * xh(e)).abs();
                }
            }
            let mut runs = Vec::new();
            for _ in 0..2 {
                let rec = Recording::new(dev);
                let (dx, dw) = (up(&vec![f32::NAN; n]), up(&dw0));
                let part = up(&vec![f32::NAN; ops::norm_bwd_scratch_len(hr, hd)]);
                let dwo = normed.then_some(&dw);
                let ins = ((&xb).into(), &rstd, &dyb);
                ops::qknorm_rope_bwd_to(&rec, &h, &rope, ins, Operand::from(&dx), &part, dwo).unwrap();
                let want: &[&str] = if normed {
                    &["qknorm_rope_bwd", "colsum_final"]
                } else {
                    &["qknorm_rope_bwd"]
                };
                assert_eq!(*rec.launches.borrow(), want, "{what}");
                runs.push((bits(dev, &dx), bits(dev, &dw)));
            }
            assert_eq!(runs[0], runs[1], "{what}: a rerun differs");
            let f = |b: &[u32]| -> Vec<f32> { b.iter().map(|&u| f32::from_bits(u)).collect() };
            close(&format!("{what}: dx"), &f(&runs[0].0), &want_dx);
            if normed {
                sums_close(&format!("{what}: dw"), &f(&runs[0].1), &sum, &mag);
            } else {
                assert_eq!(f(&runs[0].1), dw0, "{what}: dw without a norm");
            }
        }
    }
}
