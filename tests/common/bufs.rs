//! Device buffers for the CUDA kernel tests: random values, NaN poison, bf16 uploads and typed
//! operands (tests/cuda_bf16.rs, cuda_attn_bf16.rs, cuda_stacked.rs).

use gated_lm::backend::cuda::ops::{AttnDims, Operand};
use gated_lm::backend::cuda::runtime::{up_f32, up_u16, DBuf, Device};

/// `n` normal values of standard deviation `std` from `seed`.
pub fn randn(n: usize, seed: u64, std: f64) -> Vec<f32> {
    let mut r = gated_lm::rng::Rng::new(seed);
    (0..n).map(|_| (r.normal() * std) as f32).collect()
}

/// The smallest tensor-core attention shape (one sequence of 3 tokens, 2 heads sharing one KV
/// head of 64), for the tests of what the kernels refuse: with its q and k (or v) lengths.
pub fn tiny_tc_attention() -> (AttnDims, usize, usize) {
    let d = AttnDims {
        batch: 1,
        seq: 3,
        heads: 2,
        kv_heads: 1,
        head_dim: 64,
    };
    (d, 3 * 2 * 64, 3 * 64)
}

/// `n` f32 or bf16 elements of NaN, so an element a kernel skips cannot pass for a result.
pub fn nan_f32(dev: &dyn Device, n: usize) -> DBuf {
    up_f32(dev, &vec![f32::NAN; n]).unwrap()
}
pub fn nan_bf16(dev: &dyn Device, n: usize) -> DBuf {
    up_u16(dev, &vec![0x7fc1; n]).unwrap()
}

/// `v` rounded to bf16 (nearest even) and uploaded as bf16.
pub fn up_bf16(dev: &dyn Device, v: &[f32]) -> DBuf {
    let bits: Vec<u16> = v.iter().map(|&x| half::bf16::from_f32(x).to_bits()).collect();
    up_u16(dev, &bits).unwrap()
}

/// `b` as a bf16 or an f32 operand.
pub fn typed(b: &DBuf, bf16: bool) -> Operand<'_> {
    if bf16 {
        Operand::bf16(b)
    } else {
        b.into()
    }
}
