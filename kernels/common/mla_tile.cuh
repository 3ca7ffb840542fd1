// The sm_90a MLA tile pipeline shared by the wide decode kernels (kernels/mla_sm90.cu), the narrow ones
// (kernels/mla_narrow_sm90.cu) and their probes (kernels/probes_sm90.cu): the geometry of a 64-token K tile, the paged
// TMA producer for bf16 and FP8 caches, the FP8 dequantization and the fix-up of rows that hold no valid token. The
// layout formulas have Rust twins in src/mla/sm90.rs, unit-tested on the CPU.
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

#include "common/fp8.cuh"
#include "common/sm90/all.cuh"

namespace r1k {
namespace mla {

using namespace r1k::sm90;

constexpr int kTileN = 64;                              // tokens per K tile
constexpr int kBlocks = 9;                              // 576 / 64 column blocks
constexpr uint32_t kBlockBytes = 64 * 128;              // [64 rows][64 bf16], 128B-swizzled
constexpr uint32_t kTileBytes = kBlocks * kBlockBytes;  // 73,728
constexpr int kThreads = 256;                           // the wide kernel's CTA (2 warpgroups)
constexpr float kLn2 = 0.6931471805599453f;

// An FP8 tile arrives raw (codes [2][64][256 B], then scales [64][16 B], unswizzled) and is dequantized into a latent
// stage of 8 column blocks; its bf16 RoPE block is loaded swizzled into a block of its own.
constexpr uint32_t kLatentBytes = 8 * kBlockBytes;           // 65,536
constexpr uint32_t kRawCodesHalf = 64 * 256;                 // 16,384
constexpr uint32_t kRawBytes = 2 * kRawCodesHalf + 64 * 16;  // 33,792

struct SeqView {
    const int* table_row;  // block_table + b·max_blocks
    int page;
    int num_blocks;
    int tok_end;
};

// Page id of token `pos`, or -1 (past the end of the piece, or a bad table entry).
__device__ __forceinline__ int page_id(const SeqView& v, int pos) {
    if (pos >= v.tok_end) return -1;
    const int id = v.table_row[pos / v.page];
    return (id >= 0 && id < v.num_blocks) ? id : -1;
}

// Producer: issue the TMA boxes of the 64-token tile starting at t0 into `dst`, arming `bar` with the bytes issued.
__device__ __forceinline__ void issue_tile(const CUtensorMap* kv, const SeqView& v, int box_rows, int t0, uint8_t* dst,
                                           uint64_t* bar) {
    const int chunks = kTileN / box_rows;
    uint32_t bytes = 0;
    for (int c = 0; c < chunks; ++c) bytes += page_id(v, t0 + c * box_rows) >= 0 ? kBlocks * box_rows * 128u : 0u;
    mbar_arrive_expect_tx(bar, bytes);
    for (int c = 0; c < chunks; ++c) {
        const int pos = t0 + c * box_rows;
        const int id = page_id(v, pos);
        if (id < 0) continue;
        const int row = id * v.page + pos % v.page;
        for (int kb = 0; kb < kBlocks; ++kb)
            tma_load_2d(dst + kb * kBlockBytes + c * box_rows * 128, kv, bar, kb * 64, row);
    }
}

// FP8 producer: per valid chunk, codes as two 256-byte boxes, the 16 bytes of scales, and the RoPE block (bf16,
// swizzled) into its own double-buffered block.
__device__ __forceinline__ void issue_tile_fp8(const CUtensorMap* codes, const CUtensorMap* scales, const CUtensorMap* rope,
                                               const SeqView& v, int box_rows, int t0, uint8_t* raw,
                                               uint8_t* rope_dst, uint64_t* bar) {
    const int chunks = kTileN / box_rows;
    uint32_t bytes = 0;
    for (int c = 0; c < chunks; ++c) bytes += page_id(v, t0 + c * box_rows) >= 0 ? 656u * box_rows : 0u;
    mbar_arrive_expect_tx(bar, bytes);
    for (int c = 0; c < chunks; ++c) {
        const int pos = t0 + c * box_rows;
        const int id = page_id(v, pos);
        if (id < 0) continue;
        const int row = id * v.page + pos % v.page;
        const int r0 = c * box_rows;
        tma_load_2d(raw + r0 * 256, codes, bar, 0, row);
        tma_load_2d(raw + kRawCodesHalf + r0 * 256, codes, bar, 256, row);
        tma_load_2d(raw + 2 * kRawCodesHalf + r0 * 16, scales, bar, 512, row);
        tma_load_2d(rope_dst + r0 * 128, rope, bar, 0, row);
    }
}

// Dequantizes the raw FP8 stage into the (single) latent stage: bf16(code · scale), the value
// reference::mla::dequantize_kv_cache_fp8 defines; rows without a valid token become zeros (latent and RoPE).
// All 256 threads; the caller has made sure no MMA still reads the latent stage. Ends with a barrier.
template <int kT = kThreads>
__device__ __forceinline__ void dequant_tile(const SeqView& v, int box_rows, int t0, const uint8_t* raw,
                                             uint8_t* latent, uint8_t* rope, int tid) {
    for (int idx = tid; idx < kTileN * 32; idx += kT) {
        const int r = idx / 32;
        const int g = idx % 32;  // 16-code group: columns 16g .. 16g + 15
        const bool bad = t0 + r >= v.tok_end || page_id(v, t0 + (r / box_rows) * box_rows) < 0;
        uint32_t packed[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        if (!bad) {
            const uint4 raw_codes = *reinterpret_cast<const uint4*>(raw + (g / 16) * kRawCodesHalf + r * 256 + (g % 16) * 16);
            const float scale = *reinterpret_cast<const float*>(raw + 2 * kRawCodesHalf + r * 16 + (g / 8) * 4);
            const uint8_t* c8 = reinterpret_cast<const uint8_t*>(&raw_codes);
#pragma unroll
            for (int e = 0; e < 8; ++e)
                packed[e] = pack_bf16x2(r1k::e4m3_to_f32(c8[2 * e]) * scale, r1k::e4m3_to_f32(c8[2 * e + 1]) * scale);
        }
        uint8_t* blk = latent + (g / 4) * kBlockBytes;
        *reinterpret_cast<uint4*>(blk + swizzle_128b(r, (g % 4) * 32)) = make_uint4(packed[0], packed[1], packed[2], packed[3]);
        *reinterpret_cast<uint4*>(blk + swizzle_128b(r, (g % 4) * 32 + 16)) =
            make_uint4(packed[4], packed[5], packed[6], packed[7]);
    }
    for (int idx = tid; idx < kTileN * 8; idx += kT) {
        const int r = idx / 8;
        const bool bad = t0 + r >= v.tok_end || page_id(v, t0 + (r / box_rows) * box_rows) < 0;
        if (bad) *reinterpret_cast<uint4*>(rope + r * 128 + (idx % 8) * 16) = make_uint4(0, 0, 0, 0);
    }
    fence_proxy_async();
    named_barrier_sync(1, kT);
}

// True when every token row of the tile is a real token on a valid page (no fix-up needed).
__device__ __forceinline__ bool tile_clean(const SeqView& v, int box_rows, int t0) {
    if (t0 + kTileN > v.tok_end) return false;
    for (int c = 0; c < kTileN / box_rows; ++c)
        if (page_id(v, t0 + c * box_rows) < 0) return false;
    return true;
}

// Zeroes the token rows of a stage that hold no valid token (all 256 threads; ends with a barrier).
template <int kT = kThreads>
__device__ __forceinline__ void zero_bad_rows(const SeqView& v, int box_rows, int t0, uint8_t* stage, int tid) {
    for (int idx = tid; idx < kTileN * kBlocks * 8; idx += kT) {
        const int r = idx / (kBlocks * 8);
        const int rest = idx % (kBlocks * 8);
        const int kb = rest / 8;
        const int chunk = rest % 8;
        const int pos = t0 + r;
        const bool bad = pos >= v.tok_end || page_id(v, t0 + (r / box_rows) * box_rows) < 0;
        if (bad) *reinterpret_cast<uint4*>(stage + kb * kBlockBytes + r * 128 + chunk * 16) = make_uint4(0, 0, 0, 0);
    }
    fence_proxy_async();
    named_barrier_sync(1, kT);
}

}  // namespace mla
}  // namespace r1k
