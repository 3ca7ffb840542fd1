//! Decode-step ops: RMSNorm (bytes), per-head bmm for W_UK absorption (flops), RoPE (bytes). GPU events.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use r1_kernels::decode_ops::{self, HeadWeightStrides, RopeSlices, RopeTables};
use r1_kernels::reference::decode_ops::RopeConfig;
use r1_kernels::timing::time_launches;
use r1_kernels::{bf16, DeviceTensor};

fn filled(n: usize) -> Vec<bf16> {
    (0..n).map(|i| bf16::from_f32(((i * 2_654_435_761) % 1000) as f32 / 1000.0 - 0.5)).collect()
}

fn bench_decode_ops(c: &mut Criterion) {
    let Some(gpu) = r1_kernels::device::bench_gpu("bench decode_ops") else { return };
    let mut group = c.benchmark_group("decode_ops");
    group.sample_size(20);
    for &rows in &[64usize, 256] {
        let d = 7168;
        let x = DeviceTensor::from_host(&gpu, &filled(rows * d), &[rows, d]).expect("upload");
        let w = DeviceTensor::from_host(&gpu, &filled(d), &[d]).expect("upload");
        let mut y = DeviceTensor::<bf16>::zeros(&gpu, &[rows, d]).expect("alloc");
        group.throughput(Throughput::Bytes((4 * rows * d + 2 * d) as u64));
        group.bench_with_input(BenchmarkId::new("rms_norm", format!("{rows}x{d}")), &(), |b, _| {
            b.iter_custom(|iters| {
                time_launches(&gpu, iters, || decode_ops::rms_norm(&gpu, &x, &w, &mut y, 1e-6)).expect("launch")
            })
        });
    }
    for &t in &[64usize, 128] {
        let (heads, nope, latent) = (128usize, 128usize, 512usize);
        let x = DeviceTensor::from_host(&gpu, &filled(t * heads * nope), &[t, heads, nope]).expect("upload");
        let w = DeviceTensor::from_host(&gpu, &filled(heads * 256 * latent), &[heads * 256, latent]).expect("upload");
        let mut out = DeviceTensor::<bf16>::zeros(&gpu, &[t, heads, latent]).expect("alloc");
        let strides = HeadWeightStrides { offset: 0, head: 256 * latent, i: latent, j: 1 };
        group.throughput(Throughput::Elements((2 * t * heads * nope * latent) as u64));
        group.bench_with_input(BenchmarkId::new("absorb_w_uk_flops", t), &(), |b, _| {
            b.iter_custom(|iters| {
                time_launches(&gpu, iters, || decode_ops::head_bmm(&gpu, &x, &w, strides, &mut out)).expect("launch")
            })
        });
    }
    let tables = RopeTables::new(&gpu, RopeConfig::deepseek_v3()).expect("tables");
    let t = 256usize;
    let mut q = DeviceTensor::from_host(&gpu, &filled(t * 128 * 192), &[t, 128 * 192]).expect("upload");
    let pos = DeviceTensor::from_host(&gpu, &(0..t as i32).collect::<Vec<_>>(), &[t]).expect("upload");
    group.throughput(Throughput::Bytes((t * 128 * 64 * 4) as u64));
    group.bench_function("rope_q_256", |b| {
        b.iter_custom(|iters| {
            time_launches(&gpu, iters, || {
                decode_ops::rope_inplace(
                    &gpu,
                    &mut q,
                    &pos,
                    &tables,
                    RopeSlices { count: 128, stride: 192, offset: 128 },
                )
            })
            .expect("launch")
        })
    });
    group.finish();
}

criterion_group!(benches, bench_decode_ops);
criterion_main!(benches);
