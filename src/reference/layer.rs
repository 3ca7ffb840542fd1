//! The decode step of one DeepSeek-V3 MoE layer on the CPU, composed of the op references, with activations rounded
//! to bf16 and quantized to FP8 at exactly the points where the GPU path ([`crate::layer`]) does:
//!
//! ```text
//! xn   = rms_norm(x) · input_layernorm                                  (bf16)
//! q    = q_b(rms_norm(q_a(xn)))      [b, h, 128 nope | 64 rope]           (FP8 GEMMs, bf16 out)
//! kv   = kv_a(xn)                    [b, 512 latent | 64 rope]; latent ← rms_norm(latent)
//! rope(q_rope), rope(k_rope) at position seqlen − 1; kv appended to the paged cache
//! q_mla = [q_nope · W_UK_h | q_rope]  [b, h, 576]                         (W_UK absorbed, bf16 bmm)
//! o_lat = MLA decode over the cache  [b, h, 512]
//! attn = o_proj(o_lat · W_UV_h)                                           (bf16 bmm, FP8 GEMM)
//! h    = x + attn;  hn = rms_norm(h) · post_attention_layernorm
//! out  = h + MoE(hn)                 (sigmoid router with bias, 8 of 256 experts + the shared expert)
//! ```

use half::bf16;

use crate::error::{Error, Result};
use crate::model::{DeepSeekV3Config, FfnWeights, Fp8Linear, LayerWeights, MlaWeights, MlpWeights};
use crate::reference::decode_ops::{self, RopeConfig};
use crate::reference::mla::{self, MlaConfig};
use crate::reference::moe::{self, ExpertsFp8, RouterConfig, Scoring};
use crate::reference::{fp8_gemm, quant};

/// Rounds every element to bf16 (what storing a GPU activation does).
pub fn round_bf16(v: &mut [f32]) {
    for x in v {
        *x = bf16::from_f32(*x).to_f32();
    }
}

fn bf16_to_f32(v: &[bf16]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

/// The rotary configuration of `cfg`.
pub fn rope_config(cfg: &DeepSeekV3Config) -> RopeConfig {
    RopeConfig {
        dim: cfg.qk_rope_head_dim,
        theta: cfg.rope_theta as f64,
        factor: cfg.rope_factor as f64,
        original_max_position: cfg.original_max_position_embeddings as f64,
        beta_fast: cfg.rope_beta_fast as f64,
        beta_slow: cfg.rope_beta_slow as f64,
        mscale: cfg.rope_mscale as f64,
        mscale_all_dim: cfg.rope_mscale_all_dim as f64,
    }
}

/// The router configuration of `cfg`.
pub fn router_config(cfg: &DeepSeekV3Config) -> RouterConfig {
    RouterConfig {
        num_experts: cfg.n_routed_experts,
        top_k: cfg.top_k,
        num_groups: cfg.n_group,
        topk_groups: cfg.topk_group,
        scoring: Scoring::Sigmoid,
        renormalize: cfg.norm_topk_prob,
        routed_scaling_factor: cfg.routed_scaling_factor,
    }
}

/// A layer's weights rearranged for the decode step: experts fused into the grouped-GEMM layout ([E, 2I, H] gate
/// then up rows) and kv_b_proj dequantized to bf16 for the W_UK / W_UV products (as DeepSeek's inference does).
#[derive(Debug, Clone)]
pub struct PreparedLayer {
    /// Dimensions.
    pub cfg: DeepSeekV3Config,
    /// `input_layernorm.weight`.
    pub input_layernorm: Vec<bf16>,
    /// Attention weights (kv_b_proj kept for reference; see [`Self::kv_b_bf16`]).
    pub attn: MlaWeights,
    /// kv_b_proj dequantized and rounded to bf16, `[heads · (nope + v), kv_lora_rank]`.
    pub kv_b_bf16: Vec<bf16>,
    /// `post_attention_layernorm.weight`.
    pub post_attention_layernorm: Vec<bf16>,
    /// Router weight `[E, hidden]`.
    pub gate_weight: Vec<bf16>,
    /// Router selection bias `[E]`.
    pub e_score_correction_bias: Vec<f32>,
    /// Routed experts in the grouped layout.
    pub experts: ExpertsFp8,
    /// The shared expert as a one-expert group.
    pub shared: ExpertsFp8,
}

fn fuse_experts(ffns: Vec<FfnWeights>, hidden: usize, intermediate: usize) -> Result<ExpertsFp8> {
    let e = ffns.len();
    let mut w13 = Vec::with_capacity(e * 2 * intermediate * hidden);
    let mut w13_scales = Vec::new();
    let mut w2 = Vec::with_capacity(e * hidden * intermediate);
    let mut w2_scales = Vec::new();
    for (i, f) in ffns.into_iter().enumerate() {
        for (name, lin, n, k) in [
            ("gate_proj", &f.gate_proj, intermediate, hidden),
            ("up_proj", &f.up_proj, intermediate, hidden),
            ("down_proj", &f.down_proj, hidden, intermediate),
        ] {
            if (lin.n, lin.k) != (n, k) {
                return Err(Error::shape(
                    "expert",
                    format!("{name} of expert {i}: [{n}, {k}]"),
                    format!("[{}, {}]", lin.n, lin.k),
                ));
            }
        }
        let FfnWeights { gate_proj, up_proj, down_proj } = f;
        w13.extend_from_slice(&gate_proj.weight);
        w13.extend_from_slice(&up_proj.weight);
        w13_scales.extend_from_slice(&gate_proj.weight_scale_inv);
        w13_scales.extend_from_slice(&up_proj.weight_scale_inv);
        w2.extend_from_slice(&down_proj.weight);
        w2_scales.extend_from_slice(&down_proj.weight_scale_inv);
    }
    Ok(ExpertsFp8 { num_experts: e, hidden, intermediate, w13, w13_scales, w2, w2_scales })
}

impl PreparedLayer {
    /// Rearranges `w` (consumed, so that a full-size layer is not held twice). Dense layers are rejected.
    pub fn new(cfg: &DeepSeekV3Config, w: LayerWeights) -> Result<Self> {
        cfg.validate()?;
        if cfg.qk_rope_head_dim + cfg.kv_lora_rank != 576 || cfg.kv_lora_rank != 512 {
            return Err(Error::InvalidConfig("the MLA kernels need kv_lora_rank 512 and a 64-wide RoPE key".into()));
        }
        if !cfg.moe_intermediate.is_multiple_of(128) || !cfg.hidden.is_multiple_of(128) {
            return Err(Error::InvalidConfig("hidden and moe_intermediate must be multiples of 128".into()));
        }
        let LayerWeights { input_layernorm, self_attn, post_attention_layernorm, mlp, .. } = w;
        let MlpWeights::Moe(moe_w) = mlp else {
            return Err(Error::InvalidConfig(format!(
                "layer is dense (layers below first_k_dense = {}); the decode step supports MoE layers",
                cfg.first_k_dense
            )));
        };
        let mut kv_b = self_attn.kv_b_proj.dequantize();
        round_bf16(&mut kv_b);
        let kv_b_bf16 = kv_b.iter().map(|&v| bf16::from_f32(v)).collect();
        let experts = fuse_experts(moe_w.experts, cfg.hidden, cfg.moe_intermediate)?;
        let shared = fuse_experts(vec![moe_w.shared_experts], cfg.hidden, cfg.shared_intermediate())?;
        Ok(PreparedLayer {
            cfg: cfg.clone(),
            input_layernorm,
            attn: self_attn,
            kv_b_bf16,
            post_attention_layernorm,
            gate_weight: moe_w.gate_weight,
            e_score_correction_bias: moe_w.e_score_correction_bias,
            experts,
            shared,
        })
    }
}

/// The paged cache and per-sequence state of a decode step. `seqlens[i]` counts the new token, which is written at
/// position `seqlens[i] − 1`.
#[derive(Debug, Clone, Copy)]
pub struct DecodeStep<'a> {
    /// `[batch, max_blocks]` page ids.
    pub block_table: &'a [i32],
    /// Pages per sequence in the table.
    pub max_blocks: usize,
    /// Context lengths including the new token, all ≥ 1.
    pub seqlens: &'a [i32],
    /// Tokens per page.
    pub page_size: usize,
}

/// Everything the reference computes, for stage-by-stage comparison.
#[derive(Debug, Clone)]
pub struct LayerTrace {
    /// `[b, h, 576]` query fed to MLA.
    pub q_mla: Vec<f32>,
    /// `[b, 576]` new cache rows.
    pub kv_row: Vec<f32>,
    /// `[b, h, 512]` attention output in the latent space.
    pub o_latent: Vec<f32>,
    /// `[b, h]` log-sum-exp of the attention.
    pub lse: Vec<f32>,
    /// `[b, hidden]` the attention branch (o_proj output, bf16).
    pub attn: Vec<f32>,
    /// `[b, hidden]` residual after attention.
    pub h: Vec<f32>,
    /// `[b, top_k]` routed experts.
    pub topk_ids: Vec<i32>,
    /// `[b, top_k]` their weights.
    pub topk_weights: Vec<f32>,
    /// `[b, hidden]` the MoE branch (routed experts combined with the shared expert, bf16).
    pub moe_out: Vec<f32>,
    /// `[b, hidden]` the layer's output.
    pub out: Vec<f32>,
}

/// An FP8 linear on bf16 activations: per-1×128 quantization, block-scaled GEMM, bf16 out.
pub fn fp8_linear(x: &[f32], m: usize, lin: &Fp8Linear) -> Result<Vec<f32>> {
    let (q, s) = quant::quantize_per_token_group(x, m, lin.k, 128)?;
    let mut y = fp8_gemm::fp8_gemm(&q, &s, &lin.weight, &lin.weight_scale_inv, m, lin.n, lin.k)?;
    round_bf16(&mut y);
    Ok(y)
}

fn rms(x: &[f32], weight: &[bf16], rows: usize, eps: f32) -> Result<Vec<f32>> {
    let mut y = decode_ops::rms_norm(x, &bf16_to_f32(weight), rows, eps)?;
    round_bf16(&mut y);
    Ok(y)
}

/// The MoE half of a layer for the residual `h` [b, hidden] (bf16 values as f32).
#[derive(Debug, Clone)]
pub struct MoeBranch {
    /// `[b, top_k]` routed experts.
    pub topk_ids: Vec<i32>,
    /// `[b, top_k]` their weights.
    pub topk_weights: Vec<f32>,
    /// `[b, hidden]` the branch's output (routed experts + shared expert), added to `h` by the layer.
    pub moe_out: Vec<f32>,
}

/// Post-attention RMSNorm, router (with the selection bias), routed experts and shared expert on `h` [b, hidden].
/// [`decode_layer`] runs this on its own residual; a caller can run it on a GPU's residual to check the MoE half
/// alone (routing near-ties then resolve the same way on both sides).
pub fn moe_branch(layer: &PreparedLayer, h: &[f32], b: usize) -> Result<MoeBranch> {
    let cfg = &layer.cfg;
    if h.len() != b * cfg.hidden {
        return Err(Error::shape("h", format!("[{b}, {}]", cfg.hidden), h.len()));
    }
    let hn = rms(h, &layer.post_attention_layernorm, b, cfg.rms_norm_eps)?;
    let router = router_config(cfg);
    let logits = moe::gate_logits(&hn, &bf16_to_f32(&layer.gate_weight), b, cfg.n_routed_experts, cfg.hidden)?;
    let (topk_ids, topk_weights) = moe::route(&logits, Some(&layer.e_score_correction_bias), b, &router)?;
    let moe_out =
        moe::moe_forward_fp8(&hn, b, &topk_ids, &topk_weights, cfg.top_k, &layer.experts, Some(&layer.shared))?;
    Ok(MoeBranch { topk_ids, topk_weights, moe_out })
}

/// Runs the decode step for `x` [b, hidden] (bf16 values as f32), appending each sequence's new kv row to
/// `kv_cache` [num_blocks, page, 576] in place.
pub fn decode_layer(layer: &PreparedLayer, x: &[f32], kv_cache: &mut [f32], step: &DecodeStep) -> Result<LayerTrace> {
    let cfg = &layer.cfg;
    let b = step.seqlens.len();
    let (hidden, heads) = (cfg.hidden, cfg.num_heads);
    let (nope, rope_d, v_dim, latent) = (cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank);
    let qk = nope + rope_d;
    let width = latent + rope_d;
    if x.len() != b * hidden {
        return Err(Error::shape("x", format!("[{b}, {hidden}]"), x.len()));
    }
    if step.block_table.len() != b * step.max_blocks {
        return Err(Error::shape("block_table", format!("[{b}, {}]", step.max_blocks), step.block_table.len()));
    }
    if let Some((i, &s)) = step.seqlens.iter().enumerate().find(|(_, &s)| s < 1) {
        return Err(Error::IndexOutOfRange { arg: "seqlens", position: i, value: s as i64, bound: i32::MAX as i64 });
    }
    let eps = cfg.rms_norm_eps;
    let positions: Vec<i32> = step.seqlens.iter().map(|&s| s - 1).collect();
    let rope_cfg = rope_config(cfg);

    // Attention projections.
    let xn = rms(x, &layer.input_layernorm, b, eps)?;
    let q_a = fp8_linear(&xn, b, &layer.attn.q_a_proj)?;
    let q_a = rms(&q_a, &layer.attn.q_a_layernorm, b, eps)?;
    let mut q = fp8_linear(&q_a, b, &layer.attn.q_b_proj)?; // [b, heads · 192]
    let mut kv = fp8_linear(&xn, b, &layer.attn.kv_a_proj_with_mqa)?; // [b, 576]
    for r in 0..b {
        let row = &mut kv[r * width..r * width + latent];
        let normed = rms(row, &layer.attn.kv_a_layernorm, 1, eps)?;
        row.copy_from_slice(&normed);
    }
    decode_ops::rope(&mut q, b, heads * qk, heads, qk, nope, &positions, &rope_cfg)?;
    decode_ops::rope(&mut kv, b, width, 1, width, latent, &positions, &rope_cfg)?;
    round_bf16(&mut q);
    round_bf16(&mut kv);
    let seq_ids: Vec<i32> = (0..b as i32).collect();
    decode_ops::cache_append(
        kv_cache,
        &kv,
        width,
        step.page_size,
        step.block_table,
        step.max_blocks,
        &seq_ids,
        &positions,
    )?;

    // Absorb W_UK: q_mla[:, h, :512] = q_nope[:, h] · W_UK_h, q_mla[:, h, 512:] = q_rope.
    let kv_b = bf16_to_f32(&layer.kv_b_bf16);
    let q_nope: Vec<f32> = (0..b * heads).flat_map(|r| q[r * qk..r * qk + nope].to_vec()).collect();
    let mut q_lat = decode_ops::head_bmm(&q_nope, &kv_b, b, heads, nope, latent, (nope + v_dim) * latent, latent, 1)?;
    round_bf16(&mut q_lat);
    let mut q_mla = vec![0f32; b * heads * width];
    for r in 0..b * heads {
        q_mla[r * width..r * width + latent].copy_from_slice(&q_lat[r * latent..(r + 1) * latent]);
        q_mla[r * width + latent..(r + 1) * width].copy_from_slice(&q[r * qk + nope..(r + 1) * qk]);
    }

    let mla_cfg = MlaConfig {
        batch: b,
        s_q: 1,
        heads,
        page_size: step.page_size,
        softmax_scale: cfg.softmax_scale(),
        causal: true,
    };
    let (mut o_latent, lse) = mla::mla_decode(&q_mla, kv_cache, step.block_table, step.seqlens, &mla_cfg)?;
    round_bf16(&mut o_latent);

    // W_UV, then o_proj, then the residual.
    let w_uv = &kv_b[nope * latent..];
    let mut o = decode_ops::head_bmm(&o_latent, w_uv, b, heads, latent, v_dim, (nope + v_dim) * latent, 1, latent)?;
    round_bf16(&mut o);
    let attn = fp8_linear(&o, b, &layer.attn.o_proj)?;
    let mut h: Vec<f32> = x.iter().zip(&attn).map(|(a, b)| a + b).collect();
    let attn_branch = attn;
    round_bf16(&mut h);
    let MoeBranch { topk_ids, topk_weights, moe_out } = moe_branch(layer, &h, b)?;
    let mut out: Vec<f32> = h.iter().zip(&moe_out).map(|(a, b)| a + b).collect();
    round_bf16(&mut out);
    Ok(LayerTrace { q_mla, kv_row: kv, o_latent, lse, attn: attn_branch, h, topk_ids, topk_weights, moe_out, out })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::synthetic_layer_weights;
    use crate::rng::SplitMix64;

    pub(crate) fn small_config() -> DeepSeekV3Config {
        DeepSeekV3Config::small()
    }

    #[test]
    fn small_layer_runs_and_is_causal_per_sequence() {
        let cfg = small_config();
        let layer = PreparedLayer::new(&cfg, synthetic_layer_weights(&cfg, cfg.first_k_dense, 7).unwrap()).unwrap();
        let (b, page, max_blocks) = (3usize, 16usize, 4usize);
        let mut rng = SplitMix64::new(11);
        let x: Vec<f32> = (0..b * cfg.hidden).map(|_| bf16::from_f32(rng.next_f32() * 2.0 - 1.0).to_f32()).collect();
        let cache0: Vec<f32> =
            (0..b * max_blocks * page * 576).map(|_| bf16::from_f32(rng.next_f32() - 0.5).to_f32()).collect();
        let table: Vec<i32> = (0..(b * max_blocks) as i32).rev().collect();
        let seqlens = [1, 17, 64];
        let step = DecodeStep { block_table: &table, max_blocks, seqlens: &seqlens, page_size: page };
        let mut cache = cache0.clone();
        let trace = decode_layer(&layer, &x, &mut cache, &step).unwrap();
        assert_eq!(trace.out.len(), b * cfg.hidden);
        assert!(trace.out.iter().all(|v| v.is_finite()));
        assert!(trace.topk_ids.iter().all(|&e| e >= 0 && (e as usize) < cfg.n_routed_experts));
        // Each token's output depends only on its own sequence: running sequence 1 alone gives the same row.
        let table1 = &table[max_blocks..2 * max_blocks];
        let step1 = DecodeStep { block_table: table1, max_blocks, seqlens: &seqlens[1..2], page_size: page };
        let mut cache1 = cache0.clone();
        let alone = decode_layer(&layer, &x[cfg.hidden..2 * cfg.hidden], &mut cache1, &step1).unwrap();
        assert_eq!(alone.out, trace.out[cfg.hidden..2 * cfg.hidden].to_vec());
        // The new kv row landed at position seqlen − 1 of its sequence.
        let pos = 16usize;
        let block = table1[pos / page] as usize;
        let slot = (block * page + pos % page) * 576;
        assert_eq!(&cache1[slot..slot + 576], &alone.kv_row[..]);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let cfg = small_config();
        let layer = PreparedLayer::new(&cfg, synthetic_layer_weights(&cfg, cfg.first_k_dense, 1).unwrap()).unwrap();
        let mut cache = vec![0f32; 4 * 16 * 576];
        let x = vec![0.5f32; cfg.hidden];
        let table = [0, 1, 2, 3];
        let ok = DecodeStep { block_table: &table, max_blocks: 4, seqlens: &[5], page_size: 16 };
        assert!(decode_layer(&layer, &x[1..], &mut cache, &ok).is_err());
        let zero = DecodeStep { seqlens: &[0], ..ok };
        assert!(decode_layer(&layer, &x, &mut cache, &zero).is_err());
        let too_long = DecodeStep { seqlens: &[65], ..ok };
        assert!(decode_layer(&layer, &x, &mut cache, &too_long).is_err());
        let bad_table = DecodeStep { block_table: &[0, 1, 2, 99], seqlens: &[64], ..ok };
        assert!(decode_layer(&layer, &x, &mut cache, &bad_table).is_err());
        let dense = synthetic_layer_weights(&cfg, 0, 1).unwrap();
        assert!(PreparedLayer::new(&cfg, dense).is_err());
    }
}
