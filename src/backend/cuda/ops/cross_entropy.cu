// Cross-entropy: one block per row, block-wide reductions through shared memory. Same math as
// src/model/ops/cross_entropy.rs; block_sum/block_max in common.cuh.
// Entry point (ops/cross_entropy.rs): cross_entropy_fwd_bwd.

// Cross-entropy over one row of logits: writes the row's loss and replaces the logits by
// d(loss_sum)/d(logits)·scale (softmax − onehot), so full-vocabulary logits are touched twice,
// not four times. target < 0: no loss, zero gradient.
extern "C" __global__ void cross_entropy_fwd_bwd(float* logits, const int* targets, float* loss, int vocab,
                                                 float scale) {
    __shared__ float shared[32];
    float* row = logits + (long)blockIdx.x * vocab;
    int t = targets[blockIdx.x];
    float mx = -__int_as_float(0x7f800000);
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) mx = fmaxf(mx, row[j]);
    mx = block_max(mx, shared);
    float s = 0.0f;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) s += __expf(row[j] - mx);
    s = block_sum(s, shared);
    float lse = mx + logf(s);
    if (threadIdx.x == 0) loss[blockIdx.x] = t >= 0 ? lse - row[t] : 0.0f;
    __syncthreads();
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
        float p = __expf(row[j] - lse);
        row[j] = t >= 0 ? (p - (j == t ? 1.0f : 0.0f)) * scale : 0.0f;
    }
}
