// The FP8 GEMM's own pure functions on top of the sm_90a primitive layer (kernels/common/sm90/): the tile
// scheduler orders and the promotion step. They have Rust twins in src/fp8_gemm/plan.rs, unit-tested on the CPU; keep
// them identical. Only include from sm_90a-only kernel files (never from a `// r1k: portable` one).
#pragma once
#include <stdint.h>

#include "common/sm90/all.cuh"

namespace r1k {
namespace fp8_gemm {

constexpr int kBlockK = 128;

// ---- pure functions (Rust twins) ------------------------------------------------------------------------------

// Twin of plan::tile_coords: grouped tile order (group_m tile rows per group, column by column).
__host__ __device__ __forceinline__ void tile_coords(uint32_t tile, uint32_t tiles_m, uint32_t tiles_n,
                                                     uint32_t group_m, uint32_t& tm, uint32_t& tn) {
    const uint32_t per_group = group_m * tiles_n;
    const uint32_t group = tile / per_group;
    const uint32_t first_m = group * group_m;
    const uint32_t rows = min(tiles_m - first_m, group_m);
    const uint32_t within = tile % per_group;
    tm = first_m + within % rows;
    tn = within / rows;
}

// Twin of plan::mc2_pair_coords: the tile of cluster rank `rank` (0 or 1) for tile pair `pair` of a 2-CTA cluster
// along M. Pairs are tile-row pairs (2pm, 2pm + 1) of one n-block, walked in grouped order; both ranks get the same
// tn. tm may equal tiles_m when tiles_m is odd (that CTA computes nothing it stores).
__host__ __device__ __forceinline__ void mc2_pair_coords(uint32_t pair, uint32_t rank, uint32_t tiles_m,
                                                         uint32_t tiles_n, uint32_t group_pairs, uint32_t& tm,
                                                         uint32_t& tn) {
    uint32_t pm;
    tile_coords(pair, (tiles_m + 1) / 2, tiles_n, group_pairs, pm, tn);
    tm = 2 * pm + rank;
}

// Twin of plan::b_scale_slot: which of the tile's (at most two) B scale blocks column `col` uses.
__host__ __device__ __forceinline__ uint32_t b_scale_slot(uint32_t n0, uint32_t col) {
    return (n0 + col) / kBlockK - n0 / kBlockK;
}

// Promotion of one 128-wide K block: fin += acc * (sa_row * sb_col). sa0/sa1 are the scales of the thread's rows
// (16w + l/4 and +8), sb0/sb1 the scales of the tile's first and second B scale blocks (see b_scale_slot).
template <int BN>
__device__ __forceinline__ void promote(float (&fin)[BN / 2], const float (&acc)[BN / 2], float sa0, float sa1,
                                        float sb0, float sb1, uint32_t n0) {
#pragma unroll
    for (int i = 0; i < BN / 8; ++i) {
        const float sbv = b_scale_slot(n0, 8 * i) ? sb1 : sb0;
        const float s0 = sa0 * sbv, s1 = sa1 * sbv;
        fin[4 * i + 0] = fmaf(acc[4 * i + 0], s0, fin[4 * i + 0]);
        fin[4 * i + 1] = fmaf(acc[4 * i + 1], s0, fin[4 * i + 1]);
        fin[4 * i + 2] = fmaf(acc[4 * i + 2], s1, fin[4 * i + 2]);
        fin[4 * i + 3] = fmaf(acc[4 * i + 3], s1, fin[4 * i + 3]);
    }
}

}  // namespace fp8_gemm
}  // namespace r1k
