// C ABI between the emulated CUDA driver (Rust, src/) and the execution engine (C++, cpp/). Everything the driver
// needs from the engine goes through here; nothing else crosses the language boundary. The engine is
// single-threaded: the driver serializes every call (registration, encoding, lookup, launch) under one lock. A
// standalone engine library exporting these symbols can replace the linked-in one (R1K_EMU_ENGINE=path).
#pragma once
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// ---- kernel registry (generated from kernels/*.cu by build.rs) ----
// Number of kernels compiled into the emulator, and the name of the i-th.
int r1k_emu_kernel_count(void);
const char* r1k_emu_kernel_name(int i);
// Opaque handle of the kernel called `name`, or NULL when the emulator has no such kernel.
const void* r1k_emu_find_kernel(const char* name);
// Sizes in bytes of the kernel's parameters, in order (what its trampoline reads from cuLaunchKernel's array);
// returns how many it has, writing at most `max`.
int r1k_emu_kernel_param_sizes(const void* kernel, uint32_t* sizes, int max);

// ---- launches ----
typedef struct {
    uint32_t grid[3];
    uint32_t block[3];
    uint32_t cluster[3];  // {1,1,1} when launched without a cluster attribute
    uint32_t dynamic_smem_bytes;
    uint32_t max_dynamic_smem_bytes;  // the function's CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
} r1k_emu_launch_config;

// Runs the kernel to completion on the calling thread. Returns 0 on success. On failure returns a CUresult value
// (CUDA_ERROR_LAUNCH_FAILED for faults, traps, hangs and rule violations; CUDA_ERROR_INVALID_VALUE for a bad
// configuration) and writes a NUL-terminated description (kernel, CTA, thread, rule) into err.
int r1k_emu_launch(const void* kernel, const r1k_emu_launch_config* config, void** params, char* err, size_t err_len);

// ---- device memory ----
// Every device allocation is host memory registered here, so the engine can check global accesses made through
// TMA and cp.async (and ASan checks plain loads and stores).
void r1k_emu_register_alloc(uint64_t ptr, uint64_t bytes);
void r1k_emu_unregister_alloc(uint64_t ptr);

// ---- tensor maps (cuTensorMapEncodeTiled) ----
// Validates every documented requirement and writes the emulator's own 128-byte encoding into `map`. Returns a
// CUresult value (0 = success, CUDA_ERROR_INVALID_VALUE = 1 otherwise) and a reason in err.
int r1k_emu_tensor_map_encode_tiled(void* map, int data_type, uint32_t rank, void* global_address,
                                    const uint64_t* global_dim, const uint64_t* global_strides,
                                    const uint32_t* box_dim, const uint32_t* element_strides, int interleave,
                                    int swizzle, int l2_promotion, int oob_fill, char* err, size_t err_len);

#ifdef __cplusplus
}
#endif
