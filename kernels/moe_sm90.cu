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

namespace {

constexpr int BM = 64, BN = 128, BK = 128, STAGES = 4;
constexpr int A_BYTES = BM * BK, B_BYTES = BN * BK, STAGE_BYTES = A_BYTES + B_BYTES;

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 128B-swizzle K-major descriptor: start >> 4, LBO unused (1), SBO = 1024 B between 8-row groups, layout 1 = SW128.
__device__ __forceinline__ uint64_t make_desc(uint32_t smem_addr) {
    uint64_t d = 0;
    d |= static_cast<uint64_t>((smem_addr & 0x3FFFF) >> 4);
    d |= static_cast<uint64_t>(1) << 16;
    d |= static_cast<uint64_t>(1024 >> 4) << 32;
    d |= static_cast<uint64_t>(1) << 62;
    return d;
}

__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait0() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
// Pins an accumulator register at this point of the instruction stream: wgmma writes its registers
// asynchronously, so reads must not be scheduled before wgmma.wait_group (asm volatile statements keep their order).
__device__ __forceinline__ void fence_operand(float& r) { asm volatile("" : "+f"(r)::"memory"); }
__device__ __forceinline__ void fence_async_smem() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

__device__ __forceinline__ void wgmma_m64n128k32_e4m3(float (&d)[64], uint64_t desc_a, uint64_t desc_b, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(desc_a), "l"(desc_b), "r"(scale_d));
}

}  // namespace

// a [rows, K] codes, sa [K/128, rows_pad]; w [E, N, K] codes, sw [E, N/128, K/128]; out [rows, N] bf16.
// Grid (ceil(rows/64), N/128), block 128, dynamic smem STAGES·24 KiB + 1 KiB (alignment slack).
extern "C" __global__ void __launch_bounds__(128, 1) moe_grouped_gemm_fp8_sm90(
    const uint8_t* __restrict__ a, const float* __restrict__ sa, const uint8_t* __restrict__ w,
    const float* __restrict__ sw, const long long* __restrict__ offsets, const int* __restrict__ counts,
    __nv_bfloat16* __restrict__ out, long long rows, long long rows_pad, int n, int kdim, int num_experts) {
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
            cp_async16(sa_base + r * 128 + ((c ^ (r % 8)) * 16), src, ok ? 16 : 0);
        }
#pragma unroll
        for (int i = 0; i < (B_BYTES / 16) / 128; ++i) {
            const int chunk = tid + i * 128;
            const int r = chunk / 8, c = chunk % 8;
            const uint8_t* src = w_e + static_cast<long long>(r) * kdim + kofs + c * 16;
            cp_async16(sb_base + r * 128 + ((c ^ (r % 8)) * 16), src, 16);
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
        fence_async_smem();  // this thread's cp.async writes -> visible to wgmma (async proxy)
        __syncthreads();
        if (kb + STAGES - 1 < kblocks) load_stage((kb + STAGES - 1) % STAGES, kb + STAGES - 1);
        cp_async_commit();

        const uint32_t sa_base = base + (kb % STAGES) * STAGE_BYTES;
        const uint32_t sb_base = sa_base + A_BYTES;
#pragma unroll
        for (int i = 0; i < 64; ++i) fence_operand(part[i]);
        wgmma_fence();
#pragma unroll
        for (int j = 0; j < BK / 32; ++j)
            wgmma_m64n128k32_e4m3(part, make_desc(sa_base + j * 32), make_desc(sb_base + j * 32), j > 0 ? 1 : 0);
        wgmma_commit();
        wgmma_wait0();
#pragma unroll
        for (int i = 0; i < 64; ++i) fence_operand(part[i]);

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
