//! Helpers shared by the GPU test files.
//!
//! On the emulated device (`Gpu::is_emulated`: the crate's kernels run on the CPU, thread by thread) the GPU tests
//! pick smaller shapes that keep every kernel path they cover; on a real GPU nothing changes. A test that shrinks
//! says so, in one line on stderr.

// Each test file uses a subset.
#![allow(dead_code)]

use std::fmt::Debug;

use r1_kernels::Gpu;

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
