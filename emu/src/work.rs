//! Stream work: what a stream operation does, how it runs, and how a capturing stream records it instead.
//!
//! The emulated device executes every operation at the call, on the calling thread, so a stream is always idle
//! when the call returns; only a capturing stream defers work, into the graph being built.

use std::ffi::c_void;
use std::sync::Arc;

use crate::engine::{self, EngineLaunchConfig, KernelHandle};
use crate::errors::{fail, DriverResult, Failure};
use crate::state::{driver, Driver, PendingFailure, StreamKey};
use crate::types::*;

/// Virtual nanoseconds one operation takes (only event timestamps see this).
const OPERATION_NS: u64 = 1000;

#[derive(Clone)]
pub enum Work {
    Launch(Box<LaunchWork>),
    Copy(MemCopy),
    Fill(MemFill),
    HostFn {
        f: unsafe extern "C" fn(*mut c_void),
        data: usize,
    },
    /// A cuMemFreeAsync recorded into a graph (freeing memory allocated outside the capture).
    Free {
        ptr: u64,
    },
}

#[derive(Clone)]
pub struct LaunchWork {
    pub kernel: KernelHandle,
    pub name: String,
    pub config: EngineLaunchConfig,
    pub param_sizes: Arc<[u32]>,
    pub params: Params,
}

/// Kernel arguments: the caller's pointer array (valid only during the launch call), or a deep copy owned by a
/// graph.
#[derive(Clone)]
pub enum Params {
    Borrowed(*mut *mut c_void),
    Owned(ParamBlock),
}

// SAFETY: a Borrowed pointer array is only dereferenced during the entry point call that received it, on that
// thread; captures and graphs (the shared state) hold only Owned copies, which are plain bytes.
unsafe impl Send for Params {}
// SAFETY: as above; an Owned block is never mutated through a shared reference.
unsafe impl Sync for Params {}

#[repr(C, align(128))]
#[derive(Clone, Copy)]
struct Chunk([u8; 128]);

/// Deep copy of a kernel's arguments. Each parameter sits at an offset aligned to the largest power of two that
/// divides its size (capped at 128): never less than its type's alignment, since a type's size is a multiple of its
/// alignment, so the engine may read each one in place as its declared type (CUDA 13 declares CUtensorMap
/// `alignas(128)`).
#[derive(Clone)]
pub struct ParamBlock {
    storage: Vec<Chunk>,
    offsets: Vec<usize>,
}

impl ParamBlock {
    /// Copies `sizes.len()` parameters from the caller's pointer array.
    ///
    /// # Safety
    /// `params` must hold `sizes.len()` pointers, the i-th readable for `sizes[i]` bytes.
    pub unsafe fn copy_from(params: *mut *mut c_void, sizes: &[u32]) -> DriverResult<Self> {
        if params.is_null() && !sizes.is_empty() {
            fail!(CUDA_ERROR_INVALID_VALUE, "kernelParams is null but the kernel takes {} parameters", sizes.len());
        }
        let mut offsets = Vec::with_capacity(sizes.len());
        let mut end = 0usize;
        for &size in sizes {
            let align = 1usize << size.trailing_zeros().min(7);
            let offset = end.div_ceil(align) * align;
            offsets.push(offset);
            end = offset + size as usize;
        }
        let mut storage = vec![Chunk([0; 128]); end.div_ceil(128).max(1)];
        let base = storage.as_mut_ptr().cast::<u8>();
        for (i, (&size, &offset)) in sizes.iter().zip(&offsets).enumerate() {
            // SAFETY: `params` has sizes.len() entries (caller contract).
            let src = unsafe { *params.add(i) };
            if src.is_null() {
                fail!(CUDA_ERROR_INVALID_VALUE, "kernelParams[{i}] is null");
            }
            // SAFETY: src is readable for `size` bytes (caller contract); the destination lies inside `storage`.
            unsafe { std::ptr::copy_nonoverlapping(src.cast::<u8>(), base.add(offset), size as usize) };
        }
        Ok(ParamBlock { storage, offsets })
    }

    /// The pointer array the engine takes, pointing into this block.
    fn pointers(&mut self) -> Vec<*mut c_void> {
        let base = self.storage.as_mut_ptr().cast::<u8>();
        // SAFETY: every offset lies inside `storage`.
        self.offsets.iter().map(|&o| unsafe { base.add(o) }.cast::<c_void>()).collect()
    }
}

/// Which side of a copy is device memory (checked against live allocations) and which is host memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Device,
    Host,
    /// cuMemcpy with unified addressing: device if it lies in a device allocation, host otherwise.
    Unified,
}

#[derive(Clone, Debug)]
pub struct MemCopy {
    pub dst: u64,
    pub src: u64,
    pub bytes: u64,
    pub dst_side: Side,
    pub src_side: Side,
}

#[derive(Clone, Copy, Debug)]
pub enum Pattern {
    U8(u8),
    U16(u16),
    U32(u32),
}

impl Pattern {
    fn width(self) -> u64 {
        match self {
            Pattern::U8(_) => 1,
            Pattern::U16(_) => 2,
            Pattern::U32(_) => 4,
        }
    }
}

#[derive(Clone, Debug)]
pub struct MemFill {
    pub dst: u64,
    pub pattern: Pattern,
    pub count: u64,
}

impl Work {
    /// Checks what can be checked against driver state now (cuMemcpy* validates pointers at the call, capturing or
    /// not).
    fn check(&self, d: &Driver) -> DriverResult {
        match self {
            Work::Copy(c) => check_copy(d, c),
            Work::Fill(f) => check_fill(d, f),
            Work::Launch(_) | Work::HostFn { .. } | Work::Free { .. } => Ok(()),
        }
    }

    /// A copy that may outlive the call that submitted it.
    ///
    /// # Safety
    /// A Borrowed launch must still have its caller's pointers alive.
    unsafe fn into_owned(self) -> DriverResult<Work> {
        Ok(match self {
            Work::Launch(mut l) => {
                if let Params::Borrowed(p) = l.params {
                    // SAFETY: per this function's contract and the param sizes recorded for the kernel.
                    l.params = Params::Owned(unsafe { ParamBlock::copy_from(p, &l.param_sizes)? });
                }
                Work::Launch(l)
            }
            other => other,
        })
    }
}

fn check_side(d: &Driver, side: Side, ptr: u64, bytes: u64, what: &str) -> DriverResult {
    match side {
        Side::Device => d.device_range(ptr, bytes, what).map(|_| ()),
        Side::Host | Side::Unified if ptr == 0 => fail!(CUDA_ERROR_INVALID_VALUE, "{what} is a null pointer"),
        Side::Unified if d.is_device_pointer(ptr) => d.device_range(ptr, bytes, what).map(|_| ()),
        Side::Host | Side::Unified => Ok(()),
    }
}

fn check_copy(d: &Driver, c: &MemCopy) -> DriverResult {
    if c.bytes == 0 {
        return Ok(());
    }
    check_side(d, c.dst_side, c.dst, c.bytes, "destination")?;
    check_side(d, c.src_side, c.src, c.bytes, "source")
}

fn check_fill(d: &Driver, f: &MemFill) -> DriverResult {
    let width = f.pattern.width();
    if !f.dst.is_multiple_of(width) {
        fail!(CUDA_ERROR_INVALID_VALUE, "destination {:#x} is not aligned to the {width}-byte fill value", f.dst);
    }
    let Some(bytes) = f.count.checked_mul(width) else {
        fail!(CUDA_ERROR_INVALID_VALUE, "{} elements of {width} bytes overflow", f.count);
    };
    if bytes == 0 {
        return Ok(());
    }
    d.device_range(f.dst, bytes, "destination").map(|_| ())
}

/// Runs `work` on `stream`, or records it when the stream is capturing.
pub fn submit(stream: usize, work: Work) -> DriverResult {
    let mut d = driver();
    let key = d.resolve_stream(stream)?;
    work.check(&d)?;
    if let Some(capture) = d.capture_of(key) {
        return record(&mut d, key, capture, work);
    }
    d.clock_ns += OPERATION_NS;
    drop(d);
    execute(key, work)
}

/// Appends `work` to the capture `stream` takes part in.
fn record(d: &mut Driver, key: StreamKey, capture: u64, work: Work) -> DriverResult {
    let StreamKey::Explicit(stream) = key else { unreachable!("implicit streams never capture") };
    if d.captures.get(&capture).is_some_and(|c| c.invalidated.is_some()) {
        fail!(
            CUDA_ERROR_STREAM_CAPTURE_INVALIDATED,
            "{} is capturing into a capture that an earlier error invalidated; end the capture",
            key.describe()
        );
    }
    // SAFETY: submit's callers pass Borrowed params only from the entry point call that is still running.
    let work = unsafe { work.into_owned()? };
    if let Some(m) = d.streams.get_mut(&stream).and_then(|s| s.capture.as_mut()) {
        *m.seen.entry(stream).or_insert(0) += 1;
    }
    if let Some(c) = d.captures.get_mut(&capture) {
        c.work.push(work);
    }
    Ok(())
}

/// Executes `work` now, on this thread. A launch failure is also left pending on the stream, so the next
/// synchronization reports it again, as an asynchronous error would be on a device.
pub fn execute(key: StreamKey, work: Work) -> DriverResult {
    match work {
        Work::Launch(mut l) => {
            let mut owned;
            let params = match &mut l.params {
                Params::Borrowed(p) => *p,
                Params::Owned(block) => {
                    owned = block.pointers();
                    owned.as_mut_ptr()
                }
            };
            // SAFETY: Borrowed pointers come from the running entry point call; Owned ones point into `l.params`,
            // alive until the end of this arm. Both hold the kernel's parameters in order.
            let result = unsafe { engine::launch(l.kernel, &l.config, params) };
            result.map_err(|f| {
                // A configuration the engine refuses fails like a launch-time error; anything else is a fault of
                // the running kernel, which a device would also report at the next synchronization.
                if f.code != CUDA_ERROR_INVALID_VALUE {
                    leave_pending(key, f.code, &l.name);
                }
                Failure::new(f.code, format!("{}: {}", l.name, f.reason.unwrap_or_default()))
            })
        }
        Work::Copy(c) => {
            let d = driver();
            check_copy(&d, &c)?;
            if c.bytes > 0 {
                // SAFETY: device sides lie in live allocations (checked above, under the lock that keeps them
                // alive); host sides are the caller's, valid per the API contract. copy handles overlap.
                unsafe { std::ptr::copy(c.src as *const u8, c.dst as *mut u8, c.bytes as usize) };
            }
            Ok(())
        }
        Work::Fill(f) => {
            let d = driver();
            check_fill(&d, &f)?;
            // SAFETY: [dst, dst + count·width) lies in a live allocation and dst is aligned to the width (checked
            // above, under the lock).
            unsafe { fill(f.dst, f.pattern, f.count as usize) };
            Ok(())
        }
        Work::HostFn { f, data } => {
            // SAFETY: the caller of cuLaunchHostFunc provided f and its argument.
            unsafe { f(data as *mut c_void) };
            Ok(())
        }
        Work::Free { ptr } => crate::memory::free_device(ptr),
    }
}

fn leave_pending(key: StreamKey, code: CUresult, kernel: &str) {
    let pending = || PendingFailure {
        failure: Failure::new(code, format!("reporting again the failure of the earlier launch of {kernel}")),
        thread: std::thread::current().id(),
    };
    let mut d = driver();
    match key {
        StreamKey::Explicit(h) => {
            if let Some(s) = d.streams.get_mut(&h) {
                s.pending = Some(pending());
            }
        }
        StreamKey::Implicit(ctx) => {
            if let Some(c) = d.contexts.get_mut(&ctx) {
                c.pending = Some(pending());
            }
        }
    }
}

/// # Safety
/// `[dst, dst + count·width)` must be writable and `dst` aligned to the pattern's width.
unsafe fn fill(dst: u64, pattern: Pattern, count: usize) {
    // SAFETY: per this function's contract.
    unsafe {
        match pattern {
            Pattern::U8(v) => std::ptr::write_bytes(dst as *mut u8, v, count),
            Pattern::U16(v) => std::slice::from_raw_parts_mut(dst as *mut u16, count).fill(v),
            Pattern::U32(v) => std::slice::from_raw_parts_mut(dst as *mut u32, count).fill(v),
        }
    }
}
