//! GPU launchers for the small ops of a decode step: RMSNorm, YaRN RoPE (in place), per-head batched matmul (W_UK
//! absorption / W_UV) and paged-cache append. References: [`crate::reference::decode_ops`].

use cudarc::driver::{LaunchConfig, PushKernelArg};
use half::bf16;

use crate::device::Gpu;
use crate::error::{Error, Result};
use crate::reference::decode_ops::RopeConfig;
use crate::tensor::DeviceTensor;

const MODULE: &str = "decode_ops";

fn to_i32(arg: &'static str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::shape(arg, "a value below 2^31", v))
}

/// `y = rms_norm(x) · weight` over the last dimension of `x` [rows, d].
pub fn rms_norm(
    gpu: &Gpu,
    x: &DeviceTensor<bf16>,
    weight: &DeviceTensor<bf16>,
    y: &mut DeviceTensor<bf16>,
    eps: f32,
) -> Result<()> {
    let [rows, d] = x.dims::<2>("x")?;
    weight.expect_shape("weight", &[d])?;
    y.expect_shape("y", &[rows, d])?;
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
    let (xv, wv, mut yv) = (x.view(), weight.view(), y.view_mut());
    let mut launch = gpu.stream().launch_builder(&f);
    launch.arg(&xv).arg(&wv).arg(&mut yv).arg(&di).arg(&eps);
    // SAFETY: one CTA per row of a [rows, d] tensor; all three views have the checked sizes.
    unsafe { launch.launch(cfg) }?;
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

/// Rotates interleaved pairs of `x` [rows, row_len] in place at `positions` [rows] (see
/// [`crate::reference::decode_ops::rope`]).
pub fn rope_inplace(
    gpu: &Gpu,
    x: &mut DeviceTensor<bf16>,
    positions: &DeviceTensor<i32>,
    tables: &RopeTables,
    slices: RopeSlices,
) -> Result<()> {
    let [rows, row_len] = x.dims::<2>("x")?;
    positions.expect_shape("positions", &[rows])?;
    let dim = tables.cfg.dim;
    if slices.count > 0 {
        let end = slices
            .stride
            .checked_mul(slices.count - 1)
            .and_then(|v| v.checked_add(slices.offset + dim))
            .ok_or_else(|| Error::shape("slices", "in-row extents", format!("{slices:?}")))?;
        if end > row_len {
            return Err(Error::shape("x", format!("rows of at least {end} elements for {slices:?}"), row_len));
        }
        if slices.count > 1 && slices.stride < dim {
            return Err(Error::InvalidConfig(format!("rope slices overlap: stride {} < dim {dim}", slices.stride)));
        }
    }
    let args = (
        to_i32("rows", rows)?,
        to_i32("row_len", row_len)?,
        to_i32("count", slices.count)?,
        to_i32("stride", slices.stride)?,
        to_i32("offset", slices.offset)?,
        to_i32("dim", dim)?,
        tables.cfg.cos_sin_scale() as f32,
    );
    let total = rows as u64 * slices.count as u64 * (dim / 2) as u64;
    if total == 0 {
        return Ok(());
    }
    let blocks = u32::try_from(total.div_ceil(256)).map_err(|_| Error::shape("x", "fewer than 2^40 pairs", total))?;
    let f = gpu.function(MODULE, "rope_bf16_inplace", 0)?;
    let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let (mut xv, pv, fv) = (x.view_mut(), positions.view(), tables.inv_freq.view());
    let mut launch = gpu.stream().launch_builder(&f);
    launch.arg(&mut xv).arg(&pv).arg(&fv);
    launch.arg(&args.0).arg(&args.1).arg(&args.2).arg(&args.3).arg(&args.4).arg(&args.5).arg(&args.6);
    // SAFETY: every slice lies inside its row (checked above); the grid covers rows·count·dim/2 pairs exactly and the
    // kernel returns for indices past that; positions has one entry per row.
    unsafe { launch.launch(cfg) }?;
    Ok(())
}

/// Strides of the per-head weight in [`head_bmm`], in elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadWeightStrides {
    /// Between heads.
    pub head: usize,
    /// Along the reduction dimension.
    pub i: usize,
    /// Along the output dimension.
    pub j: usize,
}

/// `out[t, h, j] = Σ_i x[t, h, i] · w[h·s.head + i·s.i + j·s.j]`, fp32 accumulation, bf16 out.
pub fn head_bmm(
    gpu: &Gpu,
    x: &DeviceTensor<bf16>,
    w: &DeviceTensor<bf16>,
    strides: HeadWeightStrides,
    out: &mut DeviceTensor<bf16>,
) -> Result<()> {
    let [t, heads, k] = x.dims::<3>("x")?;
    let [ot, oh, n] = out.dims::<3>("out")?;
    if (ot, oh) != (t, heads) {
        return Err(Error::shape("out", format!("[{t}, {heads}, n]"), format!("{:?}", out.shape())));
    }
    if heads > 0 && k > 0 && n > 0 {
        let last = (heads - 1)
            .checked_mul(strides.head)
            .and_then(|a| (k - 1).checked_mul(strides.i).and_then(|b| a.checked_add(b)))
            .and_then(|a| (n - 1).checked_mul(strides.j).and_then(|b| a.checked_add(b)))
            .ok_or_else(|| Error::shape("w", "strides whose extent fits in usize", format!("{strides:?}")))?;
        if last >= w.numel() {
            return Err(Error::shape("w", format!("more than {last} elements for {strides:?}"), w.numel()));
        }
    }
    let smem = 16 * k * 4;
    let smem_u32 = u32::try_from(smem).map_err(|_| Error::shape("x", "a smaller k", k))?;
    let (ti, hi, ki, ni) = (to_i32("t", t)?, to_i32("heads", heads)?, to_i32("k", k)?, to_i32("n", n)?);
    let (sh, si, sj) = (strides.head as i64, strides.i as i64, strides.j as i64);
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
    let (xv, wv, mut ov) = (x.view(), w.view(), out.view_mut());
    let mut launch = gpu.stream().launch_builder(&f);
    launch.arg(&xv).arg(&wv).arg(&mut ov).arg(&ti).arg(&hi).arg(&ki).arg(&ni).arg(&sh).arg(&si).arg(&sj);
    // SAFETY: x and out shapes checked; the largest weight index is below w.numel() (checked); the grid covers
    // exactly the output and threads past n or t return.
    unsafe { launch.launch(cfg) }?;
    Ok(())
}

/// Appends `rows` [t, width] into `cache` [num_blocks, page, width] at `(seq_ids[r], positions[r])` through
/// `block_table` [batch, max_blocks]. When `host_table` (a host copy of block_table, seq_ids and positions) is
/// given, every index is validated before launch; the kernel also bounds-checks on the device and skips rows whose
/// slot is out of range, so a bad device table never writes out of bounds.
#[allow(clippy::too_many_arguments)]
pub fn cache_append(
    gpu: &Gpu,
    rows: &DeviceTensor<bf16>,
    cache: &mut DeviceTensor<bf16>,
    block_table: &DeviceTensor<i32>,
    seq_ids: &DeviceTensor<i32>,
    positions: &DeviceTensor<i32>,
    host_table: Option<(&[i32], &[i32], &[i32])>,
) -> Result<()> {
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
        // Validate with the reference's index logic (on a zero-sized scratch cache view of the same geometry).
        for r in 0..t {
            let (s, p) = (seqs[r], pos[r]);
            if s < 0 || s as usize >= batch {
                return Err(Error::IndexOutOfRange {
                    arg: "seq_ids",
                    position: r,
                    value: s as i64,
                    bound: batch as i64,
                });
            }
            if p < 0 || p as usize / page >= max_blocks {
                return Err(Error::IndexOutOfRange {
                    arg: "positions",
                    position: r,
                    value: p as i64,
                    bound: (max_blocks * page) as i64,
                });
            }
            let entry = s as usize * max_blocks + p as usize / page;
            let b = table[entry];
            if b < 0 || b as usize >= num_blocks {
                return Err(Error::IndexOutOfRange {
                    arg: "block_table",
                    position: entry,
                    value: b as i64,
                    bound: num_blocks as i64,
                });
            }
        }
    }
    let args = (
        to_i32("width", width)?,
        to_i32("page", page)?,
        to_i32("num_blocks", num_blocks)?,
        to_i32("batch", batch)?,
        to_i32("max_blocks", max_blocks)?,
    );
    let grid = u32::try_from(t).map_err(|_| Error::shape("rows", "fewer than 2^32 rows", t))?;
    if t == 0 || width == 0 {
        return Ok(());
    }
    let f = gpu.function(MODULE, "cache_append_bf16", 0)?;
    let cfg = LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
    let (rv, mut cv, bv, sv, pv) =
        (rows.view(), cache.view_mut(), block_table.view(), seq_ids.view(), positions.view());
    let mut launch = gpu.stream().launch_builder(&f);
    launch.arg(&rv).arg(&mut cv).arg(&bv).arg(&sv).arg(&pv);
    launch.arg(&args.0).arg(&args.1).arg(&args.2).arg(&args.3).arg(&args.4);
    // SAFETY: the kernel checks seq, position and block id against batch, max_blocks and num_blocks before writing,
    // so every write is inside the cache; reads are bounded by the checked shapes.
    unsafe { launch.launch(cfg) }?;
    Ok(())
}
