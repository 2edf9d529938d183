// Causal attention with grouped KV heads, flash-style (the T×T scores never exist: the forward
// keeps a running max and sum per query row and saves only the log-sum-exp; the backward
// recomputes probabilities tile by tile), with the paper's G1 gate applied in the forward's
// epilogue and folded into the backward's preprocessing.
//
// This first version is f32 on CUDA cores: one thread per query row (forward, dQ) or key row
// (dK/dV), the other operand staged through shared memory in tiles of BC rows. Deterministic:
// dK/dV and dQ are separate kernels, each output row owned by one thread, no atomics.
//
// Layouts as src/model/ops/attention.rs: q, o, y [B·T, H·HD]; k, v [B·T, KV·HD]; lse, delta
// [B, H, T]. gate_mode 0: none (y = o); 1: elementwise, z [B·T, H·HD]; 2: headwise, z [B·T, H].
// The outputs only GEMMs read — y (the output projection's input), dv and dz (the v and gate
// projections' output gradients) — are f32 or, in the *_bf16 kernels, bf16 rounded from the
// same f32 value.
//
// Entry points (ops/attention/mod.rs, whose head-dim list generates their names): the pre-pass
// attn_bwd_pre{,_bf16} and attn_bwd_pre_tc{,_bf16,_bf16oz} (the tensor-core backward's, here to
// share one template), and attn_fwd_hd*{,_bf16}, attn_bwd_dkdv_hd*{,_bf16}, attn_bwd_dq_hd* for each
// ATTN_KERNELS(HD) below.

#define BR 64  // rows per block = threads per block
#define BC 32  // rows per shared-memory tile

// Rows j0..j0+BC of kv head kh (batch b) of K and V into the shared tiles, zeros past T.
template <int HD>
__device__ void stage_kv(const float* k, const float* v, float* ks, float* vs, int b, int kh, int j0, int T,
                         long ldk) {
    for (int idx = threadIdx.x; idx < BC * HD; idx += blockDim.x) {
        int j = j0 + idx / HD;
        long off = ((long)b * T + j) * ldk + kh * HD + idx % HD;
        ks[idx] = j < T ? k[off] : 0.0f;
        vs[idx] = j < T ? v[off] : 0.0f;
    }
}

template <int HD, class TY>
__device__ void attn_fwd_impl(const float* q, const float* k, const float* v, const float* z, float* o, TY* y,
                              float* lse, int T, int H, int KV, float scale, int gate_mode) {
    __shared__ float ks[BC * HD];
    __shared__ float vs[BC * HD];
    const int b = blockIdx.z, h = blockIdx.y, kh = h / (H / KV);
    const int i = blockIdx.x * BR + threadIdx.x;
    const bool active = i < T;
    const long ldq = (long)H * HD, ldk = (long)KV * HD;
    float qr[HD], acc[HD];
    const float* qrow = q + ((long)b * T + (active ? i : 0)) * ldq + h * HD;
    for (int e = 0; e < HD; ++e) {
        qr[e] = qrow[e] * scale;
        acc[e] = 0.0f;
    }
    float m = -__int_as_float(0x7f800000), l = 0.0f;
    const int last = min(T - 1, (int)blockIdx.x * BR + BR - 1);  // the block's last query row
    for (int j0 = 0; j0 <= last; j0 += BC) {
        stage_kv<HD>(k, v, ks, vs, b, kh, j0, T, ldk);
        __syncthreads();
        const int jn = active ? min(BC, i - j0 + 1) : 0;  // keys up to i only
        for (int r = 0; r < jn; ++r) {
            float s = 0.0f;
            for (int e = 0; e < HD; ++e) s += qr[e] * ks[r * HD + e];
            if (s > m) {
                float c = __expf(m - s);
                l *= c;
                for (int e = 0; e < HD; ++e) acc[e] *= c;
                m = s;
            }
            float p = __expf(s - m);
            l += p;
            for (int e = 0; e < HD; ++e) acc[e] += p * vs[r * HD + e];
        }
        __syncthreads();
    }
    if (!active) return;
    const long row = (long)b * T + i, base = row * ldq + h * HD;
    const float inv = 1.0f / l;
    const float gh = gate_mode == 2 ? sigmoidf(z[row * H + h]) : 1.0f;
    for (int e = 0; e < HD; ++e) {
        float oe = acc[e] * inv;
        o[base + e] = oe;
        store_as(y + base + e, oe * (gate_mode == 1 ? sigmoidf(z[base + e]) : gh));
    }
    lse[((long)b * H + h) * T + i] = m + logf(l);
}

// From dy (gradient of the gated output): dout = dy·gate (the ungated output's gradient), the
// gate logits' gradient dz, and delta = rowsum(dout ⊙ o) per (row, head), all from f32 values.
// One warp per (row, head); 4 warps per block. dout is f32 for attention.cu's backward, bf16
// for the tensor-core one (attention_tc.cu: its mma operand); dz, which only the gate
// projection's GEMMs read, f32 or bf16 (the *_bf16 entries). o and z (TI) are f32, or bf16 in
// the tensor-core forward's mixed-precision output (attn_bwd_pre_tc_bf16oz): D and dz are then
// both computed, in f32, from the one bf16 o the forward stored (not from the f32 o it
// rounded; see attention_tc.cu's epilogue). Entries: attn_bwd_pre{,_bf16} (f32 dout),
// attn_bwd_pre_tc{,_bf16} (bf16 dout), attn_bwd_pre_tc_bf16oz (bf16 o, z, dout and dz).
template <class TI, class TO, class TZ>
__device__ void attn_bwd_pre_impl(const TI* o, const TI* z, const float* dy, TO* dout, TZ* dz, long ldz,
                                  float* delta, int rows, int T, int H, int HD, int gate_mode) {
    const int w = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    if (w >= rows * H) return;  // warp-uniform: no barrier follows that others would miss
    const int r = w / H, h = w % H;
    const long base = (long)r * H * HD + h * HD;
    const float sh = gate_mode == 2 ? sigmoidf(load_f32(z + (long)r * H + h)) : 1.0f;
    float dd = 0.0f, dzh = 0.0f;
    // 4 of the lane's columns at a time (all of them up to head_dim 128; in_batches: loads before
    // stores, which made each column a DRAM round trip of its own)
    float ov[4], gv[4], zv[4];
    in_batches<4>(
        lane, 32, HD,
        [&](int u, int e) {
            ov[u] = load_f32(o + base + e);
            gv[u] = dy[base + e];
            zv[u] = gate_mode == 1 ? load_f32(z + base + e) : 0.0f;
        },
        [&](int u, int e) {
            const float oe = ov[u], g = gv[u];
            float s = sh;
            if (gate_mode == 1) {
                s = sigmoidf(zv[u]);
                store_as(dz + r * ldz + h * HD + e, g * oe * s * (1.0f - s));
            }
            dzh += g * oe;
            const float d = g * s;
            store_as(dout + base + e, d);
            dd += d * oe;
        });
    dd = warp_sum(dd);
    dzh = warp_sum(dzh);
    if (lane == 0) {
        delta[((long)(r / T) * H + h) * T + r % T] = dd;
        if (gate_mode == 2) store_as(dz + r * ldz + h, dzh * sh * (1.0f - sh));
    }
}

#define ATTN_BWD_PRE(NAME, TI, TO, TZ)                                                                             \
    extern "C" __global__ void NAME(const TI* o, const TI* z, const float* dy, TO* dout, TZ* dz, long ldz,         \
                                    float* delta, int rows, int T, int H, int HD, int gate_mode) {                 \
        attn_bwd_pre_impl(o, z, dy, dout, dz, ldz, delta, rows, T, H, HD, gate_mode);                              \
    }
ATTN_BWD_PRE(attn_bwd_pre, float, float, float)
ATTN_BWD_PRE(attn_bwd_pre_bf16, float, float, bf16)
ATTN_BWD_PRE(attn_bwd_pre_tc, float, bf16, float)
ATTN_BWD_PRE(attn_bwd_pre_tc_bf16, float, bf16, bf16)
ATTN_BWD_PRE(attn_bwd_pre_tc_bf16oz, bf16, bf16, bf16)
#undef ATTN_BWD_PRE

// dK, dV: one thread per key row j of kv head kh, summing over the query heads of its group and
// the query rows i ≥ j. dV, which only the v projection's GEMMs read, f32 or bf16.
template <int HD, class TV>
__device__ void attn_bwd_dkdv_impl(const float* q, const float* k, const float* v, const float* dout,
                                   const float* lse, const float* delta, float* dk, TV* dv, long ldv, int T, int H,
                                   int KV, float scale) {
    __shared__ float qs[BC * HD];
    __shared__ float ds[BC * HD];
    __shared__ float ls[BC], dl[BC];
    const int b = blockIdx.z, kh = blockIdx.y, group = H / KV;
    const int j = blockIdx.x * BR + threadIdx.x;
    const bool active = j < T;
    const long ldq = (long)H * HD, ldk = (long)KV * HD;
    const long krow = ((long)b * T + (active ? j : 0)) * ldk + kh * HD;
    float kr[HD], vr[HD], dkr[HD], dvr[HD];
    for (int e = 0; e < HD; ++e) {
        kr[e] = k[krow + e];
        vr[e] = v[krow + e];
        dkr[e] = 0.0f;
        dvr[e] = 0.0f;
    }
    const int first = blockIdx.x * BR;  // queries before the block's first key see none of it
    for (int hh = 0; hh < group; ++hh) {
        const int h = kh * group + hh;
        for (int i0 = first; i0 < T; i0 += BC) {
            for (int idx = threadIdx.x; idx < BC * HD; idx += blockDim.x) {
                int i = i0 + idx / HD;
                long off = ((long)b * T + i) * ldq + h * HD + idx % HD;
                qs[idx] = i < T ? q[off] : 0.0f;
                ds[idx] = i < T ? dout[off] : 0.0f;
            }
            for (int r = threadIdx.x; r < BC; r += blockDim.x) {
                int i = i0 + r;
                ls[r] = i < T ? lse[((long)b * H + h) * T + i] : 0.0f;
                dl[r] = i < T ? delta[((long)b * H + h) * T + i] : 0.0f;
            }
            __syncthreads();
            if (active) {
                for (int r = max(0, j - i0); r < BC && i0 + r < T; ++r) {
                    float s = 0.0f, dp = 0.0f;
                    for (int e = 0; e < HD; ++e) {
                        s += qs[r * HD + e] * kr[e];
                        dp += ds[r * HD + e] * vr[e];
                    }
                    float p = __expf(s * scale - ls[r]);
                    float dsc = p * (dp - dl[r]);
                    for (int e = 0; e < HD; ++e) {
                        dvr[e] += p * ds[r * HD + e];
                        dkr[e] += dsc * qs[r * HD + e];
                    }
                }
            }
            __syncthreads();
        }
    }
    if (!active) return;
    const long vrow = ((long)b * T + j) * ldv + kh * HD;  // dv's rows are ldv apart
    for (int e = 0; e < HD; ++e) {
        dk[krow + e] = dkr[e] * scale;
        store_as(dv + vrow + e, dvr[e]);
    }
}

// dQ: one thread per query row, over keys j ≤ i.
template <int HD>
__device__ void attn_bwd_dq_impl(const float* q, const float* k, const float* v, const float* dout, const float* lse,
                                 const float* delta, float* dq, int T, int H, int KV, float scale) {
    __shared__ float ks[BC * HD];
    __shared__ float vs[BC * HD];
    const int b = blockIdx.z, h = blockIdx.y, kh = h / (H / KV);
    const int i = blockIdx.x * BR + threadIdx.x;
    const bool active = i < T;
    const long ldq = (long)H * HD, ldk = (long)KV * HD;
    const long qrow = ((long)b * T + (active ? i : 0)) * ldq + h * HD;
    float qr[HD], dor[HD], dqr[HD];
    for (int e = 0; e < HD; ++e) {
        qr[e] = q[qrow + e];
        dor[e] = dout[qrow + e];
        dqr[e] = 0.0f;
    }
    const long li = ((long)b * H + h) * T + (active ? i : 0);
    const float lsei = lse[li], di = delta[li];
    const int last = min(T - 1, (int)blockIdx.x * BR + BR - 1);
    for (int j0 = 0; j0 <= last; j0 += BC) {
        stage_kv<HD>(k, v, ks, vs, b, kh, j0, T, ldk);
        __syncthreads();
        const int jn = active ? min(BC, i - j0 + 1) : 0;
        for (int r = 0; r < jn; ++r) {
            float s = 0.0f, dp = 0.0f;
            for (int e = 0; e < HD; ++e) {
                s += qr[e] * ks[r * HD + e];
                dp += dor[e] * vs[r * HD + e];
            }
            float dsc = __expf(s * scale - lsei) * (dp - di);
            for (int e = 0; e < HD; ++e) dqr[e] += dsc * ks[r * HD + e];
        }
        __syncthreads();
    }
    if (!active) return;
    for (int e = 0; e < HD; ++e) dq[qrow + e] = dqr[e] * scale;
}

#define ATTN_KERNELS(HD)                                                                                          \
    extern "C" __global__ void attn_fwd_hd##HD(const float* q, const float* k, const float* v, const float* z,    \
                                               float* o, float* y, float* lse, int T, int H, int KV, float scale, \
                                               int gate_mode) {                                                   \
        attn_fwd_impl<HD>(q, k, v, z, o, y, lse, T, H, KV, scale, gate_mode);                                     \
    }                                                                                                             \
    extern "C" __global__ void attn_fwd_hd##HD##_bf16(const float* q, const float* k, const float* v,             \
                                                      const float* z, float* o, bf16* y, float* lse, int T,       \
                                                      int H, int KV, float scale, int gate_mode) {                \
        attn_fwd_impl<HD>(q, k, v, z, o, y, lse, T, H, KV, scale, gate_mode);                                     \
    }                                                                                                             \
    extern "C" __global__ void attn_bwd_dkdv_hd##HD(const float* q, const float* k, const float* v,               \
                                                    const float* dout, const float* lse, const float* delta,      \
                                                    float* dk, float* dv, long ldv, int T, int H, int KV,         \
                                                    float scale) {                                                \
        attn_bwd_dkdv_impl<HD>(q, k, v, dout, lse, delta, dk, dv, ldv, T, H, KV, scale);                          \
    }                                                                                                             \
    extern "C" __global__ void attn_bwd_dkdv_hd##HD##_bf16(const float* q, const float* k, const float* v,        \
                                                           const float* dout, const float* lse,                   \
                                                           const float* delta, float* dk, bf16* dv, long ldv,     \
                                                           int T, int H, int KV, float scale) {                   \
        attn_bwd_dkdv_impl<HD>(q, k, v, dout, lse, delta, dk, dv, ldv, T, H, KV, scale);                          \
    }                                                                                                             \
    extern "C" __global__ void attn_bwd_dq_hd##HD(const float* q, const float* k, const float* v,                 \
                                                  const float* dout, const float* lse, const float* delta,        \
                                                  float* dq, int T, int H, int KV, float scale) {                 \
        attn_bwd_dq_impl<HD>(q, k, v, dout, lse, delta, dq, T, H, KV, scale);                                     \
    }

ATTN_KERNELS(16)
ATTN_KERNELS(32)
ATTN_KERNELS(64)
ATTN_KERNELS(128)

#undef BR
#undef BC
#undef ATTN_KERNELS
