//! The grouped FP8 expert GEMM: one kernel launch over every expert's segment (the TMA-fed wgmma kernel on
//! sm_90a, the SIMT kernel elsewhere), with the host twins of its schedule.

use cudarc::driver::CudaStream;

use super::params::GroupedGemmParams;
use super::*;
use crate::view::KernelPtr;

/// Which grouped-GEMM kernel to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GemmBackend {
    /// [`Sm90Tma`](Self::Sm90Tma) on sm_90, [`Portable`](Self::Portable) elsewhere.
    #[default]
    Auto,
    /// The portable SIMT kernel (`moe.cu`), any sm_80+ device. Every op calls its fallback `Portable`.
    Portable,
    /// The persistent warp-specialized TMA + wgmma kernel on the crate's one FP8 mainloop
    /// (`moe_grouped_sm90.cu`), sm_90 only. Serves contiguous and masked layouts alike (segment starts on
    /// multiples of [`GEMM_BLOCK_M`]).
    Sm90Tma,
}

const TMA_MODULE: &str = "moe_grouped_sm90";
pub(super) const TMA_KERNEL: &str = "moe_grouped_gemm_fp8_sm90_tma";
/// Output tile rows of the [`GemmBackend::Sm90Tma`] kernel (the segment granule).
pub const TMA_BLOCK_M: usize = GEMM_BLOCK_M;
/// Output tile columns of the [`GemmBackend::Sm90Tma`] kernel (`N % 128 == 0`: a tile never crosses an expert's
/// weight rows and uses one weight-scale block).
pub const TMA_BLOCK_N: usize = 128;

/// Last `e` in `0..=E` with `offsets[e] <= row` (`E`: past the end). Twin of `r1k::moe_find_segment`.
pub(super) fn find_segment(offsets: &[i64], e: usize, row: i64) -> usize {
    let (mut lo, mut hi) = (0usize, e);
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        if offsets[mid] <= row {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    lo
}

/// End of segment `e`'s valid rows. Twin of `r1k::moe_segment_valid_end`.
pub(super) fn segment_valid_end(offsets: &[i64], counts: &[i32], e: usize, rows: i64) -> i64 {
    let cap = offsets[e + 1] - offsets[e];
    (offsets[e] + (counts[e].max(0) as i64).min(cap)).min(rows)
}

/// One tile of the [`GemmBackend::Sm90Tma`] kernel's schedule.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TmaTile {
    /// Expert (segment) of the tile.
    pub expert: usize,
    /// First row.
    pub m0: i64,
    /// First column (within the expert's `N`).
    pub n0: usize,
    /// Rows at or past this are not stored.
    pub valid_end: i64,
}

/// Independent pipes (math warpgroup + producer thread + half the ring) of one [`GemmBackend::Sm90Tma`] CTA.
pub const TMA_PIPES: u32 = 2;

/// Twin of the kernel's per-role loop: the tiles CTA `cta` of `grid` computes on each pipe, in order (valid tile
/// `j` of the CTA, in schedule order, goes to pipe `j % 2`).
#[doc(hidden)]
pub fn tma_cta_schedule(
    cta: u32,
    grid: u32,
    rows: usize,
    n: usize,
    group_m: u32,
    offsets: &[i64],
    counts: &[i32],
) -> [Vec<TmaTile>; 2] {
    let tiles = (rows.div_ceil(TMA_BLOCK_M) * (n / TMA_BLOCK_N)) as u32;
    let mut pipes = [Vec::new(), Vec::new()];
    let mut valid = 0usize;
    for item in (cta..tiles).step_by(grid as usize) {
        if let Some(w) = tma_tile_work(item, rows, n, group_m, offsets, counts) {
            pipes[valid % 2].push(w);
            valid += 1;
        }
    }
    pipes
}

/// Twin of `tile_work` in kernels/moe_grouped_sm90.cu: what tile `item` of the `[ceil(rows/64)] × [N/128]` grid
/// computes, or `None` when it holds no valid row (producer and consumers both skip it).
#[doc(hidden)]
pub fn tma_tile_work(
    item: u32,
    rows: usize,
    n: usize,
    group_m: u32,
    offsets: &[i64],
    counts: &[i32],
) -> Option<TmaTile> {
    let e = counts.len();
    let tiles_m = rows.div_ceil(TMA_BLOCK_M) as u32;
    let tiles_n = (n / TMA_BLOCK_N) as u32;
    let (tm, tn) = crate::fp8_gemm::plan::tile_coords(item, tiles_m, tiles_n, group_m);
    let m0 = i64::from(tm) * TMA_BLOCK_M as i64;
    let expert = find_segment(offsets, e, m0);
    if expert >= e {
        return None;
    }
    let valid_end = segment_valid_end(offsets, counts, expert, rows as i64);
    (m0 < valid_end).then_some(TmaTile { expert, m0, n0: tn as usize * TMA_BLOCK_N, valid_end })
}

/// The three TMA descriptions of the [`GemmBackend::Sm90Tma`] kernel: A `[rows, K]` in `[64, 128]` boxes, the
/// experts' weights as one `[E·N, K]` map in `[128, 128]` boxes (both 128-byte swizzled), and the MN-major activation
/// scales `[K/128, round_up(rows, 4)]` in `[1, 64]` boxes.
pub fn grouped_tmas(rows: usize, n: usize, k: usize, num_experts: usize) -> [Tma2d; 3] {
    let (k64, m_pad) = (k as u64, padded_scale_rows(rows) as u64);
    [
        Tma2d {
            dtype: TmaDtype::U8,
            rows: rows as u64,
            cols: k64,
            row_stride_bytes: k64,
            box_rows: TMA_BLOCK_M as u32,
            box_cols: 128,
            swizzle_128b: true,
        },
        Tma2d {
            dtype: TmaDtype::U8,
            rows: (num_experts * n) as u64,
            cols: k64,
            row_stride_bytes: k64,
            box_rows: TMA_BLOCK_N as u32,
            box_cols: 128,
            swizzle_128b: true,
        },
        Tma2d {
            dtype: TmaDtype::F32,
            rows: (k / QUANT_BLOCK) as u64,
            cols: m_pad,
            row_stride_bytes: m_pad * 4,
            box_rows: 1,
            box_cols: TMA_BLOCK_M as u32,
            swizzle_128b: false,
        },
    ]
}

/// Launch shape of the [`GemmBackend::Sm90Tma`] kernel: `(stages, dynamic smem bytes, grid)`.
pub(super) fn tma_launch_shape(rows: usize, n: usize, sm_count: u32) -> Result<(u32, u32, u32)> {
    let (bm, bn) = (TMA_BLOCK_M as u32, TMA_BLOCK_N as u32);
    // Two pipes share the ring half and half, each at least two deep.
    let stages = plan::pick_stages(bm, bn, plan::SM90_SMEM_LIMIT)
        .map(|s| s & !1)
        .filter(|&s| s >= 2 * TMA_PIPES)
        .ok_or_else(|| Error::InvalidConfig("grouped TMA GEMM: no pipeline fits shared memory".into()))?;
    let tiles = (rows.div_ceil(TMA_BLOCK_M) as u64) * (n / TMA_BLOCK_N) as u64;
    if tiles >= 1 << 32 {
        return Err(Error::shape("rows·n", "fewer than 2^32 tiles", tiles as usize));
    }
    let grid = tiles.min(u64::from(sm_count.max(1))) as u32;
    Ok((stages, plan::smem_bytes(bm, bn, stages), grid))
}

#[allow(clippy::too_many_arguments)]
fn grouped_gemm_tma(
    gpu: &Gpu,
    a: &TensorRef<'_, E4M3>,
    a_scales: &TensorRef<'_, f32>,
    w: &TensorRef<'_, E4M3>,
    w_scales: &TensorRef<'_, f32>,
    offsets: &TensorRef<'_, i64>,
    counts: &TensorRef<'_, i32>,
    out: &mut TensorMut<'_, bf16>,
) -> Result<()> {
    let [rows, kdim] = a.dims::<2>("a")?;
    let [e, n, _] = w.dims::<3>("w")?;
    // TMA coordinates and the kernel's row of B (e·N + n0) are i32; a tile row start is at most rows + 63.
    to_i32("rows", rows + TMA_BLOCK_M)?;
    let en = e.checked_mul(n).ok_or_else(|| Error::shape("w", "E·N that fits", e))?;
    to_i32("E·N", en)?;
    let (stages, smem, grid) = tma_launch_shape(rows, n, gpu.info().sm_count)?;
    let [ta, tb, tsa] = grouped_tmas(rows, n, kdim, e);
    let f = gpu.function(TMA_MODULE, TMA_KERNEL, smem)?;
    let stream = gpu.stream();
    let args = GroupedArgs::new(stream, a, a_scales, w, w_scales, offsets, counts, out);
    let maps = [ta.encode(args.params.a)?, tb.encode(args.params.w)?, tsa.encode(args.params.a_scales)?];
    let params = GroupedGemmParams { stages: stages as i32, group_m: plan::SM90_GROUP_M as i32, ..args.params };
    let mut l = stream.launch_builder(&f);
    l.arg(&maps[0]).arg(&maps[1]).arg(&maps[2]).arg(&params);
    let threads = 128 * (TMA_PIPES + 1);
    let c = LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: smem };
    // SAFETY: the maps describe exactly a [rows, K], w [E·N, K] and a_scales [K/128, round_up(rows, 4)] (TMA never
    // reads outside them, zero-filling out-of-range box rows); the expert comes from a binary search clamped to
    // 0..E, so w_scales indices (e, n0/128, kb) are in bounds of [E, N/128, K/128]; stored rows are below
    // min(offsets[e] + counts[e], offsets[e+1], rows) and columns below N (N % 128 == 0), so `out` [rows, N] stays in
    // bounds whatever the device offsets hold. `smem` covers the ring of `stages` stages (plan::smem_bytes).
    unsafe { l.launch(c) }.cuda_call("cuLaunchKernel")?;
    Ok(())
}

/// The grouped kernels' argument struct over the validated tensors, with the device-pointer guards that must live
/// until the launch has been issued (they record it on the stream when dropped).
struct GroupedArgs<'s> {
    params: GroupedGemmParams,
    _guards: [KernelPtr<'s>; 7],
}

impl<'s> GroupedArgs<'s> {
    /// The caller has validated the shapes (so the counts fit the struct's integer fields).
    #[allow(clippy::too_many_arguments)]
    fn new(
        stream: &'s CudaStream,
        a: &'s TensorRef<'_, E4M3>,
        a_scales: &'s TensorRef<'_, f32>,
        w: &'s TensorRef<'_, E4M3>,
        w_scales: &'s TensorRef<'_, f32>,
        offsets: &'s TensorRef<'_, i64>,
        counts: &'s TensorRef<'_, i32>,
        out: &'s mut TensorMut<'_, bf16>,
    ) -> GroupedArgs<'s> {
        let [rows, k] = [a.shape()[0], a.shape()[1]];
        let [e, n] = [w.shape()[0], w.shape()[1]];
        let guards = [
            a.kernel_arg(stream),
            a_scales.kernel_arg(stream),
            w.kernel_arg(stream),
            w_scales.kernel_arg(stream),
            offsets.kernel_arg(stream),
            counts.kernel_arg(stream),
            out.kernel_arg(stream),
        ];
        let params = GroupedGemmParams {
            a: guards[0].addr(),
            a_scales: guards[1].addr(),
            w: guards[2].addr(),
            w_scales: guards[3].addr(),
            offsets: guards[4].addr(),
            counts: guards[5].addr(),
            out: guards[6].addr(),
            rows: rows as i64,
            rows_pad: padded_scale_rows(rows) as i64,
            n: n as i32,
            k: k as i32,
            num_experts: e as i32,
            stages: 0,
            group_m: 0,
        };
        GroupedArgs { params, _guards: guards }
    }
}

/// Grouped FP8 GEMM: `out[r, :] = a[r, :] · w[e(r)]ᵀ` (bf16 out), where row `r`'s expert is the segment of the
/// device `offsets` `[E+1]` containing it and only rows below `offsets[e] + counts[e]` are computed and written.
/// `a` `[rows, K]` with scales `[K/128, round_up(rows, 4)]`; `w` `[E, N, K]` with scales `[E, N/128, K/128]`.
/// Segment starts must be multiples of [`GEMM_BLOCK_M`] (what [`permute`] produces). Dispatches to the TMA + wgmma
/// kernel on sm_90, else to the portable SIMT kernel.
///
/// Graph capture: yes (launches only; no allocation, copy or synchronization).
#[allow(clippy::too_many_arguments)]
pub fn grouped_gemm<'a>(
    gpu: &Gpu,
    a: impl Into<TensorRef<'a, E4M3>>,
    a_scales: impl Into<TensorRef<'a, f32>>,
    w: impl Into<TensorRef<'a, E4M3>>,
    w_scales: impl Into<TensorRef<'a, f32>>,
    offsets: impl Into<TensorRef<'a, i64>>,
    counts: impl Into<TensorRef<'a, i32>>,
    out: impl Into<TensorMut<'a, bf16>>,
) -> Result<()> {
    grouped_gemm_with(gpu, a, a_scales, w, w_scales, offsets, counts, out, GemmBackend::Auto)
}

/// [`grouped_gemm`] with an explicit kernel choice.
///
/// Graph capture: yes (launches only; no allocation, copy or synchronization).
#[allow(clippy::too_many_arguments)]
pub fn grouped_gemm_with<'a>(
    gpu: &Gpu,
    a: impl Into<TensorRef<'a, E4M3>>,
    a_scales: impl Into<TensorRef<'a, f32>>,
    w: impl Into<TensorRef<'a, E4M3>>,
    w_scales: impl Into<TensorRef<'a, f32>>,
    offsets: impl Into<TensorRef<'a, i64>>,
    counts: impl Into<TensorRef<'a, i32>>,
    out: impl Into<TensorMut<'a, bf16>>,
    backend: GemmBackend,
) -> Result<()> {
    let (a, a_scales, w, w_scales) = (a.into(), a_scales.into(), w.into(), w_scales.into());
    let (offsets, counts, mut out) = (offsets.into(), counts.into(), out.into());
    check_devices!(gpu, a, a_scales, w, w_scales, offsets, counts, out)?;
    // The kernels read and write dense rows.
    a.require_dense("a")?;
    a_scales.require_dense("a_scales")?;
    w.require_dense("w")?;
    w_scales.require_dense("w_scales")?;
    out.require_dense("out")?;
    let [rows, kdim] = a.dims::<2>("a")?;
    let [e, n, k2] = w.dims::<3>("w")?;
    if k2 != kdim {
        return Err(Error::shape("w", format!("[E, N, {kdim}]"), format!("{:?}", w.shape())));
    }
    if kdim == 0 || kdim % QUANT_BLOCK != 0 {
        return Err(Error::Alignment { arg: "k", required: QUANT_BLOCK, got: kdim });
    }
    if n == 0 || n % QUANT_BLOCK != 0 {
        return Err(Error::Alignment { arg: "n", required: QUANT_BLOCK, got: n });
    }
    if e == 0 {
        return Err(Error::InvalidConfig("grouped GEMM needs at least one expert".into()));
    }
    a_scales.expect_shape("a_scales", &activation_scale_shape(rows, kdim))?;
    w_scales.expect_shape("w_scales", &[e, n / QUANT_BLOCK, kdim / QUANT_BLOCK])?;
    offsets.expect_shape("offsets", &[e + 1])?;
    counts.expect_shape("counts", &[e])?;
    out.expect_shape("out", &[rows, n])?;
    to_i32("n", n)?;
    to_i32("k", kdim)?;
    to_i32("E", e)?;
    to_i64("rows", padded_scale_rows(rows))?;
    e.checked_mul(n).and_then(|v| v.checked_mul(kdim)).ok_or_else(|| Error::shape("w", "E·N·K that fits", e))?;
    if backend == GemmBackend::Sm90Tma {
        gpu.require_hopper(TMA_KERNEL)?;
    }
    if rows == 0 {
        return Ok(());
    }
    let tma = match backend {
        GemmBackend::Auto => gpu.info().is_hopper(),
        GemmBackend::Portable => false,
        GemmBackend::Sm90Tma => true,
    };
    if tma {
        return grouped_gemm_tma(gpu, &a, &a_scales, &w, &w_scales, &offsets, &counts, &mut out);
    }
    let grid = (grid_u32("rows", rows.div_ceil(GEMM_BLOCK_M))?, u32::try_from(n / GEMM_BLOCK_N).unwrap_or(u32::MAX));
    if grid.1 > 65_535 {
        return Err(Error::shape("n", "at most 65535·64", n));
    }
    let f = gpu.function(MODULE, "moe_grouped_gemm_fp8", 0)?;
    let stream = gpu.stream();
    let args = GroupedArgs::new(stream, &a, &a_scales, &w, &w_scales, &offsets, &counts, &mut out);
    let mut l = stream.launch_builder(&f);
    l.arg(&args.params);
    let c = LaunchConfig { grid_dim: (grid.0, grid.1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: shapes checked above. Each CTA's expert comes from a binary search clamped to 0..E; its rows are
    // bounded by min(offsets[e] + counts[e], offsets[e+1], rows), so a/a_scales/out accesses stay in bounds whatever
    // the device offsets hold; w rows n0..n0+64 ≤ N (N % 128 == 0) and K columns are in bounds since K % 128 == 0.
    unsafe { l.launch(c) }.cuda_call("cuLaunchKernel")?;
    Ok(())
}
