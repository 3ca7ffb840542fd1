//! Property tests of every GPU entry point (skipped without a device, like the other GPU tests).
//!
//! Each case is seeded random input mixing valid and invalid arguments: wrong ranks and shapes, zero sizes,
//! misaligned dimensions, expert ids and block-table entries out of range, sequence lengths past the cache's
//! capacity, NaN/Inf values. Outputs are poisoned with a known pattern before the call. The property: the call
//! returns a validation error and every output is bitwise untouched after `gpu.synchronize()`, or it succeeds, the
//! arguments were valid, and the result equals the CPU reference in `r1_kernels::reference` (bitwise where the kernel
//! is specified bitwise, else within the bounds the kernel's own tests use). Shapes stay tiny so the emulator runs a
//! case in milliseconds. `R1K_FUZZ_CASES` and `R1K_FUZZ_SEED` as in `tests/common/fuzz.rs`.

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use r1_kernels::decode_ops;
use r1_kernels::device::test_gpu;
use r1_kernels::fp8_gemm::{self, ForcedSm90, GemmKernel, GemmOptions};
#[cfg(feature = "layer")]
use r1_kernels::layer::{DecodeBatch, DecodeLayer};
use r1_kernels::mla::{self, Backend, MlaOptions, MlaPlan, MlaWorkspace, SplitMode};
#[cfg(feature = "layer")]
use r1_kernels::model::{synthetic_layer_weights, DeepSeekV3Config};
use r1_kernels::moe::{self, ExpertWeights, GemmBackend, Layout, MoeWorkspace, Permuted, Routing};
use r1_kernels::quant::{self, activation_scale_shape, weight_scale_shape};
use r1_kernels::reference::decode_ops as rdo;
use r1_kernels::reference::fp8_gemm::fp8_gemm as ref_gemm;
#[cfg(feature = "layer")]
use r1_kernels::reference::layer::{decode_layer as ref_layer, moe_branch, DecodeStep as RefStep, PreparedLayer};
use r1_kernels::reference::mla::{
    dequantize_kv_cache_fp8, mla_decode as ref_mla, quantize_kv_cache_fp8, MlaConfig, D_QK, D_V, FP8_TOKEN_BYTES,
};
use r1_kernels::reference::moe::{self as rm, ExpertsFp8, RouterConfig, Scoring};
use r1_kernels::reference::quant::{
    quantize_per_block_with, quantize_per_token_group_with, scales_from_mn_major, scales_to_mn_major, ScaleFormat,
};
use r1_kernels::rng::SplitMix64;
use r1_kernels::{bf16, DeviceTensor, Error, Gpu, E4M3};

mod common;
#[cfg(feature = "layer")]
use common::block_table;
use common::{block_magnitude, finite_e4m3_codes, index_below, int_in, shuffle, uniform_vec};
use common::{paged_cache, shuffled_pages};
#[path = "common/fuzz.rs"]
#[macro_use]
mod fuzz;
use fuzz::{download, expect_validation_error, perturb, perturbations, poisoned, untouched, Outcome, Poison};

// ------------------------------------------------------------------------------------------------ data helpers

/// Values in ±`scale`; with `specials`, about one in eight replaced by NaN, ±Inf, ±0, a huge or a tiny value.
fn values(n: usize, seed: u64, scale: f32, specials: bool) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed);
    (0..n)
        .map(|_| {
            if specials && int_in(&mut rng, 0..8) == 0 {
                [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.0, -0.0, 3.0e38, -1.0e-30, 1.0e-40]
                    [index_below(&mut rng, 8)]
            } else {
                (rng.next_f32() * 2.0 - 1.0) * scale
            }
        })
        .collect()
}

fn to_bf16(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|&x| bf16::from_f32(x)).collect()
}

fn from_bf16(v: &[bf16]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

/// Random E4M3 codes, never NaN.
fn codes(n: usize, seed: u64) -> Vec<E4M3> {
    finite_e4m3_codes(&mut SplitMix64::new(seed), n)
}

/// Positive block scales: a random power of two in [2^-2, 2^2] times `base`.
fn scales(n: usize, seed: u64, base: f32) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed);
    (0..n).map(|_| base * block_magnitude(&mut rng)).collect()
}

fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

fn same_f32(a: f32, b: f32) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

/// Random FP8 experts (`[E, 2I, H]` gate|up and `[E, H, I]` down) with scales that keep activations O(1).
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

/// `|got − want| ≤ 2^-7·|want| + row_rel·rms(want row)` for every element (rows `n` wide).
fn rows_close(what: &str, got: &[f32], want: &[f32], n: usize, row_rel: f32) -> Result<(), TestCaseError> {
    check!(got.len() == want.len(), "{what}: {} elements, reference {}", got.len(), want.len());
    for (r, (g, w)) in got.chunks(n.max(1)).zip(want.chunks(n.max(1))).enumerate() {
        let rms = (w.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / n.max(1) as f64).sqrt() as f32;
        for (c, (&a, &b)) in g.iter().zip(w).enumerate() {
            let tol = 2f32.powi(-7) * b.abs() + row_rel * rms;
            check!((a - b).abs() <= tol, "{what}: row {r} col {c}: {a} vs reference {b} (tolerance {tol:.3e})");
        }
    }
    Ok(())
}

// ----------------------------------------------------------------------------------------------------- quant

fn quant_k() -> impl Strategy<Value = usize> {
    prop::sample::select(vec![0usize, 8, 12, 16, 100, 128, 135, 256, 300])
}

#[test]
fn fuzz_quantize_activations() {
    let Some(gpu) = test_gpu("fuzz_quantize_activations") else { return };
    let strategy = ((0usize..6, quant_k()), perturbations::<3>(), any::<bool>(), any::<u64>(), any::<bool>());
    fuzz::run("quant::quantize_activations", strategy, |((m, k), p, ue8m0, seed, specials)| {
        let format = if ue8m0 { ScaleFormat::Ue8m0 } else { ScaleFormat::F32 };
        let xs = perturb(&[m, k], p[0].0, p[0].1);
        let x = values(numel(&xs), seed, 4.0, specials);
        let xd = DeviceTensor::from_host(&gpu, &to_bf16(&x), &xs).unwrap();
        let qs = perturb(&[m, k], p[1].0, p[1].1);
        let ss = perturb(&activation_scale_shape(m, k), p[2].0, p[2].1);
        let (mut q, q0) = poisoned::<E4M3>(&gpu, &qs);
        let (mut s, s0) = poisoned::<f32>(&gpu, &ss);
        let valid = xs.len() == 2 && qs == xs && ss == activation_scale_shape(xs[0], xs[1]);
        match quant::quantize_activations(&gpu, &xd, &mut q, &mut s, format) {
            Err(e) => {
                expect_validation_error("quantize_activations", &e)?;
                check!(!valid, "valid x {xs:?} q {qs:?} s {ss:?} rejected: {e}");
                untouched(&gpu, "q", &q, &q0)?;
                untouched(&gpu, "scales", &s, &s0)?;
                Ok(Outcome::Rejected)
            }
            Ok(()) => {
                check!(valid, "accepted x {xs:?} q {qs:?} s {ss:?}");
                let (m, k) = (xs[0], xs[1]);
                let x32 = from_bf16(&to_bf16(&x));
                let (q_ref, s_ref) = quantize_per_token_group_with(&x32, m, k, 128, format).unwrap();
                let s_ref = scales_to_mn_major(&s_ref, m, k.div_ceil(128)).unwrap();
                let (qg, sg) = (download(&gpu, "q", &q)?, download(&gpu, "scales", &s)?);
                if m * k == 0 {
                    check!(qg.is_empty(), "empty problem wrote codes");
                    untouched(&gpu, "scales", &s, &s0)?;
                } else {
                    check!(qg == q_ref, "codes differ from the reference (m={m} k={k} {format:?})");
                    let same = sg.iter().zip(&s_ref).all(|(a, b)| same_f32(*a, *b));
                    check!(same && sg.len() == s_ref.len(), "scales differ: {sg:?} vs {s_ref:?}");
                }
                Ok(Outcome::Matched)
            }
        }
    });
}

#[test]
fn fuzz_quantize_weights() {
    let Some(gpu) = test_gpu("fuzz_quantize_weights") else { return };
    let strategy = (
        (prop::sample::select(vec![0usize, 1, 3, 128, 130]), quant_k()),
        perturbations::<3>(),
        any::<bool>(),
        any::<u64>(),
        any::<bool>(),
    );
    fuzz::run("quant::quantize_weights", strategy, |((n, k), p, ue8m0, seed, specials)| {
        let format = if ue8m0 { ScaleFormat::Ue8m0 } else { ScaleFormat::F32 };
        let ws = perturb(&[n, k], p[0].0, p[0].1);
        let w = values(numel(&ws), seed, 2.0, specials);
        let wd = DeviceTensor::from_host(&gpu, &to_bf16(&w), &ws).unwrap();
        let qs = perturb(&[n, k], p[1].0, p[1].1);
        let ss = perturb(&weight_scale_shape(n, k), p[2].0, p[2].1);
        let (mut q, q0) = poisoned::<E4M3>(&gpu, &qs);
        let (mut s, s0) = poisoned::<f32>(&gpu, &ss);
        let valid = ws.len() == 2 && qs == ws && ss == weight_scale_shape(ws[0], ws[1]);
        match quant::quantize_weights(&gpu, &wd, &mut q, &mut s, format) {
            Err(e) => {
                expect_validation_error("quantize_weights", &e)?;
                check!(!valid, "valid w {ws:?} rejected: {e}");
                untouched(&gpu, "q", &q, &q0)?;
                untouched(&gpu, "scales", &s, &s0)?;
                Ok(Outcome::Rejected)
            }
            Ok(()) => {
                check!(valid, "accepted w {ws:?} q {qs:?} s {ss:?}");
                let (n, k) = (ws[0], ws[1]);
                let (q_ref, s_ref) = quantize_per_block_with(&from_bf16(&to_bf16(&w)), n, k, 128, format).unwrap();
                let (qg, sg) = (download(&gpu, "q", &q)?, download(&gpu, "scales", &s)?);
                if n * k == 0 {
                    check!(qg.is_empty(), "empty problem wrote codes");
                    untouched(&gpu, "scales", &s, &s0)?;
                } else {
                    check!(qg == q_ref, "codes differ from the reference (n={n} k={k} {format:?})");
                    let same = sg.iter().zip(&s_ref).all(|(a, b)| same_f32(*a, *b));
                    check!(same && sg.len() == s_ref.len(), "scales differ: {sg:?} vs {s_ref:?}");
                }
                Ok(Outcome::Matched)
            }
        }
    });
}

// ------------------------------------------------------------------------------------------------------ GEMM

fn forced() -> impl Strategy<Value = Option<ForcedSm90>> {
    prop_oneof![
        4 => Just(None),
        1 => (
            prop::sample::select(vec![64u32, 128, 96]),
            prop::sample::select(vec![64u32, 112, 128, 160, 96]),
            0u32..5,
            0u32..4,
            prop::sample::select(vec![0u32, 2, 3, 9]),
        )
            .prop_map(|(block_m, block_n, grid, k_splits, stages)| Some(ForcedSm90 {
                block_m,
                block_n,
                grid,
                k_splits,
                stages
            })),
    ]
}

/// What `fp8_gemm` must decide on the host, from the pure planner: Ok iff this is Ok.
fn host_decision(
    gpu: &Gpu,
    shapes: &[Vec<usize>],
    accumulate: bool,
    opts: &GemmOptions,
) -> Result<(), r1_kernels::Error> {
    let p = fp8_gemm::plan(
        &shapes[0],
        &shapes[1],
        &shapes[2],
        &shapes[3],
        &shapes[4],
        accumulate,
        opts.kernel,
        gpu.info(),
    )?;
    if let Some(f) = &opts.force_sm90 {
        if !matches!(opts.kernel, GemmKernel::Sm90 | GemmKernel::Sm90Multicast) {
            return Err(Error::InvalidConfig("forced".into()));
        }
        if let fp8_gemm::Resolved::Sm90(c) = p.resolved {
            fp8_gemm::plan::force_sm90_config(&p.shape, &c, f, gpu.info().max_shared_memory_per_block_optin)?;
        }
    }
    Ok(())
}

#[test]
fn fuzz_fp8_gemm() {
    let Some(gpu) = test_gpu("fuzz_fp8_gemm") else { return };
    let strategy = (
        (
            prop_oneof![3 => 0usize..6, 1 => 6usize..70],
            prop::sample::select(vec![0usize, 8, 16, 24, 136, 4, 12]),
            prop::sample::select(vec![0usize, 16, 32, 128, 144, 272, 8, 100]),
        ),
        perturbations::<5>(),
        prop::sample::select(vec![GemmKernel::Auto, GemmKernel::Portable, GemmKernel::Sm90, GemmKernel::Sm90Multicast]),
        forced(),
        any::<bool>(),
        any::<u64>(),
    );
    fuzz::run(
        "fp8_gemm::fp8_gemm + fp8_gemm_accumulate",
        strategy,
        |((m, n, k), p, kernel, force, accumulate, seed)| {
            let (kb, m_pad) = (k.div_ceil(128), m.div_ceil(4) * 4);
            let want = [vec![m, k], vec![kb, m_pad], vec![n, k], vec![n.div_ceil(128), kb], vec![m, n]];
            let sh: Vec<Vec<usize>> = want.iter().zip(&p).map(|(s, &(how, at))| perturb(s, how, at)).collect();
            let a = codes(numel(&sh[0]), seed);
            let b = codes(numel(&sh[2]), seed + 1);
            let sa_rows = scales(m * kb, seed + 2, 1.0 / 64.0);
            let sa = if sh[1] == want[1] {
                scales_to_mn_major(&sa_rows, m, kb).unwrap()
            } else {
                scales(numel(&sh[1]), seed + 2, 1.0 / 64.0)
            };
            let sb = scales(numel(&sh[3]), seed + 3, 1.0 / 64.0);
            let ad = DeviceTensor::from_host(&gpu, &a, &sh[0]).unwrap();
            let sad = DeviceTensor::from_host(&gpu, &sa, &sh[1]).unwrap();
            let bd = DeviceTensor::from_host(&gpu, &b, &sh[2]).unwrap();
            let sbd = DeviceTensor::from_host(&gpu, &sb, &sh[3]).unwrap();
            let opts = GemmOptions { kernel, force_sm90: force, ..Default::default() };
            let decision = host_decision(&gpu, &sh, accumulate, &opts);
            // Perturbed shapes that happen to be consistent describe another problem than the data: not this case.
            prop_assume!(decision.is_err() || sh[..] == want[..]);
            let what = format!("m={m} n={n} k={k} shapes {sh:?} {kernel:?} forced {force:?} accumulate={accumulate}");
            let reference = || ref_gemm(&a, &sa_rows, &b, &sb, m, n, k).unwrap();
            // Σ|a·b| per element: these codes span E4M3's whole range, so one element's 128 products can differ by 2^17
            // and cancel. Hopper's FP8 wgmma aligns each product to the largest of its 32 and truncates to 13 fraction
            // bits (the emulator's hopper numerics, bit-exact with an H200 on the probes): the error can reach
            // ~2^-8·Σ|a·b| where the result itself is far smaller. Codes with the sign bit cleared give Σ|a·b|.
            let abs_terms = || {
                let abs = |v: &[E4M3]| v.iter().map(|c| E4M3(c.0 & 0x7f)).collect::<Vec<_>>();
                ref_gemm(&abs(&a), &sa_rows, &abs(&b), &sb, m, n, k).unwrap()
            };
            if accumulate {
                let c0 = values(numel(&sh[4]), seed + 4, 3.0, false);
                let mut c = DeviceTensor::from_host(&gpu, &c0, &sh[4]).unwrap();
                match fp8_gemm::fp8_gemm_accumulate(&gpu, &ad, &sad, &bd, &sbd, &mut c, &opts) {
                    Err(e) => {
                        expect_validation_error(&what, &e)?;
                        check!(decision.is_err(), "{what}: rejected ({e}) though the planner accepts it");
                        untouched(&gpu, "c", &c, &c0)?;
                        Ok(Outcome::Rejected)
                    }
                    Ok(()) => {
                        check!(decision.is_ok(), "{what}: accepted though the planner says {decision:?}");
                        let got = download(&gpu, "c", &c)?;
                        let (q, q_abs) = (reference(), abs_terms());
                        for (r, qrow) in q.chunks(n.max(1)).enumerate() {
                            let rms =
                                (qrow.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / n as f64).sqrt() as f32;
                            for (j, &qv) in qrow.iter().enumerate() {
                                let i = r * n + j;
                                let (g, w) = (got[i], c0[i] + qv);
                                let tol = 1e-3 * (qv.abs() + rms) + 1e-6 * c0[i].abs() + 2f32.powi(-8) * q_abs[i];
                                check!((g - w).abs() <= tol, "{what}: c[{r}, {j}] = {g}, reference {w}");
                            }
                        }
                        Ok(Outcome::Matched)
                    }
                }
            } else {
                let (mut out, o0) = poisoned::<bf16>(&gpu, &sh[4]);
                match fp8_gemm::fp8_gemm(&gpu, &ad, &sad, &bd, &sbd, &mut out, &opts) {
                    Err(e) => {
                        expect_validation_error(&what, &e)?;
                        check!(decision.is_err(), "{what}: rejected ({e}) though the planner accepts it");
                        untouched(&gpu, "out", &out, &o0)?;
                        Ok(Outcome::Rejected)
                    }
                    Ok(()) => {
                        check!(decision.is_ok(), "{what}: accepted though the planner says {decision:?}");
                        let got = from_bf16(&download(&gpu, "out", &out)?);
                        if m * n == 0 {
                            check!(got.is_empty(), "{what}: wrote an empty output");
                        } else {
                            let (q, q_abs) = (reference(), abs_terms());
                            for (r, (g, w)) in got.chunks(n).zip(q.chunks(n)).enumerate() {
                                let rms = (w.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / n as f64).sqrt();
                                for (j, (&gv, &wv)) in g.iter().zip(w).enumerate() {
                                    let tol =
                                        wv.abs() * 2f32.powi(-8) + 4e-3 * rms as f32 + 2f32.powi(-8) * q_abs[r * n + j];
                                    check!(
                                        gv.is_finite() && (gv - wv).abs() <= tol,
                                        "{what}: out[{r}, {j}] {gv} vs {wv}"
                                    );
                                }
                            }
                        }
                        Ok(Outcome::Matched)
                    }
                }
            }
        },
    );
}

// ------------------------------------------------------------------------------------------------------- MoE

fn router_config() -> impl Strategy<Value = RouterConfig> {
    (
        prop_oneof![4 => prop::sample::select(vec![4usize, 8, 16, 64, 256]), 1 => prop::sample::select(vec![0usize, 1, 1025])],
        prop_oneof![4 => 1usize..9, 1 => prop::sample::select(vec![0usize, 33])],
        prop_oneof![4 => prop::sample::select(vec![1usize, 2, 4]), 1 => prop::sample::select(vec![0usize, 3, 8, 33])],
        prop_oneof![4 => 1usize..3, 1 => prop::sample::select(vec![0usize, 3, 5])],
        any::<bool>(),
        any::<bool>(),
        prop::sample::select(vec![1.0f32, 2.5, 2.5, 1.0, f32::NAN]),
    )
        .prop_map(|(e, k, g, kg, softmax, renormalize, scale)| RouterConfig {
            num_experts: e,
            top_k: k,
            num_groups: g,
            topk_groups: kg,
            scoring: if softmax { Scoring::Softmax } else { Scoring::Sigmoid },
            renormalize,
            routed_scaling_factor: scale,
        })
}

#[test]
fn fuzz_moe_route() {
    let Some(gpu) = test_gpu("fuzz_moe_route") else { return };
    let strategy = (
        router_config(),
        0usize..6,
        prop::sample::select(vec![0u8, 1, 1, 1, 2]), // bias: none, right shape, wrong shape
        perturbations::<3>(),
        any::<bool>(),
        any::<bool>(),
        any::<u64>(),
    );
    fuzz::run("moe::route", strategy, |(cfg, t, bias_kind, p, bf16_in, specials, seed)| {
        let e = cfg.num_experts;
        let ls = perturb(&[t, e], p[0].0, p[0].1);
        let mut logits = values(numel(&ls), seed, 4.0, specials);
        if bf16_in {
            logits = from_bf16(&to_bf16(&logits));
        }
        let bias_shape = [if bias_kind == 2 { e + 1 } else { e }];
        let bias = values(bias_shape[0], seed + 1, 0.05, false);
        let bd = (bias_kind > 0).then(|| DeviceTensor::from_host(&gpu, &bias, &bias_shape).unwrap());
        let is = perturb(&[t, cfg.top_k], p[1].0, p[1].1);
        let ws = perturb(&[t, cfg.top_k], p[2].0, p[2].1);
        let (mut ids, i0) = poisoned::<i32>(&gpu, &is);
        let (mut wts, w0) = poisoned::<f32>(&gpu, &ws);
        let r = if bf16_in {
            let l = DeviceTensor::from_host(&gpu, &to_bf16(&logits), &ls).unwrap();
            moe::route(&gpu, &cfg, &l, bd.as_ref(), &mut ids, &mut wts)
        } else {
            let l = DeviceTensor::from_host(&gpu, &logits, &ls).unwrap();
            moe::route(&gpu, &cfg, &l, bd.as_ref(), &mut ids, &mut wts)
        };
        let valid = cfg.validate().is_ok() && ls == [t, e] && bias_kind < 2 && is == [t, cfg.top_k] && ws == is;
        match r {
            Err(err) => {
                expect_validation_error("route", &err)?;
                check!(!valid, "valid routing {cfg:?} t={t} rejected: {err}");
                untouched(&gpu, "topk_ids", &ids, &i0)?;
                untouched(&gpu, "topk_weights", &wts, &w0)?;
                Ok(Outcome::Rejected)
            }
            Ok(()) => {
                check!(valid, "accepted {cfg:?} logits {ls:?} bias {bias_kind} ids {is:?} weights {ws:?}");
                let b = (bias_kind > 0).then_some(&bias[..]);
                let (ids_ref, w_ref) = rm::route(&logits, b, t, &cfg).unwrap();
                let (gi, gw) = (download(&gpu, "ids", &ids)?, download(&gpu, "weights", &wts)?);
                check!(gi == ids_ref, "ids {gi:?} vs reference {ids_ref:?} ({cfg:?})");
                let same = gw.iter().zip(&w_ref).all(|(a, b)| same_f32(*a, *b));
                check!(same, "weights {gw:?} vs reference {w_ref:?} ({cfg:?})");
                Ok(Outcome::Matched)
            }
        }
    });
}

#[test]
fn fuzz_moe_gate_logits() {
    let Some(gpu) = test_gpu("fuzz_moe_gate_logits") else { return };
    let strategy = (
        0usize..10,
        prop::sample::select(vec![0usize, 1, 3, 8, 9, 17]),
        prop::sample::select(vec![0usize, 8, 12, 16, 128, 136, 264]),
        perturbations::<3>(),
        any::<bool>(),
        any::<u64>(),
    );
    fuzz::run("moe::gate_logits", strategy, |(t, e, h, p, specials, seed)| {
        let xs = perturb(&[t, h], p[0].0, p[0].1);
        let wsh = perturb(&[e, h], p[1].0, p[1].1);
        let ls = perturb(&[t, e], p[2].0, p[2].1);
        let x = from_bf16(&to_bf16(&values(numel(&xs), seed, 2.0, specials)));
        let w = from_bf16(&to_bf16(&values(numel(&wsh), seed + 1, 0.5, false)));
        let xd = DeviceTensor::from_host(&gpu, &to_bf16(&x), &xs).unwrap();
        let wd = DeviceTensor::from_host(&gpu, &to_bf16(&w), &wsh).unwrap();
        let (mut logits, l0) = poisoned::<f32>(&gpu, &ls);
        let r = moe::gate_logits(&gpu, &xd, &wd, &mut logits);
        // Perturbed shapes can still agree with each other (for other t, E, H): valid is their agreement.
        let consistent = xs.len() == 2 && wsh.len() == 2 && ls.len() == 2;
        let valid = consistent && wsh[1] == xs[1] && ls == [xs[0], wsh[0]] && xs[1].is_multiple_of(8);
        let (t, e, h) = if consistent { (xs[0], wsh[0], xs[1]) } else { (t, e, h) };
        match r {
            Err(err) => {
                expect_validation_error("gate_logits", &err)?;
                check!(!valid, "valid gate_logits t={t} E={e} H={h} rejected: {err}");
                untouched(&gpu, "logits", &logits, &l0)?;
                Ok(Outcome::Rejected)
            }
            Ok(()) => {
                check!(valid, "accepted x {xs:?} w {wsh:?} logits {ls:?}");
                let want = rm::gate_logits(&x, &w, t, e, h).unwrap();
                let got = download(&gpu, "logits", &logits)?;
                // The reference fixes the kernel's summation order (32 lanes of fused multiply-adds): bitwise.
                let same = got.len() == want.len() && got.iter().zip(&want).all(|(a, b)| same_f32(*a, *b));
                check!(same, "logits t={t} E={e} H={h}: {got:?} vs reference {want:?}");
                Ok(Outcome::Matched)
            }
        }
    });
}

#[test]
fn fuzz_moe_masked_offsets() {
    let Some(gpu) = test_gpu("fuzz_moe_masked_offsets") else { return };
    let block = moe::GEMM_BLOCK_M;
    let strategy = (
        prop_oneof![
            4 => 0usize..300,
            // Past what the grouped GEMM can index (E is an i32 there): rejected before anything is allocated.
            1 => prop::sample::select(vec![i32::MAX as usize + 1, usize::MAX / 2, usize::MAX]),
        ],
        prop_oneof![
            4 => prop::sample::select(vec![0usize, 1, 64, block, 2 * block, 3 * block + 1, 1 << 20]),
            1 => prop::sample::select(vec![usize::MAX / block * block, (i64::MAX as usize) / block * block]),
        ],
    );
    fuzz::run("moe::masked_offsets", strategy, |(e, max_m)| {
        let r = moe::masked_offsets(&gpu, e, max_m);
        let fits = e <= i32::MAX as usize && (e as u128) * (max_m as u128) <= i64::MAX as u128;
        let valid = max_m > 0 && max_m.is_multiple_of(block) && fits;
        match r {
            Err(err) => {
                expect_validation_error("masked_offsets", &err)?;
                check!(!valid, "valid masked_offsets E={e} max_m={max_m} rejected: {err}");
                Ok(Outcome::Rejected)
            }
            Ok(offsets) => {
                check!(valid, "accepted E={e} max_m={max_m}");
                let got = download(&gpu, "offsets", &offsets)?;
                let want: Vec<i64> = (0..=e as i64).map(|i| i * max_m as i64).collect();
                check!(got == want, "offsets E={e} max_m={max_m}: {got:?}");
                Ok(Outcome::Matched)
            }
        }
    });
}

fn layout() -> impl Strategy<Value = Layout> {
    prop_oneof![
        prop::sample::select(vec![64usize, 64, 64, 128, 128, 0, 100])
            .prop_map(|block_m| Layout::Contiguous { block_m }),
        prop::sample::select(vec![64usize, 64, 192, 192, 0, 32]).prop_map(|max_m| Layout::Masked { max_m }),
    ]
}

fn expert_id(e: usize) -> impl Strategy<Value = i32> {
    let e = e as i32;
    prop_oneof![
        8 => -1..e,
        1 => prop::sample::select(vec![-2, e, e + 1, i32::MIN, i32::MAX]),
    ]
}

#[test]
fn fuzz_moe_permute() {
    let Some(gpu) = test_gpu("fuzz_moe_permute") else { return };
    let strategy = (0usize..7, 0usize..5, prop::sample::select(vec![1usize, 2, 4, 8, 1, 2, 4, 8, 0, 1025]))
        .prop_flat_map(|(t, k, e)| {
            (
                Just((t, k, e)),
                prop::collection::vec(expert_id(e.max(1)), t * k),
                prop::sample::select(vec![128usize, 256, 128, 256, 0, 100]),
                layout(),
                perturbations::<3>(),
                any::<u64>(),
            )
        });
    fuzz::run("moe::permute + Permuted::new + upload_topk_ids", strategy, |((t, k, e), ids, h, layout, p, seed)| {
        let ids_valid = ids.iter().all(|&id| id >= -1 && (id as i64) < e as i64);
        let up = moe::upload_topk_ids(&gpu, &ids, t, k, e);
        check!(up.is_ok() == ids_valid, "upload_topk_ids of {ids:?} (E={e}): {:?}", up.as_ref().err());
        if let Err(err) = &up {
            expect_validation_error("upload_topk_ids", err)?;
        }
        let config_valid = (1..=1024).contains(&e)
            && h > 0
            && h.is_multiple_of(128)
            && match layout {
                Layout::Contiguous { block_m: m } | Layout::Masked { max_m: m } => m > 0 && m.is_multiple_of(64),
            };
        let mut perm = match Permuted::new(&gpu, t, k, e, h, layout) {
            Err(err) => {
                expect_validation_error("Permuted::new", &err)?;
                check!(!config_valid, "Permuted::new(t={t}, k={k}, E={e}, H={h}, {layout:?}) rejected: {err}");
                return Ok(Outcome::Rejected);
            }
            Ok(perm) => {
                check!(config_valid, "Permuted::new accepted t={t} k={k} E={e} H={h} {layout:?}");
                perm
            }
        };
        let cap = perm.capacity();
        check!(cap == layout.capacity(t, k, e), "capacity {cap} vs {}", layout.capacity(t, k, e));
        // Poison every output of the permutation.
        let pz = |n: usize| -> Vec<i32> { (0..n).map(i32::poison).collect() };
        let (src0, row0, cnt0) = (pz(cap), pz(t * k), pz(e));
        let off0: Vec<i64> = (0..=e).map(i64::poison).collect();
        let codes0: Vec<E4M3> = (0..cap * h).map(E4M3::poison).collect();
        let sc0: Vec<f32> = (0..numel(&activation_scale_shape(cap, h))).map(f32::poison).collect();
        perm.src_index.copy_from_host(&gpu, &src0).unwrap();
        perm.row_of.copy_from_host(&gpu, &row0).unwrap();
        perm.counts.copy_from_host(&gpu, &cnt0).unwrap();
        perm.offsets.copy_from_host(&gpu, &off0).unwrap();
        perm.codes.copy_from_host(&gpu, &codes0).unwrap();
        perm.scales.copy_from_host(&gpu, &sc0).unwrap();
        // Ids straight to the device (out-of-range ones included: the kernels must skip them).
        let id_shape = perturb(&[t, k], p[0].0, p[0].1);
        let id_data: Vec<i32> = (0..numel(&id_shape)).map(|i| ids.get(i).copied().unwrap_or(0)).collect();
        let idd = DeviceTensor::from_host(&gpu, &id_data, &id_shape).unwrap();
        let xq_shape = perturb(&[t, h], p[1].0, p[1].1);
        let xq_h = codes(numel(&xq_shape), seed);
        let xq = DeviceTensor::from_host(&gpu, &xq_h, &xq_shape).unwrap();
        let xs_shape = perturb(&activation_scale_shape(t, h), p[2].0, p[2].1);
        let xs_h = scales(numel(&xs_shape), seed + 1, 0.5);
        let xs = DeviceTensor::from_host(&gpu, &xs_h, &xs_shape).unwrap();
        let valid = id_shape == [t, k] && xq_shape == [t, h] && xs_shape == activation_scale_shape(t, h);
        let check_untouched = |perm: &Permuted| -> Result<(), TestCaseError> {
            untouched(&gpu, "src_index", &perm.src_index, &src0)?;
            untouched(&gpu, "row_of", &perm.row_of, &row0)?;
            untouched(&gpu, "counts", &perm.counts, &cnt0)?;
            untouched(&gpu, "offsets", &perm.offsets, &off0)?;
            untouched(&gpu, "codes", &perm.codes, &codes0)?;
            untouched(&gpu, "scales", &perm.scales, &sc0)
        };
        match moe::permute(&gpu, &idd, &xq, &xs, &mut perm) {
            Err(err) => {
                expect_validation_error("permute", &err)?;
                check!(!valid, "valid permutation rejected: {err}");
                check_untouched(&perm)?;
                Ok(Outcome::Rejected)
            }
            Ok(()) => {
                check!(valid, "permute accepted ids {id_shape:?} xq {xq_shape:?} xs {xs_shape:?}");
                if t * k == 0 {
                    check_untouched(&perm)?;
                    return Ok(Outcome::Matched);
                }
                // Ids the kernels skip are −1 for the reference.
                let clean: Vec<i32> =
                    ids.iter().map(|&id| if id >= 0 && (id as i64) < e as i64 { id } else { -1 }).collect();
                let want = rm::permute(&clean, t, k, e, layout).unwrap();
                check!(download(&gpu, "counts", &perm.counts)? == want.counts, "counts");
                check!(download(&gpu, "offsets", &perm.offsets)? == want.offsets, "offsets");
                check!(download(&gpu, "src_index", &perm.src_index)? == want.src_index, "src_index");
                check!(download(&gpu, "row_of", &perm.row_of)? == want.row_of, "row_of");
                let got_codes = download(&gpu, "codes", &perm.codes)?;
                let got_scales = scales_from_mn_major(&download(&gpu, "scales", &perm.scales)?, cap, h / 128).unwrap();
                let tok_scales = scales_from_mn_major(&xs_h, t, h / 128).unwrap();
                let g = h / 128;
                for row in 0..want.offsets[e] as usize {
                    let (c, s) = (&got_codes[row * h..(row + 1) * h], &got_scales[row * g..(row + 1) * g]);
                    let src = want.src_index[row];
                    if src < 0 {
                        check!(c.iter().all(|v| v.0 == 0) && s.iter().all(|&v| v == 0.0), "padding row {row}");
                    } else {
                        let tok = src as usize / k;
                        check!(c == &xq_h[tok * h..(tok + 1) * h], "row {row}: codes of token {tok}");
                        check!(s == &tok_scales[tok * g..(tok + 1) * g], "row {row}: scales of token {tok}");
                    }
                }
                Ok(Outcome::Matched)
            }
        }
    });
}

#[test]
fn fuzz_moe_swiglu_quant() {
    let Some(gpu) = test_gpu("fuzz_moe_swiglu_quant") else { return };
    let strategy = (
        (0usize..6, prop::sample::select(vec![256usize, 512, 0, 128, 384, 300])),
        perturbations::<3>(),
        prop_oneof![2 => Just(None), 2 => (-2i64..8).prop_map(Some), 1 => Just(Some(i64::MIN))],
        any::<bool>(),
        any::<bool>(),
        any::<u64>(),
    );
    fuzz::run("moe::swiglu_quant", strategy, |((rows, i2), p, limit, empty_limit, ue8m0, seed)| {
        let format = if ue8m0 { ScaleFormat::Ue8m0 } else { ScaleFormat::F32 };
        let hs = perturb(&[rows, i2], p[0].0, p[0].1);
        let hv = from_bf16(&to_bf16(&values(numel(&hs), seed, 3.0, seed.is_multiple_of(4))));
        let hd = DeviceTensor::from_host(&gpu, &to_bf16(&hv), &hs).unwrap();
        let inter = i2 / 2;
        let qs = perturb(&[rows, inter], p[1].0, p[1].1);
        let ss = perturb(&activation_scale_shape(rows, inter), p[2].0, p[2].1);
        let (mut q, q0) = poisoned::<E4M3>(&gpu, &qs);
        let (mut s, s0) = poisoned::<f32>(&gpu, &ss);
        // A permutation's offsets: [0, 1, limit]; or an empty tensor (invalid).
        let limit_t = limit.map(|l| {
            if empty_limit {
                DeviceTensor::<i64>::zeros(&gpu, &[0]).unwrap()
            } else {
                DeviceTensor::from_host(&gpu, &[0, 1, l], &[3]).unwrap()
            }
        });
        let valid = hs.len() == 2
            && hs[1] > 0
            && hs[1].is_multiple_of(256)
            && qs == [hs[0], hs[1] / 2]
            && ss == activation_scale_shape(hs[0], hs[1] / 2)
            && !(limit.is_some() && empty_limit);
        match moe::swiglu_quant(&gpu, &hd, &mut q, &mut s, format, limit_t.as_ref()) {
            Err(e) => {
                expect_validation_error("swiglu_quant", &e)?;
                check!(!valid, "valid swiglu h {hs:?} rejected: {e}");
                untouched(&gpu, "q", &q, &q0)?;
                untouched(&gpu, "scales", &s, &s0)?;
                Ok(Outcome::Rejected)
            }
            Ok(()) => {
                check!(valid, "accepted h {hs:?} q {qs:?} s {ss:?} limit {limit:?}");
                let (rows, i2) = (hs[0], hs[1]);
                let inter = i2 / 2;
                let lim = limit.map_or(rows as i64, |l| l.clamp(0, rows as i64)) as usize;
                let (qg, sg) = (download(&gpu, "q", &q)?, download(&gpu, "scales", &s)?);
                let g = inter / 128;
                let rows_pad = ss[1];
                for r in 0..rows {
                    let (qr, sr) = (&qg[r * inter..(r + 1) * inter], (0..g).map(|j| sg[j * rows_pad + r]));
                    if r < lim {
                        let act: Vec<f32> =
                            (0..inter).map(|c| rm::silu(hv[r * i2 + c]) * hv[r * i2 + inter + c]).collect();
                        let (qw, sw) = quantize_per_token_group_with(&act, 1, inter, 128, format).unwrap();
                        check!(qr == &qw[..], "row {r}: codes differ from the reference");
                        check!(sr.zip(&sw).all(|(a, b)| same_f32(a, *b)), "row {r}: scales differ");
                    } else {
                        check!(qr.iter().zip(&q0[r * inter..]).all(|(a, b)| a == b), "row {r} ≥ limit written");
                        check!(sr.zip(0..g).all(|(a, j)| a.bits() == s0[j * rows_pad + r].bits()), "row {r} scales");
                    }
                }
                for j in 0..g {
                    for r in rows..rows_pad {
                        let v = sg[j * rows_pad + r];
                        let want = if lim == rows && rows > 0 { 0.0f32.bits() } else { s0[j * rows_pad + r].bits() };
                        check!(v.bits() == want, "scale padding row {r} group {j}: {v} (limit {lim} of {rows})");
                    }
                }
                Ok(Outcome::Matched)
            }
        }
    });
}

#[test]
fn fuzz_moe_combine() {
    let Some(gpu) = test_gpu("fuzz_moe_combine") else { return };
    let strategy = (
        (0usize..6, 0usize..5, 0usize..4, prop::sample::select(vec![8usize, 16, 136, 1032, 0, 4, 12])),
        perturbations::<4>(),
        0u8..3, // shared: none, right, wrong shape
        any::<bool>(),
        any::<bool>(),
        any::<u64>(),
    );
    fuzz::run("moe::combine", strategy, |((rows, t, k, h), p, shared_kind, skip, specials, seed)| {
        let ys = perturb(&[rows, h], p[0].0, p[0].1);
        let y = from_bf16(&to_bf16(&values(numel(&ys), seed, 2.0, specials)));
        let yd = DeviceTensor::from_host(&gpu, &to_bf16(&y), &ys).unwrap();
        let rs = perturb(&[t * k], p[1].0, p[1].1);
        let mut rng = SplitMix64::new(seed + 1);
        let row_of: Vec<i32> = (0..numel(&rs))
            .map(|_| match int_in(&mut rng, 0..10) {
                0 => -1,
                1 => [i32::MIN, i32::MAX, rows as i32, -7][index_below(&mut rng, 4)],
                _ => int_in(&mut rng, 0..rows.max(1) as i32),
            })
            .collect();
        let rd = DeviceTensor::from_host(&gpu, &row_of, &rs).unwrap();
        let wsh = perturb(&[t, k], p[2].0, p[2].1);
        let w = values(numel(&wsh), seed + 2, 1.0, specials);
        let wd = DeviceTensor::from_host(&gpu, &w, &wsh).unwrap();
        let shs = if shared_kind == 2 { vec![t, h + 8] } else { vec![t, h] };
        let shared = from_bf16(&to_bf16(&values(numel(&shs), seed + 3, 1.0, false)));
        let sd = (shared_kind > 0).then(|| DeviceTensor::from_host(&gpu, &to_bf16(&shared), &shs).unwrap());
        let os = perturb(&[t, h], p[3].0, p[3].1);
        let (mut out, o0) = poisoned::<bf16>(&gpu, &os);
        let valid = ys.len() == 2
            && os.len() == 2
            && os[1] == ys[1]
            && ys[1].is_multiple_of(8)
            && wsh.len() == 2
            && wsh[0] == os[0]
            && numel(&rs) == wsh[0] * wsh[1]
            && shared_kind < 2
            && (shared_kind == 0 || shs == os);
        match moe::combine(&gpu, &yd, &rd, &wd, sd.as_ref(), skip, &mut out) {
            Err(e) => {
                expect_validation_error("combine", &e)?;
                check!(!valid, "valid combine rejected: {e}");
                untouched(&gpu, "out", &out, &o0)?;
                Ok(Outcome::Rejected)
            }
            Ok(()) => {
                check!(valid, "accepted y {ys:?} row_of {rs:?} weights {wsh:?} out {os:?} shared {shared_kind}");
                let (t, h, k, rows) = (os[0], os[1], wsh[1], ys[0]);
                let got = from_bf16(&download(&gpu, "out", &out)?);
                for tok in 0..t {
                    let slots: Vec<Option<(&[f32], f32)>> = (0..k)
                        .map(|s| {
                            let r = row_of[tok * k + s];
                            (r >= 0 && (r as usize) < rows).then(|| {
                                let r = r as usize;
                                (&y[r * h..(r + 1) * h], if skip { 1.0 } else { w[tok * k + s] })
                            })
                        })
                        .collect();
                    let sh = (shared_kind == 1).then(|| &shared[tok * h..(tok + 1) * h]);
                    let want = rm::combine_token(&slots, sh, h);
                    let same = got[tok * h..(tok + 1) * h].iter().zip(&want).all(|(a, b)| same_f32(*a, *b));
                    check!(same, "token {tok}: {:?} vs reference {want:?}", &got[tok * h..(tok + 1) * h]);
                }
                Ok(Outcome::Matched)
            }
        }
    });
}

#[test]
fn fuzz_moe_grouped_gemm() {
    let Some(gpu) = test_gpu("fuzz_moe_grouped_gemm") else { return };
    let strategy = (
        (0usize..5, 1usize..3, 1usize..4),
        (
            prop::sample::select(vec![128usize, 256, 128, 256, 0, 100]),
            prop::sample::select(vec![128usize, 256, 128, 256, 0, 64]),
        ),
        perturbations::<7>(),
        prop::sample::select(vec![GemmBackend::Auto, GemmBackend::Portable, GemmBackend::Sm90Tma]),
        any::<u64>(),
    );
    fuzz::run("moe::grouped_gemm_with", strategy, |((t, k, e), (kdim, n), p, backend, seed)| {
        // A real permutation supplies offsets and counts (the kernels read them on the device).
        let mut rng = SplitMix64::new(seed);
        let ids: Vec<i32> = (0..t * k).map(|_| int_in(&mut rng, -1..e as i32)).collect();
        let layout = Layout::Contiguous { block_m: 64 };
        let perm = rm::permute(&ids, t, k, e, layout).unwrap();
        let rows = perm.src_index.len();
        let kd = kdim.max(128);
        let want = [
            vec![rows, kdim],
            activation_scale_shape(rows, kdim).to_vec(),
            vec![e, n, kdim],
            vec![e, n / 128, kdim / 128],
            vec![e + 1],
            vec![e],
            vec![rows, n],
        ];
        let sh: Vec<Vec<usize>> = want.iter().zip(&p).map(|(s, &(how, at))| perturb(s, how, at)).collect();
        let a = codes(numel(&sh[0]), seed + 1);
        let a_rows = scales(rows * (kd / 128), seed + 2, 1.0 / 32.0);
        let sa = if sh[1] == want[1] && kdim.is_multiple_of(128) && kdim > 0 {
            scales_to_mn_major(&a_rows[..rows * (kdim / 128)], rows, kdim / 128).unwrap()
        } else {
            scales(numel(&sh[1]), seed + 2, 1.0 / 32.0)
        };
        let w = codes(numel(&sh[2]), seed + 3);
        let sw = scales(numel(&sh[3]), seed + 4, 1.0 / (16.0 * (kd as f32).sqrt()));
        let offsets: Vec<i64> = (0..numel(&sh[4])).map(|i| perm.offsets.get(i).copied().unwrap_or(0)).collect();
        let counts: Vec<i32> = (0..numel(&sh[5])).map(|i| perm.counts.get(i).copied().unwrap_or(0)).collect();
        let up = |v: &[E4M3], s: &[usize]| DeviceTensor::from_host(&gpu, v, s).unwrap();
        let (ad, wd) = (up(&a, &sh[0]), up(&w, &sh[2]));
        let sad = DeviceTensor::from_host(&gpu, &sa, &sh[1]).unwrap();
        let swd = DeviceTensor::from_host(&gpu, &sw, &sh[3]).unwrap();
        let od = DeviceTensor::from_host(&gpu, &offsets, &sh[4]).unwrap();
        let cd = DeviceTensor::from_host(&gpu, &counts, &sh[5]).unwrap();
        let (mut out, o0) = poisoned::<bf16>(&gpu, &sh[6]);
        let shapes_ok = sh.iter().zip(&want).all(|(g, w)| g == w);
        let valid = shapes_ok && kdim > 0 && kdim.is_multiple_of(128) && n > 0 && n.is_multiple_of(128);
        let what = format!("t={t} k={k} E={e} K={kdim} N={n} {backend:?} shapes {sh:?}");
        match moe::grouped_gemm_with(&gpu, &ad, &sad, &wd, &swd, &od, &cd, &mut out, backend) {
            Err(err) => {
                expect_validation_error(&what, &err)?;
                check!(!valid, "{what}: rejected: {err}");
                untouched(&gpu, "out", &out, &o0)?;
                Ok(Outcome::Rejected)
            }
            Ok(()) => {
                check!(valid, "{what}: accepted");
                let got = from_bf16(&download(&gpu, "out", &out)?);
                let kb = kdim / 128;
                let s_per = (n / 128) * kb;
                let (mut gv, mut rv) = (Vec::new(), Vec::new());
                for (row, &src) in perm.src_index.iter().enumerate() {
                    if src < 0 {
                        continue;
                    }
                    let ex = ids[src as usize] as usize;
                    let r = rm::fp8_row_times_matrix(
                        &a[row * kdim..(row + 1) * kdim],
                        &a_rows[row * kb..(row + 1) * kb],
                        &w[ex * n * kdim..(ex + 1) * n * kdim],
                        &sw[ex * s_per..(ex + 1) * s_per],
                        n,
                        kdim,
                    );
                    rv.extend(r.iter().map(|&v| v as f32));
                    gv.extend_from_slice(&got[row * n..(row + 1) * n]);
                }
                rows_close(&what, &gv, &rv, n, 4e-3)?;
                Ok(Outcome::Matched)
            }
        }
    });
}

/// Which argument of `moe_forward` a case gets wrong.
#[derive(Debug, Clone, Copy)]
enum MoeFault {
    None,
    WorkspaceTokens,
    WorkspaceHidden,
    WorkspaceExperts,
    XShape,
    OutShape,
    RouterTopK,
    SharedHidden,
    IdsShape,
}

#[test]
fn fuzz_moe_forward_and_workspace() {
    let Some(gpu) = test_gpu("fuzz_moe_forward_and_workspace") else { return };
    let strategy = (
        (0usize..4, 1usize..3, prop::sample::select(vec![2usize, 4])),
        (prop::sample::select(vec![128usize, 128, 128, 0, 100]), prop::sample::select(vec![128usize, 128, 128, 0, 64])),
        prop::sample::select(vec![None, Some(128usize), None, Some(128usize), Some(0)]),
        layout(),
        prop::sample::select(vec![
            MoeFault::None,
            MoeFault::None,
            MoeFault::None,
            MoeFault::None,
            MoeFault::None,
            MoeFault::None,
            MoeFault::None,
            MoeFault::WorkspaceTokens,
            MoeFault::WorkspaceHidden,
            MoeFault::WorkspaceExperts,
            MoeFault::XShape,
            MoeFault::OutShape,
            MoeFault::RouterTopK,
            MoeFault::SharedHidden,
            MoeFault::IdsShape,
        ]),
        any::<u64>(),
    );
    fuzz::run(
        "moe::moe_forward + MoeWorkspace::new",
        strategy,
        |((t, k, e), (h, i), shared_i, layout, fault, seed)| {
            let cfg = RouterConfig::softmax(e, k, true);
            let ws_t = if matches!(fault, MoeFault::WorkspaceTokens) { t + 1 } else { t };
            let ws_h = if matches!(fault, MoeFault::WorkspaceHidden) { h + 128 } else { h };
            let ws_cfg =
                if matches!(fault, MoeFault::WorkspaceExperts) { RouterConfig::softmax(e * 2, k, true) } else { cfg };
            // A workspace for another hidden size is only a fault next to valid experts.
            prop_assume!(h.is_multiple_of(128) || !matches!(fault, MoeFault::WorkspaceHidden));
            let ws_valid = ws_h > 0
                && ws_h.is_multiple_of(128)
                && i > 0
                && i.is_multiple_of(128)
                && shared_i != Some(0)
                && match layout {
                    Layout::Contiguous { block_m: m } | Layout::Masked { max_m: m } => m > 0 && m.is_multiple_of(64),
                };
            let mut ws = match MoeWorkspace::new(&gpu, &ws_cfg, ws_t, ws_h, i, shared_i, layout) {
                Err(err) => {
                    expect_validation_error("MoeWorkspace::new", &err)?;
                    check!(!ws_valid, "workspace t={ws_t} H={ws_h} I={i} shared {shared_i:?} {layout:?}: {err}");
                    return Ok(Outcome::Rejected);
                }
                Ok(ws) => {
                    check!(ws_valid, "MoeWorkspace::new accepted H={ws_h} I={i} shared {shared_i:?} {layout:?}");
                    ws
                }
            };
            let w = random_experts(e, h, i, seed);
            let wd = ExpertWeights::from_reference(&gpu, &w).unwrap();
            let sh_h = if matches!(fault, MoeFault::SharedHidden) { h + 128 } else { h };
            let shared_ref = shared_i.map(|si| random_experts(1, sh_h, si, seed + 10));
            let sd = shared_ref.as_ref().map(|s| ExpertWeights::from_reference(&gpu, s).unwrap());
            let x = from_bf16(&to_bf16(&values(t * h, seed + 20, 2.0, false)));
            let xs = if matches!(fault, MoeFault::XShape) { vec![t, h + 8] } else { vec![t, h] };
            let xd = DeviceTensor::from_host(&gpu, &to_bf16(&values(numel(&xs), seed + 20, 2.0, false)), &xs).unwrap();
            let os = if matches!(fault, MoeFault::OutShape) { vec![t + 1, h] } else { vec![t, h] };
            let (mut out, o0) = poisoned::<bf16>(&gpu, &os);
            let mut rng = SplitMix64::new(seed + 30);
            let mut ids = Vec::with_capacity(t * k);
            for _ in 0..t {
                let mut row: Vec<i32> = Vec::new();
                while row.len() < k {
                    let c = int_in(&mut rng, -1..e as i32);
                    if c < 0 || !row.contains(&c) {
                        row.push(c);
                    }
                }
                ids.extend(row);
            }
            let wts = uniform_vec(&mut rng, t * k, 0.1, 1.0);
            let is = if matches!(fault, MoeFault::IdsShape) { vec![t, k + 1] } else { vec![t, k] };
            let idv: Vec<i32> = (0..numel(&is)).map(|j| ids.get(j).copied().unwrap_or(0)).collect();
            let wv: Vec<f32> = (0..numel(&is)).map(|j| wts.get(j).copied().unwrap_or(0.5)).collect();
            let idd = DeviceTensor::from_host(&gpu, &idv, &is).unwrap();
            let wtd = DeviceTensor::from_host(&gpu, &wv, &is).unwrap();
            let call_cfg =
                if matches!(fault, MoeFault::RouterTopK) { RouterConfig::softmax(e, k + 1, true) } else { cfg };
            let r =
                moe::moe_forward(&gpu, &call_cfg, &wd, sd.as_ref(), &xd, Routing::top_k(&idd, &wtd), &mut ws, &mut out);
            let valid =
                matches!(fault, MoeFault::None) || (matches!(fault, MoeFault::SharedHidden) && shared_i.is_none());
            match r {
                Err(err) => {
                    expect_validation_error("moe_forward", &err)?;
                    check!(!valid, "valid MoE layer rejected: {err}");
                    untouched(&gpu, "out", &out, &o0)?;
                    Ok(Outcome::Rejected)
                }
                Ok(()) => {
                    check!(valid, "moe_forward accepted a {fault:?} fault");
                    let got = from_bf16(&download(&gpu, "out", &out)?);
                    // Pairs dropped by a full Masked expert are skipped by the GPU: the reference drops them too.
                    let perm = rm::permute(&ids, t, k, e, layout).unwrap();
                    let kept: Vec<i32> =
                        ids.iter().zip(&perm.row_of).map(|(&id, &row)| if row < 0 { -1 } else { id }).collect();
                    let want = rm::moe_forward_fp8(&x, t, &kept, &wts, k, &w, shared_ref.as_ref()).unwrap();
                    check!(got.iter().all(|v| v.is_finite()), "non-finite output");
                    let diff = r1_kernels::reference::fp8_gemm::calc_diff(&got, &want);
                    check!(t == 0 || diff < 1e-3, "calc_diff {diff} against the reference");
                    Ok(Outcome::Matched)
                }
            }
        },
    );
}

// ------------------------------------------------------------------------------------------------------- MLA

/// Which MLA argument a case gets wrong.
#[derive(Debug, Clone, Copy)]
enum MlaFault {
    None,
    /// A block-table entry a sequence reads: negative, or past the cache.
    TableEntry(i32),
    /// The plan (and the device lengths) say more tokens than the table holds.
    SeqlenPastCapacity,
    /// A negative length.
    NegativeSeqlen,
    /// A workspace made for a shorter batch.
    SmallWorkspace,
    /// A plan made for another page size.
    PlanPage,
    /// Softmax scale NaN.
    ScaleNan,
    /// One tensor's shape (index into q, cache, table, seqlens, out, lse) perturbed.
    Shape(usize, u8),
}

fn mla_fault() -> impl Strategy<Value = MlaFault> {
    prop_oneof![
        5 => Just(MlaFault::None),
        1 => prop::sample::select(vec![-1i32, i32::MIN, 1000, i32::MAX]).prop_map(MlaFault::TableEntry),
        1 => Just(MlaFault::SeqlenPastCapacity),
        1 => Just(MlaFault::NegativeSeqlen),
        1 => Just(MlaFault::SmallWorkspace),
        1 => Just(MlaFault::PlanPage),
        1 => Just(MlaFault::ScaleNan),
        2 => (0usize..6, 1u8..=7).prop_map(|(i, how)| MlaFault::Shape(i, how)),
    ]
}

#[test]
fn fuzz_mla_decode() {
    let Some(gpu) = test_gpu("fuzz_mla_decode") else { return };
    let strategy = (
        (1usize..3, 1usize..3, prop::sample::select(vec![1usize, 2, 4, 16])),
        prop::sample::select(vec![16usize, 64, 24, 1]),
        prop::collection::vec(0i32..90, 1..3),
        any::<bool>(),
        prop::sample::select(vec![Backend::Auto, Backend::Portable, Backend::Hopper, Backend::HopperWide]),
        any::<bool>(),
        (
            prop_oneof![
                (1usize..5).prop_map(|t| SplitMode::Balanced { target_ctas: t }),
                (1usize..3).prop_map(|c| SplitMode::BatchInvariant { chunk_blocks: c })
            ],
            any::<bool>(),
        ),
        mla_fault(),
        any::<u64>(),
    );
    fuzz::run(
        "mla::mla_decode + mla_decode_fp8 + MlaPlan + MlaWorkspace",
        strategy,
        |((_, s_q, heads), page, lens, causal, backend, fp8, (mode, host_table), fault, seed)| {
            let batch = lens.len();
            let mut rng = SplitMix64::new(seed);
            let cfg = MlaConfig {
                batch,
                s_q,
                heads,
                page_size: page,
                softmax_scale: if matches!(fault, MlaFault::ScaleNan) { f32::NAN } else { 0.0625 },
                causal,
            };
            // Pages: a shuffled pool with a spare; unused table entries are huge (never read).
            let pages: Vec<usize> = lens.iter().map(|&l| (l as usize).div_ceil(page)).collect();
            let max_blocks = pages.iter().copied().max().unwrap_or(0).max(1);
            let num_blocks = pages.iter().sum::<usize>() + 1;
            let mut pool: Vec<i32> = (0..num_blocks as i32).collect();
            shuffle(&mut rng, &mut pool);
            let mut table = vec![i32::MAX; batch * max_blocks];
            let mut next = 0;
            for b in 0..batch {
                for j in 0..pages[b] {
                    table[b * max_blocks + j] = pool[next];
                    next += 1;
                }
            }
            let mut plan_lens = lens.clone();
            let mut table_fault = false;
            match fault {
                MlaFault::TableEntry(v) => {
                    if let Some(b) = (0..batch).find(|&b| pages[b] > 0) {
                        table[b * max_blocks + index_below(&mut rng, pages[b])] = v;
                        table_fault = true;
                    }
                }
                MlaFault::SeqlenPastCapacity => plan_lens[0] = (max_blocks * page) as i32 + 1,
                MlaFault::NegativeSeqlen => plan_lens[batch - 1] = -3,
                _ => {}
            }
            // Cache values in the tokens of each sequence; NaN everywhere else (a read past a length shows).
            let mut cache = vec![f32::NAN; num_blocks * page * D_QK];
            for b in 0..batch {
                for tok in 0..lens[b] as usize {
                    let blk = table[b * max_blocks + tok / page];
                    if blk < 0 || blk as usize >= num_blocks {
                        continue;
                    }
                    let off = (blk as usize * page + tok % page) * D_QK;
                    for x in &mut cache[off..off + D_QK] {
                        *x = bf16::from_f32(rng.uniform(-1.0, 1.0)).to_f32();
                    }
                }
            }
            let q: Vec<f32> = (0..cfg.q_len()).map(|_| bf16::from_f32(rng.uniform(-2.0, 2.0)).to_f32()).collect();
            let shape_fault = |i: usize, s: Vec<usize>| match fault {
                MlaFault::Shape(j, how) if j == i => perturb(&s, how, seed as usize),
                _ => s,
            };
            let width = if fp8 { FP8_TOKEN_BYTES } else { D_QK };
            let shapes = [
                shape_fault(0, vec![batch, s_q, heads, D_QK]),
                shape_fault(1, vec![num_blocks, page, width]),
                shape_fault(2, vec![batch, max_blocks]),
                shape_fault(3, vec![batch]),
                shape_fault(4, vec![batch, s_q, heads, D_V]),
                shape_fault(5, vec![batch, heads, s_q]),
            ];
            let fit = |v: &[i32], n: usize| (0..n).map(|j| v.get(j).copied().unwrap_or(0)).collect::<Vec<i32>>();
            let qv: Vec<bf16> =
                (0..numel(&shapes[0])).map(|j| bf16::from_f32(q.get(j).copied().unwrap_or(0.5))).collect();
            let qd = DeviceTensor::from_host(&gpu, &qv, &shapes[0]).unwrap();
            let fp8_bytes =
                quantize_kv_cache_fp8(&cache.iter().map(|v| if v.is_nan() { 0.0 } else { *v }).collect::<Vec<_>>())
                    .unwrap();
            let cache_bf16: Vec<bf16> = {
                let c = to_bf16(&cache);
                (0..numel(&shapes[1])).map(|j| c.get(j).copied().unwrap_or(bf16::NAN)).collect()
            };
            let cache_u8: Vec<u8> = (0..numel(&shapes[1])).map(|j| fp8_bytes.get(j).copied().unwrap_or(0xff)).collect();
            let td = DeviceTensor::from_host(&gpu, &fit(&table, numel(&shapes[2])), &shapes[2]).unwrap();
            let sd = DeviceTensor::from_host(&gpu, &fit(&plan_lens, numel(&shapes[3])), &shapes[3]).unwrap();
            let (mut o, o0) = poisoned::<bf16>(&gpu, &shapes[4]);
            let (mut lse, l0) = poisoned::<f32>(&gpu, &shapes[5]);
            let plan_page = if matches!(fault, MlaFault::PlanPage) { page * 2 } else { page };
            let plan = match MlaPlan::new(&gpu, &plan_lens, plan_page, mode) {
                Ok(p) => p,
                Err(e) => {
                    expect_validation_error("MlaPlan::new", &e)?;
                    check!(matches!(fault, MlaFault::NegativeSeqlen), "MlaPlan::new({plan_lens:?}) rejected: {e}");
                    return Ok(Outcome::Rejected);
                }
            };
            let ws_plan;
            let ws_for = if matches!(fault, MlaFault::SmallWorkspace) {
                ws_plan = MlaPlan::new(&gpu, &[0], plan_page, mode).unwrap();
                &ws_plan
            } else {
                &plan
            };
            let mut ws = MlaWorkspace::new(&gpu, ws_for, &cfg).unwrap();
            let opts = MlaOptions {
                // Without the host table only lengths are checked (the caller vouches for the entries): the cases
                // that change entries or the cache's page count always pass it.
                block_table_host: (host_table || matches!(fault, MlaFault::TableEntry(_) | MlaFault::Shape(1 | 2, _)))
                    .then_some(&table[..]),
                backend,
            };
            let r = if fp8 {
                let cd = DeviceTensor::from_host(&gpu, &cache_u8, &shapes[1]).unwrap();
                mla::mla_decode_fp8(&gpu, &qd, &cd, &td, &sd, &plan, &cfg, &mut o, &mut lse, &mut ws, &opts)
            } else {
                let cd = DeviceTensor::from_host(&gpu, &cache_bf16, &shapes[1]).unwrap();
                mla::mla_decode(&gpu, &qd, &cd, &td, &sd, &plan, &cfg, &mut o, &mut lse, &mut ws, &opts)
            };
            // The cache may hold more pages than the table uses (or fewer, if none it uses goes); every other shape is
            // fixed by the configuration and the host table.
            let pages_needed = (0..batch)
                .flat_map(|b| (0..pages[b]).map(move |j| b * max_blocks + j))
                .map(|i| i64::from(table[i]) + 1)
                .max()
                .unwrap_or(0);
            let cache_ok =
                shapes[1].len() == 3 && shapes[1][1..] == [page, width] && shapes[1][0] as i64 >= pages_needed;
            let shapes_ok = cache_ok
                && shapes[0] == [batch, s_q, heads, D_QK]
                && shapes[2] == [batch, max_blocks]
                && shapes[3] == [batch]
                && shapes[4] == [batch, s_q, heads, D_V]
                && shapes[5] == [batch, heads, s_q];
            let small_ws_ok = matches!(fault, MlaFault::SmallWorkspace) && plan.max_splits() <= 1;
            let fault_free = match fault {
                MlaFault::None => true,
                MlaFault::Shape(..) => shapes_ok,
                MlaFault::SmallWorkspace => small_ws_ok,
                MlaFault::TableEntry(_) => !table_fault,
                _ => false,
            };
            let hopper_page_ok = matches!(page, 8 | 16 | 32 | 64) || page.is_multiple_of(64);
            let what = format!("{cfg:?} lens {lens:?} {backend:?} fp8={fp8} {mode:?} fault {fault:?}");
            match r {
                Err(e) => {
                    expect_validation_error(&what, &e)?;
                    let page_reject = matches!(backend, Backend::Hopper | Backend::HopperWide) && !hopper_page_ok;
                    check!(!fault_free || page_reject, "{what}: rejected: {e}");
                    untouched(&gpu, "o", &o, &o0)?;
                    untouched(&gpu, "lse", &lse, &l0)?;
                    Ok(Outcome::Rejected)
                }
                Ok(()) => {
                    check!(fault_free, "{what}: accepted");
                    let ref_cache = if fp8 { dequantize_kv_cache_fp8(&fp8_bytes).unwrap() } else { cache.clone() };
                    let (want_o, want_lse) = ref_mla(&q, &ref_cache, &table, &lens, &cfg).unwrap();
                    let got_o = from_bf16(&download(&gpu, "o", &o)?);
                    let got_lse = download(&gpu, "lse", &lse)?;
                    for (r, (g, w)) in got_o.chunks(D_V).zip(want_o.chunks(D_V)).enumerate() {
                        let rms = (w.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / D_V as f64).sqrt() as f32;
                        for (c, (&a, &b)) in g.iter().zip(w).enumerate() {
                            let tol = 2f32.powi(-7) * b.abs() + 0.04 * rms;
                            check!(
                                (a - b).abs() <= tol || (a.is_nan() && b.is_nan()),
                                "{what}: o row {r}[{c}] {a} vs {b}"
                            );
                        }
                    }
                    for (j, (&g, &w)) in got_lse.iter().zip(&want_lse).enumerate() {
                        let ok = if g.is_finite() && w.is_finite() {
                            (g - w).abs() < 1e-6 || (g - w).abs() < 8.0 / 65536.0 * w.abs()
                        } else {
                            g == w || (g.is_nan() && w.is_nan())
                        };
                        check!(ok, "{what}: lse[{j}] {g} vs {w}");
                    }
                    Ok(Outcome::Matched)
                }
            }
        },
    );
}

#[test]
fn fuzz_mla_workspace_new() {
    let Some(gpu) = test_gpu("fuzz_mla_workspace_new") else { return };
    let size = || prop_oneof![4 => 1usize..20, 1 => prop::sample::select(vec![0usize, 1 << 31, 1 << 33, usize::MAX])];
    let strategy = (size(), size(), prop::collection::vec(0i32..300, 0..4), 1usize..4);
    fuzz::run("mla::MlaWorkspace::new", strategy, |(s_q, heads, lens, target)| {
        let plan = MlaPlan::new(&gpu, &lens, 64, SplitMode::Balanced { target_ctas: target }).unwrap();
        let cfg = MlaConfig { batch: lens.len(), s_q, heads, page_size: 64, softmax_scale: 0.1, causal: false };
        let bytes = s_q
            .checked_mul(heads)
            .and_then(|r| r.checked_mul(D_V + 1))
            .and_then(|r| r.checked_mul(plan.max_splits().max(1)))
            .and_then(|r| r.checked_mul(4));
        match MlaWorkspace::new(&gpu, &plan, &cfg) {
            // An allocation the device cannot hold is the driver's out-of-memory error.
            Err(e) if e.is_out_of_memory() => Ok(Outcome::Rejected),
            Err(e) => {
                expect_validation_error("MlaWorkspace::new", &e)?;
                check!(bytes.is_none_or(|b| b > 1 << 40), "s_q={s_q} heads={heads} rejected: {e}");
                Ok(Outcome::Rejected)
            }
            Ok(_) => {
                check!(bytes.is_some(), "a workspace for s_q={s_q} heads={heads} (rows overflow usize)");
                Ok(Outcome::Matched)
            }
        }
    });
}

// ------------------------------------------------------------------------------------------------ decode ops

/// Which decode op a case calls.
#[derive(Debug, Clone, Copy)]
enum DecodeOp {
    RmsNorm,
    AddRmsNorm,
    RmsNormPrefix,
    Add,
    CopyColumns,
}

#[test]
fn fuzz_decode_ops() {
    let Some(gpu) = test_gpu("fuzz_decode_ops") else { return };
    let strategy = (
        prop::sample::select(vec![
            DecodeOp::RmsNorm,
            DecodeOp::AddRmsNorm,
            DecodeOp::RmsNormPrefix,
            DecodeOp::Add,
            DecodeOp::CopyColumns,
        ]),
        (0usize..5, prop::sample::select(vec![0usize, 1, 5, 64, 130, 512])),
        perturbations::<4>(),
        prop::sample::select(vec![1e-6f32, 0.0, -1.0, f32::NAN, f32::INFINITY]),
        (
            prop_oneof![4 => 0usize..80, 1 => prop::sample::select(vec![usize::MAX, usize::MAX - 3, 1 << 31])],
            prop_oneof![4 => 0usize..80, 1 => prop::sample::select(vec![usize::MAX, 1 << 31])],
            prop_oneof![4 => 0usize..80, 1 => prop::sample::select(vec![usize::MAX, usize::MAX - 1, 1 << 32])],
        ),
        any::<bool>(),
        any::<u64>(),
    );
    fuzz::run(
        "decode_ops::{rms_norm, add_rms_norm, rms_norm_prefix_inplace, add, copy_columns}",
        strategy,
        |(op, (rows, d), p, eps, (src_col, dst_col, width), specials, seed)| {
            let x_shape = perturb(&[rows, d], p[0].0, p[0].1);
            let x = from_bf16(&to_bf16(&values(numel(&x_shape), seed, 3.0, specials)));
            let xd = DeviceTensor::from_host(&gpu, &to_bf16(&x), &x_shape).unwrap();
            let what = format!("{op:?} rows={rows} d={d} x {x_shape:?} eps {eps}");
            let eps_ok = eps.is_finite() && eps >= 0.0;
            match op {
                DecodeOp::RmsNorm | DecodeOp::AddRmsNorm => {
                    let w_shape = perturb(&[d], p[1].0, p[1].1);
                    let wv = from_bf16(&to_bf16(&values(numel(&w_shape), seed + 1, 1.5, false)));
                    let wd = DeviceTensor::from_host(&gpu, &to_bf16(&wv), &w_shape).unwrap();
                    let y_shape = perturb(&[rows, d], p[2].0, p[2].1);
                    let (mut y, y0) = poisoned::<bf16>(&gpu, &y_shape);
                    let res_shape = perturb(&[rows, d], p[3].0, p[3].1);
                    let res = from_bf16(&to_bf16(&values(numel(&res_shape), seed + 2, 3.0, false)));
                    let rd = DeviceTensor::from_host(&gpu, &to_bf16(&res), &res_shape).unwrap();
                    let (mut ro, ro0) = poisoned::<bf16>(&gpu, &[rows, d]);
                    let add = matches!(op, DecodeOp::AddRmsNorm);
                    let r = if add {
                        decode_ops::add_rms_norm(&gpu, &xd, &rd, &mut ro, &wd, &mut y, eps)
                    } else {
                        decode_ops::rms_norm(&gpu, &xd, &wd, &mut y, eps)
                    };
                    let valid = x_shape == [rows, d]
                        && w_shape == [d]
                        && y_shape == [rows, d]
                        && (!add || res_shape == [rows, d])
                        && eps_ok;
                    match r {
                        Err(e) => {
                            expect_validation_error(&what, &e)?;
                            check!(!valid, "{what}: rejected: {e}");
                            untouched(&gpu, "y", &y, &y0)?;
                            untouched(&gpu, "residual_out", &ro, &ro0)?;
                            Ok(Outcome::Rejected)
                        }
                        Ok(()) => {
                            check!(valid, "{what}: accepted (w {w_shape:?} y {y_shape:?} residual {res_shape:?})");
                            let input: Vec<f32> = if add {
                                x.iter().zip(&res).map(|(a, b)| bf16::from_f32(a + b).to_f32()).collect()
                            } else {
                                x.clone()
                            };
                            let got = download(&gpu, "y", &y)?;
                            if rows * d > 0 {
                                let want = rdo::rms_norm(&input, &wv, rows, eps).unwrap();
                                for (j, (g, w)) in got.iter().zip(&want).enumerate() {
                                    let g = g.to_f32();
                                    let ok = (g - w).abs() <= w.abs() / 128.0 + 1e-5 || (g.is_nan() && w.is_nan());
                                    check!(ok, "{what}: y[{j}] {g} vs reference {w}");
                                }
                                if add {
                                    let got_ro = from_bf16(&download(&gpu, "residual_out", &ro)?);
                                    let same = got_ro.iter().zip(&input).all(|(a, b)| same_f32(*a, *b));
                                    check!(same, "{what}: residual_out is not x + residual");
                                }
                            }
                            Ok(Outcome::Matched)
                        }
                    }
                }
                DecodeOp::RmsNormPrefix => {
                    let wlen = perturb(&[d.min(x_shape.last().copied().unwrap_or(0))], p[1].0, p[1].1);
                    let wv = from_bf16(&to_bf16(&values(numel(&wlen), seed + 1, 1.5, false)));
                    let wd = DeviceTensor::from_host(&gpu, &to_bf16(&wv), &wlen).unwrap();
                    let mut xm = DeviceTensor::from_host(&gpu, &to_bf16(&x), &x_shape).unwrap();
                    let x0 = to_bf16(&x);
                    let valid = x_shape.len() == 2 && wlen.len() == 1 && wlen[0] <= x_shape[1] && eps_ok;
                    match decode_ops::rms_norm_prefix_inplace(&gpu, &mut xm, &wd, eps) {
                        Err(e) => {
                            expect_validation_error(&what, &e)?;
                            check!(!valid, "{what}: rejected: {e}");
                            untouched(&gpu, "x", &xm, &x0)?;
                            Ok(Outcome::Rejected)
                        }
                        Ok(()) => {
                            check!(valid, "{what}: accepted (weight {wlen:?})");
                            let (r, len, dd) = (x_shape[0], x_shape[1], wlen[0]);
                            let got = from_bf16(&download(&gpu, "x", &xm)?);
                            if r * dd > 0 {
                                let prefix: Vec<f32> = (0..r).flat_map(|i| x[i * len..i * len + dd].to_vec()).collect();
                                let want = rdo::rms_norm(&prefix, &wv, r, eps).unwrap();
                                for i in 0..r {
                                    for c in 0..len {
                                        let g = got[i * len + c];
                                        if c < dd {
                                            let w = want[i * dd + c];
                                            let ok =
                                                (g - w).abs() <= w.abs() / 128.0 + 1e-5 || (g.is_nan() && w.is_nan());
                                            check!(ok, "{what}: x[{i}, {c}] {g} vs reference {w}");
                                        } else {
                                            check!(
                                                same_f32(g, x[i * len + c]),
                                                "{what}: x[{i}, {c}] past the prefix written"
                                            );
                                        }
                                    }
                                }
                            }
                            Ok(Outcome::Matched)
                        }
                    }
                }
                DecodeOp::Add => {
                    let b_shape = perturb(&x_shape, p[1].0, p[1].1);
                    let b = from_bf16(&to_bf16(&values(numel(&b_shape), seed + 1, 3.0, specials)));
                    let bd = DeviceTensor::from_host(&gpu, &to_bf16(&b), &b_shape).unwrap();
                    let o_shape = perturb(&x_shape, p[2].0, p[2].1);
                    let (mut o, o0) = poisoned::<bf16>(&gpu, &o_shape);
                    let valid = b_shape == x_shape && o_shape == x_shape;
                    match decode_ops::add(&gpu, &xd, &bd, &mut o) {
                        Err(e) => {
                            expect_validation_error(&what, &e)?;
                            check!(!valid, "{what}: rejected: {e}");
                            untouched(&gpu, "out", &o, &o0)?;
                            Ok(Outcome::Rejected)
                        }
                        Ok(()) => {
                            check!(valid, "{what}: accepted b {b_shape:?} out {o_shape:?}");
                            let got = from_bf16(&download(&gpu, "out", &o)?);
                            for (j, g) in got.iter().enumerate() {
                                let w = bf16::from_f32(x[j] + b[j]).to_f32();
                                check!(same_f32(*g, w), "{what}: out[{j}] {g} vs {w}");
                            }
                            Ok(Outcome::Matched)
                        }
                    }
                }
                DecodeOp::CopyColumns => {
                    let dst_shape = perturb(&x_shape, p[1].0, p[1].1);
                    let (mut dst, d0) = poisoned::<bf16>(&gpu, &dst_shape);
                    let src_len = x_shape.last().copied();
                    let dst_len = dst_shape.last().copied();
                    let lead = |s: &[usize]| s[..s.len().saturating_sub(1)].iter().product::<usize>();
                    let valid = match (src_len, dst_len) {
                        (Some(sl), Some(dl)) => {
                            lead(&x_shape) == lead(&dst_shape)
                                && src_col.checked_add(width).is_some_and(|e| e <= sl)
                                && dst_col.checked_add(width).is_some_and(|e| e <= dl)
                        }
                        _ => false,
                    };
                    match decode_ops::copy_columns(&gpu, &xd, src_col, &mut dst, dst_col, width) {
                        Err(e) => {
                            expect_validation_error(&what, &e)?;
                            check!(!valid, "{what}: copy {src_col}+{width} → {dst_col} rejected: {e}");
                            untouched(&gpu, "dst", &dst, &d0)?;
                            Ok(Outcome::Rejected)
                        }
                        Ok(()) => {
                            check!(valid, "{what}: accepted copy {src_col}+{width} → {dst_col} into {dst_shape:?}");
                            let (sl, dl) = (src_len.unwrap(), dst_len.unwrap());
                            let got = download(&gpu, "dst", &dst)?;
                            for r in 0..lead(&x_shape) {
                                for c in 0..dl {
                                    let want = if c >= dst_col && c < dst_col + width {
                                        bf16::from_f32(x[r * sl + src_col + c - dst_col])
                                    } else {
                                        d0[r * dl + c]
                                    };
                                    check!(got[r * dl + c].to_bits() == want.to_bits(), "{what}: dst[{r}, {c}]");
                                }
                            }
                            Ok(Outcome::Matched)
                        }
                    }
                }
            }
        },
    );
}

/// Which of the remaining decode ops a case calls.
#[derive(Debug, Clone, Copy)]
enum DecodeOp2 {
    Rope,
    HeadBmm,
    CacheAppend,
}

fn small_or_huge(small: std::ops::Range<usize>) -> impl Strategy<Value = usize> {
    prop_oneof![6 => small, 1 => prop::sample::select(vec![1usize << 31, usize::MAX - 40, usize::MAX])]
}

#[test]
fn fuzz_decode_rope_head_bmm_cache_append() {
    let Some(gpu) = test_gpu("fuzz_decode_rope_head_bmm_cache_append") else { return };
    let tables = decode_ops::RopeTables::new(&gpu, rdo::RopeConfig::deepseek_v3()).unwrap();
    let dim = tables.config().dim;
    let strategy = (
        prop::sample::select(vec![DecodeOp2::Rope, DecodeOp2::HeadBmm, DecodeOp2::CacheAppend]),
        (0usize..4, 1usize..4, prop::sample::select(vec![8usize, 16, 64, 128, 192, 100])),
        (small_or_huge(0..4), small_or_huge(0..200), small_or_huge(0..130), small_or_huge(0..20)),
        perturbations::<5>(),
        any::<bool>(),
        any::<u64>(),
    );
    fuzz::run(
        "decode_ops::{rope_inplace, head_bmm_windows, cache_append}",
        strategy,
        |(op, (t, heads, len), (a, b, c, d), p, flag, seed)| {
            let mut rng = SplitMix64::new(seed);
            let what = format!("{op:?} t={t} heads={heads} len={len} ({a}, {b}, {c}, {d}) {p:?} {flag}");
            match op {
                DecodeOp2::Rope => {
                    let slices = decode_ops::RopeSlices { count: a, stride: b, offset: c };
                    let xs = perturb(&[t, len], p[0].0, p[0].1);
                    let x0 = to_bf16(&values(numel(&xs), seed, 2.0, flag));
                    let mut xd = DeviceTensor::from_host(&gpu, &x0, &xs).unwrap();
                    let ps = perturb(&[t], p[1].0, p[1].1);
                    let pos: Vec<i32> = (0..numel(&ps))
                        .map(|_| if int_in(&mut rng, 0..8) == 0 { i32::MAX } else { int_in(&mut rng, -5..163_840) })
                        .collect();
                    let pd = DeviceTensor::from_host(&gpu, &pos, &ps).unwrap();
                    let fits = |v: usize| v <= i32::MAX as usize;
                    let valid = xs.len() == 2
                        && ps == [xs[0]]
                        && fits(a)
                        && fits(b)
                        && fits(c)
                        && (a == 0
                            || (c
                                .checked_add(dim)
                                .and_then(|e| b.checked_mul(a - 1).and_then(|s| s.checked_add(e)))
                                .is_some_and(|end| end <= xs[1])
                                && (a == 1 || b >= dim)));
                    match decode_ops::rope_inplace(&gpu, &mut xd, &pd, &tables, slices) {
                        Err(e) => {
                            expect_validation_error(&what, &e)?;
                            check!(!valid, "{what}: rejected: {e}");
                            untouched(&gpu, "x", &xd, &x0)?;
                            Ok(Outcome::Rejected)
                        }
                        Ok(()) => {
                            check!(valid, "{what}: accepted x {xs:?} positions {ps:?}");
                            let (rows, row_len) = (xs[0], xs[1]);
                            let mut want = from_bf16(&x0);
                            if a > 0 {
                                let cfg = tables.config();
                                rdo::rope(&mut want, rows, row_len, a, b.max(dim), c, &pos, cfg).unwrap();
                            }
                            let got = from_bf16(&download(&gpu, "x", &xd)?);
                            for (j, (&g, &w)) in got.iter().zip(&want).enumerate() {
                                let ok =
                                    (g - w).abs() <= w.abs() / 128.0 + 2e-3 || (g.is_nan() && w.is_nan()) || g == w;
                                check!(ok, "{what}: x[{j}] {g} vs reference {w}");
                            }
                            Ok(Outcome::Matched)
                        }
                    }
                }
                DecodeOp2::HeadBmm => {
                    // x [t, heads, len] with a window [a, a + b) (mod sizes keep most windows in range), out
                    // [t, heads, 24] with a window [c, c + 8); weights from `d` on, strides (k·n, n, 1).
                    let x_cols = decode_ops::Columns { col: a, len: if b < 200 { b % (len + 1) } else { b } };
                    let out_cols = decode_ops::Columns { col: if c < 130 { c % 20 } else { c }, len: 8.min(d.max(1)) };
                    let (k, n) = (x_cols.len, out_cols.len);
                    let off = if d < 20 { d } else { 0 };
                    let strides = decode_ops::HeadWeightStrides { offset: off, head: k.wrapping_mul(n), i: n, j: 1 };
                    let xs = perturb(&[t, heads, len], p[0].0, p[0].1);
                    let x = from_bf16(&to_bf16(&values(numel(&xs), seed, 1.0, false)));
                    let xd = DeviceTensor::from_host(&gpu, &to_bf16(&x), &xs).unwrap();
                    let w_len = if k < 1 << 20 && n < 1 << 20 { off + heads * k * n } else { 64 };
                    let w_len = if flag { w_len.saturating_sub(1) } else { w_len };
                    let wv = from_bf16(&to_bf16(&values(w_len, seed + 1, 0.5, false)));
                    let wd = DeviceTensor::from_host(&gpu, &to_bf16(&wv), &[w_len]).unwrap();
                    let os = perturb(&[t, heads, 24], p[1].0, p[1].1);
                    let (mut out, o0) = poisoned::<bf16>(&gpu, &os);
                    let r = decode_ops::head_bmm_windows(&gpu, &xd, x_cols, &wd, strides, &mut out, out_cols);
                    let in_row = |col: usize, l: usize, row: usize| col.checked_add(l).is_some_and(|e| e <= row);
                    let last = (heads > 0 && k > 0 && n > 0).then(|| {
                        ((heads - 1) as u128) * (strides.head as u128)
                            + off as u128
                            + (k as u128 - 1) * strides.i as u128
                            + (n as u128 - 1) * strides.j as u128
                    });
                    let valid = xs.len() == 3
                        && os.len() == 3
                        && os[..2] == xs[..2]
                        && in_row(x_cols.col, k, xs[2])
                        && in_row(out_cols.col, n, os[2])
                        && last.is_none_or(|l| l < w_len as u128);
                    match r {
                        Err(e) => {
                            expect_validation_error(&what, &e)?;
                            check!(!valid, "{what}: rejected: {e}");
                            untouched(&gpu, "out", &out, &o0)?;
                            Ok(Outcome::Rejected)
                        }
                        Ok(()) => {
                            check!(valid, "{what}: accepted x {xs:?} out {os:?} {x_cols:?} {out_cols:?} w {w_len}");
                            let (t, heads, x_len) = (xs[0], xs[1], xs[2]);
                            let window: Vec<f32> = x
                                .chunks(x_len.max(1))
                                .take(t * heads)
                                .flat_map(|row| row[x_cols.col..x_cols.col + k].to_vec())
                                .collect();
                            let got = from_bf16(&download(&gpu, "out", &out)?);
                            let want = if n > 0 {
                                rdo::head_bmm(
                                    &window,
                                    wv.get(off..).unwrap_or(&[]),
                                    t,
                                    heads,
                                    k,
                                    n,
                                    strides.head,
                                    strides.i,
                                    1,
                                )
                                .unwrap()
                            } else {
                                Vec::new()
                            };
                            let ow = os[2];
                            for row in 0..t * heads {
                                for col in 0..ow {
                                    let g = got[row * ow + col];
                                    if col >= out_cols.col && col < out_cols.col + n {
                                        let w = want[row * n + col - out_cols.col];
                                        check!(
                                            (g - w).abs() <= w.abs() / 128.0 + 1e-3,
                                            "{what}: out[{row}, {col}] {g} vs {w}"
                                        );
                                    } else {
                                        check!(
                                            g.to_bits() == o0[row * ow + col].to_f32().to_bits(),
                                            "{what}: out[{row}, {col}] outside the window written"
                                        );
                                    }
                                }
                            }
                            Ok(Outcome::Matched)
                        }
                    }
                }
                DecodeOp2::CacheAppend => {
                    let (width, page, batch, max_blocks, num_blocks) = (len, 1 + a % 4, heads, 1 + c % 3, 1 + d % 5);
                    let table: Vec<i32> =
                        (0..batch * max_blocks).map(|_| int_in(&mut rng, -1..num_blocks as i32 + 1)).collect();
                    let seqs: Vec<i32> = (0..t).map(|_| int_in(&mut rng, -1..batch as i32 + 1)).collect();
                    let pos: Vec<i32> = (0..t).map(|_| int_in(&mut rng, -1..(max_blocks * page) as i32 + 2)).collect();
                    let shapes = [
                        perturb(&[t, width], p[0].0, p[0].1),
                        perturb(&[num_blocks, page, width], p[1].0, p[1].1),
                        perturb(&[batch, max_blocks], p[2].0, p[2].1),
                        perturb(&[t], p[3].0, p[3].1),
                        perturb(&[t], p[4].0, p[4].1),
                    ];
                    // The cache's page count and page size are its own: slots follow the cache passed.
                    let cache_ok = shapes[1].len() == 3 && shapes[1][2] == width && shapes[1][1] > 0;
                    let (pages, page) = if cache_ok { (shapes[1][0], shapes[1][1]) } else { (num_blocks, page) };
                    // So is the table's shape (its contents are the same values, row-major).
                    let fit =
                        |v: &[i32], n: usize| (0..n).map(|j| v.get(j).copied().unwrap_or(0)).collect::<Vec<i32>>();
                    let table_dev = fit(&table, numel(&shapes[2]));
                    let table_ok = shapes[2].len() == 2 && shapes[2][1] > 0;
                    let mb = if table_ok { shapes[2][1] } else { max_blocks };
                    let slot = |r: usize| {
                        rdo::cache_slots(&table_dev, mb, pages, page, &seqs[r..r + 1], &pos[r..r + 1])
                            .ok()
                            .map(|s| s[0])
                    };
                    let slots: Vec<Option<usize>> = (0..t).map(slot).collect();
                    let mut seen: Vec<usize> = slots.iter().flatten().copied().collect();
                    seen.sort_unstable();
                    seen.dedup();
                    // Two rows into one slot race on the device: not a valid call.
                    prop_assume!(seen.len() == slots.iter().flatten().count());
                    let rows = to_bf16(&values(numel(&shapes[0]), seed, 1.0, false));
                    let rd = DeviceTensor::from_host(&gpu, &rows, &shapes[0]).unwrap();
                    let (mut cache, c0) = poisoned::<bf16>(&gpu, &shapes[1]);
                    let td = DeviceTensor::from_host(&gpu, &table_dev, &shapes[2]).unwrap();
                    let sd = DeviceTensor::from_host(&gpu, &fit(&seqs, numel(&shapes[3])), &shapes[3]).unwrap();
                    let pd = DeviceTensor::from_host(&gpu, &fit(&pos, numel(&shapes[4])), &shapes[4]).unwrap();
                    // With the host copy every index is checked before the launch; without it the device skips rows
                    // whose slot is invalid. Cases that change the table's shape always pass the host copy.
                    let host = flag || p[2].0 != 0;
                    let host_table = host.then_some((&table[..], &seqs[..], &pos[..]));
                    // The host copy must match the device table's size (and then holds the same values).
                    let table_ok = table_ok && (!host || table_dev.len() == table.len());
                    let r = decode_ops::cache_append(&gpu, &rd, &mut cache, &td, &sd, &pd, host_table);
                    let valid = cache_ok
                        && table_ok
                        && shapes[0] == [t, width]
                        && shapes[3] == [t]
                        && shapes[4] == [t]
                        && (!host || slots.iter().all(Option::is_some));
                    match r {
                        Err(e) => {
                            expect_validation_error(&what, &e)?;
                            check!(!valid, "{what}: rejected: {e}");
                            untouched(&gpu, "cache", &cache, &c0)?;
                            Ok(Outcome::Rejected)
                        }
                        Ok(()) => {
                            check!(valid, "{what}: accepted {shapes:?} host={host}");
                            let mut want = c0.clone();
                            for (r, s) in slots.iter().enumerate() {
                                if let Some(s) = *s {
                                    want[s * width..(s + 1) * width].copy_from_slice(&rows[r * width..(r + 1) * width]);
                                }
                            }
                            let got = download(&gpu, "cache", &cache)?;
                            check!(
                                got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()),
                                "{what}: cache differs from the reference"
                            );
                            Ok(Outcome::Matched)
                        }
                    }
                }
            }
        },
    );
}

// ---------------------------------------------------------------------------------------- two devices

#[test]
fn fuzz_tensors_of_another_device() {
    let name = "fuzz_tensors_of_another_device";
    let Some(gpu0) = test_gpu(name) else { return };
    let gpu1 = match Gpu::new(1) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("SKIPPED {name}: needs a second device ({e})");
            return;
        }
    };
    // Each argument of the activation quantizer, the GEMM and the combine in turn on the other device.
    let strategy = (0usize..3, 0usize..6, any::<bool>());
    fuzz::run("DeviceMismatch across launchers", strategy, |(op, which, swap)| {
        let (home, away) = if swap { (&gpu1, &gpu0) } else { (&gpu0, &gpu1) };
        let on = |i: usize| if i == which { away } else { home };
        match op {
            0 => {
                let x = DeviceTensor::from_host(on(0), &to_bf16(&values(2 * 128, 1, 1.0, false)), &[2, 128]).unwrap();
                let (mut q, q0) = poisoned::<E4M3>(on(1), &[2, 128]);
                let (mut s, s0) = poisoned::<f32>(on(2), &activation_scale_shape(2, 128));
                let r = quant::quantize_activations(home, &x, &mut q, &mut s, ScaleFormat::F32);
                if which > 2 {
                    check!(r.is_ok(), "all on one device: {r:?}");
                    return Ok(Outcome::Matched);
                }
                check!(matches!(r, Err(Error::DeviceMismatch { .. })), "argument {which} elsewhere: {r:?}");
                untouched(on(1), "q", &q, &q0)?;
                untouched(on(2), "scales", &s, &s0)?;
                Ok(Outcome::Rejected)
            }
            1 => {
                let a = DeviceTensor::from_host(on(0), &codes(16 * 2, 1), &[2, 16]).unwrap();
                let sa = DeviceTensor::from_host(on(1), &scales(4, 2, 1.0), &[1, 4]).unwrap();
                let b = DeviceTensor::from_host(on(2), &codes(16 * 8, 3), &[8, 16]).unwrap();
                let sb = DeviceTensor::from_host(on(3), &scales(1, 4, 1.0), &[1, 1]).unwrap();
                let (mut out, o0) = poisoned::<bf16>(on(4), &[2, 8]);
                let r = fp8_gemm::fp8_gemm(home, &a, &sa, &b, &sb, &mut out, &GemmOptions::default());
                if which > 4 {
                    check!(r.is_ok(), "all on one device: {r:?}");
                    return Ok(Outcome::Matched);
                }
                check!(matches!(r, Err(Error::DeviceMismatch { .. })), "argument {which} elsewhere: {r:?}");
                untouched(on(4), "out", &out, &o0)?;
                Ok(Outcome::Rejected)
            }
            _ => {
                let y = DeviceTensor::from_host(on(0), &to_bf16(&values(3 * 8, 1, 1.0, false)), &[3, 8]).unwrap();
                let row_of = DeviceTensor::from_host(on(1), &[0, 1, 2, -1], &[4]).unwrap();
                let w = DeviceTensor::from_host(on(2), &[0.5f32; 4], &[2, 2]).unwrap();
                let shared = DeviceTensor::from_host(on(3), &to_bf16(&[0.25; 16]), &[2, 8]).unwrap();
                let (mut out, o0) = poisoned::<bf16>(on(4), &[2, 8]);
                let r = moe::combine(home, &y, &row_of, &w, Some(&shared), false, &mut out);
                if which > 4 {
                    check!(r.is_ok(), "all on one device: {r:?}");
                    return Ok(Outcome::Matched);
                }
                check!(matches!(r, Err(Error::DeviceMismatch { .. })), "argument {which} elsewhere: {r:?}");
                untouched(on(4), "out", &out, &o0)?;
                Ok(Outcome::Rejected)
            }
        }
    });
}

// ------------------------------------------------------------------------------------------------ regressions
// Failing cases found by the properties above (or by the overflow paths they drive), kept with their exact inputs.

/// Known divergence, not fixed (a fix needs a scaled two-pass reduction in the kernel): the RMSNorm kernel sums
/// squares in f32, so a row with a finite element above ~2^64 normalizes to 0 (the sum overflows) and a row of
/// values below ~2^-75 with eps = 0 normalizes to ±Inf (the sum underflows to 0); the reference works in f64.
#[test]
fn rms_norm_of_extreme_finite_values_matches_the_reference() {
    let Some(gpu) = test_gpu("rms_norm_of_extreme_finite_values_matches_the_reference") else { return };
    for (x, eps) in [(vec![3.0e38f32, 1.0, -2.0, 0.5], 1e-6f32), (vec![1.0e-40f32], 0.0)] {
        let d = x.len();
        let xb = to_bf16(&x);
        let w = vec![0.5f32; d];
        let want = rdo::rms_norm(&from_bf16(&xb), &w, 1, eps).unwrap();
        let xd = DeviceTensor::from_host(&gpu, &xb, &[1, d]).unwrap();
        let wd = DeviceTensor::from_host(&gpu, &to_bf16(&w), &[d]).unwrap();
        let mut y = DeviceTensor::<bf16>::zeros(&gpu, &[1, d]).unwrap();
        decode_ops::rms_norm(&gpu, &xd, &wd, &mut y, eps).unwrap();
        let got = from_bf16(&y.to_host(&gpu).unwrap());
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= w.abs() / 128.0 + 1e-5, "x {x:?} eps {eps}: {got:?} vs reference {want:?}");
        }
    }
}

/// Column windows whose end is past `usize::MAX` were summed unchecked (a panic in debug builds); now a shape error.
#[test]
fn copy_columns_window_end_past_usize_max_is_a_shape_error() {
    let Some(gpu) = test_gpu("copy_columns_window_end_past_usize_max_is_a_shape_error") else { return };
    let src = DeviceTensor::from_host(&gpu, &to_bf16(&[1.0; 16]), &[2, 8]).unwrap();
    for (src_col, dst_col, width) in [(usize::MAX, 0, 2), (0, usize::MAX - 1, 4), (2, 0, usize::MAX)] {
        let (mut dst, d0) = poisoned::<bf16>(&gpu, &[2, 8]);
        let r = decode_ops::copy_columns(&gpu, &src, src_col, &mut dst, dst_col, width);
        assert!(matches!(r, Err(Error::Shape { .. })), "({src_col}, {dst_col}, {width}): {r:?}");
        untouched(&gpu, "dst", &dst, &d0).unwrap();
    }
}

/// Same for the per-head bmm's windows.
#[test]
fn head_bmm_window_end_past_usize_max_is_a_shape_error() {
    let Some(gpu) = test_gpu("head_bmm_window_end_past_usize_max_is_a_shape_error") else { return };
    let x = DeviceTensor::from_host(&gpu, &to_bf16(&[1.0; 2 * 3 * 8]), &[2, 3, 8]).unwrap();
    let w = DeviceTensor::from_host(&gpu, &to_bf16(&[1.0; 3 * 8 * 8]), &[3 * 8 * 8]).unwrap();
    let strides = decode_ops::HeadWeightStrides { offset: 0, head: 64, i: 8, j: 1 };
    let whole = decode_ops::Columns { col: 0, len: 8 };
    for (xc, oc) in [
        (decode_ops::Columns { col: usize::MAX, len: 2 }, whole),
        (whole, decode_ops::Columns { col: usize::MAX - 1, len: 4 }),
    ] {
        let (mut out, o0) = poisoned::<bf16>(&gpu, &[2, 3, 8]);
        let r = decode_ops::head_bmm_windows(&gpu, &x, xc, &w, strides, &mut out, oc);
        assert!(matches!(r, Err(Error::Shape { .. })), "{xc:?} {oc:?}: {r:?}");
        untouched(&gpu, "out", &out, &o0).unwrap();
    }
}

/// RoPE slices whose offset + dim is past `usize::MAX`.
#[test]
fn rope_slices_past_usize_max_are_a_shape_error() {
    let Some(gpu) = test_gpu("rope_slices_past_usize_max_are_a_shape_error") else { return };
    let tables = decode_ops::RopeTables::new(&gpu, rdo::RopeConfig::deepseek_v3()).unwrap();
    let x0 = to_bf16(&values(2 * 576, 1, 1.0, false));
    let mut x = DeviceTensor::from_host(&gpu, &x0, &[2, 576]).unwrap();
    let pos = DeviceTensor::from_host(&gpu, &[0i32, 1], &[2]).unwrap();
    let slices = decode_ops::RopeSlices { count: 1, stride: 0, offset: usize::MAX - 10 };
    let r = decode_ops::rope_inplace(&gpu, &mut x, &pos, &tables, slices);
    assert!(matches!(r, Err(Error::Shape { .. })), "{r:?}");
    untouched(&gpu, "x", &x, &x0).unwrap();
}

/// `MlaWorkspace::new` multiplied s_q·heads unchecked: a panic in debug builds, and in release a workspace of 0 rows
/// for 2^33·2^33 (the product wrapped to 0); now a shape error.
#[test]
fn mla_workspace_for_a_config_whose_rows_overflow_is_an_error() {
    let Some(gpu) = test_gpu("mla_workspace_for_a_config_whose_rows_overflow_is_an_error") else { return };
    let plan = MlaPlan::new(&gpu, &[5], 64, SplitMode::Balanced { target_ctas: 1 }).unwrap();
    let cfg = MlaConfig { batch: 1, s_q: 1 << 33, heads: 1 << 33, page_size: 64, softmax_scale: 0.1, causal: false };
    let r = MlaWorkspace::new(&gpu, &plan, &cfg);
    assert!(matches!(r, Err(Error::Shape { .. })), "{r:?}");
}

#[test]
fn masked_offsets_past_i32_experts_or_i64_offsets_is_an_error_before_allocating() {
    let Some(gpu) = test_gpu("masked_offsets_past_i32_experts_or_i64_offsets_is_an_error_before_allocating") else {
        return;
    };
    let block = moe::GEMM_BLOCK_M;
    // These once built the whole offset vector first: 2^31 experts asked for 16 GiB, usize::MAX never finished.
    for (e, max_m) in [(i32::MAX as usize + 1, block), (usize::MAX, block), (2, (i64::MAX as usize) / block * block)] {
        let r = moe::masked_offsets(&gpu, e, max_m);
        assert!(matches!(r, Err(Error::Shape { .. })), "E={e} max_m={max_m}: {r:?}");
    }
    let offsets = moe::masked_offsets(&gpu, 3, 2 * block).unwrap();
    assert_eq!(offsets.to_host(&gpu).unwrap(), vec![0, 2 * block as i64, 4 * block as i64, 6 * block as i64]);
}

// ------------------------------------------------------------------------------------------------ borrowed views

/// Which launcher a view case drives.
#[derive(Debug, Clone, Copy)]
enum ViewOp {
    /// Accepts strided rows.
    RmsNorm,
    /// Accepts strided rows.
    CopyColumns,
    /// Dense only.
    Add,
    /// Dense only.
    Quantize,
}

/// Column windows of wider buffers as views: a view exists exactly when its start and (non-dense) row stride are
/// 16-byte aligned; a launcher that accepts row strides gives bitwise the dense result and writes nothing outside
/// the window; a dense-only launcher refuses a strided view and writes nothing.
#[test]
fn fuzz_views() {
    let Some(gpu) = test_gpu("fuzz_views") else { return };
    let strategy = (
        prop::sample::select(vec![ViewOp::RmsNorm, ViewOp::CopyColumns, ViewOp::Add, ViewOp::Quantize]),
        (0usize..6, prop::sample::select(vec![1usize, 5, 8, 64, 128, 130])),
        {
            // Mostly aligned offsets and gaps (8 bf16 = 16 bytes), sometimes anything.
            let part = || prop_oneof![3 => (0usize..3).prop_map(|c| 8 * c), 1 => 0usize..20];
            (part(), part(), part(), part())
        },
        any::<u64>(),
    );
    fuzz::run("views through launchers", strategy, |(op, (rows, d), (x_col, x_pad, y_col, y_pad), seed)| {
        let (xw, yw) = (x_col + d + x_pad, y_col + d + y_pad);
        let what = format!("{op:?} rows={rows} d={d} x cols {x_col}..+{d} of {xw}, y cols {y_col}..+{d} of {yw}");
        let xh = to_bf16(&values(rows * xw, seed, 3.0, false));
        let x_buf = DeviceTensor::from_host(&gpu, &xh, &[rows, xw]).unwrap();
        let (mut y_buf, y0) = poisoned::<bf16>(&gpu, &[rows, yw]);
        // bf16 is 2 bytes: a view is possible when its start is a multiple of 8 elements and, with more than one
        // row and a gap, its row stride too; a view of no rows has no element to place.
        let possible = |col: usize, width: usize| {
            rows == 0 || (col.is_multiple_of(8) && (rows <= 1 || width == d || width.is_multiple_of(8)))
        };
        let x_view = x_buf.as_tensor_ref().narrow(1, x_col..x_col + d);
        check!(x_view.is_ok() == possible(x_col, xw), "{what}: x view {x_view:?}");
        let Ok(x_view) = x_view else {
            check!(matches!(x_view, Err(Error::Alignment { .. })), "{what}: x view error {x_view:?}");
            return Ok(Outcome::Rejected);
        };
        let y_view = y_buf.as_tensor_mut().narrow(1, y_col..y_col + d);
        check!(y_view.is_ok() == possible(y_col, yw), "{what}: y view");
        let Ok(y_view) = y_view else { return Ok(Outcome::Rejected) };
        let strided = !x_view.is_dense() || !y_view.is_dense();
        let x_dense: Vec<bf16> = (0..rows).flat_map(|r| xh[r * xw + x_col..][..d].to_vec()).collect();
        let xd = DeviceTensor::from_host(&gpu, &x_dense, &[rows, d]).unwrap();
        let (mut want, _) = poisoned::<bf16>(&gpu, &[rows, d]);
        let r = match op {
            ViewOp::RmsNorm => {
                let w = DeviceTensor::from_host(&gpu, &to_bf16(&values(d, seed + 1, 1.5, false)), &[d]).unwrap();
                decode_ops::rms_norm(&gpu, &xd, &w, &mut want, 1e-6).unwrap();
                decode_ops::rms_norm(&gpu, x_view, &w, y_view, 1e-6)
            }
            ViewOp::CopyColumns => {
                decode_ops::copy_columns(&gpu, &xd, 0, &mut want, 0, d).unwrap();
                decode_ops::copy_columns(&gpu, x_view, 0, y_view, 0, d)
            }
            ViewOp::Add => {
                decode_ops::add(&gpu, &xd, &xd, &mut want).unwrap();
                decode_ops::add(&gpu, x_view, x_view, y_view)
            }
            ViewOp::Quantize => {
                let mut q = poisoned::<E4M3>(&gpu, &[rows, d]).0;
                let mut sc = DeviceTensor::<f32>::zeros(&gpu, &activation_scale_shape(rows, d)).unwrap();
                let r = quant::quantize_activations(&gpu, x_view, &mut q, &mut sc, ScaleFormat::F32);
                check!(r.is_ok() == x_view.is_dense(), "{what}: quantize {r:?}");
                if r.is_ok() {
                    let (wq, ws) = quant::quantize_activations_new(&gpu, &xd, ScaleFormat::F32).unwrap();
                    check!(q.to_host(&gpu).unwrap() == wq.to_host(&gpu).unwrap(), "{what}: codes differ");
                    check!(sc.to_host(&gpu).unwrap() == ws.to_host(&gpu).unwrap(), "{what}: scales differ");
                }
                untouched(&gpu, "y", &y_buf, &y0)?;
                return Ok(if r.is_ok() { Outcome::Matched } else { Outcome::Rejected });
            }
        };
        let accepts_strides = matches!(op, ViewOp::RmsNorm | ViewOp::CopyColumns);
        match r {
            Err(e) => {
                check!(strided && !accepts_strides, "{what}: refused: {e}");
                check!(matches!(e, Error::Shape { .. }), "{what}: error {e}");
                untouched(&gpu, "y", &y_buf, &y0)?;
                Ok(Outcome::Rejected)
            }
            Ok(()) => {
                check!(!strided || accepts_strides, "{what}: a dense-only launcher took a strided view");
                let want = download(&gpu, "want", &want)?;
                let got = download(&gpu, "y", &y_buf)?;
                for r in 0..rows {
                    for c in 0..yw {
                        let g = got[r * yw + c].to_bits();
                        let w = if (y_col..y_col + d).contains(&c) { want[r * d + c - y_col] } else { y0[r * yw + c] };
                        check!(g == w.to_bits(), "{what}: y[{r}, {c}] {g:#x} vs {:#x}", w.to_bits());
                    }
                }
                Ok(Outcome::Matched)
            }
        }
    });
}

// ------------------------------------------------------------------------------------------------ decode layer
#[cfg(feature = "layer")]
mod decode_layer {
    use super::*;

    /// A layer small enough for the emulator (two heads, eight 128-wide experts) that keeps the head dimensions the
    /// decode kernels are specialised for.
    fn tiny_layer_config(hidden: usize) -> DeepSeekV3Config {
        DeepSeekV3Config {
            hidden,
            num_heads: 2,
            q_lora_rank: 128,
            moe_intermediate: 128,
            n_routed_experts: 8,
            n_shared_experts: 1,
            top_k: 2,
            n_group: 2,
            topk_group: 1,
            first_k_dense: 0,
            dense_intermediate: 256,
            ..DeepSeekV3Config::small()
        }
    }

    /// What a decode-layer case breaks (at most one thing).
    #[derive(Debug, Clone, Copy)]
    enum LayerFault {
        None,
        /// A table entry the step reads: −1, `num_blocks` or `i32::MAX`.
        TableEntry(u8),
        /// A length past the table's capacity.
        LengthPastCapacity,
        /// A length of 0 or −1 (the new token needs a slot).
        LengthBelowOne(bool),
        /// One of x, out, the cache, seqlens, positions, the table with a perturbed shape.
        Shape(u8, (u8, usize)),
        /// A workspace for another batch size.
        WorkspaceBatch,
        /// A workspace made for a layer of other dimensions.
        WorkspaceLayer,
    }

    fn layer_fault() -> impl Strategy<Value = LayerFault> {
        prop_oneof![
            4 => Just(LayerFault::None),
            1 => (0u8..3).prop_map(LayerFault::TableEntry),
            1 => Just(LayerFault::LengthPastCapacity),
            1 => any::<bool>().prop_map(LayerFault::LengthBelowOne),
            2 => (0u8..6, (1u8..8, 0usize..4)).prop_map(|(what, p)| LayerFault::Shape(what, p)),
            1 => Just(LayerFault::WorkspaceBatch),
            1 => Just(LayerFault::WorkspaceLayer),
        ]
    }

    #[test]
    fn fuzz_decode_layer() {
        let Some(gpu) = test_gpu("fuzz_decode_layer") else { return };
        let cfg = tiny_layer_config(256);
        let prepared = PreparedLayer::new(&cfg, synthetic_layer_weights(&cfg, 0, 21).unwrap()).unwrap();
        let layer = std::cell::RefCell::new(DecodeLayer::upload(&gpu, &prepared).unwrap());
        let other_cfg = tiny_layer_config(384);
        let other = DecodeLayer::upload(
            &gpu,
            &PreparedLayer::new(&other_cfg, synthetic_layer_weights(&other_cfg, 0, 22).unwrap()).unwrap(),
        )
        .unwrap();
        let strategy = (
            prop::collection::vec(1i32..=90, 1..=3),
            prop::sample::select(vec![16usize, 64, 24]),
            prop::sample::select(vec![Backend::Auto, Backend::Portable]),
            layer_fault(),
            any::<u64>(),
        );
        fuzz::run("layer::DecodeLayer::forward", strategy, |(mut lens, page, backend, fault, seed)| {
            let mut rng = SplitMix64::new(seed);
            let b = lens.len();
            let mut layer = layer.borrow_mut();
            layer.options.mla_backend = backend;
            let max_blocks = lens.iter().map(|&l| (l as usize).div_ceil(page)).max().unwrap();
            let used: usize = lens.iter().map(|&l| (l as usize).div_ceil(page)).sum();
            let num_blocks = used + 2;
            // Entries past a sequence's pages are never read: garbage there must not matter.
            let pages = shuffled_pages(&mut rng, num_blocks);
            let mut table = block_table(&lens, page, max_blocks, &pages, i32::MIN);
            let victim = index_below(&mut rng, b);
            match fault {
                LayerFault::TableEntry(kind) => {
                    let blk = index_below(&mut rng, (lens[victim] as usize).div_ceil(page));
                    table[victim * max_blocks + blk] = [-1, num_blocks as i32, i32::MAX][kind as usize];
                }
                LayerFault::LengthPastCapacity => lens[victim] = (max_blocks * page) as i32 + 1,
                LayerFault::LengthBelowOne(neg) => lens[victim] = if neg { -1 } else { 0 },
                _ => {}
            }
            // The cache: random bf16 where a sequence has tokens before the new one, NaN everywhere else.
            let before_new: Vec<usize> = lens.iter().map(|&l| l.max(1) as usize - 1).collect();
            let cache = paged_cache(&mut rng, num_blocks, page, 576, &table, max_blocks, &before_new, (-1.0, 1.0));
            let x: Vec<f32> = (0..b * cfg.hidden).map(|_| bf16::from_f32(rng.uniform(-1.0, 1.0)).to_f32()).collect();
            let shape_of = |what: u8, shape: &[usize]| match fault {
                LayerFault::Shape(w, (how, at)) if w == what => perturb(shape, how, at),
                _ => shape.to_vec(),
            };
            let xs = shape_of(0, &[b, cfg.hidden]);
            let os = shape_of(1, &[b, cfg.hidden]);
            // The cache's page size and page count define the problem (another shape can be another valid problem):
            // its faults are the widths and ranks no problem has.
            let cs = match fault {
                LayerFault::Shape(2, (how, _)) => match how % 4 {
                    0 => vec![num_blocks, page, 575],
                    1 => vec![num_blocks, page, 577],
                    2 => vec![num_blocks * page, 576],
                    _ => vec![1, num_blocks, page, 576],
                },
                _ => vec![num_blocks, page, 576],
            };
            let ls = shape_of(3, &[b]);
            let ps = shape_of(4, &[b]);
            let ts = shape_of(5, &[b, max_blocks]);
            let fill = |shape: &[usize], v: &[f32]| -> Vec<bf16> {
                (0..numel(shape)).map(|i| bf16::from_f32(v.get(i).copied().unwrap_or(0.5))).collect()
            };
            let xd = DeviceTensor::from_host(&gpu, &fill(&xs, &x), &xs).unwrap();
            let cache_host = fill(&cs, &cache);
            let mut cd = DeviceTensor::from_host(&gpu, &cache_host, &cs).unwrap();
            let pad = |v: &[i32], n: usize| -> Vec<i32> { (0..n).map(|i| v.get(i).copied().unwrap_or(1)).collect() };
            let positions: Vec<i32> = lens.iter().map(|&l| l - 1).collect();
            let ld = DeviceTensor::from_host(&gpu, &pad(&lens, numel(&ls)), &ls).unwrap();
            let pd = DeviceTensor::from_host(&gpu, &pad(&positions, numel(&ps)), &ps).unwrap();
            let td = DeviceTensor::from_host(&gpu, &pad(&table, numel(&ts)), &ts).unwrap();
            let (mut out, o0) = poisoned::<bf16>(&gpu, &os);
            let mut ws = match fault {
                LayerFault::WorkspaceBatch => layer.workspace(&gpu, b + 1).unwrap(),
                LayerFault::WorkspaceLayer => other.workspace(&gpu, b).unwrap(),
                _ => layer.workspace(&gpu, b).unwrap(),
            };
            let step = DecodeBatch {
                block_table: td.as_tensor_ref(),
                block_table_host: &table,
                seqlens: ld.as_tensor_ref(),
                seqlens_host: &lens,
                positions: pd.as_tensor_ref(),
            };
            let r = layer.forward(&gpu, &mut ws, &xd, &mut cd, &step, &mut out, false);
            let what = format!("lens {lens:?} page {page} {backend:?} fault {fault:?}");
            // A perturbation can leave a shape as it was (a swap within a rank-1 shape).
            let shapes_kept = xs == [b, cfg.hidden]
                && os == [b, cfg.hidden]
                && cs == [num_blocks, page, 576]
                && ls == [b]
                && ps == [b]
                && ts == [b, max_blocks];
            let fault_free =
                matches!(fault, LayerFault::None) || (matches!(fault, LayerFault::Shape(..)) && shapes_kept);
            match r {
                Err(e) => {
                    expect_validation_error(&what, &e)?;
                    check!(!fault_free, "{what}: rejected: {e}");
                    untouched(&gpu, "out", &out, &o0)?;
                    untouched(&gpu, "kv_cache", &cd, &cache_host)?;
                    Ok(Outcome::Rejected)
                }
                Ok(_) => {
                    check!(
                        fault_free,
                        "{what}: accepted (x {xs:?} out {os:?} cache {cs:?} seqlens {ls:?} positions {ps:?} table {ts:?})"
                    );
                    let got: Vec<f32> = from_bf16(&download(&gpu, "out", &out)?);
                    let inter = layer.last_intermediates(&gpu, &ws).map_err(|e| TestCaseError::fail(e.to_string()))?;
                    let (ids, _) = layer.last_routing(&gpu, &ws).map_err(|e| TestCaseError::fail(e.to_string()))?;
                    let mut want_cache = cache.clone();
                    let stepr = RefStep { block_table: &table, max_blocks, seqlens: &lens, page_size: page };
                    let want = ref_layer(&prepared, &x, &mut want_cache, &stepr).unwrap();
                    // The cache: the new rows where the step appends, every other element bitwise as it was.
                    let cache_after = from_bf16(&download(&gpu, "kv_cache", &cd)?);
                    for (s, &l) in lens.iter().enumerate() {
                        let pos = l as usize - 1;
                        let slot = (table[s * max_blocks + pos / page] as usize * page + pos % page) * 576;
                        want_cache[slot..slot + 576].copy_from_slice(&inter.kv_row[s * 576..(s + 1) * 576]);
                    }
                    let same = cache_after.iter().zip(&want_cache).all(|(a, b)| same_f32(*a, *b));
                    check!(same, "{what}: the cache changed outside the appended rows");
                    // The output per token: against the reference when both route alike; a top-k near-tie is accepted
                    // when the reference router, given the GPU's residual, routes like the GPU.
                    let (h, k) = (cfg.hidden, cfg.top_k);
                    for s in 0..b {
                        let sorted = |v: &[i32]| {
                            let mut v = v.to_vec();
                            v.sort_unstable();
                            v
                        };
                        let gpu_ids = sorted(&ids[s * k..(s + 1) * k]);
                        let want_out: Vec<f32> = if gpu_ids == sorted(&want.topk_ids[s * k..(s + 1) * k]) {
                            want.out[s * h..(s + 1) * h].to_vec()
                        } else {
                            let gh = &inter.h[s * h..(s + 1) * h];
                            let alt = moe_branch(&prepared, gh, 1).unwrap();
                            check!(sorted(&alt.topk_ids) == gpu_ids, "{what}: token {s} routed to {gpu_ids:?}");
                            gh.iter().zip(&alt.moe_out).map(|(a, b)| bf16::from_f32(a + b).to_f32()).collect()
                        };
                        let d = rm::calc_diff(&got[s * h..(s + 1) * h], &want_out);
                        check!(got[s * h..(s + 1) * h].iter().all(|v| v.is_finite()), "{what}: token {s} not finite");
                        check!(d < 2e-3, "{what}: token {s} output calc_diff {d:.3e}");
                    }
                    Ok(Outcome::Matched)
                }
            }
        });
    }
}

#[test]
fn fuzz_mla_device_plan() {
    let Some(gpu) = test_gpu("fuzz_mla_device_plan") else { return };
    let len = prop_oneof![
        6 => 0i32..140,
        1 => prop::sample::select(vec![-1, i32::MIN, 141, 1000, i32::MAX]),
    ];
    let strategy = (
        prop::collection::vec(len, 0..5),
        prop::sample::select(vec![16usize, 64, 24]),
        prop::sample::select(vec![Backend::Auto, Backend::Portable, Backend::Hopper]),
        0usize..3,
        any::<bool>(),
        any::<u64>(),
    );
    fuzz::run("mla::MlaPlan::on_device + update + decode", strategy, |(lens, page, backend, extra, fp8, seed)| {
        let b = lens.len();
        // The table holds 140 tokens per sequence (+ `extra` spare columns); lengths past it are clamped.
        let max_blocks = 140usize.div_ceil(page) + extra;
        let cap = (max_blocks * page) as i32;
        let valid: Vec<bool> = lens.iter().map(|&l| (0..=cap).contains(&l)).collect();
        let clamped: Vec<i32> = lens.iter().map(|&l| l.clamp(0, cap)).collect();
        let mut rng = SplitMix64::new(seed);
        let num_blocks = b * max_blocks + 1;
        let table: Vec<i32> = shuffled_pages(&mut rng, num_blocks)[..b * max_blocks].to_vec();
        let tokens: Vec<usize> = clamped.iter().map(|&l| l as usize).collect();
        let cache = paged_cache(&mut rng, num_blocks, page, D_QK, &table, max_blocks, &tokens, (-0.5, 0.5));
        let cfg = MlaConfig { batch: b, s_q: 1, heads: 4, page_size: page, softmax_scale: 0.1, causal: true };
        let q = from_bf16(&to_bf16(&values(b * 4 * D_QK, seed + 1, 1.0, false)));
        // An empty batch launches nothing, so nothing rejects the page; otherwise the sm_90a kernels refuse 24.
        let hopper_page = matches!(page, 16 | 64) || b == 0;
        let mut plan = MlaPlan::on_device(&gpu, &cfg, max_blocks, backend).unwrap();
        let seqlens = DeviceTensor::from_host(&gpu, &lens, &[b]).unwrap();
        plan.update(&gpu, &seqlens).map_err(|e| TestCaseError::fail(format!("update: {e}")))?;
        let mut ws = MlaWorkspace::new(&gpu, &plan, &cfg).unwrap();
        let qd = DeviceTensor::from_host(&gpu, &to_bf16(&q), &[b, 1, 4, D_QK]).unwrap();
        let td = DeviceTensor::from_host(&gpu, &table, &[b, max_blocks]).unwrap();
        let (mut o, o0) = poisoned::<bf16>(&gpu, &[b, 1, 4, D_V]);
        let (mut l, l0) = poisoned::<f32>(&gpu, &[b, 4, 1]);
        let opts = MlaOptions { block_table_host: None, backend };
        let (r, deq) = if fp8 {
            let bytes = quantize_kv_cache_fp8(&cache).unwrap();
            let cd = DeviceTensor::from_host(&gpu, &bytes, &[num_blocks, page, FP8_TOKEN_BYTES]).unwrap();
            let r = mla::mla_decode_fp8(&gpu, &qd, &cd, &td, &seqlens, &plan, &cfg, &mut o, &mut l, &mut ws, &opts);
            (r, dequantize_kv_cache_fp8(&bytes).unwrap())
        } else {
            let cd = DeviceTensor::from_host(&gpu, &to_bf16(&cache), &[num_blocks, page, D_QK]).unwrap();
            (mla::mla_decode(&gpu, &qd, &cd, &td, &seqlens, &plan, &cfg, &mut o, &mut l, &mut ws, &opts), cache)
        };
        let what = format!("lens {lens:?} page {page} {backend:?} fp8={fp8}");
        match r {
            Err(e) => {
                expect_validation_error(&what, &e)?;
                check!(backend == Backend::Hopper && !hopper_page, "{what}: rejected: {e}");
                untouched(&gpu, "o", &o, &o0)?;
                untouched(&gpu, "lse", &l, &l0)?;
                Ok(Outcome::Rejected)
            }
            Ok(()) => {
                check!(backend != Backend::Hopper || hopper_page, "{what}: accepted a page the kernel cannot take");
                let go = from_bf16(&download(&gpu, "o", &o)?);
                let gl = download(&gpu, "lse", &l)?;
                // Sequences with a length in range match the reference; the others' rows are unspecified.
                let (wo, wl) = ref_mla(&q, &deq, &table, &clamped, &cfg).unwrap();
                for s in (0..b).filter(|&s| valid[s]) {
                    let rows = s * 4..(s + 1) * 4;
                    let (go_s, wo_s) = (&go[rows.start * D_V..rows.end * D_V], &wo[rows.start * D_V..rows.end * D_V]);
                    rows_close(&format!("{what}: sequence {s}"), go_s, wo_s, D_V, 0.04)?;
                    for r in rows {
                        let (g, w) = (gl[r], wl[r]);
                        check!(
                            same_f32(g, w) || (g - w).abs() <= 1e-3 * w.abs().max(1.0),
                            "{what}: lse[{r}] {g} vs {w}"
                        );
                    }
                }
                Ok(Outcome::Matched)
            }
        }
    });
}
