/* Build and run from the crate root (about 20 s of g++ time, almost all of it CuTe template instantiation):

     g++ -std=c++17 -O1 -Wno-deprecated-declarations -I/work/main/emu/cpp -I/work/main/.cuda-toolchain/include \
         -I/work/main/.cuda-toolchain/include/cccl -I/work/main/.cuda-toolchain/cutlass-include \
         emu/cpp/tests/wgmma_test.cpp emu/cpp/wgmma_core.cpp emu/cpp/numerics_core.cpp -o target/wgmma_test \
       && target/wgmma_test
*/
// Unit tests of the pure wgmma model (wgmma_core.cpp) with CuTe as the oracle.
//
// CuTe on the host with g++ 12: the CUTLASS headers need libcu++ (<cuda/std/...>), which the toolkit keeps in
// include/cccl, hence the extra -I; -Wno-deprecated-declarations silences CUDA 13's long4/ulong4 deprecation
// warnings from cutlass/platform/platform.h. No other defines are needed. make_gmma_desc gets its start address
// from cast_smem_ptr_to_uint, which on the host prints an error and returns 0; defining
// CUTE_CVTA_GENERIC_TO_SHARED_ACTIVATED with a host __cvta_generic_to_shared that returns the pointer value makes
// it use the test's fake shared-memory pointers (plain integers that are never dereferenced) as addresses.
//
// What is compared element by element:
//   * decode_descriptor against CuTe's GmmaDescriptor bitfields (cute/arch/mma_sm90_desc.hpp);
//   * d_fragment against CLayout_64xN<N> and a_fragment against ALayout_64x16 / ALayout_64x32
//     (cute/atom/mma_traits_sm90_gmma.hpp) for every N the kernels use (and more);
//   * element_address against CuTe itself: a shared-memory tile is laid out with CuTe's canonical GMMA atoms
//     (GMMA::Layout_{K,MN}_{INTER,SW32,SW64,SW128}_Atom<T>, tile_to_shape; the kernels' forms in both atom
//     orders, every other swizzle mode and majorness at least once), each
//     instruction-sized K slice of it gets its descriptor from CuTe's make_gmma_desc, and the address our decoder
//     computes from that descriptor for (row, k) must equal the address of the CuTe tensor element (swizzle applied
//     by CuTe's swizzle_ptr on the absolute address);
//   * the ISA's own worked examples (no-swizzle K-major tf32 and MN-major bf16 in "Canonical Layouts");
//   * the refusal/warning rules and instruction-form rules; the product against a naive loop.
#define CUTE_CVTA_GENERIC_TO_SHARED_ACTIVATED 1
#include <cstddef>
#include <cstdint>
// Host stand-in for the device intrinsic (see above): the fake shared-memory pointer is its own address.
static inline size_t __cvta_generic_to_shared(const void* p) { return reinterpret_cast<size_t>(p); }

#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/tensor.hpp>

#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "wgmma_core.h"

using namespace r1k_emu;
namespace G = cute::SM90::GMMA;

static int g_failures = 0, g_checks = 0;
#define CHECK(cond, ...)                                                  \
    do {                                                                  \
        ++g_checks;                                                       \
        if (!(cond)) {                                                    \
            if (++g_failures <= 30) {                                     \
                std::printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
                std::printf(__VA_ARGS__);                                 \
                std::printf("\n");                                        \
            }                                                             \
        }                                                                 \
    } while (0)

// ---------------------------------------------------------------------------------------------------------------
static void test_descriptor_decode() {
    std::mt19937_64 rng(7);
    for (int i = 0; i < 20000; ++i) {
        const uint64_t raw = rng();
        cute::GmmaDescriptor g(raw);
        const wgmma::Descriptor d = wgmma::decode_descriptor(raw);
        CHECK(d.start == uint32_t(g.bitfield.start_address_) << 4, "raw %016llx", (unsigned long long)raw);
        CHECK(d.lbo == uint32_t(g.bitfield.leading_byte_offset_) << 4, "raw %016llx", (unsigned long long)raw);
        CHECK(d.sbo == uint32_t(g.bitfield.stride_byte_offset_) << 4, "raw %016llx", (unsigned long long)raw);
        CHECK(d.base_offset == g.bitfield.base_offset_, "raw %016llx", (unsigned long long)raw);
        CHECK(uint32_t(d.swizzle) == uint32_t(g.bitfield.layout_type_), "raw %016llx", (unsigned long long)raw);
    }
    // The enum values are CuTe's LayoutType values (= descriptor bits 62-63 as the ISA lists them).
    CHECK(uint32_t(wgmma::Swizzle::B128) == uint32_t(G::LayoutType::B128), "B128");
    CHECK(uint32_t(wgmma::Swizzle::B64) == uint32_t(G::LayoutType::B64), "B64");
    CHECK(uint32_t(wgmma::Swizzle::B32) == uint32_t(G::LayoutType::B32), "B32");
    CHECK(uint32_t(wgmma::Swizzle::None) == uint32_t(G::LayoutType::INTERLEAVE), "INTERLEAVE");
}

// ---------------------------------------------------------------------------------------------------------------
template <int N>
static void test_d_fragment() {
    // CuTe's (thread, value) -> flat index of the column-major 64xN tile.
    const auto L = G::CLayout_64xN<N>{};
    for (int t = 0; t < 128; ++t)
        for (int v = 0; v < N / 2; ++v) {
            const int idx = L(t, v);
            const wgmma::Coord c = wgmma::d_fragment(t, v);
            CHECK(c.row == uint32_t(idx % 64) && c.col == uint32_t(idx / 64),
                  "N=%d t=%d reg=%d: ours (%u,%u) cute (%d,%d)", N, t, v, c.row, c.col, idx % 64, idx / 64);
        }
}

static void test_a_fragments() {
    const auto L16 = G::ALayout_64x16{};  // 16-bit A: 8 values = 4 registers x 2 halves
    for (int t = 0; t < 128; ++t)
        for (int v = 0; v < 8; ++v) {
            const int idx = L16(t, v);
            const wgmma::Coord c = wgmma::a_fragment(t, v / 2, v % 2, 2);
            CHECK(c.row == uint32_t(idx % 64) && c.col == uint32_t(idx / 64),
                  "16-bit t=%d v=%d: ours (%u,%u) cute (%d,%d)", t, v, c.row, c.col, idx % 64, idx / 64);
        }
    const auto L8 = G::ALayout_64x32{};  // 8-bit A: 16 values = 4 registers x 4 bytes
    for (int t = 0; t < 128; ++t)
        for (int v = 0; v < 16; ++v) {
            const int idx = L8(t, v);
            const wgmma::Coord c = wgmma::a_fragment(t, v / 4, v % 4, 1);
            CHECK(c.row == uint32_t(idx % 64) && c.col == uint32_t(idx / 64),
                  "8-bit t=%d v=%d: ours (%u,%u) cute (%d,%d)", t, v, c.row, c.col, idx % 64, idx / 64);
        }
    // Every (row, k) of the 64xK tile is held exactly once.
    for (uint32_t eb : {1u, 2u}) {
        const uint32_t K = 32 / eb, per = 4 / eb;
        std::vector<int> seen(64 * K, 0);
        for (uint32_t t = 0; t < 128; ++t)
            for (uint32_t j = 0; j < 4; ++j)
                for (uint32_t e = 0; e < per; ++e) {
                    const wgmma::Coord c = wgmma::a_fragment(t, j, e, eb);
                    if (c.row < 64 && c.col < K) seen[c.row * K + c.col]++;
                }
        for (int x : seen) CHECK(x == 1, "a_fragment coverage elem_bytes=%u", eb);
    }
}

// ---------------------------------------------------------------------------------------------------------------
// One shared-memory tile of ROWS x KTILE elements of T laid out with a CuTe GMMA atom; every instruction-sized K
// slice is described by CuTe's make_gmma_desc and compared element by element.
template <class T, G::Major MAJ, class Atom, int ROWS, int KTILE, bool KFirst>
static void check_tile(const char* name, wgmma::Swizzle want_swizzle, uint32_t base) {
    using namespace cute;
    constexpr int KI = 32 / int(sizeof(T));  // instruction K: 32 bytes
    auto shape = make_shape(Int<ROWS>{}, Int<KTILE>{});
    auto layout = [&] {
        if constexpr (KFirst) return tile_to_shape(Atom{}, shape, Step<_2, _1>{});
        else return tile_to_shape(Atom{}, shape);
    }();
    auto tensor = make_tensor(make_smem_ptr(reinterpret_cast<T*>(uintptr_t(base))), layout);
    int slices = 0;
    for (int j = 0; j < KTILE / KI; ++j) {
        auto sub = local_tile(tensor, make_shape(Int<ROWS>{}, Int<KI>{}), make_coord(0, j));
        const cute::GmmaDescriptor g = G::make_gmma_desc<MAJ>(sub);
        wgmma::Operand op{wgmma::decode_descriptor(g.desc_), MAJ == G::Major::K ? wgmma::Major::K : wgmma::Major::MN,
                          uint32_t(sizeof(T)), uint32_t(ROWS), uint32_t(KI)};
        CHECK(op.desc.swizzle == want_swizzle, "%s: descriptor swizzle", name);
        std::string warning;
        const std::string err = wgmma::check_operand(op, &warning);
        CHECK(err.empty(), "%s slice %d: refused: %s", name, j, err.c_str());
        CHECK(warning.empty(), "%s slice %d: warning: %s", name, j, warning.c_str());
        int bad = 0;
        for (int mn = 0; mn < ROWS; ++mn)
            for (int kk = 0; kk < KI; ++kk) {
                const uint32_t want = uint32_t(reinterpret_cast<uintptr_t>(&sub(mn, kk)));
                const uint32_t got = wgmma::element_address(op, mn, kk);
                ++g_checks;
                if (want != got) {
                    ++g_failures;
                    if (++bad <= 3)
                        std::printf("FAIL %s slice %d (row %d, k %d): ours 0x%x cute 0x%x (desc start 0x%x lbo %u "
                                    "sbo %u)\n",
                                    name, j, mn, kk, got, want, op.desc.start, op.desc.lbo, op.desc.sbo);
                }
            }
        ++slices;
    }
    std::printf("  %-44s %d K slices compared\n", name, slices);
}

// Both atom orders (rows first: 8-row groups adjacent; K first: K atoms adjacent).
template <class T, G::Major MAJ, class Atom, int ROWS, int KTILE>
static void check_tile_both(const char* name, wgmma::Swizzle sw) {
    char buf[128];
    std::snprintf(buf, sizeof buf, "%s rows-first", name);
    check_tile<T, MAJ, Atom, ROWS, KTILE, false>(buf, sw, 0x2400 & ~0x3FFu);  // 1024-aligned base (0x2000)
    std::snprintf(buf, sizeof buf, "%s K-first", name);
    check_tile<T, MAJ, Atom, ROWS, KTILE, true>(buf, sw, 0x8000);
}

// One atom order only (rows first), for the layouts the kernels do not use: keeps the compile time down (each
// CuTe instantiation costs about a second of g++ time).
template <class T, G::Major MAJ, class Atom, int ROWS, int KTILE>
static void check_tile_one(const char* name, wgmma::Swizzle sw) {
    check_tile<T, MAJ, Atom, ROWS, KTILE, false>(name, sw, 0x4000);
}

static void test_smem_layouts_vs_cute() {
    using fp8 = uint8_t;   // e4m3/e5m2: only the element size matters for addressing
    using b16 = uint16_t;  // bf16/f16
    using G::Major;
    using SW = wgmma::Swizzle;
    // The kernels' forms, both atom orders. FP8 K-major 128B (the only FP8 layout the ISA allows is K-major):
    // A 64 x K and B N x K for N in {64, 112, 128, 160}; K tiles span 2 swizzle rows so K slices cross atoms too.
    check_tile_both<fp8, Major::K, G::Layout_K_SW128_Atom<fp8>, 64, 256>("fp8 K SW128 64xK", SW::B128);
    check_tile_both<fp8, Major::K, G::Layout_K_SW128_Atom<fp8>, 112, 128>("fp8 K SW128 112xK", SW::B128);
    check_tile_both<fp8, Major::K, G::Layout_K_SW128_Atom<fp8>, 128, 128>("fp8 K SW128 128xK", SW::B128);
    check_tile_both<fp8, Major::K, G::Layout_K_SW128_Atom<fp8>, 160, 128>("fp8 K SW128 160xK", SW::B128);
    // BF16 K-major 128B: A 64 x K (imm-trans-a 0) and B N x K (imm-trans-b 0) for N in {16, 32, 64}.
    check_tile_both<b16, Major::K, G::Layout_K_SW128_Atom<b16>, 64, 128>("bf16 K SW128 64xK", SW::B128);
    check_tile_both<b16, Major::K, G::Layout_K_SW128_Atom<b16>, 16, 64>("bf16 K SW128 16xK", SW::B128);
    check_tile_both<b16, Major::K, G::Layout_K_SW128_Atom<b16>, 32, 64>("bf16 K SW128 32xK", SW::B128);
    // BF16 MN-major 128B: A M-major 64 x K (imm-trans-a 1) and the RS m64n256k16 B N-major (imm-trans-b 1).
    check_tile_both<b16, Major::MN, G::Layout_MN_SW128_Atom<b16>, 64, 32>("bf16 MN SW128 64xK", SW::B128);
    check_tile_both<b16, Major::MN, G::Layout_MN_SW128_Atom<b16>, 256, 32>("bf16 MN SW128 256xK", SW::B128);
    // Every other swizzle mode for both majornesses, one atom order, shapes with several atoms along rows.
    check_tile_one<fp8, Major::K, G::Layout_K_SW64_Atom<fp8>, 160, 128>("fp8 K SW64 160xK", SW::B64);
    check_tile_one<fp8, Major::K, G::Layout_K_SW32_Atom<fp8>, 112, 64>("fp8 K SW32 112xK", SW::B32);
    check_tile_one<fp8, Major::K, G::Layout_K_INTER_Atom<fp8>, 128, 64>("fp8 K none 128xK", SW::None);
    check_tile_one<b16, Major::K, G::Layout_K_SW64_Atom<b16>, 64, 64>("bf16 K SW64 64xK", SW::B64);
    check_tile_one<b16, Major::K, G::Layout_K_SW32_Atom<b16>, 32, 32>("bf16 K SW32 32xK", SW::B32);
    check_tile_one<b16, Major::K, G::Layout_K_INTER_Atom<b16>, 64, 32>("bf16 K none 64xK", SW::None);
    check_tile_one<b16, Major::MN, G::Layout_MN_SW64_Atom<b16>, 256, 32>("bf16 MN SW64 256xK", SW::B64);
    check_tile_one<b16, Major::MN, G::Layout_MN_SW32_Atom<b16>, 64, 32>("bf16 MN SW32 64xK", SW::B32);
    check_tile_one<b16, Major::MN, G::Layout_MN_INTER_Atom<b16>, 256, 32>("bf16 MN none 256xK", SW::None);
    // K-first atom order for the non-128B modes too (different SBO/LBO than rows-first).
    check_tile<b16, Major::MN, G::Layout_MN_SW32_Atom<b16>, 64, 32, true>("bf16 MN SW32 64xK K-first", SW::B32,
                                                                          0x8000);
    check_tile<b16, Major::MN, G::Layout_MN_INTER_Atom<b16>, 64, 32, true>("bf16 MN none 64xK K-first", SW::None,
                                                                           0x8000);
    check_tile<fp8, Major::K, G::Layout_K_INTER_Atom<fp8>, 64, 64, true>("fp8 K none 64xK K-first", SW::None, 0x8000);
}

// The ISA's worked examples ("Canonical Layouts", no swizzle so the layouts are plain CuTe layouts in elements).
static void test_isa_examples() {
    using namespace cute;
    {  // K-major, no-swizzling, tf32: ((8,2),(4,4)):((4,32),(1,64)); LBO = 64*4 B, SBO = 32*4 B.
        auto L = make_layout(make_shape(make_shape(_8{}, _2{}), make_shape(_4{}, _4{})),
                             make_stride(make_stride(_4{}, _32{}), make_stride(_1{}, _64{})));
        const uint64_t raw = (uint64_t(0) << 62) | (uint64_t((32 * 4) >> 4) << 32) | (uint64_t((64 * 4) >> 4) << 16) |
                             (0x1000 >> 4);
        wgmma::Operand op{wgmma::decode_descriptor(raw), wgmma::Major::K, 4, 16, 16};
        for (int m = 0; m < 16; ++m)
            for (int k = 0; k < 16; ++k) {
                const uint32_t want = 0x1000 + 4 * L(make_coord(m, k));
                CHECK(wgmma::element_address(op, m, k) == want, "ISA K-major tf32 example (%d,%d)", m, k);
            }
    }
    {  // MN-major, no-swizzling, bf16: ((8,1,2),(8,2)):((1,8,64),(8,128)); LBO = 128*2 B, SBO = 64*2 B.
        auto L = make_layout(make_shape(make_shape(_8{}, _1{}, _2{}), make_shape(_8{}, _2{})),
                             make_stride(make_stride(_1{}, _8{}, _64{}), make_stride(_8{}, _128{})));
        const uint64_t raw = (uint64_t((64 * 2) >> 4) << 32) | (uint64_t((128 * 2) >> 4) << 16) | (0x800 >> 4);
        wgmma::Operand op{wgmma::decode_descriptor(raw), wgmma::Major::MN, 2, 16, 16};
        for (int m = 0; m < 16; ++m)
            for (int k = 0; k < 16; ++k) {
                const uint32_t want = 0x800 + 2 * L(make_coord(m, k));
                CHECK(wgmma::element_address(op, m, k) == want, "ISA MN-major bf16 example (%d,%d)", m, k);
            }
    }
    // Hand-computed 128B swizzle (K-major fp8, start 0x400, SBO 1024): row 1, byte 0 lies at 0x480, and its 16-byte
    // chunk 0 is XORed with row bits (1) -> chunk 1: 0x490. Row 9 -> group 1 (+1024), row 1 of the pattern again.
    {
        const uint64_t raw = (uint64_t(1) << 62) | (uint64_t(1024 >> 4) << 32) | (uint64_t(1) << 16) | (0x400 >> 4);
        wgmma::Operand op{wgmma::decode_descriptor(raw), wgmma::Major::K, 1, 64, 32};
        CHECK(wgmma::element_address(op, 0, 0) == 0x400, "sw128 (0,0)");
        CHECK(wgmma::element_address(op, 1, 0) == 0x490, "sw128 (1,0) = 0x%x", wgmma::element_address(op, 1, 0));
        CHECK(wgmma::element_address(op, 1, 17) == 0x481, "sw128 (1,17) = 0x%x", wgmma::element_address(op, 1, 17));
        CHECK(wgmma::element_address(op, 9, 0) == 0x890, "sw128 (9,0) = 0x%x", wgmma::element_address(op, 9, 0));
        CHECK(wgmma::element_address(op, 7, 31) == 0x400 + 7 * 128 + ((1 ^ 7) << 4) + 15, "sw128 (7,31)");
        // K step inside the row (start + 32 B, as an advanced descriptor does): absolute-address swizzle.
        const uint64_t raw2 = raw + (32 >> 4);
        wgmma::Operand op2{wgmma::decode_descriptor(raw2), wgmma::Major::K, 1, 64, 32};
        CHECK(wgmma::element_address(op2, 1, 0) == 0x480 + ((2 ^ 1) << 4), "sw128 k-step (1,0) = 0x%x",
              wgmma::element_address(op2, 1, 0));
        std::string w;
        CHECK(wgmma::check_operand(op2, &w).empty() && w.empty(), "k-step start is accepted");
    }
}

static void test_refusals() {
    std::string w;
    // base offset with a swizzle: refused; without: warned.
    {
        const uint64_t raw = (uint64_t(1) << 62) | (uint64_t(3) << 49) | (uint64_t(64) << 32) | (0x400 >> 4);
        wgmma::Operand op{wgmma::decode_descriptor(raw), wgmma::Major::K, 1, 64, 32};
        CHECK(!wgmma::check_operand(op, &w).empty(), "base offset refused");
    }
    {
        w.clear();
        const uint64_t raw = (uint64_t(3) << 49) | (uint64_t(8) << 32) | (uint64_t(8) << 16) | (0x400 >> 4);
        wgmma::Operand op{wgmma::decode_descriptor(raw), wgmma::Major::K, 1, 64, 32};
        CHECK(wgmma::check_operand(op, &w).empty() && !w.empty(), "base offset without swizzle warned");
    }
    // Swizzled start whose address bits [7, 7+B) (the bits the swizzle XORs in) are not zero: refused. Hand-picked:
    // 128B (B=3): +0x20 ok, +0x80 (row 1) refused; 64B (B=2): +0x40 (row 1, bit 6 only) ok, +0x80 (row 2) refused,
    // +0x100 refused, +0x200 (next 512-byte pattern) ok; 32B (B=1): +0x20, +0x40 ok, +0x80 (row 4) refused.
    struct Case {
        int sw;
        uint32_t off;
        bool refused;
    };
    for (const Case& c : {Case{1, 0x20, false}, Case{1, 0x80, true}, Case{1, 0x200, true}, Case{1, 0x400, false},
                          Case{2, 0x40, false}, Case{2, 0x80, true}, Case{2, 0x100, true}, Case{2, 0x200, false},
                          Case{3, 0x20, false}, Case{3, 0x40, false}, Case{3, 0x80, true}, Case{3, 0x100, false}}) {
        const uint32_t start = 0x2000 + c.off;
        const uint64_t raw = (uint64_t(c.sw) << 62) | (uint64_t(64) << 32) | (start >> 4);
        wgmma::Operand op{wgmma::decode_descriptor(raw), wgmma::Major::K, 2, 64, 16};
        w.clear();
        const std::string err = wgmma::check_operand(op, &w);
        CHECK(err.empty() != c.refused, "swizzle %d start 0x%x: %s", c.sw, start, err.c_str());
    }
    // K-major swizzled: LBO is unused; 0 and 1 are silent, anything else warns. MN-major uses it: silent.
    for (uint32_t lbo : {0u, 1u, 2u, 64u}) {
        const uint64_t raw = (uint64_t(1) << 62) | (uint64_t(64) << 32) | (uint64_t(lbo) << 16) | (0x400 >> 4);
        wgmma::Operand k{wgmma::decode_descriptor(raw), wgmma::Major::K, 1, 64, 32};
        w.clear();
        CHECK(wgmma::check_operand(k, &w).empty() && w.empty() == (lbo <= 1), "K-major LBO %u", lbo);
        wgmma::Operand mn{wgmma::decode_descriptor(raw), wgmma::Major::MN, 2, 64, 16};
        w.clear();
        CHECK(wgmma::check_operand(mn, &w).empty() && w.empty(), "MN-major LBO %u", lbo);
    }
}

static void test_forms() {
    auto base = [] {
        WgmmaMma op{};
        op.m = 64;
        op.n = 128;
        op.k = 32;
        op.atype = op.btype = WgmmaType::E4M3;
        op.imm_scale_a = op.imm_scale_b = 1;
        op.imm_trans_a = op.imm_trans_b = -1;
        return op;
    };
    WgmmaMma op = base();
    CHECK(wgmma::check_form(op).empty(), "e4m3 m64n128k32 ok: %s", wgmma::check_form(op).c_str());
    for (uint32_t n : {64u, 112u, 160u, 8u, 256u}) {
        op.n = n;
        CHECK(wgmma::check_form(op).empty(), "e4m3 n=%u", n);
    }
    op.n = 100;
    CHECK(!wgmma::check_form(op).empty(), "n=100 refused");
    op.n = 264;
    CHECK(!wgmma::check_form(op).empty(), "n=264 refused");
    op = base();
    op.k = 16;
    CHECK(!wgmma::check_form(op).empty(), "e4m3 k16 refused");
    op = base();
    op.imm_trans_b = 0;
    CHECK(!wgmma::check_form(op).empty(), "fp8 with imm-trans refused");
    op = base();
    op.btype = WgmmaType::E5M2;
    CHECK(wgmma::check_form(op).empty(), "e4m3 x e5m2 ok");
    op.btype = WgmmaType::BF16;
    CHECK(!wgmma::check_form(op).empty(), "e4m3 x bf16 refused");
    op = base();
    op.imm_scale_a = 0;
    CHECK(!wgmma::check_form(op).empty(), "imm-scale 0 refused");
    op = base();
    op.m = 128;
    CHECK(!wgmma::check_form(op).empty(), "m128 refused");
    // bf16 SS with both trans values, RS with trans-b only.
    op = base();
    op.atype = op.btype = WgmmaType::BF16;
    op.k = 16;
    op.n = 64;
    op.imm_trans_a = 1;
    op.imm_trans_b = 0;
    CHECK(wgmma::check_form(op).empty() && wgmma::a_major(op) == wgmma::Major::MN &&
              wgmma::b_major(op) == wgmma::Major::K,
          "bf16 SS trans-a 1");
    op.imm_trans_a = -1;
    CHECK(!wgmma::check_form(op).empty(), "bf16 SS without imm-trans-a refused");
    op.a_from_registers = true;
    op.n = 256;
    op.imm_trans_b = 1;
    CHECK(wgmma::check_form(op).empty() && wgmma::b_major(op) == wgmma::Major::MN, "bf16 RS n256 trans-b 1");
    op.imm_trans_a = 0;
    CHECK(!wgmma::check_form(op).empty(), "RS with imm-trans-a refused");
    op.imm_trans_a = -1;
    op.imm_trans_b = 2;
    CHECK(!wgmma::check_form(op).empty(), "imm-trans-b 2 refused");
    op.imm_trans_b = 1;
    op.btype = WgmmaType::F16;
    CHECK(!wgmma::check_form(op).empty(), "bf16 x f16 refused");
}

static void test_mma_product() {
    // Small integers: every mode is exact, so both must equal the naive double loop.
    std::mt19937 rng(3);
    const uint32_t N = 24, K = 16;
    std::vector<double> A(64 * K), B(N * K);
    std::vector<float> C(64 * N), D(64 * N), D2(64 * N);
    for (auto& x : A) x = int(rng() % 9) - 4;
    for (auto& x : B) x = int(rng() % 9) - 4;
    for (auto& x : C) x = float(int(rng() % 21) - 10);
    const auto bf16 = mma_numerics::Elem::BF16;
    for (auto mode : {mma_numerics::Mode::Exact, mma_numerics::Mode::Hopper}) {
        wgmma::mma(mode, bf16, bf16, N, K, A.data(), B.data(), C.data(), D.data());
        wgmma::mma(mode, bf16, bf16, N, K, A.data(), B.data(), nullptr, D2.data());
        for (uint32_t m = 0; m < 64; ++m)
            for (uint32_t n = 0; n < N; ++n) {
                double s = 0;
                for (uint32_t k = 0; k < K; ++k) s += A[m * K + k] * B[n * K + k];
                CHECK(D[m * N + n] == float(s + C[m * N + n]), "mma (%u,%u)", m, n);
                CHECK(D2[m * N + n] == float(s), "mma no C (%u,%u)", m, n);
            }
    }
    // The D fragment covers the 64xN tile exactly once for every N (register i of thread t is unique).
    for (uint32_t n = 8; n <= 256; n += 8) {
        std::vector<int> seen(64 * n, 0);
        for (uint32_t t = 0; t < 128; ++t)
            for (uint32_t i = 0; i < n / 2; ++i) {
                const wgmma::Coord c = wgmma::d_fragment(t, i);
                if (c.row < 64 && c.col < n) seen[c.row * n + c.col]++;
            }
        int bad = 0;
        for (int x : seen) bad += x != 1;
        CHECK(bad == 0, "d_fragment coverage N=%u", n);
    }
}

int main() {
    test_descriptor_decode();
    test_d_fragment<8>();
    test_d_fragment<16>();
    test_d_fragment<32>();
    test_d_fragment<64>();
    test_d_fragment<112>();
    test_d_fragment<128>();
    test_d_fragment<160>();
    test_d_fragment<256>();
    test_a_fragments();
    test_smem_layouts_vs_cute();
    test_isa_examples();
    test_refusals();
    test_forms();
    test_mma_product();
    std::printf("wgmma_test: %d checks, %d passed, %d failed\n", g_checks, g_checks - g_failures, g_failures);
    std::printf("%d passed, %d failed\n", g_checks - g_failures, g_failures);
    return g_failures ? 1 : 0;
}
