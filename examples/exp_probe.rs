use gated_lm::backend::cpu::exp_shifted;
use gated_lm::real::Real;
use std::time::Instant;
fn main() {
    let n = 2048 * 8192;
    let mut x: Vec<f32> = (0..n).map(|i| ((i % 977) as f32) * 0.01 - 5.0).collect();
    let t = Instant::now();
    for row in x.chunks_mut(8192) {
        exp_shifted(row);
    }
    println!("exp_shifted: {:.3} ns/elem", t.elapsed().as_secs_f64() / n as f64 * 1e9);
    let t = Instant::now();
    for v in x.iter_mut() {
        *v = Real::exp(*v - 1.0);
    }
    println!(
        "plain exp loop: {:.3} ns/elem",
        t.elapsed().as_secs_f64() / n as f64 * 1e9
    );
    let t = Instant::now();
    for v in x.iter_mut() {
        *v = f32::exp(*v - 1.0);
    }
    println!(
        "libm expf loop: {:.3} ns/elem",
        t.elapsed().as_secs_f64() / n as f64 * 1e9
    );
}
