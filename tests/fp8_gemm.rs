//! FP8 block-scaled GEMM: CPU checks of the host-side logic, and GPU tests (skipped without a GPU) of both kernels
//! against the CPU reference over the sweep, the primitive probes of the sm_90a kernel, determinism,
//! accumulate mode and bad-input rejection.
//!
//! Metrics per checked row set: DeepGEMM's `calc_diff` against the reference computed from the *unquantized*
//! inputs (< 1e-3), and the error against the reference computed from the quantized inputs within bf16 rounding
//! (|d − ref| ≤ 2^-8·|ref| + 1e-3·rms(ref)). Large shapes check a random subset of rows (plus the first and last).

use r1_kernels::fp8_gemm::{self, ForcedSm90, GemmKernel, GemmOptions};
use r1_kernels::reference::fp8_gemm::{calc_diff, fp8_gemm as ref_gemm, fp8_gemm_rows};
use r1_kernels::reference::quant::{
    quantize_per_block, quantize_per_block_with, quantize_per_token_group, quantize_per_token_group_with,
    scales_from_mn_major, scales_to_mn_major, ScaleFormat,
};
use r1_kernels::rng::SplitMix64;
use r1_kernels::{bf16, DeviceTensor, Error, Gpu, E4M3};

mod common;
use common::uniform_vec;
use common::{block_magnitude, emu_shrink, emu_shrink_described, expect_launched, index_below, sm90_part};

const DEEPSEEK_NK: [(usize, usize); 6] =
    [(2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)];
const LLAMA_NK: [(usize, usize); 2] = [(4096, 4096), (14336, 4096)];
const SWEEP_M: [usize; 8] = [0, 1, 7, 64, 128, 129, 1000, 4096];

// The emulated device (kernels run on the CPU) takes these instead. n and k shrink per shape, keeping what the real
// shape exercises on the kernels: the ragged N tail of 2112 (192 = 128 + 64), K deeper than the pipeline (9 or more
// K blocks against at most 8 stages: the ring wraps inside a tile), 4 K blocks for k = 512, and small-m split-K
// (the planner splits at most two tiles over 4 SMs, the emulator's default: n = 128; on 132 SMs the real small-m
// shapes with few N tiles split). The m values
// keep m = 0, block M 64 (1, 7, 64), an exact and a one-past block M 128 tile (128, 129), several tile rows with a
// ragged last one (520 for 1000) and more tile rows than one scheduler group of 8 (1152 = 9 × 128 for 4096).
const DEEPSEEK_NK_EMU: [(usize, usize); 6] = [(192, 1152), (256, 384), (256, 512), (128, 1152), (256, 640), (256, 256)];
const LLAMA_NK_EMU: [(usize, usize); 2] = [(256, 1024), (384, 256)];
const SWEEP_M_EMU: [usize; 8] = [0, 1, 7, 64, 128, 129, 520, 1152];
const RAGGED: [(usize, usize, usize); 6] =
    [(1, 8, 16), (7, 136, 144), (129, 264, 272), (65, 2056, 1040), (200, 120, 400), (33, 1000, 2064)];

/// Fewest checked elements for which `calc_diff` is asserted (below that its sampling noise is comparable to the
/// threshold; the element-wise bound still applies).
const MIN_METRIC_ELEMENTS: usize = 1024;

/// Weights and their quantization, shared by every m of a shape.
struct Weights {
    n: usize,
    k: usize,
    w: Vec<f32>,
    b: Vec<E4M3>,
    sb: Vec<f32>,
}

struct Acts {
    m: usize,
    x: Vec<f32>,
    a: Vec<E4M3>,
    sa_rows: Vec<f32>,
    sa_mn: Vec<f32>,
}

/// Rows per generation chunk (a multiple of 128, so chunks align with B's scale blocks). Chunks are generated and
/// quantized on their own threads with their own seeds: the data does not depend on the machine's core count, and
/// gpu-check (single-threaded test runner) still uses the device machine's cores for the multi-GB inputs.
const GEN_CHUNK: usize = 512;

fn gen_chunked(
    rows: usize,
    k: usize,
    seed: u64,
    value: impl Fn(usize, usize, &mut SplitMix64) -> f32 + Sync,
    quantize: impl Fn(&[f32], usize) -> (Vec<E4M3>, Vec<f32>) + Sync,
) -> (Vec<f32>, Vec<E4M3>, Vec<f32>) {
    let parts: Vec<(Vec<f32>, Vec<E4M3>, Vec<f32>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..rows.div_ceil(GEN_CHUNK))
            .map(|c| {
                let (value, quantize) = (&value, &quantize);
                scope.spawn(move || {
                    let (r0, r1) = (c * GEN_CHUNK, ((c + 1) * GEN_CHUNK).min(rows));
                    let mut rng = SplitMix64::new(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ c as u64);
                    let v: Vec<f32> = (r0 * k..r1 * k).map(|i| value(i / k.max(1), i % k.max(1), &mut rng)).collect();
                    let (q, s) = quantize(&v, r1 - r0);
                    (v, q, s)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("generator thread")).collect()
    });
    let (mut v, mut q, mut s) = (Vec::new(), Vec::new(), Vec::new());
    for (pv, pq, ps) in parts {
        v.extend(pv);
        q.extend(pq);
        s.extend(ps);
    }
    (v, q, s)
}

/// One random power of two in [2^-2, 2^2] per (row block, 128-column block) of a `rows × k` matrix, row-major over
/// the blocks; `block_rows` is 128 for weights (their scale blocks) and 1 for activations (their 1×128 groups).
fn magnitudes(rows: usize, k: usize, block_rows: usize, seed: u64) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed ^ 0x6d61_676e);
    (0..rows.div_ceil(block_rows) * k.div_ceil(128)).map(|_| block_magnitude(&mut rng)).collect()
}

fn weights(n: usize, k: usize, seed: u64, format: ScaleFormat) -> Weights {
    // Every 128×128 block has its own magnitude (a random power of two in [2^-2, 2^2]), so the block scales differ
    // by up to 16× and a scale read from the wrong block is an O(1) error; within a block values are alike, as in
    // trained weights, so the E4M3 rounding error stays what DeepGEMM's metric is calibrated for.
    let mags = magnitudes(n, k, 128, seed);
    let kb = k.div_ceil(128);
    let (w, b, sb) = gen_chunked(
        n,
        k,
        seed,
        |row, col, rng| (rng.next_f32() - 0.5) * 0.05 * mags[(row / 128) * kb + col / 128],
        |w, rows| quantize_per_block_with(w, rows, k, 128, format).unwrap(),
    );
    Weights { n, k, w, b, sb }
}

fn acts(m: usize, k: usize, seed: u64, format: ScaleFormat) -> Acts {
    // Per-token magnitudes differ, and every (row, 128-column group) has its own power-of-two factor: the 1×128
    // scales differ by up to 16× between neighbouring groups and rows.
    let mags = magnitudes(m, k, 1, seed);
    let kb = k.div_ceil(128);
    let (x, a, sa_rows) = gen_chunked(
        m,
        k,
        seed,
        |row, col, rng| (rng.next_f32() - 0.5) * (1.0 + (row % 13) as f32) * mags[row * kb + col / 128],
        |x, rows| quantize_per_token_group_with(x, rows, k, 128, format).unwrap(),
    );
    let sa_mn = scales_to_mn_major(&sa_rows, m, k.div_ceil(128)).unwrap();
    Acts { m, x, a, sa_rows, sa_mn }
}

fn rows_to_check(m: usize, seed: u64) -> Vec<usize> {
    if m <= 4 {
        return (0..m).collect();
    }
    let mut rng = SplitMix64::new(seed);
    let mut rows: Vec<usize> = (0..2).map(|_| index_below(&mut rng, m)).collect();
    rows.extend([0, m - 1]);
    rows.sort();
    rows.dedup();
    rows
}

/// f64 dot product with four partial sums (vectorizes; the order differs from a plain sum only in f64 rounding).
fn dot4(x: &[f32], y: &[f32]) -> f64 {
    let mut acc = [0f64; 4];
    let (xc, yc) = (x.chunks_exact(4), y.chunks_exact(4));
    let (xr, yr) = (xc.remainder(), yc.remainder());
    for (a, b) in xc.zip(yc) {
        for i in 0..4 {
            acc[i] += f64::from(a[i]) * f64::from(b[i]);
        }
    }
    let tail: f64 = xr.iter().zip(yr).map(|(&p, &q)| f64::from(p) * f64::from(q)).sum();
    acc[0] + acc[1] + acc[2] + acc[3] + tail
}

/// Unquantized f64 reference rows.
fn exact_rows(x: &[f32], w: &[f32], n: usize, k: usize, rows: &[usize]) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows.len() * n);
    for &i in rows {
        let xr = &x[i * k..(i + 1) * k];
        for j in 0..n {
            let wr = &w[j * k..(j + 1) * k];
            out.push(dot4(xr, wr) as f32);
        }
    }
    out
}

/// Elementwise over every given element, relative to each output row's own scale: |d − ref| ≤ 2^-8·|ref| (bf16
/// rounding) + 4e-3·rms(that row of ref): accumulation order, and Hopper's ~14-bit FP8 accumulation inside each
/// 128-wide K block, whose error scales with the block's partial sums (with per-group magnitudes up to 16× apart
/// they can exceed the row's result several times). A scale from the wrong block moves elements by tens of
/// percent of the row's rms. Rows are `n` wide.
fn check_rows_n(what: &str, n: usize, got_rows: &[f32], quant_ref: &[f32], exact: &[f32]) {
    assert_eq!(got_rows.len(), quant_ref.len(), "{what}: element count");
    for (r, (got, want)) in got_rows.chunks(n.max(1)).zip(quant_ref.chunks(n.max(1))).enumerate() {
        let rms = (want.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / want.len().max(1) as f64).sqrt();
        let atol = 4e-3 * rms as f32;
        for (c, (&g, &w)) in got.iter().zip(want).enumerate() {
            assert!(g.is_finite(), "{what}: row {r} col {c} is {g} (poison left or overflow)");
            let tol = w.abs() * 2f32.powi(-8) + atol;
            assert!((g - w).abs() <= tol, "{what}: row {r} col {c}: got {g}, reference {w} (tolerance {tol})");
        }
    }
    // The metric is a statistic of E4M3 rounding (≈ 6e-4 for these inputs): meaningful over enough elements only.
    if got_rows.len() >= MIN_METRIC_ELEMENTS {
        let diff = calc_diff(got_rows, exact);
        assert!(diff < 1e-3, "{what}: calc_diff vs unquantized reference {diff}");
    }
}

fn gather_rows(d: &[f32], n: usize, rows: &[usize]) -> Vec<f32> {
    rows.iter().flat_map(|&r| d[r * n..(r + 1) * n].iter().copied()).collect()
}

struct Dev {
    b: DeviceTensor<E4M3>,
    sb: DeviceTensor<f32>,
}

fn upload_weights(gpu: &Gpu, w: &Weights) -> Dev {
    Dev {
        b: DeviceTensor::from_host(gpu, &w.b, &[w.n, w.k]).unwrap(),
        sb: DeviceTensor::from_host(gpu, &w.sb, &[w.n.div_ceil(128), w.k.div_ceil(128)]).unwrap(),
    }
}

/// Runs `kernel` on (acts, weights) into a NaN-poisoned bf16 output and returns it as f32.
fn run_bf16(gpu: &Gpu, kernel: GemmKernel, x: &Acts, w: &Weights, dw: &Dev) -> Vec<f32> {
    run_bf16_with(gpu, &GemmOptions { kernel, ..Default::default() }, x, w, dw)
}

fn run_bf16_with(gpu: &Gpu, opts: &GemmOptions, x: &Acts, w: &Weights, dw: &Dev) -> Vec<f32> {
    let (m, n, k) = (x.m, w.n, w.k);
    let a = DeviceTensor::from_host(gpu, &x.a, &[m, k]).unwrap();
    let sa = DeviceTensor::from_host(gpu, &x.sa_mn, &[k.div_ceil(128), m.div_ceil(4) * 4]).unwrap();
    let mut out = DeviceTensor::from_host(gpu, &vec![bf16::from_bits(0xffff); m * n], &[m, n]).unwrap();
    fp8_gemm::fp8_gemm(gpu, &a, &sa, &dw.b, &dw.sb, &mut out, opts).unwrap();
    out.to_host(gpu).unwrap().iter().map(|v| v.to_f32()).collect()
}

/// The portable kernel everywhere, and the sm_90a kernel where it can run (elsewhere that part says SKIPPED, or
/// fails under `R1K_REQUIRE_GPU=1`).
fn kernels_for(gpu: &Gpu, test: &str) -> Vec<GemmKernel> {
    let mut kernels = vec![GemmKernel::Portable];
    if sm90_part(gpu, test) {
        kernels.push(GemmKernel::Sm90);
    }
    kernels
}

/// The sm_90a configuration the planner picks on this device, in words (what the emulated shapes are chosen to reach).
fn sm90_path(gpu: &Gpu, m: usize, n: usize, k: usize) -> String {
    let info = gpu.info();
    let shape = fp8_gemm::GemmShape { m, n, k };
    match fp8_gemm::choose_sm90_config(&shape, info.sm_count, info.max_shared_memory_per_block_optin) {
        Ok(c) => {
            let tiles = fp8_gemm::plan::num_tiles(&shape, c.block_m, c.block_n);
            let split = if c.k_splits > 1 {
                format!("split-K {}×{} K blocks", c.k_splits, c.kb_per_split)
            } else {
                "unsplit".into()
            };
            format!("block {}×{}, {} stages, {tiles} tiles on {} CTAs, {split}", c.block_m, c.block_n, c.stages, c.grid)
        }
        Err(e) => format!("no sm_90a plan ({e})"),
    }
}

fn sweep_shape(test: &str, real: (usize, usize), emulated: (usize, usize), seed: u64) {
    let Some(gpu) = r1_kernels::device::test_gpu(test) else { return };
    let describe = |ms: &[usize], (n, k): (usize, usize)| format!("m ∈ {ms:?}, n×k = {n}×{k}");
    let (ms, (n, k)) = emu_shrink_described(
        &gpu,
        test,
        ((&SWEEP_M[..], real), &describe(&SWEEP_M, real)),
        ((&SWEEP_M_EMU[..], emulated), &describe(&SWEEP_M_EMU, emulated)),
    );
    let w = weights(n, k, seed, ScaleFormat::F32);
    let dw = upload_weights(&gpu, &w);
    for (mi, &m) in ms.iter().enumerate() {
        if gpu.is_emulated() && gpu.info().is_hopper() && m > 0 {
            eprintln!("{test}: m={m} n={n} k={k}: Sm90 {}", sm90_path(&gpu, m, n, k));
        }
        let x = acts(m, k, seed * 31 + mi as u64, ScaleFormat::F32);
        let rows = rows_to_check(m, seed + m as u64);
        let quant_ref = fp8_gemm_rows(&x.a, &x.sa_rows, &w.b, &w.sb, m, n, k, &rows).unwrap();
        let exact = exact_rows(&x.x, &w.w, n, k, &rows);
        for kernel in kernels_for(&gpu, test) {
            let d = run_bf16(&gpu, kernel, &x, &w, &dw);
            assert_eq!(d.len(), m * n);
            let what = format!("{kernel:?} m={m} n={n} k={k}");
            check_rows_n(&what, n, &gather_rows(&d, n, &rows), &quant_ref, &exact);
            // Unchecked rows must at least be written (no poison left).
            assert!(d.iter().all(|v| v.is_finite()), "{what}: poison left in unchecked rows");
        }
    }
}

#[test]
fn gpu_sweep_2112x7168() {
    sweep_shape("gpu_sweep_2112x7168", DEEPSEEK_NK[0], DEEPSEEK_NK_EMU[0], 1);
}
#[test]
fn gpu_sweep_24576x1536() {
    sweep_shape("gpu_sweep_24576x1536", DEEPSEEK_NK[1], DEEPSEEK_NK_EMU[1], 2);
}
#[test]
fn gpu_sweep_32768x512() {
    sweep_shape("gpu_sweep_32768x512", DEEPSEEK_NK[2], DEEPSEEK_NK_EMU[2], 3);
}
#[test]
fn gpu_sweep_7168x16384() {
    sweep_shape("gpu_sweep_7168x16384", DEEPSEEK_NK[3], DEEPSEEK_NK_EMU[3], 4);
}
#[test]
fn gpu_sweep_4096x7168() {
    sweep_shape("gpu_sweep_4096x7168", DEEPSEEK_NK[4], DEEPSEEK_NK_EMU[4], 5);
}
#[test]
fn gpu_sweep_7168x2048() {
    sweep_shape("gpu_sweep_7168x2048", DEEPSEEK_NK[5], DEEPSEEK_NK_EMU[5], 6);
}
#[test]
fn gpu_sweep_llama_4096x4096() {
    sweep_shape("gpu_sweep_llama_4096x4096", LLAMA_NK[0], LLAMA_NK_EMU[0], 7);
}
#[test]
fn gpu_sweep_llama_14336x4096() {
    sweep_shape("gpu_sweep_llama_14336x4096", LLAMA_NK[1], LLAMA_NK_EMU[1], 8);
}

#[test]
fn gpu_ragged_tails_full_check() {
    let test = "gpu_ragged_tails_full_check";
    let Some(gpu) = r1_kernels::device::test_gpu(test) else { return };
    for (i, &(m, n, k)) in RAGGED.iter().enumerate() {
        let w = weights(n, k, 100 + i as u64, ScaleFormat::F32);
        let x = acts(m, k, 200 + i as u64, ScaleFormat::F32);
        let dw = upload_weights(&gpu, &w);
        let rows: Vec<usize> = (0..m).collect();
        let quant_ref = ref_gemm(&x.a, &x.sa_rows, &w.b, &w.sb, m, n, k).unwrap();
        let exact = exact_rows(&x.x, &w.w, n, k, &rows);
        for kernel in kernels_for(&gpu, test) {
            let d = if kernel == GemmKernel::Portable {
                expect_launched(&gpu, &["fp8_gemm_plain"], || run_bf16(&gpu, kernel, &x, &w, &dw))
            } else {
                run_bf16(&gpu, kernel, &x, &w, &dw)
            };
            check_rows_n(&format!("{kernel:?} ragged m={m} n={n} k={k}"), n, &d, &quant_ref, &exact);
        }
    }
}

#[test]
fn gpu_ue8m0_scales() {
    let Some(gpu) = r1_kernels::device::test_gpu("gpu_ue8m0_scales") else { return };
    let (m, n, k) = emu_shrink(&gpu, "gpu_ue8m0_scales", (129, 1024, 1536), (129, 320, 768));
    let w = weights(n, k, 9, ScaleFormat::Ue8m0);
    let x = acts(m, k, 10, ScaleFormat::Ue8m0);
    assert!(w.sb.iter().chain(&x.sa_rows).all(|s| s.to_bits() & 0x007f_ffff == 0));
    let dw = upload_weights(&gpu, &w);
    let rows: Vec<usize> = (0..m).collect();
    let quant_ref = ref_gemm(&x.a, &x.sa_rows, &w.b, &w.sb, m, n, k).unwrap();
    let exact = exact_rows(&x.x, &w.w, n, k, &rows);
    for kernel in kernels_for(&gpu, "gpu_ue8m0_scales") {
        let d = run_bf16(&gpu, kernel, &x, &w, &dw);
        check_rows_n(&format!("{kernel:?} ue8m0"), n, &d, &quant_ref, &exact);
    }
}

/// fp32 accumulate (`D = C + A·B`) on every path that implements it, each forced and named: the portable kernel,
/// the sm_90a kernel adding in its own epilogue (no split, block M 64 and 128), and split-K, where the kernel writes
/// partials and the reduction adds. 130 rows: two tile rows of block M 128 (the second ragged); k = 1568 is 13 K
/// blocks, past the 8-stage ring.
#[test]
fn gpu_accumulate_into_fp32() {
    let test = "gpu_accumulate_into_fp32";
    let Some(gpu) = r1_kernels::device::test_gpu(test) else { return };
    let (m, n, k) = (130, 264, 1568);
    let w = weights(n, k, 11, ScaleFormat::F32);
    let x = acts(m, k, 12, ScaleFormat::F32);
    let dw = upload_weights(&gpu, &w);
    let mut rng = SplitMix64::new(13);
    let c = uniform_vec(&mut rng, m * n, -2.0, 2.0);
    let quant_ref = ref_gemm(&x.a, &x.sa_rows, &w.b, &w.sb, m, n, k).unwrap();
    let a = DeviceTensor::from_host(&gpu, &x.a, &[m, k]).unwrap();
    let sa = DeviceTensor::from_host(&gpu, &x.sa_mn, &[k.div_ceil(128), m.div_ceil(4) * 4]).unwrap();
    let forced = |block_m, block_n, grid, k_splits| ForcedSm90 { block_m, block_n, grid, k_splits, stages: 0 };
    let mut paths = vec![(GemmOptions::default(), "portable", vec!["fp8_gemm_plain"])];
    paths[0].0.kernel = GemmKernel::Portable;
    if sm90_part(&gpu, test) {
        let sm90 = |f| GemmOptions { kernel: GemmKernel::Sm90, force_sm90: Some(f), ..Default::default() };
        paths.push((sm90(forced(128, 112, 2, 1)), "sm90 in-kernel add", vec!["fp8_gemm_sm90_m128n112"]));
        paths.push((sm90(forced(64, 160, 3, 1)), "sm90 in-kernel add", vec!["fp8_gemm_sm90_m64n160"]));
        let split = vec!["fp8_gemm_sm90_m128n64", "fp8_gemm_splitk_reduce"];
        paths.push((sm90(forced(128, 64, 5, 3)), "sm90 split-K, reduction adds", split));
    }
    for (opts, path, kernels) in paths {
        let what = format!("accumulate {path} {:?}", opts.force_sm90);
        eprintln!("{test}: {m}×{n}×{k} {what}");
        let mut d = DeviceTensor::from_host(&gpu, &c, &[m, n]).unwrap();
        expect_launched(&gpu, &kernels, || fp8_gemm::fp8_gemm_accumulate(&gpu, &a, &sa, &dw.b, &dw.sb, &mut d, &opts))
            .unwrap();
        check_accumulated(&what, n, &d.to_host(&gpu).unwrap(), &c, &quant_ref);
        // The same with a caller-owned workspace (NaN-filled, larger than needed): no allocation, same bits.
        let need = fp8_gemm::workspace_elements(&gpu, m, n, k, true, &opts).unwrap();
        assert_eq!(need > 0, opts.force_sm90.is_some_and(|f| f.k_splits > 1), "{what}: workspace {need}");
        let mut ws = DeviceTensor::from_host(&gpu, &vec![f32::NAN; need + 100], &[need + 100]).unwrap();
        let mut d2 = DeviceTensor::from_host(&gpu, &c, &[m, n]).unwrap();
        fp8_gemm::fp8_gemm_accumulate_with_workspace(&gpu, &a, &sa, &dw.b, &dw.sb, &mut d2, &mut ws, &opts).unwrap();
        let bits = |t: &DeviceTensor<f32>| t.to_host(&gpu).unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&d2), bits(&d), "{what}: caller workspace");
        if need > 0 {
            let mut short = DeviceTensor::<f32>::zeros(&gpu, &[need - 1]).unwrap();
            let mut d3 = DeviceTensor::from_host(&gpu, &c, &[m, n]).unwrap();
            let r =
                fp8_gemm::fp8_gemm_accumulate_with_workspace(&gpu, &a, &sa, &dw.b, &dw.sb, &mut d3, &mut short, &opts);
            assert!(matches!(r, Err(Error::Shape { arg: "workspace", .. })), "{what}: {r:?}");
            assert_eq!(d3.to_host(&gpu).unwrap(), c, "{what}: a refused call wrote its output");
        }
    }
}

/// fp32 output: no bf16 rounding, but Hopper's ~14-bit FP8 accumulation inside each 128-wide K block leaves errors
/// that scale with the block's partial sums (see [`check_rows_n`]): 1e-3 of the element plus 4e-3 of its row's rms.
fn check_accumulated(what: &str, n: usize, got: &[f32], c: &[f32], quant_ref: &[f32]) {
    for (r, want_row) in quant_ref.chunks(n).enumerate() {
        let rms = (want_row.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / n as f64).sqrt() as f32;
        for (j, &q) in want_row.iter().enumerate() {
            let i = r * n + j;
            let want = c[i] + q;
            let tol = 1e-3 * q.abs() + 4e-3 * rms + 1e-6 * c[i].abs();
            assert!((got[i] - want).abs() <= tol, "{what}: row {r} col {j}: {} vs {want} (C {})", got[i], c[i]);
        }
    }
}

#[test]
fn gpu_repeat_runs_are_bitwise_identical() {
    let test = "gpu_repeat_runs_are_bitwise_identical";
    let Some(gpu) = r1_kernels::device::test_gpu(test) else { return };
    // The second shape takes the split-K path on the sm_90a kernel (few tiles; on the emulator's 4 SMs, n = 128).
    let shapes =
        emu_shrink(&gpu, test, [(1000usize, 2112usize, 7168usize), (7, 2112, 7168)], [(520, 192, 640), (7, 128, 1152)]);
    for (i, &(m, n, k)) in shapes.iter().enumerate() {
        if gpu.info().is_hopper() {
            eprintln!("{test}: m={m} n={n} k={k}: Sm90 {}", sm90_path(&gpu, m, n, k));
        }
        let w = weights(n, k, 14 + i as u64, ScaleFormat::F32);
        let x = acts(m, k, 15 + i as u64, ScaleFormat::F32);
        let dw = upload_weights(&gpu, &w);
        for kernel in kernels_for(&gpu, test) {
            let first: Vec<u32> = run_bf16(&gpu, kernel, &x, &w, &dw).iter().map(|v| v.to_bits()).collect();
            for _ in 0..3 {
                let again: Vec<u32> = run_bf16(&gpu, kernel, &x, &w, &dw).iter().map(|v| v.to_bits()).collect();
                assert!(first == again, "{kernel:?} {m}×{n}×{k}: repeated runs differ");
            }
        }
    }
}

#[test]
fn gpu_k_zero_and_m_zero() {
    let Some(gpu) = r1_kernels::device::test_gpu("gpu_k_zero_and_m_zero") else { return };
    for kernel in kernels_for(&gpu, "gpu_k_zero_and_m_zero") {
        let opts = GemmOptions { kernel, ..Default::default() };
        // k = 0: D = 0 (bf16), C unchanged (accumulate).
        let a = DeviceTensor::<E4M3>::zeros(&gpu, &[3, 0]).unwrap();
        let sa = DeviceTensor::<f32>::zeros(&gpu, &[0, 4]).unwrap();
        let b = DeviceTensor::<E4M3>::zeros(&gpu, &[8, 0]).unwrap();
        let sb = DeviceTensor::<f32>::zeros(&gpu, &[1, 0]).unwrap();
        let mut out = DeviceTensor::from_host(&gpu, &[bf16::from_bits(0xffff); 24], &[3, 8]).unwrap();
        fp8_gemm::fp8_gemm(&gpu, &a, &sa, &b, &sb, &mut out, &opts).unwrap();
        assert!(out.to_host(&gpu).unwrap().iter().all(|v| v.to_f32() == 0.0));
        let mut c = DeviceTensor::from_host(&gpu, &[1.5f32; 24], &[3, 8]).unwrap();
        fp8_gemm::fp8_gemm_accumulate(&gpu, &a, &sa, &b, &sb, &mut c, &opts).unwrap();
        assert!(c.to_host(&gpu).unwrap().iter().all(|&v| v == 1.5));
        // m = 0: Ok, nothing written.
        let a = DeviceTensor::<E4M3>::zeros(&gpu, &[0, 256]).unwrap();
        let sa = DeviceTensor::<f32>::zeros(&gpu, &[2, 0]).unwrap();
        let b = DeviceTensor::<E4M3>::zeros(&gpu, &[128, 256]).unwrap();
        let sb = DeviceTensor::<f32>::zeros(&gpu, &[1, 2]).unwrap();
        let mut out = DeviceTensor::<bf16>::zeros(&gpu, &[0, 128]).unwrap();
        fp8_gemm::fp8_gemm(&gpu, &a, &sa, &b, &sb, &mut out, &opts).unwrap();
    }
}

#[test]
fn gpu_bad_inputs_are_rejected() {
    let Some(gpu) = r1_kernels::device::test_gpu("gpu_bad_inputs_are_rejected") else { return };
    let opts = GemmOptions::default();
    let t8 = |shape: &[usize]| DeviceTensor::<E4M3>::zeros(&gpu, shape).unwrap();
    let tf = |shape: &[usize]| DeviceTensor::<f32>::zeros(&gpu, shape).unwrap();
    let poison = vec![bf16::from_bits(0xffff); 4 * 128];
    let mut out = DeviceTensor::from_host(&gpu, &poison, &[4, 128]).unwrap();
    let (a, sa, b, sb) = (t8(&[4, 256]), tf(&[2, 4]), t8(&[128, 256]), tf(&[1, 2]));
    // Wrong scale layouts / shapes.
    let e = fp8_gemm::fp8_gemm(&gpu, &a, &tf(&[4, 2]), &b, &sb, &mut out, &opts).unwrap_err();
    assert!(matches!(e, Error::Shape { arg: "sa", .. }), "{e}");
    let e = fp8_gemm::fp8_gemm(&gpu, &a, &sa, &b, &tf(&[2, 1]), &mut out, &opts).unwrap_err();
    assert!(matches!(e, Error::Shape { arg: "sb", .. }), "{e}");
    let e = fp8_gemm::fp8_gemm(&gpu, &a, &sa, &t8(&[128, 384]), &tf(&[1, 3]), &mut out, &opts).unwrap_err();
    assert!(matches!(e, Error::Shape { arg: "b", .. }), "{e}");
    let mut wrong_out = DeviceTensor::<bf16>::zeros(&gpu, &[4, 120]).unwrap();
    assert!(fp8_gemm::fp8_gemm(&gpu, &a, &sa, &b, &sb, &mut wrong_out, &opts).is_err());
    // Misaligned k (TMA strides) and n.
    let e = fp8_gemm::fp8_gemm(&gpu, &t8(&[4, 250]), &sa, &t8(&[128, 250]), &sb, &mut out, &opts).unwrap_err();
    assert!(matches!(e, Error::Alignment { arg: "k", .. }), "{e}");
    let mut out_n = DeviceTensor::<bf16>::zeros(&gpu, &[4, 100]).unwrap();
    let e = fp8_gemm::fp8_gemm(&gpu, &a, &sa, &t8(&[100, 256]), &sb, &mut out_n, &opts).unwrap_err();
    assert!(matches!(e, Error::Alignment { arg: "n", .. }), "{e}");
    // Nothing was launched: the poisoned output is untouched.
    gpu.synchronize().unwrap();
    assert!(out.to_host(&gpu).unwrap().iter().all(|v| v.to_bits() == 0xffff));
}

/// The contract end to end: bf16 inputs quantized by the GPU quantizers (activation scales MN-major, exactly what
/// the GEMM reads), then the GEMM, checked against the CPU reference on the downloaded codes and scales.
#[test]
fn gpu_end_to_end_with_gpu_quantization() {
    let test = "gpu_end_to_end_with_gpu_quantization";
    let Some(gpu) = r1_kernels::device::test_gpu(test) else { return };
    let shapes = emu_shrink(
        &gpu,
        test,
        [(7usize, 2112usize, 7168usize), (129, 1536, 1024), (1000, 576, 2048)],
        [(7, 128, 1152), (129, 384, 512), (520, 320, 384)],
    );
    for &(m, n, k) in &shapes {
        let mut rng = SplitMix64::new((m * n + k) as u64);
        let xf = uniform_vec(&mut rng, m * k, -4.0, 4.0);
        let wf = uniform_vec(&mut rng, n * k, -0.05, 0.05);
        let xb: Vec<bf16> = xf.iter().map(|&v| bf16::from_f32(v)).collect();
        let wb: Vec<bf16> = wf.iter().map(|&v| bf16::from_f32(v)).collect();
        let x = DeviceTensor::from_host(&gpu, &xb, &[m, k]).unwrap();
        let w = DeviceTensor::from_host(&gpu, &wb, &[n, k]).unwrap();
        let (a, sa) = r1_kernels::quant::quantize_activations_new(&gpu, &x, ScaleFormat::F32).unwrap();
        let (b, sb) = r1_kernels::quant::quantize_weights_new(&gpu, &w, ScaleFormat::F32).unwrap();
        let (ah, sah, bh, sbh) =
            (a.to_host(&gpu).unwrap(), sa.to_host(&gpu).unwrap(), b.to_host(&gpu).unwrap(), sb.to_host(&gpu).unwrap());
        let sa_rows = scales_from_mn_major(&sah, m, k.div_ceil(128)).unwrap();
        let rows: Vec<usize> = (0..m).collect();
        let quant_ref = ref_gemm(&ah, &sa_rows, &bh, &sbh, m, n, k).unwrap();
        let xq: Vec<f32> = xb.iter().map(|v| v.to_f32()).collect();
        let wq: Vec<f32> = wb.iter().map(|v| v.to_f32()).collect();
        let exact = exact_rows(&xq, &wq, n, k, &rows);
        for kernel in kernels_for(&gpu, test) {
            let mut out = DeviceTensor::from_host(&gpu, &vec![bf16::from_bits(0xffff); m * n], &[m, n]).unwrap();
            let opts = GemmOptions { kernel, ..Default::default() };
            fp8_gemm::fp8_gemm(&gpu, &a, &sa, &b, &sb, &mut out, &opts).unwrap();
            let d: Vec<f32> = out.to_host(&gpu).unwrap().iter().map(|v| v.to_f32()).collect();
            check_rows_n(&format!("{kernel:?} end-to-end m={m} n={n} k={k}"), n, &d, &quant_ref, &exact);
        }
    }
}

/// Smallest n (a multiple of 8, up to 65536) for which the planner picks block `bm`×`bn` at this m, k and device, so
/// that every instantiated sm_90a kernel runs in the tests, not only the shapes the sweep happens to select.
fn n_for_block(m: usize, k: usize, bm: u32, bn: u32, sm_count: u32, smem: u32) -> Option<usize> {
    (1..=8192usize).map(|i| i * 8).find(|&n| {
        let c = fp8_gemm::choose_sm90_config(&fp8_gemm::GemmShape { m, n, k }, sm_count, smem).unwrap();
        (c.block_m, c.block_n) == (bm, bn)
    })
}

/// Runs one forced sm_90a configuration on a fresh ragged problem and checks every element of the output.
#[allow(clippy::too_many_arguments)]
fn check_forced(
    gpu: &Gpu,
    test: &str,
    kernel: GemmKernel,
    f: ForcedSm90,
    mnk: (usize, usize, usize),
    name: &str,
    seed: u64,
) {
    let (m, n, k) = mnk;
    let w = weights(n, k, seed, ScaleFormat::F32);
    let x = acts(m, k, seed + 100, ScaleFormat::F32);
    let dw = upload_weights(gpu, &w);
    let rows: Vec<usize> = (0..m).collect();
    let quant_ref = ref_gemm(&x.a, &x.sa_rows, &w.b, &w.sb, m, n, k).unwrap();
    let exact = exact_rows(&x.x, &w.w, n, k, &rows);
    let shape = fp8_gemm::GemmShape { m, n, k };
    let tiles = fp8_gemm::plan::num_tiles(&shape, f.block_m, f.block_n);
    let kb = shape.k_blocks();
    let cluster = if kernel == GemmKernel::Sm90Multicast { "mc2_" } else { "" };
    assert_eq!(name, format!("fp8_gemm_sm90_{cluster}m{}n{}", f.block_m, f.block_n), "the kernel this block selects");
    let what = format!("{name}: m={m} n={n} k={k} ({kb} K blocks), {tiles} tiles on {} CTAs, {f:?}", f.grid);
    eprintln!("{test}: {what}");
    let mut kernels = vec![name];
    if f.k_splits > 1 {
        kernels.push("fp8_gemm_splitk_reduce");
    }
    let opts = GemmOptions { kernel, force_sm90: Some(f), ..Default::default() };
    let d = expect_launched(gpu, &kernels, || run_bf16_with(gpu, &opts, &x, &w, &dw));
    check_rows_n(&what, n, &d, &quant_ref, &exact);
}

/// Every `fp8_gemm_sm90_m{BM}n{BN}` instantiation with a forced configuration (the planner alone never selects
/// some of them, and what it selects depends on the SM count), each fully checked on a ragged problem (m, n not
/// multiples of the block, k % 128 = 16) with more K blocks than ring stages (the ring wraps inside a tile and again
/// across tiles) and three tiles per persistent CTA; then the same with K split in two (the partial-tile output mode
/// and the ordered reduction, for every block shape), and the grouped tile order with a partial last group
/// (10 tile rows, groups of 8). Named gpu_* so a single-threaded run does it last: a trap here must not poison
/// the context for the sweeps.
#[test]
fn gpu_sm90_every_instantiation_forced() {
    let test = "gpu_sm90_every_instantiation_forced";
    let Some(gpu) = r1_kernels::device::test_hopper(test) else { return };
    let smem = gpu.info().max_shared_memory_per_block_optin;
    let instantiations = [
        (64, 64, "fp8_gemm_sm90_m64n64"),
        (64, 112, "fp8_gemm_sm90_m64n112"),
        (64, 128, "fp8_gemm_sm90_m64n128"),
        (64, 160, "fp8_gemm_sm90_m64n160"),
        (128, 64, "fp8_gemm_sm90_m128n64"),
        (128, 112, "fp8_gemm_sm90_m128n112"),
        (128, 128, "fp8_gemm_sm90_m128n128"),
        (128, 160, "fp8_gemm_sm90_m128n160"),
    ];
    for (i, (bm, bn, name)) in instantiations.into_iter().enumerate() {
        let stages = fp8_gemm::plan::pick_stages(bm, bn, smem).expect("a ring fits");
        let mnk = (bm as usize * 3 / 2 + 3, 2 * bn as usize + 24, 128 * (stages as usize + 1) + 16);
        let f = ForcedSm90 { block_m: bm, block_n: bn, grid: 2, k_splits: 1, stages: 0 };
        check_forced(&gpu, test, GemmKernel::Sm90, f, mnk, name, 300 + i as u64);
        let f = ForcedSm90 { grid: 5, k_splits: 2, ..f };
        check_forced(&gpu, test, GemmKernel::Sm90, f, mnk, name, 1300 + i as u64);
    }
    let f = ForcedSm90 { block_m: 64, block_n: 64, grid: 3, k_splits: 1, stages: 0 };
    check_forced(&gpu, test, GemmKernel::Sm90, f, (635, 72, 256), "fp8_gemm_sm90_m64n64", 399);
}

// ---- CPU checks of what the tests above rely on ------------------------------------------------------------------

#[test]
fn cpu_reference_agrees_with_scale_layout_roundtrip() {
    let (m, n, k) = (9, 136, 272);
    let w = weights(n, k, 31, ScaleFormat::F32);
    let x = acts(m, k, 32, ScaleFormat::F32);
    let back = scales_from_mn_major(&x.sa_mn, m, k.div_ceil(128)).unwrap();
    assert_eq!(back, x.sa_rows);
    let d = ref_gemm(&x.a, &back, &w.b, &w.sb, m, n, k).unwrap();
    let exact = exact_rows(&x.x, &w.w, n, k, &(0..m).collect::<Vec<_>>());
    let diff = calc_diff(&d, &exact);
    eprintln!("calc_diff of the quantized reference vs unquantized: {diff:.3e}");
    assert!(diff < 1e-3, "quantization error alone exceeds the metric");
    // The bf16-rounded reference passes the same checks the GPU output must pass.
    let rounded: Vec<f32> = d.iter().map(|v| bf16::from_f32(*v).to_f32()).collect();
    check_rows_n("bf16-rounded reference", n, &rounded, &d, &exact);
}

/// The GPU tests' thresholds are achievable: the bf16-rounded reference passes them for the ragged cases and the
/// small-m rows of two sweep shapes, with the same seeds and inputs.
#[test]
fn cpu_gpu_thresholds_are_achievable() {
    let mut cases: Vec<(usize, usize, usize, u64, u64)> =
        RAGGED.iter().enumerate().map(|(i, &(m, n, k))| (m, n, k, 100 + i as u64, 200 + i as u64)).collect();
    cases.push((7, 2112, 7168, 1, 31 + 2));
    cases.push((7, 4096, 4096, 7, 7 * 31 + 2));
    for (m, n, k, ws, xs) in cases {
        let w = weights(n, k, ws, ScaleFormat::F32);
        let x = acts(m, k, xs, ScaleFormat::F32);
        let rows: Vec<usize> = (0..m).collect();
        let d = ref_gemm(&x.a, &x.sa_rows, &w.b, &w.sb, m, n, k).unwrap();
        let exact = exact_rows(&x.x, &w.w, n, k, &rows);
        let rounded: Vec<f32> = d.iter().map(|v| bf16::from_f32(*v).to_f32()).collect();
        eprintln!("{m}×{n}×{k}: calc_diff {:.2e} over {} elements", calc_diff(&rounded, &exact), rounded.len());
        check_rows_n(&format!("bf16 reference {m}×{n}×{k}"), n, &rounded, &d, &exact);
    }
}

#[test]
fn cpu_every_block_shape_is_reachable() {
    for sms in [132u32, 114, 78, 1] {
        for &(m, bm) in &[(5usize, 64u32), (200, 128)] {
            for bn in fp8_gemm::plan::SM90_BLOCK_N {
                let n = n_for_block(m, 400, bm, bn, sms, fp8_gemm::plan::SM90_SMEM_LIMIT);
                assert!(n.is_some(), "no n selects block {bm}x{bn} for m={m} on {sms} SMs");
            }
        }
    }
}

#[test]
fn cpu_plan_rejects_what_the_kernels_cannot_do() {
    let info = r1_kernels::DeviceInfo {
        ordinal: 0,
        compute_capability: (9, 0),
        sm_count: 132,
        max_shared_memory_per_block_optin: 232_448,
        l2_cache_bytes: 50 << 20,
        emulated: false,
    };
    for &(n, k) in DEEPSEEK_NK.iter().chain(&LLAMA_NK) {
        for &m in &SWEEP_M {
            let kb = k.div_ceil(128);
            let p = fp8_gemm::plan(
                &[m, k],
                &[kb, m.div_ceil(4) * 4],
                &[n, k],
                &[n.div_ceil(128), kb],
                &[m, n],
                false,
                GemmKernel::Auto,
                &info,
            )
            .unwrap();
            if m == 0 {
                assert_eq!(p.resolved, fp8_gemm::Resolved::Empty);
            } else {
                assert!(matches!(p.resolved, fp8_gemm::Resolved::Sm90(_)), "{m}×{n}×{k}");
            }
        }
    }
    let e = fp8_gemm::plan(&[4, 100], &[1, 4], &[8, 100], &[1, 1], &[4, 8], false, GemmKernel::Auto, &info);
    assert!(matches!(e, Err(Error::Alignment { arg: "k", required: 16, got: 100 })));
}

/// Smallest n (a multiple of 8) for which the multicast planner picks block N `bn` at this m, k and device.
fn n_for_mc2_block(m: usize, k: usize, bn: u32, sm_count: u32, smem: u32) -> Option<usize> {
    (1..=8192usize).map(|i| i * 8).find(|&n| {
        let c = fp8_gemm::plan::choose_sm90_mc2_config(&fp8_gemm::GemmShape { m, n, k }, sm_count, smem).unwrap();
        c.block_n == bn
    })
}

#[test]
fn cpu_every_multicast_block_shape_is_reachable() {
    for sms in [132u32, 114, 78] {
        for m in [1usize, 300, 520] {
            for bn in fp8_gemm::plan::SM90_MC2_BLOCK_N {
                assert!(n_for_mc2_block(m, 400, bn, sms, fp8_gemm::plan::SM90_SMEM_LIMIT).is_some(), "{m} {bn} {sms}");
            }
        }
    }
}

/// The opt-in 2-CTA cluster kernels (`GemmKernel::Sm90Multicast`, `fp8_gemm_sm90_mc2_*`): every entry point fully
/// checked on ragged shapes with odd and even tile-row counts (an odd count leaves rank 1 of the last pair without
/// a tile), the m = 1000 / 4096 rows of three sweep shapes, accumulate mode, and bitwise-identical repeats. Named
/// gpu_* so a single-threaded run does it last: a trap or a cluster-launch failure must not poison the context
/// for the other tests.
#[test]
fn gpu_multicast_sweep() {
    let Some(gpu) = r1_kernels::device::test_hopper("gpu_multicast_sweep") else { return };
    let (sms, smem) = (gpu.info().sm_count, gpu.info().max_shared_memory_per_block_optin);
    let kernel = GemmKernel::Sm90Multicast;
    // Forced: one cluster walks all 6 tile pairs (3 tile rows: the last pair's rank 1 has no tile) with more K
    // blocks than stages, so the ring wraps inside and across pairs; every element checked.
    for (i, (bn, name)) in
        [(128, "fp8_gemm_sm90_mc2_m128n128"), (160, "fp8_gemm_sm90_mc2_m128n160")].into_iter().enumerate()
    {
        let stages = fp8_gemm::plan::pick_stages(128, bn, smem).expect("a ring fits");
        let f = ForcedSm90 { block_m: 128, block_n: bn, grid: 2, k_splits: 1, stages: 0 };
        let mnk = (300, 2 * bn as usize + 24, 128 * (stages as usize + 1) + 16);
        check_forced(&gpu, "gpu_multicast_sweep", kernel, f, mnk, name, 650 + i as u64);
    }
    let k = 400;
    for (i, bn) in fp8_gemm::plan::SM90_MC2_BLOCK_N.into_iter().enumerate() {
        for (j, m) in [1usize, 129, 300, 520].into_iter().enumerate() {
            let n = n_for_mc2_block(m, k, bn, sms, smem).expect("a shape for every multicast block");
            let seed = 700 + 10 * i as u64 + j as u64;
            let w = weights(n, k, seed, ScaleFormat::F32);
            let x = acts(m, k, seed + 100, ScaleFormat::F32);
            let dw = upload_weights(&gpu, &w);
            let rows: Vec<usize> = (0..m).collect();
            let quant_ref = ref_gemm(&x.a, &x.sa_rows, &w.b, &w.sb, m, n, k).unwrap();
            let exact = exact_rows(&x.x, &w.w, n, k, &rows);
            let d = run_bf16(&gpu, kernel, &x, &w, &dw);
            check_rows_n(&format!("Sm90Multicast block 128x{bn}: m={m} n={n} k={k}"), n, &d, &quant_ref, &exact);
        }
    }
    // Emulated: smaller n·k, and m = 488 (4 tile rows, an even count with 1000's ragged 104-row tail) and 1280
    // (10 tile rows: 5 tile-row pairs, more than one scheduler group of 4 pairs) for 1000 (8) and 4096 (32).
    let (shapes, ms) = emu_shrink(
        &gpu,
        "gpu_multicast_sweep (sweep shapes)",
        ([DEEPSEEK_NK[0], DEEPSEEK_NK[4], LLAMA_NK[0]], [1000usize, 4096]),
        ([(192, 640), (256, 384), (256, 256)], [488, 1280]),
    );
    for (si, &(n, k)) in shapes.iter().enumerate() {
        let w = weights(n, k, 800 + si as u64, ScaleFormat::F32);
        let dw = upload_weights(&gpu, &w);
        for (mi, m) in ms.into_iter().enumerate() {
            let x = acts(m, k, 900 + si as u64 + m as u64, ScaleFormat::F32);
            let rows = rows_to_check(m, 77 + m as u64);
            let quant_ref = fp8_gemm_rows(&x.a, &x.sa_rows, &w.b, &w.sb, m, n, k, &rows).unwrap();
            let exact = exact_rows(&x.x, &w.w, n, k, &rows);
            let d = run_bf16(&gpu, kernel, &x, &w, &dw);
            let what = format!("Sm90Multicast m={m} n={n} k={k}");
            check_rows_n(&what, n, &gather_rows(&d, n, &rows), &quant_ref, &exact);
            assert!(d.iter().all(|v| v.is_finite()), "{what}: poison left in unchecked rows");
            if mi == 0 {
                let first: Vec<u32> = d.iter().map(|v| v.to_bits()).collect();
                let again: Vec<u32> = run_bf16(&gpu, kernel, &x, &w, &dw).iter().map(|v| v.to_bits()).collect();
                assert!(first == again, "{what}: repeated runs differ");
            }
        }
    }
    // Accumulate mode (fp32 D = C + A·B) on a shape with an odd tile-row count.
    let (m, n, k) = emu_shrink(&gpu, "gpu_multicast_sweep (accumulate)", (300, 520, 1568), (300, 264, 1056));
    let w = weights(n, k, 811, ScaleFormat::F32);
    let x = acts(m, k, 812, ScaleFormat::F32);
    let dw = upload_weights(&gpu, &w);
    let mut rng = SplitMix64::new(813);
    let c = uniform_vec(&mut rng, m * n, -2.0, 2.0);
    let quant_ref = ref_gemm(&x.a, &x.sa_rows, &w.b, &w.sb, m, n, k).unwrap();
    let a = DeviceTensor::from_host(&gpu, &x.a, &[m, k]).unwrap();
    let sa = DeviceTensor::from_host(&gpu, &x.sa_mn, &[k.div_ceil(128), m.div_ceil(4) * 4]).unwrap();
    let mut d = DeviceTensor::from_host(&gpu, &c, &[m, n]).unwrap();
    let opts = GemmOptions { kernel, ..Default::default() };
    fp8_gemm::fp8_gemm_accumulate(&gpu, &a, &sa, &dw.b, &dw.sb, &mut d, &opts).unwrap();
    check_accumulated("Sm90Multicast accumulate", n, &d.to_host(&gpu).unwrap(), &c, &quant_ref);
}

#[test]
fn cpu_multicast_is_opt_in_and_hopper_only() {
    let mut info = r1_kernels::DeviceInfo {
        ordinal: 0,
        compute_capability: (9, 0),
        sm_count: 132,
        max_shared_memory_per_block_optin: 232_448,
        l2_cache_bytes: 50 << 20,
        emulated: false,
    };
    let (m, n, k) = (4096usize, 7168usize, 7168usize);
    let kb = k.div_ceil(128);
    let shapes = ([m, k], [kb, m], [n, k], [n.div_ceil(128), kb], [m, n]);
    let plan = |kernel, info: &r1_kernels::DeviceInfo| {
        fp8_gemm::plan(&shapes.0, &shapes.1, &shapes.2, &shapes.3, &shapes.4, false, kernel, info)
    };
    let fp8_gemm::Resolved::Sm90(auto) = plan(GemmKernel::Auto, &info).unwrap().resolved else { panic!("not sm90") };
    assert_eq!(auto.cluster_m, 1);
    let fp8_gemm::Resolved::Sm90(mc) = plan(GemmKernel::Sm90Multicast, &info).unwrap().resolved else { panic!() };
    assert_eq!((mc.cluster_m, mc.block_m, mc.k_splits, mc.grid % 2), (2, 128, 1, 0));
    assert!(mc.kernel_name().unwrap().starts_with("fp8_gemm_sm90_mc2_m128n"));
    let [_, tb, _] = fp8_gemm::sm90::gemm_tmas(&fp8_gemm::GemmShape { m, n, k }, &mc);
    assert_eq!(tb.box_rows, mc.block_n / 2);
    info.compute_capability = (8, 0);
    assert!(matches!(plan(GemmKernel::Sm90Multicast, &info), Err(Error::UnsupportedDevice { .. })));
}

/// Hopper's wgmma accumulates FP8 products with about 14 significant bits (truncating), so a long K must be
/// promoted to fp32 every 128 elements. All-positive data with uniform scales (every 128-group and 128×128 block
/// has amax 1) makes the truncation bias add up: promoted, the error stays near 2e-3; accumulated over the whole K
/// inside wgmma it reaches several percent. On the emulator in `hopper` numerics this separates a kernel without
/// the promotion step from a correct one (emu/mutants.txt: no-promotion); on a GPU it checks the real thing.
#[test]
fn gpu_long_k_promotion() {
    let Some(gpu) = r1_kernels::device::test_hopper("gpu_long_k_promotion") else { return };
    let (m, n, k) = (256usize, 256usize, 2048usize);
    let mut rng = SplitMix64::new(2048);
    let mut positive = |len: usize| -> Vec<f32> {
        (0..len).map(|i| if i % 128 == 0 { 1.0 } else { rng.next_f32() * 0.75 + 0.25 }).collect()
    };
    let x = positive(m * k);
    let w = positive(n * k);
    let (a, sa_rows) = quantize_per_token_group(&x, m, k, 128).unwrap();
    let (b, sb) = quantize_per_block(&w, n, k, 128).unwrap();
    assert!(sa_rows.iter().chain(&sb).all(|&s| s == sa_rows[0]), "uniform scales expected");
    let sa_mn = scales_to_mn_major(&sa_rows, m, k / 128).unwrap();
    let reference = ref_gemm(&a, &sa_rows, &b, &sb, m, n, k).unwrap();
    let ad = DeviceTensor::from_host(&gpu, &a, &[m, k]).unwrap();
    let sad = DeviceTensor::from_host(&gpu, &sa_mn, &[k / 128, m.div_ceil(4) * 4]).unwrap();
    let bd = DeviceTensor::from_host(&gpu, &b, &[n, k]).unwrap();
    let sbd = DeviceTensor::from_host(&gpu, &sb, &[n / 128, k / 128]).unwrap();
    let mut out = DeviceTensor::from_host(&gpu, &vec![bf16::from_bits(0xffff); m * n], &[m, n]).unwrap();
    let opts = GemmOptions { kernel: GemmKernel::Sm90, ..Default::default() };
    fp8_gemm::fp8_gemm(&gpu, &ad, &sad, &bd, &sbd, &mut out, &opts).unwrap();
    let got: Vec<f32> = out.to_host(&gpu).unwrap().iter().map(|v| v.to_f32()).collect();
    let mut worst = 0f32;
    for (i, (&g, &r)) in got.iter().zip(&reference).enumerate() {
        let rel = (g - r).abs() / r.abs();
        worst = worst.max(rel);
        // 2e-3 of accumulation error plus bf16 rounding (2^-9) fit well inside 2^-7.
        assert!(rel <= 2f32.powi(-7), "element {i}: got {g}, reference {r}: relative error {rel:.2e}");
    }
    eprintln!("gpu_long_k_promotion: worst relative error {worst:.2e} over {m}×{n}×{k}");
}
