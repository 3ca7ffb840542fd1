//! Mixture-of-Experts on the GPU: router, stable permute/align, grouped FP8 expert GEMM, fused SwiGLU + requant,
//! weighted combine, and [`moe_forward`] chaining them for DeepSeek-V3 with no host synchronization (so a layer can
//! be captured into a CUDA graph). Each stage is usable on its own and mirrors a function of
//! [`crate::reference::moe`].
//!
//! Device-side sizes (segment offsets, counts) never travel to the host: the buffers are sized for the worst case
//! ([`Layout::capacity`]) and the kernels read the actual extents from device memory, exiting early past them.

use cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use half::bf16;

use crate::device::{check_devices, Gpu};
use crate::error::{to_i32, CudaCall, Error, Result};
use crate::fp8::E4M3;
use crate::gemm::plan;
use crate::gemm::sm90::{Tma2d, TmaDtype};
use crate::quant::{activation_scale_shape, quantize_activations, QUANT_BLOCK};
use crate::reference::moe::{validate_ids, ExpertsFp8};
pub use crate::reference::moe::{Layout, RouterConfig, Scoring};
use crate::reference::quant::{padded_scale_rows, ScaleFormat};
use crate::tensor::DeviceTensor;
use crate::view::{no_tensor, TensorMut, TensorRef};

const MODULE: &str = "moe";
const SM90_MODULE: &str = "moe_sm90";
/// A null device pointer, passed for optional inputs the kernel is told (by a flag) not to read.
const NULL: u64 = 0;

/// Row tile of the grouped GEMMs: contiguous segments start on multiples of it and masked `max_m` is a multiple.
pub const GEMM_BLOCK_M: usize = 64;
/// Column tile of the grouped GEMM: `n` must be a multiple of it.
pub const GEMM_BLOCK_N: usize = 64;
const ROUTER_WARPS: usize = 4;

fn to_i64(arg: &'static str, v: usize) -> Result<i64> {
    i64::try_from(v).map_err(|_| Error::shape(arg, "a value below 2^63", v))
}

fn grid_u32(arg: &'static str, v: usize) -> Result<u32> {
    u32::try_from(v).ok().filter(|&x| x < i32::MAX as u32).ok_or_else(|| Error::shape(arg, "a grid below 2^31", v))
}

/// Logit element types the router reads.
pub trait RouterLogits: DeviceRepr + 'static {
    /// Kernel for this dtype.
    const KERNEL: &'static str;
}
impl RouterLogits for f32 {
    const KERNEL: &'static str = "moe_router_f32";
}
impl RouterLogits for bf16 {
    const KERNEL: &'static str = "moe_router_bf16";
}

/// Routes `logits` `[t, E]` into `topk_ids` `[t, k]` and `topk_weights` `[t, k]` exactly like
/// [`crate::reference::moe::route`], bit for bit (ids and weights: the exp and the softmax sum order are twinned).
///
/// Graph capture: yes (launches only; no allocation, copy or synchronization).
pub fn route<'a, T: RouterLogits>(
    gpu: &Gpu,
    cfg: &RouterConfig,
    logits: impl Into<TensorRef<'a, T>>,
    bias: Option<impl Into<TensorRef<'a, f32>>>,
    topk_ids: impl Into<TensorMut<'a, i32>>,
    topk_weights: impl Into<TensorMut<'a, f32>>,
) -> Result<()> {
    let (logits, bias) = (logits.into(), bias.map(Into::into));
    let (mut topk_ids, mut topk_weights) = (topk_ids.into(), topk_weights.into());
    check_devices!(gpu, logits, topk_ids, topk_weights)?;
    if let Some(bias) = &bias {
        check_devices!(gpu, bias)?;
    }
    logits.require_dense("logits")?;
    topk_ids.require_dense("topk_ids")?;
    topk_weights.require_dense("topk_weights")?;
    cfg.validate()?;
    let [t, e] = logits.dims::<2>("logits")?;
    if e != cfg.num_experts {
        return Err(Error::shape("logits", format!("[t, {}]", cfg.num_experts), format!("{:?}", logits.shape())));
    }
    if let Some(b) = &bias {
        b.expect_shape("bias", &[e])?;
    }
    topk_ids.expect_shape("topk_ids", &[t, cfg.top_k])?;
    topk_weights.expect_shape("topk_weights", &[t, cfg.top_k])?;
    let ti = to_i32("t", t)?;
    t.checked_mul(e).filter(|&n| n < (1usize << 62)).ok_or_else(|| Error::shape("logits", "t·E below 2^62", t))?;
    if t == 0 {
        return Ok(());
    }
    let blocks = grid_u32("t", t.div_ceil(ROUTER_WARPS))?;
    let smem = (ROUTER_WARPS * 2 * e * 4) as u32;
    let f = gpu.function(MODULE, T::KERNEL, smem)?;
    let cfg_l = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: smem };
    let (ei, ki, gi, kgi) = (e as i32, cfg.top_k as i32, cfg.num_groups as i32, cfg.topk_groups as i32);
    let softmax = i32::from(cfg.scoring == Scoring::Softmax);
    let renorm = i32::from(cfg.renormalize);
    let has_bias = i32::from(bias.is_some());
    let stream = gpu.stream();
    let lv = logits.kernel_arg(stream);
    let bv = bias.as_ref().map(|b| b.kernel_arg(stream));
    let (mut iv, mut wv) = (topk_ids.kernel_arg(stream), topk_weights.kernel_arg(stream));
    let mut launch = stream.launch_builder(&f);
    launch.arg(&lv);
    // Without a bias the kernel never dereferences the pointer: pass null.
    match &bv {
        Some(v) => launch.arg(v),
        None => launch.arg(&NULL),
    };
    launch.arg(&has_bias).arg(&mut iv).arg(&mut wv).arg(&ti).arg(&ei).arg(&ki).arg(&gi).arg(&kgi);
    launch.arg(&softmax).arg(&renorm).arg(&cfg.routed_scaling_factor);
    // SAFETY: cfg validated (E ≤ 1024, k ≤ 32, groups ≤ 32 dividing E); logits [t, E], bias [E] (read only when
    // has_bias), outputs [t, k]; each warp handles token < t and uses 2·E floats of the 4·2·E-float shared buffer.
    unsafe { launch.launch(cfg_l) }.cuda_call("cuLaunchKernel")?;
    Ok(())
}

/// Router gate GEMM: `logits` `[t, E]` f32 = `x` `[t, H]` · `w_gate` `[E, H]`ᵀ (bf16 in, f32 math, bitwise
/// [`crate::reference::moe::gate_logits`]). `H % 8 == 0`.
///
/// Graph capture: yes (launches only; no allocation, copy or synchronization).
pub fn gate_logits<'a>(
    gpu: &Gpu,
    x: impl Into<TensorRef<'a, bf16>>,
    w_gate: impl Into<TensorRef<'a, bf16>>,
    logits: impl Into<TensorMut<'a, f32>>,
) -> Result<()> {
    let (x, w_gate, mut logits) = (x.into(), w_gate.into(), logits.into());
    check_devices!(gpu, x, w_gate, logits)?;
    x.require_dense("x")?;
    w_gate.require_dense("w_gate")?;
    logits.require_dense("logits")?;
    let [t, h] = x.dims::<2>("x")?;
    let [e, h2] = w_gate.dims::<2>("w_gate")?;
    if h2 != h {
        return Err(Error::shape("w_gate", format!("[E, {h}]"), format!("{:?}", w_gate.shape())));
    }
    if h % 8 != 0 {
        return Err(Error::Alignment { arg: "hidden", required: 8, got: h });
    }
    logits.expect_shape("logits", &[t, e])?;
    let (ti, ei, hi) = (to_i32("t", t)?, to_i32("E", e)?, to_i32("H", h)?);
    if t == 0 || e == 0 {
        return Ok(());
    }
    if h == 0 {
        // Empty dot products: every logit is 0 (a stream-ordered memset, capturable like the kernel).
        logits.memset_zero(gpu.stream())?;
        return Ok(());
    }
    let gy =
        u32::try_from(t.div_ceil(8)).ok().filter(|&y| y <= 65_535).ok_or_else(|| Error::shape("x", "t ≤ 524280", t))?;
    let f = gpu.function(MODULE, "moe_gate_logits", 0)?;
    let stream = gpu.stream();
    let (xv, wv, mut lv) = (x.kernel_arg(stream), w_gate.kernel_arg(stream), logits.kernel_arg(stream));
    let mut l = stream.launch_builder(&f);
    l.arg(&xv).arg(&wv).arg(&mut lv).arg(&ti).arg(&ei).arg(&hi);
    let c =
        LaunchConfig { grid_dim: (grid_u32("E", e.div_ceil(8))?, gy, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: shapes checked; warps with expert ≥ E return, tokens are bounded by t, columns by H (H % 8 == 0 keeps
    // the 16-byte loads in bounds and aligned).
    unsafe { l.launch(c) }.cuda_call("cuLaunchKernel")?;
    Ok(())
}

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
    fn validate_config(
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
    fn check(&self) -> Result<()> {
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
        let (mut cr, mut rk) = (out.counts_raw.view_mut(), out.rank.view_mut());
        let mut l = stream.launch_builder(&f);
        l.arg(&ids).arg(&pi).arg(&mut cr).arg(&mut rk);
        let c = LaunchConfig { grid_dim: (e as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: grid = E CTAs writing counts_raw[e] (E entries); rank[i] written for i < pairs (its length).
        unsafe { l.launch(c) }.cuda_call("cuLaunchKernel")?;
    }
    let f = gpu.function(MODULE, "moe_offsets", 0)?;
    {
        let cr = out.counts_raw.view();
        let (mut off, mut cn) = (out.offsets.view_mut(), out.counts.view_mut());
        let mut l = stream.launch_builder(&f);
        l.arg(&cr).arg(&ei).arg(&masked).arg(&block_m).arg(&max_m).arg(&mut off).arg(&mut cn);
        let c = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: one CTA of 1024 ≥ E threads; reads counts_raw[E], writes offsets[E+1] and counts[E].
        unsafe { l.launch(c) }.cuda_call("cuLaunchKernel")?;
    }
    let f = gpu.function(MODULE, "moe_scatter", 0)?;
    {
        let (rk, off, cn) = (out.rank.view(), out.offsets.view(), out.counts.view());
        let (mut ro, mut si) = (out.row_of.view_mut(), out.src_index.view_mut());
        let mut l = stream.launch_builder(&f);
        l.arg(&ids).arg(&rk).arg(&off).arg(&cn).arg(&pi).arg(&ei).arg(&cap64).arg(&mut ro).arg(&mut si);
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
        let (xqv, xsv, off, cn) = (xq.kernel_arg(stream), xs.kernel_arg(stream), out.offsets.view(), out.counts.view());
        let mut si = out.src_index.view_mut();
        let (mut aq, mut asv) = (out.codes.view_mut(), out.scales.view_mut());
        let mut l = stream.launch_builder(&f);
        l.arg(&xqv).arg(&xsv).arg(&off).arg(&cn).arg(&mut si).arg(&ei).arg(&ki).arg(&ti).arg(&t_pad).arg(&hi);
        l.arg(&cap64).arg(&cap_pad64).arg(&mut aq).arg(&mut asv);
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

/// FP8 expert weights on the device: `w13` `[E, 2I, H]`, `w2` `[E, H, I]` with 128×128 block scales.
#[derive(Debug)]
pub struct ExpertWeights {
    /// Gate and up projections `[E, 2I, H]`.
    pub w13: DeviceTensor<E4M3>,
    /// `[E, 2I/128, H/128]`.
    pub w13_scales: DeviceTensor<f32>,
    /// Down projection `[E, H, I]`.
    pub w2: DeviceTensor<E4M3>,
    /// `[E, H/128, I/128]`.
    pub w2_scales: DeviceTensor<f32>,
}

impl ExpertWeights {
    /// Uploads reference weights.
    ///
    /// Graph capture: no (allocates and copies from the host); call it before capturing.
    pub fn from_reference(gpu: &Gpu, w: &ExpertsFp8) -> Result<Self> {
        let (e, h, i) = (w.num_experts, w.hidden, w.intermediate);
        Ok(ExpertWeights {
            w13: DeviceTensor::from_host(gpu, &w.w13, &[e, 2 * i, h])?,
            w13_scales: DeviceTensor::from_host(gpu, &w.w13_scales, &[e, 2 * i / QUANT_BLOCK, h / QUANT_BLOCK])?,
            w2: DeviceTensor::from_host(gpu, &w.w2, &[e, h, i])?,
            w2_scales: DeviceTensor::from_host(gpu, &w.w2_scales, &[e, h / QUANT_BLOCK, i / QUANT_BLOCK])?,
        })
    }

    /// `(E, H, I)`, after checking the four shapes agree.
    pub fn dims(&self) -> Result<(usize, usize, usize)> {
        ExpertWeightViews::from(self).dims()
    }
}

/// Borrowed FP8 expert weights, e.g. views of an engine's own device memory (see [`crate::view`]); shapes as in
/// [`ExpertWeights`]. `From<&ExpertWeights>` makes them from owned weights.
#[derive(Debug, Clone, Copy)]
pub struct ExpertWeightViews<'a> {
    /// Gate and up projections `[E, 2I, H]`.
    pub w13: TensorRef<'a, E4M3>,
    /// `[E, 2I/128, H/128]`.
    pub w13_scales: TensorRef<'a, f32>,
    /// Down projection `[E, H, I]`.
    pub w2: TensorRef<'a, E4M3>,
    /// `[E, H/128, I/128]`.
    pub w2_scales: TensorRef<'a, f32>,
}

impl<'a> From<&'a ExpertWeights> for ExpertWeightViews<'a> {
    fn from(w: &'a ExpertWeights) -> Self {
        ExpertWeightViews {
            w13: w.w13.as_tensor_ref(),
            w13_scales: w.w13_scales.as_tensor_ref(),
            w2: w.w2.as_tensor_ref(),
            w2_scales: w.w2_scales.as_tensor_ref(),
        }
    }
}

impl ExpertWeightViews<'_> {
    /// `(E, H, I)`, after checking the four shapes agree and every view is dense.
    pub fn dims(&self) -> Result<(usize, usize, usize)> {
        self.w13.require_dense("w13")?;
        self.w13_scales.require_dense("w13_scales")?;
        self.w2.require_dense("w2")?;
        self.w2_scales.require_dense("w2_scales")?;
        let [e, i2, h] = self.w13.dims::<3>("w13")?;
        if i2 % (2 * QUANT_BLOCK) != 0 || h % QUANT_BLOCK != 0 {
            return Err(Error::Alignment {
                arg: "w13",
                required: QUANT_BLOCK,
                got: if h % QUANT_BLOCK != 0 { h } else { i2 / 2 },
            });
        }
        let i = i2 / 2;
        self.w13_scales.expect_shape("w13_scales", &[e, i2 / QUANT_BLOCK, h / QUANT_BLOCK])?;
        self.w2.expect_shape("w2", &[e, h, i])?;
        self.w2_scales.expect_shape("w2_scales", &[e, h / QUANT_BLOCK, i / QUANT_BLOCK])?;
        Ok((e, h, i))
    }
}

/// Which grouped-GEMM kernel to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GemmBackend {
    /// wgmma on sm_90, SIMT elsewhere.
    #[default]
    Auto,
    /// The portable SIMT kernel (`moe.cu`), any sm_80+ device.
    Simt,
    /// The wgmma kernel (`moe_sm90.cu`), sm_90 only.
    Wgmma,
    /// The persistent warp-specialized TMA + wgmma kernel on the dense FP8 GEMM's machinery
    /// (`moe_grouped_sm90.cu`), sm_90 only. Opt-in; serves contiguous and masked layouts alike (segment starts on
    /// multiples of [`GEMM_BLOCK_M`]).
    Sm90Tma,
}

/// Dynamic shared memory of the wgmma kernel: 4 stages of (64 + 128) × 128 B, plus 1 KiB to align to 1024 B.
const SM90_SMEM: u32 = 4 * (64 + 128) * 128 + 1024;

const TMA_MODULE: &str = "moe_grouped_sm90";
const TMA_KERNEL: &str = "moe_grouped_gemm_fp8_sm90_tma";
/// Output tile rows of the [`GemmBackend::Sm90Tma`] kernel (the segment granule).
pub const TMA_BLOCK_M: usize = GEMM_BLOCK_M;
/// Output tile columns of the [`GemmBackend::Sm90Tma`] kernel (`N % 128 == 0`: a tile never crosses an expert's
/// weight rows and uses one weight-scale block).
pub const TMA_BLOCK_N: usize = 128;

/// Last `e` in `0..=E` with `offsets[e] <= row` (`E`: past the end). Twin of `r1k::moe_find_segment`.
fn find_segment(offsets: &[i64], e: usize, row: i64) -> usize {
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
fn segment_valid_end(offsets: &[i64], counts: &[i32], e: usize, rows: i64) -> i64 {
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
    let (tm, tn) = crate::gemm::plan::tile_coords(item, tiles_m, tiles_n, group_m);
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
fn tma_launch_shape(rows: usize, n: usize, sm_count: u32) -> Result<(u32, u32, u32)> {
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
    let (pa, pw, psa) = (a.kernel_arg(stream), w.kernel_arg(stream), a_scales.kernel_arg(stream));
    let maps = [ta.encode(pa.addr())?, tb.encode(pw.addr())?, tsa.encode(psa.addr())?];
    let (ni, ki, ei) = (to_i32("n", n)?, to_i32("k", kdim)?, to_i32("E", e)?);
    let (r64, st, gm) = (to_i64("rows", rows)?, stages as i32, plan::SM90_GROUP_M as i32);
    let (wsv, ov, cv) = (w_scales.kernel_arg(stream), offsets.kernel_arg(stream), counts.kernel_arg(stream));
    let mut outv = out.kernel_arg(stream);
    let mut l = stream.launch_builder(&f);
    l.arg(&maps[0]).arg(&maps[1]).arg(&maps[2]).arg(&wsv).arg(&ov).arg(&cv).arg(&mut outv);
    l.arg(&r64).arg(&ni).arg(&ki).arg(&ei).arg(&st).arg(&gm);
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

/// Grouped FP8 GEMM: `out[r, :] = a[r, :] · w[e(r)]ᵀ` (bf16 out), where row `r`'s expert is the segment of the
/// device `offsets` `[E+1]` containing it and only rows below `offsets[e] + counts[e]` are computed and written.
/// `a` `[rows, K]` with scales `[K/128, round_up(rows, 4)]`; `w` `[E, N, K]` with scales `[E, N/128, K/128]`.
/// Segment starts must be multiples of [`GEMM_BLOCK_M`] (what [`permute`] produces). Dispatches to the wgmma
/// kernel on sm_90 when it is built, else to the portable SIMT kernel.
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
    for (arg, dense) in [
        ("a", a.is_dense()),
        ("a_scales", a_scales.is_dense()),
        ("w", w.is_dense()),
        ("w_scales", w_scales.is_dense()),
        ("out", out.is_dense()),
    ] {
        if !dense {
            return Err(Error::shape(arg, "a dense view", "a strided view"));
        }
    }
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
    let (ni, ki, ei) = (to_i32("n", n)?, to_i32("k", kdim)?, to_i32("E", e)?);
    let (r64, rp64) = (to_i64("rows", rows)?, to_i64("rows", padded_scale_rows(rows))?);
    e.checked_mul(n).and_then(|v| v.checked_mul(kdim)).ok_or_else(|| Error::shape("w", "E·N·K that fits", e))?;
    if backend == GemmBackend::Sm90Tma {
        gpu.require_hopper(TMA_KERNEL)?;
    }
    if rows == 0 {
        return Ok(());
    }
    let wgmma = match backend {
        GemmBackend::Auto => gpu.info().is_hopper(),
        GemmBackend::Simt => false,
        GemmBackend::Wgmma => {
            gpu.require_hopper("moe_grouped_gemm_fp8_sm90")?;
            true
        }
        GemmBackend::Sm90Tma => {
            return grouped_gemm_tma(gpu, &a, &a_scales, &w, &w_scales, &offsets, &counts, &mut out);
        }
    };
    let block_n = if wgmma { 128 } else { GEMM_BLOCK_N };
    let grid = (grid_u32("rows", rows.div_ceil(GEMM_BLOCK_M))?, u32::try_from(n / block_n).unwrap_or(u32::MAX));
    if grid.1 > 65_535 {
        return Err(Error::shape("n", "at most 65535·64", n));
    }
    let (f, block, smem) = if wgmma {
        (gpu.function(SM90_MODULE, "moe_grouped_gemm_fp8_sm90", SM90_SMEM)?, 128, SM90_SMEM)
    } else {
        (gpu.function(MODULE, "moe_grouped_gemm_fp8", 0)?, 256, 0)
    };
    let stream = gpu.stream();
    let (av, asv, wv) = (a.kernel_arg(stream), a_scales.kernel_arg(stream), w.kernel_arg(stream));
    let (wsv, ov, cv) = (w_scales.kernel_arg(stream), offsets.kernel_arg(stream), counts.kernel_arg(stream));
    let mut outv = out.kernel_arg(stream);
    let mut l = stream.launch_builder(&f);
    l.arg(&av).arg(&asv).arg(&wv).arg(&wsv).arg(&ov).arg(&cv).arg(&mut outv).arg(&r64).arg(&rp64).arg(&ni).arg(&ki);
    l.arg(&ei);
    let c = LaunchConfig { grid_dim: (grid.0, grid.1, 1), block_dim: (block, 1, 1), shared_mem_bytes: smem };
    // SAFETY: shapes checked above. Each CTA's expert comes from a binary search clamped to 0..E; its rows are
    // bounded by min(offsets[e] + counts[e], offsets[e+1], rows), so a/a_scales/out accesses stay in bounds whatever
    // the device offsets hold; w rows n0..n0+block_n ≤ N (N % 128 == 0) and K columns are in bounds since
    // K % 128 == 0. Both kernels take the same arguments.
    unsafe { l.launch(c) }.cuda_call("cuLaunchKernel")?;
    Ok(())
}

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
    let (mut qv, mut sv) = (q.kernel_arg(stream), scales.kernel_arg(stream));
    let mut l = stream.launch_builder(&f);
    l.arg(&hv).arg(&mut qv).arg(&mut sv).arg(&r64).arg(&ii).arg(&rp64).arg(&ue8m0);
    match &lv {
        Some(v) => l.arg(v),
        None => l.arg(&NULL),
    };
    l.arg(&ne).arg(&has_limit);
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
    let mut ov = out.kernel_arg(stream);
    let mut l = stream.launch_builder(&f);
    l.arg(&yv).arg(&rv).arg(&wv);
    match &sv {
        Some(v) => l.arg(v),
        None => l.arg(&NULL),
    };
    l.arg(&mut ov).arg(&ki).arg(&hi).arg(&r64).arg(&has_shared).arg(&skip);
    let c = LaunchConfig { grid_dim: (grid_u32("t", t)?, gy, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: shapes checked; rows read from row_of are bounded by `rows` on the device; columns by H (H % 8 == 0,
    // so 16-byte vectors stay in bounds and aligned); shared read only when given with shape [t, H].
    unsafe { l.launch(c) }.cuda_call("cuLaunchKernel")?;
    Ok(())
}

/// Preallocated buffers of one [`moe_forward`] call for a fixed token count (so the call can be graph-captured).
#[derive(Debug)]
pub struct MoeWorkspace {
    /// Router outputs `[t, k]`.
    pub topk_ids: DeviceTensor<i32>,
    /// Router weights `[t, k]`.
    pub topk_weights: DeviceTensor<f32>,
    /// Gate logits `[t, E]` (written with [`Routing::Gate`]).
    pub logits: DeviceTensor<f32>,
    /// Quantized input `[t, H]`.
    pub xq: DeviceTensor<E4M3>,
    /// Its scales `[H/128, round_up(t, 4)]`.
    pub xs: DeviceTensor<f32>,
    /// The permutation.
    pub perm: Permuted,
    /// Gate+up output `[capacity, 2I]`.
    pub h: DeviceTensor<bf16>,
    /// SwiGLU codes `[capacity, I]`.
    pub act: DeviceTensor<E4M3>,
    /// SwiGLU scales `[I/128, round_up(capacity, 4)]`.
    pub act_scales: DeviceTensor<f32>,
    /// Down output `[capacity, H]`.
    pub y: DeviceTensor<bf16>,
    /// Grouped-GEMM kernel choice ([`GemmBackend::Auto`] unless changed).
    pub gemm_backend: GemmBackend,
    shared: Option<SharedWorkspace>,
}

#[derive(Debug)]
struct SharedWorkspace {
    offsets: DeviceTensor<i64>,
    counts: DeviceTensor<i32>,
    h: DeviceTensor<bf16>,
    act: DeviceTensor<E4M3>,
    act_scales: DeviceTensor<f32>,
    y: DeviceTensor<bf16>,
    intermediate: usize,
}

impl MoeWorkspace {
    /// Buffers for `t` tokens with `cfg`, hidden `H`, routed intermediate `I`, shared intermediate `shared_i`
    /// (`None`: no shared expert), in `layout`.
    ///
    /// Graph capture: no (allocates device memory); call it before capturing.
    pub fn new(
        gpu: &Gpu,
        cfg: &RouterConfig,
        t: usize,
        hidden: usize,
        intermediate: usize,
        shared_intermediate: Option<usize>,
        layout: Layout,
    ) -> Result<Self> {
        cfg.validate()?;
        let (e, k) = (cfg.num_experts, cfg.top_k);
        if intermediate == 0 || !intermediate.is_multiple_of(QUANT_BLOCK) {
            return Err(Error::Alignment { arg: "intermediate", required: QUANT_BLOCK, got: intermediate });
        }
        let perm = Permuted::new(gpu, t, k, e, hidden, layout)?;
        let cap = perm.capacity();
        let shared = match shared_intermediate {
            None => None,
            Some(si) => {
                if si == 0 || si % QUANT_BLOCK != 0 {
                    return Err(Error::Alignment { arg: "shared_intermediate", required: QUANT_BLOCK, got: si });
                }
                Some(SharedWorkspace {
                    offsets: DeviceTensor::from_host(gpu, &[0, to_i64("t", t)?], &[2])?,
                    counts: DeviceTensor::from_host(gpu, &[to_i32("t", t)?], &[1])?,
                    h: DeviceTensor::zeros(gpu, &[t, 2 * si])?,
                    act: DeviceTensor::zeros(gpu, &[t, si])?,
                    act_scales: DeviceTensor::zeros(gpu, &activation_scale_shape(t, si))?,
                    y: DeviceTensor::zeros(gpu, &[t, hidden])?,
                    intermediate: si,
                })
            }
        };
        Ok(MoeWorkspace {
            topk_ids: DeviceTensor::zeros(gpu, &[t, k])?,
            topk_weights: DeviceTensor::zeros(gpu, &[t, k])?,
            logits: DeviceTensor::zeros(gpu, &[t, e])?,
            xq: DeviceTensor::zeros(gpu, &[t, hidden])?,
            xs: DeviceTensor::zeros(gpu, &activation_scale_shape(t, hidden))?,
            h: DeviceTensor::zeros(gpu, &[cap, 2 * intermediate])?,
            act: DeviceTensor::zeros(gpu, &[cap, intermediate])?,
            act_scales: DeviceTensor::zeros(gpu, &activation_scale_shape(cap, intermediate))?,
            y: DeviceTensor::zeros(gpu, &[cap, hidden])?,
            perm,
            gemm_backend: GemmBackend::Auto,
            shared,
        })
    }

    /// Tokens this workspace serves.
    pub fn tokens(&self) -> usize {
        self.perm.tokens
    }
}

/// Where [`moe_forward`]'s routing comes from.
#[derive(Debug, Clone, Copy)]
pub enum Routing<'a> {
    /// Router logits `[t, E]` (f32) and an optional per-expert correction bias `[E]`.
    Logits(TensorRef<'a, f32>, Option<TensorRef<'a, f32>>),
    /// Precomputed `topk_ids` / `topk_weights` `[t, k]` (e.g. from an engine's own router).
    TopK(TensorRef<'a, i32>, TensorRef<'a, f32>),
    /// The gate GEMM fused in front: gate weight `[E, H]` (bf16) and an optional bias `[E]`; the logits land in
    /// [`MoeWorkspace::logits`].
    Gate(TensorRef<'a, bf16>, Option<TensorRef<'a, f32>>),
}

impl<'a> Routing<'a> {
    /// [`Routing::Logits`] from anything that views as a tensor (`&DeviceTensor`, a [`TensorRef`]).
    pub fn logits(logits: impl Into<TensorRef<'a, f32>>, bias: Option<impl Into<TensorRef<'a, f32>>>) -> Self {
        Routing::Logits(logits.into(), bias.map(Into::into))
    }
    /// [`Routing::TopK`] from anything that views as a tensor.
    pub fn top_k(ids: impl Into<TensorRef<'a, i32>>, weights: impl Into<TensorRef<'a, f32>>) -> Self {
        Routing::TopK(ids.into(), weights.into())
    }
    /// [`Routing::Gate`] from anything that views as a tensor.
    pub fn gate(w_gate: impl Into<TensorRef<'a, bf16>>, bias: Option<impl Into<TensorRef<'a, f32>>>) -> Self {
        Routing::Gate(w_gate.into(), bias.map(Into::into))
    }
}

/// The whole MoE layer: quantize `x` `[t, H]` (1×128, F32 scales), route (optionally after the gate GEMM), permute, gate+up grouped GEMM, SwiGLU +
/// requant, down grouped GEMM, shared expert (if given, same kernels with one expert), combine → `out` `[t, H]`
/// bf16. About 12 launches, no host synchronization and no allocation: capturable into a CUDA graph.
///
/// Graph capture: yes (launches only; no allocation, copy or synchronization).
#[allow(clippy::too_many_arguments)]
pub fn moe_forward<'a>(
    gpu: &Gpu,
    cfg: &RouterConfig,
    experts: impl Into<ExpertWeightViews<'a>>,
    shared: Option<impl Into<ExpertWeightViews<'a>>>,
    x: impl Into<TensorRef<'a, bf16>>,
    routing: Routing<'_>,
    ws: &mut MoeWorkspace,
    out: impl Into<TensorMut<'a, bf16>>,
) -> Result<()> {
    let (experts, shared): (ExpertWeightViews<'_>, Option<ExpertWeightViews<'_>>) =
        (experts.into(), shared.map(Into::into));
    let (x, mut out) = (x.into(), out.into());
    cfg.validate()?;
    let (e, h, i) = experts.dims()?;
    let t = ws.tokens();
    if e != cfg.num_experts || ws.perm.num_experts != e || ws.perm.top_k != cfg.top_k {
        return Err(Error::InvalidConfig(format!(
            "experts ({e}), router ({} experts, top-{}) and workspace ({} experts, top-{}) disagree",
            cfg.num_experts, cfg.top_k, ws.perm.num_experts, ws.perm.top_k
        )));
    }
    x.expect_shape("x", &[t, h])?;
    out.expect_shape("out", &[t, h])?;
    x.require_dense("x")?;
    out.require_dense("out")?;
    // Every workspace buffer (public fields) is checked here, before the first launch, so a mismatch is an error
    // with nothing enqueued rather than a failure half-way through the layer. Devices first: the workspace's private
    // shared-expert buffers were allocated with its public ones.
    check_devices!(gpu, x, out, experts.w13, experts.w13_scales, experts.w2, experts.w2_scales)?;
    check_devices!(gpu, ws.topk_ids, ws.topk_weights, ws.logits, ws.xq, ws.xs, ws.h, ws.act, ws.act_scales, ws.y)?;
    let p = &ws.perm;
    check_devices!(gpu, p.codes, p.scales, p.src_index, p.row_of, p.offsets, p.counts)?;
    if let Some(s) = &shared {
        check_devices!(gpu, s.w13, s.w13_scales, s.w2, s.w2_scales)?;
    }
    match &routing {
        Routing::Logits(l, bias) => {
            check_devices!(gpu, l)?;
            l.require_dense("logits")?;
            if let Some(bias) = bias {
                check_devices!(gpu, bias)?;
            }
        }
        Routing::TopK(ids, w) => {
            check_devices!(gpu, ids, w)?;
            ids.require_dense("topk_ids")?;
            w.require_dense("topk_weights")?;
        }
        Routing::Gate(g, bias) => {
            check_devices!(gpu, g)?;
            g.require_dense("w_gate")?;
            if let Some(bias) = bias {
                check_devices!(gpu, bias)?;
            }
        }
    }
    ws.perm.check()?;
    let cap = ws.perm.capacity();
    ws.perm.codes.expect_shape("workspace.perm", &[cap, h])?;
    ws.h.expect_shape("workspace.h", &[cap, 2 * i])?;
    ws.act.expect_shape("workspace.act", &[cap, i])?;
    ws.act_scales.expect_shape("workspace.act_scales", &activation_scale_shape(cap, i))?;
    ws.y.expect_shape("workspace.y", &[cap, h])?;
    ws.xq.expect_shape("workspace.xq", &[t, h])?;
    ws.xs.expect_shape("workspace.xs", &activation_scale_shape(t, h))?;
    ws.topk_ids.expect_shape("workspace.topk_ids", &[t, cfg.top_k])?;
    ws.topk_weights.expect_shape("workspace.topk_weights", &[t, cfg.top_k])?;
    ws.logits.expect_shape("workspace.logits", &[t, e])?;
    if ws.gemm_backend == GemmBackend::Wgmma {
        gpu.require_hopper("moe_grouped_gemm_fp8_sm90")?;
    }
    if ws.gemm_backend == GemmBackend::Sm90Tma {
        gpu.require_hopper(TMA_KERNEL)?;
    }
    match (shared, &ws.shared) {
        (None, _) => {}
        (Some(s), Some(sw)) => {
            let (se, sh, si) = s.dims()?;
            if se != 1 || sh != h || si != sw.intermediate {
                return Err(Error::shape(
                    "shared",
                    format!("[1, {}, {h}]", 2 * sw.intermediate),
                    format!("[{se}, {}, {sh}]", 2 * si),
                ));
            }
            // Sized for the workspace's token count at creation (ws.perm.tokens is public and could change).
            sw.h.expect_shape("workspace.shared.h", &[t, 2 * si])?;
            sw.y.expect_shape("workspace.shared.y", &[t, h])?;
        }
        (Some(_), None) => {
            return Err(Error::InvalidConfig("shared expert given but the workspace has no shared buffers".into()))
        }
    }
    let k = cfg.top_k;
    match &routing {
        Routing::Logits(l, _) => l.expect_shape("logits", &[t, e])?,
        Routing::TopK(ids, w) => {
            ids.expect_shape("topk_ids", &[t, k])?;
            w.expect_shape("topk_weights", &[t, k])?;
        }
        Routing::Gate(g, _) => g.expect_shape("w_gate", &[e, h])?,
    }
    if t == 0 {
        return Ok(());
    }
    quantize_activations(gpu, x, &mut ws.xq, &mut ws.xs, ScaleFormat::F32)?;
    let (ids, weights): (TensorRef<'_, i32>, TensorRef<'_, f32>) = match routing {
        Routing::Logits(logits, bias) => {
            route(gpu, cfg, logits, bias, &mut ws.topk_ids, &mut ws.topk_weights)?;
            (ws.topk_ids.as_tensor_ref(), ws.topk_weights.as_tensor_ref())
        }
        Routing::TopK(ids, w) => (ids, w),
        Routing::Gate(w_gate, bias) => {
            gate_logits(gpu, x, w_gate, &mut ws.logits)?;
            route(gpu, cfg, &ws.logits, bias, &mut ws.topk_ids, &mut ws.topk_weights)?;
            (ws.topk_ids.as_tensor_ref(), ws.topk_weights.as_tensor_ref())
        }
    };
    permute(gpu, ids, &ws.xq, &ws.xs, &mut ws.perm)?;
    let p = &ws.perm;
    let b = ws.gemm_backend;
    grouped_gemm_with(gpu, &p.codes, &p.scales, experts.w13, experts.w13_scales, &p.offsets, &p.counts, &mut ws.h, b)?;
    swiglu_quant(gpu, &ws.h, &mut ws.act, &mut ws.act_scales, ScaleFormat::F32, Some(&p.offsets))?;
    grouped_gemm_with(
        gpu,
        &ws.act,
        &ws.act_scales,
        experts.w2,
        experts.w2_scales,
        &p.offsets,
        &p.counts,
        &mut ws.y,
        b,
    )?;
    let shared_y = match (shared, ws.shared.as_mut()) {
        (Some(s), Some(sw)) => {
            grouped_gemm_with(gpu, &ws.xq, &ws.xs, s.w13, s.w13_scales, &sw.offsets, &sw.counts, &mut sw.h, b)?;
            swiglu_quant(gpu, &sw.h, &mut sw.act, &mut sw.act_scales, ScaleFormat::F32, no_tensor())?;
            grouped_gemm_with(gpu, &sw.act, &sw.act_scales, s.w2, s.w2_scales, &sw.offsets, &sw.counts, &mut sw.y, b)?;
            Some(&sw.y)
        }
        _ => None,
    };
    combine(gpu, &ws.y, &ws.perm.row_of, weights, shared_y, false, &mut out)
}

/// Numbers used by the benches: bytes of expert weights (codes + scales) a layer reads when `experts_hit` experts
/// receive tokens.
pub fn expert_weight_bytes(experts_hit: usize, hidden: usize, intermediate: usize) -> u64 {
    let codes = 3 * hidden * intermediate;
    let scales = 4 * 3 * (hidden / QUANT_BLOCK) * (intermediate / QUANT_BLOCK);
    (experts_hit * (codes + scales)) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_bounds_every_routing() {
        // Worst case for padding: every expert gets exactly one pair.
        let l = Layout::Contiguous { block_m: GEMM_BLOCK_M };
        let (t, k, e) = (32, 8, 256);
        let ids: Vec<i32> = (0..t * k).map(|i| (i % e) as i32).collect();
        let p = crate::reference::moe::permute(&ids, t, k, e, l).unwrap();
        assert!(p.offsets[e] as usize <= l.capacity(t, k, e));
        assert_eq!(l.capacity(t, k, e), 256 * 64);
        assert_eq!(l.capacity(0, 8, 256), 0);
    }

    use crate::reference::moe::{expert_scores, permute as ref_permute, route as ref_route, sanitize, Permutation};

    /// Twin of `better` in moe.cu.
    fn better(av: f32, ai: i32, bv: f32, bi: i32) -> bool {
        if ai < 0 {
            return false;
        }
        if bi < 0 {
            return true;
        }
        av > bv || (av == bv && ai < bi)
    }

    /// Twin of `warp_argmax`: xor butterfly over 32 lanes.
    fn warp_argmax(lanes: &mut [(f32, i32); 32]) {
        for off in [16, 8, 4, 2, 1] {
            let prev = *lanes;
            for l in 0..32 {
                let (ov, oi) = prev[l ^ off];
                if better(ov, oi, prev[l].0, prev[l].1) {
                    lanes[l] = (ov, oi);
                }
            }
        }
        assert!(lanes.iter().all(|x| *x == lanes[0]), "butterfly must converge on every lane");
    }

    /// Twin of the router kernel's selection (scores from the reference; the kernel's lane bookkeeping emulated).
    fn device_twin_route(logits: &[f32], bias: Option<&[f32]>, t: usize, cfg: &RouterConfig) -> Vec<i32> {
        let (e, k, g) = (cfg.num_experts, cfg.top_k, cfg.num_groups);
        let gs = e / g;
        let mut ids = Vec::new();
        for row in logits.chunks(e).take(t) {
            let s = expert_scores(row, cfg.scoring);
            let v: Vec<f32> = (0..e).map(|x| sanitize(s[x] + bias.map_or(0.0, |b| b[x]))).collect();
            let mut kept: u32 = u32::MAX;
            if g > 1 && cfg.topk_groups < g {
                let gscore: Vec<f32> = (0..32)
                    .map(|lane| {
                        if lane >= g {
                            return f32::NEG_INFINITY;
                        }
                        let (mut b1, mut b2) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
                        for &x in &v[lane * gs..(lane + 1) * gs] {
                            if x > b1 {
                                b2 = b1;
                                b1 = x;
                            } else if x > b2 {
                                b2 = x;
                            }
                        }
                        sanitize(if gs >= 2 { b1 + b2 } else { b1 })
                    })
                    .collect();
                kept = 0;
                for _ in 0..cfg.topk_groups {
                    let mut lanes = [(0f32, -1i32); 32];
                    for (lane, slot) in lanes.iter_mut().enumerate() {
                        let ok = lane < g && (kept >> lane) & 1 == 0;
                        *slot = (gscore[lane], if ok { lane as i32 } else { -1 });
                    }
                    warp_argmax(&mut lanes);
                    if lanes[0].1 >= 0 {
                        kept |= 1 << lanes[0].1;
                    }
                }
            }
            let mut avail = [0u32; 32];
            for (lane, a) in avail.iter_mut().enumerate() {
                for j in 0..32 {
                    let x = lane + 32 * j;
                    if x < e && (kept >> (x / gs)) & 1 == 1 {
                        *a |= 1 << j;
                    }
                }
            }
            for _ in 0..k {
                let mut lanes = [(f32::NEG_INFINITY, -1i32); 32];
                for lane in 0..32 {
                    let mut m = avail[lane];
                    while m != 0 {
                        let x = lane + 32 * m.trailing_zeros() as usize;
                        if better(v[x], x as i32, lanes[lane].0, lanes[lane].1) {
                            lanes[lane] = (v[x], x as i32);
                        }
                        m &= m - 1;
                    }
                }
                warp_argmax(&mut lanes);
                let bi = lanes[0].1;
                if bi >= 0 {
                    avail[bi as usize % 32] &= !(1 << (bi as usize / 32));
                }
                ids.push(bi);
            }
        }
        ids
    }

    #[test]
    fn router_lane_algorithm_matches_reference() {
        let mut seed = 0x1234_5678u64;
        let mut rnd = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        };
        let ds = RouterConfig::deepseek_v3();
        let configs = [
            ds,
            RouterConfig { num_experts: 64, top_k: 6, num_groups: 8, topk_groups: 3, ..ds },
            RouterConfig { num_experts: 1024, top_k: 32, num_groups: 32, topk_groups: 2, ..ds },
            RouterConfig::softmax(8, 2, true),
            RouterConfig::softmax(160, 6, false),
            RouterConfig { num_experts: 32, top_k: 4, num_groups: 32, topk_groups: 4, ..ds },
        ];
        for cfg in configs {
            let t = 24;
            let e = cfg.num_experts;
            // Coarse values make ties common; a few NaN/inf.
            let mut logits: Vec<f32> = (0..t * e).map(|_| (rnd() * 4.0).round() / 2.0).collect();
            logits[1] = f32::NAN;
            logits[e + 2] = f32::INFINITY;
            logits[2 * e + 3] = f32::NEG_INFINITY;
            let bias: Vec<f32> = (0..e).map(|_| (rnd() * 2.0).round() / 8.0).collect();
            for b in [None, Some(bias.as_slice())] {
                let (want, _) = ref_route(&logits, b, t, &cfg).unwrap();
                assert_eq!(device_twin_route(&logits, b, t, &cfg), want, "{cfg:?}");
            }
        }
    }

    /// Twin of the device permute: count_rank's chunked ballot ranks, moe_offsets' Hillis-Steele scan, moe_scatter,
    /// and moe_gather's row classification through `find_segment`.
    fn device_twin_permute(ids: &[i32], t: usize, k: usize, e: usize, layout: Layout) -> Permutation {
        let n = t * k;
        let mut rank = vec![i32::MIN; n];
        let mut raw = vec![0i32; e];
        for (x, r) in raw.iter_mut().enumerate() {
            let mut running = 0;
            for base in (0..n).step_by(256) {
                let matches: Vec<bool> = (0..256).map(|tid| base + tid < n && ids[base + tid] == x as i32).collect();
                let warp_totals: Vec<i32> =
                    (0..8).map(|w| matches[w * 32..(w + 1) * 32].iter().filter(|&&m| m).count() as i32).collect();
                for tid in 0..256 {
                    if matches[tid] {
                        let (w, lane) = (tid / 32, tid % 32);
                        let before: i32 = warp_totals[..w].iter().sum();
                        let within = matches[w * 32..w * 32 + lane].iter().filter(|&&m| m).count() as i32;
                        rank[base + tid] = running + before + within;
                    }
                }
                running += warp_totals.iter().sum::<i32>();
            }
            *r = running;
        }
        let (masked, block_m, max_m) = match layout {
            Layout::Contiguous { block_m } => (false, block_m as i64, 0),
            Layout::Masked { max_m } => (true, 1, max_m as i64),
        };
        let mut counts = vec![0i32; e];
        let mut scan = vec![0i64; 1024];
        for x in 0..e {
            if masked {
                counts[x] = raw[x].min(max_m as i32);
                scan[x] = max_m;
            } else {
                counts[x] = raw[x];
                scan[x] = (raw[x] as i64 + block_m - 1) / block_m * block_m;
            }
        }
        let mut d = 1;
        while d < 1024 {
            let prev = scan.clone();
            for x in d..1024 {
                scan[x] = prev[x] + prev[x - d];
            }
            d <<= 1;
        }
        let mut offsets = vec![0i64; e + 1];
        offsets[1..].copy_from_slice(&scan[..e]);
        let cap = layout.capacity(t, k, e) as i64;
        let mut src_index = vec![12345i32; cap as usize];
        let mut row_of = vec![-1i32; n];
        for i in 0..n {
            let id = ids[i];
            if id >= 0 && (id as usize) < e && rank[i] < counts[id as usize] {
                let row = offsets[id as usize] + rank[i] as i64;
                if row < cap {
                    src_index[row as usize] = i as i32;
                    row_of[i] = row as i32;
                }
            }
        }
        for row in 0..cap {
            let x = find_segment(&offsets, e, row);
            if x >= e {
                src_index[row as usize] = -1;
                continue;
            }
            let end = segment_valid_end(&offsets, &counts, x, cap);
            if row >= end {
                src_index[row as usize] = -1;
            } else {
                assert!(src_index[row as usize] >= 0, "real row {row} was scattered");
            }
        }
        Permutation { counts, offsets, src_index, row_of }
    }

    #[test]
    fn permute_device_algorithm_matches_reference() {
        let mut seed = 99u64;
        let mut rnd = move |m: i32| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 33) as i32 % m
        };
        for &(t, k, e) in
            &[(1usize, 1usize, 8usize), (1, 8, 256), (33, 2, 8), (300, 8, 256), (700, 1, 3), (64, 4, 1024)]
        {
            for layout in
                [Layout::Contiguous { block_m: 64 }, Layout::Contiguous { block_m: 128 }, Layout::Masked { max_m: 64 }]
            {
                let mut ids: Vec<i32> = (0..t * k).map(|_| rnd(e as i32)).collect();
                for i in (0..ids.len()).step_by(5) {
                    ids[i] = -1;
                }
                let want = ref_permute(&ids, t, k, e, layout).unwrap();
                assert_eq!(device_twin_permute(&ids, t, k, e, layout), want, "t={t} k={k} E={e} {layout:?}");
                // Every GEMM tile maps to one expert and never straddles two segments.
                for tile in (0..want.offsets[e]).step_by(GEMM_BLOCK_M) {
                    let x = find_segment(&want.offsets, e, tile);
                    assert!(x < e && tile + GEMM_BLOCK_M as i64 <= want.offsets[x + 1]);
                }
                // Out-of-range ids on the device are skipped, not dereferenced.
                ids[0] = e as i32;
                let last = ids.len() - 1;
                ids[last] = i32::MIN;
                let p = device_twin_permute(&ids, t, k, e, layout);
                assert_eq!((p.row_of[0], p.row_of[last]), (-1, -1));
            }
        }
    }

    #[test]
    fn permuted_config_is_validated_without_overflow() {
        let ok = Permuted::validate_config(3, 2, 8, 256, Layout::Masked { max_m: 64 }).unwrap();
        assert_eq!(ok, (6, 8 * 64));
        // block_m / max_m beyond i32 (the kernels' argument type) are errors, not a capacity overflow panic.
        let huge = usize::MAX / 64 * 64;
        assert!(Permuted::validate_config(3, 2, 8, 256, Layout::Contiguous { block_m: huge }).is_err());
        assert!(Permuted::validate_config(3, 2, 8, 256, Layout::Masked { max_m: 1 << 31 }).is_err());
        assert!(Permuted::validate_config(3, 2, 8, 256, Layout::Masked { max_m: 100 }).is_err());
        assert!(Permuted::validate_config(3, 2, 1025, 256, Layout::Masked { max_m: 64 }).is_err());
        assert!(Permuted::validate_config(3, 2, 8, 200, Layout::Masked { max_m: 64 }).is_err());
    }

    /// The Sm90Tma schedule over every tile: each valid row (src_index ≥ 0) of every column tile is computed exactly
    /// once, by a tile of its own expert that stays inside that expert's segment; skipped tiles hold no valid row.
    #[test]
    fn tma_schedule_covers_valid_rows_once() {
        let mut seed = 7u64;
        let mut rnd = move |m: i32| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 33) as i32 % m
        };
        let n = 3 * TMA_BLOCK_N;
        for &(t, k, e) in &[(1usize, 1usize, 8usize), (16, 8, 8), (512, 8, 64), (512, 1, 64), (300, 2, 5), (7, 8, 256)]
        {
            for layout in
                [Layout::Contiguous { block_m: 64 }, Layout::Contiguous { block_m: 128 }, Layout::Masked { max_m: 64 }]
            {
                // Holes, and experts ≥ e/2 never hit (empty segments between full ones).
                let mut ids: Vec<i32> = (0..t * k).map(|_| 2 * rnd(e.div_ceil(2) as i32)).collect();
                for i in (0..ids.len()).step_by(7) {
                    ids[i] = -1;
                }
                let p = ref_permute(&ids, t, k, e, layout).unwrap();
                let rows = layout.capacity(t, k, e);
                let (tiles_m, tiles_n) = (rows.div_ceil(TMA_BLOCK_M), n / TMA_BLOCK_N);
                let mut hits = vec![0u32; rows * tiles_n];
                for item in 0..(tiles_m * tiles_n) as u32 {
                    let Some(w) = tma_tile_work(item, rows, n, plan::SM90_GROUP_M, &p.offsets, &p.counts) else {
                        let (tm, _) = plan::tile_coords(item, tiles_m as u32, tiles_n as u32, plan::SM90_GROUP_M);
                        let m0 = tm as usize * TMA_BLOCK_M;
                        assert!((m0..(m0 + TMA_BLOCK_M).min(rows)).all(|r| p.src_index[r] < 0), "skipped valid rows");
                        continue;
                    };
                    assert!(w.expert < e && w.m0 >= p.offsets[w.expert] && w.m0 < w.valid_end);
                    assert!(w.m0 + TMA_BLOCK_M as i64 <= p.offsets[w.expert + 1], "tile straddles segments");
                    assert_eq!(w.valid_end, p.offsets[w.expert] + p.counts[w.expert] as i64);
                    for r in w.m0..w.valid_end.min(w.m0 + TMA_BLOCK_M as i64) {
                        let src = p.src_index[r as usize];
                        assert!(src >= 0 && ids[src as usize] as usize == w.expert, "row {r} of the wrong expert");
                        hits[r as usize * tiles_n + w.n0 / TMA_BLOCK_N] += 1;
                    }
                }
                for r in 0..rows {
                    let want = u32::from(p.src_index[r] >= 0);
                    assert!(
                        hits[r * tiles_n..(r + 1) * tiles_n].iter().all(|&h| h == want),
                        "row {r} t={t} {layout:?}"
                    );
                }
            }
        }
    }

    /// The CTAs' two pipes together compute every valid tile exactly once, the pipes of a CTA within one tile of
    /// each other.
    #[test]
    fn tma_pipes_split_the_valid_tiles() {
        let ids: Vec<i32> = (0..700 * 8usize).map(|i| ((i * 37) % 61) as i32).collect();
        let p = ref_permute(&ids, 700, 8, 64, Layout::Contiguous { block_m: 64 }).unwrap();
        let (rows, n) = (Layout::Contiguous { block_m: 64 }.capacity(700, 8, 64), 512);
        let all: Vec<TmaTile> = (0..(rows.div_ceil(64) * 4) as u32)
            .filter_map(|i| tma_tile_work(i, rows, n, 8, &p.offsets, &p.counts))
            .collect();
        for grid in [1u32, 7, 132] {
            let mut got = Vec::new();
            for cta in 0..grid {
                let [p0, p1] = tma_cta_schedule(cta, grid, rows, n, 8, &p.offsets, &p.counts);
                assert!(p0.len() == p1.len() || p0.len() == p1.len() + 1);
                got.extend(p0.into_iter().chain(p1));
            }
            let key = |w: &TmaTile| (w.m0, w.n0);
            got.sort_by_key(key);
            let mut want = all.clone();
            want.sort_by_key(key);
            assert_eq!(got, want, "grid {grid}");
        }
    }

    /// Whatever the device offsets/counts hold, a tile's expert and stored rows stay in bounds.
    #[test]
    fn tma_schedule_is_bounded_for_garbage_offsets() {
        let mut seed = 3u64;
        let mut rnd = move |m: i64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 20) as i64 % m - m / 4
        };
        let (rows, n, e) = (1000usize, 256usize, 6usize);
        for _ in 0..50 {
            let offsets: Vec<i64> = (0..=e).map(|_| rnd(1500)).collect();
            let counts: Vec<i32> = (0..e).map(|_| rnd(600) as i32).collect();
            for item in 0..(rows.div_ceil(64) * 2) as u32 {
                if let Some(w) = tma_tile_work(item, rows, n, 8, &offsets, &counts) {
                    assert!(w.expert < e && w.valid_end <= rows as i64 && w.m0 >= 0 && w.n0 < n);
                }
            }
        }
    }

    #[test]
    fn tma_descriptors_and_launch_shape() {
        let (rows, n, k, e) = (8 * 4096 + 8 * 127, 4096, 7168, 8);
        let [a, b, s] = grouped_tmas(rows, n, k, e);
        for t in [a, b, s] {
            t.check().unwrap();
        }
        // One stage's transaction bytes (the kernel's kStageTx) = the three boxes.
        assert_eq!(a.box_bytes() + b.box_bytes() + s.box_bytes(), plan::stage_bytes(64, 128));
        assert_eq!((a.rows, a.cols, b.rows, b.cols), (rows as u64, k as u64, (e * n) as u64, k as u64));
        assert_eq!((s.rows, s.cols, s.row_stride_bytes), ((k / 128) as u64, rows as u64, 4 * rows as u64));
        let [_, _, s1] = grouped_tmas(1, 128, 128, 1);
        assert_eq!((s1.cols, s1.row_stride_bytes), (4, 16));
        s1.check().unwrap();
        let (stages, smem, grid) = tma_launch_shape(rows, n, 132).unwrap();
        assert!(stages >= 4 && stages % 2 == 0 && smem <= plan::SM90_SMEM_LIMIT && grid == 132);
        assert_eq!(smem, 1024 + stages * (64 * 128 + 128 * 128 + 256 + 16));
        assert_eq!(tma_launch_shape(64, 128, 132).unwrap().2, 1);
    }

    #[test]
    fn weight_bytes() {
        assert_eq!(expert_weight_bytes(1, 7168, 2048), 3 * 7168 * 2048 + 4 * 3 * 56 * 16);
    }
}
