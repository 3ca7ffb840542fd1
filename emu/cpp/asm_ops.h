// What the lifting step (build/lift.rs) turns kernel code into: every GNU `asm` statement becomes a call of
// inline_ptx with its literal template and its operands, numbered as GCC numbers them (outputs, then inputs); every
// `__shared__` declaration becomes a per-CTA allocation; every `extern "C" __global__` definition gets a registry
// entry whose trampoline unpacks cuLaunchKernel's parameter array into the kernel's own parameter types.
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

namespace r1k_emu {

// One asm operand. Outputs ("=r", "+f", ...) point at the C++ lvalue; inputs ("r", "l", "h", "f", "n") carry their
// value (up to 8 bytes, zero-extended, or sign-extended for signed integer types).
struct AsmOperand {
    const char* constraint;
    void* lvalue;     // outputs only
    uint32_t size;    // bytes of the C++ object
    uint64_t value;   // inputs only
};

template <class T>
inline AsmOperand asm_out(const char* constraint, T& lvalue) {
    static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8, "asm operands are registers");
    return AsmOperand{constraint, static_cast<void*>(&lvalue), static_cast<uint32_t>(sizeof(T)), 0};
}

template <class T>
inline AsmOperand asm_in(const char* constraint, const T& v) {
    static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8, "asm operands are registers");
    uint64_t bits = 0;
    if constexpr (std::is_integral<T>::value && std::is_signed<T>::value) {
        bits = static_cast<uint64_t>(static_cast<int64_t>(v));
    } else {
        std::memcpy(&bits, &v, sizeof(T));
    }
    return AsmOperand{constraint, nullptr, static_cast<uint32_t>(sizeof(T)), bits};
}

// Executes one inline-PTX statement for the calling thread. `site` is "file:line" of the asm statement.
void inline_ptx(const char* site, const char* ptx, AsmOperand* operands, int count);

// Per-CTA shared memory. `id` is unique per __shared__ declaration; every thread of a CTA gets the same storage.
void* static_smem(const char* id, uint32_t bytes, uint32_t align);
void* dynamic_smem();

// ---- kernel registry ----
struct KernelEntry {
    const char* name;
    void (*trampoline)(void** params);
    int param_count;
    const uint32_t* param_sizes;
};

// Adds a kernel to the registry the driver looks names up in (called from static initializers of the lifted TUs).
bool register_kernel(const char* name, void (*trampoline)(void** params), int param_count, const uint32_t* param_sizes);

// cuLaunchKernel's parameter pointers need not be aligned for the parameter's type (a CUtensorMap is 64-byte
// aligned): copy each through aligned storage.
template <class T>
inline T load_param(const void* p) {
    static_assert(std::is_trivially_copyable<T>::value, "kernel parameters are trivially copyable");
    alignas(T) unsigned char storage[sizeof(T)];
    std::memcpy(storage, p, sizeof(T));
    return *reinterpret_cast<T*>(storage);
}

template <class... A, size_t... I>
inline void invoke_unpacked(void (*f)(A...), void** p, std::index_sequence<I...>) {
    f(load_param<std::remove_cv_t<std::remove_reference_t<A>>>(p[I])...);
}
template <class... A>
inline void invoke_kernel(void (*f)(A...), void** p) {
    invoke_unpacked(f, p, std::index_sequence_for<A...>{});
}
template <class... A>
struct ParamSizes {
    static constexpr uint32_t sizes[sizeof...(A) + 1] = {static_cast<uint32_t>(sizeof(std::remove_cv_t<std::remove_reference_t<A>>))..., 0};
    static constexpr int count = sizeof...(A);
};
template <class... A>
constexpr ParamSizes<A...> param_sizes_of(void (*)(A...)) { return {}; }

}  // namespace r1k_emu
