//! FP8 block-scaled GEMM throughput (flops = 2·m·n·k), timed with CUDA events, beside two peers on the same shape:
//! cuBLASLt's block-scaled FP8 matmul (1×128 activation scales, 128×128 weight scales: scale modes
//! `VEC128_32F` = 4 and `BLK128x128_32F` = 5 of `cublasLtMatmulMatrixScale_t`, CUDA 12.9+, set through the raw
//! attribute API since the crate's cuda-12080 bindings lack those enum values) and cuBLAS bf16 GEMM. Prints the
//! ratios after each shape. A peer that the installed library rejects is reported and skipped. Prints a skip line
//! and exits when there is no GPU. The cuBLASLt wrapper lives in benches/common/cublaslt.rs (shared with the MoE
//! bench).

#[path = "common/cublaslt.rs"]
mod cublaslt;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use cublaslt::LtFp8;
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use r1_kernels::fp8_gemm::{fp8_gemm, GemmKernel, GemmOptions};
use r1_kernels::reference::fp8_gemm::calc_diff;
use r1_kernels::rng::SplitMix64;
use r1_kernels::timing::{median_launch_time, time_launches};
use r1_kernels::{bf16, DeviceTensor, E4M3};

const NK: [(usize, usize); 8] =
    [(2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048), (4096, 4096), (14336, 4096)];
const MS: [usize; 3] = [64, 128, 4096];

fn codes(n: usize, seed: u64) -> Vec<E4M3> {
    let mut rng = SplitMix64::new(seed);
    // Finite E4M3 codes only (0x7f / 0xff are NaN).
    (0..n).map(|_| E4M3((rng.next_u64() >> 56) as u8 & 0x7e)).collect()
}

fn bench_fp8_gemm(c: &mut Criterion) {
    let Some(gpu) = r1_kernels::device::bench_gpu("bench fp8_gemm") else { return };
    // cudarc panics on the first cuBLAS call when the library cannot be loaded: check first.
    // SAFETY: only dlopens the library.
    let blas = if unsafe { cudarc::cublas::sys::is_culib_present() } {
        CudaBlas::new(gpu.stream().clone()).ok()
    } else {
        None
    };
    if blas.is_none() {
        eprintln!("cuBLAS unavailable: bf16 peer skipped");
    }
    let mut group = c.benchmark_group("fp8_gemm");
    // 8 shapes × 3 m × 3 contenders: keep each short so the whole run fits a few minutes of device time.
    group.sample_size(10);
    group.warm_up_time(std::time::Duration::from_millis(300));
    group.measurement_time(std::time::Duration::from_secs(1));
    for &(n, k) in &NK {
        let b = DeviceTensor::from_host(&gpu, &codes(n * k, 1), &[n, k]).expect("upload b");
        let sb = DeviceTensor::from_host(
            &gpu,
            &vec![1e-3f32; n.div_ceil(128) * k.div_ceil(128)],
            &[n.div_ceil(128), k.div_ceil(128)],
        )
        .expect("upload sb");
        let b16 = gpu.stream().alloc_zeros::<bf16>(n * k).expect("alloc bf16 b");
        for &m in &MS {
            let flops = 2.0 * m as f64 * n as f64 * k as f64;
            let a = DeviceTensor::from_host(&gpu, &codes(m * k, 2), &[m, k]).expect("upload a");
            let m_pad = m.div_ceil(4) * 4;
            let sa = DeviceTensor::from_host(&gpu, &vec![1e-2f32; k.div_ceil(128) * m_pad], &[k.div_ceil(128), m_pad])
                .expect("upload sa");
            let mut out = DeviceTensor::<bf16>::zeros(&gpu, &[m, n]).expect("alloc out");
            let opts = GemmOptions { kernel: GemmKernel::Auto, ..Default::default() };
            group.throughput(Throughput::Elements(flops as u64));
            let shape = format!("{m}x{n}x{k}");
            group.bench_with_input(BenchmarkId::new("r1k", &shape), &(), |bch, _| {
                bch.iter_custom(|iters| {
                    time_launches(&gpu, iters, || fp8_gemm(&gpu, &a, &sa, &b, &sb, &mut out, &opts)).expect("launch")
                })
            });
            let ours = median_launch_time(&gpu, 5, 5, || fp8_gemm(&gpu, &a, &sa, &b, &sb, &mut out, &opts))
                .expect("time ours")
                .as_secs_f64();
            let mut line = format!("fp8_gemm {shape}: r1k {:.1} TFLOPS", flops / ours / 1e12);

            // The opt-in 2-CTA cluster multicast variant, for the large-m shapes it is meant for.
            if m == 4096 && gpu.info().is_hopper() {
                let mc = GemmOptions { kernel: GemmKernel::Sm90Multicast, ..Default::default() };
                match fp8_gemm(&gpu, &a, &sa, &b, &sb, &mut out, &mc) {
                    Ok(()) => {
                        group.bench_with_input(BenchmarkId::new("r1k_multicast", &shape), &(), |bch, _| {
                            bch.iter_custom(|iters| {
                                time_launches(&gpu, iters, || fp8_gemm(&gpu, &a, &sa, &b, &sb, &mut out, &mc))
                                    .expect("launch multicast")
                            })
                        });
                        let t = median_launch_time(&gpu, 5, 5, || fp8_gemm(&gpu, &a, &sa, &b, &sb, &mut out, &mc))
                            .expect("time multicast")
                            .as_secs_f64();
                        line += &format!(
                            ", r1k multicast {:.1} TFLOPS (multicast/r1k = {:.2}x)",
                            flops / t / 1e12,
                            ours / t
                        );
                    }
                    Err(e) => line += &format!(", r1k multicast skipped ({e})"),
                }
            }

            let mut d_lt = gpu.stream().alloc_zeros::<bf16>(m * n).expect("alloc lt out");
            match LtFp8::new(&gpu, m, n, k, &sa, &sb) {
                Ok(mut peer) => match peer.run(&a, &sa, &b, &sb, &mut d_lt) {
                    Ok(()) => {
                        group.bench_with_input(BenchmarkId::new("cublaslt_fp8_blockscaled", &shape), &(), |bch, _| {
                            bch.iter_custom(|iters| {
                                time_launches(&gpu, iters, || peer.run(&a, &sa, &b, &sb, &mut d_lt)).expect("launch lt")
                            })
                        });
                        let t = median_launch_time(&gpu, 5, 5, || peer.run(&a, &sa, &b, &sb, &mut d_lt))
                            .expect("time lt")
                            .as_secs_f64();
                        line +=
                            &format!(", cuBLASLt fp8 {:.1} TFLOPS (r1k/cuBLASLt = {:.2}x)", flops / t / 1e12, t / ours);
                        // Scales are constant here, so any scale-layout interpretation gives the same D: a large
                        // difference means the peer computes something else (and its timing means little).
                        let ours_d: Vec<f32> =
                            out.to_host(&gpu).expect("download").iter().map(|v| v.to_f32()).collect();
                        let lt_d: Vec<f32> =
                            gpu.stream().clone_dtoh(&d_lt).expect("download lt").iter().map(|v| v.to_f32()).collect();
                        line += &format!(" [calc_diff vs r1k {:.1e}]", calc_diff(&ours_d, &lt_d));
                    }
                    Err(e) => line += &format!(", cuBLASLt fp8 skipped ({e})"),
                },
                Err(e) => line += &format!(", cuBLASLt fp8 skipped ({e})"),
            }

            if let Some(blas) = &blas {
                let a16 = gpu.stream().alloc_zeros::<bf16>(m * k).expect("alloc bf16 a");
                let mut d16 = gpu.stream().alloc_zeros::<bf16>(m * n).expect("alloc bf16 d");
                // Row-major D[m,n] = A·Bᵀ as column-major Dᵀ[n,m] = op(B)[n,k]·A[k,m] with op(B) = T.
                let cfg = GemmConfig {
                    transa: cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_T,
                    transb: cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_N,
                    m: n as i32,
                    n: m as i32,
                    k: k as i32,
                    alpha: bf16::ONE,
                    lda: k as i32,
                    ldb: k as i32,
                    beta: bf16::ZERO,
                    ldc: n as i32,
                };
                let mut run16 = || -> r1_kernels::Result<()> {
                    // SAFETY: buffers hold n·k, m·k and m·n bf16 as the config describes.
                    unsafe { blas.gemm(cfg, &b16, &a16, &mut d16) }.map_err(|e| r1_kernels::Error::CudaLibrary {
                        call: "cublasGemmEx",
                        message: format!("{:?}", e.0),
                    })
                };
                group.bench_with_input(BenchmarkId::new("cublas_bf16", &shape), &(), |bch, _| {
                    bch.iter_custom(|iters| time_launches(&gpu, iters, &mut run16).expect("launch bf16"))
                });
                let t = median_launch_time(&gpu, 5, 5, &mut run16).expect("time bf16").as_secs_f64();
                line += &format!(", cuBLAS bf16 {:.1} TFLOPS (r1k/bf16 = {:.2}x)", flops / t / 1e12, t / ours);
            }
            println!("{line}");
        }
    }
    group.finish();
}

criterion_group!(benches, bench_fp8_gemm);
criterion_main!(benches);
