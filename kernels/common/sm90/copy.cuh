// sm_90a copies into shared memory: TMA tensor loads (plain and cluster-multicast) completing on an mbarrier, and
// the cp.async 16-byte copy of kernels without tensor maps. One argument order everywhere: destination, tensor map,
// barrier, then coordinates (inner first).
#pragma once
#include <cuda.h>
#include <stdint.h>

#include "common/sm90/sync.cuh"

namespace r1k {
namespace sm90 {

// Pulls a tensor map (a `const __grid_constant__ CUtensorMap` parameter) into the descriptor cache ahead of its
// first load.
__device__ __forceinline__ void tma_prefetch_desc(const CUtensorMap* map) {
    asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}

// 2-D TMA load of one box at (x = inner coordinate, y = outer) into shared memory; the box's bytes complete as
// transactions on `bar`. Box elements outside the tensor are zero-filled.
__device__ __forceinline__ void tma_load_2d(void* dst, const CUtensorMap* map, uint64_t* bar, int32_t x, int32_t y) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];" ::
            "r"(smem_u32(dst)),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(x), "r"(y), "r"(smem_u32(bar))
        : "memory");
}

// 2-D TMA load multicast to every CTA in `cta_mask`: the box lands at the same shared-memory offset in each, and
// completes its bytes on the mbarrier at the same offset in each.
__device__ __forceinline__ void tma_load_2d_multicast(void* dst, const CUtensorMap* map, uint64_t* bar, int32_t x,
                                                      int32_t y, uint16_t cta_mask) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster"
        " [%0], [%1, {%2, %3}], [%4], %5;" ::"r"(smem_u32(dst)),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(x), "r"(y), "r"(smem_u32(bar)), "h"(cta_mask)
        : "memory");
}

// 16-byte asynchronous copy global → shared (shared-window address `dst`) of which the first `src_bytes` (0 or 16)
// come from `src` and the rest are zero-filled; tracked by cp.async groups, not by an mbarrier.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
// Waits until at most N of this thread's committed cp.async groups are pending.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

}  // namespace sm90
}  // namespace r1k
