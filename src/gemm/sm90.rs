//! Hopper (sm_90a) pieces of the FP8 GEMM that live on the host: the wgmma shared-memory matrix descriptor, the
//! 128-byte swizzle address function, TMA tensor maps, and the launcher of the persistent warp-specialized kernel.
//!
//! The descriptor and swizzle functions are mirrored bit for bit in `kernels/common/gemm_sm90.cuh`
//! (`r1k::gemm::make_smem_desc`, `r1k::gemm::swizzle_128b`); the unit tests here pin them to the PTX ISA's
//! definitions, and the GPU primitive tests in `tests/fp8_gemm.rs` check the device against them.

use cudarc::driver::sys::{
    self, CUtensorMapDataType, CUtensorMapFloatOOBfill, CUtensorMapInterleave, CUtensorMapL2promotion,
    CUtensorMapSwizzle,
};
use cudarc::driver::{DevicePtr, DeviceRepr, DriverError, LaunchConfig, PushKernelArg};

use super::params::GemmParams;
use super::plan::{GemmShape, Sm90Config, BLOCK_K};
use crate::device::Gpu;
use crate::error::{CudaCall, Error, Result};
use crate::fp8::E4M3;
use crate::tensor::DeviceTensor;
use crate::view::{TensorMut, TensorRef};

/// Kernel module (file stem) of the Hopper kernels.
pub const MODULE: &str = "fp8_gemm_sm90";

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
pub fn make_smem_desc(start_addr: u32, lbo_bytes: u32, sbo_bytes: u32, swizzle: SwizzleMode) -> u64 {
    let field = |v: u32| u64::from((v & 0x3ffff) >> 4);
    field(start_addr) | (field(lbo_bytes) << 16) | (field(sbo_bytes) << 32) | ((swizzle as u64) << 62)
}

/// The descriptor the kernel uses for a K-major operand tile of 128-byte rows (BLOCK_K = 128 E4M3) loaded by TMA
/// with 128-byte swizzle, at K offset `k_bytes` (0, 32, 64, 96 for the four k32 wgmma steps): SBO = 1024 (eight
/// 128-byte rows form one swizzle atom; atoms are stacked along M/N), LBO unused for swizzled K-major layouts (set
/// to 0), and the K step is taken by advancing the start address inside the atom, which is how the hardware applies
/// the swizzle to the address bits.
pub fn kmajor_sw128_desc(tile_addr: u32, k_bytes: u32) -> u64 {
    make_smem_desc(tile_addr + k_bytes, 0, 1024, SwizzleMode::B128)
}

/// Byte offset of logical byte `offset` (= row · 128 + column byte) of a 1024-aligned tile stored with TMA's
/// 128-byte swizzle: the 16-byte chunk index (bits 4–6) is XORed with the row within the 8-row atom (bits 7–9).
pub fn swizzle_128b(offset: u32) -> u32 {
    offset ^ (((offset >> 7) & 7) << 4)
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
    /// One byte (E4M3 codes).
    U8,
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

/// The three TMA descriptions of one GEMM: A tiles `[block_m, 128]`, B tiles `[block_n, 128]` (both 128-byte
/// swizzled) and the activation-scale row segment `[1, block_m]` of the MN-major `sa`. For the 2-CTA multicast
/// kernels (`cluster_m == 2`) the B box is half a tile, `[block_n / 2, 128]`: each CTA of a cluster loads one half.
pub fn gemm_tmas(shape: &GemmShape, cfg: &Sm90Config) -> [Tma2d; 3] {
    let k = shape.k as u64;
    [
        Tma2d {
            dtype: TmaDtype::U8,
            rows: shape.m as u64,
            cols: k,
            row_stride_bytes: k,
            box_rows: cfg.block_m,
            box_cols: BLOCK_K,
            swizzle_128b: true,
        },
        Tma2d {
            dtype: TmaDtype::U8,
            rows: shape.n as u64,
            cols: k,
            row_stride_bytes: k,
            box_rows: cfg.block_n / cfg.cluster_m.max(1),
            box_cols: BLOCK_K,
            swizzle_128b: true,
        },
        Tma2d {
            dtype: TmaDtype::F32,
            rows: shape.k_blocks() as u64,
            cols: shape.m_pad() as u64,
            row_stride_bytes: shape.m_pad() as u64 * 4,
            box_rows: 1,
            box_cols: cfg.block_m,
            swizzle_128b: false,
        },
    ]
}

/// What the GEMM kernel writes (twin of the `kMode*` constants in kernels/fp8_gemm_sm90.cu).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum OutputMode {
    /// bf16 `[m, n]` = D.
    Bf16 = 0,
    /// fp32 `[m, n]` += D.
    F32Accumulate = 1,
    /// fp32 `[k_splits, m, n]`: split s writes its partial D at `[s]`.
    F32Partial = 2,
}

#[allow(clippy::too_many_arguments)]
fn launch_gemm<T: DeviceRepr>(
    gpu: &Gpu,
    shape: &GemmShape,
    cfg: &Sm90Config,
    maps: &[TensorMap; 3],
    sb: &TensorRef<'_, f32>,
    out: &mut TensorMut<'_, T>,
    mode: OutputMode,
) -> Result<()> {
    let want = match mode {
        OutputMode::F32Partial => cfg.k_splits as usize * shape.m * shape.n,
        _ => shape.m * shape.n,
    };
    if out.numel() != want || !out.is_dense() {
        return Err(Error::shape("out", format!("{want} dense elements"), out.numel()));
    }
    let f = gpu.function(MODULE, cfg.kernel_name()?, cfg.smem_bytes)?;
    let launch_cfg =
        LaunchConfig { grid_dim: (cfg.grid, 1, 1), block_dim: (cfg.threads, 1, 1), shared_mem_bytes: cfg.smem_bytes };
    let stream = gpu.stream();
    let (sbv, ov) = (sb.kernel_arg(stream), out.kernel_arg(stream));
    let params = gemm_params(shape, cfg, sbv.addr(), ov.addr(), mode);
    let mut launch = stream.launch_builder(&f);
    launch.arg(&maps[0]).arg(&maps[1]).arg(&maps[2]).arg(&params);
    // SAFETY: the tensor maps describe exactly a [m, k], b [n, k] and sa [ceil(k/128), m_pad] (TMA never reads
    // outside them and zero-fills out-of-range box elements); sb has ceil(n/128)·ceil(k/128) floats and the kernel
    // indexes it with block indices < those bounds; `out` has the element count and type `mode` selects (checked
    // above: m·n bf16 / fp32, or k_splits·m·n fp32 for partials) and every store is guarded by row < m, col < n.
    // The split layout (k_splits × kb_per_split covering [0, ceil(k/128)) with no empty split) comes from
    // plan::choose_k_splits. Shared memory: `smem_bytes` covers the ring the kernel carves for `stages` stages (same
    // formula as plan::smem_bytes).
    unsafe { launch.launch(launch_cfg) }.cuda_call("cuLaunchKernel")?;
    Ok(())
}

/// The kernels' argument struct for a launch writing `out` in `mode` with B's scales at `sb`.
fn gemm_params(shape: &GemmShape, cfg: &Sm90Config, sb: u64, out: u64, mode: OutputMode) -> GemmParams {
    GemmParams {
        sb,
        out,
        m: shape.m as i32,
        n: shape.n as i32,
        k: shape.k as i32,
        stages: cfg.stages as i32,
        group: cfg.group_m as i32,
        mode: mode as i32,
        k_splits: cfg.k_splits as i32,
        kb_per_split: cfg.kb_per_split as i32,
    }
}

/// Launches a 2-CTA cluster kernel (`fp8_gemm_sm90_mc2_*`) through `cuLaunchKernelEx` with a cluster dimension of
/// (2, 1, 1). The kernel's parameters are `(tm_a, tm_b, tm_sa, GemmParams)`.
fn launch_mc2<T: DeviceRepr>(
    gpu: &Gpu,
    shape: &GemmShape,
    cfg: &Sm90Config,
    maps: &[TensorMap; 3],
    sb: &TensorRef<'_, f32>,
    mut out: TensorMut<'_, T>,
    mode: OutputMode,
) -> Result<()> {
    if mode == OutputMode::F32Partial || cfg.k_splits != 1 {
        return Err(Error::InvalidConfig("the multicast kernels do not split K".into()));
    }
    if cfg.grid == 0 || !cfg.grid.is_multiple_of(2) || cfg.block_m != 128 || cfg.threads != 384 {
        return Err(Error::InvalidConfig(format!("bad 2-CTA cluster configuration {cfg:?}")));
    }
    if out.numel() != shape.m * shape.n {
        return Err(Error::shape("out", shape.m * shape.n, out.numel()));
    }
    let f = gpu.function(MODULE, cfg.kernel_name()?, cfg.smem_bytes)?;
    let stream = gpu.stream();
    let (sbv, ov) = (sb.kernel_arg(stream), out.kernel_arg(stream));
    let mut args = gemm_params(shape, cfg, sbv.addr(), ov.addr(), mode);
    let (mut ta, mut tb, mut tsa) = (maps[0], maps[1], maps[2]);
    let mut params: [*mut std::ffi::c_void; 4] = [
        &mut ta as *mut TensorMap as *mut _,
        &mut tb as *mut TensorMap as *mut _,
        &mut tsa as *mut TensorMap as *mut _,
        &mut args as *mut GemmParams as *mut _,
    ];
    // SAFETY: a zeroed CUlaunchAttribute is a valid plain-data value (id 0, zero union); id and value are set next.
    let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
    attr.value.clusterDim = sys::CUlaunchAttributeValue_union__bindgen_ty_1 { x: 2, y: 1, z: 1 };
    let mut config = sys::CUlaunchConfig {
        gridDimX: cfg.grid,
        gridDimY: 1,
        gridDimZ: 1,
        blockDimX: cfg.threads,
        blockDimY: 1,
        blockDimZ: 1,
        sharedMemBytes: cfg.smem_bytes,
        hStream: stream.cu_stream(),
        attrs: &mut attr,
        numAttrs: 1,
    };
    stream.context().bind_to_thread()?;
    // A cluster's CTAs must share a GPC, so fewer than sm_count / 2 clusters may be resident at once: size the
    // persistent grid to what the driver says fits, so no cluster waits for a second wave. The kernel's schedule
    // strides by the launched cluster count (%nclusterid), so any even grid is correct; if the query fails the
    // planned grid stands.
    let mut fit: std::ffi::c_int = 0;
    // SAFETY: `config` and the attribute it points to are valid for the call; the driver only writes `fit`.
    let q = unsafe { sys::cuOccupancyMaxActiveClusters(&mut fit, f.cu_function(), &config) };
    if q == sys::CUresult::CUDA_SUCCESS && fit > 0 {
        config.gridDimX = config.gridDimX.min(2 * fit as u32);
    }
    // SAFETY: `params` holds one pointer per kernel parameter, in order and with the kernel's types (three 128-byte
    // 64-aligned CUtensorMaps and the GemmParams struct), all alive for the call (the driver copies them at
    // launch). The tensor maps describe exactly a [m, k], b [n, k] (box block_n / 2 rows) and sa
    // [ceil(k/128), m_pad]; sb has ceil(n/128)·ceil(k/128) floats and is indexed with block indices below those
    // bounds; out has m·n elements of the type `mode` selects (checked above) and every store is guarded by row < m,
    // col < n. The grid is a multiple of the cluster size (checked above; the clamp keeps it even), both CTAs of a
    // cluster walk the same tile pairs (plan::mc2_pair_coords, unit-tested), and the dynamic shared memory covers
    // the ring for `stages` (plan::smem_bytes, the limit raised by gpu.function). The device-pointer guards (_gsb,
    // _gout) record the launch on the stream when dropped after the call.
    let res = unsafe { sys::cuLaunchKernelEx(&config, f.cu_function(), params.as_mut_ptr(), std::ptr::null_mut()) };
    if res != sys::CUresult::CUDA_SUCCESS {
        return Err(Error::cuda("cuLaunchKernelEx", DriverError(res)));
    }
    Ok(())
}

/// Launches the persistent kernel (and, when the plan splits K, the in-order split reduction). `out` is bf16
/// (`accumulate = false`) or fp32 holding C (`accumulate = true`). The caller has validated the shapes with
/// [`super::plan::validate_shapes`] and checked m, n, k > 0.
#[allow(clippy::too_many_arguments)]
pub(crate) fn launch<T: DeviceRepr>(
    gpu: &Gpu,
    shape: &GemmShape,
    cfg: &Sm90Config,
    a: &TensorRef<'_, E4M3>,
    sa: &TensorRef<'_, f32>,
    b: &TensorRef<'_, E4M3>,
    sb: &TensorRef<'_, f32>,
    mut out: TensorMut<'_, T>,
    accumulate: bool,
    workspace: Option<TensorMut<'_, f32>>,
) -> Result<()> {
    gpu.require_hopper("fp8_gemm sm90")?;
    let [ta, tb, tsa] = gemm_tmas(shape, cfg);
    let stream = gpu.stream();
    let (pa, pb, psa) = (a.kernel_arg(stream), b.kernel_arg(stream), sa.kernel_arg(stream));
    let maps = [ta.encode(pa.addr())?, tb.encode(pb.addr())?, tsa.encode(psa.addr())?];
    let final_mode = if accumulate { OutputMode::F32Accumulate } else { OutputMode::Bf16 };
    if cfg.cluster_m == 2 {
        return launch_mc2(gpu, shape, cfg, &maps, sb, out, final_mode);
    }
    if cfg.k_splits <= 1 {
        return launch_gemm(gpu, shape, cfg, &maps, sb, &mut out, final_mode);
    }
    let need = workspace_elements(shape, cfg);
    let mut owned;
    let ws = match workspace {
        Some(ws) => {
            if ws.numel() < need {
                return Err(Error::shape("workspace", format!("at least {need} fp32 elements"), ws.numel()));
            }
            ws
        }
        None => {
            // SAFETY: every element is written by the GEMM launch before the reduction reads it (below).
            owned = unsafe { DeviceTensor::<f32>::uninit(gpu, &[need])? };
            owned.as_tensor_mut()
        }
    };
    // Every element of the first k_splits·m·n workspace floats is written by the GEMM launch before the reduction
    // reads it: the work items (tile, split) cover every (row < m, col < n) once per split (plan tests check the
    // coverage).
    let total = ws.numel();
    let mut partial = ws.reshape(&[total])?.narrow(0, 0..need)?;
    launch_gemm(gpu, shape, cfg, &maps, sb, &mut partial, OutputMode::F32Partial)?;
    let pairs = (shape.m as u64 * shape.n as u64) / 2;
    let blocks = pairs.div_ceil(256).min(u64::from(gpu.info().sm_count) * 8).max(1) as u32;
    let f = gpu.function(MODULE, "fp8_gemm_splitk_reduce", 0)?;
    let launch_cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let (m, n, splits, mode) = (shape.m as i32, shape.n as i32, cfg.k_splits as i32, final_mode as i32);
    let (mut pv, mut ov) = (partial.kernel_arg(stream), out.kernel_arg(stream));
    let mut launch = stream.launch_builder(&f);
    launch.arg(&mut pv).arg(&mut ov).arg(&m).arg(&n).arg(&splits).arg(&mode);
    // SAFETY: partial holds k_splits·m·n floats, out m·n elements of the type `mode` selects; n is even (validated
    // n % 8 == 0), so the kernel's float2 / bf16x2 pairs never straddle the end; the grid-stride loop is bounded by
    // m·n/2 pairs.
    unsafe { launch.launch(launch_cfg) }.cuda_call("cuLaunchKernel")?;
    Ok(())
}

/// fp32 workspace elements a configuration needs: `k_splits · m · n` split-K partials, 0 without split-K.
pub fn workspace_elements(shape: &GemmShape, cfg: &Sm90Config) -> usize {
    if cfg.k_splits > 1 {
        cfg.k_splits as usize * shape.m * shape.n
    } else {
        0
    }
}

/// Launchers of the primitive-test kernels (`gemm_probe_*` in kernels/fp8_gemm_sm90.cu), used by the GPU tests to
/// say which building block is wrong when the GEMM is. Each synchronizes and returns the kernel's output.
#[doc(hidden)]
pub mod probes {
    use super::*;

    /// Loads one box of `tma` at `(x0, y0)` (inner, outer coordinates) from `src` into shared memory and returns the
    /// shared-memory bytes as stored (swizzled).
    pub fn tma_box(gpu: &Gpu, src: &DeviceTensor<u8>, tma: &Tma2d, x0: i32, y0: i32) -> Result<Vec<u8>> {
        gpu.require_hopper("gemm_probe_tma")?;
        let need = tma.rows * tma.row_stride_bytes;
        if (src.numel() as u64) < need {
            return Err(Error::shape("src", format!("at least {need} bytes"), src.numel()));
        }
        let view = src.view();
        let (ptr, _guard) = view.device_ptr(gpu.stream());
        let map = tma.encode(ptr)?;
        let box_bytes = tma.box_bytes() as i32;
        let smem = tma.box_bytes() + 1024 + 64;
        let f = gpu.function(MODULE, "gemm_probe_tma", smem)?;
        let mut out = DeviceTensor::<u8>::zeros(gpu, &[tma.box_bytes() as usize])?;
        {
            let mut ov = out.view_mut();
            let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: smem };
            let mut launch = gpu.stream().launch_builder(&f);
            launch.arg(&map).arg(&mut ov).arg(&x0).arg(&y0).arg(&box_bytes);
            // SAFETY: the map describes `src` within its length (checked above); the kernel writes box_bytes bytes
            // to `out`, which has exactly that many; shared memory covers the box, alignment slack and one mbarrier.
            unsafe { launch.launch(cfg) }.cuda_call("cuLaunchKernel")?;
        }
        out.to_host(gpu)
    }

    /// One m64n128 block over K = 128: `a` [64, 128] and `b` [128, 128] E4M3 → fp32 [64, 128] = a · bᵀ.
    pub fn wgmma_n128(gpu: &Gpu, a: &DeviceTensor<E4M3>, b: &DeviceTensor<E4M3>) -> Result<Vec<f32>> {
        gpu.require_hopper("gemm_probe_wgmma_n128")?;
        a.expect_shape("a", &[64, 128])?;
        b.expect_shape("b", &[128, 128])?;
        let smem = 64 * 128 + 128 * 128 + 1024;
        let f = gpu.function(MODULE, "gemm_probe_wgmma_n128", smem)?;
        let mut out = DeviceTensor::<f32>::zeros(gpu, &[64, 128])?;
        {
            let (av, bv, mut ov) = (a.view(), b.view(), out.view_mut());
            let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: smem };
            let mut launch = gpu.stream().launch_builder(&f);
            launch.arg(&av).arg(&bv).arg(&mut ov);
            // SAFETY: fixed sizes checked above; the kernel reads 64·128 and 128·128 bytes and writes 64·128 floats.
            unsafe { launch.launch(cfg) }.cuda_call("cuLaunchKernel")?;
        }
        out.to_host(gpu)
    }

    /// Two promotion steps on a [64, 160] tile at column `n0`: returns `fin_in + 2 × (acc · sa[row] · sb2[slot])`,
    /// each step one fmaf per element (see `r1k::gemm::promote`).
    pub fn promote_n160(
        gpu: &Gpu,
        acc: &DeviceTensor<f32>,
        fin: &DeviceTensor<f32>,
        sa: &DeviceTensor<f32>,
        sb2: &DeviceTensor<f32>,
        n0: i32,
    ) -> Result<Vec<f32>> {
        gpu.require_hopper("gemm_probe_promote_n160")?;
        acc.expect_shape("acc", &[64, 160])?;
        fin.expect_shape("fin", &[64, 160])?;
        sa.expect_shape("sa", &[64])?;
        sb2.expect_shape("sb2", &[2])?;
        if n0 < 0 || n0 % 8 != 0 {
            return Err(Error::Alignment { arg: "n0", required: 8, got: n0.unsigned_abs() as usize });
        }
        let f = gpu.function(MODULE, "gemm_probe_promote_n160", 0)?;
        let mut out = DeviceTensor::<f32>::zeros(gpu, &[64, 160])?;
        {
            let (accv, finv, sav, sbv, mut ov) = (acc.view(), fin.view(), sa.view(), sb2.view(), out.view_mut());
            let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
            let mut launch = gpu.stream().launch_builder(&f);
            launch.arg(&accv).arg(&finv).arg(&sav).arg(&sbv).arg(&mut ov).arg(&n0);
            // SAFETY: fixed sizes checked above; the kernel reads and writes exactly 64·160 floats per tile argument.
            unsafe { launch.launch(cfg) }.cuda_call("cuLaunchKernel")?;
        }
        out.to_host(gpu)
    }
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

    #[test]
    fn tma_checks() {
        let shape = GemmShape { m: 1000, n: 7168, k: 2048 };
        let cfg = super::super::plan::choose_sm90_config(&shape, 132, super::super::plan::SM90_SMEM_LIMIT).unwrap();
        let [a, b, s] = gemm_tmas(&shape, &cfg);
        for t in [a, b, s] {
            t.check().unwrap();
        }
        assert_eq!(a.box_bytes(), cfg.block_m * 128);
        assert_eq!(b.box_bytes(), cfg.block_n * 128);
        assert_eq!(s.box_bytes(), cfg.block_m * 4);
        assert_eq!(s.cols, 1000);
        let bad = Tma2d { row_stride_bytes: 2056, ..a };
        assert!(bad.check().is_err());
        let bad = Tma2d { box_cols: 256, ..a };
        assert!(bad.check().is_err());
        assert_eq!(a.encode(8).unwrap_err(), Error::Alignment { arg: "tma base address", required: 16, got: 8 });
    }
}
