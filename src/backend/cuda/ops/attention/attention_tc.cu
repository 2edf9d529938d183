// Causal attention forward on tensor cores, FlashAttention-2 style: bf16 Q/K/V, f32 accumulation
// (mma.m16n8k16), the same outputs as attention.cu's attn_fwd_hd* (o, the gated y, lse) so its
// backward kernels consume them unchanged.
//
// Split-Q: each warp owns 32 query rows (hd64; 16 at hd128) for the whole key loop, a block of 4
// warps 128 (64); the block walks K/V in tiles of 64 keys staged in shared memory. Per tile a warp computes
// S = Q·Kᵀ (Q as A fragments held in registers for the whole loop, K as B fragments by ldmatrix:
// a K row's head dims are contiguous, which is the col-major B of Kᵀ), rescales its running
// softmax in the accumulator registers, and adds P·V (V by ldmatrix.trans: V rows are keys, the
// B operand wants key pairs). Nothing per row crosses warps, so the block barriers only guard
// the staging: cp.async copies global → shared while the warps compute, into two K/V tile
// buffers (tile t+1 is copied during all of tile t; one barrier per tile). When a copy lands
// changes nothing in the arithmetic: the outputs are bit for bit those of plain loads.
//
// Shared memory is dynamic (sizes in attn_tc_smem_* below, mirrored by ops/attention/tc.rs):
// hd128's buffers (68 KB forward and dQ, 51 KB dK/dV) are past the 48 KB of static shared
// memory, so its launches opt in to more (backend/cuda/device.rs); sm_80 and later allow 99 KB
// (sm_86/89) to 227 KB (sm_90) per block.
//
// Layouts as attention.cu: q [B·T, H·HD], k/v [B·T, KV·HD] (bf16), z as gate_mode says, o/y
// [B·T, H·HD] f32 (y bf16 in the *_bf16 kernels, for the output projection's GEMMs; z read and
// o written in bf16 too in the *_bf16oz kernels, mixed precision's), lse [B, H, T] f32. HD 64
// or 128 (a multiple of 16; rows of 16-byte chunks).
//
// Entry points (ops/attention/tc.rs): attn_fwd_tc_hd{64,128}{,_bf16,_bf16oz},
// attn_bwd_dkdv_tc_hd{64,128}{,_bf16} (dV in f32 or bf16, for the v projection's GEMMs),
// attn_bwd_dq_tc_hd{64,128}; and, as references for the tests only (never launched by the
// model), attn_bwd_{dkdv,dq}_tc_planted. The probes of the primitives themselves are
// tc_probe.cu's.

#define TC_KEYS 64  // keys per shared-memory tile, and per dK/dV block (4 warps × 16)
// bf16 of padding after each staged row: with rows of 128 or 256 bytes the 8 row addresses of
// an ldmatrix would all start in the same bank (8-way conflict); 16 more bytes spread them over
// all 32 banks and keep each row 16-byte aligned as ldmatrix requires.
#define TC_PAD 8

// Dynamic shared memory of each kernel, bytes (tc.rs `smem_fwd`, `smem_dkdv` compute the
// same): the forward and dQ two K and two V tiles of 64 keys; dK/dV two Q and two dO tiles of
// its query tile size with their lse and D, and at hd128 the block's 64 K and V rows too.
__host__ __device__ constexpr int attn_tc_smem_fwd(int hd) { return 4 * 64 * (hd + TC_PAD) * 2; }
__host__ __device__ constexpr int attn_tc_dkdv_queries(int hd) { return hd <= 64 ? 64 : 16; }
// m tiles of 16 query rows per warp in the forward and in dQ, which mirrors it (4 warps a block):
// 2 at hd64 (128-row blocks, as FlashAttention-2's hd64 forward), 1 at hd128, whose accumulators
// would not fit twice. Both launch on tc.rs `query_rows`, which must agree.
__host__ __device__ constexpr int attn_tc_query_mtiles(int hd) { return hd <= 64 ? 2 : 1; }
__host__ __device__ constexpr int attn_tc_smem_dkdv(int hd) {
    return 4 * attn_tc_dkdv_queries(hd) * (hd + TC_PAD) * 2 + (hd <= 64 ? 0 : 2 * 64 * (hd + TC_PAD) * 2) +
           4 * attn_tc_dkdv_queries(hd) * 4;
}

// The query block this block computes (forward, dQ): the last one first. A query block's causal
// work grows with its index and blocks start in blockIdx.x order, so the heaviest start first
// and the grid's tail is light blocks, not the heaviest ones (FlashAttention-2 orders its causal
// grid the same way). dK/dV needs no flip: its key block 0 is its heaviest.
__device__ __forceinline__ int heavy_first_query_block() { return gridDim.x - 1 - blockIdx.x; }

// The two bf16 at (row, col), (row, col+1) of a [rows, ld] matrix as one bf16x2 register, zero
// past the last row (such query rows are computed but never written).
__device__ __forceinline__ unsigned load_pair(const bf16* m, long row, long ld, int col, bool valid) {
    if (!valid) return 0u;
    const bf16* p = m + row * ld + col;
    return (unsigned)p[0] | ((unsigned)p[1] << 16);
}

// Issues the cp.async copies (no commit) of ROWS rows from `first` of a [*, ld] bf16 matrix into
// shared memory at `dst` (row stride HD + TC_PAD), 16 bytes each; rows past T read as zeros
// (src_bytes 0, from the matrix's row 0: a valid address).
template <int HD, int ROWS>
__device__ __forceinline__ void stage_rows_async(bf16* dst, const bf16* src, long ld, int first, int T) {
    constexpr int LD = HD + TC_PAD, CHUNKS = HD / 8;
    for (int idx = threadIdx.x; idx < ROWS * CHUNKS; idx += blockDim.x) {
        const int r = idx / CHUNKS, c = (idx % CHUNKS) * 8, i = first + r;
        cp_async16(dst + r * LD + c, src + (i < T ? (long)i * ld : 0) + c, i < T ? 16 : 0);
    }
}

// The lane's two rows (g and g + 8 of each 16) of a warp's MT m tiles of 16 rows from w0.
template <int MT>
__device__ __forceinline__ void mtile_rows(int rows[MT][2], int w0, int g) {
    #pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        rows[mt][0] = w0 + 16 * mt + g;
        rows[mt][1] = w0 + 16 * mt + g + 8;
    }
}

// TO: the type of z (read) and o (written), f32 or bf16; TY: y's. Each warp owns MT m tiles of
// 16 query rows (attn_tc_query_mtiles): every K and V fragment it loads by ldmatrix feeds MT
// mmas, so MT = 2 halves the shared-memory traffic per mma (FlashAttention-2's hd64 forward:
// 128-row blocks of 4 warps).
template <int HD, class TO, class TY>
__device__ void attn_fwd_tc_impl(const bf16* q, const bf16* k, const bf16* v, const TO* z, TO* o, TY* y,
                                 float* lse, int T, int H, int KV, float scale, int gate_mode) {
    constexpr int LD = HD + TC_PAD;                    // staged row stride, elements
    constexpr int KSTEPS = HD / 16;                    // k steps of S = Q·Kᵀ
    constexpr int NT = HD / 8;                         // n tiles of O
    constexpr int MT = attn_tc_query_mtiles(HD);       // m tiles per warp
    constexpr int WROWS = 16 * MT, BROWS = 4 * WROWS;  // query rows per warp, per block
    // two K/V tile buffers (36 KB at hd64, 68 KB at hd128): tile t+1 copied by cp.async while
    // tile t is computed on
    // K tile buffer i at smem + i·TILE, V's at smem + (2 + i)·TILE (offsets, not an array of
    // pointers: one indexed at run time would live in local memory)
    DYN_SHARED(bf16, smem, attn_tc_smem_fwd(HD) / 2);
    constexpr int TILE = TC_KEYS * LD;
    const float NEG_INF = -__int_as_float(0x7f800000);
    const int b = blockIdx.z, h = blockIdx.y, kh = h / (H / KV);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tig = lane & 3;
    const int q0 = heavy_first_query_block() * BROWS, w0 = q0 + warp * WROWS;  // the block's and the warp's first row
    int rows[MT][2];  // the lane's two rows of each m tile
    mtile_rows<MT>(rows, w0, g);
    const long ldq = (long)H * HD, ldk = (long)KV * HD;
    const bf16* qh = q + (long)b * T * ldq + h * HD;
    const bf16* kb = k + (long)b * T * ldk + kh * HD;
    const bf16* vb = v + (long)b * T * ldk + kh * HD;

    // Q as A fragments (row-major 16×16 per k step): a0a1 row g, a2a3 row g+8, a4..a7 the same
    // rows 8 columns on. Read once from global memory, kept for the whole key loop.
    unsigned qf[MT][KSTEPS][4];
    #pragma unroll
    for (int mt = 0; mt < MT; ++mt)
        #pragma unroll
        for (int kk = 0; kk < KSTEPS; ++kk)
            for (int r = 0; r < 4; ++r) {
                const int row = rows[mt][r & 1];
                qf[mt][kk][r] = load_pair(qh, row, ldq, kk * 16 + 8 * (r >> 1) + 2 * tig, row < T);
            }

    // Softmax in base 2 (exp2 is the hardware's native exponential): s2 = q·k·scale·log2(e).
    const float sl2 = scale * 1.4426950408889634f;
    float m[MT][2], l[MT][2];  // per row: running max of s2 (the same in all 4 lanes of a quad),
                               // and this lane's part of the running sum of exp2(s2 - m)
    float acc[MT][NT][4];      // O in the C layout: rows g, g+8; columns 8·nt + 2·tig, +1
    #pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        for (int r = 0; r < 2; ++r) {
            m[mt][r] = NEG_INF;
            l[mt][r] = 0.0f;
        }
        #pragma unroll
        for (int nt = 0; nt < NT; ++nt)
            for (int i = 0; i < 4; ++i) acc[mt][nt][i] = 0.0f;
    }

    const int last = min(T - 1, q0 + BROWS - 1);  // the block's last query row
    // K/V rows past T are staged as zeros: P is 0 there, and 0·NaN would poison O
    stage_rows_async<HD, TC_KEYS>(smem, kb, ldk, 0, T);
    stage_rows_async<HD, TC_KEYS>(smem + 2 * TILE, vb, ldk, 0, T);
    cp_async_commit();
    for (int j0 = 0, t = 0; j0 <= last; j0 += TC_KEYS, ++t) {
        const bf16* kt = smem + (t & 1) * TILE;
        const bf16* vt = smem + (2 + (t & 1)) * TILE;
        // the one pending group: tile t lands; the barrier makes every thread's copies visible,
        // and says that every warp is done with tile t-1, whose buffers the next copy reuses
        cp_async_wait<0>();
        __syncthreads();
        if (j0 + TC_KEYS <= last) {  // block-uniform: a next tile
            stage_rows_async<HD, TC_KEYS>(smem + ((t + 1) & 1) * TILE, kb, ldk, j0 + TC_KEYS, T);
            stage_rows_async<HD, TC_KEYS>(smem + (2 + ((t + 1) & 1)) * TILE, vb, ldk, j0 + TC_KEYS, T);
            cp_async_commit();
        }
        // warp-uniform: a tile entirely after the warp's rows (with MT = 2 the block's last tile
        // for its first two warps), or a warp whose rows are all past T. Every tile a warp
        // computes holds key j0 ≤ its first row, so each of its rows sees a key in it.
        if (j0 > w0 + WROWS - 1 || w0 >= T) continue;

        // S = Q·Kᵀ for 8 n tiles of 8 keys. One ldmatrix.x4 gives 8 keys × 32 dims: matrix m is
        // keys 8·nt.., dims 32·k2 + 8·m, so registers {0,1} are the B fragment of k step 2·k2
        // and {2,3} of k step 2·k2+1; each m tile's mmas use it.
        float s[MT][8][4];
        #pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
            #pragma unroll
            for (int mt = 0; mt < MT; ++mt)
                for (int i = 0; i < 4; ++i) s[mt][nt][i] = 0.0f;
            for (int k2 = 0; k2 < KSTEPS / 2; ++k2) {
                unsigned bf[4];
                ldmatrix_x4(bf, kt + (nt * 8 + (lane & 7)) * LD + k2 * 32 + 8 * (lane >> 3));
                #pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma_bf16_16816(s[mt][nt], qf[mt][2 * k2], bf);
                    mma_bf16_16816(s[mt][nt], qf[mt][2 * k2 + 1], bf + 2);
                }
            }
        }

        // Only a tile reaching past the warp's first row holds keys past a row (the diagonal)
        // or past T; earlier tiles are entirely visible.
        const bool edge = j0 + TC_KEYS > w0;
        #pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            float mx[2] = {NEG_INF, NEG_INF};
            #pragma unroll
            for (int nt = 0; nt < 8; ++nt)
                for (int i = 0; i < 4; ++i) {
                    const int key = j0 + nt * 8 + 2 * tig + (i & 1), row = rows[mt][i >> 1];
                    float x = s[mt][nt][i] * sl2;
                    if (edge && (key > row || key >= T)) x = NEG_INF;
                    s[mt][nt][i] = x;
                    mx[i >> 1] = fmaxf(mx[i >> 1], x);
                }
            float base[2];
            #pragma unroll
            for (int r = 0; r < 2; ++r) {
                // a row's 64 scores are spread over the 4 lanes of its quad
                mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
                mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
                const float mnew = fmaxf(m[mt][r], mx[r]);
                base[r] = mnew == NEG_INF ? 0.0f : mnew;  // a row with no visible key yet: p = 0, not NaN
                const float alpha = exp2f(m[mt][r] - base[r]);
                m[mt][r] = mnew;
                l[mt][r] *= alpha;
                #pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
                    acc[mt][nt][2 * r] *= alpha;
                    acc[mt][nt][2 * r + 1] *= alpha;
                }
            }
            #pragma unroll
            for (int nt = 0; nt < 8; ++nt)
                for (int i = 0; i < 4; ++i) {
                    const float p = exp2f(s[mt][nt][i] - base[i >> 1]);
                    s[mt][nt][i] = p;
                    l[mt][i >> 1] += p;  // f32 p: the sum does not see P's rounding to bf16 below
                }
        }

        // O += P·V over 4 k steps of 16 keys. The C fragments of n tiles 2·kk and 2·kk+1 (rows
        // g, g+8; keys 2·tig, +1 of each) are exactly the A fragment of k step kk (a0a1, a2a3
        // from the first tile, a4..a7 from the second): P goes to bf16 in registers. ldmatrix
        // .trans of V: matrix m is keys 16·kk + 8·(m&1).., dims 16·np + 8·(m>>1), so registers
        // {0,1} are the B fragment of n tile 2·np and {2,3} of 2·np+1; each m tile's mmas use it.
        #pragma unroll
        for (int kk = 0; kk < TC_KEYS / 16; ++kk) {
            unsigned pa[MT][4];
            #pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                const float(*x)[4] = s[mt];
                pa[mt][0] = pack_bf16x2(x[2 * kk][0], x[2 * kk][1]);
                pa[mt][1] = pack_bf16x2(x[2 * kk][2], x[2 * kk][3]);
                pa[mt][2] = pack_bf16x2(x[2 * kk + 1][0], x[2 * kk + 1][1]);
                pa[mt][3] = pack_bf16x2(x[2 * kk + 1][2], x[2 * kk + 1][3]);
            }
            #pragma unroll
            for (int np = 0; np < NT / 2; ++np) {
                unsigned bf[4];
                ldmatrix_x4_trans(bf, vt + (kk * 16 + (lane & 7) + 8 * ((lane >> 3) & 1)) * LD + np * 16 +
                                          8 * (lane >> 4));
                #pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma_bf16_16816(acc[mt][2 * np], pa[mt], bf);
                    mma_bf16_16816(acc[mt][2 * np + 1], pa[mt], bf + 2);
                }
            }
        }
    }

    // Epilogue: the quad's partial sums, normalisation, the gate in registers, and the stores
    // (rows past T are never written). y = o·σ(z) from the f32 o, rounded once (to TY); o is
    // stored for the backward rounded to TO: with TO bf16 the pre-pass computes both D =
    // rowsum(dO ∘ o) and the gate gradient dz = dy ∘ o ∘ σ'(z) from that one rounded o (as
    // FlashAttention computes D from its bf16 output), never from the f32 value y came from.
    #pragma unroll
    for (int mt = 0; mt < MT; ++mt)
        #pragma unroll
        for (int r = 0; r < 2; ++r) {
            float lr = l[mt][r];
            lr += __shfl_xor_sync(0xffffffffu, lr, 1);
            lr += __shfl_xor_sync(0xffffffffu, lr, 2);
            const int i = rows[mt][r];
            if (i >= T) continue;
            const long row = (long)b * T + i, base = row * ldq + h * HD;
            const float inv = 1.0f / lr;
            const float gh = gate_mode == 2 ? sigmoidf(load_f32(z + row * H + h)) : 1.0f;
            #pragma unroll
            for (int nt = 0; nt < NT; ++nt)
                for (int e = 0; e < 2; ++e) {
                    const long at = base + nt * 8 + 2 * tig + e;
                    const float oe = acc[mt][nt][2 * r + e] * inv;
                    store_as(o + at, oe);
                    store_as(y + at, oe * (gate_mode == 1 ? sigmoidf(load_f32(z + at)) : gh));
                }
            if (tig == 0) lse[((long)b * H + h) * T + i] = (m[mt][r] + log2f(lr)) * 0.6931471805599453f;
        }
}

#define ATTN_TC_KERNEL(HD)                                                                                         \
    extern "C" __global__ void attn_fwd_tc_hd##HD(const bf16* q, const bf16* k, const bf16* v, const float* z,     \
                                                  float* o, float* y, float* lse, int T, int H, int KV,            \
                                                  float scale, int gate_mode) {                                    \
        attn_fwd_tc_impl<HD>(q, k, v, z, o, y, lse, T, H, KV, scale, gate_mode);                                   \
    }                                                                                                              \
    extern "C" __global__ void attn_fwd_tc_hd##HD##_bf16(const bf16* q, const bf16* k, const bf16* v,             \
                                                         const float* z, float* o, bf16* y, float* lse, int T,     \
                                                         int H, int KV, float scale, int gate_mode) {              \
        attn_fwd_tc_impl<HD>(q, k, v, z, o, y, lse, T, H, KV, scale, gate_mode);                                   \
    }                                                                                                              \
    extern "C" __global__ void attn_fwd_tc_hd##HD##_bf16oz(const bf16* q, const bf16* k, const bf16* v,           \
                                                           const bf16* z, bf16* o, bf16* y, float* lse, int T,     \
                                                           int H, int KV, float scale, int gate_mode) {            \
        attn_fwd_tc_impl<HD>(q, k, v, z, o, y, lse, T, H, KV, scale, gate_mode);                                   \
    }

ATTN_TC_KERNEL(64)
ATTN_TC_KERNEL(128)

// ---- Backward on tensor cores (FlashAttention-2, Algorithm 2), deterministic: dK/dV and dQ are
// separate kernels, each output row owned by one warp, no atomics. Inputs as attention.cu's
// backward (q [B·T, H·HD], k/v [B·T, KV·HD], dout [B·T, H·HD] — here all bf16 — lse and delta
// [B, H, T] f32), outputs dq/dk/dv f32 in the same layouts.
//
// P = exp(S·scale − lse) is recomputed from Q, K and the forward's lse; dP = dO·Vᵀ;
// dS = P ∘ (dP − D) with D = rowsum(dO ∘ O) from the pre-pass; dV = Pᵀ·dO, dK = dSᵀ·Q·scale,
// dQ = dS·K·scale. f32 accumulation throughout; P (for dV) and dS (for dK, dQ) are rounded to
// bf16 as mma operands, the only roundings beyond the inputs'.
//
// Tiles and registers (per lane; a warp's 16 rows × n columns of f32 take n/2 registers; a lane
// has at most 255). Shared memory is dynamic (attn_tc_smem_*, above).
//   dK/dV: a block of 4 warps owns 64 keys (16 per warp) of one kv head and walks the query
//     heads of its group and their query tiles (64 queries; 16 at hd128), staged in shared
//     memory: two buffers of
//     Q, dO, lse and D, the next tile copied by cp.async during this one. Per warp: the dK and
//     dV accumulators (16 × HD f32: HD/2 registers each), Sᵀ and dPᵀ for a slice of SUB queries
//     at a time (SUB/2 each), K and V as A fragments (HD/4 each).
//     hd64: K/V fragments kept in registers (37 KB of shared memory), SUB = 32:
//     32 + 32 + 16 + 16 + 16 + 16 = 128 live, 174 registers after ptxas (12.9), no spills.
//     hd128: dK/dV alone take 128 registers, and K/V held too spilled, so K and V are staged in
//     shared memory once per block (34 KB; 51 KB in all) and read by ldmatrix per slice;
//     SUB = 16: 64 + 64 + 8 + 8 = 144 live, 255 registers, no spills (query tiles of 32, two
//     slices per tile, spilled 28 bytes).
//   dQ: mirrors the forward: 4 warps × MT m tiles of 16 query rows, per m tile Q and dO as A
//     fragments in registers (HD/4 each) and the dQ accumulator (HD/2); the block walks key
//     tiles of 64, K and V double-buffered by cp.async as in the forward (36 KB at hd64, 68 KB
//     at hd128), S and dP for SUB keys at a time: hd64 MT = 2, SUB = 32,
//     2 · (16 + 16 + 32 + 16 + 16) = 192 live, 252 registers (one m tile: 131); hd128 MT = 1,
//     SUB = 16, 32 + 32 + 64 + 8 + 8 = 144 live, 202 registers (SUB = 32 took 250).
//     Below 168 registers 3 blocks fit an SM, up to 255 2 blocks (both fit sm_90's 228 KB of
//     shared memory per SM).
// Causal: the dK/dV kernel starts at the query tile of its first key (earlier queries see none
// of its keys), the dQ kernel stops at the key tile of its own rows; only tiles crossing the
// diagonal (and the last one, past T) are masked, and a warp skips a SUB slice that lies entirely
// above the diagonal for its 16 rows.

// The pre-pass (attn_bwd_pre_tc{,_bf16}: dO to bf16, D and the gate gradient) is attention.cu's
// attn_bwd_pre template with a bf16 dout.

// ROWS rows from `first` of a [*, ld] bf16 matrix into shared memory (row stride HD + TC_PAD)
// as 16-byte vectors, zeros past T (as the forward stages K and V).
template <int HD, int ROWS>
__device__ __forceinline__ void stage_rows_bf16(bf16* dst, const bf16* src, long ld, int first, int T) {
    constexpr int LD = HD + TC_PAD, CHUNKS = HD / 8;
    for (int idx = threadIdx.x; idx < ROWS * CHUNKS; idx += blockDim.x) {
        const int r = idx / CHUNKS, c = (idx % CHUNKS) * 8, i = first + r;
        Pack16<bf16> x = {};  // 8 bf16: one 16-byte load or store
        if (i < T) x = *reinterpret_cast<const Pack16<bf16>*>(src + (long)i * ld + c);
        *reinterpret_cast<Pack16<bf16>*>(dst + r * LD + c) = x;
    }
}

// The A fragment (row-major 16×16, k step kk) of 16 rows `rows` of a [*, ld] bf16 matrix.
__device__ __forceinline__ void load_afrag(unsigned f[4], const bf16* m, const int rows[2], long ld, int kk, int T) {
    const int tig = threadIdx.x & 3;
    #pragma unroll
    for (int r = 0; r < 4; ++r)
        f[r] = load_pair(m, rows[r & 1], ld, kk * 16 + 8 * (r >> 1) + 2 * tig, rows[r & 1] < T);
}

// C = A·Bᵀ over the head dims for MT m tiles of 16 rows × SUB staged rows. A as k-step fragments:
// from registers `af` (m tile mt's k step kk at af[mt·HD/16 + kk]), or (`as` non-null, a
// compile-time choice of the callers) by ldmatrix from its rows staged at `as` (m tile mt's 16
// rows from as + 16·mt rows; row-major A: matrix m is rows 8·(m&1).., columns 8·(m>>1).., as in
// tc_mma_probe). B rows at `bs`, whose head dims are contiguous: the col-major B, by ldmatrix as
// the forward's S = Q·Kᵀ, each fragment loaded once for all m tiles. Both strides HD + TC_PAD.
// C of m tile mt at c[mt·SUB/8 ..]; bit mt of `on` (warp-uniform) clear skips that m tile.
template <int HD, int SUB, int MT = 1>
__device__ __forceinline__ void mma_abt(float c[][4], const unsigned (*af)[4], const bf16* as, const bf16* bs,
                                        unsigned on = 1u) {
    constexpr int LD = HD + TC_PAD, SNT = SUB / 8, KS = HD / 16;
    const int lane = threadIdx.x & 31;
    #pragma unroll
    for (int nt = 0; nt < MT * SNT; ++nt)
        for (int i = 0; i < 4; ++i) c[nt][i] = 0.0f;
    #pragma unroll
    for (int k2 = 0; k2 < HD / 32; ++k2) {
        unsigned a0[MT][4], a1[MT][4];
        #pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            if (as) {
                const bf16* arow = as + (16 * mt + (lane & 15)) * LD + k2 * 32 + 8 * (lane >> 4);
                ldmatrix_x4(a0[mt], arow);
                ldmatrix_x4(a1[mt], arow + 16);
            } else {
                for (int r = 0; r < 4; ++r) {
                    a0[mt][r] = af[mt * KS + 2 * k2][r];
                    a1[mt][r] = af[mt * KS + 2 * k2 + 1][r];
                }
            }
        }
        #pragma unroll
        for (int nt = 0; nt < SNT; ++nt) {
            unsigned bf[4];
            ldmatrix_x4(bf, bs + (nt * 8 + (lane & 7)) * LD + k2 * 32 + 8 * (lane >> 3));
            #pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                if (!(on >> mt & 1u)) continue;
                mma_bf16_16816(c[mt * SNT + nt], a0[mt], bf);
                mma_bf16_16816(c[mt * SNT + nt], a1[mt], bf + 2);
            }
        }
    }
}

// acc += X·B for MT m tiles of 16 rows: X (16 × SUB per m tile, f32 in the C layout of mma_abt,
// m tile mt at x[mt·SUB/8 ..]) rounded to bf16 as A fragments (the C fragments of n tiles 2·kk,
// 2·kk+1 are the A fragment of k step kk, as in the forward's P·V), B = SUB staged rows at `bs`
// (k = staged row, n = head dim: k-major, by ldmatrix.trans; each fragment loaded once for all
// m tiles), m tile mt's accumulator at acc[mt·HD/8 ..]; bit mt of `on` clear skips m tile mt.
// `plant` 3 swaps A registers 1 and 2 (a planted layout bug for the tests).
template <int HD, int SUB, int MT = 1>
__device__ __forceinline__ void mma_ab(float acc[][4], const float x[][4], const bf16* bs, int plant,
                                       unsigned on = 1u) {
    constexpr int LD = HD + TC_PAD, SNT = SUB / 8, NT = HD / 8;
    const int lane = threadIdx.x & 31;
    #pragma unroll
    for (int kk = 0; kk < SUB / 16; ++kk) {
        unsigned pa[MT][4];
        #pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            const float(*xm)[4] = x + mt * SNT;
            pa[mt][0] = pack_bf16x2(xm[2 * kk][0], xm[2 * kk][1]);
            pa[mt][1] = pack_bf16x2(xm[2 * kk][2], xm[2 * kk][3]);
            pa[mt][2] = pack_bf16x2(xm[2 * kk + 1][0], xm[2 * kk + 1][1]);
            pa[mt][3] = pack_bf16x2(xm[2 * kk + 1][2], xm[2 * kk + 1][3]);
            if (plant == 3) {
                const unsigned t = pa[mt][1];
                pa[mt][1] = pa[mt][2];
                pa[mt][2] = t;
            }
        }
        #pragma unroll
        for (int np = 0; np < HD / 16; ++np) {
            unsigned bf[4];
            ldmatrix_x4_trans(bf, bs + (kk * 16 + (lane & 7) + 8 * ((lane >> 3) & 1)) * LD + np * 16 + 8 * (lane >> 4));
            #pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                if (!(on >> mt & 1u)) continue;
                mma_bf16_16816(acc[mt * NT + 2 * np], pa[mt], bf);
                mma_bf16_16816(acc[mt * NT + 2 * np + 1], pa[mt], bf + 2);
            }
        }
    }
}

// `plant` (0 in the production kernels) plants a bug for the tests' planted-bug variants:
// 1 drops the causal mask of the diagonal tile, 2 drops −D from dS, 3 swaps two registers of the
// A fragment of Pᵀ/dSᵀ (or dS).
template <int HD, class TV>
__device__ void attn_bwd_dkdv_tc_impl(const bf16* q, const bf16* k, const bf16* v, const bf16* dout,
                                      const float* lse, const float* delta, float* dk, TV* dv, long ldv, int T,
                                      int H, int KV, float scale, int plant) {
    constexpr int LD = HD + TC_PAD;
    constexpr int NT = HD / 8;                // n tiles of dK, dV
    constexpr bool AREG = HD <= 64;           // K, V fragments in registers (else in shared memory)
    constexpr int QT = attn_tc_dkdv_queries(HD);  // queries per staged tile
    constexpr int SUB = AREG ? 32 : 16;       // queries per Sᵀ/dPᵀ slice
    constexpr int SNT = SUB / 8;              // n tiles of a slice
    constexpr float LOG2E = 1.4426950408889634f;
    // two buffers of a query tile (Q, dO; lse, D), the next one copied by cp.async while this
    // one is computed on; at hd128 K rows, then V rows
    // Q of buffer i at tiles + i·TILE, dO at tiles + (2 + i)·TILE; the lse and D of the staged
    // queries at stats + i·QT, stats + (2 + i)·QT (offsets, not arrays of pointers: indexed at
    // run time, those would live in local memory)
    DYN_SHARED(unsigned char, smem, attn_tc_smem_dkdv(HD));
    constexpr int TILE = QT * LD;
    bf16* const tiles = reinterpret_cast<bf16*>(smem);
    bf16* const kvs = tiles + 4 * TILE;
    float* const stats = reinterpret_cast<float*>(kvs + (AREG ? 0 : 2 * TC_KEYS * LD));
    const int b = blockIdx.z, kh = blockIdx.y, group = H / KV;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tig = lane & 3;
    const int j0 = blockIdx.x * TC_KEYS, wk = j0 + warp * 16;  // the block's and the warp's first key
    const int keys[2] = {wk + g, wk + g + 8};                  // the lane's two keys (C rows)
    const long ldq = (long)H * HD, ldk = (long)KV * HD;
    const bf16* kb = k + (long)b * T * ldk + kh * HD;
    const bf16* vb = v + (long)b * T * ldk + kh * HD;

    // Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ: the warp's K and V rows as A fragments
    unsigned kf[AREG ? HD / 16 : 1][4], vf[AREG ? HD / 16 : 1][4];
    const bf16 *ka = nullptr, *va = nullptr;
    if constexpr (AREG) {
        #pragma unroll
        for (int kk = 0; kk < HD / 16; ++kk) {
            load_afrag(kf[kk], kb, keys, ldk, kk, T);
            load_afrag(vf[kk], vb, keys, ldk, kk, T);
        }
    } else {
        // staged once; the loop's first barrier orders these stores before any read
        stage_rows_bf16<HD, TC_KEYS>(kvs, kb, ldk, j0, T);
        stage_rows_bf16<HD, TC_KEYS>(kvs + TC_KEYS * LD, vb, ldk, j0, T);
        ka = kvs + warp * 16 * LD;
        va = kvs + (TC_KEYS + warp * 16) * LD;
    }

    float adk[NT][4], adv[NT][4];  // dK/scale and dV: rows g, g+8 (keys); columns 8·nt + 2·tig, +1
    #pragma unroll
    for (int nt = 0; nt < NT; ++nt)
        for (int i = 0; i < 4; ++i) adk[nt][i] = adv[nt][i] = 0.0f;

    // cp.async of query tile i0 of query head hh of the group into buffer `buf`: Q and dO rows,
    // lse and D (4 bytes each), zeros past T
    auto stage_async = [&](int buf, int hh, int i0) {
        const int h = kh * group + hh;
        const long lrow = ((long)b * H + h) * T;
        stage_rows_async<HD, QT>(tiles + buf * TILE, q + (long)b * T * ldq + h * HD, ldq, i0, T);
        stage_rows_async<HD, QT>(tiles + (2 + buf) * TILE, dout + (long)b * T * ldq + h * HD, ldq, i0, T);
        for (int r = threadIdx.x; r < QT; r += blockDim.x) {
            const int i = i0 + r < T ? i0 + r : 0, bytes = i0 + r < T ? 4 : 0;
            cp_async4(stats + buf * QT + r, lse + lrow + i, bytes);
            cp_async4(stats + (2 + buf) * QT + r, delta + lrow + i, bytes);
        }
    };
    const float sl2 = scale * LOG2E;
    stage_async(0, 0, j0);  // j0 < T: the first tile exists
    cp_async_commit();
    int t = 0;  // query tiles so far
    for (int hh = 0; hh < group; ++hh) {
        // queries before the block's first key see none of its keys
        for (int i0 = j0; i0 < T; i0 += QT, ++t) {
            const int buf = t & 1;
            cp_async_wait<0>();  // tile t lands (the one pending group)
            __syncthreads();     // ... for every thread; every warp is done with tile t-1
            // the next tile: this head's next query tile, else the next head's first
            const bool here = i0 + QT < T;
            if (here || hh + 1 < group) {
                stage_async(buf ^ 1, here ? hh : hh + 1, here ? i0 + QT : j0);
                cp_async_commit();
            }
            const bf16 *qt = tiles + buf * TILE, *dt = tiles + (2 + buf) * TILE;
            const float *lt = stats + buf * QT, *dlt = stats + (2 + buf) * QT;
            // tiles that hold queries before some of the block's keys, or past T
            const bool edge = (i0 < j0 + TC_KEYS && plant != 1) || i0 + QT > T;
            #pragma unroll 1
            for (int s = 0; s < QT; s += SUB) {
                // warp-uniform: a slice of queries all before the warp's first key, or past T,
                // or a warp whose keys are all past T
                if (i0 + s + SUB - 1 < wk || i0 + s >= T || wk >= T) continue;
                float st[SNT][4], dpt[SNT][4];
                mma_abt<HD, SUB>(st, kf, ka, qt + s * LD);
                mma_abt<HD, SUB>(dpt, vf, va, dt + s * LD);
                #pragma unroll
                for (int nt = 0; nt < SNT; ++nt)
                    for (int i = 0; i < 4; ++i) {
                        const int c = s + nt * 8 + 2 * tig + (i & 1), query = i0 + c;
                        // lse·log2(e) rounded on its own (no fma with the product before it)
                        float p = exp2f(st[nt][i] * sl2 - __fmul_rn(lt[c], LOG2E));
                        if (edge && (query < keys[i >> 1] || query >= T)) p = 0.0f;
                        st[nt][i] = p;
                        dpt[nt][i] = p * (dpt[nt][i] - (plant == 2 ? 0.0f : dlt[c]));  // dSᵀ
                    }
                mma_ab<HD, SUB>(adv, st, dt + s * LD, plant);  // dV += Pᵀ·dO
                mma_ab<HD, SUB>(adk, dpt, qt + s * LD, plant);  // dK += dSᵀ·Q
            }
        }
    }
    #pragma unroll
    for (int r = 0; r < 2; ++r) {
        if (keys[r] >= T) continue;
        // dv's rows are ldv apart (a band of the stacked projections' gradient)
        const long base = ((long)b * T + keys[r]) * ldk + kh * HD;
        const long vbase = ((long)b * T + keys[r]) * ldv + kh * HD;
        #pragma unroll
        for (int nt = 0; nt < NT; ++nt)
            for (int e = 0; e < 2; ++e) {
                const int c = nt * 8 + 2 * tig + e;
                dk[base + c] = adk[nt][2 * r + e] * scale;
                store_as(dv + vbase + c, adv[nt][2 * r + e]);
            }
    }
}

// Each warp owns MT m tiles of 16 query rows (attn_tc_query_mtiles; 2 at hd64, as the forward):
// every K and V fragment it loads feeds MT mmas. An m tile skips a key slice entirely after its
// own 16 rows, so each row sees exactly the slices it would with one m tile per warp.
template <int HD>
__device__ void attn_bwd_dq_tc_impl(const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const float* lse,
                                    const float* delta, float* dq, int T, int H, int KV, float scale, int plant) {
    constexpr int LD = HD + TC_PAD;
    constexpr int NT = HD / 8;               // n tiles of dQ
    constexpr int KS = HD / 16;              // k steps over the head dims
    constexpr int SUB = HD <= 64 ? 32 : 16;  // keys per S/dP slice
    constexpr int SNT = SUB / 8;
    constexpr int MT = attn_tc_query_mtiles(HD);
    constexpr int WROWS = 16 * MT, BROWS = 4 * WROWS;  // query rows per warp, per block
    constexpr float LOG2E = 1.4426950408889634f;
    // K/V tiles double-buffered as in the forward (36 KB at hd64, 68 KB at hd128)
    // K tile buffer i at smem + i·TILE, V's at smem + (2 + i)·TILE (offsets, not an array of
    // pointers: one indexed at run time would live in local memory)
    DYN_SHARED(bf16, smem, attn_tc_smem_fwd(HD) / 2);
    constexpr int TILE = TC_KEYS * LD;
    const int b = blockIdx.z, h = blockIdx.y, kh = h / (H / KV);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tig = lane & 3;
    const int q0 = heavy_first_query_block() * BROWS, wq = q0 + warp * WROWS;  // the block's and the warp's first row
    int rows[MT][2];  // the lane's two rows of each m tile
    mtile_rows<MT>(rows, wq, g);
    const long ldq = (long)H * HD, ldk = (long)KV * HD;
    const bf16* qh = q + (long)b * T * ldq + h * HD;
    const bf16* dh = dout + (long)b * T * ldq + h * HD;
    const bf16* kb = k + (long)b * T * ldk + kh * HD;
    const bf16* vb = v + (long)b * T * ldk + kh * HD;

    // S = Q·Kᵀ, dP = dO·Vᵀ: Q and dO rows as A fragments, m tile mt's k step kk at [mt·KS + kk]
    unsigned qf[MT * KS][4], of[MT * KS][4];
    float l2[MT][2], dd[MT][2];  // lse·log2(e) and D of the lane's rows
    float acc[MT * NT][4];       // dQ/scale of m tile mt at [mt·NT ..]: rows g, g+8; columns 8·nt + 2·tig, +1
    #pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        #pragma unroll
        for (int kk = 0; kk < KS; ++kk) {
            load_afrag(qf[mt * KS + kk], qh, rows[mt], ldq, kk, T);
            load_afrag(of[mt * KS + kk], dh, rows[mt], ldq, kk, T);
        }
        #pragma unroll
        for (int r = 0; r < 2; ++r) {
            const long li = ((long)b * H + h) * T + rows[mt][r];
            l2[mt][r] = rows[mt][r] < T ? lse[li] * LOG2E : 0.0f;
            dd[mt][r] = rows[mt][r] < T && plant != 2 ? delta[li] : 0.0f;
        }
        #pragma unroll
        for (int nt = 0; nt < NT; ++nt)
            for (int i = 0; i < 4; ++i) acc[mt * NT + nt][i] = 0.0f;
    }

    const float sl2 = scale * LOG2E;
    const int last = min(T - 1, q0 + BROWS - 1);  // the block's last row: keys after it are masked
    stage_rows_async<HD, TC_KEYS>(smem, kb, ldk, 0, T);
    stage_rows_async<HD, TC_KEYS>(smem + 2 * TILE, vb, ldk, 0, T);
    cp_async_commit();
    for (int j0 = 0, t = 0; j0 <= last; j0 += TC_KEYS, ++t) {
        const bf16* kt = smem + (t & 1) * TILE;
        const bf16* vt = smem + (2 + (t & 1)) * TILE;
        cp_async_wait<0>();  // tile t lands (the one pending group)
        __syncthreads();     // ... for every thread; every warp is done with tile t-1
        if (j0 + TC_KEYS <= last) {
            stage_rows_async<HD, TC_KEYS>(smem + ((t + 1) & 1) * TILE, kb, ldk, j0 + TC_KEYS, T);
            stage_rows_async<HD, TC_KEYS>(smem + (2 + ((t + 1) & 1)) * TILE, vb, ldk, j0 + TC_KEYS, T);
            cp_async_commit();
        }
        // only a tile reaching past the warp's first row holds keys after a row or past T
        const bool edge = j0 + TC_KEYS > wq && plant != 1;
        #pragma unroll 1
        for (int s = 0; s < TC_KEYS; s += SUB) {
            // warp-uniform: the m tiles with a row at or after the slice's first key and before T
            unsigned on = 0;
            #pragma unroll
            for (int mt = 0; mt < MT; ++mt)
                if (j0 + s <= wq + 16 * mt + 15 && wq + 16 * mt < T) on |= 1u << mt;
            if (!on || j0 + s >= T) continue;
            float st[MT * SNT][4], dp[MT * SNT][4];
            mma_abt<HD, SUB, MT>(st, qf, nullptr, kt + s * LD, on);
            mma_abt<HD, SUB, MT>(dp, of, nullptr, vt + s * LD, on);
            #pragma unroll
            for (int mt = 0; mt < MT; ++mt)
                #pragma unroll
                for (int nt = 0; nt < SNT; ++nt)
                    for (int i = 0; i < 4; ++i) {
                        const int key = j0 + s + nt * 8 + 2 * tig + (i & 1), r = i >> 1;
                        float p = exp2f(st[mt * SNT + nt][i] * sl2 - l2[mt][r]);
                        if (edge && (key > rows[mt][r] || key >= T)) p = 0.0f;
                        dp[mt * SNT + nt][i] = p * (dp[mt * SNT + nt][i] - dd[mt][r]);  // dS
                    }
            mma_ab<HD, SUB, MT>(acc, dp, kt + s * LD, plant, on);  // dQ += dS·K
        }
    }
    #pragma unroll
    for (int mt = 0; mt < MT; ++mt)
        #pragma unroll
        for (int r = 0; r < 2; ++r) {
            if (rows[mt][r] >= T) continue;
            const long base = ((long)b * T + rows[mt][r]) * ldq + h * HD;
            #pragma unroll
            for (int nt = 0; nt < NT; ++nt)
                for (int e = 0; e < 2; ++e)
                    dq[base + nt * 8 + 2 * tig + e] = acc[mt * NT + nt][2 * r + e] * scale;
        }
}

#define ATTN_TC_BWD_KERNELS(HD)                                                                                    \
    extern "C" __global__ void attn_bwd_dkdv_tc_hd##HD(const bf16* q, const bf16* k, const bf16* v,               \
                                                       const bf16* dout, const float* lse, const float* delta,    \
                                                       float* dk, float* dv, long ldv, int T, int H, int KV,      \
                                                       float scale) {                                             \
        attn_bwd_dkdv_tc_impl<HD>(q, k, v, dout, lse, delta, dk, dv, ldv, T, H, KV, scale, 0);                    \
    }                                                                                                              \
    extern "C" __global__ void attn_bwd_dkdv_tc_hd##HD##_bf16(const bf16* q, const bf16* k, const bf16* v,        \
                                                              const bf16* dout, const float* lse,                 \
                                                              const float* delta, float* dk, bf16* dv, long ldv,  \
                                                              int T, int H, int KV, float scale) {                \
        attn_bwd_dkdv_tc_impl<HD>(q, k, v, dout, lse, delta, dk, dv, ldv, T, H, KV, scale, 0);                    \
    }                                                                                                              \
    extern "C" __global__ void attn_bwd_dq_tc_hd##HD(const bf16* q, const bf16* k, const bf16* v,                 \
                                                     const bf16* dout, const float* lse, const float* delta,      \
                                                     float* dq, int T, int H, int KV, float scale) {              \
        attn_bwd_dq_tc_impl<HD>(q, k, v, dout, lse, delta, dq, T, H, KV, scale, 0);                               \
    }

ATTN_TC_BWD_KERNELS(64)
ATTN_TC_BWD_KERNELS(128)

// Test references (tests/cuda_tensor_core; the model never launches them): the hd64 backward
// kernels with a planted bug (`plant` as above); each variant must fail the backward test that
// the production kernels pass.
extern "C" __global__ void attn_bwd_dkdv_tc_planted(const bf16* q, const bf16* k, const bf16* v, const bf16* dout,
                                                    const float* lse, const float* delta, float* dk, float* dv,
                                                    long ldv, int T, int H, int KV, float scale, int plant) {
    attn_bwd_dkdv_tc_impl<64>(q, k, v, dout, lse, delta, dk, dv, ldv, T, H, KV, scale, plant);
}
extern "C" __global__ void attn_bwd_dq_tc_planted(const bf16* q, const bf16* k, const bf16* v, const bf16* dout,
                                                  const float* lse, const float* delta, float* dq, int T, int H,
                                                  int KV, float scale, int plant) {
    attn_bwd_dq_tc_impl<64>(q, k, v, dout, lse, delta, dq, T, H, KV, scale, plant);
}

#undef TC_KEYS
#undef TC_PAD
#undef ATTN_TC_KERNEL
#undef ATTN_TC_BWD_KERNELS
