// Standalone unit tests of the pure TMA model (emu/cpp/tma_core.{h,cpp}), with CuTe as the independent oracle for the
// shared-memory swizzle. Build and run from the repository root:
//
//   g++ -std=c++17 -O1 -I/work/main/emu/cpp -I/work/main/.cuda-toolchain/include -I/work/main/.cuda-toolchain/include/cccl -I/work/main/.cuda-toolchain/cutlass-include emu/cpp/tests/tma_test.cpp emu/cpp/tma_core.cpp -o /tmp/tma_test && /tmp/tma_test
//
// Prints one PASS/FAIL line per test and exits non-zero when any fails.
//
// Compiling CuTe with g++ on the host needs (found by trial):
//   * -I.../include/cccl: cutlass/cutlass.h includes <cuda/std/utility> (CCCL), which the toolchain installs under
//     include/cccl, not include/;
//   * __CUDACC_VER_MAJOR__/__CUDACC_VER_MINOR__ defined before the first CuTe header: cute/arch/copy_sm90_desc.hpp only
//     declares TMA::to_CUtensorMapSwizzle (CuTe's own Swizzle -> CU_TENSOR_MAP_SWIZZLE_* mapping) when
//     __CUDACC_VER_MAJOR__ >= 12; the macros are only tested by #if there;
//   * -Wdeprecated-declarations silenced around the includes (cutlass/platform/platform.h names CUDA 13's deprecated
//     long4/double4 vector types).
// Nothing else: CUTE_HOST_DEVICE expands to plain inline host code without __CUDACC__.
#define __CUDACC_VER_MAJOR__ 13
#define __CUDACC_VER_MINOR__ 0
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
#include <cuda.h>
#include <cute/atom/copy_traits_sm90_tma_swizzle.hpp>
#include <cute/pointer_swizzle.hpp>
#include <cute/swizzle.hpp>
#pragma GCC diagnostic pop

#include <cinttypes>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "tma_core.h"

using namespace r1k_emu::tma;

// ---------------------------------------------------------------------------------------------------------------
// Minimal test harness
// ---------------------------------------------------------------------------------------------------------------

static int g_failed_tests = 0;
static int g_test_failures = 0;  // failures inside the running test
static int g_reported = 0;

static void failf(const char* file, int line, const char* fmt, ...) __attribute__((format(printf, 3, 4)));
static void failf(const char* file, int line, const char* fmt, ...) {
    ++g_test_failures;
    if (++g_reported > 40) return;  // keep the output readable
    va_list ap;
    va_start(ap, fmt);
    fprintf(stdout, "    %s:%d: ", file, line);
    vfprintf(stdout, fmt, ap);
    fprintf(stdout, "\n");
    va_end(ap);
}
#define CHECK(cond, ...)                                         \
    do {                                                         \
        if (!(cond)) failf(__FILE__, __LINE__, __VA_ARGS__);     \
    } while (0)

static void run(const char* name, const std::function<void()>& fn) {
    g_test_failures = 0;
    fn();
    printf("%s %s\n", g_test_failures ? "FAIL" : "PASS", name);
    if (g_test_failures) ++g_failed_tests;
}

// ---------------------------------------------------------------------------------------------------------------
// The enum values restated in tma_core.h are cuda.h's.
// ---------------------------------------------------------------------------------------------------------------

#define SAME_AS_CUDA_H(ours, theirs) static_assert(int(ours) == int(CU_TENSOR_MAP_##theirs), #ours)
SAME_AS_CUDA_H(kUint8, DATA_TYPE_UINT8);
SAME_AS_CUDA_H(kUint16, DATA_TYPE_UINT16);
SAME_AS_CUDA_H(kUint32, DATA_TYPE_UINT32);
SAME_AS_CUDA_H(kInt32, DATA_TYPE_INT32);
SAME_AS_CUDA_H(kUint64, DATA_TYPE_UINT64);
SAME_AS_CUDA_H(kInt64, DATA_TYPE_INT64);
SAME_AS_CUDA_H(kFloat16, DATA_TYPE_FLOAT16);
SAME_AS_CUDA_H(kFloat32, DATA_TYPE_FLOAT32);
SAME_AS_CUDA_H(kFloat64, DATA_TYPE_FLOAT64);
SAME_AS_CUDA_H(kBfloat16, DATA_TYPE_BFLOAT16);
SAME_AS_CUDA_H(kFloat32Ftz, DATA_TYPE_FLOAT32_FTZ);
SAME_AS_CUDA_H(kTfloat32, DATA_TYPE_TFLOAT32);
SAME_AS_CUDA_H(kTfloat32Ftz, DATA_TYPE_TFLOAT32_FTZ);
SAME_AS_CUDA_H(k16U4Align8B, DATA_TYPE_16U4_ALIGN8B);
SAME_AS_CUDA_H(k16U4Align16B, DATA_TYPE_16U4_ALIGN16B);
SAME_AS_CUDA_H(k16U6Align16B, DATA_TYPE_16U6_ALIGN16B);
SAME_AS_CUDA_H(kInterleaveNone, INTERLEAVE_NONE);
SAME_AS_CUDA_H(kInterleave16B, INTERLEAVE_16B);
SAME_AS_CUDA_H(kInterleave32B, INTERLEAVE_32B);
SAME_AS_CUDA_H(kSwizzleNone, SWIZZLE_NONE);
SAME_AS_CUDA_H(kSwizzle32B, SWIZZLE_32B);
SAME_AS_CUDA_H(kSwizzle64B, SWIZZLE_64B);
SAME_AS_CUDA_H(kSwizzle128B, SWIZZLE_128B);
SAME_AS_CUDA_H(kSwizzle128BAtom32B, SWIZZLE_128B_ATOM_32B);
SAME_AS_CUDA_H(kSwizzle128BAtom32BFlip8B, SWIZZLE_128B_ATOM_32B_FLIP_8B);
SAME_AS_CUDA_H(kSwizzle128BAtom64B, SWIZZLE_128B_ATOM_64B);
SAME_AS_CUDA_H(kL2None, L2_PROMOTION_NONE);
SAME_AS_CUDA_H(kL2_64B, L2_PROMOTION_L2_64B);
SAME_AS_CUDA_H(kL2_128B, L2_PROMOTION_L2_128B);
SAME_AS_CUDA_H(kL2_256B, L2_PROMOTION_L2_256B);
SAME_AS_CUDA_H(kOobFillNone, FLOAT_OOB_FILL_NONE);
SAME_AS_CUDA_H(kOobFillNanRequestZeroFma, FLOAT_OOB_FILL_NAN_REQUEST_ZERO_FMA);
static_assert(sizeof(CUtensorMap) == kTensorMapBytes, "tensor map size");

// ---------------------------------------------------------------------------------------------------------------
// The CuTe oracle: the swizzle functor CuTe pairs with each CU_TENSOR_MAP_SWIZZLE_* mode, applied the way CuTe applies
// it for TMA/GMMA shared memory (cute::swizzle_ptr: to the absolute address).
// ---------------------------------------------------------------------------------------------------------------

template <int B>
static uint32_t cute_swizzle_ptr(uint32_t addr) {
    using Ptr = cute::swizzle_ptr<cute::Swizzle<B, 4, 3>, uint8_t*>;
    return uint32_t(reinterpret_cast<uintptr_t>(Ptr::apply_swizzle(reinterpret_cast<uint8_t*>(uintptr_t(addr)))));
}

static uint32_t oracle_swizzle(int mode, uint32_t addr) {
    switch (mode) {
        case kSwizzleNone: return cute::Swizzle<0, 4, 3>::apply(addr);
        case kSwizzle32B: return cute_swizzle_ptr<1>(addr);
        case kSwizzle64B: return cute_swizzle_ptr<2>(addr);
        case kSwizzle128B: return cute_swizzle_ptr<3>(addr);
        default: abort();
    }
}

template <int B>
static CUtensorMapSwizzle cute_tma_mode() {
    return cute::TMA::to_CUtensorMapSwizzle(cute::detail::get_tma_swizzle_bits(cute::Swizzle<B, 4, 3>{}),
                                            cute::detail::get_tma_swizzle_base(cute::Swizzle<B, 4, 3>{}));
}

static void test_cute_mode_mapping() {
    // CuTe's own pairing of Swizzle<B,4,3> with the driver's swizzle mode (get_tma_swizzle_bits +
    // to_CUtensorMapSwizzle, as make_tma_copy uses it): so oracle_swizzle(mode) really is "CuTe's swizzle for mode".
    using cute::Swizzle;
    CHECK(cute_tma_mode<0>() == CU_TENSOR_MAP_SWIZZLE_NONE, "Swizzle<0,4,3>");
    CHECK(cute_tma_mode<1>() == CU_TENSOR_MAP_SWIZZLE_32B, "Swizzle<1,4,3>");
    CHECK(cute_tma_mode<2>() == CU_TENSOR_MAP_SWIZZLE_64B, "Swizzle<2,4,3>");
    CHECK(cute_tma_mode<3>() == CU_TENSOR_MAP_SWIZZLE_128B, "Swizzle<3,4,3>");
    // The pointer form and the offset form of CuTe's swizzle agree (so the oracle is not a quirk of one of them).
    for (uint32_t a = 0; a < 8192; ++a) {
        CHECK(cute_swizzle_ptr<3>(a) == uint32_t(cute::Swizzle<3, 4, 3>::apply(a)), "ptr vs apply at %u", a);
        CHECK(cute_swizzle_ptr<2>(a) == uint32_t(cute::Swizzle<2, 4, 3>::apply(a)), "ptr vs apply at %u", a);
        CHECK(cute_swizzle_ptr<1>(a) == uint32_t(cute::Swizzle<1, 4, 3>::apply(a)), "ptr vs apply at %u", a);
    }
}

static void test_swizzle_vs_cute() {
    // Every byte of a 4 KiB range from several absolute bases: 1024-aligned, 128-aligned only, 16-aligned only, odd.
    const uint32_t bases[] = {0, 1024, 5 * 1024, 0x1F400, 128, 384, 640, 896, 0x2280, 16, 0x1230, 0x3FF0, 0xABC0, 7};
    for (int mode : {kSwizzleNone, kSwizzle32B, kSwizzle64B, kSwizzle128B})
        for (uint32_t base : bases)
            for (uint32_t off = 0; off < 4096; ++off) {
                const uint32_t a = base + off;
                CHECK(swizzle_address(mode, a) == oracle_swizzle(mode, a), "mode %s addr 0x%x: 0x%x vs CuTe 0x%x",
                      swizzle_name(mode), a, swizzle_address(mode, a), oracle_swizzle(mode, a));
            }
}

static void test_swizzle_vs_isa_tables() {
    // The tables of PTX ISA 9.0 "Swizzling Modes", typed in from the ISA: row = 128-byte shared memory line, entry =
    // the 16-byte chunk stored in that slot, for a destination starting at the stated alignment. The pattern repeats.
    const int t32[2][8] = {{0, 1, 2, 3, 4, 5, 6, 7}, {1, 0, 3, 2, 5, 4, 7, 6}};
    const int t64[4][8] = {{0, 1, 2, 3, 4, 5, 6, 7}, {1, 0, 3, 2, 5, 4, 7, 6},
                           {2, 3, 0, 1, 6, 7, 4, 5}, {3, 2, 1, 0, 7, 6, 5, 4}};
    const int t128[8][8] = {{0, 1, 2, 3, 4, 5, 6, 7}, {1, 0, 3, 2, 5, 4, 7, 6}, {2, 3, 0, 1, 6, 7, 4, 5},
                            {3, 2, 1, 0, 7, 6, 5, 4}, {4, 5, 6, 7, 0, 1, 2, 3}, {5, 4, 7, 6, 1, 0, 3, 2},
                            {6, 7, 4, 5, 2, 3, 0, 1}, {7, 6, 5, 4, 3, 2, 1, 0}};
    struct Mode {
        int mode, rows, align;
        const int* table;
    } modes[] = {{kSwizzle32B, 2, 256, &t32[0][0]},
                 {kSwizzle64B, 4, 512, &t64[0][0]},
                 {kSwizzle128B, 8, 1024, &t128[0][0]}};
    for (const Mode& m : modes) {
        for (uint32_t base : {0u, uint32_t(m.align), uint32_t(7 * m.align)}) {
            for (int rep = 0; rep < 3; ++rep)  // "... Pattern repeats ..."
                for (int line = 0; line < m.rows; ++line)
                    for (int slot = 0; slot < 8; ++slot) {
                        const int chunk = m.table[line * 8 + slot];
                        const uint32_t line_addr = base + uint32_t(rep * m.rows + line) * 128;
                        for (uint32_t b = 0; b < 16; ++b) {
                            const uint32_t src = line_addr + uint32_t(chunk) * 16 + b;
                            const uint32_t want = line_addr + uint32_t(slot) * 16 + b;
                            CHECK(swizzle_address(m.mode, src) == want, "%s line %d slot %d", swizzle_name(m.mode),
                                  line, slot);
                        }
                    }
            // Not pattern-aligned: "base offset = (dstMem / 128) % rows": a destination starting at line k of the
            // pattern stores its first line as table row k.
            for (int k = 1; k < m.rows; ++k) {
                const uint32_t dst = base + uint32_t(k) * 128;
                for (int slot = 0; slot < 8; ++slot) {
                    const int chunk = m.table[k * 8 + slot];
                    CHECK(swizzle_address(m.mode, dst + uint32_t(chunk) * 16) == dst + uint32_t(slot) * 16,
                          "%s base offset %d slot %d", swizzle_name(m.mode), k, slot);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Encoder / decoder
// ---------------------------------------------------------------------------------------------------------------

static TensorMapParams mk(int dtype, uint32_t rank, uint64_t addr, std::vector<uint64_t> dims,
                          std::vector<uint64_t> strides, std::vector<uint32_t> box, int swizzle = kSwizzleNone,
                          int interleave = kInterleaveNone, int l2 = kL2_256B, int oob = kOobFillNone) {
    TensorMapParams p;
    p.data_type = dtype;
    p.rank = rank;
    p.global_address = addr;
    for (uint32_t i = 0; i < rank && i < dims.size(); ++i) p.global_dim[i] = dims[i];
    for (uint32_t i = 0; i + 1 < rank && i < strides.size(); ++i) p.global_strides[i] = strides[i];
    for (uint32_t i = 0; i < rank && i < box.size(); ++i) p.box_dim[i] = box[i];
    for (uint32_t i = 0; i < rank; ++i) p.element_strides[i] = 1;
    p.swizzle = swizzle;
    p.interleave = interleave;
    p.l2_promotion = l2;
    p.oob_fill = oob;
    return p;
}

static bool same(const TensorMapParams& a, const TensorMapParams& b) {
    bool eq = a.data_type == b.data_type && a.rank == b.rank && a.global_address == b.global_address &&
              a.interleave == b.interleave && a.swizzle == b.swizzle && a.l2_promotion == b.l2_promotion &&
              a.oob_fill == b.oob_fill;
    for (uint32_t i = 0; i < kMaxRank; ++i) {
        eq = eq && a.global_dim[i] == b.global_dim[i] && a.box_dim[i] == b.box_dim[i] &&
             a.element_strides[i] == b.element_strides[i];
        if (i + 1 < kMaxRank) eq = eq && a.global_strides[i] == b.global_strides[i];
    }
    return eq;
}

alignas(128) static uint8_t g_map[256];

static void expect_ok(const TensorMapParams& p, const char* what) {
    std::string err = encode_tiled(g_map, p);
    CHECK(err.empty(), "%s: refused: %s", what, err.c_str());
    if (!err.empty()) return;
    TensorMapParams q;
    err = decode(g_map, &q);
    CHECK(err.empty(), "%s: decode: %s", what, err.c_str());
    CHECK(same(p, q), "%s: decode does not give back the parameters", what);
}

static void expect_err(const TensorMapParams& p, const char* substring, const char* what,
                       uint64_t map_address = 0x1000) {
    std::string err = validate_tiled(p, map_address);
    CHECK(!err.empty(), "%s: accepted, expected an error about \"%s\"", what, substring);
    CHECK(err.empty() || err.find(substring) != std::string::npos, "%s: error \"%s\" does not mention \"%s\"", what,
          err.c_str(), substring);
}

static void test_encoder_accepts_crate_maps() {
    // The parameter combinations this crate's kernels pass (learned from src/fp8_gemm/sm90.rs, src/moe/ and
    // src/mla/sm90.rs: which combinations, not how they behave). All: rank 2, INTERLEAVE_NONE, L2_256B, OOB fill
    // NONE, elementStrides {1, 1}.
    const uint64_t A = 0x7f0000001000ull;  // a 16-byte aligned device address
    for (uint64_t k : {128ull, 512ull, 7168ull})
        for (uint64_t m : {1ull, 100ull, 4096ull})
            for (uint32_t bm : {64u, 128u}) {
                // GEMM / MoE A and B: u8 (e4m3) [rows, k] with k-stride rows, box [128 bytes of K, block rows], 128B
                // swizzle; B of the 2-CTA multicast kernels is half a tile (block_n / 2 rows).
                expect_ok(mk(kUint8, 2, A, {k, m}, {k}, {128, bm}, kSwizzle128B), "gemm A/B tile");
                expect_ok(mk(kUint8, 2, A, {k, m}, {k}, {128, bm / 2}, kSwizzle128B), "gemm B half tile");
                // Activation scales: f32 [k_blocks, m_pad] (MN-major), box [block_m, 1], no swizzle.
                const uint64_t m_pad = (m + 3) / 4 * 4;
                expect_ok(mk(kFloat32, 2, A, {m_pad, (k + 127) / 128}, {m_pad * 4}, {bm, 1}), "gemm scale row");
            }
    for (uint32_t rows : {8u, 16u, 32u, 64u}) {
        // MLA bf16 cache: [rows, 576] bf16, row stride 1152, box [64, rows], 128B swizzle.
        expect_ok(mk(kBfloat16, 2, A, {576, 4096}, {1152}, {64, rows}, kSwizzle128B), "mla bf16 rows");
        // MLA FP8 cache: 656-byte tokens; codes and scales (u8, unswizzled, boxes 256 and 16) and the RoPE part
        // (bf16 at byte 528, [64] per token, 128B swizzle).
        expect_ok(mk(kUint8, 2, A, {656, 4096}, {656}, {256, rows}), "mla fp8 codes");
        expect_ok(mk(kUint8, 2, A, {656, 4096}, {656}, {16, rows}), "mla fp8 scales");
        expect_ok(mk(kBfloat16, 2, A + 528, {64, 4096}, {656}, {64, rows}, kSwizzle128B), "mla fp8 rope");
    }
    // Other documented-valid maps.
    expect_ok(mk(kUint8, 1, A, {uint64_t(1) << 32}, {}, {16}), "1D, globalDim = 2^32");
    expect_ok(mk(kFloat32, 3, A, {8, 3, 5}, {32, 96}, {8, 3, 5}, kSwizzle32B), "3D f32 32B swizzle");
    expect_ok(mk(kFloat16, 5, A, {8, 2, 2, 2, 2}, {16, 32, 64, 128}, {8, 2, 2, 2, 2}, kSwizzleNone), "5D");
    expect_ok(mk(kUint16, 3, A, {8, 4, 4}, {16, 64}, {8, 4, 4}, kSwizzle64B, kInterleave16B), "interleave 16B");
    expect_ok(mk(kUint16, 3, A, {16, 4, 4}, {32, 128}, {16, 4, 4}, kSwizzle32B, kInterleave32B), "interleave 32B");
    expect_ok(mk(k16U4Align16B, 2, A, {256, 4}, {128}, {128, 4}, kSwizzle128B), "16U4_ALIGN16B");
    expect_ok(mk(k16U4Align8B, 2, A, {64, 4}, {32}, {32, 4}), "16U4_ALIGN8B");
    expect_ok(mk(k16U6Align16B, 2, A, {128, 4}, {96}, {128, 4}, kSwizzle128BAtom64B), "16U6_ALIGN16B");
    expect_ok(mk(kFloat32, 2, A, {64, 64}, {256}, {32, 8}, kSwizzle128B, kInterleaveNone, kL2None,
                 kOobFillNanRequestZeroFma),
              "NaN fill on f32");
    expect_ok(mk(kUint8, 2, A, {64, 64}, {(uint64_t(1) << 40) - 16}, {16, 8}), "stride just below 2^40");
}

static void test_encoder_refuses_each_rule() {
    const uint64_t A = 0x7f0000001000ull;
    const TensorMapParams ok = mk(kUint8, 2, A, {512, 256}, {512}, {128, 128}, kSwizzle128B);
    CHECK(validate_tiled(ok, 0x1000).empty(), "baseline must be valid");
    TensorMapParams p;
    // tensorMap alignment
    expect_err(ok, "aligned to 64 bytes", "map address", 0x1020);
    // enumerations
    p = ok; p.data_type = 16; expect_err(p, "tensorDataType", "data type 16");
    p = ok; p.data_type = -1; expect_err(p, "tensorDataType", "data type -1");
    p = ok; p.interleave = 3; expect_err(p, "interleave", "interleave 3");
    p = ok; p.swizzle = 7; expect_err(p, "swizzle", "swizzle 7");
    p = ok; p.l2_promotion = 4; expect_err(p, "l2Promotion", "l2 4");
    p = ok; p.oob_fill = 2; expect_err(p, "oobFill", "oob 2");
    // rank
    p = ok; p.rank = 0; expect_err(p, "tensorRank", "rank 0");
    p = ok; p.rank = 6; expect_err(p, "tensorRank", "rank 6");
    p = mk(kUint16, 2, A, {8, 4}, {16}, {8, 4}, kSwizzleNone, kInterleave16B);
    expect_err(p, ">= 3", "interleave with rank 2");
    // globalAddress
    p = ok; p.global_address = A + 8; expect_err(p, "16-byte aligned", "address 8 mod 16");
    p = mk(kUint16, 3, A + 16, {16, 4, 4}, {32, 128}, {16, 4, 4}, kSwizzle32B, kInterleave32B);
    expect_err(p, "32-byte aligned with INTERLEAVE_32B", "interleave 32B address");
    p = mk(k16U4Align16B, 2, A + 16, {256, 4}, {128}, {128, 4});
    expect_err(p, "32-byte aligned with data type", "16U4_ALIGN16B address");
    // globalDim
    p = ok; p.global_dim[1] = 0; expect_err(p, "globalDim[1]", "dim 0");
    p = mk(kUint8, 1, A, {(uint64_t(1) << 32) + 1}, {}, {16}); expect_err(p, "globalDim[0]", "dim 2^32 + 1");
    p = mk(k16U4Align16B, 2, A, {64, 4}, {128}, {128, 4}); expect_err(p, "multiple of 128", "16U4_ALIGN16B dim");
    p = mk(k16U4Align8B, 2, A, {63, 4}, {32}, {32, 4}); expect_err(p, "multiple of 2", "16U4_ALIGN8B dim");
    // globalStrides
    p = ok; p.global_strides[0] = 520; expect_err(p, "multiple of 16", "stride 520");
    p = mk(kUint8, 2, A, {64, 64}, {uint64_t(1) << 40}, {16, 8}); expect_err(p, "< 2^40", "stride 2^40");
    p = mk(kUint16, 3, A, {16, 4, 4}, {48, 192}, {16, 4, 4}, kSwizzle32B, kInterleave32B);
    expect_err(p, "multiple of 32 with INTERLEAVE_32B", "interleave 32B stride");
    p = mk(k16U4Align16B, 2, A, {256, 4}, {144}, {128, 4}); expect_err(p, "multiple of 32 with data type",
                                                                       "16U4_ALIGN16B stride");
    p = mk(kFloat32, 2, A, {100, 8}, {384}, {16, 8}); expect_err(p, "padding >= 0", "stride[0] < dim0 * 4");
    p = mk(kFloat32, 3, A, {16, 8, 4}, {64, 496}, {16, 8, 4});
    expect_err(p, "padding >= 0", "stride[1] < stride[0] * dim1");
    // boxDim
    p = ok; p.box_dim[1] = 0; expect_err(p, "boxDim[1]", "box 0");
    p = mk(kUint8, 2, A, {512, 512}, {512}, {16, 257}); expect_err(p, "boxDim[1]", "box 257");
    p = mk(kUint8, 2, A, {512, 512}, {512}, {8, 8}); expect_err(p, "multiple of 16 bytes", "u8 box 8");
    p = mk(kFloat16, 2, A, {512, 512}, {1024}, {4, 8}); expect_err(p, "multiple of 16 bytes", "f16 box 4");
    p = mk(k16U4Align16B, 2, A, {256, 4}, {128}, {64, 4}); expect_err(p, "must be 128", "16U4_ALIGN16B box");
    // elementStrides
    p = ok; p.element_strides[0] = 0; expect_err(p, "elementStrides[0]", "element stride 0");
    p = ok; p.element_strides[1] = 9; expect_err(p, "elementStrides[1]", "element stride 9");
    // swizzle span
    p = mk(kFloat32, 2, A, {64, 8}, {256}, {16, 8}, kSwizzle32B); expect_err(p, "span", "64 B inner, 32B swizzle");
    p = mk(kUint8, 2, A, {512, 8}, {512}, {128, 8}, kSwizzle64B); expect_err(p, "span", "128 B inner, 64B swizzle");
    p = mk(kUint8, 2, A, {512, 8}, {512}, {256, 8}, kSwizzle128B); expect_err(p, "span", "256 B inner, 128B swizzle");
    p = mk(kUint8, 2, A, {512, 8}, {512}, {256, 8}, kSwizzle128BAtom64B); expect_err(p, "span", "256 B, atom 64B");
    // interleave / swizzle combinations
    p = mk(kUint16, 3, A, {16, 4, 4}, {32, 128}, {16, 4, 4}, kSwizzleNone, kInterleave32B);
    expect_err(p, "requires SWIZZLE_32B", "interleave 32B without 32B swizzle");
    p = mk(k16U6Align16B, 3, A, {128, 4, 4}, {96, 384}, {128, 4, 4}, kSwizzleNone, kInterleave16B);
    expect_err(p, "requires INTERLEAVE_NONE", "16U6 interleaved");
    // (16U6_ALIGN16B boxes are 96 B wide, so 32B/64B swizzles already fail the span rule; FLIP_8B is the one left.)
    p = mk(k16U6Align16B, 2, A, {128, 4}, {96}, {128, 4}, kSwizzle128BAtom32BFlip8B);
    expect_err(p, "does not support SWIZZLE_128B_ATOM_32B_FLIP_8B", "16U6 with 32B atom + 8B flip");
    p = mk(k16U4Align16B, 2, A, {256, 4}, {128}, {128, 4}, kSwizzle64B);
    expect_err(p, "does not support SWIZZLE_64B", "16U4_ALIGN16B with 64B swizzle");
    p = mk(k16U4Align16B, 2, A, {256, 4}, {128}, {128, 4}, kSwizzle128BAtom64B);
    expect_err(p, "does not support SWIZZLE_128B_ATOM_64B", "16U4_ALIGN16B with atom 64B");
    // oobFill
    p = ok; p.oob_fill = kOobFillNanRequestZeroFma; expect_err(p, "floating-point", "NaN fill on u8");
    p = mk(k16U4Align8B, 2, A, {64, 4}, {32}, {32, 4}); p.oob_fill = kOobFillNanRequestZeroFma;
    expect_err(p, "floating-point", "NaN fill on packed type");
}

static void test_decoder() {
    const TensorMapParams p = mk(kBfloat16, 3, 0x7f0000002000ull, {576, 64, 3}, {1152, 1152 * 64}, {64, 16, 2},
                                 kSwizzle128B);
    std::string err = encode_tiled(g_map, p);
    CHECK(err.empty(), "encode: %s", err.c_str());
    TensorMapParams q;
    CHECK(decode(g_map, &q).empty() && same(p, q), "round trip");
    // Refused without writing on a bad map address.
    uint8_t before[128];
    memcpy(before, g_map + 64, 128);
    CHECK(!encode_tiled(g_map + 16, p).empty(), "misaligned map accepted");
    CHECK(memcmp(before, g_map + 64, 128) == 0, "a refused encode wrote the map");
    // Any single flipped bit is detected.
    for (int byte = 0; byte < 128; ++byte)
        for (int bit = 0; bit < 8; ++bit) {
            uint8_t m[128];
            memcpy(m, g_map, 128);
            m[byte] ^= uint8_t(1u << bit);
            CHECK(!decode(m, &q).empty(), "flip of byte %d bit %d not detected", byte, bit);
        }
    uint8_t zero[128] = {};
    CHECK(decode(zero, &q).find("magic") != std::string::npos, "all-zero map");
    CHECK(!decode(nullptr, &q).empty(), "null map");
}

// ---------------------------------------------------------------------------------------------------------------
// Loads: refusals and the box copy against an independent reference
// ---------------------------------------------------------------------------------------------------------------

static void expect_load_err(const TensorMapParams& p, uint32_t dims, std::vector<int32_t> c, uint32_t dst,
                            const char* substring, const char* what) {
    int32_t coords[5] = {};
    for (size_t i = 0; i < c.size(); ++i) coords[i] = c[i];
    BoxInfo info;
    std::string err = check_load(p, dims, coords, dst, &info);
    CHECK(!err.empty(), "%s: accepted, expected an error about \"%s\"", what, substring);
    CHECK(err.empty() || err.find(substring) != std::string::npos, "%s: error \"%s\" does not mention \"%s\"", what,
          err.c_str(), substring);
}

static void test_load_refusals() {
    const uint64_t A = 0x7f0000001000ull;
    const TensorMapParams ok = mk(kUint8, 2, A, {512, 256}, {512}, {128, 64}, kSwizzle128B);
    BoxInfo info;
    const int32_t c0[5] = {0, 0, 0, 0, 0};
    CHECK(check_load(ok, 2, c0, 1024, &info).empty(), "baseline load");
    expect_load_err(ok, 3, {0, 0, 0}, 1024, "rank 2", ".3d with a rank-2 map");
    for (uint32_t dst : {1024u + 16u, 1024u + 64u, 8u})
        expect_load_err(ok, 2, {0, 0}, dst, "128-byte aligned", "unaligned destination");
    CHECK(check_load(ok, 2, c0, 1024 + 128, &info).empty(), "128-aligned, not 1024-aligned, destination");
    TensorMapParams p = mk(kUint16, 3, A, {8, 4, 4}, {16, 64}, {8, 4, 4}, kSwizzleNone, kInterleave16B);
    expect_load_err(p, 3, {0, 0, 0}, 1024, "interleave", "interleaved map");
    p = mk(k16U4Align16B, 2, A, {256, 4}, {128}, {128, 4});
    expect_load_err(p, 2, {0, 0}, 1024, "sub-byte", "packed type");
    p = ok; p.element_strides[1] = 2;
    expect_load_err(p, 2, {0, 0}, 1024, "traversal strides", "element stride 2");
    p = ok; p.element_strides[0] = 4;  // ignored with INTERLEAVE_NONE (driver doc)
    CHECK(check_load(p, 2, c0, 1024, &info).empty(), "elementStrides[0] is ignored");
    p = ok; p.swizzle = kSwizzle128BAtom32B;
    expect_load_err(p, 2, {0, 0}, 1024, "atomicity", "swizzle atomicity sub-mode");
    p = mk(kBfloat16, 2, A, {576, 64}, {1152}, {32, 64}, kSwizzle128B);
    expect_load_err(p, 2, {0, 0}, 1024, "full swizzle span", "64-byte inner box with 128B swizzle");
    p = mk(kFloat32, 2, A, {64, 8}, {256}, {4, 8}, kSwizzle32B);
    expect_load_err(p, 2, {0, 0}, 1024, "full swizzle span", "16-byte inner box with 32B swizzle");
    p = mk(kFloat32, 2, A, {64, 64}, {256}, {32, 8}, kSwizzle128B, kInterleaveNone, kL2None, kOobFillNanRequestZeroFma);
    CHECK(check_load(p, 2, c0, 1024, &info).empty(), "NaN fill, box in bounds");
    expect_load_err(p, 2, {40, 0}, 1024, "OOB-NaN", "NaN fill, box out of bounds");
    p = mk(kUint8, 3, A, {256, 256, 64}, {256, 65536}, {256, 256, 16});
    expect_load_err(p, 3, {0, 0, 0}, 1024, "tx-count", "box of 1 MiB");
}

// A global tensor of up to 3 dimensions with padded strides, filled with non-zero bytes (so a zero fill is visible).
struct Tensor {
    uint8_t* mem = nullptr;
    size_t bytes = 0;
    TensorMapParams p;
    ~Tensor() { free(mem); }
};

static void make_tensor(Tensor& t, int dtype, std::vector<uint64_t> dims, std::vector<uint64_t> strides,
                        std::vector<uint32_t> box, int swizzle) {
    const uint32_t rank = uint32_t(dims.size());
    uint64_t bytes = strides.empty() ? dims[0] * element_bits(dtype) / 8 : strides.back() * dims.back();
    t.bytes = (bytes + 63) / 64 * 64;
    t.mem = static_cast<uint8_t*>(aligned_alloc(64, t.bytes));
    uint32_t h = 12345;
    for (size_t i = 0; i < t.bytes; ++i) {
        h = h * 1103515245u + 12345u;
        t.mem[i] = uint8_t(1 + (h >> 16) % 255);
    }
    t.p = mk(dtype, rank, reinterpret_cast<uintptr_t>(t.mem), dims, strides, box, swizzle);
}

// The expected shared-memory image, written from the ISA text directly: element (x, y, z) of the box is tensor element
// (c0 + x, c1 + y, c2 + z) or 0 when any coordinate is outside [0, globalDim); it sits at linear byte
// ((z * by + y) * bx + x) * elem of the dense box, and every byte moves to CuTe's swizzle of its absolute address.
static std::vector<uint8_t> reference_image(const Tensor& t, const int32_t c[3], uint32_t dst, uint64_t* oob,
                                            uint64_t* lo, uint64_t* hi) {
    const TensorMapParams& p = t.p;
    const uint32_t eb = element_bits(p.data_type) / 8;
    const uint32_t bx = p.box_dim[0], by = p.rank > 1 ? p.box_dim[1] : 1, bz = p.rank > 2 ? p.box_dim[2] : 1;
    const int64_t dx = int64_t(p.global_dim[0]), dy = p.rank > 1 ? int64_t(p.global_dim[1]) : 1,
                  dz = p.rank > 2 ? int64_t(p.global_dim[2]) : 1;
    const uint64_t sy = p.rank > 1 ? p.global_strides[0] : 0, sz = p.rank > 2 ? p.global_strides[1] : 0;
    const int64_t cy0 = p.rank > 1 ? c[1] : 0, cz0 = p.rank > 2 ? c[2] : 0;
    std::vector<uint8_t> img(uint64_t(bx) * by * bz * eb, 0xEE);
    *oob = 0;
    *lo = UINT64_MAX;
    *hi = 0;
    for (uint32_t z = 0; z < bz; ++z)
        for (uint32_t y = 0; y < by; ++y)
            for (uint32_t x = 0; x < bx; ++x) {
                const int64_t cx = int64_t(c[0]) + x, cy = cy0 + y, cz = cz0 + z;
                const bool in = cx >= 0 && cx < dx && cy >= 0 && cy < dy && cz >= 0 && cz < dz;
                const uint64_t goff = in ? uint64_t(cz) * sz + uint64_t(cy) * sy + uint64_t(cx) * eb : 0;
                if (!in) ++*oob;
                if (in && goff < *lo) *lo = goff;
                if (in && goff + eb > *hi) *hi = goff + eb;
                const uint64_t lin = ((uint64_t(z) * by + y) * bx + x) * eb;
                for (uint32_t b = 0; b < eb; ++b) {
                    const uint32_t at = oracle_swizzle(p.swizzle, dst + uint32_t(lin + b)) - dst;
                    img.at(at) = in ? t.mem[goff + b] : 0;
                }
            }
    return img;
}

static int g_box_cases = 0;

static void check_box(const Tensor& t, std::vector<int32_t> cv, uint32_t dst, const char* what) {
    int32_t c[5] = {};
    for (size_t i = 0; i < cv.size(); ++i) c[i] = cv[i];
    BoxInfo info;
    std::string err = check_load(t.p, t.p.rank, c, dst, &info);
    CHECK(err.empty(), "%s (%d,%d,%d) dst 0x%x: refused: %s", what, c[0], c[1], c[2], dst, err.c_str());
    if (!err.empty()) return;
    ++g_box_cases;
    uint64_t oob, lo, hi;
    const std::vector<uint8_t> want = reference_image(t, c, dst, &oob, &lo, &hi);
    const uint64_t elements = want.size() / info.elem_bytes;
    // complete_tx counts the full box, out-of-bounds elements included (see tma.cpp for the rule and its source).
    CHECK(info.box_bytes == want.size(), "%s: box bytes %" PRIu64 " vs %zu", what, info.box_bytes, want.size());
    CHECK(info.elements == elements && info.oob_elements == oob, "%s (%d,%d,%d): oob %" PRIu64 " vs %" PRIu64, what,
          c[0], c[1], c[2], info.oob_elements, oob);
    CHECK(info.any_in_bounds == (oob < elements), "%s: any_in_bounds", what);
    if (oob < elements)
        CHECK(info.global_lo == lo && info.global_hi == hi, "%s (%d,%d,%d): global span [%" PRIu64 ",%" PRIu64
              ") vs [%" PRIu64 ",%" PRIu64 ")", what, c[0], c[1], c[2], info.global_lo, info.global_hi, lo, hi);
    // box_copy, with guard bytes on both sides (it must write exactly the box's bytes).
    std::vector<uint8_t> buf(want.size() + 256, 0xA5);
    box_copy(t.p, c, dst, t.mem, buf.data() + 128);
    for (int g = 0; g < 128; ++g)
        CHECK(buf[g] == 0xA5 && buf[buf.size() - 1 - g] == 0xA5, "%s: box_copy wrote outside the box", what);
    CHECK(memcmp(buf.data() + 128, want.data(), want.size()) == 0, "%s (%d,%d,%d) dst 0x%x: box_copy image differs",
          what, c[0], c[1], c[2], dst);
    // box_elements: the same copy element by element.
    std::vector<BoxElement> els;
    box_elements(t.p, c, dst, &els);
    CHECK(els.size() == elements, "%s: %zu elements", what, els.size());
    std::vector<uint8_t> img(want.size(), 0xEE);
    for (size_t i = 0; i < els.size(); ++i) {
        CHECK(els[i].smem_addr >= dst && els[i].smem_addr + info.elem_bytes <= dst + want.size(),
              "%s: element %zu lands outside the box", what, i);
        if (els[i].smem_addr < dst || els[i].smem_addr + info.elem_bytes > dst + want.size()) continue;
        for (uint32_t b = 0; b < info.elem_bytes; ++b)
            img[els[i].smem_addr - dst + b] = els[i].oob ? 0 : t.mem[els[i].global_offset + b];
    }
    CHECK(img == want, "%s (%d,%d,%d) dst 0x%x: box_elements image differs", what, c[0], c[1], c[2], dst);
}

// Coordinates around both edges of a dimension of size `dim` for a box of `box`: fully before, straddling the start,
// at 0, inside, straddling the end, flush with the end, fully after.
static std::vector<int32_t> edge_coords(int64_t dim, int64_t box) {
    std::vector<int32_t> v = {int32_t(-box - 3), int32_t(-box), int32_t(-box + 1), -1, 0, 1,
                              int32_t(dim - box), int32_t(dim - box + 1), int32_t(dim - 1), int32_t(dim),
                              int32_t(dim + 5)};
    if (dim > box) v.push_back(int32_t((dim - box) / 2));
    return v;
}

static void test_box_2d() {
    const uint32_t dsts[] = {3 * 1024, 3 * 1024 + 128, 3 * 1024 + 384, 5 * 1024 + 896};
    struct Case {
        const char* name;
        int dtype;
        uint64_t d0, d1, stride;
        uint32_t b0, b1;
        int swizzle;
    } cases[] = {
        {"u8 SW128 [128x8] of [200x20]", kUint8, 200, 20, 208, 128, 8, kSwizzle128B},
        {"u8 SW128 [128x16] of [128x16] (exact)", kUint8, 128, 16, 128, 128, 16, kSwizzle128B},
        {"bf16 SW128 [64x16] of [90x37]", kBfloat16, 90, 37, 192, 64, 16, kSwizzle128B},
        {"bf16 SW64 [32x8] of [45x11]", kBfloat16, 45, 11, 96, 32, 8, kSwizzle64B},
        {"f32 SW32 [8x4] of [13x6]", kFloat32, 13, 6, 64, 8, 4, kSwizzle32B},
        {"f32 none [24x5] of [50x9]", kFloat32, 50, 9, 208, 24, 5, kSwizzleNone},
        {"f32 none [128x1] row of [300x3]", kFloat32, 300, 3, 1200, 128, 1, kSwizzleNone},
        {"u8 none [16x8] of [656x12]", kUint8, 656, 12, 656, 16, 8, kSwizzleNone},
        {"u64 none [4x3] of [7x5]", kUint64, 7, 5, 64, 4, 3, kSwizzleNone},
        {"f16 SW128 [64x2] of [64x3]", kFloat16, 64, 3, 128, 64, 2, kSwizzle128B},
    };
    for (const Case& k : cases) {
        Tensor t;
        make_tensor(t, k.dtype, {k.d0, k.d1}, {k.stride}, {k.b0, k.b1}, k.swizzle);
        CHECK(validate_tiled(t.p, 0).empty(), "%s: invalid map: %s", k.name, validate_tiled(t.p, 0).c_str());
        for (uint32_t dst : dsts)
            for (int32_t x : edge_coords(int64_t(k.d0), k.b0))
                for (int32_t y : edge_coords(int64_t(k.d1), k.b1)) check_box(t, {x, y}, dst, k.name);
    }
}

static void test_box_3d() {
    struct Case {
        const char* name;
        int dtype;
        uint64_t d0, d1, d2, s1, s2;
        uint32_t b0, b1, b2;
        int swizzle;
    } cases[] = {
        {"u8 SW128 [128x4x3] of [130x6x5]", kUint8, 130, 6, 5, 144, 144 * 7, 128, 4, 3, kSwizzle128B},
        {"bf16 SW64 [32x3x2] of [40x5x4]", kBfloat16, 40, 5, 4, 80, 80 * 5, 32, 3, 2, kSwizzle64B},
        {"f32 none [12x2x3] of [20x3x7]", kFloat32, 20, 3, 7, 80, 256, 12, 2, 3, kSwizzleNone},
    };
    for (const Case& k : cases) {
        Tensor t;
        make_tensor(t, k.dtype, {k.d0, k.d1, k.d2}, {k.s1, k.s2}, {k.b0, k.b1, k.b2}, k.swizzle);
        CHECK(validate_tiled(t.p, 0).empty(), "%s: invalid map: %s", k.name, validate_tiled(t.p, 0).c_str());
        for (uint32_t dst : {2048u, 2048u + 640u})
            for (int32_t x : edge_coords(int64_t(k.d0), k.b0))
                for (int32_t y : edge_coords(int64_t(k.d1), k.b1))
                    for (int32_t z : edge_coords(int64_t(k.d2), k.b2)) check_box(t, {x, y, z}, dst, k.name);
    }
}

static void test_extreme_coordinates() {
    // s32 coordinates at the ends of their range: no overflow, everything out of bounds, full box bytes.
    Tensor t;
    make_tensor(t, kUint8, {256, 64}, {256}, {128, 8}, kSwizzle128B);
    for (int32_t x : {INT32_MIN, INT32_MIN + 5, INT32_MAX - 100, INT32_MAX})
        for (int32_t y : {INT32_MIN, 0, INT32_MAX}) check_box(t, {x, y}, 1024, "extreme coordinates");
}

int main() {
    run("enum values equal cuda.h (static_assert)", [] {});
    run("CuTe pairs Swizzle<B,4,3> with CU_TENSOR_MAP_SWIZZLE_{NONE,32B,64B,128B}", test_cute_mode_mapping);
    run("swizzle_address == CuTe swizzle of the absolute address (4 KiB x 14 bases x 4 modes)", test_swizzle_vs_cute);
    run("swizzle_address reproduces the PTX ISA swizzle tables and base-offset rule", test_swizzle_vs_isa_tables);
    run("encoder accepts the crate's maps and other valid maps", test_encoder_accepts_crate_maps);
    run("encoder refuses each documented requirement violated once", test_encoder_refuses_each_rule);
    run("decoder round trip, checksum, magic", test_decoder);
    run("load refusals (rank, alignment, unmodelled modes, OOB-NaN, tx-count)", test_load_refusals);
    run("2D box copy at every edge vs ISA reference with CuTe swizzle", test_box_2d);
    run("3D box copy at every edge vs ISA reference with CuTe swizzle", test_box_3d);
    run("extreme s32 coordinates", test_extreme_coordinates);
    printf("(%d box cases)\n", g_box_cases);
    if (g_failed_tests) {
        printf("FAILED: %d test(s)\n", g_failed_tests);
        return 1;
    }
    printf("ALL PASS\n");
    return 0;
}
