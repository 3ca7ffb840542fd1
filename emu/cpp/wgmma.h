// Warpgroup MMA model: wgmma.fence / mma_async / commit_group / wait_group (PTX ISA 9.0, "Asynchronous Warpgroup
// Level Matrix Multiply-Accumulate Instructions").
#pragma once
#include <cstdint>

namespace r1k_emu {

enum class WgmmaType { E4M3, E5M2, BF16, F16 };

// One thread's view of one `wgmma.mma_async.sync.aligned.m64nNkK.f32.<atype>.<btype>` instruction, as decoded from
// its PTX operands by ptx.cpp. Every thread of the warpgroup calls wgmma_mma_async with its own registers.
struct WgmmaMma {
    uint32_t m, n, k;        // 64, N, 16 (bf16/f16) or 32 (e4m3/e5m2)
    WgmmaType atype, btype;
    float* d[256];           // this thread's N/2 accumulator registers (in/out)
    bool a_from_registers;   // register-A form: a_regs holds this thread's 4 packed A registers
    uint32_t a_regs[4];
    uint64_t desc_a;         // shared-memory descriptor of A (unused with a_from_registers)
    uint64_t desc_b;
    bool scale_d;            // false: D = A*B; true: D = A*B + D
    int imm_scale_a, imm_scale_b;  // 1 or -1
    int imm_trans_a, imm_trans_b;  // 0 or 1 (only .f16/.bf16 may pass them; -1 when the instruction has none)
};

void wgmma_fence();
void wgmma_mma_async(const WgmmaMma& op);
void wgmma_commit_group();
void wgmma_wait_group(uint32_t n);

}  // namespace r1k_emu
