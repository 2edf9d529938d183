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
