// Warpgroup MMA on the execution engine: wgmma.fence / mma_async / commit_group / wait_group (PTX ISA 9.0,
// "Asynchronous Warpgroup Level Matrix Multiply-Accumulate Instructions"). The pure parts (descriptors, operand
// addressing, fragments, numerics) are in wgmma_core.cpp and numerics_core.cpp; this file keeps the per-warpgroup
// state machine and the checks that need the engine.
//
// Model. Every instruction is a warpgroup rendezvous (.sync.aligned: all 128 threads execute the same instruction);
// the last thread to arrive does the work for all of them.
//   * wgmma.mma_async reads both operands and the input accumulators at issue, computes the result at once (so a
//     chain of mma_async on the same accumulators is computed in issue order), keeps it in the operation and
//     POISONS every thread's accumulator registers (NaN bit pattern 0xFFFFFFFF): until the wgmma.wait_group that
//     covers it, the registers hold no defined value ("wgmma.wait_group": accessing the accumulator registers
//     before waiting is undefined behavior), so a premature read shows up as NaN.
//   * wgmma.commit_group closes the open group (possibly empty, as the ISA allows).
//   * wgmma.wait_group N completes all but the N newest committed groups, oldest first: checks that nobody wrote
//     the poisoned accumulators, that the shared-memory operand bytes still equal what was read at issue (an
//     operand stage released while the MMA was in flight -- TMA or a thread overwriting it -- is caught), then
//     writes the results into every thread's registers.
//   * wgmma.fence: the ISA requires it before the first mma_async and between any register access and an
//     mma_async using the same registers. Register accesses are invisible to a C++ build, so this is approximated
//     by a state machine: an mma_async needs a wgmma.fence after the warpgroup's last wgmma.wait_group (after a
//     wait the threads read and update the results; before the next batch they must fence).
#include "wgmma.h"

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "numerics_core.h"
#include "runtime.h"
#include "wgmma_core.h"

namespace r1k_emu {
namespace {

constexpr uint32_t kPoisonBits = 0xFFFFFFFFu;  // NaN as f32; runtime.h kPoisonByte repeated
constexpr const char* kSlot = "wgmma";

// One shared-memory operand as read at issue: where each element lives and the bits it had.
struct SmemOperand {
    bool used = false;
    const char* name = "";       // "A" or "B"
    uint64_t raw_desc = 0;
    wgmma::Operand op{};
    std::vector<uint32_t> addr;  // [rows][k] shared::cta byte address of each element
    std::vector<uint16_t> bits;  // [rows][k] the element's bits at issue
};

// One issued wgmma.mma_async.
struct Op {
    uint64_t seq = 0;  // issue number within the warpgroup (for messages)
    uint32_t n = 0, k = 0;
    WgmmaType atype{}, btype{};
    Cta* cta = nullptr;
    SmemOperand a, b;
    std::vector<float*> regs;   // [128][n/2] accumulator registers of every thread
    std::vector<float> result;  // [64][n]
};

std::string describe(const Op& op) {
    return "wgmma.mma_async.m64n" + std::to_string(op.n) + "k" + std::to_string(op.k) + ".f32." +
           mma_numerics::elem_name(wgmma::elem_of(op.atype)) + "." + mma_numerics::elem_name(wgmma::elem_of(op.btype)) +
           " #" + std::to_string(op.seq) + " of the warpgroup";
}

// Which in-flight operation last took an accumulator register, and at which fragment position (t * n/2 + i).
struct Owner {
    Op* op;
    uint32_t index;
};

struct WarpgroupState {
    bool fenced = false;  // a wgmma.fence since the last wgmma.wait_group
    uint64_t issued = 0;
    std::vector<std::shared_ptr<Op>> open;                  // issued, not yet committed
    std::deque<std::vector<std::shared_ptr<Op>>> committed;  // oldest group first
    std::unordered_map<float*, Owner> owner;                // accumulator registers of in-flight operations
    // Per-thread arguments of the rendezvous in progress (valid while every thread waits in it).
    const WgmmaMma* mma_args[128] = {};
    uint32_t wait_args[128] = {};
};

struct CtaState {
    std::map<uint32_t, WarpgroupState> warpgroups;
};

CtaState& cta_state(Cta* cta) {
    std::shared_ptr<void>& slot = cta_slot(cta, kSlot);
    if (!slot) slot = std::make_shared<CtaState>();
    return *static_cast<CtaState*>(slot.get());
}

WarpgroupState& my_warpgroup() { return cta_state(current_cta()).warpgroups[warpgroup_id()]; }

uint32_t thread_in_warpgroup() { return linear_tid() - 128 * warpgroup_id(); }

// The CTA-exit check: every mma_async must have been waited for ("wgmma.wait_group": the results are only
// available after a wgmma.wait_group that covers the operation).
void on_exit(Cta* cta) {
    std::shared_ptr<void>& slot = cta_slot(cta, kSlot);
    if (!slot) return;
    for (auto& [g, st] : static_cast<CtaState*>(slot.get())->warpgroups) {
        size_t committed = 0;
        for (auto& group : st.committed) committed += group.size();
        if (committed || !st.open.empty())
            fail("CTA rank %u exited while warpgroup %u still had %zu wgmma.mma_async in flight (%zu committed but "
                 "not waited for, %zu never committed): every wgmma.mma_async must be committed "
                 "(wgmma.commit_group) and waited for (wgmma.wait_group) before its results are used or the "
                 "thread exits",
                 cta_rank(cta), g, committed + st.open.size(), committed, st.open.size());
    }
}

// ---- operand gathering ----

uint16_t load_bits(const uint8_t* p, uint32_t bytes) {
    uint16_t v = 0;
    std::memcpy(&v, p, bytes);  // little-endian: the element's bits in the low bytes
    return v;
}

// Reads an operand through its descriptor: element addresses, one bounds-checked host pointer for the whole span,
// the bits of each element.
void gather(SmemOperand& s, Cta* cta, const char* name, uint64_t raw_desc, wgmma::Major major, uint32_t elem_bytes,
            uint32_t rows, uint32_t k) {
    s.used = true;
    s.name = name;
    s.raw_desc = raw_desc;
    s.op = wgmma::Operand{wgmma::decode_descriptor(raw_desc), major, elem_bytes, rows, k};
    std::string warning;
    const std::string err = wgmma::check_operand(s.op, &warning);
    if (!err.empty())
        fail("wgmma.mma_async operand %s (descriptor 0x%016llx): %s", name, (unsigned long long)raw_desc, err.c_str());
    if (!warning.empty()) warn("wgmma.mma_async operand %s: %s", name, warning.c_str());
    s.addr.resize(static_cast<size_t>(rows) * k);
    uint32_t lo = UINT32_MAX, hi = 0;
    for (uint32_t r = 0; r < rows; ++r)
        for (uint32_t kk = 0; kk < k; ++kk) {
            const uint32_t a = wgmma::element_address(s.op, r, kk);
            s.addr[r * k + kk] = a;
            lo = std::min(lo, a);
            hi = std::max(hi, a + elem_bytes);
        }
    char what[160];
    snprintf(what, sizeof what, "wgmma.mma_async operand %s (descriptor 0x%016llx, %s-major, %s swizzle)", name,
             (unsigned long long)raw_desc, major == wgmma::Major::K ? "K" : "MN",
             wgmma::swizzle_name(s.op.desc.swizzle));
    const uint8_t* base = cta_shared_ptr(cta, lo, hi - lo, what);
    s.bits.resize(s.addr.size());
    for (size_t i = 0; i < s.addr.size(); ++i) s.bits[i] = load_bits(base + (s.addr[i] - lo), elem_bytes);
}

// At completion: the operand bytes must be what the operation read at issue.
void verify_unchanged(const SmemOperand& s, const Op& op) {
    if (!s.used) return;
    uint32_t lo = UINT32_MAX, hi = 0;
    for (uint32_t a : s.addr) {
        lo = std::min(lo, a);
        hi = std::max(hi, a + s.op.elem_bytes);
    }
    const uint8_t* base = cta_shared_ptr(op.cta, lo, hi - lo, "wgmma.wait_group operand re-check");
    for (size_t i = 0; i < s.addr.size(); ++i) {
        const uint16_t now = load_bits(base + (s.addr[i] - lo), s.op.elem_bytes);
        if (now != s.bits[i])
            fail("shared-memory operand of an in-flight wgmma was overwritten (stage released early?): operand %s "
                 "of %s, element (%s %zu, k %zu) at shared address 0x%x changed from 0x%x at issue to 0x%x before "
                 "the wgmma.wait_group that completes it (descriptor 0x%016llx). The MMA reads shared memory "
                 "asynchronously until then (PTX ISA \"wgmma.mma_async\", \"wgmma.wait_group\"); a copy into the "
                 "stage that was still landing at issue (a missing mbarrier wait) also shows up here",
                 s.name, describe(op).c_str(), s.name[0] == 'A' ? "row" : "col", i / s.op.k, i % s.op.k, s.addr[i],
                 s.bits[i], now, (unsigned long long)s.raw_desc);
    }
}

// ---- completion ----

void complete(WarpgroupState& st, Op& op) {
    const uint32_t per = op.n / 2;
    for (uint32_t t = 0; t < 128; ++t)
        for (uint32_t i = 0; i < per; ++i) {
            uint32_t now;
            std::memcpy(&now, op.regs[t * per + i], 4);
            if (now != kPoisonBits) {
                const wgmma::Coord c = wgmma::d_fragment(t, i);
                fail("accumulator register written while wgmma in flight: thread %u of the warpgroup, d[%u] (row %u, "
                     "col %u) of %s holds 0x%08x instead of the in-flight poison; accessing the accumulators before "
                     "the wgmma.wait_group that covers the operation is undefined (PTX ISA \"wgmma.wait_group\")",
                     t, i, c.row, c.col, describe(op).c_str(), now);
            }
        }
    verify_unchanged(op.a, op);
    verify_unchanged(op.b, op);
    // Results go to the registers this operation still owns; a register a later in-flight operation chained on
    // stays poisoned until that one completes.
    for (uint32_t t = 0; t < 128; ++t)
        for (uint32_t i = 0; i < per; ++i) {
            float* p = op.regs[t * per + i];
            auto it = st.owner.find(p);
            if (it == st.owner.end() || it->second.op != &op) continue;
            const wgmma::Coord c = wgmma::d_fragment(t, i);
            *p = op.result[c.row * op.n + c.col];
            st.owner.erase(it);
        }
}

// ---- issue ----

void issue(WarpgroupState& st) {
    const WgmmaMma& f = *st.mma_args[0];
    // .aligned: every thread executes the same instruction; "The contents of a matrix descriptor must be same
    // across all the warps in the warpgroup" (PTX ISA "wgmma.mma_async").
    for (uint32_t t = 1; t < 128; ++t) {
        const WgmmaMma& o = *st.mma_args[t];
        const char* diff = nullptr;
        if (o.m != f.m || o.n != f.n || o.k != f.k || o.atype != f.atype || o.btype != f.btype ||
            o.a_from_registers != f.a_from_registers)
            diff = "shape or types";
        else if (!f.a_from_registers && o.desc_a != f.desc_a) diff = "a-desc (the A matrix descriptor)";
        else if (o.desc_b != f.desc_b) diff = "b-desc (the B matrix descriptor)";
        else if (o.scale_d != f.scale_d) diff = "scale-d";
        else if (o.imm_scale_a != f.imm_scale_a || o.imm_scale_b != f.imm_scale_b) diff = "imm-scale-a/b";
        else if (o.imm_trans_a != f.imm_trans_a || o.imm_trans_b != f.imm_trans_b) diff = "imm-trans-a/b";
        if (diff)
            fail("wgmma.mma_async: thread %u of the warpgroup passes a different %s than thread 0 (.sync.aligned: all "
                 "threads of the warpgroup execute the same wgmma.mma_async; descriptors must be the same across the "
                 "warpgroup)",
                 t, diff);
    }
    const std::string form = wgmma::check_form(f);
    if (!form.empty()) fail("%s", form.c_str());
    if (!st.fenced)
        fail("wgmma.mma_async without a wgmma.fence since the warpgroup's last wgmma.wait_group (or ever): PTX ISA "
             "\"wgmma.fence\" must be issued before the first wgmma.mma_async and between register accesses and a "
             "wgmma.mma_async that uses the same accumulator or A registers");

    auto op = std::make_shared<Op>();
    op->seq = ++st.issued;
    op->n = f.n;
    op->k = f.k;
    op->atype = f.atype;
    op->btype = f.btype;
    op->cta = current_cta();
    const mma_numerics::Elem ta = wgmma::elem_of(f.atype), tb = wgmma::elem_of(f.btype);
    const uint32_t ea = mma_numerics::elem_bytes(ta), eb = mma_numerics::elem_bytes(tb);
    const uint32_t n = f.n, k = f.k, per = n / 2;

    // A: [64][k], from registers ("Register Fragments", matrix A) or shared memory; imm-scale-a = -1 negates.
    std::vector<double> A(64 * k), B(static_cast<size_t>(n) * k);
    const double sa = f.imm_scale_a, sb = f.imm_scale_b;
    if (f.a_from_registers) {
        const uint32_t elems = 4 / ea, mask = ea == 1 ? 0xFFu : 0xFFFFu;
        for (uint32_t t = 0; t < 128; ++t)
            for (uint32_t j = 0; j < 4; ++j)
                for (uint32_t e = 0; e < elems; ++e) {
                    const wgmma::Coord c = wgmma::a_fragment(t, j, e, ea);
                    const uint32_t bits = (st.mma_args[t]->a_regs[j] >> (8 * ea * e)) & mask;
                    A[c.row * k + c.col] = sa * mma_numerics::decode(ta, bits);
                }
    } else {
        gather(op->a, op->cta, "A", f.desc_a, wgmma::a_major(f), ea, 64, k);
        for (size_t i = 0; i < A.size(); ++i) A[i] = sa * mma_numerics::decode(ta, op->a.bits[i]);
    }
    gather(op->b, op->cta, "B", f.desc_b, wgmma::b_major(f), eb, n, k);
    for (size_t i = 0; i < B.size(); ++i) B[i] = sb * mma_numerics::decode(tb, op->b.bits[i]);

    // Accumulators: a register still owned by an in-flight operation chains on that operation's result ("an
    // ordering guarantee is provided by default" for accumulator accesses across wgmma.mma_async of the same
    // shape, PTX ISA "wgmma.fence"); otherwise the thread's current value is the input.
    std::vector<float> C(f.scale_d ? 64 * n : 0);
    op->regs.resize(128 * per);
    for (uint32_t t = 0; t < 128; ++t)
        for (uint32_t i = 0; i < per; ++i) {
            float* p = st.mma_args[t]->d[i];
            if (!p) fail("wgmma.mma_async: thread %u has no register for d[%u]", t, i);
            const wgmma::Coord c = wgmma::d_fragment(t, i);
            const uint32_t index = t * per + i;
            auto it = st.owner.find(p);
            if (it != st.owner.end()) {
                const Op& prev = *it->second.op;
                if (&prev == op.get())
                    fail("wgmma.mma_async: thread %u passes the same register as two accumulator elements (d[%u])",
                         t, i);
                if (prev.n != n || prev.k != k)
                    fail("wgmma.mma_async: thread %u's accumulator d[%u] is in flight in %s, of a different shape: "
                         "ordering is only guaranteed between wgmma.mma_async of the same shape (PTX ISA "
                         "\"wgmma.fence\"); wait for it (wgmma.wait_group) first",
                         t, i, describe(prev).c_str());
                if (it->second.index != index)
                    fail("wgmma.mma_async: thread %u's accumulator d[%u] is in flight in %s as a different element "
                         "(d[%u]); the emulator refuses to chain accumulators across fragment positions",
                         t, i, describe(prev).c_str(), it->second.index % per);
                if (f.scale_d) C[c.row * n + c.col] = prev.result[c.row * n + c.col];
            } else if (f.scale_d) {
                C[c.row * n + c.col] = *p;
            }
            st.owner[p] = Owner{op.get(), index};
            op->regs[index] = p;
        }

    op->result.resize(64 * n);
    const mma_numerics::Mode mode =
        numerics() == Numerics::Hopper ? mma_numerics::Mode::Hopper : mma_numerics::Mode::Exact;
    wgmma::mma(mode, ta, tb, n, k, A.data(), B.data(), f.scale_d ? C.data() : nullptr, op->result.data());

    for (float* p : op->regs) std::memcpy(p, &kPoisonBits, 4);
    st.open.push_back(std::move(op));
}

}  // namespace

void wgmma_fence() {
    WarpgroupState& st = my_warpgroup();
    warpgroup_rendezvous("wgmma.fence", [&st] {
        st.fenced = true;
        on_cta_exit(kSlot, on_exit);  // registered once (keyed); any CTA that issues an mma_async fenced first
    });
}

void wgmma_mma_async(const WgmmaMma& op) {
    WarpgroupState& st = my_warpgroup();
    st.mma_args[thread_in_warpgroup()] = &op;  // stays valid: every thread waits in the rendezvous until on_last ran
    warpgroup_rendezvous("wgmma.mma_async", [&st] { issue(st); });
}

void wgmma_commit_group() {
    WarpgroupState& st = my_warpgroup();
    warpgroup_rendezvous("wgmma.commit_group", [&st] {
        st.committed.push_back(std::move(st.open));  // an empty group when nothing was issued (PTX ISA allows it)
        st.open.clear();
    });
}

void wgmma_wait_group(uint32_t n) {
    WarpgroupState& st = my_warpgroup();
    st.wait_args[thread_in_warpgroup()] = n;
    warpgroup_rendezvous("wgmma.wait_group", [&st] {
        for (uint32_t t = 1; t < 128; ++t)
            if (st.wait_args[t] != st.wait_args[0])
                fail("wgmma.wait_group: thread %u of the warpgroup waits with N = %u, thread 0 with N = %u (.aligned: "
                     "all threads execute the same instruction)",
                     t, st.wait_args[t], st.wait_args[0]);
        const uint32_t keep = st.wait_args[0];
        // "wait until only N or fewer of the most recent wgmma-groups are pending and all the prior wgmma-groups
        // committed by the executing threads are complete".
        while (st.committed.size() > keep) {
            std::vector<std::shared_ptr<Op>> group = std::move(st.committed.front());
            st.committed.pop_front();
            for (auto& op : group) complete(st, *op);
        }
        st.fenced = false;
    });
}

}  // namespace r1k_emu
