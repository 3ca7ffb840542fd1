/* Build and run from the crate root:

     g++ -std=c++17 -O1 -I/work/main/emu/cpp emu/cpp/tests/numerics_test.cpp emu/cpp/numerics_core.cpp \
         -o target/numerics_test && target/numerics_test
*/
// Hand-computed tests of the wgmma numerics (numerics_core.cpp): element decoding, the exact mode, and the
// hopper mode (MMA-Sim's T-FDPA) where the two modes must differ.
//
// The bit-for-bit comparison with MMA-Sim itself on random inputs is emu/scripts/check-numerics-mmasim.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <vector>

#include "numerics_core.h"

using namespace r1k_emu::mma_numerics;

static int g_failures = 0, g_checks = 0;
#define CHECK(cond, ...)                                                      \
    do {                                                                      \
        ++g_checks;                                                           \
        if (!(cond)) {                                                        \
            ++g_failures;                                                     \
            std::printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);       \
            std::printf(__VA_ARGS__);                                         \
            std::printf("\n");                                                \
        }                                                                     \
    } while (0)

static uint32_t bits(float f) {
    uint32_t b;
    std::memcpy(&b, &f, 4);
    return b;
}
static float from_bits(uint32_t b) {
    float f;
    std::memcpy(&f, &b, 4);
    return f;
}

// Both modes on one dot product of decoded values (length k, accumulator c).
struct Result {
    float exact, hopper;
};
static Result run(Elem ta, Elem tb, const std::vector<double>& a, const std::vector<double>& b, float c) {
    std::vector<SigExp> sa, sb;
    for (double x : a) sa.push_back(frexp_normalize(x, subnormal_exponent(ta)));
    for (double x : b) sb.push_back(frexp_normalize(x, subnormal_exponent(tb)));
    const int k = static_cast<int>(a.size());
    return {dot_exact(a.data(), b.data(), k, c), dot_hopper(sa.data(), sb.data(), k, c, hopper_wgmma_params(ta, tb))};
}

static void test_decode() {
    const double nan_check = decode(Elem::E4M3, 0x7F);
    CHECK(std::isnan(nan_check) && std::isnan(decode(Elem::E4M3, 0xFF)), "e4m3 NaN");
    CHECK(decode(Elem::E4M3, 0x38) == 1.0, "e4m3 1.0");
    CHECK(decode(Elem::E4M3, 0x7E) == 448.0, "e4m3 max 448");
    CHECK(decode(Elem::E4M3, 0xFE) == -448.0, "e4m3 -448");
    CHECK(decode(Elem::E4M3, 0x01) == std::ldexp(1.0, -9), "e4m3 min subnormal");
    CHECK(decode(Elem::E4M3, 0x08) == std::ldexp(1.0, -6), "e4m3 min normal");
    CHECK(decode(Elem::E4M3, 0x78) == 256.0, "e4m3 0x78 = 256 (exponent 15 is finite)");
    CHECK(decode(Elem::E5M2, 0x3C) == 1.0, "e5m2 1.0");
    CHECK(std::isinf(decode(Elem::E5M2, 0x7C)) && decode(Elem::E5M2, 0xFC) < 0, "e5m2 Inf");
    CHECK(std::isnan(decode(Elem::E5M2, 0x7D)), "e5m2 NaN");
    CHECK(decode(Elem::E5M2, 0x7B) == 57344.0, "e5m2 max");
    CHECK(decode(Elem::E5M2, 0x01) == std::ldexp(1.0, -16), "e5m2 min subnormal");
    CHECK(decode(Elem::BF16, 0x3F80) == 1.0, "bf16 1.0");
    CHECK(decode(Elem::BF16, 0xC040) == -3.0, "bf16 -3");
    CHECK(decode(Elem::BF16, 0x0001) == std::ldexp(1.0, -133), "bf16 min subnormal");
    CHECK(std::isinf(decode(Elem::BF16, 0x7F80)), "bf16 Inf");
    CHECK(decode(Elem::F16, 0x3C00) == 1.0, "f16 1.0");
    CHECK(decode(Elem::F16, 0x0001) == std::ldexp(1.0, -24), "f16 min subnormal");
    CHECK(decode(Elem::F16, 0x7BFF) == 65504.0, "f16 max");
}

static void test_frexp_normalize() {
    SigExp r = frexp_normalize(6.0, -6);
    CHECK(r.s == 1.5 && r.e == 2, "6 = 1.5 * 2^2");
    r = frexp_normalize(std::ldexp(1.0, -9), -6);  // e4m3 subnormal: keeps e = -6, s = 2^-3
    CHECK(r.s == 0.125 && r.e == -6, "e4m3 2^-9 -> (%g, %d)", r.s, r.e);
    r = frexp_normalize(-0.0, -126);
    CHECK(r.s == 0 && r.e == -126, "zero -> e_sub");
    r = frexp_normalize(std::numeric_limits<double>::infinity(), -126);
    CHECK(std::isinf(r.s) && r.e == -1, "Inf -> (Inf, -1)");
}

// FP8: one large product and 31 tiny ones. Exact keeps them; the hopper model aligns every term to the largest
// exponent with F = 13 fraction bits, so products 2^-14 below the largest are truncated away entirely.
static void test_large_plus_tiny_fp8() {
    std::vector<double> a(32, 0.125), b(32, 0.125);  // 2^-3 * 2^-3 = 2^-6 each
    a[0] = b[0] = 16.0;                              // 256
    const Result r = run(Elem::E4M3, Elem::E4M3, a, b, 0.0f);
    CHECK(r.exact == 256.484375f, "exact %.9g", r.exact);
    CHECK(r.hopper == 256.0f, "hopper %.9g", r.hopper);
    // 2^-6 is 2^-14 relative to 2^8: one bit beyond F = 13. At 2^-13 relative (tiny = 2^-5) they count.
    std::vector<double> a2(32, std::ldexp(1.0, -2)), b2(32, std::ldexp(1.0, -3));  // 2^-5
    a2[0] = b2[0] = 16.0;
    const Result r2 = run(Elem::E4M3, Elem::E4M3, a2, b2, 0.0f);
    CHECK(r2.exact == 256.96875f && r2.hopper == 256.96875f, "exact %.9g hopper %.9g", r2.exact, r2.hopper);
}

// BF16: round toward zero (hopper, F = 25 then RZ to FP32) vs nearest-even (exact).
static void test_rz_vs_rne_bf16() {
    const double t = std::ldexp(1.0, -12);
    std::vector<double> a = {1, t, t, t}, b = {1, t, t, t};  // 1 + 3 * 2^-24 = 1 + 1.5 ulp
    Result r = run(Elem::BF16, Elem::BF16, a, b, 0.0f);
    CHECK(r.exact == 1.0f + std::ldexp(1.0f, -22), "exact %.9g", r.exact);
    CHECK(r.hopper == 1.0f + std::ldexp(1.0f, -23), "hopper %.9g", r.hopper);
    for (auto& x : a) x = -x;
    r = run(Elem::BF16, Elem::BF16, a, b, 0.0f);
    CHECK(r.exact == -(1.0f + std::ldexp(1.0f, -22)), "exact %.9g", r.exact);
    CHECK(r.hopper == -(1.0f + std::ldexp(1.0f, -23)), "hopper (toward zero) %.9g", r.hopper);
    // Ties: 1 + 2^-24 is a tie -> even (1.0); with a sticky 2^-60 it rounds up. Hopper truncates both to 1.0.
    r = run(Elem::BF16, Elem::BF16, {1, t}, {1, t}, 0.0f);
    CHECK(r.exact == 1.0f && r.hopper == 1.0f, "tie: exact %.9g hopper %.9g", r.exact, r.hopper);
    const double u = std::ldexp(1.0, -30);
    r = run(Elem::BF16, Elem::BF16, {1, t, u}, {1, t, u}, 0.0f);
    CHECK(r.exact == 1.0f + std::ldexp(1.0f, -23), "tie + sticky: exact %.9g", r.exact);
    CHECK(r.hopper == 1.0f, "tie + sticky: hopper %.9g", r.hopper);
}

// The accumulator itself passes through the FP8 path's E8M13 rounding (toward zero) even with zero products.
static void test_accumulator_e8m13() {
    const float c = 1.0f + std::ldexp(1.0f, -20);
    std::vector<double> z(32, 0.0);
    Result r = run(Elem::E4M3, Elem::E4M3, z, z, c);
    CHECK(r.exact == c, "exact keeps c: %.9g", r.exact);
    CHECK(r.hopper == 1.0f, "fp8 hopper truncates c to 13 fraction bits: %.9g", r.hopper);
    const float c13 = 1.0f + std::ldexp(1.0f, -13);  // representable in E8M13: unchanged
    r = run(Elem::E4M3, Elem::E4M3, z, z, c13);
    CHECK(r.hopper == c13, "E8M13 value kept: %.9g", r.hopper);
    std::vector<double> z16(16, 0.0);
    r = run(Elem::BF16, Elem::BF16, z16, z16, c);
    CHECK(r.hopper == c, "bf16 hopper keeps f32 c: %.9g", r.hopper);
}

// Chained wgmma: K = 64 with 32-product blocks (FP8) is two T-FDPA steps, the first result feeding the second.
static void test_blocks() {
    std::vector<double> a(64), b(64);
    for (int i = 0; i < 64; ++i) {
        a[i] = std::ldexp(1.0 + (i % 8) / 8.0, (i * 5) % 9 - 4);
        b[i] = std::ldexp(1.0 + ((i * 3) % 8) / 8.0, (i * 7) % 7 - 3) * (i % 3 ? 1 : -1);
    }
    std::vector<SigExp> sa, sb;
    for (double x : a) sa.push_back(frexp_normalize(x, -6));
    for (double x : b) sb.push_back(frexp_normalize(x, -6));
    const TfdpaParams p = hopper_wgmma_params(Elem::E4M3, Elem::E4M3);
    CHECK(p.F == 13 && p.L_max == 32 && p.rho == Rounding::RZ_E8M13 && p.e_zero == -133, "fp8 params");
    const TfdpaParams q = hopper_wgmma_params(Elem::BF16, Elem::BF16);
    CHECK(q.F == 25 && q.L_max == 16 && q.rho == Rounding::RZ_FP32 && q.e_zero == -133, "bf16 params");
    const float step1 = t_fdpa(sa.data(), sb.data(), 32, 0.5f, p);
    const float step2 = t_fdpa(sa.data() + 32, sb.data() + 32, 32, step1, p);
    CHECK(bits(dot_hopper(sa.data(), sb.data(), 64, 0.5f, p)) == bits(step2), "two blocks chain");
}

// Subnormal results and underflow.
static void test_subnormal() {
    const double t = std::ldexp(1.0, -70);
    std::vector<double> a(16, 0.0), b(16, 0.0);
    a[0] = b[0] = t;  // 2^-140: an f32 subnormal
    Result r = run(Elem::BF16, Elem::BF16, a, b, 0.0f);
    CHECK(r.exact == std::ldexp(1.0f, -140), "exact %g", r.exact);
    CHECK(r.hopper == std::ldexp(1.0f, -140), "hopper %g", r.hopper);
    a[0] = b[0] = std::ldexp(1.0, -76);  // 2^-152: below the smallest f32 subnormal 2^-149
    r = run(Elem::BF16, Elem::BF16, a, b, 0.0f);
    CHECK(r.exact == 0.0f && r.hopper == 0.0f, "underflow: exact %g hopper %g", r.exact, r.hopper);
    a[0] = std::ldexp(3.0, -76);  // 3 * 2^-152 = 0.375 * 2^-149: rounds to 0 (RNE), RZ 0
    b[0] = std::ldexp(1.0, -76);
    a[1] = b[1] = std::ldexp(1.0, -75);  // + 2^-150 -> total 0.625 * 2^-149: RNE 2^-149, RZ 0
    r = run(Elem::BF16, Elem::BF16, a, b, 0.0f);
    CHECK(r.exact == std::ldexp(1.0f, -149), "exact rounds up to min subnormal: %g", r.exact);
    CHECK(r.hopper == 0.0f, "hopper truncates to 0: %g", r.hopper);
}

// Overflow: just past FLT_MAX. Exact (RNE) gives Inf, the hopper model (RZ) gives FLT_MAX.
static void test_overflow() {
    const double w = 1.0 - std::ldexp(1.0, -8);  // bf16 0x3F7F
    std::vector<double> a = {std::ldexp(1.0, 127), std::ldexp(1.0, 127), std::ldexp(1.0, 119), std::ldexp(1.0, 111)};
    std::vector<double> b = {1.0, w, w, w};  // sum = 2^128 - 2^103, halfway between FLT_MAX and 2^128
    Result r = run(Elem::BF16, Elem::BF16, a, b, 0.0f);
    CHECK(std::isinf(r.exact) && r.exact > 0, "exact -> +Inf: %g", r.exact);
    CHECK(r.hopper == std::numeric_limits<float>::max(), "hopper -> FLT_MAX: %g", r.hopper);
    r = run(Elem::BF16, Elem::BF16, {std::ldexp(1.0, 127)}, {2.0}, 0.0f);  // exactly 2^128
    CHECK(std::isinf(r.exact) && std::isinf(r.hopper), "2^128 -> Inf in both: %g %g", r.exact, r.hopper);
}

// Zeros, NaN and Inf.
static void test_specials() {
    const double inf = std::numeric_limits<double>::infinity();
    std::vector<double> z(16, 0.0), nz(16, -0.0);
    Result r = run(Elem::BF16, Elem::BF16, z, nz, -0.0f);
    CHECK(bits(r.exact) == 0 && bits(r.hopper) == 0, "zero sum is +0: %08x %08x", bits(r.exact), bits(r.hopper));
    std::vector<double> a(32, 1.0), b(32, 1.0);
    a[5] = decode(Elem::E4M3, 0x7F);
    r = run(Elem::E4M3, Elem::E4M3, a, b, 1.0f);
    CHECK(bits(r.exact) == 0x7FFFFFFF && bits(r.hopper) == 0x7FFFFFFF, "e4m3 NaN input: %08x %08x", bits(r.exact),
          bits(r.hopper));
    r = run(Elem::BF16, Elem::BF16, {inf, 1.0}, {0.0, 1.0}, 0.0f);
    CHECK(bits(r.exact) == 0x7FFFFFFF && bits(r.hopper) == 0x7FFFFFFF, "Inf * 0: %08x %08x", bits(r.exact),
          bits(r.hopper));
    r = run(Elem::BF16, Elem::BF16, {inf, -inf}, {1.0, 1.0}, 0.0f);
    CHECK(bits(r.exact) == 0x7FFFFFFF && bits(r.hopper) == 0x7FFFFFFF, "Inf - Inf");
    r = run(Elem::BF16, Elem::BF16, {inf, 3.0}, {1.0, 1.0}, -5.0f);
    CHECK(r.exact == INFINITY && r.hopper == INFINITY, "Inf + finite: %g %g", r.exact, r.hopper);
    r = run(Elem::BF16, Elem::BF16, {1.0}, {1.0}, -INFINITY);
    CHECK(r.exact == -INFINITY && r.hopper == -INFINITY, "c = -Inf: %g %g", r.exact, r.hopper);
    r = run(Elem::BF16, Elem::BF16, {1.0}, {1.0}, from_bits(0x7FC00001));
    CHECK(bits(r.exact) == 0x7FFFFFFF && bits(r.hopper) == 0x7FFFFFFF, "NaN c canonicalized");
}

// Cancellation: 2^10 - 2^10 + small. Exact and hopper agree when nothing is truncated; hopper loses the small
// term when it is more than F bits below the cancelled large ones (alignment happens before the sum).
static void test_cancellation() {
    std::vector<double> a(32, 0.0), b(32, 0.0);
    a[0] = 32; b[0] = 32;    // +1024
    a[1] = -32; b[1] = 32;   // -1024
    a[2] = 0.0625; b[2] = 0.0625;  // 2^-8: 2^-18 relative to 2^10 -> truncated in hopper (F = 13)
    Result r = run(Elem::E4M3, Elem::E4M3, a, b, 0.0f);
    CHECK(r.exact == 0.00390625f, "exact %g", r.exact);
    CHECK(r.hopper == 0.0f, "hopper %g", r.hopper);
    a[2] = 1; b[2] = 0.5;   // 2^-1: 2^-11 relative: kept
    r = run(Elem::E4M3, Elem::E4M3, a, b, 0.0f);
    CHECK(r.exact == 0.5f && r.hopper == 0.5f, "exact %g hopper %g", r.exact, r.hopper);
}

// The exact mode's three summation paths: a 64-bit window (small integers), a 128-bit window, and the full-range
// accumulator (terms more than 126 bits apart), each with round-to-nearest-even.
static void test_exact_paths() {
    Result r = run(Elem::BF16, Elem::BF16, {3, 7, 100}, {5, -2, 1}, 1.0f);  // 15 - 14 + 100 + 1
    CHECK(r.exact == 102.0f && r.hopper == 102.0f, "integers: exact %g hopper %g", r.exact, r.hopper);
    r = run(Elem::BF16, Elem::BF16, {std::ldexp(1.0, 100), 1.0}, {1.0, 1.0}, 0.0f);  // 2^100 + 1: 101-bit window
    CHECK(r.exact == std::ldexp(1.0f, 100), "2^100 + 1 -> 2^100: %g", r.exact);
    const double t = std::ldexp(1.0, -12), u = std::ldexp(1.0, -65);
    // 1 + 2^-24 (a tie) + 2^-130 (sticky): terms 130 bits apart -> full-range accumulator; rounds up.
    r = run(Elem::BF16, Elem::BF16, {1, t, u}, {1, t, u}, 0.0f);
    CHECK(r.exact == 1.0f + std::ldexp(1.0f, -23), "wide sticky: %.9g", r.exact);
    // Same without the sticky bit but with a far negative term: -2^-130 makes it just below the tie -> 1.0.
    r = run(Elem::BF16, Elem::BF16, {1, t, -u}, {1, t, u}, 0.0f);
    CHECK(r.exact == 1.0f, "wide below tie: %.9g", r.exact);
    // Exact cancellation to zero across a wide range gives +0.
    const double big = std::ldexp(1.0, 120);
    r = run(Elem::BF16, Elem::BF16, {big, -big, u}, {1, 1, -u}, std::ldexp(1.0f, -130));
    CHECK(bits(r.exact) == 0, "wide cancellation: %g", r.exact);
}

int main() {
    test_decode();
    test_frexp_normalize();
    test_large_plus_tiny_fp8();
    test_rz_vs_rne_bf16();
    test_accumulator_e8m13();
    test_blocks();
    test_subnormal();
    test_overflow();
    test_specials();
    test_cancellation();
    test_exact_paths();
    std::printf("numerics_test: %d checks, %d passed, %d failed\n", g_checks, g_checks - g_failures, g_failures);
    std::printf("%d passed, %d failed\n", g_checks - g_failures, g_failures);
    return g_failures ? 1 : 0;
}
