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
// r1k-sass: mla_sm90_probe_wgmma HGMMA
// r1k-sass: mla_sm90_probe_narrow_wgmma HGMMA
#include <cuda_bf16.h>
#include <stdint.h>

#include "common/fp8.cuh"
#include "common/mla.cuh"
#include "common/mla_params.cuh"

using namespace r1k_mla;

extern __shared__ __align__(16) uint8_t smem_raw[];

namespace {

constexpr int kRowsCta = 64;
constexpr int kTileN = 64;
constexpr int kBlocks = 9;                              // 576 / 64 column blocks
constexpr uint32_t kBlockBytes = 64 * 128;              // [64 rows][64 bf16]
constexpr uint32_t kTileBytes = kBlocks * kBlockBytes;  // 73,728
constexpr int kStages = 2;
constexpr int kThreads = 256;
constexpr float kLn2 = 0.6931471805599453f;

// Shared memory, base aligned to 1024 (required by the 128B swizzle).
//   bf16 cache: [Q | stage 0 | stage 1 | barriers]; a stage is the 9 column blocks of one K tile.
//   FP8 cache:  [Q | latent (8 blocks, single) | rope 0 | rope 1 | raw 0 | raw 1 | barriers]: TMA brings the raw
//               E4M3 codes + scales (raw stage: codes [2][64][256 B], scales [64][16 B]) and the bf16 RoPE block
//               (swizzled, double-buffered); the consumers dequantize the codes into the single latent stage.
constexpr uint32_t kLatentBytes = 8 * kBlockBytes;        // 65,536
constexpr uint32_t kRawCodesHalf = 64 * 256;              // 16,384
constexpr uint32_t kRawBytes = 2 * kRawCodesHalf + 64 * 16;  // 33,792
constexpr uint32_t kFp8LatentOff = kTileBytes;
constexpr uint32_t kFp8RopeOff = kFp8LatentOff + kLatentBytes;
constexpr uint32_t kFp8RawOff = kFp8RopeOff + kStages * kBlockBytes;
constexpr uint32_t kFp8BarOff = kFp8RawOff + kStages * kRawBytes;  // 223,232
constexpr uint32_t kBarBytes = 64;
constexpr uint32_t kRedBytes = 2 * 64 * 4;
constexpr uint32_t kXBytes = 4 * 4 * 128 * 4;  // 8 KiB
// Dynamic shared memory (host: sm90::SMEM_BYTES / SMEM_BYTES_FP8), 1 KiB alignment slack included.
constexpr uint32_t kSmemBf16 = 1024 + kTileBytes * (1 + kStages) + kBarBytes + kRedBytes + kXBytes;
constexpr uint32_t kSmemFp8 = 1024 + kFp8BarOff + kBarBytes + kRedBytes;
static_assert(kSmemBf16 == 230976 && kSmemFp8 == 224832, "keep src/mla/sm90.rs in sync");
static_assert(kSmemBf16 <= 232448 && kSmemFp8 <= 232448, "sm_90 opt-in shared memory per block");

template <bool kFp8>
struct Smem {
    uint8_t* q;
    // K column blocks 0..7 (the latent, also V) and block 8 (RoPE) of the tile in stage i.
    __device__ __forceinline__ uint8_t* latent(int i) const {
        return kFp8 ? q + kFp8LatentOff : q + kTileBytes * (1 + i);
    }
    __device__ __forceinline__ uint8_t* rope(int i) const {
        return kFp8 ? q + kFp8RopeOff + kBlockBytes * i : latent(i) + 8 * kBlockBytes;
    }
    __device__ __forceinline__ uint8_t* raw(int i) const { return q + kFp8RawOff + kRawBytes * i; }
    // Where the warpgroups swap P fragments while computing the tile of stage i: [4 k-steps][4 regs][128 threads].
    __device__ __forceinline__ uint32_t* xbuf(int i) const {
        return reinterpret_cast<uint32_t*>(kFp8 ? raw(i) : q + kTileBytes * (1 + kStages) + kBarBytes + kRedBytes);
    }
    uint64_t* full;   // [kStages]
    uint64_t* empty;  // [kStages]
    uint64_t* qbar;
    float* red;       // [2 warpgroups][64 rows]: row maxima, then row sums
};

template <bool kFp8>
__device__ __forceinline__ Smem<kFp8> carve(uint8_t* raw) {
    const uint32_t addr = smem_u32(raw);
    uint8_t* base = raw + ((1024u - (addr & 1023u)) & 1023u);
    Smem<kFp8> s;
    s.q = base;
    uint64_t* bars = reinterpret_cast<uint64_t*>(base + (kFp8 ? kFp8BarOff : kTileBytes * (1 + kStages)));
    s.full = bars;
    s.empty = bars + kStages;
    s.qbar = bars + 2 * kStages;
    s.red = reinterpret_cast<float*>(reinterpret_cast<uint8_t*>(bars) + kBarBytes);
    return s;
}

// Keeps the compiler from moving accumulator registers across the asynchronous wgmma.
template <int N>
__device__ __forceinline__ void fence_regs(float (&r)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

struct SeqView {
    const int* table_row;  // block_table + b·max_blocks
    int page;
    int num_blocks;
    int tok_end;
};

// Page id of token `pos`, or -1 (past the end of the piece, or a bad table entry).
__device__ __forceinline__ int page_id(const SeqView& v, int pos) {
    if (pos >= v.tok_end) return -1;
    const int id = v.table_row[pos / v.page];
    return (id >= 0 && id < v.num_blocks) ? id : -1;
}

// Producer: issue the TMA boxes of the 64-token tile starting at t0 into `dst`, arming `bar` with the bytes issued.
__device__ __forceinline__ void issue_tile(const TmaDesc* kv, const SeqView& v, int box_rows, int t0, uint8_t* dst,
                                           uint64_t* bar) {
    const int chunks = kTileN / box_rows;
    uint32_t bytes = 0;
    for (int c = 0; c < chunks; ++c) bytes += page_id(v, t0 + c * box_rows) >= 0 ? kBlocks * box_rows * 128u : 0u;
    mbar_arrive_expect_tx(bar, bytes);
    for (int c = 0; c < chunks; ++c) {
        const int pos = t0 + c * box_rows;
        const int id = page_id(v, pos);
        if (id < 0) continue;
        const int row = id * v.page + pos % v.page;
        for (int kb = 0; kb < kBlocks; ++kb)
            tma_load_2d(dst + kb * kBlockBytes + c * box_rows * 128, kv, kb * 64, row, bar);
    }
}

// FP8 producer: per valid chunk, codes as two 256-byte boxes, the 16 bytes of scales, and the RoPE block (bf16,
// swizzled) into its own double-buffered block.
__device__ __forceinline__ void issue_tile_fp8(const TmaDesc* codes, const TmaDesc* scales, const TmaDesc* rope,
                                               const SeqView& v, int box_rows, int t0, uint8_t* raw,
                                               uint8_t* rope_dst, uint64_t* bar) {
    const int chunks = kTileN / box_rows;
    uint32_t bytes = 0;
    for (int c = 0; c < chunks; ++c) bytes += page_id(v, t0 + c * box_rows) >= 0 ? 656u * box_rows : 0u;
    mbar_arrive_expect_tx(bar, bytes);
    for (int c = 0; c < chunks; ++c) {
        const int pos = t0 + c * box_rows;
        const int id = page_id(v, pos);
        if (id < 0) continue;
        const int row = id * v.page + pos % v.page;
        const int r0 = c * box_rows;
        tma_load_2d(raw + r0 * 256, codes, 0, row, bar);
        tma_load_2d(raw + kRawCodesHalf + r0 * 256, codes, 256, row, bar);
        tma_load_2d(raw + 2 * kRawCodesHalf + r0 * 16, scales, 512, row, bar);
        tma_load_2d(rope_dst + r0 * 128, rope, 0, row, bar);
    }
}

// Dequantizes the raw FP8 stage into the (single) latent stage: bf16(code · scale), the value
// reference::mla::dequantize_kv_cache_fp8 defines; rows without a valid token become zeros (latent and RoPE).
// All 256 threads; the caller has made sure no MMA still reads the latent stage. Ends with a barrier.
template <int kT = kThreads>
__device__ __forceinline__ void dequant_tile(const SeqView& v, int box_rows, int t0, const uint8_t* raw,
                                             uint8_t* latent, uint8_t* rope, int tid) {
    for (int idx = tid; idx < kTileN * 32; idx += kT) {
        const int r = idx / 32;
        const int g = idx % 32;  // 16-code group: columns 16g .. 16g + 15
        const bool bad = t0 + r >= v.tok_end || page_id(v, t0 + (r / box_rows) * box_rows) < 0;
        uint32_t packed[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        if (!bad) {
            const uint4 raw_codes = *reinterpret_cast<const uint4*>(raw + (g / 16) * kRawCodesHalf + r * 256 + (g % 16) * 16);
            const float scale = *reinterpret_cast<const float*>(raw + 2 * kRawCodesHalf + r * 16 + (g / 8) * 4);
            const uint8_t* c8 = reinterpret_cast<const uint8_t*>(&raw_codes);
#pragma unroll
            for (int e = 0; e < 8; ++e)
                packed[e] = pack_bf16x2(r1k::e4m3_to_f32(c8[2 * e]) * scale, r1k::e4m3_to_f32(c8[2 * e + 1]) * scale);
        }
        uint8_t* blk = latent + (g / 4) * kBlockBytes;
        *reinterpret_cast<uint4*>(blk + swizzle128(r, (g % 4) * 32)) = make_uint4(packed[0], packed[1], packed[2], packed[3]);
        *reinterpret_cast<uint4*>(blk + swizzle128(r, (g % 4) * 32 + 16)) =
            make_uint4(packed[4], packed[5], packed[6], packed[7]);
    }
    for (int idx = tid; idx < kTileN * 8; idx += kT) {
        const int r = idx / 8;
        const bool bad = t0 + r >= v.tok_end || page_id(v, t0 + (r / box_rows) * box_rows) < 0;
        if (bad) *reinterpret_cast<uint4*>(rope + r * 128 + (idx % 8) * 16) = make_uint4(0, 0, 0, 0);
    }
    fence_proxy_async();
    named_barrier_sync(1, kT);
}

// True when every token row of the tile is a real token on a valid page (no fix-up needed).
__device__ __forceinline__ bool tile_clean(const SeqView& v, int box_rows, int t0) {
    if (t0 + kTileN > v.tok_end) return false;
    for (int c = 0; c < kTileN / box_rows; ++c)
        if (page_id(v, t0 + c * box_rows) < 0) return false;
    return true;
}

// Zeroes the token rows of a stage that hold no valid token (all 256 threads; ends with a barrier).
template <int kT = kThreads>
__device__ __forceinline__ void zero_bad_rows(const SeqView& v, int box_rows, int t0, uint8_t* stage, int tid) {
    for (int idx = tid; idx < kTileN * kBlocks * 8; idx += kT) {
        const int r = idx / (kBlocks * 8);
        const int rest = idx % (kBlocks * 8);
        const int kb = rest / 8;
        const int chunk = rest % 8;
        const int pos = t0 + r;
        const bool bad = pos >= v.tok_end || page_id(v, t0 + (r / box_rows) * box_rows) < 0;
        if (bad) *reinterpret_cast<uint4*>(stage + kb * kBlockBytes + r * 128 + chunk * 16) = make_uint4(0, 0, 0, 0);
    }
    fence_proxy_async();
    named_barrier_sync(1, kT);
}

// S[64 × 64] = Q · Kᵀ over 576 columns (36 k-steps). Both operands K-major, 128B swizzle: a k-step of 16 bf16 is
// 32 bytes inside a 128-byte row, so its descriptor start advances by 32 within a column block and by 8 KiB across.
// The RoPE block (block 8) of K may live apart from the latent blocks (FP8 path). Warpgroup `half` takes token
// rows 32·half .. 32·half + 31: 4 KiB further into every block (a multiple of the 1 KiB swizzle atom).
__device__ __forceinline__ void qk_half_tile(float (&s)[16], const uint8_t* q, const uint8_t* k_latent,
                                             const uint8_t* k_rope, int half) {
    const uint32_t qa = smem_u32(q);
    const uint32_t la = smem_u32(k_latent) + half * 4096;
    const uint32_t ra = smem_u32(k_rope) + half * 4096;
    fence_regs(s);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kBlocks * 4; ++kk) {
        const uint32_t off = (kk / 4) * kBlockBytes + (kk % 4) * 32;
        const uint32_t koff = kk < 32 ? la + off : ra + (kk % 4) * 32;
        wgmma_m64n32k16_ss(s, smem_desc(qa + off, 16, 1024), smem_desc(koff, 16, 1024), kk > 0 ? 1 : 0);
    }
    wgmma_commit();
    wgmma_wait_all();
    fence_regs(s);
}

// O[64 × 256] += P · V[tokens, 256·wg ..]: V is MN-major (token rows of 128 B, 8-token atoms 1 KiB apart = SBO,
// 64-column blocks 8 KiB apart = LBO); k-step c covers tokens 16c .. 16c + 15 (start + 2 KiB per step).
__device__ __forceinline__ void pv_tile(float (&o)[128], const uint32_t (&p)[4][4], const uint8_t* k, int wg) {
    const uint32_t va = smem_u32(k) + 4 * wg * kBlockBytes;
    fence_regs(o);
    wgmma_fence();
#pragma unroll
    for (int c = 0; c < 4; ++c) wgmma_m64n256k16_rs_tb(o, p[c], smem_desc(va + c * 2048, kBlockBytes, 1024), 1);
    wgmma_commit();
    wgmma_wait_all();
    fence_regs(o);
}

// Online softmax over one 64-token tile whose S halves live in the two warpgroups. Accumulator layout of
// m64nNk16: thread (warp w, lane l) holds rows r0 = 16w + l/4 and r1 = r0 + 8; s[4j + e] is (r0, 8j + 2(l%4) + e)
// and s[4j + 2 + e] is (r1, same column), columns relative to the warpgroup's 32 tokens. Inputs are already scaled
// to the log2 domain and masked with −inf.
// Step 1: the quad-reduced maxima of this warpgroup's half, published to red[wg][row] (then a barrier).
__device__ __forceinline__ void half_row_max(const float (&s)[16], float (&mx)[2]) {
    mx[0] = mx[1] = -INFINITY;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        mx[0] = fmaxf(mx[0], fmaxf(s[4 * j], s[4 * j + 1]));
        mx[1] = fmaxf(mx[1], fmaxf(s[4 * j + 2], s[4 * j + 3]));
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
        mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
    }
}

// Step 2: with the tile maxima of both halves, update the running max m (log2 units) and this thread's partial row
// sum l, return the factor each O row is rescaled by and this half's P as bf16 A fragments of its 2 k-steps
// (k-step c' takes columns 16c' .. 16c' + 15, i.e. accumulator chunks 2c', 2c' + 1).
__device__ __forceinline__ void softmax_half(const float (&s)[16], const float (&tile_max)[2], float (&m)[2],
                                             float (&l)[2], float (&alpha)[2], uint32_t (&p)[2][4]) {
    float pv[16];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const float m_new = fmaxf(m[h], tile_max[h]);
        alpha[h] = m_new == -INFINITY ? 1.0f : exp2f(m[h] - m_new);
        float sum = 0.0f;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const float pe = m_new == -INFINITY ? 0.0f : exp2f(s[4 * j + 2 * h + e] - m_new);
                pv[4 * j + 2 * h + e] = pe;
                sum += pe;
            }
        }
        l[h] = l[h] * alpha[h] + sum;
        m[h] = m_new;
    }
#pragma unroll
    for (int c = 0; c < 2; ++c) {
        p[c][0] = pack_bf16x2(pv[8 * c + 0], pv[8 * c + 1]);
        p[c][1] = pack_bf16x2(pv[8 * c + 2], pv[8 * c + 3]);
        p[c][2] = pack_bf16x2(pv[8 * c + 4], pv[8 * c + 5]);
        p[c][3] = pack_bf16x2(pv[8 * c + 6], pv[8 * c + 7]);
    }
}

// Warpgroup wg holds P·V k-steps 2wg, 2wg + 1 (its token half) as A fragments; the other two come from the other
// warpgroup's thread with the same index t. Ends with all 4 k-steps in `pf`.
__device__ __forceinline__ void swap_p(const uint32_t (&mine)[2][4], uint32_t (&pf)[4][4], uint32_t* xbuf, int wg,
                                       int t) {
#pragma unroll
    for (int c = 0; c < 2; ++c)
#pragma unroll
        for (int k = 0; k < 4; ++k) xbuf[((2 * wg + c) * 4 + k) * 128 + t] = mine[c][k];
    named_barrier_sync(3, 256);
#pragma unroll
    for (int c = 0; c < 4; ++c)
#pragma unroll
        for (int k = 0; k < 4; ++k) pf[c][k] = (c / 2 == wg) ? mine[c % 2][k] : xbuf[(c * 4 + k) * 128 + t];
}

// The cross-warpgroup part of a tile's softmax: publish this half's maxima, combine with the other half's, run
// softmax_half, swap P fragments, and return all 4 k-steps of P in `pf`. `red` is [2][64] floats, `xbuf`
// [4][4][128] words; both are reused every tile (the two barriers order the reuse).
__device__ __forceinline__ void softmax_tile(const float (&s)[16], float (&m)[2], float (&l)[2], float (&alpha)[2],
                                             uint32_t (&pf)[4][4], float* red, uint32_t* xbuf, int wg, int t,
                                             int r0) {
    float mx[2];
    half_row_max(s, mx);
    if ((t & 3) == 0) {
        red[wg * 64 + r0] = mx[0];
        red[wg * 64 + r0 + 8] = mx[1];
    }
    named_barrier_sync(3, 256);
    mx[0] = fmaxf(mx[0], red[(1 - wg) * 64 + r0]);
    mx[1] = fmaxf(mx[1], red[(1 - wg) * 64 + r0 + 8]);
    uint32_t mine[2][4];
    softmax_half(s, mx, m, l, alpha, mine);
    swap_p(mine, pf, xbuf, wg, t);
}

// Final row sums: quad-reduce, then add the other warpgroup's (through red; a barrier before and after).
__device__ __forceinline__ void total_row_sums(float (&l)[2], float* red, int wg, int t, int r0) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
        l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
    }
    named_barrier_sync(3, 256);  // everyone has read the last tile's maxima
    if ((t & 3) == 0) {
        red[wg * 64 + r0] = l[0];
        red[wg * 64 + r0 + 8] = l[1];
    }
    named_barrier_sync(3, 256);
    // Same summation order in both warpgroups (warpgroup 0's part first), so both normalize identically.
    const float a0 = red[r0], a1 = red[r0 + 8], b0 = red[64 + r0], b1 = red[64 + r0 + 8];
    l[0] = a0 + b0;
    l[1] = a1 + b1;
}

template <bool kFp8>
__device__ __forceinline__ void init_barriers(const Smem<kFp8>& sm) {
    if (threadIdx.x == 0) {
        for (int i = 0; i < kStages; ++i) {
            mbar_init(&sm.full[i], 1);
            mbar_init(&sm.empty[i], 2);
        }
        mbar_init(sm.qbar, 1);
        mbar_init_fence();
    }
    __syncthreads();
}

}  // namespace

// tmap_q: q viewed as [b·s_q·h, 576] bf16, box 64 × q_box_rows (= min(64, b·s_q·h)), 128B swizzle; Q rows past
// the box are stale shared memory, which only feeds padding rows (masked by replacement, never stored).
// tmap_kv: cache viewed as [num_blocks·page, 576] bf16, box 64 × box_rows (box_rows = min(page, 64)), 128B swizzle.
// items / cta_offsets / split_offsets: the plan (see mla_decode.cu). o_part [splits, s_q·h, 512], lse_part
// [splits, s_q·h].
template <bool kFp8>
__device__ __forceinline__ void decode_body(const TmaDesc* tmap_q, const TmaDesc* tmap_kv, const TmaDesc* tmap_scales,
                                            const TmaDesc* tmap_rope, const int* __restrict__ block_table,
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
                tma_load_2d(sm.q + kb * kBlockBytes, tmap_q, kb * 64, b * rows + row0, sm.qbar);
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
    mla_decode_sm90_bf16(const __grid_constant__ TmaDesc tmap_q, const __grid_constant__ TmaDesc tmap_kv,
                         const __grid_constant__ r1k_mla_params::DecodeParams p) {
    decode_body<false>(&tmap_q, &tmap_kv, nullptr, nullptr, p.block_table, p.seqlens, p.items, p.cta_offsets,
                       p.split_offsets, p.o_part, p.lse_part, p.batch, p.s_q, p.h, p.page, p.num_blocks, p.max_blocks,
                       p.scale_log2, p.causal, p.box_rows, p.q_box_rows);
}

// FP8 cache ([num_blocks·page, 656] bytes): tmap_codes u8 box 256 × box_rows, tmap_scales u8 box 16 × box_rows
// (both unswizzled), tmap_rope bf16 over cache + 528 with a 656-byte row stride, box 64 × box_rows, 128B swizzle.
extern "C" __global__ void __launch_bounds__(kThreads, 1)
    mla_decode_sm90_fp8(const __grid_constant__ TmaDesc tmap_q, const __grid_constant__ TmaDesc tmap_codes,
                        const __grid_constant__ TmaDesc tmap_scales, const __grid_constant__ TmaDesc tmap_rope,
                        const __grid_constant__ r1k_mla_params::DecodeParams p) {
    decode_body<true>(&tmap_q, &tmap_codes, &tmap_scales, &tmap_rope, p.block_table, p.seqlens, p.items,
                      p.cta_offsets, p.split_offsets, p.o_part, p.lse_part, p.batch, p.s_q, p.h, p.page, p.num_blocks,
                      p.max_blocks, p.scale_log2, p.causal, p.box_rows, p.q_box_rows);
}

// ---------------------------------------------------------------------------------------------------------------
// Narrow variant for few query rows per sequence (h·s_q ≤ 32, e.g. h = 16, s_q = 1, the memory-bound decode case).
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

constexpr int kNarrowThreads = 128;

template <int kN>
struct NarrowMma;
template <>
struct NarrowMma<16> {
    static __device__ __forceinline__ void s(float (&d)[8], uint64_t a, uint64_t b, int sd) {
        wgmma_m64n16k16_ss(d, a, b, sd);
    }
    static __device__ __forceinline__ void o(float (&d)[8], uint64_t a, uint64_t b, int sd) {
        wgmma_m64n16k16_ss_ta(d, a, b, sd);
    }
};
template <>
struct NarrowMma<32> {
    static __device__ __forceinline__ void s(float (&d)[16], uint64_t a, uint64_t b, int sd) {
        wgmma_m64n32k16_ss(d, a, b, sd);
    }
    static __device__ __forceinline__ void o(float (&d)[16], uint64_t a, uint64_t b, int sd) {
        wgmma_m64n32k16_ss_ta(d, a, b, sd);
    }
};

// Sᵀ [64 tokens × kN] = K · Qᵀ over 576 columns: A = the K tile (K-major; RoPE block apart), B = Q (kN rows,
// K-major, 9 blocks of kN·128 B).
template <int kN>
__device__ __forceinline__ void narrow_qk(float (&st)[kN / 2], const uint8_t* latent, const uint8_t* rope,
                                          const uint8_t* q) {
    const uint32_t la = smem_u32(latent), ra = smem_u32(rope), qa = smem_u32(q);
    fence_regs(st);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kBlocks * 4; ++kk) {
        const uint32_t ka = kk < 32 ? la + (kk / 4) * kBlockBytes + (kk % 4) * 32 : ra + (kk % 4) * 32;
        const uint32_t qb = qa + (kk / 4) * kN * 128 + (kk % 4) * 32;
        NarrowMma<kN>::s(st, smem_desc(ka, 16, 1024), smem_desc(qb, 16, 1024), kk > 0 ? 1 : 0);
    }
    wgmma_commit();
    wgmma_wait_all();
    fence_regs(st);
}

// Pᵀ as a K-major B operand [kN rows × 64 tokens]: element (query row r, token k) at swizzle128(r, 2k) (twin:
// sm90::narrow_p_offset). Register 4j + 2hh + e of the thread holds (token tr0 + 8hh, row 8j + 2·quad + e).
template <int kN>
__device__ __forceinline__ void narrow_store_p(const float (&st)[kN / 2], uint8_t* p, int tr0, int quad) {
    __nv_bfloat16* pb = reinterpret_cast<__nv_bfloat16*>(p);
#pragma unroll
    for (int j = 0; j < kN / 8; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e)
#pragma unroll
            for (int hh = 0; hh < 2; ++hh)
                pb[swizzle128(8 * j + 2 * quad + e, 2 * (tr0 + 8 * hh)) / 2] = __float2bfloat16_rn(st[4 * j + 2 * hh + e]);
}

// Oᵀ [512 × kN] += Vᵀ · Pᵀ: 8 column tiles × 4 k-steps; A = Vᵀ read M-major (trans_a) from the latent blocks,
// B = Pᵀ from shared memory.
template <int kN>
__device__ __forceinline__ void narrow_pv(float (&o)[8][kN / 2], const uint8_t* latent, const uint8_t* p) {
    const uint32_t va = smem_u32(latent), pa = smem_u32(p);
#pragma unroll
    for (int mt = 0; mt < 8; ++mt) fence_regs(o[mt]);
    wgmma_fence();
#pragma unroll
    for (int mt = 0; mt < 8; ++mt)
#pragma unroll
        for (int c = 0; c < 4; ++c)
            NarrowMma<kN>::o(o[mt], smem_desc(va + mt * kBlockBytes + c * 2048, kBlockBytes, 1024),
                             smem_desc(pa + c * 32, 16, 1024), 1);
    wgmma_commit();
    wgmma_wait_all();
#pragma unroll
    for (int mt = 0; mt < 8; ++mt) fence_regs(o[mt]);
}

// Shared memory, bf16 cache: [stage 0 | stage 1 | Q (9 × kN·128 B) | Pᵀ (kN·128 B) | barriers | red];
// FP8 cache: [Q | latent (single) | RoPE × kS | raw × kS | Pᵀ | barriers | red] (as the wide FP8 kernel, with a
// 3-deep ring when it fits: FP8 tiles are small, so more of them must be in flight to cover HBM latency).
// red holds 4 warps × kN f32.
template <int kN, bool kFp8>
struct NarrowSmem {
    static constexpr int kS = (kFp8 && kN == 16) ? 3 : 2;  // ring depth (Twin: sm90::narrow_stages)
    static constexpr uint32_t kQ = kFp8 ? 0 : kTileBytes * kS;
    static constexpr uint32_t kLat = kBlocks * kN * 128;  // FP8 only
    static constexpr uint32_t kRope = kLat + kLatentBytes;
    static constexpr uint32_t kRaw = kRope + kS * kBlockBytes;
    static constexpr uint32_t kP = kFp8 ? kRaw + kS * kRawBytes : kQ + kBlocks * kN * 128;
    static constexpr uint32_t kBar = kP + kN * 128;
    static constexpr uint32_t kBytes = 1024 + kBar + 64 + 4 * kN * 4;  // Twin: sm90::narrow_smem_bytes
    uint8_t* base;
    __device__ __forceinline__ uint8_t* latent(int i) const { return kFp8 ? base + kLat : base + kTileBytes * i; }
    __device__ __forceinline__ uint8_t* rope(int i) const {
        return kFp8 ? base + kRope + kBlockBytes * i : latent(i) + 8 * kBlockBytes;
    }
    __device__ __forceinline__ uint8_t* raw(int i) const { return base + kRaw + kRawBytes * i; }
    __device__ __forceinline__ uint8_t* q() const { return base + kQ; }
    __device__ __forceinline__ uint8_t* p() const { return base + kP; }
    __device__ __forceinline__ uint64_t* bars() const { return reinterpret_cast<uint64_t*>(base + kBar); }
    __device__ __forceinline__ uint64_t* full() const { return bars(); }
    __device__ __forceinline__ uint64_t* empty() const { return bars() + kS; }
    __device__ __forceinline__ uint64_t* qbar() const { return bars() + 2 * kS; }
    __device__ __forceinline__ float* red() const { return reinterpret_cast<float*>(bars() + 8); }
    static_assert(2 * kS + 1 <= 8, "barriers fit in 64 bytes");
};
static_assert(NarrowSmem<16, false>::kBytes == 169280 && NarrowSmem<32, false>::kBytes == 190016 &&
                  NarrowSmem<16, true>::kBytes == 213312 && NarrowSmem<32, true>::kBytes == 192064,
              "keep sm90.rs in sync");
static_assert(NarrowSmem<16, true>::kBytes <= 232448 && NarrowSmem<32, true>::kBytes <= 232448, "sm_90 smem");

template <int kN, bool kFp8>
__device__ __forceinline__ void narrow_body(const TmaDesc* tmap_q, const TmaDesc* tmap_kv, const TmaDesc* tmap_scales,
                                            const TmaDesc* tmap_rope, const int* __restrict__ block_table,
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
                tma_load_2d(sm.q() + kb * kN * 128, tmap_q, kb * 64, b * rows + row0, sm.qbar());
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
        const __grid_constant__ TmaDesc tmap_q, const __grid_constant__ TmaDesc tmap_kv,                            \
        const __grid_constant__ r1k_mla_params::DecodeParams p) {                                                   \
        narrow_body<KN, false>(&tmap_q, &tmap_kv, nullptr, nullptr, p.block_table, p.seqlens, p.items,              \
                               p.cta_offsets, p.split_offsets, p.o_part, p.lse_part, p.batch, p.s_q, p.h, p.page,   \
                               p.num_blocks, p.max_blocks, p.scale_log2, p.causal, p.box_rows, p.q_box_rows);       \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(kNarrowThreads, 1) mla_decode_sm90_narrow##KN##_fp8(               \
        const __grid_constant__ TmaDesc tmap_q, const __grid_constant__ TmaDesc tmap_codes,                         \
        const __grid_constant__ TmaDesc tmap_scales, const __grid_constant__ TmaDesc tmap_rope,                     \
        const __grid_constant__ r1k_mla_params::DecodeParams p) {                                                   \
        narrow_body<KN, true>(&tmap_q, &tmap_codes, &tmap_scales, &tmap_rope, p.block_table, p.seqlens, p.items,    \
                              p.cta_offsets, p.split_offsets, p.o_part, p.lse_part, p.batch, p.s_q, p.h, p.page,    \
                              p.num_blocks, p.max_blocks, p.scale_log2, p.causal, p.box_rows, p.q_box_rows);        \
    }
R1K_NARROW_KERNEL(16)
R1K_NARROW_KERNEL(32)
#undef R1K_NARROW_KERNEL

// ---------------------------------------------------------------------------------------------------------------
// Primitive probes for GPU tests: each exercises one building block of the kernel above in isolation.

// Tile load: TMA-loads the 64-token tile starting at token t0 of a sequence (table row `table_row`, `tok_end`
// tokens) into shared memory, applies the bad-row fix-up and copies the raw (swizzled) 73,728-byte stage to `out`.
// Expected bytes: sm90::tile_image in Rust.
extern "C" __global__ void __launch_bounds__(kThreads, 1)
    mla_sm90_probe_tile_load(const __grid_constant__ TmaDesc tmap_kv, const int* __restrict__ table_row,
                             uint8_t* __restrict__ out, int page, int num_blocks, int box_rows, int t0, int tok_end) {
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
    mla_sm90_probe_fp8_tile_load(const __grid_constant__ TmaDesc tmap_codes, const __grid_constant__ TmaDesc tmap_scales,
                                 const __grid_constant__ TmaDesc tmap_rope, const int* __restrict__ table_row,
                                 uint8_t* __restrict__ out, int page, int num_blocks, int box_rows, int t0,
                                 int tok_end) {
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
    mla_sm90_probe_wgmma(const __grid_constant__ TmaDesc tmap_q, const __grid_constant__ TmaDesc tmap_kv,
                         const int* __restrict__ table_row, float* __restrict__ s_out, float* __restrict__ o_out,
                         int page, int num_blocks, int box_rows) {
    const Smem<false> sm = carve<false>(smem_raw);
    init_barriers(sm);
    const int tid = threadIdx.x, wg = tid / 128, t = tid % 128, warp = t / 32, lane = t % 32, quad = lane % 4;
    SeqView v{table_row, page, num_blocks, kTileN};
    if (tid == 0) {
        mbar_arrive_expect_tx(sm.qbar, kTileBytes);
        for (int kb = 0; kb < kBlocks; ++kb) tma_load_2d(sm.q + kb * kBlockBytes, &tmap_q, kb * 64, 0, sm.qbar);
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
    mla_sm90_probe_narrow_wgmma(const __grid_constant__ TmaDesc tmap_q, const __grid_constant__ TmaDesc tmap_kv,
                                const int* __restrict__ table_row, float* __restrict__ s_out,
                                float* __restrict__ o_out, int page, int num_blocks, int box_rows) {
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
        for (int kb = 0; kb < kBlocks; ++kb) tma_load_2d(sm.q() + kb * kN * 128, &tmap_q, kb * 64, 0, sm.qbar());
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
    mla_sm90_probe_softmax(const float* __restrict__ s_in, float* __restrict__ m_out, float* __restrict__ l_out,
                           float* __restrict__ p_out, float* __restrict__ alpha_out) {
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
                s[4 * j + e] = s_in[(r0 + 8 * (e / 2)) * 128 + 64 * tile + 32 * wg + 8 * j + 2 * quad + e % 2];
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
