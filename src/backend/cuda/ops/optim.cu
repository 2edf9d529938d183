// The optimizer over all tensors in one launch. Same math as src/optim.rs.
// Entry points (ops/optim.rs): sumsq_multi, adamw_multi.

// Multi-tensor optimizer kernels. `table` holds TSTRIDE longs per tensor: param, grad, m, v
// (device pointers), element count, 1 where the tensor may be exempt from weight decay (norm
// gains, embeddings), and the param's bf16 copy (device pointer; 0: none). blockIdx.y = tensor.
#define TSTRIDE 7

// Per-block partial sums of squared gradients, partials[tensor·gridDim.x + block]; the host
// adds them in f64 (deterministic).
extern "C" __global__ void sumsq_multi(const long* table, float* partials) {
    __shared__ float shared[32];
    const long* t = table + (long)blockIdx.y * TSTRIDE;
    const float* g = (const float*)t[1];
    const long n = t[4];
    float s = 0.0f;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        s += g[i] * g[i];
    s = block_sum(s, shared);
    if (threadIdx.x == 0) partials[(long)blockIdx.y * gridDim.x + blockIdx.x] = s;
}

// AdamW (torch semantics) over every tensor in one launch; `scale` multiplies the gradients
// (clipping), bc1/bc2 are 1 − β^t; exempt tensors decay by wd_exempt instead of wd. A tensor
// with a bf16 copy (the GEMM operand of mixed precision) gets the new param's rounding written
// here, so no separate cast re-reads the weights every step.
extern "C" __global__ void adamw_multi(const long* table, float lr, float b1, float b2, float eps, float wd_all,
                                       float bc1, float bc2, float scale, float wd_exempt) {
    const long* t = table + (long)blockIdx.y * TSTRIDE;
    float* p = (float*)t[0];
    const float* grad = (const float*)t[1];
    float* m = (float*)t[2];
    float* v = (float*)t[3];
    const long n = t[4];
    const float wd = t[5] ? wd_exempt : wd_all;
    bf16* pb = (bf16*)t[6];
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        // all four loads before any store: the pointers come from a table, so the compiler must
        // assume a store to m[i] may change v[i] or p[i]; loads after it would wait for it, three
        // DRAM round trips per element instead of one
        const float g = grad[i] * scale, m0 = m[i], v0 = v[i], p0 = p[i];
        const float m1 = b1 * m0 + (1.0f - b1) * g;
        const float v1 = b2 * v0 + (1.0f - b2) * g * g;
        const float np = p0 * (1.0f - lr * wd) - lr * (m1 / bc1) / (sqrtf(v1 / bc2) + eps);
        m[i] = m1;
        v[i] = v1;
        p[i] = np;
        if (pb) pb[i] = f32_to_bf16(np);
    }
}
#undef TSTRIDE
