//! CUDA backend (feature `cuda`): the kernels as CUDA C++ sources compiled at run time by NVRTC
//! for the device's architecture. cudarc loads libnvrtc/libcuda dynamically, so the binary builds
//! on machines without CUDA; what is missing is reported when it is first needed.
//!
//! `ops` holds the kernels grouped per op, each op's launchers beside its source
//! (`ops/rmsnorm.rs` + `ops/rmsnorm.cu`, ..., `ops/attention/`), each listing its entry points;
//! `ops::SOURCES` collects them for [`compile_all`], the GPU loader and the emulator. The ops
//! drive the kernels through the [`runtime::Device`] interface, implemented by `device::Gpu` (a
//! real GPU through cudarc) and by `emu::Emu`, a CPU emulator of the CUDA execution model that
//! runs the same sources so every kernel is tested against the CPU ops on machines without a
//! GPU. Nothing here imports the model: the device-resident model that drives these ops is
//! `crate::engine::device`.

pub mod blas;
pub mod device;
pub mod dist;
pub mod emu;
pub mod ops;
pub mod runtime;

use anyhow::{anyhow, Result};
use ops::{COMMON, SOURCES};

/// How to get NVRTC when it is missing.
const NVRTC_HINT: &str = "NVRTC (libnvrtc.so) was not found: install the CUDA toolkit, or \
`pip install nvidia-cuda-nvrtc-cu12` and add its `nvidia/cuda_nvrtc/lib` directory to LD_LIBRARY_PATH";

/// Compile every kernel source to PTX for `arch` (e.g. `sm_90` for an H100/H200).
/// Returns (source name, PTX text).
pub fn compile_all(arch: &'static str) -> Result<Vec<(&'static str, String)>> {
    // cudarc panics on first use when the library is missing: check first, with a hint
    // SAFETY: only tries to dlopen the candidate library names
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(anyhow!("{NVRTC_HINT}"));
    }
    SOURCES
        .iter()
        .map(|&ops::KernelSource { name, text, .. }| {
            let opts = cudarc::nvrtc::CompileOptions {
                arch: Some(arch),
                name: Some(format!("{name}.cu")),
                ..Default::default()
            };
            let src = format!("{COMMON}\n#line 1 \"{name}.cu\"\n{text}");
            let ptx = cudarc::nvrtc::compile_ptx_with_opts(src, opts)
                .map_err(|e| anyhow!("NVRTC could not compile {name}.cu for {arch}: {e:?}"))?;
            Ok((name, ptx.to_src()))
        })
        .collect()
}
