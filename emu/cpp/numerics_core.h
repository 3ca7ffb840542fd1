// Tensor-core dot-product numerics for the wgmma model: element decoding and the two accumulation modes.
//
//   * exact:  d = round_to_nearest_even_f32( exact sum of all products + c ). Products of fp8/bf16/f16 inputs are
//             exact in double; the sum is formed exactly in a wide fixed-point accumulator and rounded once. This
//             answers "is the algorithm right" without any accumulation error.
//   * hopper: MMA-Sim's model of Hopper wgmma (microsoft/MMA-Sim, PyPI mmasim 2.1.1, arXiv 2511.10909, reported
//             bit-identical to H100/H200): a truncated fused dot-product-accumulate, T-FDPA
//             (src/mmasim/mmasim/arithmetic/fdpa.py: t_fdpa, truncated_fused_sum, frexp_and_normalize,
//             ldexp_and_normalize; parameters in src/mmasim/mmasim/nv_ptx/sim.py, class WGMMA). Ported from the
//             algorithm, checked bit for bit against the Python original by emu/scripts/check-numerics-mmasim.
//
// The PTX ISA itself leaves this open ("wgmma.mma_async", Precision and rounding: "The accumulation order,
// rounding and handling of subnormal inputs are unspecified"), so the hopper mode is an empirical model, not an
// ISA rule. Pure code: no dependency on the execution engine.
#pragma once
#include <cstdint>

namespace r1k_emu {
namespace mma_numerics {

// Input element types of wgmma's floating-point variants (PTX ISA "wgmma.mma_async", .atype/.btype).
enum class Elem { E4M3, E5M2, BF16, F16 };

int elem_bytes(Elem t);
const char* elem_name(Elem t);
// Exact value of an element's bit pattern (low 8 or 16 bits of `bits`). NaN and +-Inf are kept. E4M3 is the
// OCP "fn" variant the PTX .e4m3 type uses: no infinities, S.1111.111 is NaN.
double decode(Elem t, uint32_t bits);

enum class Mode { Exact, Hopper };

// ---- exact mode ----
// round_to_nearest_even_f32(sum_i a[i]*b[i] + c) computed exactly. Any NaN (including Inf*0 and +Inf + -Inf)
// gives the canonical NaN 0x7FFFFFFF; an exact zero sum gives +0.
float dot_exact(const double* a, const double* b, int k, float c);

// ---- hopper mode (MMA-Sim T-FDPA) ----
// MMA-Sim's frexp_and_normalize: x = s * 2^e with 1 <= |s| < 2 for normal values; values below the type's
// smallest normal exponent e_sub keep e = e_sub and a smaller |s| (subnormal form); zero has s = 0, e = e_sub;
// Inf/NaN have s = x and e = -1 (std::frexp reports exponent 0 for them, as torch.frexp does).
struct SigExp {
    double s;
    int e;
};
SigExp frexp_normalize(double x, int e_sub);
// MMA-Sim helper.dtype_subnormal_exponent: the exponent of the smallest normal number of the type.
int subnormal_exponent(Elem t);

enum class Rounding { RZ_E8M13, RZ_FP32 };
struct TfdpaParams {
    int F;           // fraction bits kept (by truncation) when every term is aligned to the largest exponent
    Rounding rho;    // final rounding of the fused sum
    int L_max;       // products fused per step; longer dot products chain steps through the accumulator
    int e_zero;      // exponent given to zero terms; it takes part in the alignment to the largest exponent, so
                     // it matters when every non-zero term lies below 2^e_zero
};
// sim.py class WGMMA for an f32 accumulator: FP8 inputs F = 13, RZ to E8M13, L_max = 32; 16-bit inputs F = 25,
// RZ to FP32, L_max = 16; e_zero = -133.
TfdpaParams hopper_wgmma_params(Elem a, Elem b);

// One T-FDPA step (fdpa.py t_fdpa) over n <= L_max pre-normalized product inputs, fused with accumulator c.
float t_fdpa(const SigExp* a, const SigExp* b, int n, float c, const TfdpaParams& p);
// MMA_T_FDPA.dpa: the k products in steps of L_max, each step's result feeding the next as c.
float dot_hopper(const SigExp* a, const SigExp* b, int k, float c, const TfdpaParams& p);

}  // namespace mma_numerics
}  // namespace r1k_emu
