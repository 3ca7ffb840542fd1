//! The MoE grouped GEMM kernels' argument struct, the Rust twin of `kernels/common/moe_params.cuh`: the portable,
//! wgmma and TMA grouped kernels each take one `GroupedGemmParams` by value (the TMA kernel after its three tensor
//! maps). The layout is pinned here by const assertions and in the header by `static_assert`s on the same offsets; a
//! test reads the header to check the two lists agree.

use std::mem::{offset_of, size_of};

use cudarc::driver::DeviceRepr;

/// See the module docs; field comments are in the header.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct GroupedGemmParams {
    pub a: u64,
    pub a_scales: u64,
    pub w: u64,
    pub w_scales: u64,
    pub offsets: u64,
    pub counts: u64,
    pub out: u64,
    pub rows: i64,
    pub rows_pad: i64,
    pub n: i32,
    pub k: i32,
    pub num_experts: i32,
    pub stages: i32,
    pub group_m: i32,
}

// SAFETY: plain old data with the C layout the kernels declare (pinned below and in the header).
unsafe impl DeviceRepr for GroupedGemmParams {}

/// `(field, byte offset)` of every field, in declaration order: what the header's `static_assert`s state.
#[cfg(test)]
pub(crate) const LAYOUT: [(&str, usize); 14] = [
    ("a", offset_of!(GroupedGemmParams, a)),
    ("a_scales", offset_of!(GroupedGemmParams, a_scales)),
    ("w", offset_of!(GroupedGemmParams, w)),
    ("w_scales", offset_of!(GroupedGemmParams, w_scales)),
    ("offsets", offset_of!(GroupedGemmParams, offsets)),
    ("counts", offset_of!(GroupedGemmParams, counts)),
    ("out", offset_of!(GroupedGemmParams, out)),
    ("rows", offset_of!(GroupedGemmParams, rows)),
    ("rows_pad", offset_of!(GroupedGemmParams, rows_pad)),
    ("n", offset_of!(GroupedGemmParams, n)),
    ("k", offset_of!(GroupedGemmParams, k)),
    ("num_experts", offset_of!(GroupedGemmParams, num_experts)),
    ("stages", offset_of!(GroupedGemmParams, stages)),
    ("group_m", offset_of!(GroupedGemmParams, group_m)),
];

const _: () = {
    assert!(size_of::<GroupedGemmParams>() == 96);
    assert!(offset_of!(GroupedGemmParams, rows) == 56);
    assert!(offset_of!(GroupedGemmParams, group_m) == 88);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_pins_the_same_layout() {
        let header = include_str!("../../kernels/common/moe_params.cuh");
        let (fields, size) = crate::kernel_params::header_layout(header, "GroupedGemmParams");
        let ours: Vec<(String, usize)> = LAYOUT.iter().map(|&(f, o)| (f.to_string(), o)).collect();
        assert_eq!(fields, ours, "kernels/common/moe_params.cuh and GroupedGemmParams disagree");
        assert_eq!(size, size_of::<GroupedGemmParams>());
    }
}
