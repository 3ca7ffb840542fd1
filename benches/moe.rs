//! MoE benchmarks, timed with CUDA events: router (128 tokens, E=256), grouped FP8 GEMM contiguous (8 experts × 4096
//! rows, N=4096, K=7168: flops) and masked (4 × 256 rows, N=7168, K=2048: flops), and the whole DeepSeek-V3 layer at
//! 128 tokens (bytes of expert weights it must read). Prints a skip line and exits when there is no GPU.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use r1_kernels::moe::{
    expert_weight_bytes, grouped_gemm, moe_forward, permute, route, upload_topk_ids, ExpertWeights, Layout,
    MoeWorkspace, Permuted, RouterConfig, Routing,
};
use r1_kernels::quant::{activation_scale_shape, quantize_activations};
use r1_kernels::reference::quant::ScaleFormat;
use r1_kernels::timing::time_launches;
use r1_kernels::{bf16, DeviceTensor, Gpu, E4M3};

fn random_f32(n: usize, scale: f32, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

fn fill_repeated<T: cudarc::driver::DeviceRepr + Copy>(gpu: &Gpu, dst: &mut DeviceTensor<T>, pattern: &[T]) {
    let n = dst.numel();
    let mut at = 0;
    while at < n {
        let len = pattern.len().min(n - at);
        let mut view = dst.buffer_mut().slice_mut(at..at + len);
        gpu.stream().memcpy_htod(&pattern[..len], &mut view).expect("upload");
        at += len;
    }
}

fn weights(gpu: &Gpu, e: usize, n: usize, k: usize) -> (DeviceTensor<E4M3>, DeviceTensor<f32>) {
    // Random non-NaN codes straight from bits (E4M3::from_f32 on millions of values is slow on the host).
    let codes: Vec<E4M3> = random_f32((1 << 22) + 7, 1.0, 1)
        .into_iter()
        .map(|v| {
            let b = (v.to_bits() >> 7) as u8;
            E4M3(if b & 0x7f == 0x7f { b - 1 } else { b })
        })
        .collect();
    let scales: Vec<f32> = random_f32(4099, 1.0, 2).into_iter().map(|v| (1.5 + v) / 448.0 / 60.0).collect();
    let mut w = DeviceTensor::zeros(gpu, &[e, n, k]).expect("alloc");
    let mut s = DeviceTensor::zeros(gpu, &[e, n / 128, k / 128]).expect("alloc");
    fill_repeated(gpu, &mut w, &codes);
    fill_repeated(gpu, &mut s, &scales);
    (w, s)
}

/// Permuted activations for `t` tokens where token i's slots go to experts `ids_of(i)`.
fn permuted(gpu: &Gpu, t: usize, k: usize, e: usize, hidden: usize, layout: Layout, ids: &[i32]) -> Permuted {
    let x: Vec<bf16> = random_f32(t * hidden, 2.0, 3).into_iter().map(bf16::from_f32).collect();
    let xd = DeviceTensor::from_host(gpu, &x, &[t, hidden]).expect("upload");
    let mut xq = DeviceTensor::zeros(gpu, &[t, hidden]).expect("alloc");
    let mut xs = DeviceTensor::zeros(gpu, &activation_scale_shape(t, hidden)).expect("alloc");
    quantize_activations(gpu, &xd, &mut xq, &mut xs, ScaleFormat::F32).expect("quant");
    let mut p = Permuted::new(gpu, t, k, e, hidden, layout).expect("alloc");
    let idd = upload_topk_ids(gpu, ids, t, k, e).expect("ids");
    permute(gpu, &idd, &xq, &xs, &mut p).expect("permute");
    p
}

fn bench_moe(c: &mut Criterion) {
    let Some(gpu) = r1_kernels::device::test_gpu("bench moe") else { return };
    let mut group = c.benchmark_group("moe");
    group.sample_size(10);

    // Router: 128 tokens, DeepSeek-V3 config.
    {
        let cfg = RouterConfig::deepseek_v3();
        let t = 128;
        let logits = DeviceTensor::from_host(&gpu, &random_f32(t * 256, 3.0, 4), &[t, 256]).expect("upload");
        let bias = DeviceTensor::from_host(&gpu, &random_f32(256, 0.05, 5), &[256]).expect("upload");
        let mut ids = DeviceTensor::zeros(&gpu, &[t, 8]).expect("alloc");
        let mut w = DeviceTensor::zeros(&gpu, &[t, 8]).expect("alloc");
        group.throughput(Throughput::Elements(t as u64));
        group.bench_function(BenchmarkId::new("router_ds_v3", "t128_e256"), |b| {
            b.iter_custom(|iters| {
                time_launches(&gpu, iters, || route(&gpu, &cfg, &logits, Some(&bias), &mut ids, &mut w))
                    .expect("launch")
            })
        });
    }

    // Grouped contiguous: 8 experts × 4096 rows, N=4096, K=7168.
    {
        let (t, k, e, n, kd) = (4096, 8, 8, 4096, 7168);
        let ids: Vec<i32> = (0..t * k).map(|i| (i % k) as i32).collect();
        let p = permuted(&gpu, t, k, e, kd, Layout::Contiguous { block_m: 128 }, &ids);
        let (w, s) = weights(&gpu, e, n, kd);
        let mut out = DeviceTensor::zeros(&gpu, &[p.capacity(), n]).expect("alloc");
        group.throughput(Throughput::Elements((2 * t * k * n * kd) as u64));
        group.bench_function(BenchmarkId::new("grouped_contiguous_fp8", "8x4096_n4096_k7168"), |b| {
            b.iter_custom(|iters| {
                time_launches(&gpu, iters, || {
                    grouped_gemm(&gpu, &p.codes, &p.scales, &w, &s, &p.offsets, &p.counts, &mut out)
                })
                .expect("launch")
            })
        });
    }

    // Grouped masked: 4 experts × 256 rows, N=7168, K=2048.
    {
        let (t, k, e, n, kd) = (256, 4, 4, 7168, 2048);
        let ids: Vec<i32> = (0..t * k).map(|i| (i % k) as i32).collect();
        let p = permuted(&gpu, t, k, e, kd, Layout::Masked { max_m: 256 }, &ids);
        let (w, s) = weights(&gpu, e, n, kd);
        let mut out = DeviceTensor::zeros(&gpu, &[p.capacity(), n]).expect("alloc");
        group.throughput(Throughput::Elements((2 * t * k * n * kd) as u64));
        group.bench_function(BenchmarkId::new("grouped_masked_fp8", "4x256_n7168_k2048"), |b| {
            b.iter_custom(|iters| {
                time_launches(&gpu, iters, || {
                    grouped_gemm(&gpu, &p.codes, &p.scales, &w, &s, &p.offsets, &p.counts, &mut out)
                })
                .expect("launch")
            })
        });
    }

    // Full DeepSeek-V3 layer at 128 tokens: throughput = bytes of expert weights read (experts hit + shared).
    {
        let cfg = RouterConfig::deepseek_v3();
        let (t, h, i) = (128, 7168, 2048);
        let logits_h = random_f32(t * 256, 3.0, 6);
        let bias_h = random_f32(256, 0.05, 7);
        let (ids_h, _) = r1_kernels::reference::moe::route(&logits_h, Some(&bias_h), t, &cfg).expect("route");
        let mut hit = vec![false; 256];
        for &id in &ids_h {
            hit[id as usize] = true;
        }
        let hit = hit.iter().filter(|&&b| b).count();
        let (w13, w13_scales) = weights(&gpu, 256, 2 * i, h);
        let (w2, w2_scales) = weights(&gpu, 256, h, i);
        let experts = ExpertWeights { w13, w13_scales, w2, w2_scales };
        let (w13, w13_scales) = weights(&gpu, 1, 2 * i, h);
        let (w2, w2_scales) = weights(&gpu, 1, h, i);
        let shared = ExpertWeights { w13, w13_scales, w2, w2_scales };
        let x: Vec<bf16> = random_f32(t * h, 2.0, 8).into_iter().map(bf16::from_f32).collect();
        let x = DeviceTensor::from_host(&gpu, &x, &[t, h]).expect("upload");
        let logits = DeviceTensor::from_host(&gpu, &logits_h, &[t, 256]).expect("upload");
        let bias = DeviceTensor::from_host(&gpu, &bias_h, &[256]).expect("upload");
        let mut ws = MoeWorkspace::new(&gpu, &cfg, t, h, i, Some(i), Layout::Contiguous { block_m: 64 }).expect("ws");
        let mut out = DeviceTensor::zeros(&gpu, &[t, h]).expect("alloc");
        group.throughput(Throughput::Bytes(expert_weight_bytes(hit + 1, h, i)));
        group.bench_function(BenchmarkId::new("layer_ds_v3", format!("t128_{hit}experts")), |b| {
            b.iter_custom(|iters| {
                time_launches(&gpu, iters, || {
                    let routing = Routing::Logits(&logits, Some(&bias));
                    moe_forward(&gpu, &cfg, &experts, Some(&shared), &x, routing, &mut ws, &mut out)
                })
                .expect("launch")
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_moe);
criterion_main!(benches);
