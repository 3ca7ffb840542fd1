// The arguments of every MoE kernel, one struct per kernel family, each passed as a single __grid_constant__
// parameter: `RouterParams` (moe_router_f32, moe_router_bf16), `GateLogitsParams` (moe_gate_logits), the permute's
// `CountRankParams`, `OffsetsParams`, `ScatterParams` and `GatherParams` (moe_count_rank, moe_offsets, moe_scatter,
// moe_gather), `GroupedGemmParams` (moe_grouped_gemm_fp8, the portable SIMT kernel, and
// moe_grouped_gemm_fp8_sm90_tma after its three tensor maps), `SwigluQuantParams` (moe_swiglu_quant) and
// `CombineParams` (moe_combine). Rust twins in src/moe/params.rs, #[repr(C)].
// Both sides pin the layout: the static_asserts here and the kernel_params! offsets there state the same numbers, and
// a Rust test reads these lines to check that they do.
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

struct CountRankParams {
    const int* ids;   // [n_pairs] expert id of each routed pair (token·k + slot)
    int* counts_raw;  // [E] pairs routed to each expert
    int* rank;        // [n_pairs] rank of each pair within its expert, written only for ids in 0..E
    int n_pairs;
};

static_assert(sizeof(CountRankParams) == 32, "CountRankParams layout: size");
static_assert(offsetof(CountRankParams, ids) == 0, "CountRankParams layout: ids");
static_assert(offsetof(CountRankParams, counts_raw) == 8, "CountRankParams layout: counts_raw");
static_assert(offsetof(CountRankParams, rank) == 16, "CountRankParams layout: rank");
static_assert(offsetof(CountRankParams, n_pairs) == 24, "CountRankParams layout: n_pairs");

struct OffsetsParams {
    const int* counts_raw;  // [E]
    long long* offsets;     // [E + 1] segment starts
    int* counts;            // [E] valid rows of each segment
    int num_experts;        // <= 1024 (one thread per expert)
    int masked;             // 1: segment e is rows [e·max_m, (e+1)·max_m); 0: round_up(raw, block_m) rows
    int block_m;            // contiguous layout only
    int max_m;              // masked layout only
};

static_assert(sizeof(OffsetsParams) == 40, "OffsetsParams layout: size");
static_assert(offsetof(OffsetsParams, counts_raw) == 0, "OffsetsParams layout: counts_raw");
static_assert(offsetof(OffsetsParams, offsets) == 8, "OffsetsParams layout: offsets");
static_assert(offsetof(OffsetsParams, counts) == 16, "OffsetsParams layout: counts");
static_assert(offsetof(OffsetsParams, num_experts) == 24, "OffsetsParams layout: num_experts");
static_assert(offsetof(OffsetsParams, masked) == 28, "OffsetsParams layout: masked");
static_assert(offsetof(OffsetsParams, block_m) == 32, "OffsetsParams layout: block_m");
static_assert(offsetof(OffsetsParams, max_m) == 36, "OffsetsParams layout: max_m");

struct ScatterParams {
    const int* ids;            // [n_pairs]
    const int* rank;           // [n_pairs]
    const long long* offsets;  // [E + 1]
    const int* counts;         // [E]
    int* row_of;               // [n_pairs] permuted row of each pair, −1 when skipped
    int* src_index;            // [capacity] pair held by each row
    long long capacity;
    int n_pairs;
    int num_experts;
};

static_assert(sizeof(ScatterParams) == 64, "ScatterParams layout: size");
static_assert(offsetof(ScatterParams, ids) == 0, "ScatterParams layout: ids");
static_assert(offsetof(ScatterParams, rank) == 8, "ScatterParams layout: rank");
static_assert(offsetof(ScatterParams, offsets) == 16, "ScatterParams layout: offsets");
static_assert(offsetof(ScatterParams, counts) == 24, "ScatterParams layout: counts");
static_assert(offsetof(ScatterParams, row_of) == 32, "ScatterParams layout: row_of");
static_assert(offsetof(ScatterParams, src_index) == 40, "ScatterParams layout: src_index");
static_assert(offsetof(ScatterParams, capacity) == 48, "ScatterParams layout: capacity");
static_assert(offsetof(ScatterParams, n_pairs) == 56, "ScatterParams layout: n_pairs");
static_assert(offsetof(ScatterParams, num_experts) == 60, "ScatterParams layout: num_experts");

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

struct SwigluQuantParams {
    const __nv_bfloat16* h;    // [rows, 2I] gate | up
    uint8_t* q;                // [rows, I] E4M3 codes
    float* scales;             // [I/128, rows_pad], padding rows zeroed
    const long long* offsets;  // [E + 1], read only when has_limit (else null)
    long long rows;
    long long rows_pad;  // rows rounded up to 4
    int inter;           // I
    int ue8m0;           // 1: power-of-two scales
    int num_experts;     // E of offsets (0 without a limit)
    int has_limit;       // 1: rows at or past offsets[E] are left untouched
};

static_assert(sizeof(SwigluQuantParams) == 64, "SwigluQuantParams layout: size");
static_assert(offsetof(SwigluQuantParams, h) == 0, "SwigluQuantParams layout: h");
static_assert(offsetof(SwigluQuantParams, q) == 8, "SwigluQuantParams layout: q");
static_assert(offsetof(SwigluQuantParams, scales) == 16, "SwigluQuantParams layout: scales");
static_assert(offsetof(SwigluQuantParams, offsets) == 24, "SwigluQuantParams layout: offsets");
static_assert(offsetof(SwigluQuantParams, rows) == 32, "SwigluQuantParams layout: rows");
static_assert(offsetof(SwigluQuantParams, rows_pad) == 40, "SwigluQuantParams layout: rows_pad");
static_assert(offsetof(SwigluQuantParams, inter) == 48, "SwigluQuantParams layout: inter");
static_assert(offsetof(SwigluQuantParams, ue8m0) == 52, "SwigluQuantParams layout: ue8m0");
static_assert(offsetof(SwigluQuantParams, num_experts) == 56, "SwigluQuantParams layout: num_experts");
static_assert(offsetof(SwigluQuantParams, has_limit) == 60, "SwigluQuantParams layout: has_limit");

struct CombineParams {
    const __nv_bfloat16* y;       // [rows, H] expert outputs in permuted order
    const int* row_of;            // [t, k] row of each slot, −1 when skipped
    const float* weights;         // [t, k], not read when skip_weights
    const __nv_bfloat16* shared;  // [t, H] shared-expert output, read when has_shared (else null)
    __nv_bfloat16* out;           // [t, H]
    long long rows;
    int k;
    int hidden;
    int has_shared;
    int skip_weights;  // 1: every slot has weight 1
};

static_assert(sizeof(CombineParams) == 64, "CombineParams layout: size");
static_assert(offsetof(CombineParams, y) == 0, "CombineParams layout: y");
static_assert(offsetof(CombineParams, row_of) == 8, "CombineParams layout: row_of");
static_assert(offsetof(CombineParams, weights) == 16, "CombineParams layout: weights");
static_assert(offsetof(CombineParams, shared) == 24, "CombineParams layout: shared");
static_assert(offsetof(CombineParams, out) == 32, "CombineParams layout: out");
static_assert(offsetof(CombineParams, rows) == 40, "CombineParams layout: rows");
static_assert(offsetof(CombineParams, k) == 48, "CombineParams layout: k");
static_assert(offsetof(CombineParams, hidden) == 52, "CombineParams layout: hidden");
static_assert(offsetof(CombineParams, has_shared) == 56, "CombineParams layout: has_shared");
static_assert(offsetof(CombineParams, skip_weights) == 60, "CombineParams layout: skip_weights");

struct GateLogitsParams {
    const __nv_bfloat16* x;  // [t, H]
    const __nv_bfloat16* w;  // [E, H] gate weights
    float* logits;           // [t, E]
    int t;
    int num_experts;
    int hidden;  // H, a multiple of 8
};

static_assert(sizeof(GateLogitsParams) == 40, "GateLogitsParams layout: size");
static_assert(offsetof(GateLogitsParams, x) == 0, "GateLogitsParams layout: x");
static_assert(offsetof(GateLogitsParams, w) == 8, "GateLogitsParams layout: w");
static_assert(offsetof(GateLogitsParams, logits) == 16, "GateLogitsParams layout: logits");
static_assert(offsetof(GateLogitsParams, t) == 24, "GateLogitsParams layout: t");
static_assert(offsetof(GateLogitsParams, num_experts) == 28, "GateLogitsParams layout: num_experts");
static_assert(offsetof(GateLogitsParams, hidden) == 32, "GateLogitsParams layout: hidden");

}  // namespace r1k_moe_params
