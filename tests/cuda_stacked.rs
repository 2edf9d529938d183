//! The backward of the stacked `[q; k; v; gate]` projection: QK-norm + RoPE's backward and the
//! attention's write `dq`, `dk`, `dv`, `dz` as column bands of one `[rows, q | k | v | z]`
//! gradient (row stride wider than each band), so one GEMM reads all four. Each band equals,
//! bit for bit, what the kernel writes densely, and the columns around it are left untouched.
//! On the CPU emulator always, and on a GPU when there is one.
#![cfg(feature = "cuda")]

use gated_lm::backend::cuda::ops::{self, Cols, DeviceRope, HeadRows};
use gated_lm::backend::cuda::runtime::{down_u16, up_f32, up_u16, DBuf, Device};
use std::rc::Rc;

mod common;
use common::bufs::*;
use common::cuda_devices as devices;

/// A sentinel no kernel writes (a NaN payload), in every 16-bit half of the buffer.
const SENTINEL: u16 = 0x7fc3;

fn sentinel(dev: &dyn Device, halves: usize) -> DBuf {
    up_u16(dev, &vec![SENTINEL; halves]).unwrap()
}

/// An output of `rows × width` elements of `bf16` or f32, dense, or as the band of columns
/// `[at, at + width)` of a `[rows, ld]` matrix: its 16-bit words, with the band cut out (row by
/// row) and the words outside it checked to be untouched.
struct Out {
    rows: usize,
    width: usize,
    halves_per_elem: usize,
}

impl Out {
    fn dense(&self, dev: &dyn Device) -> DBuf {
        sentinel(dev, self.rows * self.width * self.halves_per_elem)
    }
    fn wide(&self, dev: &dyn Device, ld: usize) -> DBuf {
        sentinel(dev, self.rows * ld * self.halves_per_elem)
    }
    fn band_of(&self, dev: &dyn Device, wide: &DBuf, at: usize, ld: usize, what: &str) -> Vec<u16> {
        let (h, all) = (self.halves_per_elem, down_u16(dev, wide).unwrap());
        let mut band = Vec::new();
        for (r, row) in all.chunks(ld * h).enumerate() {
            let (lo, hi) = (at * h, (at + self.width) * h);
            band.extend_from_slice(&row[lo..hi]);
            let outside = row[..lo].iter().chain(&row[hi..]);
            assert!(
                outside.into_iter().all(|&w| w == SENTINEL),
                "{what}: row {r}: a write outside the band"
            );
            assert!(
                complete(&row[lo..hi], h),
                "{what}: row {r}: an element of the band not written"
            );
        }
        band
    }
}

/// Whether every element (`h` 16-bit words each) was written: not all its words the sentinel
/// (a real f32 or bf16 result is never that NaN).
fn complete(words: &[u16], h: usize) -> bool {
    words.chunks(h).all(|e| e.iter().any(|&w| w != SENTINEL))
}

/// The view of `wide` from column `at` (its band's first element), `elem` bytes an element.
fn from_col(wide: &Rc<DBuf>, at: usize, elem: usize) -> DBuf {
    let start = elem * at;
    DBuf::view(wide, start, wide.bytes - start).unwrap()
}

/// `b` as rows `ld` elements apart.
fn strided(b: &DBuf, bf16: bool, ld: usize) -> Cols<'_> {
    Cols {
        out: typed(b, bf16),
        ld: Some(ld),
    }
}

/// QK-norm + RoPE's backward into a band (q's at column 0, k's after q's columns) equals its
/// dense output bit for bit, f32 and bf16 out, with and without the norm; its gain gradient too.
#[test]
fn qknorm_rope_backward_writes_a_band_of_the_stacked_gradient() {
    let (rows, seq, hd) = (12, 6, 64);
    let (cos, sin): (Vec<f32>, Vec<f32>) = (0..seq * hd / 2).map(|i| ((i as f32).cos(), (i as f32).sin())).unzip();
    for dev in devices() {
        let dev = dev.as_ref();
        let rope = DeviceRope::upload(dev, &cos, &sin, hd, seq).unwrap();
        for (heads, at, ld, norm, bf16) in [
            (3, 0, 3 * 64 + 2 * 64 + 17, true, true),
            (2, 128, 400, false, false),
            (1, 40, 104, true, false),
        ] {
            let n = rows * heads * hd;
            let what = format!(
                "heads {heads}, band at {at} of {ld}, norm {norm}, bf16 {bf16} on {}",
                dev.describe()
            );
            let (x, dy, w) = (
                up_f32(dev, &randn(n, 1 + heads as u64, 1.0)).unwrap(),
                up_f32(dev, &randn(n, 2, 1.0)).unwrap(),
                up_f32(dev, &randn(hd, 3, 0.5)).unwrap(),
            );
            let h = HeadRows {
                rows,
                heads,
                head_dim: hd,
                seq,
                norm: norm.then_some(&w),
                zero_centered: false,
            };
            let (y, rstd) = (
                up_f32(dev, &vec![0.0; n]).unwrap(),
                up_f32(dev, &vec![0.0; rows * heads]).unwrap(),
            );
            ops::qknorm_rope_fwd(dev, &h, &rope, &x, &y, &rstd, 1e-6).unwrap();
            let out = Out {
                rows,
                width: heads * hd,
                halves_per_elem: if bf16 { 1 } else { 2 },
            };
            let sc = up_f32(dev, &vec![0.0; ops::norm_bwd_scratch_len(rows * heads, hd)]).unwrap();
            let run = |dx: Cols| {
                let dw = up_f32(dev, &vec![0.0; hd]).unwrap();
                ops::qknorm_rope_bwd_to(dev, &h, &rope, ((&x).into(), &rstd, &dy), dx, &sc, norm.then_some(&dw))
                    .unwrap();
                down_u16(dev, &dw).unwrap()
            };
            let dense = out.dense(dev);
            let dw_dense = run(typed(&dense, bf16).into());
            let wide = Rc::new(out.wide(dev, ld));
            let band = from_col(&wide, at, 2 * out.halves_per_elem);
            let dw_band = run(strided(&band, bf16, ld));
            let got = out.band_of(dev, &wide, at, ld, &what);
            let want = down_u16(dev, &dense).unwrap();
            assert!(complete(&want, out.halves_per_elem), "{what}: dense output incomplete");
            assert!(got == want, "{what}: band differs from the dense output");
            assert_eq!(dw_band, dw_dense, "{what}: gain gradient");
        }
        // a stride below the width, or a band that overruns its buffer, is refused
        let h = HeadRows {
            rows: 4,
            heads: 1,
            head_dim: hd,
            seq: 4,
            norm: None,
            zero_centered: false,
        };
        let (x, sc) = (
            up_f32(dev, &vec![0.0; 4 * hd]).unwrap(),
            up_f32(dev, &[0.0; 64]).unwrap(),
        );
        let rstd = up_f32(dev, &[1.0; 4]).unwrap();
        let ins = || ((&x).into(), &rstd, &x);
        let short = sentinel(dev, 2 * (3 * 100 + hd) - 2);
        let bwd = |out: &DBuf, ld| ops::qknorm_rope_bwd_to(dev, &h, &rope, ins(), strided(out, false, ld), &sc, None);
        let e = bwd(&short, hd - 1).unwrap_err();
        assert!(format!("{e}").contains("row stride"), "narrow stride: {e}");
        let e = bwd(&short, 100).unwrap_err();
        assert!(format!("{e}").contains("buffer of"), "short band: {e}");
        bwd(&sentinel(dev, 2 * (3 * 100 + hd)), 100).unwrap();
    }
}

/// The attention's backward writing `dv` and `dz` into their bands of a `[rows, q | k | v | z]`
/// gradient equals its dense `dv` and `dz` bit for bit, and writes nothing else of it: the f32
/// kernels (head_dim 32, f32 and bf16 out) and the tensor-core ones (64, 128; bf16 o and z as
/// in mixed precision, and f32), every gate, GQA, a partial last tile.
#[test]
fn attention_backward_writes_dv_and_dz_into_bands() {
    use gated_lm::backend::cuda::ops::{AttnDims, AttnScratch, FusedGate};
    let gates = [FusedGate::Elementwise, FusedGate::Headwise, FusedGate::None];
    for dev in devices() {
        let dev = dev.as_ref();
        for (i, &(hd, tc, bf16)) in [
            (32, false, false),
            (32, false, true),
            (64, true, true),
            (128, true, false),
        ]
        .iter()
        .enumerate()
        {
            let d = AttnDims {
                batch: 2,
                seq: 70,
                heads: 4,
                kv_heads: 2,
                head_dim: hd,
            };
            let gate = gates[i % 3];
            let rows = d.batch * d.seq;
            let (qd, kvd) = (d.heads * hd, d.kv_heads * hd);
            let zd = match gate {
                FusedGate::None => 0,
                FusedGate::Elementwise => qd,
                FusedGate::Headwise => d.heads,
            };
            let ld = qd + 2 * kvd + zd;
            let what = format!(
                "hd {hd}, tensor cores {tc}, bf16 {bf16}, {gate:?} on {}",
                dev.describe()
            );
            let s = 10 * i as u64;
            let (q, k, v) = (
                randn(rows * qd, s, 1.0),
                randn(rows * kvd, s + 1, 1.0),
                randn(rows * kvd, s + 2, 1.0),
            );
            let zv = randn(rows * zd.max(1), s + 3, 1.5);
            let dy = up_f32(dev, &randn(rows * qd, s + 4, 1.0)).unwrap();
            let lse = up_f32(dev, &vec![0.0; rows * d.heads]).unwrap();
            let (dq, dk) = (
                up_f32(dev, &vec![0.0; rows * qd]).unwrap(),
                up_f32(dev, &vec![0.0; rows * kvd]).unwrap(),
            );
            let scratch = AttnScratch::new(dev, &d).unwrap();
            let (dv_out, dz_out) = (
                Out {
                    rows,
                    width: kvd,
                    halves_per_elem: if bf16 { 1 } else { 2 },
                },
                Out {
                    rows,
                    width: zd,
                    halves_per_elem: if bf16 { 1 } else { 2 },
                },
            );
            let elem = 2 * dv_out.halves_per_elem;
            let (dense_dv, dense_dz) = (dv_out.dense(dev), dz_out.dense(dev));
            let wide = Rc::new(dv_out.wide(dev, ld));
            let (band_dv, band_dz) = (from_col(&wide, qd + kvd, elem), from_col(&wide, qd + 2 * kvd, elem));
            let gated = gate != FusedGate::None;
            // each backward runs twice: dv and dz dense, then into their bands of the wide buffer
            let outs: [(Cols, Option<Cols>); 2] = [
                (
                    typed(&dense_dv, bf16).into(),
                    gated.then(|| typed(&dense_dz, bf16).into()),
                ),
                (strided(&band_dv, bf16, ld), gated.then(|| strided(&band_dz, bf16, ld))),
            ];
            if tc {
                let (qb, kb, vb) = (up_bf16(dev, &q), up_bf16(dev, &k), up_bf16(dev, &v));
                // o and z in the forward's types: bf16 with bf16 outputs (mixed precision)
                let (z, o, y) = match bf16 {
                    true => (
                        up_bf16(dev, &zv),
                        up_bf16(dev, &vec![0.0; rows * qd]),
                        up_bf16(dev, &vec![0.0; rows * qd]),
                    ),
                    false => (
                        up_f32(dev, &zv).unwrap(),
                        up_f32(dev, &vec![0.0; rows * qd]).unwrap(),
                        up_f32(dev, &vec![0.0; rows * qd]).unwrap(),
                    ),
                };
                let op = |b| typed(b, bf16);
                let zo = gated.then(|| op(&z));
                ops::attention_forward_tc_to(dev, &d, gate, &qb, &kb, &vb, zo, op(&o), op(&y), &lse).unwrap();
                for (dv, dz) in outs {
                    let (ins, fwd) = ((&qb, &kb, &vb, zo), (op(&o), &lse, &dy));
                    ops::attention_backward_tc_to(dev, &d, gate, ins, fwd, &scratch, (&dq, &dk, dv, dz)).unwrap();
                }
            } else {
                let (qb, kb, vb) = (
                    up_f32(dev, &q).unwrap(),
                    up_f32(dev, &k).unwrap(),
                    up_f32(dev, &v).unwrap(),
                );
                let z = up_f32(dev, &zv).unwrap();
                let (o, y) = (
                    up_f32(dev, &vec![0.0; rows * qd]).unwrap(),
                    up_f32(dev, &vec![0.0; rows * qd]).unwrap(),
                );
                let zo = gated.then_some(&z);
                ops::attention_fwd(dev, &d, gate, &qb, &kb, &vb, zo, &o, &y, &lse).unwrap();
                for (dv, dz) in outs {
                    let (ins, fwd) = ((&qb, &kb, &vb, zo), (&o, &lse, &dy));
                    ops::attention_bwd_to(dev, &d, gate, ins, fwd, &scratch, (&dq, &dk, dv, dz)).unwrap();
                }
            }
            // the wide buffer's dv band, then its dz band, each against the dense output
            let all = Out {
                rows,
                width: kvd + zd,
                halves_per_elem: dv_out.halves_per_elem,
            };
            let band = all.band_of(dev, &wide, qd + kvd, ld, &what);
            let h = dv_out.halves_per_elem;
            let (got_dv, got_dz): (Vec<u16>, Vec<u16>) = (
                band.chunks((kvd + zd) * h)
                    .flat_map(|r| r[..kvd * h].to_vec())
                    .collect(),
                band.chunks((kvd + zd) * h)
                    .flat_map(|r| r[kvd * h..].to_vec())
                    .collect(),
            );
            let want_dv = down_u16(dev, &dense_dv).unwrap();
            assert!(complete(&want_dv, h), "{what}: dense dv incomplete");
            assert!(got_dv == want_dv, "{what}: dv band differs from the dense dv");
            if gated {
                let want_dz = down_u16(dev, &dense_dz).unwrap();
                assert!(complete(&want_dz, h), "{what}: dense dz incomplete");
                assert!(got_dz == want_dz, "{what}: dz band differs from the dense dz");
            }
        }
    }
}
