//! Opens device 0 through r1-kernels in a binary whose cudarc links libcuda at build time, shares the context with
//! the binary's own cudarc, and checks one kernel against the CPU reference. Prints the device on success; prints
//! the error and exits non-zero otherwise.

use std::process::ExitCode;
use std::sync::Arc;

use r1_kernels::reference::quant::{quantize_per_token_group, scales_from_mn_major, ScaleFormat};
use r1_kernels::{bf16, quant, DeviceTensor, Gpu};

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

    let quantized = DeviceTensor::from_host(&on_default_stream, &x_bf16, &[m, k])
        .and_then(|xd| quant::quantize_activations_new(&on_default_stream, &xd, ScaleFormat::F32))
        .and_then(|(q, s)| Ok((q.to_host(&on_default_stream)?, s.to_host(&on_default_stream)?)));
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
