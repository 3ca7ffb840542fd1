//! Opens device 0 through r1-kernels in a binary whose cudarc links libcuda at build time, shares the context with
//! the binary's own cudarc, and checks one kernel against the CPU reference, run over the binary's own cudarc
//! allocations through borrowed views. Prints the device on success; prints the error and exits non-zero otherwise.

use std::process::ExitCode;
use std::sync::Arc;

use r1_kernels::reference::quant::{quantize_per_token_group, scales_from_mn_major, ScaleFormat};
use r1_kernels::{bf16, quant, Gpu, TensorMut, TensorRef, E4M3};

fn run() -> Result<String, String> {
    let gpu = Gpu::new(0).map_err(|e| format!("Gpu::new(0) failed: {e}"))?;
    // The binary's cudarc and r1-kernels' are the same crate: the context's type is the binary's own.
    let ctx: Arc<cudarc::driver::CudaContext> = gpu.context().clone();
    let on_default_stream = Gpu::with_stream(ctx.default_stream()).map_err(|e| format!("Gpu::with_stream: {e}"))?;
    let device = format!("{} ({})", gpu.device_name(), gpu.info().arch_name());

    let (m, k) = (2, 256);
    let x: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 8.0).collect();
    let x_bf16: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
    let x_rounded: Vec<f32> = x_bf16.iter().map(|v| v.to_f32()).collect();
    let (want_q, want_s) = quantize_per_token_group(&x_rounded, m, k, quant::QUANT_BLOCK).map_err(|e| e.to_string())?;

    // The binary's own allocations, on the stream it shares with the crate.
    let stream = ctx.default_stream();
    let scale_shape = quant::activation_scale_shape(m, k);
    let x_dev = stream.clone_htod(&x_bf16).map_err(|e| format!("clone_htod: {e}"))?;
    let mut q_dev = stream.alloc_zeros::<E4M3>(m * k).map_err(|e| format!("alloc: {e}"))?;
    let mut s_dev = stream.alloc_zeros::<f32>(scale_shape[0] * scale_shape[1]).map_err(|e| format!("alloc: {e}"))?;
    let quantized = TensorRef::from_cuda_slice(&x_dev, &[m, k], None)
        .and_then(|x| {
            let q = TensorMut::from_cuda_slice(&mut q_dev, &[m, k], None)?;
            let s = TensorMut::from_cuda_slice(&mut s_dev, &scale_shape, None)?;
            quant::quantize_activations(&on_default_stream, x, q, s, ScaleFormat::F32)
        })
        .map_err(|e| e.to_string())
        .and_then(|()| {
            let q = stream.clone_dtoh(&q_dev).map_err(|e| format!("clone_dtoh: {e}"))?;
            let s = stream.clone_dtoh(&s_dev).map_err(|e| format!("clone_dtoh: {e}"))?;
            Ok((q, s))
        });
    match quantized {
        Ok((q, s)) => {
            let s = scales_from_mn_major(&s, m, k / quant::QUANT_BLOCK).map_err(|e| e.to_string())?;
            if q != want_q || s != want_s {
                return Err(format!("{device}: quantize_activations differs from the CPU reference"));
            }
            Ok(format!("{device}: quantize_activations matches the CPU reference"))
        }
        Err(e) => Err(format!("{device}: quantize_activations failed: {e}")),
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(line) => {
            println!("{line}");
            ExitCode::FAILURE
        }
    }
}
