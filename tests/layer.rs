//! The DeepSeek-V3 decode layer: checkpoint → reference equivalence on the CPU, and GPU vs reference.

use r1_kernels::checkpoint::{load_layer, write_layer_checkpoint};
use r1_kernels::device::test_gpu;
use r1_kernels::layer::{DecodeBatch, DecodeLayer};
use r1_kernels::model::{synthetic_layer_weights, DeepSeekV3Config};
use r1_kernels::reference::fp8_gemm::calc_diff;
use r1_kernels::reference::layer::{decode_layer, DecodeStep, PreparedLayer};
use r1_kernels::rng::SplitMix64;
use r1_kernels::{bf16, DeviceTensor};

mod common;
use common::{bf16_vec, block_table, paged_cache, shuffled_pages};

struct Setup {
    x: Vec<f32>,
    cache: Vec<f32>,
    table: Vec<i32>,
    max_blocks: usize,
    page: usize,
    seqlens: Vec<i32>,
}

fn setup(cfg: &DeepSeekV3Config, seqlens: &[i32], page: usize, seed: u64) -> Setup {
    let mut rng = SplitMix64::new(seed);
    let b = seqlens.len();
    let max_blocks = seqlens.iter().map(|&s| (s as usize).div_ceil(page)).max().unwrap_or(1).max(1);
    let num_blocks = b * max_blocks + 3;
    // Pages shuffled across sequences; unused table entries point nowhere valid (never read).
    let pages = shuffled_pages(&mut rng, num_blocks);
    let table = block_table(seqlens, page, max_blocks, &pages, i32::MAX);
    // Cached latents of realistic size (post-norm latent ~ N(0,1)) before each new token; every other slot is NaN
    // and must never be read.
    let before_new: Vec<usize> = seqlens.iter().map(|&len| len as usize - 1).collect();
    let cache = paged_cache(&mut rng, num_blocks, page, 576, &table, max_blocks, &before_new, (-1.0, 1.0));
    let x = (0..b * cfg.hidden).map(|_| bf16::from_f32(rng.uniform(-1.0, 1.0)).to_f32()).collect();
    Setup { x, cache, table, max_blocks, page, seqlens: seqlens.to_vec() }
}

#[test]
fn checkpoint_round_trip_runs_like_the_in_memory_weights() {
    let cfg = DeepSeekV3Config::small();
    let layer_idx = cfg.first_k_dense;
    let weights = synthetic_layer_weights(&cfg, layer_idx, 3).unwrap();
    let dir = std::env::temp_dir().join(format!("r1k-test-layer-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    write_layer_checkpoint(&dir, &cfg, &weights).unwrap();
    let loaded = load_layer(&dir, &cfg, layer_idx).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(loaded, weights);

    let s = setup(&cfg, &[3, 40], 16, 9);
    let step = DecodeStep { block_table: &s.table, max_blocks: s.max_blocks, seqlens: &s.seqlens, page_size: s.page };
    let (mut c1, mut c2) = (s.cache.clone(), s.cache.clone());
    let a = decode_layer(&PreparedLayer::new(&cfg, weights).unwrap(), &s.x, &mut c1, &step).unwrap();
    let b = decode_layer(&PreparedLayer::new(&cfg, loaded).unwrap(), &s.x, &mut c2, &step).unwrap();
    assert_eq!(a.out, b.out);
    assert!(a.out.iter().all(|v| v.is_finite()));
}

/// lse bound (absolute below 1, relative above): q reaches MLA through three FP8 GEMMs whose Hopper accumulation
/// differs from the reference's exact sums by up to ~1e-3 of each row, and a one-key lse is a single score.
const LSE_TOL: f32 = 1e-2;

#[test]
fn gpu_decode_layer_matches_reference() {
    let Some(gpu) = test_gpu("gpu_decode_layer_matches_reference") else { return };
    let cfg = DeepSeekV3Config::small();
    let prepared = PreparedLayer::new(&cfg, synthetic_layer_weights(&cfg, cfg.first_k_dense, 5).unwrap()).unwrap();
    let layer = DecodeLayer::upload(&gpu, &prepared).unwrap();
    for (case, seqlens) in [vec![1], vec![1, 20, 63, 64, 65, 140, 300], vec![1000; 3]].into_iter().enumerate() {
        let s = setup(&cfg, &seqlens, 64, 100 + case as u64);
        let b = seqlens.len();
        let step =
            DecodeStep { block_table: &s.table, max_blocks: s.max_blocks, seqlens: &s.seqlens, page_size: s.page };
        let mut ref_cache = s.cache.clone();
        let reference = decode_layer(&prepared, &s.x, &mut ref_cache, &step).unwrap();

        let to_bf16 = |v: &[f32]| v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>();
        let x = DeviceTensor::from_host(&gpu, &to_bf16(&s.x), &[b, cfg.hidden]).unwrap();
        let num_blocks = s.cache.len() / (s.page * 576);
        let mut cache = DeviceTensor::from_host(&gpu, &to_bf16(&s.cache), &[num_blocks, s.page, 576]).unwrap();
        let table = DeviceTensor::from_host(&gpu, &s.table, &[b, s.max_blocks]).unwrap();
        let seqlens_d = DeviceTensor::from_host(&gpu, &s.seqlens, &[b]).unwrap();
        let positions: Vec<i32> = s.seqlens.iter().map(|&l| l - 1).collect();
        let positions_d = DeviceTensor::from_host(&gpu, &positions, &[b]).unwrap();
        let batch = DecodeBatch {
            block_table: table.as_tensor_ref(),
            block_table_host: &s.table,
            seqlens: seqlens_d.as_tensor_ref(),
            seqlens_host: &s.seqlens,
            positions: positions_d.as_tensor_ref(),
        };
        let mut ws = layer.workspace(&gpu, b).unwrap();
        let mut out = DeviceTensor::from_host(&gpu, &vec![bf16::NAN; b * cfg.hidden], &[b, cfg.hidden]).unwrap();
        let times = layer.forward(&gpu, &mut ws, &x, &mut cache, &batch, &mut out, true).unwrap().unwrap();
        assert_eq!(times.stages.len(), 5);
        let got: Vec<f32> = out.to_host(&gpu).unwrap().iter().map(|v| v.to_f32()).collect();
        let (ids, _) = layer.last_routing(&gpu, &ws).unwrap();
        // Per token, the experts both sides route to (near-equal scores may come in either order: that is not a
        // routing difference).
        let k = cfg.top_k;
        let same_ids: usize = ids
            .chunks(k)
            .zip(reference.topk_ids.chunks(k))
            .map(|(got, want)| got.iter().filter(|e| want.contains(e)).count())
            .sum();
        assert!(same_ids * 100 >= ids.len() * 95, "case {case}: only {same_ids}/{} routed experts agree", ids.len());
        let diff = calc_diff(&got, &reference.out);
        assert!(diff < 2e-3, "case {case}: decode layer output differs from the reference (calc_diff {diff:.3e})");
        assert!(got.iter().all(|v| v.is_finite()), "case {case}: non-finite output");
        // Each stage on its own, per token (or per head row): the residual sum alone hides the attention branch,
        // which is a few percent of `out` at long contexts. The bounds allow Hopper's FP8 accumulation in the
        // projections (row calc_diff up to ~1e-4 on q, ~6e-4 on the MoE branch); a wrong window, head, page or
        // expert moves a row's calc_diff to 1e-2 and beyond.
        let inter = layer.last_intermediates(&gpu, &ws).unwrap();
        let h = cfg.num_heads;
        let stage = |name: &str, got: &[f32], want: &[f32], rows: usize, bound: f64| {
            assert_eq!(got.len(), want.len(), "case {case}: {name} length");
            let width = want.len() / rows;
            let worst = got.chunks(width).zip(want.chunks(width)).map(|(g, w)| calc_diff(g, w)).fold(0f64, f64::max);
            eprintln!("case {case}: {name}: worst row calc_diff {worst:.2e} (bound {bound:.0e})");
            assert!(got.iter().all(|v| v.is_finite()), "case {case}: {name} not finite");
            assert!(worst < bound, "case {case}: {name} differs from the reference: a row's calc_diff is {worst:.3e}");
        };
        stage("q_mla", &inter.q_mla, &reference.q_mla, b * h, 1e-3);
        stage("kv_row", &inter.kv_row, &reference.kv_row, b, 1e-3);
        stage("o_latent", &inter.o_latent, &reference.o_latent, b * h, 1e-3);
        stage("h (x + attention)", &inter.h, &reference.h, b, 1e-3);
        let lse_err =
            inter.lse.iter().zip(&reference.lse).map(|(g, w)| (g - w).abs() / w.abs().max(1.0)).fold(0f32, f32::max);
        eprintln!("case {case}: lse: worst error {lse_err:.2e} (relative above 1)");
        assert!(lse_err <= LSE_TOL, "case {case}: lse differs from the reference by {lse_err:.3e}");
        // The attention branch alone (the o_proj output), per token: the residual x cannot hide it.
        stage("attention branch (o_proj output)", &inter.attn, &reference.attn, b, 1e-3);
        // The new token's cache slot holds the appended row.
        let cache_host: Vec<f32> = cache.to_host(&gpu).unwrap().iter().map(|v| v.to_f32()).collect();
        for (seq, &len) in s.seqlens.iter().enumerate() {
            let pos = len as usize - 1;
            let blk = s.table[seq * s.max_blocks + pos / s.page] as usize;
            let slot = &cache_host[(blk * s.page + pos % s.page) * 576..][..576];
            assert_eq!(slot, &inter.kv_row[seq * 576..(seq + 1) * 576], "case {case}: sequence {seq}'s appended slot");
        }
        // The MoE branch, for the tokens routed to the same experts on both sides.
        let hidden = cfg.hidden;
        for tok in 0..b {
            let (gi, wi) = (&ids[tok * k..(tok + 1) * k], &reference.topk_ids[tok * k..(tok + 1) * k]);
            if gi.iter().all(|e| wi.contains(e)) {
                let (g, w) = (
                    &inter.moe_out[tok * hidden..(tok + 1) * hidden],
                    &reference.moe_out[tok * hidden..(tok + 1) * hidden],
                );
                let d = calc_diff(g, w);
                eprintln!("case {case}: moe_out token {tok}: calc_diff {d:.2e}");
                assert!(d < 3e-3, "case {case}: MoE branch of token {tok} differs: calc_diff {d:.3e}");
            }
        }

        // The same step again (the cache now holds the new token at the same slot) is bitwise identical.
        let mut out2 = DeviceTensor::<bf16>::zeros(&gpu, &[b, cfg.hidden]).unwrap();
        layer.forward(&gpu, &mut ws, &x, &mut cache, &batch, &mut out2, false).unwrap();
        assert_eq!(out2.to_host(&gpu).unwrap(), out.to_host(&gpu).unwrap(), "case {case}: not deterministic");
    }
}

#[test]
fn gpu_rejected_step_leaves_cache_and_output_untouched() {
    let Some(gpu) = test_gpu("gpu_rejected_step_leaves_cache_and_output_untouched") else { return };
    let cfg = DeepSeekV3Config::small();
    let prepared = PreparedLayer::new(&cfg, synthetic_layer_weights(&cfg, cfg.first_k_dense, 5).unwrap()).unwrap();
    let layer = DecodeLayer::upload(&gpu, &prepared).unwrap();
    // Sequence 1's first page is out of range; its new token lands on its (valid) second page. The step once
    // appended every new row before MLA's table check rejected the step, leaving the cache half-written.
    let mut s = setup(&cfg, &[20, 100], 64, 7);
    s.table[s.max_blocks] = -1;
    let to_bf16 = |v: &[f32]| v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>();
    let num_blocks = s.cache.len() / (s.page * 576);
    let cache0 = to_bf16(&s.cache);
    let mut cache = DeviceTensor::from_host(&gpu, &cache0, &[num_blocks, s.page, 576]).unwrap();
    let x = DeviceTensor::from_host(&gpu, &to_bf16(&s.x), &[2, cfg.hidden]).unwrap();
    let table = DeviceTensor::from_host(&gpu, &s.table, &[2, s.max_blocks]).unwrap();
    let seqlens = DeviceTensor::from_host(&gpu, &s.seqlens, &[2]).unwrap();
    let positions = DeviceTensor::from_host(&gpu, &[19, 99], &[2]).unwrap();
    let batch = DecodeBatch {
        block_table: table.as_tensor_ref(),
        block_table_host: &s.table,
        seqlens: seqlens.as_tensor_ref(),
        seqlens_host: &s.seqlens,
        positions: positions.as_tensor_ref(),
    };
    let mut ws = layer.workspace(&gpu, 2).unwrap();
    let out0 = vec![bf16::from_f32(7.0); 2 * cfg.hidden];
    let mut out = DeviceTensor::from_host(&gpu, &out0, &[2, cfg.hidden]).unwrap();
    let r = layer.forward(&gpu, &mut ws, &x, &mut cache, &batch, &mut out, false);
    assert!(matches!(r, Err(r1_kernels::Error::IndexOutOfRange { .. })), "{r:?}");
    gpu.synchronize().unwrap();
    let same = |a: &[bf16], b: &[bf16]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
    assert!(same(&cache.to_host(&gpu).unwrap(), &cache0), "the rejected step wrote the cache");
    assert!(same(&out.to_host(&gpu).unwrap(), &out0), "the rejected step wrote the output");
    // A workspace made for a layer of other dimensions is refused before anything runs.
    let other_cfg = DeepSeekV3Config { hidden: 384, ..cfg.clone() };
    let other = DecodeLayer::upload(
        &gpu,
        &PreparedLayer::new(&other_cfg, synthetic_layer_weights(&other_cfg, other_cfg.first_k_dense, 6).unwrap())
            .unwrap(),
    )
    .unwrap();
    let mut other_ws = other.workspace(&gpu, 2).unwrap();
    let r = layer.forward(&gpu, &mut other_ws, &x, &mut cache, &batch, &mut out, false);
    assert!(matches!(r, Err(r1_kernels::Error::InvalidConfig(_))), "{r:?}");
}

#[test]
fn gpu_captured_step_replays_with_changed_lengths() {
    use r1_kernels::cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
    let Some(gpu) = test_gpu("gpu_captured_step_replays_with_changed_lengths") else { return };
    let cfg = DeepSeekV3Config::small();
    let prepared = PreparedLayer::new(&cfg, synthetic_layer_weights(&cfg, cfg.first_k_dense, 8).unwrap()).unwrap();
    let layer = DecodeLayer::upload(&gpu, &prepared).unwrap();
    // One table of fixed width for every step: sequence s owns pages 5s .. 5s + 4 (320 tokens).
    let (b, page, width) = (3usize, 64usize, 5usize);
    let num_blocks = b * width + 1;
    let table_host: Vec<i32> = (0..(b * width) as i32).collect();
    let mut rng = SplitMix64::new(31);
    let mut random_bf16 = |n: usize| -> Vec<bf16> { bf16_vec(&mut rng, n, -1.0, 1.0) };
    let steps: [[i32; 3]; 3] = [[1, 20, 65], [100, 3, 250], [64, 320, 1]];
    let mut x = DeviceTensor::from_host(&gpu, &random_bf16(b * cfg.hidden), &[b, cfg.hidden]).unwrap();
    let mut cache =
        DeviceTensor::from_host(&gpu, &random_bf16(num_blocks * page * 576), &[num_blocks, page, 576]).unwrap();
    let table = DeviceTensor::from_host(&gpu, &table_host, &[b, width]).unwrap();
    let mut seqlens = DeviceTensor::from_host(&gpu, &steps[0], &[b]).unwrap();
    let mut positions = DeviceTensor::from_host(&gpu, &steps[0].map(|l| l - 1), &[b]).unwrap();
    let mut ws = layer.workspace(&gpu, b).unwrap();
    let mut out = DeviceTensor::<bf16>::zeros(&gpu, &[b, cfg.hidden]).unwrap();
    macro_rules! step {
        ($lens:expr) => {{
            let batch = DecodeBatch {
                block_table: table.as_tensor_ref(),
                block_table_host: &table_host,
                seqlens: seqlens.as_tensor_ref(),
                seqlens_host: &$lens[..],
                positions: positions.as_tensor_ref(),
            };
            layer.forward(&gpu, &mut ws, &x, &mut cache, &batch, &mut out, false)
        }};
    }
    // The first step outside the capture makes the workspace's MLA plan; then the step is captured once.
    step!(steps[0]).unwrap();
    gpu.preload().unwrap();
    gpu.synchronize().unwrap();
    // SAFETY: every buffer is used on this one stream only, so cudarc's cross-stream events are not needed.
    unsafe { gpu.context().disable_event_tracking() };
    gpu.stream().begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).unwrap();
    let captured = step!(steps[0]);
    let graph = gpu.stream().end_capture(CUgraphInstantiate_flags(0)).unwrap();
    unsafe { gpu.context().enable_event_tracking() };
    captured.unwrap();
    let graph = graph.expect("a captured graph");
    let bits = |t: &DeviceTensor<bf16>| t.to_host(&gpu).unwrap().iter().map(|v| v.to_bits()).collect::<Vec<u16>>();
    for lens in &steps[1..] {
        x.copy_from_host(&gpu, &random_bf16(b * cfg.hidden)).unwrap();
        cache.copy_from_host(&gpu, &random_bf16(num_blocks * page * 576)).unwrap();
        seqlens.copy_from_host(&gpu, lens).unwrap();
        positions.copy_from_host(&gpu, &lens.map(|l| l - 1)).unwrap();
        out.copy_from_host(&gpu, &vec![bf16::NAN; b * cfg.hidden]).unwrap();
        let cache_before = cache.to_host(&gpu).unwrap();
        graph.launch().unwrap();
        let (replay_out, replay_cache) = (bits(&out), bits(&cache));
        // Eager on the same inputs, from the same cache contents.
        cache.copy_from_host(&gpu, &cache_before).unwrap();
        step!(lens).unwrap();
        assert_eq!(replay_out, bits(&out), "lengths {lens:?}: replayed output equals eager bitwise");
        assert_eq!(replay_cache, bits(&cache), "lengths {lens:?}: replayed cache append equals eager bitwise");
        // And the eager step against the reference.
        let f32s = |v: Vec<bf16>| v.iter().map(|x| x.to_f32()).collect::<Vec<f32>>();
        let mut ref_cache = f32s(cache_before);
        let step = DecodeStep { block_table: &table_host, max_blocks: width, seqlens: &lens[..], page_size: page };
        let want = decode_layer(&prepared, &f32s(x.to_host(&gpu).unwrap()), &mut ref_cache, &step).unwrap();
        let diff = calc_diff(&f32s(out.to_host(&gpu).unwrap()), &want.out);
        assert!(diff < 2e-3, "lengths {lens:?}: layer output calc_diff {diff:.3e} against the reference");
    }
}
