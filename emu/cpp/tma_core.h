// Pure model of the Tensor Memory Accelerator's tiled mode: the emulator's own CUtensorMap encoding, the
// cuTensorMapEncodeTiled validator, the shared-memory swizzle functions and the box copy of
// `cp.async.bulk.tensor` (global -> shared, .tile). No dependency on the execution engine (runtime.h), so it can be
// unit-tested standalone (tests/tma_test.cpp); tma.cpp wires it to the engine.
//
// Sources (and nothing else; in particular not this crate's own helpers):
//   * PTX ISA 9.0, section "Tensors" ("Tensor Dimension, size and format", "Tiled Mode" with "Bounding Box",
//     "Traversal-Stride", "Out of Boundary Access", "Interleave layout", "Swizzling Modes", "Tensor-map") and the
//     instruction page "cp.async.bulk.tensor" (with "Restriction on Tensor Copy instructions").
//   * CUDA driver API reference of cuTensorMapEncodeTiled (the doc comment in cuda.h of CUDA 13.0, which is the
//     same text as docs.nvidia.com/cuda/cuda-driver-api/group__CUDA__TENSOR__MEMORY.html).
//   * CuTe (CUTLASS): cute/swizzle.hpp (Swizzle<B,M,S>), cute/pointer_swizzle.hpp (swizzles are applied to the
//     absolute shared-memory address: "Arch chose to design hardware with position-dependent swizzles"),
//     cute/atom/copy_traits_sm90_tma_swizzle.hpp (get_tma_swizzle_bits: Swizzle<3,4,3> = 128B, <2,4,3> = 64B,
//     <1,4,3> = 32B), used as the oracle in the tests.
//
// Every function returns an empty string on success and otherwise a sentence naming the violated rule.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace r1k_emu {
namespace tma {

// ---- the driver's enum values (cuda.h, CUtensorMap*), restated so this header needs no cuda.h; the tests
// static_assert that they equal cuda.h's. ----
enum DataType : int {
    kUint8 = 0,
    kUint16,
    kUint32,
    kInt32,
    kUint64,
    kInt64,
    kFloat16,
    kFloat32,
    kFloat64,
    kBfloat16,
    kFloat32Ftz,
    kTfloat32,
    kTfloat32Ftz,
    k16U4Align8B,
    k16U4Align16B,
    k16U6Align16B,
    kDataTypeCount
};
enum Interleave : int { kInterleaveNone = 0, kInterleave16B, kInterleave32B, kInterleaveCount };
enum Swizzle : int {
    kSwizzleNone = 0,
    kSwizzle32B,
    kSwizzle64B,
    kSwizzle128B,
    kSwizzle128BAtom32B,
    kSwizzle128BAtom32BFlip8B,
    kSwizzle128BAtom64B,
    kSwizzleCount
};
enum L2Promotion : int { kL2None = 0, kL2_64B, kL2_128B, kL2_256B, kL2Count };
enum OobFill : int { kOobFillNone = 0, kOobFillNanRequestZeroFma, kOobFillCount };

constexpr size_t kTensorMapBytes = 128;  // PTX ISA "Tensor-map": a 128-byte opaque object
constexpr uint32_t kMaxRank = 5;         // PTX ISA "Tensor Dimension, size and format": 1D..5D

// Every parameter of one cuTensorMapEncodeTiled call (entries past `rank` are zero).
struct TensorMapParams {
    int data_type = 0;
    uint32_t rank = 0;
    uint64_t global_address = 0;
    uint64_t global_dim[kMaxRank] = {};
    uint64_t global_strides[kMaxRank - 1] = {};  // bytes; global_strides[i] is the stride of dimension i + 1
    uint32_t box_dim[kMaxRank] = {};
    uint32_t element_strides[kMaxRank] = {};
    int interleave = 0;
    int swizzle = 0;
    int l2_promotion = 0;
    int oob_fill = 0;
};

// Size of one element in bits (cuda.h: "1 byte" ... "4 bits", "6 bits"); 0 for an unknown type.
uint32_t element_bits(int data_type);
bool is_float_type(int data_type);   // the types cuTensorMapEncodeTiled calls floating-point
bool is_packed_type(int data_type);  // the 16U4/16U6 sub-byte types
const char* data_type_name(int data_type);
const char* swizzle_name(int swizzle);

// ---- encoder / decoder ----
// Checks every requirement the cuTensorMapEncodeTiled documentation states; `map_address` is the tensorMap pointer
// (it must be 64-byte aligned).
std::string validate_tiled(const TensorMapParams& p, uint64_t map_address);
// validate_tiled, then writes the emulator's own 128-byte encoding (magic, every parameter, checksum) into `map`.
// Nothing is written when validation fails.
std::string encode_tiled(void* map, const TensorMapParams& p);
// Reads an encoding written by encode_tiled: checks the magic, the checksum and the reserved bytes, and validates the
// parameters again (a corrupted or hand-made map is refused, never interpreted).
std::string decode(const void* map, TensorMapParams* out);

// ---- swizzling (PTX ISA "Swizzling Modes") ----
// The swizzle span in bytes: 0 (none), 32, 64, 128 (the 128B_ATOM_* modes also span 128 B).
uint32_t swizzle_span_bytes(int swizzle);
// Where the byte at absolute shared-memory address `addr` of the unswizzled (linear) box image is stored. Only the
// 16-byte-atomicity modes none/32B/64B/128B are modelled; the caller must have refused the others (check_load does).
uint32_t swizzle_address(int swizzle, uint32_t addr);

// ---- the box of one tiled cp.async.bulk.tensor load (global -> shared) ----
struct BoxInfo {
    uint32_t elem_bytes = 0;
    uint32_t rank = 0;
    uint64_t elements = 0;      // elements in the box
    uint64_t box_bytes = 0;     // bytes the box occupies in shared memory, = the complete_tx byte count
    uint64_t oob_elements = 0;  // elements outside the tensor (filled, not read)
    bool any_in_bounds = false;
    // In-bounds elements lie in [global_address + global_lo, global_address + global_hi) (when any_in_bounds).
    uint64_t global_lo = 0, global_hi = 0;
};
// Validates one load of the box at tensor coordinates `coords` (innermost first, `dims` of them) into shared memory at
// absolute shared address `dst_addr`, against a map that decoded successfully, and describes the box. Refuses what the
// model does not cover (interleave, sub-byte types, traversal strides != 1, swizzle atomicity sub-modes, a swizzled
// box whose inner extent is not the full swizzle span, OOB-NaN fill of an element that is out of bounds).
std::string check_load(const TensorMapParams& p, uint32_t dims, const int32_t coords[], uint32_t dst_addr,
                       BoxInfo* info);

// One element of the box, in row-major box order (dimension 0 fastest).
struct BoxElement {
    bool oob = false;            // outside the tensor: filled, not read
    uint64_t global_offset = 0;  // byte offset from global_address (meaningless when oob)
    uint32_t smem_addr = 0;      // absolute shared address the element lands at, after swizzling
};
// The element list of a load that passed check_load: the specification-level form of the copy.
void box_elements(const TensorMapParams& p, const int32_t coords[], uint32_t dst_addr, std::vector<BoxElement>* out);
// Performs the copy of a load that passed check_load: reads the in-bounds elements from `global` (the host view of
// global_address), zero-fills the out-of-bounds ones, and writes the swizzled image into `dst`, the host view of the
// box_bytes bytes at shared address `dst_addr`. Equivalent to box_elements, but row- and chunk-wise.
void box_copy(const TensorMapParams& p, const int32_t coords[], uint32_t dst_addr, const uint8_t* global,
              uint8_t* dst);

}  // namespace tma
}  // namespace r1k_emu
