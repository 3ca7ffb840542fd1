//! # r1-kernels
//!
//! Hand-written CUDA kernels for the performance core of DeepSeek-V3/R1-style models (FP8 block-scaled GEMM,
//! Mixture-of-Experts, MLA decode), launched from safe Rust through cudarc's driver API, each with a CPU reference
//! in [`reference`] that is simple enough to trust.
//!
//! Every GPU entry point validates shapes, alignment and index ranges on the host and returns an [`Error`] instead of
//! launching on bad input. The crate builds and runs its CPU paths on machines without CUDA: GPU entry points then
//! return [`Error::NoCudaDriver`] or [`Error::KernelsNotBuilt`].

#![warn(missing_docs)]

pub mod checkpoint;
pub mod decode_ops;
pub mod device;
pub mod error;
pub mod fp8;
pub mod gemm;
pub mod kernels;
pub mod layer;
pub mod mla;
pub mod model;
pub mod moe;
pub mod quant;
pub mod reference;
pub mod report;
pub mod rng;
pub mod tensor;
pub mod timing;

pub use device::{DeviceInfo, Gpu};
pub use error::{Error, Result};
pub use fp8::E4M3;
pub use half::bf16;
pub use tensor::{DeviceTensor, HostTensor};
