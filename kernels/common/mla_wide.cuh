// The wide sm_90a MLA decode kernel's shared-memory layout and tile math (kernels/mla_sm90.cu; also run alone by the
// probes): Q·Kᵀ per warpgroup half, the online softmax split across the two warpgroups, P·V with P from registers.
#pragma once
#include "common/mla_tile.cuh"

namespace r1k {
namespace mla {

constexpr int kRowsCta = 64;
constexpr int kStages = 2;

// Shared memory, base aligned to 1024 (required by the 128B swizzle).
//   bf16 cache: [Q | stage 0 | stage 1 | barriers]; a stage is the 9 column blocks of one K tile.
//   FP8 cache:  [Q | latent (8 blocks, single) | rope 0 | rope 1 | raw 0 | raw 1 | barriers]: TMA brings the raw
//               stages and the RoPE blocks (double-buffered); the consumers dequantize the codes into the single
//               latent stage.
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
        wgmma_m64n32k16_ss(s, make_smem_desc(qa + off, 16, 1024, kSwizzle128B),
                           make_smem_desc(koff, 16, 1024, kSwizzle128B), kk > 0 ? 1 : 0);
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
    for (int c = 0; c < 4; ++c)
        wgmma_m64n256k16_rs_tb(o, p[c], make_smem_desc(va + c * 2048, kBlockBytes, 1024, kSwizzle128B), 1);
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

}  // namespace mla
}  // namespace r1k
