//! ggml's tensor types and their block layouts: dequantisation of every type a common GGUF holds
//! (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, the K-quants Q2_K–Q6_K and Q8_K, IQ4_NL,
//! IQ4_XS), and llama.cpp's reference quantisers for the 32-element types (our test writer).
//!
//! Each dequantiser follows ggml's arithmetic in f32 and in the same order (`d·sc` first, then
//! `·q`, then `− dmin·m`), so the results equal the `gguf` Python package's bit for bit
//! (tests/fixtures/gen_quants.py writes the oracle).

use half::{bf16, f16};

/// Elements per K-quant super-block.
const QK_K: usize = 256;

/// ggml tensor types we read.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgmlType {
    F32 = 0,
    F16 = 1,
    Q4_0 = 2,
    Q4_1 = 3,
    Q5_0 = 6,
    Q5_1 = 7,
    Q8_0 = 8,
    Q2_K = 10,
    Q3_K = 11,
    Q4_K = 12,
    Q5_K = 13,
    Q6_K = 14,
    Q8_K = 15,
    IQ4_NL = 20,
    IQ4_XS = 23,
    BF16 = 30,
}

/// Every type we read, for messages and tests.
pub const SUPPORTED: [GgmlType; 16] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
    GgmlType::Q8_K,
    GgmlType::IQ4_NL,
    GgmlType::IQ4_XS,
];

/// IQ4_NL's non-linear 4-bit code book (also IQ4_XS's).
const IQ4_VALUES: [i8; 16] = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113];

impl GgmlType {
    pub fn from_u32(t: u32) -> Option<GgmlType> {
        SUPPORTED.iter().copied().find(|ty| *ty as u32 == t)
    }

    /// (elements per block, bytes per block)
    pub fn block(self) -> (u64, u64) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 => (1, 2),
            GgmlType::Q4_0 | GgmlType::IQ4_NL => (32, 18),
            GgmlType::Q4_1 => (32, 20),
            GgmlType::Q5_0 => (32, 22),
            GgmlType::Q5_1 => (32, 24),
            GgmlType::Q8_0 => (32, 34),
            GgmlType::Q2_K => (256, 84),
            GgmlType::Q3_K => (256, 110),
            GgmlType::Q4_K => (256, 144),
            GgmlType::Q5_K => (256, 176),
            GgmlType::Q6_K => (256, 210),
            GgmlType::Q8_K => (256, 292),
            GgmlType::IQ4_XS => (256, 136),
        }
    }

    pub fn names() -> String {
        SUPPORTED
            .iter()
            .map(|t| format!("{t:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn h(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Q4_K / Q5_K: the 8 sub-blocks' 6-bit scales and mins packed in 12 bytes.
fn scale_min_k4(s: &[u8], j: usize) -> (f32, f32) {
    if j < 4 {
        ((s[j] & 63) as f32, (s[j + 4] & 63) as f32)
    } else {
        (
            ((s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4)) as f32,
            ((s[j + 4] >> 4) | ((s[j] >> 6) << 4)) as f32,
        )
    }
}

/// One block of `ty` (exactly `ty.block().1` bytes) into `out`.
fn block(ty: GgmlType, c: &[u8], out: &mut Vec<f32>) {
    match ty {
        GgmlType::F32 => out.push(f32::from_le_bytes(c.try_into().unwrap())),
        GgmlType::F16 => out.push(h(c, 0)),
        GgmlType::BF16 => out.push(bf16::from_le_bytes([c[0], c[1]]).to_f32()),
        GgmlType::Q8_0 => {
            let d = h(c, 0);
            out.extend(c[2..].iter().map(|&q| d * q as i8 as f32));
        }
        GgmlType::Q4_0 => {
            let d = h(c, 0);
            out.extend(c[2..].iter().map(|&q| d * ((q & 0xF) as i32 - 8) as f32));
            out.extend(c[2..].iter().map(|&q| d * ((q >> 4) as i32 - 8) as f32));
        }
        GgmlType::Q4_1 => {
            let (d, m) = (h(c, 0), h(c, 2));
            out.extend(c[4..].iter().map(|&q| d * (q & 0xF) as f32 + m));
            out.extend(c[4..].iter().map(|&q| d * (q >> 4) as f32 + m));
        }
        GgmlType::Q5_0 | GgmlType::Q5_1 => {
            let d = h(c, 0);
            let (m, at) = if ty == GgmlType::Q5_1 {
                (Some(h(c, 2)), 4)
            } else {
                (None, 2)
            };
            let qh = u32::from_le_bytes(c[at..at + 4].try_into().unwrap());
            let qs = &c[at + 4..];
            for j in 0..32 {
                let nib = if j < 16 { qs[j] & 0xF } else { qs[j - 16] >> 4 };
                let q = nib | ((((qh >> j) & 1) as u8) << 4);
                out.push(match m {
                    Some(m) => d * q as f32 + m,
                    None => d * (q as i32 - 16) as f32,
                });
            }
        }
        GgmlType::Q2_K => {
            let (sc, qs) = (&c[..16], &c[16..80]);
            let (d, dmin) = (h(c, 80), h(c, 82));
            for e in 0..QK_K {
                let (half, shift, l) = (e / 128, (e / 32) % 4, e % 32);
                let q = (qs[half * 32 + l] >> (2 * shift)) & 3;
                let s = sc[e / 16];
                out.push((d * (s & 0xF) as f32) * q as f32 - dmin * (s >> 4) as f32);
            }
        }
        GgmlType::Q3_K => {
            let (hm, qs, sc) = (&c[..32], &c[32..96], &c[96..108]);
            let d = h(c, 108);
            let scale = |k: usize| -> f32 {
                let lo = if k < 8 { sc[k] & 0xF } else { sc[k - 8] >> 4 };
                let hi = (sc[8 + k % 4] >> (2 * (k / 4))) & 3;
                ((lo | (hi << 4)) as i8 - 32) as f32
            };
            for e in 0..QK_K {
                let (half, shift, l) = (e / 128, (e / 32) % 4, e % 32);
                let low = ((qs[half * 32 + l] >> (2 * shift)) & 3) as i8;
                // the high bit set means no offset, clear means −4
                let high = (hm[l] >> (e / 32)) & 1;
                let q = if high == 1 { low } else { low - 4 };
                out.push((d * scale(e / 16)) * q as f32);
            }
        }
        GgmlType::Q4_K | GgmlType::Q5_K => {
            let (d, dmin, sc) = (h(c, 0), h(c, 2), &c[4..16]);
            let (qh, qs) = if ty == GgmlType::Q5_K {
                (Some(&c[16..48]), &c[48..])
            } else {
                (None, &c[16..])
            };
            for e in 0..QK_K {
                let (chunk, shift, l) = (e / 64, (e / 32) % 2, e % 32);
                let mut q = (qs[chunk * 32 + l] >> (4 * shift)) & 0xF;
                if let Some(qh) = qh {
                    q |= ((qh[l] >> (e / 32)) & 1) << 4;
                }
                let (s, m) = scale_min_k4(sc, e / 32);
                out.push((d * s) * q as f32 - dmin * m);
            }
        }
        GgmlType::Q6_K => {
            let (ql, qh, sc) = (&c[..128], &c[128..192], &c[192..208]);
            let d = h(c, 208);
            for e in 0..QK_K {
                let (half, rest) = (e / 128, e % 128);
                let low = (ql[half * 64 + rest % 64] >> (4 * (rest / 64))) & 0xF;
                let high = (qh[half * 32 + rest % 32] >> (2 * (rest / 32))) & 3;
                let q = (low | (high << 4)) as i8 - 32;
                out.push((d * sc[e / 16] as i8 as f32) * q as f32);
            }
        }
        GgmlType::Q8_K => {
            let d = f32::from_le_bytes(c[..4].try_into().unwrap());
            out.extend(c[4..260].iter().map(|&q| d * q as i8 as f32));
        }
        GgmlType::IQ4_NL => {
            let d = h(c, 0);
            out.extend(c[2..].iter().map(|&q| d * IQ4_VALUES[(q & 0xF) as usize] as f32));
            out.extend(c[2..].iter().map(|&q| d * IQ4_VALUES[(q >> 4) as usize] as f32));
        }
        GgmlType::IQ4_XS => {
            let d = h(c, 0);
            let scales_h = u16::from_le_bytes([c[2], c[3]]);
            let (scales_l, qs) = (&c[4..8], &c[8..]);
            for ib in 0..8 {
                let lo = (scales_l[ib / 2] >> (4 * (ib % 2))) & 0xF;
                let hi = ((scales_h >> (2 * ib)) & 3) as u8;
                let dl = d * ((lo | (hi << 4)) as i8 - 32) as f32;
                for shift in 0..2 {
                    for l in 0..16 {
                        let q = (qs[ib * 16 + l] >> (4 * shift)) & 0xF;
                        out.push(dl * IQ4_VALUES[q as usize] as f32);
                    }
                }
            }
        }
    }
}

/// Dequantise whole blocks of `ty` (`b.len()` a multiple of the block size).
/// Large tensors (a lazily loaded layer's matrices) are split over threads, each part exactly as
/// the sequential loop computes it.
pub fn dequantize(ty: GgmlType, b: &[u8]) -> Vec<f32> {
    use rayon::prelude::*;
    let (n, bytes) = (ty.block().0 as usize, ty.block().1 as usize);
    let blocks = b.len() / bytes;
    const PART: usize = 1 << 16;
    if blocks * n < 4 * PART || rayon::current_num_threads() == 1 {
        return dequantize_seq(ty, b, bytes, n);
    }
    let per = PART.div_ceil(n);
    let mut out = vec![0.0; blocks * n];
    out.par_chunks_mut(per * n)
        .zip(b[..blocks * bytes].par_chunks(per * bytes))
        .for_each(|(o, c)| o.copy_from_slice(&dequantize_seq(ty, c, bytes, n)));
    out
}

fn dequantize_seq(ty: GgmlType, b: &[u8], bytes: usize, n: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(b.len() / bytes * n);
    for c in b.chunks_exact(bytes) {
        block(ty, c, &mut out);
    }
    out
}

/// Quantise `x` (length a multiple of 32 for block types) as llama.cpp's reference quantisers do.
/// Only the types our test writer needs; the others are refused.
pub fn quantize(ty: GgmlType, x: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    match ty {
        GgmlType::F32 => x.iter().for_each(|v| out.extend(v.to_le_bytes())),
        GgmlType::F16 => x.iter().for_each(|v| out.extend(f16::from_f32(*v).to_le_bytes())),
        GgmlType::BF16 => x.iter().for_each(|v| out.extend(bf16::from_f32(*v).to_le_bytes())),
        GgmlType::Q8_0 => {
            for blk in x.chunks(32) {
                let amax = blk.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend(f16::from_f32(d).to_le_bytes());
                out.extend(blk.iter().map(|v| (v * id).round() as i8 as u8));
            }
        }
        GgmlType::Q4_0 => {
            for blk in x.chunks(32) {
                let max = blk.iter().fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
                let d = max / -8.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend(f16::from_f32(d).to_le_bytes());
                let q = |v: f32| ((v * id + 8.5) as i32).clamp(0, 15) as u8;
                out.extend((0..16).map(|j| q(blk[j]) | (q(blk[j + 16]) << 4)));
            }
        }
        GgmlType::Q4_1 => {
            for blk in x.chunks(32) {
                let (mn, mx) = blk.iter().fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
                let d = (mx - mn) / 15.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend(f16::from_f32(d).to_le_bytes());
                out.extend(f16::from_f32(mn).to_le_bytes());
                let q = |v: f32| (((v - mn) * id + 0.5) as i32).clamp(0, 15) as u8;
                out.extend((0..16).map(|j| q(blk[j]) | (q(blk[j + 16]) << 4)));
            }
        }
        other => panic!("no reference quantiser for {other:?} (tests quantise K-quants with llama.cpp)"),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_sizes_match_the_layouts() {
        // bytes = the fields each dequantiser reads
        for (ty, bytes) in [
            (GgmlType::Q2_K, 16 + 64 + 2 + 2),
            (GgmlType::Q3_K, 32 + 64 + 12 + 2),
            (GgmlType::Q4_K, 2 + 2 + 12 + 128),
            (GgmlType::Q5_K, 2 + 2 + 12 + 32 + 128),
            (GgmlType::Q6_K, 128 + 64 + 16 + 2),
            (GgmlType::Q8_K, 4 + 256 + 32),
            (GgmlType::IQ4_XS, 2 + 2 + 4 + 128),
            (GgmlType::Q5_0, 2 + 4 + 16),
            (GgmlType::Q5_1, 2 + 2 + 4 + 16),
        ] {
            assert_eq!(ty.block().1, bytes as u64, "{ty:?}");
            let out = dequantize(ty, &vec![0u8; bytes]);
            assert_eq!(out.len() as u64, ty.block().0, "{ty:?}");
        }
        for ty in SUPPORTED {
            assert_eq!(GgmlType::from_u32(ty as u32), Some(ty));
        }
    }

    #[test]
    fn q8_k_is_d_times_q() {
        let mut b = vec![0u8; 292];
        b[..4].copy_from_slice(&0.5f32.to_le_bytes());
        b[4] = (-3i8) as u8;
        b[259] = 127;
        let y = dequantize(GgmlType::Q8_K, &b);
        assert_eq!((y[0], y[1], y[255]), (-1.5, 0.0, 63.5));
    }
}
