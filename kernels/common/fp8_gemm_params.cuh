// The scalar and pointer arguments of the FP8 GEMM kernels, one struct per kernel family, each passed as a single
// __grid_constant__ parameter: `GemmParams` (the sm_90a kernels fp8_gemm_sm90_m*n* and fp8_gemm_sm90_mc2_m128n*,
// after their three tensor maps), `PortableGemmParams` (fp8_gemm_plain) and `SplitkReduceParams`
// (fp8_gemm_splitk_reduce). Rust twins in src/fp8_gemm/params.rs, #[repr(C)]. Both sides pin the layout: the
// static_asserts here and the kernel_params! offsets there state the same numbers, and a Rust test reads these lines
// to check that they do.
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

struct PortableGemmParams {
    const uint8_t* a;   // [m, k] E4M3 codes, K-major
    const float* sa;    // [ceil(k/128), m_pad], MN-major
    const uint8_t* b;   // [n, k] E4M3 codes, K-major
    const float* sb;    // [ceil(n/128), ceil(k/128)]
    void* out;          // bf16 [m, n]; fp32 [m, n] accumulated into when `accumulate` is 1
    int m;
    int n;
    int k;
    int m_pad;  // rows of sa: m rounded up to 4
    int accumulate;
};

static_assert(sizeof(PortableGemmParams) == 64, "PortableGemmParams layout: size");
static_assert(offsetof(PortableGemmParams, a) == 0, "PortableGemmParams layout: a");
static_assert(offsetof(PortableGemmParams, sa) == 8, "PortableGemmParams layout: sa");
static_assert(offsetof(PortableGemmParams, b) == 16, "PortableGemmParams layout: b");
static_assert(offsetof(PortableGemmParams, sb) == 24, "PortableGemmParams layout: sb");
static_assert(offsetof(PortableGemmParams, out) == 32, "PortableGemmParams layout: out");
static_assert(offsetof(PortableGemmParams, m) == 40, "PortableGemmParams layout: m");
static_assert(offsetof(PortableGemmParams, n) == 44, "PortableGemmParams layout: n");
static_assert(offsetof(PortableGemmParams, k) == 48, "PortableGemmParams layout: k");
static_assert(offsetof(PortableGemmParams, m_pad) == 52, "PortableGemmParams layout: m_pad");
static_assert(offsetof(PortableGemmParams, accumulate) == 56, "PortableGemmParams layout: accumulate");

struct SplitkReduceParams {
    const float* partial;  // [k_splits, m, n] fp32
    void* out;             // bf16 [m, n] (mode 0) or fp32 [m, n] accumulated into (mode 1)
    int m;
    int n;
    int k_splits;
    int mode;
};

static_assert(sizeof(SplitkReduceParams) == 32, "SplitkReduceParams layout: size");
static_assert(offsetof(SplitkReduceParams, partial) == 0, "SplitkReduceParams layout: partial");
static_assert(offsetof(SplitkReduceParams, out) == 8, "SplitkReduceParams layout: out");
static_assert(offsetof(SplitkReduceParams, m) == 16, "SplitkReduceParams layout: m");
static_assert(offsetof(SplitkReduceParams, n) == 20, "SplitkReduceParams layout: n");
static_assert(offsetof(SplitkReduceParams, k_splits) == 24, "SplitkReduceParams layout: k_splits");
static_assert(offsetof(SplitkReduceParams, mode) == 28, "SplitkReduceParams layout: mode");

}  // namespace r1k_gemm_params
