//! CPU references: plain f32/f64 loops, the ground truth every GPU kernel is tested against.

pub mod decode_ops;
pub mod fp8_gemm;
pub mod layer;
pub mod mla;
pub mod moe;
pub mod quant;
