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
}
