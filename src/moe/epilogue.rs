//! The expert FFN's epilogues: fused SwiGLU + FP8 requant between the two grouped GEMMs, and the weighted combine
//! back to token order.

use super::params::{CombineParams, SwigluQuantParams};
use super::*;

/// Fused SwiGLU + requant: `h` `[rows, 2I]` (gate | up, bf16) → `q` `[rows, I]` E4M3 and scales
/// `[I/128, round_up(rows, 4)]` (the down GEMM's layout). With `limit` (a permutation's offsets), rows at or past
/// `offsets[E]` are skipped.
///
/// Graph capture: yes (launches only; no allocation, copy or synchronization).
pub fn swiglu_quant<'a>(
    gpu: &Gpu,
    h: impl Into<TensorRef<'a, bf16>>,
    q: impl Into<TensorMut<'a, E4M3>>,
    scales: impl Into<TensorMut<'a, f32>>,
    format: ScaleFormat,
    limit: Option<impl Into<TensorRef<'a, i64>>>,
) -> Result<()> {
    let (h, mut q, mut scales, limit) = (h.into(), q.into(), scales.into(), limit.map(Into::into));
    check_devices!(gpu, h, q, scales)?;
    if let Some(limit) = &limit {
        check_devices!(gpu, limit)?;
    }
    h.require_dense("h")?;
    q.require_dense("q")?;
    scales.require_dense("scales")?;
    let [rows, i2] = h.dims::<2>("h")?;
    if i2 == 0 || i2 % (2 * QUANT_BLOCK) != 0 {
        return Err(Error::Alignment { arg: "h", required: 2 * QUANT_BLOCK, got: i2 });
    }
    let inter = i2 / 2;
    q.expect_shape("q", &[rows, inter])?;
    scales.expect_shape("scales", &activation_scale_shape(rows, inter))?;
    let (r64, rp64, ii) = (to_i64("rows", rows)?, to_i64("rows", padded_scale_rows(rows))?, to_i32("I", inter)?);
    let (has_limit, ne) = match &limit {
        Some(o) => {
            if o.numel() == 0 {
                return Err(Error::shape("limit", "[E + 1] with E ≥ 0", "[]"));
            }
            (1i32, to_i32("E", o.numel() - 1)?)
        }
        None => (0, 0),
    };
    if rows == 0 {
        return Ok(());
    }
    let groups = rows as u64 * (inter / QUANT_BLOCK) as u64;
    let blocks = grid_u32("rows", (groups * 16).div_ceil(256) as usize)?;
    let ue8m0 = i32::from(format == ScaleFormat::Ue8m0);
    let f = gpu.function(MODULE, "moe_swiglu_quant", 0)?;
    let stream = gpu.stream();
    let hv = h.kernel_arg(stream);
    let lv = limit.as_ref().map(|o| o.kernel_arg(stream));
    let (qv, sv) = (q.kernel_arg(stream), scales.kernel_arg(stream));
    let params = SwigluQuantParams {
        h: hv.addr(),
        q: qv.addr(),
        scales: sv.addr(),
        offsets: lv.as_ref().map_or(NULL, |v| v.addr()),
        rows: r64,
        rows_pad: rp64,
        inter: ii,
        ue8m0,
        num_experts: ne,
        has_limit,
    };
    let mut l = stream.launch_builder(&f);
    l.arg(&params);
    let c = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: shapes checked; one half-warp per (row, 128-group) below rows·I/128; offsets[E] read only with a
    // limit tensor of E+1 entries.
    unsafe { l.launch(c) }.cuda_call("cuLaunchKernel")?;
    Ok(())
}

/// Combine: `out[t] = Σ_slots w[t, slot]·y[row_of[t, slot]] (+ shared[t])`, f32 fused multiply-adds in slot order,
/// bf16 out (bitwise [`crate::reference::moe::combine_token`]). Slots whose row is −1 (or out of range) are skipped;
/// `skip_weights` uses weight 1 (for an all-to-all that applies the weights itself). `y` `[rows, H]`, `row_of` and
/// `weights` `t·k` entries, `shared`/`out` `[t, H]`.
///
/// Graph capture: yes (launches only; no allocation, copy or synchronization).
pub fn combine<'a>(
    gpu: &Gpu,
    y: impl Into<TensorRef<'a, bf16>>,
    row_of: impl Into<TensorRef<'a, i32>>,
    weights: impl Into<TensorRef<'a, f32>>,
    shared: Option<impl Into<TensorRef<'a, bf16>>>,
    skip_weights: bool,
    out: impl Into<TensorMut<'a, bf16>>,
) -> Result<()> {
    let (y, row_of, weights, shared) = (y.into(), row_of.into(), weights.into(), shared.map(Into::into));
    let mut out = out.into();
    check_devices!(gpu, y, row_of, weights, out)?;
    if let Some(shared) = &shared {
        check_devices!(gpu, shared)?;
        shared.require_dense("shared")?;
    }
    y.require_dense("y")?;
    row_of.require_dense("row_of")?;
    weights.require_dense("weights")?;
    out.require_dense("out")?;
    let [rows, h] = y.dims::<2>("y")?;
    let [t, h2] = out.dims::<2>("out")?;
    if h2 != h {
        return Err(Error::shape("out", format!("[t, {h}]"), format!("{:?}", out.shape())));
    }
    if h % 8 != 0 {
        return Err(Error::Alignment { arg: "hidden", required: 8, got: h });
    }
    let [t2, k] = weights.dims::<2>("weights")?;
    if t2 != t {
        return Err(Error::shape("weights", format!("[{t}, k]"), format!("{:?}", weights.shape())));
    }
    if row_of.numel() != t * k {
        return Err(Error::shape("row_of", t * k, row_of.numel()));
    }
    if let Some(s) = &shared {
        s.expect_shape("shared", &[t, h])?;
    }
    let (ki, hi, r64) = (to_i32("k", k)?, to_i32("H", h)?, to_i64("rows", rows)?);
    if t == 0 || h == 0 {
        return Ok(());
    }
    let gy = u32::try_from(h.div_ceil(8 * 128)).unwrap_or(u32::MAX);
    let f = gpu.function(MODULE, "moe_combine", 0)?;
    let stream = gpu.stream();
    let (yv, rv, wv) = (y.kernel_arg(stream), row_of.kernel_arg(stream), weights.kernel_arg(stream));
    let sv = shared.as_ref().map(|s| s.kernel_arg(stream));
    let (has_shared, skip) = (i32::from(shared.is_some()), i32::from(skip_weights));
    let ov = out.kernel_arg(stream);
    let params = CombineParams {
        y: yv.addr(),
        row_of: rv.addr(),
        weights: wv.addr(),
        shared: sv.as_ref().map_or(NULL, |v| v.addr()),
        out: ov.addr(),
        rows: r64,
        k: ki,
        hidden: hi,
        has_shared,
        skip_weights: skip,
    };
    let mut l = stream.launch_builder(&f);
    l.arg(&params);
    let c = LaunchConfig { grid_dim: (grid_u32("t", t)?, gy, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: shapes checked; rows read from row_of are bounded by `rows` on the device; columns by H (H % 8 == 0,
    // so 16-byte vectors stay in bounds and aligned); shared read only when given with shape [t, H].
    unsafe { l.launch(c) }.cuda_call("cuLaunchKernel")?;
    Ok(())
}
