//! cuBLASLt GEMMs on raw device pointers (cudarc's result-level API: its safe `matmul` fixes C
//! to the operands' type and f32 to TF32): f32 operands with full f32 compute, or bf16
//! operands with f32 accumulation; the output f32, or bf16 from bf16 operands (f32 compute and
//! scale, D rounded: cuBLASLt's bf16 × bf16 → bf16 GEMM with CUBLAS_COMPUTE_32F).

use super::runtime::DType;
use anyhow::{anyhow, Result};
use cudarc::cublaslt::{result as lt, sys};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use std::ffi::c_void;
use std::sync::Arc;

pub struct Blas {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    stream: Arc<CudaStream>,
}

/// Hopper wants 32 MiB (NVIDIA's recommendation, as cudarc uses).
const WORKSPACE: usize = 32 << 20;

struct Layout(sys::cublasLtMatrixLayout_t);
impl Drop for Layout {
    fn drop(&mut self) {
        // SAFETY: created by create_matrix_layout, destroyed once
        let _ = unsafe { lt::destroy_matrix_layout(self.0) };
    }
}
struct Desc(sys::cublasLtMatmulDesc_t);
impl Drop for Desc {
    fn drop(&mut self) {
        // SAFETY: as above
        let _ = unsafe { lt::destroy_matmul_desc(self.0) };
    }
}
struct Pref(sys::cublasLtMatmulPreference_t);
impl Drop for Pref {
    fn drop(&mut self) {
        // SAFETY: as above
        let _ = unsafe { lt::destroy_matmul_pref(self.0) };
    }
}

fn err(what: &str) -> impl Fn(lt::CublasError) -> anyhow::Error + '_ {
    move |e| anyhow!("cuBLASLt {what}: {e:?}")
}

/// One column-major GEMM: `D (m×n, ldc) = alpha·op(A)·op(B) + beta·C`, `C` and `D` of one
/// layout (`c_in == c`: in place).
pub struct ColMajor {
    /// A's and B's type
    pub dtype: DType,
    /// C's and D's type
    pub c_dtype: DType,
    pub transa: bool,
    pub transb: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: u64,
    pub lda: usize,
    pub b: u64,
    pub ldb: usize,
    /// D, the output
    pub c: u64,
    /// C, the input beta scales
    pub c_in: u64,
    pub ldc: usize,
    pub alpha: f32,
    pub beta: f32,
}

impl Blas {
    pub fn new(stream: Arc<CudaStream>) -> Result<Blas> {
        let handle = lt::create_handle().map_err(err("handle"))?;
        let workspace = stream
            .alloc_zeros::<u8>(WORKSPACE)
            .map_err(|e| anyhow!("cuBLASLt workspace: {e:?}"))?;
        Ok(Blas {
            handle,
            workspace,
            stream,
        })
    }

    /// # Safety
    /// The pointers must address device memory covering the matrices the shapes describe.
    pub unsafe fn matmul(&self, g: &ColMajor) -> Result<()> {
        let cuda_type = |t: DType| match t {
            DType::F32 => sys::cudaDataType_t::CUDA_R_32F,
            DType::Bf16 => sys::cudaDataType_t::CUDA_R_16BF,
        };
        let ty = cuda_type(g.dtype);
        let (m, n, k) = (g.m as u64, g.n as u64, g.k as u64);
        let (ar, ac) = if g.transa { (k, m) } else { (m, k) };
        let (br, bc) = if g.transb { (n, k) } else { (k, n) };
        let la = Layout(lt::create_matrix_layout(ty, ar, ac, g.lda as i64).map_err(err("layout A"))?);
        let lb = Layout(lt::create_matrix_layout(ty, br, bc, g.ldb as i64).map_err(err("layout B"))?);
        let f32_ty = sys::cudaDataType_t::CUDA_R_32F;
        let c_ty = cuda_type(g.c_dtype);
        let lc = Layout(lt::create_matrix_layout(c_ty, m, n, g.ldc as i64).map_err(err("layout C"))?);
        let desc = Desc(
            lt::create_matmul_desc(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, f32_ty).map_err(err("descriptor"))?,
        );
        for (attr, t) in [
            (
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                g.transa,
            ),
            (
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB,
                g.transb,
            ),
        ] {
            let op = t as i32; // CUBLAS_OP_N = 0, CUBLAS_OP_T = 1
            lt::set_matmul_desc_attribute(desc.0, attr, &op as *const i32 as *const c_void, 4)
                .map_err(err("transpose"))?;
        }
        let pref = Pref(lt::create_matmul_pref().map_err(err("preference"))?);
        let ws = WORKSPACE as u64;
        lt::set_matmul_pref_attribute(
            pref.0,
            sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
            &ws as *const u64 as *const c_void,
            8,
        )
        .map_err(err("workspace size"))?;
        let heur = lt::get_matmul_algo_heuristic(self.handle, desc.0, la.0, lb.0, lc.0, lc.0, pref.0)
            .map_err(err("no algorithm for this GEMM"))?;
        let (w, _sync) = self.workspace.device_ptr(&self.stream);
        lt::matmul(
            self.handle,
            desc.0,
            &g.alpha as *const f32 as *const c_void,
            &g.beta as *const f32 as *const c_void,
            g.a as *const c_void,
            la.0,
            g.b as *const c_void,
            lb.0,
            g.c_in as *const c_void,
            lc.0,
            g.c as *mut c_void,
            lc.0,
            &heur.algo,
            w as *mut c_void,
            WORKSPACE,
            self.stream.cu_stream() as *mut _,
        )
        .map_err(err("matmul"))
    }
}

impl Drop for Blas {
    fn drop(&mut self) {
        // SAFETY: the handle was created in new and is destroyed once
        let _ = unsafe { lt::destroy_handle(self.handle) };
    }
}
