//! The FP8 GEMM kernels' argument structs, the Rust twins of `kernels/common/fp8_gemm_params.cuh`: every
//! `fp8_gemm_sm90_*` kernel takes its three tensor maps and one `GemmParams` by value, the portable kernel one
//! `PortableGemmParams`, the split-K reduction one `SplitkReduceParams`. [`kernel_params!`] pins each layout here; the header pins the same offsets and a test checks they agree.

use crate::kernel_params::kernel_params;

kernel_params! {
    /// The sm_90a GEMM kernels' arguments; field comments are in the header.
    pub(crate) struct GemmParams = 48 bytes {
        sb: u64 @ 0,
        out: u64 @ 8,
        m: i32 @ 16,
        n: i32 @ 20,
        k: i32 @ 24,
        stages: i32 @ 28,
        group: i32 @ 32,
        mode: i32 @ 36,
        k_splits: i32 @ 40,
        kb_per_split: i32 @ 44,
    }
}

kernel_params! {
    /// `fp8_gemm_plain`, the portable kernel; field comments are in the header.
    pub(crate) struct PortableGemmParams = 64 bytes {
        a: u64 @ 0,
        sa: u64 @ 8,
        b: u64 @ 16,
        sb: u64 @ 24,
        out: u64 @ 32,
        m: i32 @ 40,
        n: i32 @ 44,
        k: i32 @ 48,
        m_pad: i32 @ 52,
        accumulate: i32 @ 56,
    }
}

kernel_params! {
    /// `fp8_gemm_splitk_reduce`; field comments are in the header.
    pub(crate) struct SplitkReduceParams = 32 bytes {
        partial: u64 @ 0,
        out: u64 @ 8,
        m: i32 @ 16,
        n: i32 @ 20,
        k_splits: i32 @ 24,
        mode: i32 @ 28,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel_params::assert_header_pins;

    const HEADER: &str = include_str!("../../kernels/common/fp8_gemm_params.cuh");

    #[test]
    fn the_header_pins_the_same_layouts() {
        assert_header_pins::<GemmParams>("kernels/common/fp8_gemm_params.cuh", HEADER);
        assert_header_pins::<PortableGemmParams>("kernels/common/fp8_gemm_params.cuh", HEADER);
        assert_header_pins::<SplitkReduceParams>("kernels/common/fp8_gemm_params.cuh", HEADER);
    }
}
