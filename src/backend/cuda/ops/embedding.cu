// Token embedding: gather rows of the table, and its deterministic backward. Same math as
// src/model/ops/embedding.rs.
// Entry points (ops/embedding.rs): embed_fwd, embed_bwd.

extern "C" __global__ void embed_fwd(const int* ids, const float* table, float* out, int rows, int d) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < (long)rows * d; i += (long)gridDim.x * blockDim.x)
        out[i] = table[(long)ids[i / d] * d + i % d];
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
