// MLA decode, plain SIMT kernels: the obviously-correct second opinion for the sm_90a fast path and the fallback on
// non-Hopper GPUs. Split-KV: each CTA walks the work items the scheduler (src/mla/sched.rs on the host, or
// `mla_plan_balanced` below on the device) gave it and writes one fp32 partial output + partial lse per item;
// `mla_combine` merges a sequence's partials.
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
#include "common/mla_params.cuh"

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
// All arguments in one struct (common/mla_params.cuh); box_rows and q_box_rows are unused here.
extern "C" __global__ void __launch_bounds__(kThreads)
    mla_decode_plain_bf16(const __grid_constant__ r1k_mla_params::DecodeParams p) {
    decode_body<false>(static_cast<const __nv_bfloat16*>(p.q), static_cast<const uint8_t*>(p.cache), p.block_table,
                       p.seqlens, p.items, p.cta_offsets, p.split_offsets, p.o_part, p.lse_part, p.batch, p.s_q, p.h,
                       p.page, p.num_blocks, p.max_blocks, p.scale_log2, p.causal);
}

// As mla_decode_plain_bf16 with the FP8 cache: [num_blocks, page, 656] bytes (see reference::mla::fp8_token_layout).
extern "C" __global__ void __launch_bounds__(kThreads)
    mla_decode_plain_fp8(const __grid_constant__ r1k_mla_params::DecodeParams p) {
    decode_body<true>(static_cast<const __nv_bfloat16*>(p.q), static_cast<const uint8_t*>(p.cache), p.block_table,
                      p.seqlens, p.items, p.cta_offsets, p.split_offsets, p.o_part, p.lse_part, p.batch, p.s_q, p.h,
                      p.page, p.num_blocks, p.max_blocks, p.scale_log2, p.causal);
}

// Merges the partials of each (sequence, row): one warp per row, each lane owning 16 columns. Splits are visited in
// index order, so the result is deterministic. Rows of sequences without any attended key get o = 0, lse = +inf.
// out: [batch, s_q, h, 512] bf16; lse: [batch, h, s_q] f32.
// One CombineParams (common/mla_params.cuh).
extern "C" __global__ void __launch_bounds__(256) mla_combine(const __grid_constant__ r1k_mla_params::CombineParams p) {
    const float* __restrict__ o_part = p.o_part;
    const float* __restrict__ lse_part = p.lse_part;
    const int* __restrict__ split_offsets = p.split_offsets;
    __nv_bfloat16* __restrict__ out = p.out;
    float* __restrict__ lse = p.lse;
    const int batch = p.batch, s_q = p.s_q, h = p.h;
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

// ---------------------------------------------------------------------------------------------------------------
// The split plan computed on the device, for a decode step that is captured once and replayed while the lengths
// change (mla::MlaPlan::on_device). It is the host scheduler's balanced mode (src/mla/sched.rs, plan_splits) written
// as a closed form: the batch's pages, in sequence order, are cut every `quota = max(1, ceil(total / ctas))` pages
// and CTA c owns global pages [c·quota, (c+1)·quota). A sequence with P pages before it and n of its own has one
// item per CTA its range [P, P + n) meets, in CTA order, numbered 0.. as its splits. The grid of the decode kernels
// stays `ctas` whatever the lengths: CTAs past the last used one get an empty item range.
//
// Lengths are clamped to 0 ..= max_blocks·page (the decode kernels clamp the same way), so no item names a table
// column at or past max_blocks. Capacity: items ≤ batch + ctas − 1, which the host sized the buffers for.
//
// One CTA of 1024 threads; sequences are processed 1024 at a time with block-wide exclusive scans of their page and
// item counts (64-bit pages: batch · max_blocks may pass 2^31).
constexpr int kPlanThreads = 1024;

__device__ __forceinline__ long long plan_pages(const int* seqlens, int s, int batch, int page, int max_blocks) {
    if (s >= batch) return 0;
    const long long len = min(max(__ldg(seqlens + s), 0), max_blocks * page);
    return (len + page - 1) / page;
}

// Exclusive scan of `v` over the block; `total` receives the sum. Uses `scratch[32]`.
__device__ long long block_exclusive_scan(long long v, long long* scratch, long long* total) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    long long inc = v;
#pragma unroll
    for (int d = 1; d < 32; d *= 2) {
        const long long o = __shfl_up_sync(0xffffffffu, inc, d);
        if (lane >= d) inc += o;
    }
    if (lane == 31) scratch[warp] = inc;
    __syncthreads();
    if (warp == 0) {
        long long w = lane < kPlanThreads / 32 ? scratch[lane] : 0;
        long long winc = w;
#pragma unroll
        for (int d = 1; d < 32; d *= 2) {
            const long long o = __shfl_up_sync(0xffffffffu, winc, d);
            if (lane >= d) winc += o;
        }
        scratch[lane] = winc - w;  // exclusive prefix of warp sums
        if (lane == 31) scratch[32] = winc;
    }
    __syncthreads();
    const long long result = scratch[warp] + inc - v;
    *total = scratch[32];
    __syncthreads();  // scratch is reused by the next call
    return result;
}

// seqlens: [batch]. items: int4 [batch + ctas − 1] (seq, start_block, end_block, split). cta_offsets: [ctas + 1].
// split_offsets: [batch + 1]. One PlanParams (common/mla_params.cuh), named `args`: the body's `p` is a page index.
extern "C" __global__ void __launch_bounds__(kPlanThreads)
    mla_plan_balanced(const __grid_constant__ r1k_mla_params::PlanParams args) {
    const int* __restrict__ seqlens = args.seqlens;
    int4* __restrict__ items = args.items;
    int* __restrict__ cta_offsets = args.cta_offsets;
    int* __restrict__ split_offsets = args.split_offsets;
    const int batch = args.batch, page = args.page, max_blocks = args.max_blocks, ctas = args.ctas;
    __shared__ long long scratch[33];
    long long total_pages = 0;
    for (int base = 0; base < batch; base += kPlanThreads) {
        long long chunk;
        block_exclusive_scan(plan_pages(seqlens, base + threadIdx.x, batch, page, max_blocks), scratch, &chunk);
        total_pages += chunk;
    }
    const long long quota = max(1LL, (total_pages + ctas - 1) / ctas);
    long long pages_before = 0, items_before = 0;
    for (int base = 0; base < batch; base += kPlanThreads) {
        const int s = base + threadIdx.x;
        const long long n = plan_pages(seqlens, s, batch, page, max_blocks);
        long long chunk_pages, chunk_items;
        const long long p = pages_before + block_exclusive_scan(n, scratch, &chunk_pages);
        const long long first_cta = p / quota;
        const long long pieces = n > 0 ? (p + n - 1) / quota - first_cta + 1 : 0;
        const long long item0 = items_before + block_exclusive_scan(pieces, scratch, &chunk_items);
        if (s < batch) {
            split_offsets[s] = static_cast<int>(item0);
            for (long long j = 0; j < pieces; ++j) {
                const long long c = first_cta + j;
                const long long start = max(p, c * quota), end = min(p + n, (c + 1) * quota);
                items[item0 + j] = make_int4(s, static_cast<int>(start - p), static_cast<int>(end - p),
                                             static_cast<int>(j));
                if (start == c * quota) cta_offsets[c] = static_cast<int>(item0 + j);  // the piece that opens CTA c
            }
        }
        pages_before += chunk_pages;
        items_before += chunk_items;
    }
    // CTAs past the last used one (and the end marker) start at the end: empty ranges.
    const long long used = (total_pages + quota - 1) / quota;
    for (long long c = used + threadIdx.x; c <= ctas; c += kPlanThreads) cta_offsets[c] = static_cast<int>(items_before);
    if (threadIdx.x == 0) split_offsets[batch] = static_cast<int>(items_before);
}
