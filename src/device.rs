//! The GPU handle: a CUDA context, the stream launches go to, and lazily loaded, cached kernel modules.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream};
use cudarc::nvrtc::Ptx;

use crate::error::{CudaCall, Error, Result};
use crate::kernels;

/// Statically known facts about a loaded device, read once at construction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Device ordinal.
    pub ordinal: usize,
    /// Compute capability (major, minor).
    pub compute_capability: (i32, i32),
    /// Number of streaming multiprocessors.
    pub sm_count: u32,
    /// Largest dynamic shared memory a block may opt into, in bytes.
    pub max_shared_memory_per_block_optin: u32,
    /// L2 cache size in bytes.
    pub l2_cache_bytes: u32,
    /// True on the emulated device of the `r1k-emu` driver (the crate's kernels running on the CPU): results are
    /// real, timings are not, and tests pick small shapes.
    pub emulated: bool,
}

impl DeviceInfo {
    /// True on sm_90 (H100/H200/H800/H20), where the `sm_90a` cubins run.
    pub fn is_hopper(&self) -> bool {
        self.compute_capability == (9, 0)
    }

    /// `"sm_XY"`, with " (emulated)" on the emulator.
    pub fn arch_name(&self) -> String {
        let emulated = if self.emulated { " (emulated)" } else { "" };
        format!("sm_{}{}{emulated}", self.compute_capability.0, self.compute_capability.1)
    }
}

/// (module, function name) of a cached kernel.
type FunctionKey = (&'static str, &'static str);

/// What every [`Gpu`] of one device shares: the context, the device facts and the loaded kernels.
struct DeviceKernels {
    ctx: Arc<CudaContext>,
    info: DeviceInfo,
    name: String,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    functions: Mutex<HashMap<FunctionKey, (CudaFunction, u32)>>,
}

/// A GPU: context + stream + kernel cache. Cheap to share behind an `Arc`; every launcher takes `&Gpu` and enqueues
/// on [`Gpu::stream`] without synchronizing. Several streams of one device share one kernel cache: make the first
/// `Gpu` with [`Gpu::new`], [`Gpu::with_stream`] or [`Gpu::from_raw_stream`] and the others with [`Gpu::on_stream`].
pub struct Gpu {
    shared: Arc<DeviceKernels>,
    stream: Arc<CudaStream>,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu").field("info", &self.shared.info).finish()
    }
}

/// Names of the driver library that every CUDA driver installation provides. Each is also on the list cudarc's
/// loader tries, so when one of these loads, cudarc's first use of the driver succeeds too.
#[cfg(not(windows))]
const DRIVER_LIBRARIES: &[&str] = &["libcuda.so", "libcuda.so.1"];
#[cfg(windows)]
const DRIVER_LIBRARIES: &[&str] = &["nvcuda.dll"];

/// True when the CUDA driver library can be loaded. With cudarc's (fallback) dynamic loading, cudarc opens libcuda on
/// first use and panics when it cannot, so every entry point checks this first. With cudarc's `dynamic-linking`
/// (selected by a dependent such as candle) libcuda is already loaded with the program, and this is true.
pub fn cuda_driver_present() -> bool {
    DRIVER_LIBRARIES.iter().any(|&name| {
        // SAFETY: the same probe as cudarc's own `is_culib_present`: opening the driver library runs only its
        // constructors, which every CUDA program runs; the handle is closed again at once.
        unsafe { libloading::Library::new(name) }.is_ok()
    })
}

impl Gpu {
    /// Opens device `ordinal` with a new non-default stream.
    pub fn new(ordinal: usize) -> Result<Self> {
        if !cuda_driver_present() {
            return Err(Error::NoCudaDriver);
        }
        let count = CudaContext::device_count().cuda_call("cuDeviceGetCount")?;
        let count = count.max(0) as usize;
        if ordinal >= count {
            return Err(Error::NoSuchDevice { ordinal, count });
        }
        let ctx = CudaContext::new(ordinal).cuda_call("cuDevicePrimaryCtxRetain")?;
        let stream = ctx.new_stream().cuda_call("cuStreamCreate")?;
        Self::with_stream(stream)
    }

    /// Wraps a caller-owned stream (and its context): launches are enqueued on it, in the caller's order. Loads
    /// kernels into a cache of its own; [`Gpu::on_stream`] makes more `Gpu`s that share it.
    pub fn with_stream(stream: Arc<CudaStream>) -> Result<Self> {
        if !cuda_driver_present() {
            return Err(Error::NoCudaDriver);
        }
        let ctx = stream.context().clone();
        let attr = |a: CUdevice_attribute| -> Result<i32> { ctx.attribute(a).cuda_call("cuDeviceGetAttribute") };
        let name = ctx.name().cuda_call("cuDeviceGetName")?;
        let info = DeviceInfo {
            ordinal: ctx.ordinal(),
            compute_capability: (
                attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
                attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
            ),
            sm_count: attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32,
            max_shared_memory_per_block_optin: attr(
                CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            )? as u32,
            l2_cache_bytes: attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)? as u32,
            emulated: is_emulator_name(&name),
        };
        let shared = DeviceKernels {
            ctx,
            info,
            name,
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
        };
        Ok(Gpu { shared: Arc::new(shared), stream })
    }

    /// A `Gpu` for another stream of the same device that shares this one's loaded kernels (no module is loaded
    /// twice). Errors with [`Error::DeviceMismatch`] when `stream` belongs to another context.
    pub fn on_stream(&self, stream: Arc<CudaStream>) -> Result<Gpu> {
        let theirs = stream.context();
        if theirs.cu_ctx() != self.shared.ctx.cu_ctx() {
            return Err(Error::DeviceMismatch {
                arg: "stream",
                expected: self.shared.info.ordinal,
                got: theirs.ordinal(),
            });
        }
        Ok(Gpu { shared: self.shared.clone(), stream })
    }

    /// Wraps a raw `CUstream` that another library owns (an engine on another cudarc version, or its own CUDA
    /// bindings), in the primary context of device `ordinal`, the one cudarc and the CUDA runtime use. Launches are
    /// enqueued on that stream, in the owner's order; dropping the `Gpu` does not destroy the stream.
    ///
    /// # Safety
    /// `stream` must be a live stream of the primary context of device `ordinal`, and it must stay alive as long as
    /// this `Gpu` (or anything made from it with [`Gpu::on_stream`]) is used.
    pub unsafe fn from_raw_stream(ordinal: usize, stream: cudarc::driver::sys::CUstream) -> Result<Gpu> {
        if !cuda_driver_present() {
            return Err(Error::NoCudaDriver);
        }
        let count = CudaContext::device_count().cuda_call("cuDeviceGetCount")?.max(0) as usize;
        if ordinal >= count {
            return Err(Error::NoSuchDevice { ordinal, count });
        }
        let ctx = CudaContext::new(ordinal).cuda_call("cuDevicePrimaryCtxRetain")?;
        // SAFETY: the caller guarantees a live stream of this (primary) context that outlives the wrapper.
        let stream = unsafe { ctx.wrap_borrowed_stream(stream) };
        Gpu::with_stream(stream)
    }

    /// True when `self` and `other` share one kernel cache (made from one another with [`Gpu::on_stream`]).
    pub fn shares_kernels_with(&self, other: &Gpu) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }

    /// Loads every kernel module this device can run, now, so that no module is loaded later: call it before
    /// capturing a CUDA graph or entering a latency-critical loop. (Launchers otherwise load a module on its first
    /// use.) Returns how many modules are loaded.
    pub fn preload(&self) -> Result<usize> {
        let mut loaded = 0;
        for module in kernels::modules() {
            let runnable = if self.shared.info.is_hopper() {
                kernels::cubin(module).is_some()
            } else {
                self.shared.info.compute_capability.0 >= 8 && kernels::ptx(module).is_some()
            };
            if runnable {
                self.module(module)?;
                loaded += 1;
            }
        }
        Ok(loaded)
    }

    /// The context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.shared.ctx
    }

    /// The stream every launch goes to.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Device facts read at construction.
    pub fn info(&self) -> &DeviceInfo {
        &self.shared.info
    }

    /// The device's name as the driver reports it (the emulator's contains "r1k-emu").
    pub fn device_name(&self) -> &str {
        &self.shared.name
    }

    /// True on the `r1k-emu` emulated device: kernels run on the CPU, so results are real but no timing is a
    /// measurement.
    pub fn is_emulated(&self) -> bool {
        self.shared.info.emulated
    }

    /// Errors with [`Error::DeviceMismatch`] for the first of `tensors` (argument name, device ordinal) that lives
    /// on another device than this `Gpu`: a kernel handed another device's memory faults with a sticky error that
    /// takes the whole context down. Every launcher checks its tensors with this before enqueueing.
    pub fn check_devices(&self, tensors: &[(&'static str, usize)]) -> Result<()> {
        all_on_device(self.shared.info.ordinal, tensors)
    }

    /// Blocks the host until the stream is idle. Launchers never call this; tests and benches do.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().cuda_call("cuStreamSynchronize")
    }

    /// Errors unless this is an sm_90 device (for kernels that exist only as sm_90a cubins); the error names `what`,
    /// the kernel that needs it.
    pub fn require_hopper(&self, what: &str) -> Result<()> {
        if self.shared.info.is_hopper() {
            Ok(())
        } else {
            Err(Error::UnsupportedDevice {
                kernel: what.to_string(),
                needs: "sm_90a (H100/H200/H800/H20)",
                found: self.shared.info.arch_name(),
            })
        }
    }

    fn module(&self, module: &'static str) -> Result<Arc<CudaModule>> {
        if !kernels::KERNELS_BUILT {
            return Err(Error::KernelsNotBuilt);
        }
        // A panic elsewhere cannot leave the cache half-updated (each update is one insert), so a poisoned lock is
        // still a valid cache.
        let mut modules = self.shared.modules.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(m) = modules.get(module) {
            return Ok(m.clone());
        }
        let image = if self.shared.info.is_hopper() {
            kernels::cubin(module).map(|bytes| Ptx::from_binary(bytes.to_vec()))
        } else if self.shared.info.compute_capability.0 >= 8 {
            kernels::ptx(module).map(Ptx::from_src)
        } else {
            None
        };
        let Some(image) = image else {
            return if kernels::cubin(module).is_some() {
                Err(Error::UnsupportedDevice {
                    kernel: format!("kernel module `{module}`"),
                    needs: "sm_90a (H100/H200/H800/H20)",
                    found: self.shared.info.arch_name(),
                })
            } else {
                Err(Error::InvalidConfig(format!("kernel module `{module}` is not embedded in this build")))
            };
        };
        let loaded = self.shared.ctx.load_module(image).cuda_call("cuModuleLoadData")?;
        modules.insert(module, loaded.clone());
        Ok(loaded)
    }

    /// Returns `module::name`, loading the module on first use, with its dynamic shared-memory limit raised to at
    /// least `dynamic_smem_bytes` (needed above 48 KiB).
    pub fn function(&self, module: &'static str, name: &'static str, dynamic_smem_bytes: u32) -> Result<CudaFunction> {
        if dynamic_smem_bytes > self.shared.info.max_shared_memory_per_block_optin {
            return Err(Error::UnsupportedDevice {
                kernel: format!("{module}::{name}"),
                needs: "more shared memory per block than this device offers",
                found: format!(
                    "{} bytes available, {} needed by {module}::{name}",
                    self.shared.info.max_shared_memory_per_block_optin, dynamic_smem_bytes
                ),
            });
        }
        let mut functions = self.shared.functions.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some((f, limit)) = functions.get_mut(&(module, name)) {
            if *limit < dynamic_smem_bytes {
                f.set_attribute(
                    CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    dynamic_smem_bytes as i32,
                )
                .cuda_call("cuFuncSetAttribute")?;
                *limit = dynamic_smem_bytes;
            }
            return Ok(f.clone());
        }
        let m = self.module(module)?;
        let f = m.load_function(name).cuda_call("cuModuleGetFunction")?;
        let mut limit = 48 * 1024;
        if dynamic_smem_bytes > limit {
            f.set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                dynamic_smem_bytes as i32,
            )
            .cuda_call("cuFuncSetAttribute")?;
            limit = dynamic_smem_bytes;
        }
        functions.insert((module, name), (f.clone(), limit));
        Ok(f)
    }
}

/// Errors with [`Error::DeviceMismatch`] for the first of `tensors` whose ordinal is not `expected`.
fn all_on_device(expected: usize, tensors: &[(&'static str, usize)]) -> Result<()> {
    match tensors.iter().find(|(_, got)| *got != expected) {
        Some(&(arg, got)) => Err(Error::DeviceMismatch { arg, expected, got }),
        None => Ok(()),
    }
}

/// `check_devices!(gpu, a, b, ...)`: [`Gpu::check_devices`] for tensors (anything with `device_ordinal()`), each
/// named as written.
macro_rules! check_devices {
    ($gpu:expr, $($t:expr),+ $(,)?) => {
        $gpu.check_devices(&[$((stringify!($t), $t.device_ordinal())),+])
    };
}
pub(crate) use check_devices;

/// True for the device name of the `r1k-emu` emulated driver.
pub fn is_emulator_name(name: &str) -> bool {
    name.contains("r1k-emu")
}

/// Opens device 0 for a GPU test. Returns `None` (after printing why) when no usable GPU is present, unless
/// `R1K_REQUIRE_GPU=1`, in which case a missing GPU fails the test.
#[doc(hidden)]
pub fn test_gpu(test_name: &str) -> Option<Gpu> {
    let required = std::env::var("R1K_REQUIRE_GPU").map(|v| v == "1").unwrap_or(false);
    let reason = if !kernels::KERNELS_BUILT {
        Some(Error::KernelsNotBuilt.to_string())
    } else {
        match Gpu::new(0) {
            Ok(gpu) => {
                if gpu.is_emulated() {
                    eprintln!(
                        "{test_name}: running on {} (emulated: results are checked, timings mean nothing)",
                        gpu.device_name()
                    );
                }
                return Some(gpu);
            }
            Err(e) => Some(e.to_string()),
        }
    };
    let reason = reason.unwrap_or_default();
    if required {
        panic!("{test_name}: R1K_REQUIRE_GPU=1 but no usable GPU: {reason}");
    }
    eprintln!("SKIPPED {test_name}: no usable GPU ({reason})");
    None
}

/// Opens device 0 for a benchmark or a measurement: like [`test_gpu`], but refuses the emulated device, whose
/// timings measure the CPU running an emulator, never the kernels.
#[doc(hidden)]
pub fn bench_gpu(what: &str) -> Option<Gpu> {
    let gpu = test_gpu(what)?;
    if gpu.is_emulated() {
        eprintln!(
            "SKIPPED {what}: {} is an emulated device (kernels run on the CPU); its timings are not measurements",
            gpu.device_name()
        );
        return None;
    }
    Some(gpu)
}

/// Like [`test_gpu`] but also requires an sm_90 device (for tests of sm_90a-only kernels).
#[doc(hidden)]
pub fn test_hopper(test_name: &str) -> Option<Gpu> {
    let gpu = test_gpu(test_name)?;
    if gpu.info().is_hopper() {
        return Some(gpu);
    }
    let required = std::env::var("R1K_REQUIRE_GPU").map(|v| v == "1").unwrap_or(false);
    if required {
        panic!("{test_name}: R1K_REQUIRE_GPU=1 but the GPU is {}, not sm_90", gpu.info().arch_name());
    }
    eprintln!("SKIPPED {test_name}: needs sm_90, found {}", gpu.info().arch_name());
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_tensor_on_another_device_is_named() {
        assert_eq!(all_on_device(1, &[("a", 1), ("b", 1)]), Ok(()));
        assert_eq!(
            all_on_device(1, &[("a", 1), ("b", 0), ("c", 2)]),
            Err(Error::DeviceMismatch { arg: "b", expected: 1, got: 0 })
        );
        assert_eq!(all_on_device(0, &[]), Ok(()));
    }
}
