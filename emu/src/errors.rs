//! Result codes: the failure type every entry point returns internally, and the names and descriptions
//! `cuGetErrorName` / `cuGetErrorString` report.

use std::ffi::{c_char, CStr};

use crate::entry::entry_before_init;
use crate::types::*;

/// Why an entry point failed: the code the caller sees and, when the cause is not obvious from the code alone, a
/// sentence printed to stderr (prefixed with "r1k-emu: " and the entry point's name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub code: CUresult,
    pub reason: Option<String>,
}

impl Failure {
    /// A failure whose code says it all (printed nothing), e.g. a null output pointer.
    pub fn quiet(code: CUresult) -> Self {
        Failure { code, reason: None }
    }

    /// A failure explained on stderr.
    pub fn new(code: CUresult, reason: impl Into<String>) -> Self {
        Failure { code, reason: Some(reason.into()) }
    }
}

/// Internal result of an entry point's body.
pub type DriverResult<T = ()> = Result<T, Failure>;

/// Returns early with a [`Failure`] explained on stderr.
macro_rules! fail {
    ($code:expr, $($fmt:tt)+) => {
        return Err($crate::errors::Failure::new($code, format!($($fmt)+)))
    };
}
pub(crate) use fail;

/// Every code of the cuda-12080 `cudaError_enum` with its name and the driver's description. cudarc transmutes
/// returned codes into that enum, so a code outside this table must never be returned.
const ERRORS: &[(CUresult, &str, &str)] = &[
    (0, "CUDA_SUCCESS", "no error"),
    (1, "CUDA_ERROR_INVALID_VALUE", "invalid argument"),
    (2, "CUDA_ERROR_OUT_OF_MEMORY", "out of memory"),
    (3, "CUDA_ERROR_NOT_INITIALIZED", "initialization error"),
    (4, "CUDA_ERROR_DEINITIALIZED", "driver shutting down"),
    (5, "CUDA_ERROR_PROFILER_DISABLED", "profiler disabled while using external profiling tool"),
    (6, "CUDA_ERROR_PROFILER_NOT_INITIALIZED", "profiler not initialized: call cudaProfilerInitialize()"),
    (7, "CUDA_ERROR_PROFILER_ALREADY_STARTED", "profiler already started"),
    (8, "CUDA_ERROR_PROFILER_ALREADY_STOPPED", "profiler already stopped"),
    (34, "CUDA_ERROR_STUB_LIBRARY", "CUDA driver is a stub library"),
    (46, "CUDA_ERROR_DEVICE_UNAVAILABLE", "CUDA-capable device(s) is/are busy or unavailable"),
    (100, "CUDA_ERROR_NO_DEVICE", "no CUDA-capable device is detected"),
    (101, "CUDA_ERROR_INVALID_DEVICE", "invalid device ordinal"),
    (102, "CUDA_ERROR_DEVICE_NOT_LICENSED", "device doesn't have valid Grid license"),
    (200, "CUDA_ERROR_INVALID_IMAGE", "device kernel image is invalid"),
    (201, "CUDA_ERROR_INVALID_CONTEXT", "invalid device context"),
    (202, "CUDA_ERROR_CONTEXT_ALREADY_CURRENT", "context already current"),
    (205, "CUDA_ERROR_MAP_FAILED", "mapping of buffer object failed"),
    (206, "CUDA_ERROR_UNMAP_FAILED", "unmapping of buffer object failed"),
    (207, "CUDA_ERROR_ARRAY_IS_MAPPED", "array is mapped"),
    (208, "CUDA_ERROR_ALREADY_MAPPED", "resource already mapped"),
    (209, "CUDA_ERROR_NO_BINARY_FOR_GPU", "no kernel image is available for execution on the device"),
    (210, "CUDA_ERROR_ALREADY_ACQUIRED", "resource already acquired"),
    (211, "CUDA_ERROR_NOT_MAPPED", "resource not mapped"),
    (212, "CUDA_ERROR_NOT_MAPPED_AS_ARRAY", "resource not mapped as array"),
    (213, "CUDA_ERROR_NOT_MAPPED_AS_POINTER", "resource not mapped as pointer"),
    (214, "CUDA_ERROR_ECC_UNCORRECTABLE", "uncorrectable ECC error encountered"),
    (215, "CUDA_ERROR_UNSUPPORTED_LIMIT", "limit is not supported on this architecture"),
    (216, "CUDA_ERROR_CONTEXT_ALREADY_IN_USE", "exclusive-thread device already in use by a different thread"),
    (217, "CUDA_ERROR_PEER_ACCESS_UNSUPPORTED", "peer access is not supported between these two devices"),
    (218, "CUDA_ERROR_INVALID_PTX", "a PTX JIT compilation failed"),
    (219, "CUDA_ERROR_INVALID_GRAPHICS_CONTEXT", "invalid OpenGL or DirectX context"),
    (220, "CUDA_ERROR_NVLINK_UNCORRECTABLE", "uncorrectable NVLink error detected during the execution"),
    (221, "CUDA_ERROR_JIT_COMPILER_NOT_FOUND", "PTX JIT compiler library not found"),
    (222, "CUDA_ERROR_UNSUPPORTED_PTX_VERSION", "the provided PTX was compiled with an unsupported toolchain."),
    (223, "CUDA_ERROR_JIT_COMPILATION_DISABLED", "PTX JIT compilation was disabled"),
    (224, "CUDA_ERROR_UNSUPPORTED_EXEC_AFFINITY", "the provided execution affinity is not supported"),
    (225, "CUDA_ERROR_UNSUPPORTED_DEVSIDE_SYNC", "the provided PTX contains unsupported call to cudaDeviceSynchronize"),
    (226, "CUDA_ERROR_CONTAINED", "an exception occurred on the device that is now contained by the GPU"),
    (300, "CUDA_ERROR_INVALID_SOURCE", "device kernel image is invalid"),
    (301, "CUDA_ERROR_FILE_NOT_FOUND", "file not found"),
    (302, "CUDA_ERROR_SHARED_OBJECT_SYMBOL_NOT_FOUND", "shared object symbol not found"),
    (303, "CUDA_ERROR_SHARED_OBJECT_INIT_FAILED", "shared object initialization failed"),
    (304, "CUDA_ERROR_OPERATING_SYSTEM", "OS call failed or operation not supported on this OS"),
    (400, "CUDA_ERROR_INVALID_HANDLE", "invalid resource handle"),
    (401, "CUDA_ERROR_ILLEGAL_STATE", "the operation cannot be performed in the present state"),
    (402, "CUDA_ERROR_LOSSY_QUERY", "attempted introspection would be semantically lossy"),
    (500, "CUDA_ERROR_NOT_FOUND", "named symbol not found"),
    (600, "CUDA_ERROR_NOT_READY", "device not ready"),
    (700, "CUDA_ERROR_ILLEGAL_ADDRESS", "an illegal memory access was encountered"),
    (701, "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES", "too many resources requested for launch"),
    (702, "CUDA_ERROR_LAUNCH_TIMEOUT", "the launch timed out and was terminated"),
    (703, "CUDA_ERROR_LAUNCH_INCOMPATIBLE_TEXTURING", "launch uses incompatible texturing mode"),
    (704, "CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED", "peer access is already enabled"),
    (705, "CUDA_ERROR_PEER_ACCESS_NOT_ENABLED", "peer access has not been enabled"),
    (708, "CUDA_ERROR_PRIMARY_CONTEXT_ACTIVE", "cannot set while device is active in this process"),
    (709, "CUDA_ERROR_CONTEXT_IS_DESTROYED", "context is destroyed"),
    (710, "CUDA_ERROR_ASSERT", "device-side assert triggered"),
    (711, "CUDA_ERROR_TOO_MANY_PEERS", "peer mapping resources exhausted"),
    (712, "CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED", "part or all of the requested memory range is already mapped"),
    (713, "CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED", "pointer does not correspond to a registered memory region"),
    (714, "CUDA_ERROR_HARDWARE_STACK_ERROR", "hardware stack error"),
    (715, "CUDA_ERROR_ILLEGAL_INSTRUCTION", "an illegal instruction was encountered"),
    (716, "CUDA_ERROR_MISALIGNED_ADDRESS", "misaligned address"),
    (717, "CUDA_ERROR_INVALID_ADDRESS_SPACE", "operation not supported on global/shared address space"),
    (718, "CUDA_ERROR_INVALID_PC", "invalid program counter"),
    (719, "CUDA_ERROR_LAUNCH_FAILED", "unspecified launch failure"),
    (720, "CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE", "too many blocks in cooperative launch"),
    (721, "CUDA_ERROR_TENSOR_MEMORY_LEAK", "tensor memory not completely freed"),
    (800, "CUDA_ERROR_NOT_PERMITTED", "operation not permitted"),
    (801, "CUDA_ERROR_NOT_SUPPORTED", "operation not supported"),
    (802, "CUDA_ERROR_SYSTEM_NOT_READY", "system not yet initialized"),
    (803, "CUDA_ERROR_SYSTEM_DRIVER_MISMATCH", "system has unsupported display driver / cuda driver combination"),
    (804, "CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE", "forward compatibility was attempted on non supported HW"),
    (805, "CUDA_ERROR_MPS_CONNECTION_FAILED", "MPS client failed to connect to the MPS control daemon or the MPS server"),
    (806, "CUDA_ERROR_MPS_RPC_FAILURE", "the remote procedural call between the MPS server and the MPS client failed"),
    (807, "CUDA_ERROR_MPS_SERVER_NOT_READY", "MPS server is not ready to accept new MPS client requests"),
    (808, "CUDA_ERROR_MPS_MAX_CLIENTS_REACHED", "the hardware resources required to create MPS client have been exhausted"),
    (809, "CUDA_ERROR_MPS_MAX_CONNECTIONS_REACHED", "the hardware resources required to support device connections have been exhausted"),
    (810, "CUDA_ERROR_MPS_CLIENT_TERMINATED", "the MPS client has been terminated by the server"),
    (811, "CUDA_ERROR_CDP_NOT_SUPPORTED", "the module is using CUDA Dynamic Parallelism, but the current configuration does not support it"),
    (812, "CUDA_ERROR_CDP_VERSION_MISMATCH", "the application is attempting to load CDP modules of mismatched versions"),
    (900, "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED", "operation not permitted when stream is capturing"),
    (901, "CUDA_ERROR_STREAM_CAPTURE_INVALIDATED", "operation failed due to a previous error during capture"),
    (902, "CUDA_ERROR_STREAM_CAPTURE_MERGE", "operation would result in a merge of separate capture sequences"),
    (903, "CUDA_ERROR_STREAM_CAPTURE_UNMATCHED", "capture was not ended in the same stream as it began"),
    (904, "CUDA_ERROR_STREAM_CAPTURE_UNJOINED", "capturing stream has unjoined work"),
    (905, "CUDA_ERROR_STREAM_CAPTURE_ISOLATION", "dependency created on uncaptured work in another stream"),
    (906, "CUDA_ERROR_STREAM_CAPTURE_IMPLICIT", "operation would make the legacy stream depend on a capturing blocking stream"),
    (907, "CUDA_ERROR_CAPTURED_EVENT", "operation not permitted on an event last recorded in a capturing stream"),
    (908, "CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD", "attempt to terminate a thread-local capture sequence from another thread"),
    (909, "CUDA_ERROR_TIMEOUT", "wait operation timed out"),
    (910, "CUDA_ERROR_GRAPH_EXEC_UPDATE_FAILURE", "the graph update was not performed because it included changes which violated constraints specific to instantiated graph update"),
    (911, "CUDA_ERROR_EXTERNAL_DEVICE", "an async error has occurred in a device outside of CUDA"),
    (912, "CUDA_ERROR_INVALID_CLUSTER_SIZE", "a kernel launch error has occurred due to cluster misconfiguration"),
    (913, "CUDA_ERROR_FUNCTION_NOT_LOADED", "the function handle is not loaded when calling an API that requires a loaded function"),
    (914, "CUDA_ERROR_INVALID_RESOURCE_TYPE", "one or more resources passed in are not valid resource types for the operation"),
    (915, "CUDA_ERROR_INVALID_RESOURCE_CONFIGURATION", "one or more resources are insufficient or non-applicable for the operation"),
    (916, "CUDA_ERROR_KEY_ROTATION", "an error happened during the key rotation sequence"),
    (999, "CUDA_ERROR_UNKNOWN", "unknown error"),
];

// NUL-terminated copies of the table's strings, built once: cuGetErrorName hands out pointers that must stay valid
// for the life of the process.
struct CStrings {
    names: Vec<Box<CStr>>,
    descriptions: Vec<Box<CStr>>,
}

fn c_strings() -> &'static CStrings {
    static STRINGS: std::sync::OnceLock<CStrings> = std::sync::OnceLock::new();
    STRINGS.get_or_init(|| {
        let owned = |s: &str| std::ffi::CString::new(s).expect("table strings hold no NUL").into_boxed_c_str();
        CStrings {
            names: ERRORS.iter().map(|(_, name, _)| owned(name)).collect(),
            descriptions: ERRORS.iter().map(|(_, _, text)| owned(text)).collect(),
        }
    })
}

fn index_of(code: CUresult) -> Option<usize> {
    ERRORS.iter().position(|(c, _, _)| *c == code)
}

/// True when `code` is a value of cudarc's `cudaError_enum` (so it may be returned to it).
pub fn is_known_code(code: CUresult) -> bool {
    index_of(code).is_some()
}

/// The symbolic name of `code` (`"CUDA_ERROR_INVALID_VALUE"`), if it is a known code.
pub fn error_name(code: CUresult) -> Option<&'static str> {
    index_of(code).map(|i| ERRORS[i].1)
}

#[no_mangle]
pub unsafe extern "C" fn cuGetErrorName(error: CUresult, p_str: *mut *const c_char) -> CUresult {
    entry_before_init("cuGetErrorName", || write_error_text(error, p_str, |s| &s.names))
}

#[no_mangle]
pub unsafe extern "C" fn cuGetErrorString(error: CUresult, p_str: *mut *const c_char) -> CUresult {
    entry_before_init("cuGetErrorString", || write_error_text(error, p_str, |s| &s.descriptions))
}

fn write_error_text(
    error: CUresult,
    p_str: *mut *const c_char,
    pick: impl Fn(&'static CStrings) -> &'static Vec<Box<CStr>>,
) -> DriverResult {
    if p_str.is_null() {
        return Err(Failure::quiet(CUDA_ERROR_INVALID_VALUE));
    }
    let text = index_of(error).map(|i| pick(c_strings())[i].as_ptr());
    // SAFETY: p_str is non-null and, per the API contract, points to writable storage for one pointer.
    unsafe { *p_str = text.unwrap_or(std::ptr::null()) };
    match text {
        Some(_) => Ok(()),
        None => Err(Failure::quiet(CUDA_ERROR_INVALID_VALUE)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_sorted_and_unique() {
        assert!(ERRORS.windows(2).all(|w| w[0].0 < w[1].0));
        assert_eq!(ERRORS.len(), 100, "the cuda-12080 cudaError_enum has 100 values");
    }

    #[test]
    fn names_and_strings() {
        let mut p: *const c_char = std::ptr::null();
        // SAFETY: p is a valid out-pointer; the returned string is static.
        unsafe {
            assert_eq!(cuGetErrorName(CUDA_ERROR_LAUNCH_FAILED, &mut p), CUDA_SUCCESS);
            assert_eq!(CStr::from_ptr(p).to_str().unwrap(), "CUDA_ERROR_LAUNCH_FAILED");
            assert_eq!(cuGetErrorString(CUDA_ERROR_INVALID_VALUE, &mut p), CUDA_SUCCESS);
            assert_eq!(CStr::from_ptr(p).to_str().unwrap(), "invalid argument");
            assert_eq!(cuGetErrorName(12345, &mut p), CUDA_ERROR_INVALID_VALUE);
            assert!(p.is_null());
            assert_eq!(cuGetErrorName(0, std::ptr::null_mut()), CUDA_ERROR_INVALID_VALUE);
        }
    }
}
