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
// The ring, the producer's and the math warpgroups' K loops and the epilogue's walk are the crate's one FP8
// mainloop (common/fp8_mainloop_sm90.cuh), shared with the 2-CTA variant below and the MoE grouped kernel; this file
// holds only the schedules (which work items, which K blocks) and the output modes.
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
#include "common/fp8_mainloop_sm90.cuh"

namespace {

using namespace r1k::fp8_gemm;
using namespace r1k::sm90;
using r1k_gemm_params::GemmParams;

// Output modes (twin: src/fp8_gemm/sm90.rs OutputMode).
constexpr int kModeBf16 = 0;            // out: bf16 [m, n] = D
constexpr int kModeF32Accumulate = 1;   // out: fp32 [m, n] += D
constexpr int kModeF32Partial = 2;      // out: fp32 [k_splits, m, n], split s's partial D at [s]

// B's block scales of a tile at column n0: the tile touches at most two 128-row scale blocks (nb0, nb1).
struct DenseScaleB {
    const float* __restrict__ sb;
    int nb0, nb1, k_blocks;
    __device__ __forceinline__ DenseScaleB(const float* sb_, uint32_t n0, int n_blocks, int k_blocks_)
        : sb(sb_), nb0(n0 / kBlockK), nb1(min(static_cast<int>(n0 / kBlockK) + 1, n_blocks - 1)), k_blocks(k_blocks_) {}
    __device__ __forceinline__ void operator()(int kb, float& sb0, float& sb1) const {
        sb0 = __ldg(sb + static_cast<int64_t>(nb0) * k_blocks + kb);
        sb1 = __ldg(sb + static_cast<int64_t>(nb1) * k_blocks + kb);
    }
};

// One pair of adjacent outputs (r, col), (r, col + 1) in the output mode's layout (split: the work item's K split,
// used by the partial mode only).
__device__ __forceinline__ void store_pair(const GemmParams& p, uint32_t split, long long r, int col, float x,
                                           float y) {
    const int64_t o = r * p.n + col;
    if (p.mode == kModeF32Partial) {
        float* dst = static_cast<float*>(p.out) + static_cast<int64_t>(split) * p.m * p.n + o;
        *reinterpret_cast<float2*>(dst) = make_float2(x, y);
    } else if (p.mode == kModeF32Accumulate) {
        float2* dst = reinterpret_cast<float2*>(static_cast<float*>(p.out) + o);
        float2 c = *dst;
        c.x += x;
        c.y += y;
        *dst = c;
    } else {
        *reinterpret_cast<__nv_bfloat162*>(static_cast<__nv_bfloat16*>(p.out) + o) = __floats2bfloat162_rn(x, y);
    }
}

// Schedule: work item i is tile i / k_splits (grouped order) over the K blocks of split i % k_splits.
template <int BM, int BN>
__device__ __forceinline__ void gemm_body(const CUtensorMap* tm_a, const CUtensorMap* tm_b, const CUtensorMap* tm_sa,
                                          const GemmParams& p) {
    constexpr int kMathWG = BM / 64;
    extern __shared__ uint8_t smem_raw[];
    const Ring<BM, BN> ring(smem_raw, p.stages);

    const uint32_t tiles_m = (p.m + BM - 1) / BM;
    const uint32_t tiles_n = (p.n + BN - 1) / BN;
    const uint32_t num_items = tiles_m * tiles_n * p.k_splits;
    const int k_blocks = (p.k + kBlockK - 1) / kBlockK;
    const int n_blocks = (p.n + kBlockK - 1) / kBlockK;
    const int wg = threadIdx.x / 128;
    const auto item_coords = [&](uint32_t item, uint32_t& tm, uint32_t& tn, int& kb_begin, int& kb_end) {
        tile_coords(item / p.k_splits, tiles_m, tiles_n, p.group, tm, tn);
        kb_begin = (item % p.k_splits) * p.kb_per_split;
        kb_end = min(k_blocks, kb_begin + p.kb_per_split);
    };

    if (threadIdx.x == 0) ring.init_barriers(p.stages, kMathWG * 4);
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
            Pipe pipe{0, static_cast<uint32_t>(p.stages), 0};
            for (uint32_t item = blockIdx.x; item < num_items; item += gridDim.x) {
                uint32_t tm, tn;
                int kb_begin, kb_end;
                item_coords(item, tm, tn, kb_begin, kb_end);
                load_item<BM, BN>(ring, pipe, tm_a, tm_b, tm_sa, kb_begin, kb_end, tm * BM, tn * BN);
            }
        }
        return;
    }

    if constexpr (kMathWG == 2) setmaxnreg_inc<232>();
    const int t = threadIdx.x % 128;
    const int row_in_tile = wg * 64 + (t / 32) * 16 + (t % 32) / 4;
    float acc[BN / 2];
    float fin[BN / 2];
#pragma unroll
    for (int i = 0; i < BN / 2; ++i) acc[i] = 0.0f;
    Pipe pipe{0, static_cast<uint32_t>(p.stages), 0};
    for (uint32_t item = blockIdx.x; item < num_items; item += gridDim.x) {
        uint32_t tm, tn;
        int kb_begin, kb_end;
        item_coords(item, tm, tn, kb_begin, kb_end);
        const uint32_t n0 = tn * BN;
        mma_item<BM, BN>(ring, pipe, kb_begin, kb_end, wg * 64, row_in_tile, n0, acc, fin,
                         DenseScaleB(p.sb, n0, n_blocks, k_blocks), [](uint64_t* empty) { mbar_arrive(empty); });
        const uint32_t split = item % p.k_splits;
        const long long r0 = static_cast<long long>(tm) * BM + row_in_tile;
        for_each_output_pair<BN>(fin, r0, n0, p.m, p.n,
                                 [&](long long r, int col, float x, float y) { store_pair(p, split, r, col, x, y); });
    }
}

// 2-CTA cluster variant (see the design note): BM = 128 (two math warpgroups + a producer warpgroup), no split-K,
// output mode bf16 or fp32 accumulate. tm_b's box is BN / 2 rows (one half of the B tile). Schedule: tile pairs
// (plan::mc2_pair_coords), this rank's tile of each, over every K block.
template <int BN>
__device__ __forceinline__ void mc2_body(const CUtensorMap* tm_a, const CUtensorMap* tm_b, const CUtensorMap* tm_sa,
                                         const GemmParams& p) {
    constexpr int BM = 128;
    constexpr int kMathWG = 2;
    static_assert(Ring<BM, BN>::kBTile / 2 % 1024 == 0, "each B half must start on a 128-byte swizzle atom");
    extern __shared__ uint8_t smem_raw[];
    const Ring<BM, BN> ring(smem_raw, p.stages);

    const uint32_t rank = cluster_ctarank();
    const uint32_t peer = rank ^ 1u;
    const uint32_t tiles_m = (p.m + BM - 1) / BM;
    const uint32_t tiles_n = (p.n + BN - 1) / BN;
    const uint32_t num_pairs = (tiles_m + 1) / 2 * tiles_n;
    const int k_blocks = (p.k + kBlockK - 1) / kBlockK;
    const int n_blocks = (p.n + kBlockK - 1) / kBlockK;
    const int wg = threadIdx.x / 128;

    // Each empty barrier counts the consumer warps of both CTAs.
    if (threadIdx.x == 0) ring.init_barriers(p.stages, 2 * kMathWG * 4);
    // The peer multicasts into our full barriers and arrives on our empty barriers: both must be initialized
    // cluster-wide before either CTA issues anything.
    cluster_sync();

    if (wg == kMathWG) {
        setmaxnreg_dec<40>();
        if (threadIdx.x % 128 == 0) {
            tma_prefetch_desc(tm_a);
            tma_prefetch_desc(tm_b);
            tma_prefetch_desc(tm_sa);
            // A stage's empty barrier completes only when the consumers of both CTAs released it: our half of B
            // lands in both.
            Pipe pipe{0, static_cast<uint32_t>(p.stages), 0};
            for (uint32_t pair = cluster_id_x(); pair < num_pairs; pair += cluster_count_x()) {
                uint32_t tm, tn;
                mc2_pair_coords(pair, rank, tiles_m, tiles_n, p.group, tm, tn);
                load_item<BM, BN, BLoad::kHalfMulticast>(ring, pipe, tm_a, tm_b, tm_sa, 0, k_blocks, tm * BM,
                                                         tn * BN, rank);
            }
        }
    } else {
        setmaxnreg_inc<232>();
        const int t = threadIdx.x % 128;
        const int row_in_tile = wg * 64 + (t / 32) * 16 + (t % 32) / 4;
        float acc[BN / 2];
        float fin[BN / 2];
#pragma unroll
        for (int i = 0; i < BN / 2; ++i) acc[i] = 0.0f;
        Pipe pipe{0, static_cast<uint32_t>(p.stages), 0};
        for (uint32_t pair = cluster_id_x(); pair < num_pairs; pair += cluster_count_x()) {
            uint32_t tm, tn;
            mc2_pair_coords(pair, rank, tiles_m, tiles_n, p.group, tm, tn);
            const uint32_t n0 = tn * BN;
            mma_item<BM, BN>(ring, pipe, 0, k_blocks, wg * 64, row_in_tile, n0, acc, fin,
                             DenseScaleB(p.sb, n0, n_blocks, k_blocks), [peer](uint64_t* empty) {
                                 mbar_arrive(empty);
                                 mbar_arrive_cluster(empty, peer);
                             });
            const long long r0 = static_cast<long long>(tm) * BM + row_in_tile;
            for_each_output_pair<BN>(fin, r0, n0, p.m, p.n,
                                     [&](long long r, int col, float x, float y) { store_pair(p, 0, r, col, x, y); });
        }
    }
    // The peer's consumers may still arrive on our empty barriers (and, symmetrically, we on theirs): nobody leaves
    // before both CTAs are done with the ring.
    cluster_sync();
}

}  // namespace

// The tensor maps, then every other argument in one struct (common/fp8_gemm_params.cuh).
#define R1K_GEMM_ENTRY(BM, BN)                                                                              \
    extern "C" __global__ void __launch_bounds__((BM / 64 + 1) * 128, 1) fp8_gemm_sm90_m##BM##n##BN(      \
        const __grid_constant__ CUtensorMap tm_a, const __grid_constant__ CUtensorMap tm_b,                 \
        const __grid_constant__ CUtensorMap tm_sa, const __grid_constant__ r1k_gemm_params::GemmParams p) { \
        gemm_body<BM, BN>(&tm_a, &tm_b, &tm_sa, p);                                                         \
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
        mc2_body<BN>(&tm_a, &tm_b, &tm_sa, p);                                                                     \
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
        // __ldg: a __restrict__ local alone does not keep these loads on the read-only path.
        float2 acc = __ldg(reinterpret_cast<const float2*>(partial) + pair);
        for (int s = 1; s < k_splits; ++s) {
            const float2 v = __ldg(reinterpret_cast<const float2*>(partial + s * total) + pair);
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
