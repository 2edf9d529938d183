//! Tensor-core primitives (mma.m16n8k16 bf16, ldmatrix and .trans) and the FlashAttention-2
//! forward and backward built on them (src/backend/cuda/ops/attention/attention_tc.cu), on the
//! emulator and, where there is one, a GPU. Included by tests/cuda_kernels.rs so CI runs it with
//! the other kernel tests.

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

/// `cp_async_probe` (tc_probe.cu): the 6 snapshots of its shared buffer (slots A..E of 8 bf16
/// each, 0x7777 until written) and what each slot holds once its copy has landed.
const CP_MARK: u16 = 0x7777;
fn cp_async_probe(dev: &dyn Device, variant: i32) -> anyhow::Result<(Vec<u16>, Vec<u16>)> {
    let src: Vec<u16> = (0..40).map(|i| 0x1000 + i as u16).collect();
    let sb = up_u16(dev, &src)?;
    let out = up_u16(dev, &vec![0u16; 6 * 40])?;
    dev.launch(
        "cp_async_probe",
        Launch::linear(1, 32),
        &[sb.arg(), out.arg(), Arg::I32(variant)],
    )?;
    // A whole; B: 6 bytes of the source (3 bf16), then zeros; C: src_bytes 0, zeros; D, E whole
    let mut fin = src.clone();
    fin[11..24].fill(0);
    Ok((gated_lm::backend::cuda::runtime::down_u16(dev, &out)?, fin))
}

/// The snapshot from which slot A..E of the probe must have landed: after thread 0's
/// wait_group 2 (retires A of the groups A, B, C: all but the newest 2), wait_group 1 (B),
/// wait_group 0 (C), wait_all (D, issued but never committed), thread 1's wait (E).
const CP_LANDS_AT: [usize; 5] = [1, 2, 3, 4, 5];

/// cp.async on every device: a copy has landed once its thread's wait retires it (and a barrier
/// has passed); src_bytes < 16 zero-fills the rest (6: 3 bf16 then zeros; 0: all zeros); before
/// that a slot holds either its old contents or the new ones (a GPU may land a copy early).
#[test]
fn cp_async_lands_by_its_wait_with_zero_fill() {
    for dev in devices() {
        let dev = dev.as_ref();
        let (got, fin) = cp_async_probe(dev, 0).unwrap();
        for snap in 0..6 {
            for (slot, &lands) in CP_LANDS_AT.iter().enumerate() {
                for e in 8 * slot..8 * slot + 8 {
                    let g = got[40 * snap + e];
                    let ok = g == fin[e] || (snap < lands && g == CP_MARK);
                    assert!(
                        ok,
                        "{}: snapshot {snap}, slot {slot}, element {e}: {g:#06x} (final {:#06x})",
                        dev.describe(),
                        fin[e]
                    );
                }
            }
        }
    }
}

/// The emulator lands each copy exactly at the wait that retires it, never earlier, so that a
/// kernel missing a wait (or waiting for too few groups) reads stale shared memory there: before
/// its wait a slot still holds 0x7777; wait_group N retires all but the newest N groups of the
/// thread, copies not yet committed stay pending through wait_group 0, one thread's wait does not
/// land another's copies. A copy of more than 16 source bytes or to a misaligned address is an
/// error.
#[test]
fn the_emulator_lands_cp_async_only_at_its_wait() {
    let emu = gated_lm::backend::cuda::emu::Emu::open().unwrap();
    let (got, fin) = cp_async_probe(&emu, 0).unwrap();
    for snap in 0..6 {
        for (slot, &lands) in CP_LANDS_AT.iter().enumerate() {
            let want = if snap < lands {
                &[CP_MARK; 8][..]
            } else {
                &fin[8 * slot..8 * slot + 8]
            };
            assert_eq!(
                &got[40 * snap + 8 * slot..40 * snap + 8 * slot + 8],
                want,
                "snapshot {snap}, slot {slot}"
            );
        }
    }
    for (variant, msg) in [(1, "src_bytes 17"), (2, "not aligned")] {
        let e = cp_async_probe(&emu, variant).unwrap_err();
        assert!(format!("{e:#}").contains(msg), "variant {variant}: {e:#}");
    }
    // and the emulator is usable afterwards
    assert_eq!(cp_async_probe(&emu, 0).unwrap().0, got);
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
        // T = 130 at hd128: three key tiles, so the double-buffered staging alternates buffers
        let shapes = [
            (2, 70, 4, 2, 64),
            (2, 37, 4, 2, 128),
            (1, 130, 2, 1, 64),
            (1, 130, 2, 1, 128),
        ];
        for (batch, seq, heads, kv_heads, head_dim) in shapes {
            for fused in [FusedGate::None, FusedGate::Elementwise, FusedGate::Headwise] {
                let what = format!("tc attention b{batch} t{seq} h{heads}/{kv_heads} d{head_dim} {fused:?}");
                let d = AttnDims {
                    batch,
                    seq,
                    heads,
                    kv_heads,
                    head_dim,
                };
                let sh = att::AttnShape::new(batch, seq, heads, kv_heads, head_dim);
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

/// The tensor-core kernels' tiles live in dynamic shared memory (68 KB at hd128, past the 48 KB
/// default: the GPU device opts in at launch). The emulator refuses a launch that gives a kernel
/// less than it uses — a launcher's size gone stale must fail here, not read past the allocation
/// on a GPU — and one past the 227 KB a block of sm_90 may have.
#[test]
fn tensor_core_kernels_get_the_shared_memory_they_use() {
    let emu = gated_lm::backend::cuda::emu::Emu::open().unwrap();
    let (t, heads, hd) = (8usize, 2usize, 128usize);
    let qkv = emu.zeros(t * heads * hd * 2).unwrap();
    let out = zeros_f32(&emu, t * heads * hd).unwrap();
    let lse = zeros_f32(&emu, t * heads).unwrap();
    let args = [
        qkv.arg(),
        qkv.arg(),
        qkv.arg(),
        Arg::Ptr(0),
        out.arg(),
        out.arg(),
        lse.arg(),
        Arg::I32(t as i32),
        Arg::I32(heads as i32),
        Arg::I32(heads as i32),
        Arg::F32(0.125),
        Arg::I32(0),
    ];
    let launch = |smem: u32| {
        let cfg = Launch {
            grid: [1, heads as u32, 1],
            block: [128, 1, 1],
            smem,
        };
        emu.launch("attn_fwd_tc_hd128", cfg, &args)
    };
    // two K and two V tiles of 64 rows of 128 + 8 bf16
    let need = 4 * 64 * (hd as u32 + 8) * 2;
    launch(need).unwrap();
    let e = launch(need - 16).unwrap_err();
    assert!(
        format!("{e:#}").contains(&format!("uses {need} bytes of dynamic shared memory")),
        "{e:#}"
    );
    let e = launch(232_448 + 16).unwrap_err();
    assert!(format!("{e:#}").contains("past the 232448"), "{e:#}");
}

/// What a GPU's compiler (the driver's JIT of our PTX, which may differ from an offline ptxas)
/// made of the tensor-core kernels the model launches, printed as `resources …` lines
/// (scripts/gpu-check.sh shows them): none may use local memory (spills), and each must keep at
/// least 2 blocks (8 warps) resident per SM at its dynamic shared memory, as the README's
/// predictions assume. The emulator has no compiler's view (it answers None); there the test
/// checks only that the listed kernels exist.
#[test]
fn tensor_core_kernels_neither_spill_nor_starve_an_sm() {
    for dev in devices() {
        let dev = dev.as_ref();
        for &hd in ops::ATTN_TC_HEAD_DIMS {
            for (kernel, cfg) in ops::attention_tc_kernels(hd) {
                let known = ops::SOURCES.iter().any(|s| s.entries.contains(&kernel.as_str()));
                assert!(known, "{kernel}: not a kernel of any source");
                let Some(r) = dev.kernel_resources(&kernel, cfg).unwrap() else {
                    continue;
                };
                println!(
                    "resources {kernel}: {} registers, {} B local, {} B static + {} B dynamic shared, {} blocks/SM ({})",
                    r.registers,
                    r.local_bytes,
                    r.static_smem,
                    cfg.smem,
                    r.blocks_per_sm,
                    dev.describe()
                );
                assert_eq!(
                    r.local_bytes, 0,
                    "{kernel}: {} bytes of local memory (spills)",
                    r.local_bytes
                );
                assert!(r.blocks_per_sm >= 2, "{kernel}: {} block(s) per SM", r.blocks_per_sm);
            }
        }
    }
}

/// One backward problem: bf16-rounded q/k/v, the CPU forward's o and lse, dy, the gate, and the
/// CPU ops' gradients (the reference) on exactly those inputs.
struct BwdCase {
    d: AttnDims,
    fused: FusedGate,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    o: Vec<f32>,
    lse: Vec<f32>,
    dy: Vec<f32>,
    z: Option<Vec<f32>>,
    /// d(ungated output): dy through the gate, as the CPU gate op gives it
    dout: Vec<f32>,
    /// CPU: dq, dk, dv, and dz when gated
    grads: [Vec<f32>; 3],
    dz: Option<Vec<f32>>,
}

fn bwd_case((batch, seq, heads, kv_heads, head_dim): (usize, usize, usize, usize, usize), fused: FusedGate) -> BwdCase {
    use gated_lm::config::{GateConfig, ModelConfig};
    use gated_lm::model::ops::{attention as att, gate};
    let d = AttnDims {
        batch,
        seq,
        heads,
        kv_heads,
        head_dim,
    };
    let sh = att::AttnShape::new(batch, seq, heads, kv_heads, head_dim);
    let round = |x: Vec<f32>| -> Vec<f32> { x.iter().map(|&a| half::bf16::from_f32(a).to_f32()).collect() };
    let (nq, nk) = (batch * seq * heads * head_dim, batch * seq * kv_heads * head_dim);
    // q scaled up so that softmax rows are peaked, not uniform (as in the forward's test)
    let (q, k, v) = (
        round(randn(nq, 70, 2.0)),
        round(randn(nk, 71, 1.0)),
        round(randn(nk, 72, 1.0)),
    );
    let dy = randn(nq, 73, 1.0);
    let (mut o, mut lse) = (vec![0.0; nq], vec![0.0; batch * heads * seq]);
    att::attention_fwd(sh, &q, &k, &v, &mut o, &mut lse, Default::default());
    let spec = match fused {
        FusedGate::None => None,
        FusedGate::Elementwise => Some("elementwise"),
        FusedGate::Headwise => Some("headwise"),
    };
    let mut cfg = ModelConfig::preset("micro", spec.and_then(|s| GateConfig::parse_spec(s).unwrap())).unwrap();
    (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) = (heads, kv_heads, head_dim);
    let mut dout = dy.clone();
    let (z, dz) = match (&cfg.gate, cfg.gate_geometry()) {
        (Some(gc), Some(geo)) => {
            let z = randn(batch * seq * geo.heads * geo.per_head, 74, 2.0);
            let mut dz = vec![0.0; z.len()];
            gate::gate_bwd(gc, &geo, &o, &z, &mut dout, &mut dz);
            (Some(z), Some(dz))
        }
        _ => (None, None),
    };
    let (mut dq, mut dk, mut dv) = (vec![0.0; nq], vec![0.0; nk], vec![0.0; nk]);
    att::attention_bwd(sh, &q, &k, &v, &o, &lse, &dout, &mut dq, &mut dk, &mut dv);
    BwdCase {
        d,
        fused,
        q,
        k,
        v,
        o,
        lse,
        dy,
        z,
        dout,
        grads: [dq, dk, dv],
        dz,
    }
}

/// Runs the tensor-core backward (`plant`: a planted-bug variant, None the production kernels)
/// on NaN-filled outputs (an element never written cannot pass); returns dq, dk, dv and dz.
fn run_bwd_tc(dev: &dyn Device, c: &BwdCase, plant: Option<i32>) -> ([Vec<f32>; 3], Option<Vec<f32>>) {
    let d = &c.d;
    let upb = |x: &[f32]| up_u16(dev, &bf16_bits(x)).unwrap();
    let up = |x: &[f32]| up_f32(dev, x).unwrap();
    let nan = |n: usize| up_f32(dev, &vec![f32::NAN; n]).unwrap();
    let (qb, kb, vb) = (upb(&c.q), upb(&c.k), upb(&c.v));
    let (ob, lb, dyb) = (up(&c.o), up(&c.lse), up(&c.dy));
    let zb = c.z.as_ref().map(|z| up(z));
    let dzb = c.z.as_ref().map(|z| nan(z.len()));
    let (dqb, dkb, dvb) = (nan(c.q.len()), nan(c.k.len()), nan(c.k.len()));
    let scratch = ops::AttnScratch::new(dev, d).unwrap();
    let inputs = (&qb, &kb, &vb, zb.as_ref());
    let grads = (&dqb, &dkb, &dvb, dzb.as_ref());
    match plant {
        None => ops::attention_backward_tc(dev, d, c.fused, inputs, (&ob, &lb, &dyb), &scratch, grads),
        Some(p) => ops::attention_backward_tc_planted(dev, d, c.fused, inputs, (&ob, &lb, &dyb), &scratch, grads, p),
    }
    .unwrap();
    let down = |b: &gated_lm::backend::cuda::runtime::DBuf| down_f32(dev, b).unwrap();
    ([down(&dqb), down(&dkb), down(&dvb)], dzb.as_ref().map(down))
}

/// Per-element bounds on |tensor-core − exact| for dq, dk, dv, from the bf16 roundings the
/// kernels add to the (already bf16) q/k/v, first order in the unit roundoff u = 2⁻⁸ of bf16 (8 significant bits, round to nearest):
/// dO is rounded (|ΔdO| ≤ u·|dO|), so dP = dO·Vᵀ is off by at most u·A, A = Σ|dO||V|; P is
/// rounded for dV = Pᵀ·dO; dS = P∘(dP − D) (P, D exact f32) is off by P·u·A and then rounded
/// (u·|dS|) for dK = dSᵀ·Q·scale and dQ = dS·K·scale. So
///   |ΔdV_j| ≤ 2u·Σ_i P_ij·|dO_i|,  |ΔdK_j| ≤ scale·Σ_i E_ij·|Q_i|,  |ΔdQ_i| ≤ scale·Σ_j E_ij·|K_j|
/// with E_ij = u·(P_ij·A_ij + |dS_ij|), summed over a kv head's query heads for dK, dV. Also
/// returns the gradients computed here in f64, with D dropped from dS when `drop_d` (a
/// deliberately wrong reference, to show these bounds are tight enough to catch that).
fn bwd_bounds(c: &BwdCase, drop_d: bool) -> ([Vec<f64>; 3], [Vec<f64>; 3]) {
    let AttnDims {
        batch,
        seq: t,
        heads,
        kv_heads,
        head_dim: hd,
    } = c.d;
    let u = 2f64.powi(-8);
    let scale = 1.0 / (hd as f64).sqrt();
    let (ldq, ldk, group) = (heads * hd, kv_heads * hd, heads / kv_heads);
    let mut bound = [vec![0f64; c.q.len()], vec![0f64; c.k.len()], vec![0f64; c.k.len()]];
    let mut grad = bound.clone();
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum::<f64>();
    let adot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(&x, &y)| (x as f64 * y as f64).abs()).sum::<f64>();
    for b in 0..batch {
        for h in 0..heads {
            let kh = h / group;
            for i in 0..t {
                let qo = (b * t + i) * ldq + h * hd;
                let (qi, doi, oi) = (&c.q[qo..qo + hd], &c.dout[qo..qo + hd], &c.o[qo..qo + hd]);
                let di = if drop_d { 0.0 } else { dot(doi, oi) };
                let lse = c.lse[(b * heads + h) * t + i] as f64;
                for j in 0..=i {
                    let ko = (b * t + j) * ldk + kh * hd;
                    let (kj, vj) = (&c.k[ko..ko + hd], &c.v[ko..ko + hd]);
                    let p = (dot(qi, kj) * scale - lse).exp();
                    let ds = p * (dot(doi, vj) - di);
                    let e = u * (p * adot(doi, vj) + ds.abs());
                    for x in 0..hd {
                        grad[0][qo + x] += scale * ds * kj[x] as f64;
                        bound[0][qo + x] += scale * e * (kj[x] as f64).abs();
                        grad[1][ko + x] += scale * ds * qi[x] as f64;
                        bound[1][ko + x] += scale * e * (qi[x] as f64).abs();
                        grad[2][ko + x] += p * doi[x] as f64;
                        bound[2][ko + x] += 2.0 * u * p * (doi[x] as f64).abs();
                    }
                }
            }
        }
    }
    (grad, bound)
}

/// The largest |got − want| / tolerance over a gradient (> 1: out of tolerance), where it is,
/// and the largest |got − want|.
fn worst_ratio(got: &[f32], want: &[f32], tol: &[f64]) -> (f64, usize, f64) {
    let mut w = (0f64, 0usize, 0f64);
    for (i, ((&g, &r), &t)) in got.iter().zip(want).zip(tol).enumerate() {
        let e = (g as f64 - r as f64).abs();
        let ratio = if e.is_nan() { f64::INFINITY } else { e / t };
        if ratio > w.0 || ratio.is_nan() {
            w.0 = ratio;
            w.1 = i;
        }
        w.2 = w.2.max(e);
    }
    w
}

/// The margin on the bounds of [`bwd_bounds`]: they are first order in u and leave out the f32
/// rounding of sums (relative ~n·2⁻²⁴, n ≤ 260 terms: below 2⁻¹⁶ of the sum of magnitudes that
/// the bounds are 2⁻⁸ of) on either side, the CPU op's and the kernels'; 25% covers both.
const BOUND_MARGIN: f64 = 1.25;

const BWD_SHAPES: [(usize, usize, usize, usize, usize); 6] = [
    (2, 70, 4, 2, 64),
    (2, 37, 4, 2, 128),
    (1, 130, 2, 1, 64),
    (1, 130, 4, 2, 128),
    (1, 100, 4, 1, 64),
    (1, 45, 2, 2, 128),
];

/// The tensor-core backward against the CPU ops on the same bf16 inputs: T = 37, 45, 70, 100, 130
/// (partial tiles, several tiles of queries and keys), GQA (2 or 4 query heads per kv head) and
/// plain multi-head, batch 2, hd64 and hd128, gate none / elementwise / headwise. Every element
/// of dq, dk, dv within BOUND_MARGIN × its bound from the bf16 roundings (see `bwd_bounds`); dz
/// (f32 throughout, the f32 pre-pass's arithmetic) as the f32 kernels' test, 2e-5 of max|dz|.
/// Two runs give identical bits (no atomics, fixed order).
#[test]
fn tensor_core_attention_backward_matches_the_cpu_ops() {
    for dev in devices() {
        let dev = dev.as_ref();
        for shape in BWD_SHAPES {
            for fused in [FusedGate::None, FusedGate::Elementwise, FusedGate::Headwise] {
                let c = bwd_case(shape, fused);
                let (b, t, h, kv, hd) = shape;
                let what = format!("tc attention backward b{b} t{t} h{h}/{kv} d{hd} {fused:?}");
                let (got, dz) = run_bwd_tc(dev, &c, None);
                let (exact, bound) = bwd_bounds(&c, false);
                let mut line = String::new();
                for (n, name) in ["dq", "dk", "dv"].iter().enumerate() {
                    let tol: Vec<f64> = bound[n].iter().map(|b| BOUND_MARGIN * b).collect();
                    let (ratio, at, err) = worst_ratio(&got[n], &c.grads[n], &tol);
                    assert!(
                        ratio <= 1.0,
                        "{what}: {name}[{at}] = {}, CPU {} f64 {} (tolerance {:.3e})",
                        got[n][at],
                        c.grads[n][at],
                        exact[n][at],
                        tol[at]
                    );
                    let gmax = c.grads[n].iter().fold(0f32, |a, x| a.max(x.abs()));
                    line += &format!(
                        " {name}: max|Δ| {err:.2e} ({:.1e} of max|{name}|, {ratio:.3} of the tolerance);",
                        err / gmax as f64
                    );
                }
                if let (Some(dz), Some(want)) = (&dz, &c.dz) {
                    super::close(&format!("{what}: dz"), dz, want, 2e-5);
                }
                eprintln!("{what} on {}:{line}", dev.describe());
                let (again, dz2) = run_bwd_tc(dev, &c, None);
                for n in 0..3 {
                    assert!(
                        got[n].iter().zip(&again[n]).all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{what}: gradient {n} differs between two runs"
                    );
                }
                assert_eq!(
                    dz.map(|v| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>()),
                    dz2.map(|v| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>()),
                    "{what}: dz differs between two runs"
                );
            }
        }
    }
}

/// The bounds are tight enough to matter: the f64 gradients of `bwd_bounds` agree with the CPU
/// op within them, and the same with −D dropped from dS (the classic backward bug) breaks them
/// by far; and each planted kernel bug (the diagonal tiles' causal mask dropped, −D dropped, two
/// registers of the Pᵀ/dSᵀ A fragment swapped) fails the test the production kernels pass.
#[test]
fn a_planted_tensor_core_backward_bug_fails() {
    let emu = gated_lm::backend::cuda::emu::Emu::open().unwrap();
    let c = bwd_case((2, 70, 4, 2, 64), FusedGate::Elementwise);
    let (exact, bound) = bwd_bounds(&c, false);
    let (no_d, _) = bwd_bounds(&c, true);
    let tol = |n: usize| -> Vec<f64> { bound[n].iter().map(|b| BOUND_MARGIN * b).collect() };
    for n in 0..3 {
        let f = |x: &[f64]| -> Vec<f32> { x.iter().map(|&a| a as f32).collect() };
        let ok = worst_ratio(&f(&exact[n]), &c.grads[n], &tol(n)).0;
        assert!(
            ok <= 1.0,
            "gradient {n}: the f64 reference is {ok} bounds from the CPU op"
        );
        if n < 2 {
            // dV does not involve D
            let bad = worst_ratio(&f(&no_d[n]), &c.grads[n], &tol(n)).0;
            assert!(
                bad > 10.0,
                "gradient {n}: a reference without −D is only {bad} bounds off"
            );
        }
    }
    // which gradients each planted bug must break: (mask, D, fragment) → (dq, dk, dv)
    for (plant, broken) in [
        (1, [true, true, true]),
        (2, [true, true, false]),
        (3, [true, true, true]),
    ] {
        let (got, _) = run_bwd_tc(&emu, &c, Some(plant));
        for n in 0..3 {
            let ratio = worst_ratio(&got[n], &c.grads[n], &tol(n)).0;
            assert_eq!(
                ratio > 1.0,
                broken[n],
                "planted bug {plant}, gradient {n}: {ratio} of the tolerance"
            );
        }
    }
    // and variant 0 of the planted kernels is the production kernel, bit for bit
    let (planted0, _) = run_bwd_tc(&emu, &c, Some(0));
    let (prod, _) = run_bwd_tc(&emu, &c, None);
    assert_eq!(planted0, prod);
}

/// The backward launcher refuses head dims without a tensor-core kernel, short bf16 buffers and
/// a gated call without gate logits.
#[test]
fn tensor_core_attention_backward_checks_its_inputs() {
    let emu = gated_lm::backend::cuda::emu::Emu::open().unwrap();
    let mut d = AttnDims {
        batch: 1,
        seq: 8,
        heads: 2,
        kv_heads: 1,
        head_dim: 32,
    };
    let big = zeros_f32(&emu, 4096).unwrap();
    let scratch = ops::AttnScratch::new(&emu, &d).unwrap();
    let call = |d: &AttnDims, q, gate, z| {
        ops::attention_backward_tc(
            &emu,
            d,
            gate,
            (q, &big, &big, z),
            (&big, &big, &big),
            &scratch,
            (&big, &big, &big, z),
        )
    };
    let e = call(&d, &big, FusedGate::None, None).unwrap_err();
    assert!(format!("{e}").contains("head_dim 32"), "{e}");
    d.head_dim = 64;
    let short = emu.zeros(2 * 8 * 2 * 64 - 2).unwrap();
    let e = call(&d, &short, FusedGate::None, None).unwrap_err();
    assert!(format!("{e}").contains("elements of 2 bytes"), "{e}");
    let scratch64 = ops::AttnScratch::new(&emu, &d).unwrap();
    let e = ops::attention_backward_tc(
        &emu,
        &d,
        FusedGate::Headwise,
        (&big, &big, &big, None),
        (&big, &big, &big),
        &scratch64,
        (&big, &big, &big, None),
    )
    .unwrap_err();
    assert!(format!("{e}").contains("gate logits"), "{e}");
}
