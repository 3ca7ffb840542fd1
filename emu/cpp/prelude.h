// Force-included (g++ -include) before every kernels/*.cu when it is compiled for the emulator: the CUDA built-ins
// of device code, defined for host C++ on top of the engine (runtime.h). NVIDIA's own headers provide the types and
// the bf16/fp8 conversions (their host code paths). Keywords that must survive preprocessing so that the lifting
// step (build/lift.rs) can find them expand to marker tokens: __r1k_global__, __r1k_shared__.
#pragma once
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <stdint.h>
#include <vector_types.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#include "asm_ops.h"
#include "runtime.h"

#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __forceinline__
#undef __noinline__
#undef __constant__
#undef __grid_constant__
#undef __launch_bounds__
#define __global__ __r1k_global__
#define __device__
#define __host__
#define __shared__ __r1k_shared__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __grid_constant__
#ifndef __align__
#define __align__(n) __attribute__((aligned(n)))
#endif

namespace r1k_emu_prelude {
inline uint3 to_uint3(r1k_emu::Dim3 d) { return uint3{d.x, d.y, d.z}; }
inline dim3 to_dim3(r1k_emu::Dim3 d) { return dim3(d.x, d.y, d.z); }
}  // namespace r1k_emu_prelude

#define threadIdx (::r1k_emu_prelude::to_uint3(::r1k_emu::thread_idx()))
#define blockIdx (::r1k_emu_prelude::to_uint3(::r1k_emu::block_idx()))
#define blockDim (::r1k_emu_prelude::to_dim3(::r1k_emu::block_dim()))
#define gridDim (::r1k_emu_prelude::to_dim3(::r1k_emu::grid_dim()))
constexpr int warpSize = 32;

// ---- barriers and warp collectives (engine: runtime.cpp) ----
namespace r1k_emu {
void syncthreads();                 // bar.sync 0 (all non-exited threads of the CTA)
void syncwarp(uint32_t mask);       // bar.warp.sync
// shfl.sync: `mode` 0 idx, 1 up, 2 down, 3 bfly; `c` the clamp/segment operand as in the PTX ISA (CUDA's width w
// maps to c = ((32 - w) << 8) | 0x1f for idx/bfly/down and (32 - w) << 8 for up).
uint32_t shfl_sync(uint32_t mask, uint32_t value, int mode, uint32_t b, uint32_t c);
uint32_t ballot_sync(uint32_t mask, bool pred);  // vote.sync.ballot.b32
[[noreturn]] void trap();
}  // namespace r1k_emu

inline void __syncthreads() { r1k_emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { r1k_emu::syncwarp(mask); }
inline unsigned __ballot_sync(unsigned mask, int pred) { return r1k_emu::ballot_sync(mask, pred != 0); }
[[noreturn]] inline void __trap() { r1k_emu::trap(); }

namespace r1k_emu_prelude {
template <class T>
inline T shfl(unsigned mask, T v, int mode, unsigned b, int width) {
    static_assert(sizeof(T) == 4 || sizeof(T) == 8, "shuffles move 32-bit words");
    if (width <= 0 || width > 32 || (width & (width - 1)) != 0) r1k_emu::fail("__shfl*_sync: width %d is not a power of two in [1, 32]", width);
    const uint32_t seg = static_cast<uint32_t>(32 - width) << 8;
    const uint32_t c = mode == 1 ? seg : (seg | 0x1fu);
    uint32_t words[2] = {0, 0};
    std::memcpy(words, &v, sizeof(T));
    for (unsigned i = 0; i < sizeof(T) / 4; ++i) words[i] = r1k_emu::shfl_sync(mask, words[i], mode, b, c);
    T out;
    std::memcpy(&out, words, sizeof(T));
    return out;
}
}  // namespace r1k_emu_prelude

template <class T>
inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
    return r1k_emu_prelude::shfl(mask, v, 0, static_cast<unsigned>(src_lane), width);
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    return r1k_emu_prelude::shfl(mask, v, 1, delta, width);
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    return r1k_emu_prelude::shfl(mask, v, 2, delta, width);
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    return r1k_emu_prelude::shfl(mask, v, 3, static_cast<unsigned>(lane_mask), width);
}

// ---- address spaces ----
inline size_t __cvta_generic_to_shared(const void* p) { return r1k_emu::cvta_to_shared(p); }
template <class T>
inline T __ldg(const T* p) { return *p; }

// ---- integer and bit intrinsics ----
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline unsigned __brev(unsigned x) {
    unsigned r = 0;
    for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
    return r;
}
inline float __int_as_float(int x) { float f; std::memcpy(&f, &x, 4); return f; }
inline int __float_as_int(float f) { int x; std::memcpy(&x, &f, 4); return x; }
inline float __uint_as_float(unsigned x) { float f; std::memcpy(&f, &x, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned x; std::memcpy(&x, &f, 4); return x; }
inline int __mul24(int a, int b) { return static_cast<int>(static_cast<int64_t>(a << 8 >> 8) * (b << 8 >> 8)); }
inline unsigned __umulhi(unsigned a, unsigned b) { return static_cast<unsigned>((static_cast<uint64_t>(a) * b) >> 32); }

// CUDA's overloaded min/max of device code.
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline unsigned min(int a, unsigned b) { return min(static_cast<unsigned>(a), b); }
inline unsigned min(unsigned a, int b) { return min(a, static_cast<unsigned>(b)); }
inline unsigned max(int a, unsigned b) { return max(static_cast<unsigned>(a), b); }
inline unsigned max(unsigned a, int b) { return max(a, static_cast<unsigned>(b)); }

// ---- float intrinsics: the IEEE-rounded ones are exact in host float arithmetic (compiled with
// -ffp-contract=off); the .approx ones (__expf, __fdividef, ...) are computed correctly rounded, which is within
// their documented error bounds but not bit-identical to the GPU's.
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fsqrt_rn(float a) { return sqrtf(a); }
inline float __expf(float a) { return expf(a); }
inline float __exp2f(float a) { return exp2f(a); }
inline float __logf(float a) { return logf(a); }
inline float __log2f(float a) { return log2f(a); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __saturatef(float a) { return a != a ? 0.0f : fminf(fmaxf(a, 0.0f), 1.0f); }
inline float rsqrtf(float a) { return 1.0f / sqrtf(a); }
inline float __frsqrt_rn(float a) { return 1.0f / sqrtf(a); }
inline void __sincosf(float a, float* s, float* c) { sincosf(a, s, c); }
// CUDA's sincospif (sin and cos of pi*x; the CUDA Math API documents 1 ulp at most, not the exact bits): computed
// here in double from x reduced to [-1, 1] (exact), with the values the API's definition fixes exactly at whole
// and half turns. A GPU may differ in the last bit, as with sincosf.
inline void sincospif(float x, float* s, float* c) {
    if (!std::isfinite(x)) {
        *s = *c = std::numeric_limits<float>::quiet_NaN();
        return;
    }
    const double r = static_cast<double>(x) - 2.0 * std::rint(static_cast<double>(x) * 0.5);
    if (r == std::rint(r)) {  // 0, ±1
        *s = std::copysign(0.0f, r == 0.0 ? x : -x);
        *c = r == 0.0 ? 1.0f : -1.0f;
        return;
    }
    if (std::fabs(r) == 0.5) {
        *s = r > 0 ? 1.0f : -1.0f;
        *c = 0.0f;
        return;
    }
    *s = static_cast<float>(std::sin(3.14159265358979323846 * r));
    *c = static_cast<float>(std::cos(3.14159265358979323846 * r));
}
using std::isinf;
using std::isnan;
using std::isfinite;
