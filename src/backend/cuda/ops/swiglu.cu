// SwiGLU, f32, one thread per element (grid-stride loops). Same math as src/model/ops/swiglu.rs.
// Entry points (ops/swiglu.rs): swiglu_fwd, swiglu_bwd.

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
