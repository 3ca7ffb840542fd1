//! MLA decode throughput, timed with CUDA events: bytes = KV read + q + o (criterion's Throughput::Bytes) and a
//! printed TFLOPS figure with FLOPs = 2·b·h·s_q·s_k·(576 + 512). Cases from the issue: memory-bound (b=128, h=16,
//! s_q=1, s_k 4k–32k), compute-bound (b=128, h=128, s_q=2), FP8 KV vs bf16 KV. Prints a skip line without a GPU.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use r1_kernels::mla::{mla_decode, mla_decode_fp8, Backend, MlaConfig, MlaOptions, MlaPlan, MlaWorkspace};
use r1_kernels::reference::mla::{D_QK, D_V, FP8_TOKEN_BYTES};
use r1_kernels::rng::SplitMix64;
use r1_kernels::timing::{median_launch_time, time_launches};
use r1_kernels::{bf16, DeviceTensor, Gpu};

const PAGE: usize = 64;

/// A repeating pseudo-random pattern: values do not matter for speed, and building multi-GB inputs must be quick.
fn pattern<T: Copy>(n: usize, f: impl Fn(u64) -> T) -> Vec<T> {
    let mut rng = SplitMix64::new(0x9e37_79b9_7f4a_7c15);
    let chunk: Vec<T> = (0..(1usize << 20).min(n.max(1))).map(|_| f(rng.next_u64())).collect();
    chunk.iter().copied().cycle().take(n).collect()
}

struct Setup {
    cfg: MlaConfig,
    q: DeviceTensor<bf16>,
    table: DeviceTensor<i32>,
    seqlens: DeviceTensor<i32>,
    seqlens_host: Vec<i32>,
    out: DeviceTensor<bf16>,
    lse: DeviceTensor<f32>,
    blocks: usize,
}

fn setup(gpu: &Gpu, b: usize, h: usize, s_q: usize, s_k: usize) -> Setup {
    let cfg = MlaConfig { batch: b, s_q, heads: h, page_size: PAGE, softmax_scale: 0.0625, causal: true };
    let per_seq = s_k.div_ceil(PAGE);
    let blocks = b * per_seq;
    // Each sequence owns distinct pages, interleaved so neighbours in the table are far apart in memory.
    let table: Vec<i32> = (0..blocks).map(|i| ((i % b) * per_seq + i / b) as i32).collect();
    let q = pattern(b * s_q * h * D_QK, |s| bf16::from_f32((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5));
    let seqlens = vec![s_k as i32; b];
    Setup {
        cfg,
        q: DeviceTensor::from_host(gpu, &q, &[b, s_q, h, D_QK]).expect("q"),
        table: DeviceTensor::from_host(gpu, &table, &[b, per_seq]).expect("table"),
        seqlens: DeviceTensor::from_host(gpu, &seqlens, &[b]).expect("seqlens"),
        seqlens_host: seqlens,
        out: DeviceTensor::zeros(gpu, &[b, s_q, h, D_V]).expect("out"),
        lse: DeviceTensor::zeros(gpu, &[b, h, s_q]).expect("lse"),
        blocks,
    }
}

fn bench_mla(c: &mut Criterion) {
    let Some(gpu) = r1_kernels::device::bench_gpu("bench mla") else { return };
    let mut group = c.benchmark_group("mla_decode");
    group.sample_size(10);
    group.warm_up_time(std::time::Duration::from_millis(500));
    group.measurement_time(std::time::Duration::from_secs(2));
    let mut backends = vec![Backend::Portable];
    if gpu.info().is_hopper() {
        backends.push(Backend::Hopper);
        backends.push(Backend::HopperWide);
    }
    let cases: &[(usize, usize, usize, usize)] =
        &[(128, 16, 1, 4096), (128, 16, 1, 8192), (128, 16, 1, 16384), (128, 16, 1, 32768), (128, 128, 2, 4096)];
    for &(b, h, s_q, s_k) in cases {
        let mut s = setup(&gpu, b, h, s_q, s_k);
        let tokens = s.blocks * PAGE;
        let bf = pattern(tokens * D_QK, |x| bf16::from_f32((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5));
        let cache = DeviceTensor::from_host(&gpu, &bf, &[s.blocks, PAGE, D_QK]).expect("cache");
        drop(bf);
        // FP8 cache: random codes with finite (|code| < 0x7f) values and scale 1/64, bf16 RoPE.
        let f8 = pattern(tokens * FP8_TOKEN_BYTES, |x| (x >> 33) as u8 & 0x5f);
        let mut f8 = f8;
        for tok in f8.chunks_exact_mut(FP8_TOKEN_BYTES) {
            for t in 0..4 {
                tok[512 + 4 * t..516 + 4 * t].copy_from_slice(&(1.0f32 / 64.0).to_le_bytes());
            }
        }
        let cache8 = DeviceTensor::from_host(&gpu, &f8, &[s.blocks, PAGE, FP8_TOKEN_BYTES]).expect("cache8");
        drop(f8);
        let flops = 2.0 * (b * h * s_q * s_k) as f64 * (D_QK + D_V) as f64;
        let qo = b * s_q * h * (2 * D_QK + 2 * D_V);
        for &backend in &backends {
            let plan = MlaPlan::for_backend(&gpu, &s.seqlens_host, &s.cfg, backend).expect("plan");
            let mut ws = MlaWorkspace::new(&gpu, &plan, &s.cfg).expect("workspace");
            for fp8 in [false, true] {
                let kv_bytes = b * s_k * if fp8 { FP8_TOKEN_BYTES } else { 2 * D_QK };
                let bytes = kv_bytes + qo;
                let opts = MlaOptions { block_table_host: None, backend };
                let cfg = s.cfg;
                let Setup { q, table, seqlens, out, lse, .. } = &mut s;
                let (plan, ws) = (&plan, &mut ws);
                let mut launch = || {
                    if fp8 {
                        mla_decode_fp8(
                            &gpu, &*q, &cache8, &*table, &*seqlens, plan, &cfg, &mut *out, &mut *lse, ws, &opts,
                        )
                    } else {
                        mla_decode(&gpu, &*q, &cache, &*table, &*seqlens, plan, &cfg, &mut *out, &mut *lse, ws, &opts)
                    }
                };
                let name = format!("{backend:?}/{}", if fp8 { "fp8" } else { "bf16" });
                let id = format!("b{b}_h{h}_sq{s_q}_sk{s_k}");
                match median_launch_time(&gpu, 5, 3, &mut launch) {
                    Ok(t) => {
                        let sec = t.as_secs_f64();
                        println!(
                            "mla {name} {id}: {:.1} us, {:.0} GB/s, {:.1} TFLOPS, {:.2} Mtok/s",
                            sec * 1e6,
                            bytes as f64 / sec / 1e9,
                            flops / sec / 1e12,
                            (b * s_k) as f64 / sec / 1e6
                        );
                    }
                    Err(e) => {
                        println!("mla {name} {id}: skipped ({e})");
                        continue;
                    }
                }
                group.throughput(Throughput::Bytes(bytes as u64));
                group.bench_with_input(BenchmarkId::new(name, id), &(), |bch, _| {
                    bch.iter_custom(|iters| time_launches(&gpu, iters, &mut launch).expect("launch"))
                });
            }
        }
    }
    group.finish();
}

criterion_group!(benches, bench_mla);
criterion_main!(benches);
