// Token embedding: gather rows of the table, and its deterministic backward. Same math as
// src/model/ops/embedding.rs.
// Entry points (ops/embedding.rs): embed_fwd, embed_bwd.

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
