// MLA decode, plain SIMT kernels: the obviously-correct second opinion for the sm_90a fast path and the fallback on
// non-Hopper GPUs. Split-KV: each CTA walks the work items the host scheduler (src/mla/sched.rs) gave it and writes
// one fp32 partial output + partial lse per item; `mla_combine` merges a sequence's partials.
//
// Numbers (b sequences, s_q queries, h heads, s_k keys): flops = 2·b·h·s_q·s_k·(576 + 512); minimum bytes = KV read
// once (s_k·1152 B bf16, s_k·656 B FP8) + q (b·s_q·h·1152 B) + o (b·s_q·h·1024 B). This kernel re-reads the KV of a
// split once per 16-row group (h·s_q / 16 times), which is fine for a fallback, not for the fast path.
//
// Tiling: a CTA of 256 threads owns 16 query rows (row = query·h + head) of one sequence (grid.y = row groups) and
// streams 16-token K tiles through shared memory as fp32 (row stride 577 words: conflict-free column reads). Thread
// (r = tid / 16, j = tid % 16) computes the score of row r against token j (a 576-long fp32 dot), the 16 lanes of a
// row reduce max/sum with width-16 shuffles, and the same thread then owns output columns j + 16·c (c < 32) of row r:
// P is broadcast with shuffles, V is read from the tile (V = first 512 columns of K). Online softmax in the log2
// domain with exp2. No pipeline: load tile, sync, compute, sync.
//
// Safety: block-table entries are checked against num_blocks on the device; a bad entry's tokens are masked out
// (never read), so a garbage table cannot cause an out-of-bounds read. Only columns below ceil(seqlen/page) are read.
//
// r1k: portable
#include <cuda_bf16.h>
#include <stdint.h>

#include "common/fp8.cuh"

namespace {

constexpr int kDqk = 576;
constexpr int kDv = 512;
constexpr int kRows = 16;
constexpr int kTile = 16;
constexpr int kThreads = 256;
constexpr int kKStride = kDqk + 1;
constexpr int kColsPerThread = kDv / 16;
constexpr int kFp8TokenBytes = 656;
constexpr int kFp8ScalesOff = 512;
constexpr int kFp8RopeOff = 528;
constexpr float kLn2 = 0.6931471805599453f;

__device__ __forceinline__ void bf16x8_to_f32(const uint4& raw, float* dst) {
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        float2 f = __bfloat1622float2(h[i]);
        dst[2 * i] = f.x;
        dst[2 * i + 1] = f.y;
    }
}

// Page id for token `pos` of sequence `b`, or -1 when the table entry is out of range.
__device__ __forceinline__ int page_of(const int* block_table, int b, int max_blocks, int page, int num_blocks,
                                       int pos) {
    const int id = block_table[static_cast<size_t>(b) * max_blocks + pos / page];
    return (id >= 0 && id < num_blocks) ? id : -1;
}

template <bool kFp8>
__device__ void decode_body(const __nv_bfloat16* __restrict__ q, const uint8_t* __restrict__ cache,
                            const int* __restrict__ block_table, const int* __restrict__ seqlens,
                            const int4* __restrict__ items, const int* __restrict__ cta_offsets,
                            const int* __restrict__ split_offsets, float* __restrict__ o_part,
                            float* __restrict__ lse_part, int batch, int s_q, int h, int page, int num_blocks,
                            int max_blocks, float scale_log2, int causal) {
    extern __shared__ float smem[];
    float* q_s = smem;                       // [kRows][kDqk]
    float* k_s = q_s + kRows * kDqk;         // [kTile][kKStride]
    int* tok_ok = reinterpret_cast<int*>(k_s + kTile * kKStride);  // [kTile]

    const int tid = threadIdx.x;
    const int r = tid / 16;
    const int j16 = tid % 16;
    const int rows = s_q * h;
    const int row0 = blockIdx.y * kRows;
    const int row = row0 + r;
    const bool row_ok = row < rows;

    const int first = cta_offsets[blockIdx.x];
    const int last = cta_offsets[blockIdx.x + 1];
    for (int item = first; item < last; ++item) {
        const int4 it = items[item];
        const int b = it.x;
        if (b < 0 || b >= batch) continue;
        const int seqlen = min(max(seqlens[b], 0), max_blocks * page);
        const int tok_begin = max(it.y, 0) * page;
        const int tok_end = min(min(it.z, max_blocks) * page, seqlen);
        const size_t slot = static_cast<size_t>(split_offsets[b]) + it.w;

        __syncthreads();  // previous item's readers of q_s are done
        for (int idx = tid; idx < kRows * (kDqk / 8); idx += kThreads) {
            const int rr = idx / (kDqk / 8);
            const int c8 = idx % (kDqk / 8);
            float v[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            if (row0 + rr < rows) {
                const uint4 raw = *reinterpret_cast<const uint4*>(
                    q + (static_cast<size_t>(b) * rows + row0 + rr) * kDqk + c8 * 8);
                bf16x8_to_f32(raw, v);
            }
#pragma unroll
            for (int e = 0; e < 8; ++e) q_s[rr * kDqk + c8 * 8 + e] = v[e];
        }
        const int qi = row_ok ? row / h : 0;
        const int limit = causal ? min(max(seqlen - s_q + qi + 1, 0), seqlen) : seqlen;

        float m = -INFINITY;
        float l = 0.0f;
        float acc[kColsPerThread];
#pragma unroll
        for (int c = 0; c < kColsPerThread; ++c) acc[c] = 0.0f;

        for (int t0 = tok_begin; t0 < tok_end; t0 += kTile) {
            __syncthreads();  // previous tile fully consumed
            if (tid < kTile) {
                const int pos = t0 + tid;
                tok_ok[tid] = pos < tok_end && page_of(block_table, b, max_blocks, page, num_blocks, pos) >= 0;
            }
            if constexpr (!kFp8) {
                for (int idx = tid; idx < kTile * (kDqk / 8); idx += kThreads) {
                    const int tt = idx / (kDqk / 8);
                    const int c8 = idx % (kDqk / 8);
                    const int pos = t0 + tt;
                    float v[8] = {0, 0, 0, 0, 0, 0, 0, 0};
                    const int pid = pos < tok_end ? page_of(block_table, b, max_blocks, page, num_blocks, pos) : -1;
                    if (pid >= 0) {
                        const __nv_bfloat16* src = reinterpret_cast<const __nv_bfloat16*>(cache) +
                                                   (static_cast<size_t>(pid) * page + pos % page) * kDqk + c8 * 8;
                        bf16x8_to_f32(*reinterpret_cast<const uint4*>(src), v);
                    }
#pragma unroll
                    for (int e = 0; e < 8; ++e) k_s[tt * kKStride + c8 * 8 + e] = v[e];
                }
            } else {
                // Per token: 32 chunks of 16 E4M3 codes, then 8 chunks of 8 bf16 RoPE values.
                for (int idx = tid; idx < kTile * 40; idx += kThreads) {
                    const int tt = idx / 40;
                    const int c = idx % 40;
                    const int pos = t0 + tt;
                    const int pid = pos < tok_end ? page_of(block_table, b, max_blocks, page, num_blocks, pos) : -1;
                    const uint8_t* tok =
                        cache + (static_cast<size_t>(pid < 0 ? 0 : pid) * page + pos % page) * kFp8TokenBytes;
                    if (c < 32) {
                        float v[16];
#pragma unroll
                        for (int e = 0; e < 16; ++e) v[e] = 0.0f;
                        if (pid >= 0) {
                            const uint4 raw = *reinterpret_cast<const uint4*>(tok + c * 16);
                            const float scale = *reinterpret_cast<const float*>(tok + kFp8ScalesOff + 4 * (c / 8));
                            const uint8_t* codes = reinterpret_cast<const uint8_t*>(&raw);
#pragma unroll
                            for (int e = 0; e < 16; ++e)  // bf16(code · scale): the FP8 cache's defined values
                                v[e] = __bfloat162float(__float2bfloat16_rn(r1k::e4m3_to_f32(codes[e]) * scale));
                        }
#pragma unroll
                        for (int e = 0; e < 16; ++e) k_s[tt * kKStride + c * 16 + e] = v[e];
                    } else {
                        float v[8] = {0, 0, 0, 0, 0, 0, 0, 0};
                        if (pid >= 0) bf16x8_to_f32(*reinterpret_cast<const uint4*>(tok + kFp8RopeOff + (c - 32) * 16), v);
#pragma unroll
                        for (int e = 0; e < 8; ++e) k_s[tt * kKStride + kDv + (c - 32) * 8 + e] = v[e];
                    }
                }
            }
            __syncthreads();

            const int pos = t0 + j16;
            float s = -INFINITY;
            if (row_ok && pos < limit && tok_ok[j16]) {
                const float* qr = q_s + r * kDqk;
                const float* kr = k_s + j16 * kKStride;
                float dot = 0.0f;
#pragma unroll 8
                for (int d = 0; d < kDqk; ++d) dot = fmaf(qr[d], kr[d], dot);
                s = dot * scale_log2;
            }
            float tile_max = s;
#pragma unroll
            for (int o = 8; o > 0; o >>= 1) tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, o, 16));
            const float m_new = fmaxf(m, tile_max);
            float p = 0.0f;
            float alpha = 1.0f;
            if (m_new != -INFINITY) {
                p = exp2f(s - m_new);
                alpha = exp2f(m - m_new);
            }
            float psum = p;
#pragma unroll
            for (int o = 8; o > 0; o >>= 1) psum += __shfl_xor_sync(0xffffffffu, psum, o, 16);
            l = l * alpha + psum;
            m = m_new;
#pragma unroll
            for (int c = 0; c < kColsPerThread; ++c) acc[c] *= alpha;
#pragma unroll 4
            for (int tt = 0; tt < kTile; ++tt) {
                const float pt = __shfl_sync(0xffffffffu, p, tt, 16);
                const float* vr = k_s + tt * kKStride + j16;
#pragma unroll
                for (int c = 0; c < kColsPerThread; ++c) acc[c] = fmaf(pt, vr[16 * c], acc[c]);
            }
        }

        if (row_ok) {
            const float inv = l > 0.0f ? 1.0f / l : 0.0f;
            float* dst = o_part + (slot * rows + row) * kDv + j16;
#pragma unroll
            for (int c = 0; c < kColsPerThread; ++c) dst[16 * c] = acc[c] * inv;
            if (j16 == 0) lse_part[slot * rows + row] = l > 0.0f ? (m + log2f(l)) * kLn2 : -INFINITY;
        }
    }
}

}  // namespace

// q: [batch, s_q, h, 576] bf16. cache: [num_blocks, page, 576] bf16. items: int4 (seq, start_block, end_block,
// split). o_part: [total_splits, s_q·h, 512] f32, lse_part: [total_splits, s_q·h] f32 (natural log, −inf = empty).
extern "C" __global__ void __launch_bounds__(kThreads)
    mla_decode_plain_bf16(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ cache,
                          const int* __restrict__ block_table, const int* __restrict__ seqlens,
                          const int4* __restrict__ items, const int* __restrict__ cta_offsets,
                          const int* __restrict__ split_offsets, float* __restrict__ o_part,
                          float* __restrict__ lse_part, int batch, int s_q, int h, int page, int num_blocks,
                          int max_blocks, float scale_log2, int causal) {
    decode_body<false>(q, reinterpret_cast<const uint8_t*>(cache), block_table, seqlens, items, cta_offsets,
                       split_offsets, o_part, lse_part, batch, s_q, h, page, num_blocks, max_blocks, scale_log2,
                       causal);
}

// As mla_decode_plain_bf16 with the FP8 cache: [num_blocks, page, 656] bytes (see reference::mla::fp8_token_layout).
extern "C" __global__ void __launch_bounds__(kThreads)
    mla_decode_plain_fp8(const __nv_bfloat16* __restrict__ q, const uint8_t* __restrict__ cache,
                         const int* __restrict__ block_table, const int* __restrict__ seqlens,
                         const int4* __restrict__ items, const int* __restrict__ cta_offsets,
                         const int* __restrict__ split_offsets, float* __restrict__ o_part,
                         float* __restrict__ lse_part, int batch, int s_q, int h, int page, int num_blocks,
                         int max_blocks, float scale_log2, int causal) {
    decode_body<true>(q, cache, block_table, seqlens, items, cta_offsets, split_offsets, o_part, lse_part, batch, s_q,
                      h, page, num_blocks, max_blocks, scale_log2, causal);
}

// Merges the partials of each (sequence, row): one warp per row, each lane owning 16 columns. Splits are visited in
// index order, so the result is deterministic. Rows of sequences without any attended key get o = 0, lse = +inf.
// out: [batch, s_q, h, 512] bf16; lse: [batch, h, s_q] f32.
extern "C" __global__ void __launch_bounds__(256)
    mla_combine(const float* __restrict__ o_part, const float* __restrict__ lse_part,
                const int* __restrict__ split_offsets, __nv_bfloat16* __restrict__ out, float* __restrict__ lse,
                int batch, int s_q, int h) {
    const int rows = s_q * h;
    const long long gid = static_cast<long long>(blockIdx.x) * 8 + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (gid >= static_cast<long long>(batch) * rows) return;
    const int b = static_cast<int>(gid / rows);
    const int row = static_cast<int>(gid % rows);
    const int first = split_offsets[b];
    const int n = split_offsets[b + 1] - first;
    float m = -INFINITY;
    for (int i = 0; i < n; ++i) m = fmaxf(m, lse_part[static_cast<size_t>(first + i) * rows + row]);
    float out_v[16];
#pragma unroll
    for (int c = 0; c < 16; ++c) out_v[c] = 0.0f;
    float total = INFINITY;
    if (m != -INFINITY) {
        float sum = 0.0f;
        for (int i = 0; i < n; ++i) sum += expf(lse_part[static_cast<size_t>(first + i) * rows + row] - m);
        total = m + logf(sum);
        for (int i = 0; i < n; ++i) {
            const size_t part = static_cast<size_t>(first + i) * rows + row;
            const float w = expf(lse_part[part] - total);
            if (w == 0.0f) continue;  // also skips the (zero) outputs of empty splits
            const float* src = o_part + part * kDv + lane;
#pragma unroll
            for (int c = 0; c < 16; ++c) out_v[c] = fmaf(w, src[32 * c], out_v[c]);
        }
    }
    __nv_bfloat16* dst = out + (static_cast<size_t>(b) * rows + row) * kDv + lane;
#pragma unroll
    for (int c = 0; c < 16; ++c) dst[32 * c] = __float2bfloat16_rn(out_v[c]);
    if (lane == 0) lse[(static_cast<size_t>(b) * h + row % h) * s_q + row / h] = total;
}
