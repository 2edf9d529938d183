// Residual adds, fills, and deterministic column sums (the weight gradients of per-row ops:
// RMSNorm gains, QK-norm gains).
// Entry points (ops/reduce.rs): add_f32, fill_f32, colsum_partial, colsum_final.

// out = a + b (out may be a)
extern "C" __global__ void add_f32(const float* a, const float* b, float* out, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        out[i] = a[i] + b[i];
}

extern "C" __global__ void fill_f32(float* x, float v, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) x[i] = v;
}

// Column sums in two deterministic stages: colsum_partial sums chunks of CHUNK rows per column
// (grid: column blocks × chunks) into part [chunks, cols]; colsum_final adds the chunks in order.
#define CHUNK 256
extern "C" __global__ void colsum_partial(const float* x, float* part, int rows, int cols) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x, k = blockIdx.y;
    if (c >= cols) return;
    const int r1 = min(rows, (k + 1) * CHUNK);
    float s = 0.0f;
    for (int r = k * CHUNK; r < r1; ++r) s += x[(long)r * cols + c];
    part[(long)k * cols + c] = s;
}

extern "C" __global__ void colsum_final(const float* part, float* out, int chunks, int cols, int accumulate) {
    for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < cols; c += gridDim.x * blockDim.x) {
        float s = 0.0f;
        for (int k = 0; k < chunks; ++k) s += part[(long)k * cols + c];
        out[c] = accumulate ? out[c] + s : s;
    }
}
#undef CHUNK
