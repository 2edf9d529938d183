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
// at odd offsets) one element at a time (packs of 1), with the same per-element expression: bit
// for bit the same outputs either way.
template <class T>
__device__ __forceinline__ bool packed(int ff, const T* a, const T* b, const T* c = nullptr, const T* d = nullptr) {
    return ff % Pack16<T>::N == 0 && aligned16(a) && aligned16(b) && aligned16(c) && aligned16(d);
}

// The stacked walk over packs of N: pack i of m, its gate pack at `at`, its up pack ff / N on.
template <int N, class T>
__device__ void swiglu_fwd_packs(const T* gu, T* m, long n, int ff) {
    using P = Pack<T, N>;
    const P* gup = reinterpret_cast<const P*>(gu);
    for_each_stacked(n / N, ff / N, [&](long i, long at) {
        const P g = gup[at], u = gup[at + ff / N];
        P o;
        #pragma unroll
        for (int e = 0; e < N; ++e) store_as(&o.v[e], swiglu_m(load_f32(&g.v[e]), load_f32(&u.v[e])));
        reinterpret_cast<P*>(m)[i] = o;
    });
}

template <class T>
__device__ void swiglu_fwd_impl(const T* gu, T* m, long n, int ff) {
    if (packed(ff, gu, m))
        swiglu_fwd_packs<Pack16<T>::N>(gu, m, n, ff);
    else
        swiglu_fwd_packs<1>(gu, m, n, ff);
}

extern "C" __global__ void swiglu_fwd(const float* gu, float* m, long n, int ff) { swiglu_fwd_impl(gu, m, n, ff); }
extern "C" __global__ void swiglu_fwd_bf16(const bf16* gu, bf16* m, long n, int ff) { swiglu_fwd_impl(gu, m, n, ff); }

// dg = dm·u·silu'(g), du = dm·silu(g); silu'(g) = s·(1 + g·(1 − s)); and m recomputed
template <int N, class T>
__device__ void swiglu_bwd_packs(const T* gu, const T* dm, T* dgu, T* m, long n, int ff) {
    using P = Pack<T, N>;
    const P* gup = reinterpret_cast<const P*>(gu);
    P* dgup = reinterpret_cast<P*>(dgu);
    for_each_stacked(n / N, ff / N, [&](long i, long at) {
        const long up = at + ff / N;
        const P g = gup[at], u = gup[up], d = reinterpret_cast<const P*>(dm)[i];
        P dg, du, mo;
        #pragma unroll
        for (int e = 0; e < N; ++e) {
            const float ge = load_f32(&g.v[e]), ue = load_f32(&u.v[e]), de = load_f32(&d.v[e]);
            const float s = sigmoidf(ge);
            store_as(&du.v[e], de * ge * s);
            store_as(&dg.v[e], de * ue * s * (1.0f + ge * (1.0f - s)));
            store_as(&mo.v[e], swiglu_m(ge, ue));
        }
        dgup[at] = dg;
        dgup[up] = du;
        reinterpret_cast<P*>(m)[i] = mo;
    });
}

template <class T>
__device__ void swiglu_bwd_impl(const T* gu, const T* dm, T* dgu, T* m, long n, int ff) {
    if (packed(ff, gu, dm, dgu, m))
        swiglu_bwd_packs<Pack16<T>::N>(gu, dm, dgu, m, n, ff);
    else
        swiglu_bwd_packs<1>(gu, dm, dgu, m, n, ff);
}

// at most 80 registers, so 3 blocks of 256 share an SM (768 threads, 36 KB of loads in flight):
// unbounded, the packed bf16 loop took 93, room for 2; at 64 it spills
extern "C" __global__ void __launch_bounds__(256, 3) swiglu_bwd(const float* gu, const float* dm, float* dgu, float* m, long n, int ff) {
    swiglu_bwd_impl(gu, dm, dgu, m, n, ff);
}
extern "C" __global__ void __launch_bounds__(256, 3) swiglu_bwd_bf16(const bf16* gu, const bf16* dm, bf16* dgu, bf16* m, long n, int ff) {
    swiglu_bwd_impl(gu, dm, dgu, m, n, ff);
}
