//! CUDA kernel sources compile with NVRTC (no GPU needed): catches syntax and type errors on
//! CPU-only machines. Skips, saying why, where NVRTC itself is not installed.
#![cfg(feature = "cuda")]

#[test]
fn every_kernel_compiles_to_ptx_for_hopper() {
    let ptx = match gated_lm::backend::cuda::compile_all("sm_90") {
        Ok(p) => p,
        Err(e) if format!("{e}").contains("was not found") => {
            eprintln!("SKIPPED: {e}");
            return;
        }
        Err(e) => panic!("{e:#}"),
    };
    assert_eq!(ptx.len(), gated_lm::backend::cuda::SOURCES.len());
    for ((name, text), (_, _, entries)) in ptx.iter().zip(gated_lm::backend::cuda::SOURCES) {
        assert!(text.contains(".target sm_90"), "{name}: not compiled for sm_90");
        for e in *entries {
            assert!(
                text.contains(&format!(".entry {e}(")),
                "{name}.cu: no kernel {e} in the PTX"
            );
        }
    }
}

fn gpu() -> Option<gated_lm::backend::cuda::device::Gpu> {
    match gated_lm::backend::cuda::device::Gpu::open(0) {
        Ok(g) => Some(g),
        Err(e) => {
            eprintln!("SKIPPED (GPU tests): {e:#}");
            None
        }
    }
}

fn randn(n: usize, seed: u64, std: f64) -> Vec<f32> {
    let mut r = gated_lm::rng::Rng::new(seed);
    (0..n).map(|_| (r.normal() * std) as f32).collect()
}

fn close(what: &str, gpu: &[f32], cpu: &[f32], rel: f32) {
    assert_eq!(gpu.len(), cpu.len(), "{what}");
    let scale = cpu.iter().fold(1e-6f32, |a, x| a.max(x.abs()));
    let err = gpu.iter().zip(cpu).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(
        err <= rel * scale,
        "{what}: GPU and CPU differ by {err} (scale {scale})"
    );
}

/// Each CUDA op against the CPU op on random inputs (f32: 1e-5 relative to the largest value).
#[test]
fn gpu_ops_match_the_cpu_ops() {
    use gated_lm::config::NormStyle;
    use gated_lm::model::ops::{rmsnorm, swiglu};
    let Some(gpu) = gpu() else { return };
    eprintln!("GPU: {} ({})", gpu.name, gpu.arch);
    let n = 3 * 1000 + 7;
    let (g, u, dm) = (randn(n, 1, 2.0), randn(n, 2, 1.0), randn(n, 3, 1.0));
    let mut m = vec![0.0; n];
    swiglu::swiglu_fwd(&g, &u, &mut m);
    close("swiglu_fwd", &gpu.swiglu_fwd(&g, &u).unwrap(), &m, 1e-5);
    let (mut dg, mut du) = (vec![0.0; n], vec![0.0; n]);
    swiglu::swiglu_bwd(&g, &u, &dm, &mut dg, &mut du);
    let (gdg, gdu) = gpu.swiglu_bwd(&g, &u, &dm).unwrap();
    close("swiglu_bwd dg", &gdg, &dg, 1e-5);
    close("swiglu_bwd du", &gdu, &du, 1e-5);
    let (rows, d) = (37, 300);
    let (x, w) = (randn(rows * d, 4, 3.0), randn(d, 5, 0.5));
    for style in [NormStyle::Standard, NormStyle::ZeroCentered] {
        let (mut y, mut rstd) = (vec![0.0; rows * d], vec![0.0; rows]);
        rmsnorm::rmsnorm_fwd(&x, &w, style, 1e-6, &mut y, &mut rstd);
        let (gy, grstd) = gpu
            .rmsnorm_fwd(&x, &w, d, 1e-6, style == NormStyle::ZeroCentered)
            .unwrap();
        close("rmsnorm_fwd y", &gy, &y, 1e-5);
        close("rmsnorm_fwd rstd", &grstd, &rstd, 1e-5);
    }

    // G1 elementwise gate
    let cfg = gated_lm::config::ModelConfig::preset(
        "micro",
        gated_lm::config::GateConfig::parse_spec("elementwise").unwrap(),
    )
    .unwrap();
    let (gc, geo) = (cfg.gate.clone().unwrap(), cfg.gate_geometry().unwrap());
    let n = 24 * cfg.q_dim();
    let (o, z, dy) = (randn(n, 6, 1.0), randn(n, 7, 2.0), randn(n, 8, 1.0));
    let mut y = o.clone();
    gated_lm::model::ops::gate::gate_fwd(&gc, &geo, &mut y, &z);
    close("gate fwd", &gpu.gate_fwd(&o, &z).unwrap(), &y, 1e-5);
    let (mut dyc, mut dz) = (dy.clone(), vec![0.0; n]);
    gated_lm::model::ops::gate::gate_bwd(&gc, &geo, &o, &z, &mut dyc, &mut dz);
    let (gdy, gdz) = gpu.gate_bwd(&o, &z, &dy).unwrap();
    close("gate bwd dy", &gdy, &dyc, 1e-5);
    close("gate bwd dz", &gdz, &dz, 1e-5);

    // cross-entropy with an ignored row
    let (r, vocab) = (9, 5000);
    let logits = randn(r * vocab, 9, 3.0);
    let mut targets: Vec<u32> = (0..r as u32).map(|i| i * 541 % vocab as u32).collect();
    targets[4] = gated_lm::model::ops::cross_entropy::IGNORE;
    let mut grad = logits.clone();
    let mean = gated_lm::model::ops::cross_entropy::cross_entropy(&mut grad, vocab, &targets, true);
    let t32: Vec<i32> = targets
        .iter()
        .map(|&t| {
            if t == gated_lm::model::ops::cross_entropy::IGNORE {
                -1
            } else {
                t as i32
            }
        })
        .collect();
    let (loss, ggrad) = gpu.cross_entropy(&logits, &t32, vocab, 1.0 / 8.0).unwrap();
    assert!(
        (loss.iter().sum::<f32>() as f64 / 8.0 - mean).abs() < 1e-4 * mean.abs().max(1.0),
        "{loss:?} vs {mean}"
    );
    assert_eq!(loss[4], 0.0);
    close("cross-entropy gradient", &ggrad, &grad, 1e-5);
}
