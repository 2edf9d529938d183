//! Helpers of the tests on GGUF files made by llama.cpp's own tools (gguf_real.rs,
//! gguf_real_archs.rs): the fixtures, transformers' golden logits, our forward, and the
//! comparison both bound.
#![allow(dead_code)]

use gated_lm::io::st::StFile;
use gated_lm::model::{shifted_targets, Batch, Model};
use std::path::{Path, PathBuf};

pub fn fx(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/gguf-models")
        .join(p)
}

/// transformers' input ids for model `m` and its float32 logits under `key`, from the golden
/// file `file`: (ids, batch, seq, logits).
pub fn golden(file: &str, m: &str, key: &str) -> (Vec<u32>, usize, usize, Vec<f32>) {
    let st = StFile::open(&fx(file)).unwrap();
    let (shape, ids) = st.ids(&format!("input_ids.{m}")).unwrap();
    let l = st.f32(key).unwrap();
    assert_eq!(l.shape[..2], shape[..]);
    (ids, shape[0], shape[1], l.data)
}

pub fn forward(m: &Model<f32>, ids: &[u32], batch: usize, seq: usize) -> Vec<f32> {
    let tg = shifted_targets(ids, seq);
    let b = Batch {
        ids,
        targets: &tg,
        batch,
        seq,
    };
    m.forward(&b, &mut gated_lm::model::observer::NoObserver)
        .unwrap()
        .logits
}

/// max |a − b| / max |b|, and the fraction of positions whose argmax agrees.
pub fn compare(got: &[f32], want: &[f32], vocab: usize) -> (f32, f32) {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
    let err = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max) / scale;
    let argmax = |r: &[f32]| {
        r.iter()
            .enumerate()
            .fold(
                (0, f32::MIN),
                |(bi, bv), (i, &v)| if v > bv { (i, v) } else { (bi, bv) },
            )
            .0
    };
    let rows = got.len() / vocab;
    let same = got
        .chunks_exact(vocab)
        .zip(want.chunks_exact(vocab))
        .filter(|(a, b)| argmax(a) == argmax(b))
        .count();
    (err, same as f32 / rows as f32)
}
