//! MLA decode: CPU checks of the reference, scheduler and FP8 cache format, and GPU checks (skipped without a GPU) of
//! the plain and sm_90a kernels against the reference over the sweep.

use r1_kernels::mla::{self, Backend, MlaOptions, MlaPlan, MlaWorkspace, SplitMode};
use r1_kernels::reference::mla::{
    dequantize_kv_cache_fp8, mla_decode as ref_decode, quantize_kv_cache_fp8, MlaConfig, D_QK, D_V, FP8_TOKEN_BYTES,
};
use r1_kernels::rng::SplitMix64;
use r1_kernels::{bf16, DeviceTensor, Error, Gpu};

mod common;
use common::{block_magnitude, emu_shrink, expect_launched, int_in, shuffle};

/// One randomly generated problem: bf16-representable values, a permuted block table whose unused entries are huge,
/// and NaN in tail tokens and unused pages.
#[derive(Clone)]
struct Case {
    cfg: MlaConfig,
    seqlens: Vec<i32>,
    q: Vec<f32>,
    cache: Vec<f32>,
    num_blocks: usize,
    max_blocks: usize,
    table: Vec<i32>,
}

fn bf16_round(x: f32) -> f32 {
    bf16::from_f32(x).to_f32()
}

fn make_case(seed: u64, batch: usize, s_q: usize, heads: usize, page: usize, seqlens: Vec<i32>, causal: bool) -> Case {
    assert_eq!(seqlens.len(), batch);
    let mut rng = SplitMix64::new(seed);
    let pages: Vec<usize> = seqlens.iter().map(|&l| (l as usize).div_ceil(page)).collect();
    let max_blocks = pages.iter().copied().max().unwrap_or(0) + 1;
    let used: usize = pages.iter().sum();
    let num_blocks = used + 3; // a few pages nobody owns
    let mut perm: Vec<i32> = (0..num_blocks as i32).collect();
    shuffle(&mut rng, &mut perm);
    let mut table = vec![0i32; batch * max_blocks];
    let mut next = 0;
    for b in 0..batch {
        for j in 0..max_blocks {
            table[b * max_blocks + j] = if j < pages[b] {
                next += 1;
                perm[next - 1]
            } else {
                i32::MAX - int_in(&mut rng, 0..1000)
            };
        }
    }
    // Every (token, 128-column group) of the latent (and the 64 RoPE columns) has its own magnitude, a random power
    // of two in [2^-2, 2^2]: token norms and FP8 group scales differ by up to 16×, so a scale, token or page taken
    // from the wrong place is an O(1) error.
    let mut cache = vec![f32::NAN; num_blocks * page * D_QK];
    for b in 0..batch {
        for t in 0..seqlens[b] as usize {
            let blk = table[b * max_blocks + t / page] as usize;
            let off = (blk * page + t % page) * D_QK;
            for group in cache[off..off + D_QK].chunks_mut(128) {
                let magnitude = block_magnitude(&mut rng);
                for x in group {
                    *x = bf16_round(rng.uniform(-1.0, 1.0) * magnitude);
                }
            }
        }
    }
    let cfg = MlaConfig { batch, s_q, heads, page_size: page, softmax_scale: 1.5 / (D_QK as f32).sqrt(), causal };
    let q = (0..cfg.q_len()).map(|_| bf16_round(rng.uniform(-2.0, 2.0))).collect();
    Case { cfg, seqlens, q, cache, num_blocks, max_blocks, table }
}

/// The reference, one thread per group of sequences (the big sweeps need it).
/// The reference's log-sum-exp per (batch, query row, head), with the absolute error each row may carry from the
/// scores' fp32 accumulation.
struct RefLse {
    lse: Vec<f32>,
    /// `2^-18 · softmax_scale · ‖q_row‖₂ · max over the sequence's keys of ‖k‖₂` (Cauchy–Schwarz bounds every
    /// score's Σ|q_i·k_i| by it). Hopper's wgmma truncates its fused fp32 sums (36 chained 16-product steps over the
    /// 576 score columns), so a score that cancels to near 0 keeps an absolute error proportional to the terms it
    /// summed, not to itself: seen on an H200, a single-key row with lse 0.00305 off by 1.1e-6 (seed 332, the
    /// emulator's hopper numerics reproduce it bit for bit), which a bound relative to |lse| alone rejects.
    slack: Vec<f32>,
}

impl RefLse {
    fn part(&self, rows: std::ops::Range<usize>) -> RefLse {
        RefLse { lse: self.lse[rows.clone()].to_vec(), slack: self.slack[rows].to_vec() }
    }
}

impl std::ops::Deref for RefLse {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.lse
    }
}

fn reference(case: &Case, cache: &[f32]) -> (Vec<f32>, RefLse) {
    let c = &case.cfg;
    let per_o = c.s_q * c.heads * D_V;
    let per_l = c.heads * c.s_q;
    let per_q = c.s_q * c.heads * D_QK;
    let mut o = vec![0f32; c.o_len()];
    let mut lse = vec![0f32; c.lse_len()];
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(c.batch.max(1));
    let chunk = c.batch.div_ceil(threads.max(1)).max(1);
    std::thread::scope(|s| {
        for ((ob, lb), b0) in o.chunks_mut(per_o * chunk).zip(lse.chunks_mut(per_l * chunk)).zip((0..).step_by(chunk)) {
            s.spawn(move || {
                let nb = ob.len() / per_o;
                let sub = MlaConfig { batch: nb, ..*c };
                let table = &case.table[b0 * case.max_blocks..(b0 + nb) * case.max_blocks];
                let (o1, l1) =
                    ref_decode(&case.q[b0 * per_q..(b0 + nb) * per_q], cache, table, &case.seqlens[b0..b0 + nb], &sub)
                        .expect("reference");
                ob.copy_from_slice(&o1);
                lb.copy_from_slice(&l1);
            });
        }
    });
    let norm = |v: &[f32]| v.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
    let slack = (0..c.batch)
        .flat_map(|b| {
            let page = c.page_size;
            let len = case.seqlens[b].max(0) as usize;
            let max_key = (0..len)
                .map(|t| {
                    let blk = case.table[b * case.max_blocks + t / page] as usize;
                    norm(&cache[(blk * page + t % page) * D_QK..][..D_QK])
                })
                .fold(0f64, f64::max);
            (0..c.s_q * c.heads).map(move |r| (b, r, max_key))
        })
        .map(|(b, r, max_key)| {
            let q = &case.q[(b * c.s_q * c.heads + r) * D_QK..][..D_QK];
            (2f64.powi(-18) * f64::from(c.softmax_scale) * norm(q) * max_key) as f32
        })
        .collect();
    (o, RefLse { lse, slack })
}

/// Bound on |o − reference| relative to each output row's own scale (row = one (sequence, query, head): D_V values):
/// `2^-7·|ref| + ROW_REL·rms(ref row)`, elementwise over every element. The sm_90a kernels feed P to their bf16 MMAs
/// rounded to bf16 (relative error up to 2^-9 per weight) while normalizing with the fp32 row sum, and round o to
/// bf16: both are a small fraction of the row's rms (few keys: one rounded weight of ~0.5 moves an element by
/// 2^-10·|v|, under 1 % of the row's rms; many keys: the rounding errors average out as o does). An error confined
/// to one 64-token tile of a 700-token sequence moves o by several percent of its rms.
const ROW_REL: f32 = 0.04;

/// Bound on the rms of a row's error relative to the row's rms: rounding errors are small on average, so an error
/// spread over a row (a wrong tile, page or scale) stands out even where each element stays inside [`ROW_REL`].
const ROW_RMS_REL: f64 = 0.01;

fn check_close(what: &str, _backend: Backend, got_o: &[f32], got_lse: &[f32], want_o: &[f32], want_lse: &RefLse) {
    assert_eq!(got_o.len(), want_o.len());
    assert_eq!(got_lse.len(), want_lse.len());
    let (mut worst, mut worst_rms) = (0f32, 0f64);
    for (r, (got, want)) in got_o.chunks(D_V).zip(want_o.chunks(D_V)).enumerate() {
        if want.iter().any(|w| !w.is_finite()) {
            for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
                assert!(g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()), "{what}: o row {r}[{i}] {g} vs {w}");
            }
            continue;
        }
        let rms = (want.iter().map(|&w| f64::from(w).powi(2)).sum::<f64>() / D_V as f64).sqrt() as f32;
        let err_rms = (got.iter().zip(want).map(|(&g, &w)| f64::from(g - w).powi(2)).sum::<f64>() / D_V as f64).sqrt();
        assert!(
            err_rms <= ROW_RMS_REL * f64::from(rms),
            "{what}: o row {r}: rms error {err_rms:.3e} against row rms {rms:.3e}"
        );
        if rms > 0.0 {
            worst_rms = worst_rms.max(err_rms / f64::from(rms));
        }
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            let err = (g - w).abs();
            let tol = 2f32.powi(-7) * w.abs() + ROW_REL * rms;
            assert!(err <= tol, "{what}: o row {r}[{i}] {g} vs {w} (row rms {rms:.3e}, tolerance {tol:.3e})");
            if rms > 0.0 {
                worst = worst.max(err / rms);
            }
        }
    }
    if std::env::var("R1K_TEST_VERBOSE").is_ok() {
        eprintln!("{what}: worst |o error| / row rms {worst:.2e}, worst row rms error / row rms {worst_rms:.2e}");
    }
    for (i, ((&g, &w), &slack)) in got_lse.iter().zip(&want_lse.lse).zip(&want_lse.slack).enumerate() {
        if !w.is_finite() || !g.is_finite() {
            assert!(g == w || (g.is_nan() && w.is_nan()), "{what}: lse[{i}] {g} vs {w}");
            continue;
        }
        let err = (g - w).abs();
        let tol = 1e-6 + 8.0 / 65536.0 * w.abs() + slack;
        assert!(err <= tol, "{what}: lse[{i}] {g} vs {w} (tolerance {tol:.3e})");
    }
}

struct DeviceCase {
    q: DeviceTensor<bf16>,
    cache: DeviceTensor<bf16>,
    cache_fp8: DeviceTensor<u8>,
    table: DeviceTensor<i32>,
    seqlens: DeviceTensor<i32>,
}

fn upload(gpu: &Gpu, case: &Case, fp8: Option<&[u8]>) -> DeviceCase {
    let page = case.cfg.page_size;
    let qb: Vec<bf16> = case.q.iter().map(|&x| bf16::from_f32(x)).collect();
    let cb: Vec<bf16> = case.cache.iter().map(|&x| bf16::from_f32(x)).collect();
    let c = &case.cfg;
    let f8 = fp8.unwrap_or(&[]);
    DeviceCase {
        q: DeviceTensor::from_host(gpu, &qb, &[c.batch, c.s_q, c.heads, D_QK]).unwrap(),
        cache: DeviceTensor::from_host(gpu, &cb, &[case.num_blocks, page, D_QK]).unwrap(),
        cache_fp8: DeviceTensor::from_host(gpu, f8, &[if fp8.is_some() { case.num_blocks } else { 0 }, page, 656])
            .unwrap(),
        table: DeviceTensor::from_host(gpu, &case.table, &[c.batch, case.max_blocks]).unwrap(),
        seqlens: DeviceTensor::from_host(gpu, &case.seqlens, &[c.batch]).unwrap(),
    }
}

/// Runs the GPU decode (poisoned outputs) and returns (o as f32, lse).
fn run_gpu(
    gpu: &Gpu,
    case: &Case,
    d: &DeviceCase,
    mode: SplitMode,
    backend: Backend,
    fp8: bool,
) -> (Vec<f32>, Vec<f32>) {
    let c = &case.cfg;
    let plan = MlaPlan::new(gpu, &case.seqlens, c.page_size, mode).unwrap();
    let mut ws = MlaWorkspace::new(gpu, &plan, c).unwrap();
    let mut out = DeviceTensor::<bf16>::zeros(gpu, &[c.batch, c.s_q, c.heads, D_V]).unwrap();
    let mut lse = DeviceTensor::<f32>::zeros(gpu, &[c.batch, c.heads, c.s_q]).unwrap();
    out.copy_from_host(gpu, &vec![bf16::NAN; c.o_len()]).unwrap();
    lse.copy_from_host(gpu, &vec![f32::NAN; c.lse_len()]).unwrap();
    let opts = MlaOptions { block_table_host: Some(&case.table), backend };
    // Nothing launches when no sequence has a key.
    let kernels = [decode_kernel(backend.resolve(gpu, c.page_size), c.s_q * c.heads, fp8), "mla_combine"];
    let kernels: &[&str] = if case.seqlens.iter().all(|&l| l == 0) { &[] } else { &kernels };
    expect_launched(gpu, kernels, || {
        if fp8 {
            mla::mla_decode_fp8(
                gpu,
                &d.q,
                &d.cache_fp8,
                &d.table,
                &d.seqlens,
                &plan,
                c,
                &mut out,
                &mut lse,
                &mut ws,
                &opts,
            )
        } else {
            mla::mla_decode(gpu, &d.q, &d.cache, &d.table, &d.seqlens, &plan, c, &mut out, &mut lse, &mut ws, &opts)
        }
    })
    .unwrap();
    let o = out.to_host(gpu).unwrap().iter().map(|x| x.to_f32()).collect();
    (o, lse.to_host(gpu).unwrap())
}

/// The decode kernel a backend launches for `rows` = s_q·h query rows per sequence (src/mla/sm90.rs's selection,
/// restated so a test that means to cover a kernel fails when the launch goes elsewhere).
/// The kernel a resolved `backend` launches (see [`Backend::resolve`]).
fn decode_kernel(backend: Backend, rows: usize, fp8: bool) -> &'static str {
    match (backend, fp8) {
        (Backend::Auto, _) => panic!("decode_kernel takes a resolved backend"),
        (Backend::Portable, false) => "mla_decode_plain_bf16",
        (Backend::Portable, true) => "mla_decode_plain_fp8",
        (Backend::HopperWide, false) => "mla_decode_sm90_bf16",
        (Backend::HopperWide, true) => "mla_decode_sm90_fp8",
        (Backend::Hopper, _) => match (rows, fp8) {
            (0..=16, false) => "mla_decode_sm90_narrow16_bf16",
            (0..=16, true) => "mla_decode_sm90_narrow16_fp8",
            (17..=32, false) => "mla_decode_sm90_narrow32_bf16",
            (17..=32, true) => "mla_decode_sm90_narrow32_fp8",
            (_, false) => "mla_decode_sm90_bf16",
            (_, true) => "mla_decode_sm90_fp8",
        },
    }
}

fn sm_mode(gpu: &Gpu) -> SplitMode {
    SplitMode::Balanced { target_ctas: gpu.info().sm_count as usize }
}

/// Sequence lengths for a sweep point: `base` for most sequences, with some variation and zero-length sequences when
/// `varlen`.
fn lens(batch: usize, base: i32, varlen: bool, seed: u64) -> Vec<i32> {
    let mut rng = SplitMix64::new(seed);
    (0..batch)
        .map(|b| {
            if !varlen {
                base
            } else if b % 5 == 1 {
                0
            } else {
                int_in(&mut rng, 1..base.max(1) * 2 + 1)
            }
        })
        .collect()
}

// The sm_90a primitives have their own suite (tests/probes.rs), which scripts/gpu-check runs before this one.
const PLAIN: &[Backend] = &[Backend::Portable];
const SM90: &[Backend] = &[Backend::Hopper, Backend::HopperWide];

/// True where `backend` would repeat a launch another of `backends` makes: past 32 query rows per sequence
/// [`Backend::Hopper`] runs the 64-row kernel, exactly what [`Backend::HopperWide`] launches. The emulated device
/// (about 50 ms per 64-row × 64-token tile) runs such a launch once; a real GPU runs both.
fn emulated_duplicate(gpu: &Gpu, backends: &[Backend], backend: Backend, rows: usize) -> bool {
    gpu.is_emulated()
        && backend == Backend::HopperWide
        && backends.contains(&Backend::Hopper)
        && mla::sm90::narrow_rows(rows, false).is_none()
}

/// Says, once per test, that [`emulated_duplicate`] launches are left out.
fn announce_emulated_duplicates(gpu: &Gpu, test: &str, backends: &[Backend]) {
    if gpu.is_emulated() && backends.contains(&Backend::Hopper) && backends.contains(&Backend::HopperWide) {
        eprintln!(
            "emulated device: {test} uses HopperWide only on shapes of at most 32 query rows (past that Hopper \
             makes the same 64-row launch) instead of on every shape"
        );
    }
}

fn hopper(name: &str) -> Option<Gpu> {
    r1_kernels::device::test_hopper(name)
}

/// The points of a sweep: every (b, s_q, h, s_k) of these lists within the work bound and the tile bound.
#[derive(Debug)]
struct SweepGrid {
    batches: &'static [usize],
    s_ks: &'static [i32],
    /// Largest b·h·s_q·s_k (the f64 reference's cost).
    max_work: usize,
    /// Largest b·ceil(s_q·h/64)·ceil(s_k/64): (64-row query block, 64-token tile) pairs, the sm_90a kernels' cost.
    max_tile_pairs: usize,
}

/// The full sweep, sampled so the f64 reference stays affordable (b·h·s_q·s_k ≤ 2^23 per point).
const SWEEP: SweepGrid = SweepGrid {
    batches: &[1, 2, 6, 64, 128],
    s_ks: &[1, 20, 63, 64, 65, 140, 4096, 16384],
    max_work: 1 << 23,
    max_tile_pairs: usize::MAX,
};

/// The emulated device's sample (about 50 ms per tile pair there): every query length, head count and the lengths
/// around the 64-token tile; batches 6 and 12 exceed its 4 CTAs (the real sweep's 64 and 128 do not exceed 132 SMs),
/// and the long context (700 tokens: 11 pages of 64, 44 of 16, split over the CTAs) is sampled at one sequence.
const SWEEP_EMU: SweepGrid =
    SweepGrid { batches: &[1, 2, 6, 12], s_ks: &[1, 20, 63, 64, 65, 140, 700], max_work: 1 << 23, max_tile_pairs: 12 };

fn sweep(gpu: &Gpu, test: &str, backends: &[Backend]) {
    // The reference is computed once per point and every backend is compared with it.
    let grid = emu_shrink(gpu, test, SWEEP, SWEEP_EMU);
    announce_emulated_duplicates(gpu, test, backends);
    let mut seed = 100;
    for &b in grid.batches {
        for &s_q in &[1usize, 2, 4] {
            for &h in &[16usize, 128] {
                for &s_k in grid.s_ks {
                    let work = b * h * s_q * s_k as usize;
                    let tile_pairs = b * (s_q * h).div_ceil(64) * (s_k as usize).div_ceil(64);
                    if work > grid.max_work || tile_pairs > grid.max_tile_pairs {
                        continue;
                    }
                    for varlen in [false, true] {
                        if varlen && b == 1 {
                            continue;
                        }
                        seed += 1;
                        let page = if seed % 3 == 0 { 16 } else { 64 };
                        let case = make_case(seed, b, s_q, h, page, lens(b, s_k, varlen, seed), true);
                        let d = upload(gpu, &case, None);
                        let (want_o, want_l) = reference(&case, &case.cache);
                        for &backend in backends {
                            if emulated_duplicate(gpu, backends, backend, s_q * h) {
                                continue;
                            }
                            let (o, l) = run_gpu(gpu, &case, &d, sm_mode(gpu), backend, false);
                            let what = format!("{backend:?} b{b} s_q{s_q} h{h} s_k{s_k} varlen{varlen} page{page}");
                            check_close(&what, backend, &o, &l, &want_o, &want_l);
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn gpu_portable_sweep_matches_reference() {
    let Some(gpu) = r1_kernels::device::test_gpu("mla plain sweep") else { return };
    sweep(&gpu, "gpu_portable_sweep_matches_reference", PLAIN);
}

#[test]
fn gpu_sm90_sweep_matches_reference() {
    let Some(gpu) = hopper("mla sm90 sweep (narrow and wide)") else { return };
    sweep(&gpu, "gpu_sm90_sweep_matches_reference", SM90);
}

#[test]
fn gpu_sm90_wide_kernel_on_narrow_shapes() {
    // The 64-row kernel on the shapes the narrow kernel normally takes (h·s_q ≤ 32).
    let Some(gpu) = r1_kernels::device::test_hopper("mla sm90 wide kernel, few rows") else { return };
    let cases = emu_shrink(
        &gpu,
        "gpu_sm90_wide_kernel_on_narrow_shapes (b, s_q, s_k)",
        [(2usize, 1usize, 4096i32), (6, 2, 140), (64, 1, 65)],
        [(2, 1, 700), (6, 2, 140), (12, 1, 65)],
    );
    for (i, &(b, s_q, s_k)) in cases.iter().enumerate() {
        let case = make_case(40 + i as u64, b, s_q, 16, 64, lens(b, s_k, true, 41), true);
        let d = upload(&gpu, &case, None);
        let (want_o, want_l) = reference(&case, &case.cache);
        let (o, l) = run_gpu(&gpu, &case, &d, sm_mode(&gpu), Backend::HopperWide, false);
        check_close(&format!("wide case {i}"), Backend::HopperWide, &o, &l, &want_o, &want_l);
        let bytes = quantize_kv_cache_fp8(&case.cache).unwrap();
        let deq = dequantize_kv_cache_fp8(&bytes).unwrap();
        let d8 = upload(&gpu, &case, Some(&bytes));
        let (want_o, want_l) = reference(&case, &deq);
        let (o, l) = run_gpu(&gpu, &case, &d8, sm_mode(&gpu), Backend::HopperWide, true);
        check_close(&format!("wide fp8 case {i}"), Backend::HopperWide, &o, &l, &want_o, &want_l);
    }
}

#[test]
fn gpu_portable_noncausal_and_odd_shapes() {
    let Some(gpu) = r1_kernels::device::test_gpu("mla plain non-causal / odd heads / odd pages") else { return };
    noncausal_and_odd_shapes(&gpu, "gpu_portable_noncausal_and_odd_shapes", PLAIN);
}

#[test]
fn gpu_sm90_noncausal_and_odd_shapes() {
    let Some(gpu) = hopper("mla sm90 non-causal / odd heads") else { return };
    noncausal_and_odd_shapes(&gpu, "gpu_sm90_noncausal_and_odd_shapes", SM90);
}

fn noncausal_and_odd_shapes(gpu: &Gpu, test: &str, backends: &[Backend]) {
    announce_emulated_duplicates(gpu, test, backends);
    for &backend in backends {
        for (i, &(b, s_q, h, page, causal)) in
            [(3usize, 1usize, 32usize, 64usize, false), (2, 3, 64, 16, false), (4, 2, 16, 64, true)].iter().enumerate()
        {
            if emulated_duplicate(gpu, backends, backend, s_q * h) {
                continue;
            }
            let case = make_case(7 + i as u64, b, s_q, h, page, lens(b, 300, true, 9), causal);
            let d = upload(gpu, &case, None);
            let (want_o, want_l) = reference(&case, &case.cache);
            let (o, l) = run_gpu(gpu, &case, &d, sm_mode(gpu), backend, false);
            check_close(&format!("{backend:?} case {i}"), backend, &o, &l, &want_o, &want_l);
        }
    }
    if backends != PLAIN {
        // Query-row counts that leave padding rows in the narrow kernels' 16/32-row blocks (8, 20, 24 rows), and the
        // page sizes the tile loads support besides 16 and 64: 8 and 32 (several pages per 64-token tile), 128 and
        // 256 (several tiles per page).
        for (i, &(b, s_q, h, page)) in
            [(3usize, 1usize, 8usize, 8usize), (2, 1, 20, 32), (2, 2, 12, 128), (2, 1, 24, 256)].iter().enumerate()
        {
            let case = make_case(17 + i as u64, b, s_q, h, page, lens(b, 300, true, 19), true);
            let d = upload(gpu, &case, None);
            let (want_o, want_l) = reference(&case, &case.cache);
            for &backend in backends {
                let (o, l) = run_gpu(gpu, &case, &d, SplitMode::Balanced { target_ctas: 3 }, backend, false);
                let what = format!("{backend:?} odd case {i}: b{b} s_q{s_q} h{h} page{page}");
                check_close(&what, backend, &o, &l, &want_o, &want_l);
            }
        }
        return;
    }
    // Any head count and page size on the plain path.
    let case = make_case(8, 2, 2, 5, 7, vec![50, 13], true);
    let d = upload(gpu, &case, None);
    let (want_o, want_l) = reference(&case, &case.cache);
    let (o, l) = run_gpu(gpu, &case, &d, sm_mode(gpu), Backend::Portable, false);
    check_close("plain h5 page7", Backend::Portable, &o, &l, &want_o, &want_l);
}

#[test]
fn gpu_portable_fp8_cache_matches_reference_on_dequantized_cache() {
    let Some(gpu) = r1_kernels::device::test_gpu("mla plain fp8 kv cache") else { return };
    fp8_cache(&gpu, "gpu_portable_fp8_cache_matches_reference_on_dequantized_cache", PLAIN);
}

#[test]
fn gpu_sm90_fp8_cache_matches_reference_on_dequantized_cache() {
    let Some(gpu) = hopper("mla sm90 fp8 kv cache") else { return };
    fp8_cache(&gpu, "gpu_sm90_fp8_cache_matches_reference_on_dequantized_cache", SM90);
}

fn fp8_cache(gpu: &Gpu, test: &str, backends: &[Backend]) {
    // (b, s_q, h, s_k, page): wide (64+ rows), narrow16 (16 rows) and narrow32 (32 rows) shapes; the emulated device
    // takes 12 sequences for 64 (still 3 per CTA of its 4).
    let cases = emu_shrink(
        gpu,
        test,
        [
            (2usize, 1usize, 16usize, 700i32, 64usize),
            (6, 2, 128, 140, 16),
            (64, 1, 16, 65, 64),
            (3, 4, 16, 300, 128),
            (2, 2, 16, 700, 64),
            (3, 1, 32, 300, 16),
        ],
        [
            (2, 1, 16, 700, 64),
            (6, 2, 128, 140, 16),
            (12, 1, 16, 65, 64),
            (3, 4, 16, 300, 128),
            (2, 2, 16, 700, 64),
            (3, 1, 32, 300, 16),
        ],
    );
    announce_emulated_duplicates(gpu, test, backends);
    // Plans stated, not derived from the SM count: one CTA walking every page of every sequence (each ring stage
    // reused many times, Q reloaded per sequence, the online softmax rescaled across tiles), 4-page chunks (several
    // work items per sequence, combined), and the device's own balance.
    let modes = [
        SplitMode::Balanced { target_ctas: 1 },
        SplitMode::BatchInvariant { chunk_blocks: 4 },
        SplitMode::Balanced { target_ctas: gpu.info().sm_count as usize },
    ];
    for &backend in backends {
        for (i, &(b, s_q, h, s_k, page)) in cases.iter().enumerate() {
            if emulated_duplicate(gpu, backends, backend, s_q * h) {
                continue;
            }
            let case = make_case(30 + i as u64, b, s_q, h, page, lens(b, s_k, true, 31), true);
            let bytes = quantize_kv_cache_fp8(&case.cache).unwrap();
            let deq = dequantize_kv_cache_fp8(&bytes).unwrap();
            let d = upload(gpu, &case, Some(&bytes));
            let (want_o, want_l) = reference(&case, &deq);
            for mode in modes {
                let (o, l) = run_gpu(gpu, &case, &d, mode, backend, true);
                let what = format!("{backend:?} fp8 case {i} (b{b} s_q{s_q} h{h} s_k{s_k} page{page}) {mode:?}");
                check_close(&what, backend, &o, &l, &want_o, &want_l);
                let (o2, l2) = run_gpu(gpu, &case, &d, mode, backend, true);
                assert!(
                    o == o2 && l.iter().zip(&l2).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{what}: repeat differs"
                );
            }
        }
    }
}

#[test]
fn gpu_portable_deterministic_and_batch_invariant() {
    let Some(gpu) = r1_kernels::device::test_gpu("mla plain determinism / batch invariance") else { return };
    deterministic_and_batch_invariant(&gpu, "gpu_portable_deterministic_and_batch_invariant", PLAIN);
}

#[test]
fn gpu_sm90_deterministic_and_batch_invariant() {
    let Some(gpu) = hopper("mla sm90 determinism / batch invariance") else { return };
    deterministic_and_batch_invariant(&gpu, "gpu_sm90_deterministic_and_batch_invariant", SM90);
}

fn deterministic_and_batch_invariant(gpu: &Gpu, test: &str, backends: &[Backend]) {
    let mode = SplitMode::BatchInvariant { chunk_blocks: 4 };
    // Sequence lengths; the emulated device keeps several 256-token chunks per long sequence, a ragged last chunk,
    // an empty and a one-token sequence.
    let seqlens = emu_shrink(gpu, test, vec![3000, 0, 129, 1, 777, 2048], vec![700, 0, 129, 1, 300, 520]);
    for &backend in backends {
        let (h, s_q, page) = (16usize, 2usize, 64usize);
        let big = make_case(50, 6, s_q, h, page, seqlens.clone(), true);
        let d = upload(gpu, &big, None);
        let (o1, l1) = run_gpu(gpu, &big, &d, mode, backend, false);
        let (o2, l2) = run_gpu(gpu, &big, &d, mode, backend, false);
        assert_eq!(
            o1.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            o2.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
        assert_eq!(
            l1.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            l2.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
        // Sequence 4 alone: same bits as inside the batch.
        let b = 4;
        let mut alone = make_case(51, 1, s_q, h, page, vec![big.seqlens[b]], true);
        let (per_q, per_o, per_l) = (s_q * h * D_QK, s_q * h * D_V, h * s_q);
        alone.q = big.q[b * per_q..(b + 1) * per_q].to_vec();
        // Same keys: copy the sequence's tokens into the fresh cache's layout.
        for t in 0..big.seqlens[b] as usize {
            let src = (big.table[b * big.max_blocks + t / page] as usize * page + t % page) * D_QK;
            let dst = (alone.table[t / page] as usize * page + t % page) * D_QK;
            let row = big.cache[src..src + D_QK].to_vec();
            alone.cache[dst..dst + D_QK].copy_from_slice(&row);
        }
        let da = upload(gpu, &alone, None);
        let (oa, la) = run_gpu(gpu, &alone, &da, mode, backend, false);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&oa), bits(&o1[b * per_o..(b + 1) * per_o]), "{backend:?}: o differs when batched");
        assert_eq!(bits(&la), bits(&l1[b * per_l..(b + 1) * per_l]), "{backend:?}: lse differs when batched");
        let (want_o, want_l) = reference(&big, &big.cache);
        check_close("batch-invariant mode", backend, &o1, &l1, &want_o, &want_l);
    }
}

#[test]
fn gpu_portable_garbage_table_without_host_copy_never_faults() {
    let Some(gpu) = r1_kernels::device::test_gpu("mla garbage block table") else { return };
    let mut case = make_case(60, 3, 1, 16, 64, vec![200, 130, 90], false);
    let (want_o, want_l) = reference(&case, &case.cache);
    // Corrupt a page of sequence 1 only; the device must skip it (no fault) and the other sequences stay exact.
    case.table[case.max_blocks + 1] = i32::MAX;
    let d = upload(&gpu, &case, None);
    let c = case.cfg;
    let plan = MlaPlan::balanced(&gpu, &case.seqlens, 64).unwrap();
    let mut ws = MlaWorkspace::new(&gpu, &plan, &c).unwrap();
    let mut out = DeviceTensor::<bf16>::zeros(&gpu, &[3, 1, 16, D_V]).unwrap();
    let mut lse = DeviceTensor::<f32>::zeros(&gpu, &[3, 16, 1]).unwrap();
    let opts = MlaOptions::default();
    mla::mla_decode(&gpu, &d.q, &d.cache, &d.table, &d.seqlens, &plan, &c, &mut out, &mut lse, &mut ws, &opts).unwrap();
    gpu.synchronize().expect("no device fault");
    let o: Vec<f32> = out.to_host(&gpu).unwrap().iter().map(|x| x.to_f32()).collect();
    let l = lse.to_host(&gpu).unwrap();
    let (po, pl) = (16 * D_V, 16);
    check_close("seq 0", Backend::Portable, &o[..po], &l[..pl], &want_o[..po], &want_l.part(0..pl));
    check_close(
        "seq 2",
        Backend::Portable,
        &o[2 * po..],
        &l[2 * pl..],
        &want_o[2 * po..],
        &want_l.part(2 * pl..want_l.len()),
    );
    // With the host copy the same table is an error.
    let opts = MlaOptions { block_table_host: Some(&case.table), ..Default::default() };
    let r = mla::mla_decode(&gpu, &d.q, &d.cache, &d.table, &d.seqlens, &plan, &c, &mut out, &mut lse, &mut ws, &opts);
    assert!(matches!(r, Err(Error::IndexOutOfRange { arg: "block_table", .. })), "{r:?}");
}

#[test]
fn gpu_portable_bad_inputs_are_errors() {
    let Some(gpu) = r1_kernels::device::test_gpu("mla bad inputs") else { return };
    let case = make_case(70, 2, 1, 16, 64, vec![100, 5], false);
    let d = upload(&gpu, &case, None);
    let c = case.cfg;
    let plan = MlaPlan::balanced(&gpu, &case.seqlens, 64).unwrap();
    let mut ws = MlaWorkspace::new(&gpu, &plan, &c).unwrap();
    let mut out = DeviceTensor::<bf16>::zeros(&gpu, &[2, 1, 16, D_V]).unwrap();
    let mut lse = DeviceTensor::<f32>::zeros(&gpu, &[2, 16, 1]).unwrap();
    let opts = MlaOptions { block_table_host: Some(&case.table), ..Default::default() };
    let mut run = |cfg: &MlaConfig, plan: &MlaPlan, ws: &mut MlaWorkspace| {
        mla::mla_decode(&gpu, &d.q, &d.cache, &d.table, &d.seqlens, plan, cfg, &mut out, &mut lse, ws, &opts)
    };
    assert!(run(&c, &plan, &mut ws).is_ok());
    for s in [f32::NAN, f32::INFINITY, 0.0] {
        assert!(matches!(run(&MlaConfig { softmax_scale: s, ..c }, &plan, &mut ws), Err(Error::InvalidConfig(_))));
    }
    assert!(matches!(run(&MlaConfig { heads: 32, ..c }, &plan, &mut ws), Err(Error::Shape { .. })));
    assert!(matches!(run(&MlaConfig { s_q: 2, ..c }, &plan, &mut ws), Err(Error::Shape { .. })));
    assert!(matches!(run(&MlaConfig { page_size: 16, ..c }, &plan, &mut ws), Err(Error::Shape { .. })));
    // Plan for other lengths: seqlen beyond the table's capacity.
    let long = MlaPlan::balanced(&gpu, &[100, 10_000], 64).unwrap();
    let mut ws_long = MlaWorkspace::new(&gpu, &long, &c).unwrap();
    assert!(run(&c, &long, &mut ws_long).is_err());
    // Plan for another batch size / a workspace that is too small.
    let other = MlaPlan::balanced(&gpu, &[100], 64).unwrap();
    assert!(run(&c, &other, &mut ws).is_err());
    let mut tiny = MlaWorkspace::with_capacity(&gpu, 1, 16).unwrap();
    assert!(run(&c, &plan, &mut tiny).is_err());
    // Wrong cache width for the FP8 entry point.
    let fake = DeviceTensor::<u8>::zeros(&gpu, &[case.num_blocks, 64, FP8_TOKEN_BYTES - 16]).unwrap();
    let r = mla::mla_decode_fp8(&gpu, &d.q, &fake, &d.table, &d.seqlens, &plan, &c, &mut out, &mut lse, &mut ws, &opts);
    assert!(matches!(r, Err(Error::Shape { .. })));
}

#[test]
fn gpu_portable_empty_batch_and_all_zero_lengths() {
    let Some(gpu) = r1_kernels::device::test_gpu("mla plain empty batch") else { return };
    empty_batch(&gpu, PLAIN);
}

#[test]
fn gpu_sm90_empty_batch_and_all_zero_lengths() {
    let Some(gpu) = hopper("mla sm90 empty batch") else { return };
    empty_batch(&gpu, SM90);
}

fn empty_batch(gpu: &Gpu, backends: &[Backend]) {
    for &backend in backends {
        let case = make_case(80, 3, 2, 16, 64, vec![0, 0, 0], true);
        let d = upload(gpu, &case, None);
        let (o, l) = run_gpu(gpu, &case, &d, sm_mode(gpu), backend, false);
        assert!(o.iter().all(|&x| x == 0.0));
        assert!(l.iter().all(|&x| x == f32::INFINITY));
    }
    let case = make_case(81, 0, 1, 16, 64, vec![], false);
    let d = upload(gpu, &case, None);
    let (o, l) = run_gpu(gpu, &case, &d, sm_mode(gpu), Backend::Portable, false);
    assert!(o.is_empty() && l.is_empty());
}

#[test]
fn cpu_reference_sweep_consistency() {
    // CPU-only: the reference over a small varlen causal batch equals per-sequence runs (threading in `reference`
    // is a pure partition) and the FP8 reference path round-trips through the byte format.
    let case = make_case(90, 5, 2, 4, 16, vec![33, 0, 1, 64, 17], true);
    let (o, l) = reference(&case, &case.cache);
    let (o1, l1) = ref_decode(&case.q, &case.cache, &case.table, &case.seqlens, &case.cfg).unwrap();
    assert_eq!(o, o1);
    assert_eq!(l.lse, l1);
    assert!(o.iter().all(|x| x.is_finite()));
    let bytes = quantize_kv_cache_fp8(&case.cache).unwrap();
    assert_eq!(bytes.len(), case.num_blocks * case.cfg.page_size * FP8_TOKEN_BYTES);
    let deq = dequantize_kv_cache_fp8(&bytes).unwrap();
    // Every token's latent round-trips within E4M3 rounding of its own 128-column group (2^-4 relative, plus the
    // group's subnormal step), whatever the group's magnitude; the RoPE columns stay bf16-exact.
    for (orig, back) in case.cache.chunks(D_QK).zip(deq.chunks(D_QK)) {
        if orig.iter().any(|x| !x.is_finite()) {
            continue;
        }
        for (g, (xs, ys)) in orig[..512].chunks(128).zip(back[..512].chunks(128)).enumerate() {
            let amax = xs.iter().fold(0f32, |m, x| m.max(x.abs()));
            for (&x, &y) in xs.iter().zip(ys) {
                assert!((x - y).abs() <= x.abs() / 16.0 + amax / 448.0 * 2f32.powi(-9) * 2.0, "group {g}: {x} → {y}");
            }
        }
        assert_eq!(&orig[512..], &back[512..]);
    }
    let (o8, _) = reference(&case, &deq);
    assert!(o8.iter().all(|x| x.is_finite()));
}

#[test]
fn gpu_sm90_cancelling_score_keeps_accumulation_error() {
    // The sweep point that failed on an H200 under a bound relative to |lse| alone: batch 50's single key scores
    // 0.00305 after cancellation, off by 1.1e-6 through wgmma's truncated fp32 sums (the emulator's hopper numerics
    // give the same bits). The bound now carries the terms' magnitude (RefLse::slack).
    let Some(gpu) = hopper("mla sm90 lse of a cancelling score") else { return };
    let case = make_case(332, 64, 1, 16, 64, lens(64, 1, true, 332), true);
    let d = upload(&gpu, &case, None);
    let (want_o, want_l) = reference(&case, &case.cache);
    let (o, l) = run_gpu(&gpu, &case, &d, sm_mode(&gpu), Backend::Hopper, false);
    check_close("b64 s_q1 h16 s_k1 (seed 332)", Backend::Hopper, &o, &l, &want_o, &want_l);
}

#[test]
fn gpu_auto_backend_follows_device_and_page_size() {
    let Some(gpu) = r1_kernels::device::test_gpu("mla Backend::Auto") else { return };
    let hopper = gpu.info().is_hopper();
    assert_eq!(Backend::Auto.resolve(&gpu, 64), if hopper { Backend::Hopper } else { Backend::Portable });
    assert_eq!(Backend::Auto.resolve(&gpu, 48), Backend::Portable, "48-token pages are not an sm_90a page size");
    for chosen in [Backend::Portable, Backend::Hopper, Backend::HopperWide] {
        assert_eq!(chosen.resolve(&gpu, 48), chosen, "an explicit choice is kept");
    }
    // The resolved kernel is the one launched (run_gpu checks the launch), and it matches the reference.
    for (i, page) in [64usize, 48].into_iter().enumerate() {
        let case = make_case(70 + i as u64, 3, 1, 16, page, vec![130, 1, 77], true);
        let d = upload(&gpu, &case, None);
        let (want_o, want_l) = reference(&case, &case.cache);
        let (o, l) = run_gpu(&gpu, &case, &d, sm_mode(&gpu), Backend::Auto, false);
        check_close(&format!("auto page {page}"), Backend::Auto, &o, &l, &want_o, &want_l);
    }
}

// ------------------------------------------------------------------------------------------ plan on the device

/// Decodes `case` with a plan computed on the device; (o as f32, lse).
fn run_device_plan(gpu: &Gpu, case: &Case, d: &DeviceCase, backend: Backend, fp8: bool) -> (Vec<f32>, Vec<f32>) {
    let c = &case.cfg;
    let mut plan = MlaPlan::on_device(gpu, c, case.max_blocks, backend).unwrap();
    expect_launched(gpu, &["mla_plan_balanced"], || plan.update(gpu, &d.seqlens)).unwrap();
    let mut ws = MlaWorkspace::new(gpu, &plan, c).unwrap();
    let mut out = DeviceTensor::from_host(gpu, &vec![bf16::NAN; c.o_len()], &[c.batch, c.s_q, c.heads, D_V]).unwrap();
    let mut lse = DeviceTensor::from_host(gpu, &vec![f32::NAN; c.lse_len()], &[c.batch, c.heads, c.s_q]).unwrap();
    let opts = MlaOptions { block_table_host: None, backend };
    if fp8 {
        mla::mla_decode_fp8(gpu, &d.q, &d.cache_fp8, &d.table, &d.seqlens, &plan, c, &mut out, &mut lse, &mut ws, &opts)
    } else {
        mla::mla_decode(gpu, &d.q, &d.cache, &d.table, &d.seqlens, &plan, c, &mut out, &mut lse, &mut ws, &opts)
    }
    .unwrap();
    (out.to_host(gpu).unwrap().iter().map(|v| v.to_f32()).collect(), lse.to_host(gpu).unwrap())
}

#[test]
fn gpu_device_plan_equals_the_host_plan() {
    let Some(gpu) = r1_kernels::device::test_gpu("mla plan on the device") else { return };
    let mut rng = SplitMix64::new(77);
    // Batches past the planner's 1024 threads, empty sequences, lengths past the table (clamped, as the kernels do).
    for (i, &(batch, max_len, page)) in
        [(1usize, 1i32, 64usize), (3, 300, 16), (37, 5000, 64), (1500, 700, 64), (5, 0, 64), (64, 130, 24)]
            .iter()
            .enumerate()
    {
        let max_blocks = (max_len.max(1) as usize).div_ceil(page);
        let lens: Vec<i32> = (0..batch)
            .map(|_| match int_in(&mut rng, 0..10) {
                0 => 0,
                1 => -5,
                2 => (max_blocks * page) as i32 + 9,
                _ => int_in(&mut rng, 0..max_len + 1),
            })
            .collect();
        let clamped: Vec<i32> = lens.iter().map(|&l| l.clamp(0, (max_blocks * page) as i32)).collect();
        for backend in [Backend::Portable, Backend::Auto] {
            let cfg = MlaConfig { batch, s_q: 1, heads: 16, page_size: page, softmax_scale: 0.1, causal: true };
            let seqlens = DeviceTensor::from_host(&gpu, &lens, &[batch]).unwrap();
            let mut plan = MlaPlan::on_device(&gpu, &cfg, max_blocks, backend).unwrap();
            assert!(plan.split().is_none());
            expect_launched(&gpu, &["mla_plan_balanced"], || plan.update(&gpu, &seqlens)).unwrap();
            let (items, ctas, splits) = plan.download(&gpu).unwrap();
            let host = MlaPlan::for_backend(&gpu, &clamped, &cfg, backend).unwrap();
            let want = host.split().unwrap();
            let n = want.items.len();
            let flat: Vec<i32> =
                want.items.iter().flat_map(|it| [it.seq, it.start_block, it.end_block, it.split]).collect();
            let what = format!("case {i} ({batch} sequences, page {page}, {backend:?})");
            assert_eq!(&items[..4 * n], &flat[..], "{what}: items");
            let used = want.num_ctas();
            assert_eq!(&ctas[..=used], &want.cta_offsets[..], "{what}: CTA offsets");
            assert!(ctas[used..].iter().all(|&c| c == n as i32), "{what}: unused CTAs are empty");
            assert_eq!(splits, want.split_offsets, "{what}: split offsets");
            assert!(n <= plan.max_splits(), "{what}: capacity");
        }
    }
}

#[test]
fn gpu_device_plan_decodes_bitwise_like_the_host_plan() {
    let Some(gpu) = r1_kernels::device::test_gpu("mla decode with the device plan") else { return };
    let mut backends = vec![Backend::Portable];
    if gpu.info().is_hopper() {
        backends.extend([Backend::Hopper, Backend::HopperWide]);
    }
    for (i, &(b, s_q, h, s_k)) in [(3usize, 1usize, 16usize, 300i32), (2, 2, 16, 130)].iter().enumerate() {
        let case = make_case(500 + i as u64, b, s_q, h, 64, lens(b, s_k, true, 500 + i as u64), true);
        let bytes = quantize_kv_cache_fp8(&case.cache).unwrap();
        let d = upload(&gpu, &case, Some(&bytes));
        let (want_o, want_l) = reference(&case, &case.cache);
        for &backend in &backends {
            for fp8 in [false, true] {
                let what = format!("case {i} {backend:?} fp8={fp8}");
                let mode = SplitMode::Balanced {
                    target_ctas: MlaPlan::for_backend(&gpu, &case.seqlens, &case.cfg, backend)
                        .unwrap()
                        .split()
                        .unwrap()
                        .num_ctas()
                        .max(1),
                };
                let host = run_gpu(&gpu, &case, &d, mode, backend, fp8);
                let device = run_device_plan(&gpu, &case, &d, backend, fp8);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&device.0), bits(&host.0), "{what}: o");
                assert_eq!(bits(&device.1), bits(&host.1), "{what}: lse");
                if !fp8 {
                    check_close(&what, backend, &device.0, &device.1, &want_o, &want_l);
                }
            }
        }
    }
    // A device plan takes no host table (it cannot know which entries the lengths reach) and a table of its width.
    let case = make_case(510, 2, 1, 16, 64, vec![70, 5], true);
    let d = upload(&gpu, &case, None);
    let c = &case.cfg;
    let plan = MlaPlan::on_device(&gpu, c, case.max_blocks + 1, Backend::Portable).unwrap();
    let mut ws = MlaWorkspace::new(&gpu, &plan, c).unwrap();
    let mut out = DeviceTensor::<bf16>::zeros(&gpu, &[c.batch, c.s_q, c.heads, D_V]).unwrap();
    let mut lse = DeviceTensor::<f32>::zeros(&gpu, &[c.batch, c.heads, c.s_q]).unwrap();
    let opts = MlaOptions { block_table_host: None, backend: Backend::Portable };
    let r = mla::mla_decode(&gpu, &d.q, &d.cache, &d.table, &d.seqlens, &plan, c, &mut out, &mut lse, &mut ws, &opts);
    assert!(matches!(r, Err(Error::InvalidConfig(_))), "{r:?}");
    let plan = MlaPlan::on_device(&gpu, c, case.max_blocks, Backend::Portable).unwrap();
    let opts = MlaOptions { block_table_host: Some(&case.table), backend: Backend::Portable };
    let r = mla::mla_decode(&gpu, &d.q, &d.cache, &d.table, &d.seqlens, &plan, c, &mut out, &mut lse, &mut ws, &opts);
    assert!(matches!(r, Err(Error::InvalidConfig(_))), "{r:?}");
    let mut host_plan = MlaPlan::new(&gpu, &case.seqlens, 64, SplitMode::Balanced { target_ctas: 2 }).unwrap();
    assert!(matches!(host_plan.update(&gpu, &d.seqlens), Err(Error::InvalidConfig(_))));
}

#[test]
fn gpu_captured_decode_replays_with_changed_lengths() {
    use r1_kernels::cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
    let Some(gpu) = r1_kernels::device::test_gpu("mla decode captured once, replayed with new lengths") else { return };
    let backend = Backend::Auto;
    let (b, s_q, h, page, max_blocks) = (4usize, 2usize, 16usize, 64usize, 5usize);
    // Every step shares the shapes; lengths, queries and cache contents change. Step 0 is captured.
    let steps: Vec<Vec<i32>> = vec![vec![70, 1, 300, 129], vec![320, 0, 2, 64], vec![5, 200, 17, 250], vec![0; 4]];
    let cases: Vec<Case> = steps
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let mut c = make_case(600 + i as u64, b, s_q, h, page, l.clone(), true);
            // One table shape for all steps: pad to max_blocks columns (the extra columns are never read).
            let mb = c.max_blocks;
            let mut table = vec![i32::MAX; b * max_blocks];
            for s in 0..b {
                table[s * max_blocks..s * max_blocks + mb.min(max_blocks)]
                    .copy_from_slice(&c.table[s * mb..s * mb + mb.min(max_blocks)]);
            }
            c.table = table;
            c.max_blocks = max_blocks;
            c
        })
        .collect();
    let num_blocks = cases.iter().map(|c| c.num_blocks).max().unwrap();
    let cfg = cases[0].cfg;
    let to_bf = |v: &[f32]| v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>();
    let pad_cache = |c: &Case| {
        let mut v = to_bf(&c.cache);
        v.resize(num_blocks * page * D_QK, bf16::NAN);
        v
    };
    let mut q = DeviceTensor::from_host(&gpu, &to_bf(&cases[0].q), &[b, s_q, h, D_QK]).unwrap();
    let mut cache = DeviceTensor::from_host(&gpu, &pad_cache(&cases[0]), &[num_blocks, page, D_QK]).unwrap();
    let mut table = DeviceTensor::from_host(&gpu, &cases[0].table, &[b, max_blocks]).unwrap();
    let mut seqlens = DeviceTensor::from_host(&gpu, &cases[0].seqlens, &[b]).unwrap();
    let mut out = DeviceTensor::<bf16>::zeros(&gpu, &[b, s_q, h, D_V]).unwrap();
    let mut lse = DeviceTensor::<f32>::zeros(&gpu, &[b, h, s_q]).unwrap();
    let mut plan = MlaPlan::on_device(&gpu, &cfg, max_blocks, backend).unwrap();
    let mut ws = MlaWorkspace::new(&gpu, &plan, &cfg).unwrap();
    gpu.preload().unwrap();
    gpu.synchronize().unwrap();
    let opts = MlaOptions { block_table_host: None, backend };
    // SAFETY: every buffer is used on this one stream only, so cudarc's cross-stream events are not needed.
    unsafe { gpu.context().disable_event_tracking() };
    gpu.stream().begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).unwrap();
    let captured = plan.update(&gpu, &seqlens).and_then(|()| {
        mla::mla_decode(&gpu, &q, &cache, &table, &seqlens, &plan, &cfg, &mut out, &mut lse, &mut ws, &opts)
    });
    let graph = gpu.stream().end_capture(CUgraphInstantiate_flags(0)).unwrap();
    unsafe { gpu.context().enable_event_tracking() };
    captured.unwrap();
    let graph = graph.expect("a captured graph");
    for (i, case) in cases.iter().enumerate() {
        q.copy_from_host(&gpu, &to_bf(&case.q)).unwrap();
        cache.copy_from_host(&gpu, &pad_cache(case)).unwrap();
        table.copy_from_host(&gpu, &case.table).unwrap();
        seqlens.copy_from_host(&gpu, &case.seqlens).unwrap();
        out.copy_from_host(&gpu, &vec![bf16::NAN; cfg.o_len()]).unwrap();
        lse.copy_from_host(&gpu, &vec![f32::NAN; cfg.lse_len()]).unwrap();
        graph.launch().unwrap();
        let replay_o: Vec<u16> = out.to_host(&gpu).unwrap().iter().map(|v| v.to_bits()).collect();
        let replay_l: Vec<u32> = lse.to_host(&gpu).unwrap().iter().map(|v| v.to_bits()).collect();
        // Eager: the same device plan, updated and launched outside any graph.
        let padded = Case { cache: pad_cache(case).iter().map(|v| v.to_f32()).collect(), num_blocks, ..case.clone() };
        let d = upload(&gpu, &padded, None);
        let (o, l) = run_device_plan(&gpu, &padded, &d, backend, false);
        let what = format!("step {i} lengths {:?}", case.seqlens);
        assert_eq!(replay_o, o.iter().map(|v| bf16::from_f32(*v).to_bits()).collect::<Vec<_>>(), "{what}: o");
        assert_eq!(replay_l, l.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "{what}: lse");
        let (want_o, want_l) = reference(&padded, &padded.cache);
        check_close(&what, backend, &o, &l, &want_o, &want_l);
    }
}
