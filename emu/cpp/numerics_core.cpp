// See numerics_core.h. The hopper mode follows MMA-Sim 2.1.1 (microsoft/MMA-Sim) line by line in meaning:
// fdpa.py frexp_and_normalize -> frexp_normalize, t_fdpa + truncated_fused_sum -> t_fdpa, ldexp_and_normalize ->
// ldexp_normalize_rz, MMA_T_FDPA.dpa -> dot_hopper; sim.py class WGMMA -> hopper_wgmma_params.
#include "numerics_core.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace r1k_emu {
namespace mma_numerics {

namespace {

float f32_from_bits(uint32_t b) {
    float f;
    std::memcpy(&f, &b, 4);
    return f;
}

// The canonical NaN MMA-Sim writes for f32 results (ldexp_and_normalize: res[nans] = 0x7FFFFFFF).
float canonical_nan() { return f32_from_bits(0x7FFFFFFFu); }

// 2^n as a double, built from the exponent bits when n is a normal exponent (this is on the hot path of both
// modes; std::ldexp is a library call).
inline double pow2(int n) {
    if (n >= -1022 && n <= 1023) {
        const uint64_t b = static_cast<uint64_t>(n + 1023) << 52;
        double d;
        std::memcpy(&d, &b, 8);
        return d;
    }
    return std::ldexp(1.0, n);
}

// std::trunc for the aligned terms of the fused sum (|x| < 2^62 when finite): a conversion to int64 truncates
// toward zero exactly; NaN and Inf pass through as torch.trunc passes them.
inline double trunc_small(double x) {
    if (!std::isfinite(x)) return x;
    return static_cast<double>(static_cast<int64_t>(x));
}

// Converts a double that is already exactly representable in f32 (or beyond the f32 range) to f32: overflow gives
// +-Inf, as torch's double -> float32 conversion does in MMA-Sim.
float to_f32_exact(double x) {
    if (std::isnan(x)) return canonical_nan();
    if (std::fabs(x) >= pow2(128)) return std::copysign(std::numeric_limits<float>::infinity(), x);
    return static_cast<float>(x);
}

}  // namespace

int elem_bytes(Elem t) { return (t == Elem::E4M3 || t == Elem::E5M2) ? 1 : 2; }

const char* elem_name(Elem t) {
    switch (t) {
        case Elem::E4M3: return "e4m3";
        case Elem::E5M2: return "e5m2";
        case Elem::BF16: return "bf16";
        case Elem::F16: return "f16";
    }
    return "?";
}

double decode(Elem t, uint32_t bits) {
    const double inf = std::numeric_limits<double>::infinity();
    const double nan = std::numeric_limits<double>::quiet_NaN();
    switch (t) {
        case Elem::E4M3: {  // 1-4-3, bias 7, no Inf, S.1111.111 = NaN (OCP E4M3 "fn")
            const bool neg = bits & 0x80;
            const int e = (bits >> 3) & 0xF, m = bits & 0x7;
            double v;
            if (e == 15 && m == 7) return nan;
            if (e == 0) v = std::ldexp(m, -9);  // subnormal: m/8 * 2^(1-7)
            else v = std::ldexp(8 + m, e - 7 - 3);
            return neg ? -v : v;
        }
        case Elem::E5M2: {  // 1-5-2, bias 15, IEEE-style Inf/NaN
            const bool neg = bits & 0x80;
            const int e = (bits >> 2) & 0x1F, m = bits & 0x3;
            double v;
            if (e == 31) v = m ? nan : inf;
            else if (e == 0) v = std::ldexp(m, -16);  // m/4 * 2^(1-15)
            else v = std::ldexp(4 + m, e - 15 - 2);
            return neg ? -v : v;
        }
        case Elem::BF16: return static_cast<double>(f32_from_bits((bits & 0xFFFFu) << 16));
        case Elem::F16: {  // 1-5-10, bias 15
            const bool neg = bits & 0x8000;
            const int e = (bits >> 10) & 0x1F, m = bits & 0x3FF;
            double v;
            if (e == 31) v = m ? nan : inf;
            else if (e == 0) v = std::ldexp(m, -24);
            else v = std::ldexp(1024 + m, e - 15 - 10);
            return neg ? -v : v;
        }
    }
    return nan;
}

// ------------------------------------------------------------------------------------------------------------
// exact mode
// ------------------------------------------------------------------------------------------------------------
namespace {

// Fixed-point magnitude accumulator covering every finite double: bit i has weight 2^(i + kLsbExp). Positive and
// negative terms go to separate accumulators so additions only ever carry upwards over few limbs.
constexpr int kLsbExp = -1127;  // below the smallest double's last bit (2^-1074), with margin
constexpr int kLimbs = 38;      // 2432 bits: up to 2^1304, beyond the largest double plus carries
struct Magnitude {
    uint64_t w[kLimbs] = {};
    void add(uint64_t mant, int shift) {  // adds mant * 2^shift (shift >= 0, in accumulator bits)
        int li = shift / 64;
        const int bi = shift % 64;
        unsigned __int128 v = static_cast<unsigned __int128>(mant) << bi;
        while (v != 0 && li < kLimbs) {
            const unsigned __int128 s = static_cast<unsigned __int128>(w[li]) + static_cast<uint64_t>(v);
            w[li] = static_cast<uint64_t>(s);
            v = (v >> 64) + (s >> 64);
            ++li;
        }
    }
    bool bit(int i) const { return (w[i / 64] >> (i % 64)) & 1; }
    int top_bit() const {  // -1 when zero
        for (int li = kLimbs - 1; li >= 0; --li)
            if (w[li]) return li * 64 + 63 - __builtin_clzll(w[li]);
        return -1;
    }
    bool any_below(int i) const {  // any set bit in [0, i)
        if (i <= 0) return false;
        for (int li = 0; li < i / 64; ++li)
            if (w[li]) return true;
        const int r = i % 64;
        return r && (w[i / 64] & ((uint64_t(1) << r) - 1));
    }
};

int compare(const Magnitude& a, const Magnitude& b) {
    for (int li = kLimbs - 1; li >= 0; --li)
        if (a.w[li] != b.w[li]) return a.w[li] < b.w[li] ? -1 : 1;
    return 0;
}

Magnitude subtract(const Magnitude& a, const Magnitude& b) {  // a - b, a >= b
    Magnitude r;
    uint64_t borrow = 0;
    for (int li = 0; li < kLimbs; ++li) {
        const unsigned __int128 d = static_cast<unsigned __int128>(a.w[li]) - b.w[li] - borrow;
        r.w[li] = static_cast<uint64_t>(d);
        borrow = (d >> 64) ? 1 : 0;
    }
    return r;
}

// Round-to-nearest-even of (sign, magnitude) to f32, including subnormals and overflow to Inf.
float round_to_f32(bool negative, const Magnitude& mag) {
    const int p = mag.top_bit();
    if (p < 0) return 0.0f;
    const int e = p + kLsbExp;                        // value in [2^e, 2^(e+1))
    const int lsb_exp = std::max(e - 23, -149);       // f32 ulp at this binade (subnormal ulp is 2^-149)
    const int l = lsb_exp - kLsbExp;                  // accumulator index of that ulp, > 0
    uint64_t mant = 0;
    for (int i = p; i >= l; --i) mant = (mant << 1) | mag.bit(i);
    const bool guard = mag.bit(l - 1);
    const bool sticky = mag.any_below(l - 1);
    if (guard && (sticky || (mant & 1))) ++mant;      // may carry to 2^24: still exact in double below
    const float r = to_f32_exact(std::ldexp(static_cast<double>(mant), lsb_exp));
    return negative ? -r : r;
}

// A finite non-zero double as (-1)^neg * mant * 2^lsb with mant odd (read from the bits, no library call).
struct Term {
    uint64_t mant;
    int lsb;
    bool neg;
};
Term decompose(double x) {
    uint64_t b;
    std::memcpy(&b, &x, 8);
    Term t;
    t.neg = b >> 63;
    const int ef = static_cast<int>((b >> 52) & 0x7FF);
    uint64_t m = b & ((uint64_t(1) << 52) - 1);
    if (ef) {
        m |= uint64_t(1) << 52;
        t.lsb = ef - 1075;
    } else {
        t.lsb = -1074;  // subnormal double
    }
    const int tz = __builtin_ctzll(m);
    t.mant = m >> tz;
    t.lsb += tz;
    return t;
}

int bit_length(unsigned __int128 u) {
    const uint64_t hi = static_cast<uint64_t>(u >> 64), lo = static_cast<uint64_t>(u);
    if (hi) return 128 - __builtin_clzll(hi);
    return lo ? 64 - __builtin_clzll(lo) : 0;
}

// Round-to-nearest-even of S * 2^lsb0 to f32 (S a 128-bit integer).
float round_int128_to_f32(__int128 s, int lsb0) {
    if (s == 0) return 0.0f;
    const bool negative = s < 0;
    const unsigned __int128 u = negative ? -static_cast<unsigned __int128>(s) : static_cast<unsigned __int128>(s);
    const int e = bit_length(u) - 1 + lsb0;     // value in [2^e, 2^(e+1))
    const int lsb_exp = std::max(e - 23, -149);  // f32 ulp at this binade
    const int shift = lsb_exp - lsb0;
    uint64_t mant;
    if (shift <= 0) {
        mant = static_cast<uint64_t>(u);  // coarser than the f32 ulp: exactly representable (< 2^24)
    } else if (shift >= 128) {
        return 0.0f;                                // below half the smallest subnormal: rounds to 0
    } else {
        mant = static_cast<uint64_t>(u >> shift);
        const bool guard = (u >> (shift - 1)) & 1;
        const bool sticky = (u & ((static_cast<unsigned __int128>(1) << (shift - 1)) - 1)) != 0;
        if (guard && (sticky || (mant & 1))) ++mant;
    }
    const float r = to_f32_exact(std::ldexp(static_cast<double>(mant), shift <= 0 ? lsb0 : lsb_exp));
    return negative ? -r : r;
}

}  // namespace

float dot_exact(const double* a, const double* b, int k, float c) {
    bool nan = std::isnan(c), pos_inf = std::isinf(c) && c > 0, neg_inf = std::isinf(c) && c < 0;
    Term terms[129];
    Term* heap_terms = nullptr;
    std::vector<Term> big;
    if (k + 1 > 129) {
        big.resize(static_cast<size_t>(k) + 1);
        heap_terms = big.data();
    }
    Term* t = heap_terms ? heap_terms : terms;
    int n = 0;
    for (int i = 0; i < k; ++i) {
        // Exact for every wgmma input type: at most 11 x 11 significant bits, exponents far inside double range.
        const double p = a[i] * b[i];
        if (std::isnan(p)) nan = true;  // NaN input or Inf * 0
        else if (std::isinf(p)) (p > 0 ? pos_inf : neg_inf) = true;
        else if (p != 0) t[n++] = decompose(p);
    }
    if (nan || (pos_inf && neg_inf)) return canonical_nan();
    if (pos_inf) return std::numeric_limits<float>::infinity();
    if (neg_inf) return -std::numeric_limits<float>::infinity();
    if (c != 0) t[n++] = decompose(static_cast<double>(c));
    if (n == 0) return 0.0f;
    // Fast paths: every term fits one 64- or 128-bit fixed-point window (the usual case for FP8 and bf16 data);
    // otherwise the full-range accumulator.
    int lo = INT_MAX, hi = INT_MIN;
    for (int i = 0; i < n; ++i) {
        lo = std::min(lo, t[i].lsb);
        hi = std::max(hi, t[i].lsb + 63 - __builtin_clzll(t[i].mant));
    }
    const int span = (hi - lo + 1) + bit_length(static_cast<unsigned __int128>(n));
    if (span <= 62) {
        int64_t sum = 0;
        for (int i = 0; i < n; ++i) {
            const int64_t v = static_cast<int64_t>(t[i].mant << (t[i].lsb - lo));
            sum += t[i].neg ? -v : v;
        }
        return round_int128_to_f32(sum, lo);
    }
    if (span <= 126) {
        __int128 sum = 0;
        for (int i = 0; i < n; ++i) {
            const __int128 v = static_cast<__int128>(static_cast<unsigned __int128>(t[i].mant) << (t[i].lsb - lo));
            sum += t[i].neg ? -v : v;
        }
        return round_int128_to_f32(sum, lo);
    }
    // General path: the full-range accumulator.
    Magnitude pos, neg;
    for (int i = 0; i < n; ++i) (t[i].neg ? neg : pos).add(t[i].mant, t[i].lsb - kLsbExp);
    const int cmp = compare(pos, neg);
    if (cmp == 0) return 0.0f;
    return cmp > 0 ? round_to_f32(false, subtract(pos, neg)) : round_to_f32(true, subtract(neg, pos));
}

// ------------------------------------------------------------------------------------------------------------
// hopper mode: MMA-Sim T-FDPA
// ------------------------------------------------------------------------------------------------------------

int subnormal_exponent(Elem t) {
    // helper.py dtype_subnormal_exponent: float8_e4m3fn -6, float8_e5m2 -14, bfloat16 -126, float16 -14.
    switch (t) {
        case Elem::E4M3: return -6;
        case Elem::E5M2: return -14;
        case Elem::BF16: return -126;
        case Elem::F16: return -14;
    }
    return -126;
}

SigExp frexp_normalize(double x, int e_sub) {
    int e = 0;
    double s;
    uint64_t b;
    std::memcpy(&b, &x, 8);
    const int ef = static_cast<int>((b >> 52) & 0x7FF);
    if (ef != 0 && ef != 0x7FF) {  // normal double: std::frexp's result straight from the bits
        e = ef - 1022;
        b = (b & ~(uint64_t(0x7FF) << 52)) | (uint64_t(1022) << 52);
        std::memcpy(&s, &b, 8);
    } else {
        s = std::frexp(x, &e);  // glibc (like torch.frexp) gives exponent 0 for zero, Inf and NaN
    }
    s *= 2;
    e -= 1;                        // 1 <= |s| < 2
    if (e < e_sub) {               // subnormal: keep the type's minimum exponent, shrink the significand
        s *= pow2(e - e_sub);
        e = e_sub;
    }
    if (s == 0.0) e = e_sub;
    return {s, e};
}

TfdpaParams hopper_wgmma_params(Elem a, Elem /*b*/) {
    // sim.py WGMMA.__init__ for .dtype = .f32: FP8 (a_type e4m3/e5m2) -> F = 13, rho = "RZ-E8M13"; otherwise
    // F = 25, rho = "RZ-FP32"; L_max = 32 // a_type.itemsize; e_zero = -133 (f32 output).
    const bool fp8 = a == Elem::E4M3 || a == Elem::E5M2;
    TfdpaParams p;
    p.F = fp8 ? 13 : 25;
    p.rho = fp8 ? Rounding::RZ_E8M13 : Rounding::RZ_FP32;
    p.L_max = 32 / elem_bytes(a);
    p.e_zero = -133;
    return p;
}

namespace {

// fdpa.py ldexp_and_normalize for the RZ variants: value = sum * 2^e_max, renormalized with f32's minimum exponent
// (-126), significand truncated to 13 (E8M13) or 23 (FP32) fraction bits, converted to f32 (overflow -> Inf),
// NaN -> 0x7FFFFFFF.
float ldexp_normalize_rz(double sum, int e_max, Rounding rho) {
    const double v = sum * pow2(e_max);  // exact: sum has few bits, e_max is far inside double range
    const SigExp n = frexp_normalize(v, -126);
    const double scale = pow2(rho == Rounding::RZ_E8M13 ? 13 : 23);
    const double s = trunc_small(n.s * scale) / scale;  // round toward zero
    return to_f32_exact(s * pow2(n.e));
}

}  // namespace

float t_fdpa(const SigExp* a, const SigExp* b, int n, float c, const TfdpaParams& p) {
    // Terms: the n products (significands multiplied, exponents added) and the accumulator c.
    std::vector<double> s_heap;
    std::vector<int> e_heap;
    double s_stack[65];
    int e_stack[65];
    double* s = s_stack;
    int* e = e_stack;
    if (n > 64) {  // wgmma passes at most L_max (<= 32) products
        s_heap.resize(static_cast<size_t>(n) + 1);
        e_heap.resize(static_cast<size_t>(n) + 1);
        s = s_heap.data();
        e = e_heap.data();
    }
    for (int i = 0; i < n; ++i) {
        s[i] = a[i].s * b[i].s;  // exact (<= 24 significant bits), Inf * 0 -> NaN as in torch
        e[i] = a[i].e + b[i].e;
    }
    const SigExp sc = frexp_normalize(static_cast<double>(c), -126);  // c is f32: minimum exponent -126
    s[n] = sc.s;
    e[n] = sc.e;
    for (int i = 0; i <= n; ++i)
        if (s[i] == 0.0) e[i] = p.e_zero;  // "handle zero" (NaN compares unequal and keeps its exponent)
    int e_max = INT_MIN;
    for (int i = 0; i <= n; ++i) e_max = std::max(e_max, e[i]);
    // truncated_fused_sum: align every term to e_max keeping F fraction bits (truncation toward zero), then add
    // (exactly: each term is a multiple of 2^-F below 4 in magnitude).
    double sum = 0.0;
    const double ulp = pow2(-p.F);
    for (int i = 0; i <= n; ++i) sum += trunc_small(s[i] * pow2(e[i] - e_max + p.F)) * ulp;
    const float r = ldexp_normalize_rz(sum, e_max, p.rho);
    if (std::isnan(r)) return canonical_nan();
    return r + 0.0f;  // -0.0 -> +0.0, as t_fdpa does
}

float dot_hopper(const SigExp* a, const SigExp* b, int k, float c, const TfdpaParams& p) {
    if (k <= 0) return c;
    const int step = std::min(k, p.L_max);
    for (int i = 0; i < k; i += step) c = t_fdpa(a + i, b + i, std::min(step, k - i), c, p);
    return c;
}

}  // namespace mma_numerics
}  // namespace r1k_emu
