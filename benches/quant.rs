//! FP8 quantization throughput (bytes/s of minimum traffic), timed with CUDA events. Prints a skip line and exits
//! when there is no GPU.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use r1_kernels::quant::{activation_scale_shape, quantize_activations, quantize_weights, weight_scale_shape};
use r1_kernels::reference::quant::ScaleFormat;
use r1_kernels::rng::SplitMix64;
use r1_kernels::timing::time_launches;
use r1_kernels::{bf16, DeviceTensor, E4M3};

fn random_bf16(n: usize, seed: u64) -> Vec<bf16> {
    let mut rng = SplitMix64::new(seed);
    (0..n).map(|_| bf16::from_f32(rng.uniform(-4.0, 4.0))).collect()
}

fn bench_quant(c: &mut Criterion) {
    let Some(gpu) = r1_kernels::device::bench_gpu("bench quant") else { return };
    let mut group = c.benchmark_group("fp8_quant");
    group.sample_size(20);
    for &(m, k) in &[(128usize, 7168usize), (4096, 7168), (16384, 7168), (4096, 2048)] {
        let x = DeviceTensor::from_host(&gpu, &random_bf16(m * k, 1), &[m, k]).expect("upload");
        let mut q = DeviceTensor::<E4M3>::zeros(&gpu, &[m, k]).expect("alloc");
        let mut s = DeviceTensor::<f32>::zeros(&gpu, &activation_scale_shape(m, k)).expect("alloc");
        let bytes = 2 * m * k + m * k + 4 * m * k.div_ceil(128);
        group.throughput(Throughput::Bytes(bytes as u64));
        group.bench_with_input(BenchmarkId::new("act_1x128", format!("{m}x{k}")), &(), |b, _| {
            b.iter_custom(|iters| {
                time_launches(&gpu, iters, || quantize_activations(&gpu, &x, &mut q, &mut s, ScaleFormat::F32))
                    .expect("launch")
            })
        });
    }
    for &(n, k) in &[(7168usize, 2048usize), (24576, 1536), (7168, 16384)] {
        let w = DeviceTensor::from_host(&gpu, &random_bf16(n * k, 2), &[n, k]).expect("upload");
        let mut q = DeviceTensor::<E4M3>::zeros(&gpu, &[n, k]).expect("alloc");
        let mut s = DeviceTensor::<f32>::zeros(&gpu, &weight_scale_shape(n, k)).expect("alloc");
        let bytes = 3 * n * k + 4 * n.div_ceil(128) * k.div_ceil(128);
        group.throughput(Throughput::Bytes(bytes as u64));
        group.bench_with_input(BenchmarkId::new("weight_128x128", format!("{n}x{k}")), &(), |b, _| {
            b.iter_custom(|iters| {
                time_launches(&gpu, iters, || quantize_weights(&gpu, &w, &mut q, &mut s, ScaleFormat::F32))
                    .expect("launch")
            })
        });
    }
    // The ceiling: a device-to-device copy moving the same number of bytes (half read, half written).
    for &bytes in &[3usize * 4096 * 7168, 3 * 7168 * 16384] {
        let src = DeviceTensor::<u8>::zeros(&gpu, &[bytes / 2]).expect("alloc");
        let mut dst = DeviceTensor::<u8>::zeros(&gpu, &[bytes / 2]).expect("alloc");
        group.throughput(Throughput::Bytes(bytes as u64));
        group.bench_with_input(BenchmarkId::new("copy_peer", bytes), &(), |b, _| {
            b.iter_custom(|iters| {
                time_launches(&gpu, iters, || {
                    gpu.stream().memcpy_dtod(&src.view(), &mut dst.view_mut())?;
                    Ok(())
                })
                .expect("copy")
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_quant);
criterion_main!(benches);
