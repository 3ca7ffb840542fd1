// The arguments of the MLA kernels, one struct per kernel family, each passed as a single __grid_constant__
// parameter: `DecodeParams` (every decode kernel, portable and sm_90a; after the tensor maps for the latter),
// `CombineParams` (mla_combine) and `PlanParams` (mla_plan_balanced). Rust twins in src/mla/params.rs, #[repr(C)].
// Both sides pin the layout: the static_asserts here and the kernel_params! offsets there state the same numbers,
// and a Rust test reads these lines to check that they do.
#pragma once

#include <cuda_bf16.h>
#include <stddef.h>
#include <stdint.h>

namespace r1k_mla_params {

struct DecodeParams {
    // Portable kernels only (the sm_90a kernels read q and the cache through tensor maps): q [batch, s_q, h, 576]
    // bf16; the cache [num_blocks, page, 576] bf16 or [num_blocks, page, 656] bytes (FP8).
    const void* q;
    const void* cache;
    const int* block_table;   // [batch, max_blocks]
    const int* seqlens;       // [batch]
    const int4* items;        // the plan's work items: (seq, start_block, end_block, split)
    const int* cta_offsets;   // [ctas + 1]
    const int* split_offsets; // [batch + 1]
    float* o_part;            // [total_splits, s_q·h, 512]
    float* lse_part;          // [total_splits, s_q·h]
    int batch;
    int s_q;
    int h;
    int page;
    int num_blocks;
    int max_blocks;
    float scale_log2;
    int causal;
    int box_rows;    // sm_90a: cache token rows per TMA box
    int q_box_rows;  // sm_90a: query rows per TMA box
};

static_assert(sizeof(DecodeParams) == 112, "DecodeParams layout: size");
static_assert(offsetof(DecodeParams, q) == 0, "DecodeParams layout: q");
static_assert(offsetof(DecodeParams, cache) == 8, "DecodeParams layout: cache");
static_assert(offsetof(DecodeParams, block_table) == 16, "DecodeParams layout: block_table");
static_assert(offsetof(DecodeParams, seqlens) == 24, "DecodeParams layout: seqlens");
static_assert(offsetof(DecodeParams, items) == 32, "DecodeParams layout: items");
static_assert(offsetof(DecodeParams, cta_offsets) == 40, "DecodeParams layout: cta_offsets");
static_assert(offsetof(DecodeParams, split_offsets) == 48, "DecodeParams layout: split_offsets");
static_assert(offsetof(DecodeParams, o_part) == 56, "DecodeParams layout: o_part");
static_assert(offsetof(DecodeParams, lse_part) == 64, "DecodeParams layout: lse_part");
static_assert(offsetof(DecodeParams, batch) == 72, "DecodeParams layout: batch");
static_assert(offsetof(DecodeParams, s_q) == 76, "DecodeParams layout: s_q");
static_assert(offsetof(DecodeParams, h) == 80, "DecodeParams layout: h");
static_assert(offsetof(DecodeParams, page) == 84, "DecodeParams layout: page");
static_assert(offsetof(DecodeParams, num_blocks) == 88, "DecodeParams layout: num_blocks");
static_assert(offsetof(DecodeParams, max_blocks) == 92, "DecodeParams layout: max_blocks");
static_assert(offsetof(DecodeParams, scale_log2) == 96, "DecodeParams layout: scale_log2");
static_assert(offsetof(DecodeParams, causal) == 100, "DecodeParams layout: causal");
static_assert(offsetof(DecodeParams, box_rows) == 104, "DecodeParams layout: box_rows");
static_assert(offsetof(DecodeParams, q_box_rows) == 108, "DecodeParams layout: q_box_rows");

struct CombineParams {
    const float* o_part;       // [total_splits, s_q·h, 512]
    const float* lse_part;     // [total_splits, s_q·h]
    const int* split_offsets;  // [batch + 1]: the partial slots of sequence b are split_offsets[b] .. [b + 1]
    __nv_bfloat16* out;        // [batch, s_q, h, 512]
    float* lse;                // [batch, h, s_q]
    int batch;
    int s_q;
    int h;
};

static_assert(sizeof(CombineParams) == 56, "CombineParams layout: size");
static_assert(offsetof(CombineParams, o_part) == 0, "CombineParams layout: o_part");
static_assert(offsetof(CombineParams, lse_part) == 8, "CombineParams layout: lse_part");
static_assert(offsetof(CombineParams, split_offsets) == 16, "CombineParams layout: split_offsets");
static_assert(offsetof(CombineParams, out) == 24, "CombineParams layout: out");
static_assert(offsetof(CombineParams, lse) == 32, "CombineParams layout: lse");
static_assert(offsetof(CombineParams, batch) == 40, "CombineParams layout: batch");
static_assert(offsetof(CombineParams, s_q) == 44, "CombineParams layout: s_q");
static_assert(offsetof(CombineParams, h) == 48, "CombineParams layout: h");

struct PlanParams {
    const int* seqlens;   // [batch]
    int4* items;          // [batch + ctas − 1] work items (seq, start_block, end_block, split)
    int* cta_offsets;     // [ctas + 1]
    int* split_offsets;   // [batch + 1]
    int batch;
    int page;
    int max_blocks;
    int ctas;
};

static_assert(sizeof(PlanParams) == 48, "PlanParams layout: size");
static_assert(offsetof(PlanParams, seqlens) == 0, "PlanParams layout: seqlens");
static_assert(offsetof(PlanParams, items) == 8, "PlanParams layout: items");
static_assert(offsetof(PlanParams, cta_offsets) == 16, "PlanParams layout: cta_offsets");
static_assert(offsetof(PlanParams, split_offsets) == 24, "PlanParams layout: split_offsets");
static_assert(offsetof(PlanParams, batch) == 32, "PlanParams layout: batch");
static_assert(offsetof(PlanParams, page) == 36, "PlanParams layout: page");
static_assert(offsetof(PlanParams, max_blocks) == 40, "PlanParams layout: max_blocks");
static_assert(offsetof(PlanParams, ctas) == 44, "PlanParams layout: ctas");

}  // namespace r1k_mla_params
