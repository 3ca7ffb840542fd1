//! An emulated CUDA driver (`libcuda.so`) for one or more sm_90a Hopper devices that runs r1-kernels' own kernels
//! on the CPU.
//!
//! cudarc opens `libcuda.so` at run time, so with `target/<profile>/` first on `LD_LIBRARY_PATH` the crate's GPU
//! code paths run unchanged against this library. The driver facade here keeps the CUDA driver API's state and
//! rules (contexts, streams, events, stream capture and graphs, modules, device memory, launch validation); the
//! C++ engine linked into the same library (cpp/, declared in `engine`) executes kernels: every kernel of the
//! crate compiled for the host, with its inline PTX interpreted.
//!
//! Semantics that differ from a device, on purpose:
//! - Work runs at the call, on the calling thread: a stream is idle whenever a call returns. Only a capturing
//!   stream defers work, into its graph.
//! - Device memory is host memory (a `CUdeviceptr` is a host address), filled with 0xFF when allocated.
//! - Event times are virtual: they order events and are never a measurement.
//! - Entry points the emulator does not implement exist (generated from cuda.h by build/stubs.rs) and fail with
//!   CUDA_ERROR_NOT_SUPPORTED, naming themselves on stderr.
//!
//! Environment: `R1K_EMU_SMS` (SMs per device, default 4), `R1K_EMU_DEVICES` (default 1), `R1K_EMU_TRACE=1`
//! (print each driver call), `R1K_EMU_POISON=0` (do not fill new allocations).
//!
//! Every exported function has the safety contract of the CUDA driver entry point of the same name; they are
//! plain Rust functions too, so tests can call them directly.

// Exported names are the driver's (cuMemAlloc_v2), and each export's safety contract is the CUDA documentation's.
#![allow(non_snake_case, clippy::missing_safety_doc)]

mod cubin;
mod device;
mod engine;
mod entry;
mod errors;
mod launch;
mod memory;
mod module;
mod state;
mod stream;
pub mod types;
mod work;

#[cfg(test)]
mod mock_engine;
#[cfg(test)]
#[path = "../build/stubs.rs"]
mod stubs;
#[cfg(test)]
mod tests;

pub use device::*;
pub use errors::{cuGetErrorName, cuGetErrorString, error_name};
pub use launch::*;
pub use memory::*;
pub use module::*;
pub use stream::*;

/// Names of the kernels compiled into the emulator (the ones cuModuleGetFunction can return).
pub fn emulated_kernels() -> Vec<String> {
    engine::kernel_names()
}

/// Names of the kernels an sm_90a cubin holds, as cuModuleLoadData reads them.
pub fn kernels_in_cubin(image: &[u8]) -> Result<Vec<String>, String> {
    cubin::parse_cubin(image).map(|c| c.kernels.into_keys().collect()).map_err(|e| format!("{e:?}"))
}

/// What every generated stub does: say which entry point is missing, and fail.
fn stub_called(name: &str) -> u32 {
    eprintln!("r1k-emu: {name} is not implemented by the emulated driver");
    types::CUDA_ERROR_NOT_SUPPORTED
}

include!(concat!(env!("OUT_DIR"), "/driver_stubs.rs"));
