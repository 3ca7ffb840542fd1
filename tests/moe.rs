//! Mixture-of-Experts: every GPU stage against `reference::moe` (router bitwise ids / 1e-6 weights, permutation
//! bitwise, grouped GEMM and the full layer by DeepGEMM's metric), bitwise repeatability, CUDA-graph replay, and
//! host-side validation. GPU tests print SKIPPED without a GPU.

use r1_kernels::device::test_gpu;
use r1_kernels::moe::{
    combine, gate_logits, grouped_gemm_with, moe_forward, permute, route, swiglu_quant, upload_topk_ids, ExpertWeights,
    GemmBackend, Layout, MoeWorkspace, Permuted, RouterConfig, Routing, GEMM_BLOCK_M,
};
use r1_kernels::quant::{activation_scale_shape, quantize_activations};
use r1_kernels::reference::moe::{self as rm, calc_diff, combine_token, fp8_row_times_matrix, ExpertsFp8};
use r1_kernels::reference::quant::{
    quantize_per_token_group, quantize_per_token_group_with, scales_from_mn_major, ScaleFormat,
};
use r1_kernels::rng::SplitMix64;
use r1_kernels::{bf16, DeviceTensor, Error, Gpu, E4M3};

mod common;
use common::uniform_vec;
use common::{
    block_magnitude, emu_shrink, emu_shrink_described, expect_launched, finite_e4m3_codes, int_in, sm90_part,
};

fn uniform(n: usize, scale: f32, seed: u64) -> Vec<f32> {
    uniform_vec(&mut SplitMix64::new(seed), n, -scale, scale)
}

/// Activations whose scale differs per token and per 128-column group: `uniform(±scale)` times `1 + row % 13` times a
/// random power of two in [2^-2, 2^2] per (row, group), so an activation scale read from the wrong row or K block is
/// an O(1) error.
fn scaled_activations(rows: usize, cols: usize, scale: f32, seed: u64) -> Vec<f32> {
    let mut v = uniform(rows * cols, scale, seed);
    let mut rng = SplitMix64::new(seed ^ 0x6d61_676e);
    for (r, row) in v.chunks_mut(cols).enumerate() {
        for group in row.chunks_mut(128) {
            let f = (1 + r % 13) as f32 * block_magnitude(&mut rng);
            group.iter_mut().for_each(|x| *x *= f);
        }
    }
    v
}

/// Elementwise, relative to each row's own scale: |got − want| ≤ 2^-7·|want| + `row_rel`·rms(want row) for every
/// element of every row (rows are `n` wide).
fn check_rows_relative(what: &str, got: &[f32], want: &[f32], n: usize, row_rel: f32) {
    assert_eq!(got.len(), want.len(), "{what}: element count");
    for (r, (g, w)) in got.chunks(n).zip(want.chunks(n)).enumerate() {
        let rms = (w.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / n as f64).sqrt() as f32;
        for (c, (&a, &b)) in g.iter().zip(w).enumerate() {
            let tol = 2f32.powi(-7) * b.abs() + row_rel * rms;
            assert!(
                (a - b).abs() <= tol,
                "{what}: row {r} col {c}: {a} vs {b} (row rms {rms:.3e}, tolerance {tol:.3e})"
            );
        }
    }
}

fn bf16_round(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect()
}

fn to_bf16(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|&x| bf16::from_f32(x)).collect()
}

fn from_bf16(v: &[bf16]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

/// Random FP8 experts drawn directly as codes + block scales (quantizing f32 weights on the CPU is far too slow at
/// DeepSeek sizes): dequantized weights have rms ≈ 1/sqrt(fan-in).
fn random_experts(e: usize, h: usize, i: usize, seed: u64) -> ExpertsFp8 {
    let mut rng = SplitMix64::new(seed);
    // Codes: random bytes, NaN patterns (0x7f, 0xff) moved to ±448; their rms sets the scale.
    let lut: Vec<f32> = (0..=255u8).map(|b| E4M3(b).to_f32()).collect();
    let valid: Vec<u8> = (0..=255u8).filter(|b| b & 0x7f != 0x7f).collect();
    let code_rms = (valid.iter().map(|&b| (lut[b as usize] as f64).powi(2)).sum::<f64>() / valid.len() as f64).sqrt();
    let w13 = finite_e4m3_codes(&mut rng, e * 2 * i * h);
    let w2 = finite_e4m3_codes(&mut rng, e * h * i);
    let mut rng = SplitMix64::new(seed + 1);
    let mut scales = |n: usize, fan_in: usize| -> Vec<f32> {
        let base = 1.0 / ((fan_in as f64).sqrt() * code_rms);
        (0..n).map(|_| (base * (0.5 + rng.next_f64())) as f32).collect()
    };
    let w13_scales = scales(e * (2 * i / 128) * (h / 128), h);
    let w2_scales = scales(e * (h / 128) * (i / 128), i);
    ExpertsFp8 { num_experts: e, hidden: h, intermediate: i, w13, w13_scales, w2, w2_scales }
}

fn random_ids(t: usize, k: usize, e: usize, holes: bool, seed: u64) -> Vec<i32> {
    let mut rng = SplitMix64::new(seed);
    let mut ids = Vec::with_capacity(t * k);
    for _ in 0..t {
        let mut row: Vec<i32> = Vec::with_capacity(k);
        while row.len() < k {
            let c = int_in(&mut rng, 0..e as i32);
            if !row.contains(&c) || k > e {
                row.push(c);
            }
        }
        if holes && int_in(&mut rng, 0..4) == 0 {
            row[0] = -1;
        }
        ids.extend(row);
    }
    ids
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

// ---------------------------------------------------------------- CPU-only checks

#[test]
fn bad_inputs_are_errors_not_panics() {
    assert!(matches!(
        rm::permute(&[0, 300], 1, 2, 256, Layout::Contiguous { block_m: 64 }),
        Err(Error::IndexOutOfRange { .. })
    ));
    let mut cfg = RouterConfig::deepseek_v3();
    cfg.topk_groups = 0;
    assert!(cfg.validate().is_err());
    cfg = RouterConfig::deepseek_v3();
    cfg.num_experts = 2048;
    assert!(cfg.validate().is_err());
    assert!(RouterConfig::deepseek_v3().validate().is_ok());
}

#[test]
fn layer_reference_is_slot_order_combine() {
    // The FP8 reference's combine equals combine_token over the per-slot expert outputs.
    let (e, h, i, t, k) = (4, 128, 128, 3, 2);
    let w = random_experts(e, h, i, 1);
    let x = bf16_round(&uniform(t * h, 1.0, 2));
    let ids = vec![0, 3, 2, -1, 1, 1];
    let wts = vec![0.5, 0.25, 1.0, 9.0, 0.75, 0.125];
    let got = rm::moe_forward_fp8(&x, t, &ids, &wts, k, &w, None).unwrap();
    let (xq, xs) = quantize_per_token_group(&x, t, h, 128).unwrap();
    for tok in 0..t {
        let mut ys = Vec::new();
        for s in 0..k {
            let id = ids[tok * k + s];
            ys.push((id >= 0).then(|| {
                let gu = rm::fp8_gate_up(&xq[tok * h..(tok + 1) * h], &xs[tok..tok + 1], &w, id as usize);
                let (q, sc) = rm::swiglu_quant(&gu, i).unwrap();
                (rm::fp8_down(&q, &sc, &w, id as usize), wts[tok * k + s])
            }));
        }
        let refs: Vec<Option<(&[f32], f32)>> = ys.iter().map(|o| o.as_ref().map(|(y, w)| (y.as_slice(), *w))).collect();
        assert_eq!(got[tok * h..(tok + 1) * h], combine_token(&refs, None, h)[..]);
    }
}

// ---------------------------------------------------------------- GPU checks

fn router_case(gpu: &Gpu, cfg: &RouterConfig, t: usize, with_bias: bool, bf16_in: bool, seed: u64) {
    let e = cfg.num_experts;
    let mut logits = uniform(t * e, 4.0, seed);
    if t > 2 {
        logits[3] = f32::NAN;
        logits[e + 1] = f32::NEG_INFINITY;
        logits[2 * e + 5] = f32::INFINITY;
        for v in &mut logits[e..e + 8.min(e)] {
            *v = 0.5; // ties
        }
    }
    if bf16_in {
        logits = bf16_round(&logits);
    }
    let bias = with_bias.then(|| uniform(e, 0.05, seed + 9));
    let (ids_ref, w_ref) = rm::route(&logits, bias.as_deref(), t, cfg).unwrap();
    let k = cfg.top_k;
    let mut ids = DeviceTensor::from_host(gpu, &vec![-7i32; t * k], &[t, k]).unwrap();
    let mut wts = DeviceTensor::from_host(gpu, &vec![f32::NAN; t * k], &[t, k]).unwrap();
    let bias_d = bias.as_ref().map(|b| DeviceTensor::from_host(gpu, b, &[e]).unwrap());
    let run = |ids: &mut DeviceTensor<i32>, wts: &mut DeviceTensor<f32>| {
        // t = 0 launches nothing.
        let (bf16_kernel, f32_kernel): (&[&str], &[&str]) =
            if t == 0 { (&[], &[]) } else { (&["moe_router_bf16"], &["moe_router_f32"]) };
        if bf16_in {
            let l = DeviceTensor::from_host(gpu, &to_bf16(&logits), &[t, e]).unwrap();
            expect_launched(gpu, bf16_kernel, || route(gpu, cfg, &l, bias_d.as_ref(), &mut *ids, &mut *wts)).unwrap();
        } else {
            let l = DeviceTensor::from_host(gpu, &logits, &[t, e]).unwrap();
            expect_launched(gpu, f32_kernel, || route(gpu, cfg, &l, bias_d.as_ref(), &mut *ids, &mut *wts)).unwrap();
        }
        (ids.to_host(gpu).unwrap(), wts.to_host(gpu).unwrap())
    };
    let (gi, gw) = run(&mut ids, &mut wts);
    assert_eq!(gi, ids_ref, "router ids, {cfg:?} t={t} bias={with_bias} bf16={bf16_in}");
    for (j, (a, b)) in gw.iter().zip(&w_ref).enumerate() {
        assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "weight {j}: gpu {a} ref {b} ({cfg:?})");
    }
    // The exp and the softmax sum order are twinned, so the weights are in fact bitwise equal.
    assert_eq!(bits(&gw), bits(&w_ref), "router weights bitwise, {cfg:?} t={t}");
    let (gi2, gw2) = run(&mut ids, &mut wts);
    assert_eq!((gi2, bits(&gw2)), (gi, bits(&gw)), "router repeat is bitwise");
}

#[test]
fn gpu_router_matches_reference() {
    let Some(gpu) = test_gpu("gpu_router_matches_reference") else { return };
    let ds = RouterConfig::deepseek_v3();
    let ts = emu_shrink(&gpu, "gpu_router_matches_reference", [1usize, 16, 128, 512, 4096], [1, 16, 128, 512, 1000]);
    for (n, &t) in ts.iter().enumerate() {
        router_case(&gpu, &ds, t, true, false, n as u64);
    }
    router_case(&gpu, &ds, 128, false, true, 40);
    let grouped = RouterConfig { num_experts: 64, top_k: 2, num_groups: 8, topk_groups: 2, ..ds };
    router_case(&gpu, &grouped, 100, true, false, 41);
    router_case(&gpu, &RouterConfig::softmax(8, 2, true), 77, false, false, 42);
    router_case(&gpu, &RouterConfig::softmax(64, 8, false), 33, true, true, 43);
    router_case(&gpu, &RouterConfig::softmax(256, 1, true), 16, false, false, 44);
    // t = 0 launches nothing and is fine.
    router_case(&gpu, &ds, 0, true, false, 45);
}

fn check_permutation(gpu: &Gpu, t: usize, k: usize, e: usize, layout: Layout, seed: u64) {
    let h = 256;
    let ids = random_ids(t, k, e, true, seed);
    let want = rm::permute(&ids, t, k, e, layout).unwrap();
    let x = bf16_round(&uniform(t * h, 3.0, seed + 1));
    let xd = DeviceTensor::from_host(gpu, &to_bf16(&x), &[t, h]).unwrap();
    let mut xq = DeviceTensor::zeros(gpu, &[t, h]).unwrap();
    let mut xs = DeviceTensor::zeros(gpu, &activation_scale_shape(t, h)).unwrap();
    quantize_activations(gpu, &xd, &mut xq, &mut xs, ScaleFormat::F32).unwrap();
    let idd = upload_topk_ids(gpu, &ids, t, k, e).unwrap();
    let mut p = Permuted::new(gpu, t, k, e, h, layout).unwrap();
    let cap = p.capacity();
    p.src_index.copy_from_host(gpu, &vec![12345; cap]).unwrap();
    p.row_of.copy_from_host(gpu, &vec![12345; t * k]).unwrap();
    permute(gpu, &idd, &xq, &xs, &mut p).unwrap();
    let what = format!("t={t} k={k} E={e} {layout:?}");
    if t * k > 0 {
        assert_eq!(p.counts.to_host(gpu).unwrap(), want.counts, "{what}");
        assert_eq!(p.offsets.to_host(gpu).unwrap(), want.offsets, "{what}");
        assert_eq!(p.src_index.to_host(gpu).unwrap(), want.src_index, "{what}");
        assert_eq!(p.row_of.to_host(gpu).unwrap(), want.row_of, "{what}");
    }
    let (q_tok, s_tok) = (xq.to_host(gpu).unwrap(), xs.to_host(gpu).unwrap());
    let s_tok = scales_from_mn_major(&s_tok, t, h / 128).unwrap();
    let codes = p.codes.to_host(gpu).unwrap();
    let scales = scales_from_mn_major(&p.scales.to_host(gpu).unwrap(), cap, h / 128).unwrap();
    let used = want.offsets[e] as usize;
    for row in 0..used {
        let src = want.src_index[row];
        let (c, s) = (&codes[row * h..(row + 1) * h], &scales[row * 2..row * 2 + 2]);
        if src < 0 {
            assert!(c.iter().all(|v| v.0 == 0) && s == [0.0, 0.0], "padding row {row} zeroed ({what})");
        } else {
            let tok = src as usize / k;
            assert_eq!(c, &q_tok[tok * h..(tok + 1) * h], "row {row} codes ({what})");
            assert_eq!(s, &s_tok[tok * 2..tok * 2 + 2], "row {row} scales ({what})");
        }
    }
}

#[test]
fn gpu_permute_matches_reference() {
    let Some(gpu) = test_gpu("gpu_permute_matches_reference") else { return };
    let mut seed = 100;
    // (1000, 2, 4): ~440 pairs per expert overflow Masked { max_m: 192 }, so the dropped-pair path runs on the GPU.
    // The count kernel's cost is E × t·k: the emulated device takes 1024 tokens for 4096 (still 32 of its 256-pair
    // chunks per expert).
    let big_t = emu_shrink_described(
        &gpu,
        "gpu_permute_matches_reference",
        (4096usize, "(t, k, E) = (4096, 8, 256)"),
        (1024, "(t, k, E) = (1024, 8, 256)"),
    );
    for &(t, k, e) in &[
        (0usize, 8usize, 256usize),
        (1, 1, 8),
        (1, 8, 256),
        (16, 2, 64),
        (128, 8, 256),
        (512, 2, 8),
        (big_t, 8, 256),
        (1000, 2, 4),
    ] {
        for layout in [
            Layout::Contiguous { block_m: GEMM_BLOCK_M },
            Layout::Contiguous { block_m: 128 },
            Layout::Masked { max_m: 192 },
        ] {
            seed += 1;
            check_permutation(&gpu, t, k, e, layout, seed);
        }
    }
    // All tokens on one expert, and ids out of range written straight to the device: skipped, never OOB.
    let (t, k, e, h) = (300, 2, 8, 128);
    let mut ids = vec![5i32; t * k];
    ids[7] = 8;
    ids[9] = -3;
    ids[11] = i32::MAX;
    let idd = DeviceTensor::from_host(&gpu, &ids, &[t, k]).unwrap();
    let xq = DeviceTensor::zeros(&gpu, &[t, h]).unwrap();
    let xs = DeviceTensor::zeros(&gpu, &activation_scale_shape(t, h)).unwrap();
    let mut p = Permuted::new(&gpu, t, k, e, h, Layout::Contiguous { block_m: 64 }).unwrap();
    let stages = ["moe_count_rank", "moe_offsets", "moe_scatter", "moe_gather"];
    expect_launched(&gpu, &stages, || permute(&gpu, &idd, &xq, &xs, &mut p)).unwrap();
    let counts = p.counts.to_host(&gpu).unwrap();
    assert_eq!(counts[5], (t * k - 3) as i32);
    let row_of = p.row_of.to_host(&gpu).unwrap();
    assert_eq!((row_of[7], row_of[9], row_of[11]), (-1, -1, -1));
    assert!(upload_topk_ids(&gpu, &ids, t, k, e).is_err());
    assert!(Permuted::new(&gpu, t, k, e, h, Layout::Masked { max_m: 100 }).is_err());
    // The public fields of Permuted are re-checked before any launch: a changed config or a swapped buffer is an
    // error, never an out-of-bounds kernel.
    p.top_k = k + 1;
    assert!(permute(&gpu, &DeviceTensor::zeros(&gpu, &[t, k + 1]).unwrap(), &xq, &xs, &mut p).is_err());
    p.top_k = k;
    p.codes = DeviceTensor::zeros(&gpu, &[1, h]).unwrap();
    assert!(permute(&gpu, &idd, &xq, &xs, &mut p).is_err());
    assert!(Permuted::new(&gpu, t, k, e, 100, Layout::Masked { max_m: 128 }).is_err());
}

/// Grouped GEMM through a GPU permutation vs fp8_row_times_matrix per row (f64, rounded to bf16).
#[allow(clippy::too_many_arguments)]
fn check_grouped_gemm(
    gpu: &Gpu,
    backend: GemmBackend,
    t: usize,
    k: usize,
    e: usize,
    n: usize,
    kdim: usize,
    layout: Layout,
    seed: u64,
) {
    let ids = random_ids(t, k, e, false, seed);
    let w = random_experts(e, kdim, n / 2, seed + 2); // w13 is [E, n, kdim]
    let x = bf16_round(&scaled_activations(t, kdim, 2.0, seed + 3));
    let xd = DeviceTensor::from_host(gpu, &to_bf16(&x), &[t, kdim]).unwrap();
    let mut xq = DeviceTensor::zeros(gpu, &[t, kdim]).unwrap();
    let mut xs = DeviceTensor::zeros(gpu, &activation_scale_shape(t, kdim)).unwrap();
    quantize_activations(gpu, &xd, &mut xq, &mut xs, ScaleFormat::F32).unwrap();
    let mut p = Permuted::new(gpu, t, k, e, kdim, layout).unwrap();
    permute(gpu, &upload_topk_ids(gpu, &ids, t, k, e).unwrap(), &xq, &xs, &mut p).unwrap();
    let wd = ExpertWeights::from_reference(gpu, &w).unwrap();
    let cap = p.capacity();
    let mut out = DeviceTensor::from_host(gpu, &vec![bf16::NAN; cap * n], &[cap, n]).unwrap();
    let run = |out: &mut DeviceTensor<bf16>| {
        expect_launched(gpu, &[grouped_kernel(backend)], || {
            grouped_gemm_with(
                gpu,
                &p.codes,
                &p.scales,
                &wd.w13,
                &wd.w13_scales,
                &p.offsets,
                &p.counts,
                &mut *out,
                backend,
            )
        })
        .unwrap();
        from_bf16(&out.to_host(gpu).unwrap())
    };
    let got = run(&mut out);
    let again = run(&mut out);
    assert_eq!(bits(&got), bits(&again), "grouped GEMM repeat is bitwise");
    let (xq_h, xs_h) = quantize_per_token_group(&x, t, kdim, 128).unwrap();
    let kb = kdim / 128;
    let s13 = (n / 128) * kb;
    let want_perm = rm::permute(&ids, t, k, e, layout).unwrap();
    let (mut gv, mut rv) = (Vec::new(), Vec::new());
    for (row, &src) in want_perm.src_index.iter().enumerate() {
        if src < 0 {
            continue;
        }
        let tok = src as usize / k;
        let ex = ids[src as usize] as usize;
        let r = fp8_row_times_matrix(
            &xq_h[tok * kdim..(tok + 1) * kdim],
            &xs_h[tok * kb..(tok + 1) * kb],
            &w.w13[ex * n * kdim..(ex + 1) * n * kdim],
            &w.w13_scales[ex * s13..(ex + 1) * s13],
            n,
            kdim,
        );
        rv.extend(r.iter().map(|&v| v as f32));
        gv.extend_from_slice(&got[row * n..(row + 1) * n]);
    }
    let what = format!("grouped GEMM {backend:?} t={t} k={k} E={e} n={n} K={kdim} {layout:?}");
    // Hopper's FP8 wgmma keeps ~14 bits while accumulating a 128-wide K block, so the error scales with the block's
    // partial sums, which (scaled 1×128 groups) can exceed the row's result several times over: 4e-3 of the row's
    // rms. A scale from the wrong row or K block moves elements by tens of percent of it.
    check_rows_relative(&what, &gv, &rv, n, 4e-3);
    let diff = calc_diff(&gv, &rv);
    assert!(diff < 1e-5, "{what}: should be bf16-exact-ish: calc_diff {diff}");
}

/// The grouped-GEMM kernel each backend launches.
fn grouped_kernel(backend: GemmBackend) -> &'static str {
    match backend {
        GemmBackend::Portable => "moe_grouped_gemm_fp8",
        GemmBackend::Sm90Tma => "moe_grouped_gemm_fp8_sm90_tma",
        other => panic!("no kernel known for {other:?}"),
    }
}

#[test]
fn gpu_grouped_gemm_matches_reference() {
    let Some(gpu) = test_gpu("gpu_grouped_gemm_matches_reference") else { return };
    let mut backends = vec![GemmBackend::Portable];
    if sm90_part(&gpu, "gpu_grouped_gemm_matches_reference") {
        backends.push(GemmBackend::Sm90Tma);
    } else {
        assert!(matches!(
            grouped_gemm_with(
                &gpu,
                &DeviceTensor::zeros(&gpu, &[1, 128]).unwrap(),
                &DeviceTensor::zeros(&gpu, &[1, 4]).unwrap(),
                &DeviceTensor::zeros(&gpu, &[1, 128, 128]).unwrap(),
                &DeviceTensor::zeros(&gpu, &[1, 1, 1]).unwrap(),
                &DeviceTensor::zeros(&gpu, &[2]).unwrap(),
                &DeviceTensor::zeros(&gpu, &[1]).unwrap(),
                &mut DeviceTensor::zeros(&gpu, &[1, 128]).unwrap(),
                GemmBackend::Sm90Tma
            ),
            Err(Error::UnsupportedDevice { .. })
        ));
    }
    // (t, k, E) cases at N × K, and K of the masked 200-token case. A 64-row tile per expert hit makes the cost
    // about E·64·N·K: the emulated device keeps the token/expert ratios (top-8 over many experts, 4 tokens over 256
    // experts leaving most empty, many tiles per expert) with fewer experts and tokens, K = 256, and K = 640 (still
    // deeper than the wgmma kernel's 4 stages) for 1024.
    let (cases, (n, kdim), masked_k) = emu_shrink(
        &gpu,
        "gpu_grouped_gemm_matches_reference",
        (
            [(1usize, 1usize, 8usize), (16, 2, 8), (128, 8, 64), (512, 2, 64), (4096, 1, 8), (128, 8, 256)],
            (256, 384),
            1024,
        ),
        ([(1, 1, 8), (16, 2, 8), (32, 8, 32), (128, 2, 32), (1024, 1, 8), (4, 8, 256)], (256, 256), 640),
    );
    for backend in backends {
        for (c, &(t, k, e)) in cases.iter().enumerate() {
            check_grouped_gemm(&gpu, backend, t, k, e, n, kdim, Layout::Contiguous { block_m: 64 }, c as u64 * 10);
        }
        check_grouped_gemm(&gpu, backend, 64, 2, 8, 128, 256, Layout::Masked { max_m: 64 }, 77);
        check_grouped_gemm(&gpu, backend, 200, 2, 4, 384, masked_k, Layout::Masked { max_m: 192 }, 78);
        external_masked_gemm(&gpu, backend);
    }
}

/// Masked activations built on the host (as an all-to-all would deliver them) through `masked_offsets`.
fn external_masked_gemm(gpu: &Gpu, backend: GemmBackend) {
    let (e, max_m, n, kdim) = (3, 128, 256, 512);
    let counts = vec![0i32, 77, 128];
    let rows = e * max_m;
    let w = random_experts(e, kdim, n / 2, 5);
    let x = uniform(rows * kdim, 1.5, 6);
    let (aq, asc) = quantize_per_token_group(&x, rows, kdim, 128).unwrap();
    let as_mn = r1_kernels::reference::quant::scales_to_mn_major(&asc, rows, kdim / 128).unwrap();
    let ad = DeviceTensor::from_host(gpu, &aq, &[rows, kdim]).unwrap();
    let sd = DeviceTensor::from_host(gpu, &as_mn, &activation_scale_shape(rows, kdim)).unwrap();
    let wd = ExpertWeights::from_reference(gpu, &w).unwrap();
    let off = r1_kernels::moe::masked_offsets(gpu, e, max_m).unwrap();
    let cd = DeviceTensor::from_host(gpu, &counts, &[e]).unwrap();
    let mut out = DeviceTensor::from_host(gpu, &vec![bf16::NAN; rows * n], &[rows, n]).unwrap();
    grouped_gemm_with(gpu, &ad, &sd, &wd.w13, &wd.w13_scales, &off, &cd, &mut out, backend).unwrap();
    let got = from_bf16(&out.to_host(gpu).unwrap());
    let (kb, s13) = (kdim / 128, (n / 128) * (kdim / 128));
    let (mut gv, mut rv) = (Vec::new(), Vec::new());
    for (ex, &count) in counts.iter().enumerate() {
        for r in 0..max_m {
            let row = ex * max_m + r;
            let out_row = &got[row * n..(row + 1) * n];
            if r >= count as usize {
                assert!(out_row.iter().all(|v| v.is_nan()), "rows past counts are not written ({backend:?})");
                continue;
            }
            let want = fp8_row_times_matrix(
                &aq[row * kdim..(row + 1) * kdim],
                &asc[row * kb..(row + 1) * kb],
                &w.w13[ex * n * kdim..(ex + 1) * n * kdim],
                &w.w13_scales[ex * s13..(ex + 1) * s13],
                n,
                kdim,
            );
            rv.extend(want.iter().map(|&v| v as f32));
            gv.extend_from_slice(out_row);
        }
    }
    let diff = calc_diff(&gv, &rv);
    assert!(diff < 1e-5, "external masked GEMM diff {diff} ({backend:?})");
}

fn layer_case(gpu: &Gpu, cfg: &RouterConfig, t: usize, h: usize, i: usize, layout: Layout, seed: u64) {
    let mut backends = vec![GemmBackend::Portable];
    if sm90_part(gpu, "gpu_layer_matches_reference") {
        backends.push(GemmBackend::Sm90Tma);
    }
    layer_case_backends(gpu, cfg, t, h, i, layout, seed, &backends);
}

#[allow(clippy::too_many_arguments)]
fn layer_case_backends(
    gpu: &Gpu,
    cfg: &RouterConfig,
    t: usize,
    h: usize,
    i: usize,
    layout: Layout,
    seed: u64,
    backends: &[GemmBackend],
) {
    let e = cfg.num_experts;
    let w = random_experts(e, h, i, seed);
    let ws_ref = random_experts(1, h, i, seed + 1);
    let x = bf16_round(&scaled_activations(t, h, 2.0, seed + 2));
    let logits = uniform(t * e, 3.0, seed + 3);
    let bias = uniform(e, 0.05, seed + 4);
    let (ids, wts) = rm::route(&logits, Some(&bias), t, cfg).unwrap();
    let want = rm::moe_forward_fp8(&x, t, &ids, &wts, cfg.top_k, &w, Some(&ws_ref)).unwrap();

    let wd = ExpertWeights::from_reference(gpu, &w).unwrap();
    let sd = ExpertWeights::from_reference(gpu, &ws_ref).unwrap();
    let xd = DeviceTensor::from_host(gpu, &to_bf16(&x), &[t, h]).unwrap();
    let ld = DeviceTensor::from_host(gpu, &logits, &[t, e]).unwrap();
    let bd = DeviceTensor::from_host(gpu, &bias, &[e]).unwrap();
    for &backend in backends {
        let mut ws = MoeWorkspace::new(gpu, cfg, t, h, i, Some(i), layout).unwrap();
        ws.gemm_backend = backend;
        let mut out = DeviceTensor::from_host(gpu, &vec![bf16::NAN; t * h], &[t, h]).unwrap();
        let routing = Routing::logits(&ld, Some(&bd));
        let stages = [
            "act_quant_group128",
            "moe_router_f32",
            "moe_count_rank",
            "moe_offsets",
            "moe_scatter",
            "moe_gather",
            "moe_swiglu_quant",
            "moe_combine",
        ];
        expect_launched(gpu, &stages, || {
            expect_launched(gpu, &[grouped_kernel(backend)], || {
                moe_forward(gpu, cfg, &wd, Some(&sd), &xd, routing, &mut ws, &mut out)
            })
        })
        .unwrap();
        let got = from_bf16(&out.to_host(gpu).unwrap());
        assert_eq!(ws.topk_ids.to_host(gpu).unwrap(), ids);
        let what = format!("layer {backend:?} t={t} E={e} k={} H={h} I={i} {layout:?}", cfg.top_k);
        check_layer_output(&what, &got, &want, h);
        assert!(got.iter().all(|v| v.is_finite()));
        moe_forward(gpu, cfg, &wd, Some(&sd), &xd, routing, &mut ws, &mut out).unwrap();
        assert_eq!(bits(&from_bf16(&out.to_host(gpu).unwrap())), bits(&got), "layer repeat is bitwise");
        // Precomputed routing through the same path gives the same bits.
        let (idd, wdd) = (ws.topk_ids.to_host(gpu).unwrap(), ws.topk_weights.to_host(gpu).unwrap());
        let idd = DeviceTensor::from_host(gpu, &idd, &[t, cfg.top_k]).unwrap();
        let wdd = DeviceTensor::from_host(gpu, &wdd, &[t, cfg.top_k]).unwrap();
        moe_forward(gpu, cfg, &wd, Some(&sd), &xd, Routing::top_k(&idd, &wdd), &mut ws, &mut out).unwrap();
        assert_eq!(bits(&from_bf16(&out.to_host(gpu).unwrap())), bits(&got), "TopK routing path");
    }
}

/// A MoE layer output against the reference: DeepGEMM's `calc_diff` over the whole output (< 1e-3) and over each
/// token alone (< 3e-3: one wrong token or slot is a large share of its own row, whatever the batch size), and
/// finite everywhere. With exact accumulation the GPU matches the reference to ~1e-9; Hopper's FP8 accumulation
/// flips a few requantized SwiGLU codes (a token's calc_diff up to ~6e-4).
fn check_layer_output(what: &str, got: &[f32], want: &[f32], h: usize) {
    assert!(got.iter().all(|v| v.is_finite()), "{what}: non-finite output");
    let diff = calc_diff(got, want);
    let worst = got.chunks(h).zip(want.chunks(h)).map(|(g, w)| calc_diff(g, w)).fold(0f64, f64::max);
    eprintln!("{what}: calc_diff {diff:.3e}, worst token {worst:.3e}");
    assert!(diff < 1e-3, "{what}: calc_diff {diff}");
    assert!(worst < 3e-3, "{what}: a token's calc_diff {worst}");
}

#[test]
fn gpu_gate_logits_bitwise_and_gate_routing() {
    let test = "gpu_gate_logits_bitwise_and_gate_routing";
    let Some(gpu) = test_gpu(test) else { return };
    // Emulated: DeepSeek's E and H with 16 tokens (two 8-token blocks) for 128.
    let big = emu_shrink(&gpu, test, (128usize, 256usize, 7168usize), (16, 256, 7168));
    for &(t, e, h) in &[(1usize, 8usize, 256usize), (13, 64, 1000), big] {
        let x = bf16_round(&uniform(t * h, 1.0, 1));
        let w = bf16_round(&uniform(e * h, 0.05, 2));
        let want = rm::gate_logits(&x, &w, t, e, h).unwrap();
        let xd = DeviceTensor::from_host(&gpu, &to_bf16(&x), &[t, h]).unwrap();
        let wd = DeviceTensor::from_host(&gpu, &to_bf16(&w), &[e, h]).unwrap();
        let mut l = DeviceTensor::from_host(&gpu, &vec![f32::NAN; t * e], &[t, e]).unwrap();
        expect_launched(&gpu, &["moe_gate_logits"], || gate_logits(&gpu, &xd, &wd, &mut l)).unwrap();
        assert_eq!(bits(&l.to_host(&gpu).unwrap()), bits(&want), "gate logits t={t} E={e} H={h}");
    }
    // H = 0: empty dot products, so every logit is 0 (the launcher once returned without writing them).
    let (xd, wd) =
        (DeviceTensor::<bf16>::zeros(&gpu, &[3, 0]).unwrap(), DeviceTensor::<bf16>::zeros(&gpu, &[5, 0]).unwrap());
    let mut l = DeviceTensor::from_host(&gpu, &[f32::NAN; 15], &[3, 5]).unwrap();
    gate_logits(&gpu, &xd, &wd, &mut l).unwrap();
    assert_eq!(l.to_host(&gpu).unwrap(), vec![0f32; 15], "gate logits with H = 0");
    // The fused gate path routes exactly like the reference fed with the reference logits.
    let cfg = RouterConfig { num_experts: 16, top_k: 2, num_groups: 4, topk_groups: 2, ..RouterConfig::deepseek_v3() };
    let (t, h, i) = (40, 256, 128);
    let w = random_experts(16, h, i, 3);
    let x = bf16_round(&uniform(t * h, 2.0, 4));
    let wg = bf16_round(&uniform(16 * h, 0.1, 5));
    let logits = rm::gate_logits(&x, &wg, t, 16, h).unwrap();
    let (ids, wts) = rm::route(&logits, None, t, &cfg).unwrap();
    let want = rm::moe_forward_fp8(&x, t, &ids, &wts, 2, &w, None).unwrap();
    let wd = ExpertWeights::from_reference(&gpu, &w).unwrap();
    let xd = DeviceTensor::from_host(&gpu, &to_bf16(&x), &[t, h]).unwrap();
    let gd = DeviceTensor::from_host(&gpu, &to_bf16(&wg), &[16, h]).unwrap();
    let mut ws = MoeWorkspace::new(&gpu, &cfg, t, h, i, None, Layout::Contiguous { block_m: 64 }).unwrap();
    let mut out = DeviceTensor::zeros(&gpu, &[t, h]).unwrap();
    moe_forward(
        &gpu,
        &cfg,
        &wd,
        None::<&ExpertWeights>,
        &xd,
        Routing::gate(&gd, r1_kernels::no_tensor()),
        &mut ws,
        &mut out,
    )
    .unwrap();
    assert_eq!(ws.topk_ids.to_host(&gpu).unwrap(), ids);
    let diff = calc_diff(&from_bf16(&out.to_host(&gpu).unwrap()), &want);
    assert!(diff < 1e-3, "gate-routed layer diff {diff}");
}

#[test]
fn gpu_layer_matches_reference() {
    let Some(gpu) = test_gpu("gpu_layer_matches_reference") else { return };
    let ds = RouterConfig::deepseek_v3();
    let small = |e, k, g, kg| RouterConfig { num_experts: e, top_k: k, num_groups: g, topk_groups: kg, ..ds };
    let contiguous = Layout::Contiguous { block_m: 64 };
    // Each expert hit costs a 64-row tile of both GEMMs, three times per backend: the emulated device keeps the
    // routing shapes (top-8 in 4 of 8 groups, a masked layout) with half or a quarter of the experts and tokens, and
    // the DeepSeek-V3 routing with 2 tokens at hidden 768 (6 K blocks: still deeper than the wgmma ring),
    // intermediate 128, for 16 tokens at 7168 and 256.
    let (t2, (e3, t3), (e4, t4), (t5, h5, i5)) = emu_shrink(
        &gpu,
        "gpu_layer_matches_reference (case 2 t, case 3 E and t, case 4 E and t, case 5 t, H, I)",
        (4096, (64, 128), (64, 512), (16, 7168, 256)),
        (1024, (32, 32), (16, 256), (2, 768, 128)),
    );
    layer_case(&gpu, &small(8, 2, 1, 1), 1, 256, 128, contiguous, 1);
    layer_case(&gpu, &small(8, 1, 1, 1), t2, 256, 128, contiguous, 2);
    layer_case(&gpu, &small(e3, 8, 8, 4), t3, 256, 128, contiguous, 3);
    layer_case(&gpu, &small(e4, 2, 1, 1), t4, 256, 256, Layout::Masked { max_m: 128 }, 4);
    // DeepSeek-V3 routing and hidden size with a reduced intermediate size (the CPU reference's cost).
    layer_case(&gpu, &ds, t5, h5, i5, contiguous, 5);
}

#[test]
fn gpu_stages_compose_and_combine_is_bitwise() {
    let Some(gpu) = test_gpu("gpu_stages_compose_and_combine_is_bitwise") else { return };
    // Combine alone: random y rows, bitwise against combine_token (with and without weights / shared).
    // H = 384 and H = 2176 (past 1024 columns: a second grid row of column blocks, and a ragged one).
    for &(t, k, h, rows) in &[(33usize, 4usize, 384usize, 200usize), (6, 3, 2176, 20)] {
        let y = bf16_round(&uniform(rows * h, 3.0, 1));
        let sh = bf16_round(&uniform(t * h, 1.0, 2));
        let mut rng = SplitMix64::new(3);
        let row_of: Vec<i32> = (0..t * k).map(|_| int_in(&mut rng, -1..rows as i32)).collect();
        let wts = uniform(t * k, 1.0, 4);
        let yd = DeviceTensor::from_host(&gpu, &to_bf16(&y), &[rows, h]).unwrap();
        let rd = DeviceTensor::from_host(&gpu, &row_of, &[t * k]).unwrap();
        let wd = DeviceTensor::from_host(&gpu, &wts, &[t, k]).unwrap();
        let sd = DeviceTensor::from_host(&gpu, &to_bf16(&sh), &[t, h]).unwrap();
        for (skip, shared) in [(false, true), (true, false)] {
            let mut out = DeviceTensor::from_host(&gpu, &vec![bf16::NAN; t * h], &[t, h]).unwrap();
            expect_launched(&gpu, &["moe_combine"], || {
                combine(&gpu, &yd, &rd, &wd, shared.then_some(&sd), skip, &mut out)
            })
            .unwrap();
            let got = from_bf16(&out.to_host(&gpu).unwrap());
            for tok in 0..t {
                let ys: Vec<Option<(&[f32], f32)>> = (0..k)
                    .map(|s| {
                        let r = row_of[tok * k + s];
                        (r >= 0).then(|| {
                            (&y[r as usize * h..(r as usize + 1) * h], if skip { 1.0 } else { wts[tok * k + s] })
                        })
                    })
                    .collect();
                let want = combine_token(&ys, shared.then(|| &sh[tok * h..(tok + 1) * h]), h);
                assert_eq!(bits(&got[tok * h..(tok + 1) * h]), bits(&want), "combine token {tok} skip={skip}");
            }
        }
    }
    // SwiGLU alone: bitwise against the reference (the exp is twinned).
    let (r, i) = (37, 256);
    let hbuf = bf16_round(&uniform(r * 2 * i, 4.0, 5));
    let hd = DeviceTensor::from_host(&gpu, &to_bf16(&hbuf), &[r, 2 * i]).unwrap();
    let mut q = DeviceTensor::from_host(&gpu, &vec![E4M3(0xff); r * i], &[r, i]).unwrap();
    let shape = activation_scale_shape(r, i);
    let mut s = DeviceTensor::from_host(&gpu, &vec![f32::NAN; shape[0] * shape[1]], &shape).unwrap();
    expect_launched(&gpu, &["moe_swiglu_quant"], || {
        swiglu_quant(&gpu, &hd, &mut q, &mut s, ScaleFormat::F32, r1_kernels::no_tensor())
    })
    .unwrap();
    let (qg, sg) = (q.to_host(&gpu).unwrap(), scales_from_mn_major(&s.to_host(&gpu).unwrap(), r, i / 128).unwrap());
    let q_f32_run = qg.clone();
    let mut mismatches = 0;
    for row in 0..r {
        let (qr, sr) = rm::swiglu_quant(&hbuf[row * 2 * i..(row + 1) * 2 * i], i).unwrap();
        assert_eq!(bits(&sr), bits(&sg[row * (i / 128)..(row + 1) * (i / 128)]), "swiglu scales row {row}");
        mismatches += qr.iter().zip(&qg[row * i..(row + 1) * i]).filter(|(a, b)| a != b).count();
    }
    assert_eq!(mismatches, 0, "{mismatches} swiglu codes differ");
    // The scale rows past r (padding up to a multiple of 4) are zeroed.
    let raw = s.to_host(&gpu).unwrap();
    let rows_pad = shape[1];
    for g in 0..i / 128 {
        assert!(raw[g * rows_pad + r..(g + 1) * rows_pad].iter().all(|&v| v == 0.0), "swiglu scale padding rows");
    }
    // Power-of-two scales: the same SwiGLU values quantized with UE8M0 scales, bitwise.
    let mut s8 = DeviceTensor::from_host(&gpu, &vec![f32::NAN; shape[0] * shape[1]], &shape).unwrap();
    swiglu_quant(&gpu, &hd, &mut q, &mut s8, ScaleFormat::Ue8m0, r1_kernels::no_tensor()).unwrap();
    let (qg, sg) = (q.to_host(&gpu).unwrap(), scales_from_mn_major(&s8.to_host(&gpu).unwrap(), r, i / 128).unwrap());
    for row in 0..r {
        let hr = &hbuf[row * 2 * i..(row + 1) * 2 * i];
        let act: Vec<f32> = (0..i).map(|c| rm::silu(hr[c]) * hr[i + c]).collect();
        let (qr, sr) = quantize_per_token_group_with(&act, 1, i, 128, ScaleFormat::Ue8m0).unwrap();
        assert!(sr.iter().all(|v| v.to_bits() & 0x007f_ffff == 0), "UE8M0 scales are powers of two");
        assert_eq!(bits(&sr), bits(&sg[row * (i / 128)..(row + 1) * (i / 128)]), "ue8m0 swiglu scales row {row}");
        assert_eq!(&qr[..], &qg[row * i..(row + 1) * i], "ue8m0 swiglu codes row {row}");
    }
    // With a limit (a permutation's offsets: rows at or past offsets[E] are not in use) those rows stay untouched.
    let offsets: Vec<i64> = vec![0, 12, 20];
    let od = DeviceTensor::from_host(&gpu, &offsets, &[3]).unwrap();
    let mut ql = DeviceTensor::from_host(&gpu, &vec![E4M3(0xff); r * i], &[r, i]).unwrap();
    let mut sl = DeviceTensor::from_host(&gpu, &vec![f32::NAN; shape[0] * shape[1]], &shape).unwrap();
    swiglu_quant(&gpu, &hd, &mut ql, &mut sl, ScaleFormat::F32, Some(&od)).unwrap();
    let (ql, sl) = (ql.to_host(&gpu).unwrap(), sl.to_host(&gpu).unwrap());
    let full = q_f32_run;
    assert_eq!(&ql[..20 * i], &full[..20 * i], "rows below the limit as without it");
    assert!(ql[20 * i..].iter().all(|c| c.0 == 0xff), "rows past the limit were written");
    for g in 0..i / 128 {
        let col = &sl[g * rows_pad..(g + 1) * rows_pad];
        assert!(col[20..].iter().all(|v| v.is_nan()), "scales of rows past the limit were written");
        assert_eq!(bits(&col[..20]), bits(&raw[g * rows_pad..g * rows_pad + 20]));
    }
}

/// Fills a large device tensor from a repeated host pattern (DeepSeek-size weights without an 11 GB host copy).
fn fill_repeated<T: cudarc::driver::DeviceRepr + Copy>(gpu: &Gpu, dst: &mut DeviceTensor<T>, pattern: &[T]) {
    let n = dst.numel();
    let mut at = 0;
    while at < n {
        let len = pattern.len().min(n - at);
        let mut all = dst.view_mut();
        let mut view = all.slice_mut(at..at + len);
        gpu.stream().memcpy_htod(&pattern[..len], &mut view).unwrap();
        at += len;
    }
}

/// The repeated code and scale patterns [`deepseek_weights`] fills the device with.
fn deepseek_patterns() -> (Vec<E4M3>, Vec<f32>) {
    let mut rng = SplitMix64::new(9);
    let codes = finite_e4m3_codes(&mut rng, (1 << 24) + 13);
    let scales: Vec<f32> = (0..4099).map(|_| (0.5 + rng.next_f32()) / 448.0 / 60.0).collect();
    (codes, scales)
}

/// DeepSeek-V3 shaped weights (`e` experts of hidden `h`, intermediate `i`), device-filled.
fn deepseek_weights(gpu: &Gpu, e: usize, h: usize, i: usize) -> ExpertWeights {
    let (codes, scales) = deepseek_patterns();
    let mut w = ExpertWeights {
        w13: DeviceTensor::zeros(gpu, &[e, 2 * i, h]).unwrap(),
        w13_scales: DeviceTensor::zeros(gpu, &[e, 2 * i / 128, h / 128]).unwrap(),
        w2: DeviceTensor::zeros(gpu, &[e, h, i]).unwrap(),
        w2_scales: DeviceTensor::zeros(gpu, &[e, h / 128, i / 128]).unwrap(),
    };
    fill_repeated(gpu, &mut w.w13, &codes);
    fill_repeated(gpu, &mut w.w2, &codes[7..]);
    fill_repeated(gpu, &mut w.w13_scales, &scales);
    fill_repeated(gpu, &mut w.w2_scales, &scales[3..]);
    w
}

/// Expert `ex` of [`deepseek_weights`] on the host (one expert at a time: all 256 would be 11 GB).
fn deepseek_expert_host(codes: &[E4M3], scales: &[f32], ex: usize, h: usize, i: usize) -> ExpertsFp8 {
    fn window<T: Copy>(pattern: &[T], start: usize, len: usize) -> Vec<T> {
        (start..start + len).map(|g| pattern[g % pattern.len()]).collect()
    }
    let (n13, s13, n2, s2) = (2 * i * h, (2 * i / 128) * (h / 128), h * i, (h / 128) * (i / 128));
    ExpertsFp8 {
        num_experts: 1,
        hidden: h,
        intermediate: i,
        w13: window(codes, ex * n13, n13),
        w13_scales: window(scales, ex * s13, s13),
        w2: window(&codes[7..], ex * n2, n2),
        w2_scales: window(&scales[3..], ex * s2, s2),
    }
}

/// The reference layer over [`deepseek_weights`] experts (and one such shared expert), for routing `ids`/`wts`:
/// each used expert is materialized once and its tokens run through `rm::moe_forward_fp8` as a one-expert layer
/// (slot weight 1, no shared expert), then combined in slot order as the GPU does. Threads split the experts.
#[allow(clippy::too_many_arguments)]
fn deepseek_reference(
    x: &[f32],
    t: usize,
    ids: &[i32],
    wts: &[f32],
    k: usize,
    e: usize,
    h: usize,
    i: usize,
) -> Vec<f32> {
    let (codes, scales) = deepseek_patterns();
    let one_expert = |w: &ExpertsFp8, tokens: &[usize]| -> Vec<Vec<f32>> {
        let xs: Vec<f32> = tokens.iter().flat_map(|&tok| x[tok * h..(tok + 1) * h].iter().copied()).collect();
        let n = tokens.len();
        let y = rm::moe_forward_fp8(&xs, n, &vec![0; n], &vec![1.0; n], 1, w, None).unwrap();
        y.chunks(h).map(<[f32]>::to_vec).collect()
    };
    // Per (token, slot) expert output, and per token the shared expert's.
    let mut outputs: Vec<Option<Vec<f32>>> = vec![None; t * k];
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(e);
    let per_thread: Vec<Vec<(usize, Vec<f32>)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|th| {
                let one_expert = &one_expert;
                let (codes, scales) = (&codes, &scales);
                scope.spawn(move || {
                    let mut out = Vec::new();
                    for ex in (th..e).step_by(threads) {
                        let pairs: Vec<usize> = (0..t * k).filter(|&p| ids[p] == ex as i32).collect();
                        if pairs.is_empty() {
                            continue;
                        }
                        let w = deepseek_expert_host(codes, scales, ex, h, i);
                        let tokens: Vec<usize> = pairs.iter().map(|p| p / k).collect();
                        out.extend(pairs.into_iter().zip(one_expert(&w, &tokens)));
                    }
                    out
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (pair, y) in per_thread.into_iter().flatten() {
        outputs[pair] = Some(y);
    }
    let shared = one_expert(&deepseek_expert_host(&codes, &scales, 0, h, i), &(0..t).collect::<Vec<_>>());
    let mut out = Vec::with_capacity(t * h);
    for tok in 0..t {
        let ys: Vec<Option<(&[f32], f32)>> =
            (0..k).map(|s| outputs[tok * k + s].as_deref().map(|y| (y, wts[tok * k + s]))).collect();
        out.extend(combine_token(&ys, Some(&shared[tok]), h));
    }
    out
}

#[test]
fn gpu_layer_graph_replay_equals_eager() {
    let Some(gpu) = test_gpu("gpu_layer_graph_replay_equals_eager") else { return };
    use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
    let cfg = RouterConfig::deepseek_v3();
    // DeepSeek-V3 routing on 256 experts; the emulated device takes 4 tokens at hidden 512, intermediate 128 (the
    // real shapes are 11 GB of weights and 64 tokens).
    let (t, h, i) =
        emu_shrink(&gpu, "gpu_layer_graph_replay_equals_eager", (64usize, 7168usize, 2048usize), (4, 512, 128));
    let experts = deepseek_weights(&gpu, 256, h, i);
    let shared = deepseek_weights(&gpu, 1, h, i);
    let x_host = bf16_round(&scaled_activations(t, h, 2.0, 1));
    let (logits_host, bias_host) = (uniform(t * 256, 3.0, 2), uniform(256, 0.05, 3));
    let mut x = DeviceTensor::from_host(&gpu, &to_bf16(&x_host), &[t, h]).unwrap();
    let mut logits = DeviceTensor::from_host(&gpu, &logits_host, &[t, 256]).unwrap();
    let bias = DeviceTensor::from_host(&gpu, &bias_host, &[256]).unwrap();
    let mut ws = MoeWorkspace::new(&gpu, &cfg, t, h, i, Some(i), Layout::Contiguous { block_m: 64 }).unwrap();
    let mut out = DeviceTensor::zeros(&gpu, &[t, h]).unwrap();
    let routing = Routing::logits(&logits, Some(&bias));
    moe_forward(&gpu, &cfg, &experts, Some(&shared), &x, routing, &mut ws, &mut out).unwrap();
    let eager = out.to_host(&gpu).unwrap();
    // Eager against the reference at these sizes: routing exact, output by the layer metrics.
    let (ids, wts) = rm::route(&logits_host, Some(&bias_host), t, &cfg).unwrap();
    assert_eq!(ws.topk_ids.to_host(&gpu).unwrap(), ids, "DeepSeek-V3 routing");
    let want = deepseek_reference(&x_host, t, &ids, &wts, cfg.top_k, 256, h, i);
    check_layer_output(&format!("DeepSeek-V3 layer t={t} H={h} I={i}"), &from_bf16(&eager), &want, h);

    out.copy_from_host(&gpu, &vec![bf16::NAN; t * h]).unwrap();
    gpu.synchronize().unwrap();
    // Event tracking records events on buffers during launches; keep capture to the kernels alone.
    // SAFETY: every buffer is used on this one stream only, so cross-stream event ordering is not needed.
    unsafe { gpu.context().disable_event_tracking() };
    gpu.stream().begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).unwrap();
    let captured = moe_forward(&gpu, &cfg, &experts, Some(&shared), &x, routing, &mut ws, &mut out);
    let graph = gpu.stream().end_capture(CUgraphInstantiate_flags(0)).unwrap();
    unsafe { gpu.context().enable_event_tracking() };
    captured.unwrap();
    let graph = graph.expect("a captured graph");
    graph.launch().unwrap();
    let bits = |v: &[bf16]| v.iter().map(|v| v.to_bits()).collect::<Vec<u16>>();
    assert_eq!(bits(&out.to_host(&gpu).unwrap()), bits(&eager), "graph replay equals eager bitwise");
    // Replays on new activations and router logits (other experts hit) equal eager runs on them, bitwise.
    for step in 0..2u64 {
        x.copy_from_host(&gpu, &to_bf16(&bf16_round(&scaled_activations(t, h, 2.0, 10 + step)))).unwrap();
        logits.copy_from_host(&gpu, &uniform(t * 256, 3.0, 20 + step)).unwrap();
        out.copy_from_host(&gpu, &vec![bf16::NAN; t * h]).unwrap();
        graph.launch().unwrap();
        let replay = out.to_host(&gpu).unwrap();
        let routing = Routing::logits(&logits, Some(&bias));
        moe_forward(&gpu, &cfg, &experts, Some(&shared), &x, routing, &mut ws, &mut out).unwrap();
        let eager_step = out.to_host(&gpu).unwrap();
        assert_ne!(bits(&eager_step), bits(&eager), "step {step}: new inputs give a new output");
        assert_eq!(bits(&replay), bits(&eager_step), "step {step}: graph replay on new inputs equals eager bitwise");
    }
}

/// Rows the permutation leaves invalid (padding, unused capacity) are never written by the Sm90Tma backend.
fn tma_leaves_invalid_rows(gpu: &Gpu, t: usize, k: usize, e: usize, layout: Layout, seed: u64) {
    let (n, kdim) = (256, 256);
    let ids = random_ids(t, k, e, true, seed);
    let w = random_experts(e, kdim, n / 2, seed + 1);
    let x = to_bf16(&uniform(t * kdim, 2.0, seed + 2));
    let xd = DeviceTensor::from_host(gpu, &x, &[t, kdim]).unwrap();
    let mut xq = DeviceTensor::zeros(gpu, &[t, kdim]).unwrap();
    let mut xs = DeviceTensor::zeros(gpu, &activation_scale_shape(t, kdim)).unwrap();
    quantize_activations(gpu, &xd, &mut xq, &mut xs, ScaleFormat::F32).unwrap();
    let mut p = Permuted::new(gpu, t, k, e, kdim, layout).unwrap();
    permute(gpu, &upload_topk_ids(gpu, &ids, t, k, e).unwrap(), &xq, &xs, &mut p).unwrap();
    let wd = ExpertWeights::from_reference(gpu, &w).unwrap();
    let cap = p.capacity();
    let mut out = DeviceTensor::from_host(gpu, &vec![bf16::NAN; cap * n], &[cap, n]).unwrap();
    let (a, s, off, c) = (&p.codes, &p.scales, &p.offsets, &p.counts);
    grouped_gemm_with(gpu, a, s, &wd.w13, &wd.w13_scales, off, c, &mut out, GemmBackend::Sm90Tma).unwrap();
    let got = from_bf16(&out.to_host(gpu).unwrap());
    let src = p.src_index.to_host(gpu).unwrap();
    for (row, &si) in src.iter().enumerate() {
        let r = &got[row * n..(row + 1) * n];
        if si < 0 {
            assert!(r.iter().all(|v| v.is_nan()), "invalid row {row} written (t={t} k={k} E={e} {layout:?})");
        } else {
            assert!(r.iter().all(|v| v.is_finite()), "valid row {row} not written (t={t} k={k} E={e} {layout:?})");
        }
    }
}

/// The opt-in persistent TMA backend (`GemmBackend::Sm90Tma`) against the reference: contiguous layouts over
/// t ∈ {1, 16, 512}, E ∈ {8, 64}, k ∈ {1, 8} (ragged counts, empty experts), half-empty 128-row segments, masked
/// layouts, rows past the counts untouched, bitwise repeats, and the full layer through it. Named to run after the
/// other tests (a pipeline bug traps the context).
#[test]
fn gpu_grouped_gemm_sm90_tma_matches_reference() {
    let Some(gpu) = test_gpu("gpu_grouped_gemm_sm90_tma_matches_reference") else { return };
    let backend = GemmBackend::Sm90Tma;
    if !sm90_part(&gpu, "gpu_grouped_gemm_sm90_tma_matches_reference") {
        let r = grouped_gemm_with(
            &gpu,
            &DeviceTensor::zeros(&gpu, &[1, 128]).unwrap(),
            &DeviceTensor::zeros(&gpu, &[1, 4]).unwrap(),
            &DeviceTensor::zeros(&gpu, &[1, 128, 128]).unwrap(),
            &DeviceTensor::zeros(&gpu, &[1, 1, 1]).unwrap(),
            &DeviceTensor::zeros(&gpu, &[2]).unwrap(),
            &DeviceTensor::zeros(&gpu, &[1]).unwrap(),
            &mut DeviceTensor::zeros(&gpu, &[1, 128]).unwrap(),
            backend,
        );
        assert!(matches!(r, Err(Error::UnsupportedDevice { .. })));
        eprintln!("gpu_grouped_gemm_sm90_tma_matches_reference: not sm_90, only the error path tested");
        return;
    }
    // The emulated device (each expert hit is a 64-row tile per 128 columns) takes t ∈ {1, 16, 128}, E ∈ {8, 16},
    // K = 256 for 384 in the sweep, 1024 tokens for 4096, K = 640 (deeper than a pipe's 4 stages) for 1024, and
    // 32 experts / 32 tokens for 64 / 128 in the invalid-rows and layer checks.
    let (ts, es, nk0, t_many, masked_k, (e_inv, e_layer, t_layer)) = emu_shrink(
        &gpu,
        "gpu_grouped_gemm_sm90_tma_matches_reference",
        ([1usize, 16, 512], [8usize, 64], (256usize, 384usize), 4096, 1024, (64, 64, 128)),
        ([1, 16, 128], [8, 16], (256, 256), 1024, 640, (32, 32, 32)),
    );
    let mut seed = 500;
    for &t in &ts {
        for &e in &es {
            for &k in &[1usize, 8] {
                for &(n, kdim) in &[nk0, (384, 128)] {
                    check_grouped_gemm(&gpu, backend, t, k, e, n, kdim, Layout::Contiguous { block_m: 64 }, seed);
                    seed += 10;
                }
            }
        }
    }
    check_grouped_gemm(&gpu, backend, 300, 2, 8, 256, 512, Layout::Contiguous { block_m: 128 }, 901);
    check_grouped_gemm(&gpu, backend, t_many, 1, 8, 128, 256, Layout::Contiguous { block_m: 64 }, 902);
    check_grouped_gemm(&gpu, backend, 64, 2, 8, 128, 256, Layout::Masked { max_m: 64 }, 903);
    check_grouped_gemm(&gpu, backend, 200, 2, 4, 384, masked_k, Layout::Masked { max_m: 192 }, 904);
    // Both pipes with several tiles of 8 K blocks each (twice their 4-stage half-rings).
    check_grouped_gemm(&gpu, backend, 128, 4, 4, 384, 1024, Layout::Contiguous { block_m: 64 }, 909);
    external_masked_gemm(&gpu, backend);
    tma_leaves_invalid_rows(&gpu, 16, 8, e_inv, Layout::Contiguous { block_m: 64 }, 905);
    tma_leaves_invalid_rows(&gpu, 100, 2, 8, Layout::Contiguous { block_m: 128 }, 906);
    tma_leaves_invalid_rows(&gpu, 100, 4, 8, Layout::Masked { max_m: 64 }, 907);
    let ds = RouterConfig::deepseek_v3();
    let small = RouterConfig { num_experts: e_layer, top_k: 8, num_groups: 8, topk_groups: 4, ..ds };
    layer_case_backends(&gpu, &small, t_layer, 256, 128, Layout::Contiguous { block_m: 64 }, 908, &[backend]);
}
