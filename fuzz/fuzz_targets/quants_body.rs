// The `quants` fuzz target's body, shared with tests/gguf_real.rs (which runs it over a fixed
// corpus, so CI exercises it without cargo-fuzz): the first byte picks one of the ggml types we
// dequantise, the second a row count, the rest are raw blocks of that type.
//
// It checks that no input panics and that: the output has one value per element of the whole
// blocks; dequantising block by block gives the same bits as all at once; F32/F16/BF16 are plain
// conversions; and the same bytes as a one-tensor GGUF read back through the bounds-checked reader
// give the same values, or (a row count that does not divide the blocks) a clean error.

use gated_lm::io::gguf::{dequantize, Gguf};
use gated_lm::io::quants::{GgmlType, SUPPORTED};
use gated_lm::io::st::Bytes;

pub fn run(data: &[u8]) {
    let [sel, rows, rest @ ..] = data else {
        return;
    };
    let ty = SUPPORTED[*sel as usize % SUPPORTED.len()];
    let (n, bytes) = ty.block();
    let (n, bytes) = (n as usize, bytes as usize);
    // a ragged tail is ignored, never read past
    let x = dequantize(ty, rest);
    let blocks = rest.len() / bytes;
    assert_eq!(x.len(), blocks * n, "{ty:?}: {} bytes", rest.len());
    let whole = &rest[..blocks * bytes];
    for (i, blk) in whole.chunks_exact(bytes).enumerate() {
        let one = dequantize(ty, blk);
        let same = one
            .iter()
            .zip(&x[i * n..(i + 1) * n])
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "{ty:?}: block {i} differs alone and amid others");
    }
    let plain: Option<Vec<f32>> = match ty {
        GgmlType::F32 => Some(
            whole
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        GgmlType::F16 => Some(
            whole
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        ),
        GgmlType::BF16 => Some(
            whole
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        ),
        _ => None,
    };
    if let Some(p) = plain {
        assert!(
            p.iter().zip(&x).all(|(a, b)| a.to_bits() == b.to_bits()),
            "{ty:?}: not a plain conversion"
        );
    }
    // the same blocks as a GGUF tensor [rows, blocks·n / rows] (ggml dims: columns first)
    if blocks == 0 {
        return;
    }
    let rows = (*rows as usize).max(1);
    let numel = blocks * n;
    let (cols, rows) = if numel % rows == 0 {
        (numel / rows, rows)
    } else {
        (numel, 1)
    };
    let mut f = Vec::new();
    f.extend(b"GGUF");
    f.extend(3u32.to_le_bytes());
    f.extend(1u64.to_le_bytes()); // tensors
    f.extend(0u64.to_le_bytes()); // metadata
    f.extend(1u64.to_le_bytes());
    f.push(b't');
    f.extend(2u32.to_le_bytes());
    f.extend((cols as u64).to_le_bytes());
    f.extend((rows as u64).to_le_bytes());
    f.extend((ty as u32).to_le_bytes());
    f.extend(0u64.to_le_bytes());
    f.resize(f.len().div_ceil(32) * 32, 0);
    f.extend(whole);
    match Gguf::from_bytes("fuzz.gguf", Bytes::Owned(f)) {
        Ok(g) => {
            assert_eq!(
                cols % n,
                0,
                "{ty:?}: a {cols}-column tensor was accepted with {n}-element blocks"
            );
            let (shape, y) = g.f32("t").unwrap();
            assert_eq!(shape, vec![rows, cols]);
            assert!(
                y.iter().zip(&x).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{ty:?}: reader differs"
            );
        }
        Err(e) => {
            let e = format!("{e:#}");
            assert!(cols % n != 0, "{ty:?}: rejected a valid tensor: {e}");
            assert!(e.starts_with("fuzz.gguf: tensor 't' row length"), "{e}");
        }
    }
}
