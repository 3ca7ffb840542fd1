//! # r1-kernels
//!
//! Hand-written CUDA kernels for the performance core of DeepSeek-V3/R1-style models (FP8 block-scaled GEMM,
//! Mixture-of-Experts, MLA decode), launched from safe Rust through cudarc's driver API, each with a CPU reference
//! in [`crate::reference`] that is simple enough to trust.
//!
//! Every GPU entry point validates shapes, alignment and index ranges on the host and returns an [`Error`] instead of
//! launching on bad input. The crate builds and runs its CPU paths on machines without CUDA: GPU entry points then
//! return [`Error::NoCudaDriver`] or [`Error::KernelsNotBuilt`].
//!
//! # A tour (compiled as a doctest, so it stays true)
//!
//! ```no_run
//! use r1_kernels::{bf16, fp8_gemm, mla, moe, quant, reference::quant::ScaleFormat};
//! use r1_kernels::{DeviceTensor, Gpu, Result, E4M3};
//!
//! /// An FP8 linear layer: per-1×128 activation quantization (scales written MN-major, the layout the GEMM
//! /// reads), then the block-scaled GEMM `y = x · wᵀ` with bf16 output.
//! fn linear(
//!     gpu: &Gpu,
//!     x: &DeviceTensor<bf16>,          // [m, k]
//!     w: &DeviceTensor<E4M3>,          // [n, k]
//!     w_scale_inv: &DeviceTensor<f32>, // [ceil(n/128), ceil(k/128)]
//!     y: &mut DeviceTensor<bf16>,      // [m, n]
//! ) -> Result<()> {
//!     let (xq, xs) = quant::quantize_activations_new(gpu, x, ScaleFormat::F32)?;
//!     fp8_gemm::fp8_gemm(gpu, &xq, &xs, w, w_scale_inv, y, &fp8_gemm::GemmOptions::default())
//! }
//!
//! /// DeepSeek-V3's MoE block: fused gate GEMM + router, permutation, grouped FP8 GEMMs, SwiGLU, combine with the
//! /// shared expert; no host synchronization.
//! fn moe_block(
//!     gpu: &Gpu,
//!     experts: &moe::ExpertWeights,
//!     shared: &moe::ExpertWeights,
//!     w_gate: &DeviceTensor<bf16>, // [256, 7168]
//!     bias: &DeviceTensor<f32>,    // [256]
//!     h: &DeviceTensor<bf16>,      // [tokens, 7168]
//!     out: &mut DeviceTensor<bf16>,
//! ) -> Result<()> {
//!     let cfg = moe::RouterConfig::deepseek_v3();
//!     let layout = moe::Layout::Contiguous { block_m: moe::GEMM_BLOCK_M };
//!     let mut ws = moe::MoeWorkspace::new(gpu, &cfg, h.shape()[0], 7168, 2048, Some(2048), layout)?;
//!     moe::moe_forward(gpu, &cfg, experts, Some(shared), h, moe::Routing::gate(w_gate, Some(bias)), &mut ws, out)
//! }
//!
//! /// MLA decode over a paged latent cache; the split plan is made on the host from lengths the engine knows.
//! #[allow(clippy::too_many_arguments)]
//! fn attention(
//!     gpu: &Gpu,
//!     q: &DeviceTensor<bf16>,           // [b, s_q, h, 576]
//!     cache: &DeviceTensor<bf16>,       // [num_blocks, page, 576]
//!     table: &DeviceTensor<i32>,        // [b, max_blocks]
//!     table_host: &[i32],
//!     seqlens: &DeviceTensor<i32>,      // [b]
//!     seqlens_host: &[i32],
//!     cfg: &mla::MlaConfig,
//!     o: &mut DeviceTensor<bf16>,       // [b, s_q, h, 512]
//!     lse: &mut DeviceTensor<f32>,      // [b, h, s_q]
//! ) -> Result<()> {
//!     let plan = mla::MlaPlan::balanced(gpu, seqlens_host, cfg.page_size)?;
//!     let mut ws = mla::MlaWorkspace::new(gpu, &plan, cfg)?;
//!     let opts = mla::MlaOptions { block_table_host: Some(table_host), ..Default::default() };
//!     mla::mla_decode(gpu, q, cache, table, seqlens, &plan, cfg, o, lse, &mut ws, &opts)
//! }
//! ```

#![warn(missing_docs)]

#[cfg(feature = "checkpoint")]
pub mod checkpoint;
pub mod decode_ops;
pub mod device;
pub mod error;
pub mod fp8;
pub mod fp8_gemm;
mod kernel_params;
pub mod kernels;
#[cfg(feature = "layer")]
pub mod layer;
pub mod mla;
pub mod model;
pub mod moe;
#[doc(hidden)]
pub mod probe_log;
#[doc(hidden)]
pub mod probes;
pub mod quant;
pub mod reference;
pub mod rng;
pub mod sm90;
pub mod tensor;
pub mod timing;
pub mod view;

/// The cudarc this crate is built with (0.19.10 or newer in 0.19). [`Gpu::with_stream`], [`Gpu::context`],
/// [`Gpu::function`], [`DeviceTensor::view`] and `From<DriverError>` speak its types, so a dependent that shares
/// streams or buffers with this crate names them through this re-export and gets exactly the same version.
pub use cudarc;
pub use device::{DeviceInfo, Gpu};
pub use error::{Error, Result};
pub use fp8::E4M3;
pub use half::bf16;
pub use tensor::{DeviceTensor, HostTensor};
pub use view::{no_tensor, TensorMut, TensorRef};
