//! The kernels that write a GEMM operand in bf16 themselves (mixed precision without cast
//! launches): each bf16 output is, bit for bit, the round-to-nearest-even of what the f32 kernel
//! writes from the same inputs, and every other output equals the f32 kernel's; the fused
//! residual add + RMSNorm equals `add` then `rmsnorm_fwd` bit for bit; and output sizes are
//! checked for the output's own type. On the CPU emulator always, and on a GPU when there is one.
#![cfg(feature = "cuda")]

use gated_lm::backend::cuda::ops::{self, AttnDims, Cols, DeviceRope, FusedGate, HeadRows, Operand};
use gated_lm::backend::cuda::runtime::{down_f32, down_u16, up_f32, DBuf, Device};

mod common;
use common::bufs::*;
use common::cuda_devices as devices;

fn bits(dev: &dyn Device, b: &DBuf) -> Vec<u32> {
    down_f32(dev, b).unwrap().iter().map(|x| x.to_bits()).collect()
}

/// The bf16 output `got` is the round-to-nearest-even of the f32 output `of`, element for
/// element (and the f32 output is a real result: finite, not all zero).
fn rounds(what: &str, dev: &dyn Device, got: &DBuf, of: &DBuf) {
    rounds_within(what, dev, got, of, 0);
}

/// As [`rounds`], up to `ulps` bf16 units in the last place (two library GEMMs may sum in
/// different orders, and so round an f32 result near a tie to neighbouring bf16 values).
fn rounds_within(what: &str, dev: &dyn Device, got: &DBuf, of: &DBuf, ulps: i32) {
    let (got, of) = (down_u16(dev, got).unwrap(), down_f32(dev, of).unwrap());
    assert_eq!(got.len(), of.len(), "{what}");
    assert!(
        of.iter().all(|x| x.is_finite()) && of.iter().any(|&x| x != 0.0),
        "{what}"
    );
    for (i, (&g, &x)) in got.iter().zip(&of).enumerate() {
        let want = half::bf16::from_f32(x).to_bits();
        assert!(
            (g as i32 - want as i32).abs() <= ulps,
            "{what}: element {i}: f32 {x} gave bf16 {g:#06x}, not {want:#06x}"
        );
    }
}

/// RMSNorm forward with a bf16 output, in both norm styles; rows of a width that leaves some
/// threads of a block idle.
#[test]
fn rmsnorm_forward_writes_bf16() {
    let (rows, d, eps) = (37, 300, 1e-6);
    let n = rows * d;
    for dev in devices() {
        let dev = dev.as_ref();
        let (x, w) = (randn(n, 1, 3.0), randn(d, 3, 0.5));
        let (xb, wb) = (up_f32(dev, &x).unwrap(), up_f32(dev, &w).unwrap());
        for zc in [false, true] {
            let what = |s: &str| format!("{s} (zero-centred {zc}) on {}", dev.describe());
            // the f32 kernel, then the bf16 one on the same input
            let (y, r) = (nan_f32(dev, n), nan_f32(dev, rows));
            ops::rmsnorm_fwd(dev, &xb, &wb, &y, &r, rows, d, eps, zc).unwrap();
            let (yb, rb) = (nan_bf16(dev, n), nan_f32(dev, rows));
            ops::rmsnorm_fwd_to(dev, &xb, &wb, Operand::bf16(&yb), &rb, rows, d, eps, zc).unwrap();
            rounds(&what("rmsnorm_fwd_bf16 y"), dev, &yb, &y);
            assert_eq!(bits(dev, &rb), bits(dev, &r), "{}", what("rmsnorm_fwd_bf16 rstd"));
        }
    }
}

/// RMSNorm backward writing a bf16 copy of the `dx` it leaves (overwritten or accumulated):
/// `dx` and the gain's gradient as without the copy, the copy its rounding.
#[test]
fn rmsnorm_backward_writes_a_bf16_copy_of_dx() {
    let (rows, d) = (37, 300);
    let n = rows * d;
    for dev in devices() {
        let dev = dev.as_ref();
        let (x, w, dy, dx0) = (randn(n, 4, 3.0), randn(d, 5, 0.5), randn(n, 6, 1.0), randn(n, 7, 1.0));
        let up = |v: &[f32]| up_f32(dev, v).unwrap();
        let (xb, wb, dyb) = (up(&x), up(&w), up(&dy));
        for (zc, acc) in [(false, false), (true, true), (false, true)] {
            let what = |s: &str| format!("{s} (zero-centred {zc}, accumulate {acc}) on {}", dev.describe());
            let r = nan_f32(dev, rows);
            ops::rmsnorm_fwd(dev, &xb, &wb, &nan_f32(dev, n), &r, rows, d, 1e-6, zc).unwrap();
            let sc = &nan_f32(dev, ops::norm_bwd_scratch_len(rows, d));
            let (dx, dw) = (up(&dx0), up(&w));
            ops::rmsnorm_bwd_with(dev, (&xb, &wb, &r, &dyb, &dx, &dw), rows, d, zc, acc, sc).unwrap();
            let (dx2, dw2, dxb) = (up(&dx0), up(&w), nan_bf16(dev, n));
            let io = (&xb, &wb, &r, &dyb, &dx2, &dw2);
            ops::rmsnorm_bwd_to(dev, io, Some(&dxb), rows, d, zc, acc, sc).unwrap();
            assert_eq!(bits(dev, &dx2), bits(dev, &dx), "{}", what("rmsnorm_bwd_bf16 dx"));
            assert_eq!(bits(dev, &dw2), bits(dev, &dw), "{}", what("rmsnorm_bwd_bf16 dw"));
            rounds(&what("rmsnorm_bwd_bf16 dx copy"), dev, &dxb, &dx);
        }
    }
}

/// SwiGLU (on the stacked gate/up layout) in mixed precision: gu and dm in bf16 (as the GEMMs
/// write them), m and the stacked dgu written in bf16 — each the rounding of what the f32 kernels
/// compute from the same (bf16-representable) inputs.
#[test]
fn swiglu_runs_in_bf16() {
    let (rows, ff) = (29, 104);
    let n = rows * ff;
    let bf16_values = |v: Vec<f32>| -> Vec<f32> { v.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect() };
    let (gu_v, dm_v) = (bf16_values(randn(2 * n, 8, 2.0)), bf16_values(randn(n, 10, 1.0)));
    for dev in devices() {
        let dev = dev.as_ref();
        let (gu, dm) = (up_f32(dev, &gu_v).unwrap(), up_f32(dev, &dm_v).unwrap());
        let (gub, dmb) = (up_bf16(dev, &gu_v), up_bf16(dev, &dm_v));
        let on = dev.describe();
        let (m, mb) = (nan_f32(dev, n), nan_bf16(dev, n));
        ops::swiglu_fwd(dev, (&gu).into(), (&m).into(), rows, ff).unwrap();
        ops::swiglu_fwd(dev, Operand::bf16(&gub), Operand::bf16(&mb), rows, ff).unwrap();
        rounds(&format!("swiglu_fwd_bf16 m on {on}"), dev, &mb, &m);
        let (dgu, dgub) = (nan_f32(dev, 2 * n), nan_bf16(dev, 2 * n));
        let (m2, mb2) = (nan_f32(dev, n), nan_bf16(dev, n));
        let outs = ((&dgu).into(), (&m2).into());
        ops::swiglu_bwd(dev, (&gu).into(), (&dm).into(), outs, rows, ff).unwrap();
        let bf = (Operand::bf16(&gub), Operand::bf16(&dmb), Operand::bf16(&dgub));
        ops::swiglu_bwd(dev, bf.0, bf.1, (bf.2, Operand::bf16(&mb2)), rows, ff).unwrap();
        rounds(&format!("swiglu_bwd_bf16 dgu on {on}"), dev, &dgub, &dgu);
        // the backward's m is the forward's, bit for bit (the down weight's gradient reads it)
        assert_eq!(
            down_u16(dev, &mb2).unwrap(),
            down_u16(dev, &mb).unwrap(),
            "bf16 m again on {on}"
        );
        // ff = 104 takes 16 bytes (8 bf16) per access; the same tensors one element past a
        // 16-byte boundary go one element at a time: bit for bit the same outputs
        // `len` elements from element 1 of a buffer of len + 1
        let past1 = |b: DBuf, len: usize| DBuf::view(&std::rc::Rc::new(b), 2, 2 * len).unwrap();
        let at1 = |v: &[f32]| up_bf16(dev, &[&[0.0][..], v].concat());
        let (gu1, dm1) = (past1(at1(&gu_v), 2 * n), past1(at1(&dm_v), n));
        let (m1, dgu1, m1b) = (
            past1(nan_bf16(dev, n + 1), n),
            past1(nan_bf16(dev, 2 * n + 1), 2 * n),
            past1(nan_bf16(dev, n + 1), n),
        );
        ops::swiglu_fwd(dev, Operand::bf16(&gu1), Operand::bf16(&m1), rows, ff).unwrap();
        let outs = (Operand::bf16(&dgu1), Operand::bf16(&m1b));
        ops::swiglu_bwd(dev, Operand::bf16(&gu1), Operand::bf16(&dm1), outs, rows, ff).unwrap();
        for (what, got, of) in [("m", &m1, &mb), ("dgu", &dgu1, &dgub), ("m again", &m1b, &mb2)] {
            let (got, of) = (down_u16(dev, got).unwrap(), down_u16(dev, of).unwrap());
            assert_eq!(got, of, "bf16 {what} one element at a time vs 8 at a time on {on}");
        }
    }
}

/// `dx`, `Σ dwp` of QK-norm + RoPE's backward in f64 from its definition: dn = Rᵀ·dy per
/// (row, head), then RMSNorm's backward with the forward's `rstd` (no norm: dx = dn).
fn qknorm_rope_bwd_ref(
    (rows, heads, hd, half, seq): (usize, usize, usize, usize, usize),
    (cos, sin): (&[f32], &[f32]),
    x: &[f32],
    rstd: &[f32],
    dy: &[f32],
    gain: Option<Vec<f64>>,
) -> (Vec<f32>, Vec<f32>) {
    let (mut dx, mut dw) = (vec![0f32; x.len()], vec![0f64; hd]);
    for (wi, &r) in rstd.iter().enumerate().take(rows * heads) {
        let (b, p) = (wi * hd, (wi / heads % seq) * half);
        let dyv = |e: usize| dy[b + e] as f64;
        let dn: Vec<f64> = (0..hd)
            .map(|e| match e {
                e if e < half => dyv(e) * cos[p + e] as f64 + dyv(e + half) * sin[p + e] as f64,
                e if e < 2 * half => dyv(e) * cos[p + e - half] as f64 - dyv(e - half) * sin[p + e - half] as f64,
                e => dyv(e),
            })
            .collect();
        let Some(g) = &gain else {
            (0..hd).for_each(|e| dx[b + e] = dn[e] as f32);
            continue;
        };
        let r = r as f64;
        let xh: Vec<f64> = (0..hd).map(|e| x[b + e] as f64 * r).collect();
        let mean = (0..hd).map(|e| dn[e] * g[e] * xh[e]).sum::<f64>() / hd as f64;
        for e in 0..hd {
            dx[b + e] = (r * (dn[e] * g[e] - xh[e] * mean)) as f32;
            dw[e] += dn[e] * xh[e];
        }
    }
    (dx, dw.iter().map(|&v| v as f32).collect())
}

/// QK-norm + RoPE writing its outputs in bf16: the forward's rotated q/k (the tensor-core
/// attention's input; `rstd` identical) and the backward's dx; and the f32 backward (which
/// recomputes Rᵀ·dy instead of keeping it in dx) against an f64 reference: partial rotary (a
/// half that is not a multiple of the warp), both norm styles, no norm.
#[test]
fn qknorm_rope_writes_bf16() {
    // (rows, seq, heads, head_dim, rotary half, norm: None / zero-centred)
    let cases = [
        (12, 6, 3, 32, 8, Some(false)),
        (10, 5, 2, 64, 32, Some(true)),
        (8, 4, 2, 16, 8, None),
    ];
    for dev in devices() {
        let dev = dev.as_ref();
        for (i, &(rows, seq, heads, hd, half, norm)) in cases.iter().enumerate() {
            let what = |s: &str| format!("{s} (case {i}) on {}", dev.describe());
            let s = i as u64 * 10;
            let n = rows * heads * hd;
            let angles = randn(seq * half, 20 + s, 2.0);
            let cos: Vec<f32> = angles.iter().map(|a| a.cos()).collect();
            let sin: Vec<f32> = angles.iter().map(|a| a.sin()).collect();
            let rope = DeviceRope::upload(dev, &cos, &sin, 2 * half, seq).unwrap();
            let (x, dy, w) = (randn(n, 21 + s, 2.0), randn(n, 22 + s, 1.0), randn(hd, 23 + s, 0.5));
            let up = |v: &[f32]| up_f32(dev, v).unwrap();
            let (xb, dyb, wb) = (up(&x), up(&dy), up(&w));
            let h = HeadRows {
                rows,
                heads,
                head_dim: hd,
                seq,
                norm: norm.map(|_| &wb),
                zero_centered: norm == Some(true),
            };
            let (y, rstd) = (nan_f32(dev, n), nan_f32(dev, rows * heads));
            ops::qknorm_rope_fwd(dev, &h, &rope, &xb, &y, &rstd, 1e-6).unwrap();
            let (yb, rstd_b) = (nan_bf16(dev, n), nan_f32(dev, rows * heads));
            ops::qknorm_rope_fwd_to(dev, &h, &rope, (&xb).into(), Operand::bf16(&yb), &rstd_b, 1e-6).unwrap();
            rounds(&what("qknorm_rope_fwd_bf16 y"), dev, &yb, &y);
            if norm.is_some() {
                assert_eq!(
                    bits(dev, &rstd_b),
                    bits(dev, &rstd),
                    "{}",
                    what("qknorm_rope_fwd_bf16 rstd")
                );
            }
            let sc = &nan_f32(dev, ops::norm_bwd_scratch_len(rows * heads, hd));
            let (dx, dw) = (nan_f32(dev, n), up(&vec![0.0; hd]));
            let dwo = norm.map(|_| &dw);
            ops::qknorm_rope_bwd_with(dev, &h, &rope, (&xb, &rstd, &dyb), &dx, sc, dwo).unwrap();
            let gain = norm.map(|zc| w.iter().map(|&v| v as f64 + if zc { 1.0 } else { 0.0 }).collect());
            let r = down_f32(dev, &rstd).unwrap();
            let (want_dx, want_dw) = qknorm_rope_bwd_ref((rows, heads, hd, half, seq), (&cos, &sin), &x, &r, &dy, gain);
            let close = |what: &str, got: &[f32], want: &[f32]| {
                let scale = want.iter().fold(1e-6f32, |a, v| a.max(v.abs()));
                let err = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(err <= 1e-5 * scale, "{what}: differs by {err} (scale {scale})");
            };
            close(&what("qknorm_rope_bwd dx"), &down_f32(dev, &dx).unwrap(), &want_dx);
            if norm.is_some() {
                close(&what("qknorm_rope_bwd dw"), &down_f32(dev, &dw).unwrap(), &want_dw);
            }
            let (dxb, dw2) = (nan_bf16(dev, n), up(&vec![0.0; hd]));
            let dwo2 = norm.map(|_| &dw2);
            let ins = ((&xb).into(), &rstd, &dyb);
            ops::qknorm_rope_bwd_to(dev, &h, &rope, ins, Operand::bf16(&dxb), sc, dwo2).unwrap();
            rounds(&what("qknorm_rope_bwd_bf16 dx"), dev, &dxb, &dx);
            assert_eq!(bits(dev, &dw2), bits(dev, &dw), "{}", what("qknorm_rope_bwd_bf16 dw"));
        }
    }
}

/// An output of either type as bits (f32 as its two bf16 halves' bits), checked to be a real
/// result: finite and not all zero.
fn out_bits(what: &str, dev: &dyn Device, b: &DBuf, bf16: bool) -> Vec<u16> {
    let v = down_u16(dev, b).unwrap();
    let vals: Vec<f32> = match bf16 {
        true => v.iter().map(|&h| half::bf16::from_bits(h).to_f32()).collect(),
        false => down_f32(dev, b).unwrap(),
    };
    assert!(
        vals.iter().all(|x| x.is_finite()) && vals.iter().any(|&x| x != 0.0),
        "{what}"
    );
    v
}

/// QK-norm + RoPE reading its pre-norm input in bf16 (the q/k projections' GEMM output in mixed
/// precision): on bf16-representable values, forward (`y` and `rstd`) and backward (`dx` and
/// the gain's gradient) equal the f32-input kernels' bit for bit, for each output type; head_dim
/// 64 and 128, q-like and GQA kv-like head counts, no norm and both norm styles.
#[test]
fn qknorm_rope_reads_bf16() {
    let (rows, seq) = (6, 3);
    for dev in devices() {
        let dev = dev.as_ref();
        let mut case = 0u64;
        for (hd, heads, norm) in [64, 128]
            .into_iter()
            .flat_map(|hd| [3, 1].map(|heads| (hd, heads)))
            .flat_map(|(hd, heads)| [None, Some(false), Some(true)].map(|n| (hd, heads, n)))
        {
            case += 1;
            let what = |s: &str| format!("{s} (hd {hd}, {heads} heads, norm {norm:?}) on {}", dev.describe());
            let (n, half, s) = (rows * heads * hd, hd / 2, case * 10);
            let angles = randn(seq * half, 40 + s, 2.0);
            let cos: Vec<f32> = angles.iter().map(|a| a.cos()).collect();
            let sin: Vec<f32> = angles.iter().map(|a| a.sin()).collect();
            let rope = DeviceRope::upload(dev, &cos, &sin, 2 * half, seq).unwrap();
            // x bf16-representable, so both kernels read the same values
            let x: Vec<f32> = randn(n, 41 + s, 2.0)
                .iter()
                .map(|&v| half::bf16::from_f32(v).to_f32())
                .collect();
            let (xf, xh) = (up_f32(dev, &x).unwrap(), up_bf16(dev, &x));
            let (dy, wb) = (
                up_f32(dev, &randn(n, 42 + s, 1.0)).unwrap(),
                up_f32(dev, &randn(hd, 43 + s, 0.5)).unwrap(),
            );
            let h = HeadRows {
                rows,
                heads,
                head_dim: hd,
                seq,
                norm: norm.map(|_| &wb),
                zero_centered: norm == Some(true),
            };
            let ins = [Operand::from(&xf), Operand::bf16(&xh)];
            for bf16_out in [false, true] {
                let out = |k: usize| if bf16_out { nan_bf16(dev, k) } else { nan_f32(dev, k) };
                let (mut ys, mut dxs) = (Vec::new(), Vec::new());
                for x in ins {
                    let (y, rstd) = (out(n), nan_f32(dev, rows * heads));
                    ops::qknorm_rope_fwd_to(dev, &h, &rope, x, typed(&y, bf16_out), &rstd, 1e-6).unwrap();
                    let y = out_bits(&what("qknorm_rope_fwd y"), dev, &y, bf16_out);
                    let sc = nan_f32(dev, ops::norm_bwd_scratch_len(rows * heads, hd));
                    let (dx, dw) = (out(n), up_f32(dev, &vec![0.0; hd]).unwrap());
                    let dwo = norm.map(|_| &dw);
                    ops::qknorm_rope_bwd_to(dev, &h, &rope, (x, &rstd, &dy), typed(&dx, bf16_out), &sc, dwo).unwrap();
                    let dx = out_bits(&what("qknorm_rope_bwd dx"), dev, &dx, bf16_out);
                    let dw = norm.map(|_| bits(dev, &dw));
                    ys.push((y, norm.map(|_| bits(dev, &rstd))));
                    dxs.push((dx, dw));
                }
                let types = format!("bf16 x, {} out", if bf16_out { "bf16" } else { "f32" });
                assert!(
                    ys[0] == ys[1],
                    "{}",
                    what(&format!("qknorm_rope_fwd y, rstd ({types})"))
                );
                assert!(
                    dxs[0] == dxs[1],
                    "{}",
                    what(&format!("qknorm_rope_bwd dx, dw ({types})"))
                );
            }
        }
    }
}

/// Cross-entropy writing the logits' gradient in bf16 (for the LM head's backward GEMMs):
/// the rounding of the in-place f32 gradient, the same per-row losses, and the logits left
/// as they were; an ignored target gives a zero row. A vocabulary that leaves threads idle.
#[test]
fn cross_entropy_writes_the_bf16_gradient() {
    let (rows, vocab, scale) = (9, 1000, 1.0 / 7.0);
    let n = rows * vocab;
    for dev in devices() {
        let dev = dev.as_ref();
        let what = |s: &str| format!("{s} on {}", dev.describe());
        let logits = randn(n, 30, 3.0);
        let mut r = gated_lm::rng::Rng::new(31);
        let mut t: Vec<i32> = (0..rows).map(|_| r.below(vocab as u64) as i32).collect();
        t[4] = -1;
        let targets = gated_lm::backend::cuda::runtime::up_i32(dev, &t).unwrap();
        let (grad, loss) = (up_f32(dev, &logits).unwrap(), nan_f32(dev, rows));
        ops::cross_entropy(dev, &grad, &targets, &loss, rows, vocab, scale).unwrap();
        let (lb, gb, loss_b) = (up_f32(dev, &logits).unwrap(), nan_bf16(dev, n), nan_f32(dev, rows));
        let scale_b = up_f32(dev, &[scale]).unwrap();
        ops::cross_entropy_to(dev, &lb, Some(&gb), &targets, &loss_b, rows, vocab, &scale_b).unwrap();
        rounds(&what("cross_entropy_fwd_bwd_bf16 gradient"), dev, &gb, &grad);
        assert_eq!(
            bits(dev, &loss_b),
            bits(dev, &loss),
            "{}",
            what("cross_entropy_fwd_bwd_bf16 loss")
        );
        let kept: Vec<u32> = logits.iter().map(|x| x.to_bits()).collect();
        assert_eq!(bits(dev, &lb), kept, "{}", what("cross_entropy_fwd_bwd_bf16 logits"));
        let row4 = &down_u16(dev, &gb).unwrap()[4 * vocab..5 * vocab];
        assert!(row4.iter().all(|&g| g == 0), "{}", what("ignored row"));
    }
}

/// GEMMs writing a bf16 output from bf16 operands (the v projection straight into the
/// tensor-core attention's input): `y = x·Wᵀ`, and `C = A·B + C` with a transposed operand
/// and a bf16 `C` read back. The portable kernel rounds the f32 result it would write; a
/// library (cuBLASLt) may pick another summation order for the bf16 output, so there within
/// one bf16 ulp. f32 operands with a bf16 output are refused.
#[test]
fn gemm_writes_a_bf16_output() {
    use gated_lm::backend::cuda::ops::{DType, Strided};
    let (rows, din, dout) = (70, 40, 130); // not multiples of the 64×64×16 tiles
    for dev in devices() {
        let dev = dev.as_ref();
        let what = |s: &str| format!("{s} on {}", dev.describe());
        let ulps = if dev.describe().contains("cuBLASLt") { 1 } else { 0 };
        let (x, w) = (
            up_bf16(dev, &randn(rows * din, 60, 1.0)),
            up_bf16(dev, &randn(dout * din, 61, 0.5)),
        );
        let (y, yb) = (nan_f32(dev, rows * dout), nan_bf16(dev, rows * dout));
        ops::linear_fwd(dev, Operand::bf16(&x), Operand::bf16(&w), &y, rows, din, dout).unwrap();
        ops::linear_fwd_to(
            dev,
            Operand::bf16(&x),
            Operand::bf16(&w),
            Operand::bf16(&yb),
            rows,
            din,
            dout,
        )
        .unwrap();
        rounds_within(&what("linear_fwd bf16 y"), dev, &yb, &y, ulps);

        // C[dout, din] = xᵀ-like: A = yᵀ (column-major view of y's bf16 copy), B = x, plus C
        let c0 = randn(dout * din, 62, 1.0);
        let c0_rounded: Vec<f32> = c0.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect();
        let (c, cb) = (up_f32(dev, &c0_rounded).unwrap(), up_bf16(dev, &c0));
        let s = |buf, rs, cs| Strided {
            buf,
            dtype: DType::Bf16,
            rs,
            cs,
        };
        let (a, b) = (s(&yb, 1, dout), s(&x, din, 1));
        ops::gemm(dev, (dout, din, rows), a, b, &c, din, 1.0, 1.0).unwrap();
        ops::gemm_to(dev, (dout, din, rows), a, b, Operand::bf16(&cb), din, 1.0, 1.0).unwrap();
        rounds_within(&what("gemm bf16 C += Aᵀ·B"), dev, &cb, &c, ulps);

        let xf = up_f32(dev, &randn(rows * din, 63, 1.0)).unwrap();
        let wf = up_f32(dev, &randn(dout * din, 64, 1.0)).unwrap();
        let e = ops::linear_fwd_to(dev, (&xf).into(), (&wf).into(), Operand::bf16(&yb), rows, din, dout);
        assert!(format!("{}", e.unwrap_err()).contains("needs bf16 operands"));
    }
}

/// Shapes of the attention tests: 70 rows per sequence (a partial 64-row block), grouped KV.
fn attn_dims(head_dim: usize) -> AttnDims {
    AttnDims {
        batch: 2,
        seq: 70,
        heads: 2,
        kv_heads: 1,
        head_dim,
    }
}

/// The gate logits `z` of `gate` for `d` (none: no buffer).
fn gate_logits(dev: &dyn Device, d: &AttnDims, gate: FusedGate, seed: u64) -> Option<DBuf> {
    let n = match gate {
        FusedGate::None => return None,
        FusedGate::Elementwise => d.batch * d.seq * d.heads * d.head_dim,
        FusedGate::Headwise => d.batch * d.seq * d.heads,
    };
    Some(up_f32(dev, &randn(n, seed, 1.5)).unwrap())
}

/// The attention forward writing the gated output `y` in bf16 (the o_proj GEMMs' input): the
/// f32 kernels for every head dim and the tensor-core ones (64, 128), each gate: `y` the
/// rounding of the f32 kernel's, `o` and `lse` identical.
#[test]
fn attention_forward_writes_y_in_bf16() {
    let gates = [FusedGate::None, FusedGate::Elementwise, FusedGate::Headwise];
    for dev in devices() {
        let dev = dev.as_ref();
        for (i, &(hd, tc)) in [
            (16, false),
            (32, false),
            (64, false),
            (128, false),
            (64, true),
            (128, true),
        ]
        .iter()
        .enumerate()
        {
            let (d, gate) = (attn_dims(hd), gates[i % 3]);
            let what = |s: &str| format!("{s} (hd {hd}, tensor cores {tc}, {gate:?}) on {}", dev.describe());
            let (nq, nkv, nl) = (
                d.batch * d.seq * d.heads * hd,
                d.batch * d.seq * hd,
                d.batch * d.heads * d.seq,
            );
            let s = 40 + 10 * i as u64;
            let (q, k, v) = (randn(nq, s, 1.0), randn(nkv, s + 1, 1.0), randn(nkv, s + 2, 1.0));
            let z = gate_logits(dev, &d, gate, s + 3);
            let (qb, kb, vb) = match tc {
                true => (up_bf16(dev, &q), up_bf16(dev, &k), up_bf16(dev, &v)),
                false => (
                    up_f32(dev, &q).unwrap(),
                    up_f32(dev, &k).unwrap(),
                    up_f32(dev, &v).unwrap(),
                ),
            };
            let run = |y: Operand| {
                let (o, lse) = (nan_f32(dev, nq), nan_f32(dev, nl));
                match tc {
                    true => {
                        let (z, oo) = (z.as_ref().map(Operand::from), Operand::from(&o));
                        ops::attention_forward_tc_to(dev, &d, gate, &qb, &kb, &vb, z, oo, y, &lse)
                    }
                    false => ops::attention_fwd_to(dev, &d, gate, &qb, &kb, &vb, z.as_ref(), &o, y, &lse),
                }
                .unwrap();
                (bits(dev, &o), bits(dev, &lse))
            };
            let (y, yb) = (nan_f32(dev, nq), nan_bf16(dev, nq));
            let f32_out = run((&y).into());
            assert_eq!(run(Operand::bf16(&yb)), f32_out, "{}", what("o, lse"));
            rounds(&what("attention forward y"), dev, &yb, &y);
        }
    }
}

/// The attention backward writing `dv` and `dz` (the v and gate projections' output
/// gradients) in bf16: the f32 kernels for every head dim and the tensor-core ones, each gate;
/// `dv` and `dz` the rounding of the f32 kernels', `dq`, `dk` and the scratch identical.
#[test]
fn attention_backward_writes_dv_and_dz_in_bf16() {
    let gates = [FusedGate::Elementwise, FusedGate::Headwise, FusedGate::None];
    for dev in devices() {
        let dev = dev.as_ref();
        for (i, &(hd, tc)) in [
            (16, false),
            (32, false),
            (64, false),
            (128, false),
            (64, true),
            (128, true),
        ]
        .iter()
        .enumerate()
        {
            let (d, gate) = (attn_dims(hd), gates[i % 3]);
            let what = |s: &str| format!("{s} (hd {hd}, tensor cores {tc}, {gate:?}) on {}", dev.describe());
            let (nq, nkv, nl) = (
                d.batch * d.seq * d.heads * hd,
                d.batch * d.seq * hd,
                d.batch * d.heads * d.seq,
            );
            let s = 80 + 10 * i as u64;
            let (q, k, v) = (randn(nq, s, 1.0), randn(nkv, s + 1, 1.0), randn(nkv, s + 2, 1.0));
            let z = gate_logits(dev, &d, gate, s + 3);
            let dy = up_f32(dev, &randn(nq, s + 4, 1.0)).unwrap();
            let (qb, kb, vb) = match tc {
                true => (up_bf16(dev, &q), up_bf16(dev, &k), up_bf16(dev, &v)),
                false => (
                    up_f32(dev, &q).unwrap(),
                    up_f32(dev, &k).unwrap(),
                    up_f32(dev, &v).unwrap(),
                ),
            };
            let (o, y, lse) = (nan_f32(dev, nq), nan_f32(dev, nq), nan_f32(dev, nl));
            let fwd = if tc {
                ops::attention_forward_tc
            } else {
                ops::attention_fwd
            };
            fwd(dev, &d, gate, &qb, &kb, &vb, z.as_ref(), &o, &y, &lse).unwrap();
            let nz = z.as_ref().map_or(0, |z| z.bytes / 4);
            // dq, dk and the scratch's bits after a backward writing dv and dz as given
            let run = |dv: Operand, dz: Option<Operand>| {
                let scratch = ops::AttnScratch::new(dev, &d).unwrap();
                let (dq, dk) = (nan_f32(dev, nq), nan_f32(dev, nkv));
                let grads = (&dq, &dk, dv.into(), dz.map(Cols::from));
                match tc {
                    true => {
                        let ins = (&qb, &kb, &vb, z.as_ref().map(Operand::from));
                        let fwd = ((&o).into(), &lse, &dy);
                        ops::attention_backward_tc_to(dev, &d, gate, ins, fwd, &scratch, grads)
                    }
                    false => {
                        let ins = (&qb, &kb, &vb, z.as_ref());
                        ops::attention_bwd_to(dev, &d, gate, ins, (&o, &lse, &dy), &scratch, grads)
                    }
                }
                .unwrap();
                let rest = [&dq, &dk, &scratch.dout, &scratch.delta];
                rest.map(|b| bits(dev, b))
            };
            let (dv, dz) = (nan_f32(dev, nkv), nan_f32(dev, nz.max(1)));
            let f32_rest = run((&dv).into(), z.as_ref().map(|_| Operand::from(&dz)));
            let (dvb, dzb) = (nan_bf16(dev, nkv), nan_bf16(dev, nz.max(1)));
            let bf16_rest = run(Operand::bf16(&dvb), z.as_ref().map(|_| Operand::bf16(&dzb)));
            assert!(bf16_rest == f32_rest, "{}", what("dq, dk, dO, D"));
            rounds(&what("attention backward dv"), dev, &dvb, &dv);
            if z.is_some() {
                rounds(&what("attention backward dz"), dev, &dzb, &dz);
            }
        }
    }
}

/// Every bf16 output is checked for 2 bytes an element: a buffer of exactly that is accepted
/// as bf16 and refused as f32, one element less is refused; all before any launch.
#[test]
fn bf16_outputs_are_checked_for_their_own_size() {
    let emu = gated_lm::backend::cuda::emu::Emu::open().unwrap();
    let dev: &dyn Device = &emu;
    let (rows, d) = (3, 40);
    let n = rows * d;
    let f = |k: usize| dev.zeros(4 * k).unwrap();
    let (x, w, r) = (f(n), f(d), f(rows));
    let (exact, short) = (dev.zeros(2 * n).unwrap(), dev.zeros(2 * n - 2).unwrap());
    let refused = |e: anyhow::Result<()>, what: &str| {
        let e = format!("{}", e.unwrap_err());
        assert!(e.contains("buffer of"), "{what}: {e}");
    };
    let (b, s) = (Operand::bf16(&exact), Operand::bf16(&short));
    ops::rmsnorm_fwd_to(dev, &x, &w, b, &r, rows, d, 1e-6, false).unwrap();
    refused(
        ops::rmsnorm_fwd_to(dev, &x, &w, (&exact).into(), &r, rows, d, 1e-6, false),
        "f32 y",
    );
    refused(ops::rmsnorm_fwd_to(dev, &x, &w, s, &r, rows, d, 1e-6, false), "short y");
    let sc = f(ops::norm_bwd_scratch_len(rows, d));
    let io = (&x, &w, &r, &x, &x, &w);
    ops::rmsnorm_bwd_to(dev, io, Some(&exact), rows, d, false, false, &sc).unwrap();
    let e = ops::rmsnorm_bwd_to(dev, io, Some(&short), rows, d, false, false, &sc);
    refused(e, "short dx copy");
    // SwiGLU over rows × d in bf16: m and dm have n elements, the stacked gu and dgu 2·n
    let (exact2, short2) = (dev.zeros(4 * n).unwrap(), dev.zeros(4 * n - 2).unwrap());
    let (gu, gu_short) = (Operand::bf16(&exact2), Operand::bf16(&short2));
    ops::swiglu_fwd(dev, gu, b, rows, d).unwrap();
    refused(ops::swiglu_fwd(dev, gu, s, rows, d), "short m");
    refused(ops::swiglu_fwd(dev, gu_short, b, rows, d), "short gu");
    ops::swiglu_bwd(dev, gu, b, (gu, b), rows, d).unwrap();
    refused(ops::swiglu_bwd(dev, gu, b, (gu_short, b), rows, d), "short dgu");
    refused(ops::swiglu_bwd(dev, gu, s, (gu, b), rows, d), "short dm");
    refused(ops::swiglu_bwd(dev, gu, b, (gu, s), rows, d), "short recomputed m");
    let e = ops::swiglu_bwd(dev, gu, (&x).into(), (gu, b), rows, d).unwrap_err();
    assert!(format!("{e}").contains("mixed types"), "{e}");
    let e = ops::swiglu_bwd(dev, gu, b, (gu, (&x).into()), rows, d).unwrap_err();
    assert!(format!("{e}").contains("mixed types"), "{e}");
    let e = ops::swiglu_bwd(dev, gu, b, (gu, b), rows, 0).unwrap_err();
    assert!(format!("{e}").contains("width 0"), "{e}");
    let rope = DeviceRope::upload(dev, &[1.0; 8], &[0.0; 8], 8, 2).unwrap();
    let h = HeadRows {
        rows,
        heads: 2,
        head_dim: 20,
        seq: 2,
        norm: None,
        zero_centered: false,
    };
    let sc = f(ops::norm_bwd_scratch_len(rows * 2, 20));
    let rh = f(rows * 2); // rstd per (row, head)
    ops::qknorm_rope_fwd_to(dev, &h, &rope, (&x).into(), b, &rh, 1e-6).unwrap();
    refused(
        ops::qknorm_rope_fwd_to(dev, &h, &rope, (&x).into(), s, &rh, 1e-6),
        "short rotated q",
    );
    // a bf16 pre-norm input is sized as bf16
    ops::qknorm_rope_fwd_to(dev, &h, &rope, b, b, &rh, 1e-6).unwrap();
    refused(ops::qknorm_rope_fwd_to(dev, &h, &rope, s, b, &rh, 1e-6), "short bf16 q");
    let half_x = (&exact).into();
    refused(ops::qknorm_rope_fwd_to(dev, &h, &rope, half_x, b, &rh, 1e-6), "f32 q");
    refused(
        ops::qknorm_rope_bwd_to(dev, &h, &rope, (s, &r, &x), b, &sc, None),
        "short bf16 q",
    );
    let ins = ((&x).into(), &r, &x);
    ops::qknorm_rope_bwd_to(dev, &h, &rope, ins, b, &sc, None).unwrap();
    refused(ops::qknorm_rope_bwd_to(dev, &h, &rope, ins, s, &sc, None), "short dx");
    // with a norm the kernel reads rstd, [rows, heads]: `r` holds one per row
    let (gain, dw) = (f(20), f(20));
    let h = HeadRows { norm: Some(&gain), ..h };
    let e = ops::qknorm_rope_bwd_to(dev, &h, &rope, ins, b, &sc, Some(&dw));
    refused(e, "short rstd");
    // the cross-entropy's bf16 gradient: `rows × d` logits
    let t = gated_lm::backend::cuda::runtime::up_i32(dev, &[0; 3]).unwrap();
    let one = up_f32(dev, &[1.0]).unwrap();
    ops::cross_entropy_to(dev, &x, Some(&exact), &t, &r, rows, d, &one).unwrap();
    refused(
        ops::cross_entropy_to(dev, &x, Some(&short), &t, &r, rows, d, &one),
        "short logits gradient",
    );
    // a GEMM's bf16 output: y [rows, d] = x [rows, 20]·W [d, 20]ᵀ
    let (xw, ww) = (dev.zeros(2 * rows * 20).unwrap(), dev.zeros(2 * d * 20).unwrap());
    let (xo, wo) = (Operand::bf16(&xw), Operand::bf16(&ww));
    ops::linear_fwd_to(dev, xo, wo, b, rows, 20, d).unwrap();
    refused(ops::linear_fwd_to(dev, xo, wo, s, rows, 20, d), "short GEMM output");
    // the attention's y: [rows, heads·head_dim], f32 kernels and tensor-core ones
    let (d, nq, nkv) = tiny_tc_attention();
    let (q, kv, lse) = (f(nq), f(nkv), f(3 * 2));
    let (yb, ys) = (dev.zeros(2 * nq).unwrap(), dev.zeros(2 * nq - 2).unwrap());
    let (b, s) = (Operand::bf16(&yb), Operand::bf16(&ys));
    let none = FusedGate::None;
    ops::attention_fwd_to(dev, &d, none, &q, &kv, &kv, None, &q, b, &lse).unwrap();
    refused(
        ops::attention_fwd_to(dev, &d, none, &q, &kv, &kv, None, &q, s, &lse),
        "short y",
    );
    let f32_y = Operand::from(&yb);
    refused(
        ops::attention_fwd_to(dev, &d, none, &q, &kv, &kv, None, &q, f32_y, &lse),
        "f32 y",
    );
    let qo = Operand::from(&q);
    ops::attention_forward_tc_to(dev, &d, none, &q, &kv, &kv, None, qo, b, &lse).unwrap();
    refused(
        ops::attention_forward_tc_to(dev, &d, none, &q, &kv, &kv, None, qo, s, &lse),
        "short tc y",
    );
    // the backward's dv [rows, kv_heads·head_dim] and elementwise dz [rows, heads·head_dim],
    // each in its own type (here dv bf16 beside an f32 dz, and the other way round)
    let elem = FusedGate::Elementwise;
    let scratch = ops::AttnScratch::new(dev, &d).unwrap();
    let (dvb, dvs) = (dev.zeros(2 * nkv).unwrap(), dev.zeros(2 * nkv - 2).unwrap());
    let (ins, fwd) = ((&q, &kv, &kv, Some(&q)), (&q, &lse, &q));
    let bwd = |tc: bool, dv: Operand, dz: Operand| {
        let grads = (&q, &kv, dv.into(), Some(dz.into()));
        match tc {
            false => ops::attention_bwd_to(dev, &d, elem, ins, fwd, &scratch, grads),
            true => {
                let (ins, fwd) = ((&q, &kv, &kv, Some(qo)), (qo, &lse, &q));
                ops::attention_backward_tc_to(dev, &d, elem, ins, fwd, &scratch, grads)
            }
        }
    };
    for tc in [false, true] {
        bwd(tc, Operand::bf16(&dvb), (&q).into()).unwrap();
        bwd(tc, (&kv).into(), Operand::bf16(&yb)).unwrap();
        refused(bwd(tc, Operand::bf16(&dvs), (&q).into()), "short dv");
        refused(bwd(tc, Operand::from(&dvb), (&q).into()), "f32 dv");
        refused(bwd(tc, (&kv).into(), Operand::bf16(&ys)), "short dz");
    }
}
