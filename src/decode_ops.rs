//! GPU launchers for the small ops of a decode step: RMSNorm, YaRN RoPE (in place), per-head batched matmul (W_UK
//! absorption / W_UV) and paged-cache append. References: [`crate::reference::decode_ops`].

use cudarc::driver::{LaunchConfig, PushKernelArg};
use half::bf16;

use crate::device::{check_devices, Gpu};
use crate::error::{to_i32, CudaCall, Error, Result};
use crate::reference::decode_ops::RopeConfig;
use crate::tensor::DeviceTensor;
use crate::view::{TensorMut, TensorRef};

const MODULE: &str = "decode_ops";

/// The kernels' argument structs, the Rust twins of `kernels/common/decode_ops_params.cuh` (one per kernel; field
/// comments are in the header). [`kernel_params!`] pins each layout here; the header pins the same offsets and the
/// test below checks they agree.
mod params {
    use crate::kernel_params::kernel_params;

    kernel_params! {
        /// `rms_norm_bf16`.
        pub(super) struct RmsNormParams = 64 bytes {
            x: u64 @ 0,
            residual: u64 @ 8,
            residual_out: u64 @ 16,
            weight: u64 @ 24,
            y: u64 @ 32,
            x_stride: i64 @ 40,
            y_stride: i64 @ 48,
            d: i32 @ 56,
            eps: f32 @ 60,
        }
    }

    kernel_params! {
        /// `copy_columns_bf16`.
        pub(super) struct CopyColumnsParams = 48 bytes {
            src: u64 @ 0,
            dst: u64 @ 8,
            rows: i64 @ 16,
            width: i32 @ 24,
            src_len: i32 @ 28,
            src_col: i32 @ 32,
            dst_len: i32 @ 36,
            dst_col: i32 @ 40,
        }
    }

    kernel_params! {
        /// `add_bf16`.
        pub(super) struct AddParams = 32 bytes {
            a: u64 @ 0,
            b: u64 @ 8,
            out: u64 @ 16,
            n: i64 @ 24,
        }
    }

    kernel_params! {
        /// `rope_bf16_inplace`.
        pub(super) struct RopeParams = 56 bytes {
            x: u64 @ 0,
            positions: u64 @ 8,
            inv_freq: u64 @ 16,
            rows: i32 @ 24,
            row_len: i32 @ 28,
            count: i32 @ 32,
            stride: i32 @ 36,
            offset: i32 @ 40,
            dim: i32 @ 44,
            scale: f32 @ 48,
        }
    }

    kernel_params! {
        /// `head_bmm_bf16`.
        pub(super) struct HeadBmmParams = 96 bytes {
            x: u64 @ 0,
            w: u64 @ 8,
            out: u64 @ 16,
            ws_h: i64 @ 24,
            ws_i: i64 @ 32,
            ws_j: i64 @ 40,
            w_offset: i64 @ 48,
            t: i32 @ 56,
            heads: i32 @ 60,
            k: i32 @ 64,
            n: i32 @ 68,
            x_len: i32 @ 72,
            x_col: i32 @ 76,
            out_len: i32 @ 80,
            out_col: i32 @ 84,
            out_f32: i32 @ 88,
        }
    }

    kernel_params! {
        /// `cache_append_bf16`.
        pub(super) struct CacheAppendParams = 64 bytes {
            rows: u64 @ 0,
            cache: u64 @ 8,
            block_table: u64 @ 16,
            seq_ids: u64 @ 24,
            positions: u64 @ 32,
            width: i32 @ 40,
            page: i32 @ 44,
            num_blocks: i32 @ 48,
            batch: i32 @ 52,
            max_blocks: i32 @ 56,
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use crate::kernel_params::assert_header_pins;

        const PATH: &str = "kernels/common/decode_ops_params.cuh";
        const HEADER: &str = include_str!("../kernels/common/decode_ops_params.cuh");

        #[test]
        fn the_header_pins_the_same_layouts() {
            assert_header_pins::<RmsNormParams>(PATH, HEADER);
            assert_header_pins::<CopyColumnsParams>(PATH, HEADER);
            assert_header_pins::<AddParams>(PATH, HEADER);
            assert_header_pins::<RopeParams>(PATH, HEADER);
            assert_header_pins::<HeadBmmParams>(PATH, HEADER);
            assert_header_pins::<CacheAppendParams>(PATH, HEADER);
        }
    }
}

use params::{AddParams, CacheAppendParams, CopyColumnsParams, HeadBmmParams, RmsNormParams, RopeParams};

fn launch_rms_norm(
    gpu: &Gpu,
    rows: usize,
    d: usize,
    pointers: [u64; 5],
    x_stride: usize,
    y_stride: usize,
    eps: f32,
) -> Result<()> {
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(Error::InvalidConfig(format!("rms_norm eps must be finite and ≥ 0, got {eps}")));
    }
    let di = to_i32("d", d)?;
    let grid = u32::try_from(rows).map_err(|_| Error::shape("x", "fewer than 2^32 rows", rows))?;
    if rows == 0 || d == 0 {
        return Ok(());
    }
    let f = gpu.function(MODULE, "rms_norm_bf16", 0)?;
    let cfg = LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let [x, residual, residual_out, weight, y] = pointers;
    let params = RmsNormParams {
        x,
        residual,
        residual_out,
        weight,
        y,
        x_stride: x_stride as i64,
        y_stride: y_stride as i64,
        d: di,
        eps,
    };
    let mut launch = gpu.stream().launch_builder(&f);
    launch.arg(&params);
    // SAFETY: callers pass pointers of tensors whose shapes they checked: rows rows of `x_stride` / `y_stride`
    // elements with d ≤ both strides, residual tensors [rows, d], weight [d]. Null residual pointers disable the add.
    unsafe { launch.launch(cfg) }.cuda_call("cuLaunchKernel")?;
    Ok(())
}

/// `y = rms_norm(x) · weight` over the last dimension of `x` [rows, d].
///
/// Graph capture: yes (launches only; no allocation, copy or synchronization).
pub fn rms_norm<'a>(
    gpu: &Gpu,
    x: impl Into<TensorRef<'a, bf16>>,
    weight: impl Into<TensorRef<'a, bf16>>,
    y: impl Into<TensorMut<'a, bf16>>,
    eps: f32,
) -> Result<()> {
    let (x, weight, mut y) = (x.into(), weight.into(), y.into());
    check_devices!(gpu, x, weight, y)?;
    let [rows, d] = x.dims::<2>("x")?;
    weight.expect_shape("weight", &[d])?;
    y.expect_shape("y", &[rows, d])?;
    let stream = gpu.stream();
    let (xs, ys) = (x.row_stride(), y.row_stride());
    let (xp, wp, yp) = (x.kernel_arg(stream), weight.kernel_arg(stream), y.kernel_arg(stream));
    launch_rms_norm(gpu, rows, d, [xp.addr(), 0, 0, wp.addr(), yp.addr()], xs, ys, eps)
}

/// Fused residual add + RMSNorm: `h = x + residual` (rounded to bf16, written to `residual_out`), `y = rms_norm(h) ·
/// weight`. All of x, residual, residual_out, y are [rows, d].
///
/// Graph capture: yes (launches only; no allocation, copy or synchronization).
pub fn add_rms_norm<'a>(
    gpu: &Gpu,
    x: impl Into<TensorRef<'a, bf16>>,
    residual: impl Into<TensorRef<'a, bf16>>,
    residual_out: impl Into<TensorMut<'a, bf16>>,
    weight: impl Into<TensorRef<'a, bf16>>,
    y: impl Into<TensorMut<'a, bf16>>,
    eps: f32,
) -> Result<()> {
    let (x, residual, mut residual_out, weight, mut y) =
        (x.into(), residual.into(), residual_out.into(), weight.into(), y.into());
    check_devices!(gpu, x, residual, residual_out, weight, y)?;
    let [rows, d] = x.dims::<2>("x")?;
    residual.expect_shape("residual", &[rows, d])?;
    residual_out.expect_shape("residual_out", &[rows, d])?;
    weight.expect_shape("weight", &[d])?;
    y.expect_shape("y", &[rows, d])?;
    // The kernel reads and writes the residual stream with dense rows; x and y may be strided.
    residual.require_dense("residual")?;
    residual_out.require_dense("residual_out")?;
    let stream = gpu.stream();
    let (xs, ys) = (x.row_stride(), y.row_stride());
    let (xp, rp, wp) = (x.kernel_arg(stream), residual.kernel_arg(stream), weight.kernel_arg(stream));
    let (op, yp) = (residual_out.kernel_arg(stream), y.kernel_arg(stream));
    launch_rms_norm(gpu, rows, d, [xp.addr(), rp.addr(), op.addr(), wp.addr(), yp.addr()], xs, ys, eps)
}

/// Normalizes, in place, the first `weight.len()` columns of every row of `x` [rows, row_len] (e.g. the 512-wide
/// latent of a 576-wide kv_a row, leaving its 64 RoPE columns untouched).
///
/// Graph capture: yes (launches only; no allocation, copy or synchronization).
pub fn rms_norm_prefix_inplace<'a>(
    gpu: &Gpu,
    x: impl Into<TensorMut<'a, bf16>>,
    weight: impl Into<TensorRef<'a, bf16>>,
    eps: f32,
) -> Result<()> {
    let (mut x, weight) = (x.into(), weight.into());
    check_devices!(gpu, x, weight)?;
    let [rows, row_len] = x.dims::<2>("x")?;
    let [d] = weight.dims::<1>("weight")?;
    if d > row_len {
        return Err(Error::shape("weight", format!("at most {row_len} elements"), d));
    }
    let stream = gpu.stream();
    let stride = x.row_stride();
    let (wp, xp) = (weight.kernel_arg(stream), x.kernel_arg(stream));
    launch_rms_norm(gpu, rows, d, [xp.addr(), 0, 0, wp.addr(), xp.addr()], stride, stride, eps)
}

/// Copies columns `[src_col, src_col + width)` of `src` [rows, src_len] into columns `[dst_col, dst_col + width)`
/// of `dst` [rows, dst_len] (rows may be given as any leading shape; only the last dimension is the row length).
///
/// Graph capture: yes (launches only; no allocation, copy or synchronization).
pub fn copy_columns<'a>(
    gpu: &Gpu,
    src: impl Into<TensorRef<'a, bf16>>,
    src_col: usize,
    dst: impl Into<TensorMut<'a, bf16>>,
    dst_col: usize,
    width: usize,
) -> Result<()> {
    let (src, mut dst) = (src.into(), dst.into());
    check_devices!(gpu, src, dst)?;
    let src_len = *src.shape().last().ok_or_else(|| Error::shape("src", "rank ≥ 1", "rank 0"))?;
    let dst_len = *dst.shape().last().ok_or_else(|| Error::shape("dst", "rank ≥ 1", "rank 0"))?;
    let leading = |shape: &[usize]| shape[..shape.len() - 1].iter().product::<usize>();
    let (rows, dst_rows) = (leading(src.shape()), leading(dst.shape()));
    if rows != dst_rows {
        return Err(Error::shape("dst", format!("{rows} rows"), dst_rows));
    }
    // Checked: a window end past usize::MAX is out of range too, not an overflow.
    if src_col.checked_add(width).is_none_or(|end| end > src_len) {
        return Err(Error::shape("src", format!("rows of at least {src_col} + {width} elements"), src_len));
    }
    if dst_col.checked_add(width).is_none_or(|end| end > dst_len) {
        return Err(Error::shape("dst", format!("rows of at least {dst_col} + {width} elements"), dst_len));
    }
    // The kernel addresses rows by their stride: a strided view's rows are where it says.
    let (src_stride, dst_stride) = (src.row_stride(), dst.row_stride());
    let (width_i, src_len, src_col_i) =
        (to_i32("width", width)?, to_i32("src", src_stride)?, to_i32("src_col", src_col)?);
    let (dst_len, dst_col_i) = (to_i32("dst", dst_stride)?, to_i32("dst_col", dst_col)?);
    let total = rows as u64 * width as u64;
    if total == 0 {
        return Ok(());
    }
    let blocks = u32::try_from(total.div_ceil(256)).map_err(|_| Error::shape("src", "fewer elements", total))?;
    let f = gpu.function(MODULE, "copy_columns_bf16", 0)?;
    let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let stream = gpu.stream();
    let (sv, dv) = (src.kernel_arg(stream), dst.kernel_arg(stream));
    let params = CopyColumnsParams {
        src: sv.addr(),
        dst: dv.addr(),
        rows: rows as i64,
        width: width_i,
        src_len,
        src_col: src_col_i,
        dst_len,
        dst_col: dst_col_i,
    };
    let mut launch = gpu.stream().launch_builder(&f);
    launch.arg(&params);
    // SAFETY: both column windows lie inside their rows (checked) and both tensors have `rows` rows.
    unsafe { launch.launch(cfg) }.cuda_call("cuLaunchKernel")?;
    Ok(())
}

/// `out = a + b`, elementwise, bf16 (one rounding).
///
/// Graph capture: yes (launches only; no allocation, copy or synchronization).
pub fn add<'a>(
    gpu: &Gpu,
    a: impl Into<TensorRef<'a, bf16>>,
    b: impl Into<TensorRef<'a, bf16>>,
    out: impl Into<TensorMut<'a, bf16>>,
) -> Result<()> {
    let (a, b, mut out) = (a.into(), b.into(), out.into());
    check_devices!(gpu, a, b, out)?;
    b.expect_shape("b", a.shape())?;
    out.expect_shape("out", a.shape())?;
    a.require_dense("a")?;
    b.require_dense("b")?;
    out.require_dense("out")?;
    let n = a.numel();
    if n == 0 {
        return Ok(());
    }
    let blocks = u32::try_from((n as u64).div_ceil(256)).map_err(|_| Error::shape("a", "fewer elements", n))?;
    let f = gpu.function(MODULE, "add_bf16", 0)?;
    let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let stream = gpu.stream();
    let (av, bv, ov) = (a.kernel_arg(stream), b.kernel_arg(stream), out.kernel_arg(stream));
    let params = AddParams { a: av.addr(), b: bv.addr(), out: ov.addr(), n: n as i64 };
    let mut launch = gpu.stream().launch_builder(&f);
    launch.arg(&params);
    // SAFETY: all three tensors have n elements (checked); threads past n return.
    unsafe { launch.launch(cfg) }.cuda_call("cuLaunchKernel")?;
    Ok(())
}

/// Where RoPE applies inside each row of `x`: `count` slices of `cfg.dim` elements starting at `offset`, `stride`
/// apart (e.g. q [t, 128·192] has count 128, stride 192, offset 128; kv_a [t, 576] has count 1, offset 512).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RopeSlices {
    /// Slices per row.
    pub count: usize,
    /// Distance between slices, in elements.
    pub stride: usize,
    /// Start of the first slice.
    pub offset: usize,
}

/// Precomputed YaRN inverse frequencies on the device.
pub struct RopeTables {
    cfg: RopeConfig,
    inv_freq: DeviceTensor<f32>,
}

impl RopeTables {
    /// Uploads `cfg.inv_freq()`.
    ///
    /// Graph capture: no (allocates and copies from the host); call it before capturing.
    pub fn new(gpu: &Gpu, cfg: RopeConfig) -> Result<Self> {
        if cfg.dim == 0 || !cfg.dim.is_multiple_of(2) {
            return Err(Error::InvalidConfig(format!("rope dim must be even and positive, got {}", cfg.dim)));
        }
        let freqs = cfg.inv_freq();
        let inv_freq = DeviceTensor::from_host(gpu, &freqs, &[freqs.len()])?;
        Ok(RopeTables { cfg, inv_freq })
    }
    /// The configuration.
    pub fn config(&self) -> &RopeConfig {
        &self.cfg
    }
}

/// Rotates interleaved pairs of `x` `[rows, row_len]` in place at `positions` `[rows]` (see
/// [`crate::reference::decode_ops::rope`]).
///
/// Graph capture: yes (launches only; no allocation, copy or synchronization).
pub fn rope_inplace<'a>(
    gpu: &Gpu,
    x: impl Into<TensorMut<'a, bf16>>,
    positions: impl Into<TensorRef<'a, i32>>,
    tables: &RopeTables,
    slices: RopeSlices,
) -> Result<()> {
    let (mut x, positions) = (x.into(), positions.into());
    check_devices!(gpu, x, positions, tables.inv_freq)?;
    let [rows, row_len] = x.dims::<2>("x")?;
    positions.expect_shape("positions", &[rows])?;
    let dim = tables.cfg.dim;
    if slices.count > 0 {
        let end = slices
            .stride
            .checked_mul(slices.count - 1)
            .and_then(|v| v.checked_add(slices.offset.checked_add(dim)?))
            .ok_or_else(|| Error::shape("slices", "in-row extents", format!("{slices:?}")))?;
        if end > row_len {
            return Err(Error::shape("x", format!("rows of at least {end} elements for {slices:?}"), row_len));
        }
        if slices.count > 1 && slices.stride < dim {
            return Err(Error::InvalidConfig(format!("rope slices overlap: stride {} < dim {dim}", slices.stride)));
        }
    }
    let mut params = RopeParams {
        rows: to_i32("rows", rows)?,
        // The kernel steps rows by this stride; slices were checked against the row length above.
        row_len: to_i32("row_len", x.row_stride())?,
        count: to_i32("count", slices.count)?,
        stride: to_i32("stride", slices.stride)?,
        offset: to_i32("offset", slices.offset)?,
        dim: to_i32("dim", dim)?,
        scale: tables.cfg.cos_sin_scale() as f32,
        ..RopeParams::default()
    };
    let total = rows as u64 * slices.count as u64 * (dim / 2) as u64;
    if total == 0 {
        return Ok(());
    }
    let blocks = u32::try_from(total.div_ceil(256)).map_err(|_| Error::shape("x", "fewer than 2^40 pairs", total))?;
    let f = gpu.function(MODULE, "rope_bf16_inplace", 0)?;
    let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let stream = gpu.stream();
    let freq = TensorRef::from(&tables.inv_freq);
    let (xv, pv, fv) = (x.kernel_arg(stream), positions.kernel_arg(stream), freq.kernel_arg(stream));
    (params.x, params.positions, params.inv_freq) = (xv.addr(), pv.addr(), fv.addr());
    let mut launch = gpu.stream().launch_builder(&f);
    launch.arg(&params);
    // SAFETY: every slice lies inside its row (checked above); the grid covers rows·count·dim/2 pairs exactly and the
    // kernel returns for indices past that; positions has one entry per row.
    unsafe { launch.launch(cfg) }.cuda_call("cuLaunchKernel")?;
    Ok(())
}

/// Strides of the per-head weight in [`head_bmm`], in elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadWeightStrides {
    /// Index of element (0, 0, 0) (e.g. W_UV starts `nope` rows into each head's block of kv_b_proj).
    pub offset: usize,
    /// Between heads.
    pub head: usize,
    /// Along the reduction dimension.
    pub i: usize,
    /// Along the output dimension.
    pub j: usize,
}

/// Output element types of [`head_bmm`]: bf16, or f32 (e.g. router logits, which DeepSeek computes in fp32).
pub trait BmmOutput: cudarc::driver::DeviceRepr + private::Sealed + 'static {
    /// Passed to the kernel: 1 for f32 output.
    const F32_FLAG: i32;
}
impl BmmOutput for bf16 {
    const F32_FLAG: i32 = 0;
}
impl BmmOutput for f32 {
    const F32_FLAG: i32 = 1;
}
mod private {
    pub trait Sealed {}
    impl Sealed for half::bf16 {}
    impl Sealed for f32 {}
}

/// A window of columns `[col, col + len)` in the last dimension of a rank-3 tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Columns {
    /// First column.
    pub col: usize,
    /// Number of columns.
    pub len: usize,
}

/// Columns of x the head_bmm kernel stages in shared memory at a time (`kBmmChunk` in kernels/decode_ops.cu).
const BMM_CHUNK: usize = 512;

/// Dynamic shared memory of the head_bmm kernel for reduction length `k`: 16 token rows of `min(k, 512)` f32.
fn head_bmm_smem_bytes(k: usize) -> u32 {
    (16 * k.min(BMM_CHUNK) * 4) as u32
}

/// `out[t, h, out.col + j] = Σ_i x[t, h, x.col + i] · w[s.offset + h·s.head + i·s.i + j·s.j]` for `i < x_cols.len`,
/// `j < out_cols.len`; fp32 accumulation, bf16 out. `x` is [t, heads, x_len] and `out` [t, heads, out_len]; columns
/// outside `out_cols` are not touched. With whole-row windows this is a plain per-head batched matmul.
///
/// Graph capture: yes (launches only; no allocation, copy or synchronization).
pub fn head_bmm_windows<'a, O: BmmOutput>(
    gpu: &Gpu,
    x: impl Into<TensorRef<'a, bf16>>,
    x_cols: Columns,
    w: impl Into<TensorRef<'a, bf16>>,
    strides: HeadWeightStrides,
    out: impl Into<TensorMut<'a, O>>,
    out_cols: Columns,
) -> Result<()> {
    let (x, w, mut out) = (x.into(), w.into(), out.into());
    check_devices!(gpu, x, w, out)?;
    // Weights are addressed by `strides` from their first element, so they must be dense; x and out rows may be
    // strided.
    w.require_dense("w")?;
    let [t, heads, x_len] = x.dims::<3>("x")?;
    let [ot, oh, out_len] = out.dims::<3>("out")?;
    if (ot, oh) != (t, heads) {
        return Err(Error::shape("out", format!("[{t}, {heads}, _]"), format!("{:?}", out.shape())));
    }
    // Checked: a window end past usize::MAX is out of range too, not an overflow.
    if x_cols.col.checked_add(x_cols.len).is_none_or(|end| end > x_len) {
        return Err(Error::shape("x", format!("rows of at least {} + {} elements", x_cols.col, x_cols.len), x_len));
    }
    if out_cols.col.checked_add(out_cols.len).is_none_or(|end| end > out_len) {
        return Err(Error::shape(
            "out",
            format!("rows of at least {} + {} elements", out_cols.col, out_cols.len),
            out_len,
        ));
    }
    let (k, n) = (x_cols.len, out_cols.len);
    if heads > 0 && k > 0 && n > 0 {
        let last = (heads - 1)
            .checked_mul(strides.head)
            .and_then(|a| a.checked_add(strides.offset))
            .and_then(|a| (k - 1).checked_mul(strides.i).and_then(|b| a.checked_add(b)))
            .and_then(|a| (n - 1).checked_mul(strides.j).and_then(|b| a.checked_add(b)))
            .ok_or_else(|| Error::shape("w", "strides whose extent fits in usize", format!("{strides:?}")))?;
        if last >= w.numel() {
            return Err(Error::shape("w", format!("more than {last} elements for {strides:?}"), w.numel()));
        }
    }
    let smem_u32 = head_bmm_smem_bytes(k);
    let mut params = HeadBmmParams {
        ws_h: strides.head as i64,
        ws_i: strides.i as i64,
        ws_j: strides.j as i64,
        w_offset: strides.offset as i64,
        t: to_i32("t", t)?,
        heads: to_i32("heads", heads)?,
        k: to_i32("k", k)?,
        n: to_i32("n", n)?,
        x_len: to_i32("x", x.row_stride())?,
        x_col: to_i32("x_col", x_cols.col)?,
        out_len: to_i32("out", out.row_stride())?,
        out_col: to_i32("out_col", out_cols.col)?,
        out_f32: O::F32_FLAG,
        ..HeadBmmParams::default()
    };
    if t == 0 || heads == 0 || n == 0 {
        return Ok(());
    }
    let grid_z =
        u32::try_from(heads).ok().filter(|&z| z <= 65_535).ok_or_else(|| Error::shape("x", "≤ 65535 heads", heads))?;
    let grid_y = u32::try_from(t.div_ceil(16))
        .ok()
        .filter(|&y| y <= 65_535)
        .ok_or_else(|| Error::shape("x", "t ≤ 1048560", t))?;
    let f = gpu.function(MODULE, "head_bmm_bf16", smem_u32)?;
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(128) as u32, grid_y, grid_z),
        block_dim: (128, 1, 1),
        shared_mem_bytes: smem_u32,
    };
    let stream = gpu.stream();
    let (xv, wv, ov) = (x.kernel_arg(stream), w.kernel_arg(stream), out.kernel_arg(stream));
    (params.x, params.w, params.out) = (xv.addr(), wv.addr(), ov.addr());
    let mut launch = gpu.stream().launch_builder(&f);
    launch.arg(&params);
    // SAFETY: x and out windows lie inside their rows and the largest weight index is below w.numel() (checked);
    // the grid covers exactly the output window and threads past n or t return.
    unsafe { launch.launch(cfg) }.cuda_call("cuLaunchKernel")?;
    Ok(())
}

/// `out[t, h, j] = Σ_i x[t, h, i] · w[s.offset + h·s.head + i·s.i + j·s.j]` with `x` [t, heads, k], `out` [t, heads, n].
///
/// Graph capture: yes (launches only; no allocation, copy or synchronization).
pub fn head_bmm<'a, O: BmmOutput>(
    gpu: &Gpu,
    x: impl Into<TensorRef<'a, bf16>>,
    w: impl Into<TensorRef<'a, bf16>>,
    strides: HeadWeightStrides,
    out: impl Into<TensorMut<'a, O>>,
) -> Result<()> {
    let (x, out) = (x.into(), out.into());
    let k = x.shape().last().copied().unwrap_or(0);
    let n = out.shape().last().copied().unwrap_or(0);
    head_bmm_windows(gpu, x, Columns { col: 0, len: k }, w, strides, out, Columns { col: 0, len: n })
}

/// Appends `rows` [t, width] into `cache` [num_blocks, page, width] at `(seq_ids[r], positions[r])` through
/// `block_table` [batch, max_blocks]. When `host_table` (a host copy of block_table, seq_ids and positions) is
/// given, every index is validated before launch; the kernel also bounds-checks on the device and skips rows whose
/// slot is out of range, so a bad device table never writes out of bounds.
///
/// Graph capture: yes (launches only; no allocation, copy or synchronization).
#[allow(clippy::too_many_arguments)]
pub fn cache_append<'a>(
    gpu: &Gpu,
    rows: impl Into<TensorRef<'a, bf16>>,
    cache: impl Into<TensorMut<'a, bf16>>,
    block_table: impl Into<TensorRef<'a, i32>>,
    seq_ids: impl Into<TensorRef<'a, i32>>,
    positions: impl Into<TensorRef<'a, i32>>,
    host_table: Option<(&[i32], &[i32], &[i32])>,
) -> Result<()> {
    let (rows, mut cache, block_table) = (rows.into(), cache.into(), block_table.into());
    let (seq_ids, positions) = (seq_ids.into(), positions.into());
    check_devices!(gpu, rows, cache, block_table, seq_ids, positions)?;
    rows.require_dense("rows")?;
    cache.require_dense("cache")?;
    block_table.require_dense("block_table")?;
    let [t, width] = rows.dims::<2>("rows")?;
    let [num_blocks, page, cw] = cache.dims::<3>("cache")?;
    if cw != width {
        return Err(Error::shape("cache", format!("[num_blocks, page, {width}]"), format!("{:?}", cache.shape())));
    }
    let [batch, max_blocks] = block_table.dims::<2>("block_table")?;
    seq_ids.expect_shape("seq_ids", &[t])?;
    positions.expect_shape("positions", &[t])?;
    if page == 0 {
        return Err(Error::shape("cache", "a non-zero page size", 0));
    }
    if let Some((table, seqs, pos)) = host_table {
        if table.len() != batch * max_blocks || seqs.len() != t || pos.len() != t {
            return Err(Error::shape("host_table", "host copies matching the device tensors", "different lengths"));
        }
        crate::reference::decode_ops::cache_slots(table, max_blocks, num_blocks, page, seqs, pos)?;
    }
    let mut params = CacheAppendParams {
        width: to_i32("width", width)?,
        page: to_i32("page", page)?,
        num_blocks: to_i32("num_blocks", num_blocks)?,
        batch: to_i32("batch", batch)?,
        max_blocks: to_i32("max_blocks", max_blocks)?,
        ..CacheAppendParams::default()
    };
    let grid = u32::try_from(t).map_err(|_| Error::shape("rows", "fewer than 2^32 rows", t))?;
    if t == 0 || width == 0 {
        return Ok(());
    }
    let f = gpu.function(MODULE, "cache_append_bf16", 0)?;
    let cfg = LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
    let stream = gpu.stream();
    let (rv, cv, bv) = (rows.kernel_arg(stream), cache.kernel_arg(stream), block_table.kernel_arg(stream));
    let (sv, pv) = (seq_ids.kernel_arg(stream), positions.kernel_arg(stream));
    (params.rows, params.cache, params.block_table) = (rv.addr(), cv.addr(), bv.addr());
    (params.seq_ids, params.positions) = (sv.addr(), pv.addr());
    let mut launch = gpu.stream().launch_builder(&f);
    launch.arg(&params);
    // SAFETY: the kernel checks seq, position and block id against batch, max_blocks and num_blocks before writing,
    // so every write is inside the cache; reads are bounded by the checked shapes.
    unsafe { launch.launch(cfg) }.cuda_call("cuLaunchKernel")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_bmm_smem_is_bounded_for_any_k() {
        assert_eq!(head_bmm_smem_bytes(0), 0);
        assert_eq!(head_bmm_smem_bytes(128), 16 * 128 * 4);
        assert_eq!(head_bmm_smem_bytes(512), 32 * 1024);
        // Router logits (k = hidden = 7168) used to need 448 KiB, above every GPU's opt-in limit.
        assert_eq!(head_bmm_smem_bytes(7168), 32 * 1024);
        assert_eq!(head_bmm_smem_bytes(usize::MAX), 32 * 1024);
    }
}
