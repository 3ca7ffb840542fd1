//! The MLA decode kernels' argument struct, the Rust twin of `kernels/common/mla_params.cuh`: every kernel of the
//! family takes one `DecodeParams` by value (after its tensor maps), so an argument cannot slip in count, order or
//! type. The layout is pinned here by const assertions and in the header by `static_assert`s on the same offsets;
//! a test reads the header to check the two lists agree.

use std::mem::{offset_of, size_of};

use cudarc::driver::DeviceRepr;

/// See the module docs; field comments are in the header.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct DecodeParams {
    pub q: u64,
    pub cache: u64,
    pub block_table: u64,
    pub seqlens: u64,
    pub items: u64,
    pub cta_offsets: u64,
    pub split_offsets: u64,
    pub o_part: u64,
    pub lse_part: u64,
    pub batch: i32,
    pub s_q: i32,
    pub h: i32,
    pub page: i32,
    pub num_blocks: i32,
    pub max_blocks: i32,
    pub scale_log2: f32,
    pub causal: i32,
    pub box_rows: i32,
    pub q_box_rows: i32,
}

// SAFETY: plain old data with the C layout the kernels declare (pinned below and in the header).
unsafe impl DeviceRepr for DecodeParams {}

/// `(field, byte offset)` of every field, in declaration order: what the header's `static_assert`s state.
#[cfg(test)]
pub(crate) const LAYOUT: [(&str, usize); 19] = [
    ("q", offset_of!(DecodeParams, q)),
    ("cache", offset_of!(DecodeParams, cache)),
    ("block_table", offset_of!(DecodeParams, block_table)),
    ("seqlens", offset_of!(DecodeParams, seqlens)),
    ("items", offset_of!(DecodeParams, items)),
    ("cta_offsets", offset_of!(DecodeParams, cta_offsets)),
    ("split_offsets", offset_of!(DecodeParams, split_offsets)),
    ("o_part", offset_of!(DecodeParams, o_part)),
    ("lse_part", offset_of!(DecodeParams, lse_part)),
    ("batch", offset_of!(DecodeParams, batch)),
    ("s_q", offset_of!(DecodeParams, s_q)),
    ("h", offset_of!(DecodeParams, h)),
    ("page", offset_of!(DecodeParams, page)),
    ("num_blocks", offset_of!(DecodeParams, num_blocks)),
    ("max_blocks", offset_of!(DecodeParams, max_blocks)),
    ("scale_log2", offset_of!(DecodeParams, scale_log2)),
    ("causal", offset_of!(DecodeParams, causal)),
    ("box_rows", offset_of!(DecodeParams, box_rows)),
    ("q_box_rows", offset_of!(DecodeParams, q_box_rows)),
];

const _: () = {
    assert!(size_of::<DecodeParams>() == 112);
    assert!(offset_of!(DecodeParams, lse_part) == 64);
    assert!(offset_of!(DecodeParams, batch) == 72);
    assert!(offset_of!(DecodeParams, scale_log2) == 96);
    assert!(offset_of!(DecodeParams, q_box_rows) == 108);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_pins_the_same_layout() {
        let header = include_str!("../../kernels/common/mla_params.cuh");
        let (fields, size) = crate::kernel_params::header_layout(header, "DecodeParams");
        let ours: Vec<(String, usize)> = LAYOUT.iter().map(|&(f, o)| (f.to_string(), o)).collect();
        assert_eq!(fields, ours, "kernels/common/mla_params.cuh and DecodeParams disagree");
        assert_eq!(size, size_of::<DecodeParams>());
    }
}
