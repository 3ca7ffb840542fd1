//! Everything the emulated driver remembers, behind one lock: contexts, streams (with their capture state),
//! events, modules, functions, graphs and device allocations.
//!
//! Handles given out to callers are opaque integers, unique across all kinds, so a handle of the wrong kind is
//! rejected instead of being mistaken for another object. None is ever 0, 1 or 2 (null, CU_STREAM_LEGACY,
//! CU_STREAM_PER_THREAD).

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::ThreadId;

use crate::cubin::{Cubin, KernelInfo};
use crate::engine::KernelHandle;
use crate::errors::{fail, DriverResult, Failure};
use crate::types::*;
use crate::work::Work;

static DRIVER: Mutex<Option<Driver>> = Mutex::new(None);

/// Locks the driver state. Never call while holding the engine lock (see `engine`).
pub fn driver() -> DriverGuard {
    // Every mutation leaves the maps consistent before anything that can panic, so a poisoned lock is usable.
    let mut guard = DRIVER.lock().unwrap_or_else(PoisonError::into_inner);
    guard.get_or_insert_with(Driver::new);
    DriverGuard(guard)
}

pub struct DriverGuard(MutexGuard<'static, Option<Driver>>);

impl std::ops::Deref for DriverGuard {
    type Target = Driver;
    fn deref(&self) -> &Driver {
        self.0.as_ref().expect("initialized in driver()")
    }
}

impl std::ops::DerefMut for DriverGuard {
    fn deref_mut(&mut self) -> &mut Driver {
        self.0.as_mut().expect("initialized in driver()")
    }
}

thread_local! {
    /// This thread's context stack (cuCtxPushCurrent / cuCtxPopCurrent); the top is the current context.
    static CONTEXT_STACK: RefCell<Vec<usize>> = const { RefCell::new(Vec::new()) };
}

/// The calling thread's current context handle, if any.
pub fn current_context() -> Option<usize> {
    CONTEXT_STACK.with(|s| s.borrow().last().copied())
}

/// Replaces the top of the calling thread's context stack (cuCtxSetCurrent); `None` unbinds.
pub fn set_current_context(ctx: Option<usize>) {
    CONTEXT_STACK.with(|s| {
        let mut s = s.borrow_mut();
        s.pop();
        if let Some(ctx) = ctx {
            s.push(ctx);
        }
    })
}

pub fn push_context(ctx: usize) {
    CONTEXT_STACK.with(|s| s.borrow_mut().push(ctx))
}

pub fn pop_context() -> Option<usize> {
    CONTEXT_STACK.with(|s| s.borrow_mut().pop())
}

pub struct Context {
    pub device: CUdevice,
    pub primary: bool,
    pub flags: u32,
    /// The last launch failure on the context's implicit (NULL) stream, reported once by the next synchronize.
    pub pending: Option<PendingFailure>,
}

/// A kernel fault, reported at its launch and once more at a later synchronization, as a device reports an
/// asynchronous error. The launching thread is kept because cuCtxSynchronize reports only the caller's own
/// faults: threads (concurrent tests) share the primary context, and one must not receive another's failure.
pub struct PendingFailure {
    pub failure: Failure,
    pub thread: ThreadId,
}

pub struct PrimaryContext {
    pub handle: usize,
    pub retains: u32,
    pub flags: u32,
}

/// A capture's view of one participating stream: its own operation count and the latest operation count of
/// every stream it has waited on (a vector clock), used to detect unjoined forks at cuStreamEndCapture.
#[derive(Clone, Default)]
pub struct Membership {
    pub capture: u64,
    pub seen: HashMap<usize, u64>,
}

impl Membership {
    pub fn merge(&mut self, other: &HashMap<usize, u64>) {
        for (&stream, &count) in other {
            let entry = self.seen.entry(stream).or_insert(0);
            *entry = (*entry).max(count);
        }
    }
}

pub struct Stream {
    pub ctx: usize,
    pub flags: u32,
    pub priority: i32,
    /// The last launch failure on this stream, reported once by the next synchronize.
    pub pending: Option<PendingFailure>,
    pub capture: Option<Membership>,
}

pub struct Capture {
    /// The stream cuStreamBeginCapture was called on (the one that must end it).
    pub origin: usize,
    pub mode: u32,
    pub thread: ThreadId,
    /// Set once an operation broke the capture's rules: the capture can then only end, in failure.
    pub invalidated: Option<CUresult>,
    pub work: Vec<Work>,
    /// Streams that joined the capture by waiting on one of its events.
    pub members: Vec<usize>,
    /// Allocations made by cuMemAllocAsync inside this capture.
    pub allocated_inside: Vec<u64>,
    /// Allocations made and freed inside this capture: they must outlive every replay, so they are released with
    /// the graph.
    pub freed_inside: Vec<u64>,
}

#[derive(Clone)]
pub enum EventState {
    NeverRecorded,
    /// Recorded outside capture at this virtual time (nanoseconds).
    At(u64),
    /// Recorded into a capture, with the recording stream's vector clock.
    Captured {
        capture: u64,
        seen: HashMap<usize, u64>,
    },
}

pub struct Event {
    pub flags: u32,
    pub state: EventState,
}

pub struct Module {
    pub cubin: Cubin,
    /// Function handles already handed out, by kernel name (the driver returns the same handle each time).
    pub functions: HashMap<String, usize>,
}

pub struct Function {
    pub name: String,
    pub kernel: KernelHandle,
    pub info: KernelInfo,
    /// Byte size of each parameter, in order (what a capture deep-copies).
    pub param_sizes: Arc<[u32]>,
    pub max_dynamic_smem: u32,
    pub carveout: i32,
    pub non_portable_cluster: bool,
    pub cluster_scheduling_policy: i32,
}

/// What a captured graph replays, shared by the graph and every executable instantiated from it.
pub struct GraphBody {
    pub work: Vec<Work>,
    pub freed_inside: Vec<u64>,
}

pub struct DeviceAllocation {
    pub bytes: u64,
    pub ctx: usize,
}

pub struct Driver {
    next_handle: usize,
    next_capture: u64,
    pub primary: BTreeMap<CUdevice, PrimaryContext>,
    pub contexts: HashMap<usize, Context>,
    pub streams: HashMap<usize, Stream>,
    pub captures: HashMap<u64, Capture>,
    pub events: HashMap<usize, Event>,
    pub modules: HashMap<usize, Module>,
    pub functions: HashMap<usize, Function>,
    pub graphs: HashMap<usize, Arc<GraphBody>>,
    pub graph_execs: HashMap<usize, Arc<GraphBody>>,
    pub allocations: BTreeMap<u64, DeviceAllocation>,
    pub host_allocations: BTreeMap<u64, u64>,
    pub allocated_bytes: u64,
    /// Virtual time in nanoseconds: advances with each operation, never with host time (so nothing derived from
    /// it can pass for a measurement).
    pub clock_ns: u64,
}

/// A stream as operations see it: an explicit stream, or the NULL/legacy/per-thread stream of a context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKey {
    Explicit(usize),
    Implicit(usize),
}

impl StreamKey {
    pub fn describe(self) -> String {
        match self {
            StreamKey::Explicit(h) => format!("stream {h:#x}"),
            StreamKey::Implicit(_) => "the NULL stream".into(),
        }
    }
}

impl Driver {
    fn new() -> Self {
        Driver {
            next_handle: 0x1000,
            next_capture: 1,
            primary: BTreeMap::new(),
            contexts: HashMap::new(),
            streams: HashMap::new(),
            captures: HashMap::new(),
            events: HashMap::new(),
            modules: HashMap::new(),
            functions: HashMap::new(),
            graphs: HashMap::new(),
            graph_execs: HashMap::new(),
            allocations: BTreeMap::new(),
            host_allocations: BTreeMap::new(),
            allocated_bytes: 0,
            clock_ns: 0,
        }
    }

    pub fn new_handle(&mut self) -> usize {
        self.next_handle += 0x10;
        self.next_handle
    }

    pub fn new_capture_id(&mut self) -> u64 {
        self.next_capture += 1;
        self.next_capture
    }

    /// The calling thread's current context, which must still exist.
    pub fn current_ctx(&self) -> DriverResult<usize> {
        match current_context() {
            Some(ctx) if self.contexts.contains_key(&ctx) => Ok(ctx),
            Some(ctx) => fail!(CUDA_ERROR_INVALID_CONTEXT, "the current context {ctx:#x} was destroyed"),
            None => fail!(CUDA_ERROR_INVALID_CONTEXT, "no context is current on this thread"),
        }
    }

    pub fn context(&self, handle: usize) -> DriverResult<&Context> {
        match self.contexts.get(&handle) {
            Some(c) => Ok(c),
            None => fail!(CUDA_ERROR_INVALID_CONTEXT, "{handle:#x} is not a context"),
        }
    }

    pub fn resolve_stream(&self, handle: usize) -> DriverResult<StreamKey> {
        if handle == 0 || handle == CU_STREAM_LEGACY || handle == CU_STREAM_PER_THREAD {
            return Ok(StreamKey::Implicit(self.current_ctx()?));
        }
        if self.streams.contains_key(&handle) {
            Ok(StreamKey::Explicit(handle))
        } else {
            fail!(CUDA_ERROR_INVALID_HANDLE, "{handle:#x} is not a live stream")
        }
    }

    pub fn stream_mut(&mut self, handle: usize) -> DriverResult<&mut Stream> {
        match self.streams.get_mut(&handle) {
            Some(s) => Ok(s),
            None => fail!(CUDA_ERROR_INVALID_HANDLE, "{handle:#x} is not a live stream"),
        }
    }

    pub fn event_mut(&mut self, handle: usize) -> DriverResult<&mut Event> {
        match self.events.get_mut(&handle) {
            Some(e) => Ok(e),
            None => fail!(CUDA_ERROR_INVALID_HANDLE, "{handle:#x} is not a live event"),
        }
    }

    pub fn function(&self, handle: usize) -> DriverResult<&Function> {
        match self.functions.get(&handle) {
            Some(f) => Ok(f),
            None => fail!(CUDA_ERROR_INVALID_HANDLE, "{handle:#x} is not a loaded function"),
        }
    }

    pub fn function_mut(&mut self, handle: usize) -> DriverResult<&mut Function> {
        match self.functions.get_mut(&handle) {
            Some(f) => Ok(f),
            None => fail!(CUDA_ERROR_INVALID_HANDLE, "{handle:#x} is not a loaded function"),
        }
    }

    /// The capture `key` takes part in, if any.
    pub fn capture_of(&self, key: StreamKey) -> Option<u64> {
        match key {
            StreamKey::Explicit(h) => self.streams.get(&h).and_then(|s| s.capture.as_ref()).map(|m| m.capture),
            StreamKey::Implicit(_) => None,
        }
    }

    /// Marks a capture as broken by `code`; it can then only be ended, and ending it fails.
    pub fn invalidate_capture(&mut self, capture: u64, code: CUresult) {
        if let Some(c) = self.captures.get_mut(&capture) {
            c.invalidated.get_or_insert(code);
        }
    }

    /// Refuses an operation that stream capture forbids ("potentially unsafe" calls: synchronous allocation,
    /// legacy-stream copies, context synchronization) while a global-mode capture is active anywhere, or a
    /// thread-local one on this thread; the refusal invalidates those captures, as on a real device.
    pub fn forbid_during_capture(&mut self, what: &str) -> DriverResult {
        let me = std::thread::current().id();
        let offending: Vec<u64> = self
            .captures
            .iter()
            .filter(|(_, c)| {
                c.mode == CU_STREAM_CAPTURE_MODE_GLOBAL
                    || (c.mode == CU_STREAM_CAPTURE_MODE_THREAD_LOCAL && c.thread == me)
            })
            .map(|(&id, _)| id)
            .collect();
        if offending.is_empty() {
            return Ok(());
        }
        for &id in &offending {
            self.invalidate_capture(id, CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED);
        }
        let origin = self.captures.get(&offending[0]).map(|c| c.origin).unwrap_or(0);
        fail!(
            CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,
            "{what} is not permitted while stream {origin:#x} is capturing (the capture is now invalidated)"
        )
    }

    /// The live device allocation containing `[ptr, ptr + bytes)`.
    pub fn device_range(&self, ptr: u64, bytes: u64, what: &str) -> DriverResult<(u64, &DeviceAllocation)> {
        if let Some((&base, a)) = self.allocations.range(..=ptr).next_back() {
            if ptr.checked_add(bytes).is_some_and(|end| end <= base + a.bytes) {
                return Ok((base, a));
            }
            if ptr < base + a.bytes {
                fail!(
                    CUDA_ERROR_INVALID_VALUE,
                    "{what} [{ptr:#x}, +{bytes}) overruns the allocation [{base:#x}, +{}) by {} bytes",
                    a.bytes,
                    ptr + bytes - (base + a.bytes)
                );
            }
        }
        fail!(CUDA_ERROR_INVALID_VALUE, "{what} [{ptr:#x}, +{bytes}) is not inside a live device allocation")
    }

    /// True when `ptr` lies inside a live device allocation.
    pub fn is_device_pointer(&self, ptr: u64) -> bool {
        self.device_range(ptr, 1, "").is_ok()
    }
}
