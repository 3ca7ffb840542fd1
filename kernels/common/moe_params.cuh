// The arguments of the MoE kernels with long argument lists, one struct per kernel family, each passed as a single
// __grid_constant__ parameter: `RouterParams` (moe_router_f32, moe_router_bf16), `GatherParams` (moe_gather) and
// `GroupedGemmParams`
// (moe_grouped_gemm_fp8, the portable SIMT kernel; moe_grouped_gemm_fp8_sm90, wgmma; moe_grouped_gemm_fp8_sm90_tma,
// after its three tensor maps). Rust twins in src/moe/params.rs, #[repr(C)].
// Both sides pin the layout: the static_asserts here and const assertions there state the same offsets, and a Rust
// test reads these lines to check that they do.
#pragma once

#include <cuda_bf16.h>
#include <stddef.h>
#include <stdint.h>

namespace r1k_moe_params {

struct RouterParams {
    const void* logits;   // [t, e] fp32 (moe_router_f32) or bf16 (moe_router_bf16)
    const float* bias;    // [e] selection-only bias, read when has_bias (else null)
    int* topk_ids;        // [t, k]
    float* topk_weights;  // [t, k]
    int t;
    int e;
    int k;
    int groups;       // expert groups (1: no group limit)
    int topk_groups;  // groups kept per token
    int has_bias;
    int softmax;      // 1: softmax scores, 0: sigmoid
    int renormalize;  // 1: the k weights are renormalized to sum 1 before scaling
    float scale;      // routed scaling factor
};

static_assert(sizeof(RouterParams) == 72, "RouterParams layout: size");
static_assert(offsetof(RouterParams, logits) == 0, "RouterParams layout: logits");
static_assert(offsetof(RouterParams, bias) == 8, "RouterParams layout: bias");
static_assert(offsetof(RouterParams, topk_ids) == 16, "RouterParams layout: topk_ids");
static_assert(offsetof(RouterParams, topk_weights) == 24, "RouterParams layout: topk_weights");
static_assert(offsetof(RouterParams, t) == 32, "RouterParams layout: t");
static_assert(offsetof(RouterParams, e) == 36, "RouterParams layout: e");
static_assert(offsetof(RouterParams, k) == 40, "RouterParams layout: k");
static_assert(offsetof(RouterParams, groups) == 44, "RouterParams layout: groups");
static_assert(offsetof(RouterParams, topk_groups) == 48, "RouterParams layout: topk_groups");
static_assert(offsetof(RouterParams, has_bias) == 52, "RouterParams layout: has_bias");
static_assert(offsetof(RouterParams, softmax) == 56, "RouterParams layout: softmax");
static_assert(offsetof(RouterParams, renormalize) == 60, "RouterParams layout: renormalize");
static_assert(offsetof(RouterParams, scale) == 64, "RouterParams layout: scale");

struct GatherParams {
    const uint8_t* x_codes;   // [t, hidden] E4M3 codes
    const float* x_scales;    // [hidden/128, t_pad]
    const long long* offsets;  // [E + 1] segment starts
    const int* counts;        // [E] valid rows of each segment
    int* src_index;           // [capacity] routed pair (token·k + slot) of each row; −1 written for padding rows
    uint8_t* a_codes;         // [capacity, hidden]
    float* a_scales;          // [hidden/128, cap_pad]
    long long capacity;
    long long cap_pad;  // capacity rounded up to 4
    int num_experts;
    int k;
    int t;
    int t_pad;
    int hidden;
};

static_assert(sizeof(GatherParams) == 96, "GatherParams layout: size");
static_assert(offsetof(GatherParams, x_codes) == 0, "GatherParams layout: x_codes");
static_assert(offsetof(GatherParams, x_scales) == 8, "GatherParams layout: x_scales");
static_assert(offsetof(GatherParams, offsets) == 16, "GatherParams layout: offsets");
static_assert(offsetof(GatherParams, counts) == 24, "GatherParams layout: counts");
static_assert(offsetof(GatherParams, src_index) == 32, "GatherParams layout: src_index");
static_assert(offsetof(GatherParams, a_codes) == 40, "GatherParams layout: a_codes");
static_assert(offsetof(GatherParams, a_scales) == 48, "GatherParams layout: a_scales");
static_assert(offsetof(GatherParams, capacity) == 56, "GatherParams layout: capacity");
static_assert(offsetof(GatherParams, cap_pad) == 64, "GatherParams layout: cap_pad");
static_assert(offsetof(GatherParams, num_experts) == 72, "GatherParams layout: num_experts");
static_assert(offsetof(GatherParams, k) == 76, "GatherParams layout: k");
static_assert(offsetof(GatherParams, t) == 80, "GatherParams layout: t");
static_assert(offsetof(GatherParams, t_pad) == 84, "GatherParams layout: t_pad");
static_assert(offsetof(GatherParams, hidden) == 88, "GatherParams layout: hidden");

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
