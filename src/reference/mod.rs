//! CPU references: plain f32/f64 loops, the ground truth every GPU kernel is tested against.

pub mod mla;
pub mod quant;
