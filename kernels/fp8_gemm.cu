// Portable FP8 block-scaled GEMM: D[m,n] = sum_k A[m,k] B[n,k] sa[m,k/128] sb[n/128,k/128], A and B E4M3
// K-major ("NT"), sa MN-major [ceil(k/128), m_pad], sb row-major [ceil(n/128), ceil(k/128)]. Output bf16, or fp32
// D = C + A.B in place when `accumulate` is set. The second opinion for the sm_90a kernel and the fallback on other
// GPUs: meant to be obviously correct, not fast.
//
// Numbers: flops = 2mnk; minimum bytes = mk + nk (codes) + 4(m_pad + ceil(n/128)) ceil(k/128) (scales) + 2mn
// (bf16 out; 8mn when accumulating into fp32).
//
// Tiling: one 256-thread CTA per 64x64 tile of D (grid.x over M, grid.y over N); thread (ty, tx) = (t/16, t%16)
// owns rows ty + 16i and columns tx + 16j, i, j < 4 (strided so shared-memory reads are conflict-free). K is walked
// in 32-wide chunks: the CTA decodes a 64x32 slice of A and of B to fp32 in shared memory, then every thread does
// 32 rank-1 updates into `part`. Promotion: after each 128-wide K group `acc += part * (sa * sb)` and `part` restarts,
// which is the contract's per-group scaling (and the same formula the sm_90a kernel applies to its wgmma results).
// No pipeline: two __syncthreads per chunk. Every load is bounded by m, n, k (k % 16 == 0 is required by the host,
// so a chunk is either full or has a 16-wide tail, both handled by the element bound), every store by m and n.
//
// r1k: portable
#include "common/fp8.cuh"
#include "common/fp8_gemm_params.cuh"

namespace {

constexpr int kTile = 64;
constexpr int kChunk = 32;
constexpr int kGroup = 128;
constexpr int kThreads = 256;

}  // namespace

// One PortableGemmParams (common/fp8_gemm_params.cuh).
extern "C" __global__ void __launch_bounds__(kThreads)
    fp8_gemm_plain(const __grid_constant__ r1k_gemm_params::PortableGemmParams p) {
    const uint8_t* __restrict__ a = p.a;
    const float* __restrict__ sa = p.sa;
    const uint8_t* __restrict__ b = p.b;
    const float* __restrict__ sb = p.sb;
    void* out = p.out;
    const int m = p.m, n = p.n, k = p.k, m_pad = p.m_pad, accumulate = p.accumulate;
    __shared__ float as[kChunk][kTile + 1];
    __shared__ float bs[kChunk][kTile + 1];
    const int tid = threadIdx.x;
    const int tx = tid % 16, ty = tid / 16;
    const int row0 = blockIdx.x * kTile, col0 = blockIdx.y * kTile;
    const int k_blocks = (k + kGroup - 1) / kGroup;

    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;

    for (int g = 0; g < k_blocks; ++g) {
        float part[4][4];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) part[i][j] = 0.0f;
        const int k_end = min(k, (g + 1) * kGroup);
        for (int kc = g * kGroup; kc < k_end; kc += kChunk) {
#pragma unroll
            for (int e = 0; e < kTile * kChunk / kThreads; ++e) {
                const int idx = tid + e * kThreads;
                const int r = idx / kChunk, c = idx % kChunk;
                const int gk = kc + c;
                const int ga = row0 + r, gb = col0 + r;
                as[c][r] = (ga < m && gk < k) ? r1k::e4m3_to_f32(a[static_cast<int64_t>(ga) * k + gk]) : 0.0f;
                bs[c][r] = (gb < n && gk < k) ? r1k::e4m3_to_f32(b[static_cast<int64_t>(gb) * k + gk]) : 0.0f;
            }
            __syncthreads();
#pragma unroll 8
            for (int c = 0; c < kChunk; ++c) {
                float av[4], bv[4];
#pragma unroll
                for (int i = 0; i < 4; ++i) av[i] = as[c][ty + 16 * i];
#pragma unroll
                for (int j = 0; j < 4; ++j) bv[j] = bs[c][tx + 16 * j];
#pragma unroll
                for (int i = 0; i < 4; ++i)
#pragma unroll
                    for (int j = 0; j < 4; ++j) part[i][j] = fmaf(av[i], bv[j], part[i][j]);
            }
            __syncthreads();
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int r = row0 + ty + 16 * i;
            const float s_a = r < m ? sa[static_cast<int64_t>(g) * m_pad + r] : 0.0f;
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int c = col0 + tx + 16 * j;
                const float s_b = c < n ? sb[static_cast<int64_t>(c / kGroup) * k_blocks + g] : 0.0f;
                acc[i][j] = fmaf(part[i][j], s_a * s_b, acc[i][j]);
            }
        }
    }

#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int r = row0 + ty + 16 * i;
        if (r >= m) continue;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int c = col0 + tx + 16 * j;
            if (c >= n) continue;
            const int64_t o = static_cast<int64_t>(r) * n + c;
            if (accumulate) {
                static_cast<float*>(out)[o] += acc[i][j];
            } else {
                static_cast<__nv_bfloat16*>(out)[o] = __float2bfloat16_rn(acc[i][j]);
            }
        }
    }
}
