//! Determinism at scale: each kernel family runs `R1K_DETERMINISM_RUNS` times (default 5) on the same inputs into
//! freshly poisoned outputs, and every run must be bitwise identical to the first. On the emulator every launch gets
//! a different schedule (thread interleavings, CTA order, copy completion order: the seed mixes in the launch count),
//! so this checks that no result depends on execution order: split-K and split-KV reductions, atomics, the MoE
//! permutation's ranks. Skipped without a device, like the other GPU tests.

use r1_kernels::device::test_gpu;
use r1_kernels::fp8_gemm::{self, ForcedSm90, GemmKernel, GemmOptions, Resolved};
use r1_kernels::mla::{self, Backend, MlaOptions, MlaPlan, MlaWorkspace, SplitMode};
use r1_kernels::moe::{self, ExpertWeights, GemmBackend, Layout, MoeWorkspace, Routing};
use r1_kernels::quant::{self, activation_scale_shape, weight_scale_shape};
use r1_kernels::reference::mla::{quantize_kv_cache_fp8, MlaConfig, D_QK, D_V, FP8_TOKEN_BYTES};
use r1_kernels::reference::moe::{ExpertsFp8, RouterConfig};
use r1_kernels::reference::quant::ScaleFormat;
use r1_kernels::rng::SplitMix64;
use r1_kernels::{bf16, decode_ops, DeviceTensor, Gpu, E4M3};

mod common;
use common::{block_magnitude, expect_launched, finite_e4m3_codes, sm90_part, uniform_vec};

/// Runs per kernel: `R1K_DETERMINISM_RUNS`, default 5.
fn runs() -> usize {
    std::env::var("R1K_DETERMINISM_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(5).max(2)
}

fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    uniform_vec(&mut SplitMix64::new(seed), n, -scale, scale)
}

fn to_bf16(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|&x| bf16::from_f32(x)).collect()
}

fn codes(n: usize, seed: u64) -> Vec<E4M3> {
    finite_e4m3_codes(&mut SplitMix64::new(seed), n)
}

fn scales(n: usize, seed: u64, base: f32) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed);
    (0..n).map(|_| base * block_magnitude(&mut rng)).collect()
}

/// Bit patterns of a result, for comparison across runs.
trait Bits {
    fn bit_vec(&self) -> Vec<u32>;
}
impl Bits for Vec<f32> {
    fn bit_vec(&self) -> Vec<u32> {
        self.iter().map(|v| v.to_bits()).collect()
    }
}
impl Bits for Vec<bf16> {
    fn bit_vec(&self) -> Vec<u32> {
        self.iter().map(|v| u32::from(v.to_bits())).collect()
    }
}
impl Bits for Vec<E4M3> {
    fn bit_vec(&self) -> Vec<u32> {
        self.iter().map(|v| u32::from(v.0)).collect()
    }
}
impl Bits for Vec<i32> {
    fn bit_vec(&self) -> Vec<u32> {
        self.iter().map(|&v| v as u32).collect()
    }
}
impl Bits for Vec<i64> {
    fn bit_vec(&self) -> Vec<u32> {
        self.iter().flat_map(|&v| [v as u32, (v >> 32) as u32]).collect()
    }
}

/// Runs `once` `runs()` times; each returns the bit patterns of every output. All runs must equal the first.
fn assert_deterministic(what: &str, mut once: impl FnMut() -> Vec<Vec<u32>>) {
    let n = runs();
    let first = once();
    assert!(first.iter().any(|o| !o.is_empty()), "{what}: no output to compare");
    for run in 1..n {
        let again = once();
        for (i, (a, b)) in first.iter().zip(&again).enumerate() {
            if a != b {
                let at = a.iter().zip(b).position(|(x, y)| x != y).unwrap_or(a.len().min(b.len()));
                panic!("{what}: run {run} differs from run 0 in output {i} at element {at} (of {})", a.len());
            }
        }
    }
    eprintln!("{what}: {n} runs bitwise identical");
}

fn nan_bf16(gpu: &Gpu, shape: &[usize]) -> DeviceTensor<bf16> {
    DeviceTensor::from_host(gpu, &vec![bf16::NAN; shape.iter().product()], shape).unwrap()
}

fn nan_f32(gpu: &Gpu, shape: &[usize]) -> DeviceTensor<f32> {
    DeviceTensor::from_host(gpu, &vec![f32::NAN; shape.iter().product()], shape).unwrap()
}

#[test]
fn gpu_quant_is_deterministic() {
    let Some(gpu) = test_gpu("gpu_quant_is_deterministic") else { return };
    let (m, k) = (37usize, 300usize);
    let x = DeviceTensor::from_host(&gpu, &to_bf16(&values(m * k, 1, 5.0)), &[m, k]).unwrap();
    for format in [ScaleFormat::F32, ScaleFormat::Ue8m0] {
        assert_deterministic(&format!("quantize_activations {format:?}"), || {
            let mut q = DeviceTensor::from_host(&gpu, &vec![E4M3(0xff); m * k], &[m, k]).unwrap();
            let mut s = nan_f32(&gpu, &activation_scale_shape(m, k));
            quant::quantize_activations(&gpu, &x, &mut q, &mut s, format).unwrap();
            vec![q.to_host(&gpu).unwrap().bit_vec(), s.to_host(&gpu).unwrap().bit_vec()]
        });
        assert_deterministic(&format!("quantize_weights {format:?}"), || {
            let mut q = DeviceTensor::from_host(&gpu, &vec![E4M3(0xff); m * k], &[m, k]).unwrap();
            let mut s = nan_f32(&gpu, &weight_scale_shape(m, k));
            quant::quantize_weights(&gpu, &x, &mut q, &mut s, format).unwrap();
            vec![q.to_host(&gpu).unwrap().bit_vec(), s.to_host(&gpu).unwrap().bit_vec()]
        });
    }
}

#[test]
fn gpu_fp8_gemm_is_deterministic() {
    let test = "gpu_fp8_gemm_is_deterministic";
    let Some(gpu) = test_gpu(test) else { return };
    // 4 K blocks (the last one partial), ragged M and N tails.
    let (m, n, k) = (70usize, 136usize, 400usize);
    let kb = k.div_ceil(128);
    let a = DeviceTensor::from_host(&gpu, &codes(m * k, 1), &[m, k]).unwrap();
    let sa = DeviceTensor::from_host(&gpu, &scales(kb * m.div_ceil(4) * 4, 2, 1.0 / 64.0), &[kb, m.div_ceil(4) * 4])
        .unwrap();
    let b = DeviceTensor::from_host(&gpu, &codes(n * k, 3), &[n, k]).unwrap();
    let sb =
        DeviceTensor::from_host(&gpu, &scales(n.div_ceil(128) * kb, 4, 1.0 / 64.0), &[n.div_ceil(128), kb]).unwrap();
    let c0 = values(m * n, 5, 2.0);
    let mut variants: Vec<(String, GemmOptions, &'static str)> =
        vec![("Portable".into(), GemmOptions { kernel: GemmKernel::Portable, ..Default::default() }, "fp8_gemm_plain")];
    if sm90_part(&gpu, test) {
        // Split-K over 2 and 4 splits on fewer CTAs than work items (persistent loop), and the 2-CTA multicast kernel.
        for (block_m, block_n, grid, k_splits, kernel, name) in [
            (64, 64, 3, 2, GemmKernel::Sm90, "fp8_gemm_sm90_m64n64"),
            (128, 160, 2, 4, GemmKernel::Sm90, "fp8_gemm_sm90_m128n160"),
            (128, 128, 2, 1, GemmKernel::Sm90Multicast, "fp8_gemm_sm90_mc2_m128n128"),
        ] {
            let forced = ForcedSm90 { block_m, block_n, grid, k_splits, stages: 0 };
            let opts = GemmOptions { kernel, force_sm90: Some(forced), ..Default::default() };
            variants.push((format!("{kernel:?} forced {forced:?}"), opts, name));
        }
    }
    for (label, opts, kernel_name) in &variants {
        // The forced configurations are valid for this shape (the planner agrees before any launch).
        let p = fp8_gemm::plan(a.shape(), sa.shape(), b.shape(), sb.shape(), &[m, n], false, opts.kernel, gpu.info())
            .unwrap();
        if let (Resolved::Sm90(c), Some(f)) = (p.resolved, &opts.force_sm90) {
            let smem = gpu.info().max_shared_memory_per_block_optin;
            let c = fp8_gemm::plan::force_sm90_config(&p.shape, &c, f, smem).unwrap();
            assert_eq!(c.kernel_name().unwrap(), *kernel_name, "{label}");
        }
        assert_deterministic(&format!("fp8_gemm {label}"), || {
            let mut out = nan_bf16(&gpu, &[m, n]);
            expect_launched(&gpu, &[kernel_name], || fp8_gemm::fp8_gemm(&gpu, &a, &sa, &b, &sb, &mut out, opts))
                .unwrap();
            let mut c = DeviceTensor::from_host(&gpu, &c0, &[m, n]).unwrap();
            fp8_gemm::fp8_gemm_accumulate(&gpu, &a, &sa, &b, &sb, &mut c, opts).unwrap();
            vec![out.to_host(&gpu).unwrap().bit_vec(), c.to_host(&gpu).unwrap().bit_vec()]
        });
    }
}

fn random_experts(e: usize, h: usize, i: usize, seed: u64) -> ExpertsFp8 {
    ExpertsFp8 {
        num_experts: e,
        hidden: h,
        intermediate: i,
        w13: codes(e * 2 * i * h, seed),
        w13_scales: scales(e * (2 * i / 128) * (h / 128), seed + 1, 1.0 / (160.0 * (h as f32).sqrt())),
        w2: codes(e * h * i, seed + 2),
        w2_scales: scales(e * (h / 128) * (i / 128), seed + 3, 1.0 / (160.0 * (i as f32).sqrt())),
    }
}

#[test]
fn gpu_moe_forward_is_deterministic() {
    let test = "gpu_moe_forward_is_deterministic";
    let Some(gpu) = test_gpu(test) else { return };
    // 24 tokens over 8 experts, top-2 with DeepSeek-style grouped sigmoid routing and a bias: several tokens per
    // expert, so the permutation's ranks and the grouped GEMM's row blocks are exercised.
    let (t, e, h, i) = (24usize, 8usize, 256usize, 128usize);
    let cfg = RouterConfig { num_experts: e, top_k: 2, num_groups: 4, topk_groups: 2, ..RouterConfig::deepseek_v3() };
    let w = ExpertWeights::from_reference(&gpu, &random_experts(e, h, i, 1)).unwrap();
    let shared = ExpertWeights::from_reference(&gpu, &random_experts(1, h, i, 2)).unwrap();
    let x = DeviceTensor::from_host(&gpu, &to_bf16(&values(t * h, 3, 2.0)), &[t, h]).unwrap();
    let logits = DeviceTensor::from_host(&gpu, &values(t * e, 4, 3.0), &[t, e]).unwrap();
    let bias = DeviceTensor::from_host(&gpu, &values(e, 5, 0.1), &[e]).unwrap();
    let mut backends = vec![GemmBackend::Portable];
    if sm90_part(&gpu, test) {
        backends.push(GemmBackend::Sm90Tma);
    }
    for layout in [Layout::Contiguous { block_m: 64 }, Layout::Masked { max_m: 64 }] {
        for &backend in &backends {
            assert_deterministic(&format!("moe_forward {backend:?} {layout:?}"), || {
                let mut ws = MoeWorkspace::new(&gpu, &cfg, t, h, i, Some(i), layout).unwrap();
                ws.gemm_backend = backend;
                let mut out = nan_bf16(&gpu, &[t, h]);
                let routing = Routing::logits(&logits, Some(&bias));
                moe::moe_forward(&gpu, &cfg, &w, Some(&shared), &x, routing, &mut ws, &mut out).unwrap();
                vec![
                    out.to_host(&gpu).unwrap().bit_vec(),
                    ws.topk_ids.to_host(&gpu).unwrap().bit_vec(),
                    ws.topk_weights.to_host(&gpu).unwrap().bit_vec(),
                    ws.perm.row_of.to_host(&gpu).unwrap().bit_vec(),
                    ws.perm.offsets.to_host(&gpu).unwrap().bit_vec(),
                ]
            });
        }
    }
}

#[test]
fn gpu_mla_decode_is_deterministic() {
    let test = "gpu_mla_decode_is_deterministic";
    let Some(gpu) = test_gpu(test) else { return };
    // Two sequences over several pages each, MTP (s_q = 2, causal), split over several CTAs: the combine of split
    // partials must not depend on which split finishes first.
    let (s_q, heads, page) = (2usize, 16usize, 64usize);
    let lens = [150i32, 70];
    let batch = lens.len();
    let pages: Vec<usize> = lens.iter().map(|&l| (l as usize).div_ceil(page)).collect();
    let max_blocks = *pages.iter().max().unwrap();
    let num_blocks: usize = pages.iter().sum();
    let mut table = vec![0i32; batch * max_blocks];
    let mut next = num_blocks as i32;
    for b in 0..batch {
        for j in 0..pages[b] {
            next -= 1; // pages in reverse order
            table[b * max_blocks + j] = next;
        }
    }
    let cache = values(num_blocks * page * D_QK, 1, 1.0);
    let fp8 = quantize_kv_cache_fp8(&cache).unwrap();
    let cfg = MlaConfig { batch, s_q, heads, page_size: page, softmax_scale: 0.0625, causal: true };
    let q = DeviceTensor::from_host(&gpu, &to_bf16(&values(cfg.q_len(), 2, 2.0)), &[batch, s_q, heads, D_QK]).unwrap();
    let cache_bf16 = DeviceTensor::from_host(&gpu, &to_bf16(&cache), &[num_blocks, page, D_QK]).unwrap();
    let cache_fp8 = DeviceTensor::from_host(&gpu, &fp8, &[num_blocks, page, FP8_TOKEN_BYTES]).unwrap();
    let td = DeviceTensor::from_host(&gpu, &table, &[batch, max_blocks]).unwrap();
    let sd = DeviceTensor::from_host(&gpu, &lens, &[batch]).unwrap();
    let mut backends = vec![Backend::Portable];
    if sm90_part(&gpu, test) {
        backends.extend([Backend::Hopper, Backend::HopperWide]);
    }
    let plan = MlaPlan::new(&gpu, &lens, page, SplitMode::Balanced { target_ctas: 3 }).unwrap();
    assert!(plan.max_splits() > batch, "the plan splits a sequence: {:?}", plan.split());
    for &backend in &backends {
        for fp8_cache in [false, true] {
            assert_deterministic(&format!("mla_decode {backend:?} fp8={fp8_cache}"), || {
                let mut ws = MlaWorkspace::new(&gpu, &plan, &cfg).unwrap();
                let mut o = nan_bf16(&gpu, &[batch, s_q, heads, D_V]);
                let mut lse = nan_f32(&gpu, &[batch, heads, s_q]);
                let opts = MlaOptions { block_table_host: Some(&table), backend };
                if fp8_cache {
                    mla::mla_decode_fp8(&gpu, &q, &cache_fp8, &td, &sd, &plan, &cfg, &mut o, &mut lse, &mut ws, &opts)
                } else {
                    mla::mla_decode(&gpu, &q, &cache_bf16, &td, &sd, &plan, &cfg, &mut o, &mut lse, &mut ws, &opts)
                }
                .unwrap();
                vec![o.to_host(&gpu).unwrap().bit_vec(), lse.to_host(&gpu).unwrap().bit_vec()]
            });
        }
        // The plan computed on the device (a fresh one per run: the planner's output is compared too).
        assert_deterministic(&format!("mla_decode {backend:?} with the device plan"), || {
            let mut plan = MlaPlan::on_device(&gpu, &cfg, max_blocks, backend).unwrap();
            plan.update(&gpu, &sd).unwrap();
            let mut ws = MlaWorkspace::new(&gpu, &plan, &cfg).unwrap();
            let mut o = nan_bf16(&gpu, &[batch, s_q, heads, D_V]);
            let mut lse = nan_f32(&gpu, &[batch, heads, s_q]);
            let opts = MlaOptions { block_table_host: None, backend };
            mla::mla_decode(&gpu, &q, &cache_bf16, &td, &sd, &plan, &cfg, &mut o, &mut lse, &mut ws, &opts).unwrap();
            let (items, ctas, splits) = plan.download(&gpu).unwrap();
            let words = |v: Vec<i32>| v.into_iter().map(|x| x as u32).collect::<Vec<u32>>();
            vec![
                o.to_host(&gpu).unwrap().bit_vec(),
                lse.to_host(&gpu).unwrap().bit_vec(),
                words(items),
                words(ctas),
                words(splits),
            ]
        });
    }
}

#[test]
fn gpu_decode_ops_are_deterministic() {
    let Some(gpu) = test_gpu("gpu_decode_ops_are_deterministic") else { return };
    let (rows, d) = (5usize, 1536usize);
    let x = DeviceTensor::from_host(&gpu, &to_bf16(&values(rows * d, 1, 3.0)), &[rows, d]).unwrap();
    let r = DeviceTensor::from_host(&gpu, &to_bf16(&values(rows * d, 2, 3.0)), &[rows, d]).unwrap();
    let w = DeviceTensor::from_host(&gpu, &to_bf16(&values(d, 3, 1.5)), &[d]).unwrap();
    assert_deterministic("rms_norm + add_rms_norm", || {
        let mut y = nan_bf16(&gpu, &[rows, d]);
        decode_ops::rms_norm(&gpu, &x, &w, &mut y, 1e-6).unwrap();
        let (mut h, mut y2) = (nan_bf16(&gpu, &[rows, d]), nan_bf16(&gpu, &[rows, d]));
        decode_ops::add_rms_norm(&gpu, &x, &r, &mut h, &w, &mut y2, 1e-6).unwrap();
        vec![
            y.to_host(&gpu).unwrap().bit_vec(),
            h.to_host(&gpu).unwrap().bit_vec(),
            y2.to_host(&gpu).unwrap().bit_vec(),
        ]
    });
}
