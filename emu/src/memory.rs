//! Device memory: host allocations (256-byte aligned, exactly the requested size, so an overrun by a single byte is
//! outside) registered with the engine; copies and fills are host memory operations on validated ranges.
//!
//! New allocations are filled with 0xFF bytes (NaN as f32, bf16 and e4m3) unless `R1K_EMU_POISON=0`: device memory
//! starts with arbitrary contents, and code that reads what it never wrote should fail here rather than pass by
//! finding zeros.

use std::alloc::Layout;
use std::ffi::{c_uchar, c_uint, c_ushort, c_void};
use std::sync::OnceLock;

use crate::engine;
use crate::entry::{entry, write_out};
use crate::errors::{fail, DriverResult, Failure};
use crate::state::driver;
use crate::types::*;
use crate::work::{submit, MemCopy, MemFill, Pattern, Side, Work};

const DEVICE_ALIGN: usize = 256;
const HOST_ALIGN: usize = 4096;
const POISON_BYTE: u8 = 0xFF;

fn poisoning() -> bool {
    static POISON: OnceLock<bool> = OnceLock::new();
    *POISON.get_or_init(|| std::env::var("R1K_EMU_POISON").map(|v| v != "0").unwrap_or(true))
}

fn layout(bytes: u64, align: usize) -> DriverResult<Layout> {
    usize::try_from(bytes)
        .ok()
        .and_then(|b| Layout::from_size_align(b, align).ok())
        .ok_or_else(|| Failure::new(CUDA_ERROR_OUT_OF_MEMORY, format!("{bytes} bytes cannot be allocated")))
}

/// Allocates device memory for the current context.
pub fn alloc_device(bytes: u64) -> DriverResult<u64> {
    let ctx = driver().current_ctx()?;
    if bytes == 0 {
        return Err(Failure::quiet(CUDA_ERROR_INVALID_VALUE));
    }
    let layout = layout(bytes, DEVICE_ALIGN)?;
    // SAFETY: the layout has a nonzero size.
    let ptr = unsafe { std::alloc::alloc(layout) };
    if ptr.is_null() {
        fail!(CUDA_ERROR_OUT_OF_MEMORY, "the host could not provide {bytes} bytes for a device allocation");
    }
    if poisoning() {
        // SAFETY: freshly allocated, `bytes` long.
        unsafe { std::ptr::write_bytes(ptr, POISON_BYTE, bytes as usize) };
    }
    let address = ptr as u64;
    engine::register_alloc(address, bytes);
    let mut d = driver();
    d.allocations.insert(address, crate::state::DeviceAllocation { bytes, ctx });
    d.allocated_bytes += bytes;
    Ok(address)
}

/// Frees a device allocation (its start address).
pub fn free_device(ptr: u64) -> DriverResult {
    let bytes = {
        let mut d = driver();
        match d.allocations.remove(&ptr) {
            Some(a) => {
                d.allocated_bytes -= a.bytes;
                a.bytes
            }
            None if d.is_device_pointer(ptr) => {
                fail!(CUDA_ERROR_INVALID_VALUE, "{ptr:#x} points inside a device allocation, not at its start")
            }
            None => fail!(CUDA_ERROR_INVALID_VALUE, "{ptr:#x} is not a live device allocation (double free?)"),
        }
    };
    // Withdrawn from the engine before the memory goes back to the host allocator, and while no launch runs.
    engine::unregister_alloc(ptr);
    // SAFETY: allocated by alloc_device with this layout, removed from the table above so freed exactly once.
    unsafe { std::alloc::dealloc(ptr as *mut u8, layout(bytes, DEVICE_ALIGN)?) };
    Ok(())
}

#[no_mangle]
pub unsafe extern "C" fn cuMemAlloc_v2(dptr: *mut CUdeviceptr, bytesize: usize) -> CUresult {
    entry("cuMemAlloc_v2", || {
        if dptr.is_null() {
            return Err(Failure::quiet(CUDA_ERROR_INVALID_VALUE));
        }
        driver().forbid_during_capture("cuMemAlloc")?;
        let ptr = alloc_device(bytesize as u64)?;
        // SAFETY: checked non-null; the caller provides storage for one CUdeviceptr.
        unsafe { write_out(dptr, ptr) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuMemFree_v2(dptr: CUdeviceptr) -> CUresult {
    entry("cuMemFree_v2", || {
        driver().forbid_during_capture("cuMemFree")?;
        free_device(dptr)
    })
}

/// Stream-ordered allocation. Outside capture the stream is idle, so it is an ordinary allocation. Inside capture
/// the memory is allocated at once and stays valid for every replay of the graph.
#[no_mangle]
pub unsafe extern "C" fn cuMemAllocAsync(dptr: *mut CUdeviceptr, bytesize: usize, h_stream: CUstream) -> CUresult {
    entry("cuMemAllocAsync", || {
        if dptr.is_null() {
            return Err(Failure::quiet(CUDA_ERROR_INVALID_VALUE));
        }
        let capture = {
            let d = driver();
            let key = d.resolve_stream(h_stream as usize)?;
            d.capture_of(key)
        };
        let ptr = alloc_device(bytesize as u64)?;
        if let Some(capture) = capture {
            if let Some(c) = driver().captures.get_mut(&capture) {
                c.allocated_inside.push(ptr);
            }
        }
        // SAFETY: checked non-null; the caller provides storage for one CUdeviceptr.
        unsafe { write_out(dptr, ptr) }
    })
}

/// Stream-ordered free. Inside capture: memory allocated in the same capture is released with the graph (replays
/// keep using it); other memory is freed when the graph runs.
#[no_mangle]
pub unsafe extern "C" fn cuMemFreeAsync(dptr: CUdeviceptr, h_stream: CUstream) -> CUresult {
    entry("cuMemFreeAsync", || {
        {
            let mut d = driver();
            let key = d.resolve_stream(h_stream as usize)?;
            if let Some(capture) = d.capture_of(key) {
                if !d.allocations.contains_key(&dptr) {
                    fail!(CUDA_ERROR_INVALID_VALUE, "{dptr:#x} is not a live device allocation");
                }
                let c = d.captures.get_mut(&capture).expect("capture_of returns live captures");
                if c.allocated_inside.contains(&dptr) {
                    c.freed_inside.push(dptr);
                    return Ok(());
                }
            }
        }
        submit(h_stream as usize, Work::Free { ptr: dptr })
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuMemGetInfo_v2(free: *mut usize, total: *mut usize) -> CUresult {
    entry("cuMemGetInfo_v2", || {
        let d = driver();
        d.current_ctx()?;
        let total_bytes = crate::device::total_memory_bytes();
        // SAFETY: the caller provides storage for one size_t each (null rejected by write_out).
        unsafe {
            write_out(free, total_bytes.saturating_sub(d.allocated_bytes) as usize)?;
            write_out(total, total_bytes as usize)
        }
    })
}

fn host_alloc(pp: *mut *mut c_void, bytes: usize) -> DriverResult {
    if pp.is_null() || bytes == 0 {
        return Err(Failure::quiet(CUDA_ERROR_INVALID_VALUE));
    }
    driver().current_ctx()?;
    let layout = layout(bytes as u64, HOST_ALIGN)?;
    // SAFETY: nonzero size.
    let ptr = unsafe { std::alloc::alloc(layout) };
    if ptr.is_null() {
        fail!(CUDA_ERROR_OUT_OF_MEMORY, "the host could not provide {bytes} bytes of pinned memory");
    }
    driver().host_allocations.insert(ptr as u64, bytes as u64);
    // SAFETY: checked non-null above.
    unsafe { write_out(pp, ptr.cast()) }
}

/// Page-locked host memory is ordinary host memory here (kernels cannot address it: it is not registered with
/// the engine).
#[no_mangle]
pub unsafe extern "C" fn cuMemHostAlloc(pp: *mut *mut c_void, bytesize: usize, _flags: c_uint) -> CUresult {
    entry("cuMemHostAlloc", || host_alloc(pp, bytesize))
}

#[no_mangle]
pub unsafe extern "C" fn cuMemAllocHost_v2(pp: *mut *mut c_void, bytesize: usize) -> CUresult {
    entry("cuMemAllocHost_v2", || host_alloc(pp, bytesize))
}

#[no_mangle]
pub unsafe extern "C" fn cuMemFreeHost(p: *mut c_void) -> CUresult {
    entry("cuMemFreeHost", || {
        let Some(bytes) = driver().host_allocations.remove(&(p as u64)) else {
            fail!(CUDA_ERROR_INVALID_VALUE, "{p:?} is not page-locked memory from cuMemHostAlloc/cuMemAllocHost");
        };
        // SAFETY: allocated by host_alloc with this layout; removed from the table so freed once.
        unsafe { std::alloc::dealloc(p.cast(), layout(bytes, HOST_ALIGN)?) };
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuMemGetAddressRange_v2(
    pbase: *mut CUdeviceptr,
    psize: *mut usize,
    dptr: CUdeviceptr,
) -> CUresult {
    entry("cuMemGetAddressRange_v2", || {
        let d = driver();
        let Ok((base, a)) = d.device_range(dptr, 1, "") else {
            fail!(CUDA_ERROR_NOT_FOUND, "{dptr:#x} is not inside a live device allocation");
        };
        // Either output may be null (the API allows it).
        // SAFETY: non-null outputs point to storage of their types per the API contract.
        unsafe {
            if !pbase.is_null() {
                *pbase = base;
            }
            if !psize.is_null() {
                *psize = a.bytes as usize;
            }
        }
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuPointerGetAttribute(data: *mut c_void, attribute: c_uint, ptr: CUdeviceptr) -> CUresult {
    entry("cuPointerGetAttribute", || {
        if data.is_null() {
            return Err(Failure::quiet(CUDA_ERROR_INVALID_VALUE));
        }
        let d = driver();
        let Ok((base, a)) = d.device_range(ptr, 1, "") else {
            fail!(CUDA_ERROR_INVALID_VALUE, "{ptr:#x} is not device memory of this driver");
        };
        let device = d.contexts.get(&a.ctx).map(|c| c.device).unwrap_or(0);
        // SAFETY: `data` points to storage of the attribute's documented type.
        unsafe {
            match attribute {
                CU_POINTER_ATTRIBUTE_CONTEXT => *data.cast::<CUcontext>() = a.ctx as CUcontext,
                CU_POINTER_ATTRIBUTE_MEMORY_TYPE => *data.cast::<c_uint>() = CU_MEMORYTYPE_DEVICE,
                CU_POINTER_ATTRIBUTE_DEVICE_POINTER => *data.cast::<CUdeviceptr>() = ptr,
                CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL => *data.cast::<CUdevice>() = device,
                CU_POINTER_ATTRIBUTE_RANGE_START_ADDR => *data.cast::<CUdeviceptr>() = base,
                CU_POINTER_ATTRIBUTE_RANGE_SIZE => *data.cast::<usize>() = a.bytes as usize,
                CU_POINTER_ATTRIBUTE_IS_MANAGED | CU_POINTER_ATTRIBUTE_MAPPED => *data.cast::<u8>() = 0,
                other => fail!(CUDA_ERROR_INVALID_VALUE, "pointer attribute {other} is not emulated"),
            }
        }
        Ok(())
    })
}

// ---- copies ----

fn copy(stream: CUstream, dst: u64, src: u64, bytes: usize, dst_side: Side, src_side: Side) -> DriverResult {
    submit(stream as usize, Work::Copy(MemCopy { dst, src, bytes: bytes as u64, dst_side, src_side }))
}

/// The synchronous forms run on the legacy NULL stream, which stream capture forbids.
fn copy_sync(what: &str, dst: u64, src: u64, bytes: usize, dst_side: Side, src_side: Side) -> DriverResult {
    driver().forbid_during_capture(what)?;
    copy(std::ptr::null_mut(), dst, src, bytes, dst_side, src_side)
}

fn fill(stream: CUstream, dst: u64, pattern: Pattern, count: usize) -> DriverResult {
    submit(stream as usize, Work::Fill(MemFill { dst, pattern, count: count as u64 }))
}

fn fill_sync(what: &str, dst: u64, pattern: Pattern, count: usize) -> DriverResult {
    driver().forbid_during_capture(what)?;
    fill(std::ptr::null_mut(), dst, pattern, count)
}

fn same_or_known_contexts(dst_ctx: CUcontext, src_ctx: CUcontext) -> DriverResult {
    let d = driver();
    d.context(dst_ctx as usize)?;
    d.context(src_ctx as usize)?;
    Ok(())
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyHtoD_v2(dst: CUdeviceptr, src: *const c_void, bytes: usize) -> CUresult {
    entry("cuMemcpyHtoD_v2", || copy_sync("cuMemcpyHtoD", dst, src as u64, bytes, Side::Device, Side::Host))
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoH_v2(dst: *mut c_void, src: CUdeviceptr, bytes: usize) -> CUresult {
    entry("cuMemcpyDtoH_v2", || copy_sync("cuMemcpyDtoH", dst as u64, src, bytes, Side::Host, Side::Device))
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoD_v2(dst: CUdeviceptr, src: CUdeviceptr, bytes: usize) -> CUresult {
    entry("cuMemcpyDtoD_v2", || copy_sync("cuMemcpyDtoD", dst, src, bytes, Side::Device, Side::Device))
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpy(dst: CUdeviceptr, src: CUdeviceptr, bytes: usize) -> CUresult {
    entry("cuMemcpy", || copy_sync("cuMemcpy", dst, src, bytes, Side::Unified, Side::Unified))
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyPeer(
    dst: CUdeviceptr,
    dst_ctx: CUcontext,
    src: CUdeviceptr,
    src_ctx: CUcontext,
    bytes: usize,
) -> CUresult {
    entry("cuMemcpyPeer", || {
        same_or_known_contexts(dst_ctx, src_ctx)?;
        copy_sync("cuMemcpyPeer", dst, src, bytes, Side::Device, Side::Device)
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyHtoDAsync_v2(
    dst: CUdeviceptr,
    src: *const c_void,
    bytes: usize,
    h_stream: CUstream,
) -> CUresult {
    entry("cuMemcpyHtoDAsync_v2", || copy(h_stream, dst, src as u64, bytes, Side::Device, Side::Host))
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoHAsync_v2(
    dst: *mut c_void,
    src: CUdeviceptr,
    bytes: usize,
    h_stream: CUstream,
) -> CUresult {
    entry("cuMemcpyDtoHAsync_v2", || copy(h_stream, dst as u64, src, bytes, Side::Host, Side::Device))
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoDAsync_v2(
    dst: CUdeviceptr,
    src: CUdeviceptr,
    bytes: usize,
    h_stream: CUstream,
) -> CUresult {
    entry("cuMemcpyDtoDAsync_v2", || copy(h_stream, dst, src, bytes, Side::Device, Side::Device))
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyAsync(
    dst: CUdeviceptr,
    src: CUdeviceptr,
    bytes: usize,
    h_stream: CUstream,
) -> CUresult {
    entry("cuMemcpyAsync", || copy(h_stream, dst, src, bytes, Side::Unified, Side::Unified))
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyPeerAsync(
    dst: CUdeviceptr,
    dst_ctx: CUcontext,
    src: CUdeviceptr,
    src_ctx: CUcontext,
    bytes: usize,
    h_stream: CUstream,
) -> CUresult {
    entry("cuMemcpyPeerAsync", || {
        same_or_known_contexts(dst_ctx, src_ctx)?;
        copy(h_stream, dst, src, bytes, Side::Device, Side::Device)
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuMemsetD8_v2(dst: CUdeviceptr, value: c_uchar, count: usize) -> CUresult {
    entry("cuMemsetD8_v2", || fill_sync("cuMemsetD8", dst, Pattern::U8(value), count))
}

#[no_mangle]
pub unsafe extern "C" fn cuMemsetD16_v2(dst: CUdeviceptr, value: c_ushort, count: usize) -> CUresult {
    entry("cuMemsetD16_v2", || fill_sync("cuMemsetD16", dst, Pattern::U16(value), count))
}

#[no_mangle]
pub unsafe extern "C" fn cuMemsetD32_v2(dst: CUdeviceptr, value: c_uint, count: usize) -> CUresult {
    entry("cuMemsetD32_v2", || fill_sync("cuMemsetD32", dst, Pattern::U32(value), count))
}

#[no_mangle]
pub unsafe extern "C" fn cuMemsetD8Async(
    dst: CUdeviceptr,
    value: c_uchar,
    count: usize,
    h_stream: CUstream,
) -> CUresult {
    entry("cuMemsetD8Async", || fill(h_stream, dst, Pattern::U8(value), count))
}

#[no_mangle]
pub unsafe extern "C" fn cuMemsetD16Async(
    dst: CUdeviceptr,
    value: c_ushort,
    count: usize,
    h_stream: CUstream,
) -> CUresult {
    entry("cuMemsetD16Async", || fill(h_stream, dst, Pattern::U16(value), count))
}

#[no_mangle]
pub unsafe extern "C" fn cuMemsetD32Async(
    dst: CUdeviceptr,
    value: c_uint,
    count: usize,
    h_stream: CUstream,
) -> CUresult {
    entry("cuMemsetD32Async", || fill(h_stream, dst, Pattern::U32(value), count))
}
