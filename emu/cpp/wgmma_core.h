// Pure model of warpgroup MMA (no dependency on the execution engine, unit-tested standalone by
// tests/wgmma_test.cpp against CuTe): matrix descriptors, shared-memory operand addressing, register fragments,
// instruction-form rules and the matrix product. wgmma.cpp wires it to the engine.
//
// Sources (and nothing else; in particular not this crate's kernels/common/*.cuh or src/ helpers):
//   * PTX ISA 9.0, "Asynchronous Warpgroup Level Matrix Multiply-Accumulate Instructions": "Register Fragments"
//     (Matrix Fragments for wgmma.mma_async.m64nNk16 / m64nNk32: figures wgmma-64N16-A, wgmma-64N16-D,
//     wgmma-64N32-A, wgmma-64N32-D), "Shared Memory Matrix Layout" (K-major / MN-major, Table "swizzle atom
//     layout", "Major-ness supported by Strides": "Leading Dimension Byte Offset", "Stride Dimension Byte Offset",
//     "Canonical Layouts"), "Matrix Descriptor Format", and the instruction page "wgmma.mma_async" (operand rules).
//   * CuTe: cute/arch/mma_sm90_desc.hpp (GmmaDescriptor bitfields), cute/atom/mma_traits_sm90_gmma.hpp
//     (make_gmma_desc canonical-layout comments, CLayout_64xN, ALayout_64x16, ALayout_64x32), cute/swizzle.hpp and
//     cute/pointer_swizzle.hpp (swizzles act on the absolute shared-memory address) -- the test oracle.
//
// Functions that check rules return an empty string when the rule holds and otherwise a sentence naming it.
#pragma once
#include <cstdint>
#include <string>

#include "numerics_core.h"
#include "wgmma.h"

namespace r1k_emu {
namespace wgmma {

// ---- "Matrix Descriptor Format" ----
// Bits 62-63 (same encoding as CuTe's GMMA::LayoutType).
enum class Swizzle : uint8_t { None = 0, B128 = 1, B64 = 2, B32 = 3 };
struct Descriptor {
    uint32_t start;        // bits 0-13 << 4: shared::cta byte address of the matrix
    uint32_t lbo;          // bits 16-29 << 4: leading dimension byte offset, in bytes
    uint32_t sbo;          // bits 32-45 << 4: stride dimension byte offset, in bytes
    uint32_t lbo_field;    // bits 16-29 as encoded (LBO >> 4)
    uint32_t base_offset;  // bits 49-51
    Swizzle swizzle;       // bits 62-63
};
Descriptor decode_descriptor(uint64_t raw);
const char* swizzle_name(Swizzle s);
// Bytes in one row of the swizzle atom: 128, 64, 32 for the swizzled modes, 16 (one core-matrix row) for none.
uint32_t swizzle_row_bytes(Swizzle s);
// The swizzle function of the mode on an absolute shared-memory byte address: CuTe Swizzle<B,4,3> (B = 3, 2, 1
// for 128B, 64B, 32B; identity for none): address bits [4, 4+B) ^= bits [7, 7+B). The repeating pattern is 8 rows
// of swizzle_row_bytes, i.e. 1024 / 512 / 256 bytes ("Matrix Descriptor Format": starting address of the
// repeating pattern).
uint32_t swizzle_address(uint32_t addr, Swizzle s);

// ---- "Shared Memory Matrix Layout" ----
// imm-trans-a / imm-trans-b = 0 (or absent): K-major; 1: M-major (A) / N-major (B).
enum class Major { K, MN };
struct Operand {
    Descriptor desc;
    Major major;
    uint32_t elem_bytes;  // 1 (e4m3/e5m2) or 2 (bf16/f16)
    uint32_t rows;        // the M (A) or N (B) extent of the instruction
    uint32_t k;           // the K extent of the instruction (always 32 bytes: k16 x 2 B or k32 x 1 B)
};
// Refusals where the ISA is silent, and warnings for fields the ISA and CuTe document as unused:
//   * base offset != 0 with a swizzle: refused (the ISA gives the formula for the field but not how the
//     hardware applies it); with no swizzle: warned (the field "is valid for all swizzling modes except the
//     no-swizzle mode").
//   * a swizzled start address whose bits [7, 7+B) -- the bits the swizzle XORs into [4, 4+B) -- are not zero:
//     refused (the matrix would not start at the beginning of a repeating pattern; the canonical layouts are
//     defined from the pattern start). Offsets below bit 7 (a K step inside a swizzled row) are fine.
//   * K-major with a swizzle and an LBO field other than 0 or 1: warned (ISA "Leading Dimension Byte Offset":
//     "Swizzled layouts: not used, assumed to be 1"; CuTe GmmaDescriptor: "Unused for all SWIZZLE_* layouts").
std::string check_operand(const Operand& op, std::string* warning);
// Shared-memory byte address of element (mn, kk) of the operand (mn < rows, kk < k): the ISA's canonical layout
// (CuTe notation as in the ISA table, T = 16 / elem_bytes elements per 16-byte unit, strides in elements, LBO and
// SBO standing for the descriptor's byte offsets converted to elements):
//   K-major,  none:        ((8,m),(T,2)):((1T,SBO),(1,LBO))
//   K-major,  W-byte swz:  ((8,m),(T,2)):((W/16*T,SBO),(1,T))
//   MN-major, none:        ((T,1,m),(8,k)):((1,T,SBO),(1T,LBO))
//   MN-major, W-byte swz:  ((T,W/16,m),(8,k)):((1,T,LBO),(W/16*T,SBO))
// added to the descriptor's start address, then the swizzle applied to the absolute address.
uint32_t element_address(const Operand& op, uint32_t mn, uint32_t kk);

// ---- "Register Fragments" ----
struct Coord {
    uint32_t row, col;
};
// Accumulator D (.f32, every m64nNkK): thread t (0..127 of the warpgroup), register i (0..N/2-1) -> (row m, col n).
//   row = 16*(t/32) + (t%32)/4 + 8*((i/2)%2),  col = 8*(i/4) + 2*(t%4) + i%2        (CuTe CLayout_64xN)
Coord d_fragment(uint32_t thread, uint32_t reg);
// Register operand A: thread t, register j (0..3), element e inside the register (0..1 for 16-bit types, low half
// first; 0..3 for 8-bit types, low byte first) -> (row m, col k). With E = 4 / elem_bytes elements per register:
//   row = 16*(t/32) + (t%32)/4 + 8*(j%2),  col = E*(t%4) + e + 4*E*(j/2)          (CuTe ALayout_64x16 / 64x32)
Coord a_fragment(uint32_t thread, uint32_t reg, uint32_t elem, uint32_t elem_bytes);

// ---- the instruction ("wgmma.mma_async") ----
mma_numerics::Elem elem_of(WgmmaType t);
// The rules of the instruction form every thread passed: .m64, N a multiple of 8 in [8, 256], K = 32 bytes,
// .atype == .btype unless FP8, imm-scale-a/b in {-1, 1}, imm-trans-a/b only for .f16/.bf16 with the operand in
// shared memory (so FP8 is always K-major, and the register-A form has no imm-trans-a).
std::string check_form(const WgmmaMma& op);
// A: K-major unless imm-trans-a == 1; B: K-major unless imm-trans-b == 1.
Major a_major(const WgmmaMma& op);
Major b_major(const WgmmaMma& op);

// D[m][n] = sum_k A[m][k] * B[n][k] + (C ? C[m][n] : 0) for m < 64, n < N, in the given numerics.
// A is [64][K] row-major, B is [N][K] (each column of the KxN matrix B contiguous), C and D are [64][N]; all
// values are the exact input values (already negated for imm-scale = -1). Without C (scale-d false) the
// accumulator input is +0.
void mma(mma_numerics::Mode mode, mma_numerics::Elem ta, mma_numerics::Elem tb, uint32_t n, uint32_t k, const double* A,
         const double* B, const float* C, float* D);

}  // namespace wgmma
}  // namespace r1k_emu
