// SwiGLU on the stacked gate/up GEMM's output: `gu` is [rows, 2·ff], each row the gate's ff
// values then the up projection's (one GEMM of [gate; up] computes both). All in f32, or all in
// bf16 in mixed precision (the GEMMs write gu and dm and read m and dgu in bf16; the math is
// f32), one thread per element of m (grid-stride loops). Same math as src/model/ops/swiglu.rs.
// The backward also writes m again (bit for bit the forward's: one expression, `swiglu_m`), for
// the down projection's weight gradient: so the forward's m need not be kept for the backward.
// Entry points (ops/swiglu.rs): swiglu_fwd, swiglu_fwd_bf16, swiglu_bwd, swiglu_bwd_bf16.

// Calls f(i, at) for this thread's grid-stride elements i of the [rows, ff] output, `at` the
// offset of i's gate value in gu (its up value is ff on). Row and column advance by the stride's
// own row and column steps: one 64-bit division per thread, not one per element (a 64-bit
// division is a software routine of ~70 instructions on the GPU, more than the rest of the
// element's work: it made these bandwidth-bound kernels compute-bound).
template <class F>
__device__ __forceinline__ void for_each_stacked(long n, int ff, F f) {
    const long stride = (long)gridDim.x * blockDim.x;
    long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (i >= n) return;
    long r = i / ff, c = i - r * ff;
    const long sr = stride / ff, sc = stride - sr * ff;
    for (; i < n; i += stride) {
        f(i, r * 2 * ff + c);
        r += sr;
        c += sc;
        if (c >= ff) {
            c -= ff;
            ++r;
        }
    }
}

// m = silu(g)·u, as both passes compute it
__device__ __forceinline__ float swiglu_m(float g, float u) { return g * sigmoidf(g) * u; }

template <class T>
__device__ void swiglu_fwd_impl(const T* gu, T* m, long n, int ff) {
    for_each_stacked(n, ff, [&](long i, long at) { store_as(m + i, swiglu_m(load_f32(gu + at), load_f32(gu + at + ff))); });
}

extern "C" __global__ void swiglu_fwd(const float* gu, float* m, long n, int ff) { swiglu_fwd_impl(gu, m, n, ff); }
extern "C" __global__ void swiglu_fwd_bf16(const bf16* gu, bf16* m, long n, int ff) { swiglu_fwd_impl(gu, m, n, ff); }

// dg = dm·u·silu'(g), du = dm·silu(g); silu'(g) = s·(1 + g·(1 − s)); and m recomputed
template <class T>
__device__ void swiglu_bwd_impl(const T* gu, const T* dm, T* dgu, T* m, long n, int ff) {
    for_each_stacked(n, ff, [&](long i, long at) {
        float g = load_f32(gu + at), u = load_f32(gu + at + ff), d = load_f32(dm + i);
        float s = sigmoidf(g);
        store_as(dgu + at + ff, d * g * s);
        store_as(dgu + at, d * u * s * (1.0f + g * (1.0f - s)));
        store_as(m + i, swiglu_m(g, u));
    });
}

extern "C" __global__ void swiglu_bwd(const float* gu, const float* dm, float* dgu, float* m, long n, int ff) {
    swiglu_bwd_impl(gu, dm, dgu, m, n, ff);
}
extern "C" __global__ void swiglu_bwd_bf16(const bf16* gu, const bf16* dm, bf16* dgu, bf16* m, long n, int ff) {
    swiglu_bwd_impl(gu, dm, dgu, m, n, ff);
}
