// RMSNorm: one block per row, a block-wide reduction through shared memory. Same math as
// src/model/ops/rmsnorm.rs; block_sum and store_as in common.cuh. The outputs GEMMs read come
// in f32 or bf16 (one template, so the bf16 result is the rounding of the f32 one, bit for bit).
// Entry points (ops/rmsnorm.rs): rmsnorm_fwd, rmsnorm_fwd_bf16, add_rmsnorm_fwd,
// add_rmsnorm_fwd_bf16, rmsnorm_bwd, rmsnorm_bwd_bf16.

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

// The residual add and the norm after it in one pass: x1 = x + a (f32, and x1 may be x or a:
// every element is read before it is written, by the same thread), h = rmsnorm(x1), rstd.
template <class T>
__device__ void add_rmsnorm_fwd_impl(const float* x, const float* a, float* x1, const float* w, T* h, float* rstd,
                                     int d, float eps, int zc) {
    __shared__ float shared[32];
    const long off = (long)blockIdx.x * d;
    float ss = 0.0f;
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        const float v = x[off + j] + a[off + j];
        x1[off + j] = v;
        ss += v * v;
    }
    rmsnorm_row(x1 + off, ss, w, h + off, rstd, d, eps, zc, shared);
}

extern "C" __global__ void add_rmsnorm_fwd(const float* x, const float* a, float* x1, const float* w, float* h,
                                           float* rstd, int d, float eps, int zero_centered) {
    add_rmsnorm_fwd_impl(x, a, x1, w, h, rstd, d, eps, zero_centered);
}

extern "C" __global__ void add_rmsnorm_fwd_bf16(const float* x, const float* a, float* x1, const float* w, bf16* h,
                                                float* rstd, int d, float eps, int zero_centered) {
    add_rmsnorm_fwd_impl(x, a, x1, w, h, rstd, d, eps, zero_centered);
}

// dx = r·(dy·g − x̂·mean(dy·g·x̂)), g the effective gain, added to dx with `accumulate`, and
// its bf16 rounding into dxb unless that is null; the gain's gradient per row goes to dwp
// [rows, d] (the host sums its columns in order: deterministic, no atomics).
__device__ void rmsnorm_bwd_impl(const float* x, const float* w, const float* rstd, const float* dy, float* dx,
                                 bf16* dxb, float* dwp, int d, int zero_centered, int accumulate) {
    __shared__ float shared[32];
    long off = (long)blockIdx.x * d;
    float r = rstd[blockIdx.x];
    float dot = 0.0f;
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        float gain = zero_centered ? 1.0f + w[j] : w[j];
        dot += dy[off + j] * gain * x[off + j] * r;
    }
    float mean = block_sum(dot, shared) / d;
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        float gain = zero_centered ? 1.0f + w[j] : w[j];
        float xh = x[off + j] * r;
        float g = r * (dy[off + j] * gain - xh * mean);
        const float v = accumulate ? dx[off + j] + g : g;
        dx[off + j] = v;
        if (dxb) dxb[off + j] = f32_to_bf16(v);
        dwp[off + j] = dy[off + j] * xh;
    }
}

extern "C" __global__ void rmsnorm_bwd(const float* x, const float* w, const float* rstd, const float* dy, float* dx,
                                       float* dwp, int d, int zero_centered, int accumulate) {
    rmsnorm_bwd_impl(x, w, rstd, dy, dx, nullptr, dwp, d, zero_centered, accumulate);
}

// rmsnorm_bwd that also writes the bf16 copy of dx the next GEMMs read
extern "C" __global__ void rmsnorm_bwd_bf16(const float* x, const float* w, const float* rstd, const float* dy,
                                            float* dx, bf16* dxb, float* dwp, int d, int zero_centered,
                                            int accumulate) {
    rmsnorm_bwd_impl(x, w, rstd, dy, dx, dxb, dwp, d, zero_centered, accumulate);
}
