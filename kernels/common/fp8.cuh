// Shared FP8 helpers. Every function here has a Rust twin in src/fp8.rs or src/reference/quant.rs and must stay
// bit-identical to it.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <stdint.h>

namespace r1k {

constexpr float kE4M3Max = 448.0f;
constexpr float kAmaxFloor = 1e-4f;

// Twin of fp8::ue8m0::round_up_pow2: clear the mantissa, bump the exponent if it was non-zero.
__device__ __forceinline__ float round_up_pow2(float s) {
    uint32_t bits = __float_as_uint(s);
    uint32_t rounded = (bits & 0x7f800000u) + ((bits & 0x007fffffu) ? 0x00800000u : 0u);
    return __uint_as_float(rounded);
}

// Twin of reference::quant::scale_for_amax.
__device__ __forceinline__ float scale_for_amax(float amax, bool ue8m0) {
    float scale = __fdiv_rn(fmaxf(amax, kAmaxFloor), kE4M3Max);
    return ue8m0 ? round_up_pow2(scale) : scale;
}

// Round-to-nearest-even, saturating (NaN stays NaN): E4M3::from_f32.
__device__ __forceinline__ uint8_t f32_to_e4m3(float x) {
    return static_cast<uint8_t>(__nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3));
}

// Packs two values, the first in the low byte.
__device__ __forceinline__ uint16_t f32x2_to_e4m3x2(float lo, float hi) {
    return static_cast<uint16_t>(__nv_cvt_float2_to_fp8x2(make_float2(lo, hi), __NV_SATFINITE, __NV_E4M3));
}

__device__ __forceinline__ float e4m3_to_f32(uint8_t code) {
    __half_raw h = __nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(code), __NV_E4M3);
    return __half2float(__half(h));
}

}  // namespace r1k
