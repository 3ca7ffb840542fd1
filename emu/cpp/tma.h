// Tensor Memory Accelerator model: cuTensorMapEncodeTiled (host side) and cp.async.bulk.tensor tile loads.
#pragma once
#include <cstdint>

namespace r1k_emu {

// One `cp.async.bulk.tensor.{2d,3d}.shared::cluster.global.mbarrier::complete_tx::bytes[.multicast::cluster]`, as
// decoded from its PTX operands by ptx.cpp.
struct TmaLoad {
    uint32_t dims;          // 2 or 3 (tensor rank in the instruction)
    uint32_t dst;           // shared::cluster address of the destination box
    const void* map;        // generic address of the CUtensorMap (a kernel parameter)
    int32_t coords[5];      // tensor coordinates, innermost first
    uint32_t mbar;          // shared::cluster address of the completing mbarrier
    bool multicast;
    uint16_t cta_mask;      // with multicast: the destination CTAs (cluster ranks)
};

// Issues the load: validates map and operands, poisons the destination box in every target CTA now, and queues the
// copy (r1k_emu::issue_async) that fills it and performs complete_tx on each target CTA's mbarrier.
void tma_load(const TmaLoad& op);

// `prefetch.tensormap [map]`: validates that `map` points to an encoded tensor map.
void tma_prefetch(const void* map);

}  // namespace r1k_emu
