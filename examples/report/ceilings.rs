//! Measuring the report's ceilings on the device, in the same run as the kernels: device-to-device copy bandwidth and
//! the cuBLAS bf16 GEMM rate. Without a GPU (or without libcublas) these return an error; they never invent a value.

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};

use r1_kernels::device::Gpu;
use r1_kernels::error::{Error, Result};
use r1_kernels::timing::median_launch_time;
use r1_kernels::{bf16, DeviceTensor};

/// Default copy size: 1 GiB, far beyond the H200's 60 MB L2, so the copy streams from HBM.
pub const COPY_BYTES: usize = 1 << 30;

/// Default GEMM shape for the cuBLAS ceiling: large and square, where cuBLAS reaches its peak.
pub const GEMM_MNK: (usize, usize, usize) = (8192, 8192, 8192);

/// Device-to-device copy bandwidth in GB/s, counting the bytes read plus the bytes written (`2 · bytes` per copy),
/// the same convention as the kernels' minimum traffic. Median of 5 batches of 10 copies.
pub fn measure_copy_gbps(gpu: &Gpu, bytes: usize) -> Result<f64> {
    if bytes == 0 {
        return Err(Error::InvalidConfig("copy size must be positive".into()));
    }
    let stream = gpu.stream();
    let src = stream.alloc_zeros::<u8>(bytes)?;
    let mut dst = stream.alloc_zeros::<u8>(bytes)?;
    let t = median_launch_time(gpu, 10, 5, || Ok(stream.memcpy_dtod(&src, &mut dst)?))?;
    Ok(2.0 * bytes as f64 / t.as_secs_f64() / 1e9)
}

/// cuBLAS bf16 GEMM rate in TFLOPS (`2·m·n·k` per call) for row-major `C[m, n] = A[m, k] · B[n, k]ᵀ` with f32
/// accumulation (the layout of a linear layer). Median of 5 batches of 5 calls.
pub fn measure_cublas_bf16_tflops(gpu: &Gpu, m: usize, n: usize, k: usize) -> Result<f64> {
    // cudarc loads libcublas lazily and panics when it is missing: check first.
    // SAFETY: only tries to dlopen libcublas.
    if !unsafe { cudarc::cublas::sys::is_culib_present() } {
        return Err(Error::CudaLibrary {
            call: "cublasCreate",
            message: "libcublas could not be loaded, so the cuBLAS ceiling cannot be measured".into(),
        });
    }
    let to_i32 = |v: usize, what: &'static str| {
        i32::try_from(v).map_err(|_| Error::shape(what, "a dimension that fits in i32", v))
    };
    let (mi, ni, ki) = (to_i32(m, "m")?, to_i32(n, "n")?, to_i32(k, "k")?);
    if m == 0 || n == 0 || k == 0 {
        return Err(Error::InvalidConfig("GEMM dimensions must be positive".into()));
    }
    let blas = CudaBlas::new(gpu.stream().clone())
        .map_err(|e| Error::CudaLibrary { call: "cublasCreate", message: format!("{:?}", e.0) })?;
    // Small non-zero values, so the timing is not of a degenerate all-zero input.
    let fill = |len: usize, salt: usize| -> Vec<bf16> {
        (0..len).map(|i| bf16::from_f32((((i * 7 + salt) % 17) as f32 - 8.0) / 64.0)).collect()
    };
    let a = DeviceTensor::from_host(gpu, &fill(m * k, 1), &[m, k])?;
    let b = DeviceTensor::from_host(gpu, &fill(n * k, 2), &[n, k])?;
    let mut c = DeviceTensor::<bf16>::zeros(gpu, &[m, n])?;
    // Column-major view: Cᵀ[n, m] = op(B)·A with op = transpose of B stored [k, n] column-major.
    let cfg = GemmConfig {
        transa: cublasOperation_t::CUBLAS_OP_T,
        transb: cublasOperation_t::CUBLAS_OP_N,
        m: ni,
        n: mi,
        k: ki,
        alpha: bf16::ONE,
        lda: ki,
        ldb: ki,
        beta: bf16::ZERO,
        ldc: ni,
    };
    let t = median_launch_time(gpu, 5, 5, || {
        // SAFETY: the buffers hold exactly n·k, m·k and m·n elements, matching the leading dimensions above.
        unsafe { blas.gemm(cfg, b.buffer(), a.buffer(), &mut c.view_mut()) }
            .map_err(|e| Error::CudaLibrary { call: "cublasGemmEx", message: format!("{:?}", e.0) })
    })?;
    Ok(2.0 * m as f64 * n as f64 * k as f64 / t.as_secs_f64() / 1e12)
}
