// Cross-entropy: one block per row, block-wide reductions through shared memory. Same math as
// src/model/ops/cross_entropy.rs; block_sum/block_max in common.cuh.
// Entry points (ops/cross_entropy.rs): cross_entropy_fwd_bwd, cross_entropy_fwd_bwd_bf16.

// Cross-entropy over one row of logits: writes the row's loss and d(loss_sum)/d(logits)·scale
// (softmax − onehot) into `grad`, so full-vocabulary logits are touched twice, not four times.
// target < 0: no loss, zero gradient. `grad` is the logits themselves (f32, in place) or, for
// the head's bf16 GEMMs, a bf16 buffer (the logits are then left as they are): an element is
// read before its gradient is written, by the same thread. `scale` (1 / the batch's target
// count) is read from device memory, so a captured launch serves every batch.
template <class T>
__device__ void cross_entropy_impl(const float* logits, T* grad, const int* targets, float* loss, int vocab,
                                   const float* scale_at) {
    const float scale = *scale_at;
    __shared__ float shared[32];
    const float* row = logits + (long)blockIdx.x * vocab;
    T* grow = grad + (long)blockIdx.x * vocab;
    int t = targets[blockIdx.x];
    // The max and the sum of exponentials in one pass (online: a thread's sum is rescaled when
    // its max grows), then the gradient: the row is read twice, not three times (with three
    // passes and 8 resident 128 KB rows per SM, ≈ 135 MB in flight on an H200, each pass read the
    // row from DRAM again; 2 rows per SM now, blocks of 1,024 threads, so 34 MB at a vocabulary
    // of 32,768 and the second pass can hit the 50 MB L2; at 151,936 it cannot).
    // Both passes take 8 of a thread's columns at a time (in_batches: loads before stores): in
    // the gradient pass a load after a store must wait for it (the gradient may be the logits
    // themselves), and each column would be a round trip of its own.
    constexpr int U = 8;
    const float neg_inf = -__int_as_float(0x7f800000);
    float mx = neg_inf, s = 0.0f, xv[U];
    in_batches<U>(threadIdx.x, blockDim.x, vocab, [&](int u, int j) { xv[u] = row[j]; },
                  [&](int u, int) {
                      const float x = xv[u];
                      if (x > mx) {
                          s = s * __expf(mx - x) + 1.0f;
                          mx = x;
                      } else if (x != neg_inf) {  // −inf adds 0 (exp(−inf − −inf) would be NaN); NaN lands here
                          s += __expf(x - mx);
                      }
                  });
    const float m = block_max(mx, shared);
    // a thread that saw no element has mx = −inf and s = 0: it adds 0
    s = block_sum(s * __expf(mx - m), shared);
    float lse = m + logf(s);
    if (threadIdx.x == 0) loss[blockIdx.x] = t >= 0 ? lse - row[t] : 0.0f;
    __syncthreads();
    in_batches<U>(threadIdx.x, blockDim.x, vocab, [&](int u, int j) { xv[u] = row[j]; },
                  [&](int u, int j) {
                      const float p = __expf(xv[u] - lse);
                      store_as(grow + j, t >= 0 ? (p - (j == t ? 1.0f : 0.0f)) * scale : 0.0f);
                  });
}

extern "C" __global__ void cross_entropy_fwd_bwd(float* logits, const int* targets, float* loss, int vocab,
                                                 const float* scale) {
    cross_entropy_impl(logits, logits, targets, loss, vocab, scale);
}

// the mixed-precision step's: at most 32 registers, so 2 blocks of 1,024 (2 rows) share an SM;
// unbounded it took 40 (1 row per SM). The f32 entry above would spill at 32, so it keeps 1 row.
extern "C" __global__ void __launch_bounds__(1024, 2) cross_entropy_fwd_bwd_bf16(const float* logits, bf16* grad, const int* targets,
                                                      float* loss, int vocab, const float* scale) {
    cross_entropy_impl(logits, grad, targets, loss, vocab, scale);
}
