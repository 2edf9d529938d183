//! Tensor-core primitives (mma.m16n8k16 bf16, ldmatrix and .trans) and the FlashAttention-2
//! forward built on them (kernels/attention_tc.cu), on the emulator and, where there is one, a
//! GPU. Included by tests/cuda_kernels.rs so CI runs it with the other kernel tests.

use super::{devices, randn};
use gated_lm::backend::cuda::ops::{self, AttnDims, FusedGate};
use gated_lm::backend::cuda::runtime::{down_f32, up_f32, up_u16, zeros_f32, Arg, Device, Launch};

fn bf16_bits(x: &[f32]) -> Vec<u16> {
    x.iter().map(|&a| half::bf16::from_f32(a).to_bits()).collect()
}

/// Small integers in [-range, range]: exact in bf16, and every product and sum of the 16×16
/// matmul exact in f32, so the device must match the reference bit for bit whatever order its
/// adder tree uses; distinct enough that a permuted fragment changes the result.
fn small_ints(n: usize, seed: u64, range: i64) -> Vec<f32> {
    let mut r = gated_lm::rng::Rng::new(seed);
    (0..n)
        .map(|_| (r.below(2 * range as u64 + 1) as i64 - range) as f32)
        .collect()
}

/// Runs `tc_mma_probe` with planted-bug `variant` and returns, for its two B paths (ldmatrix of
/// the n-major copy, ldmatrix.trans of the k-major copy), how many of D = A·B + C's 256
/// elements differ from the CPU's.
fn probe_mismatches(dev: &dyn Device, variant: i32) -> [usize; 2] {
    let (a, b, c) = (small_ints(256, 1, 8), small_ints(256, 2, 8), small_ints(256, 3, 50));
    // b is B row-major (B[k][n] at 16k + n): the k-major copy; bn the n-major one
    let bn: Vec<f32> = (0..256).map(|i| b[(i % 16) * 16 + i / 16]).collect();
    let want: Vec<f32> = (0..256)
        .map(|i| {
            let (r, n) = (i / 16, i % 16);
            c[i] + (0..16).map(|k| a[r * 16 + k] * b[k * 16 + n]).sum::<f32>()
        })
        .collect();
    let up = |x: &[f32]| up_u16(dev, &bf16_bits(x)).unwrap();
    let (ab, bnb, bkb, cb) = (up(&a), up(&bn), up(&b), up_f32(dev, &c).unwrap());
    let d = zeros_f32(dev, 512).unwrap();
    let args = [ab.arg(), bnb.arg(), bkb.arg(), cb.arg(), d.arg(), Arg::I32(variant)];
    dev.launch("tc_mma_probe", Launch::linear(1, 32), &args).unwrap();
    let got = down_f32(dev, &d).unwrap();
    [0, 1].map(|p| {
        (0..256)
            .filter(|&i| got[p * 256 + i].to_bits() != want[i].to_bits())
            .count()
    })
}

/// ldmatrix (A and the n-major B), ldmatrix.trans (the k-major B) and mma give exactly the CPU
/// matmul: every fragment index of the three layouts (A, B, C/D) and of both ldmatrix forms is
/// checked, since a wrong one moves some product or output to the wrong place.
#[test]
fn tensor_core_primitives_match_a_cpu_matmul_bit_exactly() {
    for dev in devices() {
        let dev = dev.as_ref();
        assert_eq!(probe_mismatches(dev, 0), [0, 0], "{}", dev.describe());
    }
}

/// The previous test is not vacuous: each planted layout bug (a kernel-side permutation of
/// fragment registers, the wrong ldmatrix form, a wrong C/D row mapping) makes it fail, on the
/// path(s) the bug touches and only there.
#[test]
fn a_wrong_fragment_layout_fails_the_primitive_test() {
    let emu = gated_lm::backend::cuda::emu::Emu::open().unwrap();
    // variant: (A regs 1↔2, bn loaded with .trans, D rows g↔g+8, B k halves of n tile 0)
    for (variant, touched) in [
        (1, [true, true]),
        (2, [true, false]),
        (3, [true, true]),
        (4, [true, false]),
    ] {
        let m = probe_mismatches(&emu, variant);
        for p in 0..2 {
            assert_eq!(
                m[p] > 0,
                touched[p],
                "variant {variant}, path {p}: {} wrong elements",
                m[p]
            );
        }
    }
}

/// mma and ldmatrix are .aligned warp collectives: a warp with fewer than 32 threads executing
/// them is an error on the emulator (undefined behaviour on a GPU).
#[test]
fn warp_collectives_need_a_full_warp() {
    let emu = gated_lm::backend::cuda::emu::Emu::open().unwrap();
    let x = zeros_f32(&emu, 512).unwrap();
    let args = [x.arg(), x.arg(), x.arg(), x.arg(), x.arg(), Arg::I32(0)];
    let e = emu.launch("tc_mma_probe", Launch::linear(1, 16), &args).unwrap_err();
    assert!(format!("{e}").contains("all 32 lanes"), "{e}");
    // and the emulator is usable afterwards
    assert_eq!(probe_mismatches(&emu, 0), [0, 0]);
}

/// The tensor-core forward against the CPU attention (f32) on the same bf16-rounded inputs:
/// partial tiles (T not a multiple of 16 or 64, several query blocks), GQA, batch 2, both head
/// dims, all gate modes. Tolerances: o (and y = o·gate, gate ≤ 1) may differ by the rounding of
/// P to bf16 before P·V, |Σ (bf16(p) − p)·v| / Σ p ≤ 2⁻⁹·max|v| (the sum of p is kept in f32),
/// checked at twice that for f32 sums in another order and exp2 for exp; lse comes from f32
/// scores of exact bf16 products only: 1e-5 relative plus 1e-5.
#[test]
fn tensor_core_attention_forward_matches_the_cpu_op() {
    use gated_lm::config::{GateConfig, ModelConfig};
    use gated_lm::model::ops::{attention as att, gate};
    for dev in devices() {
        let dev = dev.as_ref();
        for (batch, seq, heads, kv_heads, head_dim) in [(2, 70, 4, 2, 64), (2, 37, 4, 2, 128), (1, 130, 2, 1, 64)] {
            for fused in [FusedGate::None, FusedGate::Elementwise, FusedGate::Headwise] {
                let what = format!("tc attention b{batch} t{seq} h{heads}/{kv_heads} d{head_dim} {fused:?}");
                let d = AttnDims {
                    batch,
                    seq,
                    heads,
                    kv_heads,
                    head_dim,
                };
                let sh = att::AttnShape {
                    batch,
                    seq,
                    heads,
                    kv_heads,
                    head_dim,
                };
                let round = |x: Vec<f32>| -> Vec<f32> { x.iter().map(|&a| half::bf16::from_f32(a).to_f32()).collect() };
                let (nq, nk) = (batch * seq * heads * head_dim, batch * seq * kv_heads * head_dim);
                // q scaled up so that softmax rows are peaked, not uniform: P's rounding matters
                let (q, k, v) = (
                    round(randn(nq, 60, 2.0)),
                    round(randn(nk, 61, 1.0)),
                    round(randn(nk, 62, 1.0)),
                );
                let (mut o, mut lse) = (vec![0.0; nq], vec![0.0; batch * heads * seq]);
                att::attention_fwd(sh, &q, &k, &v, &mut o, &mut lse, Default::default());
                let mut y = o.clone();
                let spec = match fused {
                    FusedGate::None => None,
                    FusedGate::Elementwise => Some("elementwise"),
                    FusedGate::Headwise => Some("headwise"),
                };
                let mut cfg =
                    ModelConfig::preset("micro", spec.and_then(|s| GateConfig::parse_spec(s).unwrap())).unwrap();
                (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) = (heads, kv_heads, head_dim);
                let z = match (&cfg.gate, cfg.gate_geometry()) {
                    (Some(gc), Some(geo)) => {
                        let z = randn(batch * seq * geo.heads * geo.per_head, 63, 2.0);
                        gate::gate_fwd(gc, &geo, &mut y, &z);
                        Some(z)
                    }
                    _ => None,
                };
                let upb = |x: &[f32]| up_u16(dev, &bf16_bits(x)).unwrap();
                let (qb, kb, vb) = (upb(&q), upb(&k), upb(&v));
                let zb = z.as_ref().map(|z| up_f32(dev, z).unwrap());
                // NaN-filled outputs: an element the kernel fails to write cannot pass
                let nan = |n: usize| up_f32(dev, &vec![f32::NAN; n]).unwrap();
                let (ob, yb, lb) = (nan(nq), nan(nq), nan(lse.len()));
                ops::attention_forward_tc(dev, &d, fused, &qb, &kb, &vb, zb.as_ref(), &ob, &yb, &lb).unwrap();
                let vmax = v.iter().fold(0f32, |a, x| a.max(x.abs()));
                let bound = 2.0 * vmax / 512.0;
                let worst = |got: &[f32], want: &[f32], tol: &dyn Fn(f32) -> f32, name: &str| {
                    let mut err = 0f32;
                    for (i, (g, w)) in got.iter().zip(want).enumerate() {
                        let e = (g - w).abs();
                        assert!(
                            e <= tol(*w),
                            "{what}: {name}[{i}] = {g}, CPU {w} (tolerance {})",
                            tol(*w)
                        );
                        err = err.max(e);
                    }
                    err
                };
                let eo = worst(&down_f32(dev, &ob).unwrap(), &o, &|_| bound, "o");
                let ey = worst(&down_f32(dev, &yb).unwrap(), &y, &|_| bound, "y");
                let el = worst(&down_f32(dev, &lb).unwrap(), &lse, &|w| 1e-5 * w.abs() + 1e-5, "lse");
                eprintln!(
                    "{what} on {}: max |Δo| {eo:.2e}, |Δy| {ey:.2e} (bound {bound:.2e}), |Δlse| {el:.2e}",
                    dev.describe()
                );
            }
        }
    }
}

/// The launcher refuses head dims without a tensor-core kernel and short bf16 buffers.
#[test]
fn tensor_core_attention_checks_its_inputs() {
    let emu = gated_lm::backend::cuda::emu::Emu::open().unwrap();
    let mut d = AttnDims {
        batch: 1,
        seq: 8,
        heads: 2,
        kv_heads: 1,
        head_dim: 32,
    };
    let big = zeros_f32(&emu, 1024).unwrap();
    let call =
        |d: &AttnDims, q| ops::attention_forward_tc(&emu, d, FusedGate::None, q, &big, &big, None, &big, &big, &big);
    let e = call(&d, &big).unwrap_err();
    assert!(format!("{e}").contains("head_dim 32"), "{e}");
    d.head_dim = 64;
    let short = emu.zeros(2 * 8 * 2 * 64 - 2).unwrap();
    let e = call(&d, &short).unwrap_err();
    assert!(format!("{e}").contains("elements of 2 bytes"), "{e}");
}
