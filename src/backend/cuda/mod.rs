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
pub mod ptx;
pub mod runtime;

pub use ptx::compile_all;
