// Pure TMA tiled-mode model; see tma_core.h for the sources. "driver doc" below means the requirement list of
// cuTensorMapEncodeTiled in the CUDA driver API reference (cuda.h, CUDA 13.0); "ISA" means PTX ISA 9.0.
#include "tma_core.h"

#include <cinttypes>
#include <cstdarg>
#include <cstdio>
#include <cstring>

namespace r1k_emu {
namespace tma {

namespace {

std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
std::string format(const char* fmt, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    return buf;
}

__extension__ typedef unsigned __int128 u128;  // stride products reach 2^72

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
// Data types
// ---------------------------------------------------------------------------------------------------------------

uint32_t element_bits(int t) {
    // driver doc, CUtensorMapDataType: the size comment of each enumerator.
    switch (t) {
        case kUint8: return 8;
        case kUint16: case kFloat16: case kBfloat16: return 16;
        case kUint32: case kInt32: case kFloat32: case kFloat32Ftz: case kTfloat32: case kTfloat32Ftz: return 32;
        case kUint64: case kInt64: case kFloat64: return 64;
        case k16U4Align8B: case k16U4Align16B: return 4;
        case k16U6Align16B: return 6;
        default: return 0;
    }
}

bool is_float_type(int t) {
    return t == kFloat16 || t == kFloat32 || t == kFloat64 || t == kBfloat16 || t == kFloat32Ftz || t == kTfloat32 ||
           t == kTfloat32Ftz;
}

bool is_packed_type(int t) { return t == k16U4Align8B || t == k16U4Align16B || t == k16U6Align16B; }

const char* data_type_name(int t) {
    static const char* const names[] = {"UINT8",    "UINT16",      "UINT32",   "INT32",        "UINT64",
                                        "INT64",    "FLOAT16",     "FLOAT32",  "FLOAT64",      "BFLOAT16",
                                        "FLOAT32_FTZ", "TFLOAT32", "TFLOAT32_FTZ", "16U4_ALIGN8B", "16U4_ALIGN16B",
                                        "16U6_ALIGN16B"};
    return t >= 0 && t < kDataTypeCount ? names[t] : "(invalid data type)";
}

const char* swizzle_name(int s) {
    static const char* const names[] = {"NONE", "32B", "64B", "128B", "128B_ATOM_32B", "128B_ATOM_32B_FLIP_8B",
                                        "128B_ATOM_64B"};
    return s >= 0 && s < kSwizzleCount ? names[s] : "(invalid swizzle)";
}

// ---------------------------------------------------------------------------------------------------------------
// cuTensorMapEncodeTiled requirements
// ---------------------------------------------------------------------------------------------------------------

std::string validate_tiled(const TensorMapParams& p, uint64_t map_address) {
    const char* E = "cuTensorMapEncodeTiled: ";
    // driver doc: "tensorMap address must be aligned to 64 bytes."
    if (map_address % 64 != 0)
        return format("%stensorMap address 0x%" PRIx64 " must be aligned to 64 bytes", E, map_address);

    // Enumerations first, so the rules below compare known values. driver doc: each parameter "has to be an enum
    // from" / "must be of type" its CUtensorMap* enumeration.
    if (p.data_type < 0 || p.data_type >= kDataTypeCount)
        return format("%stensorDataType %d is not a CUtensorMapDataType value", E, p.data_type);
    if (p.interleave < 0 || p.interleave >= kInterleaveCount)
        return format("%sinterleave %d is not a CUtensorMapInterleave value", E, p.interleave);
    if (p.swizzle < 0 || p.swizzle >= kSwizzleCount)
        return format("%sswizzle %d is not a CUtensorMapSwizzle value", E, p.swizzle);
    if (p.l2_promotion < 0 || p.l2_promotion >= kL2Count)
        return format("%sl2Promotion %d is not a CUtensorMapL2promotion value", E, p.l2_promotion);
    if (p.oob_fill < 0 || p.oob_fill >= kOobFillCount)
        return format("%soobFill %d is not a CUtensorMapFloatOOBfill value", E, p.oob_fill);

    const int t = p.data_type;
    const uint32_t bits = element_bits(t);
    const bool align16b_packed = t == k16U4Align16B || t == k16U6Align16B;
    const bool il = p.interleave != kInterleaveNone;

    // driver doc: "tensorRank must be non-zero and less than or equal to the maximum supported dimensionality of 5.
    // If interleave is not CU_TENSOR_MAP_INTERLEAVE_NONE, then tensorRank must additionally be greater than or equal
    // to 3." (ISA "Interleave layout": "supported only for the dimensionalities : 3D, 4D and 5D".)
    if (p.rank == 0 || p.rank > kMaxRank) return format("%stensorRank %u must be in 1..5", E, p.rank);
    if (il && p.rank < 3)
        return format("%stensorRank %u must be >= 3 when interleave is not NONE", E, p.rank);

    // driver doc: "globalAddress ... must be 16 byte aligned"; 32 with INTERLEAVE_32B and with the ALIGN16B packed
    // types.
    if (p.global_address % 16 != 0)
        return format("%sglobalAddress 0x%" PRIx64 " must be 16-byte aligned", E, p.global_address);
    if (p.interleave == kInterleave32B && p.global_address % 32 != 0)
        return format("%sglobalAddress 0x%" PRIx64 " must be 32-byte aligned with INTERLEAVE_32B", E,
                      p.global_address);
    if (align16b_packed && p.global_address % 32 != 0)
        return format("%sglobalAddress 0x%" PRIx64 " must be 32-byte aligned with data type %s", E, p.global_address,
                      data_type_name(t));

    // driver doc: "globalDim ... must be non-zero and less than or equal to 2^32", plus the packed-type rules.
    for (uint32_t i = 0; i < p.rank; ++i) {
        if (p.global_dim[i] == 0 || p.global_dim[i] > (uint64_t(1) << 32))
            return format("%sglobalDim[%u] = %" PRIu64 " must be in 1..2^32", E, i, p.global_dim[i]);
    }
    if (align16b_packed && p.global_dim[0] % 128 != 0)
        return format("%sglobalDim[0] = %" PRIu64 " must be a multiple of 128 with data type %s", E, p.global_dim[0],
                      data_type_name(t));
    if (t == k16U4Align8B && p.global_dim[0] % 2 != 0)
        return format("%sglobalDim[0] = %" PRIu64 " must be a multiple of 2 with data type %s", E, p.global_dim[0],
                      data_type_name(t));

    // driver doc: "globalStrides ... must be a multiple of 16 and less than 2^40"; a multiple of 32 with
    // INTERLEAVE_32B and with the ALIGN16B packed types. "Each following dimension specified includes previous
    // dimension stride":
    //     globalStrides[0] = globalDim[0] * elementSizeInBytes(tensorDataType) + padding[0];
    //     globalStrides[i] = globalStrides[i - 1] * (globalDim[i] + padding[i]);
    // Implemented as "every padding is >= 0", i.e. globalStrides[0] >= globalDim[0] * element size and
    // globalStrides[i] >= globalStrides[i - 1] * globalDim[i] (dimensions never overlap). Not required: that
    // globalStrides[i] be an exact multiple of globalStrides[i - 1] (the formula could be read that way, but the
    // padding is described as alignment padding; refusing that would reject ordinary pitched layouts).
    for (uint32_t i = 0; i + 1 < p.rank; ++i) {
        const uint64_t s = p.global_strides[i];
        if (s % 16 != 0) return format("%sglobalStrides[%u] = %" PRIu64 " must be a multiple of 16", E, i, s);
        if (s >= (uint64_t(1) << 40)) return format("%sglobalStrides[%u] = %" PRIu64 " must be < 2^40", E, i, s);
        if (p.interleave == kInterleave32B && s % 32 != 0)
            return format("%sglobalStrides[%u] = %" PRIu64 " must be a multiple of 32 with INTERLEAVE_32B", E, i, s);
        if (align16b_packed && s % 32 != 0)
            return format("%sglobalStrides[%u] = %" PRIu64 " must be a multiple of 32 with data type %s", E, i, s,
                          data_type_name(t));
        const u128 need = i == 0 ? (u128(p.global_dim[0]) * bits + 7) / 8
                                 : u128(p.global_strides[i - 1]) * p.global_dim[i];
        if (u128(s) < need)
            return format("%sglobalStrides[%u] = %" PRIu64 " is smaller than %s (%" PRIu64
                          "): the documented stride formula needs padding >= 0",
                          E, i, s, i == 0 ? "globalDim[0] * element size" : "globalStrides[i-1] * globalDim[i]",
                          uint64_t(need));
    }

    // driver doc: "boxDim ... must be non-zero and less than or equal to 256"; with INTERLEAVE_NONE
    // "boxDim[0] * elementSizeInBytes(tensorDataType) must be a multiple of 16 bytes"; with the ALIGN16B packed types
    // "boxDim[0] must be 128". (ISA "Bounding Box": "Size of each bounding Box must be a multiple of 16 bytes.")
    for (uint32_t i = 0; i < p.rank; ++i) {
        if (p.box_dim[i] == 0 || p.box_dim[i] > 256)
            return format("%sboxDim[%u] = %u must be in 1..256", E, i, p.box_dim[i]);
    }
    const uint64_t inner_bits = uint64_t(p.box_dim[0]) * bits;
    if (!il && inner_bits % 128 != 0)
        return format("%sboxDim[0] * element size = %" PRIu64 "%s must be a multiple of 16 bytes", E,
                      inner_bits / 8, inner_bits % 8 ? ".5 B" : " B");
    if (align16b_packed && p.box_dim[0] != 128)
        return format("%sboxDim[0] = %u must be 128 with data type %s", E, p.box_dim[0], data_type_name(t));

    // driver doc: "elementStrides ... must be non-zero and less than or equal to 8" (elementStrides[0] is then
    // ignored with INTERLEAVE_NONE, but it still has to be in range).
    for (uint32_t i = 0; i < p.rank; ++i) {
        if (p.element_strides[i] == 0 || p.element_strides[i] > 8)
            return format("%selementStrides[%u] = %u must be in 1..8", E, i, p.element_strides[i]);
    }

    // driver doc, interleave: with INTERLEAVE_NONE and a swizzle, "the bounding box inner dimension (computed as
    // boxDim[0] multiplied by element size derived from tensorDataType) must be less than or equal to the swizzle
    // size" (32, 64, 128 for all 128B* modes); "tensorDataType of 16U6_ALIGN16B requires interleave to be NONE".
    if (!il && p.swizzle != kSwizzleNone && inner_bits > 8ull * swizzle_span_bytes(p.swizzle))
        return format("%sbox inner dimension %" PRIu64 " B exceeds the %u-byte span of SWIZZLE_%s", E,
                      (inner_bits + 7) / 8, swizzle_span_bytes(p.swizzle), swizzle_name(p.swizzle));
    if (t == k16U6Align16B && il) return format("%sdata type 16U6_ALIGN16B requires INTERLEAVE_NONE", E);

    // driver doc, swizzle: "When interleave is CU_TENSOR_MAP_INTERLEAVE_32B, swizzle must be
    // CU_TENSOR_MAP_SWIZZLE_32B"; the packed types allow only listed modes (16U6_ALIGN16B: NONE, 128B,
    // 128B_ATOM_32B, 128B_ATOM_64B (store only; a map does not know its direction, so accepted here);
    // 16U4_ALIGN16B: NONE, 128B, 128B_ATOM_32B).
    if (p.interleave == kInterleave32B && p.swizzle != kSwizzle32B)
        return format("%sINTERLEAVE_32B requires SWIZZLE_32B, not SWIZZLE_%s", E, swizzle_name(p.swizzle));
    if (t == k16U6Align16B && !(p.swizzle == kSwizzleNone || p.swizzle == kSwizzle128B ||
                                p.swizzle == kSwizzle128BAtom32B || p.swizzle == kSwizzle128BAtom64B))
        return format("%sdata type 16U6_ALIGN16B does not support SWIZZLE_%s", E, swizzle_name(p.swizzle));
    if (t == k16U4Align16B &&
        !(p.swizzle == kSwizzleNone || p.swizzle == kSwizzle128B || p.swizzle == kSwizzle128BAtom32B))
        return format("%sdata type 16U4_ALIGN16B does not support SWIZZLE_%s", E, swizzle_name(p.swizzle));

    // driver doc, oobFill: "CU_TENSOR_MAP_FLOAT_OOB_FILL_NAN_REQUEST_ZERO_FMA can only be used when tensorDataType
    // represents a floating-point data type, and when tensorDataType is not" one of the packed types.
    if (p.oob_fill == kOobFillNanRequestZeroFma && !is_float_type(t))
        return format("%sOOB_FILL_NAN_REQUEST_ZERO_FMA needs a floating-point data type, not %s", E,
                      data_type_name(t));
    return "";
}

// ---------------------------------------------------------------------------------------------------------------
// The emulator's encoding. The real CUtensorMap format is undocumented ("an opaque value"), so the emulator only
// accepts maps made by its own encoder. Little-endian byte layout (x86 host):
//    0  u64   magic "R1KEMTM1"
//    8  u64   globalAddress
//   16  u64x5 globalDim
//   56  u64x4 globalStrides
//   88  u16x5 boxDim
//   98  u8x5  elementStrides
//  103  u8    tensorDataType, rank, interleave, swizzle, l2Promotion, oobFill (103..108)
//  109  zero  (reserved, must be 0)
//  120  u64   FNV-1a 64 of bytes 0..119
// ---------------------------------------------------------------------------------------------------------------

namespace {

constexpr uint64_t kMagic = 0x314D544D454B3152ull;  // bytes "R1KEMTM1"
constexpr size_t kOffAddr = 8, kOffDim = 16, kOffStride = 56, kOffBox = 88, kOffEs = 98, kOffSmall = 103,
                 kOffReserved = 109, kOffSum = 120;

uint64_t fnv1a(const uint8_t* p, size_t n) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; ++i) {
        h ^= p[i];
        h *= 0x100000001b3ull;
    }
    return h;
}

template <class T>
void put(uint8_t* m, size_t off, T v) {
    memcpy(m + off, &v, sizeof v);
}
template <class T>
T get(const uint8_t* m, size_t off) {
    T v;
    memcpy(&v, m + off, sizeof v);
    return v;
}

}  // namespace

std::string encode_tiled(void* map, const TensorMapParams& p) {
    std::string err = validate_tiled(p, reinterpret_cast<uintptr_t>(map));
    if (!err.empty()) return err;
    uint8_t m[kTensorMapBytes] = {};
    put(m, 0, kMagic);
    put(m, kOffAddr, p.global_address);
    for (uint32_t i = 0; i < p.rank; ++i) {
        put(m, kOffDim + 8 * i, p.global_dim[i]);
        if (i + 1 < p.rank) put(m, kOffStride + 8 * i, p.global_strides[i]);
        put(m, kOffBox + 2 * i, uint16_t(p.box_dim[i]));
        put(m, kOffEs + i, uint8_t(p.element_strides[i]));
    }
    const uint8_t small[6] = {uint8_t(p.data_type), uint8_t(p.rank),         uint8_t(p.interleave),
                              uint8_t(p.swizzle),   uint8_t(p.l2_promotion), uint8_t(p.oob_fill)};
    memcpy(m + kOffSmall, small, sizeof small);
    put(m, kOffSum, fnv1a(m, kOffSum));
    memcpy(map, m, sizeof m);
    return "";
}

std::string decode(const void* map, TensorMapParams* out) {
    if (map == nullptr) return "tensor map pointer is null";
    uint8_t m[kTensorMapBytes];
    memcpy(m, map, sizeof m);
    if (get<uint64_t>(m, 0) != kMagic)
        return "not a tensor map made by the emulator's cuTensorMapEncodeTiled (bad magic number)";
    if (get<uint64_t>(m, kOffSum) != fnv1a(m, kOffSum))
        return "tensor map checksum mismatch (the 128 bytes were modified after cuTensorMapEncodeTiled)";
    for (size_t i = kOffReserved; i < kOffSum; ++i)
        if (m[i] != 0) return "tensor map reserved bytes are not zero";
    TensorMapParams p;
    p.global_address = get<uint64_t>(m, kOffAddr);
    p.data_type = m[kOffSmall + 0];
    p.rank = m[kOffSmall + 1];
    p.interleave = m[kOffSmall + 2];
    p.swizzle = m[kOffSmall + 3];
    p.l2_promotion = m[kOffSmall + 4];
    p.oob_fill = m[kOffSmall + 5];
    if (p.rank == 0 || p.rank > kMaxRank) return "tensor map rank out of range";
    for (uint32_t i = 0; i < kMaxRank; ++i) {
        const bool used = i < p.rank;
        p.global_dim[i] = get<uint64_t>(m, kOffDim + 8 * i);
        if (i + 1 < kMaxRank) p.global_strides[i] = get<uint64_t>(m, kOffStride + 8 * i);
        p.box_dim[i] = get<uint16_t>(m, kOffBox + 2 * i);
        p.element_strides[i] = m[kOffEs + i];
        if (!used && (p.global_dim[i] || p.box_dim[i] || p.element_strides[i]))
            return "tensor map has entries beyond its rank";
        if (i + 1 < kMaxRank && i + 1 >= p.rank && p.global_strides[i])
            return "tensor map has strides beyond its rank";
    }
    // The same rules as at encode time; the map's own address is not known here (it was checked at encode time).
    std::string err = validate_tiled(p, 0);
    if (!err.empty()) return "tensor map fails validation: " + err;
    *out = p;
    return "";
}

// ---------------------------------------------------------------------------------------------------------------
// Swizzling. ISA "Swizzling Modes": the tables show, for each 128-byte shared memory line (a table row), which
// 16-byte chunk of the source lands in each 16-byte slot, for a destination whose "starting address is" 256 (32B),
// 512 (64B) or 1024 (128B) bytes aligned; the pattern then repeats:
//   32B : line 1 holds chunks 1 0 3 2 5 4 7 6           -> chunk bit 0      ^= line bit 0
//   64B : lines 0..3 hold chunk ^ line (2 bits)         -> chunk bits [1:0] ^= line bits [1:0]
//   128B: lines 0..7 hold chunk ^ line (3 bits)         -> chunk bits [2:0] ^= line bits [2:0]
// A destination that is not so aligned starts inside the pattern: "the swizzle base offset is ... (dstMem / 128) % 8"
// (128B; % 4 for 64B, % 2 for 32B), i.e. the pattern row is taken from the ABSOLUTE address. In address bits
// (chunk = bits 4..6, line = bits 7..): 128B: bits[6:4] ^= bits[9:7]; 64B: bits[5:4] ^= bits[8:7]; 32B: bit 4 ^= bit
// 7. This is CuTe's Swizzle<3,4,3>, Swizzle<2,4,3>, Swizzle<1,4,3> (get_tma_swizzle_bits) applied to the shared
// memory pointer itself (cute::swizzle_ptr), which tests/tma_test.cpp checks exhaustively.
// ---------------------------------------------------------------------------------------------------------------

uint32_t swizzle_span_bytes(int s) {
    switch (s) {
        case kSwizzle32B: return 32;
        case kSwizzle64B: return 64;
        case kSwizzle128B: case kSwizzle128BAtom32B: case kSwizzle128BAtom32BFlip8B: case kSwizzle128BAtom64B:
            return 128;
        default: return 0;
    }
}

uint32_t swizzle_address(int s, uint32_t addr) {
    uint32_t line_bits;
    switch (s) {
        case kSwizzle32B: line_bits = 1; break;
        case kSwizzle64B: line_bits = 2; break;
        case kSwizzle128B: line_bits = 3; break;
        default: return addr;  // none (the atomicity sub-modes never get here: check_load refuses them)
    }
    const uint32_t mask = (1u << line_bits) - 1;
    return addr ^ (((addr >> 7) & mask) << 4);
}

// ---------------------------------------------------------------------------------------------------------------
// The box.
// ISA "Tensors": "PTX Tensor instructions treat the tensor data in the global memory as a multi-dimensional structure
// and treat the data in the shared memory as a linear data"; "Tensor Access Modes": "In tiled mode, the source
// multi-dimensional tensor layout is preserved at the destination". So the box is stored densely, row-major with
// dimension 0 fastest (element (j0..jn) at linear byte ((jn * b(n-1) + ...) * b0 + j0) * elem_bytes), and the
// swizzle then permutes 16-byte chunks of that linear image by their absolute address.
// ISA "Bounding Box": the tensor coordinates "specify the starting offset of the bounding box"; element j of
// dimension i is at tensor coordinate coords[i] + j (traversal stride 1). ISA "Out of Boundary Access": elements
// "which fall outside of the tensor boundary" (coordinate < 0 or >= globalDim) are set to 0 (zero fill mode) or to
// "a special NaN called OOB-NaN" (its bit pattern is not documented: refused below).
// ---------------------------------------------------------------------------------------------------------------

std::string check_load(const TensorMapParams& p, uint32_t dims, const int32_t coords[], uint32_t dst_addr,
                       BoxInfo* info) {
    const char* E = "cp.async.bulk.tensor: ";
    // ISA cp.async.bulk.tensor: "The dimension of the tensor data is specified by the .dim modifier."
    if (dims != p.rank)
        return format("%sthe instruction is .%ud but the tensor map has rank %u", E, dims, p.rank);
    // Refusals: parts of the tiled mode the ISA describes too loosely (or only by figures) to model with confidence,
    // and that no kernel of this crate uses.
    if (p.interleave != kInterleaveNone)
        return format("%sinterleaved layouts (ISA \"Interleave layout\") are not modelled by the emulator", E);
    if (is_packed_type(p.data_type))
        return format("%ssub-byte data type %s is not modelled by the emulator", E, data_type_name(p.data_type));
    for (uint32_t i = 1; i < p.rank; ++i)
        if (p.element_strides[i] != 1)
            return format("%selementStrides[%u] = %u: traversal strides other than 1 (ISA \"Traversal-Stride\") are "
                          "not modelled by the emulator",
                          E, i, p.element_strides[i]);
    // elementStrides[0] is ignored with INTERLEAVE_NONE (driver doc; ISA "Traversal-Stride": "For non-interleaved
    // layout, the traversal stride in dimension 0 must always be 1"), so dimension 0 is always traversed densely.
    if (p.swizzle >= kSwizzle128BAtom32B)
        return format("%sSWIZZLE_%s: the swizzle-atomicity sub-modes are not modelled by the emulator", E,
                      swizzle_name(p.swizzle));
    const uint32_t eb = element_bits(p.data_type) / 8;
    const uint64_t inner = uint64_t(p.box_dim[0]) * eb;
    if (p.swizzle != kSwizzleNone && inner != swizzle_span_bytes(p.swizzle))
        return format("%sSWIZZLE_%s with a %" PRIu64 "-byte box inner dimension: the ISA's swizzle tables only show "
                      "boxes whose inner dimension is the full swizzle span; refused rather than guessed",
                      E, swizzle_name(p.swizzle), inner);
    // Shared-memory destination alignment. ISA "Bounding Box": "The address of the bounding Box must also be aligned
    // to 16 bytes". The CUDA C++ Programming Guide's TMA alignment table is stricter: the shared memory address
    // "must be 128 byte aligned". The stricter rule is enforced: a kernel relying on less would not be portable to
    // what NVIDIA documents. (128-byte alignment also keeps every swizzled row inside its own 128-byte line, so the
    // swizzled image occupies exactly [dst, dst + box bytes).)
    if (dst_addr % 128 != 0)
        return format("%sshared memory destination 0x%x is not 128-byte aligned (CUDA Programming Guide, TMA; the "
                      "PTX ISA \"Bounding Box\" section requires at least 16)",
                      E, dst_addr);

    BoxInfo b;
    b.elem_bytes = eb;
    b.rank = p.rank;
    b.elements = 1;
    uint64_t in_bounds = 1;
    for (uint32_t i = 0; i < p.rank; ++i) {
        b.elements *= p.box_dim[i];
        const int64_t lo = coords[i], hi = int64_t(coords[i]) + p.box_dim[i];  // [lo, hi) tensor coordinates
        const int64_t ilo = lo < 0 ? 0 : lo;
        const int64_t ihi = hi > int64_t(p.global_dim[i]) ? int64_t(p.global_dim[i]) : hi;
        in_bounds *= ihi > ilo ? uint64_t(ihi - ilo) : 0;
        const uint64_t stride = i == 0 ? eb : p.global_strides[i - 1];
        if (ihi > ilo) {
            b.global_lo += uint64_t(ilo) * stride;
            b.global_hi += uint64_t(ihi - 1) * stride;
        }
    }
    b.box_bytes = b.elements * eb;
    b.oob_elements = b.elements - in_bounds;
    b.any_in_bounds = in_bounds > 0;
    if (b.any_in_bounds) {
        b.global_hi += eb;
    } else {
        b.global_lo = b.global_hi = 0;
    }
    // mbarrier "Contents of the mbarrier object": tx-count lies in [-(2^20 - 1), 2^20 - 1]; one box's complete-tx
    // must fit.
    if (b.box_bytes > (1u << 20) - 1)
        return format("%sbox of %" PRIu64 " bytes exceeds the mbarrier tx-count range (2^20 - 1)", E, b.box_bytes);
    if (p.oob_fill == kOobFillNanRequestZeroFma && b.oob_elements > 0)
        return format("%sbox has out-of-bounds elements and the map's fill mode is OOB-NaN, whose bit pattern the "
                      "ISA (\"Out of Boundary Access\") does not give; refused rather than guessed",
                      E);
    *info = b;
    return "";
}

namespace {

// Visits every element of the box in row-major box order: fn(linear index, box index j[], oob).
template <class Fn>
void for_each_element(const TensorMapParams& p, const int32_t coords[], Fn fn) {
    uint32_t j[kMaxRank] = {};
    uint64_t n = 1;
    for (uint32_t i = 0; i < p.rank; ++i) n *= p.box_dim[i];
    for (uint64_t lin = 0; lin < n; ++lin) {
        bool oob = false;
        uint64_t off = 0;
        for (uint32_t i = 0; i < p.rank; ++i) {
            const int64_t c = int64_t(coords[i]) + j[i];
            if (c < 0 || c >= int64_t(p.global_dim[i])) oob = true;
            else off += uint64_t(c) * (i == 0 ? element_bits(p.data_type) / 8 : p.global_strides[i - 1]);
        }
        fn(lin, oob, off);
        for (uint32_t i = 0; i < p.rank; ++i) {  // next index, dimension 0 fastest
            if (++j[i] < p.box_dim[i]) break;
            j[i] = 0;
        }
    }
}

}  // namespace

void box_elements(const TensorMapParams& p, const int32_t coords[], uint32_t dst_addr, std::vector<BoxElement>* out) {
    const uint32_t eb = element_bits(p.data_type) / 8;
    out->clear();
    for_each_element(p, coords, [&](uint64_t lin, bool oob, uint64_t off) {
        BoxElement e;
        e.oob = oob;
        e.global_offset = oob ? 0 : off;
        e.smem_addr = swizzle_address(p.swizzle, dst_addr + uint32_t(lin * eb));
        out->push_back(e);
    });
}

void box_copy(const TensorMapParams& p, const int32_t coords[], uint32_t dst_addr, const uint8_t* global,
              uint8_t* dst) {
    const uint32_t eb = element_bits(p.data_type) / 8;
    const uint64_t row_bytes = uint64_t(p.box_dim[0]) * eb;
    uint64_t rows = 1;
    for (uint32_t i = 1; i < p.rank; ++i) rows *= p.box_dim[i];
    // 1. The linear (unswizzled) image: every box row is either wholly out of bounds (an outer coordinate is) or a
    //    contiguous in-bounds run of dimension 0 with zero fill on either side.
    std::vector<uint8_t> img(rows * row_bytes, 0);
    const int64_t x0 = coords[0], x1 = x0 + p.box_dim[0];
    const int64_t xlo = x0 < 0 ? 0 : x0, xhi = x1 > int64_t(p.global_dim[0]) ? int64_t(p.global_dim[0]) : x1;
    uint32_t j[kMaxRank] = {};  // outer box indices j[1..]
    for (uint64_t r = 0; r < rows; ++r) {
        bool oob = xhi <= xlo;
        uint64_t off = 0;
        for (uint32_t i = 1; i < p.rank; ++i) {
            const int64_t c = int64_t(coords[i]) + j[i];
            if (c < 0 || c >= int64_t(p.global_dim[i])) oob = true;
            else off += uint64_t(c) * p.global_strides[i - 1];
        }
        if (!oob)
            memcpy(&img[r * row_bytes + uint64_t(xlo - x0) * eb], global + off + uint64_t(xlo) * eb,
                   uint64_t(xhi - xlo) * eb);
        for (uint32_t i = 1; i < p.rank; ++i) {
            if (++j[i] < p.box_dim[i]) break;
            j[i] = 0;
        }
    }
    // 2. Swizzle: 16-byte chunks of the image move as a whole (the 16-byte atomicity of the modelled modes).
    if (p.swizzle == kSwizzleNone) {
        memcpy(dst, img.data(), img.size());
        return;
    }
    for (uint64_t o = 0; o < img.size(); o += 16) {
        const uint32_t to = swizzle_address(p.swizzle, dst_addr + uint32_t(o)) - dst_addr;
        memcpy(dst + to, &img[o], 16);
    }
}

}  // namespace tma
}  // namespace r1k_emu
