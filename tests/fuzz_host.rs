//! Property tests of the host-side planners and validators and of the checkpoint loader: no device needed.
//!
//! Every case is seeded random input, valid or not (wrong ranks and shapes, misaligned dimensions, sizes at the 32-bit
//! boundaries that are only planned, never allocated, out-of-range indices and lengths, corrupted files). The
//! property: a typed error, or success with a result that satisfies what the kernels rely on (or, for the loader,
//! equals what was written); never a panic. `R1K_FUZZ_CASES` and `R1K_FUZZ_SEED` as in `tests/common/fuzz.rs`.

#[cfg(feature = "checkpoint")]
use std::fs;
#[cfg(feature = "checkpoint")]
use std::path::{Path, PathBuf};

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
#[cfg(feature = "checkpoint")]
use r1_kernels::checkpoint::{load_layer, write_layer_checkpoint, INDEX_FILE};
use r1_kernels::device::DeviceInfo;
use r1_kernels::fp8_gemm::{self, plan::force_sm90_config, ForcedSm90, GemmKernel, Resolved};
use r1_kernels::mla::{plan_splits, SplitMode};
#[cfg(feature = "checkpoint")]
use r1_kernels::model::{synthetic_layer_weights, DeepSeekV3Config, LayerWeights};
use r1_kernels::reference::mla::{validate_inputs, MlaConfig};
use r1_kernels::reference::moe::RouterConfig;
use r1_kernels::Error;

#[path = "common/fuzz.rs"]
#[macro_use]
mod fuzz;
use fuzz::{expect_validation_error, perturb, perturbations, Outcome};

/// A dimension: mostly small (valid and misaligned), sometimes at a 32- or 64-bit boundary.
fn dim() -> impl Strategy<Value = usize> + Clone {
    let max = fp8_gemm::plan::MAX_DIM;
    prop_oneof![
        2 => 0usize..300,
        6 => (0usize..40).prop_map(|x| x * 16),
        2 => prop::sample::select(vec![
            max - 16,
            max,
            max + 1,
            max + 16,
            (1 << 31) - 1,
            1 << 31,
            (1 << 32) - 16,
            1 << 32,
            (1 << 32) + 16,
            1 << 40,
            usize::MAX / 2,
            usize::MAX - 15,
            usize::MAX,
        ]),
        1 => (1usize..=(1 << 20)).prop_map(|x| x * 2048),
    ]
}

fn device_info() -> impl Strategy<Value = DeviceInfo> {
    (
        prop::sample::select(vec![(7, 5), (8, 0), (8, 9), (9, 0), (9, 0), (9, 0), (10, 0), (12, 0)]),
        prop::sample::select(vec![0u32, 1, 2, 3, 4, 78, 132, 132, 1 << 20, u32::MAX]),
        prop::sample::select(vec![0u32, 1024, 49_152, 101_376, 166_912, 232_448, 232_448, 1 << 20, u32::MAX]),
        any::<bool>(),
    )
        .prop_map(|(cc, sm_count, smem, emulated)| DeviceInfo {
            ordinal: 0,
            compute_capability: cc,
            sm_count,
            max_shared_memory_per_block_optin: smem,
            l2_cache_bytes: 50 << 20,
            emulated,
        })
}

fn kernel() -> impl Strategy<Value = GemmKernel> {
    prop::sample::select(vec![GemmKernel::Auto, GemmKernel::Portable, GemmKernel::Sm90, GemmKernel::Sm90Multicast])
}

/// The GEMM's five shapes for (m, n, k) (saturating for the absurd sizes, which must be rejected anyway).
fn gemm_shapes(m: usize, n: usize, k: usize) -> [Vec<usize>; 5] {
    let kb = k.div_ceil(128);
    let m_pad = m.div_ceil(4).saturating_mul(4);
    [vec![m, k], vec![kb, m_pad], vec![n, k], vec![n.div_ceil(128), kb], vec![m, n]]
}

/// What the kernels rely on in an sm_90a configuration, for a shape of `k_blocks` K blocks.
fn check_sm90_config(
    c: &fp8_gemm::Sm90Config,
    shape: &fp8_gemm::GemmShape,
    smem_limit: u32,
) -> Result<(), TestCaseError> {
    let kb = shape.k_blocks().max(1) as u64;
    check!(c.kernel_name().is_ok(), "no kernel for {c:?}");
    check!(c.smem_bytes <= smem_limit, "{c:?}: {} bytes of shared memory over the limit {smem_limit}", c.smem_bytes);
    check!((2..=fp8_gemm::plan::SM90_MAX_STAGES).contains(&c.stages), "{c:?}: stages");
    check!(c.grid >= 1 && c.k_splits >= 1 && c.kb_per_split >= 1, "{c:?}: empty grid or split");
    let (splits, per) = (u64::from(c.k_splits), u64::from(c.kb_per_split));
    check!(splits * per >= kb && (splits - 1) * per < kb, "{c:?}: splits do not cover {kb} K blocks exactly");
    let tiles = fp8_gemm::plan::num_tiles(shape, c.block_m, c.block_n);
    let items = if c.cluster_m == 2 { 2 * fp8_gemm::plan::mc2_num_pairs(shape, c.block_n) } else { tiles * splits };
    check!(u64::from(c.grid) <= items.max(1), "{c:?}: grid over {items} work items");
    check!(tiles.saturating_mul(kb) < 1 << 32, "{c:?}: 32-bit iteration count overflows");
    Ok(())
}

#[test]
fn fuzz_gemm_plan() {
    let strategy = ((dim(), dim(), dim()), perturbations::<5>(), any::<bool>(), kernel(), device_info());
    fuzz::run("fp8_gemm::plan", strategy, |((m, n, k), perts, accumulate, kernel, info)| {
        let want = gemm_shapes(m, n, k);
        let got: Vec<Vec<usize>> = want.iter().zip(&perts).map(|(s, &(how, at))| perturb(s, how, at)).collect();
        let shapes_exact = got.iter().zip(&want).all(|(g, w)| g == w);
        let dims_ok = m <= fp8_gemm::plan::MAX_DIM
            && n <= fp8_gemm::plan::MAX_DIM
            && k <= fp8_gemm::plan::MAX_DIM
            && k.is_multiple_of(16)
            && n.is_multiple_of(8);
        let r = fp8_gemm::plan(&got[0], &got[1], &got[2], &got[3], &got[4], accumulate, kernel, &info);
        let v = fp8_gemm::validate_shapes(&got[0], &got[1], &got[2], &got[3], &got[4]);
        check!(v.is_ok() == (shapes_exact && dims_ok), "validate_shapes {got:?}: {v:?}");
        match r {
            Err(e) => {
                expect_validation_error("plan", &e)?;
                Ok(Outcome::Rejected)
            }
            Ok(p) => {
                check!(shapes_exact && dims_ok, "plan accepted {got:?} (m={m} n={n} k={k}): {p:?}");
                check!(p.shape == fp8_gemm::GemmShape { m, n, k }, "{p:?}");
                let empty = m == 0 || n == 0 || k == 0;
                check!(empty == matches!(p.resolved, Resolved::Empty), "{p:?}");
                check!(p.zero_fill == (k == 0 && m > 0 && n > 0 && !accumulate), "{p:?}: zero_fill");
                match p.resolved {
                    Resolved::Empty => {}
                    Resolved::Portable { grid } => {
                        check!(
                            kernel == GemmKernel::Portable || !info.is_hopper(),
                            "{kernel:?} on hopper ran the portable kernel"
                        );
                        check!(info.compute_capability.0 >= 8, "portable kernel planned for {info:?}");
                        check!(grid == (m.div_ceil(64) as u32, n.div_ceil(64) as u32), "{p:?}: grid");
                        check!(grid.1 <= 65_535, "{p:?}: grid y");
                    }
                    Resolved::Sm90(c) => {
                        check!(info.is_hopper(), "sm_90a kernel planned for {info:?}");
                        check!((c.cluster_m == 2) == (kernel == GemmKernel::Sm90Multicast), "{c:?} for {kernel:?}");
                        check_sm90_config(&c, &p.shape, info.max_shared_memory_per_block_optin)?;
                    }
                }
                Ok(Outcome::Matched)
            }
        }
    });
}

#[test]
fn fuzz_gemm_forced_sm90_config() {
    let strategy = (
        (0usize..2000, (0usize..300).prop_map(|x| x * 8), (0usize..100).prop_map(|x| x * 16)),
        any::<bool>(),
        (
            prop_oneof![4 => prop::sample::select(vec![64u32, 128]), 1 => prop::sample::select(vec![0u32, 32, 256])],
            prop_oneof![
                4 => prop::sample::select(vec![64u32, 112, 128, 160]),
                1 => prop::sample::select(vec![0u32, 8, 96, 192, 256])
            ],
            prop_oneof![4 => 1u32..6, 1 => prop_oneof![Just(0u32), 6u32..40, Just(u32::MAX)]],
            prop_oneof![4 => 1u32..4, 1 => prop_oneof![Just(0u32), 4u32..20, Just(u32::MAX)]],
            prop_oneof![4 => Just(0u32), 1 => prop_oneof![1u32..10, Just(u32::MAX)]],
        ),
        prop::sample::select(vec![0u32, 100_000, 166_912, 232_448, 232_448, 232_448, u32::MAX]),
    );
    fuzz::run("fp8_gemm::plan::force_sm90_config", strategy, |((m, n, k), mc, (bm, bn, grid, ks, stages), smem)| {
        let hopper = DeviceInfo {
            ordinal: 0,
            compute_capability: (9, 0),
            sm_count: 132,
            max_shared_memory_per_block_optin: 232_448,
            l2_cache_bytes: 50 << 20,
            emulated: false,
        };
        let kernel = if mc { GemmKernel::Sm90Multicast } else { GemmKernel::Sm90 };
        let [a, sa, b, sb, o] = gemm_shapes(m, n, k);
        let p = fp8_gemm::plan(&a, &sa, &b, &sb, &o, false, kernel, &hopper)
            .map_err(|e| TestCaseError::fail(format!("valid shape m={m} n={n} k={k} rejected: {e}")))?;
        let Resolved::Sm90(planned) = p.resolved else { return Ok(Outcome::Rejected) };
        let f = ForcedSm90 { block_m: bm, block_n: bn, grid, k_splits: ks, stages };
        match force_sm90_config(&p.shape, &planned, &f, smem) {
            Err(e) => {
                check!(matches!(e, Error::InvalidConfig(_)), "forced {f:?}: {e:?}");
                Ok(Outcome::Rejected)
            }
            Ok(c) => {
                check!((c.block_m, c.block_n, c.grid) == (bm, bn, grid), "{f:?} → {c:?}");
                check!(stages == 0 || c.stages == stages, "{f:?} → {c:?}");
                check!(c.k_splits <= ks, "{f:?} → {c:?}");
                check_sm90_config(&c, &p.shape, smem)?;
                Ok(Outcome::Matched)
            }
        }
    });
}

fn seqlen() -> impl Strategy<Value = i32> {
    prop_oneof![
        6 => 0i32..300,
        1 => prop::sample::select(vec![-1, i32::MIN, i32::MAX, (1 << 30) + 7]),
    ]
}

#[test]
fn fuzz_mla_plan_splits() {
    let strategy = (
        prop::collection::vec(seqlen(), 0..6),
        prop_oneof![4 => 1usize..80, 1 => prop::sample::select(vec![0usize, 64, 1 << 31, usize::MAX])],
        prop_oneof![
            (prop_oneof![0usize..300, Just(usize::MAX)]).prop_map(|t| SplitMode::Balanced { target_ctas: t }),
            (prop_oneof![0usize..20, Just(usize::MAX)]).prop_map(|c| SplitMode::BatchInvariant { chunk_blocks: c }),
        ],
    );
    fuzz::run("mla::plan_splits", strategy, |(seqlens, page, mode)| {
        // Whole plans of more than a million items are not this property's business (memory, not validation).
        let total_blocks: u128 = seqlens.iter().map(|&l| (l.max(0) as u128).div_ceil(page.max(1) as u128)).sum();
        let items_bound = match mode {
            SplitMode::Balanced { target_ctas } => (target_ctas as u128).min(total_blocks) + seqlens.len() as u128,
            SplitMode::BatchInvariant { chunk_blocks } => {
                total_blocks / chunk_blocks.max(1) as u128 + seqlens.len() as u128
            }
        };
        prop_assume!(items_bound < 1_000_000);
        match plan_splits(&seqlens, page, mode) {
            Err(e) => {
                expect_validation_error("plan_splits", &e)?;
                let invalid = page == 0
                    || seqlens.iter().any(|&l| l < 0)
                    || matches!(
                        mode,
                        SplitMode::Balanced { target_ctas: 0 } | SplitMode::BatchInvariant { chunk_blocks: 0 }
                    );
                check!(invalid || matches!(e, Error::Shape { .. }), "valid input rejected: {e:?}");
                Ok(Outcome::Rejected)
            }
            Ok(p) => {
                check!(page > 0 && seqlens.iter().all(|&l| l >= 0), "accepted invalid {seqlens:?} page {page}");
                check!(p.batch() == seqlens.len() && p.page_size == page, "{p:?}");
                // Each sequence's pages are covered exactly once, in order, by consecutive splits.
                for (b, &len) in seqlens.iter().enumerate() {
                    let pages = (len as usize).div_ceil(page);
                    let mut mine: Vec<_> = p.items.iter().filter(|it| it.seq == b as i32).collect();
                    mine.sort_by_key(|it| it.split);
                    let mut next = 0usize;
                    for (s, it) in mine.iter().enumerate() {
                        check!(it.split == s as i32, "seq {b}: split numbers {mine:?}");
                        check!(it.start_block as usize == next && it.end_block > it.start_block, "seq {b}: {mine:?}");
                        next = it.end_block as usize;
                    }
                    check!(next == pages, "seq {b}: {next} of {pages} pages covered");
                    check!(p.num_splits(b) == mine.len(), "seq {b}: num_splits");
                }
                let co = &p.cta_offsets;
                check!(co.first() == Some(&0) && co.last() == Some(&(p.items.len() as i32)), "cta_offsets {co:?}");
                check!(co.windows(2).all(|w| w[0] < w[1]), "cta_offsets not increasing: {co:?}");
                check!(p.split_offsets.len() == seqlens.len() + 1, "split_offsets {:?}", p.split_offsets);
                Ok(Outcome::Matched)
            }
        }
    });
}

/// One way to make MLA inputs invalid (or, for `None`, keep them valid).
#[derive(Debug, Clone)]
enum MlaInputFault {
    None,
    /// A config field replaced: 0 s_q, 1 heads, 2 page_size, 3 softmax_scale, 4 batch (each by `value`).
    Config(u8, usize),
    /// q one element short or long, or the product of huge dimensions.
    QLen(bool),
    /// The cache not a whole number of pages, or absurdly long.
    CacheTokens(usize),
    /// A block-table entry a sequence reads.
    TableEntry(i32),
    /// A length past the table's capacity, or negative.
    Seqlen(i32),
    /// The table one entry short.
    TableLen,
}

fn mla_input_fault() -> impl Strategy<Value = MlaInputFault> {
    prop_oneof![
        4 => Just(MlaInputFault::None),
        1 => (0u8..5, prop::sample::select(vec![0usize, 1 << 31, 1 << 40, usize::MAX]))
            .prop_map(|(f, v)| MlaInputFault::Config(f, v)),
        1 => any::<bool>().prop_map(MlaInputFault::QLen),
        1 => prop::sample::select(vec![1usize, 7, usize::MAX]).prop_map(MlaInputFault::CacheTokens),
        1 => prop::sample::select(vec![-1i32, i32::MIN, i32::MAX, 0x4000_0000]).prop_map(MlaInputFault::TableEntry),
        1 => prop::sample::select(vec![-1i32, i32::MIN, i32::MAX, 1]).prop_map(MlaInputFault::Seqlen),
        1 => Just(MlaInputFault::TableLen),
    ]
}

#[test]
fn fuzz_mla_validate_inputs() {
    let strategy = (
        (1usize..4, 1usize..3, 1usize..5, prop::sample::select(vec![1usize, 16, 64, 100])),
        prop::collection::vec(0i32..300, 1..4),
        any::<bool>(),
        0usize..3,
        mla_input_fault(),
        any::<u64>(),
    );
    fuzz::run(
        "reference::mla::validate_inputs",
        strategy,
        |((_, s_q, heads, page_size), lens, causal, spare_pages, fault, seed)| {
            let batch = lens.len();
            let mut cfg = MlaConfig { batch, s_q, heads, page_size, softmax_scale: 0.1, causal };
            let pages: Vec<usize> = lens.iter().map(|&l| (l as usize).div_ceil(page_size)).collect();
            let max_blocks = pages.iter().copied().max().unwrap_or(0) + spare_pages;
            let num_blocks = pages.iter().sum::<usize>() + spare_pages;
            let mut table = vec![i32::MAX; batch * max_blocks];
            let mut next = (seed % (num_blocks.max(1) as u64)) as usize;
            for b in 0..batch {
                for j in 0..pages[b] {
                    table[b * max_blocks + j] = next as i32;
                    next = (next + 1) % num_blocks;
                }
            }
            let mut seqlens = lens.clone();
            let mut q_len = cfg.q_len();
            let mut cache_tokens = num_blocks * page_size;
            match fault {
                MlaInputFault::None => {}
                MlaInputFault::Config(0, v) => cfg.s_q = v,
                MlaInputFault::Config(1, v) => cfg.heads = v,
                MlaInputFault::Config(2, v) => cfg.page_size = v,
                MlaInputFault::Config(3, v) => cfg.softmax_scale = [0.0, f32::NAN, f32::INFINITY][v % 3],
                MlaInputFault::Config(_, v) => cfg.batch = v,
                MlaInputFault::QLen(longer) => q_len = if longer { q_len + 1 } else { q_len - 1 },
                MlaInputFault::CacheTokens(v) => cache_tokens = cache_tokens.wrapping_add(v),
                MlaInputFault::TableEntry(v) => {
                    if let Some(b) = (0..batch).find(|&b| pages[b] > 0) {
                        table[b * max_blocks + (seed as usize % pages[b])] = v;
                    }
                }
                MlaInputFault::Seqlen(v) => {
                    seqlens[seed as usize % batch] = if v == 1 { (max_blocks * page_size) as i32 + 1 } else { v }
                }
                MlaInputFault::TableLen => {
                    table.pop();
                }
            }
            let table_fault = matches!(fault, MlaInputFault::TableEntry(_)) && pages.iter().any(|&p| p > 0);
            let fault_free =
                matches!(fault, MlaInputFault::None) || (matches!(fault, MlaInputFault::TableEntry(_)) && !table_fault);
            match validate_inputs(q_len, cache_tokens, &table, &seqlens, &cfg) {
                Err(e) => {
                    expect_validation_error("validate_inputs", &e)?;
                    check!(!fault_free, "valid input rejected ({cfg:?}, lengths {seqlens:?}): {e}");
                    Ok(Outcome::Rejected)
                }
                Ok(d) => {
                    // Whatever the fault, an accepted input must satisfy everything the kernels rely on.
                    let want_q = cfg
                        .batch
                        .checked_mul(cfg.s_q)
                        .and_then(|x| x.checked_mul(cfg.heads))
                        .and_then(|x| x.checked_mul(576));
                    check!(Some(q_len) == want_q, "q_len {q_len} accepted for {cfg:?}");
                    check!(cfg.s_q > 0 && cfg.heads > 0 && cfg.page_size > 0, "{cfg:?} accepted");
                    check!(cfg.softmax_scale.is_finite() && cfg.softmax_scale != 0.0, "{cfg:?} accepted");
                    check!(seqlens.len() == cfg.batch, "{} lengths for {cfg:?}", seqlens.len());
                    check!(d.num_blocks * cfg.page_size == cache_tokens, "{d:?}: {cache_tokens} cache tokens");
                    check!(table.len() == cfg.batch * d.max_blocks, "{d:?}: table of {}", table.len());
                    for (b, &len) in seqlens.iter().enumerate() {
                        check!(len >= 0 && len as usize <= d.max_blocks * cfg.page_size, "seqlens[{b}] = {len}");
                        for j in 0..(len as usize).div_ceil(cfg.page_size) {
                            let e = table[b * d.max_blocks + j];
                            check!(e >= 0 && (e as usize) < d.num_blocks, "table entry {e} of seq {b} accepted");
                        }
                    }
                    Ok(Outcome::Matched)
                }
            }
        },
    );
}

#[test]
fn fuzz_router_config_validate() {
    let strategy = (
        prop_oneof![3 => prop::sample::select(vec![8usize, 16, 64, 256, 1024]), 1 => prop_oneof![0usize..20, Just(1025), Just(usize::MAX)]],
        prop_oneof![3 => 1usize..9, 1 => prop_oneof![Just(0usize), Just(32), Just(33), Just(usize::MAX)]],
        prop_oneof![3 => prop::sample::select(vec![1usize, 2, 4, 8]), 1 => prop_oneof![Just(0usize), 3usize..10, Just(32), Just(33), Just(usize::MAX)]],
        prop_oneof![3 => 1usize..5, 1 => prop_oneof![Just(0usize), 5usize..10, Just(usize::MAX)]],
        prop::sample::select(vec![1.0f32, 2.5, 2.5, 1.0, f32::NAN, f32::INFINITY, -1.0, 0.0]),
    );
    fuzz::run("reference::moe::RouterConfig::validate", strategy, |(e, k, g, kg, scale)| {
        let cfg = RouterConfig {
            num_experts: e,
            top_k: k,
            num_groups: g,
            topk_groups: kg,
            routed_scaling_factor: scale,
            ..RouterConfig::deepseek_v3()
        };
        match cfg.validate() {
            Err(e) => {
                check!(matches!(e, Error::InvalidConfig(_)), "{e:?}");
                Ok(Outcome::Rejected)
            }
            Ok(()) => {
                // What the router kernel relies on.
                check!((1..=1024).contains(&e) && (1..=32).contains(&g) && e.is_multiple_of(g), "{cfg:?}");
                check!((1..=g).contains(&kg) && (1..=32).contains(&k) && k <= kg * (e / g), "{cfg:?}");
                check!(scale.is_finite(), "{cfg:?}");
                Ok(Outcome::Matched)
            }
        }
    });
}

// ------------------------------------------------------------------------------------------- checkpoint loader
#[cfg(feature = "checkpoint")]
mod checkpoint_loader {
    use super::*;

    /// A fresh, empty directory.
    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("r1k-fuzz-ckpt-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// One way to damage a checkpoint directory.
    #[derive(Debug, Clone)]
    enum Damage {
        /// Cut shard `file` to `frac`/1000 of its length.
        Truncate { file: usize, frac: u32 },
        /// XOR `mask` into byte `pos`/1000 of the way through shard `file`'s header (the 8-byte length included).
        HeaderByte { file: usize, pos: u32, mask: u8 },
        /// Overwrite the 8-byte header length of shard `file`.
        HeaderLen { file: usize, len: u64 },
        /// Replace the header JSON of shard `file` by `json` (padded to the same length when it fits).
        HeaderJson { file: usize, json: String },
        /// XOR `mask` into byte `pos`/1000 of the way through shard `file`'s data.
        DataByte { file: usize, pos: u32, mask: u8 },
        /// Replace the index by `text`.
        Index { text: String },
        /// Remove the index, then damage a header byte (the loader then reads every shard's header).
        NoIndexHeaderByte { file: usize, pos: u32, mask: u8 },
        /// Append `extra` bytes after the last tensor of shard `file`.
        Append { file: usize, extra: Vec<u8> },
    }

    fn json_fragment() -> impl Strategy<Value = String> {
        prop::sample::select(vec![
            String::new(),
            "{".into(),
            "null".into(),
            "[]".into(),
            "{}".into(),
            r#"{"weight_map": 3}"#.into(),
            r#"{"weight_map": {"model.layers.0.input_layernorm.weight": 7}}"#.into(),
            r#"{"weight_map": {"model.layers.0.input_layernorm.weight": "missing.safetensors"}}"#.into(),
            r#"{"weight_map": {"model.layers.0.input_layernorm.weight": "../model.safetensors"}}"#.into(),
            r#"{"weight_map": {"model.layers.0.input_layernorm.weight": ""}}"#.into(),
            r#"{"a": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]}}"#.into(),
            r#"{"a": {"dtype": "BF16", "shape": [4], "data_offsets": [4, 0]}}"#.into(),
            r#"{"a": {"dtype": "F8_E4M3", "shape": [18446744073709551615, 2], "data_offsets": [0, 2]}}"#.into(),
            r#"{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 18446744073709551615]}}"#.into(),
            r#"{"a": {"dtype": "NOPE", "shape": [1], "data_offsets": [0, 1]}}"#.into(),
            r#"{"a": {"dtype": "BF16", "shape": [-1], "data_offsets": [0, 2]}}"#.into(),
            "\u{0}\u{0}\u{0}".into(),
            "\"\\ud800\"".into(),
        ])
    }

    fn damage() -> impl Strategy<Value = Damage> {
        let file = 0usize..2;
        prop_oneof![
            (file.clone(), 0u32..1000).prop_map(|(file, frac)| Damage::Truncate { file, frac }),
            (file.clone(), 0u32..1000, 1u8..=255).prop_map(|(file, pos, mask)| Damage::HeaderByte { file, pos, mask }),
            (file.clone(), prop_oneof![any::<u64>(), 0u64..16, Just(u64::MAX), Just(1 << 40)])
                .prop_map(|(file, len)| Damage::HeaderLen { file, len }),
            (file.clone(), json_fragment()).prop_map(|(file, json)| Damage::HeaderJson { file, json }),
            (file.clone(), 0u32..1000, 1u8..=255).prop_map(|(file, pos, mask)| Damage::DataByte { file, pos, mask }),
            prop_oneof![json_fragment(), "[ -~]{0,40}"].prop_map(|text| Damage::Index { text }),
            (file.clone(), 0u32..1000, 1u8..=255).prop_map(|(file, pos, mask)| Damage::NoIndexHeaderByte {
                file,
                pos,
                mask
            }),
            (file, prop::collection::vec(any::<u8>(), 1..64)).prop_map(|(file, extra)| Damage::Append { file, extra }),
        ]
    }

    /// The 8-byte length + header JSON span of a safetensors file, within the file (an earlier damage may have changed
    /// the length field or cut the file).
    fn header_span(bytes: &[u8]) -> usize {
        let Some(len) = bytes.get(..8) else { return bytes.len() };
        let n = u64::from_le_bytes(len.try_into().unwrap());
        usize::try_from(n).ok().and_then(|n| n.checked_add(8)).map_or(bytes.len(), |s| s.min(bytes.len()))
    }

    /// Applies `d` to the shards `files` (and the index in `dir`); true when only bytes the loader must check (never
    /// tensor data) were changed, so a successful load must return exactly what was written.
    fn apply(dir: &Path, files: &[PathBuf], d: &Damage) -> bool {
        let pick = |f: usize| &files[f % files.len()];
        match d {
            Damage::Truncate { file, frac } => {
                let mut b = fs::read(pick(*file)).unwrap();
                b.truncate(b.len() * *frac as usize / 1000);
                fs::write(pick(*file), b).unwrap();
                true
            }
            Damage::HeaderByte { file, pos, mask } | Damage::NoIndexHeaderByte { file, pos, mask } => {
                if matches!(d, Damage::NoIndexHeaderByte { .. }) {
                    let _ = fs::remove_file(dir.join(INDEX_FILE));
                }
                let mut b = fs::read(pick(*file)).unwrap();
                let span = header_span(&b);
                if span > 0 {
                    b[span * *pos as usize / 1000] ^= mask;
                }
                fs::write(pick(*file), b).unwrap();
                true
            }
            Damage::HeaderLen { file, len } => {
                let mut b = fs::read(pick(*file)).unwrap();
                b.resize(b.len().max(8), 0);
                b[..8].copy_from_slice(&len.to_le_bytes());
                fs::write(pick(*file), b).unwrap();
                true
            }
            Damage::HeaderJson { file, json } => {
                let b = fs::read(pick(*file)).unwrap();
                let span = header_span(&b);
                let mut header = json.clone().into_bytes();
                if header.len() <= span.saturating_sub(8) {
                    header.resize(span - 8, b' ');
                }
                let mut out = (header.len() as u64).to_le_bytes().to_vec();
                out.extend_from_slice(&header);
                out.extend_from_slice(&b[span..]);
                fs::write(pick(*file), out).unwrap();
                true
            }
            Damage::DataByte { file, pos, mask } => {
                let mut b = fs::read(pick(*file)).unwrap();
                let span = header_span(&b);
                let data = b.len() - span;
                if data > 0 {
                    b[span + data * *pos as usize / 1000] ^= mask;
                }
                fs::write(pick(*file), b).unwrap();
                data == 0
            }
            Damage::Index { text } => {
                fs::write(dir.join(INDEX_FILE), text).unwrap();
                true
            }
            Damage::Append { file, extra } => {
                let mut b = fs::read(pick(*file)).unwrap();
                b.extend_from_slice(extra);
                fs::write(pick(*file), b).unwrap();
                true
            }
        }
    }

    #[test]
    fn fuzz_checkpoint_loader_on_damaged_files() {
        let cfg = DeepSeekV3Config::reduced();
        let pristine = scratch("pristine");
        // Layer 0 is dense (small); layer 1 is an MoE layer.
        let layers: Vec<LayerWeights> =
            [0usize, 1].iter().map(|&l| synthetic_layer_weights(&cfg, l, 7).unwrap()).collect();
        let mut shards = Vec::new();
        for w in &layers {
            shards.push(write_layer_checkpoint(&pristine, &cfg, w).unwrap());
        }
        let work = scratch("work");
        let names: Vec<_> = fs::read_dir(&pristine).unwrap().map(|e| e.unwrap().file_name()).collect();
        let strategy = (0usize..2, prop::collection::vec(damage(), 1..3));
        fuzz::run("checkpoint::load_layer", strategy, |(which, damages)| {
            let _ = fs::remove_dir_all(&work);
            fs::create_dir_all(&work).unwrap();
            for name in &names {
                fs::copy(pristine.join(name), work.join(name)).unwrap();
            }
            let files: Vec<PathBuf> = shards[which].iter().map(|p| work.join(p.file_name().unwrap())).collect();
            let mut header_only = true;
            for d in &damages {
                header_only &= apply(&work, &files, d);
            }
            let layer = layers[which].layer;
            match load_layer(&work, &cfg, layer) {
                Err(e) => {
                    check!(matches!(e, Error::Io { .. }), "{damages:?}: expected Error::Io, got {e:?}");
                    Ok(Outcome::Rejected)
                }
                Ok(w) => {
                    check!(!header_only || w == layers[which], "{damages:?}: loaded weights differ from those written");
                    Ok(Outcome::Matched)
                }
            }
        });
        let _ = fs::remove_dir_all(&pristine);
        let _ = fs::remove_dir_all(&work);
    }
}

// ------------------------------------------------------------------------------------------------ regressions
// Failing cases found by the properties above (or by the overflow paths they drive), kept with their exact inputs.

/// `validate_inputs` computed the table's capacity as `max_blocks · page_size` unchecked: with a huge page size it
/// wrapped (to −2 here) and rejected a batch of empty sequences (in debug builds: an overflow panic).
#[test]
fn mla_validate_inputs_with_a_huge_page_accepts_empty_sequences() {
    let cfg = MlaConfig { batch: 1, s_q: 1, heads: 1, page_size: usize::MAX, softmax_scale: 0.1, causal: false };
    let d = validate_inputs(576, 0, &[5, 5], &[0], &cfg).unwrap();
    assert_eq!((d.num_blocks, d.max_blocks), (0, 2));
}

/// `validate_inputs` compared q's length with `batch·s_q·heads·576` computed unchecked: a panic in debug builds (and a
/// wrapped product in release).
#[test]
fn mla_validate_inputs_with_overflowing_sizes_is_an_error() {
    for (batch, s_q, heads) in [(1usize << 62, 4usize, 1usize), (1, usize::MAX, 2), (1, 1, 1 << 60)] {
        let cfg = MlaConfig { batch, s_q, heads, page_size: 64, softmax_scale: 0.1, causal: false };
        let r = validate_inputs(0, 0, &[], &[], &cfg);
        assert!(matches!(r, Err(Error::Shape { arg: "q", .. })), "{cfg:?}: {r:?}");
    }
}
