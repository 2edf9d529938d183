// Evaluation probes: the sink / massive-activation / gate metrics of a forward (README
// "Metrics"), reduced on the device so that evaluation downloads a few numbers per layer, not
// its activations or its attention column. Every block writes one record of f64 partials; the
// host sums the records in block order (ops/probe.rs), so the result is the same on every run.
// Entry points (ops/probe.rs): probe_key0, probe_key0_bf16, probe_small, probe_small_bf16,
// probe_gate, probe_gate_bf16, probe_max_abs.

#define PROBE_THREADS 256
// The README's thresholds (model/observer.rs GATE_BINS, GATE_LOW_HIGH, SMALL_OUTPUT), compared
// in f64 as the host observers compare them.
#define PROBE_GATE_BINS 20
#define PROBE_GATE_LOW 0.1
#define PROBE_GATE_HIGH 0.9
#define PROBE_SMALL_A 1e-2
#define PROBE_SMALL_B 1e-3

// The block's sum of x, in thread order, on thread 0 (every thread must call it).
__device__ double probe_block_sum(double x, double* buf) {
    buf[threadIdx.x] = x;
    __syncthreads();
    double t = 0.0;
    if (threadIdx.x == 0)
        for (unsigned i = 0; i < blockDim.x; ++i) t += buf[i];
    __syncthreads();
    return t;
}

// A[i, 0] = exp(scale·q_i·k_0 − lse_i) summed over the queries i ≥ 1 of one (batch b, head h):
// block (h, b) writes rec[b·H + h]. q [B·T, H·HD], k [B·T, KV·HD] (query head h reads kv head
// h / (H / KV)), lse [B, H, T] as the attention forward wrote it.
template <class T>
__device__ void probe_key0_impl(const T* q, const T* k, const float* lse, double* rec, int Tn, int H, int KV, int HD,
                                float scale) {
    __shared__ double buf[PROBE_THREADS];
    const int h = blockIdx.x, b = blockIdx.y, kvh = h / (H / KV);
    const T* k0 = k + (long)b * Tn * KV * HD + (long)kvh * HD;
    double acc = 0.0;
    for (int i = 1 + threadIdx.x; i < Tn; i += blockDim.x) {
        const T* qi = q + ((long)b * Tn + i) * H * HD + (long)h * HD;
        float s = 0.0f;
        for (int d = 0; d < HD; ++d) s += load_f32(qi + d) * load_f32(k0 + d);
        acc += (double)expf(s * scale - lse[((long)b * H + h) * Tn + i]);
    }
    double t = probe_block_sum(acc, buf);
    if (threadIdx.x == 0) rec[(long)b * H + h] = t;
}

// Of the n values of y (the o projection's input): how many have |y| < 1e-2 and < 1e-3. Block
// j writes rec[2j], rec[2j + 1].
template <class T>
__device__ void probe_small_impl(const T* y, double* rec, long n) {
    __shared__ double buf[PROBE_THREADS];
    double a = 0.0, b = 0.0;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        double v = fabs((double)load_f32(y + i));
        a += v < PROBE_SMALL_A;
        b += v < PROBE_SMALL_B;
    }
    a = probe_block_sum(a, buf);
    b = probe_block_sum(b, buf);
    if (threadIdx.x == 0) {
        rec[2 * (long)blockIdx.x] = a;
        rec[2 * (long)blockIdx.x + 1] = b;
    }
}

// The gate scores sigmoid(z) of z [rows, width] at row stride ldz: block j writes the record
// rec[j·(BINS + 3) ...] = [Σ score, histogram over BINS bins of [0, 1], count < 0.1, count > 0.9].
template <class T>
__device__ void probe_gate_impl(const T* z, double* rec, long rows, int width, long ldz) {
    __shared__ double buf[PROBE_THREADS];
    double sum = 0.0, low = 0.0, high = 0.0, hist[PROBE_GATE_BINS];
    for (int i = 0; i < PROBE_GATE_BINS; ++i) hist[i] = 0.0;
    const long n = rows * width;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        double g = (double)sigmoidf(load_f32(z + (i / width) * ldz + i % width));
        sum += g;
        int bin = (int)(g * PROBE_GATE_BINS);
        hist[bin < 0 ? 0 : bin >= PROBE_GATE_BINS ? PROBE_GATE_BINS - 1 : bin] += 1.0;
        low += g < PROBE_GATE_LOW;
        high += g > PROBE_GATE_HIGH;
    }
    double* r = rec + (long)blockIdx.x * (PROBE_GATE_BINS + 3);
    double t = probe_block_sum(sum, buf);
    if (threadIdx.x == 0) r[0] = t;
    for (int i = 0; i < PROBE_GATE_BINS; ++i) {
        t = probe_block_sum(hist[i], buf);
        if (threadIdx.x == 0) r[1 + i] = t;
    }
    t = probe_block_sum(low, buf);
    if (threadIdx.x == 0) r[PROBE_GATE_BINS + 1] = t;
    t = probe_block_sum(high, buf);
    if (threadIdx.x == 0) r[PROBE_GATE_BINS + 2] = t;
}

extern "C" __global__ void probe_key0(const float* q, const float* k, const float* lse, double* rec, int T, int H,
                                      int KV, int HD, float scale) {
    probe_key0_impl(q, k, lse, rec, T, H, KV, HD, scale);
}
extern "C" __global__ void probe_key0_bf16(const bf16* q, const bf16* k, const float* lse, double* rec, int T, int H,
                                           int KV, int HD, float scale) {
    probe_key0_impl(q, k, lse, rec, T, H, KV, HD, scale);
}
extern "C" __global__ void probe_small(const float* y, double* rec, long n) { probe_small_impl(y, rec, n); }
extern "C" __global__ void probe_small_bf16(const bf16* y, double* rec, long n) { probe_small_impl(y, rec, n); }
extern "C" __global__ void probe_gate(const float* z, double* rec, long rows, int width, long ldz) {
    probe_gate_impl(z, rec, rows, width, ldz);
}
extern "C" __global__ void probe_gate_bf16(const bf16* z, double* rec, long rows, int width, long ldz) {
    probe_gate_impl(z, rec, rows, width, ldz);
}

// max |x| over n values (the layer's output, f32): block j writes rec[j]. A NaN is kept (the
// host's fold takes max(m, NaN) = m; the device reports NaN instead of hiding it).
extern "C" __global__ void probe_max_abs(const float* x, double* rec, long n) {
    __shared__ double buf[PROBE_THREADS];
    double m = 0.0;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        double v = fabs((double)x[i]);
        m = (v > m || v != v) ? v : m;
    }
    buf[threadIdx.x] = m;
    __syncthreads();
    if (threadIdx.x == 0) {
        for (unsigned i = 1; i < blockDim.x; ++i) m = (buf[i] > m || buf[i] != buf[i]) ? buf[i] : m;
        rec[blockIdx.x] = m;
    }
}

#undef PROBE_THREADS
#undef PROBE_GATE_BINS
#undef PROBE_GATE_LOW
#undef PROBE_GATE_HIGH
#undef PROBE_SMALL_A
#undef PROBE_SMALL_B
