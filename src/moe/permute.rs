//! The token permutation: expert ids → per-expert row segments (contiguous or masked layout), and the gather of
//! each token's FP8 row and scales into its segments.

use super::params::{CountRankParams, GatherParams, OffsetsParams, ScatterParams};
use super::*;

/// Uploads host-visible `topk_ids` `[t, k]` after checking every id is in `−1..E` (the check the device cannot do
/// without a sync; on the device, out-of-range ids are skipped, never dereferenced).
///
/// Graph capture: no (allocates and copies from the host); call it before capturing.
pub fn upload_topk_ids(gpu: &Gpu, ids: &[i32], t: usize, k: usize, num_experts: usize) -> Result<DeviceTensor<i32>> {
    if ids.len() != t * k {
        return Err(Error::shape("topk_ids", format!("[{t}, {k}]"), ids.len()));
    }
    validate_ids(ids, num_experts)?;
    DeviceTensor::from_host(gpu, ids, &[t, k])
}

/// Device buffers of a permutation ([`permute`]'s outputs), sized for `t` tokens, top-`k`, `E` experts, hidden `H`.
#[derive(Debug)]
pub struct Permuted {
    /// The layout.
    pub layout: Layout,
    /// Tokens `t`.
    pub tokens: usize,
    /// Slots per token `k`.
    pub top_k: usize,
    /// Experts `E`.
    pub num_experts: usize,
    /// Hidden size `H`.
    pub hidden: usize,
    /// Gathered FP8 activations `[capacity, H]` (rows past `offsets[E]` unspecified).
    pub codes: DeviceTensor<E4M3>,
    /// Their 1×128 scales, MN-major `[H/128, round_up(capacity, 4)]`.
    pub scales: DeviceTensor<f32>,
    /// Pair `token·k + slot` held by each row, −1 for padding/unused `[capacity]`.
    pub src_index: DeviceTensor<i32>,
    /// Row of each pair, −1 when skipped `[t·k]`.
    pub row_of: DeviceTensor<i32>,
    /// Segment starts `[E + 1]` (i64).
    pub offsets: DeviceTensor<i64>,
    /// Valid rows per expert `[E]`.
    pub counts: DeviceTensor<i32>,
    counts_raw: DeviceTensor<i32>,
    rank: DeviceTensor<i32>,
}

impl Permuted {
    /// Allocates (zero-filled) buffers. Contiguous `block_m` and masked `max_m` must be multiples of
    /// [`GEMM_BLOCK_M`]; `H` a multiple of 128; `E ≤ 1024`.
    ///
    /// Graph capture: no (allocates device memory); call it before capturing.
    pub fn new(gpu: &Gpu, t: usize, k: usize, num_experts: usize, hidden: usize, layout: Layout) -> Result<Self> {
        let (pairs, cap) = Self::validate_config(t, k, num_experts, hidden, layout)?;
        Ok(Permuted {
            layout,
            tokens: t,
            top_k: k,
            num_experts,
            hidden,
            codes: DeviceTensor::zeros(gpu, &[cap, hidden])?,
            scales: DeviceTensor::zeros(gpu, &activation_scale_shape(cap, hidden))?,
            src_index: DeviceTensor::zeros(gpu, &[cap])?,
            row_of: DeviceTensor::zeros(gpu, &[pairs])?,
            offsets: DeviceTensor::zeros(gpu, &[num_experts + 1])?,
            counts: DeviceTensor::zeros(gpu, &[num_experts])?,
            counts_raw: DeviceTensor::zeros(gpu, &[num_experts])?,
            rank: DeviceTensor::zeros(gpu, &[pairs])?,
        })
    }

    /// Rows of the permuted buffers.
    pub fn capacity(&self) -> usize {
        self.src_index.numel()
    }

    /// Checks a configuration; returns `(t·k, capacity)`.
    pub(super) fn validate_config(
        t: usize,
        k: usize,
        num_experts: usize,
        hidden: usize,
        layout: Layout,
    ) -> Result<(usize, usize)> {
        if num_experts == 0 || num_experts > crate::reference::moe::MAX_EXPERTS {
            return Err(Error::InvalidConfig(format!("num_experts must be in 1..=1024, got {num_experts}")));
        }
        match layout {
            Layout::Contiguous { block_m: m } | Layout::Masked { max_m: m } if m == 0 || m % GEMM_BLOCK_M != 0 => {
                return Err(Error::Alignment { arg: "layout", required: GEMM_BLOCK_M, got: m });
            }
            // The kernels take block_m / max_m as i32 (and Layout::capacity must not overflow).
            Layout::Contiguous { block_m: m } | Layout::Masked { max_m: m } => {
                to_i32("layout", m)?;
            }
        }
        if hidden == 0 || !hidden.is_multiple_of(QUANT_BLOCK) {
            return Err(Error::Alignment { arg: "hidden", required: QUANT_BLOCK, got: hidden });
        }
        let pairs = t.checked_mul(k).ok_or_else(|| Error::shape("t·k", "a product that fits", t))?;
        to_i32("t·k", pairs)?;
        let cap = layout.capacity(t, k, num_experts);
        to_i32("permuted rows", cap)?;
        cap.checked_mul(hidden).ok_or_else(|| Error::shape("permuted rows·hidden", "fits in usize", cap))?;
        Ok((pairs, cap))
    }

    /// Re-checks the (public, hence mutable) configuration and every buffer against it, so a modified `Permuted`
    /// is an error instead of an out-of-bounds launch.
    pub(super) fn check(&self) -> Result<()> {
        let (t, k, e, h) = (self.tokens, self.top_k, self.num_experts, self.hidden);
        let (pairs, cap) = Self::validate_config(t, k, e, h, self.layout)?;
        self.codes.expect_shape("permuted.codes", &[cap, h])?;
        self.scales.expect_shape("permuted.scales", &activation_scale_shape(cap, h))?;
        self.src_index.expect_shape("permuted.src_index", &[cap])?;
        self.row_of.expect_shape("permuted.row_of", &[pairs])?;
        self.offsets.expect_shape("permuted.offsets", &[e + 1])?;
        self.counts.expect_shape("permuted.counts", &[e])?;
        self.counts_raw.expect_shape("permuted.counts_raw", &[e])?;
        self.rank.expect_shape("permuted.rank", &[pairs])?;
        Ok(())
    }
}

/// Groups the pairs of `topk_ids` `[t, k]` by expert (stable: by token, then slot) and gathers the quantized
/// activations `xq` `[t, H]` / `xs` `[H/128, round_up(t, 4)]` (as [`crate::quant::quantize_activations`] writes
/// them) into `out`. Four launches, no host sync; ids outside `0..E` are skipped.
///
/// Graph capture: yes (launches only; no allocation, copy or synchronization).
pub fn permute<'a>(
    gpu: &Gpu,
    topk_ids: impl Into<TensorRef<'a, i32>>,
    xq: impl Into<TensorRef<'a, E4M3>>,
    xs: impl Into<TensorRef<'a, f32>>,
    out: &mut Permuted,
) -> Result<()> {
    let (topk_ids, xq, xs) = (topk_ids.into(), xq.into(), xs.into());
    check_devices!(gpu, topk_ids, xq, xs)?;
    topk_ids.require_dense("topk_ids")?;
    xq.require_dense("xq")?;
    xs.require_dense("xs")?;
    check_devices!(gpu, out.codes, out.scales, out.src_index, out.row_of, out.offsets, out.counts)?;
    out.check()?;
    let (t, k, e, h) = (out.tokens, out.top_k, out.num_experts, out.hidden);
    topk_ids.expect_shape("topk_ids", &[t, k])?;
    xq.expect_shape("xq", &[t, h])?;
    xs.expect_shape("xs", &activation_scale_shape(t, h))?;
    let pairs = t * k;
    if pairs == 0 {
        return Ok(());
    }
    let cap = out.capacity();
    let (masked, block_m, max_m) = match out.layout {
        Layout::Contiguous { block_m } => (0i32, to_i32("block_m", block_m)?, 0i32),
        Layout::Masked { max_m } => (1, 1, to_i32("max_m", max_m)?),
    };
    let (pi, ei, ki, ti, hi) = (to_i32("t·k", pairs)?, e as i32, to_i32("k", k)?, to_i32("t", t)?, to_i32("H", h)?);
    let t_pad = to_i32("t", padded_scale_rows(t))?;
    let (cap64, cap_pad64) = (to_i64("rows", cap)?, to_i64("rows", padded_scale_rows(cap))?);
    let stream = gpu.stream();

    let f = gpu.function(MODULE, "moe_count_rank", 0)?;
    let ids = topk_ids.kernel_arg(stream);
    {
        let (mut counts_raw, mut rank) = (out.counts_raw.as_tensor_mut(), out.rank.as_tensor_mut());
        let outs = (counts_raw.kernel_arg(stream), rank.kernel_arg(stream));
        let params = CountRankParams { ids: ids.addr(), counts_raw: outs.0.addr(), rank: outs.1.addr(), n_pairs: pi };
        let mut l = stream.launch_builder(&f);
        l.arg(&params);
        let c = LaunchConfig { grid_dim: (e as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: grid = E CTAs writing counts_raw[e] (E entries); rank[i] written for i < pairs (its length).
        unsafe { l.launch(c) }.cuda_call("cuLaunchKernel")?;
    }
    let f = gpu.function(MODULE, "moe_offsets", 0)?;
    {
        let counts_raw = out.counts_raw.as_tensor_ref();
        let (mut offsets, mut counts) = (out.offsets.as_tensor_mut(), out.counts.as_tensor_mut());
        let cr = counts_raw.kernel_arg(stream);
        let outs = (offsets.kernel_arg(stream), counts.kernel_arg(stream));
        let params = OffsetsParams {
            counts_raw: cr.addr(),
            offsets: outs.0.addr(),
            counts: outs.1.addr(),
            num_experts: ei,
            masked,
            block_m,
            max_m,
        };
        let mut l = stream.launch_builder(&f);
        l.arg(&params);
        let c = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: one CTA of 1024 ≥ E threads; reads counts_raw[E], writes offsets[E+1] and counts[E].
        unsafe { l.launch(c) }.cuda_call("cuLaunchKernel")?;
    }
    let f = gpu.function(MODULE, "moe_scatter", 0)?;
    {
        let (rank, offsets, counts) =
            (out.rank.as_tensor_ref(), out.offsets.as_tensor_ref(), out.counts.as_tensor_ref());
        let (mut row_of, mut src_index) = (out.row_of.as_tensor_mut(), out.src_index.as_tensor_mut());
        let guards = (rank.kernel_arg(stream), offsets.kernel_arg(stream), counts.kernel_arg(stream));
        let outs = (row_of.kernel_arg(stream), src_index.kernel_arg(stream));
        let params = ScatterParams {
            ids: ids.addr(),
            rank: guards.0.addr(),
            offsets: guards.1.addr(),
            counts: guards.2.addr(),
            row_of: outs.0.addr(),
            src_index: outs.1.addr(),
            capacity: cap64,
            n_pairs: pi,
            num_experts: ei,
        };
        let mut l = stream.launch_builder(&f);
        l.arg(&params);
        let c = LaunchConfig {
            grid_dim: (grid_u32("pairs", pairs.div_ceil(256))?, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: one thread per pair (bounded by pairs); ids outside 0..E are skipped; rows are bounded by the
        // capacity (src_index's length) on the device.
        unsafe { l.launch(c) }.cuda_call("cuLaunchKernel")?;
    }
    let f = gpu.function(MODULE, "moe_gather", 0)?;
    {
        let (offsets, counts) = (out.offsets.as_tensor_ref(), out.counts.as_tensor_ref());
        let mut src_index = out.src_index.as_tensor_mut();
        let (mut codes, mut scales) = (out.codes.as_tensor_mut(), out.scales.as_tensor_mut());
        let guards =
            (xq.kernel_arg(stream), xs.kernel_arg(stream), offsets.kernel_arg(stream), counts.kernel_arg(stream));
        let outs = (src_index.kernel_arg(stream), codes.kernel_arg(stream), scales.kernel_arg(stream));
        let params = GatherParams {
            x_codes: guards.0.addr(),
            x_scales: guards.1.addr(),
            offsets: guards.2.addr(),
            counts: guards.3.addr(),
            src_index: outs.0.addr(),
            a_codes: outs.1.addr(),
            a_scales: outs.2.addr(),
            capacity: cap64,
            cap_pad: cap_pad64,
            num_experts: ei,
            k: ki,
            t: ti,
            t_pad,
            hidden: hi,
        };
        let mut l = stream.launch_builder(&f);
        l.arg(&params);
        let c = LaunchConfig { grid_dim: (grid_u32("rows", cap)?, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: one CTA per row < capacity; codes rows are H bytes (H % 128 == 0 so 16-byte vectors stay in
        // bounds and aligned); source tokens come from src_index and are bounded by t on the device.
        unsafe { l.launch(c) }.cuda_call("cuLaunchKernel")?;
    }
    Ok(())
}

/// Segment offsets `[E + 1]` = `e · max_m` for activations that arrive already in the masked layout
/// (e.g. from DeepEP's low-latency dispatch: `[E, max_m, H]` viewed as `[E · max_m, H]` rows, with its device
/// `counts[E]`), so they can go straight into [`grouped_gemm`]. `max_m` must be a multiple of [`GEMM_BLOCK_M`].
///
/// Graph capture: no (allocates and copies from the host); call it before capturing.
pub fn masked_offsets(gpu: &Gpu, num_experts: usize, max_m: usize) -> Result<DeviceTensor<i64>> {
    if max_m == 0 || !max_m.is_multiple_of(GEMM_BLOCK_M) {
        return Err(Error::Alignment { arg: "max_m", required: GEMM_BLOCK_M, got: max_m });
    }
    // Both bounds before anything is allocated: the grouped GEMM takes E as an i32, offsets are i64.
    to_i32("E", num_experts)?;
    num_experts
        .checked_mul(max_m)
        .filter(|&end| i64::try_from(end).is_ok())
        .ok_or_else(|| Error::shape("max_m", "E·max_m below 2^63", format!("{num_experts}·{max_m}")))?;
    let offsets: Vec<i64> = (0..=num_experts as i64).map(|e| e * max_m as i64).collect();
    DeviceTensor::from_host(gpu, &offsets, &[num_experts + 1])
}
