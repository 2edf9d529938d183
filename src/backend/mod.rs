//! Backend kernels. `cpu` is the reference backend (gemm + rayon); ops in `model::ops` call only
//! these kernels for their heavy lifting, which is the seam a CUDA backend plugs into.
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod profile;
