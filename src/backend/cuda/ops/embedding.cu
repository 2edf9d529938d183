// Token embedding: gather rows of the table, and its deterministic backward. Same math as
// src/model/ops/embedding.rs.
// Entry points (ops/embedding.rs): embed_fwd, embed_bwd.

// Row r of out is row ids[r] of the table. Blocks walk the rows (grid-stride), their threads the
// columns, 4 at a time (in_batches: loads before stores). One element per thread and grid step,
// each with a 64-bit division for its row, made every element a round trip of its own.
extern "C" __global__ void embed_fwd(const int* ids, const float* table, float* out, int rows, int d) {
    for (int r = blockIdx.x; r < rows; r += gridDim.x) {
        const float* src = table + (long)ids[r] * d;
        float* dst = out + (long)r * d;
        float v[4];
        in_batches<4>(threadIdx.x, blockDim.x, d, [&](int u, int c) { v[u] = src[c]; },
                      [&](int u, int c) { dst[c] = v[u]; });
    }
}

// dtable[id] += Σ dout[r] over the rows r holding id, deterministically without atomics: the
// host groups rows by id (ops/embedding.rs, embed_bwd_index: the count of distinct ids, the rows
// in id order, each id's first position in that order, the ids); block u sums its id's rows
// column by column in that order. The grid does not depend on the batch (a captured launch
// serves every step): blocks past the count return.
extern "C" __global__ void embed_bwd(const int* index, const float* dout, float* dtable, int rows, int d) {
    const int u = blockIdx.x;
    if (u >= index[0]) return;
    const int* order = index + 1;
    const int* start = order + rows;
    const int* uniq = start + rows + 1;
    const int s0 = start[u], s1 = start[u + 1];
    float* row = dtable + (long)uniq[u] * d;
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        float s = 0.0f;
        for (int i = s0; i < s1; ++i) s += dout[(long)order[i] * d + c];
        row[c] += s;
    }
}
