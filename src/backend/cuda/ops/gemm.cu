// f32 GEMM with arbitrary strides: C[m, n] = alpha·Σ_k A(m, k)·B(k, n) + beta·Cin[m, n], where
// A(m, k) = A[m·sam + k·sak], B(k, n) = B[k·sbk + n·sbn] and C is row-major with ldc. The
// strides express every transpose the linear layers need (x·Wᵀ, dy·W, dyᵀ·x) with one kernel.
// It is the portable path (the emulator, or a GPU without cuBLASLt): 64×64 output tiles, 256
// threads of 4×4 outputs, K in steps of 16 through shared memory; deterministic (each output
// summed by one thread in k order). beta = 0 never reads Cin, which is C itself for an update in
// place, or another matrix of C's layout (the residual a projection's output adds). gemm_bf16 reads bf16 A and B (the
// mixed-precision matmul: bf16 operands, f32 accumulation and output); gemm_bf16_bf16 also
// stores C in bf16 (the f32 result rounded, as cuBLASLt with a bf16 D: for an output that only
// bf16 consumers read); cast_f32_bf16 makes bf16 operands of f32 tensors.
// Entry points (ops/gemm.rs): gemm_f32, gemm_bf16, gemm_bf16_bf16, cast_f32_bf16.

#define GM 64
#define GN 64
#define GK 16

__device__ __forceinline__ float load_f(const float* p) { return *p; }
__device__ __forceinline__ float load_f(const bf16* p) { return bf16_to_f32(*p); }

template <class T, class TC>
__device__ void gemm_impl(const T* A, const T* B, const TC* Cin, TC* C, int M, int N, int K, long sam, long sak,
                          long sbk, long sbn, long ldc, float alpha, float beta) {
    __shared__ float as[GK][GM];
    __shared__ float bs[GK][GN];
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    const int m0 = blockIdx.y * GM, n0 = blockIdx.x * GN;
    float acc[4][4];
    for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
    for (int k0 = 0; k0 < K; k0 += GK) {
        for (int idx = threadIdx.x; idx < GM * GK; idx += blockDim.x) {
            int mm = idx / GK, kk = idx % GK, m = m0 + mm, k = k0 + kk;
            as[kk][mm] = m < M && k < K ? load_f(A + m * sam + k * sak) : 0.0f;
        }
        for (int idx = threadIdx.x; idx < GN * GK; idx += blockDim.x) {
            int kk = idx / GN, nn = idx % GN, n = n0 + nn, k = k0 + kk;
            bs[kk][nn] = n < N && k < K ? load_f(B + k * sbk + n * sbn) : 0.0f;
        }
        __syncthreads();
        for (int kk = 0; kk < GK; ++kk) {
            float a[4], b[4];
            for (int i = 0; i < 4; ++i) a[i] = as[kk][ty + 16 * i];
            for (int j = 0; j < 4; ++j) b[j] = bs[kk][tx + 16 * j];
            for (int i = 0; i < 4; ++i)
                for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
        }
        __syncthreads();
    }
    for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) {
            int m = m0 + ty + 16 * i, n = n0 + tx + 16 * j;
            if (m < M && n < N) {
                long at = m * ldc + n;
                store_as(C + at, beta == 0.0f ? alpha * acc[i][j] : alpha * acc[i][j] + beta * load_f(Cin + at));
            }
        }
}

extern "C" __global__ void gemm_f32(const float* A, const float* B, const float* Cin, float* C, int M, int N, int K,
                                    long sam, long sak, long sbk, long sbn, long ldc, float alpha, float beta) {
    gemm_impl(A, B, Cin, C, M, N, K, sam, sak, sbk, sbn, ldc, alpha, beta);
}

extern "C" __global__ void gemm_bf16(const bf16* A, const bf16* B, const float* Cin, float* C, int M, int N, int K,
                                     long sam, long sak, long sbk, long sbn, long ldc, float alpha, float beta) {
    gemm_impl(A, B, Cin, C, M, N, K, sam, sak, sbk, sbn, ldc, alpha, beta);
}

extern "C" __global__ void gemm_bf16_bf16(const bf16* A, const bf16* B, const bf16* Cin, bf16* C, int M, int N,
                                          int K, long sam, long sak, long sbk, long sbn, long ldc, float alpha,
                                          float beta) {
    gemm_impl(A, B, Cin, C, M, N, K, sam, sak, sbk, sbn, ldc, alpha, beta);
}

// Mixed precision: bf16 copies of f32 tensors (round to nearest even).
extern "C" __global__ void cast_f32_bf16(const float* x, bf16* y, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        y[i] = f32_to_bf16(x[i]);
}

#undef GM
#undef GN
#undef GK
