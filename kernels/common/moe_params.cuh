// The arguments of the MoE grouped FP8 GEMM kernels (moe_grouped_gemm_fp8, the portable SIMT kernel;
// moe_grouped_gemm_fp8_sm90, wgmma; moe_grouped_gemm_fp8_sm90_tma, after its three tensor maps) as one struct,
// passed as a single __grid_constant__ parameter. Rust twin: `GroupedGemmParams` in src/moe/params.rs, #[repr(C)].
// Both sides pin the layout: the static_asserts here and const assertions there state the same offsets, and a Rust
// test reads these lines to check that they do.
#pragma once

#include <cuda_bf16.h>
#include <stddef.h>
#include <stdint.h>

namespace r1k_moe_params {

struct GroupedGemmParams {
    // The TMA kernel reads a, a_scales and w through its tensor maps (the pointers are still the same tensors).
    const uint8_t* a;          // [rows, K] E4M3 codes
    const float* a_scales;     // [K/128, rows_pad], MN-major
    const uint8_t* w;          // [E, N, K] E4M3 codes
    const float* w_scales;     // [E, N/128, K/128]
    const long long* offsets;  // [E + 1] segment starts (multiples of 64)
    const int* counts;         // [E] valid rows of each segment
    __nv_bfloat16* out;        // [rows, N]
    long long rows;
    long long rows_pad;        // rows of a_scales (rows rounded up to 4)
    int n;
    int k;
    int num_experts;
    int stages;   // the TMA kernel's ring depth
    int group_m;  // the TMA kernel's tile rows per rasterization group
};

static_assert(sizeof(GroupedGemmParams) == 96, "GroupedGemmParams layout: size");
static_assert(offsetof(GroupedGemmParams, a) == 0, "GroupedGemmParams layout: a");
static_assert(offsetof(GroupedGemmParams, a_scales) == 8, "GroupedGemmParams layout: a_scales");
static_assert(offsetof(GroupedGemmParams, w) == 16, "GroupedGemmParams layout: w");
static_assert(offsetof(GroupedGemmParams, w_scales) == 24, "GroupedGemmParams layout: w_scales");
static_assert(offsetof(GroupedGemmParams, offsets) == 32, "GroupedGemmParams layout: offsets");
static_assert(offsetof(GroupedGemmParams, counts) == 40, "GroupedGemmParams layout: counts");
static_assert(offsetof(GroupedGemmParams, out) == 48, "GroupedGemmParams layout: out");
static_assert(offsetof(GroupedGemmParams, rows) == 56, "GroupedGemmParams layout: rows");
static_assert(offsetof(GroupedGemmParams, rows_pad) == 64, "GroupedGemmParams layout: rows_pad");
static_assert(offsetof(GroupedGemmParams, n) == 72, "GroupedGemmParams layout: n");
static_assert(offsetof(GroupedGemmParams, k) == 76, "GroupedGemmParams layout: k");
static_assert(offsetof(GroupedGemmParams, num_experts) == 80, "GroupedGemmParams layout: num_experts");
static_assert(offsetof(GroupedGemmParams, stages) == 84, "GroupedGemmParams layout: stages");
static_assert(offsetof(GroupedGemmParams, group_m) == 88, "GroupedGemmParams layout: group_m");

}  // namespace r1k_moe_params
