// Small ops around a DeepSeek-V3 decode step. All memory-bound except head_bmm.
//
// rms_norm_bf16: one CTA (256 threads) per row; the row's largest magnitude first (its exponent scales the squares, so
//   no finite input overflows or underflows the sum), then the fp32 sum of squares reduced in a fixed tree order
//   (shuffles, then a smem pass over the 8 warps), so results are bitwise reproducible. Optionally fused with the
//   residual add and with strided rows (normalize the 512-wide latent inside a 576-wide kv row in place). Bytes:
//   2·rows·d read + 2·rows·d written (+ the residual's 4·rows·d).
// copy_columns_bf16 / add_bf16: plumbing for the decode layer (q_pe into the MLA query, residual adds).
// rope_bf16_inplace: one thread per (row, head, pair); angle = float(pos) · inv_freq[i] in fp32 (the Rust
//   reference makes the same f32 product), reduced in double to turns of pi, then sincospif (no local memory).
//   Bytes: 4 per pair read + written.
// head_bmm_bf16: out[t, h, j] = Σ_i x[t, h, i] · w[off + h·ws_h + i·ws_i + j·ws_j], fp32 accumulate, bf16 out. One
//   CTA per (head, 16-token tile, 128-column tile); the 16 x rows of the head are staged in smem, 512 columns at a
//   time; each thread owns one column j and walks i in order (deterministic). Flops: 2·t·h·k·n. SIMT: this is the
//   W_UK/W_UV absorption, a small share of a decode step.
// cache_append_bf16: one CTA per token copies a width-wide row into its paged-cache slot; the slot is recomputed and
//   bounds-checked on the device (block id < num_blocks, position within the table), so a bad table never writes
//   out of bounds (the host validates too when it can).
//
// r1k: portable
#include <cuda_bf16.h>
#include <stdint.h>

#include "common/decode_ops_params.cuh"

namespace dp = r1k_decode_ops_params;

// Pointers that alias nothing else are copied into __restrict__ locals: a struct member cannot carry the qualifier,
// and the loads need it to take the read-only path (LDG.CONSTANT). rms_norm's x and y may alias, so only its weight is.

// One RmsNormParams (common/decode_ops_params.cuh). Normalizes the first d columns of each row. x and y may alias
// (in-place): each thread re-reads and writes only its own elements after the reduction. residual, when non-null,
// is added to x first and the sum is written back to residual_out (so "h = x + attn_out; y = norm(h)" is one pass).
extern "C" __global__ void __launch_bounds__(256) rms_norm_bf16(const __grid_constant__ dp::RmsNormParams p) {
    const int d = p.d;
    const __nv_bfloat16* __restrict__ weight = p.weight;
    __shared__ float warp_sums[8];
    const long long row = blockIdx.x;
    const __nv_bfloat16* xr = p.x + row * p.x_stride;
    auto load = [&](int c) {
        float v = __bfloat162float(xr[c]);
        if (p.residual != nullptr) {
            // Round the sum to bf16 first: the stored residual stream is bf16, and the norm must see what is stored.
            v = __bfloat162float(__float2bfloat16_rn(v + __bfloat162float(p.residual[row * d + c])));
        }
        return v;
    };
    // Pass 1: the row's largest magnitude, whose binary exponent e scales the sum of squares (x·2^-e has magnitude
    // below 1), so a row of huge finite values cannot overflow it and a row of tiny ones cannot underflow it. The
    // scaling is by a power of two: for every row whose squares stay normal in f32, every rounding below is the
    // unscaled computation's, shifted, and the result has the same bits.
    float amax = 0.0f;
    for (int c = threadIdx.x; c < d; c += blockDim.x) amax = fmaxf(amax, fabsf(load(c)));
#pragma unroll
    for (int mask = 16; mask > 0; mask >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, mask));
    if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = amax;
    __syncthreads();
#pragma unroll
    for (int w = 0; w < 8; ++w) amax = fmaxf(amax, warp_sums[w]);
    __syncthreads();  // every thread has read the maxima before the slots are reused for the sums
    int e = 0;
    if (amax > 0.0f && amax <= 3.4028235e38f) frexpf(amax, &e);
    float sum = 0.0f;
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        const float u = ldexpf(load(c), -e);
        sum = fmaf(u, u, sum);
    }
#pragma unroll
    for (int mask = 16; mask > 0; mask >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, mask);
    if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = sum;
    __syncthreads();
    float total = 0.0f;
#pragma unroll
    for (int w = 0; w < 8; ++w) total += warp_sums[w];
    // Correctly rounded sqrt and division (not rsqrtf, ~2 ulp) keep the normalized activations within one bf16 rounding
    // of the f64 reference, so router top-k choices do not flip on near-ties. eps joins the scaled sum as eps·2^-2e.
    const float inv = 1.0f / sqrtf(total / static_cast<float>(d) + ldexpf(p.eps, -2 * e));
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        const float v = load(c);
        if (p.residual_out != nullptr) p.residual_out[row * d + c] = __float2bfloat16_rn(v);
        p.y[row * p.y_stride + c] = __float2bfloat16_rn(ldexpf(v, -e) * inv * __bfloat162float(weight[c]));
    }
}

// One CopyColumnsParams: copies columns [src_col, src_col + width) of src [rows, src_len] to columns
// [dst_col, ...) of dst [rows, dst_len].
extern "C" __global__ void copy_columns_bf16(const __grid_constant__ dp::CopyColumnsParams p) {
    const __nv_bfloat16* __restrict__ src = p.src;
    __nv_bfloat16* __restrict__ dst = p.dst;
    const long long idx = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (idx >= p.rows * p.width) return;
    const long long r = idx / p.width;
    const int c = static_cast<int>(idx % p.width);
    dst[r * p.dst_len + p.dst_col + c] = src[r * p.src_len + p.src_col + c];
}

// One AddParams: out = a + b (bf16, rounded once).
extern "C" __global__ void add_bf16(const __grid_constant__ dp::AddParams p) {
    const __nv_bfloat16* __restrict__ a = p.a;
    const __nv_bfloat16* __restrict__ b = p.b;
    __nv_bfloat16* __restrict__ out = p.out;
    const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i < p.n) out[i] = __float2bfloat16_rn(__bfloat162float(a[i]) + __bfloat162float(b[i]));
}

// One RopeParams. x: [rows, row_len] bf16; rotates `count` slices of `dim` elements starting at `offset`, `stride`
// apart.
extern "C" __global__ void rope_bf16_inplace(const __grid_constant__ dp::RopeParams p) {
    __nv_bfloat16* __restrict__ x = p.x;
    const int* __restrict__ positions = p.positions;
    const float* __restrict__ inv_freq = p.inv_freq;
    const int half = p.dim / 2;
    const long long total = static_cast<long long>(p.rows) * p.count * half;
    const long long idx = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (idx >= total) return;
    const int i = static_cast<int>(idx % half);
    const int head = static_cast<int>((idx / half) % p.count);
    const long long row = idx / (static_cast<long long>(half) * p.count);
    const float angle = static_cast<float>(positions[row]) * inv_freq[i];
    // sin/cos of the f32 angle without sincosf, whose large-argument path (Payne-Hanek reduction) keeps a table in
    // local memory: reduce the angle in turns of pi in double (|turns| < 2^30, so the product's error stays below
    // 2^-23 turns), then sincospif on the reduced [-1, 1] value.
    const double turns = static_cast<double>(angle) * 0.318309886183790671538;  // 1/pi
    const double reduced = turns - 2.0 * rint(turns * 0.5);
    float s, c;
    sincospif(static_cast<float>(reduced), &s, &c);
    s *= p.scale;
    c *= p.scale;
    __nv_bfloat16* pair = x + row * p.row_len + p.offset + static_cast<long long>(head) * p.stride + 2 * i;
    const float a = __bfloat162float(pair[0]);
    const float b = __bfloat162float(pair[1]);
    pair[0] = __float2bfloat16_rn(a * c - b * s);
    pair[1] = __float2bfloat16_rn(a * s + b * c);
}

constexpr int kBmmTokens = 16;
constexpr int kBmmCols = 128;
// x is staged kBmmChunk columns at a time, so shared memory stays at 16·min(k, 512)·4 ≤ 32 KiB for any k (router
// logits have k = 7168). Accumulation order is still i = 0, 1, ..., k − 1. Twin: decode_ops::head_bmm_smem_bytes.
constexpr int kBmmChunk = 512;

// One HeadBmmParams. x: [t, heads, x_len] bf16, reads columns [x_col, x_col + k); w: bf16 with strides
// (ws_h, ws_i, ws_j) from w_offset; out: [t, heads, out_len] bf16 (or fp32 when out_f32, e.g. router logits), writes
// columns [out_col, out_col + n).
// Grid: (ceil(n/128), ceil(t/16), heads), block 128, dynamic smem 16·min(k, 512)·4 bytes.
extern "C" __global__ void __launch_bounds__(128) head_bmm_bf16(const __grid_constant__ dp::HeadBmmParams p) {
    const __nv_bfloat16* __restrict__ x = p.x;
    const __nv_bfloat16* __restrict__ w = p.w;
    void* __restrict__ out = p.out;
    const int heads = p.heads, k = p.k;
    extern __shared__ float xs[];  // [kBmmTokens][chunk]
    const int h = blockIdx.z;
    const int t0 = blockIdx.y * kBmmTokens;
    const int j = blockIdx.x * kBmmCols + threadIdx.x;
    const int tokens = min(kBmmTokens, p.t - t0);
    const bool active = j < p.n;  // no early return: every thread takes part in the chunk barriers
    float acc[kBmmTokens];
#pragma unroll
    for (int tt = 0; tt < kBmmTokens; ++tt) acc[tt] = 0.0f;
    const __nv_bfloat16* wp = w + p.w_offset + h * p.ws_h + (active ? j : 0) * p.ws_j;
    for (int i0 = 0; i0 < k; i0 += kBmmChunk) {
        const int chunk = min(kBmmChunk, k - i0);
        __syncthreads();  // the previous chunk has been consumed
        for (int e = threadIdx.x; e < tokens * chunk; e += blockDim.x) {
            const int tt = e / chunk, i = e % chunk;
            xs[e] = __bfloat162float(x[(static_cast<size_t>(t0 + tt) * heads + h) * p.x_len + p.x_col + i0 + i]);
        }
        __syncthreads();
        if (active) {
            for (int i = 0; i < chunk; ++i) {
                const float wv = __bfloat162float(wp[(i0 + i) * p.ws_i]);
#pragma unroll
                for (int tt = 0; tt < kBmmTokens; ++tt) acc[tt] = fmaf(xs[tt * chunk + i], wv, acc[tt]);
            }
        }
    }
    if (!active) return;
#pragma unroll
    for (int tt = 0; tt < kBmmTokens; ++tt) {
        if (tt >= tokens) continue;
        const size_t o = (static_cast<size_t>(t0 + tt) * heads + h) * p.out_len + p.out_col + j;
        if (p.out_f32)
            static_cast<float*>(out)[o] = acc[tt];
        else
            static_cast<__nv_bfloat16*>(out)[o] = __float2bfloat16_rn(acc[tt]);
    }
}

// One CacheAppendParams. rows: [t, width] bf16; cache: [num_blocks, page, width]; block_table: [batch, max_blocks].
extern "C" __global__ void cache_append_bf16(const __grid_constant__ dp::CacheAppendParams p) {
    const __nv_bfloat16* __restrict__ rows = p.rows;
    __nv_bfloat16* __restrict__ cache = p.cache;
    const int* __restrict__ block_table = p.block_table;
    const int* __restrict__ seq_ids = p.seq_ids;
    const int* __restrict__ positions = p.positions;
    const int r = blockIdx.x;
    const int seq = seq_ids[r];
    const int pos = positions[r];
    if (seq < 0 || seq >= p.batch || pos < 0 || pos / p.page >= p.max_blocks) return;
    const int block = block_table[static_cast<size_t>(seq) * p.max_blocks + pos / p.page];
    if (block < 0 || block >= p.num_blocks) return;
    __nv_bfloat16* dst = cache + (static_cast<size_t>(block) * p.page + pos % p.page) * p.width;
    const __nv_bfloat16* src = rows + static_cast<size_t>(r) * p.width;
    for (int c = threadIdx.x; c < p.width; c += blockDim.x) dst[c] = src[c];
}
