//! The MLA kernels' argument structs, the Rust twins of `kernels/common/mla_params.cuh`: every decode kernel of
//! the family takes one `DecodeParams` by value (after its tensor maps), the combine one `CombineParams`, the device
//! planner one `PlanParams`, so an argument cannot slip in count, order or type. [`kernel_params!`] pins each layout here; the header pins the same offsets and a test checks they agree.

use crate::kernel_params::kernel_params;

kernel_params! {
    /// Every MLA decode kernel's arguments; field comments are in the header.
    pub(crate) struct DecodeParams = 112 bytes {
        q: u64 @ 0,
        cache: u64 @ 8,
        block_table: u64 @ 16,
        seqlens: u64 @ 24,
        items: u64 @ 32,
        cta_offsets: u64 @ 40,
        split_offsets: u64 @ 48,
        o_part: u64 @ 56,
        lse_part: u64 @ 64,
        batch: i32 @ 72,
        s_q: i32 @ 76,
        h: i32 @ 80,
        page: i32 @ 84,
        num_blocks: i32 @ 88,
        max_blocks: i32 @ 92,
        scale_log2: f32 @ 96,
        causal: i32 @ 100,
        box_rows: i32 @ 104,
        q_box_rows: i32 @ 108,
    }
}

kernel_params! {
    /// `mla_combine`; field comments are in the header.
    pub(crate) struct CombineParams = 56 bytes {
        o_part: u64 @ 0,
        lse_part: u64 @ 8,
        split_offsets: u64 @ 16,
        out: u64 @ 24,
        lse: u64 @ 32,
        batch: i32 @ 40,
        s_q: i32 @ 44,
        h: i32 @ 48,
    }
}

kernel_params! {
    /// `mla_plan_balanced`, the device planner; field comments are in the header.
    pub(crate) struct PlanParams = 48 bytes {
        seqlens: u64 @ 0,
        items: u64 @ 8,
        cta_offsets: u64 @ 16,
        split_offsets: u64 @ 24,
        batch: i32 @ 32,
        page: i32 @ 36,
        max_blocks: i32 @ 40,
        ctas: i32 @ 44,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel_params::assert_header_pins;

    const HEADER: &str = include_str!("../../kernels/common/mla_params.cuh");

    #[test]
    fn the_header_pins_the_same_layouts() {
        assert_header_pins::<DecodeParams>("kernels/common/mla_params.cuh", HEADER);
        assert_header_pins::<CombineParams>("kernels/common/mla_params.cuh", HEADER);
        assert_header_pins::<PlanParams>("kernels/common/mla_params.cuh", HEADER);
    }
}
