//! FP8 block-scaled GEMM (DeepSeek-V3's contract), on the GPU:
//! `D[m, n] = Σ_k A[m, k] · B[n, k] · sa[m, k/128] · sb[n/128, k/128]`.
//!
//! - `a`: E4M3 `[m, k]`, row-major (K-major); `b`: E4M3 `[n, k]`, row-major (K-major): the "NT" layout.
//! - `sa`: fp32 `[ceil(k/128), round_up(m, 4)]`, MN-major, exactly as [`crate::quant::quantize_activations`]
//!   writes it; `sb`: fp32 `[ceil(n/128), ceil(k/128)]` as [`crate::quant::quantize_weights`] writes it.
//! - Output: bf16 `[m, n]` ([`fp8_gemm`]) or fp32 `D = C + A·B` in place ([`fp8_gemm_accumulate`]).
//! - Requirements: `k % 16 == 0`, `n % 8 == 0`, dimensions ≤ 2^31 − 1024 ([`plan::MAX_DIM`], see [`plan::validate_shapes`]); any m ≥ 0.
//!
//! Accumulation is fp32 with promotion: each 128-wide K block is accumulated on its own (by the tensor cores on
//! Hopper, whose FP8 accumulation keeps only ~14 bits) and then scaled by `sa · sb` and added into fp32 registers on
//! the CUDA cores.
//!
//! Two kernels: [`GemmKernel::Sm90`], the persistent warp-specialized TMA + wgmma kernel (sm_90a only), and
//! [`GemmKernel::Portable`], a simple SIMT kernel that runs on any sm_80+ GPU and is the second opinion in tests.
//!
//! Small m (decode): block M 64 (one math warpgroup), the block N the wave model picks, and split-K when the tiles
//! would leave most SMs idle ([`plan::choose_k_splits`]): each (tile, K range) work item writes an fp32 partial to a
//! workspace and a second kernel sums the splits in a fixed order, so results stay bitwise reproducible.
//!
//! Opt-in [`GemmKernel::Sm90Multicast`]: the same kernel as 2-CTA clusters along M (vertically adjacent tiles share
//! one B tile, each CTA loads half of it and multicasts it to both), launched with `cuLaunchKernelEx`.
//!
//! Not done (documented gaps): a dedicated B-streaming
//! kernel for m ≤ 128 beyond split-K, and a shared-memory/TMA-store epilogue (the epilogue stores straight from
//! registers).

mod params;
pub mod plan;
pub mod sm90;

use cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits};
use half::bf16;

use crate::device::{check_devices, DeviceInfo, Gpu};
use crate::error::{CudaCall, Error, Result};
use crate::fp8::E4M3;
use crate::reference::quant::ScaleFormat;
use crate::view::{TensorMut, TensorRef};

pub use plan::{choose_sm90_config, validate_shapes, ForcedSm90, GemmShape, Sm90Config};

/// Kernel module (file stem) of the portable kernel.
pub const PLAIN_MODULE: &str = "fp8_gemm";

/// Tile of the portable kernel (rows and columns of D per CTA).
pub const PLAIN_TILE: u32 = 64;

/// Which kernel runs a GEMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GemmKernel {
    /// [`GemmKernel::Sm90`] on sm_90, otherwise [`GemmKernel::Portable`].
    #[default]
    Auto,
    /// The portable SIMT kernel (any sm_80+ GPU). Every op calls its fallback `Portable`.
    Portable,
    /// The sm_90a TMA + wgmma kernel (errors with `UnsupportedDevice` elsewhere).
    Sm90,
    /// Opt-in: the sm_90a kernel as 2-CTA clusters along M with TMA multicast of the shared B tile (block M 128,
    /// block N 128 or 160, no split-K; launched with `cuLaunchKernelEx`). Never chosen by [`GemmKernel::Auto`].
    Sm90Multicast,
}

/// Options of one GEMM call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GemmOptions {
    /// Kernel choice.
    pub kernel: GemmKernel,
    /// Scale representation. [`ScaleFormat::Ue8m0`] declares that every scale is a power of two (stored as fp32);
    /// the kernels compute the same products either way (a product of powers of two is exact in fp32), so this is
    /// informational and lets callers keep the format next to the data.
    pub scale_format: ScaleFormat,
    /// Test-only: run the sm_90a kernel ([`GemmKernel::Sm90`] or [`GemmKernel::Sm90Multicast`]) with this fixed
    /// configuration instead of the planner's, so tests cover a stated path whatever the SM count. An error with any
    /// other kernel choice.
    #[doc(hidden)]
    pub force_sm90: Option<ForcedSm90>,
}

/// What a call resolved to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolved {
    /// Nothing to launch (m, n or k is zero; for k = 0 a bf16 output still needs zeroing, see [`Plan::zero_fill`]).
    Empty,
    /// The portable kernel with this grid.
    Portable {
        /// Grid (x over M tiles, y over N tiles).
        grid: (u32, u32),
    },
    /// The Hopper kernel with this configuration.
    Sm90(Sm90Config),
}

/// A validated, fully resolved GEMM call: computed on the CPU from shapes and device facts only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// Problem size.
    pub shape: GemmShape,
    /// Kernel and launch configuration.
    pub resolved: Resolved,
    /// True when k = 0 and the output is bf16: D must be set to zero without a GEMM launch.
    pub zero_fill: bool,
}

/// Validates shapes and resolves the kernel for a device. Pure (no GPU needed), so every rejection is testable on
/// the CPU.
#[allow(clippy::too_many_arguments)]
pub fn plan(
    a: &[usize],
    sa: &[usize],
    b: &[usize],
    sb: &[usize],
    out: &[usize],
    accumulate: bool,
    kernel: GemmKernel,
    info: &DeviceInfo,
) -> Result<Plan> {
    let shape = validate_shapes(a, sa, b, sb, out)?;
    let use_sm90 = match kernel {
        GemmKernel::Auto => info.is_hopper(),
        GemmKernel::Portable => false,
        GemmKernel::Sm90 | GemmKernel::Sm90Multicast => {
            if !info.is_hopper() {
                return Err(Error::UnsupportedDevice {
                    kernel: format!("fp8_gemm ({kernel:?} kernel)"),
                    needs: "sm_90a (H100/H200/H800/H20)",
                    found: info.arch_name(),
                });
            }
            true
        }
    };
    if !use_sm90 && info.compute_capability.0 < 8 {
        return Err(Error::UnsupportedDevice {
            kernel: "fp8_gemm (portable kernel)".into(),
            needs: "sm_80 or newer",
            found: info.arch_name(),
        });
    }
    if shape.m == 0 || shape.n == 0 || shape.k == 0 {
        let zero_fill = shape.k == 0 && !accumulate && shape.m > 0 && shape.n > 0;
        return Ok(Plan { shape, resolved: Resolved::Empty, zero_fill });
    }
    let resolved = if kernel == GemmKernel::Sm90Multicast {
        Resolved::Sm90(plan::choose_sm90_mc2_config(&shape, info.sm_count, info.max_shared_memory_per_block_optin)?)
    } else if use_sm90 {
        Resolved::Sm90(choose_sm90_config(&shape, info.sm_count, info.max_shared_memory_per_block_optin)?)
    } else {
        let gx = shape.m.div_ceil(PLAIN_TILE as usize);
        let gy = shape.n.div_ceil(PLAIN_TILE as usize);
        let gx = u32::try_from(gx).map_err(|_| Error::shape("m", "fewer than 2^32 tiles", shape.m))?;
        if gy > 65_535 {
            return Err(Error::shape("n", "n ≤ 65535·64 for the portable kernel", shape.n));
        }
        Resolved::Portable { grid: (gx, gy as u32) }
    };
    Ok(Plan { shape, resolved, zero_fill: false })
}

/// Replaces a plan's sm_90a configuration by a forced one ([`GemmOptions::force_sm90`]).
fn apply_forced(p: &mut Plan, forced: &ForcedSm90, kernel: GemmKernel, info: &DeviceInfo) -> Result<()> {
    if !matches!(kernel, GemmKernel::Sm90 | GemmKernel::Sm90Multicast) {
        return Err(Error::InvalidConfig(format!(
            "force_sm90 needs GemmKernel::Sm90 or Sm90Multicast, not {kernel:?}"
        )));
    }
    if let Resolved::Sm90(cfg) = &mut p.resolved {
        *cfg = plan::force_sm90_config(&p.shape, cfg, forced, info.max_shared_memory_per_block_optin)?;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn run<T: DeviceRepr + ValidAsZeroBits>(
    gpu: &Gpu,
    a: TensorRef<'_, E4M3>,
    sa: TensorRef<'_, f32>,
    b: TensorRef<'_, E4M3>,
    sb: TensorRef<'_, f32>,
    mut out: TensorMut<'_, T>,
    accumulate: bool,
    opts: &GemmOptions,
    workspace: Option<TensorMut<'_, f32>>,
) -> Result<()> {
    check_devices!(gpu, a, sa, b, sb, out)?;
    // The kernels read and write dense rows.
    a.require_dense("a")?;
    sa.require_dense("sa")?;
    b.require_dense("b")?;
    sb.require_dense("sb")?;
    out.require_dense("out")?;
    if let Some(ws) = &workspace {
        check_devices!(gpu, ws)?;
        ws.require_dense("workspace")?;
    }
    let mut p = plan(a.shape(), sa.shape(), b.shape(), sb.shape(), out.shape(), accumulate, opts.kernel, gpu.info())?;
    if let Some(forced) = &opts.force_sm90 {
        apply_forced(&mut p, forced, opts.kernel, gpu.info())?;
    }
    let shape = p.shape;
    match p.resolved {
        Resolved::Empty => {
            if p.zero_fill {
                out.memset_zero(gpu.stream())?;
            }
            Ok(())
        }
        Resolved::Sm90(cfg) => sm90::launch(gpu, &shape, &cfg, &a, &sa, &b, &sb, out, accumulate, workspace),
        Resolved::Portable { grid } => {
            let f = gpu.function(PLAIN_MODULE, "fp8_gemm_plain", 0)?;
            let cfg = LaunchConfig { grid_dim: (grid.0, grid.1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
            let stream = gpu.stream();
            let (av, sav, bv, sbv) =
                (a.kernel_arg(stream), sa.kernel_arg(stream), b.kernel_arg(stream), sb.kernel_arg(stream));
            let ov = out.kernel_arg(stream);
            let params = params::PortableGemmParams {
                a: av.addr(),
                sa: sav.addr(),
                b: bv.addr(),
                sb: sbv.addr(),
                out: ov.addr(),
                m: shape.m as i32,
                n: shape.n as i32,
                k: shape.k as i32,
                m_pad: shape.m_pad() as i32,
                accumulate: i32::from(accumulate),
            };
            let mut launch = stream.launch_builder(&f);
            launch.arg(&params);
            // SAFETY: shapes were validated: a has m·k codes, b n·k, sa ceil(k/128)·m_pad floats, sb
            // ceil(n/128)·ceil(k/128); out has m·n elements of the type `accumulate` selects (bf16 when 0, f32 when
            // 1). The kernel bounds every load by m, n, k and every store by m, n; the grid covers
            // ceil(m/64)×ceil(n/64) tiles.
            unsafe { launch.launch(cfg) }.cuda_call("cuLaunchKernel")?;
            Ok(())
        }
    }
}

/// `out[m, n] (bf16) = A·Bᵀ` with block scales; see the module docs for layouts and requirements. Enqueued on the
/// GPU's stream; m = 0 launches nothing; k = 0 writes zeros (a stream-ordered memset). When the plan splits K it
/// allocates its fp32 partials on the stream (`cuMemAllocAsync`); [`fp8_gemm_with_workspace`] takes them from the
/// caller instead, which is the form to capture in a CUDA graph.
///
/// Graph capture: yes, but a split-K plan allocates its partials on the stream (`cuMemAllocAsync`, captured as an
/// allocation node); [`fp8_gemm_with_workspace`] allocates nothing.
#[allow(clippy::too_many_arguments)]
pub fn fp8_gemm<'a>(
    gpu: &Gpu,
    a: impl Into<TensorRef<'a, E4M3>>,
    sa: impl Into<TensorRef<'a, f32>>,
    b: impl Into<TensorRef<'a, E4M3>>,
    sb: impl Into<TensorRef<'a, f32>>,
    out: impl Into<TensorMut<'a, bf16>>,
    opts: &GemmOptions,
) -> Result<()> {
    run(gpu, a.into(), sa.into(), b.into(), sb.into(), out.into(), false, opts, None)
}

/// `c[m, n] (fp32) += A·Bᵀ` with block scales (D = C + A·B in place). Same requirements as [`fp8_gemm`].
///
/// Graph capture: as [`fp8_gemm`].
#[allow(clippy::too_many_arguments)]
pub fn fp8_gemm_accumulate<'a>(
    gpu: &Gpu,
    a: impl Into<TensorRef<'a, E4M3>>,
    sa: impl Into<TensorRef<'a, f32>>,
    b: impl Into<TensorRef<'a, E4M3>>,
    sb: impl Into<TensorRef<'a, f32>>,
    c: impl Into<TensorMut<'a, f32>>,
    opts: &GemmOptions,
) -> Result<()> {
    run(gpu, a.into(), sa.into(), b.into(), sb.into(), c.into(), true, opts, None)
}

/// fp32 elements of workspace [`fp8_gemm_with_workspace`] / [`fp8_gemm_accumulate_with_workspace`] need for an
/// `m × n × k` problem on this device with these options (0 when the plan does not split K). Pure: computed from
/// the shapes and the device facts, nothing is allocated.
pub fn workspace_elements(
    gpu: &Gpu,
    m: usize,
    n: usize,
    k: usize,
    accumulate: bool,
    opts: &GemmOptions,
) -> Result<usize> {
    let kb = k.div_ceil(128);
    let shapes = ([m, k], [kb, m.div_ceil(4) * 4], [n, k], [n.div_ceil(128), kb], [m, n]);
    let mut p = plan(&shapes.0, &shapes.1, &shapes.2, &shapes.3, &shapes.4, accumulate, opts.kernel, gpu.info())?;
    if let Some(forced) = &opts.force_sm90 {
        apply_forced(&mut p, forced, opts.kernel, gpu.info())?;
    }
    Ok(match p.resolved {
        Resolved::Sm90(cfg) => sm90::workspace_elements(&p.shape, &cfg),
        _ => 0,
    })
}

/// [`fp8_gemm`] with a caller-owned fp32 workspace of at least [`workspace_elements`] elements (any shape), so
/// that a split-K plan allocates nothing: for CUDA-graph capture and engines with their own allocator. Launches only;
/// no allocation, copy or synchronization.
///
/// Graph capture: yes (launches only; no allocation, copy or synchronization).
#[allow(clippy::too_many_arguments)]
pub fn fp8_gemm_with_workspace<'a>(
    gpu: &Gpu,
    a: impl Into<TensorRef<'a, E4M3>>,
    sa: impl Into<TensorRef<'a, f32>>,
    b: impl Into<TensorRef<'a, E4M3>>,
    sb: impl Into<TensorRef<'a, f32>>,
    out: impl Into<TensorMut<'a, bf16>>,
    workspace: impl Into<TensorMut<'a, f32>>,
    opts: &GemmOptions,
) -> Result<()> {
    run(gpu, a.into(), sa.into(), b.into(), sb.into(), out.into(), false, opts, Some(workspace.into()))
}

/// [`fp8_gemm_accumulate`] with a caller-owned workspace, as [`fp8_gemm_with_workspace`].
///
/// Graph capture: yes (launches only; no allocation, copy or synchronization).
#[allow(clippy::too_many_arguments)]
pub fn fp8_gemm_accumulate_with_workspace<'a>(
    gpu: &Gpu,
    a: impl Into<TensorRef<'a, E4M3>>,
    sa: impl Into<TensorRef<'a, f32>>,
    b: impl Into<TensorRef<'a, E4M3>>,
    sb: impl Into<TensorRef<'a, f32>>,
    c: impl Into<TensorMut<'a, f32>>,
    workspace: impl Into<TensorMut<'a, f32>>,
    opts: &GemmOptions,
) -> Result<()> {
    run(gpu, a.into(), sa.into(), b.into(), sb.into(), c.into(), true, opts, Some(workspace.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hopper() -> DeviceInfo {
        DeviceInfo {
            ordinal: 0,
            compute_capability: (9, 0),
            sm_count: 132,
            max_shared_memory_per_block_optin: 232_448,
            l2_cache_bytes: 50 << 20,
            emulated: false,
        }
    }

    fn ampere() -> DeviceInfo {
        DeviceInfo { compute_capability: (8, 0), sm_count: 108, max_shared_memory_per_block_optin: 166_912, ..hopper() }
    }

    fn shapes(m: usize, n: usize, k: usize) -> [Vec<usize>; 5] {
        let kb = k.div_ceil(128);
        [vec![m, k], vec![kb, m.div_ceil(4) * 4], vec![n, k], vec![n.div_ceil(128), kb], vec![m, n]]
    }

    fn plan_for(m: usize, n: usize, k: usize, acc: bool, kernel: GemmKernel, info: &DeviceInfo) -> Result<Plan> {
        let [a, sa, b, sb, o] = shapes(m, n, k);
        plan(&a, &sa, &b, &sb, &o, acc, kernel, info)
    }

    #[test]
    fn kernel_resolution() {
        let h = hopper();
        assert!(matches!(plan_for(128, 256, 512, false, GemmKernel::Auto, &h).unwrap().resolved, Resolved::Sm90(_)));
        assert!(matches!(
            plan_for(128, 256, 512, false, GemmKernel::Portable, &h).unwrap().resolved,
            Resolved::Portable { grid: (2, 4) }
        ));
        assert!(matches!(
            plan_for(129, 256, 512, false, GemmKernel::Auto, &ampere()).unwrap().resolved,
            Resolved::Portable { grid: (3, 4) }
        ));
        assert!(matches!(
            plan_for(128, 256, 512, false, GemmKernel::Sm90, &ampere()),
            Err(Error::UnsupportedDevice { .. })
        ));
        let old = DeviceInfo { compute_capability: (7, 5), ..ampere() };
        assert!(plan_for(128, 256, 512, false, GemmKernel::Auto, &old).is_err());
    }

    #[test]
    fn forced_configurations_are_checked() {
        let h = hopper();
        let mut p = plan_for(300, 520, 1040, false, GemmKernel::Sm90, &h).unwrap();
        let f = ForcedSm90 { block_m: 128, block_n: 160, grid: 2, k_splits: 3, stages: 0 };
        apply_forced(&mut p, &f, GemmKernel::Sm90, &h).unwrap();
        let Resolved::Sm90(c) = p.resolved else { panic!("not sm90") };
        // 9 K blocks in splits of 3; 3 × 4 tiles × 3 splits = 36 items on 2 CTAs; 6 stages fit for 128×160.
        assert_eq!((c.block_m, c.block_n, c.grid, c.k_splits, c.kb_per_split, c.stages), (128, 160, 2, 3, 3, 6));
        assert_eq!(c.kernel_name().unwrap(), "fp8_gemm_sm90_m128n160");
        // 4 splits of 9 K blocks are ceil(9/4) = 3 long: 3 splits.
        let mut p = plan_for(300, 520, 1040, false, GemmKernel::Sm90, &h).unwrap();
        apply_forced(&mut p, &ForcedSm90 { k_splits: 4, ..f }, GemmKernel::Sm90, &h).unwrap();
        let Resolved::Sm90(c) = p.resolved else { panic!("not sm90") };
        assert_eq!((c.k_splits, c.kb_per_split), (3, 3));
        let reject = |f: ForcedSm90, kernel: GemmKernel| {
            let mut p = plan_for(300, 520, 1040, false, kernel, &h).unwrap();
            assert!(matches!(apply_forced(&mut p, &f, kernel, &h), Err(Error::InvalidConfig(_))), "{f:?} {kernel:?}");
        };
        reject(ForcedSm90 { block_n: 96, ..f }, GemmKernel::Sm90);
        reject(ForcedSm90 { block_m: 256, ..f }, GemmKernel::Sm90);
        reject(ForcedSm90 { grid: 0, ..f }, GemmKernel::Sm90);
        reject(ForcedSm90 { grid: 37, ..f }, GemmKernel::Sm90);
        reject(ForcedSm90 { k_splits: 0, ..f }, GemmKernel::Sm90);
        reject(ForcedSm90 { k_splits: 10, ..f }, GemmKernel::Sm90);
        reject(ForcedSm90 { stages: 9, ..f }, GemmKernel::Sm90);
        reject(ForcedSm90 { stages: 8, ..f }, GemmKernel::Sm90); // 8 stages of 128×160 exceed 227 KiB
        reject(f, GemmKernel::Auto);
        reject(ForcedSm90 { k_splits: 1, ..f }, GemmKernel::Portable);
        // Multicast: block N 128/160, one split, an even grid of at most 2 × tile pairs (2 × 2 × 5 here).
        let mc = ForcedSm90 { block_m: 128, block_n: 128, grid: 2, k_splits: 1, stages: 0 };
        let mut p = plan_for(300, 520, 1040, false, GemmKernel::Sm90Multicast, &h).unwrap();
        apply_forced(&mut p, &mc, GemmKernel::Sm90Multicast, &h).unwrap();
        let Resolved::Sm90(c) = p.resolved else { panic!("not sm90") };
        assert_eq!((c.cluster_m, c.grid, c.block_n), (2, 2, 128));
        reject(ForcedSm90 { grid: 3, ..mc }, GemmKernel::Sm90Multicast);
        reject(ForcedSm90 { k_splits: 2, ..mc }, GemmKernel::Sm90Multicast);
        reject(ForcedSm90 { block_n: 64, ..mc }, GemmKernel::Sm90Multicast);
        reject(ForcedSm90 { grid: 22, ..mc }, GemmKernel::Sm90Multicast);
    }

    #[test]
    fn empty_problems_launch_nothing() {
        let h = hopper();
        let p = plan_for(0, 256, 512, false, GemmKernel::Auto, &h).unwrap();
        assert_eq!((p.resolved, p.zero_fill), (Resolved::Empty, false));
        let p = plan_for(3, 256, 0, false, GemmKernel::Auto, &h).unwrap();
        assert_eq!((p.resolved, p.zero_fill), (Resolved::Empty, true));
        let p = plan_for(3, 256, 0, true, GemmKernel::Auto, &h).unwrap();
        assert_eq!((p.resolved, p.zero_fill), (Resolved::Empty, false));
        let p = plan_for(3, 0, 256, false, GemmKernel::Sm90, &h).unwrap();
        assert_eq!(p.resolved, Resolved::Empty);
    }

    #[test]
    fn shape_errors_before_any_device_work() {
        let h = hopper();
        let [a, sa, b, sb, o] = shapes(64, 256, 512);
        assert!(plan(&a, &sa, &b, &sb, &o, false, GemmKernel::Auto, &h).is_ok());
        let e = plan(&a, &[64, 4], &b, &sb, &o, false, GemmKernel::Auto, &h).unwrap_err();
        assert!(matches!(e, Error::Shape { arg: "sa", .. }), "{e}");
        let e = plan(&a, &sa, &b, &[4, 2], &o, false, GemmKernel::Auto, &h).unwrap_err();
        assert!(matches!(e, Error::Shape { arg: "sb", .. }), "{e}");
        let [a, sa, b, sb, o] = shapes(64, 250, 512);
        assert!(matches!(plan(&a, &sa, &b, &sb, &o, false, GemmKernel::Auto, &h), Err(Error::Alignment { .. })));
        let [a, sa, b, sb, o] = shapes(64, 256, 500);
        assert!(matches!(plan(&a, &sa, &b, &sb, &o, false, GemmKernel::Portable, &h), Err(Error::Alignment { .. })));
        // Both kernels accept exactly the same inputs.
        for &(m, n, k) in &[(1, 8, 16), (7, 2112, 7168), (129, 24576, 1536), (1000, 136, 144)] {
            assert!(plan_for(m, n, k, false, GemmKernel::Portable, &h).is_ok());
            assert!(plan_for(m, n, k, true, GemmKernel::Sm90, &h).is_ok());
        }
    }
}
