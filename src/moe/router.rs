//! The router: gate logits (`x · w_gateᵀ`) and top-k expert selection (grouped, biased, renormalized).

use super::params::{GateLogitsParams, RouterParams};
use super::*;

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
    let stream = gpu.stream();
    let lv = logits.kernel_arg(stream);
    let bv = bias.as_ref().map(|b| b.kernel_arg(stream));
    let (iv, wv) = (topk_ids.kernel_arg(stream), topk_weights.kernel_arg(stream));
    let params = RouterParams {
        logits: lv.addr(),
        // Without a bias the kernel never dereferences the pointer: pass null.
        bias: bv.as_ref().map_or(0, |v| v.addr()),
        topk_ids: iv.addr(),
        topk_weights: wv.addr(),
        t: ti,
        e: e as i32,
        k: cfg.top_k as i32,
        groups: cfg.num_groups as i32,
        topk_groups: cfg.topk_groups as i32,
        has_bias: i32::from(bias.is_some()),
        softmax: i32::from(cfg.scoring == Scoring::Softmax),
        renormalize: i32::from(cfg.renormalize),
        scale: cfg.routed_scaling_factor,
    };
    let mut launch = stream.launch_builder(&f);
    launch.arg(&params);
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
    let (xv, wv, lv) = (x.kernel_arg(stream), w_gate.kernel_arg(stream), logits.kernel_arg(stream));
    let params = GateLogitsParams { x: xv.addr(), w: wv.addr(), logits: lv.addr(), t: ti, num_experts: ei, hidden: hi };
    let mut l = stream.launch_builder(&f);
    l.arg(&params);
    let c =
        LaunchConfig { grid_dim: (grid_u32("E", e.div_ceil(8))?, gy, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: shapes checked; warps with expert ≥ E return, tokens are bounded by t, columns by H (H % 8 == 0 keeps
    // the 16-byte loads in bounds and aligned).
    unsafe { l.launch(c) }.cuda_call("cuLaunchKernel")?;
    Ok(())
}
