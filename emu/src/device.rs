//! Initialization, the emulated devices and their attributes, and contexts.
//!
//! Each device is an sm_90a Hopper with H200 limits, except the number of SMs (`R1K_EMU_SMS`, default 4: each
//! emulated SM is work for one host thread's worth of fibers, and persistent kernels size their grids by it) and
//! features the emulator does not provide (managed memory, cooperative launch, virtual memory management), which
//! read as absent so callers take their fallback paths. `R1K_EMU_DEVICES` sets the device count (default 1).

use std::ffi::{c_char, c_int, c_uint};
use std::sync::OnceLock;

use crate::entry::{entry, entry_before_init, set_initialized, write_out};
use crate::errors::{fail, DriverResult, Failure};
use crate::state::{self, driver, Context, Driver, PendingFailure, PrimaryContext};
use crate::types::*;

/// The name every emulated device reports; benches refuse to run on a device whose name contains "r1k-emu".
pub const DEVICE_NAME: &str = "r1k-emu (emulated sm_90a Hopper)";
/// Driver API version reported by cuDriverGetVersion: that of the bindings the crate is built against.
pub const DRIVER_VERSION: c_int = 12080;
pub const MAX_SHARED_MEMORY_PER_BLOCK_OPTIN: u32 = 232_448;
pub const MAX_SHARED_MEMORY_PER_BLOCK: u32 = 49_152;
pub const MAX_SHARED_MEMORY_PER_SM: u32 = 233_472;
/// Shared memory the system reserves per block on sm_90 (CU_DEVICE_ATTRIBUTE_RESERVED_SHARED_MEMORY_PER_BLOCK).
pub const RESERVED_SHARED_MEMORY_PER_BLOCK: u32 = 1024;
pub const MAX_THREADS_PER_BLOCK: u32 = 1024;
pub const MAX_THREADS_PER_SM: u32 = 2048;
pub const MAX_BLOCKS_PER_SM: u32 = 32;
pub const REGISTERS_PER_SM: u32 = 65_536;
/// Largest cluster every sm_90 device accepts without CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED.
pub const MAX_PORTABLE_CLUSTER_SIZE: u32 = 8;
pub const MAX_NON_PORTABLE_CLUSTER_SIZE: u32 = 16;
const TOTAL_MEMORY_BYTES: u64 = 16 << 30;
const DEFAULT_SMS: u32 = 4;

fn env_count(var: &str, default: u32, max: u32) -> u32 {
    match std::env::var(var) {
        Err(_) => default,
        Ok(v) => match v.trim().parse::<u32>() {
            Ok(n) if (1..=max).contains(&n) => n,
            _ => {
                eprintln!("r1k-emu: {var}={v:?} is not a number in 1..={max}; using {default}");
                default
            }
        },
    }
}

/// Streaming multiprocessors per emulated device.
pub fn sm_count() -> u32 {
    static SMS: OnceLock<u32> = OnceLock::new();
    *SMS.get_or_init(|| env_count("R1K_EMU_SMS", DEFAULT_SMS, 1024))
}

fn device_count() -> u32 {
    static DEVICES: OnceLock<u32> = OnceLock::new();
    *DEVICES.get_or_init(|| env_count("R1K_EMU_DEVICES", 1, 16))
}

pub fn total_memory_bytes() -> u64 {
    TOTAL_MEMORY_BYTES
}

fn check_device(dev: CUdevice) -> DriverResult {
    if dev < 0 || dev as u32 >= device_count() {
        fail!(CUDA_ERROR_INVALID_DEVICE, "device {dev} does not exist ({} emulated)", device_count());
    }
    Ok(())
}

/// The value of a device attribute, or `None` for one the emulator does not answer.
pub fn attribute_value(attribute: c_uint) -> Option<c_int> {
    let value = match attribute {
        1 => MAX_THREADS_PER_BLOCK as c_int,
        2 | 3 => 1024,
        4 => 64,
        5 => i32::MAX,
        6 | 7 => 65_535,
        8 => MAX_SHARED_MEMORY_PER_BLOCK as c_int,
        9 => 65_536,
        10 => 32,
        11 => i32::MAX,
        12 => REGISTERS_PER_SM as c_int,
        13 => 1_980_000,
        14 | 30 => 512,
        15 => 1,
        16 => sm_count() as c_int,
        17 | 18 => 0,
        // Page-locked host memory is not addressable by emulated kernels.
        19 => 0,
        20 => 0,
        31 | 32 => 1,
        33..=35 => 0,
        36 => 3_201_000,
        37 => 6144,
        38 => 50 << 20,
        39 => MAX_THREADS_PER_SM as c_int,
        40 => 2,
        41 => 1,
        50 => 0,
        51 => 32,
        75 => 9,
        76 => 0,
        78..=80 => 1,
        81 => MAX_SHARED_MEMORY_PER_SM as c_int,
        82 => REGISTERS_PER_SM as c_int,
        // Managed memory, host atomics, pageable access, cooperative launch: not emulated.
        83..=86 => 0,
        87 => 2,
        88 | 89 => 0,
        90 => 1,
        91 => 0,
        95 | 96 => 0,
        97 => MAX_SHARED_MEMORY_PER_BLOCK_OPTIN as c_int,
        98..=105 => 0,
        106 => MAX_BLOCKS_PER_SM as c_int,
        107 => 0,
        111 => RESERVED_SHARED_MEMORY_PER_BLOCK as c_int,
        112..=114 => 0,
        115 => 1,
        116 => 0,
        119 => 0,
        120 => 1,
        121..=125 => 0,
        126 => 4,
        127 => 1,
        128..=130 => 0,
        131 => -1,
        132 | 133 => 0,
        134 => -1,
        _ => return None,
    };
    Some(value)
}

#[no_mangle]
pub unsafe extern "C" fn cuInit(flags: c_uint) -> CUresult {
    entry_before_init("cuInit", || {
        if flags != 0 {
            fail!(CUDA_ERROR_INVALID_VALUE, "flags must be 0, got {flags}");
        }
        set_initialized();
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDriverGetVersion(driver_version: *mut c_int) -> CUresult {
    // SAFETY: the caller provides storage for one int.
    entry_before_init("cuDriverGetVersion", || unsafe { write_out(driver_version, DRIVER_VERSION) })
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetCount(count: *mut c_int) -> CUresult {
    // SAFETY: the caller provides storage for one int.
    entry("cuDeviceGetCount", || unsafe { write_out(count, device_count() as c_int) })
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGet(device: *mut CUdevice, ordinal: c_int) -> CUresult {
    entry("cuDeviceGet", || {
        check_device(ordinal)?;
        // SAFETY: the caller provides storage for one CUdevice.
        unsafe { write_out(device, ordinal) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetName(name: *mut c_char, len: c_int, dev: CUdevice) -> CUresult {
    entry("cuDeviceGetName", || {
        check_device(dev)?;
        if name.is_null() || len <= 0 {
            return Err(Failure::quiet(CUDA_ERROR_INVALID_VALUE));
        }
        let bytes = DEVICE_NAME.as_bytes();
        let n = bytes.len().min(len as usize - 1);
        // SAFETY: the caller provides `len` writable bytes; n + 1 <= len.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), name.cast::<u8>(), n);
            *name.add(n) = 0;
        }
        Ok(())
    })
}

fn uuid(dev: CUdevice) -> CUuuid {
    let mut bytes = *b"r1k-emu-device\0\0";
    bytes[15] = dev as u8;
    CUuuid { bytes }
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetUuid(out: *mut CUuuid, dev: CUdevice) -> CUresult {
    entry("cuDeviceGetUuid", || {
        check_device(dev)?;
        // SAFETY: the caller provides storage for one CUuuid.
        unsafe { write_out(out, uuid(dev)) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetUuid_v2(out: *mut CUuuid, dev: CUdevice) -> CUresult {
    entry("cuDeviceGetUuid_v2", || {
        check_device(dev)?;
        // SAFETY: the caller provides storage for one CUuuid.
        unsafe { write_out(out, uuid(dev)) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceTotalMem_v2(bytes: *mut usize, dev: CUdevice) -> CUresult {
    entry("cuDeviceTotalMem_v2", || {
        check_device(dev)?;
        // SAFETY: the caller provides storage for one size_t.
        unsafe { write_out(bytes, TOTAL_MEMORY_BYTES as usize) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetAttribute(pi: *mut c_int, attrib: c_uint, dev: CUdevice) -> CUresult {
    entry("cuDeviceGetAttribute", || {
        check_device(dev)?;
        let Some(value) = attribute_value(attrib) else {
            let name = ATTRIBUTE_NAMES.get(attrib as usize).copied().filter(|n| !n.is_empty()).unwrap_or("(unknown)");
            fail!(CUDA_ERROR_INVALID_VALUE, "device attribute CU_DEVICE_ATTRIBUTE_{name} ({attrib}) is not emulated");
        };
        // SAFETY: the caller provides storage for one int.
        unsafe { write_out(pi, value) }
    })
}

// ---- primary contexts ----

/// The handle of `dev`'s primary context, created (unretained) on first use.
fn primary_context(d: &mut Driver, dev: CUdevice) -> usize {
    if let Some(p) = d.primary.get(&dev) {
        return p.handle;
    }
    let handle = d.new_handle();
    d.contexts.insert(handle, Context { device: dev, primary: true, flags: 0, pending: None });
    d.primary.insert(dev, PrimaryContext { handle, retains: 0, flags: 0 });
    handle
}

#[no_mangle]
pub unsafe extern "C" fn cuDevicePrimaryCtxRetain(pctx: *mut CUcontext, dev: CUdevice) -> CUresult {
    entry("cuDevicePrimaryCtxRetain", || {
        check_device(dev)?;
        if pctx.is_null() {
            return Err(Failure::quiet(CUDA_ERROR_INVALID_VALUE));
        }
        let mut d = driver();
        let handle = primary_context(&mut d, dev);
        d.primary.get_mut(&dev).expect("created by primary_context").retains += 1;
        // SAFETY: checked non-null; the caller provides storage for one CUcontext.
        unsafe { write_out(pctx, handle as CUcontext) }
    })
}

/// The context and everything in it outlive the last release: resources are not reclaimed as a device would, but
/// the handle stays the same on the next retain, as it does on a device.
#[no_mangle]
pub unsafe extern "C" fn cuDevicePrimaryCtxRelease_v2(dev: CUdevice) -> CUresult {
    entry("cuDevicePrimaryCtxRelease_v2", || {
        check_device(dev)?;
        let mut d = driver();
        match d.primary.get_mut(&dev) {
            Some(p) if p.retains > 0 => {
                p.retains -= 1;
                Ok(())
            }
            _ => fail!(CUDA_ERROR_INVALID_CONTEXT, "device {dev}'s primary context is not retained"),
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDevicePrimaryCtxGetState(dev: CUdevice, flags: *mut c_uint, active: *mut c_int) -> CUresult {
    entry("cuDevicePrimaryCtxGetState", || {
        check_device(dev)?;
        let d = driver();
        let (f, a) = d.primary.get(&dev).map(|p| (p.flags, (p.retains > 0) as c_int)).unwrap_or((0, 0));
        // SAFETY: the caller provides storage for one unsigned int and one int.
        unsafe {
            write_out(flags, f)?;
            write_out(active, a)
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDevicePrimaryCtxSetFlags_v2(dev: CUdevice, flags: c_uint) -> CUresult {
    entry("cuDevicePrimaryCtxSetFlags_v2", || {
        check_device(dev)?;
        let mut d = driver();
        let handle = primary_context(&mut d, dev);
        d.primary.get_mut(&dev).expect("created by primary_context").flags = flags;
        if let Some(c) = d.contexts.get_mut(&handle) {
            c.flags = flags;
        }
        Ok(())
    })
}

// ---- contexts ----

#[no_mangle]
pub unsafe extern "C" fn cuCtxCreate_v4(
    pctx: *mut CUcontext,
    params: *mut std::ffi::c_void,
    flags: c_uint,
    dev: CUdevice,
) -> CUresult {
    entry("cuCtxCreate_v4", || {
        check_device(dev)?;
        if pctx.is_null() {
            return Err(Failure::quiet(CUDA_ERROR_INVALID_VALUE));
        }
        if !params.is_null() {
            fail!(CUDA_ERROR_NOT_SUPPORTED, "execution-affinity and CiG context parameters are not emulated");
        }
        let mut d = driver();
        let h = d.new_handle();
        d.contexts.insert(h, Context { device: dev, primary: false, flags, pending: None });
        state::push_context(h);
        // SAFETY: checked non-null; the caller provides storage for one CUcontext.
        unsafe { write_out(pctx, h as CUcontext) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxDestroy_v2(ctx: CUcontext) -> CUresult {
    entry("cuCtxDestroy_v2", || {
        let mut d = driver();
        if d.context(ctx as usize)?.primary {
            fail!(
                CUDA_ERROR_INVALID_CONTEXT,
                "a primary context is released with cuDevicePrimaryCtxRelease, not destroyed"
            );
        }
        d.contexts.remove(&(ctx as usize));
        if state::current_context() == Some(ctx as usize) {
            state::pop_context();
        }
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxGetCurrent(pctx: *mut CUcontext) -> CUresult {
    entry("cuCtxGetCurrent", || {
        let current = state::current_context().unwrap_or(0);
        // SAFETY: the caller provides storage for one CUcontext.
        unsafe { write_out(pctx, current as CUcontext) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxSetCurrent(ctx: CUcontext) -> CUresult {
    entry("cuCtxSetCurrent", || {
        if ctx.is_null() {
            state::set_current_context(None);
            return Ok(());
        }
        driver().context(ctx as usize)?;
        state::set_current_context(Some(ctx as usize));
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxPushCurrent_v2(ctx: CUcontext) -> CUresult {
    entry("cuCtxPushCurrent_v2", || {
        driver().context(ctx as usize)?;
        state::push_context(ctx as usize);
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxPopCurrent_v2(pctx: *mut CUcontext) -> CUresult {
    entry("cuCtxPopCurrent_v2", || {
        let Some(popped) = state::pop_context() else {
            fail!(CUDA_ERROR_INVALID_CONTEXT, "no context is current on this thread");
        };
        if !pctx.is_null() {
            // SAFETY: non-null; the caller provides storage for one CUcontext.
            unsafe { *pctx = popped as CUcontext };
        }
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxGetDevice(device: *mut CUdevice) -> CUresult {
    entry("cuCtxGetDevice", || {
        let d = driver();
        let dev = d.context(d.current_ctx()?)?.device;
        // SAFETY: the caller provides storage for one CUdevice.
        unsafe { write_out(device, dev) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxGetFlags(flags: *mut c_uint) -> CUresult {
    entry("cuCtxGetFlags", || {
        let d = driver();
        let f = d.context(d.current_ctx()?)?.flags;
        // SAFETY: the caller provides storage for one unsigned int.
        unsafe { write_out(flags, f) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxSetFlags(flags: c_uint) -> CUresult {
    entry("cuCtxSetFlags", || {
        let mut d = driver();
        let ctx = d.current_ctx()?;
        if let Some(c) = d.contexts.get_mut(&ctx) {
            c.flags = flags;
        }
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxGetStreamPriorityRange(least: *mut c_int, greatest: *mut c_int) -> CUresult {
    entry("cuCtxGetStreamPriorityRange", || {
        // Both outputs may be null (the API allows it).
        // SAFETY: non-null outputs point to storage for one int each.
        unsafe {
            if !least.is_null() {
                *least = 0;
            }
            if !greatest.is_null() {
                *greatest = -5;
            }
        }
        Ok(())
    })
}

/// Every operation has completed when its call returned; what remains is to report, once, a launch failure this
/// thread left pending on any of the context's streams.
#[no_mangle]
pub unsafe extern "C" fn cuCtxSynchronize() -> CUresult {
    entry("cuCtxSynchronize", || {
        let mut d = driver();
        let ctx = d.current_ctx()?;
        d.forbid_during_capture("cuCtxSynchronize")?;
        let me = std::thread::current().id();
        let mine = |slot: &mut Option<PendingFailure>| slot.take_if(|p| p.thread == me).map(|p| p.failure);
        let mut failure = d.contexts.get_mut(&ctx).and_then(|c| mine(&mut c.pending));
        for s in d.streams.values_mut().filter(|s| s.ctx == ctx) {
            if let Some(f) = mine(&mut s.pending) {
                failure.get_or_insert(f);
            }
        }
        failure.map_or(Ok(()), Err)
    })
}

/// Names of CUdevice_attribute values by number (for messages about attributes the emulator does not answer).
const ATTRIBUTE_NAMES: &[&str] = &[
    "",
    "MAX_THREADS_PER_BLOCK",
    "MAX_BLOCK_DIM_X",
    "MAX_BLOCK_DIM_Y",
    "MAX_BLOCK_DIM_Z",
    "MAX_GRID_DIM_X",
    "MAX_GRID_DIM_Y",
    "MAX_GRID_DIM_Z",
    "MAX_SHARED_MEMORY_PER_BLOCK",
    "TOTAL_CONSTANT_MEMORY",
    "WARP_SIZE",
    "MAX_PITCH",
    "MAX_REGISTERS_PER_BLOCK",
    "CLOCK_RATE",
    "TEXTURE_ALIGNMENT",
    "GPU_OVERLAP",
    "MULTIPROCESSOR_COUNT",
    "KERNEL_EXEC_TIMEOUT",
    "INTEGRATED",
    "CAN_MAP_HOST_MEMORY",
    "COMPUTE_MODE",
    "MAXIMUM_TEXTURE1D_WIDTH",
    "MAXIMUM_TEXTURE2D_WIDTH",
    "MAXIMUM_TEXTURE2D_HEIGHT",
    "MAXIMUM_TEXTURE3D_WIDTH",
    "MAXIMUM_TEXTURE3D_HEIGHT",
    "MAXIMUM_TEXTURE3D_DEPTH",
    "MAXIMUM_TEXTURE2D_LAYERED_WIDTH",
    "MAXIMUM_TEXTURE2D_LAYERED_HEIGHT",
    "MAXIMUM_TEXTURE2D_LAYERED_LAYERS",
    "SURFACE_ALIGNMENT",
    "CONCURRENT_KERNELS",
    "ECC_ENABLED",
    "PCI_BUS_ID",
    "PCI_DEVICE_ID",
    "TCC_DRIVER",
    "MEMORY_CLOCK_RATE",
    "GLOBAL_MEMORY_BUS_WIDTH",
    "L2_CACHE_SIZE",
    "MAX_THREADS_PER_MULTIPROCESSOR",
    "ASYNC_ENGINE_COUNT",
    "UNIFIED_ADDRESSING",
    "MAXIMUM_TEXTURE1D_LAYERED_WIDTH",
    "MAXIMUM_TEXTURE1D_LAYERED_LAYERS",
    "CAN_TEX2D_GATHER",
    "MAXIMUM_TEXTURE2D_GATHER_WIDTH",
    "MAXIMUM_TEXTURE2D_GATHER_HEIGHT",
    "MAXIMUM_TEXTURE3D_WIDTH_ALTERNATE",
    "MAXIMUM_TEXTURE3D_HEIGHT_ALTERNATE",
    "MAXIMUM_TEXTURE3D_DEPTH_ALTERNATE",
    "PCI_DOMAIN_ID",
    "TEXTURE_PITCH_ALIGNMENT",
    "MAXIMUM_TEXTURECUBEMAP_WIDTH",
    "MAXIMUM_TEXTURECUBEMAP_LAYERED_WIDTH",
    "MAXIMUM_TEXTURECUBEMAP_LAYERED_LAYERS",
    "MAXIMUM_SURFACE1D_WIDTH",
    "MAXIMUM_SURFACE2D_WIDTH",
    "MAXIMUM_SURFACE2D_HEIGHT",
    "MAXIMUM_SURFACE3D_WIDTH",
    "MAXIMUM_SURFACE3D_HEIGHT",
    "MAXIMUM_SURFACE3D_DEPTH",
    "MAXIMUM_SURFACE1D_LAYERED_WIDTH",
    "MAXIMUM_SURFACE1D_LAYERED_LAYERS",
    "MAXIMUM_SURFACE2D_LAYERED_WIDTH",
    "MAXIMUM_SURFACE2D_LAYERED_HEIGHT",
    "MAXIMUM_SURFACE2D_LAYERED_LAYERS",
    "MAXIMUM_SURFACECUBEMAP_WIDTH",
    "MAXIMUM_SURFACECUBEMAP_LAYERED_WIDTH",
    "MAXIMUM_SURFACECUBEMAP_LAYERED_LAYERS",
    "MAXIMUM_TEXTURE1D_LINEAR_WIDTH",
    "MAXIMUM_TEXTURE2D_LINEAR_WIDTH",
    "MAXIMUM_TEXTURE2D_LINEAR_HEIGHT",
    "MAXIMUM_TEXTURE2D_LINEAR_PITCH",
    "MAXIMUM_TEXTURE2D_MIPMAPPED_WIDTH",
    "MAXIMUM_TEXTURE2D_MIPMAPPED_HEIGHT",
    "COMPUTE_CAPABILITY_MAJOR",
    "COMPUTE_CAPABILITY_MINOR",
    "MAXIMUM_TEXTURE1D_MIPMAPPED_WIDTH",
    "STREAM_PRIORITIES_SUPPORTED",
    "GLOBAL_L1_CACHE_SUPPORTED",
    "LOCAL_L1_CACHE_SUPPORTED",
    "MAX_SHARED_MEMORY_PER_MULTIPROCESSOR",
    "MAX_REGISTERS_PER_MULTIPROCESSOR",
    "MANAGED_MEMORY",
    "MULTI_GPU_BOARD",
    "MULTI_GPU_BOARD_GROUP_ID",
    "HOST_NATIVE_ATOMIC_SUPPORTED",
    "SINGLE_TO_DOUBLE_PRECISION_PERF_RATIO",
    "PAGEABLE_MEMORY_ACCESS",
    "CONCURRENT_MANAGED_ACCESS",
    "COMPUTE_PREEMPTION_SUPPORTED",
    "CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM",
    "CAN_USE_STREAM_MEM_OPS_V1",
    "CAN_USE_64_BIT_STREAM_MEM_OPS_V1",
    "CAN_USE_STREAM_WAIT_VALUE_NOR_V1",
    "COOPERATIVE_LAUNCH",
    "COOPERATIVE_MULTI_DEVICE_LAUNCH",
    "MAX_SHARED_MEMORY_PER_BLOCK_OPTIN",
    "CAN_FLUSH_REMOTE_WRITES",
    "HOST_REGISTER_SUPPORTED",
    "PAGEABLE_MEMORY_ACCESS_USES_HOST_PAGE_TABLES",
    "DIRECT_MANAGED_MEM_ACCESS_FROM_HOST",
    "VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED",
    "HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED",
    "HANDLE_TYPE_WIN32_HANDLE_SUPPORTED",
    "HANDLE_TYPE_WIN32_KMT_HANDLE_SUPPORTED",
    "MAX_BLOCKS_PER_MULTIPROCESSOR",
    "GENERIC_COMPRESSION_SUPPORTED",
    "MAX_PERSISTING_L2_CACHE_SIZE",
    "MAX_ACCESS_POLICY_WINDOW_SIZE",
    "GPU_DIRECT_RDMA_WITH_CUDA_VMM_SUPPORTED",
    "RESERVED_SHARED_MEMORY_PER_BLOCK",
    "SPARSE_CUDA_ARRAY_SUPPORTED",
    "READ_ONLY_HOST_REGISTER_SUPPORTED",
    "TIMELINE_SEMAPHORE_INTEROP_SUPPORTED",
    "MEMORY_POOLS_SUPPORTED",
    "GPU_DIRECT_RDMA_SUPPORTED",
    "GPU_DIRECT_RDMA_FLUSH_WRITES_OPTIONS",
    "GPU_DIRECT_RDMA_WRITES_ORDERING",
    "MEMPOOL_SUPPORTED_HANDLE_TYPES",
    "CLUSTER_LAUNCH",
    "DEFERRED_MAPPING_CUDA_ARRAY_SUPPORTED",
    "CAN_USE_64_BIT_STREAM_MEM_OPS",
    "CAN_USE_STREAM_WAIT_VALUE_NOR",
    "DMA_BUF_SUPPORTED",
    "IPC_EVENT_SUPPORTED",
    "MEM_SYNC_DOMAIN_COUNT",
    "TENSOR_MAP_ACCESS_SUPPORTED",
    "HANDLE_TYPE_FABRIC_SUPPORTED",
    "UNIFIED_FUNCTION_POINTERS",
    "NUMA_CONFIG",
    "NUMA_ID",
    "MULTICAST_SUPPORTED",
    "MPS_ENABLED",
    "HOST_NUMA_ID",
    "D3D12_CIG_SUPPORTED",
    "MEM_DECOMPRESS_ALGORITHM_MASK",
    "MEM_DECOMPRESS_MAXIMUM_LENGTH",
    "VULKAN_CIG_SUPPORTED",
    "GPU_PCI_DEVICE_ID",
    "GPU_PCI_SUBSYSTEM_ID",
    "HOST_NUMA_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED",
    "HOST_NUMA_MEMORY_POOLS_SUPPORTED",
    "HOST_NUMA_MULTINODE_IPC_SUPPORTED",
    "HOST_MEMORY_POOLS_SUPPORTED",
    "HOST_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED",
    "HOST_ALLOC_DMA_BUF_SUPPORTED",
    "ONLY_PARTIAL_HOST_NATIVE_ATOMIC_SUPPORTED",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attribute_names_line_up_with_numbers() {
        assert_eq!(ATTRIBUTE_NAMES[16], "MULTIPROCESSOR_COUNT");
        assert_eq!(ATTRIBUTE_NAMES[97], "MAX_SHARED_MEMORY_PER_BLOCK_OPTIN");
        assert_eq!(ATTRIBUTE_NAMES[115], "MEMORY_POOLS_SUPPORTED");
        assert_eq!(ATTRIBUTE_NAMES[120], "CLUSTER_LAUNCH");
        assert_eq!(ATTRIBUTE_NAMES.len(), 148);
    }

    #[test]
    fn hopper_limits() {
        assert_eq!(attribute_value(75), Some(9));
        assert_eq!(attribute_value(76), Some(0));
        assert_eq!(attribute_value(CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN), Some(232_448));
        assert_eq!(attribute_value(38), Some(50 << 20));
        assert_eq!(attribute_value(CU_DEVICE_ATTRIBUTE_CLUSTER_LAUNCH), Some(1));
        assert_eq!(attribute_value(22), None, "texture limits are not emulated");
    }
}
