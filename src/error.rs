//! The crate's one error type. Every launcher validates its arguments on the host and returns one of these instead of
//! panicking or launching a kernel that could read or write out of bounds.

use std::fmt;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in `r1-kernels`.
#[derive(Debug, Clone, PartialEq)]
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
        /// What the kernel needs.
        needs: &'static str,
        /// What was found, e.g. `"sm_86"`.
        found: String,
    },
    /// No CUDA driver (libcuda) could be loaded on this machine.
    NoCudaDriver,
    /// The crate was built without nvcc, so no GPU kernels are embedded.
    KernelsNotBuilt,
    /// A CUDA driver call failed.
    Driver(String),
    /// A file (e.g. a checkpoint) could not be read or is malformed.
    Io(String),
}

impl Error {
    /// Shorthand for a shape mismatch.
    pub fn shape(arg: &'static str, expected: impl fmt::Display, got: impl fmt::Display) -> Self {
        Error::Shape { arg, expected: expected.to_string(), got: got.to_string() }
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
            Error::UnsupportedDevice { needs, found } => {
                write!(f, "unsupported device: this kernel needs {needs}, found {found}")
            }
            Error::NoCudaDriver => write!(
                f,
                "no CUDA driver found (libcuda could not be loaded); GPU kernels are unavailable on this machine"
            ),
            Error::KernelsNotBuilt => write!(
                f,
                "r1-kernels was built without nvcc, so no GPU kernels are embedded; run \
                 scripts/setup-cuda-toolchain (or set NVCC / CUDA_HOME) and rebuild"
            ),
            Error::Driver(msg) => write!(f, "CUDA driver error: {msg}"),
            Error::Io(msg) => write!(f, "I/O error: {msg}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<cudarc::driver::DriverError> for Error {
    fn from(e: cudarc::driver::DriverError) -> Self {
        Error::Driver(e.to_string())
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Io(e.to_string())
    }
}
