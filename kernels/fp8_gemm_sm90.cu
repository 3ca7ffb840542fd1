// FP8 block-scaled GEMM for Hopper (sm_90a only): D[m,n] = sum_k A[m,k] B[n,k] sa[m,k/128] sb[n/128,k/128], A and
// B E4M3 K-major ("NT"), sa MN-major [ceil(k/128), m_pad] (fp32), sb row-major [ceil(n/128), ceil(k/128)] (fp32).
// bf16 output, or fp32 D = C + A.B in place when `accumulate` is set.
//
// Numbers: flops = 2mnk; minimum bytes = mk + nk + 4(m_pad + ceil(n/128)) ceil(k/128) + 2mn (8mn accumulating).
// At m = 4096, n = 7168, k = 16384 that is 962 TFLOP against 0.2 GB: compute-bound; at m <= 128 the nk bytes of B
// dominate and the kernel is bound by streaming B.
//
// Tiling: BLOCK_M x BLOCK_N output tiles with BLOCK_K = 128 (one scale group, one promotion step). BLOCK_M = 64
// (one math warpgroup, small m) or 128 (two math warpgroups, 64 rows each); BLOCK_N in {64, 112, 128, 160} chosen
// on the host (src/fp8_gemm/plan.rs) to fill the 132 SMs' waves, non-powers of two included.
//
// Pipeline: persistent CTAs (grid = min(tiles, SMs)) walk tiles in the grouped order of r1k::fp8_gemm::tile_coords. Warp
// specialization: the last warpgroup is the producer (setmaxnreg.dec to 40 when BLOCK_M = 128); one of its threads
// issues, per K block, three TMA loads (A tile [BLOCK_M x 128 B] and B tile [BLOCK_N x 128 B], both 128-byte
// swizzled, plus the BLOCK_M activation scales of that K block) into stage s of a `stages`-deep shared-memory ring,
// completing on full[s] (expect_tx). The math warpgroups (setmaxnreg.inc to 232 when BLOCK_M = 128) wait on full[s],
// issue four wgmma m64nBLOCK_Nk32 from shared-memory descriptors (the K step advances the descriptor's start address
// by 32 B inside the swizzle atom), wait for them, release the stage (one arrive per warp on empty[s]) and promote:
// fin += acc * sa * sb on the CUDA cores (acc restarts every K block, so the tensor cores' ~14-bit accumulation
// never spans more than 128 of K). sb comes straight from global/L2 (two values per K block: a tile touches at most
// two 128-row scale blocks, which the host checks for each BLOCK_N). Epilogue: registers -> global (bf16x2 or
// float2), guarded by m and n; the producer keeps prefetching the next tile meanwhile.
// Split-K (host-chosen for grids that would leave most SMs idle, i.e. small m): work items are (tile, K range);
// each writes an fp32 partial tile to a workspace [k_splits, m, n] and fp8_gemm_splitk_reduce sums the splits in
// order (no atomics, bitwise reproducible).
// Every mbarrier wait traps after 10 s (r1k::sm90::mbar_wait): a pipeline bug fails the launch instead of hanging.
//
// Opt-in 2-CTA cluster variant (fp8_gemm_sm90_mc2_*, launched with cuLaunchKernelEx and a cluster dimension of
// (2, 1, 1)): the two CTAs of a cluster compute vertically adjacent tiles (tile rows 2p and 2p + 1) of the same
// n-block, so they need the same B tile; each loads half of it (BLOCK_N / 2 rows) and multicasts it into both CTAs'
// ring, halving B's L2 -> SM traffic. Both CTAs walk the same sequence of tile pairs (twin: plan::mc2_pair_coords),
// so they always agree on the n-block; a CTA whose tile row is past m (odd tile-row count) still runs the pipeline
// (its A box is zero-filled by TMA, its half of B is needed by the peer) and only skips the stores. Each CTA's full
// barrier expects its A and sa bytes plus both B halves; each empty barrier counts the consumer warps of both CTAs
// (remote arrives through mapa), so no producer multicasts into a stage the peer still reads. Cluster barriers after
// the mbarrier init and before exit keep a CTA from exiting while its peer may still write its shared memory.
//
// Not done: a shared-memory + TMA-store epilogue, overlapping the promotion of
// block i with the wgmma of block i+1 (the math warpgroup waits for its wgmmas before promoting).
//
// r1k-sass: fp8_gemm_sm90_m64n64 QGMMA
// r1k-sass: fp8_gemm_sm90_m64n112 QGMMA
// r1k-sass: fp8_gemm_sm90_m64n128 QGMMA
// r1k-sass: fp8_gemm_sm90_m64n160 QGMMA
// r1k-sass: fp8_gemm_sm90_m128n64 QGMMA
// r1k-sass: fp8_gemm_sm90_m128n112 QGMMA
// r1k-sass: fp8_gemm_sm90_m128n128 QGMMA
// r1k-sass: fp8_gemm_sm90_m128n160 QGMMA
// r1k-sass: fp8_gemm_sm90_mc2_m128n128 QGMMA
// r1k-sass: fp8_gemm_sm90_mc2_m128n160 QGMMA
#include <cuda_bf16.h>

#include "common/fp8_gemm_params.cuh"
#include "common/fp8_gemm_sm90.cuh"

namespace {

using namespace r1k::fp8_gemm;
using namespace r1k::sm90;

// Output modes (twin: src/fp8_gemm/sm90.rs OutputMode).
constexpr int kModeBf16 = 0;            // out: bf16 [m, n] = D
constexpr int kModeF32Accumulate = 1;   // out: fp32 [m, n] += D
constexpr int kModeF32Partial = 2;      // out: fp32 [k_splits, m, n], split s's partial D at [s]

template <int BM, int BN>
__device__ __forceinline__ void gemm_body(const CUtensorMap* tm_a, const CUtensorMap* tm_b, const CUtensorMap* tm_sa,
                                          const float* __restrict__ sb, void* out, int m, int n, int k, int stages,
                                          int group_m, int mode, int k_splits, int kb_per_split) {
    constexpr int kMathWG = BM / 64;
    constexpr uint32_t kATile = BM * kBlockK;
    constexpr uint32_t kBTile = BN * kBlockK;
    constexpr uint32_t kStageTx = kATile + kBTile + BM * 4;

    extern __shared__ uint8_t smem_raw[];
    const uint32_t raw = smem_u32(smem_raw);
    uint8_t* base = smem_raw + (((raw + 1023u) & ~1023u) - raw);
    uint8_t* a_ring = base;
    uint8_t* b_ring = base + stages * kATile;
    float* sa_ring = reinterpret_cast<float*>(base + stages * (kATile + kBTile));
    uint64_t* full = reinterpret_cast<uint64_t*>(base + stages * kStageTx);
    uint64_t* empty = full + stages;

    const uint32_t tiles_m = (m + BM - 1) / BM;
    const uint32_t tiles_n = (n + BN - 1) / BN;
    const uint32_t num_tiles = tiles_m * tiles_n;
    const uint32_t num_items = num_tiles * k_splits;
    const int k_blocks = (k + kBlockK - 1) / kBlockK;
    const int n_blocks = (n + kBlockK - 1) / kBlockK;
    const int wg = threadIdx.x / 128;

    if (threadIdx.x == 0) {
        for (int s = 0; s < stages; ++s) {
            mbar_init(&full[s], 1);
            mbar_init(&empty[s], kMathWG * 4);
        }
        mbar_init_fence();
    }
    __syncthreads();

    // Register rebalancing only where it is needed: with two math warpgroups the 384-thread launch caps every
    // thread at 168 registers, and the math warpgroups take the producer's surplus (168 -> 40 frees exactly what
    // 168 -> 232 needs for 256 threads). With one math warpgroup the 256-thread launch already allows what the math
    // path needs, and an .inc to the current count is not something to rely on.
    if (wg == kMathWG) {
        if constexpr (kMathWG == 2) setmaxnreg_dec<40>();
        if (threadIdx.x % 128 == 0) {
            tma_prefetch_desc(tm_a);
            tma_prefetch_desc(tm_b);
            tma_prefetch_desc(tm_sa);
            uint32_t it = 0;
            for (uint32_t item = blockIdx.x; item < num_items; item += gridDim.x) {
                uint32_t tm, tn;
                tile_coords(item / k_splits, tiles_m, tiles_n, group_m, tm, tn);
                const int kb_begin = (item % k_splits) * kb_per_split;
                const int kb_end = min(k_blocks, kb_begin + kb_per_split);
                for (int kb = kb_begin; kb < kb_end; ++kb, ++it) {
                    const uint32_t s = it % stages;
                    const uint32_t phase = (it / stages) & 1u;
                    mbar_wait(&empty[s], phase ^ 1u);
                    mbar_arrive_expect_tx(&full[s], kStageTx);
                    tma_load_2d(a_ring + s * kATile, tm_a, &full[s], kb * kBlockK, tm * BM);
                    tma_load_2d(b_ring + s * kBTile, tm_b, &full[s], kb * kBlockK, tn * BN);
                    tma_load_2d(sa_ring + s * BM, tm_sa, &full[s], tm * BM, kb);
                }
            }
        }
        return;
    }

    if constexpr (kMathWG == 2) setmaxnreg_inc<232>();
    const int t = threadIdx.x % 128;
    const int warp = t / 32, lane = t % 32;
    const int row_in_tile = wg * 64 + warp * 16 + lane / 4;
    float acc[BN / 2];
    float fin[BN / 2];
#pragma unroll
    for (int i = 0; i < BN / 2; ++i) acc[i] = 0.0f;
    uint32_t it = 0;
    for (uint32_t item = blockIdx.x; item < num_items; item += gridDim.x) {
        uint32_t tm, tn;
        tile_coords(item / k_splits, tiles_m, tiles_n, group_m, tm, tn);
        const uint32_t split = item % k_splits;
        const int kb_begin = split * kb_per_split;
        const int kb_end = min(k_blocks, kb_begin + kb_per_split);
        const uint32_t n0 = tn * BN;
        const int nb0 = n0 / kBlockK;
        const int nb1 = min(nb0 + 1, n_blocks - 1);
#pragma unroll
        for (int i = 0; i < BN / 2; ++i) fin[i] = 0.0f;
        for (int kb = kb_begin; kb < kb_end; ++kb, ++it) {
            const uint32_t s = it % stages;
            const uint32_t phase = (it / stages) & 1u;
            const float sb0 = __ldg(sb + static_cast<int64_t>(nb0) * k_blocks + kb);
            const float sb1 = __ldg(sb + static_cast<int64_t>(nb1) * k_blocks + kb);
            mbar_wait(&full[s], phase);
            const float sa0 = sa_ring[s * BM + row_in_tile];
            const float sa1 = sa_ring[s * BM + row_in_tile + 8];
            const uint32_t a_addr = smem_u32(a_ring + s * kATile) + wg * 64 * kBlockK;
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
            promote<BN>(fin, acc, sa0, sa1, sb0, sb1, n0);
        }

        const int r0 = tm * BM + row_in_tile;
#pragma unroll
        for (int i = 0; i < BN / 8; ++i) {
            const int col = n0 + 8 * i + 2 * (lane % 4);
            if (col >= n) continue;
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int r = r0 + 8 * h;
                if (r >= m) continue;
                const int64_t o = static_cast<int64_t>(r) * n + col;
                if (mode == kModeF32Partial) {
                    float* p = static_cast<float*>(out) + static_cast<int64_t>(split) * m * n + o;
                    *reinterpret_cast<float2*>(p) = make_float2(fin[4 * i + 2 * h], fin[4 * i + 2 * h + 1]);
                } else if (mode == kModeF32Accumulate) {
                    float2* p = reinterpret_cast<float2*>(static_cast<float*>(out) + o);
                    float2 c = *p;
                    c.x += fin[4 * i + 2 * h];
                    c.y += fin[4 * i + 2 * h + 1];
                    *p = c;
                } else {
                    *reinterpret_cast<__nv_bfloat162*>(static_cast<__nv_bfloat16*>(out) + o) =
                        __floats2bfloat162_rn(fin[4 * i + 2 * h], fin[4 * i + 2 * h + 1]);
                }
            }
        }
    }
}

// 2-CTA cluster variant (see the design note): BM = 128 (two math warpgroups + a producer warpgroup), no split-K,
// output mode bf16 or fp32 accumulate. tm_b's box is BN / 2 rows (one half of the B tile).
template <int BN>
__device__ __forceinline__ void mc2_body(const CUtensorMap* tm_a, const CUtensorMap* tm_b, const CUtensorMap* tm_sa,
                                         const float* __restrict__ sb, void* out, int m, int n, int k, int stages,
                                         int group_pairs, int mode) {
    constexpr int BM = 128;
    constexpr int kMathWG = 2;
    constexpr uint32_t kATile = BM * kBlockK;
    constexpr uint32_t kBTile = BN * kBlockK;
    constexpr uint32_t kBHalf = kBTile / 2;
    static_assert(kBHalf % 1024 == 0, "each B half must start on a 128-byte swizzle atom");
    constexpr uint32_t kStageTx = kATile + kBTile + BM * 4;

    extern __shared__ uint8_t smem_raw[];
    const uint32_t raw = smem_u32(smem_raw);
    uint8_t* base = smem_raw + (((raw + 1023u) & ~1023u) - raw);
    uint8_t* a_ring = base;
    uint8_t* b_ring = base + stages * kATile;
    float* sa_ring = reinterpret_cast<float*>(base + stages * (kATile + kBTile));
    uint64_t* full = reinterpret_cast<uint64_t*>(base + stages * kStageTx);
    uint64_t* empty = full + stages;

    const uint32_t rank = cluster_ctarank();
    const uint32_t peer = rank ^ 1u;
    const uint32_t tiles_m = (m + BM - 1) / BM;
    const uint32_t tiles_n = (n + BN - 1) / BN;
    const uint32_t num_pairs = (tiles_m + 1) / 2 * tiles_n;
    const int k_blocks = (k + kBlockK - 1) / kBlockK;
    const int n_blocks = (n + kBlockK - 1) / kBlockK;
    const int wg = threadIdx.x / 128;

    if (threadIdx.x == 0) {
        for (int s = 0; s < stages; ++s) {
            mbar_init(&full[s], 1);
            mbar_init(&empty[s], 2 * kMathWG * 4);
        }
        mbar_init_fence();
    }
    // The peer multicasts into our full barriers and arrives on our empty barriers: both must be initialized
    // cluster-wide before either CTA issues anything.
    cluster_sync();

    if (wg == kMathWG) {
        setmaxnreg_dec<40>();
        if (threadIdx.x % 128 == 0) {
            tma_prefetch_desc(tm_a);
            tma_prefetch_desc(tm_b);
            tma_prefetch_desc(tm_sa);
            uint32_t it = 0;
            for (uint32_t pair = cluster_id_x(); pair < num_pairs; pair += cluster_count_x()) {
                uint32_t tm, tn;
                mc2_pair_coords(pair, rank, tiles_m, tiles_n, group_pairs, tm, tn);
                for (int kb = 0; kb < k_blocks; ++kb, ++it) {
                    const uint32_t s = it % stages;
                    const uint32_t phase = (it / stages) & 1u;
                    // Completes only when the consumers of both CTAs released stage s: our half of B lands in both.
                    mbar_wait(&empty[s], phase ^ 1u);
                    mbar_arrive_expect_tx(&full[s], kStageTx);
                    tma_load_2d(a_ring + s * kATile, tm_a, &full[s], kb * kBlockK, tm * BM);
                    tma_load_2d_multicast(b_ring + s * kBTile + rank * kBHalf, tm_b, &full[s], kb * kBlockK,
                                          tn * BN + rank * (BN / 2), 0x3);
                    tma_load_2d(sa_ring + s * BM, tm_sa, &full[s], tm * BM, kb);
                }
            }
        }
    } else {
        setmaxnreg_inc<232>();
        const int t = threadIdx.x % 128;
        const int warp = t / 32, lane = t % 32;
        const int row_in_tile = wg * 64 + warp * 16 + lane / 4;
        float acc[BN / 2];
        float fin[BN / 2];
#pragma unroll
        for (int i = 0; i < BN / 2; ++i) acc[i] = 0.0f;
        uint32_t it = 0;
        for (uint32_t pair = cluster_id_x(); pair < num_pairs; pair += cluster_count_x()) {
            uint32_t tm, tn;
            mc2_pair_coords(pair, rank, tiles_m, tiles_n, group_pairs, tm, tn);
            const uint32_t n0 = tn * BN;
            const int nb0 = n0 / kBlockK;
            const int nb1 = min(nb0 + 1, n_blocks - 1);
#pragma unroll
            for (int i = 0; i < BN / 2; ++i) fin[i] = 0.0f;
            for (int kb = 0; kb < k_blocks; ++kb, ++it) {
                const uint32_t s = it % stages;
                const uint32_t phase = (it / stages) & 1u;
                const float sb0 = __ldg(sb + static_cast<int64_t>(nb0) * k_blocks + kb);
                const float sb1 = __ldg(sb + static_cast<int64_t>(nb1) * k_blocks + kb);
                mbar_wait(&full[s], phase);
                const float sa0 = sa_ring[s * BM + row_in_tile];
                const float sa1 = sa_ring[s * BM + row_in_tile + 8];
                const uint32_t a_addr = smem_u32(a_ring + s * kATile) + wg * 64 * kBlockK;
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
                if (lane == 0) {
                    mbar_arrive(&empty[s]);
                    mbar_arrive_cluster(&empty[s], peer);
                }
                promote<BN>(fin, acc, sa0, sa1, sb0, sb1, n0);
            }

            const int r0 = tm * BM + row_in_tile;
#pragma unroll
            for (int i = 0; i < BN / 8; ++i) {
                const int col = n0 + 8 * i + 2 * (lane % 4);
                if (col >= n) continue;
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int r = r0 + 8 * h;
                    if (r >= m) continue;
                    const int64_t o = static_cast<int64_t>(r) * n + col;
                    if (mode == kModeF32Accumulate) {
                        float2* p = reinterpret_cast<float2*>(static_cast<float*>(out) + o);
                        float2 c = *p;
                        c.x += fin[4 * i + 2 * h];
                        c.y += fin[4 * i + 2 * h + 1];
                        *p = c;
                    } else {
                        *reinterpret_cast<__nv_bfloat162*>(static_cast<__nv_bfloat16*>(out) + o) =
                            __floats2bfloat162_rn(fin[4 * i + 2 * h], fin[4 * i + 2 * h + 1]);
                    }
                }
            }
        }
    }
    // The peer's consumers may still arrive on our empty barriers (and, symmetrically, we on theirs): nobody leaves
    // before both CTAs are done with the ring.
    cluster_sync();
}

}  // namespace

// The tensor maps, then every other argument in one struct (common/fp8_gemm_params.cuh).
#define R1K_GEMM_ENTRY(BM, BN)                                                                                     \
    extern "C" __global__ void __launch_bounds__((BM / 64 + 1) * 128, 1) fp8_gemm_sm90_m##BM##n##BN(             \
        const __grid_constant__ CUtensorMap tm_a, const __grid_constant__ CUtensorMap tm_b,                        \
        const __grid_constant__ CUtensorMap tm_sa, const __grid_constant__ r1k_gemm_params::GemmParams p) {        \
        gemm_body<BM, BN>(&tm_a, &tm_b, &tm_sa, p.sb, p.out, p.m, p.n, p.k, p.stages, p.group, p.mode, p.k_splits, \
                          p.kb_per_split);                                                                         \
    }

R1K_GEMM_ENTRY(64, 64)
R1K_GEMM_ENTRY(64, 112)
R1K_GEMM_ENTRY(64, 128)
R1K_GEMM_ENTRY(64, 160)
R1K_GEMM_ENTRY(128, 64)
R1K_GEMM_ENTRY(128, 112)
R1K_GEMM_ENTRY(128, 128)
R1K_GEMM_ENTRY(128, 160)

// Cluster launch only (cuLaunchKernelEx, cluster dimension (2, 1, 1), grid a multiple of 2); see mc2_body.
// The same arguments as the one-CTA kernels (group = tile pairs per group; k_splits and kb_per_split unused).
#define R1K_GEMM_MC2_ENTRY(BN)                                                                                     \
    extern "C" __global__ void __launch_bounds__(384, 1) fp8_gemm_sm90_mc2_m128n##BN(                             \
        const __grid_constant__ CUtensorMap tm_a, const __grid_constant__ CUtensorMap tm_b,                        \
        const __grid_constant__ CUtensorMap tm_sa, const __grid_constant__ r1k_gemm_params::GemmParams p) {        \
        mc2_body<BN>(&tm_a, &tm_b, &tm_sa, p.sb, p.out, p.m, p.n, p.k, p.stages, p.group, p.mode);                 \
    }

R1K_GEMM_MC2_ENTRY(128)
R1K_GEMM_MC2_ENTRY(160)

// Split-K reduction: out[i] = sum over s = 0.. k_splits-1 of partial[s][i], in that order (deterministic), stored
// as bf16 (mode 0) or added into fp32 (mode 1). Two elements per thread (n is even), grid-stride. Numbers: reads
// 4 k_splits m n bytes, writes 2mn (bf16) or reads + writes 8mn (fp32). One SplitkReduceParams.
extern "C" __global__ void __launch_bounds__(256)
    fp8_gemm_splitk_reduce(const __grid_constant__ r1k_gemm_params::SplitkReduceParams p) {
    const float* __restrict__ partial = p.partial;
    const int k_splits = p.k_splits;
    const int64_t total = static_cast<int64_t>(p.m) * p.n;
    const int64_t pairs = total / 2;
    for (int64_t pair = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; pair < pairs;
         pair += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        float2 acc = reinterpret_cast<const float2*>(partial)[pair];
        for (int s = 1; s < k_splits; ++s) {
            const float2 v = reinterpret_cast<const float2*>(partial + s * total)[pair];
            acc.x += v.x;
            acc.y += v.y;
        }
        if (p.mode == kModeF32Accumulate) {
            float2* o = reinterpret_cast<float2*>(p.out) + pair;
            float2 c = *o;
            c.x += acc.x;
            c.y += acc.y;
            *o = c;
        } else {
            reinterpret_cast<__nv_bfloat162*>(p.out)[pair] = __floats2bfloat162_rn(acc.x, acc.y);
        }
    }
}
