//! The wrapper every exported entry point runs its body in: call tracing, the cuInit requirement, stderr
//! explanations of failures, and a panic barrier (unwinding into C is undefined behaviour).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use crate::errors::{DriverResult, Failure};
use crate::types::*;

static INITIALIZED: AtomicBool = AtomicBool::new(false);

/// Marks the driver initialized (cuInit).
pub fn set_initialized() {
    INITIALIZED.store(true, Ordering::SeqCst);
}

/// `R1K_EMU_TRACE=1`: print every driver call's name to stderr.
fn tracing() -> bool {
    static TRACE: OnceLock<bool> = OnceLock::new();
    *TRACE.get_or_init(|| std::env::var("R1K_EMU_TRACE").is_ok_and(|v| v == "1"))
}

/// Runs an entry point that, like the real driver's, fails with CUDA_ERROR_NOT_INITIALIZED before cuInit.
pub fn entry(name: &'static str, body: impl FnOnce() -> DriverResult) -> CUresult {
    run(name, true, body)
}

/// Runs an entry point that works before cuInit (cuInit itself, cuDriverGetVersion, cuGetError*).
pub fn entry_before_init(name: &'static str, body: impl FnOnce() -> DriverResult) -> CUresult {
    run(name, false, body)
}

fn run(name: &'static str, needs_init: bool, body: impl FnOnce() -> DriverResult) -> CUresult {
    if tracing() {
        eprintln!("r1k-emu: {name}");
    }
    if needs_init && !INITIALIZED.load(Ordering::SeqCst) {
        return CUDA_ERROR_NOT_INITIALIZED;
    }
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => CUDA_SUCCESS,
        Ok(Err(Failure { code, reason })) => {
            if let Some(reason) = reason {
                eprintln!("r1k-emu: {name}: {reason}");
            }
            code
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("(non-string panic)");
            eprintln!("r1k-emu: {name}: internal error in the emulated driver: {what}");
            CUDA_ERROR_UNKNOWN
        }
    }
}

/// Writes `value` through an output pointer, failing with CUDA_ERROR_INVALID_VALUE when it is null.
///
/// # Safety
/// `ptr` must be null or valid for a write of `T`.
pub unsafe fn write_out<T>(ptr: *mut T, value: T) -> DriverResult {
    if ptr.is_null() {
        return Err(Failure::quiet(CUDA_ERROR_INVALID_VALUE));
    }
    // SAFETY: non-null, and valid for writes per this function's contract.
    unsafe { ptr.write_unaligned(value) };
    Ok(())
}
