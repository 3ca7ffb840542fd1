// The execution engine: fibers (one per GPU thread), the seeded scheduler, CTAs and clusters with their shared
// memory, CTA/warp/warpgroup collectives, asynchronous-operation completion policies, hang diagnosis, and the
// launch entry point of the C ABI (emu_api.h).
//
// Model: CUDA's independent thread scheduling (Volta and later) lets every thread make progress on its own, and
// a correct kernel may not rely on any interleaving. So each thread is a fiber and the scheduler picks the next
// one at random (seeded) at every synchronizing or asynchronous operation. The CTAs of a cluster run together; the
// clusters (or CTAs) of a grid run one after another in a seeded random order, which a correct kernel cannot tell
// apart from any other schedule, since the crate's kernels do not communicate between CTAs within a launch.
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <set>
#include <thread>
#include <unordered_map>
#include <vector>

#include "asm_ops.h"
#include "emu_api.h"
#include "runtime.h"

#ifdef R1K_EMU_ASAN
extern "C" void __sanitizer_start_switch_fiber(void** fake_stack_save, const void* bottom, size_t size);
extern "C" void __sanitizer_finish_switch_fiber(void* fake_stack_save, const void** bottom_old, size_t* size_old);
extern "C" void __asan_unpoison_memory_region(void const volatile* addr, size_t size);
#endif

extern "C" void r1k_emu_link_all_kernels();

// ---- context switch (x86-64 System V): saves callee-saved registers, MXCSR and the x87 control word ----
extern "C" void r1k_emu_switch(void** save_sp, void* new_sp);
asm(R"(
.text
.globl r1k_emu_switch
.type r1k_emu_switch,@function
r1k_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
.size r1k_emu_switch, .-r1k_emu_switch
.section .note.GNU-stack,"",@progbits
.text
)");

namespace r1k_emu {

namespace {

constexpr uint32_t kMaxSharedBytes = 232448;  // 227 KiB: sm_90's opt-in limit per block
constexpr size_t kStackBytes = 512 * 1024;
constexpr size_t kGuardBytes = 64 * 1024;

struct KernelInfo {
    const char* name;
    void (*trampoline)(void**);
    int param_count;
    const uint32_t* param_sizes;
};

std::map<std::string, KernelInfo>& registry() {
    static std::map<std::string, KernelInfo> r;
    return r;
}

// ---- device allocations ----
std::mutex g_alloc_mutex;
std::map<uint64_t, uint64_t>& allocations() {
    static std::map<uint64_t, uint64_t> a;
    return a;
}

// ---- fibers ----
struct Stack {
    uint8_t* base;  // lowest usable address
    size_t size;
};

std::vector<Stack>& stack_pool() {
    static std::vector<Stack> pool;
    return pool;
}

Stack take_stack() {
    auto& pool = stack_pool();
    if (!pool.empty()) {
        Stack s = pool.back();
        pool.pop_back();
        return s;
    }
    void* mem = mmap(nullptr, kStackBytes + kGuardBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mem == MAP_FAILED) throw LaunchError("r1k-emu: out of memory for fiber stacks");
    mprotect(mem, kGuardBytes, PROT_NONE);  // stack overflow faults instead of corrupting a neighbour
    return Stack{static_cast<uint8_t*>(mem) + kGuardBytes, kStackBytes};
}

enum class FiberState { Runnable, Blocked, Done };

struct Fiber {
    void* sp = nullptr;
    Stack stack{};
    Cta* cta = nullptr;
    uint32_t linear = 0;
    Dim3 tid{};
    FiberState state = FiberState::Runnable;
    const void* block_key = nullptr;
    std::function<bool()> ready;
    std::function<std::string()> describe;
    uint64_t last_epoch = 0;  // the CTA sync epoch this thread has observed through a barrier
    bool cluster_arrived = false;
    uint64_t cluster_arrive_gen = 0;
    void* asan_fake_stack = nullptr;
};

struct Region {
    uint32_t offset;
    uint32_t size;
    uint8_t* host;
    std::string name;
};

struct NamedBarrier {
    int expected = 0;  // threads; 0 = all non-exited threads of the CTA
    int arrived = 0;
    uint64_t generation = 0;
};

struct WarpCollective {
    const char* kind;
    uint32_t mask;
    uint32_t arrived = 0;
    bool done = false;
    uint32_t value[32] = {};
    uint32_t b[32] = {};
    uint32_t c[32] = {};
    int mode[32] = {};
    uint32_t result[32] = {};
};

struct WarpgroupRendezvous {
    const char* what = nullptr;
    uint32_t arrived = 0;
    uint64_t generation = 0;
};

struct Cluster;

}  // namespace

struct Cta {
    Cluster* cluster = nullptr;
    uint32_t rank = 0;
    Dim3 idx{};
    uint32_t nthreads = 0;
    uint32_t exited = 0;
    std::vector<Fiber*> fibers;
    std::vector<Region> regions;
    uint8_t* dynamic = nullptr;
    uint32_t dynamic_bytes = 0;
    uint32_t next_offset = 0;
    uint32_t static_bytes = 0;
    std::unordered_map<const char*, uint8_t*> statics;
    std::map<int, NamedBarrier> barriers;
    std::vector<std::vector<std::shared_ptr<WarpCollective>>> warp_open;  // per warp
    std::vector<uint32_t> warp_exited;                                     // per warp: mask of exited lanes
    std::vector<WarpgroupRendezvous> warpgroups;
    std::map<std::string, std::shared_ptr<void>> slots;
    uint64_t sync_epoch = 1;
};

namespace {

struct Cluster {
    std::vector<Cta*> ctas;
    Dim3 id{};
    uint32_t cluster_arrived = 0;
    uint64_t cluster_generation = 0;
};

struct Launch {
    const KernelInfo* kernel = nullptr;
    r1k_emu_launch_config config{};
    void** params = nullptr;
    uint32_t dynamic_base = 16;
    Policy policy = Policy::Random;
    Numerics numerics = Numerics::Exact;
    uint64_t rng_state = 0;
    uint64_t vtime = 0;
    bool failed = false;
    std::string error;
    Cluster* cluster = nullptr;
    std::vector<Fiber*> runnable;
    std::unordered_map<const void*, std::vector<Fiber*>> blocked;
    std::deque<std::unique_ptr<AsyncOp>> async_ops;
    size_t alive = 0;
};

Launch* g_launch = nullptr;
Fiber* g_current = nullptr;
void* g_scheduler_sp = nullptr;
[[maybe_unused]] const void* g_scheduler_stack_bottom = nullptr;
[[maybe_unused]] size_t g_scheduler_stack_size = 0;
std::atomic<uint64_t> g_progress{0};
std::vector<std::pair<std::string, std::function<void(Cta*)>>>& exit_hooks() {
    static std::vector<std::pair<std::string, std::function<void(Cta*)>>> h;
    return h;
}

uint64_t splitmix(uint64_t& s) {
    uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

Fiber& self_fiber() {
    if (!g_current) throw LaunchError("r1k-emu: a device built-in was called outside of a kernel thread");
    return *g_current;
}

std::string format_v(const char* fmt, va_list ap) {
    char buf[2048];
    vsnprintf(buf, sizeof buf, fmt, ap);
    return buf;
}

// Switches from the running fiber back to the scheduler.
void to_scheduler() {
    Fiber* f = g_current;
#ifdef R1K_EMU_ASAN
    __sanitizer_start_switch_fiber(f->state == FiberState::Done ? nullptr : &f->asan_fake_stack,
                                   g_scheduler_stack_bottom, g_scheduler_stack_size);
#endif
    r1k_emu_switch(&f->sp, g_scheduler_sp);
#ifdef R1K_EMU_ASAN
    __sanitizer_finish_switch_fiber(f->asan_fake_stack, nullptr, nullptr);
#endif
}

void fiber_exit_bookkeeping(Fiber* f);

void fiber_main() {
#ifdef R1K_EMU_ASAN
    __sanitizer_finish_switch_fiber(nullptr, &g_scheduler_stack_bottom, &g_scheduler_stack_size);
#endif
    Fiber* f = g_current;
    try {
        g_launch->kernel->trampoline(g_launch->params);
    } catch (const LaunchError& e) {
        if (!g_launch->failed) {
            g_launch->failed = true;
            g_launch->error = e.what();
        }
    } catch (const std::exception& e) {
        if (!g_launch->failed) {
            g_launch->failed = true;
            g_launch->error = std::string("r1k-emu: C++ exception in kernel: ") + e.what();
        }
    }
    f->state = FiberState::Done;
    if (!g_launch->failed) {
        try {
            fiber_exit_bookkeeping(f);
        } catch (const LaunchError& e) {
            g_launch->failed = true;
            g_launch->error = e.what();
        }
    }
    to_scheduler();
    std::abort();  // a finished fiber is never resumed
}

extern "C" void r1k_emu_fiber_entry() { fiber_main(); }

void init_fiber_stack(Fiber* f) {
#ifdef R1K_EMU_ASAN
    __asan_unpoison_memory_region(f->stack.base, f->stack.size);
#endif
    uint8_t* top = f->stack.base + f->stack.size;
    top = reinterpret_cast<uint8_t*>(reinterpret_cast<uintptr_t>(top) & ~uintptr_t(15));
    // Frame popped by r1k_emu_switch: [mxcsr|fpucw][r15][r14][r13][r12][rbx][rbp][ret]; `ret` enters the fiber with
    // rsp = top - 8, the alignment of a function entered by call.
    uint64_t* sp = reinterpret_cast<uint64_t*>(top - 72);
    uint32_t csr[2] = {0x1F80u, 0x037Fu};
    std::memcpy(&sp[0], csr, 8);
    for (int i = 1; i <= 6; ++i) sp[i] = 0;
    sp[7] = reinterpret_cast<uint64_t>(&r1k_emu_fiber_entry);
    sp[8] = 0;
    f->sp = sp;
}

void make_runnable(Fiber* f) {
    f->state = FiberState::Runnable;
    g_launch->runnable.push_back(f);
}

std::string dim_str(Dim3 d) {
    char b[64];
    snprintf(b, sizeof b, "(%u,%u,%u)", d.x, d.y, d.z);
    return b;
}

std::string thread_where(const Fiber* f) {
    char b[256];
    snprintf(b, sizeof b, "CTA %s thread %u (warp %u, lane %u)", dim_str(f->cta->idx).c_str(), f->linear,
             f->linear / 32, f->linear % 32);
    return b;
}

// ---- warp collectives ----
void complete_warp_collective(Cta* cta, uint32_t warp, const std::shared_ptr<WarpCollective>& wc) {
    const uint32_t live = wc->mask & ~cta->warp_exited[warp];
    if ((wc->arrived & live) != live || wc->done) return;
    for (uint32_t lane = 0; lane < 32; ++lane) {
        if (!((wc->arrived >> lane) & 1)) continue;
        if (!std::strcmp(wc->kind, "shfl.sync")) {
            // PTX ISA, shfl.sync: source lane computation with clamp value c[4:0] and segment mask c[12:8].
            const int l = static_cast<int>(lane);
            const int bval = static_cast<int>(wc->b[lane] & 0x1f);
            const int cval = static_cast<int>(wc->c[lane] & 0x1f);
            const int segmask = static_cast<int>((wc->c[lane] >> 8) & 0x1f);
            const int max_lane = (l & segmask) | (cval & ~segmask);
            const int min_lane = l & segmask;
            int j = 0;
            bool pval = false;
            switch (wc->mode[lane]) {
                case 1: j = l - bval; pval = j >= max_lane; break;
                case 2: j = l + bval; pval = j <= max_lane; break;
                case 3: j = l ^ bval; pval = j <= max_lane; break;
                default: j = min_lane | (bval & ~segmask); pval = j <= max_lane; break;
            }
            if (!pval) j = l;
            if (j < 0 || j > 31 || !((wc->arrived >> j) & 1))
                fail("shfl.sync: lane %u reads lane %d, which is not in its membermask 0x%08x (or has exited)", lane, j,
                     wc->mask);
            wc->result[lane] = wc->value[j];
        } else if (!std::strcmp(wc->kind, "vote.sync.ballot")) {
            uint32_t ballot = 0;
            for (uint32_t s = 0; s < 32; ++s)
                if (((wc->arrived >> s) & 1) && wc->value[s]) ballot |= 1u << s;
            wc->result[lane] = ballot;
        }
    }
    wc->done = true;
    auto& open = cta->warp_open[warp];
    open.erase(std::remove(open.begin(), open.end(), wc), open.end());
    notify(wc.get());
}

uint32_t warp_collective(const char* kind, uint32_t mask, uint32_t value, int mode, uint32_t b, uint32_t c) {
    Fiber& f = self_fiber();
    Cta* cta = f.cta;
    const uint32_t warp = f.linear / 32, lane = f.linear % 32;
    // Lanes that exist in this warp (the last warp of a CTA may be partial).
    const uint32_t warp_threads = std::min<uint32_t>(32, cta->nthreads - warp * 32);
    const uint32_t exists = warp_threads == 32 ? 0xffffffffu : ((1u << warp_threads) - 1);
    if (!((mask >> lane) & 1))
        fail("%s: the executing lane %u is not in membermask 0x%08x (PTX ISA: undefined)", kind, lane, mask);
    if (mask & ~exists) fail("%s: membermask 0x%08x names lanes that do not exist in this warp", kind, mask);
    std::shared_ptr<WarpCollective> wc;
    for (auto& open : cta->warp_open[warp]) {
        if (open->mask & (1u << lane)) {
            if (open->mask != mask || std::strcmp(open->kind, kind))
                fail("warp %u: lane %u executes %s with membermask 0x%08x while lanes 0x%08x wait in %s with "
                     "membermask 0x%08x",
                     warp, lane, kind, mask, open->arrived, open->kind, open->mask);
            if ((open->arrived >> lane) & 1) fail("warp %u: lane %u arrived twice at %s", warp, lane, kind);
            wc = open;
            break;
        }
    }
    if (!wc) {
        for (auto& open : cta->warp_open[warp])
            if (open->mask & mask)
                fail("warp %u: %s with membermask 0x%08x overlaps a pending %s with membermask 0x%08x", warp, kind,
                     mask, open->kind, open->mask);
        wc = std::make_shared<WarpCollective>();
        wc->kind = kind;
        wc->mask = mask;
        cta->warp_open[warp].push_back(wc);
    }
    wc->arrived |= 1u << lane;
    wc->value[lane] = value;
    wc->b[lane] = b;
    wc->c[lane] = c;
    wc->mode[lane] = mode;
    complete_warp_collective(cta, warp, wc);
    block_on(
        wc.get(), [wc] { return wc->done; },
        [wc, kind] {
            char buf[160];
            snprintf(buf, sizeof buf, "%s membermask 0x%08x (arrived 0x%08x)", kind, wc->mask, wc->arrived);
            return std::string(buf);
        });
    return wc->result[lane];
}

// ---- CTA barriers ----
void barrier_try_complete(Cta* cta, int id) {
    NamedBarrier& b = cta->barriers[id];
    const int target = b.expected ? b.expected : static_cast<int>(cta->nthreads - cta->exited);
    if (b.arrived > 0 && b.arrived >= target) {
        if (!b.expected && cta->exited)
            warn("bar.sync %d completed without the %u exited threads of the CTA (kernel relies on exited threads "
                 "counting as arrived)",
                 id, cta->exited);
        b.arrived = 0;
        b.expected = 0;
        ++b.generation;
        ++cta->sync_epoch;
        notify(&b);
    }
}

void cluster_barrier_try_complete(Cluster* cl) {
    uint32_t live = 0;
    for (Cta* c : cl->ctas) live += c->nthreads - c->exited;
    if (cl->cluster_arrived > 0 && cl->cluster_arrived >= live) {
        cl->cluster_arrived = 0;
        ++cl->cluster_generation;
        for (Cta* c : cl->ctas) ++c->sync_epoch;
        notify(cl);
    }
}

void fiber_exit_bookkeeping(Fiber* f) {
    Cta* cta = f->cta;
    ++cta->exited;
    --g_launch->alive;
    const uint32_t warp = f->linear / 32;
    cta->warp_exited[warp] |= 1u << (f->linear % 32);
    auto open = cta->warp_open[warp];
    for (auto& wc : open) complete_warp_collective(cta, warp, wc);
    for (auto& [id, b] : cta->barriers)
        if (!b.expected) barrier_try_complete(cta, id);
    if (f->cluster_arrived) fail("thread exited between barrier.cluster.arrive and barrier.cluster.wait");
    cluster_barrier_try_complete(cta->cluster);
    auto& wg = cta->warpgroups[f->linear / 128];
    if (wg.arrived) fail("thread exited while its warpgroup waits for it in %s", wg.what);
}

// ---- hang report ----
[[noreturn]] void report_hang() {
    std::map<std::string, std::vector<const Fiber*>> groups;
    for (Cta* cta : g_launch->cluster->ctas)
        for (const Fiber* f : cta->fibers)
            if (f->state == FiberState::Blocked) groups[f->describe ? f->describe() : "?"].push_back(f);
    std::string msg = "hang: no thread can make progress and no asynchronous operation is pending. Blocked threads:";
    for (auto& [what, fibers] : groups) {
        msg += "\n  " + std::to_string(fibers.size()) + " thread(s) wait for " + what + ": ";
        size_t shown = 0;
        for (const Fiber* f : fibers) {
            if (shown++ == 4) {
                msg += ", ...";
                break;
            }
            msg += (shown > 1 ? "; " : "") + thread_where(f);
        }
    }
    throw LaunchError(msg);
}

void complete_one_async(bool random_pick) {
    auto& ops = g_launch->async_ops;
    size_t i = random_pick ? static_cast<size_t>(rng_next() % ops.size()) : 0;
    std::unique_ptr<AsyncOp> op = std::move(ops[i]);
    ops.erase(ops.begin() + static_cast<long>(i));
    op->complete();
}

void run_cluster(Cluster* cl) {
    Launch& L = *g_launch;
    L.cluster = cl;
    L.runnable.clear();
    L.blocked.clear();
    for (Cta* cta : cl->ctas)
        for (Fiber* f : cta->fibers) {
            init_fiber_stack(f);
            make_runnable(f);
            ++L.alive;
        }
    while (!L.failed) {
        ++g_progress;
        if (L.policy == Policy::Random && !L.async_ops.empty() && rng_next() % 4 == 0) {
            complete_one_async(true);
            continue;
        }
        if (L.runnable.empty()) {
            if (!L.async_ops.empty()) {
                complete_one_async(L.policy == Policy::Random);
                continue;
            }
            if (L.alive == 0) break;
            report_hang();
        }
        const size_t pick = static_cast<size_t>(rng_next() % L.runnable.size());
        Fiber* f = L.runnable[pick];
        L.runnable[pick] = L.runnable.back();
        L.runnable.pop_back();
        if (f->state != FiberState::Runnable) continue;
        ++L.vtime;
        g_current = f;
#ifdef R1K_EMU_ASAN
        void* fake = nullptr;
        __sanitizer_start_switch_fiber(&fake, f->stack.base, f->stack.size);
#endif
        r1k_emu_switch(&g_scheduler_sp, f->sp);
#ifdef R1K_EMU_ASAN
        __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
        g_current = nullptr;
    }
    if (L.failed) return;
    if (!L.async_ops.empty()) throw LaunchError("asynchronous operations still pending after every thread exited");
    for (Cta* cta : cl->ctas)
        for (auto& [key, hook] : exit_hooks()) hook(cta);
}

Policy read_policy() {
    const char* p = getenv("R1K_EMU_POLICY");
    if (!p || !*p || !strcmp(p, "random")) return Policy::Random;
    if (!strcmp(p, "eager")) return Policy::Eager;
    if (!strcmp(p, "lazy")) return Policy::Lazy;
    throw LaunchError(std::string("R1K_EMU_POLICY must be eager, lazy or random, not ") + p);
}

Numerics read_numerics() {
    const char* p = getenv("R1K_EMU_NUMERICS");
    if (!p || !*p || !strcmp(p, "exact")) return Numerics::Exact;
    if (!strcmp(p, "hopper")) return Numerics::Hopper;
    throw LaunchError(std::string("R1K_EMU_NUMERICS must be exact or hopper, not ") + p);
}

// Launches made so far by the calling host thread. The scheduler's stream of random choices depends on the seed,
// the kernel and this count only, so a test (one host thread) replays the same schedules whatever other tests run
// beside it.
thread_local uint64_t t_launch_counter = 0;

uint64_t fnv1a(const char* s) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (; *s; ++s) h = (h ^ static_cast<unsigned char>(*s)) * 0x100000001b3ull;
    return h;
}

// A watchdog for kernels that spin without ever calling into the emulator (nothing else can catch those).
void start_watchdog() {
    static std::once_flag once;
    std::call_once(once, [] {
        std::thread([] {
            const char* env = getenv("R1K_EMU_WATCHDOG_S");
            const int limit = env ? atoi(env) : 300;
            uint64_t last = g_progress.load();
            int still = 0;
            for (;;) {
                std::this_thread::sleep_for(std::chrono::seconds(1));
                const uint64_t now = g_progress.load();
                if (now == last && g_launch) {
                    if (++still >= limit) {
                        fprintf(stderr,
                                "r1k-emu: watchdog: kernel %s made no call into the emulator for %d s (a spin on plain "
                                "memory?); aborting\n",
                                g_launch->kernel ? g_launch->kernel->name : "?", limit);
                        _exit(124);
                    }
                } else {
                    still = 0;
                }
                last = now;
            }
        }).detach();
    });
}

}  // namespace

// ---- runtime.h implementation ----

void fail(const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    std::string msg = format_v(fmt, ap);
    va_end(ap);
    if (g_current) msg += " [" + where() + "]";
    throw LaunchError(msg);
}

void warn(const char* fmt, ...) {
    static std::set<std::string> seen;
    va_list ap;
    va_start(ap, fmt);
    std::string msg = format_v(fmt, ap);
    va_end(ap);
    if (seen.insert(msg).second) fprintf(stderr, "r1k-emu: warning: %s\n", msg.c_str());
}

Policy policy() { return g_launch ? g_launch->policy : Policy::Random; }
Numerics numerics() { return g_launch ? g_launch->numerics : Numerics::Exact; }
uint64_t rng_next() { return splitmix(g_launch->rng_state); }

Dim3 thread_idx() { return self_fiber().tid; }
Dim3 block_idx() { return self_fiber().cta->idx; }
Dim3 block_dim() {
    const auto& c = g_launch->config;
    return Dim3{c.block[0], c.block[1], c.block[2]};
}
Dim3 grid_dim() {
    const auto& c = g_launch->config;
    return Dim3{c.grid[0], c.grid[1], c.grid[2]};
}
uint32_t linear_tid() { return self_fiber().linear; }
uint32_t warp_id() { return self_fiber().linear / 32; }
uint32_t lane_id() { return self_fiber().linear % 32; }
uint32_t warpgroup_id() { return self_fiber().linear / 128; }
uint32_t threads_per_cta() { return self_fiber().cta->nthreads; }
Cta* current_cta() { return self_fiber().cta; }
uint32_t cluster_rank() { return self_fiber().cta->rank; }
uint32_t cluster_size() { return static_cast<uint32_t>(self_fiber().cta->cluster->ctas.size()); }
Cta* cluster_cta(uint32_t rank) {
    auto& ctas = self_fiber().cta->cluster->ctas;
    if (rank >= ctas.size()) fail("cluster rank %u out of range (cluster of %zu CTAs)", rank, ctas.size());
    return ctas[rank];
}
Dim3 cluster_id() { return self_fiber().cta->cluster->id; }
Dim3 cluster_count() {
    const auto& c = g_launch->config;
    return Dim3{c.grid[0] / c.cluster[0], c.grid[1] / c.cluster[1], c.grid[2] / c.cluster[2]};
}
uint64_t virtual_time_ns() { return g_launch ? g_launch->vtime * 10 : 0; }

std::string where() {
    if (!g_current || !g_launch) return "outside any thread";
    return std::string("kernel ") + g_launch->kernel->name + ", " + thread_where(g_current);
}

uint8_t* cta_shared_ptr(Cta* cta, uint32_t offset, uint32_t bytes, const char* what) {
    for (const Region& r : cta->regions) {
        if (offset >= r.offset && static_cast<uint64_t>(offset) + bytes <= static_cast<uint64_t>(r.offset) + r.size)
            return r.host + (offset - r.offset);
    }
    fail("%s: shared address 0x%x (+%u bytes) is outside every shared-memory allocation of CTA rank %u", what, offset,
         bytes, cta->rank);
}

Cta* shared_target(uint32_t addr) {
    const uint32_t rank_plus_one = addr >> kClusterRankShift;
    if (rank_plus_one == 0) return current_cta();
    if (rank_plus_one > 16) fail("shared::cluster address 0x%x is not a shared-memory address", addr);
    return cluster_cta(rank_plus_one - 1);
}

uint32_t shared_offset(uint32_t addr) { return addr & ((1u << kClusterRankShift) - 1); }

uint8_t* shared_ptr(uint32_t addr, uint32_t bytes, const char* what) {
    return cta_shared_ptr(shared_target(addr), shared_offset(addr), bytes, what);
}

uint32_t cvta_to_shared(const void* p) {
    const uint8_t* q = static_cast<const uint8_t*>(p);
    for (const Region& r : current_cta()->regions)
        if (q >= r.host && q <= r.host + r.size) return r.offset + static_cast<uint32_t>(q - r.host);
    fail("cvta.to.shared of %p, which is not in this CTA's shared memory", p);
}

uint32_t cta_rank(const Cta* cta) { return cta->rank; }
bool cta_running(const Cta* cta) { return cta->exited < cta->nthreads; }

void check_global(const void* p, uint64_t bytes, const char* what) {
    const uint64_t a = reinterpret_cast<uint64_t>(p);
    std::lock_guard<std::mutex> lock(g_alloc_mutex);
    auto& m = allocations();
    auto it = m.upper_bound(a);
    if (it != m.begin()) {
        --it;
        if (a >= it->first && a + bytes <= it->first + it->second) return;
    }
    fail("%s: global range [0x%llx, +%llu bytes) is not inside one device allocation", what,
         static_cast<unsigned long long>(a), static_cast<unsigned long long>(bytes));
}

void poison(void* p, size_t bytes) { std::memset(p, kPoisonByte, bytes); }

void issue_async(std::unique_ptr<AsyncOp> op) {
    if (g_launch->policy == Policy::Eager) {
        op->complete();
        return;
    }
    g_launch->async_ops.push_back(std::move(op));
}

void complete_async_until(const std::function<bool()>& done) {
    while (!done()) {
        if (g_launch->async_ops.empty()) fail("a wait needs asynchronous operations that were never issued");
        complete_one_async(false);
    }
}

void yield() {
    Fiber& f = self_fiber();
    ++g_progress;
    make_runnable(&f);
    to_scheduler();
    if (g_launch->failed) throw LaunchError("(launch aborted)");
}

void block_on(const void* key, const std::function<bool()>& ready, const std::function<std::string()>& describe) {
    Fiber& f = self_fiber();
    while (!ready()) {
        f.state = FiberState::Blocked;
        f.block_key = key;
        f.describe = describe;
        g_launch->blocked[key].push_back(&f);
        to_scheduler();
        if (g_launch->failed) throw LaunchError("(launch aborted)");
    }
    f.describe = nullptr;
}

void notify(const void* key) {
    auto it = g_launch->blocked.find(key);
    if (it == g_launch->blocked.end()) return;
    std::vector<Fiber*> waiters = std::move(it->second);
    g_launch->blocked.erase(it);
    for (Fiber* w : waiters)
        if (w->state == FiberState::Blocked && w->block_key == key) make_runnable(w);
}

void warpgroup_rendezvous(const char* what, const std::function<void()>& on_last) {
    yield();
    Fiber& f = self_fiber();
    Cta* cta = f.cta;
    const uint32_t g = f.linear / 128;
    if ((g + 1) * 128 > cta->nthreads)
        fail("%s: warpgroup %u is incomplete (the CTA has %u threads); warpgroup instructions need all 128", what, g,
             cta->nthreads);
    WarpgroupRendezvous& wg = cta->warpgroups[g];
    if (wg.arrived && std::strcmp(wg.what, what))
        fail("warpgroup %u: thread %u executes %s while %u threads of the warpgroup wait in %s (.aligned requires "
             "every thread to execute the same instruction)",
             g, f.linear, what, wg.arrived, wg.what);
    for (uint32_t t = g * 128; t < g * 128 + 128; ++t)
        if (cta->fibers[t]->state == FiberState::Done)
            fail("%s: thread %u of warpgroup %u has exited (.aligned requires all 128 threads)", what, t, g);
    wg.what = what;
    const uint64_t gen = wg.generation;
    if (++wg.arrived == 128) {
        on_last();
        wg.arrived = 0;
        ++wg.generation;
        notify(&wg);
        return;
    }
    WarpgroupRendezvous* wgp = &wg;
    block_on(
        &wg, [wgp, gen] { return wgp->generation != gen; },
        [wgp, what] { return std::string(what) + " (warpgroup: " + std::to_string(wgp->arrived) + " of 128 arrived)"; });
}

std::shared_ptr<void>& cta_slot(Cta* cta, const char* key) { return cta->slots[key]; }

void on_cta_exit(const char* key, std::function<void(Cta*)> hook) {
    for (auto& h : exit_hooks())
        if (h.first == key) return;
    exit_hooks().emplace_back(key, std::move(hook));
}

// ---- prelude built-ins ----

void syncthreads() {
    Fiber& f = self_fiber();
    Cta* cta = f.cta;
    NamedBarrier& b = cta->barriers[0];
    if (b.arrived && b.expected)
        fail("__syncthreads (bar.sync 0) while threads wait at barrier 0 with a thread count of %d", b.expected);
    const uint64_t gen = b.generation;
    ++b.arrived;
    barrier_try_complete(cta, 0);
    NamedBarrier* bp = &b;
    block_on(
        &b, [bp, gen] { return bp->generation != gen; },
        [bp, cta] {
            return "__syncthreads / bar.sync 0 (" + std::to_string(bp->arrived) + " of " +
                   std::to_string(cta->nthreads - cta->exited) + " live threads arrived)";
        });
    f.last_epoch = cta->sync_epoch;
}

void named_barrier(uint32_t id, uint32_t count) {
    Fiber& f = self_fiber();
    Cta* cta = f.cta;
    // PTX ISA, bar/barrier: barrier ids 0..15; the thread count must be a multiple of the warp size.
    if (id > 15) fail("bar.sync: barrier id %u out of range 0..15", id);
    if (count == 0 || count % 32 || count > cta->nthreads)
        fail("bar.sync %u, %u: the thread count must be a non-zero multiple of 32 no larger than the CTA (%u)", id,
             count, cta->nthreads);
    NamedBarrier& b = cta->barriers[static_cast<int>(id)];
    if (b.arrived && b.expected != static_cast<int>(count))
        fail("bar.sync %u, %u: threads already waiting at barrier %u expect %d", id, count, id, b.expected);
    const uint64_t gen = b.generation;
    b.expected = static_cast<int>(count);
    ++b.arrived;
    barrier_try_complete(cta, static_cast<int>(id));
    NamedBarrier* bp = &b;
    block_on(
        &b, [bp, gen] { return bp->generation != gen; },
        [bp, id, count] {
            return "bar.sync " + std::to_string(id) + ", " + std::to_string(count) + " (" + std::to_string(bp->arrived) +
                   " arrived)";
        });
    f.last_epoch = cta->sync_epoch;
}

void cluster_arrive() {
    yield();
    Fiber& f = self_fiber();
    if (f.cluster_arrived) fail("barrier.cluster.arrive twice without barrier.cluster.wait");
    Cluster* cl = f.cta->cluster;
    f.cluster_arrived = true;
    f.cluster_arrive_gen = cl->cluster_generation;
    ++cl->cluster_arrived;
    cluster_barrier_try_complete(cl);
}

void cluster_wait() {
    yield();
    Fiber& f = self_fiber();
    if (!f.cluster_arrived) fail("barrier.cluster.wait without a preceding barrier.cluster.arrive");
    Cluster* cl = f.cta->cluster;
    const uint64_t gen = f.cluster_arrive_gen;
    block_on(
        cl, [cl, gen] { return cl->cluster_generation != gen; },
        [cl] { return "barrier.cluster.wait (" + std::to_string(cl->cluster_arrived) + " arrived)"; });
    f.cluster_arrived = false;
    f.last_epoch = f.cta->sync_epoch;
}

uint64_t thread_sync_epoch() { return self_fiber().last_epoch; }
uint64_t cta_sync_epoch(const Cta* cta) { return cta->sync_epoch; }

void syncwarp(uint32_t mask) { warp_collective("bar.warp.sync", mask, 0, 0, 0, 0); }
uint32_t shfl_sync(uint32_t mask, uint32_t value, int mode, uint32_t b, uint32_t c) {
    return warp_collective("shfl.sync", mask, value, mode, b, c);
}
uint32_t ballot_sync(uint32_t mask, bool pred) { return warp_collective("vote.sync.ballot", mask, pred ? 1 : 0, 0, 0, 0); }
void trap() { fail("__trap() executed (trap instruction)"); }

void* dynamic_smem() {
    Cta* cta = current_cta();
    return cta->dynamic;
}

void* static_smem(const char* id, uint32_t bytes, uint32_t align) {
    Cta* cta = current_cta();
    auto it = cta->statics.find(id);
    if (it != cta->statics.end()) return it->second;
    align = std::max<uint32_t>(align, 16);
    const uint32_t offset = (cta->next_offset + align - 1) / align * align;
    cta->static_bytes += bytes;
    if (cta->dynamic_bytes + cta->static_bytes > kMaxSharedBytes)
        fail("static __shared__ %s (%u bytes) plus %u bytes of dynamic shared memory exceed the %u-byte limit", id,
             bytes, cta->dynamic_bytes, kMaxSharedBytes);
    uint8_t* host = static_cast<uint8_t*>(std::malloc(std::max<uint32_t>(bytes, 1)));
    poison(host, bytes);
    cta->regions.push_back(Region{offset, bytes, host, id});
    cta->next_offset = offset + bytes;
    cta->statics[id] = host;
    return host;
}

bool register_kernel(const char* name, void (*trampoline)(void**), int param_count, const uint32_t* param_sizes) {
    registry()[name] = KernelInfo{name, trampoline, param_count, param_sizes};
    return true;
}

}  // namespace r1k_emu

// ---- C ABI ----
using namespace r1k_emu;

namespace {

std::vector<const KernelInfo*>& kernel_list() {
    static std::vector<const KernelInfo*> list = [] {
        r1k_emu_link_all_kernels();
        std::vector<const KernelInfo*> v;
        for (auto& [name, info] : registry()) v.push_back(&info);
        return v;
    }();
    return list;
}

void free_cta(Cta* cta) {
    for (Region& r : cta->regions) std::free(r.host);
    for (Fiber* f : cta->fibers) {
        stack_pool().push_back(f->stack);
        delete f;
    }
    delete cta;
}

}  // namespace

extern "C" int r1k_emu_kernel_count(void) { return static_cast<int>(kernel_list().size()); }
extern "C" const char* r1k_emu_kernel_name(int i) {
    auto& l = kernel_list();
    return i >= 0 && static_cast<size_t>(i) < l.size() ? l[static_cast<size_t>(i)]->name : nullptr;
}
extern "C" const void* r1k_emu_find_kernel(const char* name) {
    kernel_list();
    auto it = registry().find(name);
    return it == registry().end() ? nullptr : &it->second;
}
extern "C" int r1k_emu_kernel_param_sizes(const void* kernel, uint32_t* sizes, int max) {
    const KernelInfo* k = static_cast<const KernelInfo*>(kernel);
    for (int i = 0; i < k->param_count && i < max; ++i) sizes[i] = k->param_sizes[i];
    return k->param_count;
}

extern "C" void r1k_emu_register_alloc(uint64_t ptr, uint64_t bytes) {
    std::lock_guard<std::mutex> lock(g_alloc_mutex);
    allocations()[ptr] = bytes;
}
extern "C" void r1k_emu_unregister_alloc(uint64_t ptr) {
    std::lock_guard<std::mutex> lock(g_alloc_mutex);
    allocations().erase(ptr);
}

extern "C" int r1k_emu_launch(const void* kernel, const r1k_emu_launch_config* config, void** params, char* err,
                              size_t err_len) {
    constexpr int kInvalidValue = 1, kLaunchFailed = 719;
    auto report = [&](int code, const std::string& msg) {
        if (err && err_len) snprintf(err, err_len, "%s", msg.c_str());
        return code;
    };
    if (!kernel) return report(kInvalidValue, "no kernel");
    const KernelInfo* k = static_cast<const KernelInfo*>(kernel);
    const r1k_emu_launch_config& c = *config;
    const uint64_t threads = static_cast<uint64_t>(c.block[0]) * c.block[1] * c.block[2];
    if (!threads || threads > 1024 || !c.grid[0] || !c.grid[1] || !c.grid[2])
        return report(kInvalidValue, std::string(k->name) + ": invalid launch dimensions");
    for (int d = 0; d < 3; ++d)
        if (!c.cluster[d] || c.grid[d] % c.cluster[d])
            return report(kInvalidValue, std::string(k->name) + ": grid is not a multiple of the cluster shape");
    const uint32_t cluster_ctas = c.cluster[0] * c.cluster[1] * c.cluster[2];
    if (cluster_ctas > 8) return report(kInvalidValue, std::string(k->name) + ": cluster larger than 8 CTAs");
    if (c.dynamic_smem_bytes > kMaxSharedBytes || c.dynamic_smem_bytes > c.max_dynamic_smem_bytes)
        return report(kInvalidValue, std::string(k->name) + ": dynamic shared memory above the function's limit");

    start_watchdog();
    Launch L;
    L.kernel = k;
    L.config = c;
    L.params = params;
    try {
        L.policy = read_policy();
        L.numerics = read_numerics();
    } catch (const LaunchError& e) {
        return report(kInvalidValue, e.what());
    }
    const char* seed_env = getenv("R1K_EMU_SEED");
    const uint64_t seed = seed_env ? strtoull(seed_env, nullptr, 0) : 1;
    L.rng_state = seed * 0x2545F4914F6CDD1Dull ^ fnv1a(k->name) ^ (++t_launch_counter * 0x9E3779B97F4A7C15ull);
    // One dynamic shared-memory base for the whole launch (every CTA has the same layout, as on the GPU), 16-byte
    // aligned but never 1024-byte aligned, so kernels must do the alignment the 128B swizzle needs themselves.
    L.dynamic_base = 16u * static_cast<uint32_t>(1 + splitmix(L.rng_state) % 63);
    g_launch = &L;

    // Clusters in a seeded random order.
    const uint32_t ncl[3] = {c.grid[0] / c.cluster[0], c.grid[1] / c.cluster[1], c.grid[2] / c.cluster[2]};
    const uint64_t clusters = static_cast<uint64_t>(ncl[0]) * ncl[1] * ncl[2];
    std::vector<uint64_t> order(clusters);
    for (uint64_t i = 0; i < clusters; ++i) order[i] = i;
    for (uint64_t i = clusters; i > 1; --i) std::swap(order[i - 1], order[splitmix(L.rng_state) % i]);

    int code = 0;
    std::string message;
    for (uint64_t ci : order) {
        Cluster cl;
        cl.id = Dim3{static_cast<uint32_t>(ci % ncl[0]), static_cast<uint32_t>((ci / ncl[0]) % ncl[1]),
                     static_cast<uint32_t>(ci / (static_cast<uint64_t>(ncl[0]) * ncl[1]))};
        try {
            for (uint32_t r = 0; r < cluster_ctas; ++r) {
                Cta* cta = new Cta;
                cta->cluster = &cl;
                cta->rank = r;
                const uint32_t rx = r % c.cluster[0], ry = (r / c.cluster[0]) % c.cluster[1],
                               rz = r / (c.cluster[0] * c.cluster[1]);
                cta->idx = Dim3{cl.id.x * c.cluster[0] + rx, cl.id.y * c.cluster[1] + ry, cl.id.z * c.cluster[2] + rz};
                cta->nthreads = static_cast<uint32_t>(threads);
                cta->dynamic_bytes = c.dynamic_smem_bytes;
                cta->dynamic = static_cast<uint8_t*>(std::malloc(std::max<uint32_t>(c.dynamic_smem_bytes, 1)));
                poison(cta->dynamic, c.dynamic_smem_bytes);
                cta->regions.push_back(Region{L.dynamic_base, c.dynamic_smem_bytes, cta->dynamic, "dynamic"});
                cta->next_offset = L.dynamic_base + c.dynamic_smem_bytes;
                const uint32_t warps = static_cast<uint32_t>((threads + 31) / 32);
                cta->warp_open.resize(warps);
                cta->warp_exited.assign(warps, 0);
                cta->warpgroups.resize((threads + 127) / 128);
                for (uint32_t t = 0; t < threads; ++t) {
                    Fiber* f = new Fiber;
                    f->stack = take_stack();
                    f->cta = cta;
                    f->linear = t;
                    f->tid = Dim3{t % c.block[0], (t / c.block[0]) % c.block[1], t / (c.block[0] * c.block[1])};
                    cta->fibers.push_back(f);
                }
                cl.ctas.push_back(cta);
            }
            run_cluster(&cl);
            if (L.failed) {
                code = kLaunchFailed;
                message = L.error;
            }
        } catch (const LaunchError& e) {
            code = kLaunchFailed;
            message = e.what();
        }
        for (Cta* cta : cl.ctas) free_cta(cta);
        if (code) break;
    }
    g_launch = nullptr;
    g_current = nullptr;
    if (code) return report(code, std::string("r1k-emu: kernel ") + k->name + " failed: " + message);
    return 0;
}
