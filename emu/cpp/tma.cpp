// TMA model wired to the execution engine: the emulated cuTensorMapEncodeTiled (C ABI, emu_api.h) and the
// `cp.async.bulk.tensor` tile load / `prefetch.tensormap` instructions (tma.h). The rules themselves (encoding,
// swizzle, box geometry, out-of-bounds fill) live in tma_core.cpp; this file adds what needs the engine: shared-memory
// targets in the cluster, global-memory checks, poisoning, the asynchronous completion and the mbarrier signal.
// "ISA" = PTX ISA 9.0; the instruction rules quoted below are from its "cp.async.bulk.tensor" page unless named.
#include "tma.h"

#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "emu_api.h"
#include "runtime.h"
#include "tma_core.h"

namespace r1k_emu {

namespace {

constexpr int kCudaSuccess = 0;
constexpr int kCudaErrorInvalidValue = 1;

void describe_box(char* buf, size_t n, const TmaLoad& op) {
    int len = snprintf(buf, n, "(");
    for (uint32_t i = 0; i < op.dims && i < 5 && len > 0 && size_t(len) < n; ++i)
        len += snprintf(buf + len, n - size_t(len), i ? ", %d" : "%d", op.coords[i]);
    if (len > 0 && size_t(len) < n) snprintf(buf + len, n - size_t(len), ")");
}

// One issued tile load: everything complete() needs, captured at issue.
class TmaLoadOp final : public AsyncOp {
public:
    TmaLoadOp(const tma::TensorMapParams& p, const TmaLoad& op, uint32_t dst_off, uint32_t mbar_off,
              std::vector<Cta*> targets, std::vector<uint32_t> target_ranks, uint32_t bytes, std::string issued_at)
        : p_(p), dims_(op.dims), dst_off_(dst_off), mbar_off_(mbar_off), targets_(std::move(targets)),
          ranks_(std::move(target_ranks)), bytes_(bytes), issued_at_(std::move(issued_at)) {
        memcpy(coords_, op.coords, sizeof coords_);
        describe_box(box_, sizeof box_, op);
    }

    void complete() override {
        // The copy reads global memory now, when it completes (the ISA: "The copy operation in cp.async.bulk.tensor
        // is treated as a weak memory operation"), and writes the same image into every target CTA (multicast: "The
        // source data is multicast to the same offset as dstMem in the shared memory of each destination CTA").
        std::vector<uint8_t> image(bytes_);
        tma::box_copy(p_, coords_, dst_off_, reinterpret_cast<const uint8_t*>(uintptr_t(p_.global_address)),
                      image.data());
        for (size_t t = 0; t < targets_.size(); ++t) {
            Cta* cta = targets_[t];
            // Landing in the shared memory of a CTA that has exited is undefined (its shared memory is gone); a
            // kernel whose CTA exits before its loads complete (or a peer's multicast into it completes) is wrong.
            if (!cta_running(cta))
                fail("cp.async.bulk.tensor (issued at %s) of box %s completes after its destination CTA (cluster "
                     "rank %u) has exited",
                     issued_at_.c_str(), box_, ranks_[t]);
            uint8_t* dst = cta_shared_ptr(cta, dst_off_, bytes_, "cp.async.bulk.tensor destination box");
            memcpy(dst, image.data(), bytes_);
            // "Upon the completion of the asynchronous copy operation, the complete-tx operation, with completeCount
            // argument equal to amount of data copied in bytes, will be performed on the mbarrier object"; with
            // multicast (.cta_group::1, the default) "the mbarrier signal is also multicasted to the same offset as
            // mbar in the shared memory of the destination CTA". The byte count is the full box; see tma_load.
            mbar_complete_tx(cta, mbar_off_, bytes_, "cp.async.bulk.tensor");
        }
    }

    std::string describe() const override {
        char buf[256];
        snprintf(buf, sizeof buf,
                 "cp.async.bulk.tensor.%ud box %s -> shared 0x%x in %zu CTA(s), complete_tx %u bytes on mbarrier "
                 "0x%x (issued at %s)",
                 dims_, box_, dst_off_, targets_.size(), bytes_, mbar_off_, issued_at_.c_str());
        return buf;
    }

private:
    tma::TensorMapParams p_;
    uint32_t dims_;
    int32_t coords_[5];
    uint32_t dst_off_, mbar_off_;
    std::vector<Cta*> targets_;
    std::vector<uint32_t> ranks_;
    uint32_t bytes_;
    std::string issued_at_;
    char box_[96];
};

tma::TensorMapParams decode_or_fail(const void* map, const char* instr) {
    tma::TensorMapParams p;
    std::string err = tma::decode(map, &p);
    if (!err.empty()) fail("%s: operand tensorMap %p: %s", instr, map, err.c_str());
    return p;
}

}  // namespace

void tma_load(const TmaLoad& op) {
    const char* I = "cp.async.bulk.tensor";
    const tma::TensorMapParams p = decode_or_fail(op.map, I);
    if (op.dims < 1 || op.dims > 5) fail("%s: .%ud is not a tensor dimensionality (1d..5d)", I, op.dims);

    // Destination and mbarrier: shared::cluster addresses. The ISA: "When .dst is specified as .shared::cluster, the
    // address dstMem can be in the shared memory of any of the CTAs within the current cluster"; without .cta_group
    // (sm_90 has none) it "defaults to .cta_group::1" and then "the mbarrier object mbar that is specified must be in
    // the shared memory of the same CTA as the shared memory destination dstMem".
    Cta* dst_cta = shared_target(op.dst);
    const uint32_t dst_off = shared_offset(op.dst);
    Cta* mbar_cta = shared_target(op.mbar);
    const uint32_t mbar_off = shared_offset(op.mbar);
    if (mbar_cta != dst_cta)
        fail("%s: the mbarrier (cluster rank %u) must be in the shared memory of the same CTA as the destination "
             "(cluster rank %u) (.cta_group::1)",
             I, cta_rank(mbar_cta), cta_rank(dst_cta));
    // mbarrier "Size and alignment of mbarrier object": .b64, 8-byte aligned, in .shared.
    if (mbar_off % 8 != 0) fail("%s: mbarrier address 0x%x is not 8-byte aligned", I, mbar_off);

    // Box geometry and the rules of tma_core (rank, alignment, modelled modes, fill, tx-count range).
    tma::BoxInfo box;
    std::string err = tma::check_load(p, op.dims, op.coords, dst_off, &box);
    if (!err.empty()) fail("%s", err.c_str());

    // Target CTAs. The ISA (.multicast::cluster): "Operand ctaMask specifies the destination CTAs in the cluster such
    // that each bit position in the 16-bit ctaMask operand corresponds to the %ctaid of the destination CTA" (the
    // CTA's rank in the cluster). The ISA does not say what an empty mask or a bit naming no CTA of the cluster does:
    // both are refused.
    std::vector<Cta*> targets;
    std::vector<uint32_t> ranks;
    if (op.multicast) {
        const uint32_t n = cluster_size();
        if (op.cta_mask == 0) fail("%s.multicast::cluster: ctaMask is 0 (no destination CTA)", I);
        if (n < 16 && (op.cta_mask >> n) != 0)
            fail("%s.multicast::cluster: ctaMask 0x%x names CTAs outside the cluster of %u", I, unsigned(op.cta_mask),
                 n);
        for (uint32_t r = 0; r < n; ++r)
            if (op.cta_mask & (1u << r)) {
                targets.push_back(cluster_cta(r));
                ranks.push_back(r);
            }
    } else {
        targets.push_back(dst_cta);
        ranks.push_back(cta_rank(dst_cta));
    }

    // Global memory: every in-bounds element must lie in one live allocation (out-of-bounds elements are not read).
    if (box.any_in_bounds)
        check_global(reinterpret_cast<const void*>(uintptr_t(p.global_address + box.global_lo)),
                     box.global_hi - box.global_lo, "cp.async.bulk.tensor source box");

    // complete_tx byte count for boxes that cross the tensor boundary. The ISA says the complete-tx is performed
    // "with completeCount argument equal to amount of data copied in bytes" and, in "Out of Boundary Access", that
    // out-of-bounds elements "are set to 0" in the box; it does not say whether the filled bytes count as "copied".
    // The emulator counts the full box (as CuTe/CUTLASS do: their TmaTransactionBytes is the size of the whole smem
    // tile, with no residue term) and warns once, since a kernel relying on it depends on an unstated rule.
    if (box.oob_elements > 0)
        warn("cp.async.bulk.tensor: a box %s the tensor; complete_tx counts the full box bytes including the "
             "zero-filled ones (the PTX ISA does not state the count for out-of-bounds elements)",
             box.any_in_bounds ? "crosses the boundary of" : "lies entirely outside");

    // Every target's destination box and mbarrier must lie in its shared memory; the box is poisoned now so that a
    // read before the mbarrier wait sees NaN/0xFF instead of stale data.
    const uint32_t bytes = uint32_t(box.box_bytes);
    for (Cta* cta : targets) {
        poison(cta_shared_ptr(cta, dst_off, bytes, "cp.async.bulk.tensor destination box"), bytes);
        cta_shared_ptr(cta, mbar_off, 8, "cp.async.bulk.tensor mbarrier");
    }

    issue_async(std::unique_ptr<AsyncOp>(
        new TmaLoadOp(p, op, dst_off, mbar_off, std::move(targets), std::move(ranks), bytes, where())));
}

void tma_prefetch(const void* map) {
    // `prefetch.tensormap` only brings the map closer; the emulator checks that it is one.
    decode_or_fail(map, "prefetch.tensormap");
}

}  // namespace r1k_emu

// ---- the emulated driver entry point ----
extern "C" int r1k_emu_tensor_map_encode_tiled(void* map, int data_type, uint32_t rank, void* global_address,
                                               const uint64_t* global_dim, const uint64_t* global_strides,
                                               const uint32_t* box_dim, const uint32_t* element_strides,
                                               int interleave, int swizzle, int l2_promotion, int oob_fill,
                                               char* err, size_t err_len) {
    namespace tma = r1k_emu::tma;
    std::string e;
    tma::TensorMapParams p;
    p.data_type = data_type;
    p.rank = rank;
    p.global_address = uint64_t(uintptr_t(global_address));
    p.interleave = interleave;
    p.swizzle = swizzle;
    p.l2_promotion = l2_promotion;
    p.oob_fill = oob_fill;
    // The arrays are only read once the rank is known to be in range (the rank bounds their length).
    if (map == nullptr) {
        e = "cuTensorMapEncodeTiled: tensorMap is NULL";
    } else if (rank == 0 || rank > tma::kMaxRank) {
        e = "cuTensorMapEncodeTiled: tensorRank " + std::to_string(rank) + " must be in 1..5";
    } else if (global_dim == nullptr || box_dim == nullptr || element_strides == nullptr ||
               (rank > 1 && global_strides == nullptr)) {
        e = "cuTensorMapEncodeTiled: globalDim, globalStrides (rank > 1), boxDim and elementStrides must not be NULL";
    } else {
        for (uint32_t i = 0; i < rank; ++i) {
            p.global_dim[i] = global_dim[i];
            p.box_dim[i] = box_dim[i];
            p.element_strides[i] = element_strides[i];
            if (i + 1 < rank) p.global_strides[i] = global_strides[i];
        }
        e = tma::encode_tiled(map, p);
    }
    if (e.empty()) {
        if (err && err_len) err[0] = '\0';
        return r1k_emu::kCudaSuccess;
    }
    if (err && err_len) snprintf(err, err_len, "%s", e.c_str());
    return r1k_emu::kCudaErrorInvalidValue;
}
