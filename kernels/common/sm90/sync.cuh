// sm_90a synchronization primitives shared by every Hopper kernel of the crate: shared-memory addresses, mbarriers
// (with the hang trap), proxy fences, named barriers and the 2-CTA cluster operations. Semantics per the PTX ISA
// ("mbarrier", "membar/fence", "barrier.cluster"); the probes in kernels/probes_sm90.cu exercise exactly these
// functions. Only include from sm_90a-only kernel files (never from a `// r1k: portable` one).
#pragma once
#include <stdint.h>

namespace r1k {
namespace sm90 {

// Shared-window address of a generic pointer into shared memory (what every `.shared` operand takes).
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// ---- mbarriers --------------------------------------------------------------------------------------------------

__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t arrivals) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(bar)), "r"(arrivals) : "memory");
}

// After the initializing thread's mbar_init calls, before the barrier is shared: makes the initialized barriers
// visible at cluster scope (a peer CTA may arrive on them) and to the async proxy (TMA completes transactions on
// them). Follow it with a CTA or cluster barrier.
__device__ __forceinline__ void mbar_init_fence() {
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

// Arrives and announces `bytes` of transactions (TMA loads) that complete the current phase together with the
// arrivals.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(bar)), "r"(bytes) : "memory");
}

__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_u32(bar)) : "memory");
}

// Arrives on the mbarrier at the same shared-memory offset in cluster CTA `rank` (release at cluster scope).
__device__ __forceinline__ void mbar_arrive_cluster(uint64_t* bar, uint32_t rank) {
    uint32_t remote;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(smem_u32(bar)), "r"(rank));
    asm volatile("mbarrier.arrive.release.cluster.shared::cluster.b64 _, [%0];" ::"r"(remote) : "memory");
}

// 1 once the phase with parity `parity` has completed, else 0 (after the hardware's bounded suspend).
__device__ __forceinline__ uint32_t mbar_try_wait(uint64_t* bar, uint32_t parity) {
    uint32_t done;
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(smem_u32(bar)), "r"(parity)
        : "memory");
    return done;
}

__device__ __forceinline__ uint64_t global_timer_ns() {
    uint64_t t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

// No legitimate wait in these kernels takes more than microseconds: a wait still pending after this long is a bug (a
// lost arrive, a wrong transaction count or parity), so it traps and the launch fails with an error instead of
// hanging the device until the watchdog of whoever runs it.
constexpr uint64_t kHangTimeoutNs = 10ull * 1000 * 1000 * 1000;

// Waits until the phase with parity `parity` has completed; the timer is read once per 1024 polls.
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
    if (mbar_try_wait(bar, parity)) return;
    const uint64_t start = global_timer_ns();
    uint32_t polls = 0;
    while (!mbar_try_wait(bar, parity)) {
        if ((++polls & 1023u) == 0 && global_timer_ns() - start > kHangTimeoutNs) __trap();
    }
}

// ---- fences and barriers ----------------------------------------------------------------------------------------

// Orders this thread's generic-proxy shared-memory writes (st.shared, cp.async) before later async-proxy accesses
// (wgmma operand reads, TMA).
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }

// Named barrier `id` (1..15; 0 is __syncthreads) over `threads` threads, a multiple of 32.
__device__ __forceinline__ void named_barrier_sync(uint32_t id, uint32_t threads) {
    asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

// ---- clusters ---------------------------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t cluster_ctarank() {
    uint32_t r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
    return r;
}
__device__ __forceinline__ uint32_t cluster_id_x() {
    uint32_t r;
    asm volatile("mov.u32 %0, %%clusterid.x;" : "=r"(r));
    return r;
}
__device__ __forceinline__ uint32_t cluster_count_x() {
    uint32_t r;
    asm volatile("mov.u32 %0, %%nclusterid.x;" : "=r"(r));
    return r;
}

// Every thread of every CTA of the cluster arrives (release) and waits (acquire): orders mbarrier inits before any
// remote use, and keeps a CTA resident until its peers no longer write into its shared memory.
__device__ __forceinline__ void cluster_sync() {
    asm volatile("barrier.cluster.arrive.release;\nbarrier.cluster.wait.acquire;" ::: "memory");
}

// ---- registers --------------------------------------------------------------------------------------------------

// Warpgroup register reallocation (every warp of the warpgroup executes it with the same count).
template <uint32_t R>
__device__ __forceinline__ void setmaxnreg_inc() {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(R));
}
template <uint32_t R>
__device__ __forceinline__ void setmaxnreg_dec() {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(R));
}

}  // namespace sm90
}  // namespace r1k
