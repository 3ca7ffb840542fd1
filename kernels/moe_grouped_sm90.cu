// Grouped FP8 GEMM for the MoE permuted layouts on the dense FP8 GEMM's machinery (sm_90a only): out[r, n] =
// sum_k a[r, k] w[e(r) N + n, k] sa[k/128, r] sw[e(r), n/128, k/128], bf16 out. Row r's expert e(r) is the segment
// of the device offsets [E + 1] containing it; only rows below offsets[e] + counts[e] (and the segment's end) are
// written. Contiguous and masked layouts are the same thing here (masked offsets are e * max_m); both need segment
// starts on multiples of 64 (what permute / masked_offsets produce), so a 64-row tile never spans two experts.
//
// Numbers (R valid rows, E_hit experts touched): flops = 2 R N K; minimum bytes = E_hit N K (weights) + R K +
// 4 R K/128 + 4 E_hit N K/16384 + 2 R N. The bench shape (8 x 4096 rows, N = 4096, K = 7168) is compute-bound.
//
// Tiling: 64 x 128 output tiles (BLOCK_M = 64: the segment granule; BLOCK_N = 128: N % 128 == 0, so a B box never
// crosses an expert and a tile uses one weight-scale block), BLOCK_K = 128 (one scale group, one promotion step).
//
// Pipeline (the crate's one FP8 mainloop, common/fp8_mainloop_sm90.cuh, that the dense GEMM runs too: TMA, mbarrier
// ring, QGMMA, per-128-K promotion; this file holds only the schedule and the store): persistent
// CTAs (grid = min(tiles, SMs)) of three warpgroups walk the tiles of the whole [capacity / 64] x [N / 128] grid in
// r1k::fp8_gemm::tile_coords' grouped order. For each tile every role looks up the expert from the device
// offsets/counts (r1k::moe_find_segment / moe_segment_valid_end) and skips tiles with no valid row; all roles
// compute the same sequence, so the stage/phase counters stay in step. The CTA's valid tiles alternate between two
// independent pipes (valid tile j goes to pipe j % 2): pipe p is math warpgroup p, lane 0 of warp p of the last
// (producer) warpgroup, and its own half of the `stages`-deep shared-memory ring. Two 64-row pipes instead of one
// 128-row tile because a 128-row tile may span two experts (segments are padded to 64 only); the pipes also overlap
// one warpgroup's promotion and epilogue with the other's wgmma. The producer thread issues per K block three TMA
// loads into stage s: A [64 x 128 B] at row m0, B [128 x 128 B] at row e N + n0 of the 2-D [E N, K] weight map
// (both 128-byte swizzled), and the 64 activation scales of the K block; completion on full[s] with expect_tx. The
// math warpgroup waits on full[s], issues four wgmma m64n128k32 (QGMMA), waits, releases the stage (one arrive per
// warp on empty[s]) and promotes fin += acc * sa * sw on the CUDA cores (sw read from global/L2). Epilogue:
// registers -> global bf16x2; rows past the expert's valid end are not stored. 384 threads cap registers at 168
// (no setmaxnreg needed). Every mbarrier wait traps after 10 s instead of hanging.
//
// Not done: TMA multicast, a TMA-store epilogue, a device-side compacted tile list (CTAs stride over skipped tiles
// too, which costs two short lookups each), 128-row tiles when the layout guarantees 128-row segments.
//
// r1k-sass: moe_grouped_gemm_fp8_sm90_tma QGMMA
#include <cuda_bf16.h>

#include "common/fp8_mainloop_sm90.cuh"
#include "common/moe.cuh"
#include "common/moe_params.cuh"

namespace {

using namespace r1k::fp8_gemm;
using namespace r1k::sm90;

constexpr int BM = 64;
constexpr int BN = 128;
constexpr uint32_t kPipes = 2;  // twin: moe::TMA_PIPES (the launch has 128 (kPipes + 1) threads)

// Twin of moe::tma_tile_work: the tile's expert and valid-row end, or false when the tile has no valid row.
__device__ __forceinline__ bool tile_work(uint32_t item, uint32_t tiles_m, uint32_t tiles_n,
                                          const r1k_moe_params::GroupedGemmParams& p, uint32_t& tm, uint32_t& tn,
                                          int& e, long long& valid_end) {
    tile_coords(item, tiles_m, tiles_n, p.group_m, tm, tn);
    const long long m0 = static_cast<long long>(tm) * BM;
    e = r1k::moe_find_segment(p.offsets, p.num_experts, m0);
    if (e >= p.num_experts) return false;
    valid_end = r1k::moe_segment_valid_end(p.offsets, p.counts, e, p.rows);
    return m0 < valid_end;
}

}  // namespace

// Schedule: the CTA's valid tiles (grouped order over the whole [capacity / 64] x [N / 128] grid, tiles without a
// valid row skipped by every role alike) alternate between the two pipes; B rows start at the expert's e N.
extern "C" __global__ void __launch_bounds__(384, 1)
    moe_grouped_gemm_fp8_sm90_tma(const __grid_constant__ CUtensorMap tm_a, const __grid_constant__ CUtensorMap tm_b,
                                  const __grid_constant__ CUtensorMap tm_sa,
                                  const __grid_constant__ r1k_moe_params::GroupedGemmParams p) {
    extern __shared__ uint8_t smem_raw[];
    const Ring<BM, BN> ring(smem_raw, p.stages);

    const uint32_t tiles_m = static_cast<uint32_t>((p.rows + BM - 1) / BM);
    const uint32_t tiles_n = p.n / BN;
    const uint32_t num_tiles = tiles_m * tiles_n;
    const int k_blocks = p.k / kBlockK;
    const int n_blocks = p.n / kBlockK;
    const int wg = threadIdx.x / 128;
    // Pipe q (0 or 1) owns stages [q * per_pipe, (q + 1) * per_pipe) of the ring, math warpgroup q and producer warp
    // q of the last warpgroup; it takes the CTA's valid tiles of parity q (counted in schedule order).
    const uint32_t per_pipe = p.stages / kPipes;

    if (threadIdx.x == 0) ring.init_barriers(p.stages, 4);
    __syncthreads();

    if (wg == kPipes) {
        const uint32_t q = (threadIdx.x % 128) / 32;
        if (q < kPipes && threadIdx.x % 32 == 0) {
            tma_prefetch_desc(&tm_a);
            tma_prefetch_desc(&tm_b);
            tma_prefetch_desc(&tm_sa);
            Pipe pipe{q * per_pipe, per_pipe, 0};
            uint32_t valid = 0;
            for (uint32_t item = blockIdx.x; item < num_tiles; item += gridDim.x) {
                uint32_t tm, tn;
                int e;
                long long valid_end;
                if (!tile_work(item, tiles_m, tiles_n, p, tm, tn, e, valid_end)) continue;
                if (valid++ % kPipes != q) continue;
                load_item<BM, BN>(ring, pipe, &tm_a, &tm_b, &tm_sa, 0, k_blocks, tm * BM, e * p.n + tn * BN);
            }
        }
        return;
    }

    const uint32_t q = wg;
    const int t = threadIdx.x % 128;
    const int row_in_tile = (t / 32) * 16 + (t % 32) / 4;
    float acc[BN / 2];
    float fin[BN / 2];
#pragma unroll
    for (int i = 0; i < BN / 2; ++i) acc[i] = 0.0f;
    Pipe pipe{q * per_pipe, per_pipe, 0};
    uint32_t valid = 0;
    for (uint32_t item = blockIdx.x; item < num_tiles; item += gridDim.x) {
        uint32_t tm, tn;
        int e;
        long long valid_end;
        if (!tile_work(item, tiles_m, tiles_n, p, tm, tn, e, valid_end)) continue;
        if (valid++ % kPipes != q) continue;
        const uint32_t n0 = tn * BN;
        // One weight-scale block per tile (N % 128 == 0 and BN = 128).
        const float* sw_row = p.w_scales + (static_cast<int64_t>(e) * n_blocks + n0 / kBlockK) * k_blocks;
        mma_item<BM, BN>(
            ring, pipe, 0, k_blocks, 0, row_in_tile, n0, acc, fin,
            [sw_row](int kb, float& sb0, float& sb1) { sb0 = sb1 = __ldg(sw_row + kb); },
            [](uint64_t* empty) { mbar_arrive(empty); });
        const long long r0 = static_cast<long long>(tm) * BM + row_in_tile;
        for_each_output_pair<BN>(fin, r0, n0, valid_end, p.n, [&](long long r, int col, float x, float y) {
            *reinterpret_cast<__nv_bfloat162*>(p.out + r * p.n + col) = __floats2bfloat162_rn(x, y);
        });
    }
}
