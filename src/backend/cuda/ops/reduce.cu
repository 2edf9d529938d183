// Fills, and deterministic column sums (the weight gradients of per-row ops: RMSNorm gains,
// QK-norm gains). (Residual adds happen in the GEMM epilogues: ops/gemm.rs linear_fwd_residual.)
// Entry points (ops/reduce.rs): fill_f32, colsum_final.

extern "C" __global__ void fill_f32(float* x, float v, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) x[i] = v;
}

// out[c] (+)= Σ_k part[k, c] over the rows of part [chunks, cols] (the norm backwards' gain
// gradients per block), in a fixed order: a 32×32 block per 32
// columns, thread (c, g) sums rows g, g + 32, ... in turn, then thread (c, 0) the 32 group sums
// in turn. 32 independent chains per column keep a thousand rows from being one long serial one.
extern "C" __global__ void colsum_final(const float* part, float* out, int chunks, int cols, int accumulate) {
    __shared__ float sums[32][32];
    const int c = blockIdx.x * 32 + threadIdx.x, g = threadIdx.y;
    float s = 0.0f;
    if (c < cols)
#pragma unroll 8
        for (int k = g; k < chunks; k += 32) s += part[(long)k * cols + c];
    sums[g][threadIdx.x] = s;
    __syncthreads();
    if (g > 0 || c >= cols) return;
    float t = 0.0f;
    for (int i = 0; i < 32; ++i) t += sums[i][threadIdx.x];
    out[c] = accumulate ? out[c] + t : t;
}
