//! One DeepSeek-V3 MoE layer's decode step on the GPU, chaining the crate's kernels in the order of
//! [`crate::reference::layer`] (which documents the math). No host synchronization inside [`DecodeLayer::forward`]
//! and, once the workspace holds the MLA plan for the step's table width, no allocation: the split plan is computed on
//! the device from the device lengths, so a captured step replays correctly when the lengths change.

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::CudaEvent;
use half::bf16;

use crate::decode_ops::{self, Columns, HeadWeightStrides, RopeSlices, RopeTables};
use crate::device::{check_devices, Gpu};
use crate::error::{Error, Result};
use crate::fp8::E4M3;
use crate::fp8_gemm::{self, GemmOptions};
use crate::mla::{self, Backend, MlaOptions, MlaPlan, MlaWorkspace};
use crate::model::{DeepSeekV3Config, Fp8Linear};
use crate::moe::{self, ExpertWeights, MoeWorkspace, Routing};
use crate::quant::{self, activation_scale_shape};
use crate::reference::layer::{rope_config, router_config, PreparedLayer};
use crate::reference::mla::{validate_inputs, MlaConfig};
use crate::reference::moe::{Layout, RouterConfig};
use crate::reference::quant::ScaleFormat;
use crate::tensor::DeviceTensor;
use crate::view::{TensorMut, TensorRef};

/// An FP8 linear layer on the device.
pub struct DeviceLinear {
    /// Codes `[n, k]`.
    pub weight: DeviceTensor<E4M3>,
    /// Block scales `[ceil(n/128), ceil(k/128)]`.
    pub scales: DeviceTensor<f32>,
}

impl DeviceLinear {
    /// Uploads `lin`.
    pub fn upload(gpu: &Gpu, lin: &Fp8Linear) -> Result<Self> {
        Ok(DeviceLinear {
            weight: DeviceTensor::from_host(gpu, &lin.weight, &[lin.n, lin.k])?,
            scales: DeviceTensor::from_host(gpu, &lin.weight_scale_inv, &[lin.n.div_ceil(128), lin.k.div_ceil(128)])?,
        })
    }
    /// Output features.
    pub fn n(&self) -> usize {
        self.weight.shape()[0]
    }
    /// Input features.
    pub fn k(&self) -> usize {
        self.weight.shape()[1]
    }
}

/// A layer's weights on the device.
pub struct DecodeLayer {
    cfg: DeepSeekV3Config,
    router: RouterConfig,
    input_layernorm: DeviceTensor<bf16>,
    q_a: DeviceLinear,
    q_a_layernorm: DeviceTensor<bf16>,
    q_b: DeviceLinear,
    kv_a: DeviceLinear,
    kv_a_layernorm: DeviceTensor<bf16>,
    kv_b: DeviceTensor<bf16>,
    o_proj: DeviceLinear,
    post_attention_layernorm: DeviceTensor<bf16>,
    gate_weight: DeviceTensor<bf16>,
    bias: DeviceTensor<f32>,
    experts: ExpertWeights,
    shared: ExpertWeights,
    rope: RopeTables,
    /// Kernel choices (defaults: automatic GEMM and MLA kernel choice by device).
    pub options: LayerOptions,
}

/// Kernel choices of a decode step.
#[derive(Debug, Clone, Copy, Default)]
pub struct LayerOptions {
    /// Dense FP8 GEMMs.
    pub gemm: GemmOptions,
    /// MLA decode kernel.
    pub mla_backend: Backend,
}

/// Host copies of a decode step's intermediates ([`DecodeLayer::last_intermediates`]), laid out as the reference's
/// [`crate::reference::layer::LayerTrace`] fields of the same names.
#[doc(hidden)]
#[derive(Debug, Clone)]
pub struct StepIntermediates {
    /// `[b, h, 576]` query fed to MLA.
    pub q_mla: Vec<f32>,
    /// `[b, 576]` the new cache rows (normalized latent and rotated key).
    pub kv_row: Vec<f32>,
    /// `[b, h, 512]` attention output in the latent space.
    pub o_latent: Vec<f32>,
    /// `[b, h]` log-sum-exp of the attention.
    pub lse: Vec<f32>,
    /// `[b, hidden]` the attention branch (o_proj output).
    pub attn: Vec<f32>,
    /// `[b, hidden]` residual after attention.
    pub h: Vec<f32>,
    /// `[b, hidden]` the MoE branch.
    pub moe_out: Vec<f32>,
}

/// Preallocated activations of a decode step for a fixed batch size.
pub struct DecodeWorkspace {
    batch: usize,
    /// The dimensions of the layer it was made for.
    cfg: DeepSeekV3Config,
    xn: DeviceTensor<bf16>,
    xq: DeviceTensor<E4M3>,
    xs: DeviceTensor<f32>,
    q_a: DeviceTensor<bf16>,
    q_an: DeviceTensor<bf16>,
    q_aq: DeviceTensor<E4M3>,
    q_as: DeviceTensor<f32>,
    q: DeviceTensor<bf16>,
    kv: DeviceTensor<bf16>,
    q_mla: DeviceTensor<bf16>,
    o_latent: DeviceTensor<bf16>,
    lse: DeviceTensor<f32>,
    o: DeviceTensor<bf16>,
    oq: DeviceTensor<E4M3>,
    os: DeviceTensor<f32>,
    attn: DeviceTensor<bf16>,
    h: DeviceTensor<bf16>,
    hn: DeviceTensor<bf16>,
    moe_out: DeviceTensor<bf16>,
    moe: MoeWorkspace,
    seq_ids: DeviceTensor<i32>,
    /// The MLA plan (computed on the device) and partials, made by the first step with a given block-table width,
    /// page size and MLA kernel, and reused while those stay the same.
    mla: Option<MlaState>,
}

struct MlaState {
    /// (page size, block-table width, kernel choice) the plan was made for.
    key: (usize, usize, Backend),
    plan: MlaPlan,
    ws: MlaWorkspace,
}

/// Per-sequence state of one step: the device copies plus the host copies the plan and validation need.
pub struct DecodeBatch<'a> {
    /// `[batch, max_blocks]` page ids on the device.
    pub block_table: TensorRef<'a, i32>,
    /// Host copy of the block table (validated before launch).
    pub block_table_host: &'a [i32],
    /// `[batch]` context lengths including the new token, on the device.
    pub seqlens: TensorRef<'a, i32>,
    /// Host copy of `seqlens`.
    pub seqlens_host: &'a [i32],
    /// `[batch]` positions of the new tokens (`seqlens − 1`), on the device.
    pub positions: TensorRef<'a, i32>,
}

/// GPU time of each stage of a step, in launch order.
#[derive(Debug, Clone, Default)]
pub struct StageTimes {
    /// `(stage, milliseconds)`.
    pub stages: Vec<(&'static str, f64)>,
}

struct Marks {
    events: Vec<(&'static str, CudaEvent)>,
}

impl Marks {
    fn new(gpu: &Gpu, enabled: bool) -> Result<Option<Self>> {
        if !enabled {
            return Ok(None);
        }
        let start = gpu.stream().record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        Ok(Some(Marks { events: vec![("start", start)] }))
    }
}

fn mark(gpu: &Gpu, marks: &mut Option<Marks>, stage: &'static str) -> Result<()> {
    if let Some(m) = marks {
        m.events.push((stage, gpu.stream().record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?));
    }
    Ok(())
}

impl DecodeLayer {
    /// Uploads a prepared layer.
    ///
    /// Graph capture: no (allocates and copies from the host); call it before capturing.
    pub fn upload(gpu: &Gpu, layer: &PreparedLayer) -> Result<Self> {
        let cfg = layer.cfg.clone();
        let up = |v: &[bf16], shape: &[usize]| DeviceTensor::from_host(gpu, v, shape);
        let a = &layer.attn;
        Ok(DecodeLayer {
            router: router_config(&cfg),
            input_layernorm: up(&layer.input_layernorm, &[cfg.hidden])?,
            q_a: DeviceLinear::upload(gpu, &a.q_a_proj)?,
            q_a_layernorm: up(&a.q_a_layernorm, &[cfg.q_lora_rank])?,
            q_b: DeviceLinear::upload(gpu, &a.q_b_proj)?,
            kv_a: DeviceLinear::upload(gpu, &a.kv_a_proj_with_mqa)?,
            kv_a_layernorm: up(&a.kv_a_layernorm, &[cfg.kv_lora_rank])?,
            kv_b: up(&layer.kv_b_bf16, &[a.kv_b_proj.n, a.kv_b_proj.k])?,
            o_proj: DeviceLinear::upload(gpu, &a.o_proj)?,
            post_attention_layernorm: up(&layer.post_attention_layernorm, &[cfg.hidden])?,
            gate_weight: up(&layer.gate_weight, &[cfg.n_routed_experts, cfg.hidden])?,
            bias: DeviceTensor::from_host(gpu, &layer.e_score_correction_bias, &[cfg.n_routed_experts])?,
            experts: ExpertWeights::from_reference(gpu, &layer.experts)?,
            shared: ExpertWeights::from_reference(gpu, &layer.shared)?,
            rope: RopeTables::new(gpu, rope_config(&cfg))?,
            options: LayerOptions::default(),
            cfg,
        })
    }

    /// The dimensions.
    pub fn config(&self) -> &DeepSeekV3Config {
        &self.cfg
    }

    /// Activation buffers for `batch` sequences.
    ///
    /// Graph capture: no (allocates device memory); call it before capturing.
    pub fn workspace(&self, gpu: &Gpu, batch: usize) -> Result<DecodeWorkspace> {
        let c = &self.cfg;
        let (b, heads) = (batch, c.num_heads);
        let width = c.kv_lora_rank + c.qk_rope_head_dim;
        let z16 = |shape: &[usize]| DeviceTensor::<bf16>::zeros(gpu, shape);
        let zq = |shape: &[usize]| DeviceTensor::<E4M3>::zeros(gpu, shape);
        let zf = |shape: &[usize]| DeviceTensor::<f32>::zeros(gpu, shape);
        let seq_ids: Vec<i32> = (0..b as i32).collect();
        Ok(DecodeWorkspace {
            batch,
            cfg: c.clone(),
            xn: z16(&[b, c.hidden])?,
            xq: zq(&[b, c.hidden])?,
            xs: zf(&activation_scale_shape(b, c.hidden))?,
            q_a: z16(&[b, c.q_lora_rank])?,
            q_an: z16(&[b, c.q_lora_rank])?,
            q_aq: zq(&[b, c.q_lora_rank])?,
            q_as: zf(&activation_scale_shape(b, c.q_lora_rank))?,
            q: z16(&[b, heads * c.qk_head_dim()])?,
            kv: z16(&[b, width])?,
            q_mla: z16(&[b, 1, heads, width])?,
            o_latent: z16(&[b, 1, heads, c.kv_lora_rank])?,
            lse: zf(&[b, heads, 1])?,
            o: z16(&[b, heads, c.v_head_dim])?,
            oq: zq(&[b, heads * c.v_head_dim])?,
            os: zf(&activation_scale_shape(b, heads * c.v_head_dim))?,
            attn: z16(&[b, c.hidden])?,
            h: z16(&[b, c.hidden])?,
            hn: z16(&[b, c.hidden])?,
            moe_out: z16(&[b, c.hidden])?,
            moe: MoeWorkspace::new(
                gpu,
                &self.router,
                b,
                c.hidden,
                c.moe_intermediate,
                Some(c.shared_intermediate()),
                Layout::Contiguous { block_m: moe::GEMM_BLOCK_M },
            )?,
            seq_ids: DeviceTensor::from_host(gpu, &seq_ids, &[b])?,
            mla: None,
        })
    }

    fn linear(
        &self,
        gpu: &Gpu,
        x: &DeviceTensor<bf16>,
        xq: &mut DeviceTensor<E4M3>,
        xs: &mut DeviceTensor<f32>,
        lin: &DeviceLinear,
        out: &mut DeviceTensor<bf16>,
    ) -> Result<()> {
        quant::quantize_activations(gpu, x, &mut *xq, &mut *xs, ScaleFormat::F32)?;
        fp8_gemm::fp8_gemm(gpu, xq, xs, &lin.weight, &lin.scales, out, &self.options.gemm)
    }

    /// Runs the step: `x` [b, hidden] → `out` [b, hidden], appending each sequence's kv row to `kv_cache`
    /// [num_blocks, page, 576]. With `timed`, returns per-stage GPU times (this synchronizes at the end).
    ///
    /// The host copies in `batch` are validated here (lengths, every table entry the step reads); the device copies
    /// must hold the same values.
    ///
    /// Graph capture: yes, without `timed` (which synchronizes), once a step with the same block-table width, page
    /// size and MLA kernel has run outside the capture: the first such step allocates the workspace's MLA plan and
    /// partials. A replay recomputes the plan from the device lengths, so lengths, inputs, table and cache may change
    /// between replays; the host checks ran at capture only, and the kernels clamp lengths to the table and skip
    /// out-of-range pages.
    #[allow(clippy::too_many_arguments)]
    pub fn forward<'a>(
        &self,
        gpu: &Gpu,
        ws: &mut DecodeWorkspace,
        x: impl Into<TensorRef<'a, bf16>>,
        kv_cache: impl Into<TensorMut<'a, bf16>>,
        batch: &DecodeBatch,
        out: impl Into<TensorMut<'a, bf16>>,
        timed: bool,
    ) -> Result<Option<StageTimes>> {
        let (x, mut kv_cache, out) = (x.into(), kv_cache.into(), out.into());
        let c = &self.cfg;
        let b = ws.batch;
        // Everything that can reject the step is checked before the first launch: an error leaves `kv_cache` and
        // `out` untouched (only the workspace's scratch may have been written by an earlier failed step).
        if ws.cfg != *c {
            return Err(Error::InvalidConfig("the workspace was made for a layer of other dimensions".into()));
        }
        check_devices!(gpu, x, kv_cache, out, batch.block_table, batch.seqlens, batch.positions, ws.xn)?;
        let (heads, nope, rope_d, v_dim, latent) =
            (c.num_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank);
        let (qk, width) = (nope + rope_d, latent + rope_d);
        x.expect_shape("x", &[b, c.hidden])?;
        out.expect_shape("out", &[b, c.hidden])?;
        // The final residual add writes dense rows (the cache's density is checked with the MLA arguments below).
        out.require_dense("out")?;
        let [_, page, cache_width] = kv_cache.dims::<3>("kv_cache")?;
        if cache_width != width {
            return Err(Error::shape(
                "kv_cache",
                format!("[num_blocks, page, {width}]"),
                format!("{:?}", kv_cache.shape()),
            ));
        }
        batch.seqlens.expect_shape("seqlens", &[b])?;
        batch.positions.expect_shape("positions", &[b])?;
        if batch.seqlens_host.len() != b {
            return Err(Error::shape("seqlens_host", b, batch.seqlens_host.len()));
        }
        if let Some((i, &s)) = batch.seqlens_host.iter().enumerate().find(|(_, &s)| s < 1) {
            return Err(Error::IndexOutOfRange {
                arg: "seqlens",
                position: i,
                value: s as i64,
                bound: i32::MAX as i64,
            });
        }
        let mla_cfg =
            MlaConfig { batch: b, s_q: 1, heads, page_size: page, softmax_scale: c.softmax_scale(), causal: true };
        let [_, max_blocks] = batch.block_table.dims::<2>("block_table")?;
        if batch.block_table_host.len() != b.saturating_mul(max_blocks) {
            return Err(Error::shape("block_table_host", b.saturating_mul(max_blocks), batch.block_table_host.len()));
        }
        // Every table entry the step reads, against the host lengths (the device plan cannot be checked on the host).
        let num_blocks = kv_cache.shape()[0];
        validate_inputs(b * heads * width, num_blocks * page, batch.block_table_host, batch.seqlens_host, &mla_cfg)?;
        let key = (page, max_blocks, self.options.mla_backend);
        if ws.mla.as_ref().is_none_or(|m| m.key != key) {
            ws.mla = None;
            let plan = MlaPlan::on_device(gpu, &mla_cfg, max_blocks, self.options.mla_backend)?;
            let mla_ws = MlaWorkspace::new(gpu, &plan, &mla_cfg)?;
            ws.mla = Some(MlaState { key, plan, ws: mla_ws });
        }
        let state = ws.mla.as_mut().ok_or_else(|| Error::InvalidConfig("no MLA plan".into()))?;
        let positions_host: Vec<i32> = batch.seqlens_host.iter().map(|&s| s - 1).collect();
        let seq_ids_host: Vec<i32> = (0..b as i32).collect();
        let eps = c.rms_norm_eps;
        // Views are reshaped below; a call that failed half-way may have left one reshaped.
        ws.q.set_shape(&[b, heads * qk])?;
        ws.q_mla.set_shape(&[b, 1, heads, width])?;
        ws.o_latent.set_shape(&[b, 1, heads, latent])?;
        ws.o.set_shape(&[b, heads, v_dim])?;
        let mla_opts = MlaOptions { block_table_host: None, backend: self.options.mla_backend };
        mla::check_decode(
            gpu,
            &ws.q_mla.as_tensor_ref(),
            &kv_cache.as_tensor_ref(),
            &batch.block_table,
            &batch.seqlens,
            &state.plan,
            &mla_cfg,
            &ws.o_latent.as_tensor_mut(),
            &ws.lse.as_tensor_mut(),
            &state.ws,
            &mla_opts,
        )?;
        let mut marks = Marks::new(gpu, timed)?;

        decode_ops::rms_norm(gpu, x, &self.input_layernorm, &mut ws.xn, eps)?;
        self.linear(gpu, &ws.xn, &mut ws.xq, &mut ws.xs, &self.q_a, &mut ws.q_a)?;
        decode_ops::rms_norm(gpu, &ws.q_a, &self.q_a_layernorm, &mut ws.q_an, eps)?;
        self.linear(gpu, &ws.q_an, &mut ws.q_aq, &mut ws.q_as, &self.q_b, &mut ws.q)?;
        // xn is still quantized in xq/xs from q_a: kv_a reads the same codes.
        fp8_gemm::fp8_gemm(gpu, &ws.xq, &ws.xs, &self.kv_a.weight, &self.kv_a.scales, &mut ws.kv, &self.options.gemm)?;
        mark(gpu, &mut marks, "q/kv projections (FP8 GEMM)")?;

        decode_ops::rms_norm_prefix_inplace(gpu, &mut ws.kv, &self.kv_a_layernorm, eps)?;
        decode_ops::rope_inplace(
            gpu,
            &mut ws.q,
            batch.positions,
            &self.rope,
            RopeSlices { count: heads, stride: qk, offset: nope },
        )?;
        decode_ops::rope_inplace(
            gpu,
            &mut ws.kv,
            batch.positions,
            &self.rope,
            RopeSlices { count: 1, stride: width, offset: latent },
        )?;
        decode_ops::cache_append(
            gpu,
            &ws.kv,
            &mut kv_cache,
            batch.block_table,
            &ws.seq_ids,
            batch.positions,
            Some((batch.block_table_host, &seq_ids_host, &positions_host)),
        )?;
        ws.q.set_shape(&[b, heads, qk])?;
        ws.q_mla.set_shape(&[b, heads, width])?;
        let uk = HeadWeightStrides { offset: 0, head: (nope + v_dim) * latent, i: latent, j: 1 };
        decode_ops::head_bmm_windows(
            gpu,
            &ws.q,
            Columns { col: 0, len: nope },
            &self.kv_b,
            uk,
            &mut ws.q_mla,
            Columns { col: 0, len: latent },
        )?;
        decode_ops::copy_columns(gpu, &ws.q, nope, &mut ws.q_mla, latent, rope_d)?;
        ws.q.set_shape(&[b, heads * qk])?;
        ws.q_mla.set_shape(&[b, 1, heads, width])?;
        mark(gpu, &mut marks, "norm + RoPE + cache append + W_UK absorb")?;

        state.plan.update(gpu, batch.seqlens)?;
        mla::mla_decode(
            gpu,
            &ws.q_mla,
            &kv_cache,
            batch.block_table,
            batch.seqlens,
            &state.plan,
            &mla_cfg,
            &mut ws.o_latent,
            &mut ws.lse,
            &mut state.ws,
            &mla_opts,
        )?;
        mark(gpu, &mut marks, "MLA decode")?;

        ws.o_latent.set_shape(&[b, heads, latent])?;
        let uv = HeadWeightStrides { offset: nope * latent, head: (nope + v_dim) * latent, i: 1, j: latent };
        decode_ops::head_bmm(gpu, &ws.o_latent, &self.kv_b, uv, &mut ws.o)?;
        ws.o_latent.set_shape(&[b, 1, heads, latent])?;
        ws.o.set_shape(&[b, heads * v_dim])?;
        self.linear(gpu, &ws.o, &mut ws.oq, &mut ws.os, &self.o_proj, &mut ws.attn)?;
        ws.o.set_shape(&[b, heads, v_dim])?;
        mark(gpu, &mut marks, "W_UV + o_proj (FP8 GEMM)")?;

        decode_ops::add_rms_norm(gpu, &ws.attn, x, &mut ws.h, &self.post_attention_layernorm, &mut ws.hn, eps)?;
        moe::moe_forward(
            gpu,
            &self.router,
            &self.experts,
            Some(&self.shared),
            &ws.hn,
            Routing::gate(&self.gate_weight, Some(&self.bias)),
            &mut ws.moe,
            &mut ws.moe_out,
        )?;
        decode_ops::add(gpu, &ws.h, &ws.moe_out, out)?;
        mark(gpu, &mut marks, "MoE (router, experts, shared expert, combine)")?;

        let Some(m) = marks else { return Ok(None) };
        gpu.synchronize()?;
        let mut stages = Vec::new();
        for w in m.events.windows(2) {
            stages.push((w[1].0, w[0].1.elapsed_ms(&w[1].1)? as f64));
        }
        Ok(Some(StageTimes { stages }))
    }

    /// Test support: host copies of the intermediate tensors of the last [`Self::forward`] with this workspace (syncs),
    /// in the layout of [`crate::reference::layer::LayerTrace`], so a test can check each stage on its own instead
    /// of only the residual sum.
    #[doc(hidden)]
    pub fn last_intermediates(&self, gpu: &Gpu, ws: &DecodeWorkspace) -> Result<StepIntermediates> {
        let f32s =
            |t: &DeviceTensor<bf16>| -> Result<Vec<f32>> { Ok(t.to_host(gpu)?.iter().map(|v| v.to_f32()).collect()) };
        Ok(StepIntermediates {
            q_mla: f32s(&ws.q_mla)?,
            kv_row: f32s(&ws.kv)?,
            o_latent: f32s(&ws.o_latent)?,
            lse: ws.lse.to_host(gpu)?,
            attn: f32s(&ws.attn)?,
            h: f32s(&ws.h)?,
            moe_out: f32s(&ws.moe_out)?,
        })
    }

    /// Routing chosen in the last [`Self::forward`] with this workspace: `(topk_ids, topk_weights)` (syncs).
    pub fn last_routing(&self, gpu: &Gpu, ws: &DecodeWorkspace) -> Result<(Vec<i32>, Vec<f32>)> {
        Ok((ws.moe.topk_ids.to_host(gpu)?, ws.moe.topk_weights.to_host(gpu)?))
    }
}
