// Shared MoE device helpers (segment lookup of the grouped GEMMs). Rust twins: the tests in src/moe.rs.
#pragma once
#include <stdint.h>

namespace r1k {

// Last e in [0, num_experts] with offsets[e] <= row (offsets[0] == 0 <= row). e == num_experts: past the end.
__device__ __forceinline__ int moe_find_segment(const long long* __restrict__ offsets, int num_experts, long long row) {
    int lo = 0, hi = num_experts;
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (offsets[mid] <= row) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    return lo;
}

// End of the valid rows of segment e, bounded by the segment's capacity and by the buffer's rows.
__device__ __forceinline__ long long moe_segment_valid_end(const long long* __restrict__ offsets,
                                                          const int* __restrict__ counts, int e, long long rows) {
    const long long start = offsets[e];
    const long long cap = offsets[e + 1] - start;
    const long long cnt = min(static_cast<long long>(max(counts[e], 0)), cap);
    return min(start + cnt, rows);
}

// exp(x) in f32 from explicit single-rounding steps (Cody-Waite reduction, degree-7 Taylor/Horner in fmaf), so the
// Rust twin reference::moe::exp_f32 gives the same bits: the router's scores and SwiGLU's silu then match the CPU
// reference exactly. Accuracy ~2 ulp on [-87, 88]; below -87 it returns 0, above 88 +inf, NaN stays NaN.
__device__ __forceinline__ float moe_expf(float x) {
    if (x != x) return x;
    if (x > 88.0f) return __int_as_float(0x7f800000);
    if (x < -87.0f) return 0.0f;
    const float n = rintf(__fmul_rn(x, __int_as_float(0x3fb8aa3b)));  // log2(e)
    float r = fmaf(-n, __int_as_float(0x3f317200), x);                 // ln 2, high 16 bits (exact products)
    r = fmaf(-n, __int_as_float(0x35bfbe8e), r);                       // ln 2, remainder
    float p = 1.0f / 5040.0f;
    p = fmaf(p, r, 1.0f / 720.0f);
    p = fmaf(p, r, 1.0f / 120.0f);
    p = fmaf(p, r, 1.0f / 24.0f);
    p = fmaf(p, r, 1.0f / 6.0f);
    p = fmaf(p, r, 0.5f);
    p = fmaf(p, r, 1.0f);
    p = fmaf(p, r, 1.0f);
    return __fmul_rn(p, __int_as_float((static_cast<int>(n) + 127) << 23));
}

}  // namespace r1k
