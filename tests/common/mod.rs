//! Helpers shared by the GPU test files.
//!
//! On the emulated device (`Gpu::is_emulated`: the crate's kernels run on the CPU, thread by thread) the GPU tests
//! pick smaller shapes that keep every kernel path they cover; on a real GPU nothing changes. A test that shrinks
//! says so, in one line on stderr.

// Each test file uses a subset.
#![allow(dead_code)]

use std::fmt::Debug;
use std::ops::Range;

use r1_kernels::rng::SplitMix64;
use r1_kernels::{bf16, Gpu, E4M3};

/// `real` on a real GPU; on the emulated device `emulated`, announced as
/// "emulated device: <test> uses <emulated> instead of <real>".
pub fn emu_shrink<T: Debug>(gpu: &Gpu, test: &str, real: T, emulated: T) -> T {
    if gpu.is_emulated() {
        eprintln!("emulated device: {test} uses {emulated:?} instead of {real:?}");
        emulated
    } else {
        real
    }
}

/// Like [`emu_shrink`], with the two choices described in words (for shapes that are computed, not listed).
pub fn emu_shrink_described<T>(gpu: &Gpu, test: &str, real: (T, &str), emulated: (T, &str)) -> T {
    if gpu.is_emulated() {
        eprintln!("emulated device: {test} uses {} instead of {}", emulated.1, real.1);
        emulated.0
    } else {
        real.0
    }
}

/// Whether the sm_90a part of a test that also checks the portable kernels can run. On another device it says
/// SKIPPED for that part (or, with `R1K_REQUIRE_GPU=1`, fails): a test never narrows its coverage in silence.
pub fn sm90_part(gpu: &Gpu, test: &str) -> bool {
    if gpu.info().is_hopper() {
        return true;
    }
    if std::env::var("R1K_REQUIRE_GPU").is_ok_and(|v| v == "1") {
        panic!(
            "{test}: R1K_REQUIRE_GPU=1 but the GPU is {}, not sm_90: the sm_90a kernels cannot run",
            gpu.info().arch_name()
        );
    }
    eprintln!("SKIPPED {test} (sm_90a part): needs sm_90, found {}", gpu.info().arch_name());
    false
}

type LaunchCount = unsafe extern "C" fn(*const std::ffi::c_char) -> u64;

/// The emulated driver's per-thread launch counter (`r1k_emu_launch_count`, not part of CUDA).
fn emulator_launch_counter() -> LaunchCount {
    use std::sync::OnceLock;
    static COUNTER: OnceLock<(libloading::Library, LaunchCount)> = OnceLock::new();
    COUNTER
        .get_or_init(|| {
            // SAFETY: libcuda.so is already loaded (cudarc opened it to create the context), so this only takes
            // another reference to the same library, whose initializers have run.
            let lib = unsafe { libloading::Library::new("libcuda.so") }.expect("the emulated libcuda.so");
            // SAFETY: the emulator defines the symbol with exactly this signature (emu/src/launch.rs).
            let f: LaunchCount = *unsafe { lib.get::<LaunchCount>(b"r1k_emu_launch_count\0") }
                .expect("the emulated driver exports r1k_emu_launch_count");
            (lib, f)
        })
        .1
}

fn launches_of(name: &str) -> u64 {
    let c = std::ffi::CString::new(name).expect("kernel name");
    // SAFETY: a NUL-terminated string, as the function requires.
    unsafe { emulator_launch_counter()(c.as_ptr()) }
}

/// Runs `body` and, on the emulated device, checks that it launched every kernel in `kernels` (entry-point names as
/// in kernels/*.cu) at least once from this thread: a test states which kernels it covers, and a planner change that
/// silently routes it elsewhere fails it. Every `extern "C"` kernel must be named in some `expect_launched` list
/// (tests/coverage.rs checks that on the CPU). On a real GPU the launches are not observable and only `body` runs.
pub fn expect_launched<R>(gpu: &Gpu, kernels: &[&str], body: impl FnOnce() -> R) -> R {
    if !gpu.is_emulated() {
        return body();
    }
    let before: Vec<u64> = kernels.iter().map(|k| launches_of(k)).collect();
    let out = body();
    for (k, b) in kernels.iter().zip(before) {
        assert!(launches_of(k) > b, "expected a launch of kernel `{k}`, but this test did not launch it");
    }
    out
}

// ------------------------------------------------------------------------------------------------ random data
//
// All test data comes from the crate's own generator, `r1_kernels::rng::SplitMix64`, seeded by a constant per test,
// so a failing case reproduces on every machine.

/// A uniform integer in `range` (half-open, not empty).
pub fn int_in(rng: &mut SplitMix64, range: Range<i32>) -> i32 {
    assert!(range.start < range.end, "empty range {range:?}");
    let span = (range.end as i64 - range.start as i64) as u64;
    (range.start as i64 + rng.below(span) as i64) as i32
}

/// A uniform index in `0..n` (`n > 0`).
pub fn index_below(rng: &mut SplitMix64, n: usize) -> usize {
    assert!(n > 0, "no index below 0");
    rng.below(n as u64) as usize
}

/// A uniform random byte.
pub fn random_byte(rng: &mut SplitMix64) -> u8 {
    (rng.next_u64() >> 56) as u8
}

/// `items` in a uniformly random order (Fisher–Yates).
pub fn shuffle<T>(rng: &mut SplitMix64, items: &mut [T]) {
    for i in (1..items.len()).rev() {
        items.swap(i, index_below(rng, i + 1));
    }
}

/// `n` values uniform in `[lo, hi)`.
pub fn uniform_vec(rng: &mut SplitMix64, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| rng.uniform(lo, hi)).collect()
}

/// `n` bf16 values: uniform in `[lo, hi)`, rounded to bf16.
pub fn bf16_vec(rng: &mut SplitMix64, n: usize, lo: f32, hi: f32) -> Vec<bf16> {
    (0..n).map(|_| bf16::from_f32(rng.uniform(lo, hi))).collect()
}

/// `n` random E4M3 codes, never NaN (the NaN patterns 0x7f and 0xff become ±448).
pub fn finite_e4m3_codes(rng: &mut SplitMix64, n: usize) -> Vec<E4M3> {
    (0..n).map(|_| random_byte(rng)).map(|b| E4M3(if b & 0x7f == 0x7f { b - 1 } else { b })).collect()
}

/// A random power of two in [2^-2, 2^2]: the factor test data uses per scale block, so that a scale read from the
/// wrong block is an O(1) error rather than one inside rounding noise.
pub fn block_magnitude(rng: &mut SplitMix64) -> f32 {
    2f32.powi(int_in(rng, -2..3))
}

// ------------------------------------------------------------------------------------------------ paged caches

/// Page ids `0..num_blocks` in a random order (so sequences get scattered, non-monotonic pages).
pub fn shuffled_pages(rng: &mut SplitMix64, num_blocks: usize) -> Vec<i32> {
    let mut pages: Vec<i32> = (0..num_blocks as i32).collect();
    shuffle(rng, &mut pages);
    pages
}

/// A block table `[lens.len(), max_blocks]`: each sequence's `ceil(len / page)` pages taken in turn from `pages`,
/// `unused` in the entries past them (which no kernel may read).
pub fn block_table(lens: &[i32], page: usize, max_blocks: usize, pages: &[i32], unused: i32) -> Vec<i32> {
    let mut table = vec![unused; lens.len() * max_blocks];
    let mut next = pages.iter();
    for (s, &len) in lens.iter().enumerate() {
        for blk in 0..(len.max(0) as usize).div_ceil(page).min(max_blocks) {
            table[s * max_blocks + blk] = *next.next().expect("enough pages for the lengths");
        }
    }
    table
}

/// A paged cache of `num_blocks` pages of `page` tokens × `width`: bf16-representable values uniform in
/// `[lo, hi)` at the first `tokens[s]` positions of each sequence (through its table row, skipping entries outside
/// the cache), NaN everywhere else, so a kernel that reads past a length or a wrong page shows.
#[allow(clippy::too_many_arguments)]
pub fn paged_cache(
    rng: &mut SplitMix64,
    num_blocks: usize,
    page: usize,
    width: usize,
    table: &[i32],
    max_blocks: usize,
    tokens: &[usize],
    (lo, hi): (f32, f32),
) -> Vec<f32> {
    let mut cache = vec![f32::NAN; num_blocks * page * width];
    for (s, &n) in tokens.iter().enumerate() {
        for pos in 0..n.min(max_blocks * page) {
            let block = table[s * max_blocks + pos / page];
            if (0..num_blocks as i32).contains(&block) {
                let slot = (block as usize * page + pos % page) * width;
                for v in &mut cache[slot..slot + width] {
                    *v = bf16::from_f32(rng.uniform(lo, hi)).to_f32();
                }
            }
        }
    }
    cache
}
