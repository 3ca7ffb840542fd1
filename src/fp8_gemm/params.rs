//! The sm_90a FP8 GEMM kernels' argument struct, the Rust twin of `kernels/common/fp8_gemm_params.cuh`: every
//! `fp8_gemm_sm90_*` kernel takes its three tensor maps and one `GemmParams` by value. The layout is pinned here by
//! const assertions and in the header by `static_assert`s on the same offsets; a test reads the header to check the
//! two lists agree.

use std::mem::{offset_of, size_of};

use cudarc::driver::DeviceRepr;

/// See the module docs; field comments are in the header.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct GemmParams {
    pub sb: u64,
    pub out: u64,
    pub m: i32,
    pub n: i32,
    pub k: i32,
    pub stages: i32,
    pub group: i32,
    pub mode: i32,
    pub k_splits: i32,
    pub kb_per_split: i32,
}

// SAFETY: plain old data with the C layout the kernels declare (pinned below and in the header).
unsafe impl DeviceRepr for GemmParams {}

/// `(field, byte offset)` of every field, in declaration order: what the header's `static_assert`s state.
#[cfg(test)]
pub(crate) const LAYOUT: [(&str, usize); 10] = [
    ("sb", offset_of!(GemmParams, sb)),
    ("out", offset_of!(GemmParams, out)),
    ("m", offset_of!(GemmParams, m)),
    ("n", offset_of!(GemmParams, n)),
    ("k", offset_of!(GemmParams, k)),
    ("stages", offset_of!(GemmParams, stages)),
    ("group", offset_of!(GemmParams, group)),
    ("mode", offset_of!(GemmParams, mode)),
    ("k_splits", offset_of!(GemmParams, k_splits)),
    ("kb_per_split", offset_of!(GemmParams, kb_per_split)),
];

const _: () = {
    assert!(size_of::<GemmParams>() == 48);
    assert!(offset_of!(GemmParams, m) == 16);
    assert!(offset_of!(GemmParams, kb_per_split) == 44);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_pins_the_same_layout() {
        let header = include_str!("../../kernels/common/fp8_gemm_params.cuh");
        let (fields, size) = crate::kernel_params::header_layout(header, "GemmParams");
        let ours: Vec<(String, usize)> = LAYOUT.iter().map(|&(f, o)| (f.to_string(), o)).collect();
        assert_eq!(fields, ours, "kernels/common/fp8_gemm_params.cuh and GemmParams disagree");
        assert_eq!(size, size_of::<GemmParams>());
    }
}
