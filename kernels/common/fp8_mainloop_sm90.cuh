// The one FP8 block-scaled mainloop of every sm_90a GEMM kernel in the crate: the dense GEMM (fp8_gemm_sm90_m*n*),
// its 2-CTA multicast pair (fp8_gemm_sm90_mc2_*) and the MoE grouped GEMM (moe_grouped_gemm_fp8_sm90_tma). The
// kernels differ only in their schedule: which work items a CTA takes, which A rows, B rows and K blocks an item
// covers, how a consumer releases a stage (one CTA, or both CTAs of a cluster), how B is loaded (whole, or this
// rank's half multicast to both CTAs) and which rows the epilogue stores. Everything the items have in common is
// here, once: the shared-memory ring, the producer's loop over an item's K blocks, the consumer's loop (wait, four
// wgmma, release, promote), and the walk over the accumulator's output pairs. A fix to the promotion, the phase
// arithmetic or the stage release is made here and reaches every kernel.
//
// The ring: `stages` stages of [A tile BM x 128 B | B tile BN x 128 B | BM activation scales], 1024-byte aligned
// (the 128-byte swizzle atom), then one full and one empty mbarrier per stage. A pipe is a run of consecutive
// stages that one producer thread fills and one math warpgroup drains, in order; its counter `it` (K blocks so far)
// gives the stage (first + it % count) and the phase parity ((it / count) & 1) on both sides, so the two roles stay
// in step without any other communication.
#pragma once
#include <stdint.h>

#include "common/fp8_gemm_sm90.cuh"

namespace r1k {
namespace fp8_gemm {

using namespace r1k::sm90;

template <int BM, int BN>
struct Ring {
    static constexpr uint32_t kATile = BM * kBlockK;
    static constexpr uint32_t kBTile = BN * kBlockK;
    static constexpr uint32_t kStageTx = kATile + kBTile + BM * 4;

    uint8_t* a;
    uint8_t* b;
    float* sa;
    uint64_t* full;
    uint64_t* empty;

    __device__ __forceinline__ Ring(uint8_t* smem_raw, int stages) {
        const uint32_t raw = smem_u32(smem_raw);
        uint8_t* base = smem_raw + (((raw + 1023u) & ~1023u) - raw);
        a = base;
        b = base + stages * kATile;
        sa = reinterpret_cast<float*>(base + stages * (kATile + kBTile));
        full = reinterpret_cast<uint64_t*>(base + stages * kStageTx);
        empty = full + stages;
    }

    // One thread: full[s] completes on the producer's arrive plus the stage's bytes, empty[s] on `consumer_warps`
    // arrivals (one per consuming warp, of this CTA or of both CTAs of a cluster).
    __device__ __forceinline__ void init_barriers(int stages, uint32_t consumer_warps) const {
        for (int s = 0; s < stages; ++s) {
            mbar_init(&full[s], 1);
            mbar_init(&empty[s], consumer_warps);
        }
        mbar_init_fence();
    }
};

// A run of `count` stages starting at `first`, and the K blocks issued (producer) or consumed (consumer) on it.
struct Pipe {
    uint32_t first;
    uint32_t count;
    uint32_t it;
    __device__ __forceinline__ uint32_t stage() const { return first + it % count; }
    __device__ __forceinline__ uint32_t phase() const { return (it / count) & 1u; }
};

// How the producer loads B: the whole BN-row tile, or (2-CTA cluster) this rank's BN/2 rows multicast into the same
// offset of both CTAs' stage.
enum class BLoad { kWhole, kHalfMulticast };

// Producer thread: loads K blocks [kb_begin, kb_end) of A rows a_row.. (and their activation scales) and B rows
// b_row.. into the pipe's stages, each once its consumers released it.
template <int BM, int BN, BLoad kB = BLoad::kWhole>
__device__ __forceinline__ void load_item(const Ring<BM, BN>& ring, Pipe& pipe, const CUtensorMap* tm_a,
                                          const CUtensorMap* tm_b, const CUtensorMap* tm_sa, int kb_begin,
                                          int kb_end, uint32_t a_row, uint32_t b_row, uint32_t rank = 0) {
    using R = Ring<BM, BN>;
    for (int kb = kb_begin; kb < kb_end; ++kb, ++pipe.it) {
        const uint32_t s = pipe.stage();
        mbar_wait(&ring.empty[s], pipe.phase() ^ 1u);
        mbar_arrive_expect_tx(&ring.full[s], R::kStageTx);
        tma_load_2d(ring.a + s * R::kATile, tm_a, &ring.full[s], kb * kBlockK, a_row);
        if constexpr (kB == BLoad::kHalfMulticast) {
            tma_load_2d_multicast(ring.b + s * R::kBTile + rank * (R::kBTile / 2), tm_b, &ring.full[s], kb * kBlockK,
                                  b_row + rank * (BN / 2), 0x3);
        } else {
            tma_load_2d(ring.b + s * R::kBTile, tm_b, &ring.full[s], kb * kBlockK, b_row);
        }
        tma_load_2d(ring.sa + s * BM, tm_sa, &ring.full[s], a_row, kb);
    }
}

// Math warpgroup: consumes K blocks [kb_begin, kb_end) of one item from the pipe into `fin` (cleared first).
// `a_rows` is the warpgroup's first row inside the A tile; `row_in_tile` the thread's first accumulator row (its
// second is +8). scale_b(kb, sb0, sb1) gives the B scales of the tile's first and second 128-column block for K
// block kb (read before the wait, so their latency hides behind it); release(bar) is what lane 0 of each warp does
// to hand a stage back once its wgmmas completed. Each K block's wgmmas start from zero (scale-d 0 on the first),
// and the block is promoted into `fin` on the CUDA cores: the tensor cores' limited-precision accumulation never
// spans more than 128 of K.
template <int BM, int BN, class ScaleB, class Release>
__device__ __forceinline__ void mma_item(const Ring<BM, BN>& ring, Pipe& pipe, int kb_begin, int kb_end,
                                         uint32_t a_rows, int row_in_tile, uint32_t n0, float (&acc)[BN / 2],
                                         float (&fin)[BN / 2], ScaleB scale_b, Release release) {
    using R = Ring<BM, BN>;
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int i = 0; i < BN / 2; ++i) fin[i] = 0.0f;
    for (int kb = kb_begin; kb < kb_end; ++kb, ++pipe.it) {
        const uint32_t s = pipe.stage();
        float sb0, sb1;
        scale_b(kb, sb0, sb1);
        mbar_wait(&ring.full[s], pipe.phase());
        const float sa0 = ring.sa[s * BM + row_in_tile];
        const float sa1 = ring.sa[s * BM + row_in_tile + 8];
        const uint32_t a_addr = smem_u32(ring.a + s * R::kATile) + a_rows * kBlockK;
        const uint32_t b_addr = smem_u32(ring.b + s * R::kBTile);
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
        if (lane == 0) release(&ring.empty[s]);
        promote<BN>(fin, acc, sa0, sa1, sb0, sb1, n0);
    }
}

// The epilogue's walk over the thread's accumulator: store(row, col, x, y) for each pair of adjacent columns
// (col, col + 1) with row < row_end and col < n. r0 is the thread's first row (the second is r0 + 8).
template <int BN, class Store>
__device__ __forceinline__ void for_each_output_pair(const float (&fin)[BN / 2], long long r0, uint32_t n0,
                                                     long long row_end, int n, Store store) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int i = 0; i < BN / 8; ++i) {
        const int col = n0 + 8 * i + 2 * (lane % 4);
        if (col >= n) continue;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const long long r = r0 + 8 * h;
            if (r >= row_end) continue;
            store(r, col, fin[4 * i + 2 * h], fin[4 * i + 2 * h + 1]);
        }
    }
}

}  // namespace fp8_gemm
}  // namespace r1k
