// The narrow sm_90a MLA decode kernels' tile math and shared-memory layout (kernels/mla_narrow_sm90.cu; also run alone
// by the probes): transposed products with the query rows as wgmma's N dimension (16 or 32).
#pragma once
#include "common/mla_tile.cuh"

namespace r1k {
namespace mla {

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
        NarrowMma<kN>::s(st, make_smem_desc(ka, 16, 1024, kSwizzle128B), make_smem_desc(qb, 16, 1024, kSwizzle128B),
                         kk > 0 ? 1 : 0);
    }
    wgmma_commit();
    wgmma_wait_all();
    fence_regs(st);
}

// Pᵀ as a K-major B operand [kN rows × 64 tokens]: element (query row r, token k) at swizzle_128b(r, 2k) (twin:
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
                pb[swizzle_128b(8 * j + 2 * quad + e, 2 * (tr0 + 8 * hh)) / 2] = __float2bfloat16_rn(st[4 * j + 2 * hh + e]);
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
            NarrowMma<kN>::o(o[mt], make_smem_desc(va + mt * kBlockBytes + c * 2048, kBlockBytes, 1024, kSwizzle128B),
                             make_smem_desc(pa + c * 32, 16, 1024, kSwizzle128B), 1);
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

}  // namespace mla
}  // namespace r1k
