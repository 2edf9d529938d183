//! GFLOP/s of `gemm` on the matrix shapes of the tiny preset (2048 tokens, d 256, FFN 704), one
//! thread vs all: the ceiling the training step's matmuls can reach on this machine.
//! `cargo run --release --example gemm_probe`
use gated_lm::backend::cpu::{matmul, Mat, Par};
use std::time::Instant;
fn main() {
    for (m, n, k) in [
        (2048usize, 256usize, 256usize),
        (2048, 704, 256),
        (2048, 256, 704),
        (256, 256, 2048),
        (2048, 1024, 256),
    ] {
        let a = vec![0.5f32; m * k];
        let b = vec![0.25f32; n * k];
        let mut c = vec![0.0f32; m * n];
        for par in [Par::Serial, Par::Threads] {
            let bm = Mat::t(&b, 0, k);
            matmul(m, n, k, &mut c, 0, n, Mat::rows(&a, 0, k), bm, 1.0, false, par);
            let t = Instant::now();
            for _ in 0..20 {
                matmul(m, n, k, &mut c, 0, n, Mat::rows(&a, 0, k), bm, 1.0, false, par);
            }
            let s = t.elapsed().as_secs_f64() / 20.0;
            print!(
                "{m}x{n}x{k} {par:?}: {:.0} GFLOP/s   ",
                2.0 * (m * n * k) as f64 / s / 1e9
            );
        }
        println!();
    }
}
