// A CPU emulator of the CUDA execution model, enough to run our kernels without a GPU:
// the kernel sources compile unchanged with g++ against this header. Each block's threads are
// cooperative fibers (ucontext) on one OS thread, switched at __syncthreads and warp shuffles,
// blocks run one after another. That makes every launch deterministic and lets CI check the
// kernels' indexing, reductions and barriers against the CPU ops; speed, memory coalescing and
// races between warps that real hardware may expose are out of its reach.
#pragma once
#include <math.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>
#include <setjmp.h>
#include <ucontext.h>

#define GATED_CUDA_EMU 1

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

namespace emu {
// A fiber enters its stack once (a stack switch on x86-64, setcontext elsewhere); afterwards
// switches are _setjmp/_longjmp, which unlike swapcontext make no signal-mask system call.
struct Fiber {
    ucontext_t ctx;
    jmp_buf jb;
    dim3 tid;
    bool started = false, done = false;
    char* stack = nullptr;
};
struct Barrier {
    unsigned long gen = 0;
    int arrived = 0;
    int size = 0;
};
struct Warp {
    Barrier bar;
    uint64_t slot[32];
};
constexpr size_t STACK = 256 * 1024;
inline std::vector<Fiber> fibers;
inline std::vector<Warp> warps;
inline Barrier block_bar;
inline int cur = -1, finished = 0;
inline unsigned long progress = 0;  // barrier arrivals, releases and exits: deadlock detection
inline jmp_buf sched;
inline dim3 bid, bdim, gdim;
inline std::vector<unsigned char> dyn;  // dynamic shared memory of the current block
inline void (*body)() = nullptr;
inline std::string error;

inline int linear_tid() {
    const dim3& t = fibers[cur].tid;
    return (int)(t.x + t.y * bdim.x + t.z * bdim.x * bdim.y);
}
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
#if defined(__x86_64__)
            // enter the fiber's stack directly (setcontext would cost a system call per thread)
            char* top = (char*)((uintptr_t)(fibers[i].stack + STACK) & ~(uintptr_t)15);
            asm volatile("movq %0, %%rsp\n\tcallq *%1" ::"r"(top), "r"(&fiber_main) : "memory");
            __builtin_unreachable();
#else
            setcontext(&fibers[i].ctx);
#endif
        }
        _longjmp(fibers[i].jb, 1);
    }
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

// Runs `k` over the grid. Returns false with `error` set on a bad configuration or a deadlock
// (a barrier some threads never reach: undefined behaviour on a GPU, an error here).
inline bool launch(void (*k)(), dim3 g, dim3 b, unsigned smem) {
    int n = (int)(b.x * b.y * b.z);
    if (n <= 0 || n > 1024 || g.x == 0 || g.y == 0 || g.z == 0) {
        error = "bad launch configuration";
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
                        f.stack = (char*)std::malloc(STACK);
#if !defined(__x86_64__)
                        getcontext(&f.ctx);  // once: makecontext below re-arms it per block
#endif
                    }
#if !defined(__x86_64__)
                    f.ctx.uc_stack.ss_sp = f.stack;
                    f.ctx.uc_stack.ss_size = STACK;
                    f.ctx.uc_link = nullptr;
                    makecontext(&f.ctx, fiber_main, 0);
#endif
                    f.tid = dim3{(unsigned)i % b.x, (unsigned)i / b.x % b.y, (unsigned)i / (b.x * b.y)};
                    f.started = f.done = false;
                }
                while (finished < n) {
                    unsigned long before = progress;
                    for (cur = 0; cur < n; ++cur)
                        if (!fibers[cur].done) resume(cur);
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
#define DYN_SHARED(T, name) T* name = reinterpret_cast<T*>(emu::dyn.data())

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
