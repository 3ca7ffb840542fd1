//! The host side of the sm_90a primitive layer (the device side is `kernels/common/sm90/`): the wgmma shared-memory
//! matrix descriptor and the 128-byte swizzle (bit-for-bit twins of `r1k::sm90::make_smem_desc`,
//! `kmajor_sw128_desc` and `swizzle_128b` in `kernels/common/sm90/mma.cuh`, pinned here to the PTX ISA's
//! definitions), checked TMA tensor-map encoding, and the cluster launch. These are the crate's only raw driver calls
//! besides cudarc's safe wrappers; every Hopper kernel's launcher goes through them.

use std::ffi::c_void;

use cudarc::driver::sys::{
    self, CUtensorMapDataType, CUtensorMapFloatOOBfill, CUtensorMapInterleave, CUtensorMapL2promotion,
    CUtensorMapSwizzle,
};
use cudarc::driver::{CudaFunction, CudaStream, DeviceRepr, DriverError};

use crate::error::{Error, Result};

/// Kernel module (file stem) of the primitive probes of every sm_90a kernel family (kernels/probes_sm90.cu).
pub const PROBE_MODULE: &str = "probes_sm90";

/// Shared-memory swizzle modes of a wgmma matrix descriptor (bits 62–63), per the PTX ISA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwizzleMode {
    /// Interleaved core matrices, no swizzle (0).
    None = 0,
    /// 128-byte swizzle (1).
    B128 = 1,
    /// 64-byte swizzle (2).
    B64 = 2,
    /// 32-byte swizzle (3).
    B32 = 3,
}

/// Encodes a wgmma shared-memory matrix descriptor (PTX ISA, "Matrix Descriptor Format"):
/// bits 0–13 start address >> 4, bits 16–29 leading-dimension byte offset >> 4, bits 32–45 stride-dimension byte
/// offset >> 4, bits 49–51 base offset (0: every tile here starts 1024-aligned), bits 62–63 swizzle mode.
/// Addresses are shared-window byte addresses (< 256 KiB, so 18 bits of address, 14 after the shift).
pub const fn make_smem_desc(start_addr: u32, lbo_bytes: u32, sbo_bytes: u32, swizzle: SwizzleMode) -> u64 {
    desc_field(start_addr) | (desc_field(lbo_bytes) << 16) | (desc_field(sbo_bytes) << 32) | ((swizzle as u64) << 62)
}

/// A byte address or offset (18 bits of the shared window) as a 14-bit descriptor field in 16-byte units.
const fn desc_field(bytes: u32) -> u64 {
    ((bytes & 0x3ffff) >> 4) as u64
}

/// Decodes a descriptor into (start address, LBO, SBO, swizzle mode), all in bytes except the mode.
pub const fn smem_desc_fields(desc: u64) -> (u32, u32, u32, u32) {
    (
        ((desc & 0x3fff) << 4) as u32,
        (((desc >> 16) & 0x3fff) << 4) as u32,
        (((desc >> 32) & 0x3fff) << 4) as u32,
        (desc >> 62) as u32,
    )
}

/// The descriptor the kernel uses for a K-major operand tile of 128-byte rows (BLOCK_K = 128 E4M3) loaded by TMA
/// with 128-byte swizzle, at K offset `k_bytes` (0, 32, 64, 96 for the four k32 wgmma steps): SBO = 1024 (eight
/// 128-byte rows form one swizzle atom; atoms are stacked along M/N), LBO unused for swizzled K-major layouts (set
/// to 0), and the K step is taken by advancing the start address inside the atom, which is how the hardware applies
/// the swizzle to the address bits.
pub const fn kmajor_sw128_desc(tile_addr: u32, k_bytes: u32) -> u64 {
    make_smem_desc(tile_addr + k_bytes, 0, 1024, SwizzleMode::B128)
}

/// Byte offset of logical byte `offset` (= row · 128 + column byte) of a 1024-aligned tile stored with TMA's
/// 128-byte swizzle: the 16-byte chunk index (bits 4–6) is XORed with the row within the 8-row atom (bits 7–9).
/// This is where TMA with `CU_TENSOR_MAP_SWIZZLE_128B` puts a box whose inner extent is 128 bytes, and how wgmma
/// maps the addresses it derives from a 128-byte-swizzle descriptor.
pub const fn swizzle_128b(offset: u32) -> u32 {
    offset ^ (((offset >> 7) & 7) << 4)
}

/// [`swizzle_128b`] of (row, byte in row < 128), in `usize` for host-side index arithmetic.
pub const fn swizzle_128b_at(row: usize, byte_in_row: usize) -> usize {
    swizzle_128b((row * 128 + byte_in_row) as u32) as usize
}

/// An opaque 128-byte `CUtensorMap`, passed to kernels by value as a `__grid_constant__` parameter.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TensorMap(pub [u64; 16]);

// SAFETY: plain bytes with the layout and alignment of CUtensorMap; the kernel parameter is
// `const __grid_constant__ CUtensorMap`, which the driver copies from this value.
unsafe impl DeviceRepr for TensorMap {}

/// Element type of a 2-D tensor map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TmaDtype {
    /// One byte (E4M3 codes, packed FP8 cache tokens).
    U8,
    /// bf16.
    Bf16,
    /// fp32.
    F32,
}

/// A 2-D row-major TMA description: `rows × cols` elements with a row stride of `row_stride_bytes`, loaded in boxes
/// of `box_rows × box_cols`. Out-of-bounds box elements are filled with zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tma2d {
    /// Element type.
    pub dtype: TmaDtype,
    /// Outer dimension.
    pub rows: u64,
    /// Inner (contiguous) dimension.
    pub cols: u64,
    /// Bytes between rows (multiple of 16).
    pub row_stride_bytes: u64,
    /// Box rows (≤ 256).
    pub box_rows: u32,
    /// Box columns (≤ 256; with 128-byte swizzle, box_cols · element size must be ≤ 128).
    pub box_cols: u32,
    /// 128-byte swizzle when true, none otherwise.
    pub swizzle_128b: bool,
}

impl Tma2d {
    fn elem_bytes(&self) -> u64 {
        match self.dtype {
            TmaDtype::U8 => 1,
            TmaDtype::Bf16 => 2,
            TmaDtype::F32 => 4,
        }
    }

    /// Checks the driver's documented requirements for `cuTensorMapEncodeTiled` (so a bad map is an `Err`, not an
    /// encode failure at launch time).
    pub fn check(&self) -> Result<()> {
        let cfg = |msg: String| Err(Error::InvalidConfig(msg));
        if self.rows == 0 || self.cols == 0 || self.rows > 1 << 32 || self.cols > 1 << 32 {
            return cfg(format!("TMA dims {}×{} must be in 1..=2^32", self.rows, self.cols));
        }
        if !self.row_stride_bytes.is_multiple_of(16) || self.row_stride_bytes >= 1 << 40 {
            return Err(Error::Alignment { arg: "tma row stride", required: 16, got: self.row_stride_bytes as usize });
        }
        if self.row_stride_bytes < self.cols * self.elem_bytes() {
            return cfg("TMA row stride shorter than a row".into());
        }
        if !(1..=256).contains(&self.box_rows) || !(1..=256).contains(&self.box_cols) {
            return cfg(format!("TMA box {}×{} must be in 1..=256", self.box_rows, self.box_cols));
        }
        let inner_bytes = u64::from(self.box_cols) * self.elem_bytes();
        if !inner_bytes.is_multiple_of(16) {
            return cfg(format!("TMA box inner extent {inner_bytes} B must be a multiple of 16"));
        }
        if self.swizzle_128b && inner_bytes > 128 {
            return cfg(format!("TMA box inner extent {inner_bytes} B exceeds the 128-byte swizzle span"));
        }
        Ok(())
    }

    /// Bytes one box lands in shared memory (what the mbarrier's transaction count must expect).
    pub fn box_bytes(&self) -> u32 {
        self.box_rows * self.box_cols * self.elem_bytes() as u32
    }

    /// Encodes the map for the buffer at device address `ptr`.
    pub fn encode(&self, ptr: u64) -> Result<TensorMap> {
        self.check()?;
        if !ptr.is_multiple_of(16) {
            return Err(Error::Alignment { arg: "tma base address", required: 16, got: (ptr % 16) as usize });
        }
        let mut map = TensorMap([0; 16]);
        let dims = [self.cols, self.rows];
        let strides = [self.row_stride_bytes];
        let boxes = [self.box_cols, self.box_rows];
        let elem_strides = [1u32, 1];
        let dtype = match self.dtype {
            TmaDtype::U8 => CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT8,
            TmaDtype::Bf16 => CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
            TmaDtype::F32 => CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT32,
        };
        let swizzle = if self.swizzle_128b {
            CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B
        } else {
            CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_NONE
        };
        // SAFETY: `map` is a 64-byte-aligned 128-byte buffer (CUtensorMap's layout); every array argument has
        // `rank` (or rank − 1 for strides) elements and outlives the call; the driver only writes `map`.
        let res = unsafe {
            sys::cuTensorMapEncodeTiled(
                &mut map as *mut TensorMap as *mut sys::CUtensorMap,
                dtype,
                2,
                ptr as *mut std::ffi::c_void,
                dims.as_ptr(),
                strides.as_ptr(),
                boxes.as_ptr(),
                elem_strides.as_ptr(),
                CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
                swizzle,
                CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
            )
        };
        if res != sys::CUresult::CUDA_SUCCESS {
            return Err(Error::cuda("cuTensorMapEncodeTiled", DriverError(res)));
        }
        Ok(map)
    }
}

/// The grid, block and cluster of a cluster launch: `grid_x` CTAs of `threads` threads and `smem_bytes` dynamic
/// shared memory, in clusters of `cluster_x` CTAs along x.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClusterLaunch {
    /// CTAs along x (a multiple of `cluster_x`).
    pub grid_x: u32,
    /// Threads per CTA.
    pub threads: u32,
    /// Dynamic shared memory per CTA, bytes.
    pub smem_bytes: u32,
    /// CTAs per cluster along x (1..=8, the portable cluster sizes).
    pub cluster_x: u32,
    /// For a persistent kernel whose schedule strides by the launched cluster count: shrink the grid to the
    /// clusters the driver says can be resident at once (a cluster's CTAs must share a GPC, so fewer than
    /// sm_count / cluster_x may fit), so no cluster waits for a second wave. If the query fails the grid stands.
    pub clamp_to_resident: bool,
}

/// Launches `f` on `stream` through `cuLaunchKernelEx` with a cluster dimension of (`cluster_x`, 1, 1).
///
/// # Safety
/// `params` holds one pointer per kernel parameter, in order, each to a live value of exactly the parameter's type
/// (the driver copies them at launch), and the kernel's memory accesses with these parameters and this launch
/// shape stay inside live allocations.
pub(crate) unsafe fn launch_cluster(
    stream: &CudaStream,
    f: &CudaFunction,
    shape: ClusterLaunch,
    params: &mut [*mut c_void],
) -> Result<()> {
    let c = shape.cluster_x;
    if !(1..=8).contains(&c) || shape.grid_x == 0 || !shape.grid_x.is_multiple_of(c) {
        return Err(Error::InvalidConfig(format!("bad cluster launch {shape:?}")));
    }
    // SAFETY: a zeroed CUlaunchAttribute is a valid plain-data value (id 0, zero union); id and value are set next.
    let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
    attr.value.clusterDim = sys::CUlaunchAttributeValue_union__bindgen_ty_1 { x: c, y: 1, z: 1 };
    let mut config = sys::CUlaunchConfig {
        gridDimX: shape.grid_x,
        gridDimY: 1,
        gridDimZ: 1,
        blockDimX: shape.threads,
        blockDimY: 1,
        blockDimZ: 1,
        sharedMemBytes: shape.smem_bytes,
        hStream: stream.cu_stream(),
        attrs: &mut attr,
        numAttrs: 1,
    };
    stream.context().bind_to_thread()?;
    if shape.clamp_to_resident {
        let mut fit: std::ffi::c_int = 0;
        // SAFETY: `config` and the attribute it points to are valid for the call; the driver only writes `fit`.
        let q = unsafe { sys::cuOccupancyMaxActiveClusters(&mut fit, f.cu_function(), &config) };
        if q == sys::CUresult::CUDA_SUCCESS && fit > 0 {
            config.gridDimX = config.gridDimX.min(c * fit as u32);
        }
    }
    // SAFETY: the launch configuration is valid (checked above; the clamp keeps the grid a multiple of the cluster
    // size); the caller guarantees `params` and the kernel's accesses.
    let res = unsafe { sys::cuLaunchKernelEx(&config, f.cu_function(), params.as_mut_ptr(), std::ptr::null_mut()) };
    if res != sys::CUresult::CUDA_SUCCESS {
        return Err(Error::cuda("cuLaunchKernelEx", DriverError(res)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn descriptor_bit_layout() {
        // Fields land in their PTX ISA bit ranges.
        let d = make_smem_desc(0x400, 0x20, 0x400, SwizzleMode::B128);
        assert_eq!(d & 0x3fff, 0x40);
        assert_eq!((d >> 16) & 0x3fff, 0x2);
        assert_eq!((d >> 32) & 0x3fff, 0x40);
        assert_eq!(d >> 62, 1);
        assert_eq!((d >> 49) & 7, 0);
        // Unused bits stay zero.
        let unused = !((0x3fffu64) | (0x3fff << 16) | (0x3fff << 32) | (7 << 49) | (3 << 62));
        for addr in [0u32, 16, 1024, 0x3fff0, 227 * 1024] {
            for sw in [SwizzleMode::None, SwizzleMode::B128, SwizzleMode::B64, SwizzleMode::B32] {
                let d = make_smem_desc(addr, 16, 1024, sw);
                assert_eq!(d & unused, 0);
                assert_eq!(d >> 62, sw as u64);
                assert_eq!((d & 0x3fff) << 4, u64::from(addr & 0x3fff0));
            }
        }
        assert_eq!(SwizzleMode::B64 as u64, 2);
        assert_eq!(SwizzleMode::B32 as u64, 3);
        // Known value: start 0x1000, LBO 0, SBO 1024, 128B swizzle.
        assert_eq!(kmajor_sw128_desc(0x1000, 0), 0x4000_0040_0000_0100);
        // The k32 steps advance the start-address field by 2 (32 bytes >> 4).
        assert_eq!(kmajor_sw128_desc(0x1000, 32) - kmajor_sw128_desc(0x1000, 0), 2);
    }

    /// The PTX ISA's addressing model for a K-major operand with 128-byte swizzle: the 16-byte chunk c of row r
    /// (within the 32-byte K slice one k32 wgmma reads) is fetched from linear address
    /// `start + (r / 8)·SBO + (r % 8)·128 + 16c`, with the swizzle XOR applied to the address bits. Decoding our
    /// descriptors through that model must land exactly where TMA stored logical (r, 32j + 16c).
    #[test]
    fn descriptor_addressing_model_matches_tma_layout() {
        for tile in [0u32, 1024, 37 * 1024, 200 * 1024] {
            for j in 0..4u32 {
                let d = kmajor_sw128_desc(tile, 32 * j);
                let start = ((d & 0x3fff) << 4) as u32;
                let sbo = (((d >> 32) & 0x3fff) << 4) as u32;
                assert_eq!(d >> 62, SwizzleMode::B128 as u64);
                for r in 0..160u32 {
                    for c in 0..2u32 {
                        let linear = start + (r / 8) * sbo + (r % 8) * 128 + 16 * c;
                        let fetched = linear ^ (((linear >> 7) & 7) << 4);
                        let stored = tile + swizzle_128b(r * 128 + 32 * j + 16 * c);
                        assert_eq!(fetched, stored, "tile {tile} k-step {j} row {r} chunk {c}");
                    }
                }
            }
        }
    }

    #[test]
    fn swizzle_128b_definition() {
        // Row 0 is unswizzled; row r XORs the 16-byte chunk with r % 8.
        for c in 0..128 {
            assert_eq!(swizzle_128b(c), c);
        }
        assert_eq!(swizzle_128b(128), 128 + 16);
        assert_eq!(swizzle_128b(128 + 16), 128);
        assert_eq!(swizzle_128b(7 * 128 + 3), 7 * 128 + 7 * 16 + 3);
        assert_eq!(swizzle_128b(8 * 128 + 5), 8 * 128 + 5); // next atom starts unswizzled again
                                                            // A bijection on every 1024-byte atom that preserves 16-byte chunks and rows.
        let mut seen = [false; 1024];
        for o in 0..1024u32 {
            let p = swizzle_128b(o);
            assert!(p < 1024 && !seen[p as usize]);
            seen[p as usize] = true;
            assert_eq!(p / 128, o / 128);
            assert_eq!(p % 16, o % 16);
        }
    }

    /// TMA's documented placement for a 128-byte-swizzled box, row by row: 16-byte chunk c of row r lands at chunk
    /// c ^ (r % 8) of that row; and 8 consecutive rows spread one logical chunk over all 8 bank groups.
    #[test]
    fn swizzle_128b_matches_tma_row_placement() {
        for row in 0..24usize {
            for byte in 0..128usize {
                let by_row = row * 128 + ((((byte >> 4) ^ (row & 7)) & 7) << 4) + (byte & 15);
                assert_eq!(swizzle_128b_at(row, byte), by_row, "row {row} byte {byte}");
            }
        }
        for chunk in 0..8 {
            let mut groups: Vec<usize> = (0..8).map(|row| (swizzle_128b_at(row, chunk * 16) % 128) / 16).collect();
            groups.sort();
            assert_eq!(groups, (0..8).collect::<Vec<_>>());
        }
    }

    #[test]
    fn descriptor_fields_roundtrip() {
        let d = make_smem_desc(0x1_2340, 16, 1024, SwizzleMode::B128);
        assert_eq!(smem_desc_fields(d), (0x1_2340, 16, 1024, 1));
        let d = make_smem_desc(0x3_fff0, 8192, 1024, SwizzleMode::B64);
        assert_eq!(smem_desc_fields(d), (0x3_fff0, 8192, 1024, 2));
    }

    #[test]
    fn tma_checks() {
        let a = Tma2d {
            dtype: TmaDtype::U8,
            rows: 1000,
            cols: 2048,
            row_stride_bytes: 2048,
            box_rows: 128,
            box_cols: 128,
            swizzle_128b: true,
        };
        a.check().unwrap();
        assert_eq!(a.box_bytes(), 128 * 128);
        assert!(Tma2d { row_stride_bytes: 2056, ..a }.check().is_err(), "stride not a multiple of 16");
        assert!(Tma2d { row_stride_bytes: 1024, ..a }.check().is_err(), "stride shorter than a row");
        assert!(Tma2d { box_cols: 256, ..a }.check().is_err(), "256 B exceed the swizzle span");
        assert!(Tma2d { box_rows: 0, ..a }.check().is_err());
        assert!(Tma2d { box_rows: 257, ..a }.check().is_err());
        assert!(Tma2d { box_cols: 8, swizzle_128b: false, ..a }.check().is_err(), "inner box of 8 B");
        assert!(Tma2d { rows: 0, ..a }.check().is_err());
        // A bf16 box of 64 columns is exactly the 128-byte swizzle span; 72 is not.
        let rope = Tma2d { dtype: TmaDtype::Bf16, cols: 64, row_stride_bytes: 656, box_cols: 64, ..a };
        rope.check().unwrap();
        assert_eq!(rope.box_bytes(), 128 * 128);
        assert!(Tma2d { box_cols: 72, ..rope }.check().is_err());
        assert_eq!(a.encode(8).unwrap_err(), Error::Alignment { arg: "tma base address", required: 16, got: 8 });
    }
}
