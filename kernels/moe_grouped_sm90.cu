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
// Pipeline (the machinery of kernels/fp8_gemm_sm90.cu: TMA, mbarrier ring, QGMMA, per-128-K promotion): persistent
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

#include "common/fp8_gemm_sm90.cuh"
#include "common/moe.cuh"
#include "common/moe_params.cuh"

namespace {

using namespace r1k::fp8_gemm;
using namespace r1k::sm90;

constexpr int BM = 64;
constexpr int BN = 128;
constexpr uint32_t kATile = BM * kBlockK;
constexpr uint32_t kBTile = BN * kBlockK;
constexpr uint32_t kStageTx = kATile + kBTile + BM * 4;
constexpr uint32_t kPipes = 2;  // twin: moe::TMA_PIPES (the launch has 128 (kPipes + 1) threads)

// Twin of moe::tma_tile_work: the tile's expert and valid-row end, or false when the tile has no valid row.
__device__ __forceinline__ bool tile_work(uint32_t item, uint32_t tiles_m, uint32_t tiles_n, uint32_t group_m,
                                          const long long* __restrict__ offsets, const int* __restrict__ counts,
                                          int num_experts, long long rows, uint32_t& tm, uint32_t& tn, int& e,
                                          long long& valid_end) {
    tile_coords(item, tiles_m, tiles_n, group_m, tm, tn);
    const long long m0 = static_cast<long long>(tm) * BM;
    e = r1k::moe_find_segment(offsets, num_experts, m0);
    if (e >= num_experts) return false;
    valid_end = r1k::moe_segment_valid_end(offsets, counts, e, rows);
    return m0 < valid_end;
}

}  // namespace

extern "C" __global__ void __launch_bounds__(384, 1)
    moe_grouped_gemm_fp8_sm90_tma(const __grid_constant__ CUtensorMap tm_a, const __grid_constant__ CUtensorMap tm_b,
                                  const __grid_constant__ CUtensorMap tm_sa,
                                  const __grid_constant__ r1k_moe_params::GroupedGemmParams p) {
    const float* __restrict__ sw = p.w_scales;
    const long long* __restrict__ offsets = p.offsets;
    const int* __restrict__ counts = p.counts;
    __nv_bfloat16* __restrict__ out = p.out;
    const long long rows = p.rows;
    const int n = p.n, k = p.k, num_experts = p.num_experts, stages = p.stages, group_m = p.group_m;
    extern __shared__ uint8_t smem_raw[];
    const uint32_t raw = smem_u32(smem_raw);
    uint8_t* base = smem_raw + (((raw + 1023u) & ~1023u) - raw);
    uint8_t* a_ring = base;
    uint8_t* b_ring = base + stages * kATile;
    float* sa_ring = reinterpret_cast<float*>(base + stages * (kATile + kBTile));
    uint64_t* full = reinterpret_cast<uint64_t*>(base + stages * kStageTx);
    uint64_t* empty = full + stages;

    const uint32_t tiles_m = static_cast<uint32_t>((rows + BM - 1) / BM);
    const uint32_t tiles_n = n / BN;
    const uint32_t num_tiles = tiles_m * tiles_n;
    const int k_blocks = k / kBlockK;
    const int n_blocks = n / kBlockK;
    const int wg = threadIdx.x / 128;
    // Pipe p (0 or 1) owns stages [p * per_pipe, (p + 1) * per_pipe) of the ring, math warpgroup p and producer warp
    // p of the last warpgroup; it takes the CTA's valid tiles of parity p (counted in schedule order).
    const uint32_t per_pipe = stages / kPipes;

    if (threadIdx.x == 0) {
        for (int s = 0; s < stages; ++s) {
            mbar_init(&full[s], 1);
            mbar_init(&empty[s], 4);
        }
        mbar_init_fence();
    }
    __syncthreads();

    if (wg == kPipes) {
        const uint32_t pipe = (threadIdx.x % 128) / 32;
        if (pipe < kPipes && threadIdx.x % 32 == 0) {
            tma_prefetch_desc(&tm_a);
            tma_prefetch_desc(&tm_b);
            tma_prefetch_desc(&tm_sa);
            uint32_t it = 0, valid = 0;
            for (uint32_t item = blockIdx.x; item < num_tiles; item += gridDim.x) {
                uint32_t tm, tn;
                int e;
                long long valid_end;
                if (!tile_work(item, tiles_m, tiles_n, group_m, offsets, counts, num_experts, rows, tm, tn, e,
                               valid_end)) {
                    continue;
                }
                if (valid++ % kPipes != pipe) continue;
                const int b_row = e * n + static_cast<int>(tn) * BN;
                for (int kb = 0; kb < k_blocks; ++kb, ++it) {
                    const uint32_t s = pipe * per_pipe + it % per_pipe;
                    const uint32_t phase = (it / per_pipe) & 1u;
                    mbar_wait(&empty[s], phase ^ 1u);
                    mbar_arrive_expect_tx(&full[s], kStageTx);
                    tma_load_2d(a_ring + s * kATile, &tm_a, &full[s], kb * kBlockK, tm * BM);
                    tma_load_2d(b_ring + s * kBTile, &tm_b, &full[s], kb * kBlockK, b_row);
                    tma_load_2d(sa_ring + s * BM, &tm_sa, &full[s], tm * BM, kb);
                }
            }
        }
        return;
    }

    const uint32_t pipe = wg;
    const int t = threadIdx.x % 128;
    const int warp = t / 32, lane = t % 32;
    const int row_in_tile = warp * 16 + lane / 4;
    float acc[BN / 2];
    float fin[BN / 2];
#pragma unroll
    for (int i = 0; i < BN / 2; ++i) acc[i] = 0.0f;
    uint32_t it = 0, valid = 0;
    for (uint32_t item = blockIdx.x; item < num_tiles; item += gridDim.x) {
        uint32_t tm, tn;
        int e;
        long long valid_end;
        if (!tile_work(item, tiles_m, tiles_n, group_m, offsets, counts, num_experts, rows, tm, tn, e, valid_end)) {
            continue;
        }
        if (valid++ % kPipes != pipe) continue;
        const uint32_t n0 = tn * BN;
        const float* sw_row = sw + (static_cast<int64_t>(e) * n_blocks + n0 / kBlockK) * k_blocks;
#pragma unroll
        for (int i = 0; i < BN / 2; ++i) fin[i] = 0.0f;
        for (int kb = 0; kb < k_blocks; ++kb, ++it) {
            const uint32_t s = pipe * per_pipe + it % per_pipe;
            const uint32_t phase = (it / per_pipe) & 1u;
            const float swv = __ldg(sw_row + kb);
            mbar_wait(&full[s], phase);
            const float sa0 = sa_ring[s * BM + row_in_tile];
            const float sa1 = sa_ring[s * BM + row_in_tile + 8];
            const uint32_t a_addr = smem_u32(a_ring + s * kATile);
            const uint32_t b_addr = smem_u32(b_ring + s * kBTile);
            fence_regs(acc);
            wgmma_fence();
#pragma unroll
            for (int j = 0; j < kBlockK / 32; ++j) {
                WgmmaE4m3<BN>::mma(acc, kmajor_sw128_desc(a_addr, 32 * j), kmajor_sw128_desc(b_addr, 32 * j), j);
            }
            wgmma_commit();
            wgmma_wait_all();
            fence_regs(acc);
            __syncwarp();
            if (lane == 0) mbar_arrive(&empty[s]);
            promote<BN>(fin, acc, sa0, sa1, swv, swv, n0);
        }

        const long long r0 = static_cast<long long>(tm) * BM + row_in_tile;
#pragma unroll
        for (int i = 0; i < BN / 8; ++i) {
            const int col = n0 + 8 * i + 2 * (lane % 4);
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const long long r = r0 + 8 * h;
                if (r >= valid_end) continue;
                *reinterpret_cast<__nv_bfloat162*>(out + r * n + col) =
                    __floats2bfloat162_rn(fin[4 * i + 2 * h], fin[4 * i + 2 * h + 1]);
            }
        }
    }
}
