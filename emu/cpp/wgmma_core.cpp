// See wgmma_core.h for the sources. Section names below are PTX ISA 9.0, "Asynchronous Warpgroup Level Matrix
// Multiply-Accumulate Instructions".
#include "wgmma_core.h"

#include <cstdarg>
#include <cstdio>
#include <vector>

namespace r1k_emu {
namespace wgmma {

namespace {
std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
std::string format(const char* fmt, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    return buf;
}
// Number of XOR bits B of the mode's Swizzle<B,4,3>.
uint32_t swizzle_bits(Swizzle s) {
    switch (s) {
        case Swizzle::None: return 0;
        case Swizzle::B32: return 1;
        case Swizzle::B64: return 2;
        case Swizzle::B128: return 3;
    }
    return 0;
}
}  // namespace

// ---- "Matrix Descriptor Format" ----
// 13-0 start address, 29-16 LBO, 45-32 SBO (each matrix-descriptor-encode(x) = (x & 0x3FFFF) >> 4), 51-49 base
// offset, 63-62 swizzle mode (0 none, 1 128-Byte, 2 64-Byte, 3 32-Byte).
Descriptor decode_descriptor(uint64_t raw) {
    Descriptor d;
    d.start = static_cast<uint32_t>(raw & 0x3FFF) << 4;
    d.lbo_field = static_cast<uint32_t>((raw >> 16) & 0x3FFF);
    d.lbo = d.lbo_field << 4;
    d.sbo = static_cast<uint32_t>((raw >> 32) & 0x3FFF) << 4;
    d.base_offset = static_cast<uint32_t>((raw >> 49) & 0x7);
    d.swizzle = static_cast<Swizzle>((raw >> 62) & 0x3);
    return d;
}

const char* swizzle_name(Swizzle s) {
    switch (s) {
        case Swizzle::None: return "none";
        case Swizzle::B128: return "128B";
        case Swizzle::B64: return "64B";
        case Swizzle::B32: return "32B";
    }
    return "?";
}

uint32_t swizzle_row_bytes(Swizzle s) { return s == Swizzle::None ? 16 : 16u << swizzle_bits(s); }

uint32_t swizzle_address(uint32_t addr, Swizzle s) {
    const uint32_t b = swizzle_bits(s);
    const uint32_t mask = (1u << b) - 1;
    return addr ^ (((addr >> 7) & mask) << 4);
}

// ---- "Shared Memory Matrix Layout" ----
std::string check_operand(const Operand& op, std::string* warning) {
    const Descriptor& d = op.desc;
    const uint32_t b = swizzle_bits(d.swizzle);
    if (d.base_offset != 0) {
        if (d.swizzle != Swizzle::None)
            return format("matrix descriptor base offset %u with %s swizzle: the emulator supports only base offset "
                          "0, i.e. repeating patterns that start on a %u-byte boundary (PTX ISA \"Matrix Descriptor "
                          "Format\" defines the field but not how it shifts the pattern)",
                          d.base_offset, swizzle_name(d.swizzle), 128u << b);
        if (warning)
            *warning = format("matrix descriptor base offset %u ignored: no swizzle (PTX ISA \"Matrix Descriptor "
                              "Format\": the base offset is valid for all swizzling modes except no-swizzle)",
                              d.base_offset);
    }
    if (b != 0 && ((d.start >> 7) & ((1u << b) - 1)) != 0)
        return format("matrix descriptor start address 0x%x with %s swizzle has non-zero address bits 7..%u (the "
                      "bits the swizzle XORs in), so the matrix does not start at the beginning of a %u-byte "
                      "repeating pattern: the PTX ISA canonical layouts (\"Shared Memory Matrix Layout\") are "
                      "defined from the pattern start and the emulator does not guess the hardware's behaviour "
                      "otherwise (\"Matrix Descriptor Format\", base offset)",
                      d.start, swizzle_name(d.swizzle), 6 + b, 128u << b);
    if (op.major == Major::K && b != 0 && d.lbo_field > 1 && warning)
        *warning = format("matrix descriptor LBO field %u ignored: K-major %s-swizzled operand (PTX ISA \"Leading "
                          "Dimension Byte Offset\": swizzled layouts: not used, assumed to be 1)",
                          d.lbo_field, swizzle_name(d.swizzle));
    return "";
}

uint32_t element_address(const Operand& op, uint32_t mn, uint32_t kk) {
    const Descriptor& d = op.desc;
    const uint32_t e = op.elem_bytes;
    uint32_t off;
    if (op.major == Major::K) {
        const uint32_t kb = kk * e;  // byte position along K (< 32)
        if (d.swizzle == Swizzle::None) {
            // ((8,m),(T,2)):((1T,SBO),(1,LBO)): 8x16-byte core matrices, rows 16 bytes apart, 8-row groups SBO
            // apart, the two 16-byte K halves LBO apart.
            off = (mn % 8) * 16 + (mn / 8) * d.sbo + (kb % 16) + (kb / 16) * d.lbo;
        } else {
            // ((8,m),(T,2)):((W/16*T,SBO),(1,T)): rows W bytes apart, 8-row groups SBO apart, K contiguous.
            const uint32_t w = swizzle_row_bytes(d.swizzle);
            off = (mn % 8) * w + (mn / 8) * d.sbo + kb;
        }
    } else {
        if (d.swizzle == Swizzle::None) {
            // ((T,1,m),(8,k)):((1,T,SBO),(1T,LBO)): T contiguous MN elements (16 bytes), MN groups of T SBO apart;
            // K rows 16 bytes apart, 8-row K groups LBO apart.
            const uint32_t t = 16 / e;
            off = (mn % t) * e + (mn / t) * d.sbo + (kk % 8) * 16 + (kk / 8) * d.lbo;
        } else {
            // ((T,W/16,m),(8,k)):((1,T,LBO),(W/16*T,SBO)): W contiguous bytes along MN, MN blocks of W bytes LBO
            // apart; K rows W bytes apart, 8-row K groups SBO apart.
            const uint32_t w = swizzle_row_bytes(d.swizzle);
            const uint32_t c = w / e;
            off = (mn % c) * e + (mn / c) * d.lbo + (kk % 8) * w + (kk / 8) * d.sbo;
        }
    }
    return swizzle_address(d.start + off, d.swizzle);
}

// ---- "Register Fragments" ----
Coord d_fragment(uint32_t t, uint32_t i) {
    const uint32_t warp = t / 32, lane = t % 32;
    return {16 * warp + lane / 4 + 8 * ((i / 2) % 2), 8 * (i / 4) + 2 * (lane % 4) + i % 2};
}

Coord a_fragment(uint32_t t, uint32_t j, uint32_t e, uint32_t elem_bytes) {
    const uint32_t warp = t / 32, lane = t % 32;
    const uint32_t per_reg = 4 / elem_bytes;
    return {16 * warp + lane / 4 + 8 * (j % 2), per_reg * (lane % 4) + e + 4 * per_reg * (j / 2)};
}

// ---- "wgmma.mma_async" ----
mma_numerics::Elem elem_of(WgmmaType t) {
    switch (t) {
        case WgmmaType::E4M3: return mma_numerics::Elem::E4M3;
        case WgmmaType::E5M2: return mma_numerics::Elem::E5M2;
        case WgmmaType::BF16: return mma_numerics::Elem::BF16;
        case WgmmaType::F16: return mma_numerics::Elem::F16;
    }
    return mma_numerics::Elem::BF16;
}

std::string check_form(const WgmmaMma& op) {
    const bool fp8 = op.atype == WgmmaType::E4M3 || op.atype == WgmmaType::E5M2;
    const bool fp8b = op.btype == WgmmaType::E4M3 || op.btype == WgmmaType::E5M2;
    if (fp8 != fp8b || (!fp8 && op.atype != op.btype))
        return format("wgmma.mma_async .atype .%s and .btype .%s differ: allowed only between the FP8 types "
                      "(PTX ISA \"wgmma.mma_async\")",
                      mma_numerics::elem_name(elem_of(op.atype)), mma_numerics::elem_name(elem_of(op.btype)));
    if (op.m != 64)
        return format("wgmma.mma_async with M = %u: every shape has M = 64 (PTX ISA \"Matrix Shape\")", op.m);
    if (op.n < 8 || op.n > 256 || op.n % 8 != 0)
        return format("wgmma.mma_async with N = %u: N must be a multiple of 8 in [8, 256] for an .f32 accumulator "
                      "(PTX ISA \"Matrix Shape\")",
                      op.n);
    const uint32_t want_k = fp8 ? 32 : 16;
    if (op.k != want_k)
        return format("wgmma.mma_async .%s with K = %u: the shape is m64nNk%u (PTX ISA \"Matrix Shape\")",
                      mma_numerics::elem_name(elem_of(op.atype)), op.k, want_k);
    if ((op.imm_scale_a != 1 && op.imm_scale_a != -1) || (op.imm_scale_b != 1 && op.imm_scale_b != -1))
        return format("wgmma.mma_async imm-scale-a %d / imm-scale-b %d: the valid values are -1 and 1 (PTX ISA "
                      "\"wgmma.mma_async\")",
                      op.imm_scale_a, op.imm_scale_b);
    if (fp8) {
        if (op.imm_trans_a != -1 || op.imm_trans_b != -1)
            return "wgmma.mma_async with FP8 operands and imm-trans-a/imm-trans-b: the transpose is only supported "
                   "for .f16/.bf16 (PTX ISA \"wgmma.mma_async\"), so FP8 operands are always K-major";
    } else {
        if (op.a_from_registers && op.imm_trans_a != -1)
            return "wgmma.mma_async with A in registers and imm-trans-a: the register-A form has no imm-trans-a "
                   "(transpose applies only to matrices accessed from shared memory, PTX ISA \"wgmma.mma_async\")";
        if (!op.a_from_registers && op.imm_trans_a != 0 && op.imm_trans_a != 1)
            return format("wgmma.mma_async imm-trans-a %d: the valid values are 0 and 1 (PTX ISA \"wgmma.mma_async\")",
                          op.imm_trans_a);
        if (op.imm_trans_b != 0 && op.imm_trans_b != 1)
            return format("wgmma.mma_async imm-trans-b %d: the valid values are 0 and 1 (PTX ISA \"wgmma.mma_async\")",
                          op.imm_trans_b);
    }
    return "";
}

Major a_major(const WgmmaMma& op) { return op.imm_trans_a == 1 ? Major::MN : Major::K; }
Major b_major(const WgmmaMma& op) { return op.imm_trans_b == 1 ? Major::MN : Major::K; }

void mma(mma_numerics::Mode mode, mma_numerics::Elem ta, mma_numerics::Elem tb, uint32_t n, uint32_t k, const double* A,
         const double* B, const float* C, float* D) {
    constexpr uint32_t M = 64;
    if (mode == mma_numerics::Mode::Exact) {
        for (uint32_t m = 0; m < M; ++m)
            for (uint32_t j = 0; j < n; ++j)
                D[m * n + j] =
                    mma_numerics::dot_exact(A + m * k, B + j * k, static_cast<int>(k), C ? C[m * n + j] : 0.0f);
        return;
    }
    // Hopper: normalize every input once (MMA-Sim frexp_and_normalize with the type's minimum normal exponent).
    const mma_numerics::TfdpaParams p = mma_numerics::hopper_wgmma_params(ta, tb);
    const int ea = mma_numerics::subnormal_exponent(ta), eb = mma_numerics::subnormal_exponent(tb);
    std::vector<mma_numerics::SigExp> sa(M * k), sb(static_cast<size_t>(n) * k);
    for (uint32_t i = 0; i < M * k; ++i) sa[i] = mma_numerics::frexp_normalize(A[i], ea);
    for (uint32_t i = 0; i < n * k; ++i) sb[i] = mma_numerics::frexp_normalize(B[i], eb);
    for (uint32_t m = 0; m < M; ++m)
        for (uint32_t j = 0; j < n; ++j)
            D[m * n + j] = mma_numerics::dot_hopper(&sa[m * k], &sb[j * k], static_cast<int>(k),
                                                   C ? C[m * n + j] : 0.0f, p);
}

}  // namespace wgmma
}  // namespace r1k_emu
