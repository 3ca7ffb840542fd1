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
//
// The engine linked into this library is the default; `R1K_EMU_ENGINE=/path/engine.so` makes the driver use another
// build of it instead (a standalone engine library exporting the same C ABI, e.g. one of the deliberately broken
// "mutant" kernel builds of scripts/emu-mutants).
#[cfg(not(test))]
mod ffi {
    use super::EngineLaunchConfig;
    use std::ffi::{c_char, c_int, c_void, CStr, CString};
    use std::sync::OnceLock;

    type LaunchFn =
        unsafe extern "C" fn(*const c_void, *const EngineLaunchConfig, *mut *mut c_void, *mut c_char, usize) -> c_int;
    type EncodeFn = unsafe extern "C" fn(
        *mut c_void,
        c_int,
        u32,
        *mut c_void,
        *const u64,
        *const u64,
        *const u32,
        *const u32,
        c_int,
        c_int,
        c_int,
        c_int,
        *mut c_char,
        usize,
    ) -> c_int;

    mod linked {
        use super::EngineLaunchConfig;
        use std::ffi::{c_char, c_int, c_void};
        extern "C" {
            pub fn r1k_emu_kernel_count() -> c_int;
            pub fn r1k_emu_kernel_name(i: c_int) -> *const c_char;
            pub fn r1k_emu_find_kernel(name: *const c_char) -> *const c_void;
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

    struct Api {
        kernel_count: unsafe extern "C" fn() -> c_int,
        kernel_name: unsafe extern "C" fn(c_int) -> *const c_char,
        find_kernel: unsafe extern "C" fn(*const c_char) -> *const c_void,
        kernel_param_sizes: unsafe extern "C" fn(*const c_void, *mut u32, c_int) -> c_int,
        launch: LaunchFn,
        register_alloc: unsafe extern "C" fn(u64, u64),
        unregister_alloc: unsafe extern "C" fn(u64),
        encode: EncodeFn,
    }

    extern "C" {
        fn dlopen(filename: *const c_char, flags: c_int) -> *mut c_void;
        fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void;
        fn dlerror() -> *const c_char;
    }
    const RTLD_NOW: c_int = 2;

    fn die(what: String) -> ! {
        eprintln!("r1k-emu: R1K_EMU_ENGINE: {what}");
        std::process::abort();
    }

    fn load(path: &std::ffi::OsStr) -> Api {
        use std::os::unix::ffi::OsStrExt;
        let cpath = CString::new(path.as_bytes()).unwrap_or_else(|_| die("path contains NUL".into()));
        // SAFETY: dlopen/dlsym/dlerror are called as documented; the library stays loaded for the process.
        unsafe {
            let handle = dlopen(cpath.as_ptr(), RTLD_NOW);
            if handle.is_null() {
                die(format!("cannot load {}: {}", path.to_string_lossy(), CStr::from_ptr(dlerror()).to_string_lossy()));
            }
            let sym = |name: &str| -> *mut c_void {
                let cname = CString::new(name).expect("symbol name");
                let p = dlsym(handle, cname.as_ptr());
                if p.is_null() {
                    die(format!("{} does not export {name}", path.to_string_lossy()));
                }
                p
            };
            Api {
                kernel_count: std::mem::transmute::<*mut c_void, unsafe extern "C" fn() -> c_int>(sym(
                    "r1k_emu_kernel_count",
                )),
                kernel_name: std::mem::transmute::<*mut c_void, unsafe extern "C" fn(c_int) -> *const c_char>(sym(
                    "r1k_emu_kernel_name",
                )),
                find_kernel: std::mem::transmute::<*mut c_void, unsafe extern "C" fn(*const c_char) -> *const c_void>(
                    sym("r1k_emu_find_kernel"),
                ),
                kernel_param_sizes: std::mem::transmute::<
                    *mut c_void,
                    unsafe extern "C" fn(*const c_void, *mut u32, c_int) -> c_int,
                >(sym("r1k_emu_kernel_param_sizes")),
                launch: std::mem::transmute::<*mut c_void, LaunchFn>(sym("r1k_emu_launch")),
                register_alloc: std::mem::transmute::<*mut c_void, unsafe extern "C" fn(u64, u64)>(sym(
                    "r1k_emu_register_alloc",
                )),
                unregister_alloc: std::mem::transmute::<*mut c_void, unsafe extern "C" fn(u64)>(sym(
                    "r1k_emu_unregister_alloc",
                )),
                encode: std::mem::transmute::<*mut c_void, EncodeFn>(sym("r1k_emu_tensor_map_encode_tiled")),
            }
        }
    }

    fn api() -> &'static Api {
        static API: OnceLock<Api> = OnceLock::new();
        API.get_or_init(|| match std::env::var_os("R1K_EMU_ENGINE") {
            Some(path) if !path.is_empty() => {
                eprintln!("r1k-emu: using the engine in {}", path.to_string_lossy());
                load(&path)
            }
            _ => Api {
                kernel_count: linked::r1k_emu_kernel_count,
                kernel_name: linked::r1k_emu_kernel_name,
                find_kernel: linked::r1k_emu_find_kernel,
                kernel_param_sizes: linked::r1k_emu_kernel_param_sizes,
                launch: linked::r1k_emu_launch,
                register_alloc: linked::r1k_emu_register_alloc,
                unregister_alloc: linked::r1k_emu_unregister_alloc,
                encode: linked::r1k_emu_tensor_map_encode_tiled,
            },
        })
    }

    pub unsafe fn r1k_emu_kernel_count() -> c_int {
        (api().kernel_count)()
    }
    pub unsafe fn r1k_emu_kernel_name(i: c_int) -> *const c_char {
        (api().kernel_name)(i)
    }
    pub unsafe fn r1k_emu_find_kernel(name: *const c_char) -> *const c_void {
        (api().find_kernel)(name)
    }
    /// Sizes in bytes of the kernel's parameters, in order; returns how many it has (writing at most `max`).
    pub unsafe fn r1k_emu_kernel_param_sizes(kernel: *const c_void, sizes: *mut u32, max: c_int) -> c_int {
        (api().kernel_param_sizes)(kernel, sizes, max)
    }
    pub unsafe fn r1k_emu_launch(
        kernel: *const c_void,
        config: *const EngineLaunchConfig,
        params: *mut *mut c_void,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int {
        (api().launch)(kernel, config, params, err, err_len)
    }
    pub unsafe fn r1k_emu_register_alloc(ptr: u64, bytes: u64) {
        (api().register_alloc)(ptr, bytes)
    }
    pub unsafe fn r1k_emu_unregister_alloc(ptr: u64) {
        (api().unregister_alloc)(ptr)
    }
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn r1k_emu_tensor_map_encode_tiled(
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
    ) -> c_int {
        (api().encode)(
            map,
            data_type,
            rank,
            global_address,
            global_dim,
            global_strides,
            box_dim,
            element_strides,
            interleave,
            swizzle,
            l2_promotion,
            oob_fill,
            err,
            err_len,
        )
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
