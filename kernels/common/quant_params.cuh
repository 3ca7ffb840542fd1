// The arguments of the FP8 quantization kernels in kernels/quant.cu, one struct per kernel, each passed as a single
// __grid_constant__ parameter: `ActQuantParams` (act_quant_group128) and `WeightQuantParams`
// (weight_quant_block128). Rust twins in src/quant.rs, #[repr(C)].
// Both sides pin the layout: the static_asserts here and the kernel_params! offsets there state the same numbers, and
// a Rust test reads these lines to check that they do.
#pragma once

#include <cuda_bf16.h>
#include <stddef.h>
#include <stdint.h>

namespace r1k_quant_params {

struct ActQuantParams {
    const __nv_bfloat16* x;  // [m, k] row-major
    uint8_t* q;              // [m, k] E4M3 codes
    float* scales;           // [ceil(k/128), m_pad] (MN-major)
    int m;
    int k;
    int m_pad;  // m rounded up to 4; the padding rows' scales are written as 0
    int ue8m0;  // 1: scales are powers of two
    int vec;    // 1: k % 8 == 0 and x, q are 16- and 8-byte aligned
};

static_assert(sizeof(ActQuantParams) == 48, "ActQuantParams layout: size");
static_assert(offsetof(ActQuantParams, x) == 0, "ActQuantParams layout: x");
static_assert(offsetof(ActQuantParams, q) == 8, "ActQuantParams layout: q");
static_assert(offsetof(ActQuantParams, scales) == 16, "ActQuantParams layout: scales");
static_assert(offsetof(ActQuantParams, m) == 24, "ActQuantParams layout: m");
static_assert(offsetof(ActQuantParams, k) == 28, "ActQuantParams layout: k");
static_assert(offsetof(ActQuantParams, m_pad) == 32, "ActQuantParams layout: m_pad");
static_assert(offsetof(ActQuantParams, ue8m0) == 36, "ActQuantParams layout: ue8m0");
static_assert(offsetof(ActQuantParams, vec) == 40, "ActQuantParams layout: vec");

struct WeightQuantParams {
    const __nv_bfloat16* w;  // [n, k] row-major
    uint8_t* q;              // [n, k] E4M3 codes
    float* scales;           // [ceil(n/128), ceil(k/128)] row-major
    int n;
    int k;
    int ue8m0;  // 1: scales are powers of two
    int vec;    // 1: k % 8 == 0 and w, q are 16- and 8-byte aligned
};

static_assert(sizeof(WeightQuantParams) == 40, "WeightQuantParams layout: size");
static_assert(offsetof(WeightQuantParams, w) == 0, "WeightQuantParams layout: w");
static_assert(offsetof(WeightQuantParams, q) == 8, "WeightQuantParams layout: q");
static_assert(offsetof(WeightQuantParams, scales) == 16, "WeightQuantParams layout: scales");
static_assert(offsetof(WeightQuantParams, n) == 24, "WeightQuantParams layout: n");
static_assert(offsetof(WeightQuantParams, k) == 28, "WeightQuantParams layout: k");
static_assert(offsetof(WeightQuantParams, ue8m0) == 32, "WeightQuantParams layout: ue8m0");
static_assert(offsetof(WeightQuantParams, vec) == 36, "WeightQuantParams layout: vec");

}  // namespace r1k_quant_params
