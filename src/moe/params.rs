//! The MoE kernels' argument structs, the Rust twins of `kernels/common/moe_params.cuh`, one per kernel family:
//! both router kernels take one `RouterParams`, the gate GEMM `GateLogitsParams`, the permute's four kernels
//! `CountRankParams`, `OffsetsParams`, `ScatterParams` and `GatherParams`; the portable, wgmma and TMA grouped GEMM
//! kernels each take one `GroupedGemmParams` (the TMA kernel after its three tensor maps), the epilogues
//! `SwigluQuantParams` and `CombineParams`. [`kernel_params!`] pins each layout here; the header pins the same
//! offsets and a test checks they agree.

use crate::kernel_params::kernel_params;

kernel_params! {
    /// `moe_router_f32` and `moe_router_bf16`; field comments are in the header.
    pub(crate) struct RouterParams = 72 bytes {
        logits: u64 @ 0,
        bias: u64 @ 8,
        topk_ids: u64 @ 16,
        topk_weights: u64 @ 24,
        t: i32 @ 32,
        e: i32 @ 36,
        k: i32 @ 40,
        groups: i32 @ 44,
        topk_groups: i32 @ 48,
        has_bias: i32 @ 52,
        softmax: i32 @ 56,
        renormalize: i32 @ 60,
        scale: f32 @ 64,
    }
}

kernel_params! {
    /// `moe_gate_logits`; field comments are in the header.
    pub(crate) struct GateLogitsParams = 40 bytes {
        x: u64 @ 0,
        w: u64 @ 8,
        logits: u64 @ 16,
        t: i32 @ 24,
        num_experts: i32 @ 28,
        hidden: i32 @ 32,
    }
}

kernel_params! {
    /// `moe_count_rank`; field comments are in the header.
    pub(crate) struct CountRankParams = 32 bytes {
        ids: u64 @ 0,
        counts_raw: u64 @ 8,
        rank: u64 @ 16,
        n_pairs: i32 @ 24,
    }
}

kernel_params! {
    /// `moe_offsets`; field comments are in the header.
    pub(crate) struct OffsetsParams = 40 bytes {
        counts_raw: u64 @ 0,
        offsets: u64 @ 8,
        counts: u64 @ 16,
        num_experts: i32 @ 24,
        masked: i32 @ 28,
        block_m: i32 @ 32,
        max_m: i32 @ 36,
    }
}

kernel_params! {
    /// `moe_scatter`; field comments are in the header.
    pub(crate) struct ScatterParams = 64 bytes {
        ids: u64 @ 0,
        rank: u64 @ 8,
        offsets: u64 @ 16,
        counts: u64 @ 24,
        row_of: u64 @ 32,
        src_index: u64 @ 40,
        capacity: i64 @ 48,
        n_pairs: i32 @ 56,
        num_experts: i32 @ 60,
    }
}

kernel_params! {
    /// `moe_gather`; field comments are in the header.
    pub(crate) struct GatherParams = 96 bytes {
        x_codes: u64 @ 0,
        x_scales: u64 @ 8,
        offsets: u64 @ 16,
        counts: u64 @ 24,
        src_index: u64 @ 32,
        a_codes: u64 @ 40,
        a_scales: u64 @ 48,
        capacity: i64 @ 56,
        cap_pad: i64 @ 64,
        num_experts: i32 @ 72,
        k: i32 @ 76,
        t: i32 @ 80,
        t_pad: i32 @ 84,
        hidden: i32 @ 88,
    }
}

kernel_params! {
    /// The grouped GEMM kernels; field comments are in the header.
    pub(crate) struct GroupedGemmParams = 96 bytes {
        a: u64 @ 0,
        a_scales: u64 @ 8,
        w: u64 @ 16,
        w_scales: u64 @ 24,
        offsets: u64 @ 32,
        counts: u64 @ 40,
        out: u64 @ 48,
        rows: i64 @ 56,
        rows_pad: i64 @ 64,
        n: i32 @ 72,
        k: i32 @ 76,
        num_experts: i32 @ 80,
        stages: i32 @ 84,
        group_m: i32 @ 88,
    }
}

kernel_params! {
    /// `moe_swiglu_quant`; field comments are in the header.
    pub(crate) struct SwigluQuantParams = 64 bytes {
        h: u64 @ 0,
        q: u64 @ 8,
        scales: u64 @ 16,
        offsets: u64 @ 24,
        rows: i64 @ 32,
        rows_pad: i64 @ 40,
        inter: i32 @ 48,
        ue8m0: i32 @ 52,
        num_experts: i32 @ 56,
        has_limit: i32 @ 60,
    }
}

kernel_params! {
    /// `moe_combine`; field comments are in the header.
    pub(crate) struct CombineParams = 64 bytes {
        y: u64 @ 0,
        row_of: u64 @ 8,
        weights: u64 @ 16,
        shared: u64 @ 24,
        out: u64 @ 32,
        rows: i64 @ 40,
        k: i32 @ 48,
        hidden: i32 @ 52,
        has_shared: i32 @ 56,
        skip_weights: i32 @ 60,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel_params::assert_header_pins;

    const HEADER: &str = include_str!("../../kernels/common/moe_params.cuh");

    #[test]
    fn the_header_pins_the_same_layouts() {
        assert_header_pins::<RouterParams>("kernels/common/moe_params.cuh", HEADER);
        assert_header_pins::<GatherParams>("kernels/common/moe_params.cuh", HEADER);
        assert_header_pins::<GroupedGemmParams>("kernels/common/moe_params.cuh", HEADER);
        assert_header_pins::<GateLogitsParams>("kernels/common/moe_params.cuh", HEADER);
        assert_header_pins::<CountRankParams>("kernels/common/moe_params.cuh", HEADER);
        assert_header_pins::<OffsetsParams>("kernels/common/moe_params.cuh", HEADER);
        assert_header_pins::<ScatterParams>("kernels/common/moe_params.cuh", HEADER);
        assert_header_pins::<SwigluQuantParams>("kernels/common/moe_params.cuh", HEADER);
        assert_header_pins::<CombineParams>("kernels/common/moe_params.cuh", HEADER);
    }
}
