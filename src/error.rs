//! The crate's one error type. Every launcher validates its arguments on the host and returns one of these instead of
//! panicking or launching a kernel that could read or write out of bounds.

use std::fmt;

use cudarc::driver::sys::CUresult;
use cudarc::driver::DriverError;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in `r1-kernels`.
///
/// Non-exhaustive: later versions may add variants, so a `match` needs a `_` arm.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Error {
    /// An argument's shape (or length) does not match what the operation needs.
    Shape {
        /// Which argument, e.g. `"a"` or `"scales_b"`.
        arg: &'static str,
        /// What was expected, in words or as a shape.
        expected: String,
        /// What was given.
        got: String,
    },
    /// A pointer, stride or dimension does not meet an alignment requirement.
    Alignment {
        /// Which argument.
        arg: &'static str,
        /// Required alignment (bytes for pointers, elements for dimensions).
        required: usize,
        /// The offending value.
        got: usize,
    },
    /// An index (expert id, block-table entry, ...) is out of range.
    IndexOutOfRange {
        /// Which argument holds the index.
        arg: &'static str,
        /// Position of the offending entry.
        position: usize,
        /// The offending value.
        value: i64,
        /// Valid values are `0..bound`.
        bound: i64,
    },
    /// A configuration value is invalid (e.g. top-k larger than the number of experts).
    InvalidConfig(String),
    /// The GPU is not one this kernel supports (most fast paths need sm_90a).
    UnsupportedDevice {
        /// The kernel or operation that needs it, e.g. `"fp8_gemm (Sm90 kernel)"`.
        kernel: String,
        /// What the kernel needs.
        needs: &'static str,
        /// What was found, e.g. `"sm_86"`.
        found: String,
    },
    /// No CUDA driver (libcuda) could be loaded on this machine.
    NoCudaDriver,
    /// The crate was built without nvcc, so no GPU kernels are embedded.
    KernelsNotBuilt,
    /// There is no CUDA device with this ordinal.
    NoSuchDevice {
        /// The ordinal asked for.
        ordinal: usize,
        /// How many devices the driver reports.
        count: usize,
    },
    /// A CUDA driver call failed. [`Error::is_out_of_memory`] tells an allocation failure apart.
    Cuda {
        /// The driver call (or the operation, when several calls make it up), e.g. `"cuMemAllocAsync"`.
        call: &'static str,
        /// The `CUresult` value, e.g. 2 for `CUDA_ERROR_OUT_OF_MEMORY`.
        code: i32,
        /// The `CUresult` name, e.g. `"CUDA_ERROR_OUT_OF_MEMORY"`.
        name: String,
    },
    /// A call into a CUDA library other than the driver (cuBLAS, for the `bench-tools` ceilings) failed, or the
    /// library could not be loaded.
    CudaLibrary {
        /// The library call, e.g. `"cublasGemmEx"`.
        call: &'static str,
        /// The library's status or what went wrong.
        message: String,
    },
    /// A tensor lives on a different device than the [`Gpu`](crate::Gpu) it was passed with.
    DeviceMismatch {
        /// Which argument.
        arg: &'static str,
        /// The ordinal of the `Gpu`.
        expected: usize,
        /// The ordinal of the tensor's device.
        got: usize,
    },
    /// A file (e.g. a checkpoint) could not be read or written, or its contents are malformed
    /// ([`std::io::ErrorKind::InvalidData`]).
    Io {
        /// The kind of the underlying I/O error; `InvalidData` for malformed contents.
        kind: std::io::ErrorKind,
        /// What failed, naming the file (and the tensor or line where there is one).
        message: String,
    },
}

impl Error {
    /// Shorthand for a shape mismatch.
    pub fn shape(arg: &'static str, expected: impl fmt::Display, got: impl fmt::Display) -> Self {
        Error::Shape { arg, expected: expected.to_string(), got: got.to_string() }
    }

    /// The error of a failed driver call `call`, keeping the `CUresult`.
    pub fn cuda(call: &'static str, e: DriverError) -> Self {
        // The enum's own name (its Debug form), not cuGetErrorName: no driver call is needed to describe an error.
        Error::Cuda { call, code: e.0 as i32, name: format!("{:?}", e.0) }
    }

    /// Malformed contents (of a checkpoint, a results file): an [`Error::Io`] of kind `InvalidData`.
    pub fn invalid_data(message: impl Into<String>) -> Self {
        Error::Io { kind: std::io::ErrorKind::InvalidData, message: message.into() }
    }

    /// An I/O error `e` with what was being done, e.g. the file's path; keeps `e.kind()`.
    pub fn io(context: impl fmt::Display, e: &std::io::Error) -> Self {
        Error::Io { kind: e.kind(), message: format!("{context}: {e}") }
    }

    /// True when a CUDA allocation failed for lack of device memory (`CUDA_ERROR_OUT_OF_MEMORY`): an engine can free
    /// memory (preempt, evict cache blocks) and retry.
    pub fn is_out_of_memory(&self) -> bool {
        matches!(self, Error::Cuda { code, .. } if *code == CUresult::CUDA_ERROR_OUT_OF_MEMORY as i32)
    }
}

/// Names the driver call of a cudarc result, for [`Error::Cuda`].
pub(crate) trait CudaCall<T> {
    fn cuda_call(self, call: &'static str) -> Result<T>;
}

impl<T> CudaCall<T> for std::result::Result<T, DriverError> {
    fn cuda_call(self, call: &'static str) -> Result<T> {
        self.map_err(|e| Error::cuda(call, e))
    }
}

/// Converts a size to the `i32` a kernel argument takes, or a shape error naming `arg`.
pub(crate) fn to_i32(arg: &'static str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::shape(arg, "a value below 2^31", v))
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Shape { arg, expected, got } => {
                write!(f, "shape mismatch for `{arg}`: expected {expected}, got {got}")
            }
            Error::Alignment { arg, required, got } => {
                write!(f, "alignment error for `{arg}`: must be a multiple of {required}, got {got}")
            }
            Error::IndexOutOfRange { arg, position, value, bound } => {
                write!(f, "index out of range in `{arg}` at position {position}: {value} is not in 0..{bound}")
            }
            Error::InvalidConfig(msg) => write!(f, "invalid configuration: {msg}"),
            Error::UnsupportedDevice { kernel, needs, found } => {
                write!(f, "unsupported device: {kernel} needs {needs}, found {found}")
            }
            Error::NoCudaDriver => write!(
                f,
                "no CUDA driver found (libcuda could not be loaded); GPU kernels are unavailable on this machine"
            ),
            Error::KernelsNotBuilt => write!(
                f,
                "r1-kernels was built without nvcc, so no GPU kernels are embedded: install the CUDA toolkit's nvcc \
                 (or set NVCC or CUDA_HOME to it) and rebuild r1-kernels (`cargo clean -p r1-kernels`); enable the \
                 `require-kernels` feature to make a build without nvcc an error"
            ),
            Error::NoSuchDevice { ordinal, count } => {
                write!(f, "no CUDA device with ordinal {ordinal} ({count} present)")
            }
            Error::Cuda { call, code, name } => write!(f, "CUDA driver error in {call}: {name} ({code})"),
            Error::CudaLibrary { call, message } => write!(f, "CUDA library error in {call}: {message}"),
            Error::DeviceMismatch { arg, expected, got } => {
                write!(f, "device mismatch for `{arg}`: the GPU is device {expected}, the tensor is on device {got}")
            }
            Error::Io { kind, message } => write!(f, "I/O error ({kind}): {message}"),
        }
    }
}

/// `source()` is `None` for every variant: none wraps another error value. The driver's `CUresult` (code and name)
/// and the OS error's [`std::io::ErrorKind`] are kept as fields instead, so `Error` stays `Clone + PartialEq` and
/// formatting it never calls into the driver (cudarc's `DriverError` formats itself through `cuGetErrorString`).
impl std::error::Error for Error {}

/// A driver error from a cudarc call the crate does not name: `call` says so.
impl From<DriverError> for Error {
    fn from(e: DriverError) -> Self {
        Error::cuda("a CUDA driver call", e)
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Io { kind: e.kind(), message: e.to_string() }
    }
}

#[cfg(test)]
mod tests {
    use std::io::ErrorKind;

    use super::*;

    #[test]
    fn out_of_memory_is_told_apart_by_the_curesult() {
        let oom = Error::cuda("cuMemAllocAsync", DriverError(CUresult::CUDA_ERROR_OUT_OF_MEMORY));
        assert!(oom.is_out_of_memory());
        assert_eq!(oom, Error::Cuda { call: "cuMemAllocAsync", code: 2, name: "CUDA_ERROR_OUT_OF_MEMORY".into() });
        assert_eq!(oom.to_string(), "CUDA driver error in cuMemAllocAsync: CUDA_ERROR_OUT_OF_MEMORY (2)");

        let illegal = Error::from(DriverError(CUresult::CUDA_ERROR_ILLEGAL_ADDRESS));
        assert!(!illegal.is_out_of_memory());
        assert_eq!(illegal.to_string(), "CUDA driver error in a CUDA driver call: CUDA_ERROR_ILLEGAL_ADDRESS (700)");
        assert!(!Error::InvalidConfig("out of memory".into()).is_out_of_memory());
        assert!(!Error::CudaLibrary { call: "cublasCreate", message: "CUBLAS_STATUS_ALLOC_FAILED".into() }
            .is_out_of_memory());
    }

    #[test]
    fn cuda_call_names_the_failed_call_and_passes_values_through() {
        let failed: std::result::Result<u32, DriverError> = Err(DriverError(CUresult::CUDA_ERROR_INVALID_VALUE));
        assert_eq!(
            failed.cuda_call("cuModuleLoadData"),
            Err(Error::Cuda { call: "cuModuleLoadData", code: 1, name: "CUDA_ERROR_INVALID_VALUE".into() })
        );
        let ok: std::result::Result<u32, DriverError> = Ok(7);
        assert_eq!(ok.cuda_call("cuModuleLoadData"), Ok(7));
    }

    #[test]
    fn io_errors_keep_their_kind() {
        let gone = std::io::Error::new(ErrorKind::NotFound, "gone");
        let e = Error::io(format_args!("reading {}", "model.safetensors"), &gone);
        assert_eq!(e, Error::Io { kind: ErrorKind::NotFound, message: "reading model.safetensors: gone".into() });
        assert_eq!(e.to_string(), format!("I/O error ({}): reading model.safetensors: gone", ErrorKind::NotFound));
        assert_eq!(Error::from(std::io::Error::new(ErrorKind::PermissionDenied, "no")).to_string(), {
            format!("I/O error ({}): no", ErrorKind::PermissionDenied)
        });
        assert!(matches!(Error::invalid_data("bad header"), Error::Io { kind: ErrorKind::InvalidData, .. }));
    }

    #[test]
    fn messages_name_what_failed() {
        let e = Error::UnsupportedDevice { kernel: "mla_decode (Sm90)".into(), needs: "sm_90a", found: "sm_86".into() };
        assert_eq!(e.to_string(), "unsupported device: mla_decode (Sm90) needs sm_90a, found sm_86");
        assert_eq!(
            Error::NoSuchDevice { ordinal: 3, count: 1 }.to_string(),
            "no CUDA device with ordinal 3 (1 present)"
        );
        assert_eq!(
            Error::DeviceMismatch { arg: "x", expected: 0, got: 1 }.to_string(),
            "device mismatch for `x`: the GPU is device 0, the tensor is on device 1"
        );
        // A dependent's user has no repository scripts: the message says what to install and which switch to use.
        let not_built = Error::KernelsNotBuilt.to_string();
        for needle in ["nvcc", "NVCC", "CUDA_HOME", "require-kernels"] {
            assert!(not_built.contains(needle), "{not_built}");
        }
        assert!(!not_built.contains("scripts/"), "{not_built}");
    }
}
