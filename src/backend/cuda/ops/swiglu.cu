// SwiGLU on the stacked gate/up GEMM's output: `gu` is [rows, 2·ff], each row the gate's ff
// values then the up projection's (one GEMM of [gate; up] computes both). All in f32, or all in
// bf16 in mixed precision (the GEMMs write gu and dm and read m and dgu in bf16; the math is
// f32), 16 bytes per access (8 bf16 or 4 f32: `packed`) or else one element at a time, in
// grid-stride loops. Same math as src/model/ops/swiglu.rs.
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

// Whether a kernel may take 16 bytes at a time: a row's gate and up halves then start on a
// Pack16 boundary (ff a multiple of its N) and so does every pointer. Else (odd widths, views
// at odd offsets) one element at a time, with the same per-element expression: bit for bit the
// same outputs either way.
template <class T>
__device__ __forceinline__ bool packed(int ff, const T* a, const T* b, const T* c = nullptr, const T* d = nullptr) {
    return ff % Pack16<T>::N == 0 && aligned16(a) && aligned16(b) && aligned16(c) && aligned16(d);
}

template <class T>
__device__ void swiglu_fwd_impl(const T* gu, T* m, long n, int ff) {
    constexpr int N = Pack16<T>::N;
    if (packed(ff, gu, m)) {
        // the stacked walk over packs: pack i of m, its gate pack at `at` (ff / N packs on)
        for_each_stacked(n / N, ff / N, [&](long i, long at) {
            const Pack16<T> g = reinterpret_cast<const Pack16<T>*>(gu)[at];
            const Pack16<T> u = reinterpret_cast<const Pack16<T>*>(gu)[at + ff / N];
            Pack16<T> o;
            #pragma unroll
            for (int e = 0; e < N; ++e) store_as(&o.v[e], swiglu_m(load_f32(&g.v[e]), load_f32(&u.v[e])));
            reinterpret_cast<Pack16<T>*>(m)[i] = o;
        });
        return;
    }
    for_each_stacked(n, ff, [&](long i, long at) { store_as(m + i, swiglu_m(load_f32(gu + at), load_f32(gu + at + ff))); });
}

extern "C" __global__ void swiglu_fwd(const float* gu, float* m, long n, int ff) { swiglu_fwd_impl(gu, m, n, ff); }
extern "C" __global__ void swiglu_fwd_bf16(const bf16* gu, bf16* m, long n, int ff) { swiglu_fwd_impl(gu, m, n, ff); }

// dg = dm·u·silu'(g), du = dm·silu(g); silu'(g) = s·(1 + g·(1 − s)); and m recomputed
__device__ __forceinline__ void swiglu_grads(float g, float u, float d, float& dg, float& du, float& m) {
    const float s = sigmoidf(g);
    du = d * g * s;
    dg = d * u * s * (1.0f + g * (1.0f - s));
    m = swiglu_m(g, u);
}

template <class T>
__device__ void swiglu_bwd_impl(const T* gu, const T* dm, T* dgu, T* m, long n, int ff) {
    constexpr int N = Pack16<T>::N;
    if (packed(ff, gu, dm, dgu, m)) {
        for_each_stacked(n / N, ff / N, [&](long i, long at) {
            const long up = at + ff / N;
            const Pack16<T> g = reinterpret_cast<const Pack16<T>*>(gu)[at], u = reinterpret_cast<const Pack16<T>*>(gu)[up];
            const Pack16<T> d = reinterpret_cast<const Pack16<T>*>(dm)[i];
            Pack16<T> dg, du, mo;
            #pragma unroll
            for (int e = 0; e < N; ++e) {
                float a, b, c;
                swiglu_grads(load_f32(&g.v[e]), load_f32(&u.v[e]), load_f32(&d.v[e]), a, b, c);
                store_as(&dg.v[e], a);
                store_as(&du.v[e], b);
                store_as(&mo.v[e], c);
            }
            reinterpret_cast<Pack16<T>*>(dgu)[at] = dg;
            reinterpret_cast<Pack16<T>*>(dgu)[up] = du;
            reinterpret_cast<Pack16<T>*>(m)[i] = mo;
        });
        return;
    }
    for_each_stacked(n, ff, [&](long i, long at) {
        float dg, du, mo;
        swiglu_grads(load_f32(gu + at), load_f32(gu + at + ff), load_f32(dm + i), dg, du, mo);
        store_as(dgu + at + ff, du);
        store_as(dgu + at, dg);
        store_as(m + i, mo);
    });
}

// at most 80 registers, so 3 blocks of 256 share an SM (768 threads, 36 KB of loads in flight):
// unbounded, the packed bf16 loop took 93, room for 2; at 64 it spills
extern "C" __global__ void __launch_bounds__(256, 3) swiglu_bwd(const float* gu, const float* dm, float* dgu, float* m, long n, int ff) {
    swiglu_bwd_impl(gu, dm, dgu, m, n, ff);
}
extern "C" __global__ void __launch_bounds__(256, 3) swiglu_bwd_bf16(const bf16* gu, const bf16* dm, bf16* dgu, bf16* m, long n, int ff) {
    swiglu_bwd_impl(gu, dm, dgu, m, n, ff);
}
