//! Shared machinery of the property tests (`tests/fuzz_*.rs`): a seeded proptest runner per entry point, a tally of
//! how each case ended, and helpers for the property every case must satisfy: a typed error with every output buffer
//! bitwise untouched, or success with a result equal to the CPU reference.
//!
//! - `R1K_FUZZ_CASES`: cases per entry point (default 256);
//! - `R1K_FUZZ_SEED`: base seed (default 0x5eed); each entry point derives its own stream from it and its name, so a
//!   failing case replays with the same two variables whatever else runs.
//!
//! A panic inside the library is a failing case (proptest reports it with the shrunk input), never a pass.

// Each fuzz file uses a subset.
#![allow(dead_code)]

use std::sync::atomic::{AtomicU64, Ordering};

use proptest::strategy::Strategy;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use r1_kernels::cudarc::driver::DeviceRepr;
use r1_kernels::{bf16, DeviceTensor, Error, Gpu, E4M3};

/// Cases per entry point: `R1K_FUZZ_CASES`, default 256.
pub fn cases() -> u32 {
    std::env::var("R1K_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256)
}

/// Base seed: `R1K_FUZZ_SEED` (decimal or 0x-hex), default 0x5eed.
pub fn base_seed() -> u64 {
    let Ok(v) = std::env::var("R1K_FUZZ_SEED") else { return 0x5eed };
    match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).unwrap_or(0x5eed),
        None => v.parse().unwrap_or(0x5eed),
    }
}

/// How one case ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A typed error, outputs checked untouched.
    Rejected,
    /// Success, result checked against the reference.
    Matched,
}

/// Runs `cases()` cases of `strategy` through `body` with a runner seeded from the base seed and `name`, prints the
/// tally (`fuzz NAME: N cases: E Err, O Ok`: cases that passed as [`Outcome::Rejected`] and as [`Outcome::Matched`];
/// N also counts cases discarded by `prop_assume!` and shrinking steps) and fails on the first failing case (after
/// shrinking). Returns (errors, oks).
pub fn run<S: Strategy>(
    name: &str,
    strategy: S,
    body: impl Fn(S::Value) -> Result<Outcome, TestCaseError>,
) -> (u64, u64) {
    let seed = base_seed();
    // FNV-1a of the name, mixed with the base seed: one independent stream per entry point.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&h.to_le_bytes());
    let config = Config { cases: cases(), failure_persistence: None, max_shrink_iters: 512, ..Config::default() };
    let mut runner = TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &key));
    let (err, ok, total) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
    let result = runner.run(&strategy, |v| {
        total.fetch_add(1, Ordering::Relaxed);
        match body(v)? {
            Outcome::Rejected => err.fetch_add(1, Ordering::Relaxed),
            Outcome::Matched => ok.fetch_add(1, Ordering::Relaxed),
        };
        Ok(())
    });
    let (e, o) = (err.load(Ordering::Relaxed), ok.load(Ordering::Relaxed));
    eprintln!("fuzz {name}: {} cases: {e} Err, {o} Ok [R1K_FUZZ_SEED={seed:#x}]", total.load(Ordering::Relaxed));
    if let Err(failure) = result {
        panic!("fuzz {name} failed (R1K_FUZZ_SEED={seed:#x}, R1K_FUZZ_CASES={}): {failure}", cases());
    }
    (e, o)
}

/// Fails the case unless `cond`.
#[macro_export]
macro_rules! check {
    ($cond:expr, $($fmt:tt)+) => {
        let holds: bool = $cond;
        if !holds {
            return Err(proptest::test_runner::TestCaseError::fail(format!($($fmt)+)));
        }
    };
}

/// True for the errors a launcher's host validation returns (not a driver failure, not I/O).
pub fn is_validation_error(e: &Error) -> bool {
    matches!(
        e,
        Error::Shape { .. }
            | Error::Alignment { .. }
            | Error::IndexOutOfRange { .. }
            | Error::InvalidConfig(_)
            | Error::UnsupportedDevice { .. }
            | Error::DeviceMismatch { .. }
    )
}

/// Fails the case unless `e` is a validation error.
pub fn expect_validation_error(what: &str, e: &Error) -> Result<(), TestCaseError> {
    if is_validation_error(e) {
        Ok(())
    } else {
        Err(TestCaseError::fail(format!("{what}: expected a validation error, got {e:?}")))
    }
}

/// Element types with a recognizable poison pattern and a bit view for comparisons.
pub trait Poison: DeviceRepr + Copy + Default {
    /// The poison value of element `i` (varies with `i`, so a shifted or partial write shows).
    fn poison(i: usize) -> Self;
    /// The element's bits.
    fn bits(self) -> u64;
}

impl Poison for f32 {
    fn poison(i: usize) -> Self {
        f32::from_bits(0x7fa5_0000 | (i as u32 & 0xffff))
    }
    fn bits(self) -> u64 {
        u64::from(self.to_bits())
    }
}
impl Poison for bf16 {
    fn poison(i: usize) -> Self {
        bf16::from_bits(0x7fa0 | (i as u16 & 0xf))
    }
    fn bits(self) -> u64 {
        u64::from(self.to_bits())
    }
}
impl Poison for E4M3 {
    fn poison(i: usize) -> Self {
        E4M3(0xa5 ^ (i as u8 & 0x0f))
    }
    fn bits(self) -> u64 {
        u64::from(self.0)
    }
}
impl Poison for i32 {
    fn poison(i: usize) -> Self {
        0x5a5a_0000 | (i as i32 & 0xffff)
    }
    fn bits(self) -> u64 {
        self as u32 as u64
    }
}
impl Poison for i64 {
    fn poison(i: usize) -> Self {
        0x5a5a_5a5a_0000_0000 | (i as i64 & 0xffff)
    }
    fn bits(self) -> u64 {
        self as u64
    }
}
impl Poison for u8 {
    fn poison(i: usize) -> Self {
        0xa5 ^ (i as u8)
    }
    fn bits(self) -> u64 {
        u64::from(self)
    }
}

/// A device tensor of `shape` filled with the poison pattern, and that pattern.
pub fn poisoned<T: Poison>(gpu: &Gpu, shape: &[usize]) -> (DeviceTensor<T>, Vec<T>) {
    let n: usize = shape.iter().product();
    let host: Vec<T> = (0..n).map(T::poison).collect();
    (DeviceTensor::from_host(gpu, &host, shape).expect("upload"), host)
}

/// Fails the case unless `t` still holds exactly `want` (after synchronizing: a kernel launched by a call that then
/// failed would have finished).
pub fn untouched<T: Poison>(gpu: &Gpu, what: &str, t: &DeviceTensor<T>, want: &[T]) -> Result<(), TestCaseError> {
    gpu.synchronize().map_err(|e| TestCaseError::fail(format!("synchronize: {e}")))?;
    let got = t.to_host(gpu).map_err(|e| TestCaseError::fail(format!("download {what}: {e}")))?;
    if got.len() != want.len() {
        return Err(TestCaseError::fail(format!("{what}: {} elements, expected {}", got.len(), want.len())));
    }
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a.bits() != b.bits()) {
        return Err(TestCaseError::fail(format!(
            "{what}: element {i} was written by a call that failed ({:#x}, was {:#x})",
            got[i].bits(),
            want[i].bits()
        )));
    }
    Ok(())
}

/// Downloads `t` after synchronizing, as a case failure on error.
pub fn download<T: Poison>(gpu: &Gpu, what: &str, t: &DeviceTensor<T>) -> Result<Vec<T>, TestCaseError> {
    gpu.synchronize().map_err(|e| TestCaseError::fail(format!("synchronize after {what}: {e}")))?;
    t.to_host(gpu).map_err(|e| TestCaseError::fail(format!("download {what}: {e}")))
}

/// `shape` changed by `how` (0: unchanged; 1: a dimension dropped; 2: a dimension of 1 added; 3: one dimension + 1;
/// 4: one dimension − 1 (or + 2 when it is 0); 5: one dimension set to 0; 6: two dimensions swapped; 7: one dimension
/// doubled). `at` picks the dimension. The result can equal `shape` (e.g. swapping equal dimensions): compare.
pub fn perturb(shape: &[usize], how: u8, at: usize) -> Vec<usize> {
    let mut s = shape.to_vec();
    if s.is_empty() {
        return if how == 0 { s } else { vec![1] };
    }
    let i = at % s.len();
    match how {
        0 => {}
        1 => {
            s.remove(i);
        }
        2 => s.insert(i, 1),
        3 => s[i] += 1,
        4 => s[i] = if s[i] == 0 { 2 } else { s[i] - 1 },
        5 => s[i] = 0,
        6 => {
            let j = (i + 1) % s.len();
            s.swap(i, j);
        }
        _ => s[i] *= 2,
    }
    s
}

/// A proptest strategy for a shape perturbation: unchanged three times in four, else one of the seven kinds.
pub fn perturbation() -> impl Strategy<Value = (u8, usize)> + Clone {
    use proptest::prelude::*;
    (prop_oneof![6 => Just(0u8), 2 => 1u8..=7], 0usize..4)
}

/// Perturbations of `N` arguments: none at all half the time (so valid calls are common), else each argument
/// independently as [`perturbation`].
pub fn perturbations<const N: usize>() -> impl Strategy<Value = [(u8, usize); N]> {
    use proptest::prelude::*;
    let each: [_; N] = std::array::from_fn(|_| perturbation());
    prop_oneof![Just([(0u8, 0usize); N]), each]
}
