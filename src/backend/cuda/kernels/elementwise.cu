// Elementwise ops of the block, f32, one thread per element (grid-stride loops).
// Same math as src/model/ops/{swiglu,gate}.rs.

extern "C" __global__ void swiglu_fwd(const float* g, const float* u, float* m, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float s = sigmoidf(g[i]);
        m[i] = g[i] * s * u[i];
    }
}

// dg = dm·u·silu'(g), du = dm·silu(g); silu'(g) = s·(1 + g·(1 − s))
extern "C" __global__ void swiglu_bwd(const float* g, const float* u, const float* dm, float* dg, float* du, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float s = sigmoidf(g[i]);
        du[i] = dm[i] * g[i] * s;
        dg[i] = dm[i] * u[i] * s * (1.0f + g[i] * (1.0f - s));
    }
}

// The paper's G1 gate, elementwise multiplicative sigmoid: y = o · sigmoid(z), in place.
extern "C" __global__ void gate_sigmoid_mul_fwd(float* y, const float* z, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        y[i] = y[i] * sigmoidf(z[i]);
    }
}

// Backward: dz = dy·o·s·(1 − s) and dy ← dy·s (the ungated gradient), o the ungated input.
extern "C" __global__ void gate_sigmoid_mul_bwd(const float* o, const float* z, float* dy, float* dz, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float s = sigmoidf(z[i]);
        dz[i] = dy[i] * o[i] * s * (1.0f - s);
        dy[i] = dy[i] * s;
    }
}

// AdamW (torch semantics, decoupled weight decay) with the clip coefficient folded into the
// gradient: p ← p·(1 − lr·wd) − lr·m̂/(√v̂ + eps). bc1/bc2 are 1 − β^t.
extern "C" __global__ void adamw(float* p, const float* grad, float* m, float* v, long n, float lr, float b1,
                                 float b2, float eps, float wd, float bc1, float bc2, float scale) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float g = grad[i] * scale;
        m[i] = b1 * m[i] + (1.0f - b1) * g;
        v[i] = b2 * v[i] + (1.0f - b2) * g * g;
        float mh = m[i] / bc1, vh = v[i] / bc2;
        p[i] = p[i] * (1.0f - lr * wd) - lr * mh / (sqrtf(vh) + eps);
    }
}

// Mixed precision: bf16 copies of f32 tensors (round to nearest even) and back.
extern "C" __global__ void cast_f32_bf16(const float* x, bf16* y, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        y[i] = f32_to_bf16(x[i]);
}

extern "C" __global__ void cast_bf16_f32(const bf16* x, float* y, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        y[i] = bf16_to_f32(x[i]);
}
