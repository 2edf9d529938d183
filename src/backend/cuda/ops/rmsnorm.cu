// RMSNorm: one block per row, a block-wide reduction through shared memory. Same math as
// src/model/ops/rmsnorm.rs; block_sum in common.cuh.
// Entry points (ops/rmsnorm.rs): rmsnorm_fwd, rmsnorm_bwd.

// y = x / rms(x) · (w or 1 + w); rstd saved for backward.
extern "C" __global__ void rmsnorm_fwd(const float* x, const float* w, float* y, float* rstd, int d, float eps,
                                       int zero_centered) {
    __shared__ float shared[32];
    const float* xr = x + (long)blockIdx.x * d;
    float* yr = y + (long)blockIdx.x * d;
    float ss = 0.0f;
    for (int j = threadIdx.x; j < d; j += blockDim.x) ss += xr[j] * xr[j];
    float r = rsqrtf(block_sum(ss, shared) / d + eps);
    for (int j = threadIdx.x; j < d; j += blockDim.x) yr[j] = xr[j] * r * (zero_centered ? 1.0f + w[j] : w[j]);
    if (threadIdx.x == 0) rstd[blockIdx.x] = r;
}

// dx = r·(dy·g − x̂·mean(dy·g·x̂)), g the effective gain; the gain's gradient per row goes to
// dwp [rows, d] (the host sums its columns in order: deterministic, no atomics).
extern "C" __global__ void rmsnorm_bwd(const float* x, const float* w, const float* rstd, const float* dy, float* dx,
                                       float* dwp, int d, int zero_centered, int accumulate) {
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
        dx[off + j] = accumulate ? dx[off + j] + g : g;
        dwp[off + j] = dy[off + j] * xh;
    }
}
