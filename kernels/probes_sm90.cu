// Primitive probes of the sm_90a kernels: each kernel here runs one building block of the FP8 GEMM or the MLA decode
// kernels alone, through the same device functions the kernels use (kernels/common/sm90/, common/fp8_gemm_sm90.cuh,
// common/mla_tile.cuh, mla_wide.cuh, mla_narrow.cuh), so a failing GPU test names the broken primitive: TMA box
// placement, wgmma with its descriptors and fragment layouts, the promotion step, the paged tile loads (bf16 and
// FP8), the online softmax. tests/probes.rs runs them (scripts/gpu-check runs that suite first); the expected values
// come from the Rust twins and references.
//
// Every probe takes its tensor maps, then one struct of common/probe_params.cuh, as the kernels do. The pointers are
// copied into locals with the qualifiers they had as parameters (a struct member cannot carry __restrict__); the
// probes' own input loads use __ldg, since a __restrict__ local alone does not keep them on the read-only path
// (LDG.CONSTANT). The MLA probes' table rows are read inside the shared tile functions, from a SeqView, exactly as
// the decode kernels read theirs.
//
// r1k-sass: gemm_probe_wgmma_n128 QGMMA
// r1k-sass: mla_sm90_probe_wgmma HGMMA
// r1k-sass: mla_sm90_probe_narrow_wgmma HGMMA
#include <cuda_bf16.h>
#include <stdint.h>

#include "common/fp8_gemm_sm90.cuh"
#include "common/mla_narrow.cuh"
#include "common/mla_wide.cuh"
#include "common/probe_params.cuh"

using namespace r1k::fp8_gemm;
using namespace r1k::mla;
using namespace r1k_probe_params;

extern __shared__ __align__(16) uint8_t smem_raw[];

// ---- FP8 GEMM ------------------------------------------------------------------------------------------------------

// One TMA box load into 1024-aligned shared memory, copied back out byte for byte (swizzle included), so the host
// can compare against sm90::swizzle_128b applied to the source. 128 threads; dynamic smem = box_bytes + 1024 + 64.
extern "C" __global__ void __launch_bounds__(128)
    gemm_probe_tma(const __grid_constant__ CUtensorMap map, const __grid_constant__ GemmTmaProbeParams p) {
    uint8_t* out = p.out;
    const int x0 = p.x0, y0 = p.y0, box_bytes = p.box_bytes;
    const uint32_t raw = smem_u32(smem_raw);
    uint8_t* buf = smem_raw + (((raw + 1023u) & ~1023u) - raw);
    uint64_t* bar = reinterpret_cast<uint64_t*>(buf + ((box_bytes + 15) & ~15));
    if (threadIdx.x == 0) {
        mbar_init(bar, 1);
        mbar_init_fence();
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        mbar_arrive_expect_tx(bar, box_bytes);
        tma_load_2d(buf, &map, bar, x0, y0);
    }
    mbar_wait(bar, 0);
    for (int i = threadIdx.x; i < box_bytes; i += blockDim.x) out[i] = buf[i];
}

// One m64n128 K=128 block: A [64, 128] and B [128, 128] E4M3 row-major in global are written into shared memory with
// the device swizzle_128b, then four wgmma k32 steps through kmajor_sw128_desc; D [64, 128] fp32 is written back
// through the documented fragment layout. Checks wgmma + descriptors + swizzle + fragment layout together (the TMA
// probe checks the swizzle alone). 128 threads; dynamic smem = 64*128 + 128*128 + 1024.
extern "C" __global__ void __launch_bounds__(128)
    gemm_probe_wgmma_n128(const __grid_constant__ GemmWgmmaProbeParams p) {
    const uint8_t* __restrict__ a = p.a;
    const uint8_t* __restrict__ b = p.b;
    float* out = p.out;
    const uint32_t raw = smem_u32(smem_raw);
    uint8_t* sa = smem_raw + (((raw + 1023u) & ~1023u) - raw);
    uint8_t* sbm = sa + 64 * kBlockK;
    for (int i = threadIdx.x; i < 64 * kBlockK; i += 128) sa[swizzle_128b(i)] = __ldg(a + i);
    for (int i = threadIdx.x; i < 128 * kBlockK; i += 128) sbm[swizzle_128b(i)] = __ldg(b + i);
    fence_proxy_async();
    __syncthreads();
    float acc[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) acc[i] = 0.0f;
    fence_regs(acc);
    wgmma_fence();
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        WgmmaE4m3<128>::mma(acc, kmajor_sw128_desc(smem_u32(sa), 32 * j), kmajor_sw128_desc(smem_u32(sbm), 32 * j), j);
    }
    wgmma_commit();
    wgmma_wait_all();
    fence_regs(acc);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
    for (int i = 0; i < 16; ++i) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int row = warp * 16 + lane / 4 + 8 * (e / 2);
            const int col = 8 * i + 2 * (lane % 4) + (e % 2);
            out[row * 128 + col] = acc[4 * i + e];
        }
    }
}

// The promotion step on a [64, 160] tile starting at column n0: acc and fin_in are row-major [64, 160] and go
// through the fragment layout; fin = promote(promote(fin_in, acc)), i.e. two K blocks with the same scales. sa [64],
// sb2 = {scale of the tile's first B block, of the second}. 128 threads.
extern "C" __global__ void __launch_bounds__(128)
    gemm_probe_promote_n160(const __grid_constant__ GemmPromoteProbeParams p) {
    const float* __restrict__ acc_in = p.acc_in;
    const float* __restrict__ fin_in = p.fin_in;
    const float* __restrict__ sa = p.sa;
    const float* __restrict__ sb2 = p.sb2;
    float* out = p.out;
    const int n0 = p.n0;
    constexpr int BN = 160;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    float acc[BN / 2], fin[BN / 2];
#pragma unroll
    for (int i = 0; i < BN / 8; ++i) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int row = warp * 16 + lane / 4 + 8 * (e / 2);
            const int col = 8 * i + 2 * (lane % 4) + (e % 2);
            acc[4 * i + e] = acc_in[row * BN + col];
            fin[4 * i + e] = fin_in[row * BN + col];
        }
    }
    const int r = warp * 16 + lane / 4;
    promote<BN>(fin, acc, sa[r], sa[r + 8], sb2[0], sb2[1], n0);
    promote<BN>(fin, acc, sa[r], sa[r + 8], sb2[0], sb2[1], n0);
#pragma unroll
    for (int i = 0; i < BN / 8; ++i) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int row = warp * 16 + lane / 4 + 8 * (e / 2);
            const int col = 8 * i + 2 * (lane % 4) + (e % 2);
            out[row * BN + col] = fin[4 * i + e];
        }
    }
}

// ---- MLA decode ----------------------------------------------------------------------------------------------------

// Tile load: TMA-loads the 64-token tile starting at token t0 of a sequence (table row `table_row`, `tok_end`
// tokens) into shared memory, applies the bad-row fix-up and copies the raw (swizzled) 73,728-byte stage to `out`.
// Expected bytes: sm90::tile_image in Rust.
extern "C" __global__ void __launch_bounds__(kThreads, 1)
    mla_sm90_probe_tile_load(const __grid_constant__ CUtensorMap tmap_kv,
                             const __grid_constant__ MlaTileLoadProbeParams p) {
    const int* __restrict__ table_row = p.table_row;
    uint8_t* __restrict__ out = p.out;
    const int page = p.page, num_blocks = p.num_blocks, box_rows = p.box_rows, t0 = p.t0, tok_end = p.tok_end;
    const Smem<false> sm = carve<false>(smem_raw);
    init_barriers(sm);
    SeqView v{table_row, page, num_blocks, tok_end};
    if (threadIdx.x == 0) issue_tile(&tmap_kv, v, box_rows, t0, sm.latent(0), &sm.full[0]);
    mbar_wait(&sm.full[0], 0);
    if (!tile_clean(v, box_rows, t0)) zero_bad_rows(v, box_rows, t0, sm.latent(0), threadIdx.x);
    __syncthreads();
    for (uint32_t i = threadIdx.x; i < kTileBytes / 16; i += kThreads)
        reinterpret_cast<uint4*>(out)[i] = reinterpret_cast<const uint4*>(sm.latent(0))[i];
}

// FP8 tile load: TMA-loads the raw codes, scales and RoPE of the 64-token tile at t0 through the three FP8 maps,
// dequantizes it as the FP8 kernels do and copies the resulting bf16 tile (latent blocks 0..7, then the RoPE block;
// 73,728 bytes, swizzled) to `out`. Expected bytes: sm90::tile_image of the dequantized cache.
extern "C" __global__ void __launch_bounds__(kThreads, 1)
    mla_sm90_probe_fp8_tile_load(const __grid_constant__ CUtensorMap tmap_codes,
                                 const __grid_constant__ CUtensorMap tmap_scales,
                                 const __grid_constant__ CUtensorMap tmap_rope,
                                 const __grid_constant__ MlaTileLoadProbeParams p) {
    const int* __restrict__ table_row = p.table_row;
    uint8_t* __restrict__ out = p.out;
    const int page = p.page, num_blocks = p.num_blocks, box_rows = p.box_rows, t0 = p.t0, tok_end = p.tok_end;
    const Smem<true> sm = carve<true>(smem_raw);
    init_barriers(sm);
    SeqView v{table_row, page, num_blocks, tok_end};
    if (threadIdx.x == 0)
        issue_tile_fp8(&tmap_codes, &tmap_scales, &tmap_rope, v, box_rows, t0, sm.raw(0), sm.rope(0), &sm.full[0]);
    mbar_wait(&sm.full[0], 0);
    dequant_tile(v, box_rows, t0, sm.raw(0), sm.latent(0), sm.rope(0), threadIdx.x);
    __syncthreads();
    for (uint32_t i = threadIdx.x; i < kTileBytes / 16; i += kThreads) {
        const uint8_t* src = i < kLatentBytes / 16 ? sm.latent(0) + 16 * i : sm.rope(0) + 16 * i - kLatentBytes;
        reinterpret_cast<uint4*>(out)[i] = *reinterpret_cast<const uint4*>(src);
    }
}

// wgmma: loads Q rows 0..63 of tmap_q and the first 64 tokens of the cache (table pages in order), computes
// S = Q·Kᵀ (warpgroup g its token half, written to s_out [64, 64] fp32) and O = bf16(S)·V (P halves swapped
// between the warpgroups as in the decode kernel; written [64, 512] fp32, each warpgroup its 256 columns).
extern "C" __global__ void __launch_bounds__(kThreads, 1)
    mla_sm90_probe_wgmma(const __grid_constant__ CUtensorMap tmap_q, const __grid_constant__ CUtensorMap tmap_kv,
                         const __grid_constant__ MlaWgmmaProbeParams args) {
    const int* __restrict__ table_row = args.table_row;
    float* __restrict__ s_out = args.s_out;
    float* __restrict__ o_out = args.o_out;
    const int page = args.page, num_blocks = args.num_blocks, box_rows = args.box_rows;
    const Smem<false> sm = carve<false>(smem_raw);
    init_barriers(sm);
    const int tid = threadIdx.x, wg = tid / 128, t = tid % 128, warp = t / 32, lane = t % 32, quad = lane % 4;
    SeqView v{table_row, page, num_blocks, kTileN};
    if (tid == 0) {
        mbar_arrive_expect_tx(sm.qbar, kTileBytes);
        for (int kb = 0; kb < kBlocks; ++kb) tma_load_2d(sm.q + kb * kBlockBytes, &tmap_q, sm.qbar, kb * 64, 0);
        issue_tile(&tmap_kv, v, box_rows, 0, sm.latent(0), &sm.full[0]);
    }
    mbar_wait(sm.qbar, 0);
    mbar_wait(&sm.full[0], 0);
    __syncwarp();
    float s[16];
#pragma unroll
    for (int x = 0; x < 16; ++x) s[x] = 0.0f;
    qk_half_tile(s, sm.q, sm.latent(0), sm.rope(0), wg);
    const int r0 = 16 * warp + lane / 4;
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) s_out[(r0 + 8 * (e / 2)) * 64 + 32 * wg + 8 * j + 2 * quad + e % 2] = s[4 * j + e];
    uint32_t mine[2][4];
#pragma unroll
    for (int c = 0; c < 2; ++c) {
        mine[c][0] = pack_bf16x2(s[8 * c + 0], s[8 * c + 1]);
        mine[c][1] = pack_bf16x2(s[8 * c + 2], s[8 * c + 3]);
        mine[c][2] = pack_bf16x2(s[8 * c + 4], s[8 * c + 5]);
        mine[c][3] = pack_bf16x2(s[8 * c + 6], s[8 * c + 7]);
    }
    uint32_t p[4][4];
    swap_p(mine, p, sm.xbuf(0), wg, t);
    float o[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) o[i] = 0.0f;
    pv_tile(o, p, sm.latent(0), wg);
#pragma unroll
    for (int j = 0; j < 32; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e)
            o_out[(r0 + 8 * (e / 2)) * 512 + 256 * wg + 8 * j + 2 * quad + e % 2] = o[4 * j + e];
}

// Narrow wgmma: Q rows 0..15 (tmap_q box 64 × 16) and the first 64 tokens of the sequence with table row
// `table_row`; Sᵀ = K·Qᵀ written as S [16, 64] fp32, then Pᵀ = bf16(S)ᵀ stored to shared memory and O = (Vᵀ·Pᵀ)ᵀ
// written [16, 512] fp32, with the narrow kernel's code paths (one warpgroup).
extern "C" __global__ void __launch_bounds__(kNarrowThreads, 1)
    mla_sm90_probe_narrow_wgmma(const __grid_constant__ CUtensorMap tmap_q, const __grid_constant__ CUtensorMap tmap_kv,
                                const __grid_constant__ MlaWgmmaProbeParams args) {
    const int* __restrict__ table_row = args.table_row;
    float* __restrict__ s_out = args.s_out;
    float* __restrict__ o_out = args.o_out;
    const int page = args.page, num_blocks = args.num_blocks, box_rows = args.box_rows;
    constexpr int kN = 16;
    NarrowSmem<kN, false> sm;
    {
        const uint32_t addr = smem_u32(smem_raw);
        sm.base = smem_raw + ((1024u - (addr & 1023u)) & 1023u);
    }
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, quad = lane % 4;
    const int tr0 = 16 * warp + lane / 4;
    if (tid == 0) {
        mbar_init(&sm.full()[0], 1);
        mbar_init(sm.qbar(), 1);
        mbar_init_fence();
    }
    __syncthreads();
    SeqView v{table_row, page, num_blocks, kTileN};
    if (tid == 0) {
        mbar_arrive_expect_tx(sm.qbar(), kBlocks * kN * 128u);
        for (int kb = 0; kb < kBlocks; ++kb) tma_load_2d(sm.q() + kb * kN * 128, &tmap_q, sm.qbar(), kb * 64, 0);
        issue_tile(&tmap_kv, v, box_rows, 0, sm.latent(0), &sm.full()[0]);
    }
    mbar_wait(sm.qbar(), 0);
    mbar_wait(&sm.full()[0], 0);
    __syncwarp();
    float st[kN / 2];
#pragma unroll
    for (int x = 0; x < kN / 2; ++x) st[x] = 0.0f;
    narrow_qk<kN>(st, sm.latent(0), sm.rope(0), sm.q());
#pragma unroll
    for (int x = 0; x < kN / 2; ++x) s_out[(8 * (x / 4) + 2 * quad + x % 2) * 64 + tr0 + 8 * ((x % 4) / 2)] = st[x];
    narrow_store_p<kN>(st, sm.p(), tr0, quad);
    fence_proxy_async();
    named_barrier_sync(1, kNarrowThreads);
    float o[8][kN / 2];
#pragma unroll
    for (int mt = 0; mt < 8; ++mt)
#pragma unroll
        for (int x = 0; x < kN / 2; ++x) o[mt][x] = 0.0f;
    narrow_pv<kN>(o, sm.latent(0), sm.p());
#pragma unroll
    for (int mt = 0; mt < 8; ++mt)
#pragma unroll
        for (int x = 0; x < kN / 2; ++x)
            o_out[(8 * (x / 4) + 2 * quad + x % 2) * 512 + 64 * mt + tr0 + 8 * ((x % 4) / 2)] = o[mt][x];
}

// Online softmax across warpgroups: two 64-column tiles of s_in [64, 128] (log2 domain, −inf allowed), warpgroup g
// taking columns 32g .. 32g + 31 of each tile, through softmax_tile and total_row_sums as in the decode kernel.
// Writes each row's final max m (log2 units), total l = Σ exp2(s − m), the rescale factor of the second tile, and
// the bf16 P of the second tile [64, 64] unpacked from the A fragments each warpgroup received from the other.
extern "C" __global__ void __launch_bounds__(kThreads)
    mla_sm90_probe_softmax(const __grid_constant__ MlaSoftmaxProbeParams args) {
    const float* __restrict__ s_in = args.s_in;
    float* __restrict__ m_out = args.m_out;
    float* __restrict__ l_out = args.l_out;
    float* __restrict__ p_out = args.p_out;
    float* __restrict__ alpha_out = args.alpha_out;
    __shared__ float red[128];
    __shared__ uint32_t xbuf[4 * 4 * 128];
    const int tid = threadIdx.x, wg = tid / 128, t = tid % 128, warp = t / 32, lane = t % 32, quad = lane % 4;
    const int r0 = 16 * warp + lane / 4;
    float m[2] = {-INFINITY, -INFINITY};
    float l[2] = {0.0f, 0.0f};
    float alpha[2];
    uint32_t p[4][4];
    for (int tile = 0; tile < 2; ++tile) {
        float s[16];
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e)
                s[4 * j + e] = __ldg(s_in + (r0 + 8 * (e / 2)) * 128 + 64 * tile + 32 * wg + 8 * j + 2 * quad + e % 2);
        softmax_tile(s, m, l, alpha, p, red, xbuf, wg, t, r0);
    }
    total_row_sums(l, red, wg, t, r0);
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        if (wg == 0 && quad == 0) {
            m_out[r0 + 8 * hh] = m[hh];
            l_out[r0 + 8 * hh] = l[hh];
            alpha_out[r0 + 8 * hh] = alpha[hh];
        }
    }
    // A fragment register k of step c holds (row r0 + 8·(k % 2), column 16c + 8·(k / 2) + 2·quad + {0, 1}); each
    // warpgroup writes the two k-steps it received from the other one.
#pragma unroll
    for (int c = 0; c < 4; ++c) {
        if (c / 2 == wg) continue;
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            const __nv_bfloat162 v = *reinterpret_cast<const __nv_bfloat162*>(&p[c][k]);
            float* dst = p_out + (r0 + 8 * (k % 2)) * 64 + 16 * c + 8 * (k / 2) + 2 * quad;
            dst[0] = __bfloat162float(v.x);
            dst[1] = __bfloat162float(v.y);
        }
    }
}
