// The arguments of the decode-step kernels in kernels/decode_ops.cu, one struct per kernel, each passed as a single
// __grid_constant__ parameter: `RmsNormParams` (rms_norm_bf16), `CopyColumnsParams` (copy_columns_bf16),
// `AddParams` (add_bf16), `RopeParams` (rope_bf16_inplace), `HeadBmmParams` (head_bmm_bf16) and
// `CacheAppendParams` (cache_append_bf16). Rust twins in src/decode_ops.rs, #[repr(C)].
// Both sides pin the layout: the static_asserts here and the kernel_params! offsets there state the same numbers, and
// a Rust test reads these lines to check that they do.
#pragma once

#include <cuda_bf16.h>
#include <stddef.h>
#include <stdint.h>

namespace r1k_decode_ops_params {

struct RmsNormParams {
    const __nv_bfloat16* x;         // rows of x_stride elements; the first d columns are normalized
    const __nv_bfloat16* residual;  // [rows, d] added to x first (null: no add)
    __nv_bfloat16* residual_out;    // [rows, d] receives the rounded x + residual (null when residual is)
    const __nv_bfloat16* weight;    // [d]
    __nv_bfloat16* y;               // rows of y_stride elements; may alias x (in place)
    long long x_stride;
    long long y_stride;
    int d;
    float eps;
};

static_assert(sizeof(RmsNormParams) == 64, "RmsNormParams layout: size");
static_assert(offsetof(RmsNormParams, x) == 0, "RmsNormParams layout: x");
static_assert(offsetof(RmsNormParams, residual) == 8, "RmsNormParams layout: residual");
static_assert(offsetof(RmsNormParams, residual_out) == 16, "RmsNormParams layout: residual_out");
static_assert(offsetof(RmsNormParams, weight) == 24, "RmsNormParams layout: weight");
static_assert(offsetof(RmsNormParams, y) == 32, "RmsNormParams layout: y");
static_assert(offsetof(RmsNormParams, x_stride) == 40, "RmsNormParams layout: x_stride");
static_assert(offsetof(RmsNormParams, y_stride) == 48, "RmsNormParams layout: y_stride");
static_assert(offsetof(RmsNormParams, d) == 56, "RmsNormParams layout: d");
static_assert(offsetof(RmsNormParams, eps) == 60, "RmsNormParams layout: eps");

struct CopyColumnsParams {
    const __nv_bfloat16* src;  // [rows, src_len], columns [src_col, src_col + width) read
    __nv_bfloat16* dst;        // [rows, dst_len], columns [dst_col, dst_col + width) written
    long long rows;
    int width;
    int src_len;  // row stride of src, in elements
    int src_col;
    int dst_len;  // row stride of dst, in elements
    int dst_col;
};

static_assert(sizeof(CopyColumnsParams) == 48, "CopyColumnsParams layout: size");
static_assert(offsetof(CopyColumnsParams, src) == 0, "CopyColumnsParams layout: src");
static_assert(offsetof(CopyColumnsParams, dst) == 8, "CopyColumnsParams layout: dst");
static_assert(offsetof(CopyColumnsParams, rows) == 16, "CopyColumnsParams layout: rows");
static_assert(offsetof(CopyColumnsParams, width) == 24, "CopyColumnsParams layout: width");
static_assert(offsetof(CopyColumnsParams, src_len) == 28, "CopyColumnsParams layout: src_len");
static_assert(offsetof(CopyColumnsParams, src_col) == 32, "CopyColumnsParams layout: src_col");
static_assert(offsetof(CopyColumnsParams, dst_len) == 36, "CopyColumnsParams layout: dst_len");
static_assert(offsetof(CopyColumnsParams, dst_col) == 40, "CopyColumnsParams layout: dst_col");

struct AddParams {
    const __nv_bfloat16* a;  // [n]
    const __nv_bfloat16* b;  // [n]
    __nv_bfloat16* out;      // [n] a + b, rounded once
    long long n;
};

static_assert(sizeof(AddParams) == 32, "AddParams layout: size");
static_assert(offsetof(AddParams, a) == 0, "AddParams layout: a");
static_assert(offsetof(AddParams, b) == 8, "AddParams layout: b");
static_assert(offsetof(AddParams, out) == 16, "AddParams layout: out");
static_assert(offsetof(AddParams, n) == 24, "AddParams layout: n");

struct RopeParams {
    __nv_bfloat16* x;       // [rows, row_len], rotated in place
    const int* positions;   // [rows]
    const float* inv_freq;  // [dim / 2]
    int rows;
    int row_len;  // row stride of x, in elements
    int count;    // slices per row
    int stride;   // distance between slices, in elements
    int offset;   // start of the first slice
    int dim;      // elements per slice (even)
    float scale;  // YaRN magnitude factor on cos and sin
};

static_assert(sizeof(RopeParams) == 56, "RopeParams layout: size");
static_assert(offsetof(RopeParams, x) == 0, "RopeParams layout: x");
static_assert(offsetof(RopeParams, positions) == 8, "RopeParams layout: positions");
static_assert(offsetof(RopeParams, inv_freq) == 16, "RopeParams layout: inv_freq");
static_assert(offsetof(RopeParams, rows) == 24, "RopeParams layout: rows");
static_assert(offsetof(RopeParams, row_len) == 28, "RopeParams layout: row_len");
static_assert(offsetof(RopeParams, count) == 32, "RopeParams layout: count");
static_assert(offsetof(RopeParams, stride) == 36, "RopeParams layout: stride");
static_assert(offsetof(RopeParams, offset) == 40, "RopeParams layout: offset");
static_assert(offsetof(RopeParams, dim) == 44, "RopeParams layout: dim");
static_assert(offsetof(RopeParams, scale) == 48, "RopeParams layout: scale");

struct HeadBmmParams {
    const __nv_bfloat16* x;  // [t, heads, x_len], columns [x_col, x_col + k) read
    const __nv_bfloat16* w;  // element (h, i, j) at w_offset + h·ws_h + i·ws_i + j·ws_j
    void* out;               // [t, heads, out_len] bf16 (fp32 when out_f32), columns [out_col, out_col + n) written
    long long ws_h;
    long long ws_i;
    long long ws_j;
    long long w_offset;
    int t;
    int heads;
    int k;
    int n;
    int x_len;    // row stride of x, in elements
    int x_col;
    int out_len;  // row stride of out, in elements
    int out_col;
    int out_f32;  // 1: out is fp32 (e.g. router logits), 0: bf16
};

static_assert(sizeof(HeadBmmParams) == 96, "HeadBmmParams layout: size");
static_assert(offsetof(HeadBmmParams, x) == 0, "HeadBmmParams layout: x");
static_assert(offsetof(HeadBmmParams, w) == 8, "HeadBmmParams layout: w");
static_assert(offsetof(HeadBmmParams, out) == 16, "HeadBmmParams layout: out");
static_assert(offsetof(HeadBmmParams, ws_h) == 24, "HeadBmmParams layout: ws_h");
static_assert(offsetof(HeadBmmParams, ws_i) == 32, "HeadBmmParams layout: ws_i");
static_assert(offsetof(HeadBmmParams, ws_j) == 40, "HeadBmmParams layout: ws_j");
static_assert(offsetof(HeadBmmParams, w_offset) == 48, "HeadBmmParams layout: w_offset");
static_assert(offsetof(HeadBmmParams, t) == 56, "HeadBmmParams layout: t");
static_assert(offsetof(HeadBmmParams, heads) == 60, "HeadBmmParams layout: heads");
static_assert(offsetof(HeadBmmParams, k) == 64, "HeadBmmParams layout: k");
static_assert(offsetof(HeadBmmParams, n) == 68, "HeadBmmParams layout: n");
static_assert(offsetof(HeadBmmParams, x_len) == 72, "HeadBmmParams layout: x_len");
static_assert(offsetof(HeadBmmParams, x_col) == 76, "HeadBmmParams layout: x_col");
static_assert(offsetof(HeadBmmParams, out_len) == 80, "HeadBmmParams layout: out_len");
static_assert(offsetof(HeadBmmParams, out_col) == 84, "HeadBmmParams layout: out_col");
static_assert(offsetof(HeadBmmParams, out_f32) == 88, "HeadBmmParams layout: out_f32");

struct CacheAppendParams {
    const __nv_bfloat16* rows;  // [t, width]
    __nv_bfloat16* cache;       // [num_blocks, page, width]
    const int* block_table;     // [batch, max_blocks]
    const int* seq_ids;         // [t]
    const int* positions;       // [t]
    int width;
    int page;
    int num_blocks;
    int batch;
    int max_blocks;
};

static_assert(sizeof(CacheAppendParams) == 64, "CacheAppendParams layout: size");
static_assert(offsetof(CacheAppendParams, rows) == 0, "CacheAppendParams layout: rows");
static_assert(offsetof(CacheAppendParams, cache) == 8, "CacheAppendParams layout: cache");
static_assert(offsetof(CacheAppendParams, block_table) == 16, "CacheAppendParams layout: block_table");
static_assert(offsetof(CacheAppendParams, seq_ids) == 24, "CacheAppendParams layout: seq_ids");
static_assert(offsetof(CacheAppendParams, positions) == 32, "CacheAppendParams layout: positions");
static_assert(offsetof(CacheAppendParams, width) == 40, "CacheAppendParams layout: width");
static_assert(offsetof(CacheAppendParams, page) == 44, "CacheAppendParams layout: page");
static_assert(offsetof(CacheAppendParams, num_blocks) == 48, "CacheAppendParams layout: num_blocks");
static_assert(offsetof(CacheAppendParams, batch) == 52, "CacheAppendParams layout: batch");
static_assert(offsetof(CacheAppendParams, max_blocks) == 56, "CacheAppendParams layout: max_blocks");

}  // namespace r1k_decode_ops_params
