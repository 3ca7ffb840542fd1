//! The C++ execution engine's C ABI (cpp/emu_api.h) and safe wrappers around it.
//!
//! The engine is single-threaded: every call into it, not only launches, takes [`ENGINE`], because allocation
//! registration mutates the table a running launch reads. The driver never takes its own state lock while holding
//! this one, so the two cannot deadlock.

use std::ffi::{c_int, c_void, CStr};
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::errors::{is_known_code, DriverResult, Failure};
use crate::types::*;

/// `r1k_emu_launch_config`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineLaunchConfig {
    pub grid: [u32; 3],
    pub block: [u32; 3],
    /// {1,1,1} when launched without a cluster.
    pub cluster: [u32; 3],
    pub dynamic_smem_bytes: u32,
    /// The function's CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES.
    pub max_dynamic_smem_bytes: u32,
}

// Unit tests run against a Rust stand-in (mock_engine.rs), so the driver's own logic is tested without the engine.
#[cfg(not(test))]
mod ffi {
    use super::EngineLaunchConfig;
    use std::ffi::{c_char, c_int, c_void};

    extern "C" {
        pub fn r1k_emu_kernel_count() -> c_int;
        pub fn r1k_emu_kernel_name(i: c_int) -> *const c_char;
        pub fn r1k_emu_find_kernel(name: *const c_char) -> *const c_void;
        /// Sizes in bytes of the kernel's parameters, in order; returns how many it has (writing at most `max`).
        pub fn r1k_emu_kernel_param_sizes(kernel: *const c_void, sizes: *mut u32, max: c_int) -> c_int;
        pub fn r1k_emu_launch(
            kernel: *const c_void,
            config: *const EngineLaunchConfig,
            params: *mut *mut c_void,
            err: *mut c_char,
            err_len: usize,
        ) -> c_int;
        pub fn r1k_emu_register_alloc(ptr: u64, bytes: u64);
        pub fn r1k_emu_unregister_alloc(ptr: u64);
        pub fn r1k_emu_tensor_map_encode_tiled(
            map: *mut c_void,
            data_type: c_int,
            rank: u32,
            global_address: *mut c_void,
            global_dim: *const u64,
            global_strides: *const u64,
            box_dim: *const u32,
            element_strides: *const u32,
            interleave: c_int,
            swizzle: c_int,
            l2_promotion: c_int,
            oob_fill: c_int,
            err: *mut c_char,
            err_len: usize,
        ) -> c_int;
    }
}
#[cfg(test)]
use crate::mock_engine::*;
#[cfg(not(test))]
use ffi::*;

static ENGINE: Mutex<()> = Mutex::new(());

fn engine() -> MutexGuard<'static, ()> {
    // A panic while holding the lock leaves no Rust state behind it to repair.
    ENGINE.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The engine's opaque handle of a compiled kernel (a static object that lives as long as the process).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelHandle(usize);

impl KernelHandle {
    fn as_ptr(self) -> *const c_void {
        self.0 as *const c_void
    }
}

/// Names of every kernel compiled into the emulator.
pub fn kernel_names() -> Vec<String> {
    let _engine = engine();
    // SAFETY: the registry functions take no pointers from us; names are NUL-terminated static strings or null.
    unsafe {
        (0..r1k_emu_kernel_count().max(0))
            .filter_map(|i| {
                let name = r1k_emu_kernel_name(i);
                (!name.is_null()).then(|| CStr::from_ptr(name).to_string_lossy().into_owned())
            })
            .collect()
    }
}

/// The compiled kernel called `name`, if the emulator has it.
pub fn find_kernel(name: &CStr) -> Option<KernelHandle> {
    let _engine = engine();
    // SAFETY: `name` is NUL-terminated and outlives the call.
    let handle = unsafe { r1k_emu_find_kernel(name.as_ptr()) };
    (!handle.is_null()).then_some(KernelHandle(handle as usize))
}

/// Parameter sizes of a compiled kernel, as the engine's lifted signature has them.
pub fn kernel_param_sizes(kernel: KernelHandle) -> Vec<u32> {
    let _engine = engine();
    let mut sizes = vec![0u32; 64];
    loop {
        // SAFETY: `sizes` has room for `sizes.len()` entries; the engine writes at most that many.
        let count = unsafe { r1k_emu_kernel_param_sizes(kernel.as_ptr(), sizes.as_mut_ptr(), sizes.len() as c_int) };
        let count = count.max(0) as usize;
        if count <= sizes.len() {
            sizes.truncate(count);
            return sizes;
        }
        sizes.resize(count, 0);
    }
}

/// Registers device memory with the engine so its global-access checks accept it.
pub fn register_alloc(ptr: u64, bytes: u64) {
    let _engine = engine();
    // SAFETY: plain integers.
    unsafe { r1k_emu_register_alloc(ptr, bytes) }
}

/// Withdraws an allocation from the engine before it is freed.
pub fn unregister_alloc(ptr: u64) {
    let _engine = engine();
    // SAFETY: plain integer.
    unsafe { r1k_emu_unregister_alloc(ptr) }
}

const ERR_LEN: usize = 4096;

fn err_text(buf: &[u8]) -> String {
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let text = String::from_utf8_lossy(&buf[..end]).trim().to_string();
    if text.is_empty() {
        "(the engine gave no reason)".into()
    } else {
        text
    }
}

/// An engine result code as a CUresult cudarc can decode.
fn driver_code(code: c_int, fallback: CUresult) -> CUresult {
    let code = code as CUresult;
    if is_known_code(code) && code != CUDA_SUCCESS {
        code
    } else {
        fallback
    }
}

/// Runs `kernel` to completion on this thread.
///
/// # Safety
/// `params` must hold one pointer per kernel parameter, each to a value of that parameter's type, all valid for
/// the duration of the call.
pub unsafe fn launch(kernel: KernelHandle, config: &EngineLaunchConfig, params: *mut *mut c_void) -> DriverResult {
    let mut err = vec![0u8; ERR_LEN];
    let code = {
        let _engine = engine();
        // SAFETY: `config` and `err` are valid for the call; `params` per this function's contract.
        unsafe { r1k_emu_launch(kernel.as_ptr(), config, params, err.as_mut_ptr().cast(), err.len()) }
    };
    if code == 0 {
        return Ok(());
    }
    Err(Failure::new(driver_code(code, CUDA_ERROR_LAUNCH_FAILED), err_text(&err)))
}

/// Arguments of cuTensorMapEncodeTiled, forwarded unchanged.
pub struct TensorMapRequest {
    pub map: *mut c_void,
    pub data_type: u32,
    pub rank: u32,
    pub global_address: *mut c_void,
    pub global_dim: *const u64,
    pub global_strides: *const u64,
    pub box_dim: *const u32,
    pub element_strides: *const u32,
    pub interleave: u32,
    pub swizzle: u32,
    pub l2_promotion: u32,
    pub oob_fill: u32,
}

/// Encodes a tiled tensor map (the engine validates every documented requirement).
///
/// # Safety
/// The pointers must satisfy cuTensorMapEncodeTiled's contract for `rank`.
pub unsafe fn tensor_map_encode_tiled(r: &TensorMapRequest) -> DriverResult {
    let mut err = vec![0u8; ERR_LEN];
    let code = {
        let _engine = engine();
        // SAFETY: forwarded per this function's contract; `err` is valid for err.len() bytes.
        unsafe {
            r1k_emu_tensor_map_encode_tiled(
                r.map,
                r.data_type as c_int,
                r.rank,
                r.global_address,
                r.global_dim,
                r.global_strides,
                r.box_dim,
                r.element_strides,
                r.interleave as c_int,
                r.swizzle as c_int,
                r.l2_promotion as c_int,
                r.oob_fill as c_int,
                err.as_mut_ptr().cast(),
                err.len(),
            )
        }
    };
    if code == 0 {
        return Ok(());
    }
    // The driver prefixes messages with the entry point's name already.
    let reason = err_text(&err);
    let reason = reason.strip_prefix("cuTensorMapEncodeTiled:").map_or(reason.as_str(), str::trim_start);
    Err(Failure::new(driver_code(code, CUDA_ERROR_INVALID_VALUE), reason))
}
