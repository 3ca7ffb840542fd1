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

}  // namespace r1k
