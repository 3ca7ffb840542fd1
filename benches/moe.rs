//! MoE benchmarks, timed with CUDA events: router (128 tokens, E=256), grouped FP8 GEMM contiguous (8 experts × 4096
//! rows, N=4096, K=7168: flops) and masked (4 × 256 rows, N=7168, K=2048: flops), both on the default backend
//! (the TMA + wgmma kernel on sm_90), and the whole DeepSeek-V3 layer at 128 tokens (bytes of expert weights it
//! must read) beside its peer, a loop of per-expert cuBLASLt block-scaled FP8 GEMMs on the same routed data (same throughput, so criterion prints comparable numbers; the speedup is printed
//! after the group, or why the peer was skipped). Prints a skip line and exits when there is no GPU.

#[path = "common/cublaslt.rs"]
mod cublaslt;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use cublaslt::{LtContext, LtFp8Gemm};
use cudarc::driver::CudaView;
use r1_kernels::moe::{
    expert_weight_bytes, grouped_gemm, moe_forward, permute, route, swiglu_quant, upload_topk_ids, ExpertWeights,
    Layout, MoeWorkspace, Permuted, RouterConfig, Routing,
};
use r1_kernels::quant::{activation_scale_shape, quantize_activations};
use r1_kernels::reference::moe::calc_diff;
use r1_kernels::reference::quant::ScaleFormat;
use r1_kernels::rng::SplitMix64;
use r1_kernels::timing::{median_launch_time, time_launches};
use r1_kernels::{bf16, DeviceTensor, Gpu, E4M3};

fn random_f32(n: usize, scale: f32, seed: u64) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed);
    (0..n).map(|_| rng.uniform(-scale, scale)).collect()
}

fn fill_repeated<T: cudarc::driver::DeviceRepr + Copy>(gpu: &Gpu, dst: &mut DeviceTensor<T>, pattern: &[T]) {
    let n = dst.numel();
    let mut at = 0;
    while at < n {
        let len = pattern.len().min(n - at);
        let mut all = dst.view_mut();
        let mut view = all.slice_mut(at..at + len);
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

/// One expert's work in the cuBLASLt loop peer of the full layer, every buffer and descriptor prepared up front:
/// gate+up `[m, H]×[2I, H]ᵀ`, the crate's fused SwiGLU + requant (the real activation, so the down GEMM reads what
/// the layer's would; the GEMMs dominate the time anyway), down `[m, I]×[H, I]ᵀ`.
struct PeerJob<'w> {
    weights: &'w ExpertWeights,
    expert: usize,
    /// Token rows routed to the expert; `m` ≥ rows when cuBLASLt needed zero padding rows.
    rows: usize,
    a: DeviceTensor<E4M3>,
    sa: DeviceTensor<f32>,
    h: DeviceTensor<bf16>,
    act: DeviceTensor<E4M3>,
    act_s: DeviceTensor<f32>,
    y: DeviceTensor<bf16>,
    up: LtFp8Gemm,
    down: LtFp8Gemm,
}

/// Expert `e`'s slice of a tensor whose first dimension is the expert.
fn expert_view<T: cudarc::driver::DeviceRepr>(t: &DeviceTensor<T>, e: usize) -> CudaView<'_, T> {
    let per = t.numel() / t.shape()[0].max(1);
    t.buffer().slice(e * per..(e + 1) * per)
}

impl<'w> PeerJob<'w> {
    /// Gathers `tokens` rows of the quantized input (`xq` `[t, H]`, `xs` `[H/128, round_up(t, 4)]`, as the layer
    /// quantized them) into the expert's own buffers. Tries `m` = the row count first, then (if cuBLASLt rejects it)
    /// rows padded with zeros to a multiple of 16. Returns the job and whether it was padded.
    #[allow(clippy::too_many_arguments)]
    fn new(
        gpu: &Gpu,
        ctx: &LtContext,
        weights: &'w ExpertWeights,
        expert: usize,
        tokens: &[usize],
        xq: &[E4M3],
        xs: &[f32],
        t: usize,
    ) -> Result<(Self, bool), String> {
        let (_, i2, h) = (weights.w13.shape()[0], weights.w13.shape()[1], weights.w13.shape()[2]);
        let i = i2 / 2;
        let (hb, t_pad) = (h / 128, t.div_ceil(4) * 4);
        let rows = tokens.len();
        let mut first_err = None;
        let mut tries = vec![rows];
        if !rows.is_multiple_of(16) {
            tries.push(rows.div_ceil(16) * 16);
        }
        for m in tries {
            let m_pad = m.div_ceil(4) * 4;
            let mut codes = vec![E4M3(0); m * h];
            let mut scales = vec![0f32; hb * m_pad];
            for (r, &tok) in tokens.iter().enumerate() {
                codes[r * h..(r + 1) * h].copy_from_slice(&xq[tok * h..(tok + 1) * h]);
                for g in 0..hb {
                    scales[g * m_pad + r] = xs[g * t_pad + tok];
                }
            }
            let dev = |e: r1_kernels::Error| e.to_string();
            let a = DeviceTensor::from_host(gpu, &codes, &[m, h]).map_err(dev)?;
            let sa = DeviceTensor::from_host(gpu, &scales, &[hb, m_pad]).map_err(dev)?;
            let act_s = DeviceTensor::zeros(gpu, &activation_scale_shape(m, i)).map_err(dev)?;
            let plans =
                LtFp8Gemm::new(ctx, m, i2, h, &sa.view(), &expert_view(&weights.w13_scales, expert)).and_then(|up| {
                    LtFp8Gemm::new(ctx, m, h, i, &act_s.view(), &expert_view(&weights.w2_scales, expert))
                        .map(|down| (up, down))
                });
            match plans {
                Ok((up, down)) => {
                    let job = PeerJob {
                        weights,
                        expert,
                        rows,
                        a,
                        sa,
                        h: DeviceTensor::zeros(gpu, &[m, i2]).map_err(dev)?,
                        act: DeviceTensor::zeros(gpu, &[m, i]).map_err(dev)?,
                        act_s,
                        y: DeviceTensor::zeros(gpu, &[m, h]).map_err(dev)?,
                        up,
                        down,
                    };
                    return Ok((job, m != rows));
                }
                Err(e) => {
                    first_err.get_or_insert(format!("m = {m}: {e}"));
                }
            }
        }
        Err(first_err.unwrap_or_default())
    }

    fn run(&mut self, gpu: &Gpu, ctx: &mut LtContext) -> r1_kernels::Result<()> {
        let (w, e) = (self.weights, self.expert);
        let (w13, s13) = (expert_view(&w.w13, e), expert_view(&w.w13_scales, e));
        self.up.run(ctx, &self.a.view(), &self.sa.view(), &w13, &s13, &mut self.h.view_mut())?;
        swiglu_quant(gpu, &self.h, &mut self.act, &mut self.act_s, ScaleFormat::F32, r1_kernels::no_tensor())?;
        let (w2, s2) = (expert_view(&w.w2, e), expert_view(&w.w2_scales, e));
        self.down.run(ctx, &self.act.view(), &self.act_s.view(), &w2, &s2, &mut self.y.view_mut())
    }
}

/// The peer of the full-layer bench: per-expert cuBLASLt GEMMs over the tokens the layer routed (read back from
/// `ws` after one layer call), plus the shared expert over all tokens, so it reads the same expert weights as the
/// layer. Routing, permutation, quantization of `x` and the weighted combine are *not* in the peer (they are in
/// ours), which only flatters the peer. Returns the jobs and a note (padding, routing mismatch, agreement with the
/// layer's own gate+up / down outputs).
fn layer_peer<'w>(
    gpu: &Gpu,
    ctx: &mut LtContext,
    experts: &'w ExpertWeights,
    shared: &'w ExpertWeights,
    ws: &MoeWorkspace,
    host_ids: &[i32],
) -> Result<(Vec<PeerJob<'w>>, String), String> {
    let dev = |e: r1_kernels::Error| e.to_string();
    let (e, k, t) = (experts.w13.shape()[0], ws.topk_ids.shape()[1], ws.tokens());
    let (i2, h) = (experts.w13.shape()[1], experts.w13.shape()[2]);
    let ids = ws.topk_ids.to_host(gpu).map_err(dev)?;
    let xq = ws.xq.to_host(gpu).map_err(dev)?;
    let xs = ws.xs.to_host(gpu).map_err(dev)?;
    let mut note = String::new();
    let mismatched = ids.iter().zip(host_ids).filter(|(a, b)| a != b).count();
    if mismatched > 0 {
        note += &format!(" [{mismatched} topk ids differ from the host router: the peer follows the device's]");
    }
    // block_m = 1: segments unpadded, rows of an expert in the layer's (stable) order.
    let p = r1_kernels::reference::moe::permute(&ids, t, k, e, Layout::Contiguous { block_m: 1 }).map_err(dev)?;
    let mut jobs = Vec::new();
    let mut padded = 0;
    for ex in 0..e {
        let (start, rows) = (p.offsets[ex] as usize, p.counts[ex] as usize);
        if rows == 0 {
            continue;
        }
        let tokens: Vec<usize> = p.src_index[start..start + rows].iter().map(|&pair| pair as usize / k).collect();
        let (job, pad) = PeerJob::new(gpu, ctx, experts, ex, &tokens, &xq, &xs, t)
            .map_err(|m| format!("expert {ex} ({rows} rows): {m}"))?;
        padded += usize::from(pad);
        jobs.push(job);
    }
    let all: Vec<usize> = (0..t).collect();
    let (job, pad) =
        PeerJob::new(gpu, ctx, shared, 0, &all, &xq, &xs, t).map_err(|m| format!("shared expert ({t} rows): {m}"))?;
    padded += usize::from(pad);
    jobs.push(job);
    if padded > 0 {
        note += &format!(" [{padded} experts padded to 16-row multiples for cuBLASLt]");
    }
    for j in jobs.iter_mut() {
        j.run(gpu, ctx).map_err(|e| format!("first run: {e}"))?;
    }
    // The layer's own gate+up and down outputs (from its last call) for the same rows: a small difference says the
    // peer computes the same thing (in particular that cuBLASLt reads the scales in the layout we think).
    let offsets = ws.perm.offsets.to_host(gpu).map_err(dev)?;
    let (ours_h, ours_y) = (ws.h.to_host(gpu).map_err(dev)?, ws.y.to_host(gpu).map_err(dev)?);
    let (mut a_h, mut b_h, mut a_y, mut b_y) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let to_f32 = |v: &[bf16]| v.iter().map(|x| x.to_f32()).collect::<Vec<f32>>();
    for j in jobs.iter().filter(|j| std::ptr::eq(j.weights, experts)) {
        let (r0, r) = (offsets[j.expert] as usize, j.rows);
        a_h.extend(to_f32(&ours_h[r0 * i2..(r0 + r) * i2]));
        b_h.extend(to_f32(&j.h.to_host(gpu).map_err(dev)?[..r * i2]));
        a_y.extend(to_f32(&ours_y[r0 * h..(r0 + r) * h]));
        b_y.extend(to_f32(&j.y.to_host(gpu).map_err(dev)?[..r * h]));
    }
    note +=
        &format!(" [calc_diff vs layer: gate+up {:.1e}, down {:.1e}]", calc_diff(&a_h, &b_h), calc_diff(&a_y, &b_y));
    Ok((jobs, note))
}

fn bench_moe(c: &mut Criterion) {
    let Some(gpu) = r1_kernels::device::bench_gpu("bench moe") else { return };
    let mut group = c.benchmark_group("moe");
    group.sample_size(10);
    // The full layer's speedup over its cuBLASLt peer (or why the peer was skipped), printed after the group.

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

    // Full DeepSeek-V3 layer at 128 tokens: throughput = bytes of expert weights read (experts hit + shared). The
    // block's value is the layer's speedup over its cuBLASLt peer (or why the peer was skipped), printed after the
    // group.
    let peer_summary = {
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
        let bytes = expert_weight_bytes(hit + 1, h, i);
        group.throughput(Throughput::Bytes(bytes));
        group.bench_function(BenchmarkId::new("layer_ds_v3", format!("t128_{hit}experts")), |b| {
            b.iter_custom(|iters| {
                time_launches(&gpu, iters, || {
                    let routing = Routing::logits(&logits, Some(&bias));
                    moe_forward(&gpu, &cfg, &experts, Some(&shared), &x, routing, &mut ws, &mut out)
                })
                .expect("launch")
            })
        });

        // The peer on the same data: per-expert cuBLASLt GEMMs over the rows the layer's router sent each expert.
        // One more layer call first, so the workspace holds this input's routing and outputs even when a criterion
        // filter skipped the layer bench.
        let peer = moe_forward(
            &gpu,
            &cfg,
            &experts,
            Some(&shared),
            &x,
            Routing::logits(&logits, Some(&bias)),
            &mut ws,
            &mut out,
        )
        .map_err(|e| format!("layer call failed: {e}"))
        .and_then(|()| LtContext::new(&gpu))
        .and_then(|mut ctx| {
            let (jobs, note) = layer_peer(&gpu, &mut ctx, &experts, &shared, &ws, &ids_h)?;
            Ok((ctx, jobs, note))
        });
        match peer {
            Err(reason) => format!("moe layer_ds_v3 t128: cuBLASLt loop peer skipped: {reason}"),
            Ok((mut ctx, mut jobs, note)) => {
                let mut run_peer = || -> r1_kernels::Result<()> {
                    for j in jobs.iter_mut() {
                        j.run(&gpu, &mut ctx)?;
                    }
                    Ok(())
                };
                group.throughput(Throughput::Bytes(bytes));
                group
                    .bench_function(BenchmarkId::new("layer_ds_v3_cublaslt_loop", format!("t128_{hit}experts")), |b| {
                        b.iter_custom(|iters| time_launches(&gpu, iters, &mut run_peer).expect("launch peer"))
                    });
                let mut ours = || {
                    let routing = Routing::logits(&logits, Some(&bias));
                    moe_forward(&gpu, &cfg, &experts, Some(&shared), &x, routing, &mut ws, &mut out)
                };
                let medians = median_launch_time(&gpu, 3, 5, &mut ours)
                    .and_then(|o| Ok((o, median_launch_time(&gpu, 3, 5, &mut run_peer)?)));
                match medians {
                    Ok((o, p)) => {
                        let gbs = |d: std::time::Duration| bytes as f64 / d.as_secs_f64() / 1e9;
                        format!(
                            "moe layer_ds_v3 t128 ({hit} routed experts + shared): ours {:.1} us ({:.0} GB/s), \
                             cuBLASLt loop peer {:.1} us ({:.0} GB/s, {} GEMM pairs): ours/peer time = {:.3}, \
                             speedup {:.2}x (goal >= 1.5x){note}",
                            o.as_secs_f64() * 1e6,
                            gbs(o),
                            p.as_secs_f64() * 1e6,
                            gbs(p),
                            jobs.len(),
                            o.as_secs_f64() / p.as_secs_f64(),
                            p.as_secs_f64() / o.as_secs_f64(),
                        )
                    }
                    Err(e) => format!("moe layer_ds_v3 t128: cuBLASLt loop peer skipped: timing failed: {e}"),
                }
            }
        }
    };
    group.finish();
    eprintln!("{peer_summary}");
}

criterion_group!(benches, bench_moe);
criterion_main!(benches);
