use gated_lm::config::{GateConfig, GateGranularity, ModelConfig};
use gated_lm::model::ops::gate::{gate_bwd, gate_fwd};
use std::time::Instant;
fn main() {
    let mut cfg = ModelConfig::preset("tiny", Some(GateConfig::g1(GateGranularity::Elementwise))).unwrap();
    cfg.validate().unwrap();
    let g = cfg.gate.clone().unwrap();
    let geo = cfg.gate_geometry().unwrap();
    let n = 2048 * 256;
    let y0: Vec<f32> = (0..n).map(|i| (i % 13) as f32 * 0.1).collect();
    let z: Vec<f32> = (0..n).map(|i| (i % 7) as f32 * 0.3 - 1.0).collect();
    let mut y = y0.clone();
    let mut dz = vec![0.0f32; n];
    for _ in 0..3 {
        gate_fwd(&g, &geo, &mut y, &z);
    }
    let t = Instant::now();
    for _ in 0..20 {
        gate_fwd(&g, &geo, &mut y, &z);
    }
    println!("fwd {:.2} ns/elem", t.elapsed().as_secs_f64() / 20.0 / n as f64 * 1e9);
    let t = Instant::now();
    for _ in 0..20 {
        gate_bwd(&g, &geo, &y0, &z, &mut y, &mut dz);
    }
    println!("bwd {:.2} ns/elem", t.elapsed().as_secs_f64() / 20.0 / n as f64 * 1e9);
    let t = Instant::now();
    for _ in 0..20 {
        let c = y0.clone();
        std::hint::black_box(&c);
    }
    println!("clone {:.2} ns/elem", t.elapsed().as_secs_f64() / 20.0 / n as f64 * 1e9);
}
