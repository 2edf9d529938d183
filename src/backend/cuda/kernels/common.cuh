// Prepended to every kernel source, by the NVRTC build and by the CPU emulator build
// (emu/cuda_emu.h, which defines GATED_CUDA_EMU and its own DYN_SHARED).
#ifndef GATED_CUDA_EMU
#define DYN_SHARED(T, name)                                     \
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
