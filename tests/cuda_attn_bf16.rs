//! The tensor-core attention with its saved output `o` and the gate logits `z` in bf16 (mixed
//! precision's `_bf16oz` kernels): from inputs that bf16 represents (z already rounded), the
//! forward writes `y` and `lse` bit for bit as the kernels with f32 `o` and `z`, and `o` as the
//! rounding of their f32 `o`; the backward (its pre-pass: D, dz, dO; and everything after it)
//! from a bf16 `o` and `z` gives bit for bit what it gives from the same values in f32. Head dims
//! 64 and 128, every gate, grouped KV heads, a length that leaves a partial tile. Mixed types are
//! refused. On the CPU emulator always, and on a GPU when there is one.
#![cfg(feature = "cuda")]

use gated_lm::backend::cuda::ops::{self, AttnDims, FusedGate, Operand};
use gated_lm::backend::cuda::runtime::{down_f32, down_u16, up_f32, DBuf, Device};

mod common;
use common::bufs::*;
use common::cuda_devices as devices;

const GATES: [FusedGate; 3] = [FusedGate::None, FusedGate::Elementwise, FusedGate::Headwise];

/// `n` normal values of standard deviation `std`, rounded to bf16 (kept as f32).
fn randn_bf16(n: usize, seed: u64, std: f64) -> Vec<f32> {
    let mut r = gated_lm::rng::Rng::new(seed);
    (0..n)
        .map(|_| half::bf16::from_f32((r.normal() * std) as f32).to_f32())
        .collect()
}

/// A buffer's bits: f32 words, or bf16 halves widened.
fn bits32(dev: &dyn Device, b: &DBuf) -> Vec<u32> {
    down_f32(dev, b).unwrap().iter().map(|x| x.to_bits()).collect()
}
fn bits16(dev: &dyn Device, b: &DBuf) -> Vec<u16> {
    down_u16(dev, b).unwrap()
}

/// A real result: finite and not all zero.
fn real(what: &str, v: &[f32]) {
    assert!(v.iter().all(|x| x.is_finite()) && v.iter().any(|&x| x != 0.0), "{what}");
}

/// Grouped KV heads (2 query heads per kv head), 70 rows: a second, partial tile of 64.
fn dims(head_dim: usize) -> AttnDims {
    AttnDims {
        batch: 2,
        seq: 70,
        heads: 4,
        kv_heads: 2,
        head_dim,
    }
}

fn z_elems(d: &AttnDims, gate: FusedGate) -> usize {
    let rows = d.batch * d.seq;
    match gate {
        FusedGate::None => 0,
        FusedGate::Elementwise => rows * d.heads * d.head_dim,
        FusedGate::Headwise => rows * d.heads,
    }
}

/// One case's inputs: bf16 q, k, v; z (bf16 values) in f32 and in bf16.
struct Case {
    d: AttnDims,
    gate: FusedGate,
    q: DBuf,
    k: DBuf,
    v: DBuf,
    z32: Option<DBuf>,
    z16: Option<DBuf>,
}

impl Case {
    fn new(dev: &dyn Device, hd: usize, gate: FusedGate, seed: u64) -> Case {
        let d = dims(hd);
        let (nq, nkv) = (d.batch * d.seq * d.heads * hd, d.batch * d.seq * d.kv_heads * hd);
        let z = (gate != FusedGate::None).then(|| randn_bf16(z_elems(&d, gate), seed + 3, 1.5));
        Case {
            d,
            gate,
            q: up_bf16(dev, &randn_bf16(nq, seed, 1.0)),
            k: up_bf16(dev, &randn_bf16(nkv, seed + 1, 1.0)),
            v: up_bf16(dev, &randn_bf16(nkv, seed + 2, 1.0)),
            z32: z.as_ref().map(|z| up_f32(dev, z).unwrap()),
            z16: z.as_ref().map(|z| up_bf16(dev, z)),
        }
    }
    fn nq(&self) -> usize {
        self.d.batch * self.d.seq * self.d.heads * self.d.head_dim
    }
    fn nl(&self) -> usize {
        self.d.batch * self.d.seq * self.d.heads
    }
    /// The forward with `o` and `z` in f32 (`oz16` false) or bf16, `y` bf16: (o, y, lse).
    fn forward(&self, dev: &dyn Device, oz16: bool) -> (DBuf, DBuf, DBuf) {
        let (nq, nl) = (self.nq(), self.nl());
        let (o, y, lse) = match oz16 {
            false => (nan_f32(dev, nq), nan_bf16(dev, nq), nan_f32(dev, nl)),
            true => (nan_bf16(dev, nq), nan_bf16(dev, nq), nan_f32(dev, nl)),
        };
        let (z, oo) = match oz16 {
            false => (self.z32.as_ref().map(Operand::from), Operand::from(&o)),
            true => (self.z16.as_ref().map(Operand::bf16), Operand::bf16(&o)),
        };
        let (d, g) = (&self.d, self.gate);
        ops::attention_forward_tc_to(dev, d, g, &self.q, &self.k, &self.v, z, oo, Operand::bf16(&y), &lse).unwrap();
        (o, y, lse)
    }
}

#[test]
fn tensor_core_forward_reads_z_and_writes_o_in_bf16() {
    for dev in devices() {
        let dev = dev.as_ref();
        for (i, hd) in [64, 128].into_iter().enumerate() {
            for (j, gate) in GATES.into_iter().enumerate() {
                let what = |s: &str| format!("{s} (hd {hd}, {gate:?}) on {}", dev.describe());
                let c = Case::new(dev, hd, gate, 10 * (3 * i + j) as u64);
                let (o32, y32, l32) = c.forward(dev, false);
                let (o16, y16, l16) = c.forward(dev, true);
                let (of, yf) = (down_f32(dev, &o32).unwrap(), bits16(dev, &y32));
                real(&what("f32 o"), &of);
                assert_eq!(bits16(dev, &y16), yf, "{}", what("y"));
                assert_eq!(bits32(dev, &l16), bits32(dev, &l32), "{}", what("lse"));
                // o: the round-to-nearest-even of the f32 kernel's
                let want: Vec<u16> = of.iter().map(|&x| half::bf16::from_f32(x).to_bits()).collect();
                assert_eq!(bits16(dev, &o16), want, "{}", what("o"));
            }
        }
    }
}

/// The backward from the bf16-o forward's `o`: once from it and z in bf16 (the `_bf16oz`
/// pre-pass), once from the same values in f32; dv and dz bf16 in both (mixed precision's).
#[test]
fn tensor_core_backward_reads_o_and_z_in_bf16() {
    for dev in devices() {
        let dev = dev.as_ref();
        for (i, hd) in [64, 128].into_iter().enumerate() {
            for (j, gate) in GATES.into_iter().enumerate() {
                let what = |s: &str| format!("{s} (hd {hd}, {gate:?}) on {}", dev.describe());
                let c = Case::new(dev, hd, gate, 100 + 10 * (3 * i + j) as u64);
                let (o16, _, lse) = c.forward(dev, true);
                let o32 = {
                    let o = down_u16(dev, &o16).unwrap();
                    up_f32(
                        dev,
                        &o.iter().map(|&b| half::bf16::from_bits(b).to_f32()).collect::<Vec<_>>(),
                    )
                    .unwrap()
                };
                let (nq, nkv, nz) = (c.nq(), c.k.bytes / 2, z_elems(&c.d, gate));
                let mut r = gated_lm::rng::Rng::new(7 + j as u64);
                let dy: Vec<f32> = (0..nq).map(|_| r.normal() as f32).collect();
                let dy = up_f32(dev, &dy).unwrap();
                let run = |oz16: bool| {
                    let scratch = ops::AttnScratch::new(dev, &c.d).unwrap();
                    let (dq, dk, dv, dz) = (
                        nan_f32(dev, nq),
                        nan_f32(dev, nkv),
                        nan_bf16(dev, nkv),
                        nan_bf16(dev, nz.max(1)),
                    );
                    let (z, o) = match oz16 {
                        false => (c.z32.as_ref().map(Operand::from), Operand::from(&o32)),
                        true => (c.z16.as_ref().map(Operand::bf16), Operand::bf16(&o16)),
                    };
                    let ins = (&c.q, &c.k, &c.v, z);
                    let grads = (
                        &dq,
                        &dk,
                        Operand::bf16(&dv).into(),
                        z.map(|_| Operand::bf16(&dz).into()),
                    );
                    ops::attention_backward_tc_to(dev, &c.d, gate, ins, (o, &lse, &dy), &scratch, grads).unwrap();
                    let (delta, dout) = (down_f32(dev, &scratch.delta).unwrap(), bits16(dev, &scratch.dout));
                    real(&what("D"), &delta);
                    let dout = dout[..nq].to_vec(); // dO in bf16: the scratch's first half
                    let d16 = [&dv, &dz].map(|b| bits16(dev, b));
                    (
                        delta.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                        dout,
                        d16,
                        [&dq, &dk].map(|b| bits32(dev, b)),
                    )
                };
                let (f32_in, bf16_in) = (run(false), run(true));
                assert!(f32_in.0 == bf16_in.0, "{}", what("D"));
                assert!(f32_in.1 == bf16_in.1, "{}", what("dO"));
                if gate != FusedGate::None {
                    let dz: Vec<f32> = f32_in.2[1].iter().map(|&b| half::bf16::from_bits(b).to_f32()).collect();
                    real(&what("dz"), &dz);
                    assert!(f32_in.2[1] == bf16_in.2[1], "{}", what("dz"));
                }
                assert!(f32_in.2[0] == bf16_in.2[0], "{}", what("dv"));
                assert!(f32_in.3 == bf16_in.3, "{}", what("dq, dk"));
            }
        }
    }
}

/// `o` and `z` in one type, and bf16 ones only with bf16 `y` (forward) and `dz` (backward):
/// other mixes, and a bf16 `o` one element short, are refused before any launch.
#[test]
fn mixed_o_and_z_types_are_refused() {
    let emu = gated_lm::backend::cuda::emu::Emu::open().unwrap();
    let dev: &dyn Device = &emu;
    let (d, nq, nkv) = tiny_tc_attention();
    let z16 = |k: usize| dev.zeros(2 * k).unwrap();
    let (q, kv, lse) = (z16(nq), z16(nkv), dev.zeros(4 * 3 * 2).unwrap());
    let (b, f) = (z16(nq), dev.zeros(4 * nq).unwrap());
    let short = z16(nq - 1);
    let (bo, fo, so) = (Operand::bf16(&b), Operand::from(&f), Operand::bf16(&short));
    let elem = FusedGate::Elementwise;
    let refused = |e: anyhow::Result<()>, want: &str, what: &str| {
        let e = format!("{:#}", e.unwrap_err());
        assert!(e.contains(want), "{what}: {e}");
    };
    let fwd = |z: Operand, o: Operand, y: Operand| {
        ops::attention_forward_tc_to(dev, &d, elem, &q, &kv, &kv, Some(z), o, y, &lse)
    };
    fwd(bo, bo, bo).unwrap();
    fwd(fo, fo, bo).unwrap();
    refused(fwd(fo, bo, bo), "one type", "f32 z, bf16 o");
    refused(fwd(bo, fo, bo), "one type", "bf16 z, f32 o");
    refused(fwd(bo, bo, fo), "bf16 GEMM operands", "bf16 o and z, f32 y");
    refused(fwd(so, so, bo), "buffer of", "short bf16 o");
    // ungated: no z to match, o's type alone picks the kernel
    let none = FusedGate::None;
    ops::attention_forward_tc_to(dev, &d, none, &q, &kv, &kv, None, bo, bo, &lse).unwrap();

    let scratch = ops::AttnScratch::new(dev, &d).unwrap();
    let dy = dev.zeros(4 * nq).unwrap();
    let (dq, dk) = (dev.zeros(4 * nq).unwrap(), dev.zeros(4 * nkv).unwrap());
    let dv = z16(nkv);
    let bwd = |z: Operand, o: Operand, dz: Operand| {
        let grads = (&dq, &dk, Operand::bf16(&dv).into(), Some(dz.into()));
        ops::attention_backward_tc_to(dev, &d, elem, (&q, &kv, &kv, Some(z)), (o, &lse, &dy), &scratch, grads)
    };
    bwd(bo, bo, bo).unwrap();
    bwd(fo, fo, bo).unwrap();
    bwd(fo, fo, fo).unwrap();
    refused(bwd(fo, bo, bo), "one type", "backward: f32 z, bf16 o");
    refused(bwd(bo, bo, fo), "bf16 GEMM operands", "backward: f32 dz");
    refused(bwd(so, so, bo), "buffer of", "backward: short bf16 o");
}
