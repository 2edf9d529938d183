// SwiGLU, f32 in, f32 or bf16 out (the GEMM operands: m forward, dg and du backward), one
// thread per element (grid-stride loops). Same math as src/model/ops/swiglu.rs.
// Entry points (ops/swiglu.rs): swiglu_fwd, swiglu_fwd_bf16, swiglu_bwd, swiglu_bwd_bf16.

template <class T>
__device__ void swiglu_fwd_impl(const float* g, const float* u, T* m, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float s = sigmoidf(g[i]);
        store_as(m + i, g[i] * s * u[i]);
    }
}

extern "C" __global__ void swiglu_fwd(const float* g, const float* u, float* m, long n) { swiglu_fwd_impl(g, u, m, n); }
extern "C" __global__ void swiglu_fwd_bf16(const float* g, const float* u, bf16* m, long n) {
    swiglu_fwd_impl(g, u, m, n);
}

// dg = dm·u·silu'(g), du = dm·silu(g); silu'(g) = s·(1 + g·(1 − s))
template <class T>
__device__ void swiglu_bwd_impl(const float* g, const float* u, const float* dm, T* dg, T* du, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float s = sigmoidf(g[i]);
        store_as(du + i, dm[i] * g[i] * s);
        store_as(dg + i, dm[i] * u[i] * s * (1.0f + g[i] * (1.0f - s)));
    }
}

extern "C" __global__ void swiglu_bwd(const float* g, const float* u, const float* dm, float* dg, float* du, long n) {
    swiglu_bwd_impl(g, u, dm, dg, du, n);
}
extern "C" __global__ void swiglu_bwd_bf16(const float* g, const float* u, const float* dm, bf16* dg, bf16* du,
                                           long n) {
    swiglu_bwd_impl(g, u, dm, dg, du, n);
}
