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
use crate::fp8_gemm::plan;
use crate::quant::{activation_scale_shape, quantize_activations, QUANT_BLOCK};
use crate::reference::moe::{validate_ids, ExpertsFp8};
pub use crate::reference::moe::{Layout, RouterConfig, Scoring};
use crate::reference::quant::{padded_scale_rows, ScaleFormat};
use crate::sm90::{Tma2d, TmaDtype};
use crate::tensor::DeviceTensor;
use crate::view::{no_tensor, TensorMut, TensorRef};

const MODULE: &str = "moe";
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

mod epilogue;
mod grouped;
mod params;
mod permute;
mod router;

pub use epilogue::*;
pub use grouped::*;
pub use permute::*;
pub use router::*;

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
