// The arguments of the primitive probes in kernels/probes_sm90.cu, each passed as one __grid_constant__ parameter
// after the probe's tensor maps: `GemmTmaProbeParams` (gemm_probe_tma), `GemmWgmmaProbeParams`
// (gemm_probe_wgmma_n128), `GemmPromoteProbeParams` (gemm_probe_promote_n160), `MlaTileLoadProbeParams`
// (mla_sm90_probe_tile_load and mla_sm90_probe_fp8_tile_load), `MlaWgmmaProbeParams` (mla_sm90_probe_wgmma and
// mla_sm90_probe_narrow_wgmma) and `MlaSoftmaxProbeParams` (mla_sm90_probe_softmax). Rust twins in src/probes.rs,
// #[repr(C)].
// Both sides pin the layout: the static_asserts here and the kernel_params! offsets there state the same numbers, and
// a Rust test reads these lines to check that they do.
#pragma once

#include <stddef.h>
#include <stdint.h>

namespace r1k_probe_params {

struct GemmTmaProbeParams {
    uint8_t* out;  // [box_bytes], the box as shared memory holds it (swizzled)
    int x0;        // box origin, inner coordinate
    int y0;        // box origin, outer coordinate
    int box_bytes;
};

static_assert(sizeof(GemmTmaProbeParams) == 24, "GemmTmaProbeParams layout: size");
static_assert(offsetof(GemmTmaProbeParams, out) == 0, "GemmTmaProbeParams layout: out");
static_assert(offsetof(GemmTmaProbeParams, x0) == 8, "GemmTmaProbeParams layout: x0");
static_assert(offsetof(GemmTmaProbeParams, y0) == 12, "GemmTmaProbeParams layout: y0");
static_assert(offsetof(GemmTmaProbeParams, box_bytes) == 16, "GemmTmaProbeParams layout: box_bytes");

struct GemmWgmmaProbeParams {
    const uint8_t* a;  // [64, 128] E4M3 row-major
    const uint8_t* b;  // [128, 128] E4M3 row-major
    float* out;        // [64, 128] fp32
};

static_assert(sizeof(GemmWgmmaProbeParams) == 24, "GemmWgmmaProbeParams layout: size");
static_assert(offsetof(GemmWgmmaProbeParams, a) == 0, "GemmWgmmaProbeParams layout: a");
static_assert(offsetof(GemmWgmmaProbeParams, b) == 8, "GemmWgmmaProbeParams layout: b");
static_assert(offsetof(GemmWgmmaProbeParams, out) == 16, "GemmWgmmaProbeParams layout: out");

struct GemmPromoteProbeParams {
    const float* acc_in;  // [64, 160] row-major
    const float* fin_in;  // [64, 160] row-major
    const float* sa;      // [64]
    const float* sb2;     // [2]
    float* out;           // [64, 160] row-major
    int n0;               // the tile's first column, a multiple of 8
};

static_assert(sizeof(GemmPromoteProbeParams) == 48, "GemmPromoteProbeParams layout: size");
static_assert(offsetof(GemmPromoteProbeParams, acc_in) == 0, "GemmPromoteProbeParams layout: acc_in");
static_assert(offsetof(GemmPromoteProbeParams, fin_in) == 8, "GemmPromoteProbeParams layout: fin_in");
static_assert(offsetof(GemmPromoteProbeParams, sa) == 16, "GemmPromoteProbeParams layout: sa");
static_assert(offsetof(GemmPromoteProbeParams, sb2) == 24, "GemmPromoteProbeParams layout: sb2");
static_assert(offsetof(GemmPromoteProbeParams, out) == 32, "GemmPromoteProbeParams layout: out");
static_assert(offsetof(GemmPromoteProbeParams, n0) == 40, "GemmPromoteProbeParams layout: n0");

struct MlaTileLoadProbeParams {
    const int* table_row;  // the sequence's block-table row
    uint8_t* out;          // [73,728] bytes, the stage as shared memory holds it (swizzled)
    int page;
    int num_blocks;
    int box_rows;
    int t0;       // the tile's first token
    int tok_end;  // the sequence's length in tokens
};

static_assert(sizeof(MlaTileLoadProbeParams) == 40, "MlaTileLoadProbeParams layout: size");
static_assert(offsetof(MlaTileLoadProbeParams, table_row) == 0, "MlaTileLoadProbeParams layout: table_row");
static_assert(offsetof(MlaTileLoadProbeParams, out) == 8, "MlaTileLoadProbeParams layout: out");
static_assert(offsetof(MlaTileLoadProbeParams, page) == 16, "MlaTileLoadProbeParams layout: page");
static_assert(offsetof(MlaTileLoadProbeParams, num_blocks) == 20, "MlaTileLoadProbeParams layout: num_blocks");
static_assert(offsetof(MlaTileLoadProbeParams, box_rows) == 24, "MlaTileLoadProbeParams layout: box_rows");
static_assert(offsetof(MlaTileLoadProbeParams, t0) == 28, "MlaTileLoadProbeParams layout: t0");
static_assert(offsetof(MlaTileLoadProbeParams, tok_end) == 32, "MlaTileLoadProbeParams layout: tok_end");

struct MlaWgmmaProbeParams {
    const int* table_row;  // the sequence's block-table row
    float* s_out;          // [rows, 64] fp32
    float* o_out;          // [rows, 512] fp32
    int page;
    int num_blocks;
    int box_rows;
};

static_assert(sizeof(MlaWgmmaProbeParams) == 40, "MlaWgmmaProbeParams layout: size");
static_assert(offsetof(MlaWgmmaProbeParams, table_row) == 0, "MlaWgmmaProbeParams layout: table_row");
static_assert(offsetof(MlaWgmmaProbeParams, s_out) == 8, "MlaWgmmaProbeParams layout: s_out");
static_assert(offsetof(MlaWgmmaProbeParams, o_out) == 16, "MlaWgmmaProbeParams layout: o_out");
static_assert(offsetof(MlaWgmmaProbeParams, page) == 24, "MlaWgmmaProbeParams layout: page");
static_assert(offsetof(MlaWgmmaProbeParams, num_blocks) == 28, "MlaWgmmaProbeParams layout: num_blocks");
static_assert(offsetof(MlaWgmmaProbeParams, box_rows) == 32, "MlaWgmmaProbeParams layout: box_rows");

struct MlaSoftmaxProbeParams {
    const float* s_in;  // [64, 128] fp32, log2 domain
    float* m_out;       // [64]
    float* l_out;       // [64]
    float* p_out;       // [64, 64]
    float* alpha_out;   // [64]
};

static_assert(sizeof(MlaSoftmaxProbeParams) == 40, "MlaSoftmaxProbeParams layout: size");
static_assert(offsetof(MlaSoftmaxProbeParams, s_in) == 0, "MlaSoftmaxProbeParams layout: s_in");
static_assert(offsetof(MlaSoftmaxProbeParams, m_out) == 8, "MlaSoftmaxProbeParams layout: m_out");
static_assert(offsetof(MlaSoftmaxProbeParams, l_out) == 16, "MlaSoftmaxProbeParams layout: l_out");
static_assert(offsetof(MlaSoftmaxProbeParams, p_out) == 24, "MlaSoftmaxProbeParams layout: p_out");
static_assert(offsetof(MlaSoftmaxProbeParams, alpha_out) == 32, "MlaSoftmaxProbeParams layout: alpha_out");

}  // namespace r1k_probe_params
