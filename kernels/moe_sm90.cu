// Grouped FP8 GEMM with Hopper wgmma (sm_90a only): out[r, n] = Σ_k a[r, k]·w[e(r), n, k] with 1x128 activation
// scales and 128x128 weight scales, for the MoE permuted layouts (contiguous and masked alike: the expert of each
// 64-row tile is the segment of the device offsets that contains it; tiles past offsets[e] + counts[e] exit).
//
// Numbers (R rows, N, K): 2·R·N·K flops; minimum bytes = touched experts' N·K weights + R·K + 2·R·N.
//
// Tiling: one warpgroup (128 threads) per 64x128 output tile, K in blocks of 128 (one scale group). Each stage holds
// A 64x128 B and B 128x128 B in shared memory in the 128-byte-swizzled K-major layout wgmma reads (16-byte chunk c
// of row r stored at chunk c ^ (r % 8); 8-row groups 1024 B apart). Loads are cp.async 16 B (zero-fill for rows
// past the segment), 4 stages in flight. Per K block: 4 wgmma m64n128k32 e4m3 into a fresh fp32 partial, wait,
// then promote: acc += partial · scale_a[row] · scale_b (the 1x128 / 128x128 block scales). No warp
// specialization, no TMA: simpler than the dense GEMM, correct for every segment layout the permute produces.
//
// r1k-sass: moe_grouped_gemm_fp8_sm90 QGMMA
#include "common/fp8.cuh"
#include "common/moe.cuh"
#include "common/moe_params.cuh"
#include "common/sm90/all.cuh"

namespace {

using namespace r1k::sm90;

constexpr int BM = 64, BN = 128, BK = 128, STAGES = 4;
constexpr int A_BYTES = BM * BK, B_BYTES = BN * BK, STAGE_BYTES = A_BYTES + B_BYTES;

}  // namespace

// a [rows, K] codes, sa [K/128, rows_pad]; w [E, N, K] codes, sw [E, N/128, K/128]; out [rows, N] bf16.
// Grid (ceil(rows/64), N/128), block 128, dynamic smem STAGES·24 KiB + 1 KiB (alignment slack).
extern "C" __global__ void __launch_bounds__(128, 1)
    moe_grouped_gemm_fp8_sm90(const __grid_constant__ r1k_moe_params::GroupedGemmParams p) {
    const uint8_t* __restrict__ a = p.a;
    const float* __restrict__ sa = p.a_scales;
    const uint8_t* __restrict__ w = p.w;
    const float* __restrict__ sw = p.w_scales;
    const long long* __restrict__ offsets = p.offsets;
    const int* __restrict__ counts = p.counts;
    __nv_bfloat16* __restrict__ out = p.out;
    const long long rows = p.rows, rows_pad = p.rows_pad;
    const int n = p.n, kdim = p.k, num_experts = p.num_experts;
    extern __shared__ uint8_t smem_raw[];
    const long long row0 = static_cast<long long>(blockIdx.x) * BM;
    const int e = r1k::moe_find_segment(offsets, num_experts, row0);
    if (e >= num_experts) return;
    const long long valid_end = r1k::moe_segment_valid_end(offsets, counts, e, rows);
    if (row0 >= valid_end) return;
    const int n0 = blockIdx.y * BN;
    const int tid = threadIdx.x;
    const int kblocks = kdim / BK;

    const uint32_t raw_addr = smem_u32(smem_raw);
    const uint32_t base = (raw_addr + 1023u) & ~1023u;
    const uint8_t* w_e = w + (static_cast<long long>(e) * n + n0) * kdim;

    auto load_stage = [&](int stage, int kb) {
        const uint32_t sa_base = base + stage * STAGE_BYTES;
        const uint32_t sb_base = sa_base + A_BYTES;
        const long long kofs = static_cast<long long>(kb) * BK;
#pragma unroll
        for (int i = 0; i < (A_BYTES / 16) / 128; ++i) {
            const int chunk = tid + i * 128;
            const int r = chunk / 8, c = chunk % 8;
            const long long grow = row0 + r;
            const bool ok = grow < valid_end;
            const uint8_t* src = a + (ok ? grow : row0) * kdim + kofs + c * 16;
            cp_async16(sa_base + swizzle_128b(r, c * 16), src, ok ? 16 : 0);
        }
#pragma unroll
        for (int i = 0; i < (B_BYTES / 16) / 128; ++i) {
            const int chunk = tid + i * 128;
            const int r = chunk / 8, c = chunk % 8;
            const uint8_t* src = w_e + static_cast<long long>(r) * kdim + kofs + c * 16;
            cp_async16(sb_base + swizzle_128b(r, c * 16), src, 16);
        }
    };

#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < kblocks) load_stage(s, s);
        cp_async_commit();
    }

    float acc[64], part[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) {
        acc[i] = 0.0f;
        part[i] = 0.0f;
    }

    const int warp = tid / 32, lane = tid % 32;
    const int r_a = warp * 16 + lane / 4, r_b = r_a + 8;
    const bool ok_a = row0 + r_a < valid_end, ok_b = row0 + r_b < valid_end;
    const float* sw_e = sw + (static_cast<long long>(e) * (n / BK) + n0 / BK) * kblocks;

    for (int kb = 0; kb < kblocks; ++kb) {
        cp_async_wait<STAGES - 2>();
        fence_proxy_async();  // this thread's cp.async writes -> visible to wgmma (async proxy)
        __syncthreads();
        if (kb + STAGES - 1 < kblocks) load_stage((kb + STAGES - 1) % STAGES, kb + STAGES - 1);
        cp_async_commit();

        const uint32_t sa_base = base + (kb % STAGES) * STAGE_BYTES;
        const uint32_t sb_base = sa_base + A_BYTES;
        fence_regs(part);
        wgmma_fence();
#pragma unroll
        for (int j = 0; j < BK / 32; ++j)
            WgmmaE4m3<BN>::mma(part, kmajor_sw128_desc(sa_base, j * 32), kmajor_sw128_desc(sb_base, j * 32), j > 0 ? 1 : 0);
        wgmma_commit();
        wgmma_wait_all();
        fence_regs(part);

        const float sb = sw_e[kb];
        const float s_a = ok_a ? sa[kb * rows_pad + row0 + r_a] * sb : 0.0f;
        const float s_b = ok_b ? sa[kb * rows_pad + row0 + r_b] * sb : 0.0f;
#pragma unroll
        for (int j = 0; j < 16; ++j) {
            acc[4 * j + 0] = fmaf(part[4 * j + 0], s_a, acc[4 * j + 0]);
            acc[4 * j + 1] = fmaf(part[4 * j + 1], s_a, acc[4 * j + 1]);
            acc[4 * j + 2] = fmaf(part[4 * j + 2], s_b, acc[4 * j + 2]);
            acc[4 * j + 3] = fmaf(part[4 * j + 3], s_b, acc[4 * j + 3]);
        }
    }
    cp_async_wait<0>();

#pragma unroll
    for (int j = 0; j < 16; ++j) {
        const int col = n0 + j * 8 + (lane % 4) * 2;
        if (ok_a) {
            __nv_bfloat162 v = __floats2bfloat162_rn(acc[4 * j + 0], acc[4 * j + 1]);
            *reinterpret_cast<__nv_bfloat162*>(out + (row0 + r_a) * n + col) = v;
        }
        if (ok_b) {
            __nv_bfloat162 v = __floats2bfloat162_rn(acc[4 * j + 2], acc[4 * j + 3]);
            *reinterpret_cast<__nv_bfloat162*>(out + (row0 + r_b) * n + col) = v;
        }
    }
}
