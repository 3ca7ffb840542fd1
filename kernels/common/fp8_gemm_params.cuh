// The scalar and pointer arguments of the sm_90a FP8 GEMM kernels (fp8_gemm_sm90_m*n*, fp8_gemm_sm90_mc2_m128n*) as
// one struct, passed as a single __grid_constant__ parameter after the three tensor maps. Rust twin: `GemmParams`
// in src/fp8_gemm/params.rs, #[repr(C)]. Both sides pin the layout: the static_asserts here and const assertions there
// state the same offsets, and a Rust test reads these lines to check that they do.
#pragma once

#include <stddef.h>
#include <stdint.h>

namespace r1k_gemm_params {

struct GemmParams {
    const float* sb;  // B's block scales [ceil(n/128), ceil(k/128)]
    void* out;        // bf16 [m, n] (mode 0), fp32 [m, n] accumulated into (mode 1), fp32 [k_splits, m, n] (mode 2)
    int m;
    int n;
    int k;
    int stages;        // pipeline depth of the shared-memory ring
    int group;         // tile rows per rasterization group (the 2-CTA kernels: tile pairs per group)
    int mode;          // the OutputMode above
    int k_splits;      // split-K: splits of the K blocks (1 = none; the 2-CTA kernels do not split)
    int kb_per_split;  // K blocks per split
};

static_assert(sizeof(GemmParams) == 48, "GemmParams layout: size");
static_assert(offsetof(GemmParams, sb) == 0, "GemmParams layout: sb");
static_assert(offsetof(GemmParams, out) == 8, "GemmParams layout: out");
static_assert(offsetof(GemmParams, m) == 16, "GemmParams layout: m");
static_assert(offsetof(GemmParams, n) == 20, "GemmParams layout: n");
static_assert(offsetof(GemmParams, k) == 24, "GemmParams layout: k");
static_assert(offsetof(GemmParams, stages) == 28, "GemmParams layout: stages");
static_assert(offsetof(GemmParams, group) == 32, "GemmParams layout: group");
static_assert(offsetof(GemmParams, mode) == 36, "GemmParams layout: mode");
static_assert(offsetof(GemmParams, k_splits) == 40, "GemmParams layout: k_splits");
static_assert(offsetof(GemmParams, kb_per_split) == 44, "GemmParams layout: kb_per_split");

}  // namespace r1k_gemm_params
