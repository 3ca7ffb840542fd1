//! The launchers of the sm_90a primitive-test kernels; this module mirrors `kernels/probes_sm90.cu`, one launcher
//! per probe kernel, named by the kernel family it tests. `tests/probes.rs` runs them so that, when a fast GEMM or
//! attention kernel is wrong, the failing probe says which building block is (TMA box loads and their swizzle, wgmma
//! descriptors and fragment layouts, the FP8 promotion step, the MLA tile loads and FP8 dequantization, the wide and
//! narrow QKᵀ/PV products, the online-softmax merge). Each launcher validates its inputs like the production
//! launchers, synchronizes and returns the kernel's output.

use cudarc::driver::{DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};
use half::bf16;

use crate::device::Gpu;
use crate::error::{CudaCall, Error, Result};
use crate::fp8::E4M3;
use crate::mla::sm90::{
    box_rows, encode_fp8_cache, encode_rows_576, narrow_smem_bytes, unsupported_page, SMEM_BYTES, SMEM_BYTES_FP8,
    THREADS, TILE_BYTES, TILE_N,
};
use crate::reference::mla::{D_QK, FP8_TOKEN_BYTES};
use crate::sm90::{Tma2d, PROBE_MODULE};
use crate::tensor::DeviceTensor;

/// The probes' argument structs; the layouts are pinned by `kernels/common/probe_params.cuh`.
mod params {
    use crate::kernel_params::kernel_params;

    kernel_params! {
        /// `gemm_probe_tma`.
        pub(super) struct GemmTmaProbeParams = 24 bytes {
            out: u64 @ 0,
            x0: i32 @ 8,
            y0: i32 @ 12,
            box_bytes: i32 @ 16,
        }
    }

    kernel_params! {
        /// `gemm_probe_wgmma_n128`.
        pub(super) struct GemmWgmmaProbeParams = 24 bytes {
            a: u64 @ 0,
            b: u64 @ 8,
            out: u64 @ 16,
        }
    }

    kernel_params! {
        /// `gemm_probe_promote_n160`.
        pub(super) struct GemmPromoteProbeParams = 48 bytes {
            acc_in: u64 @ 0,
            fin_in: u64 @ 8,
            sa: u64 @ 16,
            sb2: u64 @ 24,
            out: u64 @ 32,
            n0: i32 @ 40,
        }
    }

    kernel_params! {
        /// `mla_sm90_probe_tile_load` and `mla_sm90_probe_fp8_tile_load`.
        pub(super) struct MlaTileLoadProbeParams = 40 bytes {
            table_row: u64 @ 0,
            out: u64 @ 8,
            page: i32 @ 16,
            num_blocks: i32 @ 20,
            box_rows: i32 @ 24,
            t0: i32 @ 28,
            tok_end: i32 @ 32,
        }
    }

    kernel_params! {
        /// `mla_sm90_probe_wgmma` and `mla_sm90_probe_narrow_wgmma`.
        pub(super) struct MlaWgmmaProbeParams = 40 bytes {
            table_row: u64 @ 0,
            s_out: u64 @ 8,
            o_out: u64 @ 16,
            page: i32 @ 24,
            num_blocks: i32 @ 28,
            box_rows: i32 @ 32,
        }
    }

    kernel_params! {
        /// `mla_sm90_probe_softmax`.
        pub(super) struct MlaSoftmaxProbeParams = 40 bytes {
            s_in: u64 @ 0,
            m_out: u64 @ 8,
            l_out: u64 @ 16,
            p_out: u64 @ 24,
            alpha_out: u64 @ 32,
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use crate::kernel_params::assert_header_pins;

        const PATH: &str = "kernels/common/probe_params.cuh";
        const HEADER: &str = include_str!("../kernels/common/probe_params.cuh");

        #[test]
        fn the_header_pins_the_same_layouts() {
            assert_header_pins::<GemmTmaProbeParams>(PATH, HEADER);
            assert_header_pins::<GemmWgmmaProbeParams>(PATH, HEADER);
            assert_header_pins::<GemmPromoteProbeParams>(PATH, HEADER);
            assert_header_pins::<MlaTileLoadProbeParams>(PATH, HEADER);
            assert_header_pins::<MlaWgmmaProbeParams>(PATH, HEADER);
            assert_header_pins::<MlaSoftmaxProbeParams>(PATH, HEADER);
        }
    }
}

use params::{
    GemmPromoteProbeParams, GemmTmaProbeParams, GemmWgmmaProbeParams, MlaSoftmaxProbeParams, MlaTileLoadProbeParams,
    MlaWgmmaProbeParams,
};

// ------------------------------------------------------------------------------------------------ FP8 GEMM

/// Loads one box of `tma` at `(x0, y0)` (inner, outer coordinates) from `src` into shared memory and returns the
/// shared-memory bytes as stored (swizzled).
pub fn gemm_tma_box(gpu: &Gpu, src: &DeviceTensor<u8>, tma: &Tma2d, x0: i32, y0: i32) -> Result<Vec<u8>> {
    gpu.require_hopper("gemm_probe_tma")?;
    let need = tma.rows * tma.row_stride_bytes;
    if (src.numel() as u64) < need {
        return Err(Error::shape("src", format!("at least {need} bytes"), src.numel()));
    }
    let view = src.view();
    let (ptr, _guard) = view.device_ptr(gpu.stream());
    let map = tma.encode(ptr)?;
    let box_bytes = tma.box_bytes() as i32;
    let smem = tma.box_bytes() + 1024 + 64;
    let f = gpu.function(PROBE_MODULE, "gemm_probe_tma", smem)?;
    let mut out = DeviceTensor::<u8>::zeros(gpu, &[tma.box_bytes() as usize])?;
    {
        let mut ov = out.view_mut();
        let (out_ptr, _go) = ov.device_ptr_mut(gpu.stream());
        let params = GemmTmaProbeParams { out: out_ptr, x0, y0, box_bytes };
        let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: smem };
        let mut launch = gpu.stream().launch_builder(&f);
        launch.arg(&map).arg(&params);
        // SAFETY: the map describes `src` within its length (checked above); the kernel writes box_bytes bytes
        // to `out`, which has exactly that many; shared memory covers the box, alignment slack and one mbarrier.
        unsafe { launch.launch(cfg) }.cuda_call("cuLaunchKernel")?;
    }
    out.to_host(gpu)
}

/// One m64n128 block over K = 128: `a` [64, 128] and `b` [128, 128] E4M3 → fp32 [64, 128] = a · bᵀ.
pub fn gemm_wgmma_n128(gpu: &Gpu, a: &DeviceTensor<E4M3>, b: &DeviceTensor<E4M3>) -> Result<Vec<f32>> {
    gpu.require_hopper("gemm_probe_wgmma_n128")?;
    a.expect_shape("a", &[64, 128])?;
    b.expect_shape("b", &[128, 128])?;
    let smem = 64 * 128 + 128 * 128 + 1024;
    let f = gpu.function(PROBE_MODULE, "gemm_probe_wgmma_n128", smem)?;
    let mut out = DeviceTensor::<f32>::zeros(gpu, &[64, 128])?;
    {
        let stream = gpu.stream();
        let (av, bv, mut ov) = (a.view(), b.view(), out.view_mut());
        let ((a_ptr, _ga), (b_ptr, _gb)) = (av.device_ptr(stream), bv.device_ptr(stream));
        let (out_ptr, _go) = ov.device_ptr_mut(stream);
        let params = GemmWgmmaProbeParams { a: a_ptr, b: b_ptr, out: out_ptr };
        let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: smem };
        let mut launch = stream.launch_builder(&f);
        launch.arg(&params);
        // SAFETY: fixed sizes checked above; the kernel reads 64·128 and 128·128 bytes and writes 64·128 floats.
        unsafe { launch.launch(cfg) }.cuda_call("cuLaunchKernel")?;
    }
    out.to_host(gpu)
}

/// Two promotion steps on a [64, 160] tile at column `n0`: returns `fin_in + 2 × (acc · sa[row] · sb2[slot])`,
/// each step one fmaf per element (see `r1k::fp8_gemm::promote`).
pub fn gemm_promote_n160(
    gpu: &Gpu,
    acc: &DeviceTensor<f32>,
    fin: &DeviceTensor<f32>,
    sa: &DeviceTensor<f32>,
    sb2: &DeviceTensor<f32>,
    n0: i32,
) -> Result<Vec<f32>> {
    gpu.require_hopper("gemm_probe_promote_n160")?;
    acc.expect_shape("acc", &[64, 160])?;
    fin.expect_shape("fin", &[64, 160])?;
    sa.expect_shape("sa", &[64])?;
    sb2.expect_shape("sb2", &[2])?;
    if n0 < 0 || n0 % 8 != 0 {
        return Err(Error::Alignment { arg: "n0", required: 8, got: n0.unsigned_abs() as usize });
    }
    let f = gpu.function(PROBE_MODULE, "gemm_probe_promote_n160", 0)?;
    let mut out = DeviceTensor::<f32>::zeros(gpu, &[64, 160])?;
    {
        let stream = gpu.stream();
        let (accv, finv, sav, sbv, mut ov) = (acc.view(), fin.view(), sa.view(), sb2.view(), out.view_mut());
        let ((acc_in, _gacc), (fin_in, _gfin)) = (accv.device_ptr(stream), finv.device_ptr(stream));
        let ((sa_ptr, _gsa), (sb2_ptr, _gsb)) = (sav.device_ptr(stream), sbv.device_ptr(stream));
        let (out_ptr, _go) = ov.device_ptr_mut(stream);
        let params = GemmPromoteProbeParams { acc_in, fin_in, sa: sa_ptr, sb2: sb2_ptr, out: out_ptr, n0 };
        let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
        let mut launch = stream.launch_builder(&f);
        launch.arg(&params);
        // SAFETY: fixed sizes checked above; the kernel reads and writes exactly 64·160 floats per tile argument.
        unsafe { launch.launch(cfg) }.cuda_call("cuLaunchKernel")?;
    }
    out.to_host(gpu)
}

// ------------------------------------------------------------------------------------------------ MLA decode

/// Runs the tile-load probe: returns the raw 73,728-byte stage after loading the 64-token tile at `t0`
/// (compare with [`tile_image`](crate::mla::sm90::tile_image)).
pub fn mla_tile_load(
    gpu: &Gpu,
    kv: &DeviceTensor<bf16>,
    table_row: &DeviceTensor<i32>,
    t0: usize,
    tok_end: usize,
) -> Result<Vec<u8>> {
    gpu.require_hopper("MLA sm_90a tile-load probe")?;
    let [num_blocks, page, width] = kv.dims::<3>("kv_cache")?;
    if width != D_QK || num_blocks == 0 {
        return Err(Error::shape("kv_cache", "[num_blocks ≥ 1, page, 576]", format!("{:?}", kv.shape())));
    }
    let box_rows = box_rows(page).ok_or_else(|| unsupported_page(page))?;
    if tok_end > table_row.numel() * page {
        return Err(Error::shape("table_row", format!("≥ {} entries", tok_end.div_ceil(page)), table_row.numel()));
    }
    let mut out = DeviceTensor::<u8>::zeros(gpu, &[TILE_BYTES])?;
    let f = gpu.function(PROBE_MODULE, "mla_sm90_probe_tile_load", SMEM_BYTES as u32)?;
    let stream = gpu.stream();
    let kvv = kv.view();
    let (kv_ptr, _g) = kvv.device_ptr(stream);
    let tmap = encode_rows_576(kv_ptr, num_blocks * page, box_rows)?;
    {
        let (tv, mut ov) = (table_row.view(), out.view_mut());
        let (t_ptr, _gt) = tv.device_ptr(stream);
        let (out_ptr, _go) = ov.device_ptr_mut(stream);
        let params = MlaTileLoadProbeParams {
            table_row: t_ptr,
            out: out_ptr,
            page: page as i32,
            num_blocks: num_blocks as i32,
            box_rows: box_rows as i32,
            t0: t0 as i32,
            tok_end: tok_end as i32,
        };
        let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: SMEM_BYTES as u32 };
        let mut launch = stream.launch_builder(&f);
        launch.arg(&tmap).arg(&params);
        // SAFETY: one CTA; the table row is read below tok_end / page (checked); the cache through the tensor map;
        // `out` holds exactly TILE_BYTES.
        unsafe { launch.launch(cfg) }.cuda_call("cuLaunchKernel")?;
    }
    out.to_host(gpu)
}

/// Runs the FP8 tile-load probe on an FP8 cache `[num_blocks, page, 656]`: returns the dequantized bf16 tile at
/// `t0` as the FP8 kernels hold it (compare with [`tile_image`](crate::mla::sm90::tile_image) of the dequantized
/// cache).
pub fn mla_fp8_tile_load(
    gpu: &Gpu,
    kv: &DeviceTensor<u8>,
    table_row: &DeviceTensor<i32>,
    t0: usize,
    tok_end: usize,
) -> Result<Vec<u8>> {
    gpu.require_hopper("MLA sm_90a FP8 tile-load probe")?;
    let [num_blocks, page, width] = kv.dims::<3>("kv_cache")?;
    if width != FP8_TOKEN_BYTES || num_blocks == 0 {
        return Err(Error::shape("kv_cache", "[num_blocks ≥ 1, page, 656]", format!("{:?}", kv.shape())));
    }
    let box_rows = box_rows(page).ok_or_else(|| unsupported_page(page))?;
    if tok_end > table_row.numel() * page {
        return Err(Error::shape("table_row", format!("≥ {} entries", tok_end.div_ceil(page)), table_row.numel()));
    }
    let mut out = DeviceTensor::<u8>::zeros(gpu, &[TILE_BYTES])?;
    let f = gpu.function(PROBE_MODULE, "mla_sm90_probe_fp8_tile_load", SMEM_BYTES_FP8 as u32)?;
    let stream = gpu.stream();
    let kvv = kv.view();
    let (kv_ptr, _g) = kvv.device_ptr(stream);
    let maps = encode_fp8_cache(kv_ptr, num_blocks * page, box_rows)?;
    {
        let (tv, mut ov) = (table_row.view(), out.view_mut());
        let (t_ptr, _gt) = tv.device_ptr(stream);
        let (out_ptr, _go) = ov.device_ptr_mut(stream);
        let params = MlaTileLoadProbeParams {
            table_row: t_ptr,
            out: out_ptr,
            page: page as i32,
            num_blocks: num_blocks as i32,
            box_rows: box_rows as i32,
            t0: t0 as i32,
            tok_end: tok_end as i32,
        };
        let cfg =
            LaunchConfig { grid_dim: (1, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: SMEM_BYTES_FP8 as u32 };
        let mut launch = stream.launch_builder(&f);
        launch.arg(&maps[0]).arg(&maps[1]).arg(&maps[2]).arg(&params);
        // SAFETY: one CTA; the table row is read below tok_end / page (checked); the cache through the tensor maps;
        // `out` holds exactly TILE_BYTES.
        unsafe { launch.launch(cfg) }.cuda_call("cuLaunchKernel")?;
    }
    out.to_host(gpu)
}

/// Runs the wgmma probe on Q rows 0..64 of `q` (`[rows ≥ 1, 576]`) and the first 64 tokens of the sequence with
/// table row `table_row`: returns (S = Q·Kᵀ as [64, 64], O = bf16(S)·V as [64, 512]).
pub fn mla_wgmma(
    gpu: &Gpu,
    q: &DeviceTensor<bf16>,
    kv: &DeviceTensor<bf16>,
    table_row: &DeviceTensor<i32>,
) -> Result<(Vec<f32>, Vec<f32>)> {
    gpu.require_hopper("MLA sm_90a wgmma probe")?;
    let [num_blocks, page, width] = kv.dims::<3>("kv_cache")?;
    let [q_rows, q_width] = q.dims::<2>("q")?;
    if width != D_QK || q_width != D_QK || num_blocks == 0 || q_rows < 64 {
        return Err(Error::shape("q / kv_cache", "576 columns, ≥ 64 q rows, ≥ 1 page", format!("{:?}", kv.shape())));
    }
    let box_rows = box_rows(page).ok_or_else(|| unsupported_page(page))?;
    if table_row.numel() * page < TILE_N {
        return Err(Error::shape("table_row", format!("≥ {} entries", TILE_N.div_ceil(page)), table_row.numel()));
    }
    let mut s = DeviceTensor::<f32>::zeros(gpu, &[64, 64])?;
    let mut o = DeviceTensor::<f32>::zeros(gpu, &[64, 512])?;
    let f = gpu.function(PROBE_MODULE, "mla_sm90_probe_wgmma", SMEM_BYTES as u32)?;
    let stream = gpu.stream();
    let (qv, kvv) = (q.view(), kv.view());
    let (q_ptr, _g1) = qv.device_ptr(stream);
    let (kv_ptr, _g2) = kvv.device_ptr(stream);
    let tmap_q = encode_rows_576(q_ptr, q_rows, 64)?;
    let tmap_kv = encode_rows_576(kv_ptr, num_blocks * page, box_rows)?;
    {
        let (tv, mut sv, mut ov) = (table_row.view(), s.view_mut(), o.view_mut());
        let (t_ptr, _gt) = tv.device_ptr(stream);
        let ((s_out, _gs), (o_out, _go)) = (sv.device_ptr_mut(stream), ov.device_ptr_mut(stream));
        let params = MlaWgmmaProbeParams {
            table_row: t_ptr,
            s_out,
            o_out,
            page: page as i32,
            num_blocks: num_blocks as i32,
            box_rows: box_rows as i32,
        };
        let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: SMEM_BYTES as u32 };
        let mut launch = stream.launch_builder(&f);
        launch.arg(&tmap_q).arg(&tmap_kv).arg(&params);
        // SAFETY: one CTA reading through the tensor maps and 64 / page table entries (checked); writes 64·64 and
        // 64·512 floats, the sizes of s and o.
        unsafe { launch.launch(cfg) }.cuda_call("cuLaunchKernel")?;
    }
    Ok((s.to_host(gpu)?, o.to_host(gpu)?))
}

/// Runs the narrow-kernel wgmma probe on Q rows 0..16 of `q` (`[rows ≥ 16, 576]`) and the first 64 tokens of the
/// sequence with table row `table_row`: returns (S = Q·Kᵀ as [16, 64], O = bf16(S)·V as [16, 512]), computed as
/// Sᵀ = K·Qᵀ and Oᵀ = Vᵀ·Pᵀ like the narrow kernels.
pub fn mla_narrow_wgmma(
    gpu: &Gpu,
    q: &DeviceTensor<bf16>,
    kv: &DeviceTensor<bf16>,
    table_row: &DeviceTensor<i32>,
) -> Result<(Vec<f32>, Vec<f32>)> {
    gpu.require_hopper("MLA sm_90a narrow wgmma probe")?;
    let [num_blocks, page, width] = kv.dims::<3>("kv_cache")?;
    let [q_rows, q_width] = q.dims::<2>("q")?;
    if width != D_QK || q_width != D_QK || num_blocks == 0 || q_rows < 16 {
        return Err(Error::shape("q / kv_cache", "576 columns, ≥ 16 q rows, ≥ 1 page", format!("{:?}", kv.shape())));
    }
    let box_rows = box_rows(page).ok_or_else(|| unsupported_page(page))?;
    if table_row.numel() * page < TILE_N {
        return Err(Error::shape("table_row", format!("≥ {} entries", TILE_N.div_ceil(page)), table_row.numel()));
    }
    let mut s = DeviceTensor::<f32>::zeros(gpu, &[16, 64])?;
    let mut o = DeviceTensor::<f32>::zeros(gpu, &[16, 512])?;
    let smem = narrow_smem_bytes(16, false);
    let f = gpu.function(PROBE_MODULE, "mla_sm90_probe_narrow_wgmma", smem as u32)?;
    let stream = gpu.stream();
    let (qv, kvv) = (q.view(), kv.view());
    let (q_ptr, _g1) = qv.device_ptr(stream);
    let (kv_ptr, _g2) = kvv.device_ptr(stream);
    let tmap_q = encode_rows_576(q_ptr, q_rows, 16)?;
    let tmap_kv = encode_rows_576(kv_ptr, num_blocks * page, box_rows)?;
    {
        let (tv, mut sv, mut ov) = (table_row.view(), s.view_mut(), o.view_mut());
        let (t_ptr, _gt) = tv.device_ptr(stream);
        let ((s_out, _gs), (o_out, _go)) = (sv.device_ptr_mut(stream), ov.device_ptr_mut(stream));
        let params = MlaWgmmaProbeParams {
            table_row: t_ptr,
            s_out,
            o_out,
            page: page as i32,
            num_blocks: num_blocks as i32,
            box_rows: box_rows as i32,
        };
        let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: smem as u32 };
        let mut launch = stream.launch_builder(&f);
        launch.arg(&tmap_q).arg(&tmap_kv).arg(&params);
        // SAFETY: one CTA reading through the tensor maps and 64 / page table entries (checked); writes 16·64 and
        // 16·512 floats, the sizes of s and o.
        unsafe { launch.launch(cfg) }.cuda_call("cuLaunchKernel")?;
    }
    Ok((s.to_host(gpu)?, o.to_host(gpu)?))
}

/// (m, l, alpha, p) from [`mla_softmax`].
pub type MlaSoftmaxProbe = (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>);

/// Runs the online-softmax probe on `s` [64, 128] (log2 domain): returns per row (m, l, alpha of the second tile)
/// and the bf16 P of the second tile [64, 64].
pub fn mla_softmax(gpu: &Gpu, s: &[f32]) -> Result<MlaSoftmaxProbe> {
    gpu.require_hopper("MLA sm_90a softmax probe")?;
    if s.len() != 64 * 128 {
        return Err(Error::shape("s", 64 * 128, s.len()));
    }
    let sd = DeviceTensor::from_host(gpu, s, &[64, 128])?;
    let mut m = DeviceTensor::<f32>::zeros(gpu, &[64])?;
    let mut l = DeviceTensor::<f32>::zeros(gpu, &[64])?;
    let mut a = DeviceTensor::<f32>::zeros(gpu, &[64])?;
    let mut p = DeviceTensor::<f32>::zeros(gpu, &[64, 64])?;
    let f = gpu.function(PROBE_MODULE, "mla_sm90_probe_softmax", 0)?;
    let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
    {
        let stream = gpu.stream();
        let (sv, mut mv, mut lv) = (sd.view(), m.view_mut(), l.view_mut());
        let (mut pv, mut av) = (p.view_mut(), a.view_mut());
        let (s_in, _gs) = sv.device_ptr(stream);
        let ((m_out, _gm), (l_out, _gl)) = (mv.device_ptr_mut(stream), lv.device_ptr_mut(stream));
        let ((p_out, _gp), (alpha_out, _ga)) = (pv.device_ptr_mut(stream), av.device_ptr_mut(stream));
        let params = MlaSoftmaxProbeParams { s_in, m_out, l_out, p_out, alpha_out };
        let mut launch = stream.launch_builder(&f);
        launch.arg(&params);
        // SAFETY: two warpgroups reading 64·128 floats and writing 64, 64, 64·64 and 64 floats: the buffer sizes.
        unsafe { launch.launch(cfg) }.cuda_call("cuLaunchKernel")?;
    }
    Ok((m.to_host(gpu)?, l.to_host(gpu)?, a.to_host(gpu)?, p.to_host(gpu)?))
}
