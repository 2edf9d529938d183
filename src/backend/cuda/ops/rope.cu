// QK-norm fused with RoPE. Same math as src/model/ops/{rmsnorm,rope}.rs.
// Entry points (ops/rope.rs): qknorm_rope_{fwd,bwd}[_bf16][_from_bf16]: `_bf16` writes the
// output (y, dx) in bf16, `_from_bf16` reads the pre-norm input x (the q/k projections' GEMM
// output) in bf16; the math is f32 either way (x widened exactly on load).

// Per (row, head): RMSNorm over head_dim with gain w (w or 1 + w; has_norm = 0: none), then
// rotate-half RoPE of the first 2·half dims at position pos0 + row % seq; the rest pass.
// One warp per (row, head). rstd is [rows, heads]. y is f32, or bf16 (rounded from the same
// f32 value) for the tensor-core attention, which reads the rotated q and k so.
template <class X, class T>
__device__ void qknorm_rope_fwd_impl(const X* x, const float* w, const float* cosv, const float* sinv, T* y,
                                     float* rstd, int rows, int heads, int hd, int half, int seq, int pos0, float eps,
                                     int zc, int has_norm) {
    const int wi = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    if (wi >= rows * heads) return;  // warp-uniform
    const int row = wi / heads;
    const long base = (long)wi * hd;
    float r = 1.0f;
    if (has_norm) {
        float ss = 0.0f;
        for (int e = lane; e < hd; e += 32) {
            const float v = load_f32(x + base + e);
            ss += v * v;
        }
        r = rsqrtf(warp_sum(ss) / hd + eps);
        if (lane == 0) rstd[wi] = r;
    }
#define GAIN(e) (has_norm ? (zc ? 1.0f + w[e] : w[e]) : 1.0f)
    const long p = (long)(pos0 + row % seq) * half;
    for (int i = lane; i < half; i += 32) {
        float a = load_f32(x + base + i) * r * GAIN(i), b = load_f32(x + base + i + half) * r * GAIN(i + half);
        float c = cosv[p + i], s = sinv[p + i];
        store_as(y + base + i, a * c - b * s);
        store_as(y + base + i + half, b * c + a * s);
    }
    for (int e = 2 * half + lane; e < hd; e += 32) store_as(y + base + e, load_f32(x + base + e) * r * GAIN(e));
}

// one entry point per (x, y) type pair
#define ROPE_FWD(name, X, T)                                                                                 \
    extern "C" __global__ void name(const X* x, const float* w, const float* cosv, const float* sinv, T* y, \
                                    float* rstd, int rows, int heads, int hd, int half, int seq, int pos0,  \
                                    float eps, int zc, int has_norm) {                                      \
        qknorm_rope_fwd_impl(x, w, cosv, sinv, y, rstd, rows, heads, hd, half, seq, pos0, eps, zc, has_norm); \
    }
ROPE_FWD(qknorm_rope_fwd, float, float)
ROPE_FWD(qknorm_rope_fwd_bf16, float, bf16)
ROPE_FWD(qknorm_rope_fwd_from_bf16, bf16, float)
ROPE_FWD(qknorm_rope_fwd_bf16_from_bf16, bf16, bf16)
#undef ROPE_FWD

// Backward: dn = Rᵀ·dy, then RMSNorm's backward over the head row. dx (f32, or bf16 for the
// projection GEMMs that read it) is overwritten. A lane recomputes the dn of the elements it
// owns instead of keeping dn in dx, which a bf16 dx could not hold in f32. Block b runs the
// head rows (row, head) [b·span, min(rows·heads, (b+1)·span)), warp w of it rows w, w + warps,
// ... of that span, each as one warp per head row would (dx does not depend on span); with a
// norm each warp sums its rows' gain gradient dn·x̂ per element in its own hd floats of dynamic
// shared memory, and the block adds its warps' sums in order into part[b, hd] (ops/reduce.cu
// colsum_final then adds the blocks' rows in order: deterministic, no atomics).
__device__ __forceinline__ float rope_dn(const float* dy, const float* cosv, const float* sinv, long base, long p,
                                         int half, int e) {
    if (e < half) return dy[base + e] * cosv[p + e] + dy[base + e + half] * sinv[p + e];
    if (e < 2 * half) {
        const int i = e - half;
        return dy[base + e] * cosv[p + i] - dy[base + i] * sinv[p + i];
    }
    return dy[base + e];
}

template <class X, class T>
__device__ void qknorm_rope_bwd_impl(const X* x, const float* w, const float* rstd, const float* cosv,
                                     const float* sinv, const float* dy, T* dx, long ldx, float* part, int rows,
                                     int heads, int hd, int half, int seq, int pos0, int zc, int has_norm, int span) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5, blk = blockIdx.x;
    DYN_SHARED(float, dyn, has_norm ? warps * hd : 0);
    const int w1 = min(rows * heads, (blk + 1) * span);
    float* acc = has_norm ? dyn + warp * hd : nullptr;
    if (has_norm)
        for (int e = lane; e < hd; e += 32) acc[e] = 0.0f;
    for (int wi = blk * span + warp; wi < w1; wi += warps) {  // warp-uniform
        const int row = wi / heads;
        const long base = (long)wi * hd;
        // dx's rows are ldx apart (a band of columns of the stacked projections' gradient)
        T* dxh = dx + (long)row * ldx + (long)(wi - row * heads) * hd;
        const long p = (long)(pos0 + row % seq) * half;
        if (!has_norm) {
            for (int e = lane; e < hd; e += 32) store_as(dxh + e, rope_dn(dy, cosv, sinv, base, p, half, e));
            continue;
        }
        const float r = rstd[wi];
        float dot = 0.0f;
        for (int e = lane; e < hd; e += 32)
            dot += rope_dn(dy, cosv, sinv, base, p, half, e) * GAIN(e) * load_f32(x + base + e) * r;
        const float mean = warp_sum(dot) / hd;
        for (int e = lane; e < hd; e += 32) {
            float xh = load_f32(x + base + e) * r, dn = rope_dn(dy, cosv, sinv, base, p, half, e);
            acc[e] += dn * xh;
            store_as(dxh + e, r * (dn * GAIN(e) - xh * mean));
        }
    }
    if (!has_norm) return;  // block-uniform
    __syncthreads();
    for (int e = threadIdx.x; e < hd; e += blockDim.x) {
        float s = 0.0f;
        for (int k = 0; k < warps; ++k) s += dyn[k * hd + e];
        part[(long)blk * hd + e] = s;
    }
}

// one entry point per (x, dx) type pair
#define ROPE_BWD(name, X, T)                                                                                \
    extern "C" __global__ void name(const X* x, const float* w, const float* rstd, const float* cosv,      \
                                    const float* sinv, const float* dy, T* dx, long ldx, float* part,      \
                                    int rows, int heads, int hd, int half, int seq, int pos0, int zc,      \
                                    int has_norm, int span) {                                              \
        qknorm_rope_bwd_impl(x, w, rstd, cosv, sinv, dy, dx, ldx, part, rows, heads, hd, half, seq, pos0,  \
                             zc, has_norm, span);                                                          \
    }
ROPE_BWD(qknorm_rope_bwd, float, float)
ROPE_BWD(qknorm_rope_bwd_bf16, float, bf16)
ROPE_BWD(qknorm_rope_bwd_from_bf16, bf16, float)
ROPE_BWD(qknorm_rope_bwd_bf16_from_bf16, bf16, bf16)
#undef ROPE_BWD
#undef GAIN
