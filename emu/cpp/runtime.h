// The execution engine's internal API, used by the instruction models (ptx.cpp, tma.cpp, wgmma.cpp) and by the
// prelude the kernels are compiled with. One OS thread runs every GPU thread of a launch as a fiber; a fiber only
// switches at calls into this API, so none of this needs locks.
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>

namespace r1k_emu {

// ---- errors ----
// A launch-ending error: a PTX rule broken, an out-of-bounds access, a hang, a refusal where the ISA is silent.
struct LaunchError : std::runtime_error {
    using std::runtime_error::runtime_error;
};
// Throws LaunchError; the launch fails with CUDA_ERROR_LAUNCH_FAILED and this message plus where it happened.
[[noreturn]] void fail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
// Prints a warning to stderr once per distinct message.
void warn(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

// ---- configuration (read from the environment at each launch) ----
enum class Policy { Eager, Lazy, Random };  // R1K_EMU_POLICY: when asynchronous operations complete
enum class Numerics { Exact, Hopper };      // R1K_EMU_NUMERICS: wgmma accumulation
Policy policy();
Numerics numerics();
// Deterministic, seeded (R1K_EMU_SEED) random numbers for scheduling decisions.
uint64_t rng_next();

// ---- the executing thread ----
struct Cta;
struct Dim3 {
    uint32_t x, y, z;
};
Dim3 thread_idx();
Dim3 block_idx();
Dim3 block_dim();
Dim3 grid_dim();
uint32_t linear_tid();         // x + y*bx + z*bx*by
uint32_t warp_id();            // linear_tid / 32
uint32_t lane_id();            // linear_tid % 32
uint32_t threads_per_cta();
Cta* current_cta();
uint32_t cluster_rank();       // %cluster_ctarank of the executing CTA
uint32_t cluster_size();       // CTAs in the executing cluster
Cta* cluster_cta(uint32_t rank);  // a CTA of the executing cluster
Dim3 cluster_id();             // %clusterid
Dim3 cluster_count();          // %nclusterid
uint64_t virtual_time_ns();    // %globaltimer: advances with emulated work, never with host wall time
std::string where();           // "kernel k, CTA (x,y,z), thread t (warp w, lane l)" of the executing thread

// ---- shared memory ----
// A shared::cta address is the 32-bit offset into the CTA's shared window (what cvta.to.shared gives). A
// shared::cluster address (what mapa gives) carries (target cluster rank + 1) in bits 24-27; 0 there means the
// executing CTA, since the shared::cta window is contained in the shared::cluster window.
constexpr uint32_t kClusterRankShift = 24;
// Host pointer to `bytes` bytes at a shared::cta or shared::cluster address; fails unless they lie in one shared
// allocation of the target CTA. `what` names the access in the failure message.
uint8_t* shared_ptr(uint32_t addr, uint32_t bytes, const char* what);
// The CTA a shared::cluster address refers to, and the shared::cta offset inside it.
Cta* shared_target(uint32_t addr);
uint32_t shared_offset(uint32_t addr);
// Same as shared_ptr for a given CTA and shared::cta offset.
uint8_t* cta_shared_ptr(Cta* cta, uint32_t offset, uint32_t bytes, const char* what);
// shared::cta address of a host pointer into the executing CTA's shared memory; fails for any other pointer.
uint32_t cvta_to_shared(const void* p);
// The cluster rank of a CTA of the executing cluster.
uint32_t cta_rank(const Cta* cta);
// True while the CTA still has threads that have not exited.
bool cta_running(const Cta* cta);

// ---- global memory ----
// Fails unless [p, p + bytes) lies inside one live device allocation.
void check_global(const void* p, uint64_t bytes, const char* what);

// ---- poisoning ----
// Fills memory with 0xFF bytes: NaN as f32, bf16 and e4m3, so any read before the data arrives shows up.
constexpr uint8_t kPoisonByte = 0xFF;
void poison(void* p, size_t bytes);

// ---- mbarrier (ptx.cpp) ----
// complete-tx of `bytes` on the mbarrier at shared::cta offset `offset` of `cta` (PTX ISA, mbarrier: tx-count).
void mbar_complete_tx(Cta* cta, uint32_t offset, uint32_t bytes, const char* by);

// ---- asynchronous operations ----
// An operation whose effect lands later (a TMA copy, a cp.async). The scheduler completes it according to the
// policy: eager (at issue), lazy (only when no thread can run), random (at a random later switch point).
struct AsyncOp {
    virtual ~AsyncOp() = default;
    virtual void complete() = 0;
    virtual std::string describe() const = 0;
};
void issue_async(std::unique_ptr<AsyncOp> op);
// Completes pending async operations until `done()` holds (used by blocking waits such as cp.async.wait_group that
// name exactly which operations they need). Fails if they cannot make it hold.
void complete_async_until(const std::function<bool()>& done);

// ---- scheduling ----
// A switch point: lets another thread run.
void yield();
// Parks the executing thread until `ready()` holds. `ready` is re-evaluated after every notify(key); `describe`
// says what the thread waits for (used in the hang report).
void block_on(const void* key, const std::function<bool()>& ready, const std::function<std::string()>& describe);
void notify(const void* key);

// ---- collectives ----
// Every thread of the executing thread's warpgroup (128 consecutive threads, aligned) arrives here; the last to
// arrive runs `on_last` before any leaves. `what` names the instruction: threads of one warpgroup arriving at
// different instructions (different `what`) is a violation of .aligned and fails the launch.
void warpgroup_rendezvous(const char* what, const std::function<void()>& on_last);
uint32_t warpgroup_id();  // linear_tid / 128

// Per-CTA storage for instruction models (e.g. wgmma's per-warpgroup state), freed with the CTA.
std::shared_ptr<void>& cta_slot(Cta* cta, const char* key);
// Called when a CTA has finished (every thread exited): models check nothing is left in flight.
void on_cta_exit(const char* key, std::function<void(Cta*)> hook);

}  // namespace r1k_emu
