// A CPU emulator of the CUDA execution model, enough to run our kernels without a GPU:
// the kernel sources compile unchanged with g++ against this header. Each block's threads are
// cooperative fibers on one OS thread, switched at __syncthreads and warp shuffles,
// blocks run one after another. That makes every launch deterministic and lets CI check the
// kernels' indexing, reductions and barriers against the CPU ops; speed, memory coalescing and
// races between warps that real hardware may expose are out of its reach. cp.async copies land
// only at the wait that retires them (the latest moment the PTX ISA allows), so a missing or
// short wait reads stale shared memory here.
#pragma once
#include <math.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>
#include <setjmp.h>
#include <ucontext.h>
#include <sys/mman.h>

#define GATED_CUDA_EMU 1

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

namespace emu {
// On x86-64 a switch is `emu_switch` below: it pushes the callee-saved registers, swaps stack
// pointers and pops them (a fiber starts on a stack laid out as if it had switched out at the
// entry of fiber_main). Elsewhere a fiber enters its stack with setcontext and then switches
// with _setjmp/_longjmp, which unlike swapcontext make no signal-mask system call.
#if defined(__x86_64__)
#define EMU_SWITCH 1
extern "C" __attribute__((visibility("hidden"))) void emu_switch(void** save_sp, void* load_sp);
asm(R"(
    .text
    .p2align 4
    .globl emu_switch
    .hidden emu_switch
    .type emu_switch, @function
emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_switch, .-emu_switch
)");
#endif
// One cp.async of a thread: the bytes it will write (the source read at issue, zero-filled past
// src_bytes) and where.
struct AsyncCopy {
    void* dst;
    int size;
    unsigned char data[16];
};
struct Fiber {
#if defined(EMU_SWITCH)
    void* sp = nullptr;  // the saved stack pointer of a fiber switched out
#else
    ucontext_t ctx;
    jmp_buf jb;
#endif
    dim3 tid;
    bool started = false, done = false;
    char* stack = nullptr;
    // cp.async: copies issued since the last commit, and the committed groups, oldest first;
    // none of them has touched shared memory yet (see cp_async below)
    std::vector<AsyncCopy> cp_open;
    std::deque<std::vector<AsyncCopy>> cp_groups;
};
struct Barrier {
    unsigned long gen = 0;
    int arrived = 0;
    int size = 0;
};
struct Warp {
    Barrier bar;
    uint64_t slot[32];
    // Tensor-core collectives (mma, ldmatrix): each lane's fragment registers or row address, and
    // which collective it called, so lanes that meet at the barrier from different ones are an
    // error instead of silently exchanging the wrong data.
    uint32_t frag[32][6];
    const uint16_t* row[32];
    int op[32];
    // mma's A and B decoded from all lanes' fragments, once per call: by the first lane past
    // the barrier, for the barrier generation in `decoded`
    float A[16][16], B[16][8];
    unsigned long decoded = ~0ul;
};
constexpr size_t STACK = 256 * 1024;
inline std::vector<Fiber> fibers;
inline std::vector<Warp> warps;
inline Barrier block_bar;
inline int cur = -1, finished = 0;
inline unsigned long progress = 0;  // barrier arrivals, releases and exits: deadlock detection
#if defined(EMU_SWITCH)
inline void* sched_sp;
#else
inline jmp_buf sched;
#endif
inline dim3 bid, bdim, gdim;
inline std::vector<unsigned char> dyn;  // dynamic shared memory of the current block
// sm_90's cudaDevAttrMaxSharedMemoryPerBlockOptin (227 KB); past 48 KB a kernel needs the opt-in
// the GPU device sets at launch (backend/cuda/device.rs)
constexpr unsigned MAX_DYN_SHARED = 232448;
inline void (*body)() = nullptr;
inline std::string error;
inline bool failed = false;  // set by `fail`: the launch stops and reports `error`

// The fibers' stacks, one region of 1024 × STACK reserved once and backed lazily, in huge pages
// where the kernel offers them: each switch touches another fiber's stack top, and with 4 KiB
// pages every one of them would need its own TLB entry.
inline char* stack_of(int i) {
    static char* pool = [] {
        size_t bytes = 1024 * STACK + (2u << 20);
        char* p = (char*)mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED) {
            std::perror("emu: mmap of the fiber stacks");
            std::abort();
        }
        p = (char*)(((uintptr_t)p + (2u << 20) - 1) & ~(uintptr_t)((2u << 20) - 1));
#ifdef MADV_HUGEPAGE
        madvise(p, 1024 * STACK, MADV_HUGEPAGE);
#endif
        return p;
    }();
    return pool + (size_t)i * STACK;
}
inline int linear_tid() {
    const dim3& t = fibers[cur].tid;
    return (int)(t.x + t.y * bdim.x + t.z * bdim.x * bdim.y);
}
#if defined(EMU_SWITCH)
inline void yield() { emu_switch(&fibers[cur].sp, sched_sp); }
[[noreturn]] inline void fiber_main() {
    body();
    fibers[cur].done = true;
    ++finished;
    ++progress;
    yield();  // never resumed: the launch loop skips finished fibers
    __builtin_unreachable();
}
// Fiber i's stack set up to start at fiber_main on its first switch in: six zero registers for
// emu_switch to pop, then fiber_main as its return address and an empty slot, as if called
// (rsp ≡ 8 mod 16 at the entry). The top is staggered by 576 bytes per fiber (mod 4 KiB) so
// that the fibers' hot frames do not all fall into the same cache sets.
inline void prepare(int i) {
    uintptr_t top = (uintptr_t)(fibers[i].stack + STACK) - (uintptr_t)(i * 9 % 64) * 64;
    void** p = (void**)(top & ~(uintptr_t)15);
    *--p = nullptr;
    *--p = (void*)&fiber_main;
    for (int r = 0; r < 6; ++r) *--p = nullptr;
    fibers[i].sp = p;
}
inline void resume(int i) { emu_switch(&sched_sp, fibers[i].sp); }
#else
inline void yield() {
    if (!_setjmp(fibers[cur].jb)) _longjmp(sched, 1);
}
inline void fiber_main() {
    body();
    fibers[cur].done = true;
    ++finished;
    ++progress;
    _longjmp(sched, 1);  // never returns: the context has no successor
}
inline void resume(int i) {
    if (!_setjmp(sched)) {
        if (!fibers[i].started) {
            fibers[i].started = true;
            setcontext(&fibers[i].ctx);
        }
        _longjmp(fibers[i].jb, 1);
    }
}
#endif
// A kernel error detected inside a thread (misuse of a warp collective): record it, then park
// the fiber; the launch loop sees `failed` and abandons the block (on a GPU: undefined behaviour).
[[noreturn]] inline void fail(const std::string& msg) {
    if (!failed) error = msg;
    failed = true;
    for (;;) yield();
}
inline void wait(Barrier& b) {
    unsigned long g = b.gen;
    ++progress;
    if (++b.arrived == b.size) {
        b.arrived = 0;
        ++b.gen;
    } else {
        while (b.gen == g) yield();
    }
}
template <class T>
T shfl(T v, int src_lane) {
    static_assert(sizeof(T) <= 8, "shuffle of a type wider than 8 bytes");
    int t = linear_tid();
    Warp& w = warps[t / 32];
    int lane = t % 32;
    std::memcpy(&w.slot[lane], &v, sizeof(T));
    wait(w.bar);
    T r = v;
    if (src_lane >= 0 && src_lane < w.bar.size) std::memcpy(&r, &w.slot[src_lane], sizeof(T));
    wait(w.bar);  // nobody overwrites a slot before every lane has read
    return r;
}

// The block's dynamic shared memory, of which the kernel uses `need` bytes: more than the launch
// gave is an error here (on a GPU it reads and writes past the allocation, or faults).
inline unsigned char* dyn_shared(size_t need) {
    if (need > dyn.size())
        fail("the kernel uses " + std::to_string(need) + " bytes of dynamic shared memory, the launch gave " +
             std::to_string(dyn.size()));
    return dyn.data();
}

// Runs `k` over the grid. Returns false with `error` set on a bad configuration or a deadlock
// (a barrier some threads never reach: undefined behaviour on a GPU, an error here).
inline bool launch(void (*k)(), dim3 g, dim3 b, unsigned smem) {
    int n = (int)(b.x * b.y * b.z);
    if (n <= 0 || n > 1024 || g.x == 0 || g.y == 0 || g.z == 0) {
        error = "bad launch configuration";
        return false;
    }
    if (smem > MAX_DYN_SHARED) {
        error = std::to_string(smem) + " bytes of dynamic shared memory: past the " + std::to_string(MAX_DYN_SHARED) +
                " a block of sm_90 may opt in to";
        return false;
    }
    gdim = g;
    bdim = b;
    body = k;
    if ((int)fibers.size() < n) fibers.resize(n);
    warps.assign((n + 31) / 32, Warp{});
    for (int w = 0; w < (int)warps.size(); ++w) warps[w].bar.size = std::min(32, n - 32 * w);
    for (unsigned bz = 0; bz < g.z; ++bz)
        for (unsigned by = 0; by < g.y; ++by)
            for (unsigned bx = 0; bx < g.x; ++bx) {
                bid = dim3{bx, by, bz};
                dyn.assign(smem, 0xff);  // uninitialised shared memory reads as NaN
                block_bar = Barrier{0, 0, n};
                finished = 0;
                for (int i = 0; i < n; ++i) {
                    Fiber& f = fibers[i];
                    if (!f.stack) {
                        f.stack = stack_of(i);
#if !defined(EMU_SWITCH)
                        getcontext(&f.ctx);  // once: makecontext below re-arms it per block
#endif
                    }
#if defined(EMU_SWITCH)
                    prepare(i);
#else
                    f.ctx.uc_stack.ss_sp = f.stack;
                    f.ctx.uc_stack.ss_size = STACK;
                    f.ctx.uc_link = nullptr;
                    makecontext(&f.ctx, fiber_main, 0);
#endif
                    f.tid = dim3{(unsigned)i % b.x, (unsigned)i / b.x % b.y, (unsigned)i / (b.x * b.y)};
                    f.started = f.done = false;
                    f.cp_open.clear();  // copies a thread of the last block never waited for
                    f.cp_groups.clear();
                }
                failed = false;
                while (finished < n) {
                    unsigned long before = progress;
                    for (cur = 0; cur < n; ++cur) {
#if defined(EMU_SWITCH)
                        // the next fibers' saved registers and frames: a switch otherwise
                        // waits for its stack top to come in from memory
                        if (cur + 2 < n)
                            for (int l = 0; l < 4; ++l) __builtin_prefetch((char*)fibers[cur + 2].sp + 64 * l);
#endif
                        if (!fibers[cur].done) resume(cur);
                    }
                    if (failed) {
                        cur = -1;
                        return false;
                    }
                    if (progress == before && finished < n) {
                        error = "deadlock: threads wait at a barrier that others never reach (block " +
                                std::to_string(bx) + "," + std::to_string(by) + "," + std::to_string(bz) + ")";
                        cur = -1;
                        return false;
                    }
                }
                if (block_bar.arrived != 0) {
                    error = "__syncthreads reached by only some threads of a block";
                    return false;
                }
            }
    cur = -1;
    return true;
}

// ---- Tensor-core warp collectives, with the PTX ISA's per-lane semantics. Like `shfl`, every
// lane deposits its operands in the warp's scratch, the warp meets at a barrier, each lane
// computes only its own results from everybody's operands, and a second barrier keeps a fast
// lane's next deposit from overwriting what a slow one still reads. A warp with fewer than 32
// threads is an error (the instructions are .aligned: all 32 lanes must execute them); lanes that
// never arrive are reported as a deadlock by `launch`.
enum { OP_MMA = 1, OP_LDMATRIX, OP_LDMATRIX_TRANS };
inline Warp& collective_enter(int op, const char* what, int& lane) {
    int t = linear_tid();
    Warp& w = warps[t / 32];
    lane = t % 32;
    if (w.bar.size != 32)
        fail(std::string(what) + " is a warp collective: all 32 lanes must execute it, this warp has " +
             std::to_string(w.bar.size) + " threads");
    w.op[lane] = op;
    return w;
}
inline void collective_meet(Warp& w, int op, const char* what) {
    wait(w.bar);
    for (int i = 0; i < 32; ++i)
        if (w.op[i] != op) fail(std::string(what) + ": the lanes of a warp are in different warp collectives");
}

// Fragment layouts of mma.m16n8k16 with .bf16 A/B and .f32 C/D, from the PTX ISA ("Matrix
// Fragments for mma.m16n8k16 with floating point type"): groupID = lane >> 2, threadID_in_group
// = lane & 3; element i of a fragment lives in register i / 2, low half first.
inline int frag_a_row(int lane, int i) { return (lane >> 2) + 8 * ((i >> 1) & 1); }
inline int frag_a_col(int lane, int i) { return (lane & 3) * 2 + (i & 1) + 8 * (i >> 2); }
inline int frag_b_k(int lane, int i) { return (lane & 3) * 2 + (i & 1) + 8 * (i >> 1); }
inline int frag_b_n(int lane, int) { return lane >> 2; }
inline int frag_c_row(int lane, int i) { return (lane >> 2) + 8 * (i >> 1); }
inline int frag_c_col(int lane, int i) { return (lane & 3) * 2 + (i & 1); }
// Element i of a fragment held in bf16x2 registers `regs`, as f32 (exact).
inline float frag_elem(const uint32_t* regs, int i) {
    uint32_t u = (regs[i >> 1] >> (16 * (i & 1)) & 0xffffu) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// d = A·B + d for the warp's 16×16 A (row) and 16×8 B (col) fragments. Each bf16 product is
// exact in f32; the sum starts from c and adds the products in k order 0..15, rounding to f32
// after each (the hardware's internal order and rounding are unspecified: tests compare fp32
// sums with tolerances, and integer-valued inputs bit-exactly).
inline void mma_m16n8k16_bf16(float d[4], const uint32_t a[4], const uint32_t b[2]) {
    int lane;
    Warp& w = collective_enter(OP_MMA, "mma.m16n8k16", lane);
    for (int r = 0; r < 4; ++r) w.frag[lane][r] = a[r];
    w.frag[lane][4] = b[0];
    w.frag[lane][5] = b[1];
    collective_meet(w, OP_MMA, "mma.m16n8k16");
    if (w.decoded != w.bar.gen) {
        for (int l = 0; l < 32; ++l) {
            for (int i = 0; i < 8; ++i) w.A[frag_a_row(l, i)][frag_a_col(l, i)] = frag_elem(w.frag[l], i);
            for (int i = 0; i < 4; ++i) w.B[frag_b_k(l, i)][frag_b_n(l, i)] = frag_elem(w.frag[l] + 4, i);
        }
        w.decoded = w.bar.gen;
    }
    float out[4];
    for (int i = 0; i < 4; ++i) {
        float s = d[i];
        for (int k = 0; k < 16; ++k) s += w.A[frag_c_row(lane, i)][k] * w.B[k][frag_c_col(lane, i)];
        out[i] = s;
    }
    wait(w.bar);
    for (int i = 0; i < 4; ++i) d[i] = out[i];
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lanes 8m..8m+7 give the addresses of rows
// 0..7 of matrix m (16-byte aligned: 8 b16 each); lane l receives in register m the two b16 at
// row l>>2, columns 2·(l&3) and +1 of matrix m (low half first), or with .trans those of the
// transposed matrix. The emulator cannot tell shared from global addresses: it reads either.
inline void ldmatrix_m8n8_x4(uint32_t r[4], const uint16_t* row, bool trans) {
    const char* what = trans ? "ldmatrix.x4.trans" : "ldmatrix.x4";
    const int op = trans ? OP_LDMATRIX_TRANS : OP_LDMATRIX;
    int lane;
    Warp& w = collective_enter(op, what, lane);
    if ((uintptr_t)row % 16 != 0) fail(std::string(what) + ": a row address is not 16-byte aligned");
    w.row[lane] = row;
    collective_meet(w, op, what);
    const int g = lane >> 2, c = 2 * (lane & 3);
    uint32_t out[4];
    for (int m = 0; m < 4; ++m) {
        const uint16_t* const* rows = &w.row[8 * m];
        uint32_t lo = trans ? rows[c][g] : rows[g][c], hi = trans ? rows[c + 1][g] : rows[g][c + 1];
        out[m] = lo | hi << 16;
    }
    wait(w.bar);
    for (int m = 0; m < 4; ++m) r[m] = out[m];
}

// ---- cp.async (per thread, not a collective). The PTX ISA lets a copy land at any time between
// its issue and the issuing thread's cp.async.wait_group / wait_all that retires its group; the
// emulator takes the latest: a copy writes shared memory only when that wait executes, so a
// kernel that reads a destination without the wait (or, from another thread, without a barrier
// after it) reads the old contents, as a GPU may. The source is read at issue time (a kernel
// that wrote it between issue and wait would be racing on a GPU; ours never do). src_bytes <
// size zero-fills the rest of the destination; src_bytes 0 reads nothing.
inline void cp_async(void* dst, const void* src, int size, int src_bytes, const char* what) {
    if ((uintptr_t)dst % size != 0 || (uintptr_t)src % size != 0)
        fail(std::string(what) + ": an address is not aligned to the copy size " + std::to_string(size));
    if (src_bytes < 0 || src_bytes > size)
        fail(std::string(what) + ": src_bytes " + std::to_string(src_bytes) + " is outside 0.." + std::to_string(size));
    AsyncCopy c{dst, size, {}};
    if (src_bytes > 0) std::memcpy(c.data, src, src_bytes);
    fibers[cur].cp_open.push_back(c);
}
inline void cp_async_commit() {
    Fiber& f = fibers[cur];
    f.cp_groups.push_back(std::move(f.cp_open));  // an empty group when nothing was issued
    f.cp_open.clear();
}
// Retires all but the newest n committed groups, oldest first; copies not yet committed stay.
inline void cp_async_wait(int n) {
    Fiber& f = fibers[cur];
    while ((int)f.cp_groups.size() > n) {
        for (const AsyncCopy& c : f.cp_groups.front()) std::memcpy(c.dst, c.data, c.size);
        f.cp_groups.pop_front();
    }
}

// The kernel's arguments arrive as cuLaunchKernel passes them: an array of pointers to values.
inline void** args;
template <class... A, size_t... I>
void call_with(void (*k)(A...), std::index_sequence<I...>) {
    k(*reinterpret_cast<std::remove_reference_t<A>*>(args[I])...);
}
template <class... A>
void call(void (*k)(A...)) {
    call_with(k, std::index_sequence_for<A...>{});
}
template <auto K>
void trampoline() {
    call(K);
}
}  // namespace emu

#define threadIdx (emu::fibers[emu::cur].tid)
#define blockIdx (emu::bid)
#define blockDim (emu::bdim)
#define gridDim (emu::gdim)
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
#define DYN_SHARED(T, name, count) T* name = reinterpret_cast<T*>(emu::dyn_shared(sizeof(T) * (size_t)(count)))

using std::max;
using std::min;

inline void __syncthreads() { emu::wait(emu::block_bar); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::wait(emu::warps[emu::linear_tid() / 32].bar); }
template <class T>
T __shfl_sync(unsigned, T v, int src, int width = 32) {
    int lane = emu::linear_tid() % 32;
    return emu::shfl(v, lane - lane % width + src % width);
}
template <class T>
T __shfl_xor_sync(unsigned, T v, int mask, int width = 32) {
    int lane = emu::linear_tid() % 32;
    int src = lane ^ mask;
    return emu::shfl(v, src / width == lane / width ? src : lane);
}
template <class T>
T __shfl_down_sync(unsigned, T v, unsigned d, int width = 32) {
    int lane = emu::linear_tid() % 32;
    int src = lane + (int)d;
    return emu::shfl(v, src / width == lane / width ? src : lane);
}
template <class T>
T atomicAdd(T* a, T v) {
    T old = *a;
    *a = old + v;
    return old;
}
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}
inline int __float_as_int(float f) {
    int i;
    std::memcpy(&i, &f, 4);
    return i;
}
inline unsigned __float_as_uint(float f) {
    unsigned i;
    std::memcpy(&i, &f, 4);
    return i;
}
inline float __uint_as_float(unsigned i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}
template <class T>
T __ldg(const T* p) {
    return *p;
}

// The tensor-core primitives of common.cuh (which holds their inline-PTX versions for the GPU).
inline void mma_bf16_16816(float d[4], const unsigned a[4], const unsigned b[2]) {
    emu::mma_m16n8k16_bf16(d, a, b);
}
inline void ldmatrix_x4(unsigned r[4], const unsigned short* row) { emu::ldmatrix_m8n8_x4(r, row, false); }
inline void ldmatrix_x4_trans(unsigned r[4], const unsigned short* row) { emu::ldmatrix_m8n8_x4(r, row, true); }
inline void cp_async16(void* dst, const void* src, int src_bytes) {
    emu::cp_async(dst, src, 16, src_bytes, "cp.async.cg (16 bytes)");
}
inline void cp_async4(void* dst, const void* src, int src_bytes) {
    emu::cp_async(dst, src, 4, src_bytes, "cp.async.ca (4 bytes)");
}
inline void cp_async_commit() { emu::cp_async_commit(); }
template <int N>
void cp_async_wait() {
    static_assert(N >= 0, "cp.async.wait_group of a negative count");
    emu::cp_async_wait(N);
}
inline void cp_async_wait_all() {  // cp.async.wait_all: commit_group, then wait_group 0
    emu::cp_async_commit();
    emu::cp_async_wait(0);
}
inline float __fmul_rn(float a, float b) { return a * b; }
