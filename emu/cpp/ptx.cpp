// The inline-PTX interpreter: executes the parsed template of each lifted asm statement for the calling thread,
// and models the mbarrier object and Ampere cp.async groups itself (TMA and wgmma live in tma.cpp and wgmma.cpp).
// Section names refer to the PTX ISA 9.0 (docs.nvidia.com/cuda/parallel-thread-execution/).
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <unordered_map>

#include "asm_ops.h"
#include "ptx_parse.h"
#include "runtime.h"
#include "tma.h"
#include "wgmma.h"

namespace r1k_emu {

// Engine internals (runtime.cpp).
void named_barrier(uint32_t id, uint32_t count);
void syncthreads();
void cluster_arrive();
void cluster_wait();
uint64_t thread_sync_epoch();
uint64_t cta_sync_epoch(const Cta* cta);

namespace {

// ---- mbarrier ("Parallel Synchronization and Communication Instructions: mbarrier") ----
// The object holds the current phase, the pending arrival count, the expected arrival count and the tx-count.
// A phase completes when the pending arrival count and the tx-count both reach zero; then the phase advances and
// the pending count is reset to the expected count.
constexpr int64_t kTxLimit = (1 << 20) - 1;  // "tx-count ... range [-(2^20 - 1), 2^20 - 1]"
constexpr uint32_t kMaxArrivals = (1u << 20) - 1;  // mbarrier.init: count in [1, 2^20 - 1]
constexpr uint64_t kTag = 0x52314B2D4D424152ull;  // written into the object's 8 bytes to detect generic overwrites

struct Mbarrier {
    uint64_t phase = 0;
    uint32_t pending = 0;
    uint32_t expected = 0;
    int64_t tx = 0;
    uint64_t init_epoch = 0;
    uint32_t initializer = 0;
};

struct MbarTable {
    std::map<uint32_t, Mbarrier> bars;  // by shared::cta offset
};

MbarTable& mbars(Cta* cta) {
    auto& slot = cta_slot(cta, "mbarrier");
    if (!slot) slot = std::make_shared<MbarTable>();
    return *static_cast<MbarTable*>(slot.get());
}

uint64_t tag_for(uint32_t offset) { return kTag ^ offset; }

Mbarrier& find_mbar(Cta* cta, uint32_t offset, const char* what, bool check_visibility) {
    auto& table = mbars(cta);
    auto it = table.bars.find(offset);
    if (it == table.bars.end())
        fail("%s: no initialized mbarrier at shared address 0x%x of CTA rank %u (use before mbarrier.init)", what,
             offset, cta_rank(cta));
    uint64_t stored;
    std::memcpy(&stored, cta_shared_ptr(cta, offset, 8, what), 8);
    if (stored != tag_for(offset))
        fail("%s: the mbarrier at shared address 0x%x was overwritten by an ordinary store while in use", what, offset);
    Mbarrier& m = it->second;
    // mbarrier.init: "...must be made visible to other threads ... before they operate on the object": in the
    // crate's kernels through a CTA (or cluster) barrier after the init.
    if (check_visibility && cta == current_cta() && linear_tid() != m.initializer &&
        thread_sync_epoch() <= m.init_epoch)
        fail("%s: mbarrier at 0x%x is used by a thread that has not passed a barrier since thread %u initialized it",
             what, offset, m.initializer);
    return m;
}

std::string describe_mbar(Cta* cta, uint32_t offset) {
    auto& table = mbars(cta);
    auto it = table.bars.find(offset);
    char buf[192];
    if (it == table.bars.end()) {
        snprintf(buf, sizeof buf, "mbarrier 0x%x (not initialized)", offset);
    } else {
        const Mbarrier& m = it->second;
        snprintf(buf, sizeof buf, "mbarrier 0x%x of CTA rank %u: phase %llu, pending arrivals %u of %u, tx-count %lld",
                 offset, cta_rank(cta), static_cast<unsigned long long>(m.phase), m.pending, m.expected,
                 static_cast<long long>(m.tx));
    }
    return buf;
}

void mbar_try_complete(Cta* cta, uint32_t offset, Mbarrier& m) {
    if (m.pending == 0 && m.tx < 0)
        fail("mbarrier 0x%x: tx-count underflow: %lld more bytes completed than expected, with no arrival pending",
             offset, static_cast<long long>(-m.tx));
    if (m.pending == 0 && m.tx == 0) {
        ++m.phase;
        m.pending = m.expected;
        notify(&m);
    }
}

void mbar_check_tx(uint32_t offset, const Mbarrier& m) {
    if (m.tx > kTxLimit || m.tx < -kTxLimit)
        fail("mbarrier 0x%x: tx-count %lld outside the range [-(2^20-1), 2^20-1]", offset, static_cast<long long>(m.tx));
}

void mbar_arrive(Cta* cta, uint32_t offset, uint32_t tx_bytes, const char* what) {
    Mbarrier& m = find_mbar(cta, offset, what, true);
    if (m.pending == 0)
        fail("%s: arrival-count underflow on mbarrier 0x%x (more arrivals than the %u expected in phase %llu)", what,
             offset, m.expected, static_cast<unsigned long long>(m.phase));
    m.tx += tx_bytes;
    mbar_check_tx(offset, m);
    --m.pending;
    mbar_try_complete(cta, offset, m);
}

// ---- cp.async (Ampere) groups: per thread ----
struct CpAsyncState {
    std::vector<std::shared_ptr<int>> open;                     // outstanding counters of the open group's copies
    std::deque<std::vector<std::shared_ptr<int>>> committed;    // oldest first
};
struct CpAsyncTable {
    std::unordered_map<uint32_t, CpAsyncState> threads;
};
CpAsyncState& cp_state() {
    auto& slot = cta_slot(current_cta(), "cp.async");
    if (!slot) slot = std::make_shared<CpAsyncTable>();
    return static_cast<CpAsyncTable*>(slot.get())->threads[linear_tid()];
}

struct CpAsyncCopy : AsyncOp {
    uint8_t* dst;
    const uint8_t* src;
    uint32_t copy_bytes, src_bytes;
    std::shared_ptr<int> outstanding;
    std::string where;
    void complete() override {
        // cp.async: "src-size ... the remaining bytes (cp-size - src-size) are filled with zeros".
        if (src_bytes) std::memcpy(dst, src, src_bytes);
        std::memset(dst + src_bytes, 0, copy_bytes - src_bytes);
        *outstanding = 0;
    }
    std::string describe() const override { return "cp.async from " + where; }
};

bool group_done(const std::vector<std::shared_ptr<int>>& g) {
    for (auto& c : g)
        if (*c) return false;
    return true;
}

// ---- operand access ----
struct Exec {
    const Program& prog;
    AsmOperand* ops;
    int count;
    bool locals[8] = {};

    uint64_t raw(int index) const {
        const AsmOperand& o = ops[index];
        if (o.lvalue) {
            uint64_t v = 0;
            std::memcpy(&v, o.lvalue, o.size);
            return v;
        }
        return o.value;
    }
    uint64_t value(const Operand& o) const {
        switch (o.kind) {
            case OperandKind::Imm: return static_cast<uint64_t>(o.imm);
            case OperandKind::AsmRef: return raw(o.index);
            case OperandKind::Local: return locals[o.index] ? 1 : 0;
            default: fail("operand kind cannot be read as a value");
        }
    }
    uint32_t u32(const Operand& o) const { return static_cast<uint32_t>(value(o)); }
    uint32_t addr32(const Operand& a) const { return static_cast<uint32_t>(value(a.elems[0])); }
    uint64_t addr64(const Operand& a) const { return value(a.elems[0]); }
    void write(const Operand& o, uint64_t v) const {
        const AsmOperand& d = ops[o.index];
        std::memcpy(d.lvalue, &v, d.size);
    }
};

void run_instr(Exec& ex, const Instr& in, const char* site) {
    const auto& o = in.operands;
    switch (in.op) {
        case Op::MbarInit: {
            const uint32_t addr = ex.addr32(o[0]);
            const uint32_t count = ex.u32(o[1]);
            if (addr >> kClusterRankShift) fail("mbarrier.init.shared::cta with a shared::cluster address 0x%x", addr);
            if (addr % 8) fail("mbarrier.init: address 0x%x is not 8-byte aligned", addr);
            if (count < 1 || count > kMaxArrivals) fail("mbarrier.init: count %u outside [1, 2^20-1]", count);
            Cta* cta = current_cta();
            uint8_t* p = cta_shared_ptr(cta, addr, 8, "mbarrier.init");
            auto& table = mbars(cta);
            auto it = table.bars.find(addr);
            if (it != table.bars.end() && (it->second.pending != it->second.expected || it->second.tx != 0))
                fail("mbarrier.init on the mbarrier at 0x%x while its phase %llu is in progress", addr,
                     static_cast<unsigned long long>(it->second.phase));
            Mbarrier m;
            m.pending = m.expected = count;
            m.init_epoch = cta_sync_epoch(cta);
            m.initializer = linear_tid();
            table.bars[addr] = m;
            const uint64_t tag = tag_for(addr);
            std::memcpy(p, &tag, 8);
            return;
        }
        case Op::MbarArrive:
        case Op::MbarArriveExpectTx: {
            const uint32_t addr = ex.addr32(o[1]);
            if (addr >> kClusterRankShift)
                fail("%s with a shared::cluster address 0x%x", in.opcode.c_str(), addr);
            const uint32_t tx = in.op == Op::MbarArriveExpectTx ? ex.u32(o[2]) : 0;
            if (tx > static_cast<uint32_t>(kTxLimit)) fail("mbarrier.arrive.expect_tx: %u bytes exceed 2^20-1", tx);
            mbar_arrive(current_cta(), addr, tx, in.opcode.c_str());
            return;
        }
        case Op::MbarArriveRemote: {
            const uint32_t addr = ex.addr32(o[1]);
            Cta* target = shared_target(addr);
            if (!cta_running(target))
                fail("mbarrier.arrive on CTA rank %u of the cluster, which has exited", cta_rank(target));
            mbar_arrive(target, shared_offset(addr), 0, in.opcode.c_str());
            return;
        }
        case Op::MbarTryWaitParity: {
            const uint32_t addr = ex.addr32(o[1]);
            const uint32_t parity = ex.u32(o[2]) & 1;
            Cta* cta = current_cta();
            Mbarrier& m = find_mbar(cta, addr, "mbarrier.try_wait.parity", true);
            // mbarrier.test_wait/try_wait: with .parity, waits for the completion of the phase whose parity is
            // the operand: the current phase if it has that parity (incomplete), else the preceding one (complete).
            bool done = (m.phase & 1) != parity;
            if (!done) {
                Mbarrier* mp = &m;
                const uint64_t phase = m.phase;
                block_on(
                    &m, [mp, phase] { return mp->phase != phase; },
                    [cta, addr, parity] {
                        return describe_mbar(cta, addr) + ", waiting for parity " + std::to_string(parity);
                    });
                done = (m.phase & 1) != parity;
                // try_wait may also return false when its time limit expires: let retry loops run sometimes.
                if (rng_next() % 4 == 0) done = false;
            }
            ex.locals[o[0].index] = done;
            return;
        }
        case Op::FenceMbarrierInit:
        case Op::FenceProxyAsync:
            return;
        case Op::MovSpecial: {
            const std::string& s = o[1].name;
            uint64_t v = 0;
            if (s == "globaltimer") v = virtual_time_ns();
            else if (s == "cluster_ctarank") v = cluster_rank();
            else if (s == "cluster_nctarank") v = cluster_size();
            else if (s == "clusterid.x") v = cluster_id().x;
            else if (s == "clusterid.y") v = cluster_id().y;
            else if (s == "clusterid.z") v = cluster_id().z;
            else if (s == "nclusterid.x") v = cluster_count().x;
            else if (s == "nclusterid.y") v = cluster_count().y;
            else if (s == "nclusterid.z") v = cluster_count().z;
            else fail("special register %%%s", s.c_str());
            ex.write(o[0], v);
            return;
        }
        case Op::PrefetchTensormap:
            tma_prefetch(reinterpret_cast<const void*>(ex.addr64(o[0])));
            return;
        case Op::TmaLoad: {
            TmaLoad t{};
            t.dims = in.tma_dims;
            t.dst = ex.addr32(o[0]);
            t.map = reinterpret_cast<const void*>(ex.value(o[1].elems[0]));
            for (uint32_t i = 0; i < in.tma_dims; ++i) t.coords[i] = static_cast<int32_t>(ex.u32(o[1].elems[1].elems[i]));
            t.mbar = ex.addr32(o[2]);
            t.multicast = in.multicast;
            t.cta_mask = in.multicast ? static_cast<uint16_t>(ex.value(o[3])) : 0;
            tma_load(t);
            return;
        }
        case Op::ClusterArrive:
            cluster_arrive();
            return;
        case Op::ClusterWait:
            cluster_wait();
            return;
        case Op::Mapa: {
            const uint32_t a = ex.u32(o[1]);
            const uint32_t rank = ex.u32(o[2]);
            if (rank >= cluster_size()) fail("mapa: rank %u outside the cluster of %u CTAs", rank, cluster_size());
            ex.write(o[0], ((rank + 1) << kClusterRankShift) | shared_offset(a));
            return;
        }
        case Op::WgmmaFence:
            wgmma_fence();
            return;
        case Op::WgmmaCommit:
            wgmma_commit_group();
            return;
        case Op::WgmmaWait: {
            const int64_t n = o[0].kind == OperandKind::Imm ? o[0].imm : static_cast<int64_t>(ex.value(o[0]));
            if (n < 0 || n > 7) fail("wgmma.wait_group %lld: N must be in 0..7", static_cast<long long>(n));
            wgmma_wait_group(static_cast<uint32_t>(n));
            return;
        }
        case Op::WgmmaMma: {
            WgmmaMma w{};
            w.m = in.wg_m;
            w.n = in.wg_n;
            w.k = in.wg_k;
            auto type = [&](const std::string& t) {
                if (t == "e4m3") return WgmmaType::E4M3;
                if (t == "e5m2") return WgmmaType::E5M2;
                if (t == "bf16") return WgmmaType::BF16;
                return WgmmaType::F16;
            };
            w.atype = type(in.wg_atype);
            w.btype = type(in.wg_btype);
            for (size_t i = 0; i < o[0].elems.size(); ++i) {
                const AsmOperand& d = ex.ops[o[0].elems[i].index];
                w.d[i] = static_cast<float*>(d.lvalue);
            }
            w.a_from_registers = o[1].kind == OperandKind::Vector;
            if (w.a_from_registers) {
                for (int i = 0; i < 4; ++i) w.a_regs[i] = ex.u32(o[1].elems[static_cast<size_t>(i)]);
            } else {
                w.desc_a = ex.value(o[1]);
            }
            w.desc_b = ex.value(o[2]);
            w.scale_d = ex.value(o[3]) != 0;
            auto imm = [&](size_t i) { return static_cast<int>(o[i].kind == OperandKind::Imm ? o[i].imm : static_cast<int64_t>(ex.value(o[i]))); };
            w.imm_scale_a = imm(4);
            w.imm_scale_b = imm(5);
            w.imm_trans_a = -1;
            w.imm_trans_b = -1;
            if (o.size() == 8) {
                w.imm_trans_a = imm(6);
                w.imm_trans_b = imm(7);
            } else if (o.size() == 7) {
                w.imm_trans_b = imm(6);
            }
            // wgmma.mma_async: imm-scale-a/b are -1 or 1; imm-trans-a/b are 0 or 1.
            if ((w.imm_scale_a != 1 && w.imm_scale_a != -1) || (w.imm_scale_b != 1 && w.imm_scale_b != -1))
                fail("%s: imm-scale-a/b must be 1 or -1", in.opcode.c_str());
            if ((o.size() >= 7 && w.imm_trans_b != 0 && w.imm_trans_b != 1) ||
                (o.size() == 8 && w.imm_trans_a != 0 && w.imm_trans_a != 1))
                fail("%s: imm-trans-a/b must be 0 or 1", in.opcode.c_str());
            wgmma_mma_async(w);
            return;
        }
        case Op::SetmaxnregInc:
        case Op::SetmaxnregDec: {
            const int64_t n = o[0].kind == OperandKind::Imm ? o[0].imm : static_cast<int64_t>(ex.value(o[0]));
            // setmaxnreg: "imm-reg-count ... in the range 24 to 256 (both inclusive) ... multiple of 8".
            if (n < 24 || n > 256 || n % 8) fail("%s %lld: count must be a multiple of 8 in [24, 256]", in.opcode.c_str(), static_cast<long long>(n));
            warpgroup_rendezvous(in.op == Op::SetmaxnregInc ? "setmaxnreg.inc" : "setmaxnreg.dec", [] {});
            return;
        }
        case Op::BarSync: {
            const uint32_t id = ex.u32(o[0]);
            if (o.size() == 1) {
                if (id == 0) syncthreads();
                else named_barrier(id, threads_per_cta());
            } else {
                named_barrier(id, ex.u32(o[1]));
            }
            return;
        }
        case Op::CpAsync: {
            const uint32_t dst = ex.addr32(o[0]);
            const uint64_t src = ex.addr64(o[1]);
            const uint32_t cp_size = static_cast<uint32_t>(o[2].kind == OperandKind::Imm ? o[2].imm : static_cast<int64_t>(ex.value(o[2])));
            const uint32_t src_size = o.size() == 4 ? ex.u32(o[3]) : cp_size;
            // cp.async: cp-size is 4, 8 or 16 (.cg: 16 only); src-size <= cp-size; both addresses cp-size aligned.
            const bool cg = in.opcode.find(".cg.") != std::string::npos;
            if ((cg && cp_size != 16) || (cp_size != 4 && cp_size != 8 && cp_size != 16))
                fail("%s: cp-size %u not allowed", in.opcode.c_str(), cp_size);
            if (src_size > cp_size) fail("cp.async: src-size %u exceeds cp-size %u", src_size, cp_size);
            if (dst % cp_size || src % cp_size) fail("cp.async: addresses must be aligned to cp-size %u", cp_size);
            uint8_t* d = shared_ptr(dst, cp_size, "cp.async destination");
            if (src_size) check_global(reinterpret_cast<const void*>(src), src_size, "cp.async source");
            poison(d, cp_size);
            auto op = std::make_unique<CpAsyncCopy>();
            op->dst = d;
            op->src = reinterpret_cast<const uint8_t*>(src);
            op->copy_bytes = cp_size;
            op->src_bytes = src_size;
            op->outstanding = std::make_shared<int>(1);
            op->where = site;
            cp_state().open.push_back(op->outstanding);
            issue_async(std::move(op));
            return;
        }
        case Op::CpAsyncCommit: {
            CpAsyncState& s = cp_state();
            s.committed.push_back(std::move(s.open));
            s.open.clear();
            return;
        }
        case Op::CpAsyncWait: {
            const int64_t n = o[0].kind == OperandKind::Imm ? o[0].imm : static_cast<int64_t>(ex.value(o[0]));
            CpAsyncState& s = cp_state();
            // cp.async.wait_group N: waits until at most N of the most recent committed groups are pending.
            while (static_cast<int64_t>(s.committed.size()) > n) {
                auto& oldest = s.committed.front();
                complete_async_until([&oldest] { return group_done(oldest); });
                s.committed.pop_front();
            }
            return;
        }
        case Op::Setp: {
            const uint32_t a = ex.u32(o[1]), b = ex.u32(o[2]);
            ex.locals[o[0].index] = in.cmp == "ne" ? a != b : a == b;
            return;
        }
        case Op::Selp:
            ex.write(o[0], ex.locals[o[3].index] ? ex.u32(o[1]) : ex.u32(o[2]));
            return;
    }
    fail("unhandled instruction %s", in.opcode.c_str());
}

struct CachedProgram {
    Program program;
    bool empty;
};

}  // namespace

void mbar_complete_tx(Cta* cta, uint32_t offset, uint32_t bytes, const char* by) {
    Mbarrier& m = find_mbar(cta, offset, by, false);
    m.tx -= bytes;
    mbar_check_tx(offset, m);
    mbar_try_complete(cta, offset, m);
}

void inline_ptx(const char* site, const char* ptx, AsmOperand* operands, int count) {
    static std::unordered_map<const char*, CachedProgram> cache;
    auto it = cache.find(ptx);
    if (it == cache.end()) {
        CachedProgram c;
        std::string err;
        if (!parse_ptx(ptx, &c.program, &err)) fail("%s: cannot parse inline PTX: %s", site, err.c_str());
        std::vector<const char*> cons(static_cast<size_t>(count));
        for (int i = 0; i < count; ++i) cons[static_cast<size_t>(i)] = operands[i].constraint;
        err = validate_program(c.program, cons.data(), count);
        if (!err.empty()) fail("%s: unsupported inline PTX: %s", site, err.c_str());
        c.empty = c.program.instrs.empty();
        it = cache.emplace(ptx, std::move(c)).first;
    }
    // An empty template (`asm volatile("" : "+f"(x))`) only constrains the compiler: nothing to execute.
    if (it->second.empty) return;
    yield();
    Exec ex{it->second.program, operands, count};
    for (const Instr& in : it->second.program.instrs) run_instr(ex, in, site);
}

}  // namespace r1k_emu
