// Causal attention forward on tensor cores, FlashAttention-2 style: bf16 Q/K/V, f32 accumulation
// (mma.m16n8k16), the same outputs as attention.cu's attn_fwd_hd* (o, the gated y, lse) so its
// backward kernels consume them unchanged.
//
// Split-Q: each warp owns 16 query rows for the whole key loop, a block of 4 warps 64 rows; the
// block walks K/V in tiles of 64 keys staged in shared memory. Per tile a warp computes
// S = Q·Kᵀ (Q as A fragments held in registers for the whole loop, K as B fragments by ldmatrix:
// a K row's head dims are contiguous, which is the col-major B of Kᵀ), rescales its running
// softmax in the accumulator registers, and adds P·V (V by ldmatrix.trans: V rows are keys, the
// B operand wants key pairs). Nothing per row crosses warps, so no block barrier sits inside the
// softmax, only around the staging.
//
// Layouts as attention.cu: q [B·T, H·HD], k/v [B·T, KV·HD] (bf16), z as gate_mode says, o/y
// [B·T, H·HD] f32, lse [B, H, T] f32. HD 64 or 128 (a multiple of 16; rows of 16-byte chunks).

#define TC_ROWS 64  // query rows per block: 4 warps × 16
#define TC_KEYS 64  // keys per shared-memory tile
// bf16 of padding after each staged row: with rows of 128 or 256 bytes the 8 row addresses of
// an ldmatrix would all start in the same bank (8-way conflict); 16 more bytes spread them over
// all 32 banks and keep each row 16-byte aligned as ldmatrix requires.
#define TC_PAD 8

struct alignas(16) b16x8 {  // 8 bf16: one 16-byte load or store
    unsigned w[4];
};

// The two bf16 at (row, col), (row, col+1) of a [rows, ld] matrix as one bf16x2 register, zero
// past the last row (such query rows are computed but never written).
__device__ __forceinline__ unsigned load_pair(const bf16* m, long row, long ld, int col, bool valid) {
    if (!valid) return 0u;
    const bf16* p = m + row * ld + col;
    return (unsigned)p[0] | ((unsigned)p[1] << 16);
}

template <int HD>
__device__ void attn_fwd_tc_impl(const bf16* q, const bf16* k, const bf16* v, const float* z, float* o, float* y,
                                 float* lse, int T, int H, int KV, float scale, int gate_mode) {
    constexpr int LD = HD + TC_PAD;  // staged row stride, elements
    constexpr int KSTEPS = HD / 16;  // k steps of S = Q·Kᵀ
    constexpr int NT = HD / 8;       // n tiles of O
    constexpr int CHUNKS = HD / 8;   // 16-byte chunks per row
    __shared__ __align__(16) bf16 ks[TC_KEYS * LD];
    __shared__ __align__(16) bf16 vs[TC_KEYS * LD];
    const float NEG_INF = -__int_as_float(0x7f800000);
    const int b = blockIdx.z, h = blockIdx.y, kh = h / (H / KV);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tig = lane & 3;
    const int q0 = blockIdx.x * TC_ROWS;
    const int rows[2] = {q0 + warp * 16 + g, q0 + warp * 16 + g + 8};  // the lane's two rows
    const long ldq = (long)H * HD, ldk = (long)KV * HD;
    const bf16* qh = q + (long)b * T * ldq + h * HD;

    // Q as A fragments (row-major 16×16 per k step): a0a1 row g, a2a3 row g+8, a4..a7 the same
    // rows 8 columns on. Read once from global memory, kept for the whole key loop.
    unsigned qf[KSTEPS][4];
    #pragma unroll
    for (int kk = 0; kk < KSTEPS; ++kk)
        for (int r = 0; r < 4; ++r)
            qf[kk][r] = load_pair(qh, rows[r & 1], ldq, kk * 16 + 8 * (r >> 1) + 2 * tig, rows[r & 1] < T);

    // Softmax in base 2 (exp2 is the hardware's native exponential): s2 = q·k·scale·log2(e).
    const float sl2 = scale * 1.4426950408889634f;
    float m[2] = {NEG_INF, NEG_INF};  // running max of s2 per row: the same in all 4 lanes of a quad
    float l[2] = {0.0f, 0.0f};        // this lane's part of the running sum of exp2(s2 - m)
    float acc[NT][4];                 // O in the C layout: rows g, g+8; columns 8·nt + 2·tig, +1
    #pragma unroll
    for (int nt = 0; nt < NT; ++nt)
        for (int i = 0; i < 4; ++i) acc[nt][i] = 0.0f;

    const int last = min(T - 1, q0 + TC_ROWS - 1);  // the block's last query row
    for (int j0 = 0; j0 <= last; j0 += TC_KEYS) {
        __syncthreads();  // every warp is done with the previous tile
        for (int idx = threadIdx.x; idx < TC_KEYS * CHUNKS; idx += blockDim.x) {
            const int r = idx / CHUNKS, c = (idx % CHUNKS) * 8, j = j0 + r;
            b16x8 kc = {}, vc = {};  // zeros past T: P is 0 there, and 0·NaN would poison O
            if (j < T) {
                const long off = ((long)b * T + j) * ldk + kh * HD + c;
                kc = *reinterpret_cast<const b16x8*>(k + off);
                vc = *reinterpret_cast<const b16x8*>(v + off);
            }
            *reinterpret_cast<b16x8*>(ks + r * LD + c) = kc;
            *reinterpret_cast<b16x8*>(vs + r * LD + c) = vc;
        }
        __syncthreads();

        // S = Q·Kᵀ for 8 n tiles of 8 keys. One ldmatrix.x4 gives 8 keys × 32 dims: matrix m is
        // keys 8·nt.., dims 32·k2 + 8·m, so registers {0,1} are the B fragment of k step 2·k2
        // and {2,3} of k step 2·k2+1.
        float s[8][4];
        #pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
            #pragma unroll
            for (int i = 0; i < 4; ++i) s[nt][i] = 0.0f;
            for (int k2 = 0; k2 < KSTEPS / 2; ++k2) {
                unsigned bf[4];
                ldmatrix_x4(bf, ks + (nt * 8 + (lane & 7)) * LD + k2 * 32 + 8 * (lane >> 3));
                mma_bf16_16816(s[nt], qf[2 * k2], bf);
                mma_bf16_16816(s[nt], qf[2 * k2 + 1], bf + 2);
            }
        }

        // Only the last tile (j0 == q0: tiles and query blocks are both 64 rows) holds keys
        // past a row (the diagonal) or past T; earlier tiles are entirely visible.
        const bool edge = j0 + TC_KEYS > q0;
        float mx[2] = {NEG_INF, NEG_INF};
        #pragma unroll
        for (int nt = 0; nt < 8; ++nt)
            for (int i = 0; i < 4; ++i) {
                const int key = j0 + nt * 8 + 2 * tig + (i & 1), row = rows[i >> 1];
                float x = s[nt][i] * sl2;
                if (edge && (key > row || key >= T)) x = NEG_INF;
                s[nt][i] = x;
                mx[i >> 1] = fmaxf(mx[i >> 1], x);
            }
        float base[2];
        #pragma unroll
        for (int r = 0; r < 2; ++r) {
            // a row's 64 scores are spread over the 4 lanes of its quad
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
            const float mnew = fmaxf(m[r], mx[r]);
            base[r] = mnew == NEG_INF ? 0.0f : mnew;  // a row with no visible key yet: p = 0, not NaN
            const float alpha = exp2f(m[r] - base[r]);
            m[r] = mnew;
            l[r] *= alpha;
            #pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                acc[nt][2 * r] *= alpha;
                acc[nt][2 * r + 1] *= alpha;
            }
        }
        #pragma unroll
        for (int nt = 0; nt < 8; ++nt)
            for (int i = 0; i < 4; ++i) {
                const float p = exp2f(s[nt][i] - base[i >> 1]);
                s[nt][i] = p;
                l[i >> 1] += p;  // f32 p: the sum does not see P's rounding to bf16 below
            }

        // O += P·V over 4 k steps of 16 keys. The C fragments of n tiles 2·kk and 2·kk+1 (rows
        // g, g+8; keys 2·tig, +1 of each) are exactly the A fragment of k step kk (a0a1, a2a3
        // from the first tile, a4..a7 from the second): P goes to bf16 in registers. ldmatrix
        // .trans of V: matrix m is keys 16·kk + 8·(m&1).., dims 16·np + 8·(m>>1), so registers
        // {0,1} are the B fragment of n tile 2·np and {2,3} of 2·np+1.
        #pragma unroll
        for (int kk = 0; kk < TC_KEYS / 16; ++kk) {
            const unsigned pa[4] = {pack_bf16x2(s[2 * kk][0], s[2 * kk][1]), pack_bf16x2(s[2 * kk][2], s[2 * kk][3]),
                                    pack_bf16x2(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                    pack_bf16x2(s[2 * kk + 1][2], s[2 * kk + 1][3])};
            #pragma unroll
            for (int np = 0; np < NT / 2; ++np) {
                unsigned bf[4];
                ldmatrix_x4_trans(bf, vs + (kk * 16 + (lane & 7) + 8 * ((lane >> 3) & 1)) * LD + np * 16 +
                                          8 * (lane >> 4));
                mma_bf16_16816(acc[2 * np], pa, bf);
                mma_bf16_16816(acc[2 * np + 1], pa, bf + 2);
            }
        }
    }

    // Epilogue: the quad's partial sums, normalisation, the gate in registers, and the stores
    // (rows past T are never written).
    #pragma unroll
    for (int r = 0; r < 2; ++r) {
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    }
    #pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int i = rows[r];
        if (i >= T) continue;
        const long row = (long)b * T + i, base = row * ldq + h * HD;
        const float inv = 1.0f / l[r];
        const float gh = gate_mode == 2 ? sigmoidf(z[row * H + h]) : 1.0f;
        #pragma unroll
        for (int nt = 0; nt < NT; ++nt)
            for (int e = 0; e < 2; ++e) {
                const long at = base + nt * 8 + 2 * tig + e;
                const float oe = acc[nt][2 * r + e] * inv;
                o[at] = oe;
                y[at] = oe * (gate_mode == 1 ? sigmoidf(z[at]) : gh);
            }
        if (tig == 0) lse[((long)b * H + h) * T + i] = (m[r] + log2f(l[r])) * 0.6931471805599453f;
    }
}

#define ATTN_TC_KERNEL(HD)                                                                                         \
    extern "C" __global__ void attn_fwd_tc_hd##HD(const bf16* q, const bf16* k, const bf16* v, const float* z,     \
                                                  float* o, float* y, float* lse, int T, int H, int KV,            \
                                                  float scale, int gate_mode) {                                    \
        attn_fwd_tc_impl<HD>(q, k, v, z, o, y, lse, T, H, KV, scale, gate_mode);                                   \
    }

ATTN_TC_KERNEL(64)
ATTN_TC_KERNEL(128)

// A test of the tensor-core primitives themselves (tests/cuda_tensor_core): one warp computes
// D = A·B + C for a 16×16 A, a 16×16 B (two n tiles) and a 16×16 f32 C, with A loaded by
// ldmatrix, B twice: from an n-major copy `bn` (B[k][n] at bn[16n + k], as K is stored) by
// ldmatrix, and from a k-major copy `bk` (at bk[16k + n], as V is stored) by ldmatrix.trans;
// d[0..256) and d[256..512) are the two results, row-major. `variant` plants a layout bug (the
// test checks that each one changes the result): 1 swaps A registers 1 and 2 (rows g+8 with
// columns +8), 2 loads bn with .trans, 3 stores D's rows g and g+8 swapped, 4 swaps the k halves
// of the first n tile's B fragment.
extern "C" __global__ void tc_mma_probe(const bf16* a, const bf16* bn, const bf16* bk, const float* c, float* d,
                                        int variant) {
    constexpr int LD = 16 + TC_PAD;
    __shared__ __align__(16) bf16 as[16 * LD], bns[16 * LD], bks[16 * LD];
    const int lane = threadIdx.x & 31, g = lane >> 2, tig = lane & 3;
    for (int idx = lane; idx < 256; idx += 32) {
        const int r = idx / 16, col = idx % 16;
        as[r * LD + col] = a[idx];
        bns[r * LD + col] = bn[idx];
        bks[r * LD + col] = bk[idx];
    }
    __syncwarp();
    unsigned af[4], bf[2][4];
    // matrix m of A: rows 8·(m&1).., columns 8·(m>>1): registers in the order a0a1, a2a3, a4a5, a6a7
    ldmatrix_x4(af, as + (lane & 15) * LD + 8 * (lane >> 4));
    if (variant == 1) {
        const unsigned t = af[1];
        af[1] = af[2];
        af[2] = t;
    }
    // bn: matrix m is n 8·(m>>1).., k 8·(m&1)..; bk (transposed): k 8·(m&1).., n 8·(m>>1)..
    const bf16* nrow = bns + ((lane & 7) + 8 * (lane >> 4)) * LD + 8 * ((lane >> 3) & 1);
    if (variant == 2)
        ldmatrix_x4_trans(bf[0], nrow);
    else
        ldmatrix_x4(bf[0], nrow);
    ldmatrix_x4_trans(bf[1], bks + ((lane & 7) + 8 * ((lane >> 3) & 1)) * LD + 8 * (lane >> 4));
    if (variant == 4) {
        const unsigned t = bf[0][0];
        bf[0][0] = bf[0][1];
        bf[0][1] = t;
    }
    for (int path = 0; path < 2; ++path)
        for (int nt = 0; nt < 2; ++nt) {
            float acc[4];
            for (int i = 0; i < 4; ++i) acc[i] = c[(g + 8 * (i >> 1)) * 16 + nt * 8 + 2 * tig + (i & 1)];
            mma_bf16_16816(acc, af, bf[path] + 2 * nt);
            for (int i = 0; i < 4; ++i) {
                const int half = variant == 3 ? 1 - (i >> 1) : i >> 1;
                d[path * 256 + (g + 8 * half) * 16 + nt * 8 + 2 * tig + (i & 1)] = acc[i];
            }
        }
}
