//! The host side of the sm_90a FP8 GEMM: its TMA descriptions, its argument struct, the launchers of the
//! persistent warp-specialized kernels (one CTA, or a 2-CTA multicast cluster) and of the split-K reduction. The
//! descriptors, swizzle, tensor-map encoding and cluster launch are the crate's sm_90a layer, [`crate::sm90`].

use cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};

use super::params::{GemmParams, SplitkReduceParams};
use super::plan::{GemmShape, Sm90Config, BLOCK_K};
use crate::device::Gpu;
use crate::error::{CudaCall, Error, Result};
use crate::fp8::E4M3;
use crate::sm90::{launch_cluster, ClusterLaunch, TensorMap, Tma2d, TmaDtype};
use crate::tensor::DeviceTensor;
use crate::view::{TensorMut, TensorRef};

/// Kernel module (file stem) of the Hopper kernels.
pub const MODULE: &str = "fp8_gemm_sm90";

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
    let shape = ClusterLaunch {
        grid_x: cfg.grid,
        threads: cfg.threads,
        smem_bytes: cfg.smem_bytes,
        cluster_x: 2,
        // The kernel's schedule strides by the launched cluster count (%nclusterid), so any even grid is correct.
        clamp_to_resident: true,
    };
    // SAFETY: `params` holds one pointer per kernel parameter, in order and with the kernel's types (three 128-byte
    // 64-aligned CUtensorMaps and the GemmParams struct), all alive for the call (the driver copies them at
    // launch). The tensor maps describe exactly a [m, k], b [n, k] (box block_n / 2 rows) and sa
    // [ceil(k/128), m_pad]; sb has ceil(n/128)·ceil(k/128) floats and is indexed with block indices below those
    // bounds; out has m·n elements of the type `mode` selects (checked above) and every store is guarded by row < m,
    // col < n. Both CTAs of a cluster walk the same tile pairs (plan::mc2_pair_coords, unit-tested), and the dynamic
    // shared memory covers the ring for `stages` (plan::smem_bytes, the limit raised by gpu.function). The
    // device-pointer guards record the launch on the stream when dropped after the call.
    unsafe { launch_cluster(stream, &f, shape, &mut params) }?;
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
    let (pv, ov) = (partial.kernel_arg(stream), out.kernel_arg(stream));
    let params = SplitkReduceParams {
        partial: pv.addr(),
        out: ov.addr(),
        m: shape.m as i32,
        n: shape.n as i32,
        k_splits: cfg.k_splits as i32,
        mode: final_mode as i32,
    };
    let mut launch = stream.launch_builder(&f);
    launch.arg(&params);
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

#[cfg(test)]
mod tests {
    use super::*;

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
