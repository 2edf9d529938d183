// Elementwise ops of the block, f32, one thread per element (grid-stride loops).
// Same math as src/model/ops/swiglu.rs.

extern "C" __global__ void swiglu_fwd(const float* g, const float* u, float* m, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float s = sigmoidf(g[i]);
        m[i] = g[i] * s * u[i];
    }
}

// dg = dm·u·silu'(g), du = dm·silu(g); silu'(g) = s·(1 + g·(1 − s))
extern "C" __global__ void swiglu_bwd(const float* g, const float* u, const float* dm, float* dg, float* du, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float s = sigmoidf(g[i]);
        du[i] = dm[i] * g[i] * s;
        dg[i] = dm[i] * u[i] * s * (1.0f + g[i] * (1.0f - s));
    }
}

// Mixed precision: bf16 copies of f32 tensors (round to nearest even).
extern "C" __global__ void cast_f32_bf16(const float* x, bf16* y, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        y[i] = f32_to_bf16(x[i]);
}
