// Test references (tests/cuda_tensor_core; the model never launches them): probes of the
// tensor-core primitives attention_tc.cu is built on (common.cuh's mma, ldmatrix and cp.async),
// each run against a CPU reference and with planted variants that must fail.

#define PROBE_PAD 8  // bf16 of padding after each staged row, as attention_tc.cu's TC_PAD

// Test reference (tests/cuda_tensor_core; the model never launches it): a test of the
// tensor-core primitives themselves. One warp computes D = A·B + C for a 16×16 A, a 16×16 B
// (two n tiles) and a 16×16 f32 C, with A loaded by ldmatrix, B twice: from an n-major copy `bn`
// (B[k][n] at bn[16n + k], as K is stored) by ldmatrix, and from a k-major copy `bk` (at
// bk[16k + n], as V is stored) by ldmatrix.trans;
// d[0..256) and d[256..512) are the two results, row-major. `variant` plants a layout bug (the
// test checks that each one changes the result): 1 swaps A registers 1 and 2 (rows g+8 with
// columns +8), 2 loads bn with .trans, 3 stores D's rows g and g+8 swapped, 4 swaps the k halves
// of the first n tile's B fragment.
extern "C" __global__ void tc_mma_probe(const bf16* a, const bf16* bn, const bf16* bk, const float* c, float* d,
                                        int variant) {
    constexpr int LD = 16 + PROBE_PAD;
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

// Test reference (tests/cuda_tensor_core; the model never launches it): cp.async's semantics.
// Threads 0 and 1 copy 16-byte chunks of `src` (40 bf16: chunks 0..4) into slots 0..4 of a
// shared buffer first filled with 0x7777, and the block writes 6 snapshots of the buffer to
// `out` (40 bf16 each), each between two barriers:
//   thread 0 copies chunk 0 → slot 0 (A), commits; chunk 1 → slot 1 with src_bytes 6 (B: 3 bf16,
//   then zeros), commits; chunk 2 → slot 2 with src_bytes 0 (C: zeros), commits; snapshot 0;
//   wait_group 2 (A lands), snapshot 1; wait_group 1 (B), snapshot 2; chunk 3 → slot 3 (D), not
//   committed, wait_group 0 (C, not D), snapshot 3; then thread 1 copies chunk 4 → slot 4 (E)
//   and commits, thread 0 waits for all of its own (D, not E), snapshot 4; thread 1 waits for
//   its group, snapshot 5. `variant` 1 gives A src_bytes 17, 2 a destination 2 bytes off.
extern "C" __global__ void cp_async_probe(const bf16* src, bf16* out, int variant) {
    __shared__ __align__(16) bf16 buf[40];
    const int tid = threadIdx.x;
    for (int i = tid; i < 40; i += blockDim.x) buf[i] = 0x7777;
    auto snap = [&](int n) {
        __syncthreads();
        for (int i = tid; i < 40; i += blockDim.x) out[40 * n + i] = buf[i];
        __syncthreads();
    };
    if (tid == 0) {
        cp_async16(buf + (variant == 2 ? 1 : 0), src, variant == 1 ? 17 : 16);
        cp_async_commit();
        cp_async16(buf + 8, src + 8, 6);
        cp_async_commit();
        cp_async16(buf + 16, src + 16, 0);
        cp_async_commit();
    }
    snap(0);
    if (tid == 0) cp_async_wait<2>();
    snap(1);
    if (tid == 0) cp_async_wait<1>();
    snap(2);
    if (tid == 0) {
        cp_async16(buf + 24, src + 24, 16);
        cp_async_wait<0>();
    }
    snap(3);
    if (tid == 1) {
        cp_async16(buf + 32, src + 32, 16);
        cp_async_commit();
    }
    __syncthreads();
    if (tid == 0) cp_async_wait_all();
    snap(4);
    if (tid == 1) cp_async_wait<0>();
    snap(5);
}

#undef PROBE_PAD
