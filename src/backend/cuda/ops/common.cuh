// Prepended to every kernel source, by the NVRTC build and by the CPU emulator build
// (emu/cuda_emu.h, which defines GATED_CUDA_EMU and its own DYN_SHARED).
#ifndef GATED_CUDA_EMU
// `count` Ts of the block's dynamic shared memory (the emulator checks that the launch gave them)
#define DYN_SHARED(T, name, count)                              \
    extern __shared__ __align__(16) unsigned char name##_raw[]; \
    T* name = reinterpret_cast<T*>(name##_raw)
#endif

// bf16 as raw bits, so the sources need no CUDA headers: widening is exact, narrowing rounds
// to nearest even (NaN stays NaN), as torch and cuBLASLt do.
typedef unsigned short bf16;
__device__ __forceinline__ float bf16_to_f32(bf16 h) { return __uint_as_float((unsigned)h << 16); }
__device__ __forceinline__ bf16 f32_to_bf16(float f) {
    unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16)(u >> 16);
}

// A kernel's f32 result stored in its output's type: f32 as is, bf16 rounded as above. The
// kernels that produce a GEMM operand write it in the type the GEMM reads (no cast launch).
__device__ __forceinline__ void store_as(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_as(bf16* p, float v) { *p = f32_to_bf16(v); }
// An input in either type, widened to f32 (exact).
__device__ __forceinline__ float load_f32(const float* p) { return *p; }
__device__ __forceinline__ float load_f32(const bf16* p) { return bf16_to_f32(*p); }

// 16 bytes of T in one access (8 bf16 or 4 f32: LDG.128 / STG.128), for the bandwidth-bound
// elementwise kernels: with a 2-byte bf16 access per thread a warp moves 64 B per instruction and
// each thread has 2 B per input in flight, too little to cover DRAM latency; 16 B is a whole
// sector per thread. Only at a 16-byte aligned address (aligned16).
// Pack<T, N>: N consecutive Ts in one access of N·sizeof(T) bytes (N = 1: a plain element).
template <class T, int PN>
struct alignas(PN * sizeof(T)) Pack {
    static constexpr int N = PN;
    T v[PN];
};
template <class T>
using Pack16 = Pack<T, 16 / sizeof(T)>;
__device__ __forceinline__ bool aligned16(const void* p) { return ((unsigned long long)p & 15u) == 0; }

// A thread's columns c = first, first + step, ... below n, U at a time: load(u, c) for each
// column of a batch, then use(u, c) for each. All of a batch's loads issue before any of its
// stores: the compiler must assume the buffers may alias, so a load written after a store waits
// for it, and column by column each load was a memory round trip of its own. The caller keeps
// a batch's values in arrays of U.
template <int U, class Load, class Use>
__device__ __forceinline__ void in_batches(int first, int step, int n, Load load, Use use) {
    for (int c0 = first; c0 < n; c0 += U * step) {
        #pragma unroll
        for (int u = 0; u < U; ++u) {
            const int c = c0 + u * step;
            if (c >= n) break;
            load(u, c);
        }
        #pragma unroll
        for (int u = 0; u < U; ++u) {
            const int c = c0 + u * step;
            if (c >= n) break;
            use(u, c);
        }
    }
}

__device__ __forceinline__ float sigmoidf(float z) { return 1.0f / (1.0f + __expf(-z)); }

__device__ __forceinline__ float warp_sum(float x) {
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

// Block-wide sum / max for blocks whose size is a multiple of 32; `shared` holds 32 floats.
// Every thread of the block must call them (they contain barriers).
__device__ float block_sum(float x, float* shared) {
    x = warp_sum(x);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) shared[warp] = x;
    __syncthreads();
    int warps = (blockDim.x + 31) >> 5;
    x = threadIdx.x < warps ? shared[threadIdx.x] : 0.0f;
    if (warp == 0) x = warp_sum(x);
    if (threadIdx.x == 0) shared[0] = x;
    __syncthreads();
    return shared[0];
}

__device__ float block_max(float x, float* shared) {
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) shared[warp] = x;
    __syncthreads();
    int warps = (blockDim.x + 31) >> 5;
    x = threadIdx.x < warps ? shared[threadIdx.x] : -__int_as_float(0x7f800000);
    if (warp == 0)
        for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    if (threadIdx.x == 0) shared[0] = x;
    __syncthreads();
    return shared[0];
}

// Two f32 as the bf16x2 register of an mma fragment: `lo` in the low half (the element with the
// smaller index), both rounded to nearest even like f32_to_bf16.
__device__ __forceinline__ unsigned pack_bf16x2(float lo, float hi) {
    return (unsigned)f32_to_bf16(lo) | ((unsigned)f32_to_bf16(hi) << 16);
}

// Tensor-core warp collectives (sm_80+); every lane of the warp must execute them, converged.
// The CPU emulator (emu/cuda_emu.h) implements the same three with the PTX ISA's per-lane
// fragment semantics (the layouts are spelled out there), and cp.async below with deferred
// completion.
//   mma_bf16_16816: d = A·B + d, A 16×16 (row) as 4 bf16x2 registers per lane, B 16×8 (col) as
//     2, d 16×8 f32 as 4 (mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32).
//   ldmatrix_x4[_trans]: four 8×8 b16 matrices from shared memory, lanes 8m..8m+7 giving the
//     16-byte-aligned row addresses of matrix m; register m of lane l holds row l>>2, columns
//     2·(l&3), +1 of matrix m (of its transpose with _trans).
// And the asynchronous copies (cp.async, sm_80+), per thread, not collectives:
//   cp_async16 / cp_async4: 16 (cp.async.cg) or 4 (cp.async.ca) bytes from global to shared
//     memory, both addresses aligned to the size; only the first `src_bytes` (0 ≤ src_bytes ≤
//     size) are read, the rest of the destination is zero-filled (src_bytes 0: all zeros, `src`
//     must still be a valid address). The copy lands at some point before the issuing thread's
//     wait that retires it; other threads see it only after a barrier that follows that wait.
//   cp_async_commit: closes the thread's copies issued since the last commit into a group.
//   cp_async_wait<N>: waits until at most the N newest groups of this thread are pending (the
//     older ones have landed); cp_async_wait_all: commits and waits for everything.
// Before sm_80 (no bf16 mma, no cp.async) they trap instead: the module still loads, so a GPU of
// that age keeps the other kernels, and only a launch of a tensor-core kernel fails.
#ifndef GATED_CUDA_EMU
#if __CUDA_ARCH__ >= 800
__device__ __forceinline__ unsigned smem_u32(const void* p) {
    unsigned a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}
__device__ __forceinline__ void mma_bf16_16816(float d[4], const unsigned a[4], const unsigned b[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ __forceinline__ void ldmatrix_x4(unsigned r[4], const bf16* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(row))
                 : "memory");
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned r[4], const bf16* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(row))
                 : "memory");
}
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_u32(dst)), "l"(src), "r"(src_bytes)
                 : "memory");
}
__device__ __forceinline__ void cp_async4(void* dst, const void* src, int src_bytes) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(smem_u32(dst)), "l"(src), "r"(src_bytes)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;" ::: "memory"); }
#else
__device__ __forceinline__ void mma_bf16_16816(float*, const unsigned*, const unsigned*) { asm volatile("trap;"); }
__device__ __forceinline__ void ldmatrix_x4(unsigned*, const bf16*) { asm volatile("trap;"); }
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned*, const bf16*) { asm volatile("trap;"); }
__device__ __forceinline__ void cp_async16(void*, const void*, int) { asm volatile("trap;"); }
__device__ __forceinline__ void cp_async4(void*, const void*, int) { asm volatile("trap;"); }
__device__ __forceinline__ void cp_async_commit() { asm volatile("trap;"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("trap;");
}
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("trap;"); }
#endif
#endif
