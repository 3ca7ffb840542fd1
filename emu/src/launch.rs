//! Kernel launches, occupancy queries and tensor-map encoding.
//!
//! A launch is validated the way the driver validates it (grid and block limits, the kernel's launch bounds and
//! register limit, its dynamic shared memory limit, cluster shape) before the engine runs it, so a configuration a
//! device would refuse is refused here too, with the rule it broke on stderr.

use std::ffi::{c_int, c_uint, c_void};

use crate::cubin::KernelInfo;
use crate::device::{
    sm_count, MAX_BLOCKS_PER_SM, MAX_NON_PORTABLE_CLUSTER_SIZE, MAX_PORTABLE_CLUSTER_SIZE,
    MAX_SHARED_MEMORY_PER_BLOCK_OPTIN, MAX_SHARED_MEMORY_PER_SM, MAX_THREADS_PER_SM, REGISTERS_PER_SM,
    RESERVED_SHARED_MEMORY_PER_BLOCK,
};
use crate::engine::{self, EngineLaunchConfig, TensorMapRequest};
use crate::entry::{entry, write_out};
use crate::errors::{fail, DriverResult, Failure};
use crate::module::max_threads_per_block;
use crate::state::{driver, Function};
use crate::types::*;
use crate::work::{submit, LaunchWork, Params, Work};

/// A launch as the caller described it.
struct Request {
    grid: [u32; 3],
    block: [u32; 3],
    dynamic_smem: u32,
    /// From CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION, when given.
    cluster: Option<[u32; 3]>,
}

fn product(d: [u32; 3]) -> u64 {
    d.iter().map(|&x| x as u64).product()
}

/// The cluster shape the launch will use: the attribute's, else the kernel's compile-time one, else none.
fn cluster_shape(f: &Function, requested: Option<[u32; 3]>) -> DriverResult<[u32; 3]> {
    let name = &f.name;
    match (requested, f.info.required_cluster) {
        (Some(r), Some(c)) if r != c => fail!(
            CUDA_ERROR_INVALID_CLUSTER_SIZE,
            "{name} was compiled with cluster dims {c:?} but is launched with {r:?}"
        ),
        (Some(r), _) => Ok(r),
        (None, Some(c)) => Ok(c),
        (None, None) if f.info.explicit_cluster => {
            fail!(CUDA_ERROR_INVALID_CLUSTER_SIZE, "{name} must be launched with a cluster dimension")
        }
        (None, None) => Ok([1, 1, 1]),
    }
}

fn check_cluster(f: &Function, grid: [u32; 3], cluster: [u32; 3]) -> DriverResult {
    let name = &f.name;
    if cluster.contains(&0) {
        fail!(CUDA_ERROR_INVALID_CLUSTER_SIZE, "{name}: cluster dims {cluster:?} contain a zero");
    }
    if grid.iter().zip(&cluster).any(|(g, c)| g % c != 0) {
        fail!(
            CUDA_ERROR_INVALID_CLUSTER_SIZE,
            "{name}: grid {grid:?} is not a multiple of the cluster dims {cluster:?}"
        );
    }
    let size = product(cluster);
    let limit = if f.non_portable_cluster { MAX_NON_PORTABLE_CLUSTER_SIZE } else { MAX_PORTABLE_CLUSTER_SIZE };
    if size > limit as u64 {
        fail!(
            CUDA_ERROR_INVALID_CLUSTER_SIZE,
            "{name}: a cluster of {size} CTAs exceeds the limit of {limit}{}",
            if f.non_portable_cluster { "" } else { " (portable size; see NON_PORTABLE_CLUSTER_SIZE_ALLOWED)" }
        );
    }
    // A cluster's CTAs run at the same time on distinct SMs.
    if size > sm_count() as u64 {
        fail!(
            CUDA_ERROR_INVALID_CLUSTER_SIZE,
            "{name}: a cluster of {size} CTAs cannot be resident on a device of {} SMs (R1K_EMU_SMS)",
            sm_count()
        );
    }
    Ok(())
}

/// Checks a launch against the device's and the kernel's limits and returns the engine's configuration.
fn validate(f: &Function, r: &Request) -> DriverResult<EngineLaunchConfig> {
    let name = &f.name;
    let (grid, block) = (r.grid, r.block);
    if grid.contains(&0) || grid[0] > i32::MAX as u32 || grid[1] > 65_535 || grid[2] > 65_535 {
        fail!(CUDA_ERROR_INVALID_VALUE, "{name}: grid {grid:?} is outside (1..=2^31-1, 1..=65535, 1..=65535)");
    }
    if block.contains(&0) || block[0] > 1024 || block[1] > 1024 || block[2] > 64 || product(block) > 1024 {
        fail!(
            CUDA_ERROR_INVALID_VALUE,
            "{name}: block {block:?} is outside the device's limits (at most 1024 threads)"
        );
    }
    let limit = max_threads_per_block(&f.info);
    if product(block) > limit as u64 {
        let bounds = f.info.max_threads.map_or("none".to_string(), |t| t.to_string());
        let registers = f.info.registers.map_or("unknown".to_string(), |r| r.to_string());
        fail!(
            CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES,
            "{name}: a block of {} threads exceeds the kernel's limit of {limit} (launch bounds: {bounds}; registers \
             per thread: {registers})",
            product(block)
        );
    }
    if let Some(required) = f.info.required_block.filter(|&b| b != block) {
        fail!(CUDA_ERROR_INVALID_VALUE, "{name}: block {block:?} differs from the required block {required:?}");
    }
    if r.dynamic_smem > f.max_dynamic_smem {
        fail!(
            CUDA_ERROR_INVALID_VALUE,
            "{name}: {} bytes of dynamic shared memory exceed the function's limit of {} (raise \
             CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES)",
            r.dynamic_smem,
            f.max_dynamic_smem
        );
    }
    let cluster = cluster_shape(f, r.cluster)?;
    check_cluster(f, grid, cluster)?;
    Ok(EngineLaunchConfig {
        grid,
        block,
        cluster,
        dynamic_smem_bytes: r.dynamic_smem,
        max_dynamic_smem_bytes: f.max_dynamic_smem,
    })
}

fn launch(
    function: CUfunction,
    request: Request,
    stream: CUstream,
    params: *mut *mut c_void,
    extra: *mut *mut c_void,
) -> DriverResult {
    if !extra.is_null() {
        fail!(CUDA_ERROR_NOT_SUPPORTED, "kernel arguments in `extra` (CU_LAUNCH_PARAM_BUFFER_*) are not emulated");
    }
    let work = {
        let d = driver();
        let f = d.function(function as usize)?;
        let config = validate(f, &request)?;
        if params.is_null() && !f.param_sizes.is_empty() {
            fail!(
                CUDA_ERROR_INVALID_VALUE,
                "{}: kernelParams is null but it takes {} parameters",
                f.name,
                f.param_sizes.len()
            );
        }
        record_launch(&f.name);
        LaunchWork {
            kernel: f.kernel,
            name: f.name.clone(),
            config,
            param_sizes: f.param_sizes.clone(),
            params: Params::Borrowed(params),
        }
    };
    submit(stream as usize, Work::Launch(Box::new(work)))
}

thread_local! {
    /// Launches accepted from this host thread, by kernel name.
    static LAUNCHES: std::cell::RefCell<std::collections::HashMap<String, u64>> = Default::default();
}

fn record_launch(name: &str) {
    LAUNCHES.with(|l| *l.borrow_mut().entry(name.to_owned()).or_default() += 1);
}

/// Not a CUDA entry point: how many launches of kernel `name` this host thread has enqueued (validated and
/// submitted, including launches recorded into a stream capture). Tests find it with `dlsym` to check that the
/// kernel they mean to cover is the one that ran; a real driver has no such symbol.
///
/// # Safety
/// `name` must be null or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn r1k_emu_launch_count(name: *const std::ffi::c_char) -> u64 {
    if name.is_null() {
        return 0;
    }
    // SAFETY: the caller passes a NUL-terminated string.
    let name = unsafe { std::ffi::CStr::from_ptr(name) }.to_string_lossy();
    LAUNCHES.with(|l| l.borrow().get(name.as_ref()).copied().unwrap_or(0))
}

#[no_mangle]
pub unsafe extern "C" fn cuLaunchKernel(
    f: CUfunction,
    grid_dim_x: c_uint,
    grid_dim_y: c_uint,
    grid_dim_z: c_uint,
    block_dim_x: c_uint,
    block_dim_y: c_uint,
    block_dim_z: c_uint,
    shared_mem_bytes: c_uint,
    h_stream: CUstream,
    kernel_params: *mut *mut c_void,
    extra: *mut *mut c_void,
) -> CUresult {
    entry("cuLaunchKernel", || {
        let request = Request {
            grid: [grid_dim_x, grid_dim_y, grid_dim_z],
            block: [block_dim_x, block_dim_y, block_dim_z],
            dynamic_smem: shared_mem_bytes,
            cluster: None,
        };
        launch(f, request, h_stream, kernel_params, extra)
    })
}

/// Reads a CUlaunchConfig; returns the request and its stream.
///
/// # Safety
/// `config` must be null or a valid CUlaunchConfig whose `attrs` holds `num_attrs` entries.
unsafe fn read_config(config: *const CUlaunchConfig) -> DriverResult<(Request, CUstream)> {
    // SAFETY: null or valid per this function's contract.
    let Some(c) = (unsafe { config.as_ref() }) else {
        return Err(Failure::quiet(CUDA_ERROR_INVALID_VALUE));
    };
    if c.num_attrs > 0 && c.attrs.is_null() {
        fail!(CUDA_ERROR_INVALID_VALUE, "numAttrs is {} but attrs is null", c.num_attrs);
    }
    let attrs: &[CUlaunchAttribute] = if c.num_attrs == 0 {
        &[]
    } else {
        // SAFETY: non-null with num_attrs entries per this function's contract.
        unsafe { std::slice::from_raw_parts(c.attrs, c.num_attrs as usize) }
    };
    let mut cluster = None;
    for a in attrs {
        let w = a.value.words;
        match a.id {
            CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION => cluster = Some([w[0], w[1], w[2]]),
            CU_LAUNCH_ATTRIBUTE_COOPERATIVE if w[0] != 0 => {
                fail!(CUDA_ERROR_NOT_SUPPORTED, "cooperative launches are not emulated")
            }
            // Hints with no effect on results; and programmatic stream serialization only allows overlap with
            // the previous kernel, of which running them one after the other is a valid schedule.
            CU_LAUNCH_ATTRIBUTE_IGNORE
            | CU_LAUNCH_ATTRIBUTE_COOPERATIVE
            | CU_LAUNCH_ATTRIBUTE_ACCESS_POLICY_WINDOW
            | CU_LAUNCH_ATTRIBUTE_SYNCHRONIZATION_POLICY
            | CU_LAUNCH_ATTRIBUTE_CLUSTER_SCHEDULING_POLICY_PREFERENCE
            | CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
            | CU_LAUNCH_ATTRIBUTE_PRIORITY
            | CU_LAUNCH_ATTRIBUTE_MEM_SYNC_DOMAIN_MAP
            | CU_LAUNCH_ATTRIBUTE_MEM_SYNC_DOMAIN
            | CU_LAUNCH_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT
            | CU_LAUNCH_ATTRIBUTE_NVLINK_UTIL_CENTRIC_SCHEDULING => {}
            CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_EVENT
            | CU_LAUNCH_ATTRIBUTE_PREFERRED_CLUSTER_DIMENSION
            | CU_LAUNCH_ATTRIBUTE_LAUNCH_COMPLETION_EVENT
            | CU_LAUNCH_ATTRIBUTE_DEVICE_UPDATABLE_KERNEL_NODE => {
                fail!(CUDA_ERROR_NOT_SUPPORTED, "launch attribute {} is not emulated", a.id)
            }
            other => fail!(CUDA_ERROR_INVALID_VALUE, "unknown launch attribute {other}"),
        }
    }
    let request = Request {
        grid: [c.grid_dim_x, c.grid_dim_y, c.grid_dim_z],
        block: [c.block_dim_x, c.block_dim_y, c.block_dim_z],
        dynamic_smem: c.shared_mem_bytes,
        cluster,
    };
    Ok((request, c.h_stream))
}

#[no_mangle]
pub unsafe extern "C" fn cuLaunchKernelEx(
    config: *const CUlaunchConfig,
    f: CUfunction,
    kernel_params: *mut *mut c_void,
    extra: *mut *mut c_void,
) -> CUresult {
    entry("cuLaunchKernelEx", || {
        // SAFETY: the caller passes a valid CUlaunchConfig (or null, rejected).
        let (request, stream) = unsafe { read_config(config)? };
        launch(f, request, stream, kernel_params, extra)
    })
}

// ---- occupancy ----

/// Blocks of `threads` threads and `dynamic_smem` bytes that fit on one SM at once.
fn blocks_per_sm(info: &KernelInfo, threads: u32, dynamic_smem: u64) -> u32 {
    if threads == 0 || threads > max_threads_per_block(info) {
        return 0;
    }
    let warps = threads.div_ceil(32);
    let by_threads = MAX_THREADS_PER_SM / (warps * 32);
    let by_registers = match info.registers.filter(|&r| r > 0) {
        Some(regs) => REGISTERS_PER_SM / ((regs * 32).div_ceil(256) * 256 * warps),
        None => u32::MAX,
    };
    let smem = info.static_smem_bytes as u64 + dynamic_smem + RESERVED_SHARED_MEMORY_PER_BLOCK as u64;
    let by_smem = (MAX_SHARED_MEMORY_PER_SM as u64 / smem) as u32;
    MAX_BLOCKS_PER_SM.min(by_threads).min(by_registers).min(by_smem)
}

fn max_active_blocks(num_blocks: *mut c_int, func: CUfunction, block_size: c_int, dynamic_smem: usize) -> DriverResult {
    let d = driver();
    let f = d.function(func as usize)?;
    let blocks = blocks_per_sm(&f.info, block_size.max(0) as u32, dynamic_smem as u64);
    // SAFETY: the caller provides storage for one int.
    unsafe { write_out(num_blocks, blocks as c_int) }
}

#[no_mangle]
pub unsafe extern "C" fn cuOccupancyMaxActiveBlocksPerMultiprocessor(
    num_blocks: *mut c_int,
    func: CUfunction,
    block_size: c_int,
    dynamic_smem_size: usize,
) -> CUresult {
    entry("cuOccupancyMaxActiveBlocksPerMultiprocessor", || {
        max_active_blocks(num_blocks, func, block_size, dynamic_smem_size)
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(
    num_blocks: *mut c_int,
    func: CUfunction,
    block_size: c_int,
    dynamic_smem_size: usize,
    _flags: c_uint,
) -> CUresult {
    entry("cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags", || {
        max_active_blocks(num_blocks, func, block_size, dynamic_smem_size)
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuOccupancyAvailableDynamicSMemPerBlock(
    dynamic_smem_size: *mut usize,
    func: CUfunction,
    num_blocks: c_int,
    block_size: c_int,
) -> CUresult {
    entry("cuOccupancyAvailableDynamicSMemPerBlock", || {
        if num_blocks <= 0 || block_size <= 0 {
            return Err(Failure::quiet(CUDA_ERROR_INVALID_VALUE));
        }
        let d = driver();
        let f = d.function(func as usize)?;
        let static_smem = f.info.static_smem_bytes;
        let per_block = MAX_SHARED_MEMORY_PER_SM / num_blocks as u32;
        let available = per_block
            .saturating_sub(RESERVED_SHARED_MEMORY_PER_BLOCK + static_smem)
            .min(MAX_SHARED_MEMORY_PER_BLOCK_OPTIN.saturating_sub(static_smem));
        // SAFETY: the caller provides storage for one size_t.
        unsafe { write_out(dynamic_smem_size, available as usize) }
    })
}

/// Clusters of the configured shape that can be resident at once: one CTA per SM each.
#[no_mangle]
pub unsafe extern "C" fn cuOccupancyMaxActiveClusters(
    num_clusters: *mut c_int,
    func: CUfunction,
    config: *const CUlaunchConfig,
) -> CUresult {
    entry("cuOccupancyMaxActiveClusters", || {
        // SAFETY: the caller passes a valid CUlaunchConfig (or null, rejected).
        let (request, _) = unsafe { read_config(config)? };
        let d = driver();
        let f = d.function(func as usize)?;
        let cluster = cluster_shape(f, request.cluster)?;
        let size = product(cluster);
        let threads = product(request.block).min(u32::MAX as u64) as u32;
        let fits = blocks_per_sm(&f.info, threads, request.dynamic_smem as u64) > 0
            && request.dynamic_smem <= f.max_dynamic_smem;
        let clusters = if fits && size > 0 { sm_count() as u64 / size } else { 0 };
        // SAFETY: the caller provides storage for one int.
        unsafe { write_out(num_clusters, clusters as c_int) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuOccupancyMaxPotentialClusterSize(
    cluster_size: *mut c_int,
    func: CUfunction,
    config: *const CUlaunchConfig,
) -> CUresult {
    entry("cuOccupancyMaxPotentialClusterSize", || {
        // SAFETY: the caller passes a valid CUlaunchConfig (or null, rejected).
        unsafe { read_config(config)? };
        let d = driver();
        let f = d.function(func as usize)?;
        let size = match f.info.required_cluster {
            Some(c) => product(c) as u32,
            None if f.non_portable_cluster => MAX_NON_PORTABLE_CLUSTER_SIZE.min(sm_count()),
            None => MAX_PORTABLE_CLUSTER_SIZE.min(sm_count()),
        };
        // SAFETY: the caller provides storage for one int.
        unsafe { write_out(cluster_size, size as c_int) }
    })
}

// ---- tensor maps ----

#[no_mangle]
pub unsafe extern "C" fn cuTensorMapEncodeTiled(
    tensor_map: *mut CUtensorMap,
    tensor_data_type: c_uint,
    tensor_rank: u32,
    global_address: *mut c_void,
    global_dim: *const u64,
    global_strides: *const u64,
    box_dim: *const u32,
    element_strides: *const u32,
    interleave: c_uint,
    swizzle: c_uint,
    l2_promotion: c_uint,
    oob_fill: c_uint,
) -> CUresult {
    entry("cuTensorMapEncodeTiled", || {
        if tensor_map.is_null() || global_dim.is_null() || box_dim.is_null() || element_strides.is_null() {
            return Err(Failure::new(CUDA_ERROR_INVALID_VALUE, "a required pointer argument is null"));
        }
        if tensor_rank > 1 && global_strides.is_null() {
            return Err(Failure::new(CUDA_ERROR_INVALID_VALUE, "globalStrides is null for a tensor of rank > 1"));
        }
        let request = TensorMapRequest {
            map: tensor_map.cast(),
            data_type: tensor_data_type,
            rank: tensor_rank,
            global_address,
            global_dim,
            global_strides,
            box_dim,
            element_strides,
            interleave,
            swizzle,
            l2_promotion,
            oob_fill,
        };
        // SAFETY: the pointers are forwarded under the caller's cuTensorMapEncodeTiled contract.
        unsafe { engine::tensor_map_encode_tiled(&request) }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn occupancy_limits() {
        let info = KernelInfo { max_threads: Some(384), registers: Some(168), ..Default::default() };
        // 224 KiB of dynamic shared memory: one block per SM.
        assert_eq!(blocks_per_sm(&info, 384, 224 * 1024), 1);
        let small = KernelInfo { registers: Some(32), ..Default::default() };
        assert_eq!(blocks_per_sm(&small, 256, 0), 8, "thread-limited: 2048 / 256");
        assert_eq!(blocks_per_sm(&small, 32, 0), 32, "block-limited");
        assert_eq!(blocks_per_sm(&small, 2048, 0), 0, "too many threads");
    }
}
