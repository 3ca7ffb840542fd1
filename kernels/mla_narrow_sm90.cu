// MLA decode for sm_90a, narrow variant: few query rows per sequence (h·s_q ≤ 32, e.g. h = 16, s_q = 1, the memory-bound decode case).
// Padding 16 rows to the 64 of wgmma's M wastes 3/4 of the tensor work and makes that case compute-bound, so here
// the products are transposed and the query rows are the N dimension (kN = 16 or 32 rows per CTA):
//   Sᵀ [64 tokens × kN] = K · Qᵀ : 36 × wgmma.m64nNk16, A = the K tile (K-major, as above), B = Q (kN rows × 576,
//                                  K-major, 9 blocks of kN × 128 B, 128B swizzle);
//   softmax per query row = per column of Sᵀ: maxima reduced over the 8 lanes and 4 warps holding a column (shuffles
//                                  + 512 B of shared memory), sums kept per thread until the end;
//   Pᵀ is stored to shared memory as a K-major B operand [kN rows × 64 tokens] (128B swizzle);
//   Oᵀ [512 × kN] += Vᵀ · Pᵀ : 8 column tiles × 4 k-steps of wgmma.m64nNk16 with A = Vᵀ read M-major (trans_a) from
//                                  the same K tile.
// One warpgroup (128 threads; thread 0 also produces) and the same 2-stage TMA ring, item loop, masking and outputs
// as the wide kernel. Tensor work per 64-token tile: 64·kN·(576 + 512) MACs (kN = 16: 1.1 M, ≈ 0.6 µs) against
// ≈ 2 µs of HBM time for the tile's 72 KiB at the per-SM share of 4.8 TB/s.
//
// FP8 cache: the same dequantization into a single latent stage as the wide FP8 kernel.
//
// r1k-sass: mla_decode_sm90_narrow16_bf16 HGMMA
// r1k-sass: mla_decode_sm90_narrow32_bf16 HGMMA
// r1k-sass: mla_decode_sm90_narrow16_fp8 HGMMA
// r1k-sass: mla_decode_sm90_narrow32_fp8 HGMMA

#include "common/mla_narrow.cuh"
#include "common/mla_params.cuh"

using namespace r1k::mla;

extern __shared__ __align__(16) uint8_t smem_raw[];

template <int kN, bool kFp8>
__device__ __forceinline__ void narrow_body(const CUtensorMap* tmap_q, const CUtensorMap* tmap_kv, const CUtensorMap* tmap_scales,
                                            const CUtensorMap* tmap_rope, const int* __restrict__ block_table,
                                            const int* __restrict__ seqlens,
                                            const int4* __restrict__ items, const int* __restrict__ cta_offsets,
                                            const int* __restrict__ split_offsets, float* __restrict__ o_part,
                                            float* __restrict__ lse_part, int batch, int s_q, int h, int page,
                                            int num_blocks, int max_blocks, float scale_log2, int causal,
                                            int box_rows, int q_box_rows) {
    constexpr int kC = kN / 8;       // 8-column chunks of the accumulators
    constexpr int kAcc = kN / 2;     // accumulator registers per m64nN tile
    using Sm = NarrowSmem<kN, kFp8>;
    constexpr int kS = Sm::kS;
    Sm sm;
    {
        const uint32_t addr = smem_u32(smem_raw);
        sm.base = smem_raw + ((1024u - (addr & 1023u)) & 1023u);
    }
    const int tid = threadIdx.x;
    if (tid == 0) {
        for (int i = 0; i < kS; ++i) {
            mbar_init(&sm.full()[i], 1);
            mbar_init(&sm.empty()[i], 1);
        }
        mbar_init(sm.qbar(), 1);
        mbar_init_fence();
    }
    __syncthreads();

    const int warp = tid / 32;
    const int lane = tid % 32;
    const int quad = lane % 4;
    const int tr0 = 16 * warp + lane / 4;  // token rows tr0, tr0 + 8 of the Sᵀ accumulator (V columns of Oᵀ)
    const int rows = s_q * h;
    const int row0 = blockIdx.y * kN;
    float* red = sm.red();
    auto issue = [&](const SeqView& v, int t0, int stage) {
        if constexpr (kFp8) {
            issue_tile_fp8(tmap_kv, tmap_scales, tmap_rope, v, box_rows, t0, sm.raw(stage), sm.rope(stage),
                           &sm.full()[stage]);
        } else {
            issue_tile(tmap_kv, v, box_rows, t0, sm.latent(stage), &sm.full()[stage]);
        }
    };

    uint32_t n = 0;
    uint32_t q_phase = 0;
    const int first = cta_offsets[blockIdx.x];
    const int last = cta_offsets[blockIdx.x + 1];
    for (int item = first; item < last; ++item) {
        const int4 it = items[item];
        const int b = it.x;
        if (b < 0 || b >= batch) continue;
        const int seqlen = min(max(seqlens[b], 0), max_blocks * page);
        SeqView v;
        v.table_row = block_table + static_cast<size_t>(b) * max_blocks;
        v.page = page;
        v.num_blocks = num_blocks;
        v.tok_end = min(min(it.z, max_blocks) * page, seqlen);
        const int tok_begin = max(it.y, 0) * page;
        const int num_tiles = v.tok_end > tok_begin ? (v.tok_end - tok_begin + kTileN - 1) / kTileN : 0;
        const size_t slot = static_cast<size_t>(split_offsets[b]) + it.w;

        __syncthreads();  // Q, both stages, Pᵀ and red are free
        if (tid == 0) {
            mbar_arrive_expect_tx(sm.qbar(), kBlocks * q_box_rows * 128u);
            for (int kb = 0; kb < kBlocks; ++kb)
                tma_load_2d(sm.q() + kb * kN * 128, tmap_q, sm.qbar(), kb * 64, b * rows + row0);
            // Fill the ring: the first kS − 1 tiles (all stages are free after the barrier above).
            for (int j = 0; j < kS - 1 && j < num_tiles; ++j) issue(v, tok_begin + j * kTileN, (n + j) % kS);
        }
        // This thread's query rows (columns of Sᵀ / Oᵀ): row0 + 8j + 2·quad + e.
        int limit[kC][2];
#pragma unroll
        for (int j = 0; j < kC; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int row = row0 + 8 * j + 2 * quad + e;
                const int qi = row / h;
                limit[j][e] = row >= rows ? 0 : causal ? min(max(seqlen - s_q + qi + 1, 0), seqlen) : seqlen;
            }
        float o[8][kAcc];
#pragma unroll
        for (int mt = 0; mt < 8; ++mt)
#pragma unroll
            for (int x = 0; x < kAcc; ++x) o[mt][x] = 0.0f;
        float m[kC][2], l[kC][2];
#pragma unroll
        for (int j = 0; j < kC; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                m[j][e] = -INFINITY;
                l[j][e] = 0.0f;
            }
        mbar_wait(sm.qbar(), q_phase);
        q_phase ^= 1;
        __syncwarp();

        for (int i = 0; i < num_tiles; ++i, ++n) {
            // Tile n sits in stage n % kS, the (n / kS)-th use of that stage; the producer keeps kS − 1 tiles
            // ahead, refilling the stage of tile n − 1 (released at the end of the previous iteration).
            const int s = n % kS;
            const int t0 = tok_begin + i * kTileN;
            if (tid == 0 && i + kS - 1 < num_tiles) {
                if (i >= 1) mbar_wait(&sm.empty()[(n - 1) % kS], ((n - 1) / kS) & 1);
                issue(v, t0 + (kS - 1) * kTileN, (n + kS - 1) % kS);
            }
            mbar_wait(&sm.full()[s], (n / kS) & 1);
            __syncwarp();
            const bool clean = tile_clean(v, box_rows, t0);
            if constexpr (kFp8) {
                // Every warp has waited for the previous tile's MMAs; the barrier makes the reuse of the single
                // latent stage explicit rather than relying on wgmma completion being warpgroup-wide.
                named_barrier_sync(2, kNarrowThreads);
                dequant_tile<kNarrowThreads>(v, box_rows, t0, sm.raw(s), sm.latent(s), sm.rope(s), tid);
            } else {
                if (!clean) zero_bad_rows<kNarrowThreads>(v, box_rows, t0, sm.latent(s), tid);
            }

            float st[kAcc];
            narrow_qk<kN>(st, sm.latent(s), sm.rope(s), sm.q());
            // Mask and scale: register 4j + 2hh + e is (token tr0 + 8hh, query row 8j + 2·quad + e).
            float cmax[kC][2];
#pragma unroll
            for (int j = 0; j < kC; ++j)
#pragma unroll
                for (int e = 0; e < 2; ++e) cmax[j][e] = -INFINITY;
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
                const int pos = t0 + tr0 + 8 * hh;
                const bool tok_ok = clean || (pos < v.tok_end && page_id(v, t0 + ((pos - t0) / box_rows) * box_rows) >= 0);
#pragma unroll
                for (int j = 0; j < kC; ++j)
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        float& x = st[4 * j + 2 * hh + e];
                        x = (tok_ok && pos < limit[j][e]) ? x * scale_log2 : -INFINITY;
                        cmax[j][e] = fmaxf(cmax[j][e], x);
                    }
            }
            // Column maxima: the 8 lanes of a warp sharing `quad`, then the 4 warps.
#pragma unroll
            for (int j = 0; j < kC; ++j)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
#pragma unroll
                    for (int off = 4; off < 32; off <<= 1)
                        cmax[j][e] = fmaxf(cmax[j][e], __shfl_xor_sync(0xffffffffu, cmax[j][e], off));
                    if (lane < 4) red[warp * kN + 8 * j + 2 * quad + e] = cmax[j][e];
                }
            named_barrier_sync(1, kNarrowThreads);
            float alpha[kC][2];
#pragma unroll
            for (int j = 0; j < kC; ++j)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int col = 8 * j + 2 * quad + e;
                    const float tmax = fmaxf(fmaxf(red[col], red[kN + col]), fmaxf(red[2 * kN + col], red[3 * kN + col]));
                    const float m_new = fmaxf(m[j][e], tmax);
                    alpha[j][e] = m_new == -INFINITY ? 1.0f : exp2f(m[j][e] - m_new);
                    float sum = 0.0f;
#pragma unroll
                    for (int hh = 0; hh < 2; ++hh) {
                        float& x = st[4 * j + 2 * hh + e];
                        x = m_new == -INFINITY ? 0.0f : exp2f(x - m_new);
                        sum += x;
                    }
                    l[j][e] = l[j][e] * alpha[j][e] + sum;
                    m[j][e] = m_new;
                }
            narrow_store_p<kN>(st, sm.p(), tr0, quad);
            fence_proxy_async();
            named_barrier_sync(1, kNarrowThreads);  // Pᵀ complete; also orders this tile's reads of red before reuse
#pragma unroll
            for (int mt = 0; mt < 8; ++mt)
#pragma unroll
                for (int j = 0; j < kC; ++j)
#pragma unroll
                    for (int x = 0; x < 4; ++x) o[mt][4 * j + x] *= alpha[j][x % 2];
            narrow_pv<kN>(o, sm.latent(s), sm.p());
            if (tid == 0) mbar_arrive(&sm.empty()[s]);
        }

        // Row sums: the 8 lanes sharing `quad`, then the 4 warps (fixed order).
#pragma unroll
        for (int j = 0; j < kC; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
#pragma unroll
                for (int off = 4; off < 32; off <<= 1) l[j][e] += __shfl_xor_sync(0xffffffffu, l[j][e], off);
                if (lane < 4) red[warp * kN + 8 * j + 2 * quad + e] = l[j][e];
            }
        named_barrier_sync(1, kNarrowThreads);
        float inv[kC][2];
#pragma unroll
        for (int j = 0; j < kC; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int col = 8 * j + 2 * quad + e;
                l[j][e] = ((red[col] + red[kN + col]) + red[2 * kN + col]) + red[3 * kN + col];
                inv[j][e] = l[j][e] > 0.0f ? 1.0f / l[j][e] : 0.0f;
            }
#pragma unroll
        for (int mt = 0; mt < 8; ++mt)
#pragma unroll
            for (int x = 0; x < kAcc; ++x) {
                const int row = row0 + 8 * (x / 4) + 2 * quad + x % 2;
                const int vcol = 64 * mt + tr0 + 8 * ((x % 4) / 2);
                if (row < rows) o_part[(slot * rows + row) * 512 + vcol] = o[mt][x] * inv[x / 4][x % 2];
            }
        if (warp == 0 && lane < 4) {
#pragma unroll
            for (int j = 0; j < kC; ++j)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int row = row0 + 8 * j + 2 * quad + e;
                    if (row < rows) lse_part[slot * rows + row] = l[j][e] > 0.0f ? (m[j][e] + log2f(l[j][e])) * kLn2 : -INFINITY;
                }
        }
    }
}

// As mla_decode_sm90_bf16 / _fp8 with kN (16 or 32) query rows per CTA (grid.y = ceil(s_q·h / kN)); tmap_q's
// box is 64 × q_box_rows with q_box_rows = min(kN, b·s_q·h).
#define R1K_NARROW_KERNEL(KN)                                                                                        \
    extern "C" __global__ void __launch_bounds__(kNarrowThreads, 1) mla_decode_sm90_narrow##KN##_bf16(              \
        const __grid_constant__ CUtensorMap tmap_q, const __grid_constant__ CUtensorMap tmap_kv,                            \
        const __grid_constant__ r1k_mla_params::DecodeParams p) {                                                   \
        narrow_body<KN, false>(&tmap_q, &tmap_kv, nullptr, nullptr, p.block_table, p.seqlens, p.items,              \
                               p.cta_offsets, p.split_offsets, p.o_part, p.lse_part, p.batch, p.s_q, p.h, p.page,   \
                               p.num_blocks, p.max_blocks, p.scale_log2, p.causal, p.box_rows, p.q_box_rows);       \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(kNarrowThreads, 1) mla_decode_sm90_narrow##KN##_fp8(               \
        const __grid_constant__ CUtensorMap tmap_q, const __grid_constant__ CUtensorMap tmap_codes,                         \
        const __grid_constant__ CUtensorMap tmap_scales, const __grid_constant__ CUtensorMap tmap_rope,                     \
        const __grid_constant__ r1k_mla_params::DecodeParams p) {                                                   \
        narrow_body<KN, true>(&tmap_q, &tmap_codes, &tmap_scales, &tmap_rope, p.block_table, p.seqlens, p.items,    \
                              p.cta_offsets, p.split_offsets, p.o_part, p.lse_part, p.batch, p.s_q, p.h, p.page,    \
                              p.num_blocks, p.max_blocks, p.scale_log2, p.causal, p.box_rows, p.q_box_rows);        \
    }
R1K_NARROW_KERNEL(16)
R1K_NARROW_KERNEL(32)
#undef R1K_NARROW_KERNEL
