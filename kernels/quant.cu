// FP8 quantization kernels: bf16 activations -> E4M3 with per-(1x128) scales, and bf16 weights -> E4M3 with
// per-(128x128) scales. Memory-bound.
//
// Numbers (m x k activations): flops ~ 0; minimum bytes = 2mk (read) + mk (codes) + 4·m·ceil(k/128) (scales).
// Weights (n x k): 2nk + nk + 4·ceil(n/128)·ceil(k/128).
//
// Activation kernel: one half-warp per 128-wide group; each lane reads 8 bf16 (16 B, one vector load) when
// k % 8 == 0 and x is 16-byte aligned, else 8 scalar loads. amax via 4 xor-shuffles within the half-warp, the scale
// is one fp32 division (bit-identical to the Rust reference), codes are stored 8 at a time. Scales go straight
// into the FP8 GEMM's MN-major layout [ceil(k/128), m_pad] with m_pad = round_up(m, 4); the lane that owns the
// last row also zeroes the padding rows, so the whole scale buffer is written every launch. No shared memory, no
// pipeline: consecutive half-warps own consecutive groups of a row, so the warp's loads are 512 contiguous bytes.
//
// Weight kernel: one 256-thread CTA per 128x128 block, two passes (amax, then quantize); the second pass re-reads
// the 32 KiB block from L2. Thread t owns columns (t % 16)·8 .. +8 of rows t/16 + 16·i.
//
// r1k: portable
#include "common/fp8.cuh"
#include "common/quant_params.cuh"

// Both kernels copy their pointers into __restrict__ locals: a struct member cannot carry the qualifier, and the bf16
// loads need it to take the read-only path (LDG.CONSTANT).

namespace {

constexpr int kGroup = 128;
constexpr int kLanesPerGroup = kGroup / 8;  // 16: a half-warp

__device__ __forceinline__ void load8(const __nv_bfloat16* p, bool vec, int valid, float (&v)[8]) {
    if (vec) {
        uint4 raw = *reinterpret_cast<const uint4*>(p);
        const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            float2 f = __bfloat1622float2(h[i]);
            v[2 * i] = f.x;
            v[2 * i + 1] = f.y;
        }
    } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = i < valid ? __bfloat162float(p[i]) : 0.0f;
    }
}

__device__ __forceinline__ void store8(uint8_t* p, bool vec, int valid, const float (&v)[8], float scale) {
    uint16_t c[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) c[i] = r1k::f32x2_to_e4m3x2(__fdiv_rn(v[2 * i], scale), __fdiv_rn(v[2 * i + 1], scale));
    if (vec) {
        uint2 packed;
        packed.x = uint32_t(c[0]) | (uint32_t(c[1]) << 16);
        packed.y = uint32_t(c[2]) | (uint32_t(c[3]) << 16);
        *reinterpret_cast<uint2*>(p) = packed;
    } else {
#pragma unroll
        for (int i = 0; i < 8; ++i)
            if (i < valid) p[i] = uint8_t(c[i / 2] >> (8 * (i % 2)));
    }
}

}  // namespace

// One ActQuantParams (common/quant_params.cuh). x: [m, k] bf16 row-major. q: [m, k] E4M3. scales: [ceil(k/128),
// m_pad] fp32 (MN-major). vec: 1 when k % 8 == 0 and x, q are 16- and 8-byte aligned.
extern "C" __global__ void __launch_bounds__(256)
    act_quant_group128(const __grid_constant__ r1k_quant_params::ActQuantParams p) {
    const __nv_bfloat16* __restrict__ x = p.x;
    uint8_t* __restrict__ q = p.q;
    float* __restrict__ scales = p.scales;
    const int m = p.m, k = p.k;
    const int groups_per_row = (k + kGroup - 1) / kGroup;
    const long long total_groups = static_cast<long long>(m) * groups_per_row;
    const long long g = (static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x) / kLanesPerGroup;
    const int lane = threadIdx.x % kLanesPerGroup;
    const bool active = g < total_groups;
    const int row = active ? static_cast<int>(g / groups_per_row) : 0;
    const int grp = active ? static_cast<int>(g % groups_per_row) : 0;
    const int col = grp * kGroup + lane * 8;
    const int valid = active ? max(0, min(8, k - col)) : 0;
    const size_t offset = static_cast<size_t>(row) * k + col;

    float v[8];
    if (valid > 0) {
        load8(x + offset, p.vec && valid == 8, valid, v);
    } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = 0.0f;
    }
    float amax = 0.0f;
#pragma unroll
    for (int i = 0; i < 8; ++i) amax = fmaxf(amax, fabsf(v[i]));
#pragma unroll
    for (int mask = kLanesPerGroup / 2; mask > 0; mask >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, mask));
    if (!active) return;

    const float scale = r1k::scale_for_amax(amax, p.ue8m0 != 0);
    if (valid > 0) store8(q + offset, p.vec && valid == 8, valid, v, scale);
    if (lane == 0) {
        float* column = scales + static_cast<size_t>(grp) * p.m_pad;
        column[row] = scale;
        if (row == m - 1)
            for (int r = m; r < p.m_pad; ++r) column[r] = 0.0f;
    }
}

// One WeightQuantParams. w: [n, k] bf16 row-major. q: [n, k] E4M3. scales: [ceil(n/128), ceil(k/128)] fp32
// row-major. Grid: (ceil(k/128), ceil(n/128)), block 256.
extern "C" __global__ void __launch_bounds__(256)
    weight_quant_block128(const __grid_constant__ r1k_quant_params::WeightQuantParams p) {
    const __nv_bfloat16* __restrict__ w = p.w;
    uint8_t* __restrict__ q = p.q;
    float* __restrict__ scales = p.scales;
    const int n = p.n, k = p.k;
    __shared__ float warp_amax[8];
    const int block_col = blockIdx.x * kGroup;
    const int block_row = blockIdx.y * kGroup;
    const int col = block_col + (threadIdx.x % 16) * 8;
    const int valid = max(0, min(8, k - col));
    const bool use_vec = p.vec && valid == 8;

    float amax = 0.0f;
    for (int r = threadIdx.x / 16; r < kGroup; r += 16) {
        const int row = block_row + r;
        if (row >= n || valid == 0) continue;
        float v[8];
        load8(w + static_cast<size_t>(row) * k + col, use_vec, valid, v);
#pragma unroll
        for (int i = 0; i < 8; ++i) amax = fmaxf(amax, fabsf(v[i]));
    }
#pragma unroll
    for (int mask = 16; mask > 0; mask >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, mask));
    if (threadIdx.x % 32 == 0) warp_amax[threadIdx.x / 32] = amax;
    __syncthreads();
    amax = warp_amax[0];
#pragma unroll
    for (int i = 1; i < 8; ++i) amax = fmaxf(amax, warp_amax[i]);
    const float scale = r1k::scale_for_amax(amax, p.ue8m0 != 0);
    if (threadIdx.x == 0) scales[static_cast<size_t>(blockIdx.y) * gridDim.x + blockIdx.x] = scale;

    for (int r = threadIdx.x / 16; r < kGroup; r += 16) {
        const int row = block_row + r;
        if (row >= n || valid == 0) continue;
        const size_t offset = static_cast<size_t>(row) * k + col;
        float v[8];
        load8(w + offset, use_vec, valid, v);
        store8(q + offset, use_vec, valid, v, scale);
    }
}
