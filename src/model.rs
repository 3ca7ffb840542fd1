//! DeepSeek-V3/R1 model dimensions, the names and shapes of one decoder layer's checkpoint tensors, the in-memory
//! form of one layer's weights, and deterministic synthetic weights with the real layout.
//!
//! The dimensions are those of the released DeepSeek-V3 / R1 `config.json` (the two models share the architecture).
//! Every linear layer of a decoder layer is stored as FP8 E4M3 with one f32 `weight_scale_inv` per 128×128 block:
//! despite its name, that value is the *multiplier* that dequantizes (`w ≈ q · weight_scale_inv`). The router
//! (`mlp.gate.weight`) and the RMSNorm weights are bf16, the router's `e_score_correction_bias` is f32.

use half::bf16;

use crate::error::{Error, Result};
use crate::fp8::E4M3;
use crate::rng::SplitMix64;

/// Side of the square weight-quantization block of DeepSeek's FP8 checkpoints (`weight_block_size = [128, 128]`).
pub const WEIGHT_BLOCK: usize = 128;

/// The architecture hyper-parameters of a DeepSeek-V3-style model.
///
/// Field names follow the model's `config.json` where one exists. [`DeepSeekV3Config::deepseek_v3`] (also
/// `Default`) is the real model; [`DeepSeekV3Config::reduced`] keeps the attention head dimensions (which decode
/// kernels are specialised for) and shrinks everything else, for tests.
#[derive(Debug, Clone, PartialEq)]
pub struct DeepSeekV3Config {
    /// Model (residual stream) width, `hidden_size`.
    pub hidden: usize,
    /// Number of decoder layers, `num_hidden_layers` (the MTP layer is not counted).
    pub num_layers: usize,
    /// Attention heads, `num_attention_heads`.
    pub num_heads: usize,
    /// Rank of the query down-projection, `q_lora_rank`.
    pub q_lora_rank: usize,
    /// Rank of the compressed KV latent, `kv_lora_rank` (what the MLA cache stores per token, besides the rope key).
    pub kv_lora_rank: usize,
    /// Per-head query/key dimension without rotary embedding, `qk_nope_head_dim`.
    pub qk_nope_head_dim: usize,
    /// Per-head (and shared, for the key) rotary dimension, `qk_rope_head_dim`.
    pub qk_rope_head_dim: usize,
    /// Per-head value dimension, `v_head_dim`.
    pub v_head_dim: usize,
    /// Intermediate width of one routed expert, `moe_intermediate_size`.
    pub moe_intermediate: usize,
    /// Routed experts per MoE layer, `n_routed_experts`.
    pub n_routed_experts: usize,
    /// Shared experts per MoE layer, `n_shared_experts` (stored as one MLP of width `n_shared · moe_intermediate`).
    pub n_shared_experts: usize,
    /// Routed experts per token, `num_experts_per_tok`.
    pub top_k: usize,
    /// Expert groups for group-limited routing, `n_group`.
    pub n_group: usize,
    /// Groups kept per token, `topk_group`.
    pub topk_group: usize,
    /// Multiplier applied to the routed experts' combined output, `routed_scaling_factor`.
    pub routed_scaling_factor: f32,
    /// Whether the top-k routing weights are renormalised to sum to one, `norm_topk_prob`.
    pub norm_topk_prob: bool,
    /// Layers `0..first_k_dense` use a dense MLP instead of MoE, `first_k_dense_replace`.
    pub first_k_dense: usize,
    /// Intermediate width of the dense MLP, `intermediate_size`.
    pub dense_intermediate: usize,
    /// Vocabulary size (not used by a single layer; kept for completeness).
    pub vocab_size: usize,
    /// RMSNorm epsilon, `rms_norm_eps`.
    pub rms_norm_eps: f32,
    /// Rotary base, `rope_theta`.
    pub rope_theta: f32,
    /// YaRN context-extension factor, `rope_scaling.factor`.
    pub rope_factor: f32,
    /// YaRN `rope_scaling.mscale`.
    pub rope_mscale: f32,
    /// YaRN `rope_scaling.mscale_all_dim`: enters the softmax scale (see [`Self::softmax_scale`]).
    pub rope_mscale_all_dim: f32,
    /// YaRN `rope_scaling.beta_fast`.
    pub rope_beta_fast: f32,
    /// YaRN `rope_scaling.beta_slow`.
    pub rope_beta_slow: f32,
    /// Pre-extension context length, `rope_scaling.original_max_position_embeddings`.
    pub original_max_position_embeddings: usize,
    /// Side of the FP8 weight-quantization block, `quantization_config.weight_block_size`.
    pub weight_block: usize,
}

impl Default for DeepSeekV3Config {
    fn default() -> Self {
        Self::deepseek_v3()
    }
}

/// Storage type of a checkpoint tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TensorDtype {
    /// FP8 E4M3 (`F8_E4M3` in safetensors).
    F8E4M3,
    /// bfloat16 (`BF16`).
    Bf16,
    /// IEEE f32 (`F32`).
    F32,
}

impl TensorDtype {
    /// The safetensors spelling.
    pub fn safetensors_name(self) -> &'static str {
        match self {
            TensorDtype::F8E4M3 => "F8_E4M3",
            TensorDtype::Bf16 => "BF16",
            TensorDtype::F32 => "F32",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            TensorDtype::F8E4M3 => 1,
            TensorDtype::Bf16 => 2,
            TensorDtype::F32 => 4,
        }
    }
}

/// Name, dtype and shape of one checkpoint tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// Full checkpoint name, e.g. `model.layers.3.self_attn.q_a_proj.weight`.
    pub name: String,
    /// Storage type.
    pub dtype: TensorDtype,
    /// Shape, row-major.
    pub shape: Vec<usize>,
}

/// One FP8 linear layer of a decoder layer: the name prefix (without `.weight`) and `[n, k]` (out, in features).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinearSpec {
    /// E.g. `model.layers.3.mlp.experts.17.down_proj`.
    pub prefix: String,
    /// Output features (weight rows).
    pub n: usize,
    /// Input features (weight columns).
    pub k: usize,
}

/// `model.layers.{layer}.`
pub fn layer_prefix(layer: usize) -> String {
    format!("model.layers.{layer}.")
}

impl DeepSeekV3Config {
    /// The released DeepSeek-V3 / R1 dimensions.
    pub fn deepseek_v3() -> Self {
        DeepSeekV3Config {
            hidden: 7168,
            num_layers: 61,
            num_heads: 128,
            q_lora_rank: 1536,
            kv_lora_rank: 512,
            qk_nope_head_dim: 128,
            qk_rope_head_dim: 64,
            v_head_dim: 128,
            moe_intermediate: 2048,
            n_routed_experts: 256,
            n_shared_experts: 1,
            top_k: 8,
            n_group: 8,
            topk_group: 4,
            routed_scaling_factor: 2.5,
            norm_topk_prob: true,
            first_k_dense: 3,
            dense_intermediate: 18432,
            vocab_size: 129280,
            rms_norm_eps: 1e-6,
            rope_theta: 10000.0,
            rope_factor: 40.0,
            rope_mscale: 1.0,
            rope_mscale_all_dim: 1.0,
            rope_beta_fast: 32.0,
            rope_beta_slow: 1.0,
            original_max_position_embeddings: 4096,
            weight_block: WEIGHT_BLOCK,
        }
    }

    /// Small dimensions for tests: the per-head attention dimensions (128 nope + 64 rope, latent 512, value 128)
    /// and the routing rules stay as in the real model, everything else shrinks. Several dimensions are deliberately
    /// not multiples of 128 (`q_lora_rank` 192, `moe_intermediate` 192, and `kv_lora_rank + qk_rope_head_dim` = 576
    /// as in the real model), so partial scale blocks are exercised. Fields are public: adjust with struct-update
    /// syntax and call [`Self::validate`].
    pub fn reduced() -> Self {
        DeepSeekV3Config {
            hidden: 256,
            num_layers: 4,
            num_heads: 2,
            q_lora_rank: 192,
            moe_intermediate: 192,
            n_routed_experts: 8,
            n_shared_experts: 1,
            top_k: 2,
            n_group: 4,
            topk_group: 2,
            first_k_dense: 1,
            dense_intermediate: 384,
            vocab_size: 1024,
            ..Self::deepseek_v3()
        }
    }

    /// Small dimensions that every GPU kernel of the decode step accepts (hidden and intermediate multiples of 128,
    /// 16 heads, the real 576-wide MLA latent), for tests and the example's short mode.
    pub fn small() -> Self {
        DeepSeekV3Config {
            hidden: 512,
            num_layers: 4,
            num_heads: 16,
            q_lora_rank: 256,
            moe_intermediate: 256,
            n_routed_experts: 16,
            n_shared_experts: 1,
            top_k: 4,
            n_group: 4,
            topk_group: 2,
            first_k_dense: 1,
            dense_intermediate: 512,
            vocab_size: 1024,
            ..Self::deepseek_v3()
        }
    }

    /// Checks the relations the layer relies on (non-zero dimensions, routing parameters that can be satisfied).
    pub fn validate(&self) -> Result<()> {
        let dims = [
            ("hidden", self.hidden),
            ("num_heads", self.num_heads),
            ("q_lora_rank", self.q_lora_rank),
            ("kv_lora_rank", self.kv_lora_rank),
            ("qk_nope_head_dim", self.qk_nope_head_dim),
            ("qk_rope_head_dim", self.qk_rope_head_dim),
            ("v_head_dim", self.v_head_dim),
            ("moe_intermediate", self.moe_intermediate),
            ("n_routed_experts", self.n_routed_experts),
            ("top_k", self.top_k),
            ("n_group", self.n_group),
            ("topk_group", self.topk_group),
            ("dense_intermediate", self.dense_intermediate),
            ("weight_block", self.weight_block),
        ];
        for (name, v) in dims {
            if v == 0 {
                return Err(Error::InvalidConfig(format!("{name} must be positive")));
            }
        }
        if !self.qk_rope_head_dim.is_multiple_of(2) {
            return Err(Error::InvalidConfig(format!(
                "qk_rope_head_dim must be even (rotary pairs), got {}",
                self.qk_rope_head_dim
            )));
        }
        if !self.n_routed_experts.is_multiple_of(self.n_group) {
            return Err(Error::InvalidConfig(format!(
                "n_routed_experts ({}) must be a multiple of n_group ({})",
                self.n_routed_experts, self.n_group
            )));
        }
        if self.topk_group > self.n_group {
            return Err(Error::InvalidConfig(format!(
                "topk_group ({}) exceeds n_group ({})",
                self.topk_group, self.n_group
            )));
        }
        if self.top_k > self.topk_group * self.experts_per_group() {
            return Err(Error::InvalidConfig(format!(
                "top_k ({}) exceeds the experts in the kept groups ({} groups × {})",
                self.top_k,
                self.topk_group,
                self.experts_per_group()
            )));
        }
        if self.first_k_dense > self.num_layers {
            return Err(Error::InvalidConfig(format!(
                "first_k_dense ({}) exceeds num_layers ({})",
                self.first_k_dense, self.num_layers
            )));
        }
        if self.rms_norm_eps.is_nan() || self.rms_norm_eps <= 0.0 || !self.routed_scaling_factor.is_finite() {
            return Err(Error::InvalidConfig("rms_norm_eps must be positive and routed_scaling_factor finite".into()));
        }
        Ok(())
    }

    /// Query/key head dimension, nope + rope (192 for V3).
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// Width of one token's MLA cache entry: latent + rope key (576 for V3).
    pub fn kv_cache_dim(&self) -> usize {
        self.kv_lora_rank + self.qk_rope_head_dim
    }

    /// Experts per routing group (32 for V3).
    pub fn experts_per_group(&self) -> usize {
        self.n_routed_experts / self.n_group.max(1)
    }

    /// Intermediate width of the shared-expert MLP (`n_shared_experts · moe_intermediate`).
    pub fn shared_intermediate(&self) -> usize {
        self.n_shared_experts * self.moe_intermediate
    }

    /// True when `layer` has an MoE block (false for the first `first_k_dense` dense layers).
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        layer >= self.first_k_dense
    }

    /// YaRN attention-temperature factor: `0.1 · mscale_all_dim · ln(factor) + 1` (1 when the factor is ≤ 1).
    pub fn yarn_mscale(&self) -> f32 {
        if self.rope_factor <= 1.0 {
            1.0
        } else {
            0.1 * self.rope_mscale_all_dim * self.rope_factor.ln() + 1.0
        }
    }

    /// Attention softmax scale: `qk_head_dim^-0.5 · mscale²` (≈ 0.1352 for V3, against 0.0722 without YaRN).
    pub fn softmax_scale(&self) -> f32 {
        let m = self.yarn_mscale();
        (self.qk_head_dim() as f32).powf(-0.5) * m * m
    }

    /// Shape `[ceil(n / block), ceil(k / block)]` of an `[n, k]` weight's `weight_scale_inv`.
    pub fn scale_shape(&self, n: usize, k: usize) -> [usize; 2] {
        [n.div_ceil(self.weight_block), k.div_ceil(self.weight_block)]
    }

    /// The FP8 linear layers of `layer`, in checkpoint order (attention, then MLP; experts by index).
    pub fn layer_linears(&self, layer: usize) -> Vec<LinearSpec> {
        let p = layer_prefix(layer);
        let h = self.num_heads;
        let lin = |name: String, n: usize, k: usize| LinearSpec { prefix: format!("{p}{name}"), n, k };
        let mut out = vec![
            lin("self_attn.q_a_proj".into(), self.q_lora_rank, self.hidden),
            lin("self_attn.q_b_proj".into(), h * self.qk_head_dim(), self.q_lora_rank),
            lin("self_attn.kv_a_proj_with_mqa".into(), self.kv_cache_dim(), self.hidden),
            lin("self_attn.kv_b_proj".into(), h * (self.qk_nope_head_dim + self.v_head_dim), self.kv_lora_rank),
            lin("self_attn.o_proj".into(), self.hidden, h * self.v_head_dim),
        ];
        let mut ffn = |base: String, inter: usize| {
            out.push(lin(format!("{base}.gate_proj"), inter, self.hidden));
            out.push(lin(format!("{base}.up_proj"), inter, self.hidden));
            out.push(lin(format!("{base}.down_proj"), self.hidden, inter));
        };
        if self.is_moe_layer(layer) {
            for e in 0..self.n_routed_experts {
                ffn(format!("mlp.experts.{e}"), self.moe_intermediate);
            }
            ffn("mlp.shared_experts".into(), self.shared_intermediate());
        } else {
            ffn("mlp".into(), self.dense_intermediate);
        }
        out
    }

    /// Every tensor of `layer` as stored in the checkpoint: name, dtype, shape.
    pub fn layer_tensor_specs(&self, layer: usize) -> Vec<TensorSpec> {
        let p = layer_prefix(layer);
        let spec = |name: String, dtype, shape: Vec<usize>| TensorSpec { name, dtype, shape };
        let mut out = vec![
            spec(format!("{p}input_layernorm.weight"), TensorDtype::Bf16, vec![self.hidden]),
            spec(format!("{p}self_attn.q_a_layernorm.weight"), TensorDtype::Bf16, vec![self.q_lora_rank]),
            spec(format!("{p}self_attn.kv_a_layernorm.weight"), TensorDtype::Bf16, vec![self.kv_lora_rank]),
            spec(format!("{p}post_attention_layernorm.weight"), TensorDtype::Bf16, vec![self.hidden]),
        ];
        if self.is_moe_layer(layer) {
            out.push(spec(format!("{p}mlp.gate.weight"), TensorDtype::Bf16, vec![self.n_routed_experts, self.hidden]));
            out.push(spec(
                format!("{p}mlp.gate.e_score_correction_bias"),
                TensorDtype::F32,
                vec![self.n_routed_experts],
            ));
        }
        for l in self.layer_linears(layer) {
            out.push(spec(format!("{}.weight", l.prefix), TensorDtype::F8E4M3, vec![l.n, l.k]));
            out.push(spec(
                format!("{}.weight_scale_inv", l.prefix),
                TensorDtype::F32,
                self.scale_shape(l.n, l.k).to_vec(),
            ));
        }
        out
    }

    /// Total bytes of `layer`'s tensors in the checkpoint (≈ 11.4 GB for a V3 MoE layer).
    pub fn layer_bytes(&self, layer: usize) -> u64 {
        self.layer_tensor_specs(layer)
            .iter()
            .map(|s| s.shape.iter().product::<usize>() as u64 * s.dtype.size() as u64)
            .sum()
    }
}

/// An FP8 block-scaled linear layer `[n, k]` (out × in), as stored in DeepSeek's checkpoints.
#[derive(Debug, Clone, PartialEq)]
pub struct Fp8Linear {
    /// Output features.
    pub n: usize,
    /// Input features.
    pub k: usize,
    /// Codes, row-major `[n, k]`.
    pub weight: Vec<E4M3>,
    /// Dequantization multipliers, row-major `[ceil(n/128), ceil(k/128)]`: `w[i][j] ≈ weight[i][j] ·
    /// weight_scale_inv[i/128][j/128]`.
    pub weight_scale_inv: Vec<f32>,
}

impl Fp8Linear {
    /// Wraps codes and scales, checking both lengths (128×128 blocks).
    pub fn new(n: usize, k: usize, weight: Vec<E4M3>, weight_scale_inv: Vec<f32>) -> Result<Self> {
        let numel =
            n.checked_mul(k).ok_or_else(|| Error::shape("weight", "n·k that fits in usize", format!("{n}×{k}")))?;
        if weight.len() != numel {
            return Err(Error::shape("weight", format!("[{n}, {k}] = {numel} elements"), weight.len()));
        }
        let [nb, kb] = [n.div_ceil(WEIGHT_BLOCK), k.div_ceil(WEIGHT_BLOCK)];
        if weight_scale_inv.len() != nb * kb {
            return Err(Error::shape(
                "weight_scale_inv",
                format!("[{nb}, {kb}] = {} elements", nb * kb),
                weight_scale_inv.len(),
            ));
        }
        Ok(Fp8Linear { n, k, weight, weight_scale_inv })
    }

    /// Shape of `weight_scale_inv`.
    pub fn scale_shape(&self) -> [usize; 2] {
        [self.n.div_ceil(WEIGHT_BLOCK), self.k.div_ceil(WEIGHT_BLOCK)]
    }

    /// The dequantized weight, row-major `[n, k]` f32.
    pub fn dequantize(&self) -> Vec<f32> {
        let kb = self.k.div_ceil(WEIGHT_BLOCK);
        let mut out = Vec::with_capacity(self.weight.len());
        for r in 0..self.n {
            let srow = &self.weight_scale_inv[(r / WEIGHT_BLOCK) * kb..(r / WEIGHT_BLOCK + 1) * kb];
            for (c, q) in self.weight[r * self.k..(r + 1) * self.k].iter().enumerate() {
                out.push(q.to_f32() * srow[c / WEIGHT_BLOCK]);
            }
        }
        out
    }
}

/// The MLA attention block's weights.
#[derive(Debug, Clone, PartialEq)]
pub struct MlaWeights {
    /// `self_attn.q_a_proj`: `[q_lora_rank, hidden]`.
    pub q_a_proj: Fp8Linear,
    /// `self_attn.q_a_layernorm.weight`: `[q_lora_rank]`.
    pub q_a_layernorm: Vec<bf16>,
    /// `self_attn.q_b_proj`: `[heads · (nope + rope), q_lora_rank]`, per head the nope rows then the rope rows.
    pub q_b_proj: Fp8Linear,
    /// `self_attn.kv_a_proj_with_mqa`: `[kv_lora_rank + rope, hidden]`, latent rows then the shared rope-key rows.
    pub kv_a_proj_with_mqa: Fp8Linear,
    /// `self_attn.kv_a_layernorm.weight`: `[kv_lora_rank]`.
    pub kv_a_layernorm: Vec<bf16>,
    /// `self_attn.kv_b_proj`: `[heads · (nope + v), kv_lora_rank]`, per head W_UK rows then W_UV rows.
    pub kv_b_proj: Fp8Linear,
    /// `self_attn.o_proj`: `[hidden, heads · v]`.
    pub o_proj: Fp8Linear,
}

/// A SwiGLU MLP (`down(silu(gate(x)) · up(x))`): a dense layer, one routed expert or the shared expert.
#[derive(Debug, Clone, PartialEq)]
pub struct FfnWeights {
    /// `gate_proj`: `[inter, hidden]`.
    pub gate_proj: Fp8Linear,
    /// `up_proj`: `[inter, hidden]`.
    pub up_proj: Fp8Linear,
    /// `down_proj`: `[hidden, inter]`.
    pub down_proj: Fp8Linear,
}

/// The MoE block's weights.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeWeights {
    /// Router, `mlp.gate.weight`: `[n_routed_experts, hidden]` bf16.
    pub gate_weight: Vec<bf16>,
    /// Router bias used only for expert *selection*, `mlp.gate.e_score_correction_bias`: `[n_routed_experts]` f32.
    pub e_score_correction_bias: Vec<f32>,
    /// `mlp.experts.{e}`, indexed by expert.
    pub experts: Vec<FfnWeights>,
    /// `mlp.shared_experts`.
    pub shared_experts: FfnWeights,
}

/// The MLP half of a layer.
#[derive(Debug, Clone, PartialEq)]
pub enum MlpWeights {
    /// Layers below `first_k_dense`: one wide SwiGLU MLP (`mlp.{gate,up,down}_proj`).
    Dense(FfnWeights),
    /// Every other layer.
    Moe(MoeWeights),
}

/// One decoder layer's weights, with the checkpoint's structure.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerWeights {
    /// The layer index these came from (it only affects tensor names).
    pub layer: usize,
    /// `input_layernorm.weight`: `[hidden]`.
    pub input_layernorm: Vec<bf16>,
    /// `self_attn.*`.
    pub self_attn: MlaWeights,
    /// `post_attention_layernorm.weight`: `[hidden]`.
    pub post_attention_layernorm: Vec<bf16>,
    /// `mlp.*`.
    pub mlp: MlpWeights,
}

/// A borrowed view of one tensor of a [`LayerWeights`], for writing it out.
#[derive(Debug, Clone, Copy)]
pub enum TensorRef<'a> {
    /// FP8 codes.
    F8(&'a [E4M3]),
    /// bf16 values.
    Bf16(&'a [bf16]),
    /// f32 values.
    F32(&'a [f32]),
}

impl TensorRef<'_> {
    /// The dtype.
    pub fn dtype(&self) -> TensorDtype {
        match self {
            TensorRef::F8(_) => TensorDtype::F8E4M3,
            TensorRef::Bf16(_) => TensorDtype::Bf16,
            TensorRef::F32(_) => TensorDtype::F32,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            TensorRef::F8(x) => x.len(),
            TensorRef::Bf16(x) => x.len(),
            TensorRef::F32(x) => x.len(),
        }
    }

    /// True when there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Little-endian bytes, as safetensors stores them.
    pub fn to_le_bytes(&self) -> Vec<u8> {
        match self {
            TensorRef::F8(x) => bytemuck::cast_slice::<E4M3, u8>(x).to_vec(),
            TensorRef::Bf16(x) => x.iter().flat_map(|v| v.to_bits().to_le_bytes()).collect(),
            TensorRef::F32(x) => x.iter().flat_map(|v| v.to_bits().to_le_bytes()).collect(),
        }
    }
}

impl FfnWeights {
    fn push_tensors<'a>(&'a self, base: &str, out: &mut Vec<(String, Vec<usize>, TensorRef<'a>)>) {
        for (name, l) in [("gate_proj", &self.gate_proj), ("up_proj", &self.up_proj), ("down_proj", &self.down_proj)] {
            push_linear(&format!("{base}.{name}"), l, out);
        }
    }
}

fn push_linear<'a>(prefix: &str, l: &'a Fp8Linear, out: &mut Vec<(String, Vec<usize>, TensorRef<'a>)>) {
    out.push((format!("{prefix}.weight"), vec![l.n, l.k], TensorRef::F8(&l.weight)));
    out.push((format!("{prefix}.weight_scale_inv"), l.scale_shape().to_vec(), TensorRef::F32(&l.weight_scale_inv)));
}

impl LayerWeights {
    /// Every tensor with its checkpoint name and shape, in the same order as
    /// [`DeepSeekV3Config::layer_tensor_specs`].
    pub fn named_tensors(&self) -> Vec<(String, Vec<usize>, TensorRef<'_>)> {
        let p = layer_prefix(self.layer);
        let mut out = Vec::new();
        let a = &self.self_attn;
        out.push((
            format!("{p}input_layernorm.weight"),
            vec![self.input_layernorm.len()],
            TensorRef::Bf16(&self.input_layernorm),
        ));
        out.push((
            format!("{p}self_attn.q_a_layernorm.weight"),
            vec![a.q_a_layernorm.len()],
            TensorRef::Bf16(&a.q_a_layernorm),
        ));
        out.push((
            format!("{p}self_attn.kv_a_layernorm.weight"),
            vec![a.kv_a_layernorm.len()],
            TensorRef::Bf16(&a.kv_a_layernorm),
        ));
        out.push((
            format!("{p}post_attention_layernorm.weight"),
            vec![self.post_attention_layernorm.len()],
            TensorRef::Bf16(&self.post_attention_layernorm),
        ));
        if let MlpWeights::Moe(m) = &self.mlp {
            let e = m.e_score_correction_bias.len();
            out.push((
                format!("{p}mlp.gate.weight"),
                vec![e, m.gate_weight.len() / e.max(1)],
                TensorRef::Bf16(&m.gate_weight),
            ));
            out.push((
                format!("{p}mlp.gate.e_score_correction_bias"),
                vec![e],
                TensorRef::F32(&m.e_score_correction_bias),
            ));
        }
        push_linear(&format!("{p}self_attn.q_a_proj"), &a.q_a_proj, &mut out);
        push_linear(&format!("{p}self_attn.q_b_proj"), &a.q_b_proj, &mut out);
        push_linear(&format!("{p}self_attn.kv_a_proj_with_mqa"), &a.kv_a_proj_with_mqa, &mut out);
        push_linear(&format!("{p}self_attn.kv_b_proj"), &a.kv_b_proj, &mut out);
        push_linear(&format!("{p}self_attn.o_proj"), &a.o_proj, &mut out);
        match &self.mlp {
            MlpWeights::Dense(f) => f.push_tensors(&format!("{p}mlp"), &mut out),
            MlpWeights::Moe(m) => {
                for (e, f) in m.experts.iter().enumerate() {
                    f.push_tensors(&format!("{p}mlp.experts.{e}"), &mut out);
                }
                m.shared_experts.push_tensors(&format!("{p}mlp.shared_experts"), &mut out);
            }
        }
        out
    }

    /// Checks every tensor's name, dtype and shape against `cfg` (what a loader or writer should see).
    pub fn check_against(&self, cfg: &DeepSeekV3Config) -> Result<()> {
        let specs = cfg.layer_tensor_specs(self.layer);
        let have = self.named_tensors();
        if specs.len() != have.len() {
            return Err(Error::InvalidConfig(format!(
                "layer {} has {} tensors, the configuration describes {}",
                self.layer,
                have.len(),
                specs.len()
            )));
        }
        for (s, (name, shape, t)) in specs.iter().zip(&have) {
            let numel: usize = shape.iter().product();
            if &s.name != name || s.dtype != t.dtype() || &s.shape != shape || numel != t.len() {
                return Err(Error::InvalidConfig(format!(
                    "tensor `{}`: expected {} {:?}, got `{name}` {} {shape:?} with {} elements",
                    s.name,
                    s.dtype.safetensors_name(),
                    s.shape,
                    t.dtype().safetensors_name(),
                    t.len()
                )));
            }
        }
        Ok(())
    }
}

/// Standard deviation of synthetic linear weights (the usual initializer range of DeepSeek's configs).
pub const SYNTHETIC_WEIGHT_STD: f32 = 0.02;

/// Codes are drawn as `σ_code · N(0, 1)` rounded to E4M3, with the normal clamped to ±4.3σ (about the extreme of
/// 65 536 draws): at most 430 → code 416, so the codes use the E4M3 range without saturating, as block-quantized
/// weights do.
const CODE_STD: f32 = 100.0;

/// A 65 536-entry table of E4M3 codes of the sorted quantiles of `CODE_STD · N(0, 1)`: indexing it with 16 uniform
/// bits samples the quantized Gaussian in one lookup. Building it from sorted Box–Muller draws (not an inverse-CDF
/// formula) keeps it exact and reproducible.
fn gaussian_code_table() -> Vec<E4M3> {
    let mut rng = SplitMix64::new(0x5eed_c0de);
    let mut xs: Vec<f32> = (0..1 << 16).map(|_| rng.normal()).collect();
    xs.sort_by(|a, b| a.total_cmp(b));
    xs.iter().map(|&x| E4M3::from_f32(x.clamp(-4.3, 4.3) * CODE_STD)).collect()
}

fn synthetic_linear(table: &[E4M3], seed: u64, prefix: &str, n: usize, k: usize) -> Fp8Linear {
    let mut rng = SplitMix64::for_stream(seed, prefix);
    let mut weight = Vec::with_capacity(n * k);
    let mut bits = 0u64;
    for i in 0..n * k {
        if i % 4 == 0 {
            bits = rng.next_u64();
        }
        weight.push(table[(bits & 0xffff) as usize]);
        bits >>= 16;
    }
    // Per-block scales vary by ±20% around the value that gives the dequantized weights the target std, as the
    // per-block amax of real weights does.
    let blocks = n.div_ceil(WEIGHT_BLOCK) * k.div_ceil(WEIGHT_BLOCK);
    let weight_scale_inv =
        (0..blocks).map(|_| SYNTHETIC_WEIGHT_STD / CODE_STD * rng.uniform(0.8, 1.2)).collect::<Vec<f32>>();
    Fp8Linear { n, k, weight, weight_scale_inv }
}

fn synthetic_norm(seed: u64, name: &str, len: usize) -> Vec<bf16> {
    let mut rng = SplitMix64::for_stream(seed, name);
    (0..len).map(|_| bf16::from_f32(1.0 + 0.1 * rng.normal())).collect()
}

/// Deterministic synthetic weights for `layer` with the real layout and realistic magnitudes: FP8 linear weights
/// whose dequantized values are ≈ N(0, 0.02²) with per-128×128-block scales (the codes span the E4M3 range like
/// block-quantized weights), RMSNorm weights ≈ 1 ± 0.1, a router ≈ N(0, 0.02²) in bf16 and a small f32 correction
/// bias (≈ N(0, 0.01²)).
///
/// Every tensor comes from its own stream keyed by `(seed, tensor name)`, so the result does not depend on the
/// generation order; experts are generated on all cores (a full V3 MoE layer is ≈ 11.4 GB). The FP8 codes are drawn
/// from a quantized-Gaussian table rather than by quantizing f32 samples one by one, which would take minutes at full
/// size.
pub fn synthetic_layer_weights(cfg: &DeepSeekV3Config, layer: usize, seed: u64) -> Result<LayerWeights> {
    cfg.validate()?;
    let table = gaussian_code_table();
    let p = layer_prefix(layer);
    let lin = |name: &str, n: usize, k: usize| synthetic_linear(&table, seed, &format!("{p}{name}"), n, k);
    let ffn = |base: &str, inter: usize| FfnWeights {
        gate_proj: lin(&format!("{base}.gate_proj"), inter, cfg.hidden),
        up_proj: lin(&format!("{base}.up_proj"), inter, cfg.hidden),
        down_proj: lin(&format!("{base}.down_proj"), cfg.hidden, inter),
    };
    let h = cfg.num_heads;
    let self_attn = MlaWeights {
        q_a_proj: lin("self_attn.q_a_proj", cfg.q_lora_rank, cfg.hidden),
        q_a_layernorm: synthetic_norm(seed, &format!("{p}self_attn.q_a_layernorm.weight"), cfg.q_lora_rank),
        q_b_proj: lin("self_attn.q_b_proj", h * cfg.qk_head_dim(), cfg.q_lora_rank),
        kv_a_proj_with_mqa: lin("self_attn.kv_a_proj_with_mqa", cfg.kv_cache_dim(), cfg.hidden),
        kv_a_layernorm: synthetic_norm(seed, &format!("{p}self_attn.kv_a_layernorm.weight"), cfg.kv_lora_rank),
        kv_b_proj: lin("self_attn.kv_b_proj", h * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank),
        o_proj: lin("self_attn.o_proj", cfg.hidden, h * cfg.v_head_dim),
    };
    let mlp = if cfg.is_moe_layer(layer) {
        let mut rng = SplitMix64::for_stream(seed, &format!("{p}mlp.gate.weight"));
        let gate_weight = (0..cfg.n_routed_experts * cfg.hidden)
            .map(|_| bf16::from_f32(SYNTHETIC_WEIGHT_STD * rng.normal()))
            .collect();
        let mut rng = SplitMix64::for_stream(seed, &format!("{p}mlp.gate.e_score_correction_bias"));
        let e_score_correction_bias = (0..cfg.n_routed_experts).map(|_| 0.01 * rng.normal()).collect();
        let experts = parallel_map(cfg.n_routed_experts, |e| ffn(&format!("mlp.experts.{e}"), cfg.moe_intermediate));
        MlpWeights::Moe(MoeWeights {
            gate_weight,
            e_score_correction_bias,
            experts,
            shared_experts: ffn("mlp.shared_experts", cfg.shared_intermediate()),
        })
    } else {
        MlpWeights::Dense(ffn("mlp", cfg.dense_intermediate))
    };
    Ok(LayerWeights {
        layer,
        input_layernorm: synthetic_norm(seed, &format!("{p}input_layernorm.weight"), cfg.hidden),
        self_attn,
        post_attention_layernorm: synthetic_norm(seed, &format!("{p}post_attention_layernorm.weight"), cfg.hidden),
        mlp,
    })
}

/// `(0..n).map(f)` on all cores, results in index order.
fn parallel_map<T: Send>(n: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let threads = std::thread::available_parallelism().map(|t| t.get()).unwrap_or(1).clamp(1, n.max(1));
    if threads <= 1 {
        return (0..n).map(f).collect();
    }
    let f = &f;
    let mut slots: Vec<Option<T>> = (0..n).map(|_| None).collect();
    std::thread::scope(|s| {
        for (t, chunk) in slots.chunks_mut(n.div_ceil(threads)).enumerate() {
            let start = t * n.div_ceil(threads);
            s.spawn(move || {
                for (i, slot) in chunk.iter_mut().enumerate() {
                    *slot = Some(f(start + i));
                }
            });
        }
    });
    slots.into_iter().map(|s| s.expect("every slot is filled by its thread")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v3_dimensions() {
        let c = DeepSeekV3Config::deepseek_v3();
        c.validate().unwrap();
        assert_eq!(c.qk_head_dim(), 192);
        assert_eq!(c.kv_cache_dim(), 576);
        assert_eq!(c.experts_per_group(), 32);
        assert!(!c.is_moe_layer(2) && c.is_moe_layer(3));
        let m = 0.1 * 40f32.ln() + 1.0;
        assert!((c.yarn_mscale() - m).abs() < 1e-6);
        assert!((c.softmax_scale() - m * m / 192f32.sqrt()).abs() < 1e-6);
        assert!((c.softmax_scale() - 0.13524).abs() < 1e-4, "{}", c.softmax_scale());
        // One MoE layer: 5 attention + 3·257 MLP linears.
        let lin = c.layer_linears(3);
        assert_eq!(lin.len(), 5 + 3 * 257);
        let kv_a = &lin[2];
        assert_eq!((kv_a.prefix.as_str(), kv_a.n, kv_a.k), ("model.layers.3.self_attn.kv_a_proj_with_mqa", 576, 7168));
        assert_eq!(c.scale_shape(576, 7168), [5, 56]);
        assert_eq!((lin[1].n, lin[1].k), (24576, 1536));
        assert_eq!((lin[3].n, lin[3].k), (32768, 512));
        assert_eq!((lin[4].n, lin[4].k), (7168, 16384));
        let specs = c.layer_tensor_specs(3);
        assert_eq!(specs.len(), 4 + 2 + 2 * lin.len());
        assert!(specs.iter().any(|s| s.name == "model.layers.3.mlp.experts.255.down_proj.weight_scale_inv"
            && s.shape == vec![56, 16]
            && s.dtype == TensorDtype::F32));
        let dense = c.layer_tensor_specs(0);
        assert!(dense.iter().any(|s| s.name == "model.layers.0.mlp.gate_proj.weight" && s.shape == vec![18432, 7168]));
        assert!(!dense.iter().any(|s| s.name.contains("mlp.gate.weight")));
        // Scale shapes as in the released checkpoint's index.
        let scale = |suffix: &str| specs.iter().find(|s| s.name.ends_with(suffix)).map(|s| s.shape.clone());
        assert_eq!(scale("self_attn.q_a_proj.weight_scale_inv"), Some(vec![12, 56]));
        assert_eq!(scale("self_attn.q_b_proj.weight_scale_inv"), Some(vec![192, 12]));
        assert_eq!(scale("self_attn.kv_b_proj.weight_scale_inv"), Some(vec![256, 4]));
        assert_eq!(scale("self_attn.o_proj.weight_scale_inv"), Some(vec![56, 128]));
        assert_eq!(scale("shared_experts.gate_proj.weight_scale_inv"), Some(vec![16, 56]));
        assert_eq!(scale("mlp.gate.weight"), Some(vec![256, 7168]));
        assert_eq!(
            dense.iter().find(|s| s.name.ends_with("mlp.down_proj.weight_scale_inv")).unwrap().shape,
            vec![56, 144]
        );
        // ≈ 11.4 GB per MoE layer (256 experts · 3 · 2048 · 7168 bytes dominate).
        let gb = c.layer_bytes(3) as f64 / 1e9;
        assert!((11.3..11.6).contains(&gb), "{gb}");
    }

    #[test]
    fn reduced_is_valid_and_bad_configs_are_rejected() {
        DeepSeekV3Config::reduced().validate().unwrap();
        let bad = DeepSeekV3Config { top_k: 9, ..DeepSeekV3Config::reduced() };
        assert!(bad.validate().is_err());
        let bad = DeepSeekV3Config { n_group: 3, ..DeepSeekV3Config::reduced() };
        assert!(bad.validate().is_err());
        let bad = DeepSeekV3Config { hidden: 0, ..DeepSeekV3Config::reduced() };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn synthetic_weights_have_the_layout_and_magnitudes() {
        let c = DeepSeekV3Config::reduced();
        for layer in [0, 2] {
            let w = synthetic_layer_weights(&c, layer, 5).unwrap();
            w.check_against(&c).unwrap();
            assert_eq!(w, synthetic_layer_weights(&c, layer, 5).unwrap(), "deterministic");
            assert_ne!(w, synthetic_layer_weights(&c, layer, 6).unwrap());
        }
        let w = synthetic_layer_weights(&c, 1, 5).unwrap();
        let deq = w.self_attn.kv_b_proj.dequantize();
        let std = (deq.iter().map(|v| v * v).sum::<f32>() / deq.len() as f32).sqrt();
        assert!((std - SYNTHETIC_WEIGHT_STD).abs() < 0.002, "{std}");
        let codes = &w.self_attn.kv_b_proj.weight;
        let amax = codes.iter().map(|c| c.to_f32().abs()).fold(0f32, f32::max);
        assert!((300.0..448.0).contains(&amax), "codes use the E4M3 range without saturating: {amax}");
        assert!(codes.iter().all(|c| !c.is_nan()));
        let MlpWeights::Moe(m) = &w.mlp else { panic!("layer 1 is MoE") };
        assert_eq!(m.experts.len(), c.n_routed_experts);
        assert_ne!(m.experts[0], m.experts[1]);
        assert!(m.e_score_correction_bias.iter().all(|b| b.abs() < 0.1));
        assert!(w.input_layernorm.iter().all(|g| (0.5..1.5).contains(&g.to_f32())));
    }

    #[test]
    fn fp8_linear_checks_lengths_and_dequantizes_per_block() {
        assert!(Fp8Linear::new(2, 3, vec![E4M3::ZERO; 5], vec![1.0]).is_err());
        assert!(Fp8Linear::new(2, 3, vec![E4M3::ZERO; 6], vec![1.0, 2.0]).is_err());
        let n = 130;
        let k = 3;
        let l = Fp8Linear::new(n, k, vec![E4M3::from_f32(1.0); n * k], vec![0.5, 2.0]).unwrap();
        let d = l.dequantize();
        assert_eq!(d[0], 0.5);
        assert_eq!(d[127 * k], 0.5);
        assert_eq!(d[128 * k], 2.0);
    }
}
