// RMSNorm: a block per row (the backward: per span of rows, one row at a time), a block-wide
// reduction through shared memory. Same math as src/model/ops/rmsnorm.rs; block_sum and
// store_as in common.cuh. The outputs GEMMs read come in f32 or bf16 (one template, so the
// bf16 result is the rounding of the f32 one, bit for bit).
// Entry points (ops/rmsnorm.rs): rmsnorm_fwd, rmsnorm_fwd_bf16, rmsnorm_bwd, rmsnorm_bwd_bf16.

// The normalisation of one row from its threads' partial sums of squares `ss`: y = x·r·gain
// (gain w or 1 + w), r = 1/rms(x) saved in rstd. Each thread reads only the x it summed.
template <class T>
__device__ void rmsnorm_row(const float* xr, float ss, const float* w, T* yr, float* rstd, int d, float eps, int zc,
                            float* shared) {
    float r = rsqrtf(block_sum(ss, shared) / d + eps);
    for (int j = threadIdx.x; j < d; j += blockDim.x) store_as(yr + j, xr[j] * r * (zc ? 1.0f + w[j] : w[j]));
    if (threadIdx.x == 0) rstd[blockIdx.x] = r;
}

template <class T>
__device__ void rmsnorm_fwd_impl(const float* x, const float* w, T* y, float* rstd, int d, float eps, int zc) {
    __shared__ float shared[32];
    const long off = (long)blockIdx.x * d;
    float ss = 0.0f;
    for (int j = threadIdx.x; j < d; j += blockDim.x) ss += x[off + j] * x[off + j];
    rmsnorm_row(x + off, ss, w, y + off, rstd, d, eps, zc, shared);
}

// y = x / rms(x) · (w or 1 + w); rstd saved for backward.
extern "C" __global__ void rmsnorm_fwd(const float* x, const float* w, float* y, float* rstd, int d, float eps,
                                       int zero_centered) {
    rmsnorm_fwd_impl(x, w, y, rstd, d, eps, zero_centered);
}

extern "C" __global__ void rmsnorm_fwd_bf16(const float* x, const float* w, bf16* y, float* rstd, int d, float eps,
                                            int zero_centered) {
    rmsnorm_fwd_impl(x, w, y, rstd, d, eps, zero_centered);
}

// dx = r·(dy·g − x̂·mean(dy·g·x̂)), g the effective gain, added to dx with `accumulate`, and
// its bf16 rounding into dxb unless that is null. Block b runs rows [b·span, min(rows, (b+1)·span))
// one after another, each exactly as a block per row would (same threads, same sums: dx does
// not depend on span), and sums the gain's gradient Σ dy·x̂ over them per column into part[b, d]
// (ops/reduce.cu colsum_final then adds the blocks' rows in order: deterministic, no atomics).
// Thread t owns columns t, t + blockDim.x, ...: its running sums live in dynamic shared memory
// (d floats) or, with smem_acc = 0 (d too wide for it), in the block's own row of part.
__device__ void rmsnorm_bwd_impl(const float* x, const float* w, const float* rstd, const float* dy, float* dx,
                                 bf16* dxb, float* part, int rows, int span, int d, int zero_centered,
                                 int accumulate, int smem_acc) {
    __shared__ float shared[32];
    DYN_SHARED(float, dyn, smem_acc ? d : 0);
    const int blk = blockIdx.x;
    float* dwp = part + (long)blk * d;
    float* acc = smem_acc ? dyn : dwp;
    for (int j = threadIdx.x; j < d; j += blockDim.x) acc[j] = 0.0f;
    const int r1 = min(rows, (blk + 1) * span);
    for (int row = blk * span; row < r1; ++row) {
        const long off = (long)row * d;
        float r = rstd[row];
        float dot = 0.0f;
        for (int j = threadIdx.x; j < d; j += blockDim.x) {
            float gain = zero_centered ? 1.0f + w[j] : w[j];
            dot += dy[off + j] * gain * x[off + j] * r;
        }
        float mean = block_sum(dot, shared) / d;
        // 4 of the thread's columns at a time (in_batches: their loads before their stores; the
        // compiler must assume dx, dxb and acc may alias x, dy and w, so column by column dx,
        // accumulated and so read from DRAM, was one round trip per column)
        float xv[4], dyv[4], gain[4], dxv[4];
        in_batches<4>(
            threadIdx.x, blockDim.x, d,
            [&](int u, int j) {
                gain[u] = zero_centered ? 1.0f + w[j] : w[j];
                xv[u] = x[off + j];
                dyv[u] = dy[off + j];
                dxv[u] = accumulate ? dx[off + j] : 0.0f;
            },
            [&](int u, int j) {
                const float xh = xv[u] * r;
                const float g = r * (dyv[u] * gain[u] - xh * mean);
                const float v = accumulate ? dxv[u] + g : g;
                dx[off + j] = v;
                if (dxb) dxb[off + j] = f32_to_bf16(v);
                acc[j] += dyv[u] * xh;
            });
    }
    if (smem_acc)
        for (int j = threadIdx.x; j < d; j += blockDim.x) dwp[j] = acc[j];
}

// at most 40 registers, so 6 blocks of 256 share an SM (a block walks its rows in turn: the more
// blocks, the more rows in flight); unbounded, the batched second pass took 64
extern "C" __global__ void __launch_bounds__(256, 6) rmsnorm_bwd(const float* x, const float* w, const float* rstd, const float* dy, float* dx,
                                       float* part, int rows, int span, int d, int zero_centered, int accumulate,
                                       int smem_acc) {
    rmsnorm_bwd_impl(x, w, rstd, dy, dx, nullptr, part, rows, span, d, zero_centered, accumulate, smem_acc);
}

// rmsnorm_bwd that also writes the bf16 copy of dx the next GEMMs read
extern "C" __global__ void __launch_bounds__(256, 6) rmsnorm_bwd_bf16(const float* x, const float* w, const float* rstd, const float* dy,
                                            float* dx, bf16* dxb, float* part, int rows, int span, int d,
                                            int zero_centered, int accumulate, int smem_acc) {
    rmsnorm_bwd_impl(x, w, rstd, dy, dx, dxb, part, rows, span, d, zero_centered, accumulate, smem_acc);
}
