// MLA decode fast path for sm_90a (H100/H200/H800/H20): TMA + mbarrier ring, bf16 wgmma for QKᵀ and P·V.
// Two kernel families share the pipeline: the wide kernels (64 query rows per CTA, 2 warpgroups; bf16 and FP8
// cache) described first, and the narrow kernels (16 or 32 query rows per CTA, 1 warpgroup, transposed products;
// further down) that the launcher picks when s_q·h ≤ 32, the memory-bound decode shapes.
//
// Numbers (b sequences, s_q queries, h heads, s_k keys): flops = 2·b·h·s_q·s_k·(576 + 512); minimum bytes = KV once
// (s_k·1152 B) + q (b·s_q·h·1152 B) + o (b·s_q·h·1024 B). Memory-bound for s_q·h ≤ 64 rows per KV byte ratio
// (h = 16, s_q = 1: 64·16·1088·2 / 1152 ≈ 30 flop/B ≪ the ~200 flop/B balance point), compute-bound when many rows
// (h = 128, s_q = 2) share each KV tile.
//
// Tiling: a CTA of 2 warpgroups (256 threads) owns 64 query rows (row = query·h + head; h·s_q is padded to 64, grid.y
// = row groups) and walks the work items of the host scheduler (src/mla/sched.rs). Q [64 × 576] bf16 sits in shared
// memory for the whole item (9 column blocks of 64, each [64 rows × 128 B] 128B-swizzled, loaded by TMA). K tiles of
// 64 tokens × 576 columns stream through a 2-stage ring (73,728 B per stage; smem total ≈ 225 KiB):
//   S = Q·Kᵀ : warpgroup g computes the 64 × 32 half of S for tokens 32g .. 32g + 31 with 36 × wgmma.m64n32k16
//              (A = Q, B = K, both K-major from smem),
//   online softmax in fp32, log2 domain (scale·log2 e folded in, exp2): row maxima reduced over the 4-lane quads,
//              then exchanged between the warpgroups through 512 B of shared memory (named barrier), so both apply
//              the same running max; each keeps its own partial row sums (summed across warpgroups at the end),
//   O += P·V : 4 × wgmma.m64n256k16 per warpgroup, P from registers: each warpgroup re-packs its S half into the bf16
//              A fragments of 2 k-steps and swaps them with the other warpgroup through 8 KiB of shared memory (the
//              fragment layout depends only on the thread's index in its warpgroup), V = the first 512 columns of
//              the same K tile read as an MN-major operand, warpgroup g owning output columns 256·g .. 256·g + 255
//              (128 fp32 accumulators per thread).
// Pipeline: thread 0 is also the producer: while the warpgroups compute tile i it issues the TMA loads of tile i + 1
// into the other stage after both warpgroups released it (empty mbarrier, 2 arrivals). One TMA box is 64 columns ×
// min(page, 64) tokens, so pages of 8, 16, 32, 64 or any multiple of 64 tokens work. Table entries are bounds-checked
// on the device; rows of a tile that are past the sequence (or on a bad page) are zeroed in shared memory before the
// MMAs (the tail of a page may hold NaN) and masked to −inf in S.
// FP8 cache (mla_decode_sm90_fp8): TMA brings each tile's raw E4M3 codes + fp32 scales (unswizzled) and its bf16
// RoPE block (swizzled) into double-buffered raw stages; all 256 threads dequantize the codes to bf16(code·scale)
// into a single swizzled latent stage (after both warpgroups finished the previous tile), then the same MMAs run.
// The RoPE block lives apart from the latent blocks, so QKᵀ takes its last 4 k-steps from there. Shared memory:
// Q 72 KiB + latent 64 KiB + 2 × 8 KiB RoPE + 2 × 33 KiB raw ≈ 219 KiB; the P exchange uses the raw stage of
// the tile being computed (free once dequantized).
// Output: fp32 partial O (normalized) and partial lse per split, merged by mla_combine (kernels/mla_decode.cu).
//
// r1k-sass: mla_decode_sm90_bf16 HGMMA
// r1k-sass: mla_decode_sm90_fp8 HGMMA
#include "common/mla_params.cuh"
#include "common/mla_wide.cuh"

using namespace r1k::mla;

extern __shared__ __align__(16) uint8_t smem_raw[];

// tmap_q: q viewed as [b·s_q·h, 576] bf16, box 64 × q_box_rows (= min(64, b·s_q·h)), 128B swizzle; Q rows past
// the box are stale shared memory, which only feeds padding rows (masked by replacement, never stored).
// tmap_kv: cache viewed as [num_blocks·page, 576] bf16, box 64 × box_rows (box_rows = min(page, 64)), 128B swizzle.
// items / cta_offsets / split_offsets: the plan (see mla_decode.cu). o_part [splits, s_q·h, 512], lse_part
// [splits, s_q·h].
template <bool kFp8>
__device__ __forceinline__ void decode_body(const CUtensorMap* tmap_q, const CUtensorMap* tmap_kv, const CUtensorMap* tmap_scales,
                                            const CUtensorMap* tmap_rope, const int* __restrict__ block_table,
                                            const int* __restrict__ seqlens, const int4* __restrict__ items,
                                            const int* __restrict__ cta_offsets, const int* __restrict__ split_offsets,
                                            float* __restrict__ o_part, float* __restrict__ lse_part, int batch,
                                            int s_q, int h, int page, int num_blocks, int max_blocks,
                                            float scale_log2, int causal, int box_rows,
                                            int q_box_rows) {
    const Smem<kFp8> sm = carve<kFp8>(smem_raw);
    init_barriers(sm);
    auto issue = [&](const SeqView& v, int t0, int stage) {
        if constexpr (kFp8) {
            issue_tile_fp8(tmap_kv, tmap_scales, tmap_rope, v, box_rows, t0, sm.raw(stage), sm.rope(stage),
                           &sm.full[stage]);
        } else {
            issue_tile(tmap_kv, v, box_rows, t0, sm.latent(stage), &sm.full[stage]);
        }
    };

    const int tid = threadIdx.x;
    const int wg = tid / 128;
    const int t = tid % 128;
    const int warp = t / 32;
    const int lane = t % 32;
    const int quad = lane % 4;
    const int rows = s_q * h;
    const int row0 = blockIdx.y * kRowsCta;
    const int my_row[2] = {row0 + 16 * warp + lane / 4, row0 + 16 * warp + lane / 4 + 8};

    uint32_t n = 0;  // tiles consumed by this CTA so far (stage = n % 2, phase = (n / 2) & 1)
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

        __syncthreads();  // Q and both stages are free: the previous item's MMAs have completed
        if (tid == 0) {
            mbar_arrive_expect_tx(sm.qbar, kBlocks * q_box_rows * 128u);
            for (int kb = 0; kb < kBlocks; ++kb)
                tma_load_2d(sm.q + kb * kBlockBytes, tmap_q, sm.qbar, kb * 64, b * rows + row0);
            if (num_tiles > 0) issue(v, tok_begin, n % 2);
        }
        int limit[2];
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            const int qi = my_row[hh] / h;
            limit[hh] = my_row[hh] >= rows ? 0 : causal ? min(max(seqlen - s_q + qi + 1, 0), seqlen) : seqlen;
        }
        float o[128];
#pragma unroll
        for (int i = 0; i < 128; ++i) o[i] = 0.0f;
        float m[2] = {-INFINITY, -INFINITY};
        float l[2] = {0.0f, 0.0f};
        mbar_wait(sm.qbar, q_phase);
        q_phase ^= 1;
        __syncwarp();

        for (int i = 0; i < num_tiles; ++i, ++n) {
            const int s = n % 2;
            const int t0 = tok_begin + i * kTileN;
            if (tid == 0 && i + 1 < num_tiles) {
                if (i >= 1) mbar_wait(&sm.empty[(n + 1) % 2], ((n - 1) / 2) & 1);
                issue(v, t0 + kTileN, (n + 1) % 2);
            }
            mbar_wait(&sm.full[s], (n / 2) & 1);
            __syncwarp();  // the wgmma below are warp-synchronous (.aligned): reconverge after producer work and spins
            const bool clean = tile_clean(v, box_rows, t0);
            if constexpr (kFp8) {
                named_barrier_sync(2, kThreads);  // both warpgroups are done with the previous tile's latent stage
                dequant_tile(v, box_rows, t0, sm.raw(s), sm.latent(s), sm.rope(s), tid);
            } else {
                if (!clean) zero_bad_rows(v, box_rows, t0, sm.latent(s), tid);
            }

            float sacc[16];
#pragma unroll
            for (int x = 0; x < 16; ++x) sacc[x] = 0.0f;
            qk_half_tile(sacc, sm.q, sm.latent(s), sm.rope(s), wg);

            // Scale into the log2 domain and mask: causal limit per row, end of piece / bad pages per column.
#pragma unroll
            for (int j = 0; j < 4; ++j) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int pos = t0 + 32 * wg + 8 * j + 2 * quad + e;
                    const bool col_ok =
                        clean || (pos < v.tok_end && page_id(v, t0 + ((pos - t0) / box_rows) * box_rows) >= 0);
#pragma unroll
                    for (int hh = 0; hh < 2; ++hh) {
                        float& x = sacc[4 * j + 2 * hh + e];
                        x = (col_ok && pos < limit[hh]) ? x * scale_log2 : -INFINITY;
                    }
                }
            }
            float alpha[2];
            uint32_t pf[4][4];
            softmax_tile(sacc, m, l, alpha, pf, sm.red, sm.xbuf(s), wg, t, my_row[0] - row0);
            if constexpr (kFp8) fence_proxy_async();  // P went through the raw stage, which TMA refills next
#pragma unroll
            for (int j = 0; j < 32; ++j) {
                o[4 * j + 0] *= alpha[0];
                o[4 * j + 1] *= alpha[0];
                o[4 * j + 2] *= alpha[1];
                o[4 * j + 3] *= alpha[1];
            }
            pv_tile(o, pf, sm.latent(s), wg);
            if (t == 0) mbar_arrive(&sm.empty[s]);
        }

        total_row_sums(l, sm.red, wg, t, my_row[0] - row0);
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            const int row = my_row[hh];
            if (row >= rows) continue;
            const float inv = l[hh] > 0.0f ? 1.0f / l[hh] : 0.0f;
            float* dst = o_part + (slot * rows + row) * 512 + 256 * wg + 2 * quad;
#pragma unroll
            for (int j = 0; j < 32; ++j)
                *reinterpret_cast<float2*>(dst + 8 * j) = make_float2(o[4 * j + 2 * hh] * inv, o[4 * j + 2 * hh + 1] * inv);
            if (wg == 0 && quad == 0)
                lse_part[slot * rows + row] = l[hh] > 0.0f ? (m[hh] + log2f(l[hh])) * kLn2 : -INFINITY;
        }
    }
}

// The tensor maps, then every other argument in one struct (common/mla_params.cuh; q and cache unused).
extern "C" __global__ void __launch_bounds__(kThreads, 1)
    mla_decode_sm90_bf16(const __grid_constant__ CUtensorMap tmap_q, const __grid_constant__ CUtensorMap tmap_kv,
                         const __grid_constant__ r1k_mla_params::DecodeParams p) {
    decode_body<false>(&tmap_q, &tmap_kv, nullptr, nullptr, p.block_table, p.seqlens, p.items, p.cta_offsets,
                       p.split_offsets, p.o_part, p.lse_part, p.batch, p.s_q, p.h, p.page, p.num_blocks, p.max_blocks,
                       p.scale_log2, p.causal, p.box_rows, p.q_box_rows);
}

// FP8 cache ([num_blocks·page, 656] bytes): tmap_codes u8 box 256 × box_rows, tmap_scales u8 box 16 × box_rows
// (both unswizzled), tmap_rope bf16 over cache + 528 with a 656-byte row stride, box 64 × box_rows, 128B swizzle.
extern "C" __global__ void __launch_bounds__(kThreads, 1)
    mla_decode_sm90_fp8(const __grid_constant__ CUtensorMap tmap_q, const __grid_constant__ CUtensorMap tmap_codes,
                        const __grid_constant__ CUtensorMap tmap_scales, const __grid_constant__ CUtensorMap tmap_rope,
                        const __grid_constant__ r1k_mla_params::DecodeParams p) {
    decode_body<true>(&tmap_q, &tmap_codes, &tmap_scales, &tmap_rope, p.block_table, p.seqlens, p.items,
                      p.cta_offsets, p.split_offsets, p.o_part, p.lse_part, p.batch, p.s_q, p.h, p.page, p.num_blocks,
                      p.max_blocks, p.scale_log2, p.causal, p.box_rows, p.q_box_rows);
}
