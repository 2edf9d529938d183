//! CUDA backend (feature `cuda`), first part: the kernels as CUDA C++ sources compiled at run
//! time by NVRTC for the device's architecture. cudarc loads libnvrtc/libcuda dynamically, so the
//! binary builds on machines without CUDA; what is missing is reported when it is first needed.
//!
//! `ops` drives the kernels through the [`runtime::Device`] interface, implemented by
//! `device::Gpu` (a real GPU through cudarc) and by `emu::Emu`, a CPU emulator of the CUDA
//! execution model that runs the same sources so every kernel is tested against the CPU ops on
//! machines without a GPU. Nothing here imports the model: the device-resident model that drives
//! these ops is `crate::engine::device`.

pub mod blas;
pub mod device;
pub mod dist;
pub mod emu;
pub mod ops;
pub mod runtime;

use anyhow::{anyhow, Result};

/// The head dims the attention kernels exist for: kernels/attention.cu instantiates
/// `ATTN_KERNELS(HD)` for each. Written once here; the entry points in [`SOURCES`] and
/// [`ATTN_HEAD_DIMS`] are generated from it, and a device whose module lacks one of those entry
/// points fails to open, so the .cu file cannot silently disagree.
macro_rules! attn_head_dims {
    ($then:ident) => {
        $then!(16, 32, 64, 128)
    };
}
macro_rules! as_array {
    ($($hd:literal),*) => {
        [$($hd),*]
    };
}
macro_rules! attention_entries {
    ($($hd:literal),*) => {
        &["attn_bwd_pre", $(concat!("attn_fwd_hd", $hd), concat!("attn_bwd_dkdv_hd", $hd), concat!("attn_bwd_dq_hd", $hd)),*]
    };
}

/// Head dims with attention kernels (the only ones the device path runs).
pub const ATTN_HEAD_DIMS: &[usize] = &attn_head_dims!(as_array);

/// [`ATTN_HEAD_DIMS`] for messages: "16, 32, 64, 128".
pub fn attn_head_dims_text() -> String {
    ATTN_HEAD_DIMS
        .iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Prepended to every source: bf16 bits, block reductions, shared-memory macro.
pub const COMMON: &str = include_str!("kernels/common.cuh");

/// Kernel sources and the entry points each must define.
pub const SOURCES: &[(&str, &str, &[&str])] = &[
    (
        "elementwise",
        include_str!("kernels/elementwise.cu"),
        &["swiglu_fwd", "swiglu_bwd", "cast_f32_bf16"],
    ),
    (
        "rows",
        include_str!("kernels/rows.cu"),
        &["rmsnorm_fwd", "rmsnorm_bwd", "cross_entropy_fwd_bwd"],
    ),
    (
        "attention",
        include_str!("kernels/attention.cu"),
        attn_head_dims!(attention_entries),
    ),
    (
        "attention_tc",
        include_str!("kernels/attention_tc.cu"),
        &[
            "attn_fwd_tc_hd64",
            "attn_fwd_tc_hd128",
            "tc_mma_probe",
            "attn_bwd_pre_tc",
            "attn_bwd_dkdv_tc_hd64",
            "attn_bwd_dq_tc_hd64",
            "attn_bwd_dkdv_tc_hd128",
            "attn_bwd_dq_tc_hd128",
            "attn_bwd_dkdv_tc_planted",
            "attn_bwd_dq_tc_planted",
        ],
    ),
    ("gemm", include_str!("kernels/gemm.cu"), &["gemm_f32", "gemm_bf16"]),
    (
        "model",
        include_str!("kernels/model.cu"),
        &[
            "embed_fwd",
            "embed_bwd",
            "add_f32",
            "colsum_partial",
            "colsum_final",
            "qknorm_rope_fwd",
            "qknorm_rope_bwd",
            "sumsq_multi",
            "adamw_multi",
            "fill_f32",
        ],
    ),
];

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
        .map(|&(name, src, _)| {
            let opts = cudarc::nvrtc::CompileOptions {
                arch: Some(arch),
                name: Some(format!("{name}.cu")),
                ..Default::default()
            };
            let src = format!("{COMMON}\n#line 1 \"{name}.cu\"\n{src}");
            let ptx = cudarc::nvrtc::compile_ptx_with_opts(src, opts)
                .map_err(|e| anyhow!("NVRTC could not compile kernels/{name}.cu for {arch}: {e:?}"))?;
            Ok((name, ptx.to_src()))
        })
        .collect()
}
