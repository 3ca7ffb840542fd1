//! GPU FP8 quantization: activations per 1×128 group (scales written MN-major for the FP8 GEMM) and weights per
//! 128×128 block. Bit-identical to [`crate::reference::quant`].

use cudarc::driver::{LaunchConfig, PushKernelArg};
use half::bf16;

use crate::device::{check_devices, Gpu};
use crate::error::{to_i32, CudaCall, Error, Result};
use crate::fp8::E4M3;
use crate::reference::quant::{padded_scale_rows, ScaleFormat};
use crate::tensor::DeviceTensor;
use crate::view::{TensorMut, TensorRef};

/// Group size of activation quantization and block size of weight quantization (DeepSeek-V3's).
pub const QUANT_BLOCK: usize = 128;

const MODULE: &str = "quant";

/// The kernels' argument structs, the Rust twins of `kernels/common/quant_params.cuh` (one per kernel; field comments
/// are in the header). [`kernel_params!`] pins each layout here; the header pins the same offsets and the test below
/// checks they agree.
mod params {
    use crate::kernel_params::kernel_params;

    kernel_params! {
        /// `act_quant_group128`.
        pub(super) struct ActQuantParams = 48 bytes {
            x: u64 @ 0,
            q: u64 @ 8,
            scales: u64 @ 16,
            m: i32 @ 24,
            k: i32 @ 28,
            m_pad: i32 @ 32,
            ue8m0: i32 @ 36,
            vec: i32 @ 40,
        }
    }

    kernel_params! {
        /// `weight_quant_block128`.
        pub(super) struct WeightQuantParams = 40 bytes {
            w: u64 @ 0,
            q: u64 @ 8,
            scales: u64 @ 16,
            n: i32 @ 24,
            k: i32 @ 28,
            ue8m0: i32 @ 32,
            vec: i32 @ 36,
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use crate::kernel_params::assert_header_pins;

        const PATH: &str = "kernels/common/quant_params.cuh";
        const HEADER: &str = include_str!("../kernels/common/quant_params.cuh");

        #[test]
        fn the_header_pins_the_same_layouts() {
            assert_header_pins::<ActQuantParams>(PATH, HEADER);
            assert_header_pins::<WeightQuantParams>(PATH, HEADER);
        }
    }
}

use params::{ActQuantParams, WeightQuantParams};

/// Shape of the scale tensor [`quantize_activations`] writes for an [m, k] input: `[ceil(k/128), round_up(m, 4)]`.
pub fn activation_scale_shape(m: usize, k: usize) -> [usize; 2] {
    [k.div_ceil(QUANT_BLOCK), padded_scale_rows(m)]
}

/// Shape of the scale tensor [`quantize_weights`] writes for an [n, k] weight: `[ceil(n/128), ceil(k/128)]`.
pub fn weight_scale_shape(n: usize, k: usize) -> [usize; 2] {
    [n.div_ceil(QUANT_BLOCK), k.div_ceil(QUANT_BLOCK)]
}

/// Quantizes bf16 activations `x` [m, k] into `q` [m, k] and `scales` [ceil(k/128), round_up(m, 4)] (MN-major, the
/// FP8 GEMM's layout; padding rows are written as 0). Enqueued on the GPU's stream; m = 0 launches nothing.
///
/// Graph capture: yes (launches only; no allocation, copy or synchronization).
pub fn quantize_activations<'a>(
    gpu: &Gpu,
    x: impl Into<TensorRef<'a, bf16>>,
    q: impl Into<TensorMut<'a, E4M3>>,
    scales: impl Into<TensorMut<'a, f32>>,
    format: ScaleFormat,
) -> Result<()> {
    let (x, mut q, mut scales) = (x.into(), q.into(), scales.into());
    check_devices!(gpu, x, q, scales)?;
    x.require_dense("x")?;
    q.require_dense("q")?;
    scales.require_dense("scales")?;
    let [m, k] = x.dims::<2>("x")?;
    q.expect_shape("q", &[m, k])?;
    scales.expect_shape("scales", &activation_scale_shape(m, k))?;
    let (mi, ki) = (to_i32("m", m)?, to_i32("k", k)?);
    let m_pad = to_i32("m", padded_scale_rows(m))?;
    if m == 0 || k == 0 {
        return Ok(());
    }
    let groups = (m as u64) * k.div_ceil(QUANT_BLOCK) as u64;
    let threads = groups * 16;
    let blocks = threads.div_ceil(256);
    let blocks = u32::try_from(blocks).map_err(|_| Error::shape("x", "fewer than 2^35 groups", groups))?;
    let vec = i32::from(k % 8 == 0);
    let ue8m0 = i32::from(format == ScaleFormat::Ue8m0);
    let f = gpu.function(MODULE, "act_quant_group128", 0)?;
    let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let stream = gpu.stream();
    let (xv, qv, sv) = (x.kernel_arg(stream), q.kernel_arg(stream), scales.kernel_arg(stream));
    let params = ActQuantParams { x: xv.addr(), q: qv.addr(), scales: sv.addr(), m: mi, k: ki, m_pad, ue8m0, vec };
    let mut launch = gpu.stream().launch_builder(&f);
    launch.arg(&params);
    // SAFETY: shapes were checked above: the kernel reads m·k bf16, writes m·k codes and ceil(k/128)·m_pad scales,
    // exactly the sizes of the three views; every index it forms is bounded by m, k and m_pad.
    unsafe { launch.launch(cfg) }.cuda_call("cuLaunchKernel")?;
    Ok(())
}

/// Allocating form of [`quantize_activations`].
///
/// Graph capture: no (allocates device memory); call it before capturing.
pub fn quantize_activations_new<'a>(
    gpu: &Gpu,
    x: impl Into<TensorRef<'a, bf16>>,
    format: ScaleFormat,
) -> Result<(DeviceTensor<E4M3>, DeviceTensor<f32>)> {
    let x = x.into();
    let [m, k] = x.dims::<2>("x")?;
    let mut q = DeviceTensor::zeros(gpu, &[m, k])?;
    let mut s = DeviceTensor::zeros(gpu, &activation_scale_shape(m, k))?;
    quantize_activations(gpu, x, &mut q, &mut s, format)?;
    Ok((q, s))
}

/// Quantizes bf16 weights `w` [n, k] into `q` [n, k] and `scales` [ceil(n/128), ceil(k/128)] (row-major).
///
/// Graph capture: yes (launches only; no allocation, copy or synchronization).
pub fn quantize_weights<'a>(
    gpu: &Gpu,
    w: impl Into<TensorRef<'a, bf16>>,
    q: impl Into<TensorMut<'a, E4M3>>,
    scales: impl Into<TensorMut<'a, f32>>,
    format: ScaleFormat,
) -> Result<()> {
    let (w, mut q, mut scales) = (w.into(), q.into(), scales.into());
    check_devices!(gpu, w, q, scales)?;
    w.require_dense("w")?;
    q.require_dense("q")?;
    scales.require_dense("scales")?;
    let [n, k] = w.dims::<2>("w")?;
    q.expect_shape("q", &[n, k])?;
    scales.expect_shape("scales", &weight_scale_shape(n, k))?;
    let (ni, ki) = (to_i32("n", n)?, to_i32("k", k)?);
    if n == 0 || k == 0 {
        return Ok(());
    }
    let [nb, kb] = weight_scale_shape(n, k);
    let grid_y =
        u32::try_from(nb).ok().filter(|&y| y <= 65_535).ok_or_else(|| Error::shape("w", "n ≤ 65535·128", n))?;
    let vec = i32::from(k % 8 == 0);
    let ue8m0 = i32::from(format == ScaleFormat::Ue8m0);
    let f = gpu.function(MODULE, "weight_quant_block128", 0)?;
    let cfg = LaunchConfig { grid_dim: (kb as u32, grid_y, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let stream = gpu.stream();
    let (wv, qv, sv) = (w.kernel_arg(stream), q.kernel_arg(stream), scales.kernel_arg(stream));
    let params = WeightQuantParams { w: wv.addr(), q: qv.addr(), scales: sv.addr(), n: ni, k: ki, ue8m0, vec };
    let mut launch = gpu.stream().launch_builder(&f);
    launch.arg(&params);
    // SAFETY: shapes checked above; the grid covers exactly ceil(n/128)×ceil(k/128) blocks and each thread bounds
    // its rows by n and its columns by k.
    unsafe { launch.launch(cfg) }.cuda_call("cuLaunchKernel")?;
    Ok(())
}

/// Allocating form of [`quantize_weights`].
///
/// Graph capture: no (allocates device memory); call it before capturing.
pub fn quantize_weights_new<'a>(
    gpu: &Gpu,
    w: impl Into<TensorRef<'a, bf16>>,
    format: ScaleFormat,
) -> Result<(DeviceTensor<E4M3>, DeviceTensor<f32>)> {
    let w = w.into();
    let [n, k] = w.dims::<2>("w")?;
    let mut q = DeviceTensor::zeros(gpu, &[n, k])?;
    let mut s = DeviceTensor::zeros(gpu, &weight_scale_shape(n, k))?;
    quantize_weights(gpu, w, &mut q, &mut s, format)?;
    Ok((q, s))
}
