// The rest of the decoder's ops on the device: embedding, residual adds, QK-norm fused with
// RoPE, deterministic column sums (weight gradients of per-row ops), and the optimizer over all
// tensors in one launch. Same math as src/model/ops/{embedding,rmsnorm,rope}.rs and optim.rs.

extern "C" __global__ void embed_fwd(const int* ids, const float* table, float* out, int rows, int d) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < (long)rows * d; i += (long)gridDim.x * blockDim.x)
        out[i] = table[(long)ids[i / d] * d + i % d];
}

// dtable[id] += Σ dout[r] over the rows r holding id, deterministically without atomics: the
// host groups rows by id (CSR: uniq[u] and its rows order[start[u]..start[u+1]] in row order);
// block u sums its id's rows column by column in that order.
extern "C" __global__ void embed_bwd(const int* uniq, const int* start, const int* order, const float* dout,
                                     float* dtable, int d) {
    const int u = blockIdx.x;
    const int s0 = start[u], s1 = start[u + 1];
    float* row = dtable + (long)uniq[u] * d;
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        float s = 0.0f;
        for (int i = s0; i < s1; ++i) s += dout[(long)order[i] * d + c];
        row[c] += s;
    }
}

// out = a + b (out may be a)
extern "C" __global__ void add_f32(const float* a, const float* b, float* out, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        out[i] = a[i] + b[i];
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

// Per (row, head): RMSNorm over head_dim with gain w (w or 1 + w; has_norm = 0: none), then
// rotate-half RoPE of the first 2·half dims at position pos0 + row % seq; the rest pass.
// One warp per (row, head). rstd is [rows, heads].
extern "C" __global__ void qknorm_rope_fwd(const float* x, const float* w, const float* cosv, const float* sinv,
                                           float* y, float* rstd, int rows, int heads, int hd, int half, int seq,
                                           int pos0, float eps, int zc, int has_norm) {
    const int wi = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    if (wi >= rows * heads) return;  // warp-uniform
    const int row = wi / heads;
    const long base = (long)wi * hd;
    float r = 1.0f;
    if (has_norm) {
        float ss = 0.0f;
        for (int e = lane; e < hd; e += 32) ss += x[base + e] * x[base + e];
        r = rsqrtf(warp_sum(ss) / hd + eps);
        if (lane == 0) rstd[wi] = r;
    }
#define GAIN(e) (has_norm ? (zc ? 1.0f + w[e] : w[e]) : 1.0f)
    const long p = (long)(pos0 + row % seq) * half;
    for (int i = lane; i < half; i += 32) {
        float a = x[base + i] * r * GAIN(i), b = x[base + i + half] * r * GAIN(i + half);
        float c = cosv[p + i], s = sinv[p + i];
        y[base + i] = a * c - b * s;
        y[base + i + half] = b * c + a * s;
    }
    for (int e = 2 * half + lane; e < hd; e += 32) y[base + e] = x[base + e] * r * GAIN(e);
}

// Backward: dn = Rᵀ·dy, then RMSNorm's backward over the head row. dx is overwritten; the gain's
// gradient per (row, head) goes to dwp [rows·heads, hd] (summed by colsum, deterministically).
extern "C" __global__ void qknorm_rope_bwd(const float* x, const float* w, const float* rstd, const float* cosv,
                                           const float* sinv, const float* dy, float* dx, float* dwp, int rows,
                                           int heads, int hd, int half, int seq, int pos0, int zc, int has_norm) {
    const int wi = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    if (wi >= rows * heads) return;  // warp-uniform
    const int row = wi / heads;
    const long base = (long)wi * hd;
    const long p = (long)(pos0 + row % seq) * half;
    // dn into dx first (each lane rewrites only its own elements below)
    for (int i = lane; i < half; i += 32) {
        float a = dy[base + i], b = dy[base + i + half], c = cosv[p + i], s = sinv[p + i];
        dx[base + i] = a * c + b * s;
        dx[base + i + half] = b * c - a * s;
    }
    for (int e = 2 * half + lane; e < hd; e += 32) dx[base + e] = dy[base + e];
    if (!has_norm) return;
    __syncwarp();  // lanes read elements other lanes wrote
    const float r = rstd[wi];
    float dot = 0.0f;
    for (int e = lane; e < hd; e += 32) dot += dx[base + e] * GAIN(e) * x[base + e] * r;
    const float mean = warp_sum(dot) / hd;
    for (int e = lane; e < hd; e += 32) {
        float xh = x[base + e] * r, dn = dx[base + e];
        dwp[base + e] = dn * xh;
        dx[base + e] = r * (dn * GAIN(e) - xh * mean);
    }
#undef GAIN
}

// Multi-tensor optimizer kernels. `table` holds TSTRIDE longs per tensor: param, grad, m, v
// (device pointers), element count, and 1 where the tensor may be exempt from weight decay
// (norm gains, embeddings). blockIdx.y = tensor.
#define TSTRIDE 6

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
// (clipping), bc1/bc2 are 1 − β^t; exempt tensors decay by wd_exempt instead of wd.
extern "C" __global__ void adamw_multi(const long* table, float lr, float b1, float b2, float eps, float wd_all,
                                       float bc1, float bc2, float scale, float wd_exempt) {
    const long* t = table + (long)blockIdx.y * TSTRIDE;
    float* p = (float*)t[0];
    const float* grad = (const float*)t[1];
    float* m = (float*)t[2];
    float* v = (float*)t[3];
    const long n = t[4];
    const float wd = t[5] ? wd_exempt : wd_all;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float g = grad[i] * scale;
        m[i] = b1 * m[i] + (1.0f - b1) * g;
        v[i] = b2 * v[i] + (1.0f - b2) * g * g;
        p[i] = p[i] * (1.0f - lr * wd) - lr * (m[i] / bc1) / (sqrtf(v[i] / bc2) + eps);
    }
}

extern "C" __global__ void fill_f32(float* x, float v, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) x[i] = v;
}
